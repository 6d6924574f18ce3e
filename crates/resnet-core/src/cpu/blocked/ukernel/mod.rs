//! The microkernels of the blocked convolutions, written once over [`F32x16`] (sixteen
//! f32 lanes: one channel block) and compiled per instruction set: `avx512.rs`,
//! `avx2.rs`, `neon.rs` and `scalar.rs` each implement the vector type and instantiate
//! the kernels inside functions compiled for their instructions (`#[target_feature]`).
//! [`KernelCall::run`] checks a tile's bounds once, then dispatches on a [`CpuIsa`]: only
//! detection makes one, so a kernel runs only where its instructions exist.
//!
//! Kernels: [`conv_tile`] (a row of output pixels x one or two output blocks, the
//! direct convolution and Winograd's 16 products), [`conv_tile_rotated`] (grouped layers
//! whose groups are narrower than a block), Winograd's input and output transforms
//! ([`winograd_input_tile`], [`winograd_output_tile`]), and training's weight gradient
//! ([`grad_tile`], through [`GradTile`]).
#![allow(unsafe_code)] // SIMD intrinsics over raw pointers into checked buffers

use crate::cpu::{CpuIsa, Isa};

use super::LANES;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;

/// Sixteen f32 lanes. Implementations wrap one instruction set's registers.
///
/// # Safety
/// Every method may use its instruction set's intrinsics: call them only inside a
/// function compiled for it (the entry points `isa_entry_points!` makes), and `load` /
/// `store` only on 16 valid floats.
pub(super) trait F32x16: Copy {
    /// Sixteen floats from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// Sixteen floats to `p`.
    unsafe fn store(self, p: *mut f32);
    /// `x` in every lane.
    unsafe fn splat(x: f32) -> Self;
    /// `self + other`.
    unsafe fn add(self, other: Self) -> Self;
    /// `self - other`.
    unsafe fn sub(self, other: Self) -> Self;
    /// `self · b + acc` (fused where the instruction set has it).
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self;
    /// Lane-wise maximum.
    unsafe fn max(self, other: Self) -> Self;
    /// Lane `i` of the result is lane `indices[i]` of `self`; every index lies in the
    /// same half of eight lanes as `i` (what AVX2's in-register permute can do). By
    /// default through memory; instruction sets with a permute override it.
    #[inline(always)]
    unsafe fn permute(self, indices: &[u32; 16]) -> Self {
        let mut lanes = [0f32; 16];
        self.store(lanes.as_mut_ptr());
        let permuted: [f32; 16] = std::array::from_fn(|i| lanes[indices[i] as usize & 15]);
        Self::load(permuted.as_ptr())
    }
}

/// How an instruction set tiles its kernels, declared beside them (each ISA file's
/// `isa_entry_points!` invocation, as `gemm` keeps a kernel table per instruction set):
/// the shapes of a dense kernel call, widest first. The rotated kernel's tiles and the
/// weight gradient's channel split live there too, in the dispatch they compile to.
#[derive(Debug)]
pub(crate) struct Tiles {
    pub calls: &'static [CallShape],
    /// The group widths (channels per group, in and out) the rotated kernel takes;
    /// narrower groups of other widths run as dense blocks with zeros between them.
    pub rotated: &'static [usize],
}

/// One shape of a dense kernel call: `blocks` output blocks by up to `pixels` pixels,
/// for 1x1 layers only if `only_1x1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallShape {
    pub blocks: usize,
    pub pixels: usize,
    pub only_1x1: bool,
}

/// Largest pixel count of any instruction set's tile (scratch buffers are sized by it;
/// each table is checked against it when compiled).
pub(crate) const MAX_PIXELS: usize = 14;

