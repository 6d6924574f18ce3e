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
}

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
        } else if has("conv1.weight") && has("linear.weight") {
            Ok(Self::Cifar)
        } else if has("conv1.weight") || has("conv1.0.weight") {
            // timm's deep stems (ResNet-D) name their first convolution `conv1.0`.
            Ok(Self::Torchvision)
        } else {
            let sample: Vec<&str> = names.iter().take(5).copied().collect();
            Err(format!(
                "expected torchvision/timm names (conv1.weight, layer1.0.conv1.weight, fc.weight), \
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
        }
    }
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
            _ => Err(format!(
                "unknown naming scheme '{s}', expected torchvision, timm, transformers or cifar"
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
