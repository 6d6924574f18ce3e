//! Numerical parity with the reference implementations (torchvision, timm, and the
//! reference code of the pretrained CIFAR ResNets), on fixtures that
//! `fixtures/generate_parity.py` produced with the real libraries.
//!
//! Tolerance, stated up front: max |Δ| ≤ 1e-4 · max |reference| in f32; in f16 and bf16,
//! where the arithmetic itself rounds to 11 and 8 bits, 2e-2 and 6e-2.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarBuilder;
use resnet_core::{
    BlockKind, BottleneckStride, CpuIsa, CpuKernels, Isa, ResNet, ResNetConfig, ShortcutKind,
};
use resnet_tests::{
    assert_close, hashed_tensor, hashed_var_builder, parity_fixture, shared_dir, test_device,
    F32_RELATIVE_TOLERANCE,
};

fn load_fixture(name: &str) -> Result<HashMap<String, Tensor>> {
    let path = parity_fixture(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))
}

/// The narrow timm networks of the fixtures: widths 8, 16, 24, 32 after a 64-channel stem.
fn narrow(block: BlockKind, blocks_per_stage: [usize; 4], num_classes: usize) -> ResNetConfig {
    ResNetConfig {
        stage_widths: vec![8, 16, 24, 32],
        ..ResNetConfig::imagenet(block, blocks_per_stage).with_num_classes(num_classes)
    }
}

/// Builds `config` from the fixture's weights in `dtype` and compares to `expected`.
fn check_timm_case(
    name: &str,
    config: ResNetConfig,
    dtype: DType,
    tolerance: f64,
    device: &Device,
) -> Result<()> {
    let tensors = load_fixture(name)?;
    let vb = VarBuilder::from_tensors(tensors.clone(), dtype, device);
    let model = ResNet::new(&config, vb)?;
    let input = tensors["input"].to_dtype(dtype)?.to_device(device)?;
    let output = model.forward(&input)?;
    assert_close(&output, &tensors["expected"], tolerance, name)
}

fn timm_basic_blocks(device: &Device) -> Result<()> {
    let config = narrow(BlockKind::Basic, [2, 1, 1, 2], 5);
    check_timm_case(
        "timm_basic",
        config,
        DType::F32,
        F32_RELATIVE_TOLERANCE,
        device,
    )
}
test_device!(
    timm_basic_blocks,
    timm_basic_blocks_cpu,
    timm_basic_blocks_cuda,
    timm_basic_blocks_metal
);

fn timm_bottleneck_blocks(device: &Device) -> Result<()> {
    let config = narrow(BlockKind::Bottleneck, [1, 2, 1, 1], 7);
    check_timm_case(
        "timm_bottleneck",
        config,
        DType::F32,
        F32_RELATIVE_TOLERANCE,
        device,
    )
}
test_device!(
    timm_bottleneck_blocks,
    timm_bottleneck_blocks_cpu,
    timm_bottleneck_blocks_cuda,
    timm_bottleneck_blocks_metal
);

fn timm_resnext_groups(device: &Device) -> Result<()> {
    let config = narrow(BlockKind::Bottleneck, [1, 1, 2, 1], 6).with_groups(4, 16);
    check_timm_case(
        "timm_resnext",
        config,
        DType::F32,
        F32_RELATIVE_TOLERANCE,
        device,
    )
}
test_device!(
    timm_resnext_groups,
    timm_resnext_groups_cpu,
    timm_resnext_groups_cuda,
    timm_resnext_groups_metal
);

fn timm_wide_bottleneck(device: &Device) -> Result<()> {
    let config = narrow(BlockKind::Bottleneck, [1, 1, 1, 1], 4).with_groups(1, 128);
    check_timm_case(
        "timm_wide",
        config,
        DType::F32,
        F32_RELATIVE_TOLERANCE,
        device,
    )
}
test_device!(
    timm_wide_bottleneck,
    timm_wide_bottleneck_cpu,
    timm_wide_bottleneck_cuda,
    timm_wide_bottleneck_metal
);

fn timm_headless_one_channel_input(device: &Device) -> Result<()> {
    let config = narrow(BlockKind::Basic, [1, 1, 1, 1], 0).with_in_channels(1);
    check_timm_case(
        "timm_headless_gray",
        config,
        DType::F32,
        F32_RELATIVE_TOLERANCE,
        device,
    )
}
test_device!(
    timm_headless_one_channel_input,
    timm_headless_one_channel_input_cpu,
    timm_headless_one_channel_input_cuda,
    timm_headless_one_channel_input_metal
);