impl Tiles {
    /// The token's instruction set's table.
    pub fn of(isa: CpuIsa) -> &'static Self {
        match isa.isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => &avx512::TILES,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => &avx2::TILES,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => &neon::TILES,
            Isa::Scalar => &scalar::TILES,
            #[allow(unreachable_patterns)] // which arms exist depends on the target
            isa => unreachable!("a CpuIsa for {isa}, which this target cannot have"),
        }
    }

    /// Output blocks per kernel call for `c_out` channels and a `kernel` x `kernel`
    /// convolution: the widest shape whose blocks divide the channels' and that takes the
    /// kernel.
    pub fn call_blocks(&self, c_out: usize, kernel: usize) -> usize {
        self.calls
            .iter()
            .find(|c| c_out.is_multiple_of(c.blocks * LANES) && (!c.only_1x1 || kernel == 1))
            .map_or(1, |c| c.blocks)
    }

    /// Most pixels per kernel call at `call_blocks` output blocks; 0 if no shape has
    /// that many (narrow groups take a whole row a call: `conv_row_rotated`).
    pub fn pixels_for(&self, call_blocks: usize) -> usize {
        self.calls
            .iter()
            .find(|c| c.blocks == call_blocks)
            .map_or(0, |c| c.pixels)
    }
}

/// `$module::$kernel($args)` in the module of `$isa`'s instruction set.
macro_rules! on_isa {
    ($isa:expr, $kernel:ident($($arg:expr),*)) => {
        match $isa.isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::$kernel($($arg),*),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::$kernel($($arg),*),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => neon::$kernel($($arg),*),
            Isa::Scalar => scalar::$kernel($($arg),*),
            #[allow(unreachable_patterns)] // which arms exist depends on the target
            isa => unreachable!("a CpuIsa for {isa}, which this target cannot have"),
        }
    };
}

/// What every kernel call of one convolution shares.
#[derive(Clone, Copy)]
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
    /// 0: dense weights (`conv_tile`). Else the channels per group of a grouped layer
    /// whose groups are narrower than a block (`conv_tile_rotated`).
    pub rotations: usize,
}

/// One kernel call: `pixels` output pixels of one row x `group` output blocks.
pub(crate) struct KernelCall<'a> {
    /// The padded input from the tile's top-left tap on.
    pub input: &'a [f32],
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub pixels: usize,
    pub call_blocks: usize,
}

impl KernelCall<'_> {
    /// Runs the tile on `isa`'s kernel, after checking every read it makes.
    ///
    /// # Safety
    /// `out` must be valid for this tile's writes: `group` blocks of `pixels` pixels at
    /// `args.out_block_stride`.
    pub unsafe fn run(&self, isa: CpuIsa, args: &KernelArgs, out: *mut f32) {
        let k = args.kernel;
        let most_pixels = if args.rotations > 0 {
            usize::MAX
        } else {
            Tiles::of(isa).pixels_for(self.call_blocks)
        };
        assert!(
            (1..=most_pixels).contains(&self.pixels),
            "blocked kernel tile {}x{} for {isa:?}",
            self.call_blocks,
            self.pixels
        );
        let last_pixel = (self.pixels - 1) * args.stride;
        let input_end = (args.in_blocks - 1) * args.in_block_stride
            + (k - 1) * args.in_row_stride
            + (last_pixel + k) * args.in_lanes;
        let out_span = (self.call_blocks - 1) * args.out_block_stride + self.pixels * LANES;
        assert!(self.input.len() >= input_end, "blocked kernel input bounds");
        let weights = if args.rotations > 0 {
            assert!(
                args.in_blocks == 1
                    && self.call_blocks == 1
                    && args.in_lanes == LANES
                    && Tiles::of(isa).rotated.contains(&args.rotations),
                "rotated kernel tile"
            );
            k * k * args.rotations * LANES
        } else {
            args.in_blocks * k * k * args.in_lanes * LANES * self.call_blocks
        };
        assert!(
            self.weight.len() == weights
                && self.bias.len() == self.call_blocks * LANES
                && self.residual.is_none_or(|r| r.len() >= out_span),
            "blocked kernel bounds"
        );
        let residual = self.residual.map_or(std::ptr::null(), <[f32]>::as_ptr);
        let pointers = (
            self.input.as_ptr(),
            self.weight.as_ptr(),
            self.bias.as_ptr(),
            residual,
            out,
        );
        if args.rotations > 0 {
            // SAFETY: reads checked above, writes the caller's promise; the token says
            // this CPU has the instructions; the rotations are one of 1, 2, 4, 8.
            unsafe {
                on_isa!(
                    isa,
                    conv_row_rotated_of(args.rotations, args, pointers, self.pixels)
                )
            };
        } else {
            // SAFETY: as above; the call shape is one of the table's (its pixels checked).
            unsafe {
                on_isa!(
                    isa,
                    conv_tile_of(self.call_blocks, self.pixels, args, pointers)
                )
            };
        }
    }
}

