//! Winograd F(2x2, 3x3) for the blocked 3x3 stride-1 convolutions (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2 block of outputs is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` over the 4x4 input patch
//! `d`: 16 multiplications per input channel instead of 36, so the 3x3 layers (about
//! 40% of ResNet-50's arithmetic) cost 2.25x fewer multiply-adds. The elementwise
//! products summed over input channels are 16 independent matrix products — one per
//! position of the 4x4 transform — which run on the blocked 1x1 kernel, with the tiles
//! as its pixels. Transforms are vectorised over the 16 channels of a block.
//!
//! Error: the transforms only add, subtract and halve, so the result differs from direct
//! convolution by a few rounding steps (measured against PyTorch in the parity tests,
//! within the same 1e-4 relative tolerance).
#![allow(unsafe_code)] // disjoint writes from parallel tasks, through the shared kernel

use std::ops::Range;

use rayon::prelude::*;

use super::ukernel::{input_tile, output_tile, KernelArgs, KernelCall, Tiles};
use super::LANES;
use crate::cpu::{for_each_task, CpuIsa, Shared};

/// Positions of the 4x4 transform.
const POSITIONS: usize = 16;

/// Where the weight of `(oc, ic)` sits in one position's blocked 1x1 weight
/// `[c_out / (16·call_blocks)][c_in / 16][16 in][16·call_blocks out]`.
fn packed_index(oc: usize, ic: usize, c_in: usize, call_blocks: usize) -> usize {
    let width = LANES * call_blocks;
    let (g, o) = (oc / width, oc % width);
    ((g * (c_in / LANES) + ic / LANES) * LANES + ic % LANES) * width + o
}

/// `G g Gᵀ` for each `(c_out, c_in)` 3x3 kernel `g` of `source` times its output
/// channel's `scale`, reordered per position as a blocked 1x1 weight:
/// `[16][c_out / (16·call_blocks)][c_in / 16][16 in][16·call_blocks out]`.
pub(crate) fn transform_weights(
    source: &[f32],
    scale: &[f32],
    c_out: usize,
    c_in: usize,
    call_blocks: usize,
) -> Vec<f32> {
    let pairs = c_out * c_in;
    let mut packed = vec![0.0f32; POSITIONS * pairs];
    for (oc, &k) in scale.iter().enumerate().take(c_out) {
        for ic in 0..c_in {
            let pair = oc * c_in + ic;
            let at = packed_index(oc, ic, c_in, call_blocks);
            let g: [f64; 9] = std::array::from_fn(|i| f64::from(source[pair * 9 + i] * k));
            // Rows of G g (4x3), then columns: (G g) Gᵀ (4x4).
            let rows = |a: f64, b: f64, c: f64| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
            let gg: [[f64; 4]; 3] = std::array::from_fn(|col| rows(g[col], g[3 + col], g[6 + col]));
            for i in 0..4 {
                let u = rows(gg[0][i], gg[1][i], gg[2][i]);
                for (j, value) in u.into_iter().enumerate() {
                    packed[(i * 4 + j) * pairs + at] = value as f32;
                }
            }
        }
    }
    packed
}

/// The 3x3 kernels back from [`transform_weights`]' output (exact up to rounding: the
/// corners of `G g Gᵀ` are `g`'s corners, its edges and centre give the rest).
pub(crate) fn untransform_weights(
    packed: &[f32],
    c_out: usize,
    c_in: usize,
    call_blocks: usize,
) -> Vec<f32> {
    let pairs = c_out * c_in;
    let mut weight = vec![0.0f32; pairs * 9];
    for oc in 0..c_out {
        for ic in 0..c_in {
            let (pair, at) = (oc * c_in + ic, packed_index(oc, ic, c_in, call_blocks));
            let u = |i: usize, j: usize| f64::from(packed[(i * 4 + j) * pairs + at]);
            // Invert rows then columns: a = u0, c = u3, b = 2·u1 - a - c.
            let invert = |u0: f64, u1: f64, u3: f64| [u0, 2.0 * u1 - u0 - u3, u3];
            // Columns 0, 1, 3 of G g Gᵀ give G g's rows; its rows 0, 1, 3 then give g.
            let gg: [[f64; 3]; 4] = std::array::from_fn(|i| invert(u(i, 0), u(i, 1), u(i, 3)));
            for col in 0..3 {
                let g = invert(gg[0][col], gg[1][col], gg[3][col]);
                for (row, value) in g.into_iter().enumerate() {
                    weight[pair * 9 + row * 3 + col] = value as f32;
                }
            }
        }
    }
    weight
}

