//! Training's residual blocks on the CPU (f32) as one autograd node: a run of
//! consecutive blocks, their convolutions, BatchNorms, ReLUs and shortcuts (identity,
//! option A's padded subsample, a projection's 1x1 convolution and BatchNorm), forward
//! and backward, on blocked activations.
//!
//! Op by op, candle starts every gradient as a zero tensor and adds the op's gradient
//! to it, and each convolution blocks its input and unblocks its output: per basic block
//! four activation-sized zero-and-add pairs and a dozen layout passes. As one node, the
//! run's input is blocked once and its output unblocked once, each way; the units run
//! on blocked values in between, with the inference path's kernels (the input gradient
//! of a stride-1 convolution is a convolution too). candle's ops take at most three
//! inputs: the parameters come as one concatenated tensor.
//!
//! Sums over the batch (BatchNorm's, the weight gradients) run in a fixed order: the
//! same bits on every run.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::batch_norm_grad::biased_variance;
use super::blocked::{self, LANES};
use super::conv_grad;
use super::gemm_conv::ConvShape;
use super::storage::{cpu_data, f32_input};
use super::CpuIsa;

const WHAT: &str = "fused residual block";

/// An activation's `(batch, channels, height, width)`.
type Dims = (usize, usize, usize, usize);

/// Each unit's input and output dims.
type UnitDims = Vec<(Dims, Dims)>;

/// One conv-BN-ReLU unit of a block (no bias, one group, channels in sixteens).
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnitShape {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub eps: f64,
}

impl UnitShape {
    fn weight_len(&self) -> usize {
        self.c_out * self.c_in * self.kernel * self.kernel
    }

    /// The unit's share of the parameters: weight, BatchNorm weight, BatchNorm bias.
    fn parameter_len(&self) -> usize {
        self.weight_len() + 2 * self.c_out
    }

    fn output_dims(&self, (batch, c_in, height, width): Dims) -> Result<Dims> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if c_in != self.c_in || height + 2 * p < k || width + 2 * p < k || s == 0 {
            bail!(
                "{WHAT}: input {:?} for a {k}x{k} convolution of {} channels",
                (batch, c_in, height, width),
                self.c_in
            );
        }
        let size = |n| crate::block::output_size(n, k, s, p);
        Ok((batch, self.c_out, size(height), size(width)))
    }
}

/// How the block's input reaches its last unit's sum.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ShortcutShape {
    Identity,
    /// Option A: `x[:, :, ::stride, ::stride]` between `before` and `after` zero channels.
    ZeroPad {
        stride: usize,
        before: usize,
        after: usize,
    },
    /// Options B and C: a 1x1 convolution (of the unit's stride) and BatchNorm, no ReLU.
    Projection(UnitShape),
}

/// One unit's batch statistics per channel.
struct Statistics {
    mean: Vec<f32>,
    biased_var: Vec<f32>,
    inv_std: Vec<f32>,
}

/// What the forward pass keeps of one block for the backward one, all blocked.
struct Saved {
    /// Each unit's input: the block's input, then each inner unit's ReLU output.
    inputs: Vec<Vec<f32>>,
    /// Each unit's convolution output (BatchNorm's input).
    convs: Vec<Vec<f32>>,
    stats: Vec<Statistics>,
}

/// One block of a fused run: `relu(bn(conv(... relu(bn(conv(x))) ...)) + shortcut(x))`.
#[derive(Debug, Clone)]
pub(crate) struct BlockShape {
    pub units: Vec<UnitShape>,
    pub shortcut: ShortcutShape,
}

impl BlockShape {
    /// The chain's units, then the projection shortcut's: the order of the block's
    /// parameters, saved values and statistics.
    fn all_units(&self) -> impl Iterator<Item = &UnitShape> {
        let projection = match &self.shortcut {
            ShortcutShape::Projection(unit) => Some(unit),
            _ => None,
        };
        self.units.iter().chain(projection)
    }
}

/// A block's unit dims and where each unit's parameters start, in [`BlockShape::all_units`]
/// order.
struct BlockPlan {
    dims: UnitDims,
    offsets: Vec<usize>,
    output: Dims,
}

impl BlockPlan {
    fn input(&self) -> Dims {
        self.dims[0].0
    }

    fn output(&self) -> Dims {
        self.output
    }
}

/// The op: a run of consecutive residual blocks, activations blocked between them.
pub(crate) struct ResidualTrain {
    blocks: Vec<BlockShape>,
    /// Filled by the forward pass, one entry per block; shared with
    /// [`residual_train`], which reads the statistics from it.
    saved: Arc<Mutex<Option<Vec<Saved>>>>,
}

