//! resnet-io on real checkpoints: tiny model directories written by timm and
//! transformers themselves (fixtures/generate_checkpoints.py), a Hugging Face cache
//! layout, the pretrained CIFAR ResNets of ../shared, saving and converting.
//!
//! Tolerance as in resnet-core: max |Δ| ≤ 1e-4 · max |reference| in f32.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use resnet_core::{ResNetConfig, ShortcutKind};
use resnet_io::{
    inspect, load_file, resolve_model, resolve_model_in, save, Interpolation, NamingScheme,
    WeightFiles,
};
use resnet_tests::{
    add_to_hub_cache, assert_close, model_fixture, shared_dir, F32_RELATIVE_TOLERANCE,
};

fn expected(name: &str) -> Result<(Tensor, Tensor)> {
    let path = model_fixture(&format!("{name}.expected.safetensors"));
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    Ok((
        tensors.remove("input").context("input")?,
        tensors.remove("expected").context("expected")?,
    ))
}

/// Loads `source` with `auto` and compares its logits to the library's own (`fixture`).
fn check_source(source: &resnet_io::ModelSource, fixture: &str) -> Result<()> {
    let loaded = source.load(None, &Device::Cpu, DType::F32)?;
    let (input, reference) = expected(fixture)?;
    assert_close(
        &loaded.model.forward(&input)?,
        &reference,
        F32_RELATIVE_TOLERANCE,
        fixture,
    )
}

fn check_model_dir(model: &str, fixture: &str) -> Result<resnet_io::ModelSource> {
    let source = resolve_model(model)?;
    check_source(&source, fixture)?;
    Ok(source)
}

#[test]
fn timm_model_directory() -> Result<()> {
    let dir = model_fixture("timm_resnet18_tiny");
    let source = check_model_dir(dir.to_str().context("path")?, "timm_resnet18_tiny")?;
    assert_eq!(
        source.labels(4).context("labels")?,
        ["cat", "dog", "bird", "fish"]
    );
    let config = source.config.clone().context("config")?;
    let preprocess = source.preprocess(&config);
    assert_eq!(preprocess.interpolation, Interpolation::Bicubic);
    assert_eq!(preprocess.crop_pct, 0.95);
    assert_eq!(config.stage_widths, [8, 16, 24, 32]);
    Ok(())
}

#[test]
fn transformers_model_directories() -> Result<()> {
    for name in [
        "transformers_bottleneck_tiny",
        "transformers_basic_tiny",
        "transformers_v1_tiny",
        "transformers_first_stage_tiny",
    ] {
        let dir = model_fixture(name);
        let source = check_model_dir(dir.to_str().context("path")?, name)?;
        // `downsample_in_bottleneck: true`: the stride on the first 1x1 (the paper's v1).
        let v1 = name != "transformers_bottleneck_tiny" && name != "transformers_basic_tiny";
        let first_stage = source.config.as_ref().map(|c| c.downsample_first_stage);
        assert_eq!(
            first_stage,
            Some(name == "transformers_first_stage_tiny"),
            "{name}"
        );
        let stride = source.config.as_ref().map(|c| c.bottleneck_stride);
        assert_eq!(
            stride == Some(resnet_core::BottleneckStride::Reduce1x1),
            v1,
            "{name}"
        );
        assert_eq!(
            source.labels(3).context("labels")?,
            ["red", "green", "blue"]
        );
        let config = source.config.clone().context("config")?;
        assert_eq!(source.preprocess(&config).mean, [0.5, 0.5, 0.5]);
    }
    Ok(())
}

#[test]
fn inferred_architecture_equals_the_configured_one() -> Result<()> {
    for name in [
        "timm_resnet18_tiny",
        "transformers_bottleneck_tiny",
        "transformers_basic_tiny",
    ] {
        let source = resnet_io::read_model_dir(&model_fixture(name))?;
        let files = WeightFiles::open(&source.weights)?;
        let inferred = inspect(&files, None)?;
        assert_eq!(Some(inferred.config), source.config, "{name}");
        assert!(inferred.report.is_ok(), "{name}: {}", inferred.report);
        assert!(
            !inferred.report.ignored.is_empty(),
            "{name}: num_batches_tracked ignored"
        );
    }
    Ok(())
}

