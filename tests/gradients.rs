//! Backpropagation through every kind of ResNet, against PyTorch: after one train-mode
//! forward and backward of a cross-entropy loss, every parameter's gradient equals
//! PyTorch's within the project's f32 tolerance (max |Δ| ≤ 1e-4 · max |reference|).
//! Fixtures: `fixtures/gradients/*.safetensors`, made by `fixtures/generate_gradients.py`
//! (torch 2.15, timm 1.0.31) with the seeded weights `hashed_var_builder` reproduces.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use resnet_core::{BlockKind, ResNet, ResNetConfig};
use resnet_tests::{
    assert_close, fixtures_dir, hashed_tensor, hashed_var_builder, test_device,
    F32_RELATIVE_TOLERANCE,
};

fn narrow(block: BlockKind, num_classes: usize) -> ResNetConfig {
    ResNetConfig {
        stage_widths: vec![8, 16, 24, 32],
        ..ResNetConfig::imagenet(block, [1, 1, 1, 1]).with_num_classes(num_classes)
    }
}

/// One train-mode step's gradients of `config` (seeded weights) against the fixture.
fn check_gradients(
    fixture: &str,
    config: &ResNetConfig,
    input_shape: &[usize],
    cifar_head: bool,
    device: &Device,
) -> Result<()> {
    let path = fixtures_dir().join(format!("gradients/{fixture}.safetensors"));
    let expected = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    // The seeded values (Idelbayev's CIFAR head is hashed under its own name, `linear`).
    let seeded = hashed_var_builder(DType::F32, device);
    let seeded = if cifar_head {
        seeded.rename_f(|name: &str| name.replacen("fc.", "linear.", 1))
    } else {
        seeded
    };
    // Every tensor a variable (resnet_train::trainable); the parameters are those the
    // optimizer would update.
    let (model, varmap) = resnet_train::trainable(&ResNet::new(config, seeded)?)?;
    let variables: HashMap<String, Var> = resnet_train::parameters(&varmap, false)
        .into_iter()
        .map(|p| (p.name, p.var))
        .collect();
    let input = hashed_tensor("input", input_shape, device)?;
    let targets: Vec<u32> = (0..input_shape[0] as u32)
        .map(|i| i % config.num_classes as u32)
        .collect();
    let targets = Tensor::new(targets.as_slice(), device)?;
    let logits = model.forward_t(&input, true)?;
    assert_close(
        &logits,
        &expected["logits"],
        F32_RELATIVE_TOLERANCE,
        "logits",
    )?;
    let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
    assert_close(
        &loss.reshape(1)?,
        &expected["loss"],
        F32_RELATIVE_TOLERANCE,
        "loss",
    )?;
    let gradients = loss.backward()?;
    let mut compared = 0;
    for (name, var) in &variables {
        let reference = expected
            .get(&format!("grad.{name}"))
            .with_context(|| format!("no PyTorch gradient for {name}"))?;
        let gradient = gradients
            .get(var.as_tensor())
            .with_context(|| format!("{fixture}: no gradient reached {name}"))?;
        assert_close(
            gradient,
            reference,
            F32_RELATIVE_TOLERANCE,
            &format!("{fixture}: ∂loss/∂{name}"),
        )?;
        compared += 1;
    }
    let in_fixture = expected.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(compared, in_fixture, "{fixture}: every parameter compared");
    Ok(())
}

fn basic_blocks(device: &Device) -> Result<()> {
    check_gradients(
        "basic",
        &narrow(BlockKind::Basic, 5),
        &[4, 3, 64, 64],
        false,
        device,
    )
}
test_device!(
    basic_blocks,
    basic_blocks_cpu,
    basic_blocks_cuda,
    basic_blocks_metal
);

fn bottleneck_with_the_imagenet_stem(device: &Device) -> Result<()> {
    let config = narrow(BlockKind::Bottleneck, 5);
    check_gradients(
        "bottleneck_imagenet_stem",
        &config,
        &[4, 3, 64, 64],
        false,
        device,
    )
}
test_device!(
    bottleneck_with_the_imagenet_stem,
    bottleneck_with_the_imagenet_stem_cpu,
    bottleneck_with_the_imagenet_stem_cuda,
    bottleneck_with_the_imagenet_stem_metal
);

fn resnext_groups(device: &Device) -> Result<()> {
    let config = ResNetConfig {
        groups: 4,
        width_per_group: 16,
        ..narrow(BlockKind::Bottleneck, 6)
    };
    check_gradients("resnext", &config, &[4, 3, 64, 64], false, device)
}
test_device!(
    resnext_groups,
    resnext_groups_cpu,
    resnext_groups_cuda,
    resnext_groups_metal
);

fn cifar_option_a_shortcuts(device: &Device) -> Result<()> {
    check_gradients(
        "cifar_option_a",
        &ResNetConfig::cifar(1),
        &[4, 3, 16, 16],
        true,
        device,
    )
}
test_device!(
    cifar_option_a_shortcuts,
    cifar_option_a_shortcuts_cpu,
    cifar_option_a_shortcuts_cuda,
    cifar_option_a_shortcuts_metal
);
