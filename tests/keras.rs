//! Keras weights read in Rust: keras.applications' ResNets built narrow from Keras' own
//! block functions, saved by Keras (`fixtures/generate_keras.py`) as a legacy weights-only
//! `.h5`, the same file as Keras 2 wrote it, and a Keras 3 `.keras` archive, each loaded
//! with `--arch auto` and compared to Keras' output (f32, 1e-4 relative), unfolded and
//! folded; and hostile Keras files, each a clean error.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use resnet_core::{BottleneckStride, CpuKernels, InputNormalization, ResNet, ShortcutKind};
use resnet_io::{load_file, PreprocessConfig};
use resnet_tests::{
    assert_close, fixtures_dir, hashed_tensor, parity_fixture, F32_RELATIVE_TOLERANCE,
};

fn keras_fixture(name: &str) -> PathBuf {
    fixtures_dir().join("keras").join(name)
}

fn expected(name: &str) -> Result<Tensor> {
    let mut tensors = candle_core::safetensors::load(parity_fixture(name), &Device::Cpu)?;
    tensors.remove("expected").context("expected")
}

/// Loads `file` with the architecture inferred, checks it against `fixture` unfolded and
/// folded for both CPU paths; returns the model.
fn check_file(file: &str, fixture: &str) -> Result<ResNet> {
    check_path(&keras_fixture(file), fixture)
}

/// [`check_file`] for a file anywhere.
fn check_path(path: &std::path::Path, fixture: &str) -> Result<ResNet> {
    let input = hashed_tensor("input", &[2, 3, 64, 64], &Device::Cpu)?;
    let expected = expected(fixture)?;
    let loaded = load_file(path, None, &Device::Cpu, DType::F32)
        .with_context(|| format!("loading {}", path.display()))?;
    let what = path.display().to_string();
    assert_close(
        &loaded.model.forward(&input)?,
        &expected,
        F32_RELATIVE_TOLERANCE,
        &what,
    )?;
    for kernels in [CpuKernels::Auto, CpuKernels::Gemm] {
        let folded = loaded.model.clone().fold_batch_norm_with(kernels)?;
        let what = format!("{what} folded for {kernels:?}");
        assert_close(
            &folded.forward(&input)?,
            &expected,
            F32_RELATIVE_TOLERANCE,
            &what,
        )?;
    }
    Ok(loaded.model)
}

#[test]
fn keras_v1_weights_load_from_h5_keras2_h5_and_keras_archives() -> Result<()> {
    for file in ["v1_tiny.h5", "v1_tiny_keras2.h5", "v1_tiny.keras"] {
        let model = check_file(file, "keras_v1_tiny")?;
        let config = model.config();
        assert_eq!(
            config.bottleneck_stride,
            BottleneckStride::Reduce1x1,
            "{file}"
        );
        assert!(config.conv_bias && !config.preactivation, "{file}");
        assert_eq!(config.bn_eps, resnet_core::KERAS_BN_EPS, "{file}");
        assert_eq!(config.input_normalization, InputNormalization::Caffe);
        assert_eq!(config.blocks_per_stage, [2, 1, 1, 2], "{file}");
        assert_eq!(
            PreprocessConfig::for_config(config),
            PreprocessConfig::keras_caffe()
        );
    }
    Ok(())
}

#[test]
fn keras_v2_weights_load_from_h5_and_keras_archives() -> Result<()> {
    // `_unnamed`: an archive whose weight groups do not name their layers (older Keras 3),
    // the names then taken from config.json's layer order.
    for file in ["v2_tiny.h5", "v2_tiny.keras", "v2_tiny_unnamed.keras"] {
        let model = check_file(file, "keras_v2_tiny")?;
        let config = model.config();
        assert!(
            config.preactivation && config.stride_in_last_block,
            "{file}"
        );
        assert_eq!(config.shortcut, ShortcutKind::ProjectionOrSubsample);
        assert_eq!(config.input_normalization, InputNormalization::Tf);
        assert_eq!(config.blocks_per_stage, [2, 3, 2, 2], "{file}");
    }
    Ok(())
}

/// The full-size keras.applications ResNet50, ResNet50V2 and ResNet101V2, written by
/// Keras as `.h5` and `.keras` (`generate_keras.py --full-size-files DIR`, about 100-180
/// MB each: not committed), loaded with the architecture inferred: the preset it is, and
/// Keras' output. Runs where `RESNET_KERAS_FULL` names that directory; skips otherwise.
#[test]
fn full_size_keras_files() -> Result<()> {
    let Some(dir) = std::env::var_os("RESNET_KERAS_FULL").map(PathBuf::from) else {
        eprintln!("skipped: RESNET_KERAS_FULL does not name a directory of full-size Keras files");
        return Ok(());
    };
    for (name, preset) in [
        ("keras_resnet50", "keras_resnet50"),
        ("keras_resnet50v2", "resnet50v2"),
        ("keras_resnet101v2", "resnet101v2"),
    ] {
        for extension in ["h5", "keras"] {
            let path = dir.join(format!("{name}.{extension}"));
            let model = check_path(&path, name)?;
            assert_eq!(model.config().describe(), preset, "{}", path.display());
        }
    }
    Ok(())
}

