//! [`ResNetConfig`]: one description for every network of the family, and its presets.

use std::fmt;
use std::str::FromStr;

use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

/// The residual block a stage is built from (paper section 3.3 and figure 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BlockKind {
    /// Two 3x3 convolutions; output channels = stage width (expansion 1).
    Basic,
    /// 1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand; output channels = 4 x stage
    /// width. The stride sits on the 3x3, as in torchvision's "ResNet v1.5".
    Bottleneck,
}

impl BlockKind {
    /// How many times the stage width the block's output channels are.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Where a bottleneck block strides when its stage downsamples (basic blocks stride on
/// their first 3x3 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BottleneckStride {
    /// On the 3x3 convolution: torchvision's and timm's "ResNet v1.5".
    #[default]
    Conv3x3,
    /// On the first 1x1 convolution: the paper's ResNet ("v1"), Keras' ResNet50/101/152,
    /// transformers' `downsample_in_bottleneck: true`.
    Reduce1x1,
}

/// How the images a network was trained on were normalised: what its input must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum InputNormalization {
    /// RGB scaled to [0, 1], less the ImageNet mean, over its standard deviation
    /// (torchvision, timm, transformers, the CIFAR ResNets).
    #[default]
    MeanStd,
    /// Keras' `'caffe'` mode (ResNet50/101/152): RGB to BGR, the ImageNet mean
    /// subtracted from values in [0, 255], no scaling.
    Caffe,
    /// Keras' `'tf'` mode (ResNet50V2/101V2/152V2): scaled to [-1, 1].
    Tf,
}

/// The layers before the first stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StemKind {
    /// 7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max-pool (paper Table 1): stride 4.
    ImageNet,
    /// 3x3/1 convolution, BatchNorm, ReLU, no pooling (paper section 4.2): stride 1.
    Cifar,
    /// ResNet-D's deep stem (timm's `stem_type='deep'`): three 3x3 convolutions (the first
    /// strided) of half, half and all the stem width, each with BatchNorm and ReLU, then
    /// the 3x3/2 max-pool: stride 4.
    Deep,
    /// timm's `stem_type='deep_tiered'`: as `Deep`, the first convolution 3/8 of the
    /// stem width.
    DeepTiered,
}

impl StemKind {
    /// Spatial reduction of the stem's output against the input.
    pub fn stride(self) -> usize {
        self.convolutions(64).iter().map(|c| c.1).product::<usize>()
            * if self.max_pools() { 2 } else { 1 }
    }

    /// The stem's convolutions for a stem of `width` output channels: kernel, stride and
    /// output channels of each (each followed by BatchNorm and ReLU).
    pub fn convolutions(self, width: usize) -> Vec<(usize, usize, usize)> {
        match self {
            StemKind::ImageNet => vec![(7, 2, width)],
            StemKind::Cifar => vec![(3, 1, width)],
            StemKind::Deep => vec![(3, 2, width / 2), (3, 1, width / 2), (3, 1, width)],
            StemKind::DeepTiered => vec![(3, 2, 3 * (width / 8)), (3, 1, width / 2), (3, 1, width)],
        }
    }

    /// Whether a 3x3/2 max-pool follows the convolutions.
    pub fn max_pools(self) -> bool {
        !matches!(self, StemKind::Cifar)
    }
}

/// How a block's input reaches its output (paper section 4.1, options A, B and C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ShortcutKind {
    /// Option A, parameter-free: identity, or where the shape changes, subsample by the
    /// stride (`x[:, :, ::2, ::2]`) and zero-pad the new channels, half before and half
    /// after the identity channels (the convention of the pretrained CIFAR ResNets).
    ZeroPad,
    /// Option B: identity, or a 1x1 projection + BatchNorm where the shape changes
    /// (torchvision and timm).
    Projection,
    /// Option C: a 1x1 projection + BatchNorm on every block.
    ProjectionAll,
    /// Option B as ResNet-D does it (timm's `avg_down=True`): where the shape changes,
    /// `AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)` (none at stride 1),
    /// then a stride-1 1x1 projection + BatchNorm.
    AvgDownProjection,
    /// Keras' ResNetV2: a 1x1 projection where the channels change; where only the
    /// resolution does, the input subsampled (`MaxPooling2D(1, strides)`).
    ProjectionOrSubsample,
}

