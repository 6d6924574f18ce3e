//! Where a run stands, written beside its model and read back to resume it: the step,
//! the epoch, the seed, the history of finished epochs as named records, the
//! optimizer's tensors (and the EMA's). `resnet train --resume` and [`crate::Trainer`]
//! read and write the same file, so a run started by either continues with the other.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{bail, DType, Device, Result, Tensor};
use resnet_core::{ResNet, ResNetConfig};
use resnet_io::{NamingScheme, PreprocessConfig};
use serde::{Deserialize, Serialize};

/// One finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: u64,
    /// Mean training loss over the epoch's images.
    pub train_loss: f64,
    /// Validation top-1 (of the EMA network where there is one), if validated.
    pub val_top1: Option<f64>,
    /// Validation top-5, if validated.
    pub val_top5: Option<f64>,
    /// Validation top-1 of the trained (not averaged) network, with an EMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_val_top1: Option<f64>,
    /// The learning rate of the epoch's last step.
    pub lr: f64,
    /// Wall time of the epoch, validation included. Not kept in the state file (read
    /// back as 0), so that identical runs write identical bytes.
    #[serde(skip, default)]
    pub seconds: f64,
    /// Training images seen.
    pub images: usize,
    /// Unreadable training images skipped.
    pub unreadable: usize,
}

/// The training state of a run.
#[derive(Debug, Clone, Default)]
pub struct TrainingState {
    /// Batches (micro-batches, with accumulation) done since the start of the run.
    pub iteration: u64,
    /// Optimizer steps done.
    pub step: u64,
    /// The data order's and augmentation's seed.
    pub seed: u64,
    /// Batches per epoch.
    pub steps_per_epoch: u64,
    /// Batches per optimizer step.
    pub grad_accum_steps: u64,
    /// The trained architecture (`ResNetConfig` as JSON), classes included.
    pub architecture: String,
    /// `sgd` or `adamw`.
    pub optimizer: String,
    /// Finished epochs.
    pub history: Vec<EpochRecord>,
    /// The best validation top-1 so far, where best checkpoints are kept.
    pub best_top1: Option<f64>,
    /// The optimizer's tensors ([`crate::Optimizer::state`]).
    pub optimizer_tensors: HashMap<String, Tensor>,
    /// With an EMA, the trained network's own tensors (the saved model is the average).
    pub trained_tensors: HashMap<String, Tensor>,
    /// The saved model's tensors: the state is the checkpoint's one unit (a resumed run
    /// continues from these, whatever the model file beside it holds).
    pub model_tensors: HashMap<String, Tensor>,
    /// Every setting that decides the run (flag or setting name -> value), which a
    /// resumed run must repeat: see [`TrainingState::check_settings`].
    pub settings: BTreeMap<String, String>,
}

const TRAINED_PREFIX: &str = "trained.";
const MODEL_PREFIX: &str = "model.";

