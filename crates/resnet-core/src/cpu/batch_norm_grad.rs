//! Training-mode BatchNorm, with the residual add and ReLU after it, on the CPU (f32) as
//! one op: `relu(bn(x) + residual)`, residual and ReLU optional.
//!
//! As candle ops, a train-mode BatchNorm is a dozen passes over the feature map forward
//! (transpose, mean, subtract, square, mean, scale, shift, conversions) and about twice
//! that backward, each allocating a new tensor; the add and the ReLU add a few more. Here:
//! one pass for the statistics, one for the output; backward one to mask the gradient by
//! the ReLU, one for the per-channel sums, one for the input's gradient. Per-channel sums
//! run in f32 lanes added in f64, in a fixed order.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::storage::{cpu_data, f32_input};

/// `relu?((x - mean) / sqrt(var + eps) * weight + bias (+ residual))` with the batch's
/// statistics; its inputs `x`, `affine` (`weight` and `bias` stacked, `(2, C)`) and the
/// residual if there is one.
pub(crate) struct BatchNormTrain {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    relu: bool,
}

/// What [`batch_norm_train`] returns.
pub(crate) struct Normalised {
    /// The normalised (and rectified) feature map, recorded for backpropagation.
    pub ys: Tensor,
    /// The batch mean per channel (detached).
    pub mean: Tensor,
    /// The biased batch variance per channel (detached).
    pub biased_var: Tensor,
}

/// Whether [`batch_norm_train`] runs these tensors: f32 on the CPU, NCHW.
pub(crate) fn supports(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    xs.device().is_cpu()
        && xs.rank() == 4
        && [xs, weight, bias].iter().all(|t| t.dtype() == DType::F32)
}

/// Train-mode BatchNorm over `xs` `(N, C, H, W)`, then `+ residual` if given, then a
/// ReLU if `relu`.
pub(crate) fn batch_norm_train(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    eps: f64,
    relu: bool,
) -> Result<Normalised> {
    let xs = xs.contiguous()?;
    let (batch, channels, height, width) = xs.dims4()?;
    if weight.dims() != [channels] || bias.dims() != [channels] {
        bail!(
            "BatchNorm: weight {:?} and bias {:?} for {channels} channels",
            weight.dims(),
            bias.dims()
        );
    }
    let plane = height * width;
    let (mean, biased_var) = {
        let (storage, layout) = xs.storage_and_layout();
        let data = cpu_data::<f32>(&storage, layout)?;
        statistics(data, batch, channels, plane)
    };
    let inv_std = biased_var
        .iter()
        .map(|v| (1.0 / (v + eps).sqrt()) as f32)
        .collect();
    let device = xs.device();
    let to_f32 = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<_>>();
    let mean_tensor = Tensor::from_vec(to_f32(&mean), channels, device)?;
    let var_tensor = Tensor::from_vec(to_f32(&biased_var), channels, device)?;
    let op = BatchNormTrain {
        mean: to_f32(&mean),
        inv_std,
        relu,
    };
    let affine = Tensor::stack(&[weight, bias], 0)?;
    let ys = match residual {
        Some(residual) => {
            if residual.dims() != xs.dims() || residual.dtype() != DType::F32 {
                bail!(
                    "BatchNorm: residual {:?} {:?} for input {:?}",
                    residual.dims(),
                    residual.dtype(),
                    xs.dims()
                );
            }
            xs.apply_op3(&affine, &residual.contiguous()?, op)?
        }
        None => xs.apply_op2(&affine, op)?,
    };
    Ok(Normalised {
        ys,
        mean: mean_tensor,
        biased_var: var_tensor,
    })
}

/// Per channel: the mean and the biased variance (two passes).
fn statistics(xs: &[f32], batch: usize, channels: usize, plane: usize) -> (Vec<f64>, Vec<f64>) {
    let count = (batch * plane).max(1) as f64;
    let planes = |c: usize| (0..batch).map(move |b| &xs[(b * channels + c) * plane..][..plane]);
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let mean = planes(c).map(|p| lane_sum(p, |x| x)).sum::<f64>() / count;
            let m = mean as f32;
            let squares: f64 = planes(c).map(|p| lane_sum(p, |x| (x - m) * (x - m))).sum();
            (mean, biased_variance(squares, count, mean))
        })
        .unzip()
}

/// The biased variance from `Σ (x − m)²` over `count` values, `m` the f64 `mean` rounded
/// to f32 (what the squares were taken around): that rounding corrected, exactly as a
/// two-pass in f64 would.
pub(super) fn biased_variance(squares: f64, count: f64, mean: f64) -> f64 {
    let shift = mean - (mean as f32) as f64;
    (squares / count - shift * shift).max(0.0)
}

/// `Σ f(x)` over a slice in 16 f32 lanes (so that it vectorises), the lanes added in
/// f64: a plane of a few thousand values loses nothing that matters to f32 training.
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    lane_sum2(xs, xs, |x, _| f(x))
}

