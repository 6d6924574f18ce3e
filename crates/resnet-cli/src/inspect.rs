//! `resnet inspect` and `resnet convert`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::DType;
use resnet_io::{NamingScheme, WeightFiles};
use serde_json::json;

use crate::common::{parse_arch, resolve_source, GlobalOptions};

#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file, a model directory or a Hugging Face hub id.
    #[arg(required_unless_present = "list")]
    model: Option<String>,
    /// List every preset (name, parameters, layout) instead.
    #[arg(long, conflicts_with = "model")]
    list: bool,
    /// Check against this architecture instead of the inferred one.
    #[arg(long, default_value = "auto")]
    arch: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Multiply-adds of one image's forward pass of `config` at its usual input size (32 for
/// CIFAR stems, else 224), with that size: counted on a network of zeros (calloc'd, so
/// its pages are never touched).
fn multiply_adds(config: &resnet_core::ResNetConfig) -> Result<(u64, usize)> {
    let size = match config.stem {
        resnet_core::StemKind::Cifar => 32,
        _ => 224,
    };
    // A config inferred from a hostile file may be absurd (a block index in the
    // millions): not built, counted from its shapes first.
    let expected = resnet_core::ResNet::expected_tensors(config)?;
    let elements: usize = expected
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum();
    if expected.len() > 100_000 || elements > 2_000_000_000 {
        anyhow::bail!(
            "{} tensors, {elements} values: too large a network to count",
            expected.len()
        );
    }
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &candle_core::Device::Cpu);
    let model = resnet_core::ResNet::new(config, vb)?;
    Ok((model.multiply_adds(size, size), size))
}

