//! `resnet forward`: the article's shape test, and tensor in, tensor out.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::common::{check_forward_memory, model_or_random, GlobalOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Architecture name (resnet18 ... resnet1202), or auto with --model.
    #[arg(long)]
    arch: String,
    /// Weights (file, directory or hub id); without it the network is randomly initialised.
    #[arg(long)]
    model: Option<String>,
    /// Random input of this shape, N,C,H,W.
    #[arg(long, conflicts_with = "input", value_parser = parse_shape)]
    shape: Option<[usize; 4]>,
    /// A .safetensors file whose tensor `input` is the batch.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Write the output tensor (`logits`, or `features`) to this .safetensors file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Output the pooled features instead of the logits.
    #[arg(long)]
    features: bool,
}

fn parse_shape(s: &str) -> std::result::Result<[usize; 4], String> {
    let dims: Vec<usize> = s
        .split(',')
        .map(|d| d.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| format!("invalid shape '{s}', expected four positive integers N,C,H,W"))?;
    match dims[..] {
        [n, c, h, w] if dims.iter().all(|&d| d > 0) => Ok([n, c, h, w]),
        _ => Err(format!(
            "invalid shape '{s}', expected four positive integers N,C,H,W"
        )),
    }
}

pub fn run(global: &GlobalOptions, args: Args) -> Result<()> {
    // Checked before the work, not after it.
    let output_file = args
        .output
        .as_ref()
        .map(resnet_io::OutputFile::create)
        .transpose()?;
    if let Some(shape) = &args.shape {
        check_forward_memory(*shape, global.dtype, &global.device()?)?;
    }
    let (model, device, dtype) = model_or_random(global, args.model.as_deref(), &args.arch)?;
    let input = match (&args.shape, &args.input) {
        (Some(shape), _) => Tensor::randn(0f32, 1.0, shape.as_slice(), &device)?.to_dtype(dtype)?,
        (None, Some(path)) => {
            let checkpoint = resnet_io::Checkpoint::open(path)?;
            checkpoint
                .load("input", &device, dtype)
                .with_context(|| format!("{}: expected a tensor named 'input'", path.display()))?
        }
        (None, None) => bail!("give --shape N,C,H,W or --input FILE.safetensors"),
    };
    let features = model.forward_features(&input)?;
    let output = model.forward_head(&features, args.features)?;
    let name = if args.features || model.head().is_none() {
        "features"
    } else {
        "logits"
    };
    println!("input {:?} -> {name} {:?}", input.dims(), output.dims());
    if let (Some(path), Some(file)) = (&args.output, output_file) {
        let replaced = file.replaces_existing();
        resnet_io::write_tensors_to(file, &[(name.to_string(), output)], None)?;
        let verb = if replaced { "replaced" } else { "wrote" };
        println!("{verb} {}", path.display());
    }
    Ok(())
}
