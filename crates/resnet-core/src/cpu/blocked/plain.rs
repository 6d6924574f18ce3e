//! The blocked kernels on plain `(N, C, H, W)` values: training's convolutions keep
//! candle's layout between ops, so each call blocks its input and unblocks its output
//! (two parallel passes, much less than the im2col the GEMM path copies).

use candle_core::{bail, Layout, Result, Shape};
use rayon::prelude::*;

use super::{direct, BlockedConv, LANES};
use crate::cpu::CpuIsa;

/// `conv(x, weight)` (no bias) on plain `(N, C, H, W)` values through the blocked
/// kernels, for training: the input is blocked, convolved (Winograd where it pays) and
/// the output unblocked, each a parallel pass. `None` where the blocked kernels do not
/// take the layer (channels not divisible by 16, groups), for the GEMM path.
pub(crate) fn convolve_plain(
    input: &[f32],
    (batch, c_in, height, width): (usize, usize, usize, usize),
    weight: &[f32],
    (c_out, group_in, kernel, kw): (usize, usize, usize, usize),
    (stride, padding, groups): (usize, usize, usize),
) -> Option<Result<Vec<f32>>> {
    if groups != 1
        || group_in != c_in
        || !c_in.is_multiple_of(LANES)
        || !c_out.is_multiple_of(LANES)
        || kernel != kw
        || height + 2 * padding < kernel
        || width + 2 * padding < kernel
    {
        return None;
    }
    Some(convolve_plain_checked(
        input,
        (batch, c_in, height, width),
        weight,
        (c_out, kernel),
        (stride, padding),
    ))
}

fn convolve_plain_checked(
    input: &[f32],
    (batch, c_in, height, width): (usize, usize, usize, usize),
    weight: &[f32],
    (c_out, kernel): (usize, usize),
    (stride, padding): (usize, usize),
) -> Result<Vec<f32>> {
    let plane = height * width;
    if input.len() != batch * c_in * plane {
        bail!(
            "blocked convolution: {} values for {:?}",
            input.len(),
            (batch, c_in, height, width)
        );
    }
    let blocked = to_blocked_values(input, None, plane);
    let (output, (out_h, out_w)) = convolve_blocked(
        &blocked,
        (batch, c_in, height, width),
        weight,
        (c_out, kernel),
        (stride, padding),
    )?;
    Ok(to_plain_values(&output, out_h * out_w))
}

/// `conv(x, weight)` (no bias, one group) on blocked `(N, C/16, H, W, 16)` values, by the
/// blocked kernels (Winograd where it pays): the blocked output and its height and width.
/// The caller has checked what [`convolve_plain`] checks.
pub(crate) fn convolve_blocked(
    input: &[f32],
    (batch, c_in, height, width): (usize, usize, usize, usize),
    weight: &[f32],
    (c_out, kernel): (usize, usize),
    (stride, padding): (usize, usize),
) -> Result<(Vec<f32>, (usize, usize))> {
    let isa = CpuIsa::from_env()?;
    let winograd =
        kernel == 3 && stride == 1 && padding == 1 && BlockedConv::winograd_pays(c_in, c_out);
    let conv = BlockedConv::from_folded(
        weight,
        &vec![1.0; c_out],
        (c_out, c_in, kernel, kernel),
        vec![0.0; c_out],
        (stride, padding, 1),
        (false, winograd, isa),
    )?;
    let in_shape = Shape::from((batch, c_in / LANES, height, width, LANES));
    let op = direct::BlockedOp {
        conv: &conv,
        residual: None,
        relu: false,
    };
    let (output, out_shape) = op.run(input, &Layout::contiguous(in_shape))?;
    let (_, _, out_h, out_w, _) = out_shape.dims5()?;
    Ok((output, (out_h, out_w)))
}

/// Plain `(N, C, H, W)` values in planes of `plane` pixels to blocked
/// `(N, C/16, H, W, 16)`, one parallel pass; with `open`, each value where `open`'s is
/// positive and zero elsewhere (a gradient through a ReLU with output `open`).
pub(crate) fn to_blocked_values(src: &[f32], open: Option<&[f32]>, plane: usize) -> Vec<f32> {
    let mut blocked = vec![0f32; src.len()];
    let chunk = LANES * plane;
    blocked
        .par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .enumerate()
        .for_each(|(index, (dst, src))| {
            let open = open.map(|open| &open[index * chunk..][..src.len()]);
            block_channels(src, open, dst, plane);
        });
    blocked
}

/// Blocked `(N, C/16, H, W, 16)` values in planes of `plane` pixels back to
/// `(N, C, H, W)`, one parallel pass.
pub(crate) fn to_plain_values(blocked: &[f32], plane: usize) -> Vec<f32> {
    let mut plain = vec![0f32; blocked.len()];
    plain
        .par_chunks_mut(LANES * plane)
        .zip(blocked.par_chunks(LANES * plane))
        .for_each(|(dst, src)| unblock_channels(src, dst, plane));
    plain
}

/// Pixels per tile of the layout passes: a tile's 16 x 16 values (1 KiB) stay in L1
/// while the strided side is written or read (whole-plane passes went through L2, 10%
/// of a ResNet-20 training step).
const TILE: usize = 16;

/// Sixteen channel planes `(16, plane)` (fewer at a short last block) to `(plane, 16)`,
/// masked by `open` as in [`to_blocked_values`].
fn block_channels(src: &[f32], open: Option<&[f32]>, dst: &mut [f32], plane: usize) {
    let lanes = src.len() / plane.max(1);
    for start in (0..plane).step_by(TILE) {
        let len = TILE.min(plane - start);
        let out = &mut dst[start * LANES..(start + len) * LANES];
        for lane in 0..lanes {
            let row = &src[lane * plane + start..][..len];
            let pixels = out.chunks_exact_mut(LANES).zip(row);
            match open {
                None => pixels.for_each(|(pixel, &v)| pixel[lane] = v),
                Some(open) => {
                    let open = &open[lane * plane + start..][..len];
                    for ((pixel, &v), &o) in pixels.zip(open) {
                        pixel[lane] = if o > 0.0 { v } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// `(plane, 16)` back to sixteen channel planes `(16, plane)`.
fn unblock_channels(src: &[f32], dst: &mut [f32], plane: usize) {
    let lanes = dst.len() / plane.max(1);
    for start in (0..plane).step_by(TILE) {
        let len = TILE.min(plane - start);
        let tile = &src[start * LANES..(start + len) * LANES];
        for lane in 0..lanes {
            let row = &mut dst[lane * plane + start..][..len];
            for (v, pixel) in row.iter_mut().zip(tile.chunks_exact(LANES)) {
                *v = pixel[lane];
            }
        }
    }
}
