//! `resnet train`: train or fine-tune on an ImageFolder tree.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use resnet_core::{ResNet, ResNetConfig};
use resnet_io::{ImageFolder, NamingScheme, PreprocessConfig};
use resnet_train::{
    AdamW, AdamWConfig, Augmentation, Schedule, ScheduleKind, Sgd, SgdConfig, TrainingSet,
};
use serde_json::json;

use crate::common::{load_model_named, parse_arch, top_k, GlobalOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Start from a preset with fresh weights (resnet20, resnet50, ...).
    #[arg(long, conflicts_with_all = ["model", "resume"], required_unless_present_any = ["model", "resume"])]
    arch: Option<String>,
    /// Start from a checkpoint: a .safetensors file, a model directory or a hub id.
    #[arg(long, conflicts_with = "resume")]
    model: Option<String>,
    /// Continue the run whose --output this is (the model and the training state beside
    /// it: optimizer, step, seed), with the same flags; writes there unless --output.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop (checkpointed) after this many epochs of the run, to continue with --resume.
    #[arg(long)]
    stop_after_epochs: Option<u64>,
    /// ImageFolder tree of training images.
    #[arg(long)]
    data: PathBuf,
    /// ImageFolder tree for validation after each epoch (top-1, top-5).
    #[arg(long)]
    val: Option<PathBuf>,
    /// Passes over the training data.
    #[arg(long)]
    epochs: u64,
    /// Images per step (the last batch of an epoch may be smaller).
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// sgd or adamw.
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Nesterov momentum (SGD).
    #[arg(long)]
    nesterov: bool,
    /// Weight decay (L2 for SGD, decoupled for AdamW).
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// No weight decay on BatchNorm weights and biases.
    #[arg(long)]
    no_decay_on_norm_and_bias: bool,
    /// cosine (to zero over the run), step (at --milestones) or constant.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Epochs at which the step schedule multiplies the rate by --gamma, e.g. 100,150.
    #[arg(long, value_delimiter = ',')]
    milestones: Vec<u64>,
    /// The step schedule's factor.
    #[arg(long, default_value_t = 0.1)]
    gamma: f64,
    /// Epochs of linear warm-up before the schedule.
    #[arg(long, default_value_t = 0)]
    warmup_epochs: u64,
    /// Label smoothing of the cross-entropy.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Classes (default: the class folders of --data); a checkpoint with another count
    /// gets a new classifier.
    #[arg(long)]
    num_classes: Option<usize>,
    /// Train the classifier only; the backbone stays as it is, its BatchNorm in eval mode.
    #[arg(long)]
    freeze_backbone: bool,
    /// Train on the evaluation transform (no crops, no flips).
    #[arg(long)]
    no_augment: bool,
    /// Keep ImageFolder's sorted order.
    #[arg(long)]
    no_shuffle: bool,
    /// Seed of the data order and the augmentation (and of fresh weights where the
    /// device's generator can be seeded).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the trained model goes: a .safetensors file, or a model directory
    /// (config.json + model.safetensors) that every command loads.
    #[arg(long)]
    output: Option<PathBuf>,
    /// One JSON object per epoch (JSON lines) instead of text.
    #[arg(long)]
    json: bool,
}

enum Optimizer {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl Optimizer {
    fn state(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        Ok(match self {
            Self::Sgd(o) => o.state(),
            Self::AdamW(o) => o.state()?,
        })
    }

    fn load_state(&mut self, state: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        match self {
            Self::Sgd(o) => o.load_state(state)?,
            Self::AdamW(o) => o.load_state(state)?,
        }
        Ok(())
    }

    fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Sgd(o) => o.set_lr(lr),
            Self::AdamW(o) => o.set_lr(lr),
        }
    }

    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        match self {
            Self::Sgd(o) => o.step(grads)?,
            Self::AdamW(o) => o.step(grads)?,
        }
        Ok(())
    }
}

/// The network to train and what it was loaded from.
struct Start {
    model: ResNet,
    scheme: NamingScheme,
    preprocess: PreprocessConfig,
    device: Device,
}

