//! Max pooling on blocked activations (the ImageNet stem's 3x3/2).

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::LANES;
use crate::cpu::storage::f32_input;

/// Max pooling on blocked `(N, C/16, H, W, 16)` f32: PyTorch's (padding never wins),
/// or with `zero_padded` Keras' (`ZeroPadding2D` first: padding is a zero).
pub(crate) fn max_pool(
    xs: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    zero_padded: bool,
) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&MaxPool {
        kernel,
        stride,
        padding,
        zero_padded,
    })
}

struct MaxPool {
    kernel: usize,
    stride: usize,
    padding: usize,
    zero_padded: bool,
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "blocked-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = f32_input(storage, layout, "blocked max pool")?;
        let (batch, blocks, height, width, lanes) = layout.shape().dims5()?;
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if lanes != LANES || k == 0 || s == 0 || p >= k || height + 2 * p < k || width + 2 * p < k {
            bail!(
                "blocked max pool: {k}x{k}/{s} pad {p} on {:?}",
                layout.shape().dims()
            );
        }
        let out = |size: usize| (size + 2 * p - k) / s + 1;
        // The window's rows or columns inside the image.
        let window =
            move |o: usize, size: usize| (o * s).saturating_sub(p)..(o * s + k - p).min(size);
        let zero_padded = self.zero_padded;
        // A window cut by the edge holds fewer than k² pixels: with zero padding, one of
        // the others is a zero.
        let finish = move |max: f32, count: usize| {
            if zero_padded && count < k * k {
                max.max(0.0)
            } else {
                max
            }
        };
        Ok(pool_planes(
            input,
            (batch, blocks, height, width),
            (out(height), out(width)),
            window,
            (f32::NEG_INFINITY, f32::max, finish),
        ))
    }
}

/// ResNet-D's shortcut pool on blocked `(N, C/16, H, W, 16)` f32: 2x2 windows at
/// `stride`, ceil mode, a window cut by the edge averaging what it holds (PyTorch's
/// `AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`).
pub(crate) fn avg_pool_2x2_ceil(xs: &Tensor, stride: usize) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&AvgPool { stride })
}

struct AvgPool {
    stride: usize,
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "blocked-avg-pool-2x2-ceil"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = f32_input(storage, layout, "blocked average pool")?;
        let (batch, blocks, height, width, lanes) = layout.shape().dims5()?;
        let s = self.stride;
        if lanes != LANES || s == 0 || height == 0 || width == 0 {
            bail!(
                "blocked average pool: stride {s} on {:?}",
                layout.shape().dims()
            );
        }
        let out = |size: usize| size.saturating_sub(2).div_ceil(s) + 1;
        let window = move |o: usize, size: usize| o * s..(o * s + 2).min(size);
        Ok(pool_planes(
            input,
            (batch, blocks, height, width),
            (out(height), out(width)),
            window,
            (0.0, |sum, v| sum + v, |sum, count| sum / count as f32),
        ))
    }
}

