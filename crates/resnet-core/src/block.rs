//! Residual blocks: basic and bottleneck as one type, and the three shortcut options.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use std::sync::Arc;

use crate::batch_norm::{BatchNorm2d, BatchNormRelu};
use crate::config::{BlockKind, BottleneckStride, ResNetConfig, ShortcutKind};
use crate::cpu::block_grad::{self, BlockShape, ShortcutShape, UnitShape};
use crate::cpu::blocked::{self, BlockedConv};
use crate::cpu::conv_grad::TrainConv;
use crate::cpu::gemm_conv::FusedConv;
use crate::cpu::CpuIsa;
use crate::squeeze_excite::SqueezeExcite;

/// A convolution followed by BatchNorm, the unit every ResNet is made of. Pre-activation
/// networks also have units without BatchNorm (the last of each block, projections, the
/// stem's last), and Keras' convolutions carry biases.
#[derive(Debug, Clone)]
pub struct ConvBn {
    weights: ConvWeights,
    bn: Option<BatchNorm2d>,
}

/// A unit's convolution, as loaded or folded for inference.
#[derive(Debug, Clone)]
enum ConvWeights {
    /// The checkpoint's convolution, BatchNorm applied after it.
    Trainable(Conv2d),
    /// The BatchNorm folded in (`W * scale`, bias `shift`), set by
    /// [`crate::ResNet::fold_batch_norm`]: inference then costs one convolution.
    Folded(Conv2d),
    /// Folded, and reordered for the channel-blocked CPU kernels (the only copy).
    Blocked(Arc<BlockedConv>),
}

/// What [`ConvBn::fold`] makes of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FoldTarget {
    /// A folded `Conv2d`: the fused im2col + GEMM op on the CPU, candle's elsewhere.
    Gemm,
    /// Weights reordered for the channel-blocked kernels; `plain_input`: the unit reads
    /// `(N, C, H, W)` (the stem), else blocked activations. Output is always blocked.
    /// `winograd`: 3x3 stride-1 units run Winograd F(2x2, 3x3). `isa`: the kernels'
    /// instruction set.
    Blocked {
        plain_input: bool,
        winograd: bool,
        isa: CpuIsa,
    },
}

/// The kernel one convolution unit runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnitKernel {
    /// Not folded: candle's convolution (training's on the CPU), then BatchNorm.
    Unfolded,
    /// Folded, im2col + GEMM on the CPU (candle's convolution elsewhere).
    Gemm,
    /// Blocked direct convolution on this instruction set.
    Direct(CpuIsa),
    /// Blocked Winograd F(2x2, 3x3) on this instruction set.
    Winograd(CpuIsa),
}

/// Shape of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    pub bias: bool,
}

/// Output size of a `kernel` convolution or pool of `stride` and `padding` over `size`.
pub(crate) fn output_size(size: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (size + 2 * padding).saturating_sub(kernel) / stride.max(1) + 1
}

impl ConvBn {
    /// Multiply-adds of the unit's convolution on a `(height, width)` input, and the size
    /// of its output.
    pub(crate) fn multiply_adds(&self, (height, width): (usize, usize)) -> (u64, (usize, usize)) {
        let [out, input, kernel, stride, padding, groups] = match &self.weights {
            ConvWeights::Trainable(conv) | ConvWeights::Folded(conv) => {
                let dims = conv.weight().dims();
                let config = conv.config();
                [
                    dims[0],
                    dims[1] * config.groups,
                    dims[2],
                    config.stride,
                    config.padding,
                    config.groups,
                ]
            }
            ConvWeights::Blocked(blocked) => blocked.geometry(),
        };
        let size = (
            output_size(height, kernel, stride, padding),
            output_size(width, kernel, stride, padding),
        );
        let per_pixel = out * (input / groups.max(1)) * kernel * kernel;
        ((per_pixel * size.0 * size.1) as u64, size)
    }

    /// Reads the convolution `conv_vb` ("conv1") and the BatchNorm `bn_vb` ("bn1"), if
    /// the unit has one.
    pub(crate) fn new(
        spec: ConvSpec,
        bn_eps: f64,
        conv_vb: VarBuilder,
        bn_vb: Option<VarBuilder>,
    ) -> Result<Self> {
        let config = Conv2dConfig {
            padding: spec.kernel / 2,
            stride: spec.stride,
            groups: spec.groups,
            ..Default::default()
        };
        let make = if spec.bias {
            candle_nn::conv2d
        } else {
            candle_nn::conv2d_no_bias
        };
        let conv = make(
            spec.in_channels,
            spec.out_channels,
            spec.kernel,
            config,
            conv_vb,
        )?;
        let bn = bn_vb
            .map(|vb| BatchNorm2d::new(spec.out_channels, bn_eps, vb))
            .transpose()?;
        Ok(Self {
            weights: ConvWeights::Trainable(conv),
            bn,
        })
    }

