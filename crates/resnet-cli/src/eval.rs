//! `resnet eval`: accuracy on an ImageFolder tree, decoding in parallel with inference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::json;

use resnet_io::{lossless_name, ImageFolder};

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

type DecodedBatch = Vec<(usize, resnet_io::Result<(Tensor, (u32, u32))>)>;

pub fn run(global: &GlobalOptions, args: Args) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let ImageFolder {
        classes,
        images,
        skipped,
    } = ImageFolder::open(&args.data)?;
    // The predictions' destination is checked (and its temporary file made) before the
    // evaluation, not after it.
    let predictions_file = args
        .predictions
        .as_ref()
        .map(resnet_io::OutputFile::create)
        .transpose()?;
    let model = load_model(global, &args.model)?;
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
                .map(|(i, path)| {
                    (
                        chunk_index * batch_size + i,
                        preprocess.load_image_sized(path),
                    )
                })
                .collect();
            if sender.send(decoded).is_err() {
                break;
            }
        }
    });

    let mut predictions: Vec<Option<usize>> = vec![None; images.len()];
    let mut accuracy = resnet_train::Accuracy::new(classes.len());
    let mut unreadable: Vec<(PathBuf, String)> = skipped;
    let mut resize_notes = 0usize;
    for batch in receiver {
        progress.inc(batch.len() as u64);
        let mut indices = Vec::with_capacity(batch.len());
        let mut tensors = Vec::with_capacity(batch.len());
        for (index, decoded) in batch {
            match decoded {
                Ok((tensor, (width, height))) => {
                    if let Some(note) = model.preprocess.resize_note(width, height) {
                        if resize_notes == 0 {
                            let path = images[index].0.display();
                            progress.suspend(|| eprintln!("note: {path}: {note}"));
                        }
                        resize_notes += 1;
                    }
                    indices.push(index);
                    tensors.push(tensor);
                }
                Err(error) => {
                    progress.suspend(|| eprintln!("warning: skipping unreadable image: {error}"));
                    let reason = match error {
                        resnet_io::Error::Image { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    unreadable.push((images[index].0.clone(), reason));
                }
            }
        }
        if tensors.is_empty() {
            continue;
        }
        let input = resnet_io::batch(&tensors, &model.device, model.dtype)?;
        let logits = model.model.forward(&input)?;
        for (index, top) in indices.into_iter().zip(top_k(&logits, 5)?) {
            let ranked: Vec<usize> = top.iter().map(|&(class, _)| class).collect();
            predictions[index] = ranked.first().copied();
            accuracy.record(&ranked, images[index].1);
        }
    }
    decoder
        .join()
        .map_err(|_| anyhow::anyhow!("the image decoder thread failed"))?;
    let elapsed = started.elapsed().as_secs_f64();
    progress.finish_and_clear();

    let evaluated = accuracy.total();
    let (top1, top5) = (accuracy.top1(), accuracy.top5());
    let per_class = accuracy.per_class();
    let per_class_top1 = accuracy.per_class_top1();
    let images_per_sec = evaluated as f64 / elapsed.max(1e-9);

    if resize_notes > 1 {
        eprintln!("note: {resize_notes} images were resized that way (--resize to choose how)");
    }
    let relative = |path: &Path| {
        lossless_name(
            path.strip_prefix(&args.data)
                .unwrap_or(path)
                .as_os_str()
                .as_encoded_bytes(),
        )
    };
    let unreadable_files: BTreeMap<String, &str> = unreadable
        .iter()
        .map(|(path, reason)| (relative(path), reason.as_str()))
        .collect();
    if let Some(mut output) = predictions_file {
        let map: BTreeMap<String, usize> = images
            .iter()
            .zip(&predictions)
            .filter_map(|((path, _), p)| p.map(|p| (relative(path), p)))
            .collect();
        let text = serde_json::to_string_pretty(&json!({
            "classes": classes,
            "predictions": map,
            "unreadable": unreadable_files,
            "names": "relative to --data; bytes that are not UTF-8 as \\xNN, a backslash doubled",
        }))?;
        std::io::Write::write_all(output.file()?, text.as_bytes())?;
        output.commit()?;
    }

    let per_class_json: BTreeMap<&str, f64> = classes
        .iter()
        .zip(&per_class_top1)
        .map(|(name, &top1)| (name.as_str(), top1))
        .collect();
    if args.json {
        let summary = json!({
            "model": model.name.clone(),
            "architecture": model.config.describe(),
            "images": evaluated,
            "unreadable": unreadable.len(),
            "unreadable_files": unreadable_files,
            "top1": top1,
            "top5": top5,
            "per_class": per_class_json,
            "images_per_sec": images_per_sec,
            "seconds": elapsed,
            "device": resnet_core::device_name(&model.device),
            "dtype": format!("{:?}", model.dtype).to_lowercase(),
            "peak_rss_bytes": crate::common::peak_rss_bytes(),
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
        for ((name, &(hits, total)), share) in classes.iter().zip(per_class).zip(&per_class_top1) {
            println!("  {name:<20} {:>6.2}%  ({hits}/{total})", share * 100.0);
        }
    }
    Ok(())
}
