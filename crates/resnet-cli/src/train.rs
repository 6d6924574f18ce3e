//! `resnet train`: train or fine-tune on an ImageFolder tree. The loop is
//! `resnet_train::Trainer`'s; this command parses flags, builds the pieces and prints.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use resnet_core::ResNet;
use resnet_io::{ImageFolder, NamingScheme, PreprocessConfig};
use resnet_train::{
    Augmentation, Checkpointer, EpochRecord, Event, ExistingOutput, MixupConfig, Observer,
    OptimizerKind, OptimizerSettings, Outcome, Trainer, TrainerConfig, TrainingSet, TrainingState,
};
use serde_json::json;

use crate::common::{load_model_named, parse_arch, GlobalOptions};

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
    /// Replace an --output folder or file that holds a model no training run wrote
    /// (refused without it).
    #[arg(long)]
    overwrite: bool,
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
    /// cosine (to zero over the run), step (at --milestones), step:E1,E2[@GAMMA] or
    /// constant.
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
    /// Label smoothing of the cross-entropy (of the mixed targets with --mixup/--cutmix).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    label_smoothing: f64,
    /// Sum the gradients of N batches per optimizer step, each loss divided by N (the
    /// effective batch is N x --batch-size).
    #[arg(long, default_value_t = 1)]
    grad_accum_steps: usize,
    /// Clip the gradients' global L2 norm to this before each step.
    #[arg(long, allow_hyphen_values = true)]
    clip_grad_norm: Option<f64>,
    /// Keep an exponential moving average of the weights (timm's ModelEmaV3), e.g.
    /// 0.999: validated beside the trained network, and the model saved.
    #[arg(long, allow_hyphen_values = true)]
    ema_decay: Option<f64>,
    /// Mixup's Beta(alpha, alpha) (timm's --mixup; 0: off).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    mixup: f64,
    /// CutMix's Beta(alpha, alpha) (timm's --cutmix; 0: off).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    cutmix: f64,
    /// Probability that a batch is mixed at all.
    #[arg(long, default_value_t = 1.0)]
    mixup_prob: f64,
    /// With both --mixup and --cutmix, the probability of cutmix for a mixed batch.
    #[arg(long, default_value_t = 0.5)]
    mixup_switch_prob: f64,
    /// Validate every N epochs (and after the last).
    #[arg(long, default_value_t = 1)]
    val_every: u64,
    /// Keep the model with the best validation top-1 beside the output
    /// (NAME.best.safetensors or DIR/best/).
    #[arg(long, requires_all = ["val", "output"])]
    keep_best: bool,
    /// Keep the checkpoints of the last K epochs (DIR/checkpoints/epoch-NNNN/ or
    /// NAME.epoch-NNNN.safetensors, each resumable); 0: only the latest.
    #[arg(long, default_value_t = 0)]
    keep_checkpoints: usize,
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

/// The network to train and what it was loaded from.
struct Start {
    model: ResNet,
    scheme: NamingScheme,
    preprocess: PreprocessConfig,
}

/// `--arch` (fresh weights), `--model` (a checkpoint, unfolded) or `--resume` (the
/// run's output).
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
        });
    }
    let arch = args.arch.as_deref().unwrap_or_default();
    let Some(config) = parse_arch(arch)? else {
        bail!("--arch auto needs --model");
    };
    let config = config.with_num_classes(num_classes);
    let device = global.device()?;
    let varmap = VarMap::new();
    let model = ResNet::new(
        &config,
        VarBuilder::from_varmap(&varmap, global.dtype, &device),
    )?;
    // Our own seeded generator: the same --seed, the same start on every device.
    resnet_train::seeded_init(&varmap, &config, args.seed)?;
    let preprocess = match config.stem {
        resnet_core::StemKind::Cifar => PreprocessConfig::cifar(),
        _ => PreprocessConfig::imagenet(),
    };
    Ok(Start {
        model,
        scheme: NamingScheme::Torchvision,
        preprocess,
    })
}