/// `--arch` (fresh weights) or `--model` (a checkpoint, unfolded).
fn start(global: &GlobalOptions, args: &Args, num_classes: usize) -> Result<Start> {
    let model = args
        .model
        .clone()
        .or_else(|| args.resume.as_ref().map(|p| p.display().to_string()));
    if let Some(model) = &model {
        let loaded = load_model_named(global, Some(model), "auto", false)?;
        return Ok(Start {
            model: loaded.model,
            scheme: loaded.scheme,
            preprocess: loaded.preprocess,
            device: loaded.device,
        });
    }
    let arch = args.arch.as_deref().unwrap_or_default();
    let Some(config) = parse_arch(arch)? else {
        bail!("--arch auto needs --model");
    };
    let config = config.with_num_classes(num_classes);
    let device = global.device()?;
    // The CPU's generator cannot be seeded; a GPU's can.
    let _ = device.set_seed(args.seed);
    let varmap = VarMap::new();
    let model = ResNet::new(
        &config,
        VarBuilder::from_varmap(&varmap, global.dtype, &device),
    )?;
    let preprocess = match config.stem {
        resnet_core::StemKind::Cifar => PreprocessConfig::cifar(),
        _ => PreprocessConfig::imagenet(),
    };
    Ok(Start {
        model,
        scheme: NamingScheme::Torchvision,
        preprocess,
        device,
    })
}

/// A copy of `model` whose tensors are variables, with a fresh classifier when the class
/// count differs.
fn with_classes(model: &ResNet, num_classes: usize) -> Result<(ResNet, VarMap)> {
    let (trainable, varmap) = resnet_train::trainable(model)?;
    if model.config().num_classes == num_classes {
        return Ok((trainable, varmap));
    }
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        data.retain(|name, _| !name.starts_with("fc."));
    }
    let config: ResNetConfig = model.config().clone().with_num_classes(num_classes);
    let dtype = model
        .named_tensors()?
        .first()
        .map_or(candle_core::DType::F32, |(_, t)| t.dtype());
    let fresh = ResNet::new(
        &config,
        VarBuilder::from_varmap(&varmap, dtype, model.device()),
    )?;
    Ok((fresh, varmap))
}