    /// The convolution: as loaded, or with the BatchNorm folded in (weight and bias)
    /// after [`crate::ResNet::fold_batch_norm`]. Blocked units rebuild it.
    pub fn conv(&self) -> Result<Conv2d> {
        match &self.weights {
            ConvWeights::Trainable(conv) | ConvWeights::Folded(conv) => Ok(conv.clone()),
            ConvWeights::Blocked(blocked) => {
                let (shape, stride, padding, groups) = blocked.shape();
                let (weight, bias) = blocked.unpack();
                // Blocked units live on the CPU.
                let device = &candle_core::Device::Cpu;
                let config = Conv2dConfig {
                    padding,
                    stride,
                    groups,
                    ..Default::default()
                };
                Ok(Conv2d::new(
                    Tensor::from_vec(weight, shape, device)?,
                    Some(Tensor::from_vec(bias, shape.0, device)?),
                    config,
                ))
            }
        }
    }

    /// The BatchNorm, if the unit has one.
    pub fn bn(&self) -> Option<&BatchNorm2d> {
        self.bn.as_ref()
    }

    /// `relu(bn(conv(xs)) + residual)`, ReLU and residual optional. Folded units run
    /// as one fused CPU op where they can; blocked units take and give blocked tensors.
    pub(crate) fn forward_with(
        &self,
        xs: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
        train: bool,
    ) -> Result<Tensor> {
        let ys = match (&self.weights, train) {
            (ConvWeights::Folded(_) | ConvWeights::Blocked(_), true) => candle_core::bail!(
                "this network's BatchNorm is folded into its convolutions for inference: it cannot train"
            ),
            (ConvWeights::Blocked(blocked), false) => {
                return blocked.forward(xs, residual, relu);
            }
            (ConvWeights::Folded(folded), false) => {
                let config = folded.config();
                if let (true, Some(bias)) = (
                    FusedConv::supports(xs, folded.weight(), config.groups) && config.dilation == 1,
                    folded.bias(),
                ) {
                    let residual = residual.map(Tensor::contiguous).transpose()?;
                    let op = FusedConv {
                        weight: folded.weight(),
                        bias,
                        residual: residual.as_ref(),
                        relu,
                        stride: config.stride,
                        padding: config.padding,
                        groups: config.groups,
                    };
                    return xs.contiguous()?.apply_op1_no_bwd(&op);
                }
                convolve(folded, xs)?
            }
            (ConvWeights::Trainable(conv), _) => match &self.bn {
                Some(bn) => return bn.forward_add_relu(&convolve(conv, xs)?, residual, relu, train),
                None => convolve(conv, xs)?,
            },
        };
        crate::batch_norm::add_relu(ys, residual, relu)
    }

    /// The unit as the fused training block runs it (CPU f32, no bias, one group,
    /// channels in sixteens, a kernel above 1x1, BatchNorm), with its convolution and
    /// BatchNorm. 1x1 units stay on the GEMM path: blocked, ResNet-50's step at batch 16
    /// took 5.2-5.9 s against 4.1-4.9 s (Zen 3, 2 threads; its 1x1 input gradients ran
    /// at 17-36 GFLOP/s), while basic blocks gain (ResNet-20 at batch 128: 433-456 ->
    /// 332-335 ms) or break even (ResNet-18 at batch 16: 1.72-1.86 s either way).
    fn fused_train_unit(&self, xs: &Tensor) -> Option<(UnitShape, &Conv2d, &BatchNorm2d)> {
        let (ConvWeights::Trainable(conv), Some(bn)) = (&self.weights, &self.bn) else {
            return None;
        };
        let config = conv.config();
        let (c_out, c_in, kernel, kw) = conv.weight().dims4().ok()?;
        let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        let supported = conv.bias().is_none()
            && config.dilation == 1
            && config.groups == 1
            && kernel == kw
            && c_in.is_multiple_of(blocked::LANES)
            && c_out.is_multiple_of(blocked::LANES)
            && [xs, conv.weight(), bn.weight(), bn.bias()]
                .into_iter()
                .all(f32_cpu);
        let unit = UnitShape {
            c_in,
            c_out,
            kernel,
            stride: config.stride,
            padding: config.padding,
            eps: bn.eps(),
        };
        supported.then_some((unit, conv, bn))
    }

