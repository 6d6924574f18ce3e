//! Direct convolution on channel-blocked activations (NCHW16c), with AVX-512 kernels.
//!
//! Why: the im2col + GEMM path copies every input pixel k² times and lets the GEMM
//! library repack the weights on every call; on ResNet-50 that held it at about 130
//! GFLOP/s on two cores. Here the activations between the stem and the head are laid out
//! `(N, C/16, H, W, 16)`: sixteen channels of one pixel fill one 512-bit register. The
//! weights are reordered once, when the network is folded, so that the 16 (or 32)
//! output channels of a step sit side by side. A kernel call computes up to 14 output
//! pixels x 32 output channels in 28 registers, reading the input in place (taps are
//! address offsets, padding a zero border), and writes the result with bias, residual
//! and ReLU applied: no im2col, no packing, one pass over the output.
//!
//! Used when the CPU has AVX-512F and every convolution after the stem has channel counts
//! divisible by 16 and no groups (the ResNet and wide ResNet presets; ResNeXt runs the
//! GEMM path).
#![allow(unsafe_code)] // SIMD intrinsics over raw pointers into checked buffers

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::cpu::gemm_conv::{cpu_data, f32_input, for_each_task, Shared};
use rayon::prelude::*;

/// Channels per block: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;
/// Most output pixels one kernel call computes (2 x 14 accumulators + 2 weight vectors
/// + 1 broadcast fit the 32 vector registers).
pub(crate) const MAX_PIXELS: usize = 14;
/// Largest `c_out · c_in` run by Winograd (512 x 512: every ResNet-50 3x3; wide
/// networks' last stages stay direct).
const WINOGRAD_MAX_PAIRS: usize = 512 * 512;

