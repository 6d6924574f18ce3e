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

use candle_core::{
    bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, StorageRef, Tensor,
    WithDType,
};
use rayon::prelude::*;

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

/// One fused convolution: groups 1, square kernel, symmetric padding, dilation 1.
pub(crate) struct FusedConv<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub residual: Option<&'a Tensor>,
    pub relu: bool,
    pub stride: usize,
    pub padding: usize,
}

impl FusedConv<'_> {
    /// Whether this op can run `xs`: CPU, f32 or f16 (gemm has no bf16), groups 1.
    pub fn supports(xs: &Tensor, weight: &Tensor, groups: usize) -> bool {
        xs.device().is_cpu()
            && matches!(xs.dtype(), DType::F32 | DType::F16)
            && groups == 1
            && weight.dims().len() == 4
    }
}

/// A contiguous CPU tensor's data, borrowed from its storage guard.
fn cpu_data<'a, T: WithDType>(storage: &'a StorageRef<'_>, layout: &Layout) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = &**storage else {
        bail!("fused convolution: tensor is not on the CPU");
    };
    let data = cpu.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("fused convolution: tensor is not contiguous"),
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

/// The shapes of one convolution.
#[derive(Clone, Copy)]
struct Geometry {
    c_in: usize,
    c_out: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    out_h: usize,
    out_w: usize,
}

impl Geometry {
    fn in_plane(&self) -> usize {
        self.height * self.width
    }

    fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Rows of the im2col matrix: c_in · kernel².
    fn depth(&self) -> usize {
        self.c_in * self.kernel * self.kernel
    }

