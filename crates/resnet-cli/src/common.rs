//! Options every command shares, and loading a model as the user named it.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use clap::Args;
use resnet_core::{ResNet, ResNetConfig};
use resnet_io::{inspect, Checkpoint, ModelSource, PreprocessConfig, WeightFiles};

/// Device, dtype and threads, accepted before or after the command.
#[derive(Args, Debug, Clone)]
pub struct GlobalOptions {
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, global = true, default_value = "auto")]
    pub device: String,
    /// f32, f16 or bf16.
    #[arg(long, global = true, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
}

pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(format!("unknown dtype '{s}', expected f32, f16 or bf16")),
    }
}

impl GlobalOptions {
    /// Sets the thread count candle and rayon use; must run before either starts.
    pub fn apply_threads(&self) {
        if let Some(threads) = self.threads.filter(|&t| t > 0) {
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
    }

    pub fn device(&self) -> Result<Device> {
        Ok(resnet_core::device(&self.device)?)
    }
}

/// Which model to run: `--model` and `--arch`.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .safetensors file, a model directory or a Hugging Face hub id (default: the
    /// embedded pretrained CIFAR-10 ResNet-20).
    #[arg(long)]
    pub model: Option<String>,
    /// `auto` (from the checkpoint) or an architecture name such as resnet50.
    #[arg(long, default_value = "auto")]
    pub arch: String,
}

/// `--arch`: `auto` or a preset name.
pub fn parse_arch(arch: &str) -> Result<Option<ResNetConfig>> {
    if arch.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    Ok(Some(arch.parse()?))
}

/// The pretrained CIFAR-10 ResNet-20 built into the binary, so that `classify` and
/// `eval` work with nothing else present (weights/NOTICE: Y. Idelbayev, BSD-2).
const EMBEDDED_MODEL: &[u8] = include_bytes!("../../../weights/resnet20.safetensors");
/// How outputs name the embedded model.
pub const EMBEDDED_MODEL_NAME: &str = "embedded:resnet20-cifar10";

/// A model ready to run, with how to feed it and name its outputs.
pub struct Model {
    /// What the user gave as `--model`, or [`EMBEDDED_MODEL_NAME`].
    pub name: String,
    pub model: ResNet,
    pub config: ResNetConfig,
    pub labels: Option<Vec<String>>,
    pub preprocess: PreprocessConfig,
    pub device: Device,
    pub dtype: DType,
}

/// Loads `--model` (file, directory or hub id; `None`: the embedded default) for
/// `--arch` (auto or a preset; a preset takes its class and input-channel counts from
/// the checkpoint).
pub fn load_model(global: &GlobalOptions, model: Option<&str>, arch: &str) -> Result<Model> {
    let device = global.device()?;
    let dtype = global.dtype;
    let (name, source, files) = match model {
        Some(model) => {
            let source = resolve_source(model)?;
            let files = WeightFiles::open(&source.weights)?;
            (model.to_string(), source, files)
        }
        None => {
            eprintln!(
                "note: no --model given: using the embedded pretrained CIFAR-10 ResNet-20 \
                 (He et al. 2015, section 4.2; weights by Y. Idelbayev, BSD-2)"
            );
            let checkpoint = Checkpoint::from_bytes(EMBEDDED_MODEL_NAME, EMBEDDED_MODEL.to_vec())?;
            let files = WeightFiles::from_checkpoints(vec![checkpoint])?;
            (
                EMBEDDED_MODEL_NAME.to_string(),
                ModelSource::default(),
                files,
            )
        }
    };
    let mut config = parse_arch(arch)?;
    if let Some(preset) = config.as_mut() {
        if let Ok(found) = inspect(&files, None) {
            preset.num_classes = found.config.num_classes;
            preset.in_channels = found.config.in_channels;
        }
    }
    let loaded = resnet_io::load_resnet(
        &files,
        config.as_ref().or(source.config.as_ref()),
        &device,
        dtype,
    )
    .with_context(|| format!("loading model '{name}'"))?;
    let labels = source.labels(loaded.config.num_classes);
    let preprocess = source.preprocess(&loaded.config);
    // Every command only infers: BatchNorm folded into the convolutions.
    let model = loaded.model.fold_batch_norm()?;
    after_loading();
    Ok(Model {
        name,
        model,
        config: loaded.config,
        labels,
        preprocess,
        device,
        dtype,
    })
}

/// Finds `--model`: a file, a model directory, or a hub id in the local cache; with the
/// `hub` feature (a default of this binary) a hub id missing from the cache is
/// downloaded into it, with a progress bar.
pub fn resolve_source(model: &str) -> Result<ModelSource> {
    #[cfg(feature = "hub")]
    {
        let hub = resnet_io::HubClient::from_env(&resnet_io::hub_cache_dir());
        Ok(resnet_io::resolve_model_with(
            model,
            &hub,
            &mut DownloadBar::default(),
        )?)
    }
    #[cfg(not(feature = "hub"))]
    Ok(resnet_io::resolve_model(model)?)
}

/// A download's progress on stderr: one line per file, and a bar on a terminal.
#[cfg(feature = "hub")]
#[derive(Default)]
struct DownloadBar {
    bar: Option<indicatif::ProgressBar>,
}

#[cfg(feature = "hub")]
impl resnet_io::DownloadProgress for DownloadBar {
    fn start(&mut self, file: &str, total: u64, resumed_from: u64) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let size = indicatif::HumanBytes(total);
        if resumed_from > 0 {
            let done = indicatif::HumanBytes(resumed_from);
            eprintln!("downloading {file} ({size}), resuming at {done}");
        } else {
            eprintln!("downloading {file} ({size})");
        }
        let bar = indicatif::ProgressBar::new(total).with_position(resumed_from);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec}, eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        self.bar = Some(bar);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `--model` loaded for `--arch` when given, else a random network of `--arch`; with
/// the device and dtype it runs in.
pub fn model_or_random(
    global: &GlobalOptions,
    model: Option<&str>,
    arch: &str,
) -> Result<(ResNet, Device, DType)> {
    match model {
        Some(path) => {
            let loaded = load_model(global, Some(path), arch)?;
            Ok((loaded.model, loaded.device, loaded.dtype))
        }
        None => {
            let device = global.device()?;
            let model = random_model(arch, &device, global.dtype)?;
            Ok((model, device, global.dtype))
        }
    }
}

/// A network of architecture `arch` with candle's random initialisation, BatchNorm
/// folded for inference.
fn random_model(arch: &str, device: &Device, dtype: DType) -> Result<ResNet> {
    let Some(config) = parse_arch(arch)? else {
        bail!("--arch auto needs --model to infer the architecture from");
    };
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, device);
    let model = ResNet::new(&config, vb)?.fold_batch_norm()?;
    drop(varmap);
    after_loading();
    Ok(model)
}

/// Once the weights are in place: passes reuse the previous pass's activation memory
/// instead of page-faulting it back in (after, not before, loading: the loader's and
/// folding's temporary buffers are returned to the system as usual).
fn after_loading() {
    resnet_core::retain_freed_memory();
}

/// Softmax probabilities and indices of the `k` most likely classes of each row.
pub fn top_k(logits: &candle_core::Tensor, k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
    let probabilities = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
    let rows: Vec<Vec<f32>> = probabilities.to_device(&Device::Cpu)?.to_vec2()?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let mut indexed: Vec<(usize, f32)> = row.into_iter().enumerate().collect();
            indexed.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            indexed.truncate(k);
            indexed
        })
        .collect())
}
