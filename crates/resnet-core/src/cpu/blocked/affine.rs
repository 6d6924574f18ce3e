//! `relu(x · scale + shift)` per channel on blocked activations: a pre-activation block's
//! BatchNorm and ReLU (and such a network's final norm), one pass over the map.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::LANES;
use crate::cpu::storage::f32_input;

/// `relu(xs · scale + shift)` on blocked `(N, C/16, H, W, 16)` f32, `scale` and `shift`
/// of `C` values.
pub(crate) fn affine_relu(xs: &Tensor, scale: &[f32], shift: &[f32]) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op1_no_bwd(&AffineRelu { scale, shift })
}

struct AffineRelu<'a> {
    scale: &'a [f32],
    shift: &'a [f32],
}

impl CustomOp1 for AffineRelu<'_> {
    fn name(&self) -> &'static str {
        "blocked-affine-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_input(storage, layout, "blocked BatchNorm-ReLU")?;
        let (_, blocks, height, width, lanes) = layout.shape().dims5()?;
        let channels = blocks * LANES;
        if lanes != LANES || self.scale.len() != channels || self.shift.len() != channels {
            bail!(
                "blocked BatchNorm-ReLU of {} channels on {:?}",
                self.scale.len(),
                layout.shape().dims()
            );
        }
        let plane = height * width * LANES;
        let mut out = vec![0f32; xs.len()];
        if plane > 0 {
            out.par_chunks_mut(plane)
                .zip(xs.par_chunks(plane))
                .enumerate()
                .for_each(|(index, (out, xs))| {
                    let first = (index % blocks) * LANES;
                    let scale = &self.scale[first..first + LANES];
                    let shift = &self.shift[first..first + LANES];
                    for (out, xs) in out.chunks_exact_mut(LANES).zip(xs.chunks_exact(LANES)) {
                        for lane in 0..LANES {
                            out[lane] = (xs[lane] * scale[lane] + shift[lane]).max(0.0);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::blocked::layout::{from_blocked, to_blocked};
    use candle_core::{Device, D};

    #[test]
    fn matches_the_candle_composition() -> Result<()> {
        let device = Device::Cpu;
        let (n, c, h, w) = (2, 32, 5, 3);
        let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &device)?;
        let scale: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 / 16.0).collect();
        let shift: Vec<f32> = (0..c).map(|i| i as f32 / 32.0 - 0.5).collect();
        let expected = x
            .broadcast_mul(&Tensor::new(scale.as_slice(), &device)?.reshape((1, c, 1, 1))?)?
            .broadcast_add(&Tensor::new(shift.as_slice(), &device)?.reshape((1, c, 1, 1))?)?
            .relu()?;
        let got = from_blocked(&affine_relu(&to_blocked(&x)?, &scale, &shift)?)?;
        let difference = (got - expected)?.abs()?.flatten_all()?.max(D::Minus1)?;
        assert!(difference.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }
}