/// Everything that tells one ResNet from another.
///
/// Stage `i` has `blocks_per_stage[i]` blocks of width `stage_widths[i]`; the first stage
/// keeps the stem's resolution and every later one halves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Basic or bottleneck blocks.
    pub block: BlockKind,
    /// Number of residual blocks in each stage; any number of stages.
    pub blocks_per_stage: Vec<usize>,
    /// Width ("planes") of each stage; its output has `width * block.expansion()` channels.
    pub stage_widths: Vec<usize>,
    /// The layers before the first stage.
    pub stem: StemKind,
    /// Output channels of the stem.
    pub stem_width: usize,
    /// Shortcut option A, B or C.
    pub shortcut: ShortcutKind,
    /// Groups of the bottleneck's 3x3 convolution (ResNeXt cardinality).
    pub groups: usize,
    /// Channels per group of the bottleneck's 3x3 at width 64 (64 for ResNet, 128 for
    /// Wide ResNet, 4 for ResNeXt-32x4d).
    pub width_per_group: usize,
    /// Channels of the input image.
    pub in_channels: usize,
    /// Classes of the linear head; 0 means headless (the pooled features are the output).
    pub num_classes: usize,
    /// BatchNorm epsilon (PyTorch's default 1e-5).
    pub bn_eps: f64,
    /// Where bottleneck blocks stride (v1.5 by default; absent from older configs).
    #[serde(default)]
    pub bottleneck_stride: BottleneckStride,
    /// A squeeze-and-excitation gate on each block's last BatchNorm output, before the
    /// shortcut is added (timm's `attn_layer='se'`; absent from older configs).
    #[serde(default)]
    pub squeeze_excite: bool,
    /// Pre-activation blocks (He et al., "Identity Mappings in Deep Residual Networks",
    /// 2016; timm's `resnetv2_*`, Keras' ResNet50V2): BatchNorm and ReLU before each
    /// convolution (`norm1`, `conv1`, `norm2`, ...), projections without BatchNorm taken
    /// from the pre-activation, a stem without BatchNorm after its last convolution, a
    /// final BatchNorm and ReLU (`norm`) before the pool.
    #[serde(default)]
    pub preactivation: bool,
    /// Each stage but the last downsamples in its last block instead of the next stage
    /// in its first (Keras' ResNetV2: `stride1=2` on `conv2`-`conv4`'s last block).
    #[serde(default)]
    pub stride_in_last_block: bool,
    /// The first stage halves the resolution too (transformers'
    /// `downsample_in_first_stage: true`): an output stride of 64 with an ImageNet stem.
    #[serde(default)]
    pub downsample_first_stage: bool,
    /// Convolutions carry biases, as Keras builds them: every one in a v1 network; in a
    /// pre-activation one those not followed by BatchNorm (stem, projection, last of
    /// each block; Keras' `use_bias=False` on the others).
    #[serde(default)]
    pub conv_bias: bool,
    /// The stem's max pool pads with zeros (Keras' `ZeroPadding2D`) rather than -inf
    /// (PyTorch): they differ where its input can be negative (pre-activation stems have
    /// no ReLU before it).
    #[serde(default)]
    pub zero_padded_pool: bool,
    /// The input normalisation the weights expect (ImageNet mean and standard deviation
    /// unless Keras'): `classify` and `eval` apply it.
    #[serde(default)]
    pub input_normalization: InputNormalization,
}

/// Keras' BatchNorm epsilon in its ResNets.
pub const KERAS_BN_EPS: f64 = 1.001e-5;

/// Every preset, each defined here and nowhere else: its name (the one its home library
/// uses) and its configuration. Makes [`PRESET_NAMES`] and [`ResNetConfig::preset`].
macro_rules! presets {
    ($($name:literal => $config:expr;)*) => {
        /// Every preset name, in the order of the paper, torchvision and timm.
        pub const PRESET_NAMES: &[&str] = &[$($name),*];

        fn preset_config(name: &str) -> Option<ResNetConfig> {
            use BlockKind::{Basic, Bottleneck};
            match name {
                $($name => Some($config),)*
                _ => None,
            }
        }
    };
}

