//! Hostile safetensors files: each gives a clear error naming the file, never a panic,
//! a hang, or memory far beyond the file's size. The corpus is generated here.

// Test helpers may unwrap: a failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use resnet_core::{ResNet, ResNetConfig};
use resnet_io::{load_file, Checkpoint, Error};

/// A safetensors file from a raw header and data section.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// Opens `bytes` as a file and in memory; both must fail with a message containing
/// `expected` and naming the file.
fn assert_rejected(name: &str, bytes: &[u8], expected: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write(dir.path(), name, bytes)?;
    let from_file = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        from_file.contains(expected) && from_file.contains(name),
        "{name}: expected '{expected}' in '{from_file}'"
    );
    let in_memory = Checkpoint::from_bytes(name, bytes.to_vec())
        .unwrap_err()
        .to_string();
    assert!(
        in_memory.contains(expected),
        "{name} (memory): '{in_memory}'"
    );
    Ok(())
}

const ONE_F32: &str = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;

#[test]
fn empty_and_tiny_files() -> Result<()> {
    assert_rejected(
        "empty.safetensors",
        b"",
        "0 bytes, shorter than the 8-byte header",
    )?;
    assert_rejected("tiny.safetensors", b"\x01\x02\x03", "3 bytes, shorter")
}

#[test]
fn header_length_absurd_or_past_the_end() -> Result<()> {
    let mut absurd = (1u64 << 63).to_le_bytes().to_vec();
    absurd.extend_from_slice(b"{}");
    assert_rejected(
        "absurd.safetensors",
        &absurd,
        "header length 9223372036854775808 is absurd",
    )?;
    let mut past = 1000u64.to_le_bytes().to_vec();
    past.extend_from_slice(b"{}");
    assert_rejected(
        "past.safetensors",
        &past,
        "runs past the end of the 10-byte file",
    )
}

#[test]
fn header_not_utf8_or_not_json() -> Result<()> {
    let mut bytes = 4u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0x7b, 0xff, 0xfe, 0x7d]);
    assert_rejected("utf8.safetensors", &bytes, "not valid UTF-8")?;
    assert_rejected(
        "json.safetensors",
        &raw_file("{\"w\": [", &[]),
        "not valid JSON",
    )?;
    assert_rejected(
        "array.safetensors",
        &raw_file("[1, 2]", &[]),
        "not valid JSON",
    )
}

#[test]
fn data_truncated_overlapping_or_with_gaps() -> Result<()> {
    assert_rejected(
        "truncated.safetensors",
        &raw_file(ONE_F32, &[0, 0]),
        "the tensors cover 4 bytes of data but the file holds 2",
    )?;
    let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    assert_rejected(
        "overlap.safetensors",
        &raw_file(overlap, &[0; 8]),
        "overlaps the previous tensor",
    )?;
    let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
    assert_rejected(
        "gap.safetensors",
        &raw_file(gap, &[0; 12]),
        "gap in the data: bytes 4..8",
    )?;
    let trailing = raw_file(ONE_F32, &[0; 8]);
    assert_rejected(
        "trailing.safetensors",
        &trailing,
        "cover 4 bytes of data but the file holds 8",
    )
}

#[test]
fn dtype_or_shape_not_matching_the_bytes() -> Result<()> {
    let header = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    assert_rejected(
        "mismatch.safetensors",
        &raw_file(header, &[0; 8]),
        "dtype F32 and shape [3] need 96 bits, but data_offsets [0, 8] hold 8 bytes",
    )?;
    let header = r#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#;
    assert_rejected(
        "dtype.safetensors",
        &raw_file(header, &[0]),
        "unknown dtype 'Q4'",
    )?;
    let header = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#;
    assert_rejected(
        "reversed.safetensors",
        &raw_file(header, &[0; 4]),
        "end before they begin",
    )
}

#[test]
fn shape_products_and_offsets_that_overflow() -> Result<()> {
    let header = r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#;
    assert_rejected(
        "overflow.safetensors",
        &raw_file(header, &[0; 4]),
        "overflows",
    )?;
    // Offsets near 2^64: the safetensors crate panics on these under overflow checks.
    let header = r#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[18446744073709551615,18446744073709551617]}}"#;
    assert_rejected(
        "offsets.safetensors",
        &raw_file(header, &[0; 2]),
        "malformed entry",
    )?;
    let header = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}}"#;
    assert_rejected(
        "near64.safetensors",
        &raw_file(header, &[0; 1]),
        "gap in the data",
    )
}

#[test]
fn duplicate_keys_are_refused() -> Result<()> {
    let header = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    assert_rejected(
        "duplicate.safetensors",
        &raw_file(header, &[0; 4]),
        "names 'w' twice",
    )
}