/// SHA-256 (hex) of named tensors: names, shapes and f32 values, in name order.
fn tensors_digest(tensors: &[(String, Tensor)]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for (name, tensor) in tensors {
        hash.update(name.as_bytes());
        hash.update([0]);
        for &dim in tensor.dims() {
            hash.update((dim as u64).to_le_bytes());
        }
        let values = tensor
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for value in values {
            hash.update(value.to_le_bytes());
        }
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl TrainingState {
    /// Finished epochs.
    pub fn epoch(&self) -> u64 {
        self.iteration / self.steps_per_epoch.max(1)
    }

    /// The architecture recorded for `config`.
    pub fn architecture_of(config: &ResNetConfig) -> String {
        serde_json::to_string(config).unwrap_or_default()
    }

    /// Writes the state to `path` (a safetensors file, atomically).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self
            .optimizer_tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        tensors.extend(
            self.trained_tensors
                .iter()
                .map(|(n, t)| (format!("{TRAINED_PREFIX}{n}"), t.clone())),
        );
        tensors.extend(
            self.model_tensors
                .iter()
                .map(|(n, t)| (format!("{MODEL_PREFIX}{n}"), t.clone())),
        );
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut metadata = HashMap::from([
            ("tensors_sha256".to_string(), tensors_digest(&tensors)?),
            (
                "settings".to_string(),
                serde_json::to_string(&self.settings).map_err(candle_core::Error::wrap)?,
            ),
            ("iteration".to_string(), self.iteration.to_string()),
            ("step".to_string(), self.step.to_string()),
            ("epoch".to_string(), self.epoch().to_string()),
            ("seed".to_string(), self.seed.to_string()),
            (
                "steps_per_epoch".to_string(),
                self.steps_per_epoch.to_string(),
            ),
            (
                "grad_accum_steps".to_string(),
                self.grad_accum_steps.max(1).to_string(),
            ),
            ("architecture".to_string(), self.architecture.clone()),
            ("optimizer".to_string(), self.optimizer.clone()),
            (
                "history".to_string(),
                serde_json::to_string(&self.history).map_err(candle_core::Error::wrap)?,
            ),
        ]);
        if let Some(best) = self.best_top1 {
            metadata.insert("best_top1".to_string(), best.to_string());
        }
        resnet_io::write_tensors(path, &tensors, Some(metadata)).map_err(candle_core::Error::wrap)
    }

    /// Reads a state written by [`TrainingState::write`] (or by an earlier `resnet
    /// train`, whose history was (loss, top-1) pairs), its tensors on `device`.
    pub fn read(path: &Path, device: &Device) -> Result<Self> {
        let file = resnet_io::Checkpoint::open(path).map_err(candle_core::Error::wrap)?;
        let metadata = file.metadata();
        let number = |key: &str| -> Result<u64> {
            match metadata.get(key).map(|v| v.parse::<u64>()) {
                Some(Ok(v)) => Ok(v),
                _ => bail!("{}: no valid '{key}' in its metadata", path.display()),
            }
        };
        let iteration = number("iteration")?;
        let history = match metadata.get("history") {
            None => Vec::new(),
            Some(text) => parse_history(text).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{}: its 'history' is not a list of epochs",
                    path.display()
                ))
            })?,
        };
        let best_top1 = match metadata.get("best_top1") {
            None => None,
            Some(v) => Some(v.parse::<f64>().map_err(|_| {
                candle_core::Error::Msg(format!("{}: 'best_top1' is not a number", path.display()))
            })?),
        };
        let invalid = |what: String| candle_core::Error::Msg(format!("{}: {what}", path.display()));
        let mut all = Vec::new();
        for info in file.tensors() {
            let tensor = file
                .load(&info.name, device, DType::F32)
                .map_err(candle_core::Error::wrap)?;
            all.push((info.name.clone(), tensor));
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        // States written since the checksum existed must match it: a changed byte in a
        // tensor is refused, not trained on.
        if let Some(expected) = metadata.get("tensors_sha256") {
            let found = tensors_digest(&all)?;
            if &found != expected {
                return Err(invalid(format!(
                    "its tensors do not match their checksum (SHA-256 {found}, recorded \
                     {expected}): the file is corrupt"
                )));
            }
        }
        let settings = match metadata.get("settings") {
            None => BTreeMap::new(),
            Some(text) => serde_json::from_str(text)
                .map_err(|e| invalid(format!("its 'settings' are not readable ({e})")))?,
        };
        let mut optimizer_tensors = HashMap::new();
        let mut trained_tensors = HashMap::new();
        let mut model_tensors = HashMap::new();
        for (name, tensor) in all {
            if let Some(name) = name.strip_prefix(TRAINED_PREFIX) {
                trained_tensors.insert(name.to_string(), tensor);
            } else if let Some(name) = name.strip_prefix(MODEL_PREFIX) {
                model_tensors.insert(name.to_string(), tensor);
            } else {
                optimizer_tensors.insert(name, tensor);
            }
        }
        let state = Self {
            iteration,
            step: number("step").unwrap_or(iteration),
            seed: number("seed")?,
            steps_per_epoch: number("steps_per_epoch")?,
            grad_accum_steps: number("grad_accum_steps").unwrap_or(1),
            architecture: metadata.get("architecture").cloned().unwrap_or_default(),
            optimizer: metadata.get("optimizer").cloned().unwrap_or_default(),
            history,
            best_top1,
            optimizer_tensors,
            trained_tensors,
            model_tensors,
            settings,
        };
        state.validate(metadata.get("epoch")).map_err(invalid)?;
        Ok(state)
    }

    /// The fields agree with each other: an epoch's worth of batches, one history record
    /// per finished epoch, optimizer steps that the batches and accumulation allow.
    fn validate(&self, recorded_epoch: Option<&String>) -> std::result::Result<(), String> {
        if self.steps_per_epoch == 0 {
            return Err("'steps_per_epoch' is 0".to_string());
        }
        let accum = self.grad_accum_steps.max(1);
        if let Some(recorded) = recorded_epoch {
            if recorded.parse::<u64>().ok() != Some(self.epoch()) {
                return Err(format!(
                    "its 'epoch' {recorded} disagrees with iteration {} at {} batches per \
                     epoch",
                    self.iteration, self.steps_per_epoch
                ));
            }
        }
        let history_epochs: Vec<u64> = self.history.iter().map(|r| r.epoch).collect();
        let expected: Vec<u64> = (1..=self.history.len() as u64).collect();
        if history_epochs != expected || self.history.len() as u64 > self.epoch() {
            return Err(format!(
                "its history has epochs {history_epochs:?}, for {} finished epochs",
                self.epoch()
            ));
        }
        // An optimizer step per `accum` batches, each epoch's short last group a step.
        let max_steps = self.iteration;
        let min_steps = self.iteration / accum;
        if self.step < min_steps || self.step > max_steps {
            return Err(format!(
                "its {} optimizer steps cannot follow {} batches at {accum} per step",
                self.step, self.iteration
            ));
        }
        Ok(())
    }

    /// Refuses to continue this state with other settings than its run's (a state
    /// written before settings were recorded has none, and is not checked here). Each
    /// difference is named with both values; `--epochs`, validation, `--keep-best` and
    /// `--stop-after-epochs` are not settings and may change.
    pub fn check_settings(&self, current: &BTreeMap<String, String>) -> Result<()> {
        if self.settings.is_empty() {
            return Ok(());
        }
        let missing = "(not set)".to_string();
        let differences: Vec<String> = self
            .settings
            .keys()
            .chain(current.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter_map(|key| {
                let saved = self.settings.get(key).unwrap_or(&missing);
                let now = current.get(key).unwrap_or(&missing);
                (saved != now).then(|| format!("{key}: the run had {saved}, this one {now}"))
            })
            .collect();
        if !differences.is_empty() {
            bail!(
                "--resume: the run cannot continue with other settings ({})",
                differences.join("; ")
            );
        }
        Ok(())
    }

    /// Refuses to continue this state with another run's settings: another seed, batch
    /// count per epoch, accumulation, architecture (class count included) or optimizer.
    /// Each error names what differs.
    pub fn check_matches(
        &self,
        seed: u64,
        steps_per_epoch: u64,
        grad_accum_steps: u64,
        config: &ResNetConfig,
        optimizer: &str,
    ) -> Result<()> {
        if self.seed != seed {
            bail!(
                "--resume: the run used --seed {}, this one --seed {seed}",
                self.seed
            );
        }
        if self.steps_per_epoch != steps_per_epoch {
            bail!(
                "--resume: the run had {} steps per epoch, this one {steps_per_epoch}: the data or --batch-size changed",
                self.steps_per_epoch
            );
        }
        if !self.architecture.is_empty() {
            let saved: Option<ResNetConfig> = serde_json::from_str(&self.architecture).ok();
            match saved {
                Some(saved) if saved.num_classes != config.num_classes => bail!(
                    "--resume: the run trained {} classes, this one {}",
                    saved.num_classes,
                    config.num_classes
                ),
                Some(saved) if &saved != config => bail!(
                    "--resume: the run trained {}, this one {}",
                    saved.describe(),
                    config.describe()
                ),
                Some(_) => {}
                None => bail!("--resume: the state's architecture is not a ResNet configuration"),
            }
        }
        if self.grad_accum_steps.max(1) != grad_accum_steps.max(1) {
            bail!(
                "--resume: the run used --grad-accum-steps {}, this one {grad_accum_steps}",
                self.grad_accum_steps
            );
        }
        if !self.optimizer.is_empty() && self.optimizer != optimizer {
            bail!(
                "--resume: the run used --optimizer {}, this one --optimizer {optimizer}",
                self.optimizer
            );
        }
        Ok(())
    }
}