presets! {
    // The paper's Table 1, as torchvision builds them (stride on the 3x3: "v1.5").
    "resnet18" => ResNetConfig::imagenet(Basic, [2, 2, 2, 2]);
    "resnet34" => ResNetConfig::imagenet(Basic, [3, 4, 6, 3]);
    "resnet50" => ResNetConfig::imagenet(Bottleneck, [3, 4, 6, 3]);
    "resnet101" => ResNetConfig::imagenet(Bottleneck, [3, 4, 23, 3]);
    "resnet152" => ResNetConfig::imagenet(Bottleneck, [3, 8, 36, 3]);
    // torchvision's wide and ResNeXt variants.
    "wide_resnet50_2" => ResNetConfig::imagenet(Bottleneck, [3, 4, 6, 3]).with_groups(1, 128);
    "wide_resnet101_2" => ResNetConfig::imagenet(Bottleneck, [3, 4, 23, 3]).with_groups(1, 128);
    "resnext50_32x4d" => ResNetConfig::imagenet(Bottleneck, [3, 4, 6, 3]).with_groups(32, 4);
    "resnext101_32x8d" => ResNetConfig::imagenet(Bottleneck, [3, 4, 23, 3]).with_groups(32, 8);
    "resnext101_64x4d" => ResNetConfig::imagenet(Bottleneck, [3, 4, 23, 3]).with_groups(64, 4);
    // The paper's CIFAR networks (section 4.2): depth 6n + 2.
    "resnet20" => ResNetConfig::cifar(3);
    "resnet32" => ResNetConfig::cifar(5);
    "resnet44" => ResNetConfig::cifar(7);
    "resnet56" => ResNetConfig::cifar(9);
    "resnet110" => ResNetConfig::cifar(18);
    "resnet1202" => ResNetConfig::cifar(200);
    // timm's ResNet-D (He et al., "Bag of Tricks", 2019): deep stem, average-pool
    // downsampling in the shortcuts.
    "resnet26d" => ResNetConfig::imagenet(Bottleneck, [2, 2, 2, 2]).resnet_d();
    "resnet50d" => ResNetConfig::imagenet(Bottleneck, [3, 4, 6, 3]).resnet_d();
    "resnet101d" => ResNetConfig::imagenet(Bottleneck, [3, 4, 23, 3]).resnet_d();
    "resnet152d" => ResNetConfig::imagenet(Bottleneck, [3, 8, 36, 3]).resnet_d();
    "resnet200d" => ResNetConfig::imagenet(Bottleneck, [3, 24, 36, 3]).resnet_d();
    // timm's squeeze-and-excitation networks (Hu et al., 2018).
    "seresnet50" => ResNetConfig::imagenet(Bottleneck, [3, 4, 6, 3]).with_squeeze_excite();
    "seresnet152d" =>
        ResNetConfig::imagenet(Bottleneck, [3, 8, 36, 3]).resnet_d().with_squeeze_excite();
    "seresnext26d_32x4d" => ResNetConfig::imagenet(Bottleneck, [2, 2, 2, 2])
        .with_groups(32, 4)
        .resnet_d()
        .with_squeeze_excite();
    "seresnext50_32x4d" =>
        ResNetConfig::imagenet(Bottleneck, [3, 4, 6, 3]).with_groups(32, 4).with_squeeze_excite();
    "seresnext101_32x4d" =>
        ResNetConfig::imagenet(Bottleneck, [3, 4, 23, 3]).with_groups(32, 4).with_squeeze_excite();
    // timm's pre-activation ResNets (He et al., "Identity Mappings", 2016): `resnetv2_*`,
    // the "d" ones with ResNet-D's deep stem and average-pool shortcuts.
    "resnetv2_50" => ResNetConfig::imagenet(Bottleneck, [3, 4, 6, 3]).preactivated();
    "resnetv2_50d" => ResNetConfig::imagenet(Bottleneck, [3, 4, 6, 3]).resnet_d().preactivated();
    "resnetv2_101" => ResNetConfig::imagenet(Bottleneck, [3, 4, 23, 3]).preactivated();
    "resnetv2_101d" => ResNetConfig::imagenet(Bottleneck, [3, 4, 23, 3]).resnet_d().preactivated();
    "resnetv2_152" => ResNetConfig::imagenet(Bottleneck, [3, 8, 36, 3]).preactivated();
    "resnetv2_152d" => ResNetConfig::imagenet(Bottleneck, [3, 8, 36, 3]).resnet_d().preactivated();
    // keras.applications: ResNet50/101/152 (the paper's v1: stride on the first 1x1,
    // biased convolutions) and ResNet50V2/101V2/152V2 (pre-activation, Keras' layout).
    "keras_resnet50" => ResNetConfig::imagenet(Bottleneck, [3, 4, 6, 3]).keras_v1();
    "keras_resnet101" => ResNetConfig::imagenet(Bottleneck, [3, 4, 23, 3]).keras_v1();
    "keras_resnet152" => ResNetConfig::imagenet(Bottleneck, [3, 8, 36, 3]).keras_v1();
    "resnet50v2" => ResNetConfig::imagenet(Bottleneck, [3, 4, 6, 3]).keras_v2();
    "resnet101v2" => ResNetConfig::imagenet(Bottleneck, [3, 4, 23, 3]).keras_v2();
    "resnet152v2" => ResNetConfig::imagenet(Bottleneck, [3, 8, 36, 3]).keras_v2();
}

