//! The network: stem, stages of residual blocks, head.

use candle_core::{bail, DType, Device, Module, ModuleT, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::batch_norm::BatchNormRelu;
use crate::block::{ConvBn, ConvSpec, FoldTarget, NamedTensors, ResidualBlock, UnitKernel};
use crate::config::{ResNetConfig, StemKind};
use crate::cpu::{CpuIsa, Isa};

/// The layers before the first stage: one convolution (`conv1`, `bn1`) or ResNet-D's
/// three (`conv1.0`/`conv1.1`, `conv1.3`/`conv1.4`, `conv1.6`/`bn1`, as timm names them),
/// each with BatchNorm and ReLU, then the max-pool of ImageNet and deep stems. In a
/// pre-activation network the last convolution has no BatchNorm or ReLU (the first
/// block normalises), and Keras pads the pool with zeros.
#[derive(Debug, Clone)]
pub struct Stem {
    kind: StemKind,
    units: Vec<ConvBn>,
    /// The last unit has BatchNorm and ReLU (all but pre-activation stems).
    activated: bool,
    zero_padded_pool: bool,
}

impl Stem {
    fn new(config: &ResNetConfig, vb: &VarBuilder) -> Result<Self> {
        let convolutions = config.stem.convolutions(config.stem_width);
        let mut in_channels = config.in_channels;
        let mut units = Vec::new();
        for (i, &(kernel, stride, out_channels)) in convolutions.iter().enumerate() {
            let spec = ConvSpec {
                in_channels,
                out_channels,
                kernel,
                stride,
                groups: 1,
                bias: false,
            };
            let (conv, bn) = Self::names(convolutions.len(), i);
            let last = i + 1 == convolutions.len();
            let bn = (!(config.preactivation && last)).then(|| vb.pp(bn));
            let spec = ConvSpec {
                bias: config.conv_has_bias(bn.is_some()),
                ..spec
            };
            units.push(ConvBn::new(spec, config.bn_eps, vb.pp(conv), bn)?);
            in_channels = out_channels;
        }
        Ok(Self {
            kind: config.stem,
            units,
            activated: !config.preactivation,
            zero_padded_pool: config.zero_padded_pool,
        })
    }

    /// Checkpoint names of unit `i` of `count`: `conv1`/`bn1` alone, else timm's
    /// `Sequential` indices (conv, BN, ReLU per unit; the last BN is `bn1`).
    fn names(count: usize, i: usize) -> (String, String) {
        match (count, i) {
            (1, _) => ("conv1".into(), "bn1".into()),
            (n, i) if i + 1 == n => (format!("conv1.{}", 3 * i), "bn1".into()),
            (_, i) => (format!("conv1.{}", 3 * i), format!("conv1.{}", 3 * i + 1)),
        }
    }

    /// The stem's convolution and BatchNorm units, in order.
    pub fn units(&self) -> &[ConvBn] {
        &self.units
    }

    /// Conv, BN, ReLU for each unit: the stem's feature map before any pooling.
    fn forward_activation(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, unit) in self.units.iter().enumerate() {
            let relu = self.activated || i + 1 < self.units.len();
            xs = unit.forward_with(&xs, None, relu, train)?;
        }
        Ok(xs)
    }

    fn pool(&self, xs: &Tensor) -> Result<Tensor> {
        match (self.kind.max_pools(), xs.rank(), self.zero_padded_pool) {
            (false, _, _) => Ok(xs.clone()),
            (true, 5, zero_padded) => crate::cpu::blocked::max_pool(xs, 3, 2, 1, zero_padded),
            // Differentiable (candle's max pool has no backward): the network trains.
            (true, _, false) => crate::ops::max_pool_3x3_stride2(xs),
            (true, _, true) => crate::ops::max_pool_3x3_stride2_zero_padded(xs),
        }
    }

    /// Its units folded for inference: the first reads the image (`first`), the others
    /// the unit before (`rest`).
    fn fold(self, first: FoldTarget, rest: FoldTarget) -> Result<Self> {
        let units = self
            .units
            .into_iter()
            .enumerate()
            .map(|(i, unit)| unit.fold(if i == 0 { first } else { rest }))
            .collect::<Result<_>>()?;
        Ok(Self { units, ..self })
    }

    fn push_named_tensors(&self, out: &mut NamedTensors) -> Result<()> {
        for (i, unit) in self.units.iter().enumerate() {
            let (conv, bn) = Self::names(self.units.len(), i);
            unit.push_named_tensors(&conv, &bn, out)?;
        }
        Ok(())
    }
}

