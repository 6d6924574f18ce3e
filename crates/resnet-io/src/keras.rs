//! Keras weights of keras.applications' ResNets, read in Rust: the legacy HDF5 layout
//! (`save_weights` of Keras 2 and the files `keras.applications` downloads; also a whole
//! legacy model's `model_weights` group) and Keras 3 `.keras` archives (a zip of
//! `config.json` and `model.weights.h5`). The weights are renamed to resnet-core's
//! names, kernels transposed (HWIO to OIHW, Dense `(in, out)` to `(out, in)`), and the
//! architecture inferred (v1 or V2 by the layer names) and stored as a checkpoint's
//! metadata: from there on a Keras file is a checkpoint like any other.
//!
//! Untrusted input like safetensors: the file is read whole but bounded, an archive's
//! weights are inflated within a bound (a zip bomb is an error), every count and shape is
//! checked before memory is sized by it, and the datasets together may hold no more data
//! than the file does (Keras neither compresses nor shares them), so memory stays a small
//! multiple of the file's size (its bytes, the weights read, the checkpoint made of them).

use std::io::Read;
use std::path::{Path, PathBuf};

use hdf5_reader::{group::Group, Attribute, Datatype, Hdf5File};
use resnet_core::ResNetConfig;
use safetensors::tensor::TensorView;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::infer::{infer_config, Shapes};

/// Largest Keras file read (ResNet-152's weights are about 240 MB).
pub const MAX_KERAS_FILE_BYTES: u64 = 4 << 30;
/// Most names (layers, or weights of one layer) one attribute may list.
const MAX_NAMES: u64 = 1 << 16;
/// `model.weights.h5` may inflate to this much more than its archive...
const MAX_INFLATION: u64 = 8;
/// ... plus this (Keras stores weights uncompressed; zeros compress well).
const INFLATION_SLACK: u64 = 64 << 20;

const HDF5_MAGIC: &[u8] = b"\x89HDF\r\n\x1a\n";
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// Whether `path` names a Keras file (`.h5`, `.hdf5`, `.keras`).
pub fn is_keras_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "h5" | "hdf5" | "keras"))
}

