//! Squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation Networks", 2018) as timm's
//! ResNets use it (`SEModule`): each channel of a block's last BatchNorm output scaled by
//! `sigmoid(fc2(relu(fc1(mean(x)))))`, the two 1x1 convolutions with biases, the reduced
//! width `channels / 16` rounded to a multiple of 8 (at least 8).
//!
//! candle ops on any device, differentiable; on the blocked CPU path two one-pass kernels
//! (the channel means; the gate with the residual add and ReLU) around the two small
//! dense layers.

use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::block::NamedTensors;

/// One squeeze-and-excitation gate (`se.fc1`, `se.fc2`).
#[derive(Debug, Clone)]
pub struct SqueezeExcite {
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
}

impl SqueezeExcite {
    /// Multiply-adds of its two layers (on the pooled vector).
    pub(crate) fn multiply_adds(&self) -> u64 {
        (self.fc1_weight.elem_count() + self.fc2_weight.elem_count()) as u64
    }

    /// timm's reduced width for `channels`: `make_divisible(channels / 16, 8)`.
    pub fn reduced_channels(channels: usize) -> usize {
        (((channels as f64 / 16.0 + 4.0) as usize) / 8 * 8).max(8)
    }

    /// Reads `fc1` and `fc2` of a gate over `channels` channels from `vb` (`...se`).
    pub(crate) fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let reduced = Self::reduced_channels(channels);
        let conv = |vb: VarBuilder, out: usize, inp: usize| -> Result<(Tensor, Tensor)> {
            let bound = 1.0 / (inp as f64).sqrt();
            let init = Init::Uniform {
                lo: -bound,
                up: bound,
            };
            Ok((
                vb.get_with_hints((out, inp, 1, 1), "weight", init)?,
                vb.get_with_hints(out, "bias", init)?,
            ))
        };
        let (fc1_weight, fc1_bias) = conv(vb.pp("fc1"), reduced, channels)?;
        let (fc2_weight, fc2_bias) = conv(vb.pp("fc2"), channels, reduced)?;
        Ok(Self {
            fc1_weight,
            fc1_bias,
            fc2_weight,
            fc2_bias,
        })
    }

    /// `relu(xs · gate(xs) + residual)`: the gate, then the block's residual add and
    /// ReLU. `(N, C, H, W)` through candle ops (any device, differentiable), or blocked
    /// `(N, C/16, H, W, 16)` on the CPU through two one-pass kernels.
    pub(crate) fn forward_add_relu(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if xs.rank() == 5 {
            let gate = self.gate(&crate::cpu::blocked::channel_means(xs)?)?;
            return crate::cpu::blocked::scale_add_relu(xs, &gate, residual);
        }
        let (batch, channels) = (xs.dim(0)?, self.fc2_bias.elem_count());
        let pooled = xs.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
        let gate = self.gate(&pooled.reshape((batch, channels))?)?;
        (xs.broadcast_mul(&gate.reshape((batch, channels, 1, 1))?)? + residual)?.relu()
    }

    /// `sigmoid(fc2(relu(fc1(pooled))))` for the channel means `(N, C)`.
    fn gate(&self, pooled: &Tensor) -> Result<Tensor> {
        let dense = |x: &Tensor, weight: &Tensor, bias: &Tensor| -> Result<Tensor> {
            let weight = weight.flatten_from(1)?.to_dtype(x.dtype())?;
            x.matmul(&weight.t()?)?
                .broadcast_add(&bias.to_dtype(x.dtype())?)
        };
        let hidden = dense(pooled, &self.fc1_weight, &self.fc1_bias)?.relu()?;
        candle_nn::ops::sigmoid(&dense(&hidden, &self.fc2_weight, &self.fc2_bias)?)
    }

    pub(crate) fn parameter_count(&self) -> usize {
        [
            &self.fc1_weight,
            &self.fc1_bias,
            &self.fc2_weight,
            &self.fc2_bias,
        ]
        .iter()
        .map(|t| t.elem_count())
        .sum()
    }

    pub(crate) fn push_named_tensors(&self, prefix: &str, out: &mut NamedTensors) {
        for (name, tensor) in [
            ("fc1.weight", &self.fc1_weight),
            ("fc1.bias", &self.fc1_bias),
            ("fc2.weight", &self.fc2_weight),
            ("fc2.bias", &self.fc2_bias),
        ] {
            out.push((format!("{prefix}.{name}"), tensor.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduced_widths_are_timms() {
        // timm: make_divisible(c / 16, 8, round_limit=0).
        for (channels, reduced) in [
            (64, 8),
            (256, 16),
            (512, 32),
            (1024, 64),
            (2048, 128),
            (100, 8),
        ] {
            assert_eq!(
                SqueezeExcite::reduced_channels(channels),
                reduced,
                "{channels}"
            );
        }
    }
}