/// One call of the weight gradient's kernel: all 16 output channels of one block by the
/// 16 input channels of one block, at one kernel tap, summed over a rectangle of output
/// pixels (those whose input pixel at that tap lies inside the image: no padding).
pub(crate) struct GradTile<'a> {
    /// The output gradient from the rectangle's first pixel: pixel (r, i) at
    /// `r · dz_row + i · 16`, its 16 channels side by side.
    pub dz: &'a [f32],
    /// The input block from the tap's first pixel: pixel (r, i) at `r · x_row + i ·
    /// x_step`, its 16 channels side by side.
    pub x: &'a [f32],
    pub rows: usize,
    pub len: usize,
    pub dz_row: usize,
    pub x_row: usize,
    pub x_step: usize,
}

impl GradTile<'_> {
    /// Adds `Σ dz[pixel][o] · x[pixel][c]` over the rectangle to `sums[c · 16 + o]`, on
    /// `isa`'s kernel, after checking every read.
    pub fn accumulate(&self, isa: CpuIsa, sums: &mut [f32; LANES * LANES]) {
        if self.rows == 0 || self.len == 0 {
            return;
        }
        let dz_end = (self.rows - 1) * self.dz_row + (self.len - 1) * LANES + LANES;
        let x_end = (self.rows - 1) * self.x_row + (self.len - 1) * self.x_step + LANES;
        assert!(
            self.dz.len() >= dz_end && self.x.len() >= x_end,
            "weight gradient tile bounds"
        );
        // SAFETY: reads checked above (every call reads channels below 16 of a pixel the
        // bounds cover); `sums` holds 16 x 16; the token says this CPU has the
        // instructions.
        unsafe { on_isa!(isa, grad_tile_all(self, sums.as_mut_ptr())) };
    }
}

/// [`GradTile::accumulate`] for input channels `first..first + CHANNELS`: the 16 output
/// channels' gradient vector times a broadcast input value per channel, per pixel.
///
/// # Safety
/// Inside a function compiled for `V`'s instruction set; the tile's bounds checked;
/// `sums` valid for 16 x 16 floats.
#[inline(always)]
pub(super) unsafe fn grad_tile<V: F32x16, const CHANNELS: usize>(
    tile: &GradTile,
    first: usize,
    sums: *mut f32,
) {
    let mut acc = [V::splat(0.0); CHANNELS];
    for r in 0..tile.rows {
        let dz = tile.dz.as_ptr().add(r * tile.dz_row);
        let x = tile.x.as_ptr().add(r * tile.x_row + first);
        for i in 0..tile.len {
            let d = V::load(dz.add(i * LANES));
            let x = x.add(i * tile.x_step);
            // Indexing keeps the unrolled loop in registers.
            #[allow(clippy::needless_range_loop)]
            for c in 0..CHANNELS {
                acc[c] = d.mul_add(V::splat(*x.add(c)), acc[c]);
            }
        }
    }
    for (c, value) in acc.iter().enumerate() {
        let at = sums.add((first + c) * LANES);
        V::load(at).add(*value).store(at);
    }
}

/// The pointers a [`conv_tile`] reads and writes: input, weight, bias, residual (null
/// for none), output.
pub(super) type TilePointers = (*const f32, *const f32, *const f32, *const f32, *mut f32);