impl ResNetConfig {
    /// An ImageNet ResNet as in torchvision: 7x7 stem of 64 channels, stages of width
    /// 64, 128, 256, 512, option B shortcuts, 1000 classes.
    pub fn imagenet(block: BlockKind, blocks_per_stage: [usize; 4]) -> Self {
        Self {
            block,
            blocks_per_stage: blocks_per_stage.to_vec(),
            stage_widths: vec![64, 128, 256, 512],
            stem: StemKind::ImageNet,
            stem_width: 64,
            shortcut: ShortcutKind::Projection,
            groups: 1,
            width_per_group: 64,
            in_channels: 3,
            num_classes: 1000,
            bn_eps: 1e-5,
            bottleneck_stride: BottleneckStride::Conv3x3,
            squeeze_excite: false,
            preactivation: false,
            stride_in_last_block: false,
            downsample_first_stage: false,
            conv_bias: false,
            zero_padded_pool: false,
            input_normalization: InputNormalization::MeanStd,
        }
    }

    /// A CIFAR ResNet of paper section 4.2: depth 6n + 2, three stages of `n` basic blocks
    /// of width 16, 32, 64, option A shortcuts, 10 classes.
    pub fn cifar(n: usize) -> Self {
        Self {
            blocks_per_stage: vec![n; 3],
            stage_widths: vec![16, 32, 64],
            stem: StemKind::Cifar,
            stem_width: 16,
            shortcut: ShortcutKind::ZeroPad,
            num_classes: 10,
            ..Self::imagenet(BlockKind::Basic, [n; 4])
        }
    }

    /// The preset of that name (one of [`PRESET_NAMES`]), if there is one.
    pub fn preset(name: &str) -> Option<Self> {
        preset_config(name)
    }

    /// A preset of the table above (the named constructors below).
    fn known(name: &str) -> Self {
        preset_config(name).unwrap_or_else(|| unreachable!("{name} is in the preset table"))
    }

    /// The ResNet-D changes (timm's `stem_type='deep'`, `avg_down=True`): a stem of three
    /// 3x3 convolutions, shortcuts that average-pool before their 1x1 projection.
    pub fn resnet_d(mut self) -> Self {
        self.stem = StemKind::Deep;
        self.shortcut = ShortcutKind::AvgDownProjection;
        self
    }

    /// The pre-activation form of this network (timm's `resnetv2_*`).
    pub fn preactivated(mut self) -> Self {
        self.preactivation = true;
        self
    }

    /// Keras' ResNet50/101/152 layout: stride on the first 1x1, biased convolutions,
    /// BatchNorm epsilon 1.001e-5, zero-padded stem pool (after a ReLU: as -inf), Keras'
    /// `'caffe'` input.
    pub fn keras_v1(self) -> Self {
        Self {
            bottleneck_stride: BottleneckStride::Reduce1x1,
            input_normalization: InputNormalization::Caffe,
            ..self.keras()
        }
    }