/// Whether this CPU runs the blocked kernels.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `(N, C, H, W)` to `(N, C/16, H, W, 16)` (the network starts blocked at the stem's
/// output; tests convert their inputs).
#[cfg(test)]
fn to_blocked(xs: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    if !c.is_multiple_of(LANES) {
        bail!("blocked layout needs channels divisible by {LANES}, found {c}");
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

/// A folded convolution with its weights reordered for the blocked kernels.
#[derive(Debug)]
pub(crate) struct BlockedConv {
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// Output blocks per kernel call: 2 (32 channels) when `c_out` allows, else 1.
    group: usize,
    /// Input channels per input block: 16 for blocked input, 1 for plain `(N, C, H, W)`
    /// input (the stem's image).
    in_lanes: usize,
    /// 3x3 stride 1 runs Winograd F(2x2, 3x3) (see [`crate::cpu::winograd`]).
    winograd: bool,
    /// `[c_out / (16·group)][c_in / in_lanes][ky][kx][in_lanes][16·group out]`, or the
    /// Winograd-transformed weights.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl BlockedConv {
    /// Whether a convolution of this shape can give blocked output (its input, if
    /// blocked, has channels divisible by 16 when the output has).
    pub fn supports(c_out: usize, kernel: usize, groups: usize) -> bool {
        groups == 1 && c_out.is_multiple_of(LANES) && kernel >= 1
    }

    /// Reorders a folded `(c_out, c_in, k, k)` f32 weight and its bias. `plain_input`:
    /// the input is `(N, C, H, W)` (any C), else blocked (C divisible by 16).
    /// `winograd`: transform a 3x3 stride-1 convolution for Winograd F(2x2, 3x3).
    #[cfg(test)]
    pub fn new(
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: usize,
        plain_input: bool,
        winograd: bool,
    ) -> Result<Self> {
        let (c_out, ..) = weight.dims4()?;
        Self::from_folded(
            &weight.flatten_all()?.to_vec1::<f32>()?,
            &vec![1.0; c_out],
            weight.dims4()?,
            bias.to_vec1::<f32>()?,
            (stride, padding),
            plain_input,
            winograd,
        )
    }

    /// [`BlockedConv::new`] from the unfolded weight's values, `(c_out, c_in, k, k)`,
    /// and the BatchNorm's scale per output channel, multiplied in while reordering: no
    /// folded copy is ever made.
    pub fn from_folded(
        source: &[f32],
        scale: &[f32],
        (c_out, c_in, kernel, kw): (usize, usize, usize, usize),
        bias: Vec<f32>,
        (stride, padding): (usize, usize),
        plain_input: bool,
        winograd: bool,
    ) -> Result<Self> {
        let in_lanes = if plain_input { 1 } else { LANES };
        if kernel != kw
            || !Self::supports(c_out, kernel, 1)
            || !c_in.is_multiple_of(in_lanes)
            || stride == 0
            || source.len() != c_out * c_in * kernel * kernel
            || scale.len() != c_out
        {
            bail!(
                "blocked convolution: unsupported weight {:?}",
                (c_out, c_in, kernel, kw)
            );
        }
        let group = if c_out.is_multiple_of(2 * LANES) {
            2
        } else {
            1
        };
        if bias.len() != c_out {
            bail!(
                "blocked convolution: bias of {} for {c_out} channels",
                bias.len()
            );
        }
        let winograd = winograd && kernel == 3 && stride == 1 && padding == 1 && !plain_input;
        let per_channel = c_in * kernel * kernel;
        let packed = if winograd {
            crate::cpu::winograd::transform_weights(source, scale, c_out, c_in, group)
        } else {
            packed_order(c_in, c_out, kernel, group, in_lanes)
                .map(|index| source[index] * scale[index / per_channel])
                .collect()
        };
        Ok(Self {
            c_in,
            c_out,
            kernel,
            stride,
            padding,
            group,
            in_lanes,
            winograd,
            weight: packed,
            bias,
        })
    }

    /// The weight back in `(c_out, c_in, k, k)` order, and the bias.
    pub fn unpack(&self) -> (Vec<f32>, Vec<f32>) {
        if self.winograd {
            let weight = crate::cpu::winograd::untransform_weights(
                &self.weight,
                self.c_out,
                self.c_in,
                self.group,
            );
            return (weight, self.bias.clone());
        }
        let mut weight = vec![0.0; self.weight.len()];
        let order = packed_order(
            self.c_in,
            self.c_out,
            self.kernel,
            self.group,
            self.in_lanes,
        );
        for (&value, index) in self.weight.iter().zip(order) {
            weight[index] = value;
        }
        (weight, self.bias.clone())
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
        self.c_out * self.c_in * self.kernel * self.kernel + self.bias.len()
    }

    /// `(c_out, c_in, k, k)`, stride and padding.
    pub fn shape(&self) -> ((usize, usize, usize, usize), usize, usize) {
        (
            (self.c_out, self.c_in, self.kernel, self.kernel),
            self.stride,
            self.padding,
        )
    }

    /// `relu(conv(xs) + bias + residual)` on blocked `xs`, residual and ReLU optional.
    pub fn forward(
        self: &Arc<Self>,
        xs: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let residual = residual.map(Tensor::contiguous).transpose()?;
        let op = BlockedOp {
            conv: self,
            residual: residual.as_ref(),
            relu,
        };
        xs.contiguous()?.apply_op1_no_bwd(&op)
    }
}

/// For each element of the packed weight, in order, its index in the `(c_out, c_in, k, k)`
/// weight: `[c_out / (16·group)][c_in / in_lanes][ky][kx][in_lanes][16·group out]`.
pub(crate) fn packed_order(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    group: usize,
    in_lanes: usize,
) -> impl Iterator<Item = usize> {
    let (width, taps) = (LANES * group, kernel * kernel);
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

/// Max pooling (PyTorch's: padding never wins) on blocked `(N, C/16, H, W, 16)` f32.
pub(crate) fn max_pool(
    xs: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&MaxPool {
        kernel,
        stride,
        padding,
    })
}

struct MaxPool {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "blocked-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = f32_input(storage, layout, "blocked max pool")?;
        let (batch, blocks, height, width, lanes) = layout.shape().dims5()?;
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if lanes != LANES || k == 0 || s == 0 || p >= k || height + 2 * p < k || width + 2 * p < k {
            bail!(
                "blocked max pool: {k}x{k}/{s} pad {p} on {:?}",
                layout.shape().dims()
            );
        }
        let out_h = (height + 2 * p - k) / s + 1;
        let out_w = (width + 2 * p - k) / s + 1;
        let mut output = vec![0.0f32; batch * blocks * out_h * out_w * LANES];
        output
            .par_chunks_mut(out_h * out_w * LANES)
            .zip(input.par_chunks(height * width * LANES))
            .for_each(|(dst, src)| {
                for oy in 0..out_h {
                    // The window's rows and columns inside the image.
                    let rows = (oy * s).saturating_sub(p)..(oy * s + k - p).min(height);
                    for ox in 0..out_w {
                        let cols = (ox * s).saturating_sub(p)..(ox * s + k - p).min(width);
                        let mut max = [f32::NEG_INFINITY; LANES];
                        for y in rows.clone() {
                            for x in cols.clone() {
                                let at = (y * width + x) * LANES;
                                for (m, &v) in max.iter_mut().zip(&src[at..at + LANES]) {
                                    *m = m.max(v);
                                }
                            }
                        }
                        let at = (oy * out_w + ox) * LANES;
                        dst[at..at + LANES].copy_from_slice(&max);
                    }
                }
            });
        Ok((
            CpuStorage::F32(output),
            Shape::from((batch, blocks, out_h, out_w, LANES)),
        ))
    }
}

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
        let (s, before) = (self.stride, self.before);
        let c_in = in_blocks * LANES;
        let c_out = c_in + before + self.after;
        if lanes != LANES || s == 0 || !c_out.is_multiple_of(LANES) {
            bail!(
                "blocked shortcut: stride {s}, {before} + {} channels on {:?}",
                self.after,
                layout.shape().dims()
            );
        }
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
        Ok((
            CpuStorage::F32(output),
            Shape::from((batch, out_blocks, out_h, out_w, LANES)),
        ))
    }
}