/// A unit's batch statistics, for its running ones.
pub(crate) struct BatchStatistics {
    pub mean: Vec<f32>,
    pub biased_var: Vec<f32>,
    /// Values per channel.
    pub count: usize,
}

/// Runs the blocks on plain `(N, C, H, W)` f32 `xs`; `params` is every unit's
/// convolution weight (flattened), BatchNorm weight and BatchNorm bias, concatenated in
/// block and unit order. Returns the last block's output, recorded for
/// backpropagation, and each unit's batch statistics in the same order; `None` where a
/// unit's output has a single value per channel (BatchNorm cannot train on it).
pub(crate) fn residual_train(
    blocks: Vec<BlockShape>,
    xs: &Tensor,
    params: &Tensor,
) -> Result<Option<(Tensor, Vec<BatchStatistics>)>> {
    let op = ResidualTrain {
        blocks,
        saved: Arc::default(),
    };
    let plans = op.plan(xs.dims4()?, params.elem_count())?;
    let unit_dims = || plans.iter().flat_map(|plan| plan.dims.iter());
    if unit_dims().any(|&(_, (n, _, h, w))| n * h * w < 2) {
        return Ok(None);
    }
    let saved = op.saved.clone();
    let ys = xs.contiguous()?.apply_op2(&params.contiguous()?, op)?;
    let saved = lock(&saved)?;
    let Some(saved) = saved.as_ref() else {
        bail!("{WHAT}: the forward pass kept nothing");
    };
    let stats = saved
        .iter()
        .flat_map(|block| &block.stats)
        .zip(unit_dims())
        .map(|(s, &(_, (n, _, h, w)))| BatchStatistics {
            mean: s.mean.clone(),
            biased_var: s.biased_var.clone(),
            count: n * h * w,
        })
        .collect();
    Ok(Some((ys, stats)))
}

fn lock<T>(saved: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    saved
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{WHAT}: poisoned saved state")))
}

impl ResidualTrain {
    /// Checks the input and the parameter count against the blocks: each block's plan.
    fn plan(&self, input: Dims, parameters: usize) -> Result<Vec<BlockPlan>> {
        let mut plans = Vec::with_capacity(self.blocks.len());
        let (mut current, mut offset) = (input, 0);
        for block in &self.blocks {
            let plan = block.plan(current, offset)?;
            current = plan.output();
            offset += block
                .all_units()
                .map(UnitShape::parameter_len)
                .sum::<usize>();
            plans.push(plan);
        }
        if plans.is_empty() || parameters != offset {
            bail!(
                "{WHAT}: {parameters} parameters for {} blocks, expected {offset}",
                plans.len()
            );
        }
        Ok(plans)
    }
}

impl BlockShape {
    /// Checks the block's shapes from `input` on; its parameters start at `offset`.
    fn plan(&self, input: Dims, mut offset: usize) -> Result<BlockPlan> {
        let mut dims = Vec::with_capacity(self.units.len());
        let mut offsets = Vec::with_capacity(self.units.len());
        let mut current = input;
        for unit in &self.units {
            let out = unit.output_dims(current)?;
            dims.push((current, out));
            offsets.push(offset);
            offset += unit.parameter_len();
            current = out;
        }
        let Some(&(_, output)) = dims.last() else {
            bail!("{WHAT}: a block without units");
        };
        if let ShortcutShape::Projection(unit) = &self.shortcut {
            dims.push((input, unit.output_dims(input)?));
            offsets.push(offset);
        }
        if dims
            .iter()
            .any(|&(_, (_, c, _, _))| !c.is_multiple_of(LANES))
            || !input.1.is_multiple_of(LANES)
        {
            bail!("{WHAT}: unsupported shapes {dims:?}");
        }
        let residual_dims = match self.shortcut {
            ShortcutShape::Identity => input,
            ShortcutShape::Projection(_) => dims[dims.len() - 1].1,
            ShortcutShape::ZeroPad {
                stride,
                before,
                after,
            } => (
                input.0,
                input.1 + before + after,
                input.2.div_ceil(stride.max(1)),
                input.3.div_ceil(stride.max(1)),
            ),
        };
        if residual_dims != output {
            bail!("{WHAT}: shortcut gives {residual_dims:?} for output {output:?}");
        }
        Ok(BlockPlan {
            dims,
            offsets,
            output,
        })
    }

