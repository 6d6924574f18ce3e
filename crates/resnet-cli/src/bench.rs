//! `resnet bench`: inference time per batch, or a training step's (`--train`).

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use resnet_train::Optimizer as _;
use serde_json::json;

use crate::common::{
    check_forward_memory, load_model_named, model_or_random, random_unfolded, GlobalOptions,
};

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
    /// Time one full training step instead: train-mode forward, cross-entropy, backward,
    /// SGD update (momentum 0.9, weight decay 1e-4).
    #[arg(long)]
    train: bool,
}

/// Median (ms) of each phase of a training step, and of the whole.
struct StepTimes {
    total: Vec<f64>,
    forward: Vec<f64>,
    backward: Vec<f64>,
    update: Vec<f64>,
}

/// `--size`, else the architecture's usual input: 32 for CIFAR networks, else 224.
fn input_size(size: Option<usize>, stem: resnet_core::StemKind) -> usize {
    size.unwrap_or(match stem {
        resnet_core::StemKind::Cifar => 32,
        _ => 224,
    })
}

/// The fields every `--json` summary has.
fn summary(
    model: &resnet_core::ResNet,
    args: &Args,
    size: usize,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    median_ms: f64,
    min_ms: f64,
) -> serde_json::Value {
    let config = model.config();
    let kernels = model.kernel_summary();
    let gflops = achieved_gflops(model, args, size, median_ms);
    json!({
        "arch": config.describe(),
        // The blocked kernels' instruction set, null where they do not run.
        "isa": kernels.isa.map(|isa| isa.name()),
        "kernels": kernels.to_string(),
        "batch": args.batch,
        "size": size,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "device": resnet_core::device_name(device),
        "threads": candle_core::utils::get_num_threads(),
        "iters": args.iters,
        "median_ms": median_ms,
        "min_ms": min_ms,
        "images_per_sec": args.batch as f64 / (median_ms / 1e3),
        // Multiply-adds of one image's forward pass (convolutions and classifier, the
        // direct algorithm's count), and the FLOP rate that the median reaches: a
        // training step counted as three forward passes' work.
        "multiply_adds_per_image": model.multiply_adds(size, size),
        "gflops_per_sec": gflops,
    })
}

/// FLOP/s (in G) of a batch at the median time: 2 FLOPs per multiply-add; a training step
/// does the forward, the input's gradient and the weights' gradient, about 3 forwards.
fn achieved_gflops(model: &resnet_core::ResNet, args: &Args, size: usize, median_ms: f64) -> f64 {
    let passes = if args.train { 3.0 } else { 1.0 };
    let flops = 2.0 * passes * model.multiply_adds(size, size) as f64 * args.batch as f64;
    flops / (median_ms / 1e3) / 1e9
}

/// A batch of `N(0, 1)` images, `(batch, channels, size, size)`.
fn random_input(
    batch: usize,
    channels: usize,
    size: usize,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, (batch, channels, size, size), device)?.to_dtype(dtype)?)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `iters` timed training steps after `warmup` untimed ones.
fn time_training(
    model: &resnet_core::ResNet,
    varmap: &candle_nn::VarMap,
    input: &Tensor,
    iters: usize,
    warmup: usize,
) -> Result<StepTimes> {
    use candle_core::ModuleT;
    let device = input.device().clone();
    let classes = model.config().num_classes;
    if classes == 0 {
        bail!("--train needs a network with a classifier (num_classes > 0)");
    }
    let batch = input.dim(0)?;
    let targets: Vec<u32> = (0..batch).map(|i| (i % classes) as u32).collect();
    let targets = Tensor::from_vec(targets, batch, &device)?;
    let mut sgd = resnet_train::Sgd::new(
        resnet_train::parameters(varmap, true),
        resnet_train::SgdConfig::default(),
    )?;
    let mut times = StepTimes {
        total: Vec::new(),
        forward: Vec::new(),
        backward: Vec::new(),
        update: Vec::new(),
    };
    let elapsed = |since: Instant| since.elapsed().as_secs_f64() * 1e3;
    for i in 0..warmup + iters {
        let started = Instant::now();
        let logits = model.forward_t(input, true)?;
        let loss = resnet_train::cross_entropy(&logits, &targets, 0.0)?;
        device.synchronize()?;
        let forward = elapsed(started);
        let backward_started = Instant::now();
        let grads = loss.backward()?;
        device.synchronize()?;
        let backward = elapsed(backward_started);
        let update_started = Instant::now();
        sgd.step(&grads)?;
        device.synchronize()?;
        if i >= warmup {
            times.update.push(elapsed(update_started));
            times.forward.push(forward);
            times.backward.push(backward);
            times.total.push(elapsed(started));
        }
    }
    Ok(times)
}