#[test]
fn metadata_must_be_strings() -> Result<()> {
    let header = r#"{"__metadata__":{"a":1}}"#;
    assert_rejected(
        "metadata.safetensors",
        &raw_file(header, &[]),
        "__metadata__ must map strings",
    )
}

#[test]
fn directories_fifos_and_devices_are_not_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotAFile {
                found: "a directory",
                ..
            }
        ),
        "{err}"
    );

    let fifo = dir.path().join("weights.fifo");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status()?;
    assert!(status.success(), "mkfifo");
    // Must return at once: nobody will ever write to this FIFO.
    let err = Checkpoint::open(&fifo).unwrap_err().to_string();
    assert!(
        err.contains("a FIFO") && err.contains("weights.fifo"),
        "{err}"
    );

    let err = Checkpoint::open("/dev/zero").unwrap_err().to_string();
    assert!(
        err.contains("/dev/zero: expected a regular file, found a character device"),
        "{err}"
    );
    let err = Checkpoint::open("/no/such/file.safetensors")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/no/such/file.safetensors"), "{err}");
    Ok(())
}

#[test]
fn nan_and_infinite_values_are_refused() -> Result<()> {
    for (name, value) in [
        ("nan", f32::NAN),
        ("inf", f32::INFINITY),
        ("neginf", f32::NEG_INFINITY),
    ] {
        let header = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut data = 1f32.to_le_bytes().to_vec();
        data.extend_from_slice(&value.to_le_bytes());
        let checkpoint =
            Checkpoint::from_bytes(format!("{name}.safetensors"), raw_file(header, &data))?;
        let err = checkpoint
            .load("w", &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor 'w': element 1 is NaN or infinite"),
            "{err}"
        );
    }
    Ok(())
}

/// A complete, valid CIFAR ResNet-20 checkpoint with every value 1 (torchvision names).
fn resnet20_tensors() -> Result<std::collections::HashMap<String, Tensor>> {
    Ok(ResNet::expected_tensors(&ResNetConfig::resnet20())?
        .into_iter()
        .map(|(name, shape)| Tensor::ones(shape, DType::F32, &Device::Cpu).map(|t| (name, t)))
        .collect::<candle_core::Result<_>>()?)
}

#[test]
fn negative_running_variance_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut tensors = resnet20_tensors()?;
    tensors.insert(
        "layer2.1.bn1.running_var".into(),
        (Tensor::ones(32, DType::F32, &Device::Cpu)? * -1.0)?,
    );
    let path = dir.path().join("negative.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    let err = load_file(&path, None, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("negative.safetensors: tensor 'layer2.1.bn1.running_var': a running variance is negative"),
        "{err}"
    );
    Ok(())
}

#[test]
fn integer_and_f64_parameters_are_reported_not_converted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut tensors = resnet20_tensors()?;
    tensors.insert(
        "conv1.weight".into(),
        Tensor::ones((16, 3, 3, 3), DType::I64, &Device::Cpu)?,
    );
    tensors.insert(
        "fc.bias".into(),
        Tensor::ones(10, DType::F64, &Device::Cpu)?,
    );
    let path = dir.path().join("ints.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    let err = load_file(
        &path,
        Some(&ResNetConfig::resnet20()),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("conv1.weight: expected F32, F16 or BF16, found I64"),
        "{err}"
    );
    assert!(
        err.contains("fc.bias: expected F32, F16 or BF16, found F64"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_file_truncated_while_open_is_an_error_not_sigbus() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("shrinking.safetensors");
    candle_core::safetensors::save(&resnet20_tensors()?, &path)?;
    let checkpoint = Checkpoint::open(&path)?;
    let last = checkpoint
        .tensors()
        .last()
        .map(|t| t.name.clone())
        .unwrap_or_default();
    // Another process cuts the file short after the header was validated.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)?
        .set_len(200)?;
    let err = checkpoint
        .load(&last, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated while open"), "{err}");
    Ok(())
}

#[test]
fn a_file_that_is_no_resnet_says_which_names_it_expected() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write(dir.path(), "other.safetensors", &raw_file(ONE_F32, &[0; 4]))?;
    let err = load_file(&path, None, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown checkpoint naming scheme") && err.contains("conv1.weight"),
        "{err}"
    );
    Ok(())
}

#[test]
fn shard_indexes_cannot_reach_outside_their_directory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let index = r#"{"weight_map": {"conv1.weight": "../../etc/passwd"}}"#;
    let path = write(dir.path(), "model.safetensors.index.json", index.as_bytes())?;
    let err = load_file(&path, None, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("must be a file name beside the index"),
        "{err}"
    );
    Ok(())
}
