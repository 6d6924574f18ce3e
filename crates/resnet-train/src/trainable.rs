//! A network whose tensors are variables.

use candle_core::{DType, Result, Var};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::ResNet;

/// A copy of `model` (unfolded) whose every tensor is a variable of the returned
/// [`VarMap`], under torchvision's names: the network to train, and what the optimizer
/// and a checkpoint see. BatchNorm's running statistics are variables too, updated by
/// train-mode passes, never by the optimizer.
pub fn trainable(model: &ResNet) -> Result<(ResNet, VarMap)> {
    let varmap = VarMap::new();
    let mut dtype = DType::F32;
    {
        let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, tensor) in model.named_tensors()? {
            dtype = tensor.dtype();
            data.insert(name, Var::from_tensor(&tensor.copy()?)?);
        }
    }
    let device = model.device().clone();
    let trainable = ResNet::new(
        model.config(),
        VarBuilder::from_varmap(&varmap, dtype, &device),
    )?;
    Ok((trainable, varmap))
}