/// A stage: residual blocks at one width, the first of which may downsample.
#[derive(Debug, Clone)]
pub struct Stage {
    blocks: Vec<ResidualBlock>,
}

impl Stage {
    /// The blocks in order.
    pub fn blocks(&self) -> &[ResidualBlock] {
        &self.blocks
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut xs = xs.clone();
        for block in &self.blocks {
            xs = block.forward_t(&xs, train)?;
        }
        Ok(xs)
    }
}

/// One feature map of the backbone, as a detection or segmentation neck consumes it.
#[derive(Debug, Clone)]
pub struct FeatureMap {
    /// Where it comes from: `stem`, `layer1`, `layer2`, ...
    pub name: String,
    /// Reduction against the input (2 for an ImageNet stem, 4 for `layer1`, ...).
    pub stride: usize,
    /// The map, `(N, C, H / stride, W / stride)`.
    pub tensor: Tensor,
}

/// Where a feature map comes from and its shape, without computing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureInfo {
    /// `stem`, `layer1`, `layer2`, ...
    pub name: String,
    /// Channels of the map.
    pub channels: usize,
    /// Reduction against the input.
    pub stride: usize,
}

/// A ResNet: stem, stages, global average pool and an optional linear head.
///
/// Tensor names are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`,
/// `layer1.0.downsample.0`, `fc`), so torchvision and timm checkpoints load through a
/// plain [`VarBuilder`].
#[derive(Debug, Clone)]
pub struct ResNet {
    config: ResNetConfig,
    stem: Stem,
    stages: Vec<Stage>,
    /// Pre-activation networks: BatchNorm and ReLU after the last stage (`norm`).
    final_norm: Option<BatchNormRelu>,
    head: Option<Linear>,
    dtype: DType,
    device: Device,
    /// Stages run the channel-blocked CPU kernels on this instruction set (set by
    /// folding).
    blocked: Option<CpuIsa>,
}

/// How many of a network's convolutions run which kernel: [`ResNet::kernel_summary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelSummary {
    /// The instruction set of the blocked kernels, if the network runs them.
    pub isa: Option<Isa>,
    /// Blocked direct convolutions.
    pub direct: usize,
    /// Blocked Winograd F(2x2, 3x3) convolutions.
    pub winograd: usize,
    /// Folded im2col + GEMM convolutions (candle's convolution off the CPU).
    pub gemm: usize,
    /// Convolutions not folded (the network as loaded, trainable).
    pub unfolded: usize,
}

impl std::fmt::Display for KernelSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(isa) = self.isa {
            parts.push(format!(
                "blocked {isa}: {} direct, {} Winograd",
                self.direct, self.winograd
            ));
        }
        if self.gemm > 0 {
            parts.push(format!("{} im2col + GEMM", self.gemm));
        }
        if self.unfolded > 0 {
            parts.push(format!(
                "{} unfolded (convolution + BatchNorm)",
                self.unfolded
            ));
        }
        write!(f, "{}", parts.join("; "))
    }
}

/// Which CPU kernels [`ResNet::fold_batch_norm_with`] prepares the network for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CpuKernels {
    /// The channel-blocked kernels where they apply (f32 on the CPU, channel counts
    /// divisible by 16, no groups), 3x3 stride-1 convolutions by Winograd
    /// F(2x2, 3x3), the others direct; else im2col + GEMM.
    #[default]
    Auto,
    /// As `Auto`, but every blocked convolution direct (no Winograd).
    BlockedDirect,
    /// im2col + GEMM (the `gemm` crate) for every convolution.
    Gemm,
}

