//! Direct convolution on channel-blocked activations (NCHW16c), with SIMD kernels for
//! AVX-512, AVX2 and NEON and a scalar fallback (`ukernel/`).
//!
//! Why: the im2col + GEMM path copies every input pixel k² times and lets the GEMM
//! library repack the weights on every call; on ResNet-50 that held it at about 130
//! GFLOP/s on two cores. Here the activations between the stem and the head are laid out
//! `(N, C/16, H, W, 16)`: sixteen channels of one pixel fill one AVX-512 register (two
//! AVX2, four NEON registers). The weights are reordered once, when the network is
//! folded, so that the 16 (or 32) output channels of a step sit side by side. A kernel
//! call computes a row of output pixels x 16 or 32 output channels in registers, reading
//! the input in place (taps are address offsets, padding a zero border), and writes the
//! result with bias, residual and ReLU applied: no im2col, no packing, one pass over the
//! output.
//!
//! Files: `layout.rs` (the layouts), `direct.rs` (the driver), `winograd.rs` (3x3
//! stride-1 layers), `pool.rs`, `shortcut.rs` and `excite.rs` (the other blocked ops),
//! `ukernel/` (the kernels, per instruction set). Used when every convolution after the
//! stem has channel counts divisible by 16 and groups that fit whole blocks or divide
//! one (see [`BlockedConv::block_groups`]): every preset.
#![allow(unsafe_code)] // the kernels' entry points

use std::sync::Arc;

use candle_core::{bail, Result, Tensor};

use crate::cpu::CpuIsa;
use ukernel::Tiles;

mod affine;
mod direct;
mod excite;
mod layout;
mod plain;
mod pool;
mod shortcut;
mod ukernel;
pub(crate) mod winograd;

pub(crate) use affine::affine_relu;
pub(crate) use excite::{channel_means, scale_add_relu};
pub(crate) use layout::from_blocked;
#[cfg(test)]
pub(crate) use layout::to_blocked;
use layout::{pack_weights, packed_order, rotated_order};
pub(crate) use plain::{convolve_blocked, convolve_plain, to_blocked_values, to_plain_values};
pub(crate) use pool::{avg_pool_2x2_ceil, max_pool};
pub(crate) use shortcut::{subsample_and_pad_channels, zero_pad_adjoint_add, zero_pad_values};
pub(crate) use ukernel::GradTile;

/// Channels per block: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;
/// Largest `c_out · c_in` run by Winograd (512 x 512: every ResNet-50 3x3; wide
/// networks' last stages stay direct).
const WINOGRAD_MAX_PAIRS: usize = 512 * 512;

/// A folded convolution with its weights reordered for the blocked kernels.
#[derive(Debug)]
pub(crate) struct BlockedConv {
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// Output blocks per kernel call: 2 (32 channels) where the ISA's registers and
    /// the block groups allow, else 1.
    call_blocks: usize,
    /// The convolution's channel groups (ResNeXt), as in the checkpoint.
    groups: usize,
    /// Independent groups of whole channel blocks the kernels see: 1 for a dense
    /// convolution; a grouped one is dense within each (zero weights between its
    /// channel groups where a group is narrower than a block). See
    /// [`BlockedConv::block_groups`].
    block_groups: usize,
    /// Input channels per input block: 16 for blocked input, 1 for plain `(N, C, H, W)`
    /// input (the stem's image).
    in_lanes: usize,
    /// 3x3 stride 1 runs Winograd F(2x2, 3x3) (see [`winograd`]).
    winograd: bool,
    /// Groups narrower than a block (ResNeXt 32x4d's 4 and 8 channels): their width, the
    /// weights packed for `conv_tile_rotated` (only the layer's own products); else 0.
    rotations: usize,
    /// The instruction set its kernels run on; the packing follows its [`Tiles`].
    isa: CpuIsa,
    /// Per block group, `[its c_out / (16·call_blocks)][its c_in / in_lanes][ky][kx][in_lanes]
    /// [16·call_blocks out]`, or the Winograd-transformed weights.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl BlockedConv {
    /// `(out channels, in channels, kernel, stride, padding, groups)`.
    pub(crate) fn geometry(&self) -> [usize; 6] {
        [
            self.c_out,
            self.c_in,
            self.kernel,
            self.stride,
            self.padding,
            self.groups,
        ]
    }

