//! Training ResNets on Candle. So far: the optimizers, with PyTorch's exact update rules
//! (`torch/optim/sgd.py`, `adamw.py`), over the named variables of a
//! [`candle_nn::VarMap`], their state saved and loaded as named tensors; learning-rate
//! schedules stepped per iteration; cross-entropy with label smoothing; ImageFolder
//! training data with the CIFAR and ImageNet augmentations, seeded.
//!
//! ```
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use resnet_train::{parameters, Optimizer, Sgd, SgdConfig};
//!
//! # fn main() -> candle_core::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let weight = vb.get((4, 3), "fc.weight")?;
//! let mut sgd = Sgd::new(parameters(&varmap, true), SgdConfig::default())?;
//! let loss = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?.matmul(&weight.t()?)?.sum_all()?;
//! sgd.step(&loss.backward()?)?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod data;
mod loss;
mod memory;
mod metrics;
mod optim;
mod recipe;
mod schedule;
mod state;
mod trainable;
mod trainer;

pub use data::{
    pad_crop, random_resized_crop, Augmentation, Batch, BatchesAhead, Random, TrainingSet,
};
pub use loss::cross_entropy;
pub use memory::reuse_freed_memory;
pub use metrics::{evaluate, top_k, Accuracy, RunningLoss};
pub use optim::{
    optimizer, parameters, AdamW, AdamWConfig, Optimizer, OptimizerKind, OptimizerSettings,
    Parameter, Sgd, SgdConfig,
};
pub use recipe::{
    clip_grad_norm, cutmix_params, soft_cross_entropy, Ema, GradAccumulator, MixParams, Mixup,
    MixupConfig,
};
pub use schedule::{Schedule, ScheduleKind};
pub use state::{is_file_output, Checkpointer, EpochRecord, ExistingOutput, TrainingState};
pub use trainable::{forward_train, head_parameters, seeded_init, trainable, with_new_head};
pub use trainer::{Event, Observer, Outcome, Trainer, TrainerConfig};
