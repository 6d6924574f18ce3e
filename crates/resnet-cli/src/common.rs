//! Options every command shares, and loading a model as the user named it.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use clap::Args;
use resnet_core::{ResNet, ResNetConfig};
use resnet_io::{inspect, Checkpoint, ModelSource, PreprocessConfig, Resize, WeightFiles};

/// Device, dtype and threads, accepted before or after the command.
#[derive(Args, Debug, Clone)]
pub struct GlobalOptions {
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, global = true, default_value = "auto")]
    pub device: String,
    /// f32, f16 or bf16.
    #[arg(long, global = true, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,
    /// CPU threads, at least 1 (default: all cores).
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
    pub fn apply_threads(&self) -> Result<()> {
        let Some(threads) = self.threads else {
            return Ok(());
        };
        if threads == 0 {
            bail!("--threads 0: expected at least 1 (leave --threads out to use every core)");
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if threads > 4 * cores {
            eprintln!(
                "warning: --threads {threads} is more than 4 times the {cores} cores here: \
                 the threads will take turns, not run faster"
            );
        }
        std::env::set_var("RAYON_NUM_THREADS", threads.min(4096).to_string());
        Ok(())
    }

    pub fn device(&self) -> Result<Device> {
        Ok(resnet_core::device(&self.device)?)
    }
}

/// Set by a command that handles Ctrl-C itself (training checkpoints first).
pub static DEFER_INTERRUPT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
/// Set by the Ctrl-C handler when the command handles it.
pub static INTERRUPT_REQUESTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

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
    /// How images of another size reach the model: crop (shorter side, then a centre
    /// crop, keeping the aspect ratio), squash (straight to the input size) or none
    /// (refuse them). Default: the model's (crop; squash for CIFAR models).
    #[arg(long, value_parser = clap::value_parser!(Resize))]
    pub resize: Option<Resize>,
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
    /// The naming scheme of its checkpoint (a trained model is saved in it).
    pub scheme: resnet_io::NamingScheme,
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
pub fn load_model(global: &GlobalOptions, args: &ModelArgs) -> Result<Model> {
    let mut model = load_model_named(global, args.model.as_deref(), &args.arch, true)?;
    if let Some(resize) = args.resize {
        model.preprocess.resize = resize;
    }
    Ok(model)
}

/// Loads a model; `fold`: with BatchNorm folded for inference (else as it is, to train).
pub fn load_model_named(
    global: &GlobalOptions,
    model: Option<&str>,
    arch: &str,
    fold: bool,
) -> Result<Model> {
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
    .map_err(|error| match error {
        resnet_io::Error::Mismatch { .. } => {
            anyhow::anyhow!("{error} (`resnet inspect {name} --arch {arch}` lists every tensor)")
        }
        other => anyhow::Error::new(other),
    })
    .with_context(|| format!("loading model '{name}'"))?;
    let labels = source.labels(loaded.config.num_classes);
    let preprocess = source.preprocess(&loaded.config);
    // Inference: BatchNorm folded into the convolutions.
    let model = if fold {
        let folded = loaded.model.fold_batch_norm()?;
        after_loading();
        folded
    } else {
        loaded.model
    };
    Ok(Model {
        name,
        scheme: loaded.scheme,
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
            let loaded = load_model_named(global, Some(path), arch, true)?;
            Ok((loaded.model, loaded.device, loaded.dtype))
        }
        None => {
            let device = global.device()?;
            let model = random_model(arch, &device, global.dtype)?;
            Ok((model, device, global.dtype))
        }
    }
}

/// A network of architecture `arch` with candle's random initialisation, not folded.
pub fn random_unfolded(arch: &str, device: &Device, dtype: DType) -> Result<ResNet> {
    let Some(config) = parse_arch(arch)? else {
        bail!("--arch auto needs --model to infer the architecture from");
    };
    let varmap = candle_nn::VarMap::new();
    Ok(ResNet::new(
        &config,
        VarBuilder::from_varmap(&varmap, dtype, device),
    )?)
}

/// A network of architecture `arch` with candle's random initialisation, BatchNorm
/// folded for inference.
fn random_model(arch: &str, device: &Device, dtype: DType) -> Result<ResNet> {
    let model = random_unfolded(arch, device, dtype)?.fold_batch_norm()?;
    after_loading();
    Ok(model)
}

/// Once the weights are in place: passes reuse the previous pass's activation memory
/// instead of page-faulting it back in (after, not before, loading: the loader's and
/// folding's temporary buffers are returned to the system as usual).
fn after_loading() {
    resnet_core::retain_freed_memory();
}

/// The k most probable classes of each row of logits (the library's, shared with
/// training's validation).
pub use resnet_train::top_k;

/// Refuses, before anything is allocated, a forward pass over `shape` (N, C, H, W) whose
/// activations cannot fit in this machine's memory (or whose size overflows).
pub fn check_forward_memory(shape: [usize; 4], dtype: DType, device: &Device) -> Result<()> {
    // The widest maps of a ResNet hold about 16 (up to 64, for wide variants) values
    // per input pixel, and a pass holds a few of them at once.
    const VALUES_PER_PIXEL: u64 = 256;
    let [n, c, h, w] = shape.map(|d| d as u64);
    let bytes = n
        .checked_mul(h)
        .and_then(|v| v.checked_mul(w))
        .and_then(|pixels| pixels.checked_mul(VALUES_PER_PIXEL + c))
        .and_then(|values| values.checked_mul(dtype.size_in_bytes().max(4) as u64));
    let described = format!("a {n}x{c}x{h}x{w} forward pass");
    let Some(bytes) = bytes else {
        bail!("{described} is too large: its size overflows 64 bits");
    };
    let (limit, source) = match (device.is_cpu(), available_memory()) {
        (true, Some(available)) => (available, "the memory available (MemAvailable)"),
        _ => (1 << 40, "the limit of 1 TiB"),
    };
    if bytes > limit {
        bail!(
            "{described} needs about {:.1} GB for its activations, more than {source}: {:.1} GB",
            bytes as f64 / 1e9,
            limit as f64 / 1e9
        );
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, in bytes (Linux).
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// This process's peak resident memory (`VmHWM` of /proc/self/status), Linux only.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `RESNET_DECODE_MEMORY_MB`: the memory all image-decoding threads may hold together.
pub fn apply_decode_memory_budget() -> Result<()> {
    let Some(value) = std::env::var_os("RESNET_DECODE_MEMORY_MB") else {
        return Ok(());
    };
    let megabytes: u64 = value
        .to_str()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&mb| mb > 0)
        .with_context(|| {
            format!("RESNET_DECODE_MEMORY_MB={value:?}: expected a positive number of megabytes")
        })?;
    resnet_io::set_decode_memory_budget(megabytes.saturating_mul(1 << 20));
    Ok(())
}