/// `GROUP` output blocks x `PIXELS` pixels: accumulators start at bias (+ residual), then
/// for every input channel and tap, `GROUP` weight vectors times one broadcast input
/// value per pixel; ReLU on the way out.
///
/// # Safety
/// Inside a function compiled for `V`'s instruction set; every pointer valid for the
/// reads and writes [`KernelCall::run`] checks.
#[inline(always)]
pub(super) unsafe fn conv_tile<V: F32x16, const GROUP: usize, const PIXELS: usize>(
    args: &KernelArgs,
    (input, weight, bias, residual, out): TilePointers,
) {
    let step = args.stride * args.in_lanes;
    let mut acc = [[V::splat(0.0); PIXELS]; GROUP];
    for (o, row) in acc.iter_mut().enumerate() {
        let b = V::load(bias.add(o * LANES));
        for (p, value) in row.iter_mut().enumerate() {
            *value = if residual.is_null() {
                b
            } else {
                b.add(V::load(residual.add(o * args.out_block_stride + p * LANES)))
            };
        }
    }
    let mut w = weight;
    for block in 0..args.in_blocks {
        for ky in 0..args.kernel {
            let row = input.add(block * args.in_block_stride + ky * args.in_row_stride);
            for kx in 0..args.kernel {
                let tap = row.add(kx * args.in_lanes);
                for ic in 0..args.in_lanes {
                    let mut wv = [V::splat(0.0); GROUP];
                    for (o, v) in wv.iter_mut().enumerate() {
                        *v = V::load(w.add(o * LANES));
                    }
                    w = w.add(GROUP * LANES);
                    // Indexing keeps the 2-D unrolled loop in registers.
                    #[allow(clippy::needless_range_loop)]
                    for p in 0..PIXELS {
                        let x = V::splat(*tap.add(p * step + ic));
                        for o in 0..GROUP {
                            acc[o][p] = wv[o].mul_add(x, acc[o][p]);
                        }
                    }
                }
            }
        }
    }
    let zero = V::splat(0.0);
    for (o, row) in acc.iter().enumerate() {
        for (p, &value) in row.iter().enumerate() {
            let value = if args.relu { value.max(zero) } else { value };
            value.store(out.add(o * args.out_block_stride + p * LANES));
        }
    }
}

/// A grouped layer whose groups of `G` channels are narrower than a block (ResNeXt
/// 32x4d's 4 and 8; 1 is depthwise), one output block x `PIXELS` pixels, only the
/// products the layer has. Output lane `j` (of the group starting at `j - j % G`) sums
/// over `d < G` the products with input lane `j - j % G + (j % G + d) % G`: for each `d`
/// an accumulator set takes `w_d ⊙ x` lane-wise (input lane `i` times the weight of the
/// output that reads it at that `d`), and at the end each set is rotated by `d` within
/// its groups onto the outputs it belongs to: per tap and pixel one load and `G`
/// multiply-adds, `G - 1` permutes per pixel in all. Weights are laid out `[tap][d][16]`.
///
/// # Safety
/// Inside a function compiled for `V`'s instruction set; every pointer valid for the
/// reads and writes [`KernelCall::run`] checks.
#[inline(always)]
pub(super) unsafe fn conv_tile_rotated<V: F32x16, const G: usize, const PIXELS: usize>(
    args: &KernelArgs,
    (input, weight, bias, residual, out): TilePointers,
) {
    let step = args.stride * LANES;
    let mut acc = [[V::splat(0.0); PIXELS]; G];
    let mut w = weight;
    for ky in 0..args.kernel {
        let row = input.add(ky * args.in_row_stride);
        for kx in 0..args.kernel {
            let tap = row.add(kx * LANES);
            let mut wv = [V::splat(0.0); G];
            for (d, v) in wv.iter_mut().enumerate() {
                *v = V::load(w.add(d * LANES));
            }
            w = w.add(G * LANES);
            // Indexing keeps the unrolled loops in registers.
            #[allow(clippy::needless_range_loop)]
            for p in 0..PIXELS {
                let x = V::load(tap.add(p * step));
                for d in 0..G {
                    acc[d][p] = wv[d].mul_add(x, acc[d][p]);
                }
            }
        }
    }
    // Set d's lane i belongs to output lane i - i % G + (i % G - d) mod G: output lane j
    // takes lane j - j % G + (j % G + d) % G of it.
    let onto: [[u32; 16]; G] =
        std::array::from_fn(|d| std::array::from_fn(|j| (j - j % G + (j % G + d) % G) as u32));
    let b = V::load(bias);
    let zero = V::splat(0.0);
    // Indexing: every set's pixel p.
    #[allow(clippy::needless_range_loop)]
    for p in 0..PIXELS {
        let mut value = if residual.is_null() {
            b
        } else {
            b.add(V::load(residual.add(p * LANES)))
        };
        value = value.add(acc[0][p]);
        for d in 1..G {
            value = value.add(acc[d][p].permute(&onto[d]));
        }
        let value = if args.relu { value.max(zero) } else { value };
        value.store(out.add(p * LANES));
    }
}

