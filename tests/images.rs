//! Images as untrusted input: Pillow's verdicts and pixels on a corpus of real and
//! crafted files (`fixtures/images/corpus`, made with Pillow by
//! `fixtures/generate_image_corpus.py`), and files that are not images at all.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn corpus() -> PathBuf {
    resnet_tests::fixtures_dir().join("images/corpus")
}

/// Where this crate and Pillow differ on purpose, and why (also in the book, docs/src/untrusted-input.md).
const DELIBERATE_DIFFERENCES: &[(&str, &str)] = &[];

#[test]
fn pillow_agreement_on_real_and_crafted_images() -> Result<()> {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(
        resnet_tests::fixtures_dir().join("images/corpus.json"),
    )?)?;
    let images = expected["images"].as_object().context("images")?;
    assert!(images.len() >= 30, "{} images", images.len());
    let mut differences = Vec::new();
    let (mut decoded, mut refused) = (0, 0);
    for (name, pillow) in images {
        let ours = resnet_io::decode_image(&corpus().join(name));
        let pillow_decodes = pillow["decodes"].as_bool().context("decodes")?;
        match (ours, pillow_decodes) {
            (Ok(image), true) => {
                let rgb = image.to_rgb8();
                let sha: String = Sha256::digest(rgb.as_raw())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let same_size = (u64::from(rgb.width()), u64::from(rgb.height()))
                    == (
                        pillow["width"].as_u64().unwrap_or(0),
                        pillow["height"].as_u64().unwrap_or(0),
                    );
                if !same_size || pillow["rgb_sha256"] != sha.as_str() {
                    differences.push((
                        name.clone(),
                        format!("other pixels (Pillow mode {})", pillow["mode"]),
                    ));
                } else {
                    decoded += 1;
                }
            }
            (Err(_), false) => refused += 1,
            (Ok(_), false) => differences.push((
                name.clone(),
                format!("decoded; Pillow refuses it ({})", pillow["error"]),
            )),
            (Err(error), true) => differences.push((name.clone(), format!("refused ({error})"))),
        }
    }
    eprintln!("{decoded} decoded as Pillow, {refused} refused as Pillow");
    let deliberate: Vec<&str> = DELIBERATE_DIFFERENCES.iter().map(|(n, _)| *n).collect();
    let unexpected: Vec<_> = differences
        .iter()
        .filter(|(name, _)| !deliberate.contains(&name.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "differences from Pillow: {unexpected:#?}"
    );
    Ok(())
}

fn assert_refused(path: &Path, expected: &str) {
    let started = Instant::now();
    let error = match resnet_io::decode_image(path) {
        Ok(_) => panic!("{} decoded", path.display()),
        Err(error) => error.to_string(),
    };
    assert!(error.contains(expected), "{}: {error}", path.display());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{}: slow",
        path.display()
    );
}

#[cfg(unix)]
#[test]
fn only_regular_files_are_opened_and_never_block() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let link = |target: &Path, name: &str| -> Result<PathBuf> {
        let path = dir.path().join(name);
        std::os::unix::fs::symlink(target, &path)?;
        Ok(path)
    };
    assert_refused(
        &link(Path::new("/dev/zero"), "zero.jpg")?,
        "found a character device",
    );
    assert_refused(
        &link(&dir.path().join("nothing"), "dangling.png")?,
        "No such file",
    );
    std::fs::create_dir(dir.path().join("folder.jpg"))?;
    assert_refused(&dir.path().join("folder.jpg"), "found a directory");
    let fifo = dir.path().join("fifo.jpg");
    if std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        assert_refused(&fifo, "found a FIFO");
        assert_refused(&link(&fifo, "to_fifo.jpg")?, "found a FIFO");
    } else {
        eprintln!("SKIPPED the FIFO case: no mkfifo");
    }
    Ok(())
}

#[test]
fn a_file_over_the_size_limit_is_refused_unread() -> Result<()> {
    // A real JPEG followed by gigabytes of zeros (a sparse file: nothing is written).
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("padded.jpg");
    std::fs::copy(corpus().join("rgb_420.jpg"), &path)?;
    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
    file.set_len(3 << 30)?;
    assert_refused(&path, "images are read up to");
    Ok(())
}

#[test]
fn a_small_jpeg_claiming_a_huge_size_is_refused_before_decoding() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let jpeg = std::fs::read(corpus().join("rgb_420.jpg"))?;
    let path = dir.path().join("claims_10000x10000.jpg");
    std::fs::write(
        &path,
        resnet_tests::jpeg_claiming_size(&jpeg, 10_000, 10_000)?,
    )?;
    assert_refused(&path, "image file is truncated");
    let path = dir.path().join("claims_65535x65535.jpg");
    std::fs::write(
        &path,
        resnet_tests::jpeg_claiming_size(&jpeg, 65_535, 65_535)?,
    )?;
    assert_refused(&path, "expected between 1 and");
    Ok(())
}