#[test]
fn hub_ids_resolve_through_the_local_cache() -> Result<()> {
    let cache = tempfile::tempdir()?;
    for (id, fixture) in [
        ("timm/resnet18_tiny.test", "timm_resnet18_tiny"),
        ("tiny-org/resnet-tiny", "transformers_bottleneck_tiny"),
    ] {
        add_to_hub_cache(cache.path(), id, &model_fixture(fixture))?;
        check_source(&resolve_model_in(id, cache.path())?, fixture)?;
    }
    let err = resolve_model_in("nobody/nothing", cache.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nobody/nothing") && err.contains("cache"),
        "{err}"
    );
    Ok(())
}

#[test]
fn pretrained_cifar_weights_load_through_auto() -> Result<()> {
    let Some(shared) = shared_dir("pretrained_cifar_weights_load_through_auto") else {
        return Ok(());
    };
    for depth in [20, 32] {
        let path = shared.join(format!("weights/cifar10/resnet{depth}.safetensors"));
        let loaded = load_file(&path, None, &Device::Cpu, DType::F32)?;
        assert_eq!(loaded.scheme, NamingScheme::Cifar);
        assert_eq!(
            loaded.config,
            format!("resnet{depth}").parse::<ResNetConfig>()?
        );
        assert_eq!(loaded.config.shortcut, ShortcutKind::ZeroPad);
    }
    Ok(())
}

#[test]
fn save_and_load_back_is_exact_in_every_scheme_and_dtype() -> Result<()> {
    let source = resnet_io::read_model_dir(&model_fixture("transformers_bottleneck_tiny"))?;
    let original = source.load(None, &Device::Cpu, DType::F32)?;
    let dir = tempfile::tempdir()?;
    for scheme in [NamingScheme::Torchvision, NamingScheme::Transformers] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let path = dir.path().join(format!("{scheme}-{dtype:?}.safetensors"));
            save(&original.model, &path, scheme, dtype)?;
            let back = load_file(&path, None, &Device::Cpu, dtype)?;
            assert_eq!(back.scheme, scheme);
            assert_eq!(back.config, original.config);
            let saved = original.model.named_tensors()?;
            let loaded = back.model.named_tensors()?;
            assert_eq!(saved.len(), loaded.len());
            for ((name, a), (_, b)) in saved.iter().zip(&loaded) {
                let a = a
                    .to_dtype(dtype)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(a, b, "{scheme} {dtype:?} {name}");
            }
        }
    }
    Ok(())
}

#[test]
fn a_checkpoint_for_another_architecture_gets_a_full_report() -> Result<()> {
    let source = resnet_io::read_model_dir(&model_fixture("timm_resnet18_tiny"))?;
    let files = WeightFiles::open(&source.weights)?;
    let resnet34 = ResNetConfig::resnet34().with_num_classes(4);
    let inspection = inspect(&files, Some(&resnet34))?;
    let report = &inspection.report;
    assert!(!report.is_ok());
    // resnet34 has 3+4+6+3 blocks where the file has 2 per stage, and wider stages.
    assert!(
        report
            .missing
            .iter()
            .any(|(n, _)| n == "layer3.5.conv1.weight"),
        "{report}"
    );
    assert!(report
        .mismatched
        .iter()
        .any(|m| m.name == "layer1.0.conv1.weight"
            && m.expected == [64, 64, 3, 3]
            && m.found == [8, 64, 3, 3]));
    let err = resnet_io::load_resnet(&files, Some(&resnet34), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("resnet34, 4 classes"),
        "{err}"
    );
    assert!(
        err.contains("layer1.0.conv1.weight: expected [64, 64, 3, 3], found [8, 64, 3, 3]"),
        "{err}"
    );
    Ok(())
}

