//! Model directories (`config.json` + `model.safetensors`) as timm, transformers'
//! `save_pretrained` and the Hugging Face hub lay them out, and the local hub cache.

use std::path::{Path, PathBuf};

use resnet_core::{BlockKind, BottleneckStride, ResNetConfig, ShortcutKind, StemKind};
use serde_json::Value;

use crate::error::{Error, Result};
use candle_core::{DType, Device};

use crate::labels::builtin_labels;
use crate::load::{load_resnet, read_small_text, safetensors_paths, LoadedModel, WeightFiles};
use crate::preprocess::{Interpolation, PreprocessConfig};

/// Where a model's files are and what its config says.
#[derive(Debug, Clone, Default)]
pub struct ModelSource {
    /// The safetensors shard(s).
    pub weights: Vec<PathBuf>,
    /// The architecture named by `config.json`, when there is one.
    pub config: Option<ResNetConfig>,
    /// Label names by class index, when the config has them.
    pub labels: Option<Vec<String>>,
    /// Preprocessing from the config, when it says.
    pub preprocess: Option<PreprocessConfig>,
}

impl ModelSource {
    /// Loads the weights for the architecture `arch`, else the one `config.json` gives,
    /// else the one inferred from the tensors (see [`load_resnet`]).
    pub fn load(
        &self,
        arch: Option<&ResNetConfig>,
        device: &Device,
        dtype: DType,
    ) -> Result<LoadedModel> {
        let files = WeightFiles::open(&self.weights)?;
        load_resnet(&files, arch.or(self.config.as_ref()), device, dtype)
    }

    /// The label names: the config's, else the built-in ones for the class count.
    pub fn labels(&self, num_classes: usize) -> Option<Vec<String>> {
        self.labels
            .clone()
            .filter(|l| l.len() == num_classes)
            .or_else(|| builtin_labels(num_classes))
    }

    /// The preprocessing: the config's, else what the network's input normalisation
    /// calls for (Keras' modes; CIFAR's for a CIFAR stem; else ImageNet's).
    pub fn preprocess(&self, config: &ResNetConfig) -> PreprocessConfig {
        match &self.preprocess {
            Some(p) => p.clone(),
            None => PreprocessConfig::for_config(config),
        }
    }
}

/// Resolves what a user gave as `--model`: a `.safetensors` file (or shard index), a
/// model directory, or a hub id (`timm/resnet50.a1_in1k`, `microsoft/resnet-50`) found in
/// the local Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`). With the `hub` feature a hub id not in the cache is
/// downloaded into it ([`HubClient::from_env`](crate::HubClient::from_env)'s settings).
pub fn resolve_model(model: &str) -> Result<ModelSource> {
    #[cfg(feature = "hub")]
    return resolve_model_with(
        model,
        &crate::HubClient::from_env(&hub_cache_dir()),
        &mut (),
    );
    #[cfg(not(feature = "hub"))]
    resolve_model_in(model, &hub_cache_dir())
}

/// [`resolve_model`] with hub ids looked up in the cache at `cache_dir`, never
/// downloaded.
pub fn resolve_model_in(model: &str, cache_dir: &Path) -> Result<ModelSource> {
    resolve(model, cache_dir, |id| {
        Err(Error::NotFound {
            id: id.to_string(),
            reason: format!(
                "no model.safetensors for it in the Hugging Face cache at {}{}",
                cache_dir.display(),
                if cfg!(feature = "hub") {
                    ""
                } else {
                    " (this build has no `hub` feature to download it)"
                }
            ),
        })
    })
}

/// [`resolve_model`] with `hub`'s cache, downloading a hub id missing from it,
/// reporting to `progress`.
#[cfg(feature = "hub")]
#[cfg_attr(docsrs, doc(cfg(feature = "hub")))]
pub fn resolve_model_with(
    model: &str,
    hub: &crate::HubClient,
    progress: &mut dyn crate::DownloadProgress,
) -> Result<ModelSource> {
    resolve(model, hub.cache_dir(), |id| {
        hub.download_model(id, progress)
    })
}

fn resolve(
    model: &str,
    cache_dir: &Path,
    missing: impl FnOnce(&str) -> Result<ModelSource>,
) -> Result<ModelSource> {
    let path = Path::new(model);
    if path.exists() {
        if path.is_dir() {
            return read_model_dir(path);
        }
        return Ok(ModelSource {
            weights: safetensors_paths(path)?,
            config: None,
            labels: None,
            preprocess: None,
        });
    }
    if !looks_like_hub_id(model) {
        return Err(Error::NotFound {
            id: model.to_string(),
            reason: "no such file or directory, and not a hub id of the form owner/name".into(),
        });
    }
    let repo = hf_hub::Cache::new(cache_dir.to_path_buf()).model(model.to_string());
    let snapshot_file = |name: &str| repo.get(name);
    let weights = snapshot_file("model.safetensors")
        .or_else(|| snapshot_file("model.safetensors.index.json"));
    match weights {
        Some(weights) => {
            let dir = weights.parent().unwrap_or(Path::new(".")).to_path_buf();
            let mut source = match snapshot_file("config.json") {
                Some(config_path) => read_config(&config_path, &dir)?,
                None => ModelSource::default(),
            };
            source.weights = safetensors_paths(&weights)?;
            Ok(source)
        }
        None => missing(model),
    }
}

