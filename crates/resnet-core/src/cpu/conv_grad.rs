//! Training's convolution on the CPU (f32), with a backward made of GEMMs.
//!
//! candle 0.11 differentiates a convolution with a direct-loop transposed convolution
//! (the input's gradient) and a convolution whose "kernel" is the whole output gradient
//! (the weight's): together about 80% of a ResNet-20 training step. Both are GEMMs
//! around the same im2col matrix the forward uses, per image and group:
//!
//! - forward: `y = W · cols(x)`, [`ConvShape::convolve`];
//! - input gradient: `cols = Wᵀ · dy`, then col2im adds each column back where it was
//!   read from (a 1x1 stride-1 convolution needs no im2col: `dx = Wᵀ · dy`);
//!
//! Where the inference path's blocked kernels take a layer with a kernel above 1x1
//! (channels in sixteens, no groups), they run the forward and, for stride 1, the input
//! gradient as the convolution it is (`dy` by the flipped, transposed weight): no im2col
//! or col2im.
//! - weight gradient: `dW += dy · cols(x)ᵀ`, summed over the images of a fixed split of
//!   the batch, the partial sums then added in order, so a step is reproducible.
#![allow(unsafe_code)] // the `gemm` crate's entry point is an unsafe fn over raw pointers

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm_conv::{ConvShape, Element, ImageConv};
use super::storage::{cpu_data, f32_input};

/// `conv2d(xs, weight)` (no bias, dilation 1) whose backward runs the GEMM kernels here.
pub(crate) struct TrainConv {
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl TrainConv {
    /// Whether the op runs these tensors: f32 on the CPU, 4-d, a square kernel.
    pub fn supports(xs: &Tensor, weight: &Tensor) -> bool {
        xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && weight.dtype() == DType::F32
            && xs.rank() == 4
            && weight.rank() == 4
            && weight.dims()[2] == weight.dims()[3]
    }

    /// The convolution, recorded for backpropagation.
    pub fn forward(self, xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
        xs.contiguous()?.apply_op2(&weight.contiguous()?, self)
    }

    fn shape(&self, input: &[usize], weight: &[usize]) -> Result<ConvShape> {
        ConvShape::new(input, weight, self.stride, self.padding, self.groups)
    }

    /// A stride-1 convolution's input gradient is itself a stride-1 convolution: of `dy`
    /// with the weight transposed (in and out channels swapped) and flipped, padded
    /// `k − 1 − p`. Run by the blocked kernels where they take it (no col2im).
    fn blocked_input_gradient(
        &self,
        shape: &ConvShape,
        dy: &[f32],
        weight: &[f32],
    ) -> Option<Result<Vec<f32>>> {
        let k = shape.kernel;
        // A 1x1 layer's input gradient is one GEMM already (no col2im).
        if self.stride != 1 || self.groups != 1 || k == 1 || self.padding + 1 > k {
            return None;
        }
        let (c_in, c_out) = (shape.c_in, shape.c_out);
        let flipped = flipped_transposed(weight, (c_out, c_in, k));
        let [_, _, out_h, out_w] = shape.output_dims();
        super::blocked::convolve_plain(
            dy,
            (shape.batch, c_out, out_h, out_w),
            &flipped,
            (c_in, c_out, k, k),
            (1, k - 1 - self.padding, 1),
        )
    }
}

impl CustomOp2 for TrainConv {
    fn name(&self) -> &'static str {
        "train-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = self.shape(xs_layout.dims(), weight_layout.dims())?;
        let xs = f32_input(xs, xs_layout, "training convolution")?;
        let weight = f32_input(weight, weight_layout, "training convolution")?;
        // The inference path's blocked kernels where they take the layer (channels in
        // sixteens, no groups, k > 1): ResNet-20's forward at batch 128 160-215 ->
        // 117-125 ms.
        // 1x1 layers stay on the GEMM, which reads the plain layout in place: blocked,
        // with the two layout passes, ResNet-50's step at batch 16 took 5.1 s against
        // 4.3-4.4 s (AVX2).
        let (xs_dims, weight_dims) = (xs_layout.shape().dims4()?, weight_layout.shape().dims4()?);
        let blocked = (weight_dims.2 > 1)
            .then(|| {
                super::blocked::convolve_plain(
                    xs,
                    xs_dims,
                    weight,
                    weight_dims,
                    (self.stride, self.padding, self.groups),
                )
            })
            .flatten();
        if let Some(ys) = blocked {
            return Ok((
                CpuStorage::F32(ys?),
                Shape::from(shape.output_dims().to_vec()),
            ));
        }
        let bias = vec![0f32; shape.c_out];
        let ys = shape.convolve(xs, weight, &bias, None, false)?;
        Ok((
            CpuStorage::F32(ys),
            Shape::from(shape.output_dims().to_vec()),
        ))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let shape = self.shape(xs.dims(), weight.dims())?;
        let grad = grad.contiguous()?;
        let (grad_storage, grad_layout) = grad.storage_and_layout();
        let dy = cpu_data::<f32>(&grad_storage, grad_layout)?;
        if dy.len() != shape.output_dims().iter().product::<usize>() {
            bail!(
                "training convolution: gradient {:?} for {shape:?}",
                grad.dims()
            );
        }
        let grad_xs = if xs.track_op() {
            let (storage, layout) = weight.storage_and_layout();
            let weight_data = cpu_data::<f32>(&storage, layout)?;
            let dx = match self.blocked_input_gradient(&shape, dy, weight_data) {
                Some(dx) => dx?,
                None => input_gradient(&shape, dy, weight_data),
            };
            Some(Tensor::from_vec(dx, xs.shape(), xs.device())?)
        } else {
            None
        };
        let grad_weight = if weight.track_op() {
            let (storage, layout) = xs.storage_and_layout();
            let xs_data = cpu_data::<f32>(&storage, layout)?;
            let dw = weight_gradient(&shape, xs_data, dy);
            Some(Tensor::from_vec(dw, weight.shape(), weight.device())?)
        } else {
            None
        };
        Ok((grad_xs, grad_weight))
    }
}