pub fn run(global: &GlobalOptions, args: Args) -> Result<()> {
    if args.batch == 0 || args.iters == 0 {
        bail!("--batch and --iters must be at least 1");
    }
    if args.train {
        return run_training(global, &args);
    }
    let (model, device, dtype) = model_or_random(global, args.model.as_deref(), &args.arch)?;
    let config = model.config();
    let size = input_size(args.size, config.stem);
    check_forward_memory([args.batch, config.in_channels, size, size], dtype, &device)?;
    let input = random_input(args.batch, config.in_channels, size, &device, dtype)?;
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
        let summary = summary(&model, &args, size, &device, dtype, median, min);
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} batch {} at {size}x{size}, {:?} on {} ({threads} threads): median {median:.2} ms, min {min:.2} ms, {images_per_sec:.1} images/s, {:.1} GFLOP/s",
            config.describe(),
            args.batch,
            dtype,
            resnet_core::device_name(&device),
            achieved_gflops(&model, &args, size, median)
        );
        if device.is_cpu() {
            println!("kernels: {}", model.kernel_summary());
        }
    }
    Ok(())
}

fn run_training(global: &GlobalOptions, args: &Args) -> Result<()> {
    let (model, device, dtype) = match &args.model {
        Some(path) => {
            let loaded = load_model_named(global, Some(path), &args.arch, false)?;
            (loaded.model, loaded.device, loaded.dtype)
        }
        None => {
            let device = global.device()?;
            let model = random_unfolded(&args.arch, &device, global.dtype)?;
            (model, device, global.dtype)
        }
    };
    let config = model.config().clone();
    let size = input_size(args.size, config.stem);
    // A training step holds every activation for the backward pass: about 4 times what
    // inference does.
    check_forward_memory(
        [args.batch.saturating_mul(4), config.in_channels, size, size],
        dtype,
        &device,
    )?;
    let (model, varmap) = resnet_train::trainable(&model)?;
    let input = random_input(args.batch, config.in_channels, size, &device, dtype)?;
    let mut times = time_training(&model, &varmap, &input, args.iters, args.warmup)?;
    let median_ms = median(&mut times.total);
    let (forward, backward, update) = (
        median(&mut times.forward),
        median(&mut times.backward),
        median(&mut times.update),
    );
    let min = times.total[0];
    let images_per_sec = args.batch as f64 / (median_ms / 1e3);
    let threads = candle_core::utils::get_num_threads();
    if args.json {
        let mut summary = summary(&model, args, size, &device, dtype, median_ms, min);
        summary["train"] = json!(true);
        summary["forward_ms"] = json!(forward);
        summary["backward_ms"] = json!(backward);
        summary["update_ms"] = json!(update);
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} training step, batch {} at {size}x{size}, {:?} on {} ({threads} threads): median {median_ms:.1} ms (forward {forward:.1}, backward {backward:.1}, update {update:.1}), min {min:.1} ms, {images_per_sec:.1} images/s, {:.1} GFLOP/s",
            config.describe(),
            args.batch,
            dtype,
            resnet_core::device_name(&device),
            achieved_gflops(&model, args, size, median_ms)
        );
    }
    Ok(())
}