pub fn run(global: &GlobalOptions, args: Args) -> Result<()> {
    if args.epochs == 0 || args.batch_size == 0 {
        bail!("--epochs and --batch-size must be at least 1");
    }
    let output = args.output.clone().or_else(|| args.resume.clone());
    // Checked before any work: the output folder must be writable.
    if let Some(output) = &output {
        check_output(output)?;
    }
    let folder = ImageFolder::open(&args.data)?;
    let classes = folder.classes.clone();
    if classes.len() < 2 {
        bail!(
            "{}: {} class folder(s); training a classifier needs at least 2",
            args.data.display(),
            classes.len()
        );
    }
    let num_classes = match args.num_classes {
        Some(n) if n != classes.len() => bail!(
            "--num-classes {n} contradicts {}, which has {} class folders",
            args.data.display(),
            classes.len()
        ),
        _ => classes.len(),
    };
    if args.batch_size > folder.images.len() {
        bail!(
            "--batch-size {} is larger than the {} images of {}",
            args.batch_size,
            folder.images.len(),
            args.data.display()
        );
    }
    let Start {
        model,
        scheme,
        preprocess,
        device,
    } = start(global, &args, num_classes)?;
    let (model, varmap) = with_classes(&model, num_classes)?;
    let mut parameters = resnet_train::parameters(&varmap, args.no_decay_on_norm_and_bias);
    if args.freeze_backbone {
        parameters.retain(|p| p.name.starts_with("fc."));
    }
    let mut optimizer = match args.optimizer.as_str() {
        "sgd" => Optimizer::Sgd(Sgd::new(
            parameters,
            SgdConfig {
                lr: args.lr,
                momentum: args.momentum,
                dampening: 0.0,
                nesterov: args.nesterov,
                weight_decay: args.weight_decay,
            },
        )?),
        "adamw" => Optimizer::AdamW(AdamW::new(
            parameters,
            AdamWConfig {
                lr: args.lr,
                weight_decay: args.weight_decay,
                ..AdamWConfig::default()
            },
        )?),
        other => bail!("unknown optimizer '{other}', expected sgd or adamw"),
    };
    let augmentation = if args.no_augment {
        Augmentation::None
    } else {
        Augmentation::for_input(preprocess.size)
    };
    let data = std::sync::Arc::new(TrainingSet::open(
        &args.data,
        preprocess.clone(),
        augmentation,
        args.seed,
        !args.no_shuffle,
    )?);
    let steps_per_epoch = data.batch_count(args.batch_size) as u64;
    let kind = match args.schedule.as_str() {
        "cosine" => ScheduleKind::Cosine,
        "constant" => ScheduleKind::Constant,
        "step" => ScheduleKind::Step {
            milestones: args
                .milestones
                .iter()
                .map(|e| e * steps_per_epoch)
                .collect(),
            gamma: args.gamma,
        },
        other => bail!("unknown schedule '{other}', expected cosine, step or constant"),
    };
    let schedule = Schedule::new(
        args.lr,
        args.epochs * steps_per_epoch,
        args.warmup_epochs * steps_per_epoch,
        kind,
    )?;
    let validation = args
        .val
        .as_ref()
        .map(|dir| ImageFolder::open(dir))
        .transpose()?;
    // (train loss, validation top-1) of every finished epoch, for the curves.
    let mut history: Vec<(f64, Option<f64>)> = Vec::new();
    let first_iteration = match &args.resume {
        Some(resume) => {
            let saved = read_state(resume, &device, args.seed, steps_per_epoch)?;
            optimizer.load_state(&saved.optimizer)?;
            history = saved.history;
            saved.iteration
        }
        None => 0,
    };
    let stop_after = args
        .stop_after_epochs
        .unwrap_or(args.epochs)
        .min(args.epochs);
    crate::common::DEFER_INTERRUPT.store(true, std::sync::atomic::Ordering::SeqCst);
    let checkpoint =
        |iteration: u64, optimizer: &Optimizer, history: &[(f64, Option<f64>)]| match &output {
            Some(output) => {
                save(&model, output, scheme, &classes, &preprocess)?;
                write_state(
                    output,
                    optimizer,
                    iteration,
                    args.seed,
                    steps_per_epoch,
                    history,
                )?;
                write_curves(output, history)
            }
            None => Ok(()),
        };

    // Decoded and augmented on a worker thread, two batches ahead of the step.
    let mut batches = data.batches_ahead(
        first_iteration..stop_after * steps_per_epoch,
        args.batch_size,
        &device,
        2,
    );
    for epoch in first_iteration / steps_per_epoch..stop_after {
        let started = Instant::now();
        let progress = if args.json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(steps_per_epoch)
        };
        progress.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} {bar:30} {pos}/{len} steps, {msg}, eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        progress.set_prefix(format!("{}/{}", epoch + 1, args.epochs));
        let (mut loss_sum, mut seen, mut unreadable) = (0.0f64, 0usize, 0usize);
        let first_step = if epoch == first_iteration / steps_per_epoch {
            first_iteration % steps_per_epoch
        } else {
            0
        };
        for step in first_step..steps_per_epoch {
            let iteration = epoch * steps_per_epoch + step;
            let lr = schedule.lr(iteration);
            optimizer.set_lr(lr);
            let batch = batches
                .next()
                .ok_or_else(|| anyhow::anyhow!("the data loading thread stopped early"))??;
            for (path, reason) in &batch.unreadable {
                progress.suspend(|| {
                    eprintln!(
                        "warning: skipping unreadable image {}: {reason}",
                        path.display()
                    )
                });
            }
            unreadable += batch.unreadable.len();
            let logits = if args.freeze_backbone {
                // The backbone as it is (BatchNorm in eval mode), no gradient through it.
                let features = model.forward_features(&batch.images)?.detach();
                model.forward_head(&features, false)?
            } else {
                model.forward_t(&batch.images, true)?
            };
            let loss = resnet_train::cross_entropy(&logits, &batch.labels, args.label_smoothing)?;
            let value = f64::from(loss.to_scalar::<f32>()?);
            if !value.is_finite() {
                bail!(
                    "the loss is {value} at step {} (epoch {}, lr {lr}): training diverged; \
                     try a smaller --lr or a --warmup-epochs (nothing was saved after this step)",
                    iteration + 1,
                    epoch + 1
                );
            }
            optimizer.step(&loss.backward()?)?;
            let count = batch.images.dim(0)?;
            loss_sum += value * count as f64;
            seen += count;
            progress.inc(1);
            let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            progress.set_message(format!(
                "loss {:.4}, lr {lr:.4}, {rate:.1} images/s",
                loss_sum / seen as f64
            ));
            if crate::common::INTERRUPT_REQUESTED.load(std::sync::atomic::Ordering::SeqCst) {
                progress.finish_and_clear();
                checkpoint(iteration + 1, &optimizer, &history)?;
                let place = output
                    .as_ref()
                    .map_or("no --output: nothing saved".to_string(), |o| {
                        format!(
                            "checkpoint written to {0}; continue with --resume {0}",
                            o.display()
                        )
                    });
                bail!(
                    "interrupted after step {} of {}: {place}",
                    iteration + 1,
                    args.epochs * steps_per_epoch
                );
            }
        }
        progress.finish_and_clear();
        let train_loss = loss_sum / seen.max(1) as f64;
        let (top1, top5) = match &validation {
            Some(folder) => {
                let (top1, top5) = evaluate(&model, folder, &preprocess, &device, args.batch_size)?;
                (Some(top1), Some(top5))
            }
            None => (None, None),
        };
        let seconds = started.elapsed().as_secs_f64();
        let lr = schedule.lr((epoch + 1) * steps_per_epoch - 1);
        if args.json {
            println!(
                "{}",
                json!({"epoch": epoch + 1, "train_loss": train_loss, "val_top1": top1, "val_top5": top5,
                       "lr": lr, "seconds": seconds, "images": seen, "unreadable": unreadable})
            );
        } else {
            let val = match (top1, top5) {
                (Some(t1), Some(t5)) => {
                    format!(", val top-1 {:.2}% top-5 {:.2}%", t1 * 100.0, t5 * 100.0)
                }
                _ => String::new(),
            };
            println!(
                "epoch {}/{}: train loss {train_loss:.4}{val}, lr {lr:.5}, {seconds:.1} s{}",
                epoch + 1,
                args.epochs,
                if unreadable > 0 {
                    format!(" ({unreadable} unreadable images skipped)")
                } else {
                    String::new()
                }
            );
        }
        history.push((train_loss, top1));
        checkpoint((epoch + 1) * steps_per_epoch, &optimizer, &history)?;
    }
    if let Some(output) = &output {
        if !args.json {
            println!("wrote {}", output.display());
            if stop_after < args.epochs {
                println!(
                    "stopped after epoch {stop_after}: continue with --resume {}",
                    output.display()
                );
            }
        }
    }
    Ok(())
}

