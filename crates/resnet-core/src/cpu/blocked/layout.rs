//! The blocked activation layout `(N, C/16, H, W, 16)` and the packed weight order.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::LANES;

/// `(N, C, H, W)` to `(N, C/16, H, W, 16)` (the network starts blocked at the stem's
/// output; tests convert their inputs).
#[cfg(test)]
pub(crate) fn to_blocked(xs: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    if !c.is_multiple_of(LANES) {
        candle_core::bail!("blocked layout needs channels divisible by {LANES}, found {c}");
    }
    xs.reshape((n, c / LANES, LANES, h, w))?
        .permute((0, 1, 3, 4, 2))?
        .contiguous()
}

/// `(N, C/16, H, W, 16)` to `(N, C, H, W)`.
pub(crate) fn from_blocked(xs: &Tensor) -> Result<Tensor> {
    let (n, blocks, h, w, lanes) = xs.dims5()?;
    xs.permute((0, 1, 4, 2, 3))?
        .contiguous()?
        .reshape((n, blocks * lanes, h, w))
}

/// For each element of the packed weight, in order, its index in the `(c_out, c_in, k, k)`
/// weight: `[c_out / (16·call_blocks)][c_in / in_lanes][ky][kx][in_lanes][16·call_blocks out]`.
pub(crate) fn packed_order(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    call_blocks: usize,
    in_lanes: usize,
) -> impl Iterator<Item = usize> {
    let (width, taps) = (LANES * call_blocks, kernel * kernel);
    (0..c_out / width).flat_map(move |g| {
        (0..c_in / in_lanes).flat_map(move |icb| {
            (0..taps).flat_map(move |tap| {
                (0..in_lanes).flat_map(move |ic| {
                    (0..width).map(move |o| {
                        let (oc, ci) = (g * width + o, icb * in_lanes + ic);
                        (oc * c_in + ci) * taps + tap
                    })
                })
            })
        })
    })
}

/// `source`, one block group's `(c_out, c_in, k, k)` weight, each output channel's
/// weights times its `scale`, into `packed` in [`packed_order`]'s order: loops, a
/// parallel task per kernel call's output channels. (Through the iterator, 13-22 ms for a
/// 1M-weight layer: training repacks every layer at every step.)
pub(crate) fn pack_weights(
    source: &[f32],
    scale: &[f32],
    (c_in, c_out, kernel): (usize, usize, usize),
    (call_blocks, in_lanes): (usize, usize),
    packed: &mut [f32],
) {
    let (width, taps) = (LANES * call_blocks, kernel * kernel);
    packed
        .par_chunks_mut((width * c_in * taps).max(1))
        .enumerate()
        .for_each(|(g, packed)| {
            let mut values = packed.iter_mut();
            for icb in 0..c_in / in_lanes {
                for tap in 0..taps {
                    for ci in icb * in_lanes..(icb + 1) * in_lanes {
                        for oc in g * width..(g + 1) * width {
                            if let Some(value) = values.next() {
                                *value = source[(oc * c_in + ci) * taps + tap] * scale[oc];
                            }
                        }
                    }
                }
            }
        });
    debug_assert!(packed.len() == c_out * c_in * taps);
}

/// Where each packed weight of a grouped layer with groups of `group` channels (fewer
/// than a block's, in and out) comes from in its `(c_out, group, k, k)` weight: per
/// output block `[tap][rotation d][lane i]`, the weight by which input channel `i`
/// reaches the output channel of its group that reads it at rotation `d`,
/// `i - i % group + (i % group - d) mod group` (see `conv_tile_rotated`).
pub(crate) fn rotated_order(
    c_out: usize,
    group: usize,
    kernel: usize,
) -> impl Iterator<Item = usize> {
    let taps = kernel * kernel;
    (0..c_out / LANES).flat_map(move |block| {
        (0..taps).flat_map(move |tap| {
            (0..group).flat_map(move |d| {
                (0..LANES).map(move |i| {
                    let oc = block * LANES + i - i % group + (i % group + group - d) % group;
                    (oc * group + i % group) * taps + tap
                })
            })
        })
    })
}

/// Pseudo-random values in [-1, 1) from an integer hash: the blocked kernels' tests'
/// inputs, no RNG dependency.
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u64) -> Vec<f32> {
    (0..len as u64)
        .map(|i| {
            let mut x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 32;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}
