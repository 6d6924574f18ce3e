//! The training loop as a library: steps, epochs, validation and checkpoints for any
//! network and ImageFolder data, stopped by a flag the caller owns and observed through
//! events (the `resnet train` command's progress bar, JSON lines and curves are one
//! observer). Everything it does is also a public piece, for a loop written by hand.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{bail, Result, Tensor};
use candle_nn::VarMap;
use resnet_core::ResNet;
use resnet_io::ImageFolder;

use crate::data::{Random, TrainingSet};
use crate::metrics::{evaluate, RunningLoss};
use crate::optim::Optimizer;
use crate::recipe::{
    clip_grad_norm, set_all, soft_cross_entropy, Ema, GradAccumulator, Mixup, MixupConfig,
};
use crate::schedule::{Schedule, ScheduleKind};
use crate::state::{Checkpointer, EpochRecord, TrainingState};
use crate::trainable::forward_train;

/// The run's recipe. Every field has the paper's CIFAR default ([`Default`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerConfig {
    /// Passes over the training data.
    pub epochs: u64,
    /// Images per batch (per micro-batch, with accumulation).
    pub batch_size: usize,
    /// The schedule after the warm-up: `cosine`, `constant` or `step:E1,E2[@GAMMA]`
    /// (milestones in epochs), see [`ScheduleKind::parse`].
    pub schedule: String,
    /// Epochs of linear warm-up.
    pub warmup_epochs: u64,
    /// Label smoothing of the cross-entropy (of the mixed targets, with mixup).
    pub label_smoothing: f64,
    /// Batches whose gradients are summed per optimizer step, each loss divided by
    /// their number (timm's `--grad-accum-steps`).
    pub grad_accum_steps: usize,
    /// Clip the gradients' global L2 norm to this before each step.
    pub clip_grad_norm: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay; it is the
    /// network validated (beside the trained one) and saved.
    pub ema_decay: Option<f64>,
    /// Mixup and cutmix (off unless an alpha is above zero); the mixed targets are
    /// smoothed by `label_smoothing` (this config's `label_smoothing` is not used).
    pub mixup: MixupConfig,
    /// Train the classifier alone; the backbone's BatchNorm in eval mode.
    pub freeze_backbone: bool,
    /// Validate every this many epochs (and after the last).
    pub val_every: u64,
    /// Keep the model with the best validation top-1 beside the output.
    pub keep_best: bool,
    /// Stop (checkpointed) after this many epochs of the run, to resume later.
    pub stop_after_epochs: Option<u64>,
    /// Keep the checkpoints of the last this many epochs beside the output
    /// ([`Checkpointer::keep_epoch`]); 0 keeps only the latest, as the output itself.
    pub keep_checkpoints: usize,
}

impl Default for TrainerConfig {
    /// One epoch of batch 128, cosine, no warm-up, no accumulation, clipping, EMA or
    /// mixing; validation every epoch.
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 128,
            schedule: "cosine".to_string(),
            warmup_epochs: 0,
            label_smoothing: 0.0,
            grad_accum_steps: 1,
            clip_grad_norm: None,
            ema_decay: None,
            mixup: MixupConfig {
                label_smoothing: 0.0,
                ..MixupConfig::default()
            },
            freeze_backbone: false,
            val_every: 1,
            keep_best: false,
            stop_after_epochs: None,
            keep_checkpoints: 0,
        }
    }
}

