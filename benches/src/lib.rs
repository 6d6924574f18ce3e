//! Helpers for the benchmarks: randomly initialised networks and inputs.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::{CpuKernels, ResNet, ResNetConfig};

/// A randomly initialised network of preset `arch` on the CPU, and the VarMap holding it.
pub fn random_model(arch: &str, dtype: DType) -> Result<(ResNet, VarMap)> {
    let config: ResNetConfig = arch.parse()?;
    let varmap = VarMap::new();
    let model = ResNet::new(
        &config,
        VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu),
    )?;
    Ok((model, varmap))
}

/// The same, BatchNorm folded: the inference path `resnet` runs.
pub fn random_inference_model(arch: &str, dtype: DType) -> Result<ResNet> {
    random_inference_model_with(arch, dtype, CpuKernels::Auto)
}

/// [`random_inference_model`] folded for the given CPU kernels.
pub fn random_inference_model_with(
    arch: &str,
    dtype: DType,
    kernels: CpuKernels,
) -> Result<ResNet> {
    random_model(arch, dtype)?.0.fold_batch_norm_with(kernels)
}

/// A random batch for `model`: 224x224, or 32x32 for CIFAR networks.
pub fn random_input(model: &ResNet, batch: usize) -> Result<Tensor> {
    let config = model.config();
    let size = match config.stem {
        resnet_core::StemKind::Cifar => 32,
        _ => 224,
    };
    Tensor::randn(
        0f32,
        1.0,
        (batch, config.in_channels, size, size),
        &Device::Cpu,
    )?
    .to_dtype(model.dtype())
}