    /// Keras' ResNet50V2/101V2/152V2 layout: pre-activation, each stage but the last
    /// downsampling in its last block through a subsampled identity, projections where
    /// the channels change, biases where no BatchNorm follows, BatchNorm epsilon
    /// 1.001e-5, zero-padded stem pool, inputs in [-1, 1].
    pub fn keras_v2(self) -> Self {
        Self {
            preactivation: true,
            stride_in_last_block: true,
            shortcut: ShortcutKind::ProjectionOrSubsample,
            input_normalization: InputNormalization::Tf,
            ..self.keras()
        }
    }

    /// What Keras' two layouts share: biases, its epsilon, zero padding.
    fn keras(self) -> Self {
        Self {
            conv_bias: true,
            bn_eps: KERAS_BN_EPS,
            zero_padded_pool: true,
            ..self
        }
    }

    /// ResNet-18 (paper Table 1).
    pub fn resnet18() -> Self {
        Self::known("resnet18")
    }
    /// ResNet-34 (paper Table 1).
    pub fn resnet34() -> Self {
        Self::known("resnet34")
    }
    /// ResNet-50 (paper Table 1, stride on the 3x3 as torchvision).
    pub fn resnet50() -> Self {
        Self::known("resnet50")
    }
    /// ResNet-101 (paper Table 1).
    pub fn resnet101() -> Self {
        Self::known("resnet101")
    }
    /// ResNet-152 (paper Table 1).
    pub fn resnet152() -> Self {
        Self::known("resnet152")
    }
    /// Wide ResNet-50-2 (torchvision): bottleneck inner width doubled.
    pub fn wide_resnet50_2() -> Self {
        Self::known("wide_resnet50_2")
    }
    /// Wide ResNet-101-2 (torchvision).
    pub fn wide_resnet101_2() -> Self {
        Self::known("wide_resnet101_2")
    }
    /// ResNeXt-50 32x4d (torchvision).
    pub fn resnext50_32x4d() -> Self {
        Self::known("resnext50_32x4d")
    }
    /// ResNeXt-101 32x8d (torchvision).
    pub fn resnext101_32x8d() -> Self {
        Self::known("resnext101_32x8d")
    }
    /// ResNeXt-101 64x4d (torchvision).
    pub fn resnext101_64x4d() -> Self {
        Self::known("resnext101_64x4d")
    }
    /// CIFAR ResNet-20 (n = 3, about 0.27M parameters).
    pub fn resnet20() -> Self {
        Self::known("resnet20")
    }
    /// CIFAR ResNet-32 (n = 5).
    pub fn resnet32() -> Self {
        Self::known("resnet32")
    }
    /// CIFAR ResNet-44 (n = 7).
    pub fn resnet44() -> Self {
        Self::known("resnet44")
    }
    /// CIFAR ResNet-56 (n = 9).
    pub fn resnet56() -> Self {
        Self::known("resnet56")
    }
    /// CIFAR ResNet-110 (n = 18).
    pub fn resnet110() -> Self {
        Self::known("resnet110")
    }
    /// CIFAR ResNet-1202 (n = 200).
    pub fn resnet1202() -> Self {
        Self::known("resnet1202")
    }

