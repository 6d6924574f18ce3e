//! First contact: the README's first command, run as a user runs it on a fresh clone
//! with nothing beside it (no `../shared`), on the embedded default model and the sample
//! images in `weights/samples`. Its predictions must be PyTorch's
//! (`weights/samples.json`, made by `scripts/make_samples.py` from PyTorch's predictions
//! on the CIFAR-10 test set).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The arguments of the README's first `cargo run` command (after `--`): the binary this
/// test runs is the one `cargo run --release -p resnet-cli` builds.
fn readme_first_command() -> Result<Vec<String>> {
    let readme = std::fs::read_to_string(repo_root().join("README.md"))?;
    let block = readme
        .split("```bash")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .context("README.md has no ```bash block")?;
    let line = block
        .lines()
        .find(|l| l.trim_start().starts_with("cargo run"))
        .context("the README's first bash block has no `cargo run` command")?;
    ensure!(
        !line.contains("../shared"),
        "the README's first command needs ../shared, which a user's clone does not have: {line}"
    );
    let Some((cargo, args)) = line.split_once(" -- ") else {
        bail!("expected `cargo run ... -p resnet-cli -- ARGS`, found: {line}");
    };
    ensure!(
        cargo.contains("-p resnet-cli"),
        "not the resnet binary: {line}"
    );
    Ok(args.split_whitespace().map(String::from).collect())
}

/// A fresh clone of the committed tree in `dir` (a copy of `weights/` where git or the
/// repository is not there), with no `../shared` beside it.
fn fresh_clone(dir: &Path) -> Result<PathBuf> {
    let clone = dir.join("resnet");
    let cloned = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(repo_root())
        .arg(&clone)
        .status()
        .is_ok_and(|s| s.success());
    if !cloned {
        eprintln!("git clone failed: copying weights/ only");
        copy_tree(&repo_root().join("weights"), &clone.join("weights"))?;
    }
    ensure!(!dir.join("shared").exists(), "../shared beside the clone");
    Ok(clone)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn readme_first_command_runs_on_a_fresh_clone() -> Result<()> {
    let args = readme_first_command()?;
    let dir = tempfile::tempdir()?;
    let clone = fresh_clone(dir.path())?;
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_resnet"))
            .args(&args)
            .args(extra)
            .current_dir(&clone)
            .env_remove("HF_HUB_CACHE")
            .env("HF_HOME", dir.path().join("hf-home"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
    };
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(
        repo_root().join("weights/samples.json"),
    )?)?;
    let expected_top1 = reference["top1"].as_f64().context("top1")?;
    let expected = reference["predictions"]
        .as_object()
        .context("predictions")?;

    // As printed for a user.
    let output = run(&[])?;
    let stdout = String::from_utf8(output.stdout)?;
    let stderr = String::from_utf8(output.stderr)?;
    ensure!(output.status.success(), "{args:?} failed: {stderr}");
    eprintln!("$ resnet {}\n{stderr}{stdout}", args.join(" "));
    assert!(stderr.contains("using the embedded"), "{stderr}");
    assert!(
        stdout.contains(&format!("images:     {} (0 unreadable)", expected.len())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("top-1:      {:.2}%", expected_top1 * 100.0)),
        "{stdout}"
    );

    // Image by image against PyTorch.
    let predictions = dir.path().join("predictions.json");
    let output = run(&[
        "--json",
        "--predictions",
        predictions.to_str().context("path")?,
    ])?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ours: Value = serde_json::from_str(&std::fs::read_to_string(&predictions)?)?;
    for (image, class) in expected {
        assert_eq!(&ours["predictions"][image.as_str()], class, "{image}");
    }
    Ok(())
}

#[test]
fn classify_without_model_uses_the_embedded_default() -> Result<()> {
    let ship = repo_root().join("weights/samples/ship/0000.jpg");
    let output = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(["classify", "--top-k", "1", "--json"])
        .arg(&ship)
        .output()?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(result["images"][0]["predictions"][0]["label"], "ship");
    let stderr = String::from_utf8(output.stderr)?;
    assert_eq!(stderr.lines().count(), 1, "one line of note: {stderr}");
    Ok(())
}

#[test]
fn version_help_and_completions() -> Result<()> {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_resnet"))
            .args(args)
            .output()
    };
    let version = String::from_utf8(run(&["--version"])?.stdout)?;
    assert!(
        version.starts_with("resnet ") && version.contains("features: hub"),
        "{version}"
    );
    for command in [
        "classify",
        "eval",
        "forward",
        "inspect",
        "convert",
        "bench",
        "completions",
    ] {
        let help = String::from_utf8(run(&[command, "--help"])?.stdout)?;
        assert!(help.contains("Examples:\n  resnet "), "{command}: {help}");
    }
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let output = run(&["completions", shell])?;
        let script = String::from_utf8(output.stdout)?;
        assert!(
            output.status.success() && script.contains("classify"),
            "{shell}"
        );
    }
    // The bash script completes a subcommand and a flag, where bash is installed.
    let bash = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source <('{}' completions bash) && COMP_WORDS=(resnet cl) COMP_CWORD=1 && \
             _resnet resnet cl resnet && echo \"${{COMPREPLY[@]}}\" && \
             COMP_WORDS=(resnet eval --da) COMP_CWORD=2 && _resnet resnet --da eval && \
             echo \"${{COMPREPLY[@]}}\"",
            env!("CARGO_BIN_EXE_resnet")
        ))
        .output();
    match bash {
        Ok(output) if output.status.success() => {
            assert_eq!(String::from_utf8(output.stdout)?, "classify\n--data\n");
        }
        _ => eprintln!("SKIPPED the bash completion check: no bash"),
    }
    let output = run(&["completions", "tcsh"])?;
    let stderr = String::from_utf8(output.stderr)?;
    assert!(
        !output.status.success() && stderr.contains("tcsh"),
        "{stderr}"
    );
    Ok(())
}
