//! `resnet classify`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use rayon::prelude::*;
use serde_json::json;

use crate::common::{load_model, top_k, GlobalOptions, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Label names, one per line (default: the model's, else built-in ImageNet/CIFAR-10).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// JPEG or PNG files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn run(global: &GlobalOptions, args: Args) -> Result<()> {
    if args.batch_size == 0 || args.top_k == 0 {
        bail!("--batch-size and --top-k must be at least 1");
    }
    let model = load_model(global, args.model.model.as_deref(), &args.model.arch)?;
    if model.config.num_classes == 0 {
        bail!("the model is headless (no classifier): use `resnet forward --features` for its features");
    }
    let labels = match &args.labels {
        Some(path) => Some(resnet_io::read_labels(path, model.config.num_classes)?),
        None => model.labels.clone(),
    };
    let name = |index: usize| {
        labels
            .as_ref()
            .and_then(|l| l.get(index).cloned())
            .unwrap_or_else(|| format!("class {index}"))
    };
    let mut results = Vec::new();
    for chunk in args.images.chunks(args.batch_size) {
        // Decode in parallel; a bad image fails the command with its path.
        let images = chunk
            .par_iter()
            .map(|path| model.preprocess.load_image(path))
            .collect::<resnet_io::Result<Vec<_>>>()?;
        let input = resnet_io::batch(&images, &model.device, model.dtype)?;
        let logits = model.model.forward(&input)?;
        for (path, top) in chunk.iter().zip(top_k(&logits, args.top_k)?) {
            results.push((path.clone(), top));
        }
    }
    if args.json {
        let images: Vec<_> = results
            .iter()
            .map(|(path, top)| {
                let predictions: Vec<_> = top
                    .iter()
                    .map(|&(index, p)| json!({"index": index, "label": name(index), "probability": p}))
                    .collect();
                json!({"image": path.display().to_string(), "predictions": predictions})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "images": images }))?
        );
    } else {
        for (path, top) in &results {
            println!("{}", path.display());
            for &(index, probability) in top {
                println!("  {:>6.2}%  {} ({index})", probability * 100.0, name(index));
            }
        }
    }
    Ok(())
}