struct BlockedOp<'a> {
    conv: &'a BlockedConv,
    residual: Option<&'a Tensor>,
    relu: bool,
}

/// What every kernel call of one convolution shares.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the x86-64 kernel reads it all
pub(crate) struct KernelArgs {
    pub in_blocks: usize,
    /// Channels per input block, also the elements between adjacent input pixels.
    pub in_lanes: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Elements between input channel blocks, rows and pixels (padded input).
    pub in_block_stride: usize,
    pub in_row_stride: usize,
    /// Elements between output channel blocks.
    pub out_block_stride: usize,
    pub relu: bool,
}

thread_local! {
    /// See `BlockedOp::cpu_fwd`.
    static PADDED_INPUT: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl CustomOp1 for BlockedOp<'_> {
    fn name(&self) -> &'static str {
        "blocked-conv2d-bias-residual-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let conv = self.conv;
        let input = f32_input(storage, layout, "blocked convolution")?;
        let in_lanes = conv.in_lanes;
        let (batch, in_blocks, height, width, lanes) = if in_lanes == 1 {
            let (batch, channels, height, width) = layout.shape().dims4()?;
            (batch, channels, height, width, 1)
        } else {
            layout.shape().dims5()?
        };
        if lanes != in_lanes || in_blocks * in_lanes != conv.c_in {
            bail!(
                "blocked convolution: input {:?} for {} channels",
                layout.shape().dims(),
                conv.c_in
            );
        }
        let (k, s, p) = (conv.kernel, conv.stride, conv.padding);
        if height + 2 * p < k || width + 2 * p < k {
            bail!("blocked convolution: input {height}x{width} smaller than the kernel");
        }
        let out_h = (height + 2 * p - k) / s + 1;
        let out_w = (width + 2 * p - k) / s + 1;
        let out_blocks = conv.c_out / LANES;
        let out_shape = (batch, out_blocks, out_h, out_w, LANES);

        let residual_guard = self.residual.map(|r| r.storage_and_layout());
        let residual = match &residual_guard {
            Some((storage, layout)) => {
                if layout.shape().dims() != [batch, out_blocks, out_h, out_w, LANES] {
                    bail!(
                        "blocked convolution: residual {:?}, expected {:?}",
                        layout.shape().dims(),
                        out_shape
                    );
                }
                Some(cpu_data::<f32>(storage, layout)?)
            }
            None => None,
        };

        if conv.winograd {
            let geometry = crate::cpu::winograd::Geometry {
                batch,
                in_blocks,
                out_blocks,
                height,
                width,
                group: conv.group,
            };
            let layer = crate::cpu::winograd::Layer {
                input,
                weight: &conv.weight,
                bias: &conv.bias,
                residual,
                relu: self.relu,
            };
            let output = crate::cpu::winograd::convolve(geometry, layer);
            return Ok((CpuStorage::F32(output), Shape::from(out_shape)));
        }

        // A zero border instead of bounds checks in the kernel.
        let (padded_h, padded_w) = (height + 2 * p, width + 2 * p);
        // The calling thread's padded-input buffer, reused across convolutions: no
        // allocation and zeroing of megabytes per call (taken, so that a re-entrant call
        // simply allocates its own).
        let mut padded_storage = if p == 0 {
            Vec::new()
        } else {
            PADDED_INPUT.take()
        };
        let padded: &[f32] = if p == 0 {
            input
        } else {
            let (row, padded_row) = (width * in_lanes, padded_w * in_lanes);
            let plane = padded_h * padded_row;
            let len = batch * in_blocks * plane;
            if padded_storage.len() < len {
                padded_storage.resize(len, 0.0);
            }
            padded_storage[..len]
                .par_chunks_mut(plane)
                .zip(input.par_chunks(height * row))
                .for_each(|(dst, src)| {
                    let border = p * in_lanes;
                    let (top, rest) = dst.split_at_mut(p * padded_row);
                    let (middle, bottom) = rest.split_at_mut(height * padded_row);
                    top.fill(0.0);
                    bottom.fill(0.0);
                    for (dst_row, src_row) in middle.chunks_mut(padded_row).zip(src.chunks(row)) {
                        dst_row[..border].fill(0.0);
                        dst_row[border..border + row].copy_from_slice(src_row);
                        dst_row[border + row..].fill(0.0);
                    }
                });
            &padded_storage[..len]
        };

        let args = KernelArgs {
            in_blocks,
            in_lanes,
            kernel: k,
            stride: s,
            in_block_stride: padded_h * padded_w * in_lanes,
            in_row_stride: padded_w * in_lanes,
            out_block_stride: out_h * out_w * LANES,
            relu: self.relu,
        };
        let image_in = in_blocks * args.in_block_stride;
        let image_out = out_blocks * args.out_block_stride;
        let group = conv.group;
        let groups = out_blocks / group;
        let group_weights = conv.weight.len() / groups;
        // Output pixels of a row in near-equal tiles of at most MAX_PIXELS.
        let tiles = out_w.div_ceil(MAX_PIXELS);

        // Written in full by the tasks below before it is read.
        let mut output: Vec<f32> = Vec::with_capacity(batch * image_out);
        let out_ptr = Shared(output.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        // One task per (image, output row, output-channel group). Weights that fit in
        // L2 (up to 1 MiB) stay there while consecutive tasks take every group of one
        // row, whose input rows are then read once, from L1; larger weights go group by
        // group, each group's weights reused over all rows and images.
        let weights_outer = conv.weight.len() * std::mem::size_of::<f32>() > 1 << 20;
        let task = |index: usize| {
            let (b, oy, g) = if weights_outer {
                let oy = index % out_h;
                ((index / out_h) % batch, oy, index / (out_h * batch))
            } else {
                let g = index % groups;
                (index / (groups * out_h), (index / groups) % out_h, g)
            };
            let mut ox = 0;
            for t in 0..tiles {
                let pixels = (out_w - ox) / (tiles - t);
                let in_at = b * image_in + (oy * s * padded_w + ox * s) * in_lanes;
                let out_at =
                    b * image_out + g * group * args.out_block_stride + (oy * out_w + ox) * LANES;
                let tile = Tile {
                    input: &padded[in_at..],
                    weight: &conv.weight[g * group_weights..(g + 1) * group_weights],
                    bias: &conv.bias[g * group * LANES..(g + 1) * group * LANES],
                    residual: residual.map(|r| &r[out_at..]),
                    pixels,
                    group,
                };
                // SAFETY: tasks write disjoint (image, group, row, pixels) parts of
                // `output`, which outlives the parallel loop.
                unsafe { tile.run(&args, out_ptr.get().add(out_at)) };
                ox += pixels;
            }
        };
        let tasks = batch * groups * out_h;
        // Rows run in runs of at least ~64K multiply-adds: a CIFAR stem row (32 pixels
        // x 16 channels x 27) is a microsecond of work, less than handing it to a thread.
        let row_work = out_w * group * LANES * conv.c_in * k * k;
        let rows_per_job = (64 * 1024usize).div_ceil(row_work.max(1));
        let parallel = candle_core::utils::get_num_threads() > 1;
        for_each_task(tasks, parallel, rows_per_job, task);
        // SAFETY: the tasks covered every (image, group, row, pixel), each writing all
        // 16·group channels: all `batch * image_out` elements are initialised.
        unsafe { output.set_len(batch * image_out) };
        if p > 0 {
            PADDED_INPUT.set(padded_storage);
        }
        Ok((CpuStorage::F32(output), Shape::from(out_shape)))
    }
}

