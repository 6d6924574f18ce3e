//! `resnet bench`: inference time per batch.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde_json::json;

use crate::common::{check_forward_memory, model_or_random, GlobalOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Architecture name, or auto with --model.
    #[arg(long)]
    arch: String,
    /// Images per batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Input height and width (default: 224, or 32 for CIFAR networks).
    #[arg(long)]
    size: Option<usize>,
    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Weights to use instead of a random initialisation.
    #[arg(long)]
    model: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(global: &GlobalOptions, args: Args) -> Result<()> {
    if args.batch == 0 || args.iters == 0 {
        bail!("--batch and --iters must be at least 1");
    }
    let (model, device, dtype) = model_or_random(global, args.model.as_deref(), &args.arch)?;
    let config = model.config();
    let size = args.size.unwrap_or(match config.stem {
        resnet_core::StemKind::Cifar => 32,
        _ => 224,
    });
    check_forward_memory([args.batch, config.in_channels, size, size], dtype, &device)?;
    let input = Tensor::randn(
        0f32,
        1.0,
        (args.batch, config.in_channels, size, size),
        &device,
    )?
    .to_dtype(dtype)?;
    let run_once = || -> Result<f64> {
        let started = Instant::now();
        let output = model.forward(&input)?;
        // Wait for the device: reading the result synchronises.
        output
            .sum_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..args.warmup {
        run_once()?;
    }
    let mut times = (0..args.iters)
        .map(|_| run_once())
        .collect::<Result<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let min = times[0];
    let images_per_sec = args.batch as f64 / (median / 1e3);
    let threads = candle_core::utils::get_num_threads();
    if args.json {
        let summary = json!({
            "arch": config.describe(),
            "batch": args.batch,
            "size": size,
            "dtype": format!("{dtype:?}").to_lowercase(),
            "device": resnet_core::device_name(&device),
            "threads": threads,
            "iters": args.iters,
            "median_ms": median,
            "min_ms": min,
            "images_per_sec": images_per_sec,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} batch {} at {size}x{size}, {:?} on {} ({threads} threads): median {median:.2} ms, min {min:.2} ms, {images_per_sec:.1} images/s",
            config.describe(),
            args.batch,
            dtype,
            resnet_core::device_name(&device)
        );
    }
    Ok(())
}
