//! Preprocessing against timm's own eval transform (`timm.data.create_transform`), on
//! images of different sizes and aspect ratios (fixtures/generate_images.py).
//!
//! Decoding (libjpeg-turbo's algorithms) and resizing (Pillow's fixed-point resampler,
//! src/resample.rs) reproduce Pillow's pixels exactly, so the only difference left is
//! f32 rounding in the normalisation. Tolerance, in normalised units (x - mean) / std:
//! max |Δ| ≤ 1e-5 and mean |Δ| ≤ 1e-6 (one grey level is about 0.017).

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use resnet_io::{Interpolation, PreprocessConfig, IMAGENET_MEAN, IMAGENET_STD};
use resnet_tests::{max_abs, model_fixture};

const MAX_ABS_TOLERANCE: f64 = 1e-5;
const MEAN_ABS_TOLERANCE: f64 = 1e-6;

#[test]
fn matches_timm_eval_transform() -> Result<()> {
    let fixtures = model_fixture("..");
    let expected = candle_core::safetensors::load(
        fixtures.join("preprocess_expected.safetensors"),
        &Device::Cpu,
    )?;
    let configs = [
        ("bilinear_64", 64, Interpolation::Bilinear, 0.875),
        ("bicubic_96", 96, Interpolation::Bicubic, 0.95),
    ];
    let mut compared = 0;
    for (name, size, interpolation, crop_pct) in configs {
        let config = PreprocessConfig {
            size: (size, size),
            crop_pct,
            interpolation,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            resize: resnet_io::Resize::CenterCrop,
            bgr: false,
        };
        for image in [
            "landscape.jpg",
            "portrait.png",
            "square.jpg",
            "small.png",
            "cifar.jpg",
        ] {
            let key = format!("{name}/{image}");
            let reference = expected.get(&key).context(key.clone())?;
            let ours = config.load_image(&fixtures.join("images").join(image))?;
            assert_eq!(ours.dims(), reference.dims(), "{key}");
            let diff = (ours - reference)?.abs()?;
            let max = max_abs(&diff)?;
            let mean = diff.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?;
            assert!(
                max <= MAX_ABS_TOLERANCE && mean <= MEAN_ABS_TOLERANCE,
                "{key}: max |Δ| {max:.2e} (limit {MAX_ABS_TOLERANCE:e}), mean |Δ| {mean:.2e} (limit {MEAN_ABS_TOLERANCE:e})"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 10);
    Ok(())
}
