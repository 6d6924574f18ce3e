//! Where a run stands, written beside its model and read back to resume it: the step,
//! the epoch, the seed, the history of finished epochs as named records, the
//! optimizer's tensors (and the EMA's). `resnet train --resume` and [`crate::Trainer`]
//! read and write the same file, so a run started by either continues with the other.

use std::collections::HashMap;
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
    /// Wall time of the epoch, validation included.
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
}

const TRAINED_PREFIX: &str = "trained.";

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
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut metadata = HashMap::from([
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
        let mut optimizer_tensors = HashMap::new();
        let mut trained_tensors = HashMap::new();
        for info in file.tensors() {
            let tensor = file
                .load(&info.name, device, DType::F32)
                .map_err(candle_core::Error::wrap)?;
            match info.name.strip_prefix(TRAINED_PREFIX) {
                Some(name) => trained_tensors.insert(name.to_string(), tensor),
                None => optimizer_tensors.insert(info.name.clone(), tensor),
            };
        }
        Ok(Self {
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
        })
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
#[derive(Debug, Clone)]
pub struct Checkpointer {
    output: PathBuf,
    scheme: NamingScheme,
    classes: Vec<String>,
    preprocess: PreprocessConfig,
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
        let checkpointer = Self {
            output: output.into(),
            scheme,
            classes,
            preprocess,
        };
        Self::check_destination(&checkpointer.output)?;
        Ok(checkpointer)
    }

    /// Checks that a model can be written at `output` (creating a model directory),
    /// writing nothing else: for a command that wants to fail before any work.
    pub fn check_destination(output: &Path) -> Result<()> {
        let model_path = if is_file_output(output) {
            output.to_path_buf()
        } else {
            std::fs::create_dir_all(output).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "creating the output directory {}: {e}",
                    output.display()
                ))
            })?;
            output.join("model.safetensors")
        };
        drop(resnet_io::OutputFile::create(model_path).map_err(candle_core::Error::wrap)?);
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

    /// Writes the model and then the state (each atomically).
    pub fn write(&self, model: &ResNet, state: &TrainingState) -> Result<()> {
        self.write_model(model, &self.output)?;
        state.write(&Self::state_path(&self.output))
    }

    /// Writes the best model so far.
    pub fn write_best(&self, model: &ResNet) -> Result<PathBuf> {
        let path = self.best_path();
        self.write_model(model, &path)?;
        Ok(path)
    }
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
