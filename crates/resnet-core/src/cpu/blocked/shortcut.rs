//! Option A's parameter-free shortcut on blocked activations.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::LANES;
use crate::cpu::storage::f32_input;

/// Option A's shortcut on blocked `(N, C/16, H, W, 16)` f32: `x[:, :, ::stride, ::stride]`
/// with `before` zero channels in front and `after` behind (any counts whose total
/// keeps the channels divisible by 16).
pub(crate) fn subsample_and_pad_channels(
    xs: &Tensor,
    stride: usize,
    before: usize,
    after: usize,
) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&ZeroPadShortcut {
        stride,
        before,
        after,
    })
}

struct ZeroPadShortcut {
    stride: usize,
    before: usize,
    after: usize,
}

impl CustomOp1 for ZeroPadShortcut {
    fn name(&self) -> &'static str {
        "blocked-zero-pad-shortcut"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = f32_input(storage, layout, "blocked shortcut")?;
        let (batch, in_blocks, height, width, lanes) = layout.shape().dims5()?;
        if lanes != LANES {
            bail!("blocked shortcut: input {:?}", layout.shape().dims());
        }
        let output = zero_pad_values(
            input,
            (batch, in_blocks, height, width),
            self.stride,
            (self.before, self.after),
        )?;
        let (out_h, out_w) = (height.div_ceil(self.stride), width.div_ceil(self.stride));
        let out_blocks = (in_blocks * LANES + self.before + self.after) / LANES;
        Ok((
            CpuStorage::F32(output),
            Shape::from((batch, out_blocks, out_h, out_w, LANES)),
        ))
    }
}

/// Option A's shortcut on blocked values `(N, C/16, H, W, 16)` (dims without the 16):
/// `x[:, :, ::stride, ::stride]` with `before` and `after` zero channels around it.
pub(crate) fn zero_pad_values(
    input: &[f32],
    (batch, in_blocks, height, width): (usize, usize, usize, usize),
    stride: usize,
    (before, after): (usize, usize),
) -> Result<Vec<f32>> {
    let c_in = in_blocks * LANES;
    let c_out = c_in + before + after;
    if stride == 0 || !c_out.is_multiple_of(LANES) || input.len() != batch * c_in * height * width {
        bail!(
            "blocked shortcut: stride {stride}, {before} + {after} channels on {:?}",
            (batch, in_blocks, height, width, LANES)
        );
    }
    let s = stride;
    let (out_h, out_w, out_blocks) = (height.div_ceil(s), width.div_ceil(s), c_out / LANES);
    let out_plane = out_h * out_w * LANES;
    let mut output = vec![0.0f32; batch * out_blocks * out_plane];
    output
        .par_chunks_mut(out_plane)
        .enumerate()
        .for_each(|(index, plane)| {
            let (b, ob) = (index / out_blocks, index % out_blocks);
            for lane in 0..LANES {
                // Output channel ob·16 + lane is input channel c - before, if any.
                let Some(c) = (ob * LANES + lane).checked_sub(before) else {
                    continue;
                };
                if c >= c_in {
                    continue;
                }
                let src_plane = (b * in_blocks + c / LANES) * height * width * LANES;
                for oy in 0..out_h {
                    for ox in 0..out_w {
                        let src = src_plane + ((oy * s) * width + ox * s) * LANES + c % LANES;
                        plane[(oy * out_w + ox) * LANES + lane] = input[src];
                    }
                }
            }
        });
    Ok(output)
}

/// The adjoint of [`zero_pad_values`]: adds the output gradient `grad` of each value the
/// shortcut copied to the input gradient `dx` (blocked, dims of the input).
pub(crate) fn zero_pad_adjoint_add(
    grad: &[f32],
    dx: &mut [f32],
    (batch, in_blocks, height, width): (usize, usize, usize, usize),
    stride: usize,
    before: usize,
) {
    let s = stride.max(1);
    let (out_h, out_w) = (height.div_ceil(s), width.div_ceil(s));
    let out_blocks = grad.len() / (batch * out_h * out_w * LANES).max(1);
    let in_plane = height * width * LANES;
    dx.par_chunks_mut(in_plane)
        .enumerate()
        .for_each(|(index, plane)| {
            let (b, ib) = (index / in_blocks, index % in_blocks);
            for lane in 0..LANES {
                let c = ib * LANES + lane + before;
                if c >= out_blocks * LANES {
                    continue;
                }
                let src_plane = (b * out_blocks + c / LANES) * out_h * out_w * LANES;
                for oy in 0..out_h {
                    for ox in 0..out_w {
                        let src = src_plane + (oy * out_w + ox) * LANES + c % LANES;
                        plane[((oy * s) * width + ox * s) * LANES + lane] += grad[src];
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::blocked::layout::{from_blocked, test_values as values, to_blocked};
    use candle_core::{Device, D};

    #[test]
    fn zero_pad_shortcut_matches_plain_one() -> Result<()> {
        let device = Device::Cpu;
        for (channels, stride, before, after, size) in [
            (16, 2, 8, 8, 7),
            (32, 2, 16, 16, 8),
            (16, 1, 0, 16, 5),
            (32, 1, 5, 11, 3),
        ] {
            let x = Tensor::from_vec(
                values(2 * channels * size * size, 3),
                (2, channels, size, size),
                &device,
            )?;
            let expected = x
                .avg_pool2d_with_stride(1, stride)?
                .pad_with_zeros(1, before, after)?;
            let got = from_blocked(&subsample_and_pad_channels(
                &to_blocked(&x)?,
                stride,
                before,
                after,
            )?)?;
            assert_eq!(got.dims(), expected.dims());
            let difference = (got - expected)?.abs()?.flatten_all()?.max(D::Minus1)?;
            assert_eq!(difference.to_scalar::<f32>()?, 0.0);
        }
        Ok(())
    }
}