/// Records, or the (loss, top-1) pairs of states written before records existed.
fn parse_history(text: &str) -> Option<Vec<EpochRecord>> {
    if let Ok(records) = serde_json::from_str::<Vec<EpochRecord>>(text) {
        return Some(records);
    }
    let pairs: Vec<(f64, Option<f64>)> = serde_json::from_str(text).ok()?;
    Some(
        pairs
            .into_iter()
            .enumerate()
            .map(|(i, (train_loss, val_top1))| EpochRecord {
                epoch: i as u64 + 1,
                train_loss,
                val_top1,
                ..EpochRecord::default()
            })
            .collect(),
    )
}

/// Where a run's model, training state and best model go: a `.safetensors` file (the
/// state beside it as `NAME.training-state.safetensors`) or a model directory
/// (`config.json`, `model.safetensors`, `training-state.safetensors`).
///
/// A checkpoint is one unit: the training state holds the saved model's tensors too, and
/// is written first, so that a run killed at any instant leaves a state that resumes
/// exactly (the model file beside it is for `eval` and `classify`, and may be one
/// checkpoint behind). One run writes an output at a time: the checkpointer holds an
/// advisory lock beside it (`NAME.training.lock`, `DIR/.training.lock`) for its life.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    output: PathBuf,
    scheme: NamingScheme,
    classes: Vec<String>,
    preprocess: PreprocessConfig,
    _lock: std::sync::Arc<std::fs::File>,
}