/// Reads a Keras weights file or archive into a checkpoint under resnet-core's names,
/// with the inferred architecture in its metadata.
pub fn open_keras(path: &Path) -> Result<Checkpoint> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = crate::load::regular_file_len(path)?;
    if len > MAX_KERAS_FILE_BYTES {
        return Err(invalid(
            path,
            format!("{len} bytes is larger than the {MAX_KERAS_FILE_BYTES} bytes read"),
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_KERAS_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    keras_checkpoint(path, bytes)
}

/// [`open_keras`] on the bytes of a file; `label` names it in errors.
pub fn keras_checkpoint(label: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Checkpoint> {
    let path = label.into();
    let (h5, object_names) = if bytes.starts_with(ZIP_MAGIC) {
        archive_weights(&bytes).map_err(|reason| invalid(&path, reason))?
    } else {
        (bytes, Vec::new())
    };
    if !h5.starts_with(HDF5_MAGIC) {
        let start = &h5[..h5.len().min(8)];
        return Err(invalid(
            &path,
            format!(
                "expected an HDF5 file (starting \\x89HDF) or a .keras zip archive, found bytes {start:02x?}"
            ),
        ));
    }
    // The HDF5 reader is third-party code on hostile bytes: a panic in it is an error
    // here, not an abort of the caller.
    let weights = std::panic::catch_unwind(move || read_weights(h5, &object_names))
        .unwrap_or_else(|_| Err("the HDF5 reader failed on this file's structure".into()))
        .map_err(|reason| invalid(&path, reason))?;
    to_checkpoint(&path, weights)
}

fn invalid(path: &Path, reason: String) -> Error {
    Error::Keras {
        path: path.to_path_buf(),
        reason,
    }
}

/// `model.weights.h5` of a `.keras` archive, inflated within bounds, and the layer
/// names by weights group that its `config.json` implies (see [`object_names`]).
type ArchiveContents = (Vec<u8>, Vec<(String, String)>);

fn archive_weights(bytes: &[u8]) -> std::result::Result<ArchiveContents, String> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("not a readable .keras zip archive ({e})"))?;
    let limit = INFLATION_SLACK + MAX_INFLATION * bytes.len() as u64;
    let mut inflate = |name: &str| -> std::result::Result<Vec<u8>, String> {
        let mut entry = archive.by_name(name).map_err(|e| {
            format!("a .keras archive holds model.weights.h5 and config.json; this one has no {name} ({e})")
        })?;
        let mut data = Vec::new();
        // The entry's declared size is the archive's word: count what actually comes out.
        entry
            .by_ref()
            .take(limit + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("{name} cannot be inflated ({e})"))?;
        if data.len() as u64 > limit {
            return Err(format!(
                "{name} inflates to more than {limit} bytes from a {}-byte archive: refused (a zip bomb?)",
                bytes.len()
            ));
        }
        Ok(data)
    };
    let h5 = inflate("model.weights.h5")?;
    // Only needed where the weights do not name their layers (older Keras 3).
    let names = inflate("config.json")
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .map(|config: serde_json::Value| object_names(&config))
        .unwrap_or_default();
    Ok((h5, names))
}

/// The group each layer of a functional model's `config.json` is saved under in
/// `model.weights.h5` (Keras 3's `saving_lib`: the class name in snake case, `_1`, `_2`,
/// ... for later layers of the same class, input layers not saved), with its name.
fn object_names(config: &serde_json::Value) -> Vec<(String, String)> {
    let Some(layers) = config.pointer("/config/layers").and_then(|l| l.as_array()) else {
        return Vec::new();
    };
    let mut used = std::collections::HashMap::<String, usize>::new();
    let mut names = Vec::new();
    for layer in layers {
        let class = layer.get("class_name").and_then(|c| c.as_str());
        let name = layer.pointer("/config/name").and_then(|n| n.as_str());
        let (Some(class), Some(name)) = (class, name) else {
            continue;
        };
        if class == "InputLayer" {
            continue;
        }
        let snake = snake_case(class);
        let object = match used.get_mut(&snake) {
            Some(count) => {
                *count += 1;
                format!("{snake}_{count}")
            }
            None => {
                used.insert(snake.clone(), 0);
                snake
            }
        };
        names.push((object, name.to_string()));
    }
    names
}

/// Keras' `to_snake_case`: `BatchNormalization` -> `batch_normalization`, `Conv2D` ->
/// `conv2d` (an underscore before each capital that follows a lower-case letter, or
/// that starts a capitalised word after any character).
fn snake_case(class: &str) -> String {
    let chars: Vec<char> = class
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let starts_word = c.is_ascii_uppercase()
            && i > 0
            && (chars[i - 1].is_ascii_lowercase()
                || chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase()));
        if starts_word && !out.ends_with('_') {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// One weight as Keras stores it.
struct KerasWeight {
    /// The layer's name (`conv2_block1_1_conv`).
    layer: String,
    /// `kernel`, `bias`, `gamma`, `beta`, `moving_mean`, `moving_variance`.
    param: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Reads every weight of the file, in either layout.
fn read_weights(
    h5: Vec<u8>,
    object_names: &[(String, String)],
) -> std::result::Result<Vec<KerasWeight>, String> {
    let budget = h5.len();
    let file = Hdf5File::from_vec(h5).map_err(|e| format!("not readable as HDF5 ({e})"))?;
    let root = file
        .root_group()
        .map_err(|e| format!("no root group ({e})"))?;
    let mut reader = Reader {
        file: &file,
        budget,
    };
    if let Some(layers) = string_list(&root, "layer_names")? {
        return reader.legacy("", &layers);
    }
    if let Ok(group) = root.group("model_weights") {
        if let Some(layers) = string_list(&group, "layer_names")? {
            return reader.legacy("model_weights/", &layers);
        }
    }
    if let Ok(layers) = root.group("layers") {
        return reader.keras3(&layers, object_names);
    }
    Err(
        "no Keras weights found: expected a root attribute layer_names (a legacy weights \
         file), a model_weights group (a legacy model file) or a layers group (Keras 3)"
            .into(),
    )
}

/// Reads datasets within what is left of the file's size.
struct Reader<'a> {
    file: &'a Hdf5File,
    /// Bytes of data the datasets may still hold.
    budget: usize,
}

impl Reader<'_> {
    /// The legacy layout: each layer a group whose attribute `weight_names` lists its
    /// datasets (`conv1_conv/kernel:0`).
    fn legacy(
        &mut self,
        prefix: &str,
        layers: &[String],
    ) -> std::result::Result<Vec<KerasWeight>, String> {
        let mut weights = Vec::new();
        for layer in layers {
            let group = self
                .file
                .group(&format!("{prefix}{layer}"))
                .map_err(|e| format!("layer_names lists {layer}, which has no group ({e})"))?;
            for name in string_list(&group, "weight_names")?.unwrap_or_default() {
                let param = name.rsplit('/').next().unwrap_or(&name);
                let param = param.split(':').next().unwrap_or(param).to_string();
                let path = format!("{prefix}{layer}/{name}");
                weights.push(self.read(layer, param, &path)?);
            }
        }
        Ok(weights)
    }

    /// Keras 3: `layers/<object>/vars/0`, `1`, ..., the layer's name in the attribute
    /// `name` of `vars`, the datasets in the order the layer creates its weights.
    fn keras3(
        &mut self,
        layers: &Group,
        object_names: &[(String, String)],
    ) -> std::result::Result<Vec<KerasWeight>, String> {
        let (groups, _) = layers
            .members()
            .map_err(|e| format!("the layers group cannot be listed ({e})"))?;
        let mut weights = Vec::new();
        for group in groups {
            let Ok(vars) = group.group("vars") else {
                continue;
            };
            let (_, datasets) = vars
                .members()
                .map_err(|e| format!("layers/{}/vars cannot be listed ({e})", group.name()))?;
            if datasets.is_empty() {
                continue;
            }
            // Recent Keras names the layer on its group; older Keras 3 only in the
            // order of config.json.
            let from_config = || {
                object_names
                    .iter()
                    .find(|(object, _)| object == group.name())
                    .map(|(_, name)| name.clone())
            };
            let layer = string_list(&vars, "name")?
                .and_then(|names| names.into_iter().next())
                .or_else(from_config)
                .ok_or_else(|| {
                    format!(
                        "layers/{}/vars names no layer and config.json has none for it",
                        group.name()
                    )
                })?;
            let params = keras3_params(&layer, datasets.len());
            for (index, param) in params.into_iter().enumerate() {
                let path = format!("layers/{}/vars/{index}", group.name());
                weights.push(self.read(&layer, param, &path)?);
            }
        }
        Ok(weights)
    }

    /// One f32 dataset, its size checked against the budget before it is read.
    fn read(
        &mut self,
        layer: &str,
        param: String,
        path: &str,
    ) -> std::result::Result<KerasWeight, String> {
        let what = format!("{layer}/{param}");
        let dataset = self
            .file
            .dataset(path)
            .map_err(|e| format!("{what}: no dataset at {path} ({e})"))?;
        match dataset.dtype() {
            Datatype::FloatingPoint {
                size: 4,
                byte_order,
            } if *byte_order == hdf5_reader::ByteOrder::LittleEndian => {}
            other => {
                return Err(format!(
                    "{what}: expected little-endian f32 values, found {other:?}"
                ))
            }
        }
        let dims = dataset.shape();
        if dims.is_empty() || dims.len() > 4 {
            return Err(format!(
                "{what}: a {}-D dataset, expected 1-D to 4-D weights",
                dims.len()
            ));
        }
        let shape = dims
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| format!("{what}: shape {dims:?} does not fit in memory"))?;
        let bytes = shape
            .iter()
            .try_fold(4usize, |acc, &d| acc.checked_mul(d))
            .filter(|&bytes| bytes <= self.budget)
            .ok_or_else(|| {
                format!(
                    "{what}: shape {dims:?} holds more data than is left of the file ({} bytes): \
                     corrupt, or compressed or shared data, which Keras does not write",
                    self.budget
                )
            })?;
        self.budget -= bytes;
        let raw = dataset
            .read_raw_bytes()
            .map_err(|e| format!("{what}: cannot be read ({e})"))?;
        if raw.len() != bytes {
            return Err(format!(
                "{what}: {} bytes of data for shape {dims:?}, expected {bytes}",
                raw.len()
            ));
        }
        let data = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(KerasWeight {
            layer: layer.to_string(),
            param,
            shape,
            data,
        })
    }
}

