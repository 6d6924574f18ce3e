//! A fused CPU convolution for inference: `relu(conv(x) + bias + residual)` in one op.
//!
//! candle's CPU convolution re-lays the input out as NHWC, reorders the kernel on every
//! call, builds its im2col tiles with strided writes and scatters the result back, then
//! bias, residual add and ReLU each make another pass over memory. Here the NCHW weight
//! already is the `(c_out, c_in·kh·kw)` GEMM operand, a 1x1 stride-1 input already is the
//! `(c_in, h·w)` one, other convolutions get a row-contiguous im2col, and the output
//! starts as `bias (+ residual)` so that the GEMM accumulates onto it (`read_dst`) and one
//! last pass applies ReLU. The GEMM is the `gemm` crate, candle's own.
#![allow(unsafe_code)] // the `gemm` crate's entry point is an unsafe fn over raw pointers

use crate::cpu::storage::cpu_data;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::ops::Range;

use super::{for_each_task, Shared};

/// The element types the fused op runs: those `gemm` multiplies (no bf16).
pub(crate) trait Element:
    WithDType + num_traits::Zero + num_traits::One + PartialOrd + Send + Sync
{
    /// Runs `f` on this thread's im2col buffer of `len` elements. The buffer is reused
    /// across calls, its contents stale (im2col writes every element): no megabytes
    /// allocated and zeroed per convolution.
    fn with_columns<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

macro_rules! element {
    ($t:ty, $zero:expr) => {
        impl Element for $t {
            fn with_columns<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                thread_local! {
                    static COLUMNS: std::cell::RefCell<Vec<$t>> =
                        const { std::cell::RefCell::new(Vec::new()) };
                }
                COLUMNS.with(|cell| {
                    let mut columns = cell.borrow_mut();
                    if columns.len() < len {
                        columns.resize(len, $zero);
                    }
                    f(&mut columns[..len])
                })
            }
        }
    };
}
element!(f32, 0.0);
element!(half::f16, half::f16::ZERO);

/// One fused convolution: any groups, square kernel, symmetric padding, dilation 1.
pub(crate) struct FusedConv<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub residual: Option<&'a Tensor>,
    pub relu: bool,
    pub stride: usize,
    pub padding: usize,
    /// Channel groups (ResNeXt): each group an independent convolution.
    pub groups: usize,
}

impl FusedConv<'_> {
    /// Whether this op can run `xs`: CPU, f32 or f16 (gemm has no bf16), output channels
    /// divisible into the groups.
    pub fn supports(xs: &Tensor, weight: &Tensor, groups: usize) -> bool {
        xs.device().is_cpu()
            && matches!(xs.dtype(), DType::F32 | DType::F16)
            && groups >= 1
            && weight.dims().len() == 4
            && weight.dims()[0].is_multiple_of(groups)
    }
}

impl CustomOp1 for FusedConv<'_> {
    fn name(&self) -> &'static str {
        "fused-conv2d-bias-residual-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(x) => self.run::<f32>(x, layout),
            CpuStorage::F16(x) => self.run::<half::f16>(x, layout),
            _ => bail!("fused convolution: only f32 and f16"),
        }
    }
}