impl TrainerConfig {
    /// Refuses settings no run can use, each error naming the `resnet train` flag.
    pub fn check(&self) -> Result<()> {
        if self.epochs == 0 {
            bail!("--epochs: expected at least 1, found 0");
        }
        if self.batch_size == 0 {
            bail!("--batch-size: expected at least 1, found 0");
        }
        if self.grad_accum_steps == 0 {
            bail!("--grad-accum-steps: expected at least 1, found 0");
        }
        if let Some(norm) = self.clip_grad_norm {
            if !norm.is_finite() || norm <= 0.0 {
                bail!("--clip-grad-norm: expected a finite number above 0, found {norm}");
            }
        }
        if let Some(decay) = self.ema_decay {
            if !(0.0..1.0).contains(&decay) {
                bail!("--ema-decay: expected a number in [0, 1), found {decay}");
            }
        }
        for (flag, alpha) in [
            ("--mixup", self.mixup.mixup_alpha),
            ("--cutmix", self.mixup.cutmix_alpha),
        ] {
            if !alpha.is_finite() || alpha < 0.0 {
                bail!("{flag}: expected an alpha >= 0, found {alpha}");
            }
        }
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            bail!(
                "--label-smoothing: expected a number in [0, 1], found {}",
                self.label_smoothing
            );
        }
        if self.val_every == 0 {
            bail!("--val-every: expected at least 1 epoch, found 0");
        }
        ScheduleKind::parse(&self.schedule, 1)?;
        Ok(())
    }

    fn mixes(&self) -> bool {
        self.mixup.mixup_alpha > 0.0 || self.mixup.cutmix_alpha > 0.0
    }
}

/// What a [`Trainer`] reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// An epoch begins (or resumes, at `first_step`).
    EpochStarted {
        /// 0-based.
        epoch: u64,
        /// The step it starts at (0 unless resumed mid-epoch).
        first_step: u64,
        /// Batches per epoch.
        steps_per_epoch: u64,
    },
    /// A batch was trained on.
    StepDone {
        /// 0-based epoch.
        epoch: u64,
        /// 0-based batch within the epoch.
        step: u64,
        /// The batch's loss.
        loss: f64,
        /// The epoch's mean loss so far.
        running_loss: f64,
        /// The learning rate.
        lr: f64,
        /// Training images per second in this epoch so far.
        images_per_sec: f64,
        /// Unreadable images skipped in this batch.
        unreadable: &'a [(PathBuf, String)],
    },
    /// An epoch ended (validated where it was its turn).
    EpochDone(&'a EpochRecord),
    /// A checkpoint was written.
    CheckpointWritten {
        /// The model's path (a file or a model directory).
        path: &'a Path,
        /// Whether it is the best-so-far model rather than the run's checkpoint.
        best: bool,
        /// Every finished epoch.
        history: &'a [EpochRecord],
    },
}

/// Watches a [`Trainer`]; an error stops the run.
pub trait Observer {
    /// Called for each event, in order.
    fn observe(&mut self, _event: &Event<'_>) -> Result<()> {
        Ok(())
    }
}

/// Observes nothing.
impl Observer for () {}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every epoch done.
    Finished,
    /// Stopped after `stop_after_epochs`, checkpointed.
    Paused {
        /// Epochs done.
        epochs: u64,
    },
    /// The stop flag was raised; checkpointed (where there is an output) after the
    /// optimizer step then under way.
    Stopped {
        /// Batches done.
        iteration: u64,
        /// Batches in the whole run.
        total: u64,
    },
}

/// Trains a network on a [`TrainingSet`].
pub struct Trainer {
    model: ResNet,
    varmap: VarMap,
    optimizer: Box<dyn Optimizer>,
    data: Arc<TrainingSet>,
    config: TrainerConfig,
    schedule: Schedule,
    steps_per_epoch: u64,
    validation: Option<ImageFolder>,
    checkpointer: Option<Checkpointer>,
    ema: Option<Ema>,
    mixup: Option<Mixup>,
    state: TrainingState,
    /// Resumed from a state holding the model: write the model file from it first.
    rewrite_model_file: bool,
}

/// A key of the mixing's random stream, apart from the data's.
const MIXUP_STREAM: u64 = 0x006D_6978_7570;