/// `owner/name`, each part of letters, digits, `-`, `_` and `.`, neither `.` nor `..`.
pub(crate) fn looks_like_hub_id(model: &str) -> bool {
    let mut parts = model.split('/');
    let valid = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(owner), Some(name), None) if valid(owner) && valid(name))
}

/// The hub cache directory this process uses.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    hf_hub::Cache::from_env().path().clone()
}

/// Reads a model directory: `config.json` and `model.safetensors` (or its shard index,
/// or the only `*.safetensors` file there).
pub fn read_model_dir(dir: &Path) -> Result<ModelSource> {
    let weights = ["model.safetensors", "model.safetensors.index.json"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file());
    let weights = match weights {
        Some(path) => safetensors_paths(&path)?,
        None => {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| Error::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::NotFound {
                    id: dir.display().to_string(),
                    reason: "the directory has no model.safetensors".into(),
                });
            }
            found
        }
    };
    let config_path = dir.join("config.json");
    let mut source = if config_path.is_file() {
        read_config(&config_path, dir)?
    } else {
        ModelSource::default()
    };
    source.weights = weights;
    Ok(source)
}

fn usize_of(value: &Value) -> Option<usize> {
    value.as_u64().and_then(|v| usize::try_from(v).ok())
}

fn f32_triple(value: &Value) -> Option<[f32; 3]> {
    let values: Vec<f32> = value
        .as_array()?
        .iter()
        .map(|v| v.as_f64().map(|f| f as f32))
        .collect::<Option<_>>()?;
    values.try_into().ok()
}

/// Label names from an `id2label` map or a `label_names` list.
fn labels_of(config: &Value, num_classes: usize) -> Option<Vec<String>> {
    if let Some(names) = config.get("label_names").and_then(Value::as_array) {
        let names: Vec<String> = names
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        return (names.len() == num_classes).then_some(names);
    }
    let map = config.get("id2label")?.as_object()?;
    let mut labels = vec![String::new(); num_classes];
    for (key, value) in map {
        let index: usize = key.parse().ok()?;
        *labels.get_mut(index)? = value.as_str()?.to_string();
    }
    labels.iter().all(|l| !l.is_empty()).then_some(labels)
}

/// Reads `config.json` (timm or transformers) of the model in `dir`.
pub fn read_config(path: &Path, dir: &Path) -> Result<ModelSource> {
    let error = |reason: String| Error::Config {
        path: path.to_path_buf(),
        reason,
    };
    let config: Value = serde_json::from_str(&read_small_text(path)?)
        .map_err(|e| error(format!("invalid JSON ({e})")))?;
    if config.get("model_type").and_then(Value::as_str) == Some("resnet") {
        let mut source = transformers_config(&config).map_err(error)?;
        let processor = dir.join("preprocessor_config.json");
        if processor.is_file() {
            let text = read_small_text(&processor)?;
            let value: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: processor.clone(),
                reason: format!("invalid JSON ({e})"),
            })?;
            source.preprocess = Some(transformers_preprocess(&value));
        }
        return Ok(source);
    }
    if let Some(architecture) = config.get("architecture").and_then(Value::as_str) {
        return timm_config(&config, architecture).map_err(error);
    }
    // Written by `write_model_dir` for a network that is no preset: the architecture
    // comes from the weights' metadata, the rest from here.
    if config.get("pretrained_cfg").is_some() {
        let num_classes = config.get("num_classes").and_then(usize_of).unwrap_or(0);
        let pretrained = &config["pretrained_cfg"];
        return Ok(ModelSource {
            weights: vec![],
            config: None,
            labels: labels_of(&config, num_classes),
            preprocess: Some(pretrained_preprocess(pretrained).map_err(error)?),
        });
    }
    Err(error(
        "expected a timm config (\"architecture\") or a transformers config (\"model_type\": \"resnet\")".into(),
    ))
}