    /// The name of the preset this configuration equals, if any.
    pub fn preset_name(&self) -> Option<&'static str> {
        PRESET_NAMES
            .iter()
            .copied()
            .find(|name| Self::preset(name).as_ref() == Some(self))
    }

    /// A short description: the preset name, with what differs from it (classes, input
    /// channels), or the block kind and stage layout.
    pub fn describe(&self) -> String {
        // The preset it is, classes and input channels aside; else the one it is with
        // the stride moved (torchvision's resnet50 with the paper's v1 stride).
        let normalized = |config: &Self, stride| Self {
            num_classes: 0,
            in_channels: 3,
            bottleneck_stride: stride,
            ..config.clone()
        };
        let find = |stride: Option<BottleneckStride>| {
            PRESET_NAMES.iter().copied().find(|name| {
                Self::preset(name).is_some_and(|p| {
                    let stride = stride.unwrap_or(p.bottleneck_stride);
                    normalized(&p, stride) == normalized(self, stride)
                })
            })
        };
        let preset = find(None).or_else(|| find(Some(BottleneckStride::default())));
        let mut text = match preset {
            Some(name) => name.to_string(),
            None => format!(
                "custom ResNet ({} blocks {:?}, widths {:?}, {:?} stem of {}, groups {}x{}, shortcut {})",
                self.block,
                self.blocks_per_stage,
                self.stage_widths,
                self.stem,
                self.stem_width,
                self.groups,
                self.width_per_group,
                self.shortcut
            ),
        };
        let default_classes = preset
            .and_then(Self::preset)
            .map_or(usize::MAX, |p| p.num_classes);
        if self.num_classes != default_classes {
            text += &format!(", {} classes", self.num_classes);
        }
        if self.in_channels != 3 {
            text += &format!(", {} input channels", self.in_channels);
        }
        if preset.is_none() {
            for (flag, note) in [
                (self.preactivation, ", pre-activation"),
                (
                    self.stride_in_last_block,
                    ", stride in each stage's last block",
                ),
                (self.downsample_first_stage, ", first stage strided"),
                (self.conv_bias, ", convolutions with biases"),
                (self.squeeze_excite, ", squeeze-and-excitation"),
            ] {
                if flag {
                    text += note;
                }
            }
        }
        let preset_stride = preset.and_then(Self::preset).map(|p| p.bottleneck_stride);
        if self.block == BlockKind::Bottleneck
            && self.bottleneck_stride == BottleneckStride::Reduce1x1
            && preset_stride != Some(BottleneckStride::Reduce1x1)
        {
            text += ", v1 (stride on the first 1x1)";
        }
        text
    }

    /// The same network with squeeze-and-excitation gates (timm's SE-ResNets).
    pub fn with_squeeze_excite(mut self) -> Self {
        self.squeeze_excite = true;
        self
    }

    /// The same network striding its bottlenecks at `stride` (v1 or v1.5).
    pub fn with_bottleneck_stride(mut self, stride: BottleneckStride) -> Self {
        self.bottleneck_stride = stride;
        self
    }

    /// The same network with other groups and channels per group (ResNeXt, Wide ResNet).
    pub fn with_groups(mut self, groups: usize, width_per_group: usize) -> Self {
        self.groups = groups;
        self.width_per_group = width_per_group;
        self
    }

    /// The same network with another number of classes (0: headless).
    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    /// The same network for images of another channel count.
    pub fn with_in_channels(mut self, in_channels: usize) -> Self {
        self.in_channels = in_channels;
        self
    }

    /// The same network with another shortcut option.
    pub fn with_shortcut(mut self, shortcut: ShortcutKind) -> Self {
        self.shortcut = shortcut;
        self
    }

    /// Whether a convolution has a bias: one `followed_by_bn` in a Keras v1 network, or
    /// one not followed by BatchNorm in a Keras pre-activation network.
    pub fn conv_has_bias(&self, followed_by_bn: bool) -> bool {
        self.conv_bias && !(self.preactivation && followed_by_bn)
    }

    /// Output channels of stage `stage`.
    pub fn stage_out_channels(&self, stage: usize) -> usize {
        self.stage_widths[stage] * self.block.expansion()
    }

    /// How much stage `stage` reduces the resolution: every stage but the first halves it
    /// in its first block, or (Keras V2) every stage but the last in its last block.
    pub fn stage_stride(&self, stage: usize) -> usize {
        let halves = if self.stride_in_last_block {
            stage + 1 < self.blocks_per_stage.len()
        } else {
            stage > 0 || self.downsample_first_stage
        };
        if halves {
            2
        } else {
            1
        }
    }

    /// Stride of block `block` of stage `stage`.
    pub fn block_stride(&self, stage: usize, block: usize) -> usize {
        let strided_block = if self.stride_in_last_block {
            self.blocks_per_stage[stage].saturating_sub(1)
        } else {
            0
        };
        if block == strided_block {
            self.stage_stride(stage)
        } else {
            1
        }
    }

    /// Inner width of a bottleneck block of stage width `planes` (torchvision's
    /// `int(planes * (width_per_group / 64)) * groups`).
    pub fn bottleneck_width(&self, planes: usize) -> usize {
        planes * self.width_per_group / 64 * self.groups
    }

    /// Channels of the final feature map (the input of the head).
    pub fn num_features(&self) -> usize {
        self.stage_widths
            .last()
            .map_or(self.stem_width, |&w| w * self.block.expansion())
    }

    /// Total reduction from the input to the final feature map.
    pub fn output_stride(&self) -> usize {
        (0..self.stage_widths.len()).fold(self.stem.stride(), |s, i| s * self.stage_stride(i))
    }

    /// Checks that the configuration describes a network that can be built, within
    /// sane bounds: configurations may come from untrusted files, and a billion blocks
    /// must be an error, not an attempt.
    pub fn validate(&self) -> Result<()> {
        const MAX_CHANNELS: usize = 1 << 16;
        const MAX_BLOCKS: usize = 10_000;
        const MAX_CLASSES: usize = 1 << 24;
        let total_blocks = self
            .blocks_per_stage
            .iter()
            .try_fold(0usize, |acc, &n| acc.checked_add(n))
            .unwrap_or(usize::MAX);
        if total_blocks > MAX_BLOCKS {
            bail!("invalid ResNet config: {total_blocks} blocks, at most {MAX_BLOCKS} supported");
        }
        for (name, value) in self
            .stage_widths
            .iter()
            .map(|&w| ("a stage width", w.saturating_mul(self.block.expansion())))
            .chain([
                ("stem_width", self.stem_width),
                ("in_channels", self.in_channels),
                ("groups", self.groups),
                ("width_per_group", self.width_per_group),
            ])
        {
            if value > MAX_CHANNELS {
                bail!("invalid ResNet config: {name} of {value} channels, at most {MAX_CHANNELS} supported");
            }
        }
        if self.num_classes > MAX_CLASSES {
            bail!(
                "invalid ResNet config: {} classes, at most {MAX_CLASSES} supported",
                self.num_classes
            );
        }
        if self.blocks_per_stage.is_empty() {
            bail!("invalid ResNet config: expected at least one stage, found none");
        }
        if self.blocks_per_stage.len() != self.stage_widths.len() {
            bail!(
                "invalid ResNet config: blocks_per_stage has {} stages but stage_widths has {}",
                self.blocks_per_stage.len(),
                self.stage_widths.len()
            );
        }
        if let Some(stage) = self.blocks_per_stage.iter().position(|&n| n == 0) {
            bail!("invalid ResNet config: stage {stage} has zero blocks, expected at least one");
        }
        if let Some(stage) = self.stage_widths.iter().position(|&w| w == 0) {
            bail!("invalid ResNet config: stage {stage} has width 0, expected at least 1");
        }
        for (name, value) in [
            ("stem_width", self.stem_width),
            ("in_channels", self.in_channels),
            ("groups", self.groups),
            ("width_per_group", self.width_per_group),
        ] {
            if value == 0 {
                bail!("invalid ResNet config: {name} is 0, expected at least 1");
            }
        }
        if !(self.bn_eps > 0.0 && self.bn_eps.is_finite()) {
            bail!(
                "invalid ResNet config: bn_eps must be positive and finite, found {}",
                self.bn_eps
            );
        }
        match self.block {
            BlockKind::Basic => {
                if self.groups != 1 || self.width_per_group != 64 {
                    bail!(
                        "invalid ResNet config: basic blocks support only groups = 1 and \
                         width_per_group = 64 (as torchvision), found groups = {} and \
                         width_per_group = {}",
                        self.groups,
                        self.width_per_group
                    );
                }
            }
            BlockKind::Bottleneck => {
                for &planes in &self.stage_widths {
                    let width = self.bottleneck_width(planes);
                    if width == 0 {
                        bail!(
                            "invalid ResNet config: stage width {planes} with width_per_group \
                             {} gives a bottleneck of 0 channels",
                            self.width_per_group
                        );
                    }
                }
            }
        }
        if self.preactivation && self.squeeze_excite {
            bail!("invalid ResNet config: squeeze-and-excitation in pre-activation blocks is not supported");
        }
        if self.shortcut == ShortcutKind::ZeroPad {
            // Option A can only add channels: zero-padding cannot remove any.
            let mut in_channels = self.stem_width;
            for stage in 0..self.stage_widths.len() {
                let out_channels = self.stage_out_channels(stage);
                if out_channels < in_channels {
                    bail!(
                        "invalid ResNet config: zero-padding shortcuts (option A) cannot reduce \
                         channels, but stage {stage} goes from {in_channels} to {out_channels}"
                    );
                }
                in_channels = out_channels;
            }
        }
        Ok(())
    }
}