/// The shapes of one group of one image's convolution.
#[derive(Clone, Copy)]
pub(crate) struct ImageConv {
    pub c_in: usize,
    pub c_out: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl ImageConv {
    pub fn in_plane(&self) -> usize {
        self.height * self.width
    }

    pub fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Rows of the im2col matrix: c_in · kernel².
    pub fn depth(&self) -> usize {
        self.c_in * self.kernel * self.kernel
    }

    /// A 1x1, stride-1, unpadded convolution reads its input as the GEMM operand.
    pub fn is_direct(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// Columns `pixels` of the im2col matrix, as a `(depth, pixels.len())` row-major
    /// tile: row (ci, ky, kx), column (oy, ox) holds x[ci, oy·s + ky - p, ox·s + kx - p].
    pub fn im2col_tile<T: Element>(&self, x: &[T], pixels: Range<usize>, tile: &mut [T]) {
        let Self {
            kernel,
            stride: s,
            padding: p,
            height,
            width,
            out_w,
            ..
        } = *self;
        let tile_width = pixels.len();
        for (row, dst_row) in tile.chunks_mut(tile_width).enumerate() {
            let ci = row / (kernel * kernel);
            let ky = (row / kernel) % kernel;
            let kx = row % kernel;
            let plane = &x[ci * self.in_plane()..(ci + 1) * self.in_plane()];
            // The output columns whose input column ox·s + kx - p lies inside the image.
            let first = p.saturating_sub(kx).div_ceil(s).min(out_w);
            let last = if width + p > kx {
                ((width + p - kx - 1) / s + 1).min(out_w)
            } else {
                0
            };
            let mut pixel = pixels.start;
            let mut dst_row = &mut dst_row[..];
            while pixel < pixels.end {
                let (oy, ox0) = (pixel / out_w, pixel % out_w);
                let ox1 = out_w.min(ox0 + (pixels.end - pixel));
                let (dst, rest) = dst_row.split_at_mut(ox1 - ox0);
                dst_row = rest;
                pixel += ox1 - ox0;
                let iy = oy * s + ky;
                let (lo, hi) = (first.clamp(ox0, ox1), last.clamp(ox0, ox1));
                if iy < p || iy - p >= height || lo >= hi {
                    dst.fill(T::zero());
                    continue;
                }
                let src = &plane[(iy - p) * width..(iy - p + 1) * width];
                dst[..lo - ox0].fill(T::zero());
                dst[hi - ox0..].fill(T::zero());
                let dst = &mut dst[lo - ox0..hi - ox0];
                let start = lo * s + kx - p;
                match s {
                    1 => dst.copy_from_slice(&src[start..start + dst.len()]),
                    // Pairs rather than step_by: this form vectorises.
                    2 => {
                        for (d, pair) in dst.iter_mut().zip(src[start..].chunks(2)) {
                            *d = pair[0];
                        }
                    }
                    _ => {
                        for (d, v) in dst.iter_mut().zip(src[start..].iter().step_by(s)) {
                            *d = *v;
                        }
                    }
                }
            }
        }
    }

    /// One image: `out = relu(weight @ im2col(x) + bias (+ residual))` on `threads`
    /// threads (1 when images run side by side).
    ///
    /// The output is cut into tiles of output channels x pixels, each one task: build
    /// its im2col columns, set it to bias (+ residual), GEMM onto it, ReLU, all while
    /// it is in the core's cache, instead of whole-image passes through memory. Wide
    /// layers split the pixels; deep, narrow ones (49 or 196 pixels) split the channels,
    /// which gemm's own threading does not, leaving a core idle.
    fn run_image<T: Element>(
        &self,
        x: &[T],
        epilogue: &Epilogue<'_, T>,
        out: &mut [T],
        threads: usize,
    ) {
        let (m, n, k) = (self.c_out, self.out_plane(), self.depth());
        // About 128K elements of im2col tile, which with gemm's packed copy and the
        // output tile stays within a 1-2 MiB L2; at least 64 pixels wide.
        let target_width = (128 * 1024 / k).clamp(64, 512);
        let mut pixel_tiles = n.div_ceil(target_width);
        if pixel_tiles > 1 {
            pixel_tiles = pixel_tiles.div_ceil(threads) * threads;
        }
        let tile_width = n.div_ceil(pixel_tiles);
        let pixel_tiles = n.div_ceil(tile_width);
        let channel_bands = if pixel_tiles < threads && m >= 32 * threads {
            threads
        } else {
            1
        };
        // Bands of whole microkernel tiles (16 rows).
        let band_height = m.div_ceil(channel_bands).div_ceil(16) * 16;
        let channel_bands = m.div_ceil(band_height);

        let out_ptr = Shared(out.as_mut_ptr());
        let task = |index: usize| {
            let band = index / pixel_tiles;
            let tile = index % pixel_tiles;
            let rows = band * band_height..((band + 1) * band_height).min(m);
            let pixels = tile * tile_width..((tile + 1) * tile_width).min(n);
            let width = pixels.len();
            // SAFETY: tasks cover disjoint (rows, pixels) rectangles of `out`, which
            // outlives them (the parallel loop below joins before returning).
            let tile_out = unsafe { out_ptr.get().add(rows.start * n + pixels.start) };
            for (i, row) in rows.clone().enumerate() {
                // SAFETY: as above; row `row`, columns `pixels` lie inside `out`.
                let dst = unsafe { std::slice::from_raw_parts_mut(tile_out.add(i * n), width) };
                epilogue.init_row(row, pixels.clone(), n, dst);
            }
            let weight = &epilogue.weight[rows.start * k..rows.end * k];
            let multiply = |rhs: &[T], rhs_stride: usize| {
                gemm_into(rows.len(), width, k, tile_out, n, weight, rhs, rhs_stride);
            };
            if self.is_direct() {
                multiply(&x[pixels.start..], n);
            } else {
                T::with_columns(k * width, |columns| {
                    self.im2col_tile(x, pixels.clone(), columns);
                    multiply(columns, width);
                });
            }
            if epilogue.relu {
                for i in 0..rows.len() {
                    // SAFETY: as above.
                    relu(unsafe { std::slice::from_raw_parts_mut(tile_out.add(i * n), width) });
                }
            }
        };
        for_each_task(channel_bands * pixel_tiles, threads > 1, 1, task);
    }
}

/// `out += weight @ rhs`, single-threaded: `out` (m, n) with row stride `out_stride`,
/// `weight` (m, k) row-major, `rhs` (k, n) with row stride `rhs_stride`.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: Element>(
    m: usize,
    n: usize,
    k: usize,
    out: *mut T,
    out_stride: usize,
    weight: &[T],
    rhs: &[T],
    rhs_stride: usize,
) {
    assert!(weight.len() == m * k);
    assert!(k == 0 || rhs.len() >= (k - 1) * rhs_stride + n);
    // SAFETY: `weight` and `rhs` hold their matrices (asserted above); the caller hands
    // an `out` valid for m rows of `out_stride` with n columns, aliasing neither.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_stride as isize,
            true,
            weight.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            rhs_stride as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// What a convolution adds to its GEMM: weights, bias, residual and ReLU of one image.
struct Epilogue<'a, T> {
    weight: &'a [T],
    bias: &'a [T],
    /// This image's residual, `(c_out, out_plane)`.
    residual: Option<&'a [T]>,
    relu: bool,
}

impl<T: Element> Epilogue<'_, T> {
    /// Sets `dst`, columns `pixels` of output row `row` (of `plane` columns), to bias
    /// (+ residual): the GEMM then accumulates onto it.
    fn init_row(&self, row: usize, pixels: Range<usize>, plane: usize, dst: &mut [T]) {
        let bias = self.bias[row];
        match self.residual {
            Some(r) => {
                let src = &r[row * plane + pixels.start..row * plane + pixels.end];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = s + bias;
                }
            }
            None => dst.fill(bias),
        }
    }
}

