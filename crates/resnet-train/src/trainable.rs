//! A network whose tensors are variables.

use candle_core::{DType, Result, Var};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::ResNet;

use crate::data::Random;

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

/// Stream key of the weight initialisation (beside the data order's and mixup's).
const INIT_STREAM: u64 = 0x1417;

/// Gives every variable of a new network (`varmap`, built for `config`) seeded starting
/// values, by the formulas of the network's reference code (the draws are this crate's
/// own generator, not PyTorch's): convolutions He-normal (torchvision's `fan_out`/ReLU;
/// the CIFAR reference code's `fan_in`), the classifier PyTorch's `nn.Linear` default
/// (uniform within `1/sqrt(fan_in)`, weight and bias; He-normal weight for CIFAR),
/// BatchNorm scale 1 and shift 0, running mean 0 and variance 1, other biases 0. The same
/// seed gives the same network on every device and thread count: a from-scratch run is
/// reproducible, which candle's unseedable CPU generator is not.
pub fn seeded_init(varmap: &VarMap, config: &resnet_core::ResNetConfig, seed: u64) -> Result<()> {
    let cifar = config.stem == resnet_core::StemKind::Cifar;
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let rank_of = |name: &str| data.get(name).map(|v| v.rank());
    for (index, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let mut random = Random::new(&[seed, index as u64, INIT_STREAM]);
        let count = var.elem_count();
        let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
        let weight_rank = rank_of(&format!("{prefix}.weight"));
        let values: Vec<f32> = match (leaf, dims.len(), weight_rank) {
            ("running_var", _, _) => vec![1.0; count],
            ("weight", 4, _) => {
                let receptive: usize = dims[2..].iter().product();
                let fan = if cifar {
                    dims[1] * receptive
                } else {
                    dims[0] * receptive
                };
                let std = (2.0 / fan.max(1) as f64).sqrt();
                (0..count)
                    .map(|_| (std * normal(&mut random)) as f32)
                    .collect()
            }
            ("weight", 2, _) if cifar => {
                let std = (2.0 / dims[1].max(1) as f64).sqrt();
                (0..count)
                    .map(|_| (std * normal(&mut random)) as f32)
                    .collect()
            }
            ("weight", 2, _) => uniform(&mut random, count, dims[1]),
            ("bias", 1, Some(2)) => {
                let fan_in = data[&format!("{prefix}.weight")].dims()[1];
                uniform(&mut random, count, fan_in)
            }
            ("weight", 1, _) => vec![1.0; count],
            _ => vec![0.0; count],
        };
        let values = candle_core::Tensor::from_vec(values, dims, var.device())?;
        var.set(&values.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A standard normal draw (Box-Muller).
fn normal(random: &mut Random) -> f64 {
    let u = 1.0 - random.uniform(); // (0, 1]: the logarithm stays finite
    let v = random.uniform();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// `count` draws uniform within `1/sqrt(fan_in)`, as PyTorch's `nn.Linear` starts.
fn uniform(random: &mut Random, count: usize, fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    (0..count)
        .map(|_| (bound * (2.0 * random.uniform() - 1.0)) as f32)
        .collect()
}
