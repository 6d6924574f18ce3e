//! BatchNorm over NCHW feature maps with PyTorch's exact training semantics.
//!
//! candle-nn's `BatchNorm` updates its running variance with the biased batch variance;
//! PyTorch uses the unbiased one. Fine-tuning has to match PyTorch, so this is our own.

use candle_core::{bail, DType, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

use crate::cpu::batch_norm_grad;

/// `BatchNorm2d` with tensors `weight`, `bias`, `running_mean`, `running_var`.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    /// PyTorch's default momentum for the running statistics.
    pub const MOMENTUM: f64 = 0.1;

    /// Reads the four tensors of a BatchNorm of `channels` channels from `vb`.
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(Self {
            weight,
            bias,
            // A tensor that is already a variable (from a VarMap) is shared, so updated
            // statistics are saved with the VarMap; any other tensor is copied once.
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps,
            momentum: Self::MOMENTUM,
        })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.weight.elem_count()
    }

    /// The learned scale (gamma).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The learned shift (beta).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The running mean used at inference.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running variance used at inference.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// Epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The inference transform as a per-channel affine map `x * scale + shift`, in f32.
    pub fn scale_and_shift(&self) -> Result<(Tensor, Tensor)> {
        let weight = self.weight.to_dtype(DType::F32)?;
        let bias = self.bias.to_dtype(DType::F32)?;
        let mean = self.running_mean().to_dtype(DType::F32)?;
        let var = self.running_var().to_dtype(DType::F32)?;
        let scale = (weight / (var + self.eps)?.sqrt()?)?;
        let shift = (bias - (mean * &scale)?)?;
        Ok((scale, shift))
    }

    /// Normalises with the running statistics.
    fn forward_inference(&self, xs: &Tensor) -> Result<Tensor> {
        let (scale, shift) = self.scale_and_shift()?;
        let shape = (1, self.channels(), 1, 1);
        let scale = scale.to_dtype(xs.dtype())?.reshape(shape)?;
        let shift = shift.to_dtype(xs.dtype())?.reshape(shape)?;
        xs.broadcast_mul(&scale)?.broadcast_add(&shift)
    }

    /// Normalises with the batch statistics (ReLU after it if `relu`) and updates the
    /// running ones as PyTorch does: `running = (1 - momentum) * running + momentum *
    /// batch`, with the unbiased batch variance for `running_var` and the biased one for
    /// the normalisation itself. f32 on the CPU runs one fused op with its own backward.
    fn forward_train(&self, xs: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let count = batch * height * width;
        if count < 2 {
            bail!(
                "BatchNorm in training mode needs more than one value per channel, found \
                 input of shape {:?}",
                xs.dims()
            );
        }
        if batch_norm_grad::supports(xs, &self.weight, &self.bias) {
            let out = batch_norm_grad::batch_norm_train(
                xs,
                &self.weight,
                &self.bias,
                residual,
                self.eps,
                relu,
            )?;
            self.update_running(&out.mean, &out.biased_var, count)?;
            return Ok(out.ys);
        }
        let dtype = xs.dtype();
        // Statistics in f32 so f16/bf16 training does not lose them to rounding.
        let per_channel = xs
            .to_dtype(DType::F32)?
            .transpose(0, 1)?
            .reshape((channels, count))?;
        let mean = per_channel.mean_keepdim(D::Minus1)?;
        let centered = per_channel.broadcast_sub(&mean)?;
        let biased_var = centered.sqr()?.mean_keepdim(D::Minus1)?;

        let mean = mean.flatten_all()?;
        let biased_var = biased_var.flatten_all()?;
        self.update_running(&mean, &biased_var, count)?;

        let inv_std = (biased_var + self.eps)?.sqrt()?.recip()?;
        let weight = self.weight.to_dtype(DType::F32)?;
        let bias = self.bias.to_dtype(DType::F32)?;
        let scale = (weight * &inv_std)?;
        let shift = (bias - (mean * &scale)?)?;
        let shape = (1, channels, 1, 1);
        let ys = xs
            .to_dtype(DType::F32)?
            .broadcast_mul(&scale.reshape(shape)?)?
            .broadcast_add(&shift.reshape(shape)?)?
            .to_dtype(dtype)?;
        add_relu(ys, residual, relu)
    }

    /// Moves the running statistics towards the batch's (`count` values per channel).
    pub(crate) fn update_running(
        &self,
        mean: &Tensor,
        biased_var: &Tensor,
        count: usize,
    ) -> Result<()> {
        let unbiased_var = (biased_var * (count as f64 / (count - 1) as f64))?;
        let update = |running: &Var, batch_value: &Tensor| -> Result<()> {
            let old = running.as_tensor().to_dtype(DType::F32)?;
            let new = ((old * (1.0 - self.momentum))? + (batch_value.detach() * self.momentum)?)?;
            running.set(&new.to_dtype(running.dtype())?)
        };
        update(&self.running_mean, mean)?;
        update(&self.running_var, &unbiased_var)
    }

    /// `relu(forward_t(xs) + residual)`, residual and ReLU optional: in training on the
    /// CPU one op.
    pub(crate) fn forward_add_relu(
        &self,
        xs: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
        train: bool,
    ) -> Result<Tensor> {
        if train {
            self.forward_train(xs, residual, relu)
        } else {
            add_relu(self.forward_inference(xs)?, residual, relu)
        }
    }

    /// Inference (`train = false`) or training (`train = true`) normalisation.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_add_relu(xs, None, false, train)
    }

    /// Appends its four tensors, named `{name}.weight`, `{name}.bias`,
    /// `{name}.running_mean`, `{name}.running_var`, to `out`.
    pub(crate) fn push_named_tensors(&self, name: &str, out: &mut crate::block::NamedTensors) {
        for (param, tensor) in [
            ("weight", self.weight()),
            ("bias", self.bias()),
            ("running_mean", self.running_mean()),
            ("running_var", self.running_var()),
        ] {
            out.push((format!("{name}.{param}"), tensor.clone()));
        }
    }
}

