//! Optimizers against torch.optim: three training steps of a CIFAR ResNet-8 (option A
//! shortcuts) with SGD (momentum, Nesterov, dampening, weight decay, no decay on
//! BatchNorm and biases) and AdamW reproduce PyTorch's losses, weights and BatchNorm
//! running statistics within the f32 tolerance (max |Δ| ≤ 1e-4 · max |reference|).
//! Fixtures: `fixtures/optimizer/*.safetensors`, by `fixtures/generate_optimizer_steps.py`.

use anyhow::{Context, Result};
use candle_core::{Device, ModuleT, Tensor};
use candle_nn::VarMap;
use resnet_tests::{assert_close, fixtures_dir, hashed_tensor, F32_RELATIVE_TOLERANCE};
use resnet_train::{parameters, AdamW, AdamWConfig, Optimizer, Sgd, SgdConfig};

fn check_steps(
    fixture: &str,
    make: impl FnOnce(&VarMap) -> Result<Box<dyn Optimizer>>,
) -> Result<()> {
    let path = fixtures_dir().join(format!("optimizer/{fixture}.safetensors"));
    let expected = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let device = Device::Cpu;
    let (model, varmap) = resnet_tests::seeded_resnet8()?;
    let mut optimizer = make(&varmap)?;
    let mut losses = Vec::new();
    for step in 0..3 {
        let input = hashed_tensor(&format!("input{step}"), &[8, 3, 16, 16], &device)?;
        let targets = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 6, 7], &device)?;
        let loss = candle_nn::loss::cross_entropy(&model.forward_t(&input, true)?, &targets)?;
        let grads = loss.backward()?;
        optimizer.step(&grads)?;
        losses.push(loss.to_scalar::<f32>()?);
    }
    assert_close(
        &Tensor::new(losses.as_slice(), &device)?,
        &expected["loss"],
        F32_RELATIVE_TOLERANCE,
        "losses",
    )?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut compared = 0;
    for (key, reference) in &expected {
        let Some(name) = key.strip_prefix("after.") else {
            continue;
        };
        let var = data
            .get(name)
            .with_context(|| format!("no variable {name}"))?;
        assert_close(
            var.as_tensor(),
            reference,
            F32_RELATIVE_TOLERANCE,
            &format!("{fixture}: {name}"),
        )?;
        compared += 1;
    }
    assert_eq!(compared, data.len(), "{fixture}: every tensor compared");
    Ok(())
}

#[test]
fn sgd_momentum_without_decay_on_batch_norm_and_biases() -> Result<()> {
    check_steps("sgd_momentum_no_decay_on_bn", |varmap| {
        let config = SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            ..SgdConfig::default()
        };
        Ok(Box::new(Sgd::new(parameters(varmap, true), config)?))
    })
}

#[test]
fn sgd_nesterov() -> Result<()> {
    check_steps("sgd_nesterov", |varmap| {
        let config = SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
            ..SgdConfig::default()
        };
        Ok(Box::new(Sgd::new(parameters(varmap, false), config)?))
    })
}

#[test]
fn sgd_dampening() -> Result<()> {
    check_steps("sgd_dampening", |varmap| {
        let config = SgdConfig {
            lr: 0.1,
            momentum: 0.8,
            dampening: 0.3,
            weight_decay: 1e-3,
            nesterov: false,
        };
        Ok(Box::new(Sgd::new(parameters(varmap, false), config)?))
    })
}

#[test]
fn adamw() -> Result<()> {
    check_steps("adamw", |varmap| {
        let config = AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.05,
            ..AdamWConfig::default()
        };
        Ok(Box::new(AdamW::new(parameters(varmap, true), config)?))
    })
}

#[test]
fn invalid_settings_are_refused() {
    assert!(Sgd::new(
        Vec::new(),
        SgdConfig {
            lr: -1.0,
            ..SgdConfig::default()
        }
    )
    .is_err());
    assert!(Sgd::new(
        Vec::new(),
        SgdConfig {
            nesterov: true,
            dampening: 0.1,
            ..SgdConfig::default()
        }
    )
    .is_err());
    assert!(AdamW::new(
        Vec::new(),
        AdamWConfig {
            beta1: 1.0,
            ..AdamWConfig::default()
        }
    )
    .is_err());
    assert!(AdamW::new(
        Vec::new(),
        AdamWConfig {
            lr: f64::NAN,
            ..AdamWConfig::default()
        }
    )
    .is_err());
}

fn losses_and_schedules() -> Result<std::collections::HashMap<String, Tensor>> {
    let path = fixtures_dir().join("optimizer/losses_and_schedules.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))
}

#[test]
fn label_smoothing_as_pytorch() -> Result<()> {
    let expected = losses_and_schedules()?;
    let targets = Tensor::new(&[0u32, 1, 2, 3, 4, 5], &Device::Cpu)?;
    for smoothing in [0.0, 0.1, 0.3] {
        let loss = resnet_train::cross_entropy(&expected["logits"], &targets, smoothing)?;
        let reference = &expected[&format!("loss_smoothing_{smoothing:?}")];
        assert_close(
            &loss.reshape(1)?,
            reference,
            F32_RELATIVE_TOLERANCE,
            &format!("ε = {smoothing}"),
        )?;
    }
    assert!(resnet_train::cross_entropy(&expected["logits"], &targets, 1.5).is_err());
    Ok(())
}

#[test]
fn schedules_as_pytorch() -> Result<()> {
    use resnet_train::{Schedule, ScheduleKind};
    let expected = losses_and_schedules()?;
    let cases = [
        ("lr_cosine_20", ScheduleKind::Cosine),
        (
            "lr_multistep_5_12",
            ScheduleKind::Step {
                milestones: vec![5, 12],
                gamma: 0.1,
            },
        ),
    ];
    for (name, kind) in cases {
        let schedule = Schedule::new(0.1, 20, 0, kind)?;
        let reference: Vec<f64> = expected[name].to_vec1()?;
        for (t, want) in reference.iter().enumerate() {
            let got = schedule.lr(t as u64);
            assert!(
                (got - want).abs() <= 1e-12 + 1e-9 * want.abs(),
                "{name}[{t}]: {got} against {want}"
            );
        }
    }
    Ok(())
}
