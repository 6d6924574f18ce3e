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

use rayon::prelude::*;

use super::ukernel::{input_tile, output_tile, Blocking, KernelArgs, Tile};
use super::LANES;
use crate::cpu::{for_each_task, CpuIsa, Shared};

/// Positions of the 4x4 transform.
const POSITIONS: usize = 16;

/// Where the weight of `(oc, ic)` sits in one position's blocked 1x1 weight
/// `[c_out / (16·group)][c_in / 16][16 in][16·group out]`.
fn packed_index(oc: usize, ic: usize, c_in: usize, group: usize) -> usize {
    let width = LANES * group;
    let (g, o) = (oc / width, oc % width);
    ((g * (c_in / LANES) + ic / LANES) * LANES + ic % LANES) * width + o
}

/// `G g Gᵀ` for each `(c_out, c_in)` 3x3 kernel `g` of `source` times its output
/// channel's `scale`, reordered per position as a blocked 1x1 weight:
/// `[16][c_out / (16·group)][c_in / 16][16 in][16·group out]`.
pub(crate) fn transform_weights(
    source: &[f32],
    scale: &[f32],
    c_out: usize,
    c_in: usize,
    group: usize,
) -> Vec<f32> {
    let pairs = c_out * c_in;
    let mut packed = vec![0.0f32; POSITIONS * pairs];
    for (oc, &k) in scale.iter().enumerate().take(c_out) {
        for ic in 0..c_in {
            let pair = oc * c_in + ic;
            let at = packed_index(oc, ic, c_in, group);
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
    group: usize,
) -> Vec<f32> {
    let pairs = c_out * c_in;
    let mut weight = vec![0.0f32; pairs * 9];
    for oc in 0..c_out {
        for ic in 0..c_in {
            let (pair, at) = (oc * c_in + ic, packed_index(oc, ic, c_in, group));
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
pub(crate) struct Geometry {
    pub batch: usize,
    pub in_blocks: usize,
    pub out_blocks: usize,
    pub height: usize,
    pub width: usize,
    pub group: usize,
    /// The instruction set the kernels and transforms run on.
    pub isa: CpuIsa,
}

impl Geometry {
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
}

/// `relu(conv3x3(input) + bias + residual)` on blocked `(N, C/16, H, W, 16)` data.
///
/// Image by image, so that the transformed tiles (4x the activations) stay in cache:
/// with at least as many images as threads, each thread takes whole images; else the
/// threads share each image's three phases.
pub(crate) fn convolve(geometry: Geometry, layer: Layer<'_>) -> Vec<f32> {
    if geometry.in_blocks * geometry.out_blocks <= FUSED_MAX_BLOCK_PAIRS {
        return convolve_fused(geometry, layer);
    }
    let Layer {
        input,
        weight,
        bias,
        residual,
        relu,
    } = layer;
    let (in_image, out_image) = (geometry.in_image(), geometry.out_image());
    let mut output: Vec<f32> = Vec::with_capacity(geometry.batch * out_image);
    let out = Shared(output.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let image = |b: usize, parallel: bool| {
        let data = Image {
            input: &input[b * in_image..(b + 1) * in_image],
            residual: residual.map(|r| &r[b * out_image..(b + 1) * out_image]),
            weight,
            bias,
            relu,
            parallel,
        };
        // SAFETY: image b's part of the output, written by this call only.
        unsafe { data.convolve(geometry, out.get().add(b * out_image)) };
    };
    let threads = candle_core::utils::get_num_threads();
    if geometry.batch >= threads && threads > 1 {
        (0..geometry.batch)
            .into_par_iter()
            .for_each(|b| image(b, false));
    } else {
        (0..geometry.batch).for_each(|b| image(b, threads > 1));
    }
    // SAFETY: every image's output was written in full (`Image::convolve`).
    unsafe { output.set_len(geometry.batch * out_image) };
    output
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

/// [`convolve`] for narrow layers: one task per (image, chunk of tiles) does all
/// three steps — transform its tiles, the 16 products, the output transform — in a
/// per-thread scratch buffer of a few KiB. The transformed tiles (4x the activations)
/// never reach memory; the weights, all positions, stay in the core's L2.
fn convolve_fused(geometry: Geometry, layer: Layer<'_>) -> Vec<f32> {
    let Layer {
        input,
        weight,
        bias,
        residual,
        relu,
    } = layer;
    let Geometry {
        batch,
        in_blocks,
        out_blocks,
        height,
        width,
        group,
        ..
    } = geometry;
    let (tile_cols, tiles) = (geometry.tile_cols(), geometry.tiles());
    let max_pixels = Blocking::of(geometry.isa).max_pixels;
    let chunks = tiles.div_ceil(max_pixels);
    let plane = height * width * LANES;
    let (in_image, out_image) = (geometry.in_image(), geometry.out_image());
    let groups = out_blocks / group;
    let position_weights = weight.len() / POSITIONS;
    let group_weights = position_weights / groups;
    // Scratch: [16][in_blocks][14 tiles][16], then [16][out_blocks][14 tiles][16].
    let tile_block = max_pixels * LANES;
    let (v_position, m_position) = (in_blocks * tile_block, out_blocks * tile_block);
    let args = KernelArgs {
        in_blocks,
        in_lanes: LANES,
        kernel: 1,
        stride: 1,
        in_block_stride: tile_block,
        in_row_stride: 0,
        out_block_stride: tile_block,
        relu: false,
    };
    let zero_bias = [0.0f32; 2 * LANES];
    let mut output: Vec<f32> = Vec::with_capacity(batch * out_image);
    let out = Shared(output.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let task = |index: usize| {
        let (b, chunk) = (index / chunks, index % chunks);
        let (first, end) = (chunk * tiles / chunks, (chunk + 1) * tiles / chunks);
        // This thread's scratch, reused (taken: a re-entrant call makes its own).
        let mut scratch = SCRATCH.take();
        scratch.resize(POSITIONS * (v_position + m_position), 0.0);
        let (v, m) = scratch.split_at_mut(POSITIONS * v_position);
        let image = &input[b * in_image..(b + 1) * in_image];
        for block in 0..in_blocks {
            let source = &image[block * plane..(block + 1) * plane];
            for (t, tile) in (first..end).enumerate() {
                let slot = &mut v[block * tile_block + t * LANES..];
                assert!(slot.len() >= 15 * v_position + LANES);
                // SAFETY: position ξ of this tile at slot + ξ·v_position, inside `v`
                // (asserted); the token vouches for the instruction set.
                unsafe {
                    input_tile(
                        geometry.isa,
                        source,
                        (height, width, tile / tile_cols, tile % tile_cols),
                        slot.as_mut_ptr(),
                        v_position,
                    )
                };
            }
        }
        for position in 0..POSITIONS {
            for g in 0..groups {
                let tile = Tile {
                    input: &v[position * v_position..],
                    weight: &weight[position * position_weights + g * group_weights..]
                        [..group_weights],
                    bias: &zero_bias[..group * LANES],
                    residual: None,
                    pixels: end - first,
                    group,
                };
                let products = &mut m[position * m_position + g * group * tile_block..];
                assert!(products.len() >= group * tile_block);
                // SAFETY: `products` holds this group's blocks of 14 tiles (asserted);
                // `Tile::run` checks the reads.
                unsafe { tile.run(geometry.isa, &args, products.as_mut_ptr()) };
            }
        }
        for block in 0..out_blocks {
            let at = b * out_image + block * plane;
            let residual = residual.map(|r| &r[at..at + plane]);
            for (t, tile) in (first..end).enumerate() {
                // SAFETY: this tile's pixels of this image's output block, written by
                // this task only (tasks own disjoint (image, tiles)), inside the plane
                // (checked in `output_tile`).
                unsafe {
                    output_tile(
                        geometry.isa,
                        (&m[block * tile_block + t * LANES..], m_position),
                        &bias[block * LANES..(block + 1) * LANES],
                        residual,
                        relu,
                        (height, width, tile / tile_cols, tile % tile_cols),
                        out.get().add(at),
                    )
                };
            }
        }
        SCRATCH.set(scratch);
    };
    let parallel = candle_core::utils::get_num_threads() > 1;
    for_each_task(batch * chunks, parallel, 1, task);
    // SAFETY: the tasks covered every (image, tile, block): every output pixel written.
    unsafe { output.set_len(batch * out_image) };
    output
}

thread_local! {
    /// See `convolve_fused`.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// One image's data.
struct Image<'a> {
    input: &'a [f32],
    residual: Option<&'a [f32]>,
    weight: &'a [f32],
    bias: &'a [f32],
    relu: bool,
    /// Spread each phase over the thread pool.
    parallel: bool,
}

impl Image<'_> {
    /// # Safety
    /// `out` valid for writing one output image; the CPU has AVX-512F.
    unsafe fn convolve(&self, geometry: Geometry, out: *mut f32) {
        let Geometry {
            in_blocks,
            out_blocks,
            height,
            width,
            group,
            ..
        } = geometry;
        let (tile_rows, tile_cols, tiles) =
            (geometry.tile_rows(), geometry.tile_cols(), geometry.tiles());
        assert!(self.input.len() == geometry.in_image());
        assert!(self
            .residual
            .is_none_or(|r| r.len() == geometry.out_image()));
        assert!(self.bias.len() == out_blocks * LANES);

        // 1. Bᵀ d B for every tile: [16][in_blocks][tiles][16].
        let position_in = in_blocks * tiles * LANES;
        let mut transformed: Vec<f32> = Vec::with_capacity(POSITIONS * position_in);
        let v = Shared(transformed.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        let plane = height * width * LANES;
        for_each_task(in_blocks * tile_rows, self.parallel, 1, |index| {
            let (block, ty) = (index / tile_rows, index % tile_rows);
            let source = &self.input[block * plane..(block + 1) * plane];
            for tx in 0..tile_cols {
                let slot = (block * tiles + ty * tile_cols + tx) * LANES;
                // SAFETY: this task's (block, tile) slots of `transformed`; the loads
                // are bounds-checked against `source`.
                unsafe {
                    input_tile(
                        geometry.isa,
                        source,
                        (height, width, ty, tx),
                        v.get().add(slot),
                        position_in,
                    )
                };
            }
        });
        // SAFETY: every (position, block, tile) slot was written above.
        unsafe { transformed.set_len(POSITIONS * position_in) };

        // 2. The 16 products over input channels: [16][out_blocks][tiles][16].
        let position_out = out_blocks * tiles * LANES;
        let groups = out_blocks / group;
        let position_weights = self.weight.len() / POSITIONS;
        let group_weights = position_weights / groups;
        let chunks = tiles.div_ceil(Blocking::of(geometry.isa).max_pixels);
        let args = KernelArgs {
            in_blocks,
            in_lanes: LANES,
            kernel: 1,
            stride: 1,
            in_block_stride: tiles * LANES,
            in_row_stride: 0,
            out_block_stride: tiles * LANES,
            relu: false,
        };
        let zero_bias = [0.0f32; 2 * LANES];
        let mut products: Vec<f32> = Vec::with_capacity(POSITIONS * position_out);
        let m = Shared(products.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        // Tasks: (position, output group, chunk of tiles), neighbours sharing weights.
        for_each_task(POSITIONS * groups * chunks, self.parallel, 1, |index| {
            let chunk = index % chunks;
            let g = (index / chunks) % groups;
            let position = index / (chunks * groups);
            // Near-equal chunks: 16 tiles run as 8 + 8, not 14 + 2.
            let (first, end) = (chunk * tiles / chunks, (chunk + 1) * tiles / chunks);
            let tile = Tile {
                input: &transformed[position * position_in + first * LANES..],
                weight: &self.weight[position * position_weights + g * group_weights..]
                    [..group_weights],
                bias: &zero_bias[..group * LANES],
                residual: None,
                pixels: end - first,
                group,
            };
            let at = position * position_out + g * group * tiles * LANES + first * LANES;
            // SAFETY: tasks write disjoint (position, group, chunk) parts of `products`;
            // `Tile::run` checks the reads; AVX-512F is the caller's promise.
            unsafe { tile.run(geometry.isa, &args, m.get().add(at)) };
        });
        // SAFETY: every (position, block, tile) slot was written by one task above.
        unsafe { products.set_len(POSITIONS * position_out) };

        // 3. Aᵀ m A + bias (+ residual), ReLU, into the output image.
        let out = Shared(out);
        for_each_task(out_blocks * tile_rows, self.parallel, 1, |index| {
            let (block, ty) = (index / tile_rows, index % tile_rows);
            let bias = &self.bias[block * LANES..(block + 1) * LANES];
            let residual = self
                .residual
                .map(|r| &r[block * plane..(block + 1) * plane]);
            for tx in 0..tile_cols {
                let slot = (block * tiles + ty * tile_cols + tx) * LANES;
                // SAFETY: the tile's pixels of output block `block`, written by this
                // task only, inside the image (checked in `output_tile`).
                unsafe {
                    output_tile(
                        geometry.isa,
                        (&products[slot..], position_out),
                        bias,
                        residual,
                        self.relu,
                        (height, width, ty, tx),
                        out.get().add(block * plane),
                    )
                };
            }
        });
    }
}
