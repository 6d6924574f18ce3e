//! The training recipe's pieces against PyTorch and timm (fixtures `fixtures/recipe/`,
//! by `fixtures/generate_recipe.py`): gradient accumulation, clipping by global norm,
//! timm's ModelEmaV3, and timm's Mixup/CutMix images, targets and soft-target loss.
//! Tolerances, stated before the tests first ran: network tensors within the f32
//! tolerance of the other parity tests (max |Δ| ≤ 1e-4 · max |reference|); mixed images
//! and targets within 1e-6 absolute (the same f32 operations); norms and losses 1e-5
//! relative.

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use resnet_core::ResNet;
use resnet_tests::{assert_close, fixtures_dir, hashed_tensor, F32_RELATIVE_TOLERANCE};
use resnet_train::{
    clip_grad_norm, cross_entropy, cutmix_params, parameters, soft_cross_entropy, Ema,
    GradAccumulator, MixParams, Mixup, MixupConfig, Optimizer, Sgd, SgdConfig,
};

fn fixture(name: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixtures_dir().join(format!("recipe/{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))
}

/// Idelbayev's ResNet-8 with the generator's seeded weights.
fn seeded_model() -> Result<(ResNet, VarMap)> {
    resnet_tests::seeded_resnet8()
}

fn batch(k: u32) -> Result<(Tensor, Tensor)> {
    let images = hashed_tensor(&format!("recipe_input{k}"), &[4, 3, 16, 16], &Device::Cpu)?;
    let labels = Tensor::new(
        &[k % 10, (k + 1) % 10, (k + 2) % 10, (k + 3) % 10],
        &Device::Cpu,
    )?;
    Ok((images, labels))
}

fn loss_of(model: &ResNet, k: u32) -> Result<Tensor> {
    let (images, labels) = batch(k)?;
    Ok(cross_entropy(
        &model.forward_t(&images, true)?,
        &labels,
        0.0,
    )?)
}

/// Every `PREFIX.NAME` of the fixture against the tensors of `tensors`.
fn compare(
    expected: &HashMap<String, Tensor>,
    prefix: &str,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let mut compared = 0;
    for (name, tensor) in tensors {
        let reference = expected
            .get(&format!("{prefix}.{name}"))
            .with_context(|| format!("no {prefix}.{name} in the fixture"))?;
        assert_close(
            tensor,
            reference,
            F32_RELATIVE_TOLERANCE,
            &format!("{prefix}.{name}"),
        )?;
        compared += 1;
    }
    let in_fixture = expected
        .keys()
        .filter(|k| k.starts_with(&format!("{prefix}.")))
        .count();
    ensure!(
        compared == in_fixture,
        "{prefix}: compared {compared} of {in_fixture}"
    );
    Ok(())
}

fn close(actual: f64, expected: f64, relative: f64, what: &str) -> Result<()> {
    ensure!(
        (actual - expected).abs() <= relative * expected.abs(),
        "{what}: {actual}, expected {expected}"
    );
    Ok(())
}

#[test]
fn accumulation_equals_pytorch_summing_into_grad() -> Result<()> {
    let expected = fixture("accumulation")?;
    let (model, varmap) = seeded_model()?;
    let config = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 5e-4,
        ..SgdConfig::default()
    };
    let mut sgd = Sgd::new(parameters(&varmap, false), config)?;
    let mut losses = Vec::new();
    // 5 micro-batches, 3 per step: the short last group divides by 2.
    for group in [vec![0, 1, 2], vec![3, 4]] {
        let mut accumulator = GradAccumulator::default();
        for &k in &group {
            let loss = loss_of(&model, k)?;
            losses.push(loss.to_scalar::<f32>()?);
            accumulator.add((loss / group.len() as f64)?.backward()?)?;
        }
        assert_eq!(accumulator.passes(), group.len());
        let grads = accumulator.take().context("gradients")?;
        sgd.step(&grads)?;
    }
    let reference: Vec<f32> = expected["loss"].to_vec1()?;
    for (got, want) in losses.iter().zip(&reference) {
        close(f64::from(*got), f64::from(*want), 1e-5, "micro-batch loss")?;
    }
    compare(&expected, "after", &model.named_tensors()?)
}

#[test]
fn clipping_equals_clip_grad_norm() -> Result<()> {
    let expected = fixture("clipping")?;
    let (model, varmap) = seeded_model()?;
    let params = parameters(&varmap, false);
    let mut grads = loss_of(&model, 0)?.backward()?;

    // A large bound scales by 1 (nothing changes) but reports the norm (on a second
    // copy: a train-mode pass moves the BatchNorm statistics).
    let (other, other_varmap) = seeded_model()?;
    let mut untouched = loss_of(&other, 0)?.backward()?;
    let norm = clip_grad_norm(&mut untouched, &parameters(&other_varmap, false), 1e6)?;
    let large: f32 = expected["total_norm_large"].to_vec1()?[0];
    close(norm, f64::from(large), 1e-5, "norm with no clipping")?;

    let norm = clip_grad_norm(&mut grads, &params, 0.5)?;
    let total: f32 = expected["total_norm"].to_vec1()?[0];
    close(norm, f64::from(total), 1e-5, "total norm")?;
    let config = SgdConfig {
        lr: 0.1,
        momentum: 0.0,
        weight_decay: 0.0,
        ..SgdConfig::default()
    };
    Sgd::new(params.clone(), config)?.step(&grads)?;
    compare(&expected, "after", &model.named_tensors()?)?;

    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(clip_grad_norm(&mut grads, &params, bad).is_err(), "{bad}");
    }
    Ok(())
}