    /// Whether a convolution of this shape can give blocked output (its input, if
    /// blocked, has channels divisible by 16 when the output has).
    pub fn supports(c_in: usize, c_out: usize, kernel: usize, groups: usize) -> bool {
        // A dense layer may read plain input (the stem); a grouped one needs blocks.
        let in_lanes = if groups == 1 { 1 } else { LANES };
        kernel >= 1 && Self::block_groups(c_in, c_out, groups, in_lanes).is_some()
    }

    /// How a convolution of `groups` channel groups runs on whole 16-channel blocks:
    /// as `n` independent dense convolutions of `c_in / n` to `c_out / n` channels.
    /// Dense: 1. Groups of whole blocks (ResNeXt's wider stages): one per group. Groups
    /// narrower than a block, as wide in as out and dividing 16 (ResNeXt 32x4d's 4 and
    /// 8 channels): one per output block, run by the rotating kernel
    /// (`conv_tile_rotated`: only the layer's own products, no zero weights between
    /// groups; ResNeXt-50's 56x56 layer 0.96 -> 0.33 ms, its 28x28 one 0.51 -> 0.25 ms,
    /// AVX-512) where the instruction set's table takes the group width, else as a dense
    /// block with zeros between the groups. Anything else: `None`, the GEMM path.
    pub fn block_groups(
        c_in: usize,
        c_out: usize,
        groups: usize,
        in_lanes: usize,
    ) -> Option<usize> {
        if groups == 0
            || !c_in.is_multiple_of(groups)
            || !c_out.is_multiple_of(groups)
            || !c_out.is_multiple_of(LANES)
            || !c_in.is_multiple_of(in_lanes)
        {
            return None;
        }
        let (group_in, group_out) = (c_in / groups, c_out / groups);
        if groups == 1 {
            Some(1)
        } else if in_lanes != LANES {
            None
        } else if group_in.is_multiple_of(LANES) && group_out.is_multiple_of(LANES) {
            Some(groups)
        } else if group_in == group_out && LANES.is_multiple_of(group_out) {
            Some(c_out / LANES)
        } else {
            None
        }
    }

    /// Reorders a folded `(c_out, c_in, k, k)` f32 weight and its bias. `plain_input`:
    /// the input is `(N, C, H, W)` (any C), else blocked (C divisible by 16).
    /// `winograd`: transform a 3x3 stride-1 convolution for Winograd F(2x2, 3x3).
    #[cfg(test)]
    pub fn new(
        weight: &Tensor,
        bias: &Tensor,
        (stride, padding, groups): (usize, usize, usize),
        plain_input: bool,
        winograd: bool,
        isa: CpuIsa,
    ) -> Result<Self> {
        let (c_out, ..) = weight.dims4()?;
        Self::from_folded(
            &weight.flatten_all()?.to_vec1::<f32>()?,
            &vec![1.0; c_out],
            weight.dims4()?,
            bias.to_vec1::<f32>()?,
            (stride, padding, groups),
            (plain_input, winograd, isa),
        )
    }