    /// This unit with its BatchNorm folded into the convolution: inference only. The
    /// unfolded weight is dropped (memory stays at one copy of the weights); the folded
    /// convolution takes its place, with a bias, in the form `target` asks for (the
    /// caller checked the CPU, dtype and shape for the blocked ones).
    pub(crate) fn fold(self, target: FoldTarget) -> Result<Self> {
        let conv = match self.weights {
            ConvWeights::Trainable(conv) => conv,
            ConvWeights::Folded(_) | ConvWeights::Blocked(_) => return Ok(self),
        };
        let (scale, shift) = match &self.bn {
            Some(bn) => bn.scale_and_shift()?,
            None => {
                let channels = conv.weight().dim(0)?;
                let device = conv.weight().device();
                (
                    Tensor::ones(channels, DType::F32, device)?,
                    Tensor::zeros(channels, DType::F32, device)?,
                )
            }
        };
        let config = *conv.config();
        // The folded bias, in f32, for both targets: b' = b·k + shift.
        let bias = match conv.bias() {
            Some(bias) => ((bias.to_dtype(DType::F32)? * &scale)? + shift)?,
            None => shift,
        };
        if let FoldTarget::Blocked {
            plain_input,
            winograd,
            isa,
        } = target
        {
            // Straight from the checkpoint's weight to the reordered copy, the BatchNorm
            // scale multiplied in on the way: no folded or flattened copy in between.
            let dims = conv.weight().dims4()?;
            let weight = conv.weight().to_dtype(DType::F32)?.contiguous()?;
            let (storage, layout) = weight.storage_and_layout();
            let source = crate::cpu::storage::cpu_data::<f32>(&storage, layout)?;
            let blocked = BlockedConv::from_folded(
                source,
                &scale.to_vec1::<f32>()?,
                dims,
                bias.to_vec1::<f32>()?,
                (config.stride, config.padding, config.groups),
                (
                    plain_input,
                    winograd && BlockedConv::winograd_pays(dims.1, dims.0),
                    isa,
                ),
            )?;
            return Ok(Self {
                weights: ConvWeights::Blocked(Arc::new(blocked)),
                bn: self.bn,
            });
        }
        let dtype = conv.weight().dtype();
        let out_channels = scale.elem_count();
        let weight = conv
            .weight()
            .to_dtype(DType::F32)?
            .broadcast_mul(&scale.reshape((out_channels, 1, 1, 1))?)?
            .to_dtype(dtype)?;
        let bias = bias.to_dtype(dtype)?;
        drop(conv);
        // Detached: the running statistics are variables, and a graph edge from the
        // folded weight back to the original would keep the original alive.
        let weights =
            ConvWeights::Folded(Conv2d::new(weight.detach(), Some(bias.detach()), config));
        Ok(Self {
            weights,
            bn: self.bn,
        })
    }

    /// Which kernel this unit's convolution runs.
    pub(crate) fn kernel(&self) -> UnitKernel {
        match &self.weights {
            ConvWeights::Trainable(_) => UnitKernel::Unfolded,
            ConvWeights::Folded(_) => UnitKernel::Gemm,
            ConvWeights::Blocked(blocked) if blocked.is_winograd() => {
                UnitKernel::Winograd(blocked.isa())
            }
            ConvWeights::Blocked(blocked) => UnitKernel::Direct(blocked.isa()),
        }
    }

    /// Whether [`ConvBn::fold`] can make this unit blocked (its input is blocked too when
    /// the unit before it is).
    pub(crate) fn can_block(&self) -> bool {
        match &self.weights {
            ConvWeights::Trainable(conv) => match conv.weight().dims4() {
                Ok((c_out, c_in, kh, kw)) => {
                    let config = conv.config();
                    kh == kw
                        && config.dilation == 1
                        && BlockedConv::supports(c_in * config.groups, c_out, kh, config.groups)
                }
                Err(_) => false,
            },
            _ => false,
        }
    }

    /// Learned parameters: convolution weight (and bias, once folded), BatchNorm scale
    /// and shift.
    pub(crate) fn parameter_count(&self) -> usize {
        let conv = match &self.weights {
            ConvWeights::Trainable(conv) | ConvWeights::Folded(conv) => {
                conv.weight().elem_count() + conv.bias().map_or(0, Tensor::elem_count)
            }
            ConvWeights::Blocked(blocked) => blocked.parameter_count(),
        };
        conv + self.bn.as_ref().map_or(0, |bn| 2 * bn.channels())
    }

    /// Appends this unit's tensors, named `{conv}.weight`, `{bn}.weight`, ... to `out`.
    pub(crate) fn push_named_tensors(
        &self,
        conv: &str,
        bn: &str,
        out: &mut NamedTensors,
    ) -> Result<()> {
        let convolution = self.conv()?;
        out.push((format!("{conv}.weight"), convolution.weight().clone()));
        if let Some(bias) = convolution.bias() {
            out.push((format!("{conv}.bias"), bias.clone()));
        }
        if let Some(norm) = &self.bn {
            norm.push_named_tensors(bn, out);
        }
        Ok(())
    }
}