impl Trainer {
    /// A trainer of `model`, whose variables are `varmap`'s (see [`crate::trainable`]),
    /// with `optimizer` over them; the schedule starts from the optimizer's rate. Sets
    /// the allocator to keep freed memory ([`crate::reuse_freed_memory`]).
    pub fn new(
        model: ResNet,
        varmap: VarMap,
        optimizer: Box<dyn Optimizer>,
        data: Arc<TrainingSet>,
        config: TrainerConfig,
    ) -> Result<Self> {
        config.check()?;
        crate::reuse_freed_memory();
        if config.batch_size > data.len() {
            bail!(
                "--batch-size {} is larger than the {} training images",
                config.batch_size,
                data.len()
            );
        }
        let num_classes = model.config().num_classes;
        if data.classes().len() > num_classes {
            bail!(
                "the network has {num_classes} classes, the data {} class folders",
                data.classes().len()
            );
        }
        let steps_per_epoch = data.batch_count(config.batch_size) as u64;
        let accum = config.grad_accum_steps as u64;
        let updates_per_epoch = steps_per_epoch.div_ceil(accum);
        let kind = ScheduleKind::parse(&config.schedule, updates_per_epoch)?;
        let schedule = Schedule::new(
            optimizer.lr(),
            config.epochs * updates_per_epoch,
            config.warmup_epochs * updates_per_epoch,
            kind,
        )?;
        let ema = config
            .ema_decay
            .map(|decay| Ema::new(&model, decay))
            .transpose()?;
        let mixup = if config.mixes() {
            let mixing = MixupConfig {
                label_smoothing: config.label_smoothing,
                ..config.mixup
            };
            Some(Mixup::new(mixing, num_classes)?)
        } else {
            None
        };
        let state = TrainingState {
            seed: data.seed(),
            steps_per_epoch,
            grad_accum_steps: accum,
            architecture: TrainingState::architecture_of(model.config()),
            optimizer: optimizer.name().to_string(),
            settings: run_settings(&config, optimizer.as_ref(), &data),
            ..TrainingState::default()
        };
        Ok(Self {
            model,
            varmap,
            optimizer,
            data,
            config,
            schedule,
            steps_per_epoch,
            validation: None,
            checkpointer: None,
            ema,
            mixup,
            state,
            rewrite_model_file: false,
        })
    }

    /// Validates on `folder` (the evaluation transform of the training data's
    /// preprocessing) after every `val_every` epochs.
    pub fn validate_on(mut self, folder: ImageFolder) -> Self {
        self.validation = Some(folder);
        self
    }

    /// Writes the model and the training state after every epoch (and when stopped).
    pub fn checkpoint_to(mut self, checkpointer: Checkpointer) -> Self {
        self.checkpointer = Some(checkpointer);
        self
    }

    /// Continues from `state` (as written beside a run's output); the network must
    /// already hold the weights saved with it. Refuses a state of another seed, data
    /// size, batch size, accumulation, architecture, class count or optimizer, or one
    /// whose EMA does not match this run's.
    pub fn resume(&mut self, state: TrainingState) -> Result<()> {
        state.check_matches(
            self.state.seed,
            self.steps_per_epoch,
            self.state.grad_accum_steps,
            self.model.config(),
            self.optimizer.name(),
        )?;
        let total = self.config.epochs * self.steps_per_epoch;
        if state.iteration > total {
            bail!(
                "--resume: the run is {} batches in, past the {total} of {} epochs",
                state.iteration,
                self.config.epochs
            );
        }
        state.check_settings(&self.state.settings)?;
        // The saved model: the state's own copy (the checkpoint's one unit), else (a state
        // of an earlier version) the model file the network was loaded from.
        let from_file: std::collections::HashMap<String, Tensor>;
        let saved = if state.model_tensors.is_empty() {
            from_file = self.model.named_tensors()?.into_iter().collect();
            &from_file
        } else {
            &state.model_tensors
        };
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        match (&mut self.ema, state.trained_tensors.is_empty()) {
            (Some(_), true) => bail!("--resume: the run kept no EMA, this one has --ema-decay"),
            (None, false) => bail!("--resume: the run kept an EMA: give its --ema-decay"),
            (Some(ema), false) => {
                // The saved (averaged) weights are the EMA's; the trained ones come from
                // the state.
                ema.load(saved)?;
                set_all(data.iter(), &state.trained_tensors, "--resume: the state")?;
            }
            (None, true) => set_all(data.iter(), saved, "--resume: the state's model")?,
        }
        drop(data);
        // A run killed between the state and the model file left the previous model
        // beside the new state: the first thing the resumed run writes is the state's.
        self.rewrite_model_file = !state.model_tensors.is_empty();
        self.optimizer.load_state(&state.optimizer_tensors)?;
        self.state = TrainingState {
            trained_tensors: Default::default(),
            optimizer_tensors: Default::default(),
            model_tensors: Default::default(),
            settings: std::mem::take(&mut self.state.settings),
            ..state
        };
        Ok(())
    }