/// [`conv_tile_rotated`] along a row of `pixels` output pixels: tiles of `PIXELS`, the
/// rest one pixel at a time (one call per row: a narrow group's tile is little work).
///
/// # Safety
/// As [`conv_tile_rotated`] for the whole row.
#[inline(always)]
pub(super) unsafe fn conv_row_rotated<V: F32x16, const G: usize, const PIXELS: usize>(
    args: &KernelArgs,
    (input, weight, bias, residual, out): TilePointers,
    pixels: usize,
) {
    let step = args.stride * LANES;
    let at = |done: usize| {
        let residual = if residual.is_null() {
            residual
        } else {
            residual.add(done * LANES)
        };
        (
            input.add(done * step),
            weight,
            bias,
            residual,
            out.add(done * LANES),
        )
    };
    let mut done = 0;
    while pixels - done >= PIXELS {
        conv_tile_rotated::<V, G, PIXELS>(args, at(done));
        done += PIXELS;
    }
    while done < pixels {
        conv_tile_rotated::<V, G, 1>(args, at(done));
        done += 1;
    }
}

/// Transforms the 4x4 patch at rows 2ty-1.., columns 2tx-1.. of `plane` (zero outside)
/// to `Bᵀ d B`, with `Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`; writes position ξ
/// to `out + ξ·position_stride`.
///
/// # Safety
/// Inside a function compiled for `V`'s instruction set; `out + ξ·position_stride` valid
/// for 16 writes for each ξ < 16.
#[inline(always)]
pub(super) unsafe fn winograd_input_tile<V: F32x16>(
    plane: &[f32],
    (height, width, ty, tx): (usize, usize, usize, usize),
    out: *mut f32,
    position_stride: usize,
) {
    let mut patch = [[V::splat(0.0); 4]; 4];
    for (i, row) in patch.iter_mut().enumerate() {
        for (j, value) in row.iter_mut().enumerate() {
            if let (Some(y), Some(x)) = ((2 * ty + i).checked_sub(1), (2 * tx + j).checked_sub(1)) {
                if y < height && x < width {
                    let at = (y * width + x) * LANES;
                    *value = V::load(plane[at..at + LANES].as_ptr());
                }
            }
        }
    }
    // Columns of Bᵀ d, then rows of (Bᵀ d) B.
    let mut columns = [[V::splat(0.0); 4]; 4];
    for (j, column) in columns.iter_mut().enumerate() {
        *column = input_transform([patch[0][j], patch[1][j], patch[2][j], patch[3][j]]);
    }
    #[allow(clippy::needless_range_loop)] // i picks row i of each column
    for i in 0..4 {
        let row = input_transform([columns[0][i], columns[1][i], columns[2][i], columns[3][i]]);
        for (j, value) in row.into_iter().enumerate() {
            value.store(out.add((i * 4 + j) * position_stride));
        }
    }
}