/// One kernel call: `pixels` output pixels of one row x `group` output blocks.
pub(crate) struct Tile<'a> {
    /// The padded input from the tile's top-left tap on.
    pub input: &'a [f32],
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub pixels: usize,
    pub group: usize,
}

impl Tile<'_> {
    /// # Safety
    /// `out` must be valid for this tile's writes (`group` blocks of `pixels` pixels
    /// at `args.out_block_stride`), and the CPU must have AVX-512F.
    pub unsafe fn run(&self, args: &KernelArgs, out: *mut f32) {
        // The reads the kernel makes, checked once here rather than per load.
        let k = args.kernel;
        let last_pixel = (self.pixels - 1) * args.stride;
        let input_end = (args.in_blocks - 1) * args.in_block_stride
            + (k - 1) * args.in_row_stride
            + (last_pixel + k) * args.in_lanes;
        let out_span = (self.group - 1) * args.out_block_stride + self.pixels * LANES;
        assert!(self.input.len() >= input_end, "blocked kernel input bounds");
        assert!(
            self.weight.len() == args.in_blocks * k * k * args.in_lanes * LANES * self.group
                && self.bias.len() == self.group * LANES
                && self.residual.is_none_or(|r| r.len() >= out_span)
                && (1..=MAX_PIXELS).contains(&self.pixels),
            "blocked kernel bounds"
        );
        let residual = self.residual.map_or(std::ptr::null(), <[f32]>::as_ptr);
        let (input, weight, bias) = (
            self.input.as_ptr(),
            self.weight.as_ptr(),
            self.bias.as_ptr(),
        );
        macro_rules! dispatch {
            ($group:literal: $($n:literal)*) => {
                match self.pixels {
                    // SAFETY: bounds asserted above; AVX-512F is the caller's promise.
                    $($n => unsafe { kernel::<$group, $n>(args, input, weight, bias, residual, out) },)*
                    _ => unreachable!("pixels checked above"),
                }
            };
        }
        if self.group == 2 {
            dispatch!(2: 1 2 3 4 5 6 7 8 9 10 11 12 13 14)
        } else {
            dispatch!(1: 1 2 3 4 5 6 7 8 9 10 11 12 13 14)
        }
    }
}