fn timm_half_precision(device: &Device) -> Result<()> {
    let config = narrow(BlockKind::Basic, [2, 1, 1, 2], 5);
    check_timm_case("timm_basic", config.clone(), DType::F16, 2e-2, device)?;
    check_timm_case("timm_basic", config, DType::BF16, 6e-2, device)
}
test_device!(
    timm_half_precision,
    timm_half_precision_cpu,
    timm_half_precision_cuda,
    timm_half_precision_metal
);

#[test]
fn timm_train_mode_batch_norm() -> Result<()> {
    let tensors = load_fixture("timm_train_mode")?;
    let config = narrow(BlockKind::Bottleneck, [1, 1, 1, 1], 5);
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let model = ResNet::new(&config, vb)?;
    let output = model.forward_t(&tensors["input"], true)?;
    assert_close(
        &output,
        &tensors["expected"],
        F32_RELATIVE_TOLERANCE,
        "train-mode output",
    )?;

    let mut compared = 0;
    for (name, tensor) in model.named_tensors()? {
        if let Some(expected) = tensors.get(&format!("after_train.{name}")) {
            assert_close(&tensor, expected, F32_RELATIVE_TOLERANCE, &name)?;
            compared += 1;
        }
    }
    // 4 bottleneck blocks of 3 BNs, 4 downsample BNs, the stem's: 17 BNs, 2 stats each.
    assert_eq!(compared, 34, "running statistics compared");
    Ok(())
}

/// A full-size torchvision network with the seeded weights both sides generate.
fn check_torchvision(fixture: &str, config: &ResNetConfig) -> Result<()> {
    let expected = load_fixture(fixture)?
        .remove("expected")
        .context("expected")?;
    let input = hashed_tensor("input", &[2, 3, 64, 64], &Device::Cpu)?;
    check_with_folded(
        || ResNet::new(config, hashed_var_builder(DType::F32, &Device::Cpu)),
        &input,
        &expected,
        fixture,
    )
}

/// The network as built, and folded for both CPU paths, against `expected`.
fn check_with_folded(
    build: impl Fn() -> candle_core::Result<ResNet>,
    input: &Tensor,
    expected: &Tensor,
    what: &str,
) -> Result<()> {
    let tolerance = F32_RELATIVE_TOLERANCE;
    assert_close(&build()?.forward(input)?, expected, tolerance, what)?;
    for (kernels, isa) in cpu_variants() {
        let folded = build()?.fold_batch_norm_on(kernels, isa)?;
        let what = format!(
            "{what} folded for {kernels:?} on {:?} (blocked: {})",
            isa.isa(),
            folded.is_blocked()
        );
        assert_close(&folded.forward(input)?, expected, tolerance, &what)?;
    }
    Ok(())
}

#[test]
fn torchvision_resnet18() -> Result<()> {
    check_torchvision("tv_resnet18", &ResNetConfig::resnet18())
}

#[test]
fn torchvision_resnet50() -> Result<()> {
    check_torchvision("tv_resnet50", &ResNetConfig::resnet50())
}

/// timm's ResNet-D (deep stem, average-pool shortcuts), squeeze-and-excitation
/// networks (SE-ResNeXt-26d: groups, deep stem, average-pool shortcuts and SE together)
/// and pre-activation ResNets (resnetv2_50; resnetv2_50d with the deep stem and
/// average-pool shortcuts) with seeded weights, unfolded and folded on every CPU path,
/// against timm (`generate_parity.py`).
#[test]
fn timm_resnet_d_squeeze_excitation_and_preactivation() -> Result<()> {
    for name in [
        "resnet26d",
        "resnet50d",
        "seresnet50",
        "seresnext26d_32x4d",
        "resnetv2_50",
        "resnetv2_50d",
    ] {
        let config = ResNetConfig::preset(name).context("preset")?;
        check_torchvision(&format!("timm_{name}"), &config)?;
    }
    Ok(())
}

/// Elements of the tensors of preset `name`: the learned parameters, and with
/// `running_statistics` BatchNorm's running means and variances too.
fn preset_elements(name: &str, running_statistics: bool) -> Result<usize> {
    let config = ResNetConfig::preset(name).context("preset")?;
    Ok(ResNet::expected_tensors(&config)?
        .iter()
        .filter(|(n, _)| running_statistics || !n.contains("running_"))
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum())
}

