//! Squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation Networks", 2018) as timm's
//! ResNets use it (`SEModule`): each channel of a block's last BatchNorm output scaled by
//! `sigmoid(fc2(relu(fc1(mean(x)))))`, the two 1x1 convolutions with biases, the reduced
//! width `channels / 16` rounded to a multiple of 8 (at least 8).
//!
//! candle ops on any device and layout, differentiable: on the blocked CPU path it runs
//! on the `(N, C/16, H, W, 16)` map as it is (a mean over it and a broadcast multiply:
//! two passes over the block's output, no kernel of its own).

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

    /// `xs` scaled per channel: `(N, C, H, W)`, or blocked `(N, C/16, H, W, 16)`.
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, channels) = (xs.dim(0)?, self.fc2_bias.elem_count());
        // The mean over the spatial dimensions, channel order kept in both layouts.
        let pooled = match xs.rank() {
            5 => xs.mean_keepdim(2)?.mean_keepdim(3)?,
            _ => xs.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?,
        };
        let pooled = pooled.reshape((batch, channels))?;
        let dense = |x: &Tensor, weight: &Tensor, bias: &Tensor| -> Result<Tensor> {
            let weight = weight.flatten_from(1)?.to_dtype(x.dtype())?;
            x.matmul(&weight.t()?)?
                .broadcast_add(&bias.to_dtype(x.dtype())?)
        };
        let hidden = dense(&pooled, &self.fc1_weight, &self.fc1_bias)?.relu()?;
        let gate = candle_nn::ops::sigmoid(&dense(&hidden, &self.fc2_weight, &self.fc2_bias)?)?;
        let gate = match xs.rank() {
            5 => gate.reshape((batch, channels / 16, 1, 1, 16))?,
            _ => gate.reshape((batch, channels, 1, 1))?,
        };
        xs.broadcast_mul(&gate)
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