/// `relu(ys + residual)`, residual and ReLU optional.
pub(crate) fn add_relu(ys: Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let ys = match residual {
        Some(residual) => (ys + residual)?,
        None => ys,
    };
    if relu {
        ys.relu()
    } else {
        Ok(ys)
    }
}

/// BatchNorm then ReLU with no convolution to fold into: the pre-activation of a
/// pre-activation block (`norm1`) and such a network's final norm (`norm`).
#[derive(Debug, Clone)]
pub struct BatchNormRelu {
    bn: BatchNorm2d,
    /// Per-channel scale and shift, f32, once folded for inference.
    folded: Option<(Tensor, Tensor)>,
}

impl BatchNormRelu {
    pub(crate) fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            bn: BatchNorm2d::new(channels, eps, vb)?,
            folded: None,
        })
    }

    /// The BatchNorm.
    pub fn bn(&self) -> &BatchNorm2d {
        &self.bn
    }

    /// The same, its statistics reduced to a scale and shift for inference.
    pub(crate) fn fold(self) -> Result<Self> {
        let folded = Some(self.bn.scale_and_shift()?);
        Ok(Self { folded, ..self })
    }

    /// `relu(bn(xs))` on `(N, C, H, W)`, or once folded also on the blocked
    /// `(N, C/16, H, W, 16)` layout.
    pub(crate) fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let Some((scale, shift)) = &self.folded else {
            return self.bn.forward_add_relu(xs, None, true, train);
        };
        if train {
            bail!("this network's BatchNorm is folded for inference: it cannot train");
        }
        // Blocked activations (f32, CPU): one pass.
        if xs.rank() == 5 && xs.dtype() == DType::F32 && xs.device().is_cpu() {
            return crate::cpu::blocked::affine_relu(
                xs,
                &scale.to_vec1::<f32>()?,
                &shift.to_vec1::<f32>()?,
            );
        }
        let channels = scale.elem_count();
        let shape: Vec<usize> = match *xs.dims() {
            [_, blocks, _, _, lanes] if blocks * lanes == channels => vec![1, blocks, 1, 1, lanes],
            [_, c, _, _] if c == channels => vec![1, c, 1, 1],
            ref dims => bail!("BatchNorm of {channels} channels on a tensor of shape {dims:?}"),
        };
        let per_channel = |t: &Tensor| t.to_dtype(xs.dtype())?.reshape(shape.as_slice());
        xs.broadcast_mul(&per_channel(scale)?)?
            .broadcast_add(&per_channel(shift)?)?
            .relu()
    }

    pub(crate) fn parameter_count(&self) -> usize {
        2 * self.bn.channels()
    }

    /// Appends its four tensors named `{name}.weight`, ... to `out`.
    pub(crate) fn push_named_tensors(&self, name: &str, out: &mut crate::block::NamedTensors) {
        self.bn.push_named_tensors(name, out);
    }
}