/// Every ResNet-D, SE and pre-activation preset has timm's parameter count
/// (`generate_parity.py` prints them).
#[test]
fn resnet_d_se_and_v2_parameter_counts_are_timms() -> Result<()> {
    for (name, count) in [
        ("resnetv2_50", 25_549_352),
        ("resnetv2_50d", 25_568_584),
        ("resnetv2_101", 44_541_480),
        ("resnetv2_101d", 44_560_712),
        ("resnetv2_152", 60_185_128),
        ("resnetv2_152d", 60_204_360),
        ("seresnet50", 28_088_024),
        ("seresnet152d", 66_841_080),
        ("seresnext26d_32x4d", 16_809_512),
        ("seresnext50_32x4d", 27_559_896),
        ("seresnext101_32x4d", 48_955_416),
        ("resnet26d", 16_014_408),
        ("resnet50d", 25_576_264),
        ("resnet101d", 44_568_392),
        ("resnet152d", 60_212_040),
        ("resnet200d", 64_693_064),
    ] {
        assert_eq!(preset_elements(name, false)?, count, "{name}");
    }
    Ok(())
}

/// keras.applications' ResNet50 (v1: stride on the first 1x1, biased convolutions,
/// epsilon 1.001e-5), ResNet50V2 and ResNet101V2 (pre-activation in Keras' layout: stride
/// in each stage's last block, subsampled identities, a stem pool padded with zeros after
/// a convolution with no ReLU) with seeded weights, unfolded and folded on every CPU path,
/// against Keras on the torch backend (`generate_keras.py`).
#[test]
fn keras_resnet50_resnet50v2_resnet101v2() -> Result<()> {
    for (preset, fixture) in [
        ("keras_resnet50", "keras_resnet50"),
        ("resnet50v2", "keras_resnet50v2"),
        ("resnet101v2", "keras_resnet101v2"),
    ] {
        let config = ResNetConfig::preset(preset).context("preset")?;
        check_torchvision(fixture, &config)?;
    }
    Ok(())
}

/// Every Keras preset has Keras' parameter count (`generate_keras.py` prints them):
/// `count_params()`, which counts BatchNorm's moving statistics (non-trainable weights)
/// too, so the learned parameters plus the running statistics.
#[test]
fn keras_parameter_counts_are_keras() -> Result<()> {
    for (name, count) in [
        ("keras_resnet50", 25_636_712),
        ("keras_resnet101", 44_707_176),
        ("keras_resnet152", 60_419_944),
        ("resnet50v2", 25_613_800),
        ("resnet101v2", 44_675_560),
        ("resnet152v2", 60_380_648),
    ] {
        assert_eq!(preset_elements(name, true)?, count, "{name}");
    }
    Ok(())
}

/// The paper's v1 (stride on the first 1x1 of each downsampling bottleneck), against
/// torchvision's resnet50 with its strides moved there (`generate_parity.py`).
#[test]
fn resnet50_v1_stride_on_the_first_1x1() -> Result<()> {
    let config = ResNetConfig::resnet50().with_bottleneck_stride(BottleneckStride::Reduce1x1);
    assert_eq!(config.describe(), "resnet50, v1 (stride on the first 1x1)");
    check_torchvision("tv_resnet50_v1", &config)?;
    // transformers' own ResNet-50 with `downsample_in_bottleneck=True`.
    check_torchvision("transformers_resnet50_v1", &config)?;
    // The fixture tells the two apart: v1.5 is off by far more than the tolerance.
    let expected = load_fixture("tv_resnet50_v1")?
        .remove("expected")
        .context("expected")?;
    let input = hashed_tensor("input", &[2, 3, 64, 64], &Device::Cpu)?;
    let v1_5 = ResNet::new(
        &ResNetConfig::resnet50(),
        hashed_var_builder(DType::F32, &Device::Cpu),
    )?;
    assert!(assert_close(&v1_5.forward(&input)?, &expected, 1e-2, "v1.5").is_err());
    Ok(())
}

#[test]
fn torchvision_resnext50_32x4d() -> Result<()> {
    check_torchvision("tv_resnext50_32x4d", &ResNetConfig::resnext50_32x4d())
}

#[test]
fn torchvision_wide_resnet50_2() -> Result<()> {
    check_torchvision("tv_wide_resnet50_2", &ResNetConfig::wide_resnet50_2())
}

#[test]
fn option_c_projection_on_every_block() -> Result<()> {
    let config = ResNetConfig::resnet18().with_shortcut(ShortcutKind::ProjectionAll);
    check_torchvision("tv_resnet18_option_c", &config)
}