impl Args {
    fn trainer_config(&self) -> TrainerConfig {
        let schedule = if self.schedule == "step" {
            let milestones: Vec<String> = self.milestones.iter().map(u64::to_string).collect();
            format!("step:{}@{}", milestones.join(","), self.gamma)
        } else {
            self.schedule.clone()
        };
        TrainerConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            schedule,
            warmup_epochs: self.warmup_epochs,
            label_smoothing: self.label_smoothing,
            grad_accum_steps: self.grad_accum_steps,
            clip_grad_norm: self.clip_grad_norm,
            ema_decay: self.ema_decay,
            mixup: MixupConfig {
                mixup_alpha: self.mixup,
                cutmix_alpha: self.cutmix,
                prob: self.mixup_prob,
                switch_prob: self.mixup_switch_prob,
                label_smoothing: self.label_smoothing,
            },
            freeze_backbone: self.freeze_backbone,
            val_every: self.val_every,
            keep_best: self.keep_best,
            stop_after_epochs: self.stop_after_epochs,
            keep_checkpoints: self.keep_checkpoints,
        }
    }
}

pub fn run(global: &GlobalOptions, args: Args) -> Result<()> {
    // Every setting is checked before anything is read or written.
    let config = args.trainer_config();
    if args.schedule == "step" && args.milestones.is_empty() {
        bail!("--schedule step needs --milestones E1,E2,...");
    }
    config.check()?;
    let kind: OptimizerKind = args.optimizer.parse()?;
    if args.mixup > 0.0 || args.cutmix > 0.0 {
        resnet_train::Mixup::new(config.mixup, 2)?;
    }
    let output = args.output.clone().or_else(|| args.resume.clone());
    let existing = if args.overwrite {
        ExistingOutput::Overwrite
    } else if args.resume.is_some()
        && args
            .output
            .as_ref()
            .is_none_or(|o| Some(o) == args.resume.as_ref())
    {
        ExistingOutput::Resuming
    } else {
        ExistingOutput::TrainingRun
    };
    if let Some(resume) = &args.resume {
        let path = Checkpointer::state_path(resume);
        if !path.exists() {
            bail!(
                "--resume {}: no training state there ({} is missing; a run stopped before \
                 its first checkpoint was complete leaves none): start the run again, with \
                 --overwrite where the output holds a model",
                resume.display(),
                path.display()
            );
        }
    }
    // Checked before any work: the output must be writable, not another run's.
    if let Some(output) = &output {
        Checkpointer::check_destination_for(output, existing)?;
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
    // The saved state is read and checked before anything is written.
    let resumed = match &args.resume {
        Some(resume) => {
            let path = Checkpointer::state_path(resume);
            Some(
                TrainingState::read(&path, &global.device()?)
                    .with_context(|| format!("--resume {}: no training state", resume.display()))?,
            )
        }
        None => None,
    };
    let Start {
        model,
        scheme,
        preprocess,
    } = start(global, &args, num_classes)?;
    let checkpointer = output
        .as_ref()
        .map(|o| {
            Checkpointer::with_existing(o, scheme, classes.clone(), preprocess.clone(), existing)
        })
        .transpose()?;
    let (model, varmap) = resnet_train::with_new_head(&model, num_classes)?;
    let mut parameters = resnet_train::parameters(&varmap, args.no_decay_on_norm_and_bias);
    if args.freeze_backbone {
        parameters = resnet_train::head_parameters(parameters);
    }
    let settings = OptimizerSettings {
        lr: args.lr,
        weight_decay: args.weight_decay,
        momentum: args.momentum,
        nesterov: args.nesterov,
        ..OptimizerSettings::default()
    };
    let optimizer = resnet_train::optimizer(kind, parameters, &settings)?;
    let augmentation = if args.no_augment {
        Augmentation::None
    } else {
        Augmentation::for_input(preprocess.size)
    };
    let data = Arc::new(TrainingSet::open(
        &args.data,
        preprocess,
        augmentation,
        args.seed,
        !args.no_shuffle,
    )?);
    let mut trainer = Trainer::new(model, varmap, optimizer, data, config)?;
    if let Some(dir) = &args.val {
        trainer = trainer.validate_on(ImageFolder::open(dir)?);
    }
    if let Some(checkpointer) = checkpointer {
        trainer = trainer.checkpoint_to(checkpointer);
    }
    if let Some(state) = resumed {
        trainer.resume(state)?;
    }

    crate::common::DEFER_INTERRUPT.store(true, Ordering::SeqCst);
    let mut printer = Printer {
        json: args.json,
        epochs: args.epochs,
        progress: ProgressBar::hidden(),
        unreadable: 0,
    };
    let outcome = trainer.run(&crate::common::INTERRUPT_REQUESTED, &mut printer)?;
    printer.progress.finish_and_clear();
    match outcome {
        Outcome::Stopped { iteration, total } => {
            let place = output
                .as_ref()
                .map_or("no --output: nothing saved".to_string(), |o| {
                    format!(
                        "checkpoint written to {0}; continue with --resume {0}",
                        o.display()
                    )
                });
            bail!("interrupted after step {iteration} of {total}: {place}");
        }
        Outcome::Paused { epochs } => {
            if let (Some(output), false) = (&output, args.json) {
                println!("wrote {}", output.display());
                println!(
                    "stopped after epoch {epochs}: continue with --resume {}",
                    output.display()
                );
            }
        }
        Outcome::Finished => {
            if let (Some(output), false) = (&output, args.json) {
                println!("wrote {}", output.display());
            }
        }
    }
    Ok(())
}

/// The command's observer: a progress bar per epoch, a line (or a JSON line) per epoch,
/// the training curves beside every checkpoint.
struct Printer {
    json: bool,
    epochs: u64,
    progress: ProgressBar,
    unreadable: usize,
}

impl Printer {
    fn epoch_line(&self, record: &EpochRecord) {
        if self.json {
            println!(
                "{}",
                json!({"epoch": record.epoch, "train_loss": record.train_loss,
                       "val_top1": record.val_top1, "val_top5": record.val_top5,
                       "raw_val_top1": record.raw_val_top1,
                       "lr": record.lr, "seconds": record.seconds, "images": record.images,
                       "unreadable": record.unreadable})
            );
            return;
        }
        let val = match (record.val_top1, record.val_top5) {
            (Some(t1), Some(t5)) => {
                let raw = record.raw_val_top1.map_or(String::new(), |r| {
                    format!(" (EMA; trained network {:.2}%)", r * 100.0)
                });
                format!(
                    ", val top-1 {:.2}% top-5 {:.2}%{raw}",
                    t1 * 100.0,
                    t5 * 100.0
                )
            }
            _ => String::new(),
        };
        let skipped = if record.unreadable > 0 {
            format!(" ({} unreadable images skipped)", record.unreadable)
        } else {
            String::new()
        };
        println!(
            "epoch {}/{}: train loss {:.4}{val}, lr {:.5}, {:.1} s{skipped}",
            record.epoch, self.epochs, record.train_loss, record.lr, record.seconds
        );
    }
}

impl Observer for Printer {
    fn observe(&mut self, event: &Event<'_>) -> candle_core::Result<()> {
        match event {
            Event::EpochStarted {
                epoch,
                first_step,
                steps_per_epoch,
            } => {
                self.progress = if self.json {
                    ProgressBar::hidden()
                } else {
                    ProgressBar::new(*steps_per_epoch)
                };
                self.progress.set_style(
                    ProgressStyle::with_template(
                        "epoch {prefix} {bar:30} {pos}/{len} steps, {msg}, eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                self.progress
                    .set_prefix(format!("{}/{}", epoch + 1, self.epochs));
                self.progress.set_position(*first_step);
                self.unreadable = 0;
            }
            Event::StepDone {
                running_loss,
                lr,
                images_per_sec,
                unreadable,
                ..
            } => {
                for (path, reason) in unreadable.iter() {
                    self.progress.suspend(|| {
                        eprintln!(
                            "warning: skipping unreadable image {}: {reason}",
                            path.display()
                        )
                    });
                }
                self.progress.inc(1);
                self.progress.set_message(format!(
                    "loss {running_loss:.4}, lr {lr:.4}, {images_per_sec:.1} images/s"
                ));
            }
            Event::EpochDone(record) => {
                self.progress.finish_and_clear();
                self.epoch_line(record);
            }
            Event::CheckpointWritten {
                path,
                best,
                history,
            } => {
                if *best {
                    if !self.json {
                        println!("best so far: wrote {}", path.display());
                    }
                } else {
                    write_curves(path, history).map_err(candle_core::Error::wrap)?;
                }
            }
        }
        Ok(())
    }
}

/// The training curves (train loss, validation top-1 per epoch) as an SVG beside the
/// output: people would rather look than read.
fn write_curves(output: &Path, history: &[EpochRecord]) -> Result<()> {
    let path = if resnet_train::is_file_output(output) {
        output.with_extension("training-curves.svg")
    } else {
        output.join("training-curves.svg")
    };
    let points: Vec<(f64, Option<f64>)> =
        history.iter().map(|r| (r.train_loss, r.val_top1)).collect();
    resnet_io::write_output(&path, curves_svg(&points).as_bytes())?;
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
