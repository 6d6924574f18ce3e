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
    /// One image: `out = relu(weight @ im2col(x) + bias + residual)`.
    #[allow(clippy::too_many_arguments)]
    fn run_image<T>(
        &self,
        x: &[T],
        weight: &[T],
        bias: &[T],
        residual: Option<&[T]>,
        relu: bool,
        out: &mut [T],
        columns: &mut [T],
        direct: bool,
        parallelism: gemm::Parallelism,
    ) where
        T: WithDType + num_traits::Zero + num_traits::One + PartialOrd + Send + Sync,
    {
        let Self {
            c_in,
            c_out,
            height,
            width,
            kernel,
            stride: s,
            padding: p,
            out_h,
            out_w,
        } = *self;
        let (in_plane, out_plane) = (height * width, out_h * out_w);
        let k = c_in * kernel * kernel;
        // The accumulator starts as bias (+ residual).
        out.par_chunks_mut(out_plane)
            .enumerate()
            .for_each(|(c, plane)| match residual {
                Some(r) => {
                    for (o, &v) in plane.iter_mut().zip(&r[c * out_plane..(c + 1) * out_plane]) {
                        *o = v + bias[c];
                    }
                }
                None => plane.fill(bias[c]),
            });
        let rhs: &[T] = if direct {
            x
        } else {
            // im2col: row (ci, ky, kx) holds x[ci, oy·s + ky - p, ox·s + kx - p].
            columns
                .par_chunks_mut(out_plane)
                .enumerate()
                .for_each(|(row, col)| {
                    let ci = row / (kernel * kernel);
                    let ky = (row / kernel) % kernel;
                    let kx = row % kernel;
                    let plane = &x[ci * in_plane..(ci + 1) * in_plane];
                    for oy in 0..out_h {
                        let dst = &mut col[oy * out_w..(oy + 1) * out_w];
                        let iy = (oy * s + ky) as isize - p as isize;
                        if iy < 0 || iy >= height as isize {
                            dst.fill(T::zero());
                            continue;
                        }
                        let src = &plane[iy as usize * width..(iy as usize + 1) * width];
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let ix = (ox * s + kx) as isize - p as isize;
                            *d = if ix >= 0 && ix < width as isize {
                                src[ix as usize]
                            } else {
                                T::zero()
                            };
                        }
                    }
                });
            columns
        };
        assert!(
            weight.len() == c_out * k
                && rhs.len() == k * out_plane
                && out.len() == c_out * out_plane
        );
        // SAFETY: out is (c_out, out_plane) row-major, weight (c_out, k), rhs
        // (k, out_plane), all contiguous slices of exactly these sizes (asserted above),
        // and out aliases neither.
        unsafe {
            gemm::gemm(
                c_out,
                out_plane,
                k,
                out.as_mut_ptr(),
                1,
                out_plane as isize,
                true,
                weight.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                out_plane as isize,
                T::one(),
                T::one(),
                false,
                false,
                false,
                parallelism,
            );
        }
        if relu {
            out.par_chunks_mut(out_plane).for_each(|plane| {
                for v in plane {
                    if *v < T::zero() {
                        *v = T::zero();
                    }
                }
            });
        }
    }
}

impl FusedConv<'_> {
    fn run<T>(&self, input: &[T], layout: &Layout) -> Result<(CpuStorage, Shape)>
    where
        T: WithDType + num_traits::Zero + num_traits::One + PartialOrd + Send + Sync,
    {
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
        if bias.len() != c_out {
            bail!(
                "fused convolution: bias of {} for {c_out} channels",
                bias.len()
            );
        }

        let direct = kh == 1 && s == 1 && p == 0;
        let threads = candle_core::utils::get_num_threads();
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
        let image =
            |b: usize, out: &mut [T], columns: &mut Vec<T>, parallelism: gemm::Parallelism| {
                let x = &input[b * c_in * in_plane..(b + 1) * c_in * in_plane];
                let residual =
                    residual.map(|r| &r[b * c_out * out_plane..(b + 1) * c_out * out_plane]);
                geometry.run_image(
                    x,
                    weight,
                    bias,
                    residual,
                    self.relu,
                    out,
                    columns,
                    direct,
                    parallelism,
                );
            };
        let mut output = vec![T::zero(); batch * c_out * out_plane];
        let columns_len = if direct { 0 } else { k * out_plane };
        if batch >= threads && threads > 1 {
            // Many images: one per thread, each GEMM single-threaded (small GEMMs do not
            // split well).
            output
                .par_chunks_mut(c_out * out_plane)
                .enumerate()
                .for_each_init(
                    || vec![T::zero(); columns_len],
                    |columns, (b, out)| image(b, out, columns, gemm::Parallelism::None),
                );
        } else {
            let parallelism = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            let mut columns = vec![T::zero(); columns_len];
            for (b, out) in output.chunks_mut(c_out * out_plane).enumerate() {
                image(b, out, &mut columns, parallelism);
            }
        }
        Ok((
            T::to_cpu_storage_owned(output),
            Shape::from((batch, c_out, out_h, out_w)),
        ))
    }
}