    /// Option A's shortcut for the blocked input `x`: its subsample between zero channels.
    fn zero_padded<'a>(
        &self,
        x: &'a [f32],
        (batch, c_in, height, width): Dims,
    ) -> Result<std::borrow::Cow<'a, [f32]>> {
        Ok(match self.shortcut {
            ShortcutShape::ZeroPad {
                stride,
                before,
                after,
            } => blocked::zero_pad_values(
                x,
                (batch, c_in / LANES, height, width),
                stride,
                (before, after),
            )?
            .into(),
            _ => x.into(),
        })
    }

    /// The block on its blocked `input`: what backward needs, and the output (blocked,
    /// or plain `(N, C, H, W)` if `plain_output`).
    fn forward(
        &self,
        input: Vec<f32>,
        plan: &BlockPlan,
        params: &[f32],
        plain_output: bool,
    ) -> Result<(Saved, Vec<f32>)> {
        let mut saved = Saved {
            inputs: Vec::with_capacity(self.units.len()),
            convs: Vec::with_capacity(self.units.len() + 1),
            stats: Vec::with_capacity(self.units.len() + 1),
        };
        // The projection shortcut's convolution output, statistics and affine map, added
        // in the last unit's pass.
        let projection = match &self.shortcut {
            ShortcutShape::Projection(unit) => {
                let at = self.units.len();
                let (in_dims, out_dims) = plan.dims[at];
                let (weight, gamma, beta) = unit_parameters(params, plan.offsets[at], unit);
                let z = unit_convolution(&input, in_dims, weight, unit)?;
                let stats = statistics(&z, out_dims, unit.eps);
                let affine = affine(&stats, gamma, beta);
                Some((z, stats, affine))
            }
            _ => None,
        };
        let mut activation = input;
        let last = self.units.len() - 1;
        for (i, (unit, &(in_dims, out_dims))) in self.units.iter().zip(&plan.dims).enumerate() {
            let (weight, gamma, beta) = unit_parameters(params, plan.offsets[i], unit);
            let z = unit_convolution(&activation, in_dims, weight, unit)?;
            saved.inputs.push(activation);
            let stats = statistics(&z, out_dims, unit.eps);
            let (scale, shift) = affine(&stats, gamma, beta);
            let padded;
            let residual = match (&projection, &self.shortcut) {
                _ if i < last => Residual::None,
                (Some((z, _, (scale, shift))), _) => Residual::Normalised { z, scale, shift },
                (None, ShortcutShape::ZeroPad { .. }) => {
                    padded = self.zero_padded(&saved.inputs[0], plan.input())?;
                    Residual::Values(&padded)
                }
                (None, _) => Residual::Values(&saved.inputs[0]),
            };
            activation = normalise_relu(
                &z,
                out_dims,
                (&scale, &shift),
                residual,
                plain_output && i == last,
            );
            saved.convs.push(z);
            saved.stats.push(stats);
        }
        if let Some((z, stats, _)) = projection {
            saved.convs.push(z);
            saved.stats.push(stats);
        }
        Ok((saved, activation))
    }

    /// The block's backward from `at_sum`, the gradient at its last sum (past its output
    /// ReLU): adds every unit's parameter gradients into `grad_params` and returns the
    /// gradient of the block's blocked input, shortcut included (`None` if not
    /// `need_dx`), passed through the previous block's ReLU where `relu_output` (that
    /// ReLU's output: this block's input) is given.
    fn backward(
        &self,
        (saved, plan): (&Saved, &BlockPlan),
        params: &[f32],
        at_sum: &[f32],
        grad_params: &mut [f32],
        need_dx: bool,
        relu_output: Option<&[f32]>,
    ) -> Result<Option<Vec<f32>>> {
        // Unit `at`'s BatchNorm and convolution backward from `g_out`, the gradient at
        // its output (after its ReLU if `relu`): its parameter gradients written, the
        // gradient of its input returned if `want_dx`.
        let mut unit_backward =
            |at: usize, unit: &UnitShape, g_out: &[f32], relu: bool, want_dx: bool| {
                let (in_dims, out_dims) = plan.dims[at];
                let (weight, gamma, beta) = unit_parameters(params, plan.offsets[at], unit);
                let norm = bn_backward(
                    g_out,
                    relu,
                    &saved.convs[at],
                    out_dims,
                    &saved.stats[at],
                    (gamma, beta),
                );
                let grads = &mut grad_params[plan.offsets[at]..][..unit.parameter_len()];
                let (grad_weight, grad_affine) = grads.split_at_mut(unit.weight_len());
                grad_weight.copy_from_slice(&weight_gradient(
                    &saved.inputs[if at < self.units.len() { at } else { 0 }],
                    in_dims,
                    &norm.dz,
                    out_dims,
                    unit,
                )?);
                let (grad_gamma, grad_beta) = grad_affine.split_at_mut(unit.c_out);
                grad_gamma.copy_from_slice(&norm.grad_gamma);
                grad_beta.copy_from_slice(&norm.grad_beta);
                want_dx
                    .then(|| input_gradient(&norm.dz, out_dims, in_dims, weight, unit))
                    .transpose()
            };
        // The projection's input gradient, added to the chain's below.
        let projection_dx = match &self.shortcut {
            ShortcutShape::Projection(unit) => {
                unit_backward(self.units.len(), unit, at_sum, false, need_dx)?
            }
            _ => None,
        };
        // The gradient at unit i's output (after its ReLU), from unit i + 1.
        let mut upstream: Option<Vec<f32>> = None;
        for (i, unit) in self.units.iter().enumerate().rev() {
            // The last unit's gradient is past its ReLU already.
            let (g_out, relu) = match &upstream {
                Some(g) => (g.as_slice(), true),
                None => (at_sum, false),
            };
            upstream = unit_backward(i, unit, g_out, relu, i > 0 || need_dx)?;
        }
        let Some(mut dx) = upstream.filter(|_| need_dx) else {
            return Ok(None);
        };
        let (batch, c_in, height, width) = plan.input();
        // The shortcut's gradient is added in the same pass as the ReLU's mask.
        let added = match self.shortcut {
            ShortcutShape::Identity => Some(at_sum),
            ShortcutShape::Projection(_) => projection_dx.as_deref(),
            ShortcutShape::ZeroPad { stride, before, .. } => {
                let input = (batch, c_in / LANES, height, width);
                blocked::zero_pad_adjoint_add(at_sum, &mut dx, input, stride, before);
                None
            }
        };
        if added.is_some() || relu_output.is_some() {
            const CHUNK: usize = 1 << 14;
            dx.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(index, dx)| {
                    let range = index * CHUNK..index * CHUNK + dx.len();
                    let plus = added.map(|g| &g[range.clone()]);
                    let open = relu_output.map(|y| &y[range]);
                    // One loop per case, so that each vectorises.
                    match (plus, open) {
                        (Some(g), Some(y)) => {
                            for ((d, g), y) in dx.iter_mut().zip(g).zip(y) {
                                *d = if *y > 0.0 { *d + g } else { 0.0 };
                            }
                        }
                        (Some(g), None) => dx.iter_mut().zip(g).for_each(|(d, g)| *d += g),
                        (None, Some(y)) => {
                            for (d, y) in dx.iter_mut().zip(y) {
                                *d = if *y > 0.0 { *d } else { 0.0 };
                            }
                        }
                        (None, None) => {}
                    }
                });
        }
        Ok(Some(dx))
    }
}