    /// [`BlockedConv::new`] from the unfolded weight's values, `(c_out, c_in / groups,
    /// k, k)`, and the BatchNorm's scale per output channel, multiplied in while
    /// reordering: no folded copy is ever made.
    pub fn from_folded(
        source: &[f32],
        scale: &[f32],
        (c_out, group_in, kernel, kw): (usize, usize, usize, usize),
        bias: Vec<f32>,
        (stride, padding, groups): (usize, usize, usize),
        (plain_input, winograd, isa): (bool, bool, CpuIsa),
    ) -> Result<Self> {
        let in_lanes = if plain_input { 1 } else { LANES };
        let c_in = group_in * groups.max(1);
        let block_groups = Self::block_groups(c_in, c_out, groups, in_lanes);
        let Some(block_groups) = block_groups.filter(|_| {
            kernel == kw
                && kernel >= 1
                && stride > 0
                && source.len() == c_out * group_in * kernel * kernel
                && scale.len() == c_out
        }) else {
            bail!(
                "blocked convolution: unsupported weight {:?} in {groups} groups",
                (c_out, group_in, kernel, kw)
            );
        };
        // Groups narrower than a block, as wide in as out: rotated within the block.
        // (Where the instruction set's table takes that group width: else dense blocks
        // with zeros between the groups.)
        let rotations = if groups > 1
            && group_in < LANES
            && group_in == c_out / groups
            && Tiles::of(isa).rotated.contains(&group_in)
        {
            group_in
        } else {
            0
        };
        // Per block group: dense, `(c_out, c_in / block_groups, k, k)` in all.
        let dense;
        let source = if groups == 1 || rotations > 0 {
            source
        } else {
            dense = densify(source, (c_out, c_in, kernel), groups, block_groups);
            &dense
        };
        let (bg_in, bg_out) = (c_in / block_groups, c_out / block_groups);
        let call_blocks = if rotations > 0 {
            1
        } else {
            Tiles::of(isa).call_blocks(bg_out, kernel)
        };
        if bias.len() != c_out {
            bail!(
                "blocked convolution: bias of {} for {c_out} channels",
                bias.len()
            );
        }
        let winograd = winograd
            && kernel == 3
            && stride == 1
            && padding == 1
            && !plain_input
            && block_groups == 1;
        let per_channel = bg_in * kernel * kernel;
        let per_block_group = bg_out * per_channel;
        let packed = if winograd {
            winograd::transform_weights(source, scale, c_out, c_in, call_blocks)
        } else if rotations > 0 {
            let per_channel = rotations * kernel * kernel;
            rotated_order(c_out, rotations, kernel)
                .map(|index| source[index] * scale[index / per_channel])
                .collect()
        } else {
            let mut packed = vec![0f32; block_groups * per_block_group];
            for (bg, packed) in packed.chunks_mut(per_block_group.max(1)).enumerate() {
                pack_weights(
                    &source[bg * per_block_group..][..per_block_group],
                    &scale[bg * bg_out..][..bg_out],
                    (bg_in, bg_out, kernel),
                    (call_blocks, in_lanes),
                    packed,
                );
            }
            packed
        };
        Ok(Self {
            c_in,
            c_out,
            kernel,
            stride,
            padding,
            call_blocks,
            groups,
            block_groups,
            in_lanes,
            winograd,
            rotations,
            isa,
            weight: packed,
            bias,
        })
    }

    /// The weight back in `(c_out, c_in / groups, k, k)` order, and the bias.
    pub fn unpack(&self) -> (Vec<f32>, Vec<f32>) {
        if self.winograd {
            let weight = winograd::untransform_weights(
                &self.weight,
                self.c_out,
                self.c_in,
                self.call_blocks,
            );
            return (weight, self.bias.clone());
        }
        if self.rotations > 0 {
            let mut grouped = vec![0.0; self.weight.len()];
            let order = rotated_order(self.c_out, self.rotations, self.kernel);
            for (&value, index) in self.weight.iter().zip(order) {
                grouped[index] = value;
            }
            return (grouped, self.bias.clone());
        }
        let (bg_in, bg_out) = (
            self.c_in / self.block_groups,
            self.c_out / self.block_groups,
        );
        let per_block_group = bg_out * bg_in * self.kernel * self.kernel;
        let mut dense = vec![0.0; self.weight.len()];
        for (bg, packed) in self.weight.chunks(per_block_group.max(1)).enumerate() {
            let order = packed_order(bg_in, bg_out, self.kernel, self.call_blocks, self.in_lanes);
            for (&value, index) in packed.iter().zip(order) {
                dense[bg * per_block_group + index] = value;
            }
        }
        if self.groups == 1 {
            return (dense, self.bias.clone());
        }
        let shape = (self.c_out, self.c_in, self.kernel);
        (
            sparsify(&dense, shape, self.groups, self.block_groups),
            self.bias.clone(),
        )
    }

    /// Whether Winograd pays for a 3x3 stride-1 convolution of these channels. With 16
    /// channels each transformed tile feeds too little arithmetic: measured on ResNet-20
    /// at batch 128, a 16-channel 32x32 layer takes 3.3-3.6 ms direct and 3.4-4.1 ms by
    /// Winograd, a 32-channel 16x16 layer 3.0-3.3 ms direct and 2.1-2.4 ms by Winograd.
    /// Its weights are 16/9 the size: not for the widest layers either.
    pub fn winograd_pays(c_in: usize, c_out: usize) -> bool {
        c_in.min(c_out) >= 32 && c_in * c_out <= WINOGRAD_MAX_PAIRS
    }