/// A stride-1 convolution's weight `(c_out, c_in, k, k)` as the weight of its input
/// gradient's convolution: `(c_in, c_out, k, k)`, each kernel rotated by 180 degrees.
pub(super) fn flipped_transposed(
    weight: &[f32],
    (c_out, c_in, k): (usize, usize, usize),
) -> Vec<f32> {
    // 16 x 16 channels at a time through a small tile: read as 16 runs of the source,
    // written as 16 runs of the result. (Channel by channel over the whole weight, the
    // rows 4 KiB multiples apart fought over the same L1 sets: 3-7 ms at ResNet-50's 1M
    // weights, repacked at every training step.)
    const CHANNELS: usize = 16;
    let taps = k * k;
    let mut flipped = vec![0f32; weight.len()];
    flipped
        .par_chunks_mut((CHANNELS * c_out * taps).max(1))
        .enumerate()
        .for_each(|(chunk, flipped)| {
            let first = chunk * CHANNELS;
            let inputs = flipped.len() / (c_out * taps);
            let mut tile = vec![0f32; CHANNELS * inputs * taps];
            for first_out in (0..c_out).step_by(CHANNELS) {
                let outputs = CHANNELS.min(c_out - first_out);
                for (o, tile) in tile
                    .chunks_exact_mut(inputs * taps)
                    .take(outputs)
                    .enumerate()
                {
                    tile.copy_from_slice(
                        &weight[((first_out + o) * c_in + first) * taps..][..inputs * taps],
                    );
                }
                for i in 0..inputs {
                    let dst = &mut flipped[(i * c_out + first_out) * taps..][..outputs * taps];
                    for (o, dst) in dst.chunks_exact_mut(taps).enumerate() {
                        let src = &tile[(o * inputs + i) * taps..][..taps];
                        for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                            *d = *s;
                        }
                    }
                }
            }
        });
    flipped
}

/// A row-major-or-not matrix operand: element (i, j) at `data[i * row + j * col]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    row: usize,
    col: usize,
}

impl<'a> Operand<'a> {
    fn rows(data: &'a [f32], width: usize) -> Self {
        Self {
            data,
            row: width,
            col: 1,
        }
    }

    fn transposed(data: &'a [f32], width: usize) -> Self {
        Self {
            data,
            row: 1,
            col: width,
        }
    }

    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.row + (cols - 1) * self.col < self.data.len()
    }
}