/// What an existing output may hold when a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExistingOutput {
    /// Only a training run's files (a fresh run replaces them): the default.
    #[default]
    TrainingRun,
    /// The run being resumed.
    Resuming,
    /// Anything: replace it (`--overwrite`).
    Overwrite,
}

impl Checkpointer {
    /// Checkpoints to `output` in `scheme`'s naming; a model directory records the
    /// class names and the preprocessing. The destination is checked (created and
    /// writable) now, before any training.
    pub fn new(
        output: impl Into<PathBuf>,
        scheme: NamingScheme,
        classes: Vec<String>,
        preprocess: PreprocessConfig,
    ) -> Result<Self> {
        Self::with_existing(
            output,
            scheme,
            classes,
            preprocess,
            ExistingOutput::default(),
        )
    }

    /// [`Checkpointer::new`], saying what an existing output may hold: a folder or file
    /// that no training run wrote is refused unless `existing` is
    /// [`ExistingOutput::Overwrite`]. Takes the output's lock (refused, naming the
    /// process, while another run holds it) and removes the temporary files a killed run
    /// left there.
    pub fn with_existing(
        output: impl Into<PathBuf>,
        scheme: NamingScheme,
        classes: Vec<String>,
        preprocess: PreprocessConfig,
        existing: ExistingOutput,
    ) -> Result<Self> {
        let output = output.into();
        Self::check_destination_for(&output, existing)?;
        let lock = take_lock(&output)?;
        let names: Vec<String> = [
            Self::model_file(&output),
            Self::state_path(&output),
            beside(&output, "best.safetensors"),
            beside(&output, "training-curves.svg"),
            output.join("config.json"),
        ]
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        resnet_io::remove_stale_partials(&output_folder(&output), &names);
        Ok(Self {
            output,
            scheme,
            classes,
            preprocess,
            _lock: std::sync::Arc::new(lock),
        })
    }

    /// The model file of an output (the file itself, or `DIR/model.safetensors`).
    fn model_file(output: &Path) -> PathBuf {
        if is_file_output(output) {
            output.to_path_buf()
        } else {
            output.join("model.safetensors")
        }
    }

    /// Checks that a model can be written at `output` (creating a model directory),
    /// writing nothing else: for a command that wants to fail before any work.
    pub fn check_destination(output: &Path) -> Result<()> {
        Self::check_destination_for(output, ExistingOutput::default())
    }