/// A unit's convolution of its blocked input (blocked output).
fn unit_convolution(
    x: &[f32],
    in_dims: Dims,
    weight: &[f32],
    unit: &UnitShape,
) -> Result<Vec<f32>> {
    let (z, _) = blocked::convolve_blocked(
        x,
        in_dims,
        weight,
        (unit.c_out, unit.kernel),
        (unit.stride, unit.padding),
    )?;
    Ok(z)
}

impl CustomOp2 for ResidualTrain {
    fn name(&self) -> &'static str {
        "residual-blocks-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        params: &CpuStorage,
        params_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_input(xs, xs_layout, WHAT)?;
        let params = f32_input(params, params_layout, WHAT)?;
        let input_dims = xs_layout.shape().dims4()?;
        let plans = self.plan(input_dims, params.len())?;
        let (_, _, height, width) = input_dims;
        let mut activation = blocked::to_blocked_values(x, None, height * width);
        let mut saved = Vec::with_capacity(self.blocks.len());
        for (b, (block, plan)) in self.blocks.iter().zip(&plans).enumerate() {
            let last = b + 1 == self.blocks.len();
            let (kept, output) = block.forward(activation, plan, params, last)?;
            saved.push(kept);
            activation = output;
        }
        let (batch, c_out, out_h, out_w) = plans[plans.len() - 1].output();
        *lock(&self.saved)? = Some(saved);
        // The last block's output is plain already.
        Ok((
            CpuStorage::F32(activation),
            Shape::from((batch, c_out, out_h, out_w)),
        ))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        params: &Tensor,
        ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = lock(&self.saved)?;
        let Some(saved) = saved.as_ref() else {
            bail!("{WHAT}: backward before forward");
        };
        let plans = self.plan(xs.dims4()?, params.elem_count())?;
        let grad = grad.contiguous()?;
        let (grad_storage, grad_layout) = grad.storage_and_layout();
        let g = cpu_data::<f32>(&grad_storage, grad_layout)?;
        let (ys_storage, ys_layout) = ys.storage_and_layout();
        let y = cpu_data::<f32>(&ys_storage, ys_layout)?;
        let (params_storage, params_layout) = params.storage_and_layout();
        let params_data = cpu_data::<f32>(&params_storage, params_layout)?;
        let (_, _, out_h, out_w) = plans[plans.len() - 1].output();
        if g.len() != y.len() || saved.len() != self.blocks.len() {
            bail!(
                "{WHAT}: gradient {:?} for output {:?}",
                grad.dims(),
                ys.dims()
            );
        }
        // The gradient at the last block's sum: its ReLU passes it where the output is
        // positive.
        let mut at_sum = blocked::to_blocked_values(g, Some(y), out_h * out_w);
        let mut grad_params = vec![0f32; params_data.len()];
        let mut grad_xs = None;
        for (b, block) in self.blocks.iter().enumerate().rev() {
            let need_dx = b > 0 || xs.track_op();
            let plan = &plans[b];
            // Through the previous block's output ReLU, whose output is this block's input.
            let relu_output = (b > 0).then(|| saved[b].inputs[0].as_slice());
            let dx = block.backward(
                (&saved[b], plan),
                params_data,
                &at_sum,
                &mut grad_params,
                need_dx,
                relu_output,
            )?;
            let Some(dx) = dx else { break };
            if b > 0 {
                at_sum = dx;
            } else {
                let (_, _, height, width) = plan.input();
                let dx = blocked::to_plain_values(&dx, height * width);
                grad_xs = Some(Tensor::from_vec(dx, xs.shape(), xs.device())?);
            }
        }
        let grad_params = if params.track_op() {
            Some(Tensor::from_vec(
                grad_params,
                params.shape(),
                params.device(),
            )?)
        } else {
            None
        };
        Ok((grad_xs, grad_params))
    }
}