impl ResNet {
    /// Builds the network described by `config` from the tensors of `vb`.
    pub fn new(config: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let stem = Stem::new(config, &vb)?;
        let mut in_channels = config.stem_width;
        let mut stages = Vec::with_capacity(config.blocks_per_stage.len());
        for (index, (&blocks, &planes)) in config
            .blocks_per_stage
            .iter()
            .zip(&config.stage_widths)
            .enumerate()
        {
            let stage_vb = vb.pp(format!("layer{}", index + 1));
            let blocks = (0..blocks)
                .map(|b| {
                    let block = ResidualBlock::new(
                        config,
                        in_channels,
                        planes,
                        config.block_stride(index, b),
                        stage_vb.pp(b.to_string()),
                    );
                    in_channels = config.stage_out_channels(index);
                    block
                })
                .collect::<Result<Vec<_>>>()?;
            stages.push(Stage { blocks });
        }
        let final_norm = config
            .preactivation
            .then(|| BatchNormRelu::new(config.num_features(), config.bn_eps, vb.pp("norm")))
            .transpose()?;
        let head = match config.num_classes {
            0 => None,
            classes => Some(candle_nn::linear(
                config.num_features(),
                classes,
                vb.pp("fc"),
            )?),
        };
        Ok(Self {
            config: config.clone(),
            stem,
            stages,
            final_norm,
            head,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            blocked: None,
        })
    }