fn timm_config(config: &Value, architecture: &str) -> std::result::Result<ModelSource, String> {
    // "resnet50.a1_in1k": the part before the dot is the architecture, the rest the tag.
    let name = architecture.split('.').next().unwrap_or(architecture);
    let mut resnet = ResNetConfig::preset(name).ok_or_else(|| {
        format!(
            "timm architecture '{architecture}' is not supported; expected one of: {}",
            resnet_core::PRESET_NAMES.join(", ")
        )
    })?;
    if let Some(classes) = config.get("num_classes").and_then(usize_of) {
        resnet.num_classes = classes;
    }
    if let Some(channels) = config.get("in_chans").and_then(usize_of) {
        resnet.in_channels = channels;
    }
    // The arguments the model was created with (timm records them since 1.0).
    if let Some(args) = config.get("model_args").and_then(Value::as_object) {
        for (key, value) in args {
            let number = || {
                usize_of(value)
                    .ok_or_else(|| format!("model_args.{key} must be a non-negative integer"))
            };
            match key.as_str() {
                "num_classes" => resnet.num_classes = number()?,
                "in_chans" => resnet.in_channels = number()?,
                "cardinality" => resnet.groups = number()?,
                "base_width" => resnet.width_per_group = number()?,
                "channels" => {
                    resnet.stage_widths = value
                        .as_array()
                        .and_then(|a| a.iter().map(usize_of).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| "model_args.channels must be a list of integers".to_string())?;
                }
                "layers" => {
                    resnet.blocks_per_stage = value
                        .as_array()
                        .and_then(|a| a.iter().map(usize_of).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| "model_args.layers must be a list of integers".to_string())?;
                }
                // No effect on inference or on the tensors.
                "global_pool" | "drop_rate" | "drop_path_rate" | "drop_block_rate" | "zero_init_last" => {}
                // stem_width only matters for deep stems, which are not supported.
                "stem_width" => {}
                other => {
                    return Err(format!(
                        "timm model argument '{other}' = {value} is not supported (ResNet-D, deep stems and anti-aliasing are not yet)"
                    ))
                }
            }
        }
    }
    resnet.validate().map_err(|e| e.to_string())?;
    let pretrained = config.get("pretrained_cfg").unwrap_or(&Value::Null);
    let preprocess = pretrained_preprocess(pretrained)?;
    let labels =
        labels_of(config, resnet.num_classes).or_else(|| labels_of(pretrained, resnet.num_classes));
    Ok(ModelSource {
        weights: vec![],
        config: Some(resnet),
        labels,
        preprocess: Some(preprocess),
    })
}

/// timm's `pretrained_cfg` (input size, crop_pct, mean, std, interpolation), and the
/// `resize` policy this crate records for the networks it trains.
fn pretrained_preprocess(pretrained: &Value) -> std::result::Result<PreprocessConfig, String> {
    let mut preprocess = PreprocessConfig::imagenet();
    if let Some(size) = pretrained.get("input_size").and_then(Value::as_array) {
        let dims: Vec<usize> = size.iter().filter_map(usize_of).collect();
        if let [_, h, w] = dims[..] {
            preprocess.size = (h, w);
        }
    }
    if let Some(crop) = pretrained.get("crop_pct").and_then(Value::as_f64) {
        preprocess.crop_pct = crop;
    }
    if let Some(mean) = pretrained.get("mean").and_then(f32_triple) {
        preprocess.mean = mean;
    }
    if let Some(std) = pretrained.get("std").and_then(f32_triple) {
        preprocess.std = std;
    }
    if let Some(interpolation) = pretrained.get("interpolation").and_then(Value::as_str) {
        preprocess.interpolation = interpolation.parse()?;
    }
    if let Some(resize) = pretrained.get("resize").and_then(Value::as_str) {
        preprocess.resize = resize.parse()?;
    }
    Ok(preprocess)
}