    /// Weight and bias elements.
    pub fn parameter_count(&self) -> usize {
        self.c_out * (self.c_in / self.groups) * self.kernel * self.kernel + self.bias.len()
    }

    /// `(c_out, c_in / groups, k, k)`, stride, padding and groups.
    pub fn shape(&self) -> ((usize, usize, usize, usize), usize, usize, usize) {
        (
            (
                self.c_out,
                self.c_in / self.groups,
                self.kernel,
                self.kernel,
            ),
            self.stride,
            self.padding,
            self.groups,
        )
    }

    /// Input blocks a kernel call reads, and how many block groups there are.
    fn block_group_shape(&self) -> (usize, usize) {
        (
            self.c_in / self.block_groups / self.in_lanes,
            self.block_groups,
        )
    }

    /// The instruction set its kernels run on.
    pub fn isa(&self) -> CpuIsa {
        self.isa
    }

    /// Whether it runs by Winograd.
    pub fn is_winograd(&self) -> bool {
        self.winograd
    }

    /// `relu(conv(xs) + bias + residual)` on blocked `xs`, residual and ReLU optional.
    pub fn forward(
        self: &Arc<Self>,
        xs: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let residual = residual.map(Tensor::contiguous).transpose()?;
        let op = direct::BlockedOp {
            conv: self,
            residual: residual.as_ref(),
            relu,
        };
        xs.contiguous()?.apply_op1_no_bwd(&op)
    }
}

/// For each output channel of a grouped weight `(c_out, c_in / groups, k, k)`: where its
/// row starts in that weight, where it goes in the dense weight of its block group
/// (`(c_out, c_in / block_groups, k, k)` in all, zero between channel groups), and its
/// length.
fn group_rows(
    (c_out, c_in, kernel): (usize, usize, usize),
    groups: usize,
    block_groups: usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let taps = kernel * kernel;
    let (group_in, group_out) = (c_in / groups, c_out / groups);
    let (bg_in, bg_out) = (c_in / block_groups, c_out / block_groups);
    (0..c_out).map(move |oc| {
        // The first input channel of oc's group, relative to its block group's.
        let first = (oc / group_out) * group_in - (oc / bg_out) * bg_in;
        (
            oc * group_in * taps,
            (oc * bg_in + first) * taps,
            group_in * taps,
        )
    })
}

/// A grouped weight as the dense weights of its block groups (see [`group_rows`]).
fn densify(
    source: &[f32],
    shape: (usize, usize, usize),
    groups: usize,
    block_groups: usize,
) -> Vec<f32> {
    let (c_out, c_in, kernel) = shape;
    let mut dense = vec![0.0; c_out * (c_in / block_groups) * kernel * kernel];
    for (sparse_at, dense_at, len) in group_rows(shape, groups, block_groups) {
        dense[dense_at..dense_at + len].copy_from_slice(&source[sparse_at..sparse_at + len]);
    }
    dense
}

/// The inverse of [`densify`].
fn sparsify(
    dense: &[f32],
    shape: (usize, usize, usize),
    groups: usize,
    block_groups: usize,
) -> Vec<f32> {
    let (c_out, c_in, kernel) = shape;
    let mut weight = vec![0.0; c_out * (c_in / groups) * kernel * kernel];
    for (sparse_at, dense_at, len) in group_rows(shape, groups, block_groups) {
        weight[sparse_at..sparse_at + len].copy_from_slice(&dense[dense_at..dense_at + len]);
    }
    weight
}

#[cfg(test)]
mod tests {
    use super::layout::test_values as values;
    use super::*;
    use crate::cpu::Isa;
    use candle_core::{DType, Device, D};

    /// Every instruction set this CPU has, the scalar one included.
    fn every_isa() -> Vec<CpuIsa> {
        Isa::ALL
            .into_iter()
            .filter_map(|isa| CpuIsa::select(isa).ok())
            .collect()
    }

