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
    /// Image files: JPEG, PNG, WebP, TIFF, BMP, GIF, PPM/PGM. One that cannot be read is
    /// reported, the others classified; the exit status says whether any failed.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// An image's top-k classes with probabilities, or why it could not be read.
type Classified = std::result::Result<Vec<(usize, f32)>, String>;

pub fn run(global: &GlobalOptions, args: Args) -> Result<()> {
    if args.batch_size == 0 || args.top_k == 0 {
        bail!("--batch-size and --top-k must be at least 1");
    }
    let model = load_model(global, &args.model)?;
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
    // One result per image, in order: its top-k, or why it could not be read.
    let mut results: Vec<(PathBuf, Classified)> = Vec::new();
    for chunk in args.images.chunks(args.batch_size) {
        let decoded: Vec<_> = chunk
            .par_iter()
            .map(|path| model.preprocess.load_image_sized(path))
            .collect();
        let mut tensors = Vec::new();
        let mut slots = Vec::new();
        for (path, decoded) in chunk.iter().zip(decoded) {
            match decoded {
                Ok((tensor, (width, height))) => {
                    if let Some(note) = model.preprocess.resize_note(width, height) {
                        eprintln!("note: {}: {note}", path.display());
                    }
                    slots.push(results.len());
                    tensors.push(tensor);
                    results.push((path.clone(), Ok(Vec::new())));
                }
                Err(error) if args.images.len() == 1 => return Err(error.into()),
                Err(error) => {
                    eprintln!("error: {error}");
                    results.push((path.clone(), Err(error.to_string())));
                }
            }
        }
        if tensors.is_empty() {
            continue;
        }
        let input = resnet_io::batch(&tensors, &model.device, model.dtype)?;
        let logits = model.model.forward(&input)?;
        for (slot, top) in slots.into_iter().zip(top_k(&logits, args.top_k)?) {
            results[slot].1 = Ok(top);
        }
    }
    if args.json {
        let images: Vec<_> = results
            .iter()
            .map(|(path, result)| match result {
                Ok(top) => {
                    let predictions: Vec<_> = top
                        .iter()
                        .map(|&(index, p)| json!({"index": index, "label": name(index), "probability": p}))
                        .collect();
                    json!({"image": path.display().to_string(), "predictions": predictions})
                }
                Err(error) => json!({"image": path.display().to_string(), "error": error}),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "images": images }))?
        );
    } else {
        for (path, result) in &results {
            let Ok(top) = result else { continue };
            println!("{}", path.display());
            for &(index, probability) in top {
                println!("  {:>6.2}%  {} ({index})", probability * 100.0, name(index));
            }
        }
    }
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if failed > 0 {
        bail!(
            "{failed} of {} images could not be classified (the others were)",
            results.len()
        );
    }
    Ok(())
}