/// `Σ f(a, b)` over two slices of equal length, as [`lane_sum`].
fn lane_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(&x, &y)| f(x, y) as f64)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            lanes[i] += f(a[i], b[i]);
        }
    }
    lanes.iter().map(|&v| v as f64).sum::<f64>() + tail
}

impl BatchNormTrain {
    fn forward(
        &self,
        xs: (&CpuStorage, &Layout),
        affine: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, channels, height, width) = xs.1.shape().dims4()?;
        let shape = xs.1.shape().clone();
        let xs = f32_input(xs.0, xs.1, "BatchNorm")?;
        let affine = f32_input(affine.0, affine.1, "BatchNorm")?;
        let residual = residual
            .map(|(storage, layout)| f32_input(storage, layout, "BatchNorm residual"))
            .transpose()?;
        if self.mean.len() != channels
            || affine.len() != 2 * channels
            || residual.is_some_and(|r| r.len() != xs.len())
        {
            bail!("BatchNorm: parameters or residual do not match input {shape:?}");
        }
        let (weight, bias) = affine.split_at(channels);
        let plane = (height * width).max(1);
        let mut ys = vec![0f32; xs.len()];
        ys.par_chunks_mut(plane)
            .zip(xs.par_chunks(plane))
            .enumerate()
            .for_each(|(index, (ys, xs))| {
                let c = index % channels;
                let scale = weight[c] * self.inv_std[c];
                let shift = bias[c] - self.mean[c] * scale;
                for (y, &x) in ys.iter_mut().zip(xs) {
                    *y = x * scale + shift;
                }
                if let Some(residual) = residual {
                    for (y, &r) in ys.iter_mut().zip(&residual[index * plane..]) {
                        *y += r;
                    }
                }
                if self.relu {
                    for y in ys.iter_mut() {
                        *y = y.max(0.0);
                    }
                }
            });
        Ok((CpuStorage::F32(ys), shape))
    }

    /// The gradients of the input, of `affine` and of the residual (the gradient that
    /// passed the ReLU), each only where its tensor tracks one.
    fn backward(
        &self,
        xs: &Tensor,
        affine: &Tensor,
        ys: &Tensor,
        grad: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, channels, height, width) = xs.dims4()?;
        let plane = (height * width).max(1);
        let count = (batch * height * width).max(1) as f64;
        let grad = grad.contiguous()?;
        let (grad_storage, grad_layout) = grad.storage_and_layout();
        let dy = cpu_data::<f32>(&grad_storage, grad_layout)?;
        let (xs_storage, xs_layout) = xs.storage_and_layout();
        let x = cpu_data::<f32>(&xs_storage, xs_layout)?;
        let (ys_storage, ys_layout) = ys.storage_and_layout();
        let y = cpu_data::<f32>(&ys_storage, ys_layout)?;
        let (affine_storage, affine_layout) = affine.storage_and_layout();
        let gamma = &cpu_data::<f32>(&affine_storage, affine_layout)?[..channels];
        if dy.len() != x.len() || y.len() != x.len() {
            bail!(
                "BatchNorm backward: gradient {:?} for input {:?}",
                grad.dims(),
                xs.dims()
            );
        }
        // The gradient reaching the sum: the ReLU passes it where it was open.
        let masked = if self.relu {
            let mut masked = vec![0f32; dy.len()];
            masked
                .par_chunks_mut(plane)
                .zip(dy.par_chunks(plane).zip(y.par_chunks(plane)))
                .for_each(|(m, (dy, y))| {
                    for ((m, &g), &y) in m.iter_mut().zip(dy).zip(y) {
                        *m = if y > 0.0 { g } else { 0.0 };
                    }
                });
            Some(masked)
        } else {
            None
        };
        let dy = masked.as_deref().unwrap_or(dy);
        // Per channel: Σ dy and Σ dy · x̂ = inv_std · Σ dy · (x - mean).
        let (sum_dy, sum_dy_xhat): (Vec<f64>, Vec<f64>) = (0..channels)
            .into_par_iter()
            .map(|c| {
                let mean = self.mean[c];
                let (mut sum, mut dot) = (0f64, 0f64);
                for b in 0..batch {
                    let at = (b * channels + c) * plane;
                    let (dy, x) = (&dy[at..at + plane], &x[at..at + plane]);
                    sum += lane_sum(dy, |g| g);
                    dot += lane_sum2(dy, x, |g, x| g * (x - mean));
                }
                (sum, dot * self.inv_std[c] as f64)
            })
            .unzip();
        let grad_xs = if xs.track_op() {
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(plane)
                .enumerate()
                .for_each(|(index, dx)| {
                    let c = index % channels;
                    let (mean, inv_std) = (self.mean[c], self.inv_std[c]);
                    let scale = gamma[c] * inv_std;
                    let mean_dy = (sum_dy[c] / count) as f32;
                    let mean_dy_xhat = (sum_dy_xhat[c] / count) as f32;
                    let start = index * plane;
                    let (dy, x) = (&dy[start..start + plane], &x[start..start + plane]);
                    for ((d, &g), &x) in dx.iter_mut().zip(dy).zip(x) {
                        let xhat = (x - mean) * inv_std;
                        *d = scale * (g - mean_dy - xhat * mean_dy_xhat);
                    }
                });
            Some(Tensor::from_vec(dx, xs.shape(), xs.device())?)
        } else {
            None
        };
        let grad_affine = if affine.track_op() {
            let values = sum_dy_xhat
                .iter()
                .chain(&sum_dy)
                .map(|&v| v as f32)
                .collect();
            Some(Tensor::from_vec(values, (2, channels), affine.device())?)
        } else {
            None
        };
        let grad_residual = match residual {
            Some(residual) if residual.track_op() => Some(match masked {
                Some(masked) => Tensor::from_vec(masked, xs.shape(), xs.device())?,
                None => grad.clone(),
            }),
            _ => None,
        };
        Ok((grad_xs, grad_affine, grad_residual))
    }
}