/// Shapes of one Winograd convolution (3x3, stride 1, padding 1: output size = input).
#[derive(Clone, Copy)]
pub(crate) struct WinogradShape {
    pub batch: usize,
    pub in_blocks: usize,
    pub out_blocks: usize,
    pub height: usize,
    pub width: usize,
    pub call_blocks: usize,
    /// The instruction set the kernels and transforms run on.
    pub isa: CpuIsa,
}

impl WinogradShape {
    fn tile_rows(&self) -> usize {
        self.height.div_ceil(2)
    }

    fn tile_cols(&self) -> usize {
        self.width.div_ceil(2)
    }

    /// Tiles of one image.
    fn tiles(&self) -> usize {
        self.tile_rows() * self.tile_cols()
    }

    fn in_image(&self) -> usize {
        self.in_blocks * self.height * self.width * LANES
    }

    fn out_image(&self) -> usize {
        self.out_blocks * self.height * self.width * LANES
    }

    /// Chunks of tiles, each at most one kernel call's pixels.
    fn chunks(&self) -> usize {
        self.tiles()
            .div_ceil(Tiles::of(self.isa).pixels_for(self.call_blocks))
    }
}

/// One convolution's data: blocked input, transformed weights, bias, the residual to
/// add and whether ReLU follows.
pub(crate) struct Layer<'a> {
    pub input: &'a [f32],
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

/// Up to 64 x 64 channels (16 block pairs, all 16 positions' weights in 256 KiB) a
/// convolution runs fused.
const FUSED_MAX_BLOCK_PAIRS: usize = 16;