fn convolve(conv: &Conv2d, xs: &Tensor) -> Result<Tensor> {
    let config = conv.config();
    if conv.bias().is_none() && config.dilation == 1 && TrainConv::supports(xs, conv.weight()) {
        let op = TrainConv {
            stride: config.stride,
            padding: config.padding,
            groups: config.groups,
        };
        return op.forward(xs, conv.weight());
    }
    // candle's CPU convolution has no bf16 kernel: convolve in f32 and round the result
    // back to bf16, as a GPU accumulates bf16 products in f32.
    if xs.dtype() == DType::BF16 && xs.device().is_cpu() {
        let weight = conv.weight().to_dtype(DType::F32)?;
        let bias = match conv.bias() {
            Some(bias) => Some(bias.to_dtype(DType::F32)?),
            None => None,
        };
        let conv = Conv2d::new(weight, bias, *conv.config());
        return conv
            .forward(&xs.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16);
    }
    conv.forward(xs)
}

/// A unit's convolution and BatchNorm, as the fused training op reads them.
type FusedUnit<'a> = (&'a Conv2d, &'a BatchNorm2d);

/// Training on the CPU in f32: the longest run of blocks from the start of `blocks`
/// that the fused op takes ([`block_grad`]: post-activation basic and bottleneck blocks
/// without squeeze-excitation, with identity, option-A or projection shortcuts; not
/// ResNet-D's pooled projection, grouped or biased convolutions), run as one op on `xs`. The output and how many blocks it
/// ran; `None` if the first block is not fused.
pub(crate) fn forward_fused_run(
    blocks: &[&ResidualBlock],
    xs: &Tensor,
) -> Result<Option<(Tensor, usize)>> {
    let mut shapes = Vec::new();
    let mut units = Vec::new();
    for block in blocks {
        let Some((shape, parts)) = block.fused_train_parts(xs) else {
            break;
        };
        shapes.push(shape);
        units.extend(parts);
    }
    if shapes.is_empty() {
        return Ok(None);
    }
    let run = shapes.len();
    let mut params = Vec::with_capacity(3 * units.len());
    for (conv, bn) in &units {
        params.extend([
            conv.weight().flatten_all()?,
            bn.weight().clone(),
            bn.bias().clone(),
        ]);
    }
    let params = Tensor::cat(&params, 0)?;
    // None where BatchNorm would see one value per channel: the unfused path says so.
    let Some((ys, stats)) = block_grad::residual_train(shapes, xs, &params)? else {
        return Ok(None);
    };
    for ((_, bn), stats) in units.iter().zip(stats) {
        let channels = stats.mean.len();
        let mean = Tensor::from_vec(stats.mean, channels, xs.device())?;
        let biased_var = Tensor::from_vec(stats.biased_var, channels, xs.device())?;
        bn.update_running(&mean, &biased_var, stats.count)?;
    }
    Ok(Some((ys, run)))
}

/// Tensors with their checkpoint names, in network order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// How a block's input is carried to its output.
#[derive(Debug, Clone)]
pub enum Shortcut {
    /// The input itself.
    Identity,
    /// Option A: subsample by `stride`, then zero-pad channels before and after (none in
    /// Keras V2's subsampled identity).
    ZeroPad {
        /// Spatial subsampling step.
        stride: usize,
        /// Zero channels put before the input's channels.
        pad_before: usize,
        /// Zero channels put after the input's channels.
        pad_after: usize,
    },
    /// Options B and C: a strided 1x1 convolution and BatchNorm (`downsample.0`, `.1`).
    Projection(ConvBn),
    /// ResNet-D: a 2x2 average pool of stride `stride` (ceil mode, padding not counted;
    /// none at stride 1), then a 1x1 convolution and BatchNorm (`downsample.1`, `.2`).
    AvgDownProjection {
        /// The pool's stride.
        stride: usize,
        /// The projection.
        unit: ConvBn,
    },
}

impl Shortcut {
    fn fold(self, target: FoldTarget) -> Result<Self> {
        Ok(match self {
            Self::Projection(unit) => Self::Projection(unit.fold(target)?),
            Self::AvgDownProjection { stride, unit } => Self::AvgDownProjection {
                stride,
                unit: unit.fold(target)?,
            },
            other => other,
        })
    }