    /// Name and shape of every tensor a checkpoint of `config` holds, in torchvision
    /// naming, without allocating the weights: what a loader checks a file against.
    pub fn expected_tensors(config: &ResNetConfig) -> Result<Vec<(String, Vec<usize>)>> {
        let vb = VarBuilder::from_backend(Box::new(ShapeOnly), DType::F32, Device::Cpu);
        let model = Self::new(config, vb)?;
        Ok(model
            .named_tensors()?
            .into_iter()
            .map(|(name, tensor)| (name, tensor.dims().to_vec()))
            .collect())
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// The stem.
    pub fn stem(&self) -> &Stem {
        &self.stem
    }

    /// The stages in order.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The linear classifier, absent for a headless network.
    pub fn head(&self) -> Option<&Linear> {
        self.head.as_ref()
    }

    /// The dtype of the parameters (and of the inputs it expects).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Checks that `xs` is a batch this network can take, with a message naming what
    /// was expected and what was found.
    pub fn check_input(&self, xs: &Tensor) -> Result<()> {
        let dims = xs.dims();
        let expected_channels = self.config.in_channels;
        let &[_, channels, height, width] = dims else {
            bail!(
                "ResNet input must be a 4-D batch (N, {expected_channels}, H, W), found shape {dims:?}"
            );
        };
        if dims[0] == 0 {
            bail!("ResNet input batch is empty: shape {dims:?}");
        }
        if channels != expected_channels {
            bail!(
                "ResNet input must have {expected_channels} channels, found {channels} (shape {dims:?})"
            );
        }
        let min = self.config.output_stride();
        if height < min || width < min {
            bail!(
                "ResNet input {height}x{width} is too small: this network reduces its input \
                 {min}x, so it needs at least {min}x{min}"
            );
        }
        if xs.dtype() != self.dtype {
            bail!(
                "ResNet input has dtype {:?} but the model's parameters are {:?}; convert \
                 the input with to_dtype",
                xs.dtype(),
                self.dtype
            );
        }
        if !xs.device().same_device(&self.device) {
            bail!(
                "ResNet input is on {:?} but the model is on {:?}",
                xs.device().location(),
                self.device.location()
            );
        }
        Ok(())
    }

    /// Shapes of the feature maps [`ResNet::feature_maps`] returns.
    pub fn feature_info(&self) -> Vec<FeatureInfo> {
        let names = std::iter::once("stem".to_string())
            .chain((1..=self.stages.len()).map(|stage| format!("layer{stage}")));
        names
            .zip(self.feature_shapes())
            .map(|(name, (channels, stride))| FeatureInfo {
                name,
                channels,
                stride,
            })
            .collect()
    }

    /// Channels and stride of each feature map, without the names: what a forward pass
    /// needs to size its work.
    fn feature_shapes(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        // Before its pool (feature maps take the activation).
        let pool_stride = if self.config.stem.max_pools() { 2 } else { 1 };
        let stem_stride = self.config.stem.stride() / pool_stride;
        let stages = (0..self.stages.len()).scan(self.config.stem.stride(), |stride, index| {
            *stride *= self.config.stage_stride(index);
            Some((self.config.stage_out_channels(index), *stride))
        });
        std::iter::once((self.config.stem_width, stem_stride)).chain(stages)
    }

    /// The stem's activation (before pooling) and every stage's output, with their
    /// strides: the backbone of a detection or segmentation network. Inference mode.
    pub fn feature_maps(&self, xs: &Tensor) -> Result<Vec<FeatureMap>> {
        self.check_input(xs)?;
        let info = self.feature_info();
        let tensors = on_cpu_pool(xs, || -> Result<Vec<Tensor>> {
            let stem = self.stem.forward_activation(xs, false)?;
            let mut current = self.stem.pool(&stem)?;
            let mut tensors = vec![self.plain_layout(&stem)?];
            for (index, stage) in self.stages.iter().enumerate() {
                current = stage.forward_t(&current, false)?;
                if index + 1 == self.stages.len() {
                    current = self.final_norm_t(&current, false)?;
                }
                tensors.push(self.plain_layout(&current)?);
            }
            Ok(tensors)
        })?;
        Ok(info
            .into_iter()
            .zip(tensors)
            .map(|(info, tensor)| FeatureMap {
                name: info.name,
                stride: info.stride,
                tensor,
            })
            .collect())
    }

    /// The last feature map, before pooling, `(N, num_features, H / 32, W / 32)` for an
    /// ImageNet network; `train` selects BatchNorm's batch statistics.
    pub fn forward_features_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(xs)?;
        let pass = |xs: &Tensor| -> Result<Tensor> {
            let xs = self.stem.pool(&self.stem.forward_activation(xs, train)?)?;
            let xs = self.forward_stages_t(xs, train)?;
            self.plain_layout(&self.final_norm_t(&xs, train)?)
        };
        on_cpu_pool(xs, || {
            let batch = xs.dim(0)?;
            let step = self.images_per_pass(xs)?;
            if step >= batch {
                return pass(xs);
            }
            // A few images at a time: each layer's output then stays in the caches for
            // the next layer instead of streaming through memory (ResNet-50's first
            // stage writes 3 MiB per image). Images that large go one per thread, side
            // by side (ResNet-50 batch 8, 6 alternating runs on a noisy machine: median
            // 334 ms against 377 ms one after the other); smaller ones, many per pass,
            // one pass after the other (side by side measured a few % slower there).
            let run = |start: usize| pass(&xs.narrow(0, start, step.min(batch - start))?);
            let starts: Vec<usize> = (0..batch).step_by(step).collect();
            let parts = if step == 1 {
                use rayon::prelude::*;
                starts
                    .into_par_iter()
                    .map(run)
                    .collect::<Result<Vec<_>>>()?
            } else {
                starts.into_iter().map(run).collect::<Result<Vec<_>>>()?
            };
            Tensor::cat(&parts, 0)
        })
    }