/// `relu(conv3x3(input) + bias + residual)` on blocked `(N, C/16, H, W, 16)` data, in
/// three phases per tile: the input transform, the 16 products over input channels
/// (the blocked 1x1 kernel, tiles as its pixels), the output transform. Two schedules
/// of the same phases:
///
/// - narrow layers (up to 64 x 64 channels): one task per (image, chunk of tiles) does
///   all three in a per-thread scratch buffer of a few KiB; the transformed tiles (4x
///   the activations) never reach memory, the weights (all positions) stay in L2;
/// - wider layers: image by image, each phase over all the image's tiles, so that the
///   transformed tiles stay in cache; with at least as many images as threads each
///   thread takes whole images, else the threads share each phase.
pub(crate) fn convolve(geometry: WinogradShape, layer: Layer<'_>) -> Vec<f32> {
    let (in_image, out_image) = (geometry.in_image(), geometry.out_image());
    let mut output: Vec<f32> = Vec::with_capacity(geometry.batch * out_image);
    let out = Shared(output.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let image = |b: usize| Image {
        input: &layer.input[b * in_image..(b + 1) * in_image],
        residual: layer
            .residual
            .map(|r| &r[b * out_image..(b + 1) * out_image]),
        weight: layer.weight,
        bias: layer.bias,
        relu: layer.relu,
        geometry,
    };
    let threads = candle_core::utils::get_num_threads();
    if geometry.in_blocks * geometry.out_blocks <= FUSED_MAX_BLOCK_PAIRS {
        let chunks = geometry.chunks();
        for_each_task(geometry.batch * chunks, threads > 1, 1, |index| {
            let (b, chunk) = (index / chunks, index % chunks);
            // SAFETY: image b's part of the output; tasks of one image own disjoint tiles.
            unsafe { image(b).convolve_chunk(chunk, out.get().add(b * out_image)) };
        });
    } else if geometry.batch >= threads && threads > 1 {
        (0..geometry.batch).into_par_iter().for_each(|b| {
            // SAFETY: image b's part of the output, written by this call only.
            unsafe { image(b).convolve_phases(false, out.get().add(b * out_image)) };
        });
    } else {
        for b in 0..geometry.batch {
            // SAFETY: as above.
            unsafe { image(b).convolve_phases(threads > 1, out.get().add(b * out_image)) };
        }
    }
    // SAFETY: every (image, tile, block) of the output was written by one of the calls.
    unsafe { output.set_len(geometry.batch * out_image) };
    output
}

thread_local! {
    /// `Image::convolve_chunk`'s transformed tiles and products, reused.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A buffer of transformed tiles or products, `[16 positions][blocks][slots][16]`: tile
/// `t` of a phase's range sits at slot `t - first_tile`.
#[derive(Clone, Copy)]
struct Slots {
    base: *mut f32,
    blocks: usize,
    slots: usize,
    first_tile: usize,
}

impl Slots {
    fn position_stride(&self) -> usize {
        self.blocks * self.slots * LANES
    }

    /// Offset of (position 0, `block`, `tile`).
    fn at(&self, block: usize, tile: usize) -> usize {
        (block * self.slots + tile - self.first_tile) * LANES
    }

    fn len(&self) -> usize {
        POSITIONS * self.position_stride()
    }
}

/// One image's data.
struct Image<'a> {
    input: &'a [f32],
    residual: Option<&'a [f32]>,
    weight: &'a [f32],
    bias: &'a [f32],
    relu: bool,
    geometry: WinogradShape,
}

impl Image<'_> {
    fn plane(&self) -> usize {
        self.geometry.height * self.geometry.width * LANES
    }

    /// Phase 1: `Bᵀ d B` of `tiles` of input block `block` into `v`.
    ///
    /// # Safety
    /// `v` valid for writing these tiles' slots of `block`; no other thread writes them.
    unsafe fn transform_inputs(&self, block: usize, tiles: Range<usize>, v: Slots) {
        let WinogradShape { height, width, .. } = self.geometry;
        let tile_cols = self.geometry.tile_cols();
        let source = &self.input[block * self.plane()..(block + 1) * self.plane()];
        for tile in tiles {
            let at = (height, width, tile / tile_cols, tile % tile_cols);
            // SAFETY: position ξ of the slot at its offset + ξ·position_stride, inside
            // `v` (the caller's promise); the loads are bounds-checked against
            // `source`; the token vouches for the instruction set.
            unsafe {
                input_tile(
                    self.geometry.isa,
                    source,
                    at,
                    v.base.add(v.at(block, tile)),
                    v.position_stride(),
                )
            };
        }
    }

    /// Phase 2: the products at `position` of output call `g` for `tiles` (at most the
    /// ISA's tile width), over every input block: one kernel call.
    ///
    /// # Safety
    /// `m` valid for writing these slots of the call's blocks; `v` holds these tiles.
    unsafe fn multiply(&self, position: usize, g: usize, tiles: Range<usize>, v: Slots, m: Slots) {
        let WinogradShape {
            in_blocks,
            out_blocks,
            call_blocks,
            isa,
            ..
        } = self.geometry;
        let position_weights = self.weight.len() / POSITIONS;
        let call_weights = position_weights / (out_blocks / call_blocks);
        let zero_bias = [0.0f32; 2 * LANES];
        let args = KernelArgs {
            in_blocks,
            in_lanes: LANES,
            kernel: 1,
            stride: 1,
            in_block_stride: v.slots * LANES,
            in_row_stride: 0,
            out_block_stride: m.slots * LANES,
            relu: false,
            rotations: 0,
        };
        // SAFETY: `v` was written for these tiles by phase 1 (the caller's promise).
        let transformed = unsafe { std::slice::from_raw_parts(v.base, v.len()) };
        let tile = KernelCall {
            input: &transformed[position * v.position_stride() + v.at(0, tiles.start)..],
            weight: &self.weight[position * position_weights + g * call_weights..][..call_weights],
            bias: &zero_bias[..call_blocks * LANES],
            residual: None,
            pixels: tiles.len(),
            call_blocks,
        };
        let at = position * m.position_stride() + m.at(g * call_blocks, tiles.start);
        // SAFETY: `KernelCall::run` checks the reads; the writes are this group's slots, the
        // caller's promise.
        unsafe { tile.run(isa, &args, m.base.add(at)) };
    }

    /// Phase 3: `Aᵀ m A` + bias (+ residual), ReLU for `tiles` of output block `block`,
    /// into the output image `out`.
    ///
    /// # Safety
    /// `m` holds these tiles' products; `out` valid for one output image, these tiles'
    /// pixels of `block` written by this call only.
    unsafe fn transform_outputs(&self, block: usize, tiles: Range<usize>, m: Slots, out: *mut f32) {
        let WinogradShape { height, width, .. } = self.geometry;
        let tile_cols = self.geometry.tile_cols();
        let plane = self.plane();
        let bias = &self.bias[block * LANES..(block + 1) * LANES];
        let residual = self
            .residual
            .map(|r| &r[block * plane..(block + 1) * plane]);
        // SAFETY: phase 2 wrote `m` (the caller's promise).
        let products = unsafe { std::slice::from_raw_parts(m.base, m.len()) };
        for tile in tiles {
            let at = (height, width, tile / tile_cols, tile % tile_cols);
            // SAFETY: the tile's pixels of output block `block`, inside the plane
            // (checked in `output_tile`), written by this call only.
            unsafe {
                output_tile(
                    self.geometry.isa,
                    (&products[m.at(block, tile)..], m.position_stride()),
                    bias,
                    residual,
                    self.relu,
                    at,
                    out.add(block * plane),
                )
            };
        }
    }

    /// All three phases for chunk `chunk` of the image's tiles, in this thread's scratch.
    ///
    /// # Safety
    /// `out` valid for one output image; no other task writes this chunk's pixels.
    unsafe fn convolve_chunk(&self, chunk: usize, out: *mut f32) {
        let WinogradShape {
            in_blocks,
            out_blocks,
            call_blocks,
            ..
        } = self.geometry;
        let (tiles, chunks) = (self.geometry.tiles(), self.geometry.chunks());
        let range = chunk * tiles / chunks..(chunk + 1) * tiles / chunks;
        let slots = range.len();
        let mut scratch = SCRATCH.take();
        scratch.resize(POSITIONS * (in_blocks + out_blocks) * slots * LANES, 0.0);
        let (v, m) = scratch.split_at_mut(POSITIONS * in_blocks * slots * LANES);
        let slots_of = |base: &mut [f32], blocks| Slots {
            base: base.as_mut_ptr(),
            blocks,
            slots,
            first_tile: range.start,
        };
        let (v, m) = (slots_of(v, in_blocks), slots_of(m, out_blocks));
        // SAFETY: this thread's own scratch, sized for every slot; `out` as promised.
        unsafe {
            for block in 0..in_blocks {
                self.transform_inputs(block, range.clone(), v);
            }
            for position in 0..POSITIONS {
                for g in 0..out_blocks / call_blocks {
                    self.multiply(position, g, range.clone(), v, m);
                }
            }
            for block in 0..out_blocks {
                self.transform_outputs(block, range.clone(), m, out);
            }
        }
        SCRATCH.set(scratch);
    }

    /// The three phases one after the other over all the image's tiles, each spread over
    /// the thread pool if `parallel`.
    ///
    /// # Safety
    /// `out` valid for writing one output image, by this call only.
    unsafe fn convolve_phases(&self, parallel: bool, out: *mut f32) {
        let WinogradShape {
            in_blocks,
            out_blocks,
            call_blocks,
            ..
        } = self.geometry;
        let (tile_rows, tile_cols, tiles) = (
            self.geometry.tile_rows(),
            self.geometry.tile_cols(),
            self.geometry.tiles(),
        );
        let row =
            |index: usize| (index % tile_rows) * tile_cols..(index % tile_rows + 1) * tile_cols;
        let buffer = |blocks: usize| Vec::<f32>::with_capacity(POSITIONS * blocks * tiles * LANES);
        let (mut transformed, mut products) = (buffer(in_blocks), buffer(out_blocks));
        let slots_of = |buffer: &mut Vec<f32>, blocks| Slots {
            base: buffer.spare_capacity_mut().as_mut_ptr().cast::<f32>(),
            blocks,
            slots: tiles,
            first_tile: 0,
        };
        let (v, m) = (
            slots_of(&mut transformed, in_blocks),
            slots_of(&mut products, out_blocks),
        );
        let (v_shared, m_shared, out) = (Shared(v.base), Shared(m.base), Shared(out));
        let v = move || Slots {
            base: v_shared.get(),
            ..v
        };
        let m = move || Slots {
            base: m_shared.get(),
            ..m
        };
        // Tasks own disjoint (block, tile row) or (position, group, chunk) slots; each
        // phase reads what the previous one wrote in full.
        for_each_task(in_blocks * tile_rows, parallel, 1, |index| {
            // SAFETY: as said above.
            unsafe { self.transform_inputs(index / tile_rows, row(index), v()) };
        });
        let (calls, chunks) = (out_blocks / call_blocks, self.geometry.chunks());
        for_each_task(POSITIONS * calls * chunks, parallel, 1, |index| {
            let chunk = index % chunks;
            // Near-equal chunks: 16 tiles run as 8 + 8, not 14 + 2.
            let range = chunk * tiles / chunks..(chunk + 1) * tiles / chunks;
            // SAFETY: as above.
            unsafe {
                self.multiply(
                    index / (chunks * calls),
                    (index / chunks) % calls,
                    range,
                    v(),
                    m(),
                )
            };
        });
        for_each_task(out_blocks * tile_rows, parallel, 1, |index| {
            // SAFETY: as above; `out` is the caller's promise.
            unsafe { self.transform_outputs(index / tile_rows, row(index), m(), out.get()) };
        });
        drop((transformed, products));
    }
}
