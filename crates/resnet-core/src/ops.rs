//! Differentiable forms of the two operations candle 0.11's autograd refuses (max
//! pooling, and average pooling whose kernel differs from its stride), written as
//! compositions of ops that have a backward on every candle device. The folded inference
//! path has its own kernels; these serve the unfolded network, which trains.

use candle_core::{Result, Tensor};

use crate::cpu::max_pool_grad::MaxPool3x3Stride2;

/// `xs[:, :, ::stride, ::stride]` of an NCHW tensor (exactly), by a reshape: the option-A
/// shortcut's subsampling.
pub fn subsample(xs: &Tensor, stride: usize) -> Result<Tensor> {
    if stride <= 1 {
        return Ok(xs.clone());
    }
    let (n, c, h, w) = xs.dims4()?;
    let (rows, cols) = (h.div_ceil(stride), w.div_ceil(stride));
    // Padded at the end to whole multiples of the stride; the padding is never selected.
    xs.pad_with_zeros(2, 0, rows * stride - h)?
        .pad_with_zeros(3, 0, cols * stride - w)?
        .reshape((n, c, rows, stride, cols, stride))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, rows, cols))
}

/// The ImageNet stem's 3x3 max pool with stride 2 and padding 1, PyTorch's (padding
/// never wins). f32 on the CPU runs one kernel, PyTorch's pooling exactly (the gradient
/// to a window's first maximum); elsewhere the maximum of its nine strided views, where
/// two inputs tying for a window's maximum split the gradient.
pub fn max_pool_3x3_stride2(xs: &Tensor) -> Result<Tensor> {
    if MaxPool3x3Stride2::supports(xs) {
        return MaxPool3x3Stride2::forward(xs);
    }
    max_of_views(xs, false)
}

/// Keras' stem pool: `ZeroPadding2D(1)` then a 3x3 max pool of stride 2, so a window
/// at the edge never goes below zero. Equal to [`max_pool_3x3_stride2`] after a ReLU.
pub fn max_pool_3x3_stride2_zero_padded(xs: &Tensor) -> Result<Tensor> {
    max_of_views(xs, true)
}

/// The 3x3/2 max pool as the maximum of nine strided views of the input padded by one
/// (zeros, or a value that never wins), differentiable on every device.
fn max_of_views(xs: &Tensor, zero_padded: bool) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    let (out_h, out_w) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // One row and column of padding before; after, enough for every view to be whole.
    let pad = |t: &Tensor| -> Result<Tensor> {
        t.pad_with_zeros(2, 1, 2 * out_h + 1 - h)?
            .pad_with_zeros(3, 1, 2 * out_w + 1 - w)
    };
    let mut padded = pad(xs)?;
    if !zero_padded {
        // 0 inside, the most negative f32 in the padding (-inf once in f16).
        let inside = pad(&Tensor::ones(
            xs.shape(),
            candle_core::DType::F32,
            xs.device(),
        )?)?;
        let lowest = inside.affine(f32::MAX.into(), f32::MIN.into())?;
        padded = (padded + lowest.to_dtype(xs.dtype())?)?;
    }
    let mut pooled: Option<Tensor> = None;
    for dy in 0..3 {
        for dx in 0..3 {
            let view = padded.narrow(2, dy, 2 * out_h)?.narrow(3, dx, 2 * out_w)?;
            let view = subsample(&view, 2)?;
            pooled = Some(match pooled {
                None => view,
                Some(max) => max.maximum(&view)?,
            });
        }
    }
    pooled.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))
}