/// Unit `unit`'s convolution weight, BatchNorm weight and BatchNorm bias.
fn unit_parameters<'a>(
    params: &'a [f32],
    offset: usize,
    unit: &UnitShape,
) -> (&'a [f32], &'a [f32], &'a [f32]) {
    let (weight, affine) = params[offset..][..unit.parameter_len()].split_at(unit.weight_len());
    let (gamma, beta) = affine.split_at(unit.c_out);
    (weight, gamma, beta)
}

/// Pixels summed in f32 lanes before the lanes are added to the f64 sums: a 56x56 plane
/// summed in one f32 per channel would lose digits that matter.
const RUN: usize = 64;

/// `S` sums per channel over blocked `(N, C/16, H, W, 16)` values of `dims`:
/// `add(block, values, sums)` adds the terms of a run of pixels of block `block`, the
/// values at `values` (a range of whole pixels), to the 16 channels' `sums`. Per image in
/// parallel, the images' sums added in order.
fn channel_sums<const S: usize>(
    (batch, channels, height, width): Dims,
    add: impl Fn(usize, std::ops::Range<usize>, &mut [[f32; LANES]; S]) + Sync,
) -> [Vec<f64>; S] {
    let (blocks, plane) = (channels / LANES, height * width);
    let per_image: Vec<Vec<f64>> = (0..batch)
        .into_par_iter()
        .map(|image| {
            let mut sums = vec![0f64; S * channels];
            for block in 0..blocks {
                let start = (image * blocks + block) * plane * LANES;
                for first in (0..plane).step_by(RUN) {
                    let mut lanes = [[0f32; LANES]; S];
                    let last = (first + RUN).min(plane);
                    add(
                        block,
                        start + first * LANES..start + last * LANES,
                        &mut lanes,
                    );
                    for (s, lane) in lanes.iter().enumerate() {
                        let sums = &mut sums[s * channels + block * LANES..][..LANES];
                        for (sum, &l) in sums.iter_mut().zip(lane) {
                            *sum += l as f64;
                        }
                    }
                }
            }
            sums
        })
        .collect();
    let mut total: [Vec<f64>; S] = std::array::from_fn(|_| vec![0f64; channels]);
    for sums in per_image {
        for (s, total) in total.iter_mut().enumerate() {
            for (t, v) in total.iter_mut().zip(&sums[s * channels..]) {
                *t += v;
            }
        }
    }
    total
}

/// The 16 values at `at`.
fn lanes(values: &[f32], at: usize) -> &[f32; LANES] {
    let lanes: &[f32] = &values[at..at + LANES];
    // A slice of LANES elements always converts.
    lanes.try_into().unwrap_or(&[0.0; LANES])
}

