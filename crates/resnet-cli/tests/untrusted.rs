//! Images, output paths, shapes and flags as untrusted input, through the `resnet`
//! binary: exit codes, messages, counts and memory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

fn resnet(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(args)
        .output()?)
}

fn samples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../weights/samples")
}

fn corpus(name: &str) -> PathBuf {
    resnet_tests::fixtures_dir()
        .join("images/corpus")
        .join(name)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Fails unless the command failed with `code` and one line on stderr containing `expected`.
fn assert_one_line_error(output: &Output, code: i32, expected: &str) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(code), "{text}");
    assert!(text.contains(expected), "expected '{expected}' in '{text}'");
    let errors: Vec<_> = text.lines().filter(|l| !l.starts_with("note: ")).collect();
    assert_eq!(errors.len(), 1, "one line: {text}");
}

#[cfg(unix)]
#[test]
fn eval_scores_or_counts_every_entry_with_its_reason() -> Result<()> {
    let data = tempfile::tempdir()?;
    let class = |name: &str| -> Result<PathBuf> {
        let dir = data.path().join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    };
    let (cat, ship) = (class("cat")?, class("ship")?);
    std::fs::copy(samples().join("cat/0000.jpg"), cat.join("0000.jpg"))?;
    // What torchvision's ImageFolder evaluates besides JPEG and PNG.
    for name in ["lossless.webp", "plain.tif", "rgb24.bmp", "still.gif"] {
        std::fs::copy(corpus(name), ship.join(name))?;
    }
    std::fs::create_dir(ship.join("nested"))?;
    std::fs::copy(
        samples().join("ship/0000.jpg"),
        ship.join("nested/0000.jpg"),
    )?;
    std::fs::copy(corpus("truncated.jpg"), cat.join("truncated.jpg"))?;
    std::fs::write(cat.join("notes.txt"), "not an image")?;
    std::os::unix::fs::symlink("/dev/zero", cat.join("zero.jpg"))?;
    std::os::unix::fs::symlink(cat.join("missing.jpg"), cat.join("dangling.jpg"))?;
    let fifo = Command::new("mkfifo")
        .arg(cat.join("fifo.png"))
        .status()?
        .success();
    // Two names that are not UTF-8 and differ only there.
    use std::os::unix::ffi::OsStrExt;
    for byte in [0xFFu8, 0xFE] {
        let name = [b'x', byte, b'.', b'j', b'p', b'g'];
        let name = std::ffi::OsStr::from_bytes(&name);
        std::fs::copy(samples().join("cat/0001.jpg"), cat.join(name))?;
    }
    let predictions = data.path().join("predictions.json");
    let output = resnet(&[
        "eval",
        "--data",
        path(data.path()),
        "--json",
        "--predictions",
        path(&predictions),
    ])?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let summary: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(summary["images"], 8, "{summary}");
    let unreadable = summary["unreadable_files"]
        .as_object()
        .context("unreadable_files")?;
    let expected_unreadable = if fifo { 5 } else { 4 };
    assert_eq!(summary["unreadable"], expected_unreadable, "{unreadable:?}");
    assert!(unreadable["cat/truncated.jpg"]
        .as_str()
        .context("reason")?
        .contains("truncated"));
    assert!(unreadable["cat/zero.jpg"]
        .as_str()
        .context("reason")?
        .contains("character device"));
    assert!(unreadable["cat/dangling.jpg"]
        .as_str()
        .context("reason")?
        .contains("No such file"));
    assert!(unreadable["cat/notes.txt"]
        .as_str()
        .context("reason")?
        .contains("not an image"));
    if fifo {
        assert!(unreadable["cat/fifo.png"]
            .as_str()
            .context("reason")?
            .contains("FIFO"));
    }
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&predictions)?)?;
    let names = written["predictions"].as_object().context("predictions")?;
    assert!(names.contains_key("cat/x\\xFF.jpg") && names.contains_key("cat/x\\xFE.jpg"));
    assert!(names.contains_key("ship/nested/0000.jpg") && names.contains_key("ship/still.gif"));
    Ok(())
}

#[test]
fn eval_refuses_an_empty_class_folder_and_checks_its_output_first() -> Result<()> {
    let data = tempfile::tempdir()?;
    std::fs::create_dir(data.path().join("cat"))?;
    std::fs::create_dir(data.path().join("dog"))?;
    std::fs::copy(
        samples().join("cat/0000.jpg"),
        data.path().join("cat/0000.jpg"),
    )?;
    let output = resnet(&["eval", "--data", path(data.path())])?;
    assert_one_line_error(&output, 1, "dog: the class folder has no image files");

    std::fs::copy(
        samples().join("dog/0000.jpg"),
        data.path().join("dog/0000.jpg"),
    )?;
    let output = resnet(&[
        "eval",
        "--data",
        path(data.path()),
        "--predictions",
        "/no/such/folder/p.json",
    ])?;
    assert_one_line_error(&output, 1, "cannot write in /no/such/folder");
    assert!(output.stdout.is_empty(), "nothing evaluated");
    Ok(())
}