/// `GROUP` output blocks x `PIXELS` pixels: accumulators start at bias (+ residual), then
/// for every input channel and tap, `GROUP` weight vectors times one broadcast input
/// value per pixel.
///
/// # Safety
/// AVX-512F, and every pointer valid for the reads and writes [`Tile::run`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const GROUP: usize, const PIXELS: usize>(
    args: &KernelArgs,
    input: *const f32,
    weight: *const f32,
    bias: *const f32,
    residual: *const f32,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let step = args.stride * args.in_lanes;
    let mut acc = [[_mm512_setzero_ps(); PIXELS]; GROUP];
    for (o, row) in acc.iter_mut().enumerate() {
        // SAFETY (all pointer arithmetic below): within the bounds Tile::run checked.
        let b = unsafe { _mm512_loadu_ps(bias.add(o * LANES)) };
        for (p, value) in row.iter_mut().enumerate() {
            *value = if residual.is_null() {
                b
            } else {
                let at = o * args.out_block_stride + p * LANES;
                unsafe { _mm512_add_ps(b, _mm512_loadu_ps(residual.add(at))) }
            };
        }
    }
    let mut w = weight;
    for block in 0..args.in_blocks {
        for ky in 0..args.kernel {
            let row = unsafe { input.add(block * args.in_block_stride + ky * args.in_row_stride) };
            for kx in 0..args.kernel {
                let tap = unsafe { row.add(kx * args.in_lanes) };
                for ic in 0..args.in_lanes {
                    let mut wv = [_mm512_setzero_ps(); GROUP];
                    for (o, v) in wv.iter_mut().enumerate() {
                        *v = unsafe { _mm512_loadu_ps(w.add(o * LANES)) };
                    }
                    w = unsafe { w.add(GROUP * LANES) };
                    // Indexing keeps the 2-D unrolled loop in registers.
                    #[allow(clippy::needless_range_loop)]
                    for p in 0..PIXELS {
                        let x = _mm512_set1_ps(unsafe { *tap.add(p * step + ic) });
                        for o in 0..GROUP {
                            acc[o][p] = _mm512_fmadd_ps(wv[o], x, acc[o][p]);
                        }
                    }
                }
            }
        }
    }
    let zero = _mm512_setzero_ps();
    for (o, row) in acc.iter().enumerate() {
        for (p, &value) in row.iter().enumerate() {
            let value = if args.relu {
                _mm512_max_ps(value, zero)
            } else {
                value
            };
            unsafe { _mm512_storeu_ps(out.add(o * args.out_block_stride + p * LANES), value) };
        }
    }
}