/// ResNet-D's shortcut pool: PyTorch's `AvgPool2d(2, stride, ceil_mode=True,
/// count_include_pad=False)` on an NCHW tensor, differentiable on every device: the 2x2
/// windows at `stride` (only 2 and 1 occur; any stride works), a window cut by the edge
/// averaging the values it holds. f32 on the CPU and others alike: sums of strided views
/// divided by each window's count.
pub fn avg_pool_2x2_ceil(xs: &Tensor, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    if stride == 0 || h == 0 || w == 0 {
        candle_core::bail!("average pool: stride {stride} on {h}x{w}");
    }
    // ceil_mode: a last window may start at the last row/column, never beyond.
    let out = |size: usize| (size.saturating_sub(2)).div_ceil(stride) + 1;
    let (out_h, out_w) = (out(h), out(w));
    // Zero rows/columns after, so that every window is whole; counts say how many count.
    let (pad_h, pad_w) = ((out_h - 1) * stride + 2 - h, (out_w - 1) * stride + 2 - w);
    let padded = xs
        .pad_with_zeros(2, 0, pad_h)?
        .pad_with_zeros(3, 0, pad_w)?;
    let mut sum: Option<Tensor> = None;
    for dy in 0..2 {
        for dx in 0..2 {
            let view = padded.narrow(2, dy, (out_h - 1) * stride + 1)?.narrow(
                3,
                dx,
                (out_w - 1) * stride + 1,
            )?;
            let view = subsample(&view, stride)?;
            sum = Some(match sum {
                None => view,
                Some(total) => (total + view)?,
            });
        }
    }
    let sum = sum.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))?;
    let inside = |o: usize, size: usize| (2.min(size - o * stride)) as f32;
    let counts: Vec<f32> = (0..out_h)
        .flat_map(|oy| (0..out_w).map(move |ox| inside(oy, h) * inside(ox, w)))
        .collect();
    let counts =
        Tensor::from_vec(counts, (1, 1, out_h, out_w), xs.device())?.to_dtype(xs.dtype())?;
    sum.broadcast_div(&counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn subsample_is_strided_slicing() -> Result<()> {
        for (h, w, stride) in [(8, 8, 2), (7, 5, 2), (1, 1, 2), (9, 10, 3)] {
            let xs = Tensor::arange(0f32, (2 * 3 * h * w) as f32, &Device::Cpu)?
                .reshape((2, 3, h, w))?;
            let expected = xs.avg_pool2d_with_stride(1, stride)?;
            let got = subsample(&xs, stride)?;
            assert_eq!(got.dims(), expected.dims());
            let diff = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{h}x{w}/{stride}");
        }
        Ok(())
    }

    /// Against PyTorch's `AvgPool2d(2, s, ceil_mode=True, count_include_pad=False)` as
    /// written out by hand: even and odd sizes, strides 2 and 1.
    #[test]
    fn avg_pool_ceil_averages_what_each_window_holds() -> Result<()> {
        let xs = Tensor::arange(0f32, 15.0, &Device::Cpu)?.reshape((1, 1, 3, 5))?;
        let pooled = avg_pool_2x2_ceil(&xs, 2)?.flatten_all()?.to_vec1::<f32>()?;
        // Rows {0,1} and {2}; columns {0,1}, {2,3}, {4}.
        let expected = [3.0, 5.0, 6.5, 10.5, 12.5, 14.0];
        assert_eq!(pooled, expected);
        let stride1 = avg_pool_2x2_ceil(&xs, 1)?;
        assert_eq!(stride1.dims(), &[1, 1, 2, 4]);
        assert_eq!(stride1.flatten_all()?.to_vec1::<f32>()?[0], 3.0);
        let even = Tensor::rand(0f32, 1.0, (2, 3, 8, 6), &Device::Cpu)?;
        let diff = (avg_pool_2x2_ceil(&even, 2)? - even.avg_pool2d(2)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        let xs = Var::from_tensor(&xs)?;
        let grads = avg_pool_2x2_ceil(xs.as_tensor(), 2)?
            .sum_all()?
            .backward()?;
        let grad = grads
            .get(xs.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
        // Each window hands out 1 in equal parts: the sum is the number of windows.
        assert!((grad.sum_all()?.to_scalar::<f32>()? - 6.0).abs() < 1e-5);
        Ok(())
    }

    /// f32 runs the CPU kernel, f64 the composition: both as candle's pool, both with
    /// a gradient.
    #[test]
    fn max_pool_matches_candle_and_has_a_gradient() -> Result<()> {
        for dtype in [candle_core::DType::F32, candle_core::DType::F64] {
            for (h, w) in [(8, 8), (7, 9), (1, 2), (16, 11)] {
                let xs = Tensor::rand(0f32, 1.0, (2, 3, h, w), &Device::Cpu)?.to_dtype(dtype)?;
                let expected = xs
                    .pad_with_zeros(2, 1, 1)?
                    .pad_with_zeros(3, 1, 1)?
                    .max_pool2d_with_stride(3, 2)?;
                let got = max_pool_3x3_stride2(&xs)?;
                assert_eq!(got.dims(), expected.dims(), "{h}x{w}");
                let diff = (&got - expected)?.abs()?.max_all()?;
                let diff = diff.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                assert_eq!(diff, 0.0, "{h}x{w} {dtype:?}");
            }
            // Each output's gradient reaches the one input that is its maximum.
            let xs = Tensor::rand(0f32, 1.0, (1, 1, 6, 6), &Device::Cpu)?.to_dtype(dtype)?;
            let xs = Var::from_tensor(&xs)?;
            let grads = max_pool_3x3_stride2(xs.as_tensor())?
                .sum_all()?
                .backward()?;
            let grad = grads
                .get(xs.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
            let total = grad.sum_all()?.to_dtype(candle_core::DType::F64)?;
            assert_eq!(total.to_scalar::<f64>()?, 9.0, "{dtype:?}");
        }
        Ok(())
    }
}