/// Where the training state of a run's output is kept.
fn state_path(output: &Path) -> PathBuf {
    if is_file_output(output) {
        output.with_extension("training-state.safetensors")
    } else {
        output.join("training-state.safetensors")
    }
}

/// The optimizer's tensors and where the run stands, beside the model.
fn write_state(
    output: &Path,
    optimizer: &Optimizer,
    iteration: u64,
    seed: u64,
    steps_per_epoch: u64,
    history: &[(f64, Option<f64>)],
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = optimizer.state()?.into_iter().collect();
    let metadata = std::collections::HashMap::from([
        ("iteration".to_string(), iteration.to_string()),
        ("seed".to_string(), seed.to_string()),
        ("steps_per_epoch".to_string(), steps_per_epoch.to_string()),
        ("history".to_string(), serde_json::to_string(history)?),
    ]);
    resnet_io::write_tensors(state_path(output), &tensors, Some(metadata))?;
    Ok(())
}

/// The step to continue from and the optimizer's tensors, checked against this run.
fn read_state(
    resume: &Path,
    device: &Device,
    seed: u64,
    steps_per_epoch: u64,
) -> Result<SavedState> {
    let path = state_path(resume);
    let state = resnet_io::Checkpoint::open(&path)
        .with_context(|| format!("--resume {}: no training state", resume.display()))?;
    let number = |key: &str| -> Result<u64> {
        state
            .metadata()
            .get(key)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{}: no valid '{key}' in its metadata", path.display()))
    };
    if number("seed")? != seed {
        bail!(
            "--resume: the run used --seed {}, this one --seed {seed}",
            number("seed")?
        );
    }
    if number("steps_per_epoch")? != steps_per_epoch {
        bail!(
            "--resume: the run had {} steps per epoch, this one {steps_per_epoch}: the data or --batch-size changed",
            number("steps_per_epoch")?
        );
    }
    let tensors = state
        .tensors()
        .iter()
        .map(|info| {
            Ok((
                info.name.clone(),
                state.load(&info.name, device, candle_core::DType::F32)?,
            ))
        })
        .collect::<Result<_>>()?;
    let history = state
        .metadata()
        .get("history")
        .and_then(|h| serde_json::from_str(h).ok())
        .unwrap_or_default();
    Ok(SavedState {
        iteration: number("iteration")?,
        optimizer: tensors,
        history,
    })
}

/// What `--resume` reads back: the next step, the optimizer's tensors, the epochs so far.
struct SavedState {
    iteration: u64,
    optimizer: std::collections::HashMap<String, Tensor>,
    history: Vec<(f64, Option<f64>)>,
}

/// The training curves (train loss, validation top-1 per epoch) as an SVG beside the
/// output: people would rather look than read.
fn write_curves(output: &Path, history: &[(f64, Option<f64>)]) -> Result<()> {
    let path = if is_file_output(output) {
        output.with_extension("training-curves.svg")
    } else {
        output.join("training-curves.svg")
    };
    resnet_io::write_output(&path, curves_svg(history).as_bytes())?;
    Ok(())
}