/// Per channel mean and biased variance (two passes, as PyTorch's), and `1/sqrt(var+eps)`.
fn statistics(z: &[f32], dims: Dims, eps: f64) -> Statistics {
    let count = (dims.0 * dims.2 * dims.3).max(1) as f64;
    let [sums] = channel_sums(dims, |_, run, [sum]| {
        for x in z[run].chunks_exact(LANES) {
            for (s, x) in sum.iter_mut().zip(x) {
                *s += x;
            }
        }
    });
    let mean: Vec<f64> = sums.iter().map(|s| s / count).collect();
    let mean_f32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let [squares] = channel_sums(dims, |block, run, [sum]| {
        let m = lanes(&mean_f32, block * LANES);
        for x in z[run].chunks_exact(LANES) {
            for l in 0..LANES {
                sum[l] += (x[l] - m[l]) * (x[l] - m[l]);
            }
        }
    });
    let biased_var: Vec<f64> = squares
        .iter()
        .zip(&mean)
        .map(|(&squares, &m)| biased_variance(squares, count, m))
        .collect();
    Statistics {
        mean: mean_f32,
        inv_std: biased_var
            .iter()
            .map(|v| (1.0 / (v + eps).sqrt()) as f32)
            .collect(),
        biased_var: biased_var.iter().map(|&v| v as f32).collect(),
    }
}

/// BatchNorm with the batch statistics as `z · scale + shift`: per channel `scale =
/// γ·inv_std`, `shift = β − mean·scale`.
fn affine(stats: &Statistics, gamma: &[f32], beta: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gamma
        .iter()
        .zip(&stats.inv_std)
        .map(|(g, s)| g * s)
        .collect();
    let shift = (0..scale.len())
        .map(|c| beta[c] - stats.mean[c] * scale[c])
        .collect();
    (scale, shift)
}

/// BatchNorm's output (before any residual and ReLU): the one expression the forward
/// pass and the backward pass's ReLU mask both use, so that they agree bit for bit.
#[inline(always)]
fn normalised(z: f32, scale: f32, shift: f32) -> f32 {
    z * scale + shift
}

/// Pixels per tile of [`normalise_relu`]'s plain output: 16 x 16 values, in L1 while
/// they are written out plane by plane.
const TILE: usize = 16;

/// What the last unit of a block adds before its ReLU.
#[derive(Clone, Copy)]
enum Residual<'a> {
    None,
    /// Blocked values: the identity, option A's padded subsample.
    Values(&'a [f32]),
    /// A projection's blocked convolution output, normalised in the same pass with its
    /// BatchNorm's `scale` and `shift` (one pass over memory fewer than normalising it
    /// first).
    Normalised {
        z: &'a [f32],
        scale: &'a [f32],
        shift: &'a [f32],
    },
}

impl Residual<'_> {
    /// The 16 values to add at `at`, in channel block `block`.
    #[inline(always)]
    fn at(&self, block: usize, at: usize) -> [f32; LANES] {
        match *self {
            Self::None => [0.0; LANES],
            Self::Values(values) => *lanes(values, at),
            Self::Normalised { z, scale, shift } => {
                let (z, scale, shift) = (
                    lanes(z, at),
                    lanes(scale, block * LANES),
                    lanes(shift, block * LANES),
                );
                std::array::from_fn(|l| normalised(z[l], scale[l], shift[l]))
            }
        }
    }
}

/// `relu(z · scale + shift + residual)` from blocked values (BatchNorm as its affine map
/// with the batch statistics): blocked, or plain `(N, C, H, W)` if `plain` (the block's
/// output, unblocked in the same pass).
fn normalise_relu(
    z: &[f32],
    (_, channels, height, width): Dims,
    (scale, shift): (&[f32], &[f32]),
    residual: Residual,
    plain: bool,
) -> Vec<f32> {
    let (blocks, pixels) = (channels / LANES, height * width);
    let mut out = vec![0f32; z.len()];
    // One (image, block) per task: the same range of values in either layout.
    out.par_chunks_mut(pixels * LANES)
        .enumerate()
        .for_each(|(index, out)| {
            let block = index % blocks;
            let (scale, shift) = (lanes(scale, block * LANES), lanes(shift, block * LANES));
            let start = index * pixels * LANES;
            // 16 pixels' values: written to `out` in place if blocked, through `tile`
            // (transposed) if plain.
            let mut tile = [0f32; TILE * LANES];
            for first in (0..pixels).step_by(TILE) {
                let len = TILE.min(pixels - first);
                let values = if plain {
                    &mut tile[..len * LANES]
                } else {
                    &mut out[first * LANES..][..len * LANES]
                };
                for (pixel, values) in values.chunks_exact_mut(LANES).enumerate() {
                    let at = start + (first + pixel) * LANES;
                    let z = lanes(z, at);
                    let r = residual.at(block, at);
                    for l in 0..LANES {
                        let sum = normalised(z[l], scale[l], shift[l]) + r[l];
                        values[l] = if sum > 0.0 { sum } else { 0.0 };
                    }
                }
                if plain {
                    for lane in 0..LANES {
                        let row = &mut out[lane * pixels + first..][..len];
                        for (v, values) in row.iter_mut().zip(tile.chunks_exact(LANES)) {
                            *v = values[lane];
                        }
                    }
                }
            }
        });
    out
}