/// `dst (+)= lhs · rhs`, single-threaded: `dst` `(m, n)` row-major, `lhs` `(m, k)`,
/// `rhs` `(k, n)`; `accumulate` adds to `dst` instead of overwriting it.
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
) {
    assert!(dst.len() >= m * n && lhs.covers(m, k) && rhs.covers(k, n));
    // SAFETY: the three operands hold the elements the strides reach (asserted above),
    // `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col as isize,
            lhs.row as isize,
            rhs.data.as_ptr(),
            rhs.col as isize,
            rhs.row as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The gradient of the input: per image and group `Wᵀ · dy`, put back by col2im.
pub(super) fn input_gradient(shape: &ConvShape, dy: &[f32], weight: &[f32]) -> Vec<f32> {
    let geometry = shape.group_geometry();
    let (in_plane, out_plane) = (geometry.in_plane(), geometry.out_plane());
    let (group_in, group_out, depth) = (geometry.c_in, geometry.c_out, geometry.depth());
    let mut dx = vec![0f32; shape.batch * shape.c_in * in_plane];
    dx.par_chunks_mut(group_in * in_plane)
        .enumerate()
        .for_each(|(index, dx)| {
            let (image, group) = (index / shape.groups, index % shape.groups);
            let dy = &dy[(image * shape.c_out + group * group_out) * out_plane..]
                [..group_out * out_plane];
            let weight = Operand::transposed(
                &weight[group * group_out * depth..(group + 1) * group_out * depth],
                depth,
            );
            let dy = Operand::rows(dy, out_plane);
            if geometry.is_direct() {
                matmul(group_in, out_plane, group_out, dx, false, weight, dy);
            } else {
                f32::with_columns(depth * out_plane, |columns| {
                    matmul(depth, out_plane, group_out, columns, false, weight, dy);
                    col2im(&geometry, columns, dx);
                });
            }
        });
    dx
}

/// Adds each im2col column back onto the input position it was read from: the
/// transpose of [`ImageConv::im2col_tile`] over a whole image.
fn col2im(geometry: &ImageConv, columns: &[f32], dx: &mut [f32]) {
    let &ImageConv {
        kernel,
        stride,
        padding,
        height,
        width,
        out_h,
        out_w,
        ..
    } = geometry;
    let out_plane = out_h * out_w;
    for (row, column_row) in columns.chunks(out_plane).enumerate() {
        let channel = row / (kernel * kernel);
        let (ky, kx) = ((row / kernel) % kernel, row % kernel);
        let plane = &mut dx[channel * height * width..(channel + 1) * height * width];
        // Output columns whose input column ox·s + kx - p lies inside the image.
        let first = padding.saturating_sub(kx).div_ceil(stride).min(out_w);
        let last = if width + padding > kx {
            ((width + padding - kx - 1) / stride + 1).min(out_w)
        } else {
            0
        };
        if first >= last {
            continue;
        }
        for oy in 0..out_h {
            let iy = oy * stride + ky;
            if iy < padding || iy - padding >= height {
                continue;
            }
            let src = &column_row[oy * out_w + first..oy * out_w + last];
            let dst = &mut plane[(iy - padding) * width..(iy - padding + 1) * width];
            let start = first * stride + kx - padding;
            if stride == 1 {
                for (d, s) in dst[start..start + src.len()].iter_mut().zip(src) {
                    *d += s;
                }
            } else {
                for (d, s) in dst[start..].iter_mut().step_by(stride).zip(src) {
                    *d += s;
                }
            }
        }
    }
}

/// The gradient of the weight: `Σ dy · rows(x)` over the batch, where `rows(x)` is the
/// im2col matrix transposed, `(pixels, kernel² · channels)`, built from the input in NHWC
/// order so that each kernel offset copies a run of channels. In that orientation both
/// GEMM operands are read in place (the `(depth, pixels)` im2col would be repacked,
/// transposed, on every call: most of the time at 16 output channels). The batch is cut
/// into a fixed number of parts (one per thread) whose sums are added in order: the same
/// bits on every run.
fn weight_gradient(shape: &ConvShape, xs: &[f32], dy: &[f32]) -> Vec<f32> {
    let geometry = shape.group_geometry();
    let (in_plane, out_plane) = (geometry.in_plane(), geometry.out_plane());
    let (group_in, group_out, depth) = (geometry.c_in, geometry.c_out, geometry.depth());
    let total = sum_over_batch(shape.batch, shape.c_out * depth, |images, dw| {
        // A 1x1 stride-1 layer's `rows(x)` is `x` transposed, which the GEMM reads in
        // place: ResNet-50's 1x1 weight gradients at batch 16 took 12-32 ms through the
        // NHWC copy and 11-13 ms this way (256->64 at 56x56: 32 against 12 ms; the two
        // alternated in one process, Zen 3, 2 threads).
        let direct = geometry.is_direct();
        let scratch = if direct {
            0
        } else {
            in_plane * group_in + out_plane * depth
        };
        f32::with_columns(scratch, |buffer| {
            for image in images {
                for group in 0..shape.groups {
                    let x = &xs[(image * shape.c_in + group * group_in) * in_plane..]
                        [..group_in * in_plane];
                    let dy = &dy[(image * shape.c_out + group * group_out) * out_plane..]
                        [..group_out * out_plane];
                    let dw = &mut dw[group * group_out * depth..][..group_out * depth];
                    let dy = Operand::rows(dy, out_plane);
                    if direct {
                        let rows = Operand::transposed(x, in_plane);
                        matmul(group_out, depth, out_plane, dw, true, dy, rows);
                        continue;
                    }
                    let (nhwc, rows) = buffer.split_at_mut(in_plane * group_in);
                    to_nhwc(x, group_in, nhwc);
                    im2row(&geometry, nhwc, rows);
                    let rows = Operand::rows(rows, depth);
                    matmul(group_out, depth, out_plane, dw, true, dy, rows);
                }
            }
        });
    });
    channels_before_taps(&total, group_in, geometry.kernel * geometry.kernel)
}

/// `Σ part(images)` over the batch cut into a fixed number of parts (one per thread),
/// each part's sum (`len` values, zeroed first) made on one thread and the sums added in
/// order: the same bits on every run.
pub(super) fn sum_over_batch(
    batch: usize,
    len: usize,
    part: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let parts = candle_core::utils::get_num_threads().clamp(1, batch.max(1));
    let part_len = batch.div_ceil(parts).max(1);
    let part_sums: Vec<Vec<f32>> = (0..batch)
        .step_by(part_len)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|first| {
            let mut sum = vec![0f32; len];
            part(first..(first + part_len).min(batch), &mut sum);
            sum
        })
        .collect();
    let mut parts = part_sums.into_iter();
    let mut total = parts.next().unwrap_or_else(|| vec![0f32; len]);
    for part in parts {
        for (t, p) in total.iter_mut().zip(part) {
            *t += p;
        }
    }
    total
}