/// An f32 as the shortest decimal that reads back to it.
fn round_f32(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

/// Writes a model directory that every command reads back: `model.safetensors` (in
/// `scheme`'s names, the architecture in its metadata) and a timm-style `config.json`
/// with the class names and the preprocessing the model was trained with.
pub fn write_model_dir(
    dir: &Path,
    model: &resnet_core::ResNet,
    scheme: crate::NamingScheme,
    labels: Option<&[String]>,
    preprocess: &PreprocessConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    crate::save(model, dir.join("model.safetensors"), scheme, DType::F32)?;
    let config = model.config();
    let base = ResNetConfig {
        num_classes: 0,
        in_channels: 3,
        ..config.clone()
    };
    let preset = resnet_core::PRESET_NAMES.iter().find(|name| {
        ResNetConfig::preset(name)
            .map(|p| p.with_num_classes(0))
            .as_ref()
            == Some(&base)
    });
    let resize = match preprocess.resize {
        crate::Resize::CenterCrop => "crop",
        crate::Resize::Squash => "squash",
        crate::Resize::Exact => "none",
    };
    let interpolation = match preprocess.interpolation {
        Interpolation::Nearest => "nearest",
        Interpolation::Bilinear => "bilinear",
        Interpolation::Bicubic => "bicubic",
    };
    let mut json = serde_json::json!({
        "num_classes": config.num_classes,
        "in_chans": config.in_channels,
        "pretrained_cfg": {
            "input_size": [config.in_channels, preprocess.size.0, preprocess.size.1],
            "crop_pct": preprocess.crop_pct,
            "interpolation": interpolation,
            // f32 to the decimal a user wrote (0.485, not 0.48500001430511475).
            "mean": preprocess.mean.map(round_f32),
            "std": preprocess.std.map(round_f32),
            "resize": resize,
        },
    });
    if let Some(name) = preset {
        json["architecture"] = Value::from(*name);
    }
    if let Some(labels) = labels {
        json["label_names"] = Value::from(labels.to_vec());
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Config {
        path: dir.join("config.json"),
        reason: e.to_string(),
    })?;
    crate::write_output(dir.join("config.json"), text.as_bytes())
}

fn transformers_config(config: &Value) -> std::result::Result<ModelSource, String> {
    let list = |key: &str| -> std::result::Result<Vec<usize>, String> {
        config
            .get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(usize_of).collect::<Option<Vec<_>>>())
            .ok_or_else(|| format!("\"{key}\" must be a list of non-negative integers"))
    };
    let depths = list("depths")?;
    let hidden_sizes = list("hidden_sizes")?;
    let block = match config
        .get("layer_type")
        .and_then(Value::as_str)
        .unwrap_or("bottleneck")
    {
        "basic" => BlockKind::Basic,
        "bottleneck" => BlockKind::Bottleneck,
        other => {
            return Err(format!(
                "layer_type '{other}' is not supported; expected basic or bottleneck"
            ))
        }
    };
    let flag = |key: &str| config.get(key).and_then(Value::as_bool).unwrap_or(false);
    // transformers' "downsample_in_bottleneck": the paper's v1, stride on the first 1x1.
    let bottleneck_stride = if flag("downsample_in_bottleneck") {
        BottleneckStride::Reduce1x1
    } else {
        BottleneckStride::Conv3x3
    };
    if let Some(act) = config.get("hidden_act").and_then(Value::as_str) {
        if act != "relu" {
            return Err(format!(
                "hidden_act '{act}' is not supported; expected relu"
            ));
        }
    }
    let expansion = block.expansion();
    if let Some(size) = hidden_sizes.iter().find(|&&s| s % expansion != 0) {
        return Err(format!(
            "hidden size {size} is not a multiple of the block expansion {expansion}"
        ));
    }
    let num_classes = match config.get("id2label").and_then(Value::as_object) {
        Some(map) => map.len(),
        None => config.get("num_labels").and_then(usize_of).unwrap_or(0),
    };
    let resnet = ResNetConfig {
        block,
        blocks_per_stage: depths,
        stage_widths: hidden_sizes.iter().map(|s| s / expansion).collect(),
        stem: StemKind::ImageNet,
        stem_width: config
            .get("embedding_size")
            .and_then(usize_of)
            .unwrap_or(64),
        shortcut: ShortcutKind::Projection,
        groups: 1,
        width_per_group: 64,
        in_channels: config.get("num_channels").and_then(usize_of).unwrap_or(3),
        num_classes,
        bn_eps: 1e-5,
        bottleneck_stride,
        squeeze_excite: false,
        preactivation: false,
        stride_in_last_block: false,
        // transformers' first stage strides too.
        downsample_first_stage: flag("downsample_in_first_stage"),
        conv_bias: false,
        zero_padded_pool: false,
        input_normalization: resnet_core::InputNormalization::MeanStd,
    };
    resnet.validate().map_err(|e| e.to_string())?;
    Ok(ModelSource {
        weights: vec![],
        labels: labels_of(config, num_classes),
        config: Some(resnet),
        preprocess: Some(PreprocessConfig::imagenet()),
    })
}

/// transformers' `ConvNextImageProcessor` as ResNet checkpoints use it.
fn transformers_preprocess(value: &Value) -> PreprocessConfig {
    let mut preprocess = PreprocessConfig::imagenet();
    if let Some(mean) = value.get("image_mean").and_then(f32_triple) {
        preprocess.mean = mean;
    }
    if let Some(std) = value.get("image_std").and_then(f32_triple) {
        preprocess.std = std;
    }
    if let Some(crop) = value.get("crop_pct").and_then(Value::as_f64) {
        preprocess.crop_pct = crop;
    }
    if let Some(edge) = value
        .get("size")
        .and_then(|s| s.get("shortest_edge"))
        .and_then(usize_of)
    {
        preprocess.size = (edge, edge);
    }
    preprocess.interpolation = match value.get("resample").and_then(Value::as_u64) {
        Some(0) => Interpolation::Nearest,
        Some(2) => Interpolation::Bilinear,
        _ => Interpolation::Bicubic,
    };
    preprocess
}