impl FromStr for ResNetConfig {
    type Err = candle_core::Error;

    fn from_str(name: &str) -> Result<Self> {
        let normalized = name.trim().to_ascii_lowercase().replace('-', "_");
        match Self::preset(&normalized) {
            Some(config) => Ok(config),
            None => bail!(
                "unknown ResNet architecture '{name}', expected one of: {}",
                PRESET_NAMES.join(", ")
            ),
        }
    }
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockKind::Basic => "basic",
            BlockKind::Bottleneck => "bottleneck",
        })
    }
}

impl fmt::Display for ShortcutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShortcutKind::ZeroPad => "A (zero-pad)",
            ShortcutKind::Projection => "B (projection where the shape changes)",
            ShortcutKind::ProjectionAll => "C (projection on every block)",
            ShortcutKind::AvgDownProjection => "B after 2x2 average pooling (ResNet-D)",
            ShortcutKind::ProjectionOrSubsample => {
                "projection where the channels change, else subsampled identity (Keras V2)"
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_validates() {
        for name in PRESET_NAMES {
            let config: ResNetConfig = name.parse().unwrap();
            config.validate().unwrap();
        }
    }

    #[test]
    fn cifar_depth_is_6n_plus_2() {
        for (name, depth) in [("resnet20", 20), ("resnet56", 56), ("resnet1202", 1202)] {
            let config = ResNetConfig::preset(name).unwrap();
            let convs: usize = config.blocks_per_stage.iter().sum::<usize>() * 2;
            assert_eq!(convs + 2, depth, "{name}");
        }
    }

    #[test]
    fn descriptions_name_the_preset() {
        assert_eq!(ResNetConfig::resnet50().preset_name(), Some("resnet50"));
        assert_eq!(ResNetConfig::resnet50().describe(), "resnet50");
        let headless = ResNetConfig::resnet20()
            .with_num_classes(0)
            .with_in_channels(1);
        assert_eq!(headless.preset_name(), None);
        assert_eq!(headless.describe(), "resnet20, 0 classes, 1 input channels");
    }

    #[test]
    fn unknown_name_lists_the_presets() {
        let err = "resnet19".parse::<ResNetConfig>().unwrap_err().to_string();
        assert!(
            err.contains("resnet19") && err.contains("resnext50_32x4d"),
            "{err}"
        );
    }

    #[test]
    fn nonsense_configs_are_rejected_with_a_reason() {
        let cases: Vec<(ResNetConfig, &str)> = vec![
            (
                ResNetConfig {
                    blocks_per_stage: vec![],
                    stage_widths: vec![],
                    ..ResNetConfig::resnet18()
                },
                "at least one stage",
            ),
            (
                ResNetConfig {
                    blocks_per_stage: vec![2, 0, 2, 2],
                    ..ResNetConfig::resnet18()
                },
                "stage 1 has zero blocks",
            ),
            (
                ResNetConfig::resnet18().with_groups(32, 4),
                "basic blocks support only groups = 1",
            ),
            (
                ResNetConfig::resnet50().with_groups(1, 0),
                "width_per_group",
            ),
            (
                ResNetConfig {
                    stage_widths: vec![64, 128],
                    ..ResNetConfig::resnet18()
                },
                "4 stages but stage_widths has 2",
            ),
            (
                ResNetConfig {
                    stem_width: 64,
                    ..ResNetConfig::resnet20()
                },
                "cannot reduce channels",
            ),
        ];
        for (config, expected) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "expected '{expected}' in '{err}'");
        }
    }
}
