//! Reading the architecture off a checkpoint's tensor shapes (torchvision names).

use std::collections::HashMap;

use resnet_core::{BlockKind, ResNetConfig, ShortcutKind, StemKind};

/// Tensor shapes by torchvision name.
pub type Shapes = HashMap<String, Vec<usize>>;

fn shape<'a>(shapes: &'a Shapes, name: &str) -> Result<&'a [usize], String> {
    shapes
        .get(name)
        .map(Vec::as_slice)
        .ok_or_else(|| format!("tensor {name} is missing"))
}

fn conv_shape<'a>(shapes: &'a Shapes, name: &str) -> Result<&'a [usize], String> {
    let dims = shape(shapes, name)?;
    if dims.len() != 4 {
        return Err(format!(
            "{name} has shape {dims:?}, expected a 4-D convolution weight"
        ));
    }
    Ok(dims)
}

/// The stem: kind, output channels and input channels. One convolution `conv1` (7x7:
/// ImageNet, 3x3: CIFAR) or timm's deep stem `conv1.0`, `conv1.3`, `conv1.6` (ResNet-D),
/// told from its tiered variant by the first convolution's width.
fn infer_stem(shapes: &Shapes) -> Result<(StemKind, usize, usize), String> {
    if shapes.contains_key("conv1.0.weight") {
        let first = conv_shape(shapes, "conv1.0.weight")?;
        let width = conv_shape(shapes, "conv1.6.weight")?[0];
        let kind = [StemKind::Deep, StemKind::DeepTiered]
            .into_iter()
            .find(|kind| kind.convolutions(width)[0].2 == first[0])
            .ok_or_else(|| {
                format!(
                    "conv1.0.weight has {} output channels for a deep stem of {width}: expected \
                     {} (deep) or {} (deep tiered)",
                    first[0],
                    width / 2,
                    3 * (width / 8)
                )
            })?;
        return Ok((kind, width, first[1]));
    }
    let stem = conv_shape(shapes, "conv1.weight")?;
    let (stem_width, in_channels, kernel) = (stem[0], stem[1], stem[2]);
    let kind = match kernel {
        7 => StemKind::ImageNet,
        3 => StemKind::Cifar,
        k => {
            return Err(format!(
                "conv1.weight has a {k}x{k} kernel; expected 7x7 (ImageNet) or 3x3 (CIFAR)"
            ))
        }
    };
    Ok((kind, stem_width, in_channels))
}

