//! The model's shapes, parameter counts, feature maps and its errors on bad input.

use anyhow::Result;
use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::VarBuilder;
use resnet_core::{ResNet, ResNetConfig, ShortcutKind, PRESET_NAMES};

fn zeros_model(config: &ResNetConfig) -> Result<ResNet> {
    Ok(ResNet::new(
        config,
        VarBuilder::zeros(DType::F32, &Device::Cpu),
    )?)
}

#[test]
fn parameter_counts_equal_torchvision() -> Result<()> {
    // sum(p.numel() for p in torchvision.models.<name>().parameters())
    for (name, expected) in [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
        ("wide_resnet50_2", 68_883_240),
        ("wide_resnet101_2", 126_886_696),
        ("resnext50_32x4d", 25_028_904),
        ("resnext101_32x8d", 88_791_336),
        ("resnext101_64x4d", 83_455_272),
    ] {
        let model = zeros_model(&name.parse()?)?;
        assert_eq!(model.num_parameters(), expected, "{name}");
    }
    Ok(())
}

/// Multiply-adds per 224x224 image against the "GFLOPS" torchvision's model docs list
/// (multiply-adds, in billions, two decimals: within 1%), and the CIFAR ResNet-20's
/// 40,551,040 counted by hand (3x3 stem 442,368; 18 3x3 layers; the 64x10 classifier);
/// folding the network for the blocked kernels leaves the count as it is.
#[test]
fn multiply_adds_match_torchvisions_counts() -> Result<()> {
    for (name, giga) in [
        ("resnet18", 1.81),
        ("resnet34", 3.66),
        ("resnet50", 4.09),
        ("resnext50_32x4d", 4.23),
        ("wide_resnet50_2", 11.40),
    ] {
        let model = zeros_model(&name.parse()?)?;
        let counted = model.multiply_adds(224, 224) as f64 / 1e9;
        assert!(
            (counted - giga).abs() <= 0.01 * giga,
            "{name}: {counted:.3} G multiply-adds, torchvision says {giga}"
        );
    }
    let resnet20 = zeros_model(&ResNetConfig::resnet20())?;
    assert_eq!(resnet20.multiply_adds(32, 32), 40_551_040);
    let resnet50 = zeros_model(&ResNetConfig::resnet50())?;
    let unfolded = resnet50.multiply_adds(224, 224);
    assert_eq!(
        resnet50.fold_batch_norm()?.multiply_adds(224, 224),
        unfolded
    );
    Ok(())
}

#[test]
fn cifar_parameter_counts_match_the_paper() -> Result<()> {
    // Paper Table 6 (millions, to the digits it prints): within half its last digit.
    for (name, millions, last_digit) in [
        ("resnet20", 0.27, 0.01),
        ("resnet32", 0.46, 0.01),
        ("resnet44", 0.66, 0.01),
        ("resnet56", 0.85, 0.01),
        ("resnet110", 1.7, 0.1),
        ("resnet1202", 19.4, 0.1),
    ] {
        let count = zeros_model(&name.parse()?)?.num_parameters() as f64 / 1e6;
        assert!(
            (count - millions).abs() <= last_digit / 2.0,
            "{name}: {count}M"
        );
    }
    // Option A has no shortcut parameters: ResNet-20 is exactly 269,722 (the count of
    // the reference code in fixtures/generate_parity.py).
    assert_eq!(
        zeros_model(&ResNetConfig::resnet20())?.num_parameters(),
        269_722
    );
    Ok(())
}

#[test]
fn article_resnet101_batch_of_four() -> Result<()> {
    let model = zeros_model(&ResNetConfig::resnet101())?;
    let input = Tensor::randn(0f32, 1.0, (4, 3, 224, 224), &Device::Cpu)?;
    assert_eq!(model.forward(&input)?.dims(), &[4, 1000]);
    Ok(())
}

#[test]
fn every_preset_builds_and_runs() -> Result<()> {
    for name in PRESET_NAMES {
        if *name == "resnet1202" {
            continue; // 19M parameters at 32x32: covered by the parameter count
        }
        let config: ResNetConfig = name.parse()?;
        let model = zeros_model(&config)?;
        let size = config.output_stride();
        let input = Tensor::zeros((1, 3, size, size), DType::F32, &Device::Cpu)?;
        let output = model.inference().forward(&input)?;
        assert_eq!(output.dims(), &[1, config.num_classes], "{name}");
    }
    Ok(())
}