    /// The stages. Training on the CPU in f32, runs of consecutive blocks that the fused
    /// op takes go as one op each (`block::forward_fused_run`: ResNet-20's nine blocks,
    /// ResNet-50's sixteen).
    fn forward_stages_t(&self, mut xs: Tensor, train: bool) -> Result<Tensor> {
        if !train {
            for stage in &self.stages {
                xs = stage.forward_t(&xs, false)?;
            }
            return Ok(xs);
        }
        let blocks: Vec<&ResidualBlock> = self.stages.iter().flat_map(|s| &s.blocks).collect();
        let mut at = 0;
        while at < blocks.len() {
            match crate::block::forward_fused_run(&blocks[at..], &xs)? {
                Some((ys, run)) => {
                    xs = ys;
                    at += run;
                }
                None => {
                    xs = blocks[at].forward_t(&xs, true)?;
                    at += 1;
                }
            }
        }
        Ok(xs)
    }

    /// How many images of `xs` a blocked CPU pass takes at once: as many as keep the
    /// largest activation within about 4 MiB; all of them elsewhere.
    fn images_per_pass(&self, xs: &Tensor) -> Result<usize> {
        let (batch, _, height, width) = xs.dims4()?;
        if self.blocked.is_none() {
            return Ok(batch);
        }
        // Measured on ResNet-50 batch 8 (2 cores, 32 MiB L3): 1 image per pass 293 ms,
        // 2 images 305-315 ms, all 8 at once 325 ms.
        const BUDGET: usize = 4 << 20;
        let largest = self
            .feature_shapes()
            .map(|(channels, stride)| {
                let stride = stride.max(1);
                channels * height.div_ceil(stride) * width.div_ceil(stride)
            })
            .max()
            .unwrap_or(0)
            * xs.dtype().size_in_bytes();
        Ok((BUDGET / largest.max(1)).clamp(1, batch.max(1)))
    }