/// BatchNorm's backward on blocked values.
struct NormGrad {
    /// The gradient of the convolution's output.
    dz: Vec<f32>,
    grad_gamma: Vec<f32>,
    grad_beta: Vec<f32>,
}

/// BatchNorm's backward for the gradient `g` at its output, or, if `relu`, at the ReLU's
/// output after it (passed where BatchNorm's output was positive, recomputed from `z`
/// rather than read from the saved activation: one pass over memory fewer):
/// `dz = γ·inv_std·(g − mean(g) − x̂·mean(g·x̂))`, `dγ = Σ g·x̂`, `dβ = Σ g`.
fn bn_backward(
    g: &[f32],
    relu: bool,
    z: &[f32],
    dims: Dims,
    stats: &Statistics,
    affine: (&[f32], &[f32]),
) -> NormGrad {
    // A constant, so that the mask compiles to a select (a run-time flag left a branch
    // per value in the loop: 3x the pass's time).
    if relu {
        bn_backward_with::<true>(g, z, dims, stats, affine)
    } else {
        bn_backward_with::<false>(g, z, dims, stats, affine)
    }
}

fn bn_backward_with<const RELU: bool>(
    g: &[f32],
    z: &[f32],
    dims: Dims,
    stats: &Statistics,
    (gamma, beta): (&[f32], &[f32]),
) -> NormGrad {
    let (batch, channels, height, width) = dims;
    let count = (batch * height * width).max(1) as f64;
    let (scale, shift) = affine(stats, gamma, beta);
    // The gradient that passes the ReLU, for BatchNorm's `scale` and `shift` of the lane.
    let passed = |g: f32, z: f32, scale: f32, shift: f32| {
        if !RELU || normalised(z, scale, shift) > 0.0 {
            g
        } else {
            0.0
        }
    };
    let [sum_g, sum_g_centered] = channel_sums(dims, |block, run, [sum, dot]| {
        let at = block * LANES;
        let (m, scale, shift) = (lanes(&stats.mean, at), lanes(&scale, at), lanes(&shift, at));
        for pixel in run.step_by(LANES) {
            let (g, x) = (lanes(g, pixel), lanes(z, pixel));
            for l in 0..LANES {
                let g = passed(g[l], x[l], scale[l], shift[l]);
                sum[l] += g;
                dot[l] += g * (x[l] - m[l]);
            }
        }
    });
    let sum_g_xhat: Vec<f64> = sum_g_centered
        .iter()
        .zip(&stats.inv_std)
        .map(|(s, &inv)| s * inv as f64)
        .collect();
    let mean_g: Vec<f32> = sum_g.iter().map(|&s| (s / count) as f32).collect();
    let mean_g_xhat: Vec<f32> = sum_g_xhat.iter().map(|&s| (s / count) as f32).collect();
    let (blocks, plane) = (channels / LANES, height * width * LANES);
    let mut dz = vec![0f32; z.len()];
    dz.par_chunks_mut(plane)
        .enumerate()
        .for_each(|(index, dz)| {
            let at = (index % blocks) * LANES;
            let (mean, inv_std) = (lanes(&stats.mean, at), lanes(&stats.inv_std, at));
            let (scale, shift) = (lanes(&scale, at), lanes(&shift, at));
            let (mean_g, mean_g_xhat) = (lanes(&mean_g, at), lanes(&mean_g_xhat, at));
            for (pixel, dz) in dz.chunks_exact_mut(LANES).enumerate() {
                let value = index * plane + pixel * LANES;
                let (g, x) = (lanes(g, value), lanes(z, value));
                for l in 0..LANES {
                    let g = passed(g[l], x[l], scale[l], shift[l]);
                    let xhat = (x[l] - mean[l]) * inv_std[l];
                    dz[l] = scale[l] * (g - mean_g[l] - xhat * mean_g_xhat[l]);
                }
            }
        });
    NormGrad {
        dz,
        grad_gamma: sum_g_xhat.iter().map(|&v| v as f32).collect(),
        grad_beta: sum_g.iter().map(|&v| v as f32).collect(),
    }
}