    /// [`Checkpointer::check_destination`], refusing an existing output as
    /// [`Checkpointer::with_existing`] does, and one that another run is writing.
    pub fn check_destination_for(output: &Path, existing: ExistingOutput) -> Result<()> {
        if existing == ExistingOutput::TrainingRun {
            let config = (!is_file_output(output)).then(|| output.join("config.json"));
            let foreign: Vec<String> = std::iter::once(Self::model_file(output))
                .chain(config)
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
                .collect();
            if !foreign.is_empty() && !Self::state_path(output).exists() {
                bail!(
                    "{} holds files that no training run wrote ({}): --overwrite replaces them",
                    output.display(),
                    foreign.join(", ")
                );
            }
        }
        if output.exists() {
            // Taken and let go at once: only a check, the run takes it for good later.
            drop(take_lock(output)?);
        }
        if !is_file_output(output) {
            std::fs::create_dir_all(output).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "creating the output directory {}: {e}",
                    output.display()
                ))
            })?;
        }
        drop(
            resnet_io::OutputFile::create(Self::model_file(output))
                .map_err(candle_core::Error::wrap)?,
        );
        Ok(())
    }

    /// The output: a file or a model directory.
    pub fn output(&self) -> &Path {
        &self.output
    }

    fn is_file(&self) -> bool {
        is_file_output(&self.output)
    }

    /// The training state's path for a run's output.
    pub fn state_path(output: &Path) -> PathBuf {
        beside(output, "training-state.safetensors")
    }

    /// A file beside the output named `suffix` (`NAME.suffix` for a file output,
    /// `DIR/suffix` for a directory).
    pub fn beside(&self, suffix: &str) -> PathBuf {
        beside(&self.output, suffix)
    }

    /// Where the best model goes: `NAME.best.safetensors` or `DIR/best/`.
    pub fn best_path(&self) -> PathBuf {
        if self.is_file() {
            self.output.with_extension("best.safetensors")
        } else {
            self.output.join("best")
        }
    }

    /// Writes `model` to `path` (a file or a model directory, as the output is).
    pub fn write_model(&self, model: &ResNet, path: &Path) -> Result<()> {
        let written = if is_file_output(path) {
            resnet_io::save(model, path, self.scheme, DType::F32)
        } else {
            resnet_io::write_model_dir(
                path,
                model,
                self.scheme,
                Some(&self.classes),
                &self.preprocess,
            )
        };
        written.map_err(candle_core::Error::wrap)
    }

    /// Writes the state (which holds the model's tensors) and then the model file, each
    /// atomically: a kill between the two leaves the new state beside the previous model
    /// file, and the state is what a resumed run continues from (and rewrites the model
    /// file from). The first checkpoint of a run writes the model first: a kill between
    /// the two then leaves no state, and `--resume` says to start again.
    pub fn write(&self, model: &ResNet, state: &TrainingState) -> Result<()> {
        let mut state = state.clone();
        if state.model_tensors.is_empty() {
            state.model_tensors = model.named_tensors()?.into_iter().collect();
        }
        let state_path = Self::state_path(&self.output);
        if state_path.exists() {
            state.write(&state_path)?;
            resnet_io::fault_point("checkpoint-first-file-written");
            self.write_model(model, &self.output)
        } else {
            // The first checkpoint: the model first, so that a state never stands without
            // a model file beside it (what a resumed run's architecture is read from).
            self.write_model(model, &self.output)?;
            resnet_io::fault_point("checkpoint-first-file-written");
            state.write(&state_path)
        }
    }

    /// Bytes a checkpoint of `state` (with its model) needs on disk, about: its f32
    /// tensors twice (the state's copy and the model file) and a megabyte of headers.
    pub fn checkpoint_bytes(model: &ResNet, state: &TrainingState) -> Result<u64> {
        let elements = |t: &Tensor| t.elem_count() as u64;
        let model: u64 = model
            .named_tensors()?
            .iter()
            .map(|(_, t)| elements(t))
            .sum();
        let state: u64 = state
            .optimizer_tensors
            .values()
            .chain(state.trained_tensors.values())
            .map(elements)
            .sum();
        Ok((2 * model + state) * 4 + (1 << 20))
    }

    /// Refuses to start where the output's file system has less free space than two
    /// checkpoints of `bytes` (the new one is written beside the old) and 64 MiB.
    pub fn check_free_space(&self, bytes: u64) -> Result<()> {
        let Some(free) = free_bytes(&output_folder(&self.output)) else {
            return Ok(());
        };
        let needed = 2 * bytes + (64 << 20);
        if free < needed {
            bail!(
                "{}: {} MiB free, a checkpoint needs {} MiB (twice its {} MiB and 64 MiB): \
                 free some space or choose another --output",
                self.output.display(),
                free >> 20,
                needed >> 20,
                bytes >> 20
            );
        }
        Ok(())
    }

    /// Keeps the checkpoint just written, of the end of `epoch` (1-based), as
    /// `DIR/checkpoints/epoch-NNNN/` (a model directory with its state, resumable with
    /// `--resume`) or `NAME.epoch-NNNN.safetensors` with its state beside it, and removes
    /// all but the `keep` newest kept ones (timm's `CheckpointSaver`). The files are hard
    /// links of the checkpoint's (copies where the file system has none): the next
    /// checkpoint replaces the output's files by renaming, so a kept one never changes.
    pub fn keep_epoch(&self, epoch: u64, keep: usize) -> Result<PathBuf> {
        let io = |path: &Path, e: std::io::Error| {
            candle_core::Error::Msg(format!("keeping a checkpoint: {}: {e}", path.display()))
        };
        let link = |from: &Path, to: &Path| -> Result<()> {
            if to.exists() {
                std::fs::remove_file(to).map_err(|e| io(to, e))?;
            }
            std::fs::hard_link(from, to)
                .or_else(|_| std::fs::copy(from, to).map(drop))
                .map_err(|e| io(to, e))
        };
        let name = format!("epoch-{epoch:04}");
        let kept = if self.is_file() {
            self.output.with_extension(format!("{name}.safetensors"))
        } else {
            self.output.join("checkpoints").join(&name)
        };
        if self.is_file() {
            link(&self.output, &kept)?;
        } else {
            std::fs::create_dir_all(&kept).map_err(|e| io(&kept, e))?;
            for file in ["model.safetensors", "config.json"] {
                if self.output.join(file).exists() {
                    link(&self.output.join(file), &kept.join(file))?;
                }
            }
        }
        // The state last: a kept checkpoint with a state is complete.
        link(&Self::state_path(&self.output), &Self::state_path(&kept))?;
        // The kept epochs, oldest first; all but the newest `keep` go.
        let mut epochs: Vec<(u64, PathBuf)> = self.kept_checkpoints();
        epochs.sort();
        let surplus = epochs.len().saturating_sub(keep.max(1));
        for (_, old) in epochs.into_iter().take(surplus) {
            if self.is_file() {
                let _ = std::fs::remove_file(Self::state_path(&old));
                let _ = std::fs::remove_file(&old);
            } else {
                let _ = std::fs::remove_dir_all(&old);
            }
        }
        Ok(kept)
    }

    /// The checkpoints [`Checkpointer::keep_epoch`] kept, with their epochs.
    pub fn kept_checkpoints(&self) -> Vec<(u64, PathBuf)> {
        let (folder, prefix, suffix) = if self.is_file() {
            let stem = self
                .output
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            (
                output_folder(&self.output),
                format!("{stem}.epoch-"),
                ".safetensors",
            )
        } else {
            (self.output.join("checkpoints"), "epoch-".to_string(), "")
        };
        let Ok(entries) = std::fs::read_dir(&folder) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let digits = name.strip_prefix(&prefix)?.strip_suffix(suffix)?;
                let epoch = digits
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| digits.parse::<u64>().ok())??;
                Some((epoch, entry.path()))
            })
            .collect()
    }

    /// Writes the best model so far.
    pub fn write_best(&self, model: &ResNet) -> Result<PathBuf> {
        let path = self.best_path();
        self.write_model(model, &path)?;
        Ok(path)
    }
}