#[test]
fn feature_maps_have_the_announced_strides_and_channels() -> Result<()> {
    let model = zeros_model(&ResNetConfig::resnet50())?;
    let input = Tensor::zeros((2, 3, 96, 64), DType::F32, &Device::Cpu)?;
    let maps = model.feature_maps(&input)?;
    let shapes: Vec<(String, usize, Vec<usize>)> = maps
        .iter()
        .map(|m| (m.name.clone(), m.stride, m.tensor.dims().to_vec()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("stem".into(), 2, vec![2, 64, 48, 32]),
            ("layer1".into(), 4, vec![2, 256, 24, 16]),
            ("layer2".into(), 8, vec![2, 512, 12, 8]),
            ("layer3".into(), 16, vec![2, 1024, 6, 4]),
            ("layer4".into(), 32, vec![2, 2048, 3, 2]),
        ]
    );
    let info = model.feature_info();
    for (map, info) in maps.iter().zip(&info) {
        assert_eq!(map.tensor.dim(1)?, info.channels);
    }
    let features = model.forward_features(&input)?;
    assert_eq!(features.dims(), &[2, 2048, 3, 2]);
    assert_eq!(model.forward_head(&features, true)?.dims(), &[2, 2048]);
    assert_eq!(model.forward_head(&features, false)?.dims(), &[2, 1000]);
    Ok(())
}

#[test]
fn headless_network_outputs_pooled_features() -> Result<()> {
    let model = zeros_model(&ResNetConfig::resnet18().with_num_classes(0))?;
    let input = Tensor::zeros((3, 3, 64, 64), DType::F32, &Device::Cpu)?;
    assert_eq!(model.forward(&input)?.dims(), &[3, 512]);
    assert!(model.head().is_none());
    Ok(())
}

#[test]
fn bad_input_is_an_error_that_says_what_was_expected() -> Result<()> {
    let model = zeros_model(&ResNetConfig::resnet18())?;
    let cpu = Device::Cpu;
    let cases = [
        (Tensor::zeros((3, 64, 64), DType::F32, &cpu)?, "4-D batch"),
        (
            Tensor::zeros((1, 1, 64, 64), DType::F32, &cpu)?,
            "3 channels, found 1",
        ),
        (
            Tensor::zeros((1, 3, 16, 64), DType::F32, &cpu)?,
            "16x64 is too small",
        ),
        (
            Tensor::zeros((0, 3, 64, 64), DType::F32, &cpu)?,
            "batch is empty",
        ),
        (
            Tensor::zeros((1, 3, 64, 64), DType::F64, &cpu)?,
            "dtype F64",
        ),
    ];
    for (input, expected) in cases {
        let err = model.forward(&input).unwrap_err().to_string();
        assert!(err.contains(expected), "expected '{expected}' in '{err}'");
    }
    Ok(())
}

#[test]
fn bad_config_is_an_error_not_a_panic() {
    let config = ResNetConfig {
        blocks_per_stage: vec![2, 0],
        stage_widths: vec![64, 128],
        ..ResNetConfig::resnet18()
    };
    let err = ResNet::new(&config, VarBuilder::zeros(DType::F32, &Device::Cpu)).unwrap_err();
    assert!(err.to_string().contains("zero blocks"), "{err}");
}

#[test]
fn train_mode_with_a_single_value_per_channel_is_an_error() -> Result<()> {
    let model = zeros_model(&ResNetConfig::resnet20())?;
    // layer3 of a 4x4 input is 1x1: one value per channel with a batch of one.
    let input = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu)?;
    let err = model.forward_t(&input, true).unwrap_err().to_string();
    assert!(err.contains("more than one value per channel"), "{err}");
    Ok(())
}

#[test]
fn shortcut_options_differ_only_in_the_shortcut_tensors() -> Result<()> {
    let names = |shortcut| -> Result<Vec<String>> {
        let config = ResNetConfig::resnet20().with_shortcut(shortcut);
        let model = zeros_model(&config)?;
        Ok(model
            .named_tensors()?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.contains("downsample"))
            .collect())
    };
    assert!(names(ShortcutKind::ZeroPad)?.is_empty());
    // Option B: the two blocks that change shape (layer2.0, layer3.0), 5 tensors each.
    assert_eq!(names(ShortcutKind::Projection)?.len(), 10);
    // Option C: all nine blocks.
    assert_eq!(names(ShortcutKind::ProjectionAll)?.len(), 45);
    Ok(())
}

#[test]
fn half_precisions_run_on_cpu() -> Result<()> {
    for dtype in [DType::F16, DType::BF16] {
        let model = ResNet::new(
            &ResNetConfig::resnet20(),
            VarBuilder::zeros(dtype, &Device::Cpu),
        )?;
        let input = Tensor::zeros((2, 3, 32, 32), dtype, &Device::Cpu)?;
        let output = model.forward(&input)?;
        assert_eq!((output.dims(), output.dtype()), (&[2usize, 10][..], dtype));
    }
    Ok(())
}

#[test]
fn expected_tensors_lists_every_checkpoint_tensor() -> Result<()> {
    let expected = ResNet::expected_tensors(&ResNetConfig::resnet50())?;
    let model = zeros_model(&ResNetConfig::resnet50())?;
    let built: Vec<(String, Vec<usize>)> = model
        .named_tensors()?
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    assert_eq!(expected, built);
    // torchvision's resnet50 state_dict has 267 tensors besides num_batches_tracked.
    assert_eq!(expected.len(), 267);
    assert!(expected.contains(&("layer1.0.downsample.0.weight".into(), vec![256, 64, 1, 1])));
    Ok(())
}