    #[test]
    fn pack_and_unpack_are_inverse() -> Result<()> {
        for (c_out, plain_input, winograd) in [
            (16, false, false),
            (32, false, false),
            (48, false, false),
            (32, true, false),
            (16, false, true),
            (32, false, true),
        ] {
            let weight = values(c_out * 32 * 9, 1);
            let bias = values(c_out, 2);
            let tensor = Tensor::from_vec(weight.clone(), (c_out, 32, 3, 3), &Device::Cpu)?;
            for isa in every_isa() {
                let conv = BlockedConv::new(
                    &tensor,
                    &Tensor::new(bias.as_slice(), &Device::Cpu)?,
                    (1, 1, 1),
                    plain_input,
                    winograd,
                    isa,
                )?;
                let pairs =
                    c_out.is_multiple_of(32) && matches!(isa.isa(), Isa::Avx512 | Isa::Scalar);
                assert_eq!(conv.call_blocks, if pairs { 2 } else { 1 });
                assert_eq!(conv.winograd, winograd);
                assert_eq!(conv.parameter_count(), weight.len() + bias.len());
                let (unpacked, unpacked_bias) = conv.unpack();
                assert_eq!(unpacked_bias, bias);
                if winograd {
                    // Transformed and back: equal up to rounding.
                    for (a, b) in unpacked.iter().zip(&weight) {
                        assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
                    }
                } else {
                    assert_eq!(unpacked, weight);
                }
            }
        }
        Ok(())
    }

    /// A grouped weight survives packing: block groups of one block (ResNeXt 32x4d's
    /// 4-channel groups) and of two blocks (32-channel groups).
    #[test]
    fn grouped_pack_and_unpack_are_inverse() -> Result<()> {
        for (channels, groups) in [(128, 32), (256, 8), (64, 64)] {
            let weight = values(channels * (channels / groups) * 9, 5);
            let dims = (channels, channels / groups, 3, 3);
            let tensor = Tensor::from_vec(weight.clone(), dims, &Device::Cpu)?;
            let bias = Tensor::from_vec(values(channels, 6), channels, &Device::Cpu)?;
            for isa in every_isa() {
                let conv = BlockedConv::new(&tensor, &bias, (1, 1, groups), false, true, isa)?;
                assert!(!conv.winograd, "grouped layers run direct");
                assert_eq!(conv.parameter_count(), weight.len() + channels);
                assert_eq!(conv.shape().0, dims);
                assert_eq!(conv.unpack().0, weight, "{channels} in {groups} groups");
            }
        }
        Ok(())
    }

    /// Every kernel shape the network uses, odd widths (all pixel counts of a tile),
    /// one and two output blocks a call, residual and ReLU, against candle's own convolution.
    #[test]
    fn matches_candle_convolution() -> Result<()> {
        for isa in every_isa() {
            matches_candle_on(isa)?;
        }
        Ok(())
    }

