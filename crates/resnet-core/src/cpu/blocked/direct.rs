//! The blocked direct convolution's driver: check the input against the layer, plan the
//! work (zero border, tiles of output pixels, task order), then run the ISA's kernel on
//! every tile in parallel (or hand 3x3 stride-1 layers to Winograd).
#![allow(unsafe_code)] // disjoint writes from parallel tasks; the kernels' raw pointers

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::ukernel::{KernelArgs, KernelCall, Tiles};
use super::{BlockedConv, LANES};
use crate::cpu::storage::{cpu_data, f32_input};
use crate::cpu::{for_each_task, Shared};

/// Pixels per task of a 1x1 stride-1 layer (8 tiles of 6 on AVX2 and NEON).
const FLAT_ROW: usize = 48;

/// `relu(conv(x) + bias + residual)` on blocked input, one layer's call.
pub(super) struct BlockedOp<'a> {
    pub conv: &'a BlockedConv,
    pub residual: Option<&'a Tensor>,
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
        let input = f32_input(storage, layout, "blocked convolution")?;
        let (output, shape) = self.run(input, layout)?;
        Ok((CpuStorage::F32(output), shape))
    }
}

impl BlockedOp<'_> {
    /// The op on `input`, contiguous values of `layout`'s shape: the output and its shape.
    pub(super) fn run(&self, input: &[f32], layout: &Layout) -> Result<(Vec<f32>, Shape)> {
        let conv = self.conv;
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
            let geometry = super::winograd::WinogradShape {
                batch,
                in_blocks,
                out_blocks,
                height,
                width,
                call_blocks: conv.call_blocks,
                isa: conv.isa,
            };
            let layer = super::winograd::Layer {
                input,
                weight: &conv.weight,
                bias: &conv.bias,
                residual,
                relu: self.relu,
            };
            let output = super::winograd::convolve(geometry, layer);
            return Ok((output, Shape::from(out_shape)));
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
            rotations: conv.rotations,
        };
        // A grouped convolution: each block group reads its own input blocks.
        let (group_in_blocks, _) = conv.block_group_shape();
        let args = KernelArgs {
            in_blocks: group_in_blocks,
            ..args
        };
        let out_blocks_per_block_group = out_blocks / conv.block_group_shape().1;
        let image_in = in_blocks * args.in_block_stride;
        let image_out = out_blocks * args.out_block_stride;
        let call_blocks = conv.call_blocks;
        let calls = out_blocks / call_blocks;
        let call_weights = conv.weight.len() / calls;
        // A 1x1 stride-1 layer reads and writes each plane as one run of pixels: its
        // "rows" are runs of about 48 pixels instead of the image's rows, whose tiles at
        // 7x7 have 4 and 3 pixels (a third of the accumulators idle).
        let flat = k == 1 && s == 1 && p == 0 && conv.rotations == 0;
        let (rows, row_len) = if flat {
            let pixels = out_h * out_w;
            let rows = pixels.div_ceil(FLAT_ROW);
            (rows, pixels.div_ceil(rows))
        } else {
            (out_h, out_w)
        };
        let most_pixels = Tiles::of(conv.isa).pixels_for(call_blocks);

        // Written in full by the tasks below before it is read.
        let mut output: Vec<f32> = Vec::with_capacity(batch * image_out);
        let out_ptr = Shared(output.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        // One task per (image, output row, kernel call's output blocks), in groups of
        // calls. Weights that fit in L2 (up to 1 MiB) stay there while consecutive tasks
        // take every call of one row (one group of all the calls), whose input rows are
        // then read once, from L1; larger weights go call by call (groups of one), each
        // call's weights reused over all rows and images.
        let weight_bytes = conv.weight.len() * std::mem::size_of::<f32>();
        let group_calls = if weight_bytes <= 1 << 20 { calls } else { 1 };
        let task = |index: usize| {
            let group_tasks = group_calls * rows * batch;
            let (group, within) = (index / group_tasks, index % group_tasks);
            let g = group * group_calls + within % group_calls;
            let (b, row) = (within / (group_calls * rows), (within / group_calls) % rows);
            // The row's first output pixel, its first input pixel (padded) and its length.
            let (out_start, in_start, len) = if flat {
                let start = row * row_len;
                (start, start, row_len.min(out_h * out_w - start))
            } else {
                (row * out_w, row * s * padded_w, out_w)
            };
            // Output pixels of a row in near-equal tiles of at most the ISA's pixels.
            // (Narrow groups: the whole row in one call.)
            let tiles = if conv.rotations > 0 {
                1
            } else {
                len.div_ceil(most_pixels)
            };
            let mut ox = 0;
            for t in 0..tiles {
                let pixels = (len - ox) / (tiles - t);
                let block_group = g * call_blocks / out_blocks_per_block_group;
                let in_at = b * image_in
                    + block_group * group_in_blocks * args.in_block_stride
                    + (in_start + ox * s) * in_lanes;
                let out_at = b * image_out
                    + g * call_blocks * args.out_block_stride
                    + (out_start + ox) * LANES;
                let tile = KernelCall {
                    input: &padded[in_at..],
                    weight: &conv.weight[g * call_weights..(g + 1) * call_weights],
                    bias: &conv.bias[g * call_blocks * LANES..(g + 1) * call_blocks * LANES],
                    residual: residual.map(|r| &r[out_at..]),
                    pixels,
                    call_blocks,
                };
                // SAFETY: tasks write disjoint (image, call, row, pixels) parts of
                // `output`, which outlives the parallel loop.
                unsafe { tile.run(conv.isa, &args, out_ptr.get().add(out_at)) };
                ox += pixels;
            }
        };
        let tasks = calls * rows * batch;
        // Rows run in runs of at least ~64K multiply-adds: a CIFAR stem row (32 pixels
        // x 16 channels x 27) is a microsecond of work, less than handing it to a thread.
        let row_work = row_len * call_blocks * LANES * group_in_blocks * in_lanes * k * k;
        let rows_per_job = (64 * 1024usize).div_ceil(row_work.max(1));
        let parallel = candle_core::utils::get_num_threads() > 1;
        for_each_task(tasks, parallel, rows_per_job, task);
        // SAFETY: the tasks covered every (image, call, row, pixel), each writing all
        // 16·call_blocks channels: all `batch * image_out` elements are initialised.
        unsafe { output.set_len(batch * image_out) };
        if p > 0 {
            PADDED_INPUT.set(padded_storage);
        }
        Ok((output, Shape::from(out_shape)))
    }
}
