//! Checkpoint naming schemes, and the one place they are mapped to torchvision's names.

use std::fmt;
use std::str::FromStr;

/// How the tensors of a checkpoint are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NamingScheme {
    /// torchvision and timm: `conv1.weight`, `layer1.0.conv1.weight`, `fc.weight`.
    Torchvision,
    /// HF transformers `ResNetForImageClassification` / `ResNetModel`:
    /// `resnet.embedder.embedder.convolution.weight`,
    /// `resnet.encoder.stages.S.layers.B.layer.I.convolution.weight`, `classifier.1.weight`.
    Transformers,
    /// The CIFAR ResNets of the reference CIFAR code: torchvision's names with the head
    /// called `linear`.
    Cifar,
    /// timm's pre-activation `resnetv2_*`: `stem.conv.weight` (or the deep stem's
    /// `stem.conv1`, `stem.norm1`, ...), `stages.S.blocks.B.norm1.weight`, `norm.weight`,
    /// and the classifier as a 1x1 convolution, `head.fc.weight` of shape
    /// `(classes, features, 1, 1)`.
    TimmV2,
}

/// timm's deep-stem names in `resnetv2_*` against timm's `resnet*d` (our names).
const TIMM_V2_STEM: [(&str, &str); 6] = [
    ("stem.conv.", "conv1."),
    ("stem.conv1.", "conv1.0."),
    ("stem.norm1.", "conv1.1."),
    ("stem.conv2.", "conv1.3."),
    ("stem.norm2.", "conv1.4."),
    ("stem.conv3.", "conv1.6."),
];

/// Tensors every scheme may carry that no model reads.
pub fn is_ignored(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

impl NamingScheme {
    /// Recognises the scheme from the tensor names, or says why none fits.
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let names: Vec<&str> = names.into_iter().collect();
        let has = |name: &str| names.iter().any(|n| strip_wrapper(n) == name);
        if names
            .iter()
            .any(|n| n.starts_with("resnet.embedder.") || n.starts_with("embedder.embedder."))
        {
            Ok(Self::Transformers)
        } else if names
            .iter()
            .any(|n| strip_wrapper(n).starts_with("stages.0.blocks.0."))
            && names
                .iter()
                .any(|n| strip_wrapper(n).starts_with("stem.conv"))
        {
            Ok(Self::TimmV2)
        } else if has("conv1.weight") && has("linear.weight") {
            Ok(Self::Cifar)
        } else if has("conv1.weight") || has("conv1.0.weight") {
            // timm's deep stems (ResNet-D) name their first convolution `conv1.0`.
            Ok(Self::Torchvision)
        } else {
            let sample: Vec<&str> = names.iter().take(5).copied().collect();
            Err(format!(
                "expected torchvision/timm names (conv1.weight, layer1.0.conv1.weight, fc.weight), \
                 timm resnetv2 names (stem.conv.weight, stages.0.blocks.0.norm1.weight, ...), \
                 HF transformers names (resnet.embedder.embedder.convolution.weight, ...) or CIFAR \
                 names (conv1.weight, linear.weight); found {} tensors, e.g. {sample:?}",
                names.len()
            ))
        }
    }

    /// The torchvision name of the file's tensor `name`, or `None` if this scheme has no
    /// such tensor.
    pub fn to_torchvision(self, name: &str) -> Option<String> {
        let name = strip_wrapper(name);
        match self {
            Self::Torchvision => Some(name.to_string()),
            Self::Cifar => Some(match name.strip_prefix("linear.") {
                Some(rest) => format!("fc.{rest}"),
                None => name.to_string(),
            }),
            Self::Transformers => transformers_to_torchvision(name),
            Self::TimmV2 => timm_v2_to_torchvision(name),
        }
    }

    /// The name this scheme gives torchvision's tensor `name`.
    pub fn from_torchvision(self, name: &str) -> Option<String> {
        match self {
            Self::Torchvision => Some(name.to_string()),
            Self::Cifar => Some(match name.strip_prefix("fc.") {
                Some(rest) => format!("linear.{rest}"),
                None => name.to_string(),
            }),
            Self::Transformers => torchvision_to_transformers(name),
            Self::TimmV2 => torchvision_to_timm_v2(name),
        }
    }

    /// The scheme a network of `config` is written in when this one is asked for:
    /// torchvision has no pre-activation networks, and timm names them as resnetv2.
    pub fn for_config(self, config: &resnet_core::ResNetConfig) -> Self {
        match self {
            Self::Torchvision if config.preactivation => Self::TimmV2,
            other => other,
        }
    }

    /// The shape this scheme stores a tensor of our shape `dims` under our name `name`
    /// in: timm's resnetv2 classifier is a 1x1 convolution.
    pub fn file_shape(self, name: &str, dims: &[usize]) -> Vec<usize> {
        match (self, dims) {
            (Self::TimmV2, &[classes, features]) if name == "fc.weight" => {
                vec![classes, features, 1, 1]
            }
            _ => dims.to_vec(),
        }
    }
}