fn relu<T: Element>(values: &mut [T]) {
    for v in values {
        if *v < T::zero() {
            *v = T::zero();
        }
    }
}

impl FusedConv<'_> {
    fn run<T: Element>(&self, input: &[T], layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("fused convolution: input is not contiguous");
        };
        let input = &input[start..end];
        let shape = ConvShape::new(
            layout.shape().dims(),
            self.weight.dims(),
            self.stride,
            self.padding,
            self.groups,
        )?;
        let (weight_storage, weight_layout) = self.weight.storage_and_layout();
        let weight = cpu_data::<T>(&weight_storage, weight_layout)?;
        let (bias_storage, bias_layout) = self.bias.storage_and_layout();
        let bias = cpu_data::<T>(&bias_storage, bias_layout)?;
        let residual_guard = match self.residual {
            Some(r) => {
                if r.dims() != shape.output_dims() {
                    bail!(
                        "fused convolution: residual {:?}, expected {:?}",
                        r.dims(),
                        shape.output_dims()
                    );
                }
                Some(r.storage_and_layout())
            }
            None => None,
        };
        let residual = match &residual_guard {
            Some((storage, layout)) => Some(cpu_data::<T>(storage, layout)?),
            None => None,
        };
        if bias.len() != shape.c_out {
            bail!(
                "fused convolution: {} biases for {} channels",
                bias.len(),
                shape.c_out
            );
        }
        let output = shape.convolve(input, weight, bias, residual, self.relu)?;
        Ok((
            T::to_cpu_storage_owned(output),
            Shape::from(shape.output_dims().to_vec()),
        ))
    }
}