/// The convolution's weight gradient from its blocked input `x` and output gradient
/// `dz`: per image, output block, input block and tap, the kernel tree's [`GradTile`]
/// sums `dz · x` over the output pixels whose input at that tap lies inside the image
/// (no im2row, no padding), with the image's two blocks in L2 across the taps.
fn weight_gradient(
    x: &[f32],
    in_dims: Dims,
    dz: &[f32],
    out_dims: Dims,
    unit: &UnitShape,
) -> Result<Vec<f32>> {
    let isa = CpuIsa::from_env()?;
    let (batch, c_in, height, width) = in_dims;
    let (_, c_out, out_h, out_w) = out_dims;
    let (k, s, p) = (unit.kernel, unit.stride, unit.padding);
    let (taps, in_blocks, out_blocks) = (k * k, c_in / LANES, c_out / LANES);
    let (in_plane, out_plane) = (height * width * LANES, out_h * out_w * LANES);
    // Output positions o whose input o·s + t − p lies in 0..size, for tap offset t.
    let inside = |t: usize, size: usize, out: usize| {
        let first = p.saturating_sub(t).div_ceil(s);
        let end = if size + p > t {
            ((size + p - t - 1) / s + 1).min(out)
        } else {
            0
        };
        (first, end.max(first))
    };
    const TILE: usize = LANES * LANES;
    // Sums in [out block][in block][tap][in channel][out channel] order.
    let total = conv_grad::sum_over_batch(batch, c_out * c_in * taps, |images, sums| {
        for image in images {
            for (ob, sums) in sums.chunks_exact_mut(in_blocks * taps * TILE).enumerate() {
                let dz = &dz[(image * out_blocks + ob) * out_plane..][..out_plane];
                for (ib, sums) in sums.chunks_exact_mut(taps * TILE).enumerate() {
                    let x = &x[(image * in_blocks + ib) * in_plane..][..in_plane];
                    for (tap, sums) in sums.chunks_exact_mut(TILE).enumerate() {
                        let (ky, kx) = (tap / k, tap % k);
                        let (oy, oy_end) = inside(ky, height, out_h);
                        let (ox, ox_end) = inside(kx, width, out_w);
                        let Ok(sums) = <&mut [f32; TILE]>::try_from(sums) else {
                            continue; // chunks_exact: always a whole tile
                        };
                        if oy == oy_end || ox == ox_end {
                            continue;
                        }
                        let (iy, ix) = (oy * s + ky - p, ox * s + kx - p);
                        let tile = blocked::GradTile {
                            dz: &dz[(oy * out_w + ox) * LANES..],
                            x: &x[(iy * width + ix) * LANES..],
                            rows: oy_end - oy,
                            len: ox_end - ox,
                            dz_row: out_w * LANES,
                            x_row: s * width * LANES,
                            x_step: s * LANES,
                        };
                        tile.accumulate(isa, sums);
                    }
                }
            }
        }
    });
    // -> the weight's (c_out, c_in, ky, kx), an output block's 16 rows a task (an
    // index decoded per value took 5 ms at 1M weights).
    let mut grad = vec![0f32; total.len()];
    // (`max(1)`: no zero-length chunks where a layer has no input channels.)
    grad.par_chunks_mut((LANES * c_in * taps).max(1))
        .zip(total.par_chunks((LANES * c_in * taps).max(1)))
        .for_each(|(grad, total)| {
            for (ib, total) in total.chunks_exact(taps * TILE).enumerate() {
                for (tap, tile) in total.chunks_exact(TILE).enumerate() {
                    for (c, outputs) in tile.chunks_exact(LANES).enumerate() {
                        for (o, &value) in outputs.iter().enumerate() {
                            grad[(o * c_in + ib * LANES + c) * taps + tap] = value;
                        }
                    }
                }
            }
        });
    Ok(grad)
}

/// The gradient of a unit's blocked input from its blocked output gradient `dz`. At
/// stride 1 a convolution by the flipped, transposed weight on the blocked kernels;
/// otherwise the GEMM path's (through the plain layout).
fn input_gradient(
    dz: &[f32],
    out_dims: Dims,
    in_dims: Dims,
    weight: &[f32],
    unit: &UnitShape,
) -> Result<Vec<f32>> {
    let (batch, c_in, height, width) = in_dims;
    let (_, c_out, out_h, out_w) = out_dims;
    let k = unit.kernel;
    if unit.stride == 1 && unit.padding < k {
        let flipped = conv_grad::flipped_transposed(weight, (c_out, c_in, k));
        let (dx, _) = blocked::convolve_blocked(
            dz,
            out_dims,
            &flipped,
            (c_in, k),
            (1, k - 1 - unit.padding),
        )?;
        return Ok(dx);
    }
    let shape = ConvShape::new(
        &[batch, c_in, height, width],
        &[c_out, c_in, k, k],
        unit.stride,
        unit.padding,
        1,
    )?;
    let dy = blocked::to_plain_values(dz, out_h * out_w);
    let dx = conv_grad::input_gradient(&shape, &dy, weight);
    Ok(blocked::to_blocked_values(&dx, None, height * width))
}