/// Never called: [`available`] is false off x86-64.
///
/// # Safety
/// None needed; it panics.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const GROUP: usize, const PIXELS: usize>(
    _: &KernelArgs,
    _: *const f32,
    _: *const f32,
    _: *const f32,
    _: *const f32,
    _: *mut f32,
) {
    unreachable!("blocked kernels run only on x86-64 with AVX-512F")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// Pseudo-random values in [-1, 1) from an integer hash: no RNG dependency.
    fn values(len: usize, seed: u64) -> Vec<f32> {
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
            let conv = BlockedConv::new(
                &tensor,
                &Tensor::new(bias.as_slice(), &Device::Cpu)?,
                1,
                1,
                plain_input,
                winograd,
            )?;
            assert_eq!(conv.group, if c_out.is_multiple_of(32) { 2 } else { 1 });
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
        Ok(())
    }

    /// Every kernel shape the network uses, odd widths (all pixel counts of a tile),
    /// both output groupings, residual and ReLU, against candle's own convolution.
    #[test]
    fn matches_candle_convolution() -> Result<()> {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return Ok(());
        }
        let device = Device::Cpu;
        let mut seed = 10;
        // The last two read plain (N, C, H, W) input, as the stems do.
        for (c_in, c_out, kernel, stride, padding) in [
            (16usize, 32, 3, 1, 1),
            (32, 16, 3, 1, 1),
            (16, 16, 3, 1, 1),
            (32, 16, 3, 2, 1),
            (16, 48, 1, 1, 0),
            (32, 64, 1, 2, 0),
            (16, 32, 7, 2, 3),
            (3, 64, 7, 2, 3),
            (3, 16, 3, 1, 1),
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
                    values(c_out * c_in * kernel * kernel, seed + 100),
                    (c_out, c_in, kernel, kernel),
                    &device,
                )?;
                let b = Tensor::from_vec(values(c_out, seed + 200), c_out, &device)?;
                let conv = x.conv2d(&w, padding, stride, 1, 1)?;
                let conv = conv.broadcast_add(&b.reshape((1, c_out, 1, 1))?)?;
                let residual =
                    Tensor::from_vec(values(conv.elem_count(), seed + 300), conv.dims(), &device)?;
                let expected = (&conv + &residual)?.relu()?;
                let blocked = Arc::new(BlockedConv::new(
                    &w,
                    &b,
                    stride,
                    padding,
                    plain_input,
                    winograd,
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
                        "{c_in}->{c_out} k{kernel} s{stride} {height}x{width} winograd {winograd}: error {error}"
                    );
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
        let conv = Arc::new(BlockedConv::new(&w, &b, 1, 1, false, false)?);
        let wrong_channels = Tensor::zeros((1, 2, 4, 4, 16), DType::F32, &device)?;
        assert!(conv.forward(&wrong_channels, None, true).is_err());
        let x = Tensor::zeros((1, 1, 4, 4, 16), DType::F32, &device)?;
        let wrong_residual = Tensor::zeros((1, 2, 4, 5, 16), DType::F32, &device)?;
        assert!(conv.forward(&x, Some(&wrong_residual), true).is_err());
        assert!(BlockedConv::new(
            &Tensor::zeros((32, 8, 3, 3), DType::F32, &device)?,
            &b,
            1,
            1,
            false,
            true
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn max_pool_matches_candle() -> Result<()> {
        let device = Device::Cpu;
        for (height, width) in [(1, 1), (2, 3), (7, 8), (112, 112)] {
            let x = Tensor::from_vec(
                values(2 * 32 * height * width, 7),
                (2, 32, height, width),
                &device,
            )?;
            // candle pools without padding: pad with -inf, as PyTorch does.
            let padded = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
            let minus_infinity = Tensor::full(f32::NEG_INFINITY, padded.dims(), &device)?;
            let inside = Tensor::ones(x.dims(), DType::U8, &device)?
                .pad_with_zeros(2, 1, 1)?
                .pad_with_zeros(3, 1, 1)?;
            let expected = inside
                .where_cond(&padded, &minus_infinity)?
                .max_pool2d_with_stride(3, 2)?;
            let got = from_blocked(&max_pool(&to_blocked(&x)?, 3, 2, 1)?)?;
            assert_eq!(got.dims(), expected.dims());
            let difference = (got - expected)?.abs()?.flatten_all()?.max(D::Minus1)?;
            assert_eq!(difference.to_scalar::<f32>()?, 0.0, "{height}x{width}");
        }
        Ok(())
    }

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