    /// The final BatchNorm and ReLU of a pre-activation network; others have none.
    fn final_norm_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match &self.final_norm {
            Some(norm) => norm.forward_t(xs, train),
            None => Ok(xs.clone()),
        }
    }

    /// A feature map as `(N, C, H, W)` (the blocked network's stem and stages give
    /// `(N, C/16, H, W, 16)`).
    fn plain_layout(&self, xs: &Tensor) -> Result<Tensor> {
        if self.blocked.is_some() {
            crate::cpu::blocked::from_blocked(xs)
        } else {
            Ok(xs.clone())
        }
    }

    /// [`ResNet::forward_features_t`] in inference mode.
    pub fn forward_features(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_features_t(xs, false)
    }

    /// Global average pool and, unless `pre_logits` or headless, the linear classifier.
    pub fn forward_head(&self, features: &Tensor, pre_logits: bool) -> Result<Tensor> {
        let (_, channels, _, _) = features.dims4()?;
        if channels != self.config.num_features() {
            bail!(
                "forward_head expects {} channels, found {channels}",
                self.config.num_features()
            );
        }
        let pooled = features.mean(D::Minus1)?.mean(D::Minus1)?;
        match (&self.head, pre_logits) {
            (Some(fc), false) => fc.forward(&pooled),
            _ => Ok(pooled),
        }
    }

    /// Logits `(N, num_classes)` in inference mode, or the pooled features
    /// `(N, num_features)` for a headless network.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, false)
    }

    /// A view of the network that implements [`Module`] (inference), for APIs that take
    /// one. `ResNet` itself implements [`ModuleT`]; candle's blanket
    /// `impl<M: Module> ModuleT for M` forbids a type having both.
    pub fn inference(&self) -> Inference<'_> {
        Inference(self)
    }

    /// The same network for inference only, each BatchNorm folded into the convolution
    /// before it, in f32: with `k = gamma / sqrt(var + eps)`, `W' = W * k` and
    /// `b' = beta - mean * k`. One fused operation per conv-BN pair on the CPU instead
    /// of three or more. Consumes the network so that only one copy of the weights is
    /// ever held. Its `forward_t(_, true)` is an error, and its `named_tensors` hold the
    /// folded convolutions (weight and bias) beside the original BatchNorm statistics:
    /// save the unfolded network, not this one.
    ///
    /// On the CPU, an f32 network whose convolutions after the stem have channel counts
    /// divisible by 16 and no groups (every preset but ResNeXt) is also reordered for the
    /// channel-blocked kernels, on the best instruction set this CPU has (AVX-512, AVX2,
    /// NEON, else scalar) or the one `RESNET_CPU_ISA` names; see
    /// [`ResNet::fold_batch_norm_with`] and [`ResNet::fold_batch_norm_on`] to choose.
    pub fn fold_batch_norm(self) -> Result<Self> {
        self.fold_batch_norm_with(CpuKernels::Auto)
    }

    /// [`ResNet::fold_batch_norm`] for the given CPU kernels, on the instruction set
    /// `RESNET_CPU_ISA` names (an error if this CPU lacks it), else the best one.
    pub fn fold_batch_norm_with(self, kernels: CpuKernels) -> Result<Self> {
        let isa = CpuIsa::from_env()?;
        self.fold_batch_norm_on(kernels, isa)
    }

    /// [`ResNet::fold_batch_norm`] for the given CPU kernels on the instruction set
    /// `isa` (see [`CpuIsa::select`]).
    pub fn fold_batch_norm_on(self, kernels: CpuKernels, isa: CpuIsa) -> Result<Self> {
        let can_block = kernels != CpuKernels::Gemm
            && self.device.is_cpu()
            && self.dtype == DType::F32
            && self.stem.units.iter().all(ConvBn::can_block)
            && self
                .stages
                .iter()
                .all(|stage| stage.blocks.iter().all(ResidualBlock::can_block));
        let blocked = self.blocked.or(can_block.then_some(isa));
        let (stem_target, stage_target) = if let Some(isa) = blocked {
            (
                FoldTarget::Blocked {
                    plain_input: true,
                    winograd: false,
                    isa,
                },
                FoldTarget::Blocked {
                    plain_input: false,
                    winograd: kernels == CpuKernels::Auto,
                    isa,
                },
            )
        } else {
            (FoldTarget::Gemm, FoldTarget::Gemm)
        };
        let Self {
            config,
            stem,
            stages,
            final_norm,
            head,
            dtype,
            device,
            ..
        } = self;
        Ok(Self {
            // A deep stem's later units read blocked input, as the stages do.
            stem: stem.fold(stem_target, stage_target)?,
            stages: stages
                .into_iter()
                .map(|stage| {
                    Ok(Stage {
                        blocks: stage
                            .blocks
                            .into_iter()
                            .map(|block| block.fold(stage_target))
                            .collect::<Result<_>>()?,
                    })
                })
                .collect::<Result<_>>()?,
            final_norm: final_norm.map(BatchNormRelu::fold).transpose()?,
            config,
            head,
            dtype,
            device,
            blocked,
        })
    }

    /// Which kernels the network's convolutions run (say, for `--verbose` output).
    pub fn kernel_summary(&self) -> KernelSummary {
        let mut summary = KernelSummary {
            isa: self.cpu_isa(),
            ..KernelSummary::default()
        };
        let units = self.stem.units.iter().chain(
            self.stages
                .iter()
                .flat_map(|stage| stage.blocks.iter().flat_map(ResidualBlock::units)),
        );
        for unit in units {
            match unit.kernel() {
                UnitKernel::Unfolded => summary.unfolded += 1,
                UnitKernel::Gemm => summary.gemm += 1,
                UnitKernel::Direct(_) => summary.direct += 1,
                UnitKernel::Winograd(_) => summary.winograd += 1,
            }
        }
        summary
    }

    /// Whether the stages run the channel-blocked CPU kernels.
    pub fn is_blocked(&self) -> bool {
        self.blocked.is_some()
    }

    /// The instruction set the channel-blocked CPU kernels run on, if they do.
    pub fn cpu_isa(&self) -> Option<Isa> {
        self.blocked.map(CpuIsa::isa)
    }

    /// Every tensor of the network (parameters and BatchNorm running statistics) with
    /// its torchvision name, in network order: what a checkpoint of it holds.
    pub fn named_tensors(&self) -> Result<NamedTensors> {
        let mut out = Vec::new();
        self.stem.push_named_tensors(&mut out)?;
        for (s, stage) in self.stages.iter().enumerate() {
            for (b, block) in stage.blocks.iter().enumerate() {
                block.push_named_tensors(&format!("layer{}.{b}", s + 1), &mut out)?;
            }
        }
        if let Some(norm) = &self.final_norm {
            norm.push_named_tensors("norm", &mut out);
        }
        if let Some(fc) = &self.head {
            out.push(("fc.weight".to_string(), fc.weight().clone()));
            if let Some(bias) = fc.bias() {
                out.push(("fc.bias".to_string(), bias.clone()));
            }
        }
        Ok(out)
    }

    /// Multiply-adds of one image's forward pass at `(height, width)`: every convolution
    /// (counted as the direct algorithm does them, whatever Winograd saves) and the
    /// classifier, as torchvision's and fvcore's counts do (BatchNorm, ReLU, pooling and
    /// additions are not counted). FLOPs are twice this; a training step is about three
    /// forward passes' worth (the forward, the input's and the weights' gradients).
    pub fn multiply_adds(&self, height: usize, width: usize) -> u64 {
        let mut size = (height, width);
        let mut total = 0;
        for unit in &self.stem.units {
            let (macs, next) = unit.multiply_adds(size);
            total += macs;
            size = next;
        }
        if self.config.stem.max_pools() {
            size = (
                crate::block::output_size(size.0, 3, 2, 1),
                crate::block::output_size(size.1, 3, 2, 1),
            );
        }
        for block in self.stages.iter().flat_map(|stage| &stage.blocks) {
            let (macs, next) = block.multiply_adds(size);
            total += macs;
            size = next;
        }
        let head = self.head.as_ref().map_or(0, |fc| fc.weight().elem_count());
        total + head as u64
    }

    /// Number of learned parameters (BatchNorm running statistics excluded), as
    /// PyTorch's `sum(p.numel() for p in model.parameters())`.
    pub fn num_parameters(&self) -> usize {
        let head = self.head.as_ref().map_or(0, |fc| {
            fc.weight().elem_count() + fc.bias().map_or(0, Tensor::elem_count)
        });
        self.stem
            .units
            .iter()
            .map(ConvBn::parameter_count)
            .sum::<usize>()
            + self
                .stages
                .iter()
                .flat_map(|stage| &stage.blocks)
                .map(ResidualBlock::parameter_count)
                .sum::<usize>()
            + self
                .final_norm
                .as_ref()
                .map_or(0, BatchNormRelu::parameter_count)
            + head
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let features = self.forward_features_t(xs, train)?;
        self.forward_head(&features, false)
    }
}

/// Runs `pass` on a thread of rayon's pool when `xs` is on the CPU. The CPU kernels
/// split every layer over that pool: called from outside it, each layer would wake the
/// pool's threads and put the caller to sleep, then wake the caller again — three
/// context switches per layer. From inside, the calling worker takes part in each layer
/// and only the other threads need waking.
fn on_cpu_pool<T: Send>(xs: &Tensor, pass: impl FnOnce() -> T + Send) -> T {
    if xs.device().is_cpu() && rayon::current_thread_index().is_none() {
        rayon::join(pass, || ()).0
    } else {
        pass()
    }
}

/// A `VarBuilder` backend handing out zero-strided views of one scalar: shapes without
/// memory, for [`ResNet::expected_tensors`].
struct ShapeOnly;

impl candle_nn::var_builder::SimpleBackend for ShapeOnly {
    fn get(
        &self,
        shape: candle_core::Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        bail!("no shape given for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// [`ResNet`] in inference mode as a [`Module`]; see [`ResNet::inference`].
#[derive(Debug, Clone, Copy)]
pub struct Inference<'a>(&'a ResNet);

impl Module for Inference<'_> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.0.forward_t(xs, false)
    }
}
