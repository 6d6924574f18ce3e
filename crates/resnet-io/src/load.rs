//! From safetensors files to a `ResNet`: naming, architecture, validation, loading.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use resnet_core::{ResNet, ResNetConfig};
use safetensors::Dtype;

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::error::{Error, Result};
use crate::infer::{infer_config, Shapes};
use crate::naming::{is_ignored, NamingScheme};
use crate::report::{LoadReport, ShapeMismatch};

/// One checkpoint split over one or more safetensors files (shards).
#[derive(Debug)]
pub struct WeightFiles {
    shards: Vec<Checkpoint>,
    /// Tensor name -> (shard index, position in that shard's list).
    index: BTreeMap<String, (usize, usize)>,
}

impl WeightFiles {
    /// Opens and validates the headers of every shard. A tensor named in two shards is
    /// an error. Keras files (`.h5`, `.keras`) are read and converted whole
    /// ([`crate::open_keras`]).
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let shards = paths
            .iter()
            .map(|path| {
                let path = path.as_ref();
                if crate::keras::is_keras_path(path) {
                    crate::keras::open_keras(path)
                } else {
                    Checkpoint::open(path)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_checkpoints(shards)
    }

    /// Groups already opened checkpoints.
    pub fn from_checkpoints(shards: Vec<Checkpoint>) -> Result<Self> {
        if shards.is_empty() {
            return Err(Error::NotFound {
                id: String::new(),
                reason: "no safetensors file given".into(),
            });
        }
        let mut index = BTreeMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (t, info) in shard.tensors().iter().enumerate() {
                if let Some((other, _)) = index.insert(info.name.clone(), (s, t)) {
                    return Err(Error::InvalidTensor {
                        path: shard.path().to_path_buf(),
                        tensor: info.name.clone(),
                        reason: format!("also present in {}", shards[other].path().display()),
                    });
                }
            }
        }
        Ok(Self { shards, index })
    }

    /// The first shard's path, to name the checkpoint in messages.
    pub fn path(&self) -> &Path {
        self.shards[0].path()
    }

    /// Every tensor entry of every shard.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.index
            .values()
            .map(|&(s, t)| &self.shards[s].tensors()[t])
    }

    /// The entry of tensor `name`, if any shard has it.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index
            .get(name)
            .map(|&(s, t)| &self.shards[s].tensors()[t])
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors()
            .map(|t| t.data_offsets.1 - t.data_offsets.0)
            .sum()
    }

    /// The `__metadata__` of every shard, merged.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        self.shards
            .iter()
            .flat_map(|s| s.metadata().clone())
            .collect()
    }

    /// Reads tensor `name` (as named in the file).
    pub fn load(&self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        let (s, _) = self.index.get(name).ok_or_else(|| Error::InvalidTensor {
            path: self.path().to_path_buf(),
            tensor: name.to_string(),
            reason: "not in the checkpoint".into(),
        })?;
        self.shards[*s].load(name, device, dtype)
    }
}

/// What the header of a checkpoint says, checked against an architecture.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The naming scheme of the file.
    pub scheme: NamingScheme,
    /// The architecture: given, or inferred from the tensors.
    pub config: ResNetConfig,
    /// torchvision name -> name in the file.
    pub names: BTreeMap<String, String>,
    /// The validation report.
    pub report: LoadReport,
}

