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

/// The classifier's tensor names start with this (torchvision's names, as the network
/// keeps them whatever the checkpoint's naming).
const HEAD_PREFIX: &str = "fc.";

/// [`trainable`] with a fresh classifier for `num_classes` classes where the network has
/// another count (initialised as a new network's: PyTorch's `nn.Linear` default); the
/// backbone keeps its weights. With the same count, the classifier is kept.
pub fn with_new_head(model: &ResNet, num_classes: usize) -> Result<(ResNet, VarMap)> {
    if num_classes == 0 {
        candle_core::bail!("a classifier needs at least one class");
    }
    let (trained, varmap) = trainable(model)?;
    if model.config().num_classes == num_classes {
        return Ok((trained, varmap));
    }
    {
        let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        data.retain(|name, _| !name.starts_with(HEAD_PREFIX));
    }
    let dtype = model
        .named_tensors()?
        .first()
        .map_or(DType::F32, |(_, t)| t.dtype());
    let config = model.config().clone().with_num_classes(num_classes);
    let fresh = ResNet::new(
        &config,
        VarBuilder::from_varmap(&varmap, dtype, model.device()),
    )?;
    Ok((fresh, varmap))
}

/// The classifier's parameters alone, for training with the backbone frozen (pass
/// `frozen_backbone: true` to [`forward_train`] too).
pub fn head_parameters(parameters: Vec<crate::Parameter>) -> Vec<crate::Parameter> {
    parameters
        .into_iter()
        .filter(|p| p.name.starts_with(HEAD_PREFIX))
        .collect()
}

/// The training forward pass: train-mode BatchNorm throughout, or with
/// `frozen_backbone` the backbone as it is (BatchNorm in eval mode, no gradient
/// through it) and only the head in the graph.
pub fn forward_train(
    model: &ResNet,
    images: &candle_core::Tensor,
    frozen_backbone: bool,
) -> Result<candle_core::Tensor> {
    use candle_core::ModuleT;
    if frozen_backbone {
        let features = model.forward_features(images)?.detach();
        model.forward_head(&features, false)
    } else {
        model.forward_t(images, true)
    }
}