/// A weight gradient with columns in (ky, kx, channel) order, as im2row builds them, in
/// the weight's order `(c_out, channel, ky, kx)`.
fn channels_before_taps(total: &[f32], channels: usize, taps: usize) -> Vec<f32> {
    let depth = channels * taps;
    let mut reordered = vec![0f32; total.len()];
    for (dst, src) in reordered.chunks_mut(depth).zip(total.chunks(depth)) {
        for (tap, channels) in src.chunks(channels).enumerate() {
            for (c, &v) in channels.iter().enumerate() {
                dst[c * taps + tap] = v;
            }
        }
    }
    reordered
}

/// `(channels, pixels)` -> `(pixels, channels)`, 16 pixels at a time: their rows of
/// `nhwc` (16 KiB at 256 channels) stay in L1 while every channel is written into them.
/// Channel by channel over the whole image, each write touched a different cache line:
/// 256 x 3136 took 2.97 ms, now 1.44; 512 x 784 1.34 ms, now 0.36 (Zen 3).
fn to_nhwc(x: &[f32], channels: usize, nhwc: &mut [f32]) {
    const PIXELS: usize = 16;
    let pixels = x.len() / channels.max(1);
    for first in (0..pixels).step_by(PIXELS) {
        let count = PIXELS.min(pixels - first);
        let rows = &mut nhwc[first * channels..(first + count) * channels];
        for c in 0..channels {
            let src = &x[c * pixels + first..][..count];
            for (i, &v) in src.iter().enumerate() {
                rows[i * channels + c] = v;
            }
        }
    }
}