    /// The network being trained.
    pub fn model(&self) -> &ResNet {
        &self.model
    }

    /// The moving average of the network, with `ema_decay`.
    pub fn ema_model(&self) -> Option<&ResNet> {
        self.ema.as_ref().map(Ema::model)
    }

    /// The network a checkpoint holds: the average where there is one.
    pub fn saved_model(&self) -> &ResNet {
        self.ema_model().unwrap_or(&self.model)
    }

    /// Where the run stands (its tensors are filled only when written).
    pub fn state(&self) -> &TrainingState {
        &self.state
    }

    /// Batches per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// The learning rate of every optimizer step.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    /// The full state, tensors included.
    pub fn full_state(&self) -> Result<TrainingState> {
        let mut state = self.state.clone();
        state.optimizer_tensors = self.optimizer.state()?;
        if self.ema.is_some() {
            state.trained_tensors = self.model.named_tensors()?.into_iter().collect();
        }
        state.model_tensors = self.saved_model().named_tensors()?.into_iter().collect();
        Ok(state)
    }

    fn checkpoint(&self, observer: &mut dyn Observer) -> Result<()> {
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer
                .write(self.saved_model(), &self.full_state()?)
                .map_err(|e| {
                    let output = checkpointer.output();
                    let previous = if Checkpointer::state_path(output).exists() {
                        format!(
                            "the previous checkpoint in {0} is complete: continue from it \
                             with --resume {0} once the cause is mended",
                            output.display()
                        )
                    } else {
                        "no checkpoint of this run was complete yet".to_string()
                    };
                    candle_core::Error::Msg(format!(
                        "writing the checkpoint after batch {} failed ({e}); {previous}",
                        self.state.iteration
                    ))
                })?;
            observer.observe(&Event::CheckpointWritten {
                path: checkpointer.output(),
                best: false,
                history: &self.state.history,
            })?;
        }
        Ok(())
    }

    /// The loss of one batch, mixed where mixup or cutmix is on.
    fn loss(&self, images: &Tensor, labels: &Tensor) -> Result<Tensor> {
        match &self.mixup {
            Some(mixup) => {
                let (_, _, height, width) = images.dims4()?;
                let mut random =
                    Random::new(&[self.state.seed, self.state.iteration, MIXUP_STREAM]);
                let params = mixup.draw(&mut random, height, width)?;
                let (images, targets) = mixup.apply(images, labels, &params)?;
                let logits = forward_train(&self.model, &images, self.config.freeze_backbone)?;
                soft_cross_entropy(&logits, &targets)
            }
            None => {
                let logits = forward_train(&self.model, images, self.config.freeze_backbone)?;
                crate::cross_entropy(&logits, labels, self.config.label_smoothing)
            }
        }
    }

    /// Trains until the last epoch, `stop_after_epochs`, or `stop` is raised (checked
    /// after each optimizer step). Checkpoints after every epoch and when stopped.
    pub fn run(&mut self, stop: &AtomicBool, observer: &mut dyn Observer) -> Result<Outcome> {
        let spe = self.steps_per_epoch;
        let epochs = self.config.epochs;
        let accum = self.config.grad_accum_steps as u64;
        let stop_after = self.config.stop_after_epochs.unwrap_or(epochs).min(epochs);
        let end = stop_after * spe;
        if let (Some(checkpointer), true) = (&self.checkpointer, self.rewrite_model_file) {
            checkpointer.write_model(self.saved_model(), checkpointer.output())?;
            self.rewrite_model_file = false;
        }
        // A full disk is found now, not after an epoch's work.
        if let Some(checkpointer) = &self.checkpointer {
            if self.state.iteration < end {
                let bytes =
                    Checkpointer::checkpoint_bytes(self.saved_model(), &self.full_state()?)?;
                checkpointer.check_free_space(bytes)?;
            }
        }
        let device = self.model.device().clone();
        let mut batches = self.data.batches_ahead(
            self.state.iteration..end,
            self.config.batch_size,
            &device,
            2,
        );
        let mut accumulator = GradAccumulator::default();
        let mut loss_meter = RunningLoss::default();
        let (mut unreadable, mut started) = (0usize, Instant::now());
        let mut first = true;
        while self.state.iteration < end {
            let iteration = self.state.iteration;
            let (epoch, step) = (iteration / spe, iteration % spe);
            if step == 0 || first {
                first = false;
                (loss_meter, unreadable, started) = (RunningLoss::default(), 0, Instant::now());
                observer.observe(&Event::EpochStarted {
                    epoch,
                    first_step: step,
                    steps_per_epoch: spe,
                })?;
            }
            // The epoch's last group of batches may be shorter; its losses are divided
            // by its own length, as timm's train.py does.
            let group_start = step / accum * accum;
            let group_len = accum.min(spe - group_start);
            let lr = self.schedule.lr(self.state.step);
            self.optimizer.set_lr(lr);
            let batch = batches.next().ok_or_else(|| {
                candle_core::Error::Msg("the data loading thread stopped early".into())
            })??;
            let loss = self.loss(&batch.images, &batch.labels)?;
            let value = f64::from(loss.to_scalar::<f32>()?);
            if !value.is_finite() {
                bail!(
                    "the loss is {value} at step {} (epoch {}, lr {lr}): training diverged; \
                     try a smaller --lr or a --warmup-epochs (nothing was saved after this step)",
                    iteration + 1,
                    epoch + 1
                );
            }
            let scaled = if group_len > 1 {
                (loss / group_len as f64)?
            } else {
                loss
            };
            accumulator.add(scaled.backward()?)?;
            let count = batch.images.dim(0)?;
            loss_meter.add(value, count);
            unreadable += batch.unreadable.len();
            self.state.iteration += 1;
            observer.observe(&Event::StepDone {
                epoch,
                step,
                loss: value,
                running_loss: loss_meter.mean(),
                lr,
                images_per_sec: loss_meter.count() as f64
                    / started.elapsed().as_secs_f64().max(1e-9),
                unreadable: &batch.unreadable,
            })?;
            if step + 1 == group_start + group_len {
                let Some(mut grads) = accumulator.take() else {
                    bail!("no gradients to step with");
                };
                if let Some(max_norm) = self.config.clip_grad_norm {
                    clip_grad_norm(&mut grads, self.optimizer.parameters(), max_norm)?;
                }
                self.optimizer.step(&grads)?;
                self.state.step += 1;
                if let Some(ema) = &mut self.ema {
                    ema.update(&self.model, self.state.step)?;
                }
                let epoch_done = self.state.iteration.is_multiple_of(spe);
                if stop.load(Ordering::SeqCst) && !epoch_done {
                    self.checkpoint(observer)?;
                    return Ok(Outcome::Stopped {
                        iteration: self.state.iteration,
                        total: epochs * spe,
                    });
                }
            }
            if self.state.iteration.is_multiple_of(spe) {
                self.finish_epoch(epoch, lr, loss_meter, unreadable, started, observer)?;
                if stop.load(Ordering::SeqCst) && self.state.iteration < epochs * spe {
                    return Ok(Outcome::Stopped {
                        iteration: self.state.iteration,
                        total: epochs * spe,
                    });
                }
            }
        }
        Ok(if stop_after < epochs {
            Outcome::Paused { epochs: stop_after }
        } else {
            Outcome::Finished
        })
    }

    fn finish_epoch(
        &mut self,
        epoch: u64,
        lr: f64,
        loss: RunningLoss,
        unreadable: usize,
        started: Instant,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let due =
            (epoch + 1).is_multiple_of(self.config.val_every) || epoch + 1 == self.config.epochs;
        let mut record = EpochRecord {
            epoch: epoch + 1,
            train_loss: loss.mean(),
            lr,
            images: loss.count(),
            unreadable,
            ..EpochRecord::default()
        };
        let mut best = false;
        if let (Some(folder), true) = (&self.validation, due) {
            let preprocess = self.data.preprocess();
            let batch_size = self.config.batch_size;
            let accuracy = evaluate(self.saved_model(), folder, preprocess, batch_size)?;
            record.val_top1 = Some(accuracy.top1());
            record.val_top5 = Some(accuracy.top5());
            if self.ema.is_some() {
                record.raw_val_top1 =
                    Some(evaluate(&self.model, folder, preprocess, batch_size)?.top1());
            }
            best =
                self.config.keep_best && self.state.best_top1.is_none_or(|b| accuracy.top1() > b);
            if best {
                self.state.best_top1 = Some(accuracy.top1());
            }
        }
        record.seconds = started.elapsed().as_secs_f64();
        self.state.history.push(record);
        if let Some(record) = self.state.history.last() {
            observer.observe(&Event::EpochDone(record))?;
        }
        if best {
            if let Some(checkpointer) = &self.checkpointer {
                let path = checkpointer.write_best(self.saved_model())?;
                observer.observe(&Event::CheckpointWritten {
                    path: &path,
                    best: true,
                    history: &self.state.history,
                })?;
            }
        }
        self.checkpoint(observer)?;
        if let (Some(checkpointer), true) = (&self.checkpointer, self.config.keep_checkpoints > 0) {
            checkpointer.keep_epoch(epoch + 1, self.config.keep_checkpoints)?;
        }
        Ok(())
    }
}