/// The shapes of one batched convolution: any groups, square kernel, symmetric padding,
/// dilation 1. Built by [`ConvShape::new`], which checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub height: usize,
    pub width: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl ConvShape {
    /// The convolution of an `input` `(N, C, H, W)` by a `weight`
    /// `(C_out, C / groups, k, k)`, or an error saying what does not fit.
    pub fn new(
        input: &[usize],
        weight: &[usize],
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Result<Self> {
        let (&[batch, c_in, height, width], &[c_out, w_in, kh, kw]) = (input, weight) else {
            bail!("convolution: input {input:?} and weight {weight:?} must both have 4 dimensions");
        };
        if groups == 0
            || stride == 0
            || w_in * groups != c_in
            || !c_out.is_multiple_of(groups)
            || kh != kw
        {
            bail!(
                "convolution: weight {weight:?} (groups {groups}, stride {stride}) for input {input:?}"
            );
        }
        if height + 2 * padding < kh || width + 2 * padding < kw {
            bail!("convolution: input {height}x{width} smaller than the {kh}x{kw} kernel");
        }
        Ok(Self {
            batch,
            c_in,
            height,
            width,
            c_out,
            kernel: kh,
            stride,
            padding,
            groups,
            out_h: (height + 2 * padding - kh) / stride + 1,
            out_w: (width + 2 * padding - kw) / stride + 1,
        })
    }

    /// `(N, C_out, H_out, W_out)`.
    pub fn output_dims(&self) -> [usize; 4] {
        [self.batch, self.c_out, self.out_h, self.out_w]
    }

    /// One group of one image as the GEMM convolutions see it.
    pub(crate) fn group_geometry(&self) -> ImageConv {
        ImageConv {
            c_in: self.c_in / self.groups,
            c_out: self.c_out / self.groups,
            height: self.height,
            width: self.width,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            out_h: self.out_h,
            out_w: self.out_w,
        }
    }

    /// `relu(conv(input, weight) + bias (+ residual))` over the batch, contiguous NCHW
    /// slices in, the output's out.
    pub fn convolve<T: Element>(
        &self,
        input: &[T],
        weight: &[T],
        bias: &[T],
        residual: Option<&[T]>,
        relu: bool,
    ) -> Result<Vec<T>> {
        let ConvShape {
            batch,
            c_in,
            c_out,
            groups,
            ..
        } = *self;
        let geometry = self.group_geometry();
        let (in_plane, out_plane) = (geometry.in_plane(), geometry.out_plane());
        // Per group: w_in input channels, c_out / groups output channels.
        let (w_in, group_out, k) = (geometry.c_in, geometry.c_out, geometry.depth());
        let image_len = c_out * out_plane;
        if input.len() != batch * c_in * in_plane
            || weight.len() != c_out * k
            || bias.len() != c_out
            || residual.is_some_and(|r| r.len() != batch * image_len)
        {
            bail!("convolution: buffer sizes do not match {self:?}");
        }
        // Every element is written by `Epilogue::init` before the GEMM reads it.
        let mut output: Vec<T> = vec![T::zero(); batch * image_len];
        let threads = candle_core::utils::get_num_threads();
        // Group g of image b: its input channels, weight rows, bias, residual and output.
        let group_len = group_out * out_plane;
        let run_group = |b: usize, g: usize, out: &mut [T], threads: usize| {
            let x = &input[(b * c_in + g * w_in) * in_plane..][..w_in * in_plane];
            let at = b * image_len + g * group_len;
            let epilogue = Epilogue {
                weight: &weight[g * group_out * k..(g + 1) * group_out * k],
                bias: &bias[g * group_out..(g + 1) * group_out],
                residual: residual.map(|r| &r[at..at + group_len]),
                relu,
            };
            geometry.run_image(x, &epilogue, out, threads);
        };
        let run_image = |b: usize, out: &mut [T], parallel: bool| {
            run_group(b, 0, out, if parallel { threads } else { 1 });
        };
        if groups > 1 {
            // Groups are small convolutions: one per task, single-threaded.
            output
                .par_chunks_mut(group_len)
                .enumerate()
                .for_each(|(index, out)| run_group(index / groups, index % groups, out, 1));
        } else if batch >= threads && threads > 1 {
            // Many images: side by side, one per thread, each GEMM single-threaded
            // (small GEMMs do not split well).
            output
                .par_chunks_mut(image_len)
                .enumerate()
                .for_each(|(b, out)| run_image(b, out, false));
        } else {
            for (b, out) in output.chunks_mut(image_len).enumerate() {
                run_image(b, out, true);
            }
        }
        Ok(output)
    }
}