/// The CIFAR reference names its head `linear`; resnet-core asks for torchvision's `fc`.
fn cifar_names(vb: VarBuilder<'static>) -> VarBuilder<'static> {
    vb.rename_f(|name: &str| name.replacen("fc.", "linear.", 1))
}

#[test]
fn option_a_cifar_resnet44() -> Result<()> {
    let expected = load_fixture("cifar_resnet44")?
        .remove("expected")
        .context("expected")?;
    let vb = cifar_names(hashed_var_builder(DType::F32, &Device::Cpu));
    let model = ResNet::new(&ResNetConfig::resnet44(), vb)?;
    let input = hashed_tensor("input", &[2, 3, 32, 32], &Device::Cpu)?;
    assert_close(
        &model.forward(&input)?,
        &expected,
        F32_RELATIVE_TOLERANCE,
        "resnet44",
    )
}

#[test]
fn option_a_pretrained_cifar_weights() -> Result<()> {
    let Some(shared) = shared_dir("option_a_pretrained_cifar_weights") else {
        return Ok(());
    };
    for depth in [20, 32] {
        let fixture = format!("cifar_pretrained_resnet{depth}");
        let expected = load_fixture(&fixture)?
            .remove("expected")
            .context("expected")?;
        let weights = shared.join(format!("weights/cifar10/resnet{depth}.safetensors"));
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
        let config: ResNetConfig = format!("resnet{depth}").parse()?;
        let input = hashed_tensor("input", &[2, 3, 32, 32], &Device::Cpu)?;
        check_with_folded(
            || {
                let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
                ResNet::new(&config, cifar_names(vb))
            },
            &input,
            &expected,
            &fixture,
        )?;
    }
    Ok(())
}

/// Every way a network can be folded on this machine: blocked (Winograd and direct) on
/// every instruction set this CPU has, the scalar one included, and im2col + GEMM.
fn cpu_variants() -> Vec<(CpuKernels, CpuIsa)> {
    let mut variants: Vec<(CpuKernels, CpuIsa)> = Isa::ALL
        .into_iter()
        .filter_map(|isa| CpuIsa::select(isa).ok())
        .flat_map(|isa| [(CpuKernels::Auto, isa), (CpuKernels::BlockedDirect, isa)])
        .collect();
    variants.push((CpuKernels::Gemm, CpuIsa::best()));
    variants
}

/// BatchNorm folded into the convolutions keeps parity with the references, in f32 and
/// f16 (tolerances as above), on both CPU paths: channel-blocked convolution (f32, on
/// every instruction set the CPU has) and im2col + GEMM.
fn folded_batch_norm(device: &Device) -> Result<()> {
    for (kernels, isa) in cpu_variants() {
        for (fixture, config) in [
            (
                "timm_bottleneck",
                narrow(BlockKind::Bottleneck, [1, 2, 1, 1], 7),
            ),
            (
                "timm_resnext",
                narrow(BlockKind::Bottleneck, [1, 1, 2, 1], 6).with_groups(4, 16),
            ),
        ] {
            let tensors = load_fixture(fixture)?;
            for (dtype, tolerance) in [(DType::F32, F32_RELATIVE_TOLERANCE), (DType::F16, 2e-2)] {
                let vb = VarBuilder::from_tensors(tensors.clone(), dtype, device);
                let model = ResNet::new(&config, vb)?.fold_batch_norm_on(kernels, isa)?;
                let input = tensors["input"].to_dtype(dtype)?.to_device(device)?;
                assert_close(
                    &model.forward(&input)?,
                    &tensors["expected"],
                    tolerance,
                    fixture,
                )?;
                assert!(
                    model.forward_t(&input, true).is_err(),
                    "a folded network cannot train"
                );
            }
        }
        // The full-size torchvision network, its feature maps too.
        let expected = load_fixture("tv_resnet50")?
            .remove("expected")
            .context("expected")?;
        let model = ResNet::new(
            &ResNetConfig::resnet50(),
            hashed_var_builder(DType::F32, device),
        )?;
        let input = hashed_tensor("input", &[2, 3, 64, 64], device)?;
        let maps = model.feature_maps(&input)?;
        let folded = model.fold_batch_norm_on(kernels, isa)?;
        assert_eq!(
            folded.cpu_isa(),
            (kernels != CpuKernels::Gemm && device.is_cpu()).then_some(isa.isa()),
            "blocked kernels used where they apply, on the instruction set asked for"
        );
        assert_close(
            &folded.forward(&input)?,
            &expected,
            F32_RELATIVE_TOLERANCE,
            &format!("tv_resnet50 folded, {kernels:?} on {:?}", isa.isa()),
        )?;
        for (map, folded_map) in maps.iter().zip(folded.feature_maps(&input)?) {
            assert_eq!(map.tensor.dims(), folded_map.tensor.dims(), "{}", map.name);
            let reference = map.tensor.to_device(&Device::Cpu)?;
            assert_close(
                &folded_map.tensor,
                &reference,
                F32_RELATIVE_TOLERANCE,
                &map.name,
            )?;
        }
    }
    Ok(())
}

test_device!(
    folded_batch_norm,
    folded_batch_norm_cpu,
    folded_batch_norm_cuda,
    folded_batch_norm_metal
);