/// The im2col matrix transposed, from an NHWC image: row (oy, ox), column
/// (ky, kx, channel) holds x[channel, oy·s + ky - p, ox·s + kx - p] (zero outside).
fn im2row(geometry: &ImageConv, nhwc: &[f32], rows: &mut [f32]) {
    let &ImageConv {
        c_in: channels,
        kernel,
        stride,
        padding,
        height,
        width,
        out_w,
        ..
    } = geometry;
    let depth = geometry.depth();
    for (pixel, row) in rows.chunks_mut(depth).enumerate() {
        let (oy, ox) = (pixel / out_w, pixel % out_w);
        for (tap, dst) in row.chunks_mut(channels).enumerate() {
            let (iy, ix) = (oy * stride + tap / kernel, ox * stride + tap % kernel);
            if iy < padding || ix < padding || iy - padding >= height || ix - padding >= width {
                dst.fill(0.0);
            } else {
                let at = ((iy - padding) * width + ix - padding) * channels;
                dst.copy_from_slice(&nhwc[at..at + channels]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The convolution's output, input gradient and weight gradient for the output
    /// gradient `r`, by the definition (seven nested loops, in f64): the oracle.
    fn by_definition(
        shape: &ConvShape,
        x: &[f32],
        w: &[f32],
        r: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let ConvShape {
            batch,
            c_in,
            height,
            width,
            c_out,
            kernel,
            stride,
            padding,
            groups,
            out_h,
            out_w,
        } = *shape;
        let (group_in, group_out) = (c_in / groups, c_out / groups);
        let mut y = vec![0f64; batch * c_out * out_h * out_w];
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; w.len()];
        for b in 0..batch {
            for o in 0..c_out {
                let g = o / group_out;
                for oy in 0..out_h {
                    for ox in 0..out_w {
                        let yi = ((b * c_out + o) * out_h + oy) * out_w + ox;
                        for i in 0..group_in {
                            for ky in 0..kernel {
                                for kx in 0..kernel {
                                    let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                                    if iy < padding
                                        || ix < padding
                                        || iy - padding >= height
                                        || ix - padding >= width
                                    {
                                        continue;
                                    }
                                    let c = g * group_in + i;
                                    let xi = ((b * c_in + c) * height + iy - padding) * width + ix
                                        - padding;
                                    let wi = ((o * group_in + i) * kernel + ky) * kernel + kx;
                                    y[yi] += x[xi] as f64 * w[wi] as f64;
                                    dx[xi] += r[yi] as f64 * w[wi] as f64;
                                    dw[wi] += r[yi] as f64 * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw)
    }

    fn check(
        input: (usize, usize, usize, usize),
        c_out: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
    ) -> Result<()> {
        let device = Device::Cpu;
        let padding = kernel / 2;
        let op = TrainConv {
            stride,
            padding,
            groups,
        };
        let xs = Var::from_tensor(&Tensor::randn(0f32, 1.0, input, &device)?)?;
        let weight_dims = (c_out, input.1 / groups, kernel, kernel);
        let weight = Var::from_tensor(&Tensor::randn(0f32, 1.0, weight_dims, &device)?)?;
        let shape = op.shape(xs.dims(), weight.dims())?;
        let ys = op.forward(xs.as_tensor(), weight.as_tensor())?;
        let r = Tensor::randn(0f32, 1.0, ys.shape(), &device)?;
        let grads = (&ys * &r)?.sum_all()?.backward()?;
        let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (y, dx, dw) = by_definition(
            &shape,
            &values(xs.as_tensor())?,
            &values(weight.as_tensor())?,
            &values(&r)?,
        );
        let case = format!("{input:?} -> {c_out}, {kernel}x{kernel}/{stride}, groups {groups}");
        let grad = |var: &Var| {
            grads
                .get(var.as_tensor())
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("{case}: no gradient")))
        };
        for (got, expected, what) in [
            (ys, y, "output"),
            (grad(&xs)?, dx, "input gradient"),
            (grad(&weight)?, dw, "weight gradient"),
        ] {
            let got = values(&got)?;
            assert_eq!(got.len(), expected.len(), "{case}: {what} size");
            let scale = expected.iter().fold(1f64, |m, v| m.max(v.abs()));
            for (g, e) in got.iter().zip(&expected) {
                let diff = (*g as f64 - e).abs();
                assert!(diff <= 1e-5 * scale, "{case}: {what} {g} vs {e}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_the_definition() -> Result<()> {
        // The ResNet layer shapes: 3x3 stride 1 and 2, 1x1 direct and strided, the 7x7
        // stem, grouped, odd sizes, a batch that does not split evenly, a 1x1 image.
        check((3, 4, 8, 8), 5, 3, 1, 1)?;
        check((3, 4, 9, 7), 6, 3, 2, 1)?;
        check((2, 6, 5, 5), 4, 1, 1, 1)?;
        check((2, 6, 7, 6), 8, 1, 2, 1)?;
        check((2, 3, 15, 13), 4, 7, 2, 1)?;
        check((3, 8, 6, 6), 8, 3, 1, 4)?;
        check((1, 8, 6, 5), 4, 3, 2, 2)?;
        check((5, 2, 1, 1), 3, 3, 1, 1)?;
        Ok(())
    }

    #[test]
    fn blocked_layers_match_the_definition() -> Result<()> {
        // Channels in sixteens: the forward (and for stride 1 the input gradient) run
        // by the blocked kernels of RESNET_CPU_ISA (or the best one): direct 3x3,
        // strided, Winograd (32 channels and more), odd sizes, a 1x1 image.
        check((2, 16, 8, 8), 32, 3, 1, 1)?;
        check((2, 32, 7, 9), 16, 3, 1, 1)?;
        check((3, 32, 6, 6), 32, 3, 1, 1)?;
        check((2, 16, 9, 7), 32, 3, 2, 1)?;
        check((3, 16, 1, 1), 16, 3, 1, 1)?;
        Ok(())
    }
}