/// Every setting that decides a run, by `resnet train` flag where there is one: what a
/// resumed run must repeat ([`TrainingState::check_settings`]). `--epochs`, validation,
/// `--keep-best` and `--stop-after-epochs` are left out: they may change on resume.
fn run_settings(
    config: &TrainerConfig,
    optimizer: &dyn Optimizer,
    data: &TrainingSet,
) -> std::collections::BTreeMap<String, String> {
    let optional = |v: Option<f64>| v.map_or("off".to_string(), |v| v.to_string());
    let mut settings: std::collections::BTreeMap<String, String> = [
        ("--batch-size", config.batch_size.to_string()),
        ("--schedule", config.schedule.clone()),
        ("--warmup-epochs", config.warmup_epochs.to_string()),
        ("--label-smoothing", config.label_smoothing.to_string()),
        ("--clip-grad-norm", optional(config.clip_grad_norm)),
        ("--ema-decay", optional(config.ema_decay)),
        ("--mixup", config.mixup.mixup_alpha.to_string()),
        ("--cutmix", config.mixup.cutmix_alpha.to_string()),
        ("--mixup-prob", config.mixup.prob.to_string()),
        ("--mixup-switch-prob", config.mixup.switch_prob.to_string()),
        ("--freeze-backbone", config.freeze_backbone.to_string()),
        // The optimizer's name is compared by `TrainingState::check_matches`.
        ("--lr", optimizer.lr().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    settings.extend(optimizer.settings());
    settings.extend(data.description());
    settings
}