/// Parameter dtypes accepted; anything else is reported, never converted silently.
fn is_float_parameter(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Checks the header of `files` against `config` (or, with `None`, the architecture
/// stored in its metadata by [`crate::save`], else the one inferred from the tensors) without reading any data and without failing on a
/// mismatch: the report says what fits and what does not.
pub fn inspect(files: &WeightFiles, config: Option<&ResNetConfig>) -> Result<Inspection> {
    let path = files.path().to_path_buf();
    let scheme =
        NamingScheme::detect(files.tensors().map(|t| t.name.as_str())).map_err(|reason| {
            Error::UnknownScheme {
                path: path.clone(),
                reason,
            }
        })?;
    let mut report = LoadReport::new(scheme);
    let mut names = BTreeMap::new();
    let mut shapes = Shapes::new();
    for info in files.tensors() {
        if is_ignored(&info.name) {
            report.ignored.push(info.name.clone());
            continue;
        }
        match scheme.to_torchvision(&info.name) {
            Some(tv) => {
                if let Some(previous) = names.insert(tv.clone(), info.name.clone()) {
                    return Err(Error::InvalidTensor {
                        path,
                        tensor: info.name.clone(),
                        reason: format!("names the same parameter ({tv}) as '{previous}'"),
                    });
                }
                shapes.insert(tv, info.shape.clone());
            }
            None => report.unexpected.push(info.name.clone()),
        }
    }
    let stored = crate::save::config_from_metadata(&files.metadata());
    let config = match config.or(stored.as_ref()) {
        Some(config) => config.clone(),
        None => infer_config(&shapes).map_err(|reason| Error::Infer {
            path: path.clone(),
            reason,
        })?,
    };
    let expected = ResNet::expected_tensors(&config)?;
    let mut used = std::collections::HashSet::new();
    for (name, expected_shape) in expected {
        let Some(file_name) = names.get(&name) else {
            report.missing.push((name, expected_shape));
            continue;
        };
        used.insert(name.clone());
        let info = files.info(file_name).ok_or_else(|| Error::InvalidTensor {
            path: path.clone(),
            tensor: file_name.clone(),
            reason: "vanished from the index".into(),
        })?;
        // Either our shape or the one the scheme stores it in (timm's 1x1-convolution
        // classifier), reshaped on loading.
        if info.shape != expected_shape && info.shape != scheme.file_shape(&name, &expected_shape) {
            report.mismatched.push(ShapeMismatch {
                name,
                file_name: file_name.clone(),
                expected: expected_shape,
                found: info.shape.clone(),
            });
        } else if !is_float_parameter(info.dtype) {
            report.wrong_dtype.push((file_name.clone(), info.dtype));
        } else {
            report.loaded.push(name);
        }
    }
    for (tv, file_name) in &names {
        if !used.contains(tv) {
            report.unexpected.push(file_name.clone());
        }
    }
    report.unexpected.sort();
    Ok(Inspection {
        scheme,
        config,
        names,
        report,
    })
}

/// A model loaded from a checkpoint, with what was learned on the way.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: ResNet,
    /// Its architecture.
    pub config: ResNetConfig,
    /// The naming scheme of the file.
    pub scheme: NamingScheme,
    /// The validation report (all loaded).
    pub report: LoadReport,
    /// The checkpoint's `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// Loads `files` into a `ResNet` on `device` in `dtype`, for the architecture `config`
/// or, with `None`, the one inferred from the tensors. Every tensor is checked before
/// any is read; every value must be finite and every running variance non-negative.
pub fn load_resnet(
    files: &WeightFiles,
    config: Option<&ResNetConfig>,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel> {
    let inspection = inspect(files, config)?;
    if !inspection.report.is_ok() {
        return Err(Error::Mismatch {
            path: files.path().to_path_buf(),
            architecture: inspection.config.describe(),
            report: Box::new(inspection.report),
        });
    }
    let mut tensors = HashMap::with_capacity(inspection.report.loaded.len());
    let shapes: HashMap<String, Vec<usize>> = ResNet::expected_tensors(&inspection.config)?
        .into_iter()
        .collect();
    for name in &inspection.report.loaded {
        let file_name = &inspection.names[name];
        let mut tensor = files.load(file_name, device, dtype)?;
        if let Some(shape) = shapes.get(name).filter(|s| s.as_slice() != tensor.dims()) {
            tensor = tensor.reshape(shape.as_slice())?;
        }
        if name.ends_with("running_var") {
            let min = tensor.to_dtype(DType::F32)?.min_all()?.to_scalar::<f32>()?;
            if min < 0.0 {
                return Err(Error::InvalidTensor {
                    path: files.path().to_path_buf(),
                    tensor: file_name.clone(),
                    reason: format!("a running variance is negative ({min})"),
                });
            }
        }
        tensors.insert(name.clone(), tensor);
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let model = ResNet::new(&inspection.config, vb)?;
    Ok(LoadedModel {
        model,
        config: inspection.config,
        scheme: inspection.scheme,
        report: inspection.report,
        metadata: files.metadata(),
    })
}

/// Opens one safetensors file, or a sharded checkpoint through its
/// `*.safetensors.index.json`, and loads it (see [`load_resnet`]).
pub fn load_file(
    path: impl AsRef<Path>,
    config: Option<&ResNetConfig>,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel> {
    let files = WeightFiles::open(&safetensors_paths(path.as_ref())?)?;
    load_resnet(&files, config, device, dtype)
}

/// The shard files of a checkpoint: the file itself, or those an index JSON names.
pub fn safetensors_paths(path: &Path) -> Result<Vec<PathBuf>> {
    let is_index = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".index.json"));
    if !is_index {
        return Ok(vec![path.to_path_buf()]);
    }
    let config_error = |reason: String| Error::Config {
        path: path.to_path_buf(),
        reason,
    };
    let text = read_small_text(path)?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_str(&text)
        .map_err(|e| config_error(format!("invalid safetensors index ({e})")))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<&String> = index.weight_map.values().collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|file| {
            // Shards must sit beside the index: no path can reach elsewhere.
            let plain = Path::new(file).file_name().and_then(|n| n.to_str()) == Some(file.as_str());
            if !plain || file == ".." || file == "." {
                return Err(config_error(format!(
                    "shard '{file}' must be a file name beside the index, not a path"
                )));
            }
            Ok(dir.join(file))
        })
        .collect()
}

/// Largest JSON file (configs, indexes) read whole.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// The size of `path`, a regular file (a directory, FIFO or device is an error, found
/// without opening it).
pub(crate) fn regular_file_len(path: &Path) -> Result<u64> {
    let metadata = std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !metadata.is_file() {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
            found: if metadata.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            },
        });
    }
    Ok(metadata.len())
}

/// Reads a JSON or text file of bounded size (configs, indexes, label lists).
pub(crate) fn read_small_text(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = regular_file_len(path)?;
    if len > MAX_JSON_BYTES {
        return Err(Error::Config {
            path: path.to_path_buf(),
            reason: format!("{len} bytes is too large (at most {MAX_JSON_BYTES})"),
        });
    }
    std::fs::read_to_string(path).map_err(io)
}
