//! Loads a checkpoint the way `resnet` does and prints how long it took; run under
//! `/usr/bin/time -v` to see the peak memory:
//!
//!     cargo run --release -p resnet-io --example load_time -- resnet50.safetensors

use std::time::Instant;

use candle_core::{DType, Device};

fn main() -> anyhow::Result<()> {
    let Some(path) = std::env::args().nth(1) else {
        anyhow::bail!("usage: load_time FILE.safetensors");
    };
    let started = Instant::now();
    let loaded = resnet_io::load_file(&path, None, &Device::Cpu, DType::F32)?;
    let elapsed = started.elapsed();
    println!(
        "{}: {} ({} parameters) loaded in {:.1} ms",
        path,
        loaded.config.describe(),
        loaded.model.num_parameters(),
        elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}
