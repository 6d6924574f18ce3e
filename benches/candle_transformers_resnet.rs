//! candle-transformers' ResNet-50, timed like `resnet bench`, for `compare.py`.
//!
//!     cargo build --release -p resnet-benches --features peers
//!     target/release/candle-transformers-resnet BATCH ITERS THREADS
//!
//! Prints `{"median_ms": ..., "min_ms": ...}`. Random weights (speed does not depend on
//! them), f32, CPU.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().with_context(|| format!("not a number: {a}")))
        .collect::<Result<_>>()?;
    let [batch, iters, threads] = args[..] else {
        bail!("usage: candle-transformers-resnet BATCH ITERS THREADS");
    };
    // As `resnet --threads` does: candle sizes its thread pool from this.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = candle_transformers::models::resnet::resnet50(1000, vb)?;
    let input = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &device)?;
    model.forward(&input)?; // warm-up
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = std::time::Instant::now();
        model.forward(&input)?.to_vec2::<f32>()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"median_ms\": {:.3}, \"min_ms\": {:.3}}}",
        times[times.len() / 2],
        times[0]
    );
    Ok(())
}