/// A batch larger than one pass of the blocked CPU path takes (ResNet-18 at 224x224 runs
/// image by image) gives what the GEMM path gives for the whole batch at once, and what
/// each image gives alone. Hashed weights; tolerance as the parity tests (1e-4 relative).
#[test]
fn batched_inference_matches_across_cpu_paths() -> Result<()> {
    use resnet_core::CpuKernels;
    use resnet_tests::{assert_close, hashed_tensor, hashed_var_builder, F32_RELATIVE_TOLERANCE};
    let build = |kernels| -> Result<ResNet> {
        let vb = hashed_var_builder(DType::F32, &Device::Cpu);
        Ok(ResNet::new(&ResNetConfig::resnet18(), vb)?.fold_batch_norm_with(kernels)?)
    };
    let input = hashed_tensor("input", &[3, 3, 224, 224], &Device::Cpu)?;
    let auto = build(CpuKernels::Auto)?;
    let batched = auto.forward(&input)?;
    let reference = build(CpuKernels::Gemm)?.forward(&input)?;
    assert_close(&batched, &reference, F32_RELATIVE_TOLERANCE, "batch of 3")?;
    for image in 0..3 {
        let alone = auto.forward(&input.narrow(0, image, 1)?)?;
        assert_close(
            &alone,
            &batched.narrow(0, image, 1)?,
            F32_RELATIVE_TOLERANCE,
            "image alone",
        )?;
    }
    // Odd sizes: partial Winograd tiles and pixel tiles, down to 1x1 maps.
    for (height, width) in [(97, 61), (33, 35), (32, 32)] {
        let input = hashed_tensor("odd", &[2, 3, height, width], &Device::Cpu)?;
        assert_close(
            &auto.forward(&input)?,
            &build(CpuKernels::Gemm)?.forward(&input)?,
            F32_RELATIVE_TOLERANCE,
            &format!("{height}x{width}"),
        )?;
    }
    Ok(())
}

/// ResNeXt's grouped convolutions run on the blocked kernels (groups of 4, 8, 16 and 32
/// channels in ResNeXt-50 32x4d's four stages), on every instruction set this CPU has,
/// giving what the im2col + GEMM path gives. Hashed weights; 1e-4 relative.
#[test]
fn resnext_runs_blocked_and_matches_the_gemm_path() -> Result<()> {
    use resnet_core::{CpuIsa, CpuKernels, Isa};
    use resnet_tests::{assert_close, hashed_tensor, hashed_var_builder, F32_RELATIVE_TOLERANCE};
    let config = ResNetConfig::resnext50_32x4d();
    let build = |kernels, isa| -> Result<ResNet> {
        let vb = hashed_var_builder(DType::F32, &Device::Cpu);
        Ok(ResNet::new(&config, vb)?.fold_batch_norm_on(kernels, isa)?)
    };
    let input = hashed_tensor("input", &[2, 3, 64, 64], &Device::Cpu)?;
    let reference = build(CpuKernels::Gemm, CpuIsa::best())?.forward(&input)?;
    for isa in Isa::ALL
        .into_iter()
        .filter_map(|isa| CpuIsa::select(isa).ok())
    {
        let blocked = build(CpuKernels::Auto, isa)?;
        assert_eq!(blocked.cpu_isa(), Some(isa.isa()));
        let kernels = blocked.kernel_summary();
        assert_eq!((kernels.gemm, kernels.direct), (0, 53), "{kernels}");
        let what = format!("resnext50_32x4d on {isa:?}");
        assert_close(
            &blocked.forward(&input)?,
            &reference,
            F32_RELATIVE_TOLERANCE,
            &what,
        )?;
    }
    Ok(())
}

/// ResNet-D and squeeze-and-excitation train: after one train-mode forward and backward
/// of SE-ResNeXt-26d (deep stem, average-pool shortcuts, groups, SE gates) every
/// parameter has a finite gradient, and the new ones are not all zero.
#[test]
fn resnet_d_and_se_networks_backpropagate() -> Result<()> {
    use candle_core::ModuleT;
    let device = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let config = ResNetConfig::preset("seresnext26d_32x4d")
        .ok_or_else(|| anyhow::anyhow!("preset"))?
        .with_num_classes(4);
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = ResNet::new(&config, vb)?;
    let images = Tensor::randn(0f32, 1.0, (2, 3, 65, 63), &device)?;
    let labels = Tensor::new(&[1u32, 3], &device)?;
    let loss = candle_nn::loss::cross_entropy(&model.forward_t(&images, true)?, &labels)?;
    let grads = loss.backward()?;
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    for (name, var) in vars.iter() {
        if name.contains("running_") {
            continue;
        }
        let grad = grads
            .get(var.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("{name}: no gradient"))?;
        let total = grad.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(total.is_finite(), "{name}: {total}");
        if name.contains("se.fc") || name.starts_with("conv1.0") || name.contains("downsample.1") {
            assert!(total > 0.0, "{name}: zero gradient");
        }
    }
    Ok(())
}