/// A timm ResNet-D or SE checkpoint (deep stem `conv1.0`..`conv1.6`, average-pool
/// shortcuts `downsample.1`/`.2`, `se.fc1`/`.fc2`) is recognised by its tensors alone:
/// `--arch auto` infers the preset, deep and tiered stems told apart.
#[test]
fn resnet_d_checkpoints_are_inferred() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tiered = ResNetConfig {
        stem: resnet_core::StemKind::DeepTiered,
        ..ResNetConfig::preset("resnet26d").context("preset")?
    };
    for config in [
        ResNetConfig::preset("resnet26d").context("preset")?,
        ResNetConfig::preset("resnet50d").context("preset")?,
        ResNetConfig::preset("seresnet50").context("preset")?,
        ResNetConfig::preset("seresnext26d_32x4d").context("preset")?,
        tiered,
    ] {
        let model = resnet_core::ResNet::new(
            &config,
            resnet_tests::hashed_var_builder(DType::F32, &Device::Cpu),
        )?;
        let tensors: std::collections::HashMap<String, Tensor> =
            model.named_tensors()?.into_iter().collect();
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path)?;
        let files = WeightFiles::open(&[path])?;
        let inferred = inspect(&files, None)?;
        assert_eq!(inferred.config, config, "{}", config.describe());
        assert!(inferred.report.is_ok(), "{}", inferred.report);
    }
    Ok(())
}

/// A timm resnetv2 checkpoint under timm's names (`stem.conv`, `stages.S.blocks.B`,
/// `norm`, the classifier `head.fc` as a 1x1 convolution) loads with `--arch auto`, and
/// as a timm model directory:
/// naming scheme, pre-activation, deep stem and average-pool shortcuts inferred, and the
/// output equals timm's (the parity fixture of the same seeded weights).
#[test]
fn timm_v2_checkpoints_load_by_inference() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let input = resnet_tests::hashed_tensor("input", &[2, 3, 64, 64], &Device::Cpu)?;
    for name in ["resnetv2_50", "resnetv2_50d"] {
        let config = ResNetConfig::preset(name).context("preset")?;
        let model = resnet_core::ResNet::new(
            &config,
            resnet_tests::hashed_var_builder(DType::F32, &Device::Cpu),
        )?;
        let scheme = NamingScheme::TimmV2;
        let mut tensors = std::collections::HashMap::new();
        for (ours, tensor) in model.named_tensors()? {
            let timm = scheme.from_torchvision(&ours).context("timm name")?;
            let tensor = tensor.reshape(scheme.file_shape(&ours, tensor.dims()))?;
            tensors.insert(timm, tensor);
        }
        assert_eq!(tensors["head.fc.weight"].dims(), [1000, 2048, 1, 1]);
        let path = dir.path().join(format!("{name}.safetensors"));
        candle_core::safetensors::save(&tensors, &path)?;
        let loaded = load_file(&path, None, &Device::Cpu, DType::F32)?;
        assert_eq!(loaded.scheme, scheme);
        assert_eq!(loaded.config, config, "{}", loaded.config.describe());
        assert_eq!(loaded.config.describe(), name);
        let expected = candle_core::safetensors::load(
            resnet_tests::parity_fixture(&format!("timm_{name}")),
            &Device::Cpu,
        )?;
        resnet_tests::assert_close(
            &loaded.model.forward(&input)?,
            &expected["expected"],
            resnet_tests::F32_RELATIVE_TOLERANCE,
            name,
        )?;
        // As a timm model directory: config.json names the architecture.
        let model_dir = dir.path().join(format!("{name}-dir"));
        std::fs::create_dir(&model_dir)?;
        std::fs::copy(&path, model_dir.join("model.safetensors"))?;
        std::fs::write(
            model_dir.join("config.json"),
            format!(r#"{{"architecture": "{name}.a1h_in1k", "num_classes": 1000}}"#),
        )?;
        let source = resnet_io::read_model_dir(&model_dir)?;
        let from_dir = source.load(None, &Device::Cpu, DType::F32)?;
        assert_eq!(from_dir.config, config);
        resnet_tests::assert_close(
            &from_dir.model.forward(&input)?,
            &expected["expected"],
            resnet_tests::F32_RELATIVE_TOLERANCE,
            &format!("{name} model directory"),
        )?;
        // And back: saved under timm's names, the classifier 4-D again.
        let again = dir.path().join(format!("{name}-saved.safetensors"));
        save(&loaded.model, &again, scheme, DType::F32)?;
        let files = WeightFiles::open(&[&again])?;
        assert_eq!(
            files.info("head.fc.weight").context("head")?.shape,
            [1000, 2048, 1, 1]
        );
    }
    Ok(())
}