#[cfg(unix)]
#[test]
fn classify_refuses_a_fifo_without_waiting_for_a_writer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fifo = dir.path().join("photo.jpg");
    if !Command::new("mkfifo").arg(&fifo).status()?.success() {
        eprintln!("SKIPPED: no mkfifo");
        return Ok(());
    }
    let output = resnet(&["classify", path(&fifo)])?;
    assert_one_line_error(&output, 1, "expected a regular file, found a FIFO");
    Ok(())
}

#[test]
fn classify_reports_a_bad_image_and_classifies_the_others() -> Result<()> {
    let output = resnet(&[
        "classify",
        "--json",
        path(&samples().join("ship/0000.jpg")),
        path(&corpus("truncated.jpg")),
        path(&samples().join("cat/0000.jpg")),
    ])?;
    assert_eq!(output.status.code(), Some(1));
    let result: Value = serde_json::from_slice(&output.stdout)?;
    let images = result["images"].as_array().context("images")?;
    assert_eq!(images.len(), 3);
    assert_eq!(images[0]["predictions"][0]["label"], "ship");
    assert!(images[1]["error"]
        .as_str()
        .context("error")?
        .contains("truncated"));
    assert_eq!(images[2]["predictions"][0]["label"], "cat");
    assert!(stderr(&output).contains("1 of 3 images could not be classified"));
    Ok(())
}

#[test]
fn sizes_flags_and_messages() -> Result<()> {
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &[
                "forward",
                "--arch",
                "resnet18",
                "--shape",
                "1,3,100000,100000",
            ],
            1,
            "GB for its activations, more than",
        ),
        (
            &["bench", "--arch", "resnet18", "--size", "100000"],
            1,
            "GB for its activations",
        ),
        (
            &[
                "bench",
                "--arch",
                "resnet18",
                "--batch",
                "18446744073709551615",
            ],
            1,
            "overflows 64 bits",
        ),
        (
            &["--threads", "0", "bench", "--arch", "resnet18"],
            2,
            "--threads 0: expected at least 1",
        ),
        (
            &["eval"],
            2,
            "required arguments were not provided: --data <DATA>",
        ),
        (
            &["eval", "--dta", "x"],
            2,
            "a similar argument exists: '--data'",
        ),
        (
            &["classify", "--resize", "stretch", "x.jpg"],
            2,
            "unknown resize policy 'stretch'",
        ),
        (
            &[
                "classify",
                "--resize",
                "none",
                "weights/../tests/fixtures/images/landscape.jpg",
            ],
            1,
            "resizing is off",
        ),
    ];
    for (args, code, expected) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_resnet"))
            .args(*args)
            .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
            .output()?;
        assert_one_line_error(&output, *code, expected);
    }
    // A checkpoint for another architecture: one line and a hint, not the full report.
    let dir = tempfile::tempdir()?;
    let resnet20 = dir.path().join("resnet20.safetensors");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../weights/resnet20.safetensors"),
        &resnet20,
    )?;
    let output = resnet(&[
        "classify",
        "--model",
        path(&resnet20),
        "--arch",
        "resnet32",
        path(&samples().join("cat/0000.jpg")),
    ])?;
    assert_one_line_error(&output, 1, "60 missing (layer1.3.conv1.weight");
    assert!(stderr(&output).contains("`resnet inspect"));
    // Too many threads: a warning, and the work is done.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (4 * cores + 1).to_string();
    let output = resnet(&[
        "--threads",
        &threads,
        "bench",
        "--arch",
        "resnet20",
        "--iters",
        "1",
        "--warmup",
        "0",
    ])?;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("more than 4 times"),
        "{}",
        stderr(&output)
    );
    // A photo squashed for a CIFAR model is said so.
    let output = resnet(&[
        "classify",
        path(&resnet_tests::fixtures_dir().join("images/landscape.jpg")),
    ])?;
    assert!(output.status.success());
    assert!(
        stderr(&output).contains("300x200 squashed to 32x32"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

#[cfg(unix)]
#[test]
fn output_files_are_checked_first_and_written_atomically() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../weights/resnet20.safetensors");
    let convert = |out: &Path| resnet(&["convert", path(&model), path(out)]);
    // Device nodes, FIFOs and folders are refused, and left as they are.
    let output = convert(Path::new("/dev/null"))?;
    assert_one_line_error(
        &output,
        1,
        "expected a regular file, found a character device",
    );
    let output = convert(dir.path())?;
    assert_one_line_error(&output, 1, "found a directory");
    let fifo = dir.path().join("fifo");
    if Command::new("mkfifo").arg(&fifo).status()?.success() {
        assert_one_line_error(&convert(&fifo)?, 1, "found a FIFO");
    }
    // A symbolic link is written through: the link stays, its target is replaced.
    let target = dir.path().join("target.safetensors");
    std::fs::write(&target, b"old")?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640))?;
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link)?;
    let output = convert(&link)?;
    ensure!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8(output.stdout)?.starts_with("replaced"));
    assert!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());
    assert!(std::fs::metadata(&target)?.len() > 1000);
    assert_eq!(
        std::fs::metadata(&target)?.permissions().mode() & 0o777,
        0o640,
        "mode kept"
    );
    // A new file: 0666 less the umask (022 here), not 0600.
    let fresh = dir.path().join("fresh.safetensors");
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 022 && exec '{}' convert '{}' '{}'",
            env!("CARGO_BIN_EXE_resnet"),
            path(&model),
            path(&fresh)
        ))
        .output()?;
    ensure!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        std::fs::metadata(&fresh)?.permissions().mode() & 0o777,
        0o644
    );
    // Nothing but the outputs is left in the folder: no temporary files.
    let mut names: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    names.retain(|n| n != "fifo");
    assert_eq!(
        names,
        [
            "fresh.safetensors",
            "link.safetensors",
            "target.safetensors"
        ]
    );
    Ok(())
}