/// The weights a Keras 3 layer of a keras.applications ResNet creates, in order; a
/// layer of another kind keeps numbered names (reported as unexpected).
fn keras3_params(layer: &str, count: usize) -> Vec<String> {
    let known: &[&str] = if layer.ends_with("_bn") {
        &["gamma", "beta", "moving_mean", "moving_variance"]
    } else {
        &["kernel", "bias"]
    };
    (0..count)
        .map(|i| match known.get(i) {
            Some(param) if count <= known.len() => param.to_string(),
            _ => format!("var{i}"),
        })
        .collect()
}

/// A list of strings from attribute `name` of `group`: `None` if it has no such
/// attribute, empty for an empty array (h5py stores one as float64).
fn string_list(group: &Group, name: &str) -> std::result::Result<Option<Vec<String>>, String> {
    let attributes = group
        .attributes()
        .map_err(|e| format!("attributes of {} cannot be read ({e})", group.name()))?;
    let Some(attribute) = attributes.iter().find(|a| a.name == name) else {
        return Ok(None);
    };
    let count = element_count(attribute).ok_or_else(|| {
        format!(
            "attribute {name} of {} has shape {:?}",
            group.name(),
            attribute.shape
        )
    })?;
    if count == 0 {
        return Ok(Some(Vec::new()));
    }
    if count > MAX_NAMES {
        return Err(format!(
            "attribute {name} of {} lists {count} names, at most {MAX_NAMES} read",
            group.name()
        ));
    }
    attribute.read_strings().map(Some).map_err(|e| {
        format!(
            "attribute {name} of {}: expected strings ({e})",
            group.name()
        )
    })
}