#[test]
fn ema_equals_timm_model_ema_v3() -> Result<()> {
    let expected = fixture("ema")?;
    let (model, varmap) = seeded_model()?;
    let mut ema = Ema::new(&model, 0.8)?;
    let config = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
        ..SgdConfig::default()
    };
    let mut sgd = Sgd::new(parameters(&varmap, false), config)?;
    for k in 0..3 {
        sgd.step(&loss_of(&model, k)?.backward()?)?;
        ema.update(&model, u64::from(k) + 1)?;
    }
    compare(&expected, "after", &model.named_tensors()?)?;
    compare(&expected, "ema", &ema.model().named_tensors()?)?;
    assert_eq!(ema.decay_at(1), 0.0, "the first update copies");
    for bad in [1.0, -0.1, f64::NAN] {
        assert!(Ema::new(&model, bad).is_err(), "{bad}");
    }
    Ok(())
}

fn assert_within(actual: &Tensor, expected: &Tensor, what: &str) -> Result<()> {
    ensure!(
        actual.dims() == expected.dims(),
        "{what}: shape {:?}, expected {:?}",
        actual.dims(),
        expected.dims()
    );
    let worst = (actual.to_dtype(DType::F32)? - expected.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    ensure!(worst <= 1e-6, "{what}: max |Δ| {worst}");
    Ok(())
}

#[test]
fn mixup_and_cutmix_equal_timm() -> Result<()> {
    let expected = fixture("mixup")?;
    let images = &expected["images"];
    let labels = expected["labels"].to_dtype(DType::U32)?;
    let config = MixupConfig {
        mixup_alpha: 1.0,
        cutmix_alpha: 1.0,
        label_smoothing: 0.1,
        ..MixupConfig::default()
    };
    let mixup = Mixup::new(config, 5)?;

    let params = MixParams {
        lam: 0.7,
        cutmix_box: None,
    };
    let (mixed, targets) = mixup.apply(images, &labels, &params)?;
    assert_within(&mixed, &expected["mixup_images"], "mixup images")?;
    assert_within(&targets, &expected["mixup_targets"], "mixup targets")?;

    let centre: Vec<i64> = expected["cutmix_centre"].to_vec1()?;
    let params = cutmix_params(0.6, 8, 8, centre[0] as usize, centre[1] as usize);
    let bounds: Vec<i64> = expected["cutmix_box"].to_vec1()?;
    let bounds: Vec<usize> = bounds.iter().map(|&b| b as usize).collect();
    assert_eq!(
        params.cutmix_box,
        Some((bounds[0], bounds[1], bounds[2], bounds[3]))
    );
    let lam: f64 = expected["cutmix_lam"].to_vec1::<f64>()?[0];
    assert_eq!(params.lam, lam, "the corrected coefficient");
    let (mixed, targets) = mixup.apply(images, &labels, &params)?;
    assert_within(&mixed, &expected["cutmix_images"], "cutmix images")?;
    assert_within(&targets, &expected["cutmix_targets"], "cutmix targets")?;

    let loss = soft_cross_entropy(&expected["soft_logits"], &expected["mixup_targets"])?;
    let reference: f32 = expected["soft_loss"].to_vec1()?[0];
    close(
        f64::from(loss.to_scalar::<f32>()?),
        f64::from(reference),
        1e-5,
        "soft-target loss",
    )?;

    for bad in [
        MixupConfig {
            mixup_alpha: -1.0,
            ..config
        },
        MixupConfig {
            cutmix_alpha: f64::NAN,
            ..config
        },
        MixupConfig {
            prob: 1.5,
            ..config
        },
    ] {
        assert!(Mixup::new(bad, 5).is_err(), "{bad:?}");
    }
    Ok(())
}

#[test]
fn mixing_draws_are_seeded_and_within_range() -> Result<()> {
    let config = MixupConfig {
        mixup_alpha: 0.8,
        cutmix_alpha: 1.0,
        ..MixupConfig::default()
    };
    let mixup = Mixup::new(config, 10)?;
    let (mut cutmix, mut plain) = (0, 0);
    let mut mean = 0.0;
    for i in 0..2000u64 {
        let draw = |i| mixup.draw(&mut resnet_train::Random::new(&[7, i]), 32, 32);
        let params = draw(i)?;
        assert_eq!(params, draw(i)?, "the same stream gives the same draw");
        ensure!((0.0..=1.0).contains(&params.lam), "lam {}", params.lam);
        match params.cutmix_box {
            Some((y0, y1, x0, x1)) => {
                cutmix += 1;
                ensure!(y0 <= y1 && y1 <= 32 && x0 <= x1 && x1 <= 32);
            }
            None => {
                plain += 1;
                mean += params.lam;
            }
        }
    }
    // Switch probability 0.5; Beta(0.8, 0.8) has mean 0.5.
    ensure!((800..1200).contains(&cutmix), "{cutmix} cutmix of 2000");
    let mean = mean / f64::from(plain);
    ensure!((mean - 0.5).abs() < 0.05, "mixup lam mean {mean}");
    Ok(())
}