/// The configuration whose tensors these are: block kind, blocks per stage, widths,
/// groups, stem, shortcut option, classes and input channels.
pub fn infer_config(shapes: &Shapes) -> Result<ResNetConfig, String> {
    let (stem_kind, stem_width, in_channels) = infer_stem(shapes)?;
    // Pre-activation blocks normalise their input (`norm1`); their projections are
    // `downsample.conv`, without BatchNorm.
    let preactivation = shapes.contains_key("layer1.0.norm1.weight");
    let projection_name = if preactivation { "conv" } else { "0" };
    let block = if shapes.contains_key("layer1.0.conv3.weight") {
        BlockKind::Bottleneck
    } else {
        BlockKind::Basic
    };
    let mut blocks_per_stage = Vec::new();
    let mut stage_widths = Vec::new();
    let mut groups_per_stage = Vec::new();
    let (mut projections, mut avg_down_projections) = (0, 0);
    while shapes.contains_key(&format!(
        "layer{}.0.conv1.weight",
        blocks_per_stage.len() + 1
    )) {
        let stage = blocks_per_stage.len() + 1;
        let blocks = (0..)
            .take_while(|b| shapes.contains_key(&format!("layer{stage}.{b}.conv1.weight")))
            .count();
        projections += (0..blocks)
            .filter(|b| {
                shapes.contains_key(&format!(
                    "layer{stage}.{b}.downsample.{projection_name}.weight"
                ))
            })
            .count();
        // ResNet-D: `downsample.0` is the pool, the projection `downsample.1` (4-D).
        avg_down_projections += (0..blocks)
            .filter(|b| {
                shapes
                    .get(&format!("layer{stage}.{b}.downsample.1.weight"))
                    .is_some_and(|dims| dims.len() == 4)
            })
            .count();
        let planes = match block {
            BlockKind::Basic => conv_shape(shapes, &format!("layer{stage}.0.conv1.weight"))?[0],
            _ => {
                let out = conv_shape(shapes, &format!("layer{stage}.0.conv3.weight"))?[0];
                if out % 4 != 0 {
                    return Err(format!(
                        "layer{stage}.0.conv3.weight has {out} output channels, not a multiple of the bottleneck expansion 4"
                    ));
                }
                let width = conv_shape(shapes, &format!("layer{stage}.0.conv2.weight"))?;
                if width[1] == 0 || width[0] % width[1] != 0 {
                    return Err(format!(
                        "layer{stage}.0.conv2.weight has shape {width:?}: its input channels do not divide its output channels"
                    ));
                }
                groups_per_stage.push((width[0] / width[1], width[0], out / 4));
                out / 4
            }
        };
        blocks_per_stage.push(blocks);
        stage_widths.push(planes);
    }
    if blocks_per_stage.is_empty() {
        return Err("no residual stage found (expected layer1.0.conv1.weight)".into());
    }
    let (groups, width_per_group) = match groups_per_stage.first() {
        None => (1, 64),
        Some(&(groups, width, planes)) => {
            if (width * 64) % (planes * groups) != 0 {
                return Err(format!(
                    "layer1's bottleneck width {width} is not a whole number of channels per group for {groups} groups"
                ));
            }
            (groups, width * 64 / (planes * groups))
        }
    };
    let total_blocks: usize = blocks_per_stage.iter().sum();
    // timm's pre-activation "d" networks pair the deep stem with average-pool shortcuts
    // (the pool has no tensors to tell).
    let preact_avg_down =
        preactivation && matches!(stem_kind, StemKind::Deep | StemKind::DeepTiered);
    let shortcut = if avg_down_projections > 0 || (preact_avg_down && projections > 0) {
        ShortcutKind::AvgDownProjection
    } else if projections == 0 {
        ShortcutKind::ZeroPad
    } else {
        ShortcutKind::Projection // refined below, once the config can be built
    };
    let num_classes = match shapes.get("fc.weight").map(Vec::as_slice) {
        Some(&[classes, _]) => classes,
        // timm's resnetv2 classifier, a 1x1 convolution.
        Some(&[classes, _, 1, 1]) => classes,
        Some(dims) => return Err(format!("fc.weight has shape {dims:?}, expected 2-D")),
        None => 0,
    };
    let mut config = ResNetConfig {
        block,
        blocks_per_stage,
        stage_widths,
        stem: stem_kind,
        stem_width,
        shortcut,
        groups,
        width_per_group,
        in_channels,
        num_classes,
        bn_eps: 1e-5,
        bottleneck_stride: resnet_core::BottleneckStride::Conv3x3,
        squeeze_excite: shapes.contains_key("layer1.0.se.fc1.weight"),
        preactivation,
        stride_in_last_block: false,
        downsample_first_stage: false,
        // Keras' biases: on every convolution of v1, on the last of a pre-activation block.
        conv_bias: shapes.contains_key("layer1.0.conv3.bias")
            || shapes.contains_key("layer1.0.conv2.bias"),
        zero_padded_pool: false,
        input_normalization: resnet_core::InputNormalization::MeanStd,
    };
    config.validate().map_err(|e| e.to_string())?;
    if shortcut == ShortcutKind::Projection && projections == total_blocks {
        // Option C if B would project fewer blocks than the file does.
        let b_projections = resnet_core::ResNet::expected_tensors(&config)
            .map_err(|e| e.to_string())?
            .iter()
            .filter(|(name, _)| name.ends_with(&format!("downsample.{projection_name}.weight")))
            .count();
        if b_projections < projections {
            config.shortcut = ShortcutKind::ProjectionAll;
        }
    }
    for &(g, width, planes) in &groups_per_stage {
        if g != groups || config.bottleneck_width(planes) != width {
            return Err(format!(
                "stages disagree on groups and width per group ({g} groups of {width} channels at width {planes})"
            ));
        }
    }
    Ok(config)
}