    fn new(
        config: &ResNetConfig,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shape_changes = stride != 1 || in_channels != out_channels;
        let vb = vb.pp("downsample");
        // A 1x1 convolution of that stride, `downsample.{conv}` and BatchNorm
        // `downsample.{bn}`; pre-activation projections (timm's `downsample.conv`) have
        // no BatchNorm.
        let unit = |stride, conv: &str, bn: &str| -> Result<ConvBn> {
            let spec = ConvSpec {
                in_channels,
                out_channels,
                kernel: 1,
                stride,
                groups: 1,
                bias: config.conv_has_bias(!config.preactivation),
            };
            if config.preactivation {
                ConvBn::new(spec, config.bn_eps, vb.pp("conv"), None)
            } else {
                ConvBn::new(spec, config.bn_eps, vb.pp(conv), Some(vb.pp(bn)))
            }
        };
        let projection = || Ok(Self::Projection(unit(stride, "0", "1")?));
        match config.shortcut {
            ShortcutKind::ProjectionAll => projection(),
            _ if !shape_changes => Ok(Self::Identity),
            ShortcutKind::Projection => projection(),
            ShortcutKind::ProjectionOrSubsample if in_channels != out_channels => projection(),
            ShortcutKind::ProjectionOrSubsample => Ok(Self::ZeroPad {
                stride,
                pad_before: 0,
                pad_after: 0,
            }),
            ShortcutKind::AvgDownProjection => Ok(Self::AvgDownProjection {
                stride,
                unit: unit(1, "1", "2")?,
            }),
            ShortcutKind::ZeroPad => {
                // validate() guarantees out_channels >= in_channels here.
                let added = out_channels - in_channels;
                Ok(Self::ZeroPad {
                    stride,
                    pad_before: added / 2,
                    pad_after: added - added / 2,
                })
            }
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Identity => Ok(xs.clone()),
            Self::ZeroPad {
                stride,
                pad_before,
                pad_after,
            } if xs.rank() == 5 => {
                blocked::subsample_and_pad_channels(xs, *stride, *pad_before, *pad_after)
            }
            Self::ZeroPad {
                stride,
                pad_before,
                pad_after,
            } => {
                // `x[:, :, ::s, ::s]`, differentiable (candle's average pool with a
                // kernel smaller than its stride has no backward).
                crate::ops::subsample(xs, *stride)?.pad_with_zeros(1, *pad_before, *pad_after)
            }
            Self::Projection(conv_bn) => conv_bn.forward_with(xs, None, false, train),
            Self::AvgDownProjection { stride, unit } => {
                let pooled = match (*stride, xs.rank()) {
                    (1, _) => xs.clone(),
                    (stride, 5) => blocked::avg_pool_2x2_ceil(xs, stride)?,
                    (stride, _) => crate::ops::avg_pool_2x2_ceil(xs, stride)?,
                };
                unit.forward_with(&pooled, None, false, train)
            }
        }
    }
}

/// One residual block: a chain of conv-BN units with ReLU between them, the shortcut
/// added to the last one, and a final ReLU (paper figure 5).
///
/// A basic block's chain is 3x3, 3x3; a bottleneck's is 1x1, 3x3 (strided, grouped), 1x1.
/// Tensors are named `conv1`/`bn1`, `conv2`/`bn2`, ... and `downsample.0`/`.1`.
///
/// A pre-activation block (timm's `PreActBottleneck`) normalises its input first
/// (`norm1`, BatchNorm and ReLU) and each convolution's output but the last (`norm2`,
/// ...); the shortcut adds to the last convolution, with no ReLU after. Identity
/// shortcuts take the input, projections (`downsample.conv`) the normalised input.
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    /// Pre-activation blocks: the BatchNorm and ReLU before the first convolution.
    pre_norm: Option<BatchNormRelu>,
    chain: Vec<ConvBn>,
    shortcut: Shortcut,
    /// Squeeze-and-excitation on the last unit's output (`se`), if the network has it.
    squeeze_excite: Option<SqueezeExcite>,
}

impl ResidualBlock {
    /// Multiply-adds of the block's convolutions (and squeeze-excite's two small layers)
    /// on a `(height, width)` input, and the size of its output.
    pub(crate) fn multiply_adds(&self, input: (usize, usize)) -> (u64, (usize, usize)) {
        let mut size = input;
        let mut total = 0;
        for unit in &self.chain {
            let (macs, next) = unit.multiply_adds(size);
            total += macs;
            size = next;
        }
        total += match &self.shortcut {
            Shortcut::Projection(unit) => unit.multiply_adds(input).0,
            Shortcut::AvgDownProjection { stride, unit } => {
                let pooled = (input.0.div_ceil(*stride), input.1.div_ceil(*stride));
                unit.multiply_adds(pooled).0
            }
            Shortcut::Identity | Shortcut::ZeroPad { .. } => 0,
        };
        total += self
            .squeeze_excite
            .as_ref()
            .map_or(0, SqueezeExcite::multiply_adds);
        (total, size)
    }