/// `Bᵀ x` for one column (or row) of four.
///
/// # Safety
/// Inside a function compiled for `V`'s instruction set.
#[inline(always)]
unsafe fn input_transform<V: F32x16>(x: [V; 4]) -> [V; 4] {
    [
        x[0].sub(x[2]),
        x[1].add(x[2]),
        x[2].sub(x[1]),
        x[1].sub(x[3]),
    ]
}

/// `Aᵀ m A` with `Aᵀ = [1 1 1 0; 0 1 -1 -1]` for one tile (position ξ of it at
/// `products[ξ·position_stride..]`), plus bias (+ residual), ReLU, written to the output
/// block `out` (one `(H, W, 16)` plane) where inside the image.
///
/// # Safety
/// Inside a function compiled for `V`'s instruction set; `out` valid for writing one
/// `(H, W, 16)` plane.
#[inline(always)]
pub(super) unsafe fn winograd_output_tile<V: F32x16>(
    (products, position_stride): (&[f32], usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
    (height, width, ty, tx): (usize, usize, usize, usize),
    out: *mut f32,
) {
    assert!(products.len() >= 15 * position_stride + LANES && bias.len() == LANES);
    let mut m = [V::splat(0.0); 16];
    for (position, value) in m.iter_mut().enumerate() {
        *value = V::load(products.as_ptr().add(position * position_stride));
    }
    let bias = V::load(bias.as_ptr());
    // Rows: s = Aᵀ m (2x4).
    let mut s = [[V::splat(0.0); 4]; 2];
    for j in 0..4 {
        let (a, b, c, d) = (m[j], m[4 + j], m[8 + j], m[12 + j]);
        s[0][j] = a.add(b).add(c);
        s[1][j] = b.sub(c).sub(d);
    }
    let zero = V::splat(0.0);
    for (i, row) in s.iter().enumerate() {
        let oy = 2 * ty + i;
        if oy >= height {
            continue;
        }
        // Columns: y = s A (2 values).
        let y = [
            row[0].add(row[1]).add(row[2]),
            row[1].sub(row[2]).sub(row[3]),
        ];
        for (j, mut value) in y.into_iter().enumerate() {
            let ox = 2 * tx + j;
            if ox >= width {
                continue;
            }
            let at = (oy * width + ox) * LANES;
            value = value.add(bias);
            if let Some(r) = residual {
                value = value.add(V::load(r[at..at + LANES].as_ptr()));
            }
            if relu {
                value = value.max(zero);
            }
            assert!(at + LANES <= height * width * LANES);
            value.store(out.add(at));
        }
    }
}

/// [`winograd_input_tile`] on the token's instruction set.
///
/// # Safety
/// As [`winograd_input_tile`], less the instruction set, which the token vouches for.
pub(crate) unsafe fn input_tile(
    isa: CpuIsa,
    plane: &[f32],
    at: (usize, usize, usize, usize),
    out: *mut f32,
    position_stride: usize,
) {
    on_isa!(isa, input_tile(plane, at, out, position_stride))
}

/// [`winograd_output_tile`] on the token's instruction set.
///
/// # Safety
/// As [`winograd_output_tile`], less the instruction set, which the token vouches for.
pub(crate) unsafe fn output_tile(
    isa: CpuIsa,
    products: (&[f32], usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
    at: (usize, usize, usize, usize),
    out: *mut f32,
) {
    on_isa!(isa, output_tile(products, bias, residual, relu, at, out))
}

/// An instruction set's kernels, compiled for it, and its tile table: `conv_tile`,
/// `conv_row_rotated`, `grad_tile`, `input_tile` and `output_tile` in the module that
/// invokes it, over its vector type `$vector`, with `#[target_feature(enable =
/// $feature)]` if given; `TILES` (the dense kernel's call shapes, each listing its pixel
/// counts 1..=n, `only_1x1` where only 1x1 layers take it) and the dispatch over them
/// (`conv_tile_of`, `conv_row_rotated_of` for 1, 2, 4 and 8 channels per group with
/// that many pixels per tile, `grad_tile_all` over the weight gradient's channel split).
/// The tables are checked when compiled: a last shape of one block for any kernel, pixel
/// lists 1..=n within [`MAX_PIXELS`], the split covering the 16 channels once.
macro_rules! isa_entry_points {
    (
        $vector:ty $(, $feature:literal)?;
        calls: [$($blocks:literal x [$($pixels:literal)+] $($only_1x1:ident)?),+];
        rotated: [$($rotations:literal => $rotated_pixels:literal),+];
        grad: [$($first:literal + $channels:literal),+];
    ) => {
        /// This instruction set's tiles.
        pub(super) const TILES: super::Tiles = super::Tiles {
            calls: &[$(super::CallShape {
                blocks: $blocks,
                pixels: [$($pixels),+].len(),
                only_1x1: super::flag!($($only_1x1)?),
            }),+],
            rotated: &[$($rotations),+],
        };

        const _: () = {
            // The last shape takes any layer: one block, any kernel.
            let blocks = [$($blocks),+];
            let any_kernel = [$(!super::flag!($($only_1x1)?)),+];
            assert!(blocks[blocks.len() - 1] == 1 && any_kernel[any_kernel.len() - 1]);
            $(
                let pixels = [$($pixels),+];
                let mut i = 0;
                while i < pixels.len() {
                    assert!(pixels[i] == i + 1, "pixel counts must be 1..=n");
                    i += 1;
                }
                assert!(pixels.len() <= super::MAX_PIXELS);
            )+
            let split = [$(($first, $channels)),+];
            let (mut i, mut next) = (0, 0);
            while i < split.len() {
                assert!(split[i].0 == next, "the split must cover the channels in order");
                next += split[i].1;
                i += 1;
            }
            assert!(next == super::LANES);
        };

        /// [`conv_tile`] at one of [`TILES`]' call shapes.
        ///
        /// # Safety
        /// As [`conv_tile`]; `(call_blocks, pixels)` one of the table's.
        pub(super) unsafe fn conv_tile_of(
            call_blocks: usize,
            pixels: usize,
            args: &super::KernelArgs,
            pointers: super::TilePointers,
        ) {
            match (call_blocks, pixels) {
                $($(($blocks, $pixels) => conv_tile::<$blocks, $pixels>(args, pointers),)+)+
                _ => unreachable!("a call shape outside the table: its caller checks"),
            }
        }

        /// [`conv_row_rotated`] for `rotations` channels per group, one of the table's.
        ///
        /// # Safety
        /// As [`conv_row_rotated`].
        pub(super) unsafe fn conv_row_rotated_of(
            rotations: usize,
            args: &super::KernelArgs,
            pointers: super::TilePointers,
            pixels: usize,
        ) {
            match rotations {
                $($rotations => conv_row_rotated::<$rotations, $rotated_pixels>(
                    args, pointers, pixels,
                ),)+
                _ => unreachable!("rotations outside the table: its caller checks"),
            }
        }

        /// [`grad_tile`] over all 16 input channels, in the table's split.
        ///
        /// # Safety
        /// As [`grad_tile`].
        pub(super) unsafe fn grad_tile_all(tile: &super::GradTile, sums: *mut f32) {
            $(grad_tile::<$channels>(tile, $first, sums);)+
        }

        /// [`super::conv_tile`] on this instruction set.
        ///
        /// # Safety
        /// This CPU has the instruction set; the pointers as [`super::KernelCall::run`] checks.
        $(#[target_feature(enable = $feature)])?
        pub(super) unsafe fn conv_tile<const GROUP: usize, const PIXELS: usize>(
            args: &super::KernelArgs,
            pointers: super::TilePointers,
        ) {
            super::conv_tile::<$vector, GROUP, PIXELS>(args, pointers)
        }

        /// [`super::conv_row_rotated`] on this instruction set.
        ///
        /// # Safety
        /// This CPU has the instruction set; the pointers as [`super::KernelCall::run`] checks.
        $(#[target_feature(enable = $feature)])?
        pub(super) unsafe fn conv_row_rotated<const G: usize, const PIXELS: usize>(
            args: &super::KernelArgs,
            pointers: super::TilePointers,
            pixels: usize,
        ) {
            super::conv_row_rotated::<$vector, G, PIXELS>(args, pointers, pixels)
        }

        /// [`super::grad_tile`] on this instruction set.
        ///
        /// # Safety
        /// This CPU has the instruction set; as [`super::GradTile::accumulate`] checks.
        $(#[target_feature(enable = $feature)])?
        pub(super) unsafe fn grad_tile<const CHANNELS: usize>(
            tile: &super::GradTile,
            first: usize,
            sums: *mut f32,
        ) {
            super::grad_tile::<$vector, CHANNELS>(tile, first, sums)
        }

        /// [`super::winograd_input_tile`] on this instruction set.
        ///
        /// # Safety
        /// This CPU has the instruction set; `out` as the generic kernel says.
        $(#[target_feature(enable = $feature)])?
        pub(super) unsafe fn input_tile(
            plane: &[f32],
            at: (usize, usize, usize, usize),
            out: *mut f32,
            position_stride: usize,
        ) {
            super::winograd_input_tile::<$vector>(plane, at, out, position_stride)
        }

        /// [`super::winograd_output_tile`] on this instruction set.
        ///
        /// # Safety
        /// This CPU has the instruction set; `out` as the generic kernel says.
        $(#[target_feature(enable = $feature)])?
        pub(super) unsafe fn output_tile(
            products: (&[f32], usize),
            bias: &[f32],
            residual: Option<&[f32]>,
            relu: bool,
            at: (usize, usize, usize, usize),
            out: *mut f32,
        ) {
            super::winograd_output_tile::<$vector>(products, bias, residual, relu, at, out)
        }
    };
}
/// `true` if given a marker, `false` if not.
macro_rules! flag {
    () => {
        false
    };
    ($marker:ident) => {
        true
    };
}
use flag;
use isa_entry_points;

#[cfg(test)]
mod tests {
    use super::*;

    /// Each table picks its call shapes as its comments say: AVX-512 (and the scalar
    /// oracle, which checks the same shapes) four blocks for a 1x1 layer whose channels
    /// allow, else two, else one; AVX2 and NEON one block by 6 pixels; the rotated
    /// kernel for every narrow group width but 8 on AVX2.
    #[test]
    fn call_shapes_follow_each_table() {
        let wide = &scalar::TILES;
        assert_eq!(wide.call_blocks(256, 1), 4);
        assert_eq!(wide.call_blocks(256, 3), 2);
        assert_eq!(wide.call_blocks(32, 1), 2);
        assert_eq!(wide.call_blocks(48, 3), 1);
        let pixels = (wide.pixels_for(4), wide.pixels_for(2), wide.pixels_for(1));
        assert_eq!(pixels, (6, 14, 14));
        assert_eq!(wide.pixels_for(3), 0, "no 3-block shape");
        assert_eq!(wide.rotated, [1, 2, 4, 8]);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(avx2::TILES.rotated, [1, 2, 4], "groups of 8 dense on AVX2");
        #[cfg(target_arch = "x86_64")]
        let narrow = [(&avx512::TILES, &avx2::TILES)];
        #[cfg(target_arch = "aarch64")]
        let narrow = [(&scalar::TILES, &neon::TILES)];
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        for (same_as_scalar, narrow) in narrow {
            assert_eq!(same_as_scalar.calls, wide.calls);
            assert_eq!(narrow.call_blocks(256, 1), 1);
            assert_eq!((narrow.pixels_for(1), narrow.pixels_for(2)), (6, 0));
        }
    }
}