/// A pooling of every `(H, W, 16)` plane: output pixel `(oy, ox)` reduces the input
/// pixels of rows `window(oy, H)` and columns `window(ox, W)`, lane by lane: `start`,
/// `combine` each value in, `finish` with the window's pixel count.
fn pool_planes(
    input: &[f32],
    (batch, blocks, height, width): (usize, usize, usize, usize),
    (out_h, out_w): (usize, usize),
    window: impl Fn(usize, usize) -> std::ops::Range<usize> + Sync,
    (start, combine, finish): (
        f32,
        impl Fn(f32, f32) -> f32 + Sync,
        impl Fn(f32, usize) -> f32 + Sync,
    ),
) -> (CpuStorage, Shape) {
    let mut output = vec![0.0f32; batch * blocks * out_h * out_w * LANES];
    output
        .par_chunks_mut(out_h * out_w * LANES)
        .zip(input.par_chunks(height * width * LANES))
        .for_each(|(dst, src)| {
            for oy in 0..out_h {
                let rows = window(oy, height);
                for ox in 0..out_w {
                    let cols = window(ox, width);
                    let mut lanes = [start; LANES];
                    for y in rows.clone() {
                        for x in cols.clone() {
                            let at = (y * width + x) * LANES;
                            for (m, &v) in lanes.iter_mut().zip(&src[at..at + LANES]) {
                                *m = combine(*m, v);
                            }
                        }
                    }
                    let count = rows.len() * cols.len();
                    let at = (oy * out_w + ox) * LANES;
                    for (d, m) in dst[at..at + LANES].iter_mut().zip(lanes) {
                        *d = finish(m, count);
                    }
                }
            }
        });
    (
        CpuStorage::F32(output),
        Shape::from((batch, blocks, out_h, out_w, LANES)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::blocked::layout::{from_blocked, test_values as values, to_blocked};
    use candle_core::{DType, Device, D};

    #[test]
    fn avg_pool_matches_the_composition() -> Result<()> {
        for (height, width, stride) in [(1, 1, 2), (3, 5, 2), (8, 8, 2), (7, 6, 1), (56, 56, 2)] {
            let x = Tensor::from_vec(
                values(2 * 32 * height * width, 9),
                (2, 32, height, width),
                &Device::Cpu,
            )?;
            let expected = crate::ops::avg_pool_2x2_ceil(&x, stride)?;
            let got = from_blocked(&avg_pool_2x2_ceil(&to_blocked(&x)?, stride)?)?;
            assert_eq!(got.dims(), expected.dims());
            let difference = (got - expected)?.abs()?.flatten_all()?.max(D::Minus1)?;
            assert!(
                difference.to_scalar::<f32>()? < 1e-6,
                "{height}x{width}/{stride}"
            );
        }
        Ok(())
    }

    #[test]
    fn max_pool_matches_candle() -> Result<()> {
        let device = Device::Cpu;
        for (height, width) in [(1, 1), (2, 3), (7, 8), (112, 112)] {
            let x = Tensor::from_vec(
                values(2 * 32 * height * width, 7),
                (2, 32, height, width),
                &device,
            )?;
            // candle pools without padding: pad with -inf, as PyTorch does.
            let padded = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
            let minus_infinity = Tensor::full(f32::NEG_INFINITY, padded.dims(), &device)?;
            let inside = Tensor::ones(x.dims(), DType::U8, &device)?
                .pad_with_zeros(2, 1, 1)?
                .pad_with_zeros(3, 1, 1)?;
            let expected = inside
                .where_cond(&padded, &minus_infinity)?
                .max_pool2d_with_stride(3, 2)?;
            let got = from_blocked(&max_pool(&to_blocked(&x)?, 3, 2, 1, false)?)?;
            assert_eq!(got.dims(), expected.dims());
            let difference = (got - expected)?.abs()?.flatten_all()?.max(D::Minus1)?;
            assert_eq!(difference.to_scalar::<f32>()?, 0.0, "{height}x{width}");
            // Keras: zero padding, then no padding.
            let expected = x
                .pad_with_zeros(2, 1, 1)?
                .pad_with_zeros(3, 1, 1)?
                .max_pool2d_with_stride(3, 2)?;
            let got = from_blocked(&max_pool(&to_blocked(&x)?, 3, 2, 1, true)?)?;
            let difference = (&got - &expected)?.abs()?.flatten_all()?.max(D::Minus1)?;
            assert_eq!(
                difference.to_scalar::<f32>()?,
                0.0,
                "zero-padded {height}x{width}"
            );
            let views = crate::ops::max_pool_3x3_stride2_zero_padded(&x)?;
            let difference = (&views - &expected)?.abs()?.flatten_all()?.max(D::Minus1)?;
            assert_eq!(
                difference.to_scalar::<f32>()?,
                0.0,
                "views {height}x{width}"
            );
        }
        Ok(())
    }
}