fn timm_v2_to_torchvision(name: &str) -> Option<String> {
    for (timm, ours) in TIMM_V2_STEM {
        if let Some(param) = name.strip_prefix(timm) {
            return Some(format!("{ours}{param}"));
        }
    }
    if let Some(param) = name.strip_prefix("head.fc.") {
        return Some(format!("fc.{param}"));
    }
    if name.starts_with("norm.") {
        return Some(name.to_string());
    }
    let rest = name.strip_prefix("stages.")?;
    let (stage, rest) = rest.split_once('.')?;
    let stage: usize = stage.parse().ok()?;
    let rest = rest.strip_prefix("blocks.")?;
    Some(format!("layer{}.{rest}", stage.checked_add(1)?))
}

fn torchvision_to_timm_v2(name: &str) -> Option<String> {
    for (timm, ours) in TIMM_V2_STEM {
        if let Some(param) = name.strip_prefix(ours) {
            // `conv1.0.weight` is the deep stem's, not `conv1.` + `0.weight`.
            if ours == "conv1." && param.contains('.') {
                continue;
            }
            return Some(format!("{timm}{param}"));
        }
    }
    if let Some(param) = name.strip_prefix("fc.") {
        return Some(format!("head.fc.{param}"));
    }
    if name.starts_with("norm.") {
        return Some(name.to_string());
    }
    let rest = name.strip_prefix("layer")?;
    let (stage, rest) = rest.split_once('.')?;
    let stage: usize = stage.parse().ok()?;
    Some(format!("stages.{}.blocks.{rest}", stage.checked_sub(1)?))
}

/// Drops the `module.` prefix that `nn.DataParallel` checkpoints carry.
fn strip_wrapper(name: &str) -> &str {
    name.strip_prefix("module.").unwrap_or(name)
}

/// `convolution.weight` -> `("conv", "weight")`, `normalization.running_var` -> `("bn", ...)`.
fn transformers_unit(rest: &str) -> Option<(&'static str, &str)> {
    if let Some(param) = rest.strip_prefix("convolution.") {
        Some(("conv", param))
    } else {
        rest.strip_prefix("normalization.")
            .map(|param| ("bn", param))
    }
}

fn transformers_to_torchvision(name: &str) -> Option<String> {
    let name = name.strip_prefix("resnet.").unwrap_or(name);
    if let Some(rest) = name.strip_prefix("embedder.embedder.") {
        let (unit, param) = transformers_unit(rest)?;
        return Some(format!("{unit}1.{param}"));
    }
    if let Some(param) = name.strip_prefix("classifier.1.") {
        return Some(format!("fc.{param}"));
    }
    let rest = name.strip_prefix("encoder.stages.")?;
    let (stage, rest) = rest.split_once('.')?;
    let stage: usize = stage.parse().ok()?;
    let rest = rest.strip_prefix("layers.")?;
    let (block, rest) = rest.split_once('.')?;
    let block: usize = block.parse().ok()?;
    let prefix = format!("layer{}.{block}", stage + 1);
    if let Some(rest) = rest.strip_prefix("shortcut.") {
        let (unit, param) = transformers_unit(rest)?;
        let index = if unit == "conv" { 0 } else { 1 };
        return Some(format!("{prefix}.downsample.{index}.{param}"));
    }
    let rest = rest.strip_prefix("layer.")?;
    let (index, rest) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let (unit, param) = transformers_unit(rest)?;
    Some(format!("{prefix}.{unit}{}.{param}", index + 1))
}

fn torchvision_to_transformers(name: &str) -> Option<String> {
    let unit = |unit: &str, param: &str| -> Option<String> {
        match unit {
            "conv" => Some(format!("convolution.{param}")),
            "bn" => Some(format!("normalization.{param}")),
            _ => None,
        }
    };
    let split_unit = |s: &str| -> Option<(String, usize, String)> {
        let (head, param) = s.split_once('.')?;
        let digits = head.trim_start_matches(|c: char| c.is_ascii_alphabetic());
        let kind = &head[..head.len() - digits.len()];
        Some((kind.to_string(), digits.parse().ok()?, param.to_string()))
    };
    if let Some(param) = name.strip_prefix("fc.") {
        return Some(format!("classifier.1.{param}"));
    }
    if !name.starts_with("layer") {
        let (kind, index, param) = split_unit(name)?;
        if index != 1 {
            return None;
        }
        return Some(format!("resnet.embedder.embedder.{}", unit(&kind, &param)?));
    }
    let rest = name.strip_prefix("layer")?;
    let (stage, rest) = rest.split_once('.')?;
    let stage: usize = stage.parse().ok()?;
    let (block, rest) = rest.split_once('.')?;
    let prefix = format!(
        "resnet.encoder.stages.{}.layers.{block}",
        stage.checked_sub(1)?
    );
    if let Some(rest) = rest.strip_prefix("downsample.") {
        let (index, param) = rest.split_once('.')?;
        let kind = match index {
            "0" => "conv",
            "1" => "bn",
            _ => return None,
        };
        return Some(format!("{prefix}.shortcut.{}", unit(kind, param)?));
    }
    let (kind, index, param) = split_unit(rest)?;
    Some(format!(
        "{prefix}.layer.{}.{}",
        index.checked_sub(1)?,
        unit(&kind, &param)?
    ))
}

