//! The ResNet family (He et al., "Deep Residual Learning for Image Recognition", 2015)
//! as one configurable model on [Candle](https://github.com/huggingface/candle).
//!
//! A [`ResNetConfig`] describes any ResNet — basic or bottleneck blocks, any number of
//! stages, ImageNet or CIFAR stem, shortcut option A, B or C, ResNeXt groups, Wide ResNet
//! widths, headless or with a classifier — and the paper's and torchvision's networks are
//! presets of it. [`ResNet`] builds it through candle-nn's `VarBuilder` with torchvision's
//! tensor names, so torchvision and timm checkpoints load as they are.
//!
//! ```
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::VarBuilder;
//! use resnet_core::{ResNet, ResNetConfig};
//!
//! # fn main() -> candle_core::Result<()> {
//! let config: ResNetConfig = "resnet20".parse()?;
//! let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
//! let model = ResNet::new(&config, vb)?;
//! let images = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu)?;
//! let logits = model.forward_t(&images, false)?;
//! assert_eq!(logits.dims(), &[2, 10]);
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]

mod allocator;
mod batch_norm;
mod block;
mod config;
mod cpu;
mod device;
mod model;
pub mod ops;
mod squeeze_excite;

/// The candle this crate is built on: use it rather than guessing the matching version.
pub use candle_core;
/// candle-nn, as this crate uses it.
pub use candle_nn;

/// What a program using the model needs, in one `use resnet_core::prelude::*;`.
pub mod prelude {
    pub use crate::{BlockKind, ResNet, ResNetConfig, ShortcutKind, StemKind};
    pub use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
    pub use candle_nn::{VarBuilder, VarMap};
}

pub use allocator::{retain_freed_memory, RetainingAllocator};
pub use batch_norm::{BatchNorm2d, BatchNormRelu};
pub use block::{ConvBn, NamedTensors, ResidualBlock, Shortcut};
pub use config::{
    BlockKind, BottleneckStride, InputNormalization, ResNetConfig, ShortcutKind, StemKind,
    KERAS_BN_EPS, PRESET_NAMES,
};
pub use cpu::{CpuIsa, Isa, ISA_ENV};
pub use device::{device, device_name};
pub use model::{
    CpuKernels, FeatureInfo, FeatureMap, Inference, KernelSummary, ResNet, Stage, Stem,
};
pub use squeeze_excite::SqueezeExcite;
