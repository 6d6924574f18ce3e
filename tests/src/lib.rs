//! Helpers shared by the workspace tests: fixture paths, `../shared`, the seeded tensor
//! generator that `fixtures/generate_parity.py` reproduces, and the parity tolerance.

use std::path::PathBuf;

pub mod hub_server;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// Parity tolerance in f32, stated up front: max |Δ| ≤ 1e-4 · max |reference|.
pub const F32_RELATIVE_TOLERANCE: f64 = 1e-4;

/// A committed fixture of `fixtures/parity/`.
pub fn parity_fixture(name: &str) -> PathBuf {
    fixtures_dir()
        .join("parity")
        .join(format!("{name}.safetensors"))
}

/// Defines a test run once per device the build has, as candle's own `test_device!`:
/// `test_device!(check, check_cpu, check_cuda, check_metal)` where
/// `fn check(device: &Device) -> anyhow::Result<()>`. The CUDA and Metal variants exist
/// under the `cuda` and `metal` features of this crate.
#[macro_export]
macro_rules! test_device {
    ($check:ident, $cpu:ident, $cuda:ident, $metal:ident) => {
        #[test]
        fn $cpu() -> anyhow::Result<()> {
            $check(&candle_core::Device::Cpu)
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() -> anyhow::Result<()> {
            $check(&candle_core::Device::new_cuda(0)?)
        }

        #[cfg(feature = "metal")]
        #[test]
        fn $metal() -> anyhow::Result<()> {
            $check(&candle_core::Device::new_metal(0)?)
        }
    };
}

/// The committed fixtures folder.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Copies the model directory `dir` into a Hugging Face hub cache at `cache` as the hub
/// client lays it out (`models--owner--name/{refs/main, snapshots/REVISION/...}`).
pub fn add_to_hub_cache(cache: &std::path::Path, id: &str, dir: &std::path::Path) -> Result<()> {
    let revision = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(revision);
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs").join("main"), revision)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        std::fs::copy(entry.path(), snapshot.join(entry.file_name()))?;
    }
    Ok(())
}

/// A committed model directory (or file) of `fixtures/models/`.
pub fn model_fixture(name: &str) -> PathBuf {
    fixtures_dir().join("models").join(name)
}

/// `../shared` beside the repository, or `None` with a message saying the test skips.
pub fn shared_dir(test: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if dir.join("README.md").exists() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED {test}: ../shared is absent (expected at {})",
            dir.display()
        );
        None
    }
}

fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, byte| {
        (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01B3)
    })
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `(low, width)` of the values of tensor `name`: the rule of `generate_parity.py`.
fn hashed_range(name: &str, dims: &[usize]) -> (f64, f64) {
    if name.ends_with("running_var") {
        (0.5, 1.0)
    } else if name.ends_with("running_mean") {
        (-0.2, 0.4)
    } else if name == "input" {
        (-1.0, 2.0)
    } else if name.ends_with("bias") {
        (-0.1, 0.2)
    } else if dims.len() == 1 {
        (0.5, 1.0)
    } else {
        let fan_in: usize = dims[1..].iter().product();
        let s = (3.0 / fan_in as f64).sqrt();
        (-s, 2.0 * s)
    }
}

/// The seeded tensor `name` of shape `dims`, bit-identical to `hashed_tensor` in
/// `fixtures/generate_parity.py`.
pub fn hashed_tensor(name: &str, dims: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let (low, width) = hashed_range(name, dims);
    let seed = fnv1a64(name);
    let count: usize = dims.iter().product();
    let values: Vec<f32> = (0..count as u64)
        .map(|i| {
            let u = (splitmix64(seed.wrapping_add(i)) >> 40) as f64 / (1u64 << 24) as f64;
            (low + width * u) as f32
        })
        .collect();
    Tensor::from_vec(values, dims, device)
}

/// A `VarBuilder` backend that makes every tensor with [`hashed_tensor`].
struct HashedBackend;

impl candle_nn::var_builder::SimpleBackend for HashedBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        hashed_tensor(name, shape.dims(), device)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("hashed weights need a shape, none given for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A `VarBuilder` whose tensors come from [`hashed_tensor`].
pub fn hashed_var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(HashedBackend), dtype, device.clone())
}

/// Largest absolute value of a tensor, in f64.
pub fn max_abs(tensor: &Tensor) -> Result<f64> {
    Ok(tensor
        .to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// Asserts max |actual − expected| ≤ `relative` · max |expected|, shapes equal.
pub fn assert_close(actual: &Tensor, expected: &Tensor, relative: f64, what: &str) -> Result<()> {
    ensure!(
        actual.dims() == expected.dims(),
        "{what}: shape {:?}, expected {:?}",
        actual.dims(),
        expected.dims()
    );
    let actual = actual.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    let expected = expected.to_dtype(DType::F64)?;
    let scale = max_abs(&expected)?;
    let diff = max_abs(&(actual - &expected)?).context("difference")?;
    ensure!(
        diff <= relative * scale,
        "{what}: max |Δ| = {diff:.3e} exceeds {relative:.0e} · max |reference| = {:.3e}",
        relative * scale
    );
    Ok(())
}

/// Writes a `width` x `height` baseline JPEG (4:2:0, quality 90) of a smooth gradient:
/// a large image in a small file, for memory tests.
pub fn write_gradient_jpeg(path: &std::path::Path, width: usize, height: usize) -> Result<()> {
    let mut rgb = vec![0u8; width * height * 3];
    for (i, pixel) in rgb.chunks_mut(3).enumerate() {
        let (x, y) = (i % width, i / width);
        pixel.copy_from_slice(&[(x * 255 / width) as u8, (y * 255 / height) as u8, 128]);
    }
    let jpeg = libjpeg_turbo_rs::compress(
        &rgb,
        width,
        height,
        libjpeg_turbo_rs::PixelFormat::Rgb,
        90,
        libjpeg_turbo_rs::Subsampling::S420,
    )
    .map_err(|e| anyhow::anyhow!("encoding a test JPEG: {e}"))?;
    std::fs::write(path, jpeg)?;
    Ok(())
}

/// A copy of a baseline JPEG whose SOF0 segment claims `width` x `height`: a small file
/// that claims a huge image.
pub fn jpeg_claiming_size(jpeg: &[u8], width: u16, height: u16) -> Result<Vec<u8>> {
    let mut bytes = jpeg.to_vec();
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .context("a baseline JPEG (SOF0)")?;
    bytes[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    Ok(bytes)
}

/// A PNG chunk: length, type, data, CRC-32.
pub fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in kind.iter().chain(data) {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(&(!crc).to_be_bytes());
    chunk
}

/// `png` with `chunks` inserted after its IHDR chunk (which ends at byte 33).
pub fn png_with_chunks(png: &[u8], chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut out = png[..33].to_vec();
    for chunk in chunks {
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&png[33..]);
    out
}

/// Idelbayev's CIFAR ResNet-8 (option A) on the CPU with the seeded weights of the
/// fixture scripts' `hash_init` (his head hashed under its name, `linear`), as variables
/// of the returned `VarMap`: the network of the optimizer and recipe fixtures.
pub fn seeded_resnet8() -> Result<(resnet_core::ResNet, candle_nn::VarMap)> {
    let device = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let model = resnet_core::ResNet::new(
        &resnet_core::ResNetConfig::cifar(1),
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    for (name, var) in varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
    {
        let hashed_name = name.replacen("fc.", "linear.", 1);
        var.set(&hashed_tensor(&hashed_name, var.dims(), &device)?)?;
    }
    Ok((model, varmap))
}