    fn matches_candle_on(isa: CpuIsa) -> Result<()> {
        let device = Device::Cpu;
        let mut seed = 10;
        // Two read plain (N, C, H, W) input, as the stems do; the last four are grouped
        // (ResNeXt): groups of 4 and 8 channels inside a block, 1 channel (depthwise),
        // and 32 channels (two blocks a group).
        for (c_in, c_out, kernel, stride, padding, groups) in [
            (16usize, 32, 3, 1, 1, 1),
            (32, 16, 3, 1, 1, 1),
            (16, 16, 3, 1, 1, 1),
            (32, 16, 3, 2, 1, 1),
            (16, 48, 1, 1, 0, 1),
            (32, 64, 1, 2, 0, 1),
            (16, 32, 7, 2, 3, 1),
            (3, 64, 7, 2, 3, 1),
            (3, 16, 3, 1, 1, 1),
            (128, 128, 3, 1, 1, 32),
            (64, 64, 3, 2, 1, 8),
            (32, 32, 3, 1, 1, 32),
            (128, 128, 3, 1, 1, 4),
        ] {
            let plain_input = !c_in.is_multiple_of(LANES);
            let layout = |x: &Tensor| {
                if plain_input {
                    Ok(x.clone())
                } else {
                    to_blocked(x)
                }
            };
            for ((height, width), winograd) in [(1, 1), (5, 9), (9, 15), (16, 29)]
                .into_iter()
                .flat_map(|size| [(size, false), (size, true)])
            {
                if height + 2 * padding < kernel || width + 2 * padding < kernel {
                    continue;
                }
                seed += 1;
                let x = Tensor::from_vec(
                    values(2 * c_in * height * width, seed),
                    (2, c_in, height, width),
                    &device,
                )?;
                let w = Tensor::from_vec(
                    values(c_out * c_in / groups * kernel * kernel, seed + 100),
                    (c_out, c_in / groups, kernel, kernel),
                    &device,
                )?;
                let b = Tensor::from_vec(values(c_out, seed + 200), c_out, &device)?;
                let conv = x.conv2d(&w, padding, stride, 1, groups)?;
                let conv = conv.broadcast_add(&b.reshape((1, c_out, 1, 1))?)?;
                let residual =
                    Tensor::from_vec(values(conv.elem_count(), seed + 300), conv.dims(), &device)?;
                let expected = (&conv + &residual)?.relu()?;
                let blocked = Arc::new(BlockedConv::new(
                    &w,
                    &b,
                    (stride, padding, groups),
                    plain_input,
                    winograd,
                    isa,
                )?);
                let got = from_blocked(&blocked.forward(
                    &layout(&x)?,
                    Some(&to_blocked(&residual)?),
                    true,
                )?)?;
                let plain = from_blocked(&blocked.forward(&layout(&x)?, None, false)?)?;
                for (got, expected) in [(got, expected), (plain, conv)] {
                    let error = (got - &expected)?
                        .abs()?
                        .flatten_all()?
                        .max(D::Minus1)?
                        .to_scalar::<f32>()?;
                    let scale = expected
                        .abs()?
                        .flatten_all()?
                        .max(D::Minus1)?
                        .to_scalar::<f32>()?;
                    assert!(
                        error <= 1e-5 * scale.max(1.0),
                        "{isa:?} {c_in}->{c_out} k{kernel} s{stride} {height}x{width} winograd {winograd} groups {groups}: error {error}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The weight gradient's tile on every instruction set against the sum by
    /// definition (f64), over rectangles of several widths and strided input.
    #[test]
    fn grad_tile_matches_the_definition_on_every_isa() {
        for isa in every_isa() {
            for (rows, len, x_step) in [(1, 1, 16), (2, 5, 16), (3, 9, 32), (1, 7, 16)] {
                let (dz_row, x_row) = (len * LANES + 16, len * x_step + 48);
                let dz = values(rows * dz_row, 7);
                let x = values(rows * x_row, 8);
                let start = values(LANES * LANES, 9);
                let mut sums: [f32; LANES * LANES] = std::array::from_fn(|i| start[i]);
                let tile = GradTile {
                    dz: &dz,
                    x: &x,
                    rows,
                    len,
                    dz_row,
                    x_row,
                    x_step,
                };
                tile.accumulate(isa, &mut sums);
                for c in 0..LANES {
                    for o in 0..LANES {
                        let mut expected = start[c * LANES + o] as f64;
                        for r in 0..rows {
                            for i in 0..len {
                                expected += dz[r * dz_row + i * LANES + o] as f64
                                    * x[r * x_row + i * x_step + c] as f64;
                            }
                        }
                        let got = sums[c * LANES + o] as f64;
                        assert!(
                            (got - expected).abs() <= 1e-5 * expected.abs().max(1.0),
                            "{isa:?} {rows}x{len} step {x_step}: ({c}, {o}) {got} != {expected}"
                        );
                    }
                }
            }
        }
    }

    /// Every vector instruction set against the scalar kernels, the oracle, on every
    /// convolution shape of the presets (CIFAR and ImageNet stems, basic, bottleneck and
    /// wide stages, strided and projection layers), every output width from 1 to 29
    /// pixels, Winograd and direct, with and without residual and ReLU.
    #[test]
    fn every_isa_matches_the_scalar_oracle() -> Result<()> {
        let oracle = CpuIsa::select(Isa::Scalar)?;
        let shapes = [
            // (c_in, c_out, kernel, stride, padding)
            (3usize, 16usize, 3usize, 1usize, 1usize),
            (3, 64, 7, 2, 3),
            (16, 16, 3, 1, 1),
            (16, 32, 3, 2, 1),
            (32, 32, 3, 1, 1),
            (32, 64, 3, 2, 1),
            (64, 64, 3, 1, 1),
            (64, 128, 3, 2, 1),
            (128, 128, 3, 1, 1),
            (256, 256, 3, 1, 1),
            (512, 512, 3, 1, 1),
            (64, 256, 1, 1, 0),
            (256, 64, 1, 1, 0),
            (256, 512, 1, 2, 0),
            (512, 1024, 1, 2, 0),
            (2048, 512, 1, 1, 0),
        ];
        let device = Device::Cpu;
        for isa in every_isa().into_iter().filter(|isa| *isa != oracle) {
            for (seed, &(c_in, c_out, kernel, stride, padding)) in shapes.iter().enumerate() {
                let seed = seed as u64 * 1000;
                let plain_input = !c_in.is_multiple_of(LANES);
                let w = values(c_out * c_in * kernel * kernel, seed);
                let w = Tensor::from_vec(w, (c_out, c_in, kernel, kernel), &device)?;
                let b = Tensor::from_vec(values(c_out, seed + 1), c_out, &device)?;
                // Small layers: two rows (a stride-2 tap pattern), two images (one per
                // thread); large: one row of one image (the threads share its phases).
                let (batch, height) = if c_in * c_out <= 128 * 128 {
                    (2, 2)
                } else {
                    (1, 1)
                };
                let winograd_options: &[bool] = if kernel == 3 && stride == 1 && !plain_input {
                    &[false, true]
                } else {
                    &[false]
                };
                for &winograd in winograd_options {
                    let build = |isa| {
                        BlockedConv::new(&w, &b, (stride, padding, 1), plain_input, winograd, isa)
                            .map(Arc::new)
                    };
                    let (ours, reference) = (build(isa)?, build(oracle)?);
                    for width in 1..=29usize {
                        let x = values(batch * c_in * height * width, seed + width as u64);
                        let x = Tensor::from_vec(x, (batch, c_in, height, width), &device)?;
                        let x = if plain_input { x } else { to_blocked(&x)? };
                        let plain = reference.forward(&x, None, false)?;
                        let residual = Tensor::from_vec(
                            values(plain.elem_count(), seed + 500 + width as u64),
                            plain.dims(),
                            &device,
                        )?;
                        for (residual, relu) in [(None, false), (Some(&residual), true)] {
                            let expected = reference.forward(&x, residual, relu)?;
                            let got = ours.forward(&x, residual, relu)?;
                            let scale = expected.abs()?.flatten_all()?.max(D::Minus1)?;
                            let error = (got - &expected)?.abs()?.flatten_all()?.max(D::Minus1)?;
                            let (scale, error) =
                                (scale.to_scalar::<f32>()?, error.to_scalar::<f32>()?);
                            assert!(
                                error <= 1e-5 * scale.max(1.0),
                                "{isa:?} {c_in}->{c_out} k{kernel}/{stride} width {width} \
                                 winograd {winograd} residual+relu {relu}: error {error} of {scale}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_wrong_input() -> Result<()> {
        let device = Device::Cpu;
        let w = Tensor::zeros((32, 16, 3, 3), DType::F32, &device)?;
        let b = Tensor::zeros(32, DType::F32, &device)?;
        let isa = CpuIsa::best();
        let conv = Arc::new(BlockedConv::new(&w, &b, (1, 1, 1), false, false, isa)?);
        let wrong_channels = Tensor::zeros((1, 2, 4, 4, 16), DType::F32, &device)?;
        assert!(conv.forward(&wrong_channels, None, true).is_err());
        let x = Tensor::zeros((1, 1, 4, 4, 16), DType::F32, &device)?;
        let wrong_residual = Tensor::zeros((1, 2, 4, 5, 16), DType::F32, &device)?;
        assert!(conv.forward(&x, Some(&wrong_residual), true).is_err());
        assert!(BlockedConv::new(
            &Tensor::zeros((32, 8, 3, 3), DType::F32, &device)?,
            &b,
            (1, 1, 1),
            false,
            true,
            isa,
        )
        .is_err());
        Ok(())
    }
}
