//! Residual blocks: basic and bottleneck as one type, and the three shortcut options.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use std::sync::Arc;

use crate::batch_norm::BatchNorm2d;
use crate::config::{BlockKind, BottleneckStride, ResNetConfig, ShortcutKind};
use crate::cpu::blocked::{self, BlockedConv};
use crate::cpu::conv_grad::TrainConv;
use crate::cpu::gemm_conv::FusedConv;
use crate::cpu::CpuIsa;
use crate::squeeze_excite::SqueezeExcite;

/// A bias-free convolution followed by BatchNorm, the unit every ResNet is made of.
#[derive(Debug, Clone)]
pub struct ConvBn {
    weights: ConvWeights,
    bn: BatchNorm2d,
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
}

impl ConvBn {
    /// Reads the convolution `conv_vb` ("conv1") and the BatchNorm `bn_vb` ("bn1").
    pub(crate) fn new(
        spec: ConvSpec,
        bn_eps: f64,
        conv_vb: VarBuilder,
        bn_vb: VarBuilder,
    ) -> Result<Self> {
        let config = Conv2dConfig {
            padding: spec.kernel / 2,
            stride: spec.stride,
            groups: spec.groups,
            ..Default::default()
        };
        let conv = candle_nn::conv2d_no_bias(
            spec.in_channels,
            spec.out_channels,
            spec.kernel,
            config,
            conv_vb,
        )?;
        let bn = BatchNorm2d::new(spec.out_channels, bn_eps, bn_vb)?;
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
                let device = self.bn.weight().device();
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

    /// The BatchNorm.
    pub fn bn(&self) -> &BatchNorm2d {
        &self.bn
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
            (ConvWeights::Trainable(conv), _) => {
                return self
                    .bn
                    .forward_add_relu(&convolve(conv, xs)?, residual, relu, train);
            }
        };
        crate::batch_norm::add_relu(ys, residual, relu)
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
        let (scale, shift) = self.bn.scale_and_shift()?;
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
            let source = crate::cpu::gemm_conv::cpu_data::<f32>(&storage, layout)?;
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
        let out_channels = self.bn.channels();
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
        conv + self.bn.weight().elem_count() + self.bn.bias().elem_count()
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
        for (name, tensor) in [
            ("weight", self.bn.weight()),
            ("bias", self.bn.bias()),
            ("running_mean", self.bn.running_mean()),
            ("running_var", self.bn.running_var()),
        ] {
            out.push((format!("{bn}.{name}"), tensor.clone()));
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

/// Tensors with their checkpoint names, in network order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// How a block's input is carried to its output.
#[derive(Debug, Clone)]
pub enum Shortcut {
    /// The input itself.
    Identity,
    /// Option A: subsample by `stride`, then zero-pad channels before and after.
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
        let projection = || -> Result<Self> {
            let spec = ConvSpec {
                in_channels,
                out_channels,
                kernel: 1,
                stride,
                groups: 1,
            };
            let vb = vb.pp("downsample");
            Ok(Self::Projection(ConvBn::new(
                spec,
                config.bn_eps,
                vb.pp("0"),
                vb.pp("1"),
            )?))
        };
        match config.shortcut {
            ShortcutKind::ProjectionAll => projection(),
            _ if !shape_changes => Ok(Self::Identity),
            ShortcutKind::Projection => projection(),
            ShortcutKind::AvgDownProjection => {
                let spec = ConvSpec {
                    in_channels,
                    out_channels,
                    kernel: 1,
                    stride: 1,
                    groups: 1,
                };
                let vb = vb.pp("downsample");
                let unit = ConvBn::new(spec, config.bn_eps, vb.pp("1"), vb.pp("2"))?;
                Ok(Self::AvgDownProjection { stride, unit })
            }
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
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    chain: Vec<ConvBn>,
    shortcut: Shortcut,
    /// Squeeze-and-excitation on the last unit's output (`se`), if the network has it.
    squeeze_excite: Option<SqueezeExcite>,
}

impl ResidualBlock {
    /// Builds block reading `in_channels` channels, of stage width `planes`.
    pub(crate) fn new(
        config: &ResNetConfig,
        in_channels: usize,
        planes: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let out_channels = planes * config.block.expansion();
        let specs = match config.block {
            BlockKind::Basic => vec![
                ConvSpec {
                    in_channels,
                    out_channels: planes,
                    kernel: 3,
                    stride,
                    groups: 1,
                },
                ConvSpec {
                    in_channels: planes,
                    out_channels,
                    kernel: 3,
                    stride: 1,
                    groups: 1,
                },
            ],
            BlockKind::Bottleneck => {
                let width = config.bottleneck_width(planes);
                // v1 strides on the first 1x1, v1.5 on the 3x3.
                let reduce_stride = match config.bottleneck_stride {
                    BottleneckStride::Reduce1x1 => stride,
                    _ => 1,
                };
                vec![
                    ConvSpec {
                        in_channels,
                        out_channels: width,
                        kernel: 1,
                        stride: reduce_stride,
                        groups: 1,
                    },
                    ConvSpec {
                        in_channels: width,
                        out_channels: width,
                        kernel: 3,
                        stride: stride / reduce_stride,
                        groups: config.groups,
                    },
                    ConvSpec {
                        in_channels: width,
                        out_channels,
                        kernel: 1,
                        stride: 1,
                        groups: 1,
                    },
                ]
            }
        };
        let chain = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let n = i + 1;
                ConvBn::new(
                    spec,
                    config.bn_eps,
                    vb.pp(format!("conv{n}")),
                    vb.pp(format!("bn{n}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let squeeze_excite = if config.squeeze_excite {
            Some(SqueezeExcite::new(out_channels, vb.pp("se"))?)
        } else {
            None
        };
        let shortcut = Shortcut::new(config, in_channels, out_channels, stride, vb)?;
        Ok(Self {
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

    /// Folds every unit into the form `target` asks for.
    pub(crate) fn fold(self, target: FoldTarget) -> Result<Self> {
        Ok(Self {
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
        self.chain.iter().all(ConvBn::can_block)
            && match &self.shortcut {
                Shortcut::Projection(unit) | Shortcut::AvgDownProjection { unit, .. } => {
                    unit.can_block()
                }
                Shortcut::Identity | Shortcut::ZeroPad { .. } => true,
            }
    }

    pub(crate) fn push_named_tensors(&self, prefix: &str, out: &mut NamedTensors) -> Result<()> {
        for (i, unit) in self.chain.iter().enumerate() {
            let n = i + 1;
            unit.push_named_tensors(
                &format!("{prefix}.conv{n}"),
                &format!("{prefix}.bn{n}"),
                out,
            )?;
        }
        let downsample = format!("{prefix}.downsample");
        match &self.shortcut {
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

    pub(crate) fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let shortcut = self.shortcut.forward_t(xs, train)?;
        let (last, inner) = match self.chain.split_last() {
            Some(split) => split,
            None => candle_core::bail!("residual block without convolutions"),
        };
        let mut ys = xs.clone();
        for unit in inner {
            ys = unit.forward_with(&ys, None, true, train)?;
        }
        match &self.squeeze_excite {
            None => last.forward_with(&ys, Some(&shortcut), true, train),
            // The gate needs the whole map first: no residual or ReLU in the unit.
            Some(se) => {
                se.forward_add_relu(&last.forward_with(&ys, None, false, train)?, &shortcut)
            }
        }
    }
}