impl fmt::Display for NamingScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Torchvision => "torchvision",
            Self::Transformers => "transformers",
            Self::Cifar => "cifar",
            Self::TimmV2 => "timm-v2",
        })
    }
}

impl FromStr for NamingScheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "torchvision" | "timm" => Ok(Self::Torchvision),
            "transformers" | "hf" | "huggingface" => Ok(Self::Transformers),
            "cifar" => Ok(Self::Cifar),
            "timm-v2" | "timm_v2" | "resnetv2" => Ok(Self::TimmV2),
            _ => Err(format!(
                "unknown naming scheme '{s}', expected torchvision, timm, timm-v2, transformers or cifar"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_names_round_trip() {
        for (hf, tv) in [
            (
                "resnet.embedder.embedder.convolution.weight",
                "conv1.weight",
            ),
            (
                "resnet.embedder.embedder.normalization.running_var",
                "bn1.running_var",
            ),
            (
                "resnet.encoder.stages.0.layers.2.layer.1.convolution.weight",
                "layer1.2.conv2.weight",
            ),
            (
                "resnet.encoder.stages.3.layers.0.layer.2.normalization.bias",
                "layer4.0.bn3.bias",
            ),
            (
                "resnet.encoder.stages.1.layers.0.shortcut.convolution.weight",
                "layer2.0.downsample.0.weight",
            ),
            (
                "resnet.encoder.stages.1.layers.0.shortcut.normalization.weight",
                "layer2.0.downsample.1.weight",
            ),
            ("classifier.1.weight", "fc.weight"),
        ] {
            let scheme = NamingScheme::Transformers;
            assert_eq!(scheme.to_torchvision(hf).as_deref(), Some(tv), "{hf}");
            assert_eq!(scheme.from_torchvision(tv).as_deref(), Some(hf), "{tv}");
        }
        assert_eq!(
            NamingScheme::Transformers.to_torchvision("embedder.embedder.convolution.weight"),
            Some("conv1.weight".to_string())
        );
        assert_eq!(
            NamingScheme::Transformers.to_torchvision("pooler.weight"),
            None
        );
    }

    #[test]
    fn timm_v2_names_round_trip() {
        for (timm, ours) in [
            ("stem.conv.weight", "conv1.weight"),
            ("stem.conv1.weight", "conv1.0.weight"),
            ("stem.norm2.running_var", "conv1.4.running_var"),
            ("stem.conv3.weight", "conv1.6.weight"),
            ("stages.0.blocks.0.norm1.weight", "layer1.0.norm1.weight"),
            (
                "stages.3.blocks.2.downsample.conv.weight",
                "layer4.2.downsample.conv.weight",
            ),
            ("norm.running_mean", "norm.running_mean"),
            ("head.fc.bias", "fc.bias"),
        ] {
            let scheme = NamingScheme::TimmV2;
            assert_eq!(scheme.to_torchvision(timm).as_deref(), Some(ours), "{timm}");
            assert_eq!(
                scheme.from_torchvision(ours).as_deref(),
                Some(timm),
                "{ours}"
            );
        }
        assert_eq!(NamingScheme::TimmV2.to_torchvision("stem.pool.x"), None);
        assert_eq!(
            NamingScheme::TimmV2.file_shape("fc.weight", &[10, 2048]),
            [10, 2048, 1, 1]
        );
        assert_eq!(
            NamingScheme::detect(["stem.conv.weight", "stages.0.blocks.0.conv1.weight"]),
            Ok(NamingScheme::TimmV2)
        );
    }

    #[test]
    fn detection() {
        let detect = |names: &[&str]| NamingScheme::detect(names.iter().copied());
        assert_eq!(
            detect(&["conv1.weight", "fc.weight"]),
            Ok(NamingScheme::Torchvision)
        );
        assert_eq!(
            detect(&["module.conv1.weight"]),
            Ok(NamingScheme::Torchvision)
        );
        assert_eq!(
            detect(&["conv1.weight", "linear.bias", "linear.weight"]),
            Ok(NamingScheme::Cifar)
        );
        assert_eq!(
            detect(&["resnet.embedder.embedder.convolution.weight"]),
            Ok(NamingScheme::Transformers)
        );
        let err = detect(&["encoder.0.weight"]).unwrap_err();
        assert!(
            err.contains("encoder.0.weight") && err.contains("conv1.weight"),
            "{err}"
        );
    }
}
