//! Squeeze-and-excitation on blocked activations: the per-channel means (the squeeze) and
//! `relu(x · gate + residual)` (the gate applied, with the block's residual add and ReLU),
//! one pass over the map each. The two small dense layers between them stay candle
//! matmuls on `(N, C)`.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::LANES;
use crate::cpu::storage::f32_input;

/// The mean of every channel of a blocked `(N, C/16, H, W, 16)` f32 map: `(N, C)`.
pub(crate) fn channel_means(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&ChannelMeans)
}

/// `relu(xs · gate + residual)` on blocked `xs` and `residual`, `gate` `(N, C)`.
pub(crate) fn scale_add_relu(xs: &Tensor, gate: &Tensor, residual: &Tensor) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op3_no_bwd(&gate.contiguous()?, &residual.contiguous()?, &ScaleAddRelu)
}

struct ChannelMeans;

impl CustomOp1 for ChannelMeans {
    fn name(&self) -> &'static str {
        "blocked-channel-means"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_input(storage, layout, "blocked channel means")?;
        let (batch, blocks, height, width, lanes) = layout.shape().dims5()?;
        if lanes != LANES || height * width == 0 {
            bail!("blocked channel means on {:?}", layout.shape().dims());
        }
        let plane = height * width * LANES;
        let mut means = vec![0f32; batch * blocks * LANES];
        means
            .par_chunks_mut(LANES)
            .zip(xs.par_chunks(plane))
            .for_each(|(mean, plane)| {
                let mut sum = [0f64; LANES];
                for pixel in plane.chunks_exact(LANES) {
                    for (s, &v) in sum.iter_mut().zip(pixel) {
                        *s += f64::from(v);
                    }
                }
                for (m, s) in mean.iter_mut().zip(sum) {
                    *m = (s / (height * width) as f64) as f32;
                }
            });
        Ok((CpuStorage::F32(means), Shape::from((batch, blocks * LANES))))
    }
}

struct ScaleAddRelu;

impl CustomOp3 for ScaleAddRelu {
    fn name(&self) -> &'static str {
        "blocked-scale-add-relu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        gate: &CpuStorage,
        gate_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_input(xs, xs_layout, "blocked excitation")?;
        let gate = f32_input(gate, gate_layout, "blocked excitation gate")?;
        let residual = f32_input(residual, residual_layout, "blocked excitation residual")?;
        let (batch, blocks, height, width, lanes) = xs_layout.shape().dims5()?;
        if lanes != LANES
            || gate.len() != batch * blocks * LANES
            || residual_layout.shape() != xs_layout.shape()
        {
            bail!(
                "blocked excitation: map {:?}, gate of {}, residual {:?}",
                xs_layout.shape().dims(),
                gate.len(),
                residual_layout.shape().dims()
            );
        }
        let plane = (height * width * LANES).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(plane)
            .zip(x.par_chunks(plane).zip(residual.par_chunks(plane)))
            .zip(gate.par_chunks(LANES))
            .for_each(|((out, (x, r)), gate)| {
                for ((o, x), r) in out
                    .chunks_exact_mut(LANES)
                    .zip(x.chunks_exact(LANES))
                    .zip(r.chunks_exact(LANES))
                {
                    for lane in 0..LANES {
                        o[lane] = (x[lane] * gate[lane] + r[lane]).max(0.0);
                    }
                }
            });
        Ok((CpuStorage::F32(out), xs_layout.shape().clone()))
    }
}