impl CustomOp2 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        affine: &CpuStorage,
        affine_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((xs, xs_layout), (affine, affine_layout), None)
    }

    fn bwd(
        &self,
        xs: &Tensor,
        affine: &Tensor,
        ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_xs, grad_affine, _) = self.backward(xs, affine, ys, grad, None)?;
        Ok((grad_xs, grad_affine))
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-add-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        affine: &CpuStorage,
        affine_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(
            (xs, xs_layout),
            (affine, affine_layout),
            Some((residual, residual_layout)),
        )
    }

    fn bwd(
        &self,
        xs: &Tensor,
        affine: &Tensor,
        residual: &Tensor,
        ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(xs, affine, ys, grad, Some(residual))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The op against the same BatchNorm (and ReLU) written as candle ops.
    #[test]
    fn matches_the_composition_forward_and_backward() -> Result<()> {
        let device = Device::Cpu;
        for (relu, with_residual) in [(false, false), (true, false), (false, true), (true, true)] {
            let (n, c, h, w) = (3, 4, 5, 6);
            let xs = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (n, c, h, w), &device)? + 0.5)?)?;
            let weight = Var::from_tensor(&Tensor::randn(1f32, 0.5, c, &device)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &device)?)?;
            let eps = 1e-5;
            let residual = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, h, w), &device)?)?;
            let residual = with_residual.then_some(residual.as_tensor());
            let ours = batch_norm_train(
                xs.as_tensor(),
                weight.as_tensor(),
                bias.as_tensor(),
                residual,
                eps,
                relu,
            )?;

            let per_channel = xs.as_tensor().transpose(0, 1)?.reshape((c, n * h * w))?;
            let mean = per_channel.mean_keepdim(D::Minus1)?;
            let var = per_channel
                .broadcast_sub(&mean)?
                .sqr()?
                .mean_keepdim(D::Minus1)?;
            let shape = (1, c, 1, 1);
            let mut theirs = xs
                .as_tensor()
                .broadcast_sub(&mean.reshape(shape)?)?
                .broadcast_div(&(var.reshape(shape)? + eps)?.sqrt()?)?
                .broadcast_mul(&weight.as_tensor().reshape(shape)?)?
                .broadcast_add(&bias.as_tensor().reshape(shape)?)?;
            if let Some(residual) = residual {
                theirs = (theirs + residual)?;
            }
            if relu {
                theirs = theirs.relu()?;
            }
            let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-5,
                    "relu {relu}, residual {with_residual}: {what} differs by {diff}"
                );
                Ok(())
            };
            close(&ours.ys, &theirs, "output")?;
            close(&ours.mean, &mean.flatten_all()?, "mean")?;
            close(&ours.biased_var, &var.flatten_all()?, "variance")?;

            let r = Tensor::randn(0f32, 1.0, (n, c, h, w), &device)?;
            let ours = (ours.ys * &r)?.sum_all()?.backward()?;
            let theirs = (theirs * &r)?.sum_all()?.backward()?;
            let mut checked = vec![(xs.as_tensor(), "input"), (weight.as_tensor(), "weight")];
            checked.push((bias.as_tensor(), "bias"));
            if let Some(residual) = residual {
                checked.push((residual, "residual"));
            }
            for (var, what) in checked {
                let get = |grads: &candle_core::backprop::GradStore| {
                    grads
                        .get(var)
                        .cloned()
                        .ok_or_else(|| candle_core::Error::Msg(format!("no {what} gradient")))
                };
                close(&get(&ours)?, &get(&theirs)?, what)?;
            }
        }
        Ok(())
    }
}