    /// A 1x1, stride-1, unpadded convolution reads its input as the GEMM operand.
    fn is_direct(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// Row (ci, ky, kx) of the im2col matrix: x[ci, oy·s + ky - p, ox·s + kx - p].
    fn im2col_row<T: Element>(&self, x: &[T], row: usize, col: &mut [T]) {
        let Self {
            kernel,
            stride: s,
            padding: p,
            height,
            width,
            out_h,
            out_w,
            ..
        } = *self;
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
        for (oy, dst) in col.chunks_mut(out_w).enumerate().take(out_h) {
            let iy = oy * s + ky;
            if iy < p || iy - p >= height || first >= last {
                dst.fill(T::zero());
                continue;
            }
            let src = &plane[(iy - p) * width..(iy - p + 1) * width];
            dst[..first].fill(T::zero());
            dst[last..].fill(T::zero());
            let start = first * s + kx - p;
            if s == 1 {
                dst[first..last].copy_from_slice(&src[start..start + (last - first)]);
            } else {
                for (d, v) in dst[first..last]
                    .iter_mut()
                    .zip(src[start..].iter().step_by(s))
                {
                    *d = *v;
                }
            }
        }
    }

    /// `out += weight @ rhs` with `out` (c_out, out_plane), `weight` (c_out, depth) and
    /// `rhs` (depth, out_plane), all row-major.
    fn multiply<T: Element>(
        &self,
        weight: &[T],
        rhs: &[T],
        out: &mut [T],
        parallelism: gemm::Parallelism,
    ) {
        let (m, n, k) = (self.c_out, self.out_plane(), self.depth());
        assert!(weight.len() == m * k && rhs.len() == k * n && out.len() == m * n);
        // SAFETY: the three slices have exactly the sizes of their matrices (asserted
        // above), are contiguous row-major, and `out` aliases neither operand.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                true,
                weight.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                n as isize,
                T::one(),
                T::one(),
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    /// One image: `out = relu(out + weight @ im2col(x))`, `out` holding bias (+ residual).
    /// `parallel`: this image has the machine to itself (else images run side by side).
    fn run_image<T: Element>(
        &self,
        x: &[T],
        weight: &[T],
        relu: bool,
        out: &mut [T],
        parallel: bool,
    ) {
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if parallel && threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let out_plane = self.out_plane();
        if self.is_direct() {
            self.multiply(weight, x, out, parallelism);
        } else {
            T::with_columns(self.depth() * out_plane, |columns| {
                let fill = |(row, col): (usize, &mut [T])| self.im2col_row(x, row, col);
                if parallel {
                    columns.par_chunks_mut(out_plane).enumerate().for_each(fill);
                } else {
                    columns.chunks_mut(out_plane).enumerate().for_each(fill);
                }
                self.multiply(weight, columns, out, parallelism);
            });
        }
        if relu {
            let relu_plane = |plane: &mut [T]| {
                for v in plane {
                    if *v < T::zero() {
                        *v = T::zero();
                    }
                }
            };
            if parallel {
                out.par_chunks_mut(out_plane).for_each(relu_plane);
            } else {
                out.chunks_mut(out_plane).for_each(relu_plane);
            }
        }
    }
}

impl FusedConv<'_> {
    fn run<T: Element>(&self, input: &[T], layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("fused convolution: input is not contiguous");
        };
        let input = &input[start..end];
        let (batch, c_in, height, width) = layout.shape().dims4()?;
        let (c_out, w_in, kh, kw) = self.weight.dims4()?;
        if w_in != c_in || kh != kw {
            bail!(
                "fused convolution: weight {:?} for input {:?}",
                self.weight.dims(),
                layout.shape().dims()
            );
        }
        let (s, p) = (self.stride, self.padding);
        if height + 2 * p < kh || width + 2 * p < kw {
            bail!("fused convolution: input {height}x{width} smaller than the kernel");
        }
        let out_h = (height + 2 * p - kh) / s + 1;
        let out_w = (width + 2 * p - kw) / s + 1;
        let (in_plane, out_plane) = (height * width, out_h * out_w);
        let k = c_in * kh * kw;

        let (weight_storage, weight_layout) = self.weight.storage_and_layout();
        let weight = cpu_data::<T>(&weight_storage, weight_layout)?;
        let (bias_storage, bias_layout) = self.bias.storage_and_layout();
        let bias = cpu_data::<T>(&bias_storage, bias_layout)?;
        let residual_guard = match self.residual {
            Some(r) => {
                if r.dims() != [batch, c_out, out_h, out_w] {
                    bail!(
                        "fused convolution: residual {:?}, expected {:?}",
                        r.dims(),
                        [batch, c_out, out_h, out_w]
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
        if weight.len() != c_out * k || bias.len() != c_out {
            bail!("fused convolution: weight or bias size does not match {c_out}x{k}");
        }

        let geometry = Geometry {
            c_in,
            c_out,
            height,
            width,
            kernel: kh,
            stride: s,
            padding: p,
            out_h,
            out_w,
        };
        // The accumulator starts as bias (+ residual), written in one pass, plane by plane.
        let mut output: Vec<T> = Vec::with_capacity(batch * c_out * out_plane);
        for b in 0..batch {
            for (c, &bias) in bias.iter().enumerate() {
                match residual {
                    Some(r) => {
                        let plane = &r[(b * c_out + c) * out_plane..][..out_plane];
                        output.extend(plane.iter().map(|&v| v + bias));
                    }
                    None => output.extend(std::iter::repeat_n(bias, out_plane)),
                }
            }
        }
        let image_len = c_out * out_plane;
        let threads = candle_core::utils::get_num_threads();
        if batch >= threads && threads > 1 {
            // Many images: side by side, one per thread, each GEMM single-threaded
            // (small GEMMs do not split well).
            output
                .par_chunks_mut(image_len)
                .enumerate()
                .for_each(|(b, out)| {
                    let x = &input[b * c_in * in_plane..(b + 1) * c_in * in_plane];
                    geometry.run_image(x, weight, self.relu, out, false);
                });
        } else {
            for (b, out) in output.chunks_mut(image_len).enumerate() {
                let x = &input[b * c_in * in_plane..(b + 1) * c_in * in_plane];
                geometry.run_image(x, weight, self.relu, out, true);
            }
        }
        Ok((
            T::to_cpu_storage_owned(output),
            Shape::from((batch, c_out, out_h, out_w)),
        ))
    }
}