fn element_count(attribute: &Attribute) -> Option<u64> {
    attribute
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// resnet-core's name of a keras.applications ResNet weight, or `None` for another layer.
/// v1: `conv2_block1_1_conv` -> `layer1.0.conv1`, `_0_conv`/`_0_bn` -> `downsample.0`/`.1`;
/// V2: `_preact_bn` -> `norm1`, `_1_bn` -> `norm2`, `_0_conv` -> `downsample.conv`,
/// `post_bn` -> `norm`.
fn our_name(layer: &str, param: &str, v2: bool) -> Option<String> {
    let suffix = match param {
        "kernel" | "gamma" => "weight",
        "bias" | "beta" => "bias",
        "moving_mean" => "running_mean",
        "moving_variance" => "running_var",
        _ => return None,
    };
    let unit = match layer {
        "conv1_conv" => "conv1".to_string(),
        "conv1_bn" if !v2 => "bn1".to_string(),
        "post_bn" if v2 => "norm".to_string(),
        "predictions" => "fc".to_string(),
        _ => {
            let rest = layer.strip_prefix("conv")?;
            let (stage, rest) = rest.split_once("_block")?;
            let (block, rest) = rest.split_once('_')?;
            let stage: usize = stage.parse().ok()?;
            let block: usize = block.parse().ok()?;
            let unit = match (v2, rest) {
                (true, "preact_bn") => "norm1".to_string(),
                (true, "0_conv") => "downsample.conv".to_string(),
                (false, "0_conv") => "downsample.0".to_string(),
                (false, "0_bn") => "downsample.1".to_string(),
                (_, rest) => {
                    let (index, kind) = rest.split_once('_')?;
                    let index: usize = index.parse().ok().filter(|&i| (1..=3).contains(&i))?;
                    match (kind, v2) {
                        ("conv", _) => format!("conv{index}"),
                        ("bn", false) => format!("bn{index}"),
                        ("bn", true) => format!("norm{}", index + 1),
                        _ => return None,
                    }
                }
            };
            format!(
                "layer{}.{}.{unit}",
                stage.checked_sub(1)?,
                block.checked_sub(1)?
            )
        }
    };
    Some(format!("{unit}.{suffix}"))
}

/// Kernels from Keras' layout to PyTorch's: HWIO -> OIHW, `(in, out)` -> `(out, in)`.
fn to_pytorch_layout(shape: &[usize], data: Vec<f32>) -> (Vec<usize>, Vec<f32>) {
    match *shape {
        [h, w, i, o] => {
            let mut out = vec![0f32; data.len()];
            for (index, value) in data.into_iter().enumerate() {
                let (rest, oc) = (index / o, index % o);
                let (rest, ic) = (rest / i, rest % i);
                let (y, x) = (rest / w, rest % w);
                out[((oc * i + ic) * h + y) * w + x] = value;
            }
            (vec![o, i, h, w], out)
        }
        [i, o] => {
            let mut out = vec![0f32; data.len()];
            for (index, value) in data.into_iter().enumerate() {
                out[(index % o) * i + index / o] = value;
            }
            (vec![o, i], out)
        }
        _ => (shape.to_vec(), data),
    }
}

/// The weights under resnet-core's names in an in-memory safetensors checkpoint, the
/// architecture (inferred, with Keras' v1 or V2 layout) in its metadata. Weights of
/// other layers keep their Keras names, to be reported as unexpected.
fn to_checkpoint(path: &Path, weights: Vec<KerasWeight>) -> Result<Checkpoint> {
    let v2 = weights
        .iter()
        .any(|w| w.layer == "post_bn" || w.layer.ends_with("_preact_bn"));
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::with_capacity(weights.len());
    // A set, not a scan: a crafted file may hold millions of (empty) datasets.
    let mut seen = std::collections::HashSet::with_capacity(weights.len());
    for weight in weights {
        let name = our_name(&weight.layer, &weight.param, v2)
            .unwrap_or_else(|| format!("keras.{}.{}", weight.layer, weight.param));
        if !seen.insert(name.clone()) {
            return Err(invalid(
                path,
                format!("two weights are {name} ({}/{})", weight.layer, weight.param),
            ));
        }
        let (shape, data) = to_pytorch_layout(&weight.shape, weight.data);
        tensors.push((name, shape, data));
    }
    let shapes: Shapes = tensors
        .iter()
        .map(|(name, shape, _)| (name.clone(), shape.clone()))
        .collect();
    let inferred = infer_config(&shapes).map_err(|reason| Error::Infer {
        path: path.to_path_buf(),
        reason,
    })?;
    let config: ResNetConfig = if v2 {
        inferred.keras_v2()
    } else {
        inferred.keras_v1()
    };
    let config_json = serde_json::to_string(&config).map_err(|e| invalid(path, e.to_string()))?;
    let metadata = std::collections::HashMap::from([
        (crate::save::CONFIG_METADATA_KEY.to_string(), config_json),
        ("format".to_string(), "keras".to_string()),
    ]);
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|e| invalid(path, format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(views, Some(metadata)).map_err(|e| invalid(path, e.to_string()))?;
    Checkpoint::from_bytes(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keras_names_map_to_ours() {
        for (layer, param, v2, ours) in [
            ("conv1_conv", "kernel", false, "conv1.weight"),
            ("conv1_bn", "moving_variance", false, "bn1.running_var"),
            (
                "conv2_block1_0_conv",
                "bias",
                false,
                "layer1.0.downsample.0.bias",
            ),
            (
                "conv2_block1_0_bn",
                "gamma",
                false,
                "layer1.0.downsample.1.weight",
            ),
            ("conv5_block3_3_bn", "beta", false, "layer4.2.bn3.bias"),
            (
                "conv3_block2_preact_bn",
                "moving_mean",
                true,
                "layer2.1.norm1.running_mean",
            ),
            ("conv3_block2_1_bn", "gamma", true, "layer2.1.norm2.weight"),
            ("conv3_block2_3_conv", "bias", true, "layer2.1.conv3.bias"),
            (
                "conv4_block1_0_conv",
                "kernel",
                true,
                "layer3.0.downsample.conv.weight",
            ),
            ("post_bn", "beta", true, "norm.bias"),
            ("predictions", "kernel", true, "fc.weight"),
        ] {
            assert_eq!(
                our_name(layer, param, v2).as_deref(),
                Some(ours),
                "{layer}/{param}"
            );
        }
        for (layer, param) in [
            ("conv1_bn", "kernel_x"),
            ("conv2_block1_4_conv", "kernel"),
            ("conv0_block1_1_conv", "kernel"),
            ("dense", "kernel"),
        ] {
            assert_eq!(our_name(layer, param, false), None, "{layer}/{param}");
        }
    }

    #[test]
    fn snake_case_is_keras() {
        for (class, snake) in [
            ("BatchNormalization", "batch_normalization"),
            ("Conv2D", "conv2d"),
            ("ZeroPadding2D", "zero_padding2d"),
            ("GlobalAveragePooling2D", "global_average_pooling2d"),
            ("Dense", "dense"),
            ("Add", "add"),
            ("MaxPooling2D", "max_pooling2d"),
        ] {
            assert_eq!(snake_case(class), snake);
        }
    }

    #[test]
    fn kernels_are_transposed_to_pytorch_layout() {
        // HWIO (1, 2, 2, 3): value = 100y + 10x... as h*1000 + w*100 + i*10 + o.
        let (h, w, i, o) = (1, 2, 2, 3);
        let hwio: Vec<f32> = (0..h * w * i * o)
            .map(|k| {
                let (rest, oc) = (k / o, k % o);
                let (rest, ic) = (rest / i, rest % i);
                let (y, x) = (rest / w, rest % w);
                (y * 1000 + x * 100 + ic * 10 + oc) as f32
            })
            .collect();
        let (shape, oihw) = to_pytorch_layout(&[h, w, i, o], hwio);
        assert_eq!(shape, [o, i, h, w]);
        for oc in 0..o {
            for ic in 0..i {
                for x in 0..w {
                    let value = oihw[(oc * i + ic) * w + x];
                    assert_eq!(value, (x * 100 + ic * 10 + oc) as f32);
                }
            }
        }
        let (shape, dense) = to_pytorch_layout(&[2, 3], vec![0., 1., 2., 10., 11., 12.]);
        assert_eq!(shape, [3, 2]);
        assert_eq!(dense, [0., 10., 1., 11., 2., 12.]);
    }
}