#[cfg(unix)]
#[test]
fn a_killed_convert_leaves_no_temporary_file() -> Result<()> {
    // SIGTERM during a long forward pass with --output: the handler removes the
    // temporary file, the earlier output stays as it was.
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("big.safetensors");
    let output = resnet(&[
        "forward",
        "--arch",
        "resnet18",
        "--shape",
        "1,3,64,64",
        "--output",
        path(&out),
    ])?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let before = std::fs::read(&out)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args([
            "forward",
            "--arch",
            "resnet152",
            "--shape",
            "8,3,224,224",
            "--output",
        ])
        .arg(&out)
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    let status = child.wait()?;
    assert_eq!(
        status.code(),
        Some(130),
        "interrupted by the handler, not finished"
    );
    assert_eq!(std::fs::read(&out)?, before);
    let names: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(
        names,
        ["big.safetensors"],
        "only the earlier output, untouched"
    );
    Ok(())
}

#[test]
fn eight_decoding_threads_share_one_memory_budget() -> Result<()> {
    // Eight 4000x4000 JPEGs (48 MB of pixels each once decoded), eight small files that
    // claim 10000x10000 and eight PNG text bombs, decoded by 8 threads under a 256 MB
    // budget.
    let data = tempfile::tempdir()?;
    let class = data.path().join("big");
    std::fs::create_dir(&class)?;
    for i in 0..8 {
        resnet_tests::write_gradient_jpeg(&class.join(format!("{i}.jpg")), 4000, 4000)?;
    }
    let small = std::fs::read(corpus("rgb_420.jpg"))?;
    let claim = resnet_tests::jpeg_claiming_size(&small, 10_000, 10_000)?;
    for i in 0..8 {
        std::fs::write(class.join(format!("claim{i}.jpg")), &claim)?;
    }
    // And eight 1 MB PNGs of 450 zTXt chunks that would inflate to 2 MiB each (900 MiB a
    // file): refused, as Pillow refuses them, after inflating one chunk up to 1 MiB.
    let zeros = vec![0u8; 2 << 20];
    let mut ztxt = b"Comment\0\0".to_vec();
    ztxt.extend(miniz_oxide::deflate::compress_to_vec_zlib(&zeros, 9));
    let chunks = vec![resnet_tests::png_chunk(b"zTXt", &ztxt); 450];
    let bomb = resnet_tests::png_with_chunks(&std::fs::read(corpus("rgb.png"))?, &chunks);
    assert!(bomb.len() > 900_000, "{} bytes", bomb.len());
    for i in 0..8 {
        std::fs::write(class.join(format!("text{i}.png")), &bomb)?;
    }
    let output = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .env("RESNET_DECODE_MEMORY_MB", "256")
        .args([
            "--threads",
            "8",
            "eval",
            "--json",
            "--batch-size",
            "16",
            "--data",
        ])
        .arg(data.path())
        .output()?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let summary: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(summary["images"], 8);
    assert_eq!(summary["unreadable"], 16);
    let peak_mb = summary["peak_rss_bytes"]
        .as_f64()
        .context("peak_rss_bytes")?
        / 1e6;
    eprintln!("peak RSS {peak_mb:.0} MB");
    // Stated bound: the budget plus 200 MB for the binary, model and batches (without
    // the budget, eight images at once take about 8 x 96 MB on top).
    assert!(
        peak_mb < 256.0 * 1.048_576 + 200.0,
        "peak RSS {peak_mb:.0} MB"
    );
    Ok(())
}
