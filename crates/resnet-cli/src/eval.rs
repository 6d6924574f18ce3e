//! `resnet eval`: accuracy on an ImageFolder tree, decoding in parallel with inference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::json;

use crate::common::{load_model, top_k, GlobalOptions, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// ImageFolder tree: one folder per class; sorted folder names give the class index.
    #[arg(long)]
    data: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Print one JSON summary object instead of text.
    #[arg(long)]
    json: bool,
    /// Write every image's path (relative to --data) and predicted class index as JSON.
    #[arg(long)]
    predictions: Option<PathBuf>,
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

/// An ImageFolder tree: class names (sorted folder names) and every image with its class.
struct ImageFolder {
    classes: Vec<String>,
    images: Vec<(PathBuf, usize)>,
}

fn image_folder(root: &Path) -> Result<ImageFolder> {
    let read_dir = |dir: &Path| -> Result<Vec<PathBuf>> {
        let mut entries = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("reading {}", dir.display()))?;
        entries.sort();
        Ok(entries)
    };
    let class_dirs: Vec<PathBuf> = read_dir(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if class_dirs.is_empty() {
        bail!(
            "{}: expected an ImageFolder tree (one folder per class), found no folders",
            root.display()
        );
    }
    let mut classes = Vec::new();
    let mut images = Vec::new();
    for (index, dir) in class_dirs.iter().enumerate() {
        classes.push(
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        for path in read_dir(dir)? {
            let is_image = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            if is_image && path.is_file() {
                images.push((path, index));
            }
        }
    }
    Ok(ImageFolder { classes, images })
}

type DecodedBatch = Vec<(usize, resnet_io::Result<Tensor>)>;

pub fn run(global: &GlobalOptions, args: Args) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let ImageFolder { classes, images } = image_folder(&args.data)?;
    if images.is_empty() {
        bail!(
            "{}: no .jpg, .jpeg or .png images in the class folders",
            args.data.display()
        );
    }
    let model = load_model(global, args.model.model.as_deref(), &args.model.arch)?;
    if model.config.num_classes < classes.len() {
        bail!(
            "the model has {} classes but {} has {} class folders",
            model.config.num_classes,
            args.data.display(),
            classes.len()
        );
    }

    let progress = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(images.len() as u64)
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let started = Instant::now();
    // A decoder thread fills the next batches (decoding each in parallel) while this
    // thread runs inference on the current one.
    let (sender, receiver) = sync_channel::<DecodedBatch>(2);
    let preprocess = model.preprocess.clone();
    let paths: Vec<PathBuf> = images.iter().map(|(p, _)| p.clone()).collect();
    let batch_size = args.batch_size;
    let decoder = std::thread::spawn(move || {
        for (chunk_index, chunk) in paths.chunks(batch_size).enumerate() {
            let decoded: DecodedBatch = chunk
                .par_iter()
                .enumerate()
                .map(|(i, path)| (chunk_index * batch_size + i, preprocess.load_image(path)))
                .collect();
            if sender.send(decoded).is_err() {
                break;
            }
        }
    });

    let mut predictions: Vec<Option<usize>> = vec![None; images.len()];
    let mut top5_hits = 0usize;
    let mut unreadable = Vec::new();
    for batch in receiver {
        progress.inc(batch.len() as u64);
        let mut indices = Vec::with_capacity(batch.len());
        let mut tensors = Vec::with_capacity(batch.len());
        for (index, decoded) in batch {
            match decoded {
                Ok(tensor) => {
                    indices.push(index);
                    tensors.push(tensor);
                }
                Err(error) => {
                    progress.suspend(|| eprintln!("warning: skipping unreadable image: {error}"));
                    unreadable.push(error.to_string());
                }
            }
        }
        if tensors.is_empty() {
            continue;
        }
        let input = resnet_io::batch(&tensors, &model.device, model.dtype)?;
        let logits = model.model.forward(&input)?;
        for (index, top) in indices.into_iter().zip(top_k(&logits, 5)?) {
            predictions[index] = top.first().map(|&(class, _)| class);
            if top.iter().any(|&(class, _)| class == images[index].1) {
                top5_hits += 1;
            }
        }
    }
    decoder
        .join()
        .map_err(|_| anyhow::anyhow!("the image decoder thread failed"))?;
    let elapsed = started.elapsed().as_secs_f64();
    progress.finish_and_clear();

    let mut per_class = vec![(0usize, 0usize); classes.len()];
    let mut evaluated = 0usize;
    let mut top1_hits = 0usize;
    for ((_, label), predicted) in images.iter().zip(&predictions) {
        if let Some(predicted) = predicted {
            evaluated += 1;
            per_class[*label].1 += 1;
            if predicted == label {
                top1_hits += 1;
                per_class[*label].0 += 1;
            }
        }
    }
    let ratio = |hits: usize, total: usize| {
        if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        }
    };
    let top1 = ratio(top1_hits, evaluated);
    let top5 = ratio(top5_hits, evaluated);
    let images_per_sec = evaluated as f64 / elapsed.max(1e-9);

    if let Some(path) = &args.predictions {
        let map: BTreeMap<String, usize> = images
            .iter()
            .zip(&predictions)
            .filter_map(|((path, _), p)| {
                let relative = path.strip_prefix(&args.data).unwrap_or(path);
                p.map(|p| (relative.to_string_lossy().into_owned(), p))
            })
            .collect();
        let text = serde_json::to_string_pretty(&json!({"classes": classes, "predictions": map}))?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }

    let per_class_json: BTreeMap<&str, f64> = classes
        .iter()
        .zip(&per_class)
        .map(|(name, &(hits, total))| (name.as_str(), ratio(hits, total)))
        .collect();
    if args.json {
        let summary = json!({
            "model": model.name,
            "architecture": model.config.describe(),
            "images": evaluated,
            "unreadable": unreadable.len(),
            "top1": top1,
            "top5": top5,
            "per_class": per_class_json,
            "images_per_sec": images_per_sec,
            "seconds": elapsed,
            "device": resnet_core::device_name(&model.device),
            "dtype": format!("{:?}", model.dtype).to_lowercase(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("model:      {} ({})", model.name, model.config.describe());
        println!(
            "device:     {} ({})",
            resnet_core::device_name(&model.device),
            format!("{:?}", model.dtype).to_lowercase()
        );
        println!("images:     {evaluated} ({} unreadable)", unreadable.len());
        println!("top-1:      {:.2}%", top1 * 100.0);
        println!("top-5:      {:.2}%", top5 * 100.0);
        println!("speed:      {images_per_sec:.1} images/s ({elapsed:.1} s)");
        println!("per class:");
        for (name, &(hits, total)) in classes.iter().zip(&per_class) {
            println!(
                "  {name:<20} {:>6.2}%  ({hits}/{total})",
                ratio(hits, total) * 100.0
            );
        }
    }
    Ok(())
}