/// `convert` writes a Keras file to safetensors in our names; it loads back exactly.
#[test]
fn keras_files_convert_to_safetensors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("v2.safetensors");
    let files = resnet_io::WeightFiles::open(&[keras_fixture("v2_tiny.keras")])?;
    resnet_io::convert(
        &files,
        &out,
        resnet_io::NamingScheme::Torchvision,
        DType::F32,
        None,
    )?;
    let loaded = load_file(&out, None, &Device::Cpu, DType::F32)?;
    let input = hashed_tensor("input", &[2, 3, 64, 64], &Device::Cpu)?;
    assert_close(
        &loaded.model.forward(&input)?,
        &expected("keras_v2_tiny")?,
        F32_RELATIVE_TOLERANCE,
        "converted",
    )
}

/// PreprocessConfig's Keras modes against keras.applications' `preprocess_input` on the
/// same pixels (`generate_keras.py`): 'caffe' (BGR, mean subtracted from [0, 255]) and
/// 'tf' ([-1, 1]), within 1e-5 of the largest value.
#[test]
fn keras_preprocessing_matches_preprocess_input() -> Result<()> {
    let tensors = candle_core::safetensors::load(parity_fixture("keras_preprocess"), &Device::Cpu)?;
    let rgb = tensors["rgb"].squeeze(0)?; // (3, 5, 4), values 0-255
    let (height, width) = (rgb.dim(1)?, rgb.dim(2)?);
    let values = rgb.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
    let pixels: Vec<u8> = values.iter().map(|&v| v as u8).collect();
    let image = image::RgbImage::from_raw(width as u32, height as u32, pixels).context("image")?;
    for (mode, config) in [
        ("caffe", PreprocessConfig::keras_caffe()),
        ("tf", PreprocessConfig::keras_tf()),
    ] {
        let ours = config.normalize(&image)?;
        assert_close(&ours, &tensors[mode].squeeze(0)?, 1e-5, mode)?;
    }
    Ok(())
}

/// The error of loading `bytes` as a Keras file named `name`.
fn load_error(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> Result<String> {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes)?;
    match load_file(&path, None, &Device::Cpu, DType::F32) {
        Ok(_) => anyhow::bail!("{name} loaded"),
        Err(err) => Ok(err.to_string()),
    }
}

/// Every prefix of a Keras file is a clean error, never a panic or a hang.
#[test]
fn truncated_keras_files_are_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for file in ["v1_tiny.h5", "v2_tiny.keras"] {
        let bytes = std::fs::read(keras_fixture(file))?;
        for cut in (0..24).map(|i| bytes.len() * i / 24) {
            let name = format!("cut{cut}.{}", file.rsplit('.').next().unwrap_or("h5"));
            let err = load_error(&dir, &name, &bytes[..cut])?;
            ensure!(err.contains(&name), "{file} cut at {cut}: {err}");
        }
    }
    Ok(())
}

/// Files crafted by `generate_keras.py` (h5py): each refused with what was expected.
#[test]
fn hostile_keras_files_are_clean_errors() -> Result<()> {
    for (file, expected) in [
        ("hostile/int_kernel.h5", "expected little-endian f32 values"),
        ("hostile/f64_kernel.h5", "expected little-endian f32 values"),
        (
            "hostile/absurd_shape.h5",
            "holds more data than is left of the file",
        ),
        (
            "hostile/shared_data.h5",
            "holds more data than is left of the file",
        ),
        ("hostile/cyclic_groups.h5", "no dataset at"),
        ("hostile/many_layer_names.h5", "at most 65536 read"),
        ("hostile/missing_layer.h5", "which has no group"),
        ("hostile/not_hdf5.h5", "expected an HDF5 file"),
        ("hostile/no_weights.h5", "no Keras weights found"),
        ("hostile/five_d_kernel.h5", "expected 1-D to 4-D weights"),
    ] {
        let path = keras_fixture(file);
        let err = match load_file(&path, None, &Device::Cpu, DType::F32) {
            Ok(_) => anyhow::bail!("{file} loaded"),
            Err(err) => err.to_string(),
        };
        ensure!(
            err.contains(expected) && err.contains(file.rsplit('/').next().unwrap_or(file)),
            "{file}: expected '{expected}' in: {err}"
        );
    }
    Ok(())
}

/// A `.keras` archive whose weights inflate far beyond any real model's: refused after
/// a bounded read.
#[test]
fn keras_zip_bomb_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut archive = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    archive.start_file("config.json", options)?;
    archive.write_all(b"{}")?;
    archive.start_file("model.weights.h5", options)?;
    archive.write_all(b"\x89HDF\r\n\x1a\n")?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        archive.write_all(&zeros)?;
    }
    let bytes = archive.finish()?.into_inner();
    ensure!(bytes.len() < 2 << 20, "the bomb is {} bytes", bytes.len());
    let err = load_error(&dir, "bomb.keras", &bytes)?;
    ensure!(err.contains("refused (a zip bomb?)"), "{err}");
    Ok(())
}
