//! The ImageNet stem's 3x3 stride-2 max pool (padding 1) for training on the CPU (f32),
//! as PyTorch computes it: padding never wins, and a window's gradient goes to the first
//! of its maximal inputs in row-major order. The composition in [`crate::ops`] takes nine
//! padded, strided copies of the stem's largest feature map and a `maximum` each, and as
//! many again backward; this is one pass each way.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::storage::{cpu_data, f32_input};

/// `max_pool2d(x, kernel 3, stride 2, padding 1)`.
pub(crate) struct MaxPool3x3Stride2;

impl MaxPool3x3Stride2 {
    /// Whether the op runs `xs`: f32 on the CPU, NCHW.
    pub fn supports(xs: &Tensor) -> bool {
        xs.device().is_cpu() && xs.dtype() == DType::F32 && xs.rank() == 4
    }

    /// The pooling, recorded for backpropagation.
    pub fn forward(xs: &Tensor) -> Result<Tensor> {
        xs.contiguous()?.apply_op1(Self)
    }
}

/// Output size of the pool along a side of `size`.
fn pooled(size: usize) -> usize {
    (size.max(1) - 1) / 2 + 1
}

/// The input positions of output `o`'s window along one side of `size`.
fn window(o: usize, size: usize) -> std::ops::Range<usize> {
    (2 * o).saturating_sub(1)..(2 * o + 2).min(size)
}

/// Per output position of one plane: the index in the plane of its window's first maximum.
fn argmax(plane: &[f32], height: usize, width: usize, mut visit: impl FnMut(usize, usize, f32)) {
    for oy in 0..pooled(height) {
        for ox in 0..pooled(width) {
            let (mut best, mut at) = (f32::NEG_INFINITY, usize::MAX);
            for iy in window(oy, height) {
                for ix in window(ox, width) {
                    let v = plane[iy * width + ix];
                    // As PyTorch: a larger value or a NaN takes the window.
                    if at == usize::MAX || v > best || v.is_nan() {
                        (best, at) = (v, iy * width + ix);
                        if v.is_nan() {
                            break;
                        }
                    }
                }
            }
            visit(oy * pooled(width) + ox, at, best);
        }
    }
}

impl CustomOp1 for MaxPool3x3Stride2 {
    fn name(&self) -> &'static str {
        "max-pool-3x3-stride-2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = layout.shape().dims4()?;
        if height == 0 || width == 0 {
            bail!("max pool: empty {height}x{width} input");
        }
        let xs = f32_input(storage, layout, "max pool")?;
        let (out_h, out_w) = (pooled(height), pooled(width));
        let mut ys = vec![0f32; batch * channels * out_h * out_w];
        ys.par_chunks_mut(out_h * out_w)
            .zip(xs.par_chunks(height * width))
            .for_each(|(ys, plane)| argmax(plane, height, width, |o, _, v| ys[o] = v));
        Ok((
            CpuStorage::F32(ys),
            Shape::from((batch, channels, out_h, out_w)),
        ))
    }

    fn bwd(&self, xs: &Tensor, _ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, height, width) = xs.dims4()?;
        let (out_h, out_w) = (pooled(height), pooled(width));
        let grad = grad.contiguous()?;
        let (grad_storage, grad_layout) = grad.storage_and_layout();
        let dy = cpu_data::<f32>(&grad_storage, grad_layout)?;
        let (xs_storage, xs_layout) = xs.storage_and_layout();
        let x = cpu_data::<f32>(&xs_storage, xs_layout)?;
        if dy.len() * height * width != x.len() * out_h * out_w {
            bail!(
                "max pool backward: gradient {:?} for input {:?}",
                grad.dims(),
                xs.dims()
            );
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(height * width)
            .zip(
                x.par_chunks(height * width)
                    .zip(dy.par_chunks(out_h * out_w)),
            )
            .for_each(|(dx, (plane, dy))| {
                argmax(plane, height, width, |o, at, _| dx[at] += dy[o]);
            });
        Ok(Some(Tensor::from_vec(dx, xs.shape(), xs.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candles_pool_and_routes_the_gradient_to_the_first_maximum() -> Result<()> {
        let device = Device::Cpu;
        for (h, w) in [(8, 8), (7, 9), (1, 2), (16, 11), (1, 1)] {
            let xs = Tensor::randn(0f32, 1.0, (2, 3, h, w), &device)?;
            // -inf padding, as PyTorch's max pool.
            let padded = xs
                .pad_with_same(2, 1, 1)?
                .pad_with_same(3, 1, 1)?
                .max_pool2d_with_stride(3, 2)?;
            let ours = MaxPool3x3Stride2::forward(&xs)?;
            assert_eq!(ours.dims(), padded.dims(), "{h}x{w}");
            let diff = (&ours - padded)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{h}x{w}");
        }
        // Ties: a plane of equal values gives each window's gradient to its first input.
        let xs = Var::from_tensor(&Tensor::ones((1, 1, 4, 4), DType::F32, &device)?)?;
        let grads = MaxPool3x3Stride2::forward(xs.as_tensor())?
            .sum_all()?
            .backward()?;
        let grad = grads
            .get(xs.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // The four windows start at (0, 0), (0, 1), (1, 0) and (1, 1).
        let expected = [
            1., 1., 0., 0., //
            1., 1., 0., 0., //
            0., 0., 0., 0., //
            0., 0., 0., 0.,
        ];
        assert_eq!(grad, expected);
        Ok(())
    }
}