/// Two panels, loss and top-1 against the epoch, as polylines.
fn curves_svg(history: &[(f64, Option<f64>)]) -> String {
    let (width, height, margin) = (360.0, 220.0, 40.0);
    let panel = |title: &str, values: &[(usize, f64)], x0: f64, colour: &str| -> String {
        let max = values
            .iter()
            .map(|v| v.1)
            .fold(f64::MIN, f64::max)
            .max(1e-9);
        let epochs = history.len().max(2) as f64;
        let point = |(epoch, value): &(usize, f64)| {
            let x = x0 + margin + (*epoch as f64) / (epochs - 1.0) * (width - 2.0 * margin);
            let y = height - margin - value / max * (height - 2.0 * margin);
            format!("{x:.1},{y:.1}")
        };
        let points: Vec<String> = values.iter().map(point).collect();
        let circles: String = points
            .iter()
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                format!("<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{colour}\"/>")
            })
            .collect();
        format!(
            "<text x=\"{tx}\" y=\"20\" font-size=\"14\">{title} (max {max:.4})</text>\
             <line x1=\"{l}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#888\"/>\
             <line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{b}\" stroke=\"#888\"/>\
             <text x=\"{tx}\" y=\"{ly}\" font-size=\"11\">epoch 1 .. {n}</text>\
             <polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{points}\"/>{circles}",
            tx = x0 + margin,
            l = x0 + margin,
            r = x0 + width - margin,
            t = margin,
            b = height - margin,
            ly = height - 12.0,
            n = history.len(),
            points = points.join(" "),
        )
    };
    let losses: Vec<(usize, f64)> = history.iter().enumerate().map(|(i, h)| (i, h.0)).collect();
    let top1: Vec<(usize, f64)> = history
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.1.map(|t| (i, t)))
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>{}{}</svg>\n",
        2.0 * width,
        panel("train loss", &losses, 0.0, "#c0392b"),
        panel("validation top-1", &top1, width, "#2471a3"),
    )
}

/// Top-1 and top-5 on an ImageFolder tree with the evaluation transform, BatchNorm in
/// eval mode.
fn evaluate(
    model: &ResNet,
    folder: &ImageFolder,
    preprocess: &PreprocessConfig,
    device: &Device,
    batch_size: usize,
) -> Result<(f64, f64)> {
    use rayon::prelude::*;
    let (mut top1, mut top5, mut total) = (0usize, 0usize, 0usize);
    for chunk in folder.images.chunks(batch_size) {
        let loaded: Vec<_> = chunk
            .par_iter()
            .filter_map(|(path, label)| preprocess.load_image(path).ok().map(|t| (t, *label)))
            .collect();
        if loaded.is_empty() {
            continue;
        }
        let images: Vec<Tensor> = loaded.iter().map(|(t, _)| t.clone()).collect();
        let input = resnet_io::batch(&images, device, candle_core::DType::F32)?;
        let logits = model.forward_t(&input, false)?;
        for ((_, label), top) in loaded.iter().zip(top_k(&logits, 5)?) {
            total += 1;
            top1 += usize::from(top.first().is_some_and(|&(c, _)| c == *label));
            top5 += usize::from(top.iter().any(|&(c, _)| c == *label));
        }
    }
    let ratio = |hits: usize| hits as f64 / total.max(1) as f64;
    Ok((ratio(top1), ratio(top5)))
}

/// The output path: a `.safetensors` file, else a model directory.
fn is_file_output(output: &Path) -> bool {
    output.extension().is_some_and(|e| e == "safetensors")
}

fn check_output(output: &Path) -> Result<()> {
    if is_file_output(output) {
        drop(resnet_io::OutputFile::create(output)?);
    } else {
        std::fs::create_dir_all(output)
            .with_context(|| format!("creating the output directory {}", output.display()))?;
        drop(resnet_io::OutputFile::create(
            output.join("model.safetensors"),
        )?);
    }
    Ok(())
}

fn save(
    model: &ResNet,
    output: &Path,
    scheme: NamingScheme,
    classes: &[String],
    preprocess: &PreprocessConfig,
) -> Result<()> {
    if is_file_output(output) {
        resnet_io::save(model, output, scheme, candle_core::DType::F32)?;
    } else {
        resnet_io::write_model_dir(output, model, scheme, Some(classes), preprocess)?;
    }
    Ok(())
}