    /// Builds block reading `in_channels` channels, of stage width `planes`.
    pub(crate) fn new(
        config: &ResNetConfig,
        in_channels: usize,
        planes: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let out_channels = planes * config.block.expansion();
        let shapes = match config.block {
            BlockKind::Basic => vec![
                (in_channels, planes, 3, stride, 1),
                (planes, out_channels, 3, 1, 1),
            ],
            BlockKind::Bottleneck => {
                let width = config.bottleneck_width(planes);
                // v1 strides on the first 1x1, v1.5 on the 3x3.
                let reduce_stride = match config.bottleneck_stride {
                    BottleneckStride::Reduce1x1 => stride,
                    _ => 1,
                };
                vec![
                    (in_channels, width, 1, reduce_stride, 1),
                    (width, width, 3, stride / reduce_stride, config.groups),
                    (width, out_channels, 1, 1, 1),
                ]
            }
        };
        let units = shapes.len();
        let chain = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (in_channels, out_channels, kernel, stride, groups))| {
                let n = i + 1;
                // Pre-activation: the BatchNorm after convolution n is norm{n+1}, and
                // the last convolution has none.
                let bn = match (config.preactivation, n == units) {
                    (false, _) => Some(vb.pp(format!("bn{n}"))),
                    (true, false) => Some(vb.pp(format!("norm{}", n + 1))),
                    (true, true) => None,
                };
                let spec = ConvSpec {
                    in_channels,
                    out_channels,
                    kernel,
                    stride,
                    groups,
                    bias: config.conv_has_bias(bn.is_some()),
                };
                ConvBn::new(spec, config.bn_eps, vb.pp(format!("conv{n}")), bn)
            })
            .collect::<Result<Vec<_>>>()?;
        let pre_norm = config
            .preactivation
            .then(|| BatchNormRelu::new(in_channels, config.bn_eps, vb.pp("norm1")))
            .transpose()?;
        let squeeze_excite = if config.squeeze_excite {
            Some(SqueezeExcite::new(out_channels, vb.pp("se"))?)
        } else {
            None
        };
        let shortcut = Shortcut::new(config, in_channels, out_channels, stride, vb)?;
        Ok(Self {
            pre_norm,
            chain,
            shortcut,
            squeeze_excite,
        })
    }

    /// The conv-BN units in order.
    pub fn chain(&self) -> &[ConvBn] {
        &self.chain
    }

    /// The shortcut.
    pub fn shortcut(&self) -> &Shortcut {
        &self.shortcut
    }

    /// The BatchNorm and ReLU before the first convolution, in a pre-activation block.
    pub fn pre_norm(&self) -> Option<&BatchNormRelu> {
        self.pre_norm.as_ref()
    }

    /// Folds every unit into the form `target` asks for.
    pub(crate) fn fold(self, target: FoldTarget) -> Result<Self> {
        Ok(Self {
            pre_norm: self.pre_norm.map(BatchNormRelu::fold).transpose()?,
            chain: self
                .chain
                .into_iter()
                .map(|unit| unit.fold(target))
                .collect::<Result<_>>()?,
            shortcut: self.shortcut.fold(target)?,
            squeeze_excite: self.squeeze_excite,
        })
    }

    pub(crate) fn parameter_count(&self) -> usize {
        self.units().map(ConvBn::parameter_count).sum::<usize>()
            + self
                .squeeze_excite
                .as_ref()
                .map_or(0, SqueezeExcite::parameter_count)
            + self
                .pre_norm
                .as_ref()
                .map_or(0, BatchNormRelu::parameter_count)
    }

    /// Its convolution units: the chain, then the projection if any.
    pub(crate) fn units(&self) -> impl Iterator<Item = &ConvBn> {
        let projection = match &self.shortcut {
            Shortcut::Projection(unit) | Shortcut::AvgDownProjection { unit, .. } => Some(unit),
            Shortcut::Identity | Shortcut::ZeroPad { .. } => None,
        };
        self.chain.iter().chain(projection)
    }

    /// Whether every unit of this block can run the channel-blocked kernels.
    pub(crate) fn can_block(&self) -> bool {
        self.units().all(ConvBn::can_block)
    }

    pub(crate) fn push_named_tensors(&self, prefix: &str, out: &mut NamedTensors) -> Result<()> {
        if let Some(norm) = &self.pre_norm {
            norm.push_named_tensors(&format!("{prefix}.norm1"), out);
        }
        let units = self.chain.len();
        for (i, unit) in self.chain.iter().enumerate() {
            let n = i + 1;
            let bn = if self.pre_norm.is_some() {
                format!("{prefix}.norm{}", n + 1)
            } else {
                format!("{prefix}.bn{n}")
            };
            debug_assert!(unit.bn().is_some() || n == units);
            unit.push_named_tensors(&format!("{prefix}.conv{n}"), &bn, out)?;
        }
        let downsample = format!("{prefix}.downsample");
        match &self.shortcut {
            // Pre-activation projections: timm's `downsample.conv`, no BatchNorm.
            Shortcut::Projection(unit) | Shortcut::AvgDownProjection { unit, .. }
                if self.pre_norm.is_some() =>
            {
                unit.push_named_tensors(&format!("{downsample}.conv"), "", out)?
            }
            Shortcut::Projection(unit) => unit.push_named_tensors(
                &format!("{downsample}.0"),
                &format!("{downsample}.1"),
                out,
            )?,
            // timm's Sequential(AvgPool2d or Identity, conv, BN).
            Shortcut::AvgDownProjection { unit, .. } => unit.push_named_tensors(
                &format!("{downsample}.1"),
                &format!("{downsample}.2"),
                out,
            )?,
            Shortcut::Identity | Shortcut::ZeroPad { .. } => {}
        }
        if let Some(se) = &self.squeeze_excite {
            se.push_named_tensors(&format!("{prefix}.se"), out);
        }
        Ok(())
    }

    /// The block as the fused training op runs it, with each unit's convolution and
    /// BatchNorm: a post-activation block with an identity or option-A shortcut whose
    /// units the op takes ([`ConvBn::fused_train_unit`]); `None` for any other block.
    fn fused_train_parts(&self, xs: &Tensor) -> Option<(BlockShape, Vec<FusedUnit<'_>>)> {
        let mut projection = None;
        let shortcut = match &self.shortcut {
            Shortcut::Identity => ShortcutShape::Identity,
            &Shortcut::ZeroPad {
                stride,
                pad_before,
                pad_after,
            } => ShortcutShape::ZeroPad {
                stride,
                before: pad_before,
                after: pad_after,
            },
            Shortcut::Projection(unit) => {
                let parts = unit.fused_train_unit(xs)?;
                let shape = parts.0;
                projection = Some(parts);
                ShortcutShape::Projection(shape)
            }
            Shortcut::AvgDownProjection { .. } => return None,
        };
        if self.pre_norm.is_some() || self.squeeze_excite.is_some() || xs.rank() != 4 {
            return None;
        }
        // The chain's units, then the projection's: the fused op's parameter order.
        let units: Vec<_> = self
            .chain
            .iter()
            .map(|unit| unit.fused_train_unit(xs))
            .chain(projection.map(Some))
            .collect::<Option<_>>()?;
        let shape = BlockShape {
            units: units[..self.chain.len()]
                .iter()
                .map(|(shape, ..)| *shape)
                .collect(),
            shortcut,
        };
        Some((
            shape,
            units.into_iter().map(|(_, conv, bn)| (conv, bn)).collect(),
        ))
    }

    /// The block as candle ops and the kernel tree's per-unit ops (training through
    /// [`forward_fused_run`] first where it can).
    pub(crate) fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (last, inner) = match self.chain.split_last() {
            Some(split) => split,
            None => candle_core::bail!("residual block without convolutions"),
        };
        let Some(pre_norm) = &self.pre_norm else {
            let shortcut = self.shortcut.forward_t(xs, train)?;
            let mut ys = xs.clone();
            for unit in inner {
                ys = unit.forward_with(&ys, None, true, train)?;
            }
            return match &self.squeeze_excite {
                None => last.forward_with(&ys, Some(&shortcut), true, train),
                // The gate needs the whole map first: no residual or ReLU in the unit.
                Some(se) => {
                    se.forward_add_relu(&last.forward_with(&ys, None, false, train)?, &shortcut)
                }
            };
        };
        let preact = pre_norm.forward_t(xs, train)?;
        let shortcut = match &self.shortcut {
            Shortcut::Projection(_) | Shortcut::AvgDownProjection { .. } => {
                self.shortcut.forward_t(&preact, train)?
            }
            Shortcut::Identity | Shortcut::ZeroPad { .. } => self.shortcut.forward_t(xs, train)?,
        };
        let mut ys = preact;
        for unit in inner {
            ys = unit.forward_with(&ys, None, true, train)?;
        }
        last.forward_with(&ys, Some(&shortcut), false, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    /// Every variable of `from` set to random values (positive running variances), and
    /// an identical copy of it.
    fn randomised_pair(from: &VarMap) -> Result<VarMap> {
        let copy = VarMap::new();
        let from = from
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("lock".into()))?;
        let mut to = copy
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("lock".into()))?;
        for (name, var) in from.iter() {
            let random = Tensor::randn(0f32, 0.5, var.shape(), var.device())?;
            let random = if name.ends_with("running_var") {
                (random.abs()? + 0.5)?
            } else if name.ends_with("bn1.weight") || name.ends_with("bn2.weight") {
                (random + 1.0)?
            } else {
                random
            };
            var.set(&random)?;
            to.insert(name.clone(), Var::from_tensor(&random.copy()?)?);
        }
        drop(to);
        Ok(copy)
    }

    /// The fused training block ([`block_grad`]) against the op-by-op path, from the same
    /// weights: the output, the running statistics after the step, and the gradients of
    /// the input and of every parameter, within 1e-4 of the largest value. Basic and
    /// bottleneck blocks (v1.5 and v1, where the stride is on the first 1x1) with the
    /// identity, option A and projection shortcuts, odd and even sizes; ResNet-D's
    /// pooled projection is not fused.
    #[test]
    fn fused_training_block_matches_the_op_by_op_one() -> Result<()> {
        let device = Device::Cpu;
        let bottleneck = ResNetConfig::imagenet(BlockKind::Bottleneck, [1, 1, 1, 1]);
        let resnet_d = bottleneck.clone().resnet_d();
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
        let block = ResidualBlock::new(&resnet_d, 64, 32, 2, vb)?;
        let input = Tensor::randn(0f32, 1.0, (2, 64, 4, 4), &device)?;
        assert!(forward_fused_run(&[&block], &input)?.is_none());
        let mut v1 = bottleneck.clone();
        v1.bottleneck_stride = crate::config::BottleneckStride::Reduce1x1;
        let cifar = ResNetConfig::cifar(1);
        // (config, each block's (in channels, planes, stride), input size)
        let cases = [
            (cifar.clone(), vec![(16, 16, 1)], 8),
            (cifar.clone(), vec![(16, 32, 2)], 8),
            (cifar.clone(), vec![(32, 64, 2)], 7),
            (cifar.clone(), vec![(32, 32, 1)], 5),
            (
                ResNetConfig::imagenet(BlockKind::Basic, [1, 1, 1, 1]),
                vec![(64, 64, 1)],
                6,
            ),
            // A run of three blocks as one op: identity, option A, identity.
            (cifar, vec![(16, 16, 1), (16, 32, 2), (32, 32, 1)], 9),
            // A basic block with a projection (ResNet-18's second stage).
            (
                ResNetConfig::imagenet(BlockKind::Basic, [1, 1, 1, 1]),
                vec![(64, 128, 2)],
                7,
            ),
            // Bottlenecks: a projection at stride 1, then the identity; a projection at
            // stride 2 on odd and even sizes; the same with the stride on the 1x1.
            (bottleneck.clone(), vec![(32, 16, 1), (64, 16, 1)], 5),
            (bottleneck.clone(), vec![(64, 32, 2)], 7),
            (bottleneck.clone(), vec![(64, 32, 2)], 6),
            (v1, vec![(64, 32, 2)], 7),
            // 24x24: planes larger than the flat 1x1 kernel tasks of 48 pixels.
            (bottleneck, vec![(64, 32, 1)], 24),
        ];
        for (config, specs, size) in cases {
            let what = format!("{specs:?} at {size}x{size}");
            let build = |vars: &VarMap| -> Result<Vec<ResidualBlock>> {
                let vb = VarBuilder::from_varmap(vars, DType::F32, &device);
                specs
                    .iter()
                    .enumerate()
                    .map(|(i, &(c_in, planes, stride))| {
                        ResidualBlock::new(&config, c_in, planes, stride, vb.pp(i))
                    })
                    .collect()
            };
            let fused_vars = VarMap::new();
            let fused = build(&fused_vars)?;
            let plain_vars = randomised_pair(&fused_vars)?;
            let plain = build(&plain_vars)?;
            let in_channels = specs[0].0;
            let input = Tensor::randn(0f32, 1.0, (3, in_channels, size, size), &device)?;
            let (x_fused, x_plain) = (Var::from_tensor(&input)?, Var::from_tensor(&input)?);
            let fused: Vec<&ResidualBlock> = fused.iter().collect();
            let (ys_fused, run) = forward_fused_run(&fused, x_fused.as_tensor())?
                .ok_or_else(|| candle_core::Error::Msg(format!("{what}: not fused")))?;
            assert_eq!(run, fused.len(), "{what}: every block in one op");
            let mut ys_plain = x_plain.as_tensor().clone();
            for block in &plain {
                ys_plain = block.forward_t(&ys_plain, true)?;
            }
            let r = Tensor::randn(0f32, 1.0, ys_plain.shape(), &device)?;
            let grads_fused = (&ys_fused * &r)?.sum_all()?.backward()?;
            let grads_plain = (&ys_plain * &r)?.sum_all()?.backward()?;

            let close = |a: &Tensor, b: &Tensor, name: &str| -> Result<()> {
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff <= 1e-4 * scale,
                    "{what}: {name} differs by {diff} (largest {scale})"
                );
                Ok(())
            };
            close(&ys_fused, &ys_plain, "output")?;
            let gradient = |grads: &candle_core::backprop::GradStore, t: &Tensor, name: &str| {
                grads.get(t).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!("{what}: no gradient for {name}"))
                })
            };
            close(
                &gradient(&grads_fused, x_fused.as_tensor(), "input")?,
                &gradient(&grads_plain, x_plain.as_tensor(), "input")?,
                "input gradient",
            )?;
            let fused_data = fused_vars
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("lock".into()))?;
            let plain_data = plain_vars
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("lock".into()))?;
            for (name, var) in fused_data.iter() {
                let other = &plain_data[name];
                if name.contains("running") {
                    close(var.as_tensor(), other.as_tensor(), name)?;
                } else {
                    close(
                        &gradient(&grads_fused, var.as_tensor(), name)?,
                        &gradient(&grads_plain, other.as_tensor(), name)?,
                        name,
                    )?;
                }
            }
        }
        Ok(())
    }
}