/// The output's lock, held by this process until the file is dropped (or the process
/// ends, however it ends: the kernel lets go of a dead process's lock).
fn take_lock(output: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = if is_file_output(output) {
        output.with_extension("training.lock")
    } else {
        output.join(".training.lock")
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("process {holder}")
            };
            bail!(
                "{}: {holder} is training into it (lock {}); wait for it to finish or \
                 choose another --output",
                output.display(),
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            bail!("{}: cannot lock ({e})", path.display())
        }
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    let _ = file.flush();
    Ok(file)
}

/// Free bytes for an unprivileged user on the file system of `folder`, where the
/// platform says.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // statvfs: a C call on a NUL-terminated path and a zeroed struct
fn free_bytes(folder: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(folder.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statvfs` is a plain C struct, for which all zero bytes are a valid value.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `stats` is ours to fill.
    let result = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
    (result == 0).then(|| stats.f_bavail as u64 * stats.f_frsize as u64)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn free_bytes(_folder: &Path) -> Option<u64> {
    None
}

/// The folder an output's files are in: the file's folder, or the model directory.
fn output_folder(output: &Path) -> PathBuf {
    if !is_file_output(output) {
        return output.to_path_buf();
    }
    output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The output path is a `.safetensors` file, else a model directory.
pub fn is_file_output(output: &Path) -> bool {
    output.extension().is_some_and(|e| e == "safetensors")
}

fn beside(output: &Path, suffix: &str) -> PathBuf {
    if is_file_output(output) {
        output.with_extension(suffix)
    } else {
        output.join(suffix)
    }
}