pub fn run(_: &GlobalOptions, args: Args) -> Result<()> {
    let Some(model) = args.model.as_deref() else {
        return list_presets(args.json);
    };
    let source = resolve_source(model)?;
    let files = WeightFiles::open(&source.weights)?;
    let arch = parse_arch(&args.arch)?;
    let inspection = resnet_io::inspect(&files, arch.as_ref().or(source.config.as_ref()))?;
    let report = &inspection.report;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for info in files.tensors() {
        *dtypes.entry(info.dtype.to_string()).or_default() += 1;
    }
    let parameters: usize = files
        .tensors()
        .filter(|t| !t.name.contains("running_") && !resnet_io::is_ignored(&t.name))
        .map(|t| t.elem_count())
        .sum();
    let kernels = cpu_kernels(&inspection.config)?;
    // Reported where it can be counted; a file's report never fails for it.
    let (macs, size) = multiply_adds(&inspection.config).unwrap_or((0, 0));
    if args.json {
        let summary = json!({
            "multiply_adds_per_image": (size > 0).then_some(macs),
            "multiply_adds_input_size": (size > 0).then_some(size),
            "cpu_isa": kernels.isa.map(|isa| isa.name()),
            "cpu_kernels": kernels.to_string(),
            "files": source.weights.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "naming": inspection.scheme.to_string(),
            "architecture": inspection.config.describe(),
            "config": inspection.config,
            "parameters": parameters,
            "tensors": files.tensors().count(),
            "data_bytes": files.data_bytes(),
            "dtypes": dtypes,
            "ok": report.is_ok(),
            "loaded": report.loaded.len(),
            "missing": report.missing.iter().map(|(n, s)| json!({"name": n, "expected": s})).collect::<Vec<_>>(),
            "unexpected": report.unexpected,
            "mismatched": report.mismatched.iter().map(|m| json!({"name": m.name, "file_name": m.file_name, "expected": m.expected, "found": m.found})).collect::<Vec<_>>(),
            "wrong_dtype": report.wrong_dtype.iter().map(|(n, d)| json!({"name": n, "dtype": d.to_string()})).collect::<Vec<_>>(),
            "ignored": report.ignored.len(),
            "metadata": files.metadata(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    for path in &source.weights {
        println!("file:         {}", path.display());
    }
    if files.metadata().get("format").map(String::as_str) == Some("keras") {
        println!("naming:       keras (read as {} names)", inspection.scheme);
    } else {
        println!("naming:       {}", inspection.scheme);
    }
    println!("architecture: {}", inspection.config.describe());
    let config = &inspection.config;
    println!(
        "              {} blocks {:?}, widths {:?}, groups {} x {}, shortcut {}, {} input channels, {} classes",
        config.block,
        config.blocks_per_stage,
        config.stage_widths,
        config.groups,
        config.width_per_group,
        config.shortcut,
        config.in_channels,
        config.num_classes
    );
    println!("parameters:   {parameters}");
    if size > 0 {
        println!(
            "mult-adds:    {:.3} G per {size}x{size} image (convolutions and classifier)",
            macs as f64 / 1e9
        );
    }
    println!("cpu kernels:  {kernels} (f32; RESNET_CPU_ISA to choose)");
    let dtypes: Vec<String> = dtypes.iter().map(|(d, n)| format!("{d} x{n}")).collect();
    println!("dtypes:       {}", dtypes.join(", "));
    println!(
        "data:         {} bytes in {} tensors",
        files.data_bytes(),
        files.tensors().count()
    );
    print!("validation:   {report}");
    Ok(())
}

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Input checkpoint (file, directory or hub id), any naming scheme and dtype.
    input: String,
    /// Output .safetensors file (written atomically; an existing file is replaced).
    output: PathBuf,
    /// Naming of the output: torchvision (timm; timm's resnetv2 names for a pre-activation
    /// network), timm-v2, transformers or cifar.
    #[arg(long, default_value = "torchvision")]
    naming: String,
}

pub fn convert(global: &GlobalOptions, args: ConvertArgs) -> Result<()> {
    let scheme: NamingScheme = args.naming.parse().map_err(anyhow::Error::msg)?;
    // A destination that cannot be written is found before a download or a load.
    drop(resnet_io::OutputFile::create(&args.output)?);
    let source = resolve_source(&args.input)?;
    let files = WeightFiles::open(&source.weights)?;
    let dtype: DType = global.dtype;
    let replaced = args.output.is_file();
    let config = resnet_io::convert(&files, &args.output, scheme, dtype, source.config.as_ref())?;
    let scheme = scheme.for_config(&config);
    println!(
        "{} {} ({}, {scheme} naming, {})",
        if replaced { "replaced" } else { "wrote" },
        args.output.display(),
        config.describe(),
        format!("{dtype:?}").to_lowercase()
    );
    Ok(())
}

/// The CPU kernels the network runs in f32 on this machine, once folded (built on zero
/// weights: which kernel runs depends on the shapes only).
fn cpu_kernels(config: &resnet_core::ResNetConfig) -> Result<resnet_core::KernelSummary> {
    let device = candle_core::Device::Cpu;
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &device);
    let model = resnet_core::ResNet::new(config, vb)?.fold_batch_norm()?;
    Ok(model.kernel_summary())
}

/// `resnet inspect --list`: every preset with its parameter count and layout.
fn list_presets(as_json: bool) -> Result<()> {
    let mut rows = Vec::new();
    for name in resnet_core::PRESET_NAMES {
        let config = resnet_core::ResNetConfig::preset(name)
            .ok_or_else(|| anyhow::anyhow!("preset {name} missing from its own table"))?;
        let parameters: usize = resnet_core::ResNet::expected_tensors(&config)?
            .iter()
            .filter(|(n, _)| !n.contains("running_"))
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        let (macs, size) = multiply_adds(&config)?;
        rows.push((name, parameters, config, macs, size));
    }
    if as_json {
        let list: Vec<_> = rows
            .iter()
            .map(|(name, parameters, config, macs, size)| {
                json!({"name": name, "parameters": parameters, "config": config,
                       "multiply_adds_per_image": macs, "multiply_adds_input_size": size})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for (name, parameters, config, macs, size) in rows {
        let mut notes = String::new();
        if config.groups > 1 {
            notes += &format!(", {}x{}d groups", config.groups, config.width_per_group);
        }
        for (flag, note) in [
            (config.squeeze_excite, ", SE"),
            (config.preactivation, ", pre-activation"),
            (
                config.bottleneck_stride == resnet_core::BottleneckStride::Reduce1x1,
                ", v1 stride",
            ),
            (config.conv_bias, ", Keras layout"),
        ] {
            if flag {
                notes += note;
            }
        }
        println!(
            "{name:<20} {:>6.2}M {:>7.3}G@{size:<3}  {:?} {:?}, {:?} stem, shortcut {:?}{notes}",
            parameters as f64 / 1e6,
            macs as f64 / 1e9,
            config.block,
            config.blocks_per_stage,
            config.stem,
            config.shortcut,
        );
    }
    Ok(())
}
