//! `resnet train` under faults: killed at every write of a checkpoint, resumed with
//! changed flags or a corrupted state, two runs on one output, a foreign output folder,
//! and reproducibility (the same run twice writes the same bytes).
//!
//! Kills use the test hook `RESNET_TEST_ABORT_AT=POINT:N` (`resnet_io::fault_point`): the
//! process aborts the N-th time it reaches POINT, as a SIGKILL would end it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use candle_core::Device;

fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Two images of each class of the sample set: 20 images, 4 batches of 6 an epoch.
fn small_data(dir: &Path) -> Result<PathBuf> {
    let data = dir.join("data");
    let samples = repo_path("weights/samples");
    let mut classes: Vec<PathBuf> = std::fs::read_dir(&samples)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    classes.sort();
    for class in classes {
        let name = class.file_name().context("class name")?;
        std::fs::create_dir_all(data.join(name))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&class)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        files.sort();
        for file in files.iter().take(2) {
            std::fs::copy(
                file,
                data.join(name).join(file.file_name().context("name")?),
            )?;
        }
    }
    Ok(data)
}

/// `resnet train` with the run's flags (2 epochs, batch 6, lr 0.05; `extra` may give
/// others), then `extra`, with `RESNET_TEST_ABORT_AT` set to `abort_at` if given.
fn train(data: &Path, extra: &[&str], abort_at: Option<&str>) -> Result<Output> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_resnet"));
    command.args(["--threads", "2", "train", "--data", path(data)]);
    for (flag, value) in [("--epochs", "2"), ("--batch-size", "6"), ("--lr", "0.05")] {
        if !extra.contains(&flag) {
            command.args([flag, value]);
        }
    }
    command.args(extra);
    command.env_remove("RESNET_TEST_ABORT_AT");
    if let Some(point) = abort_at {
        command.env("RESNET_TEST_ABORT_AT", point);
    }
    Ok(command.output()?)
}

fn model_tensors(dir: &Path) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    Ok(candle_core::safetensors::load(
        dir.join("model.safetensors"),
        &Device::Cpu,
    )?)
}

fn identical(a: &Path, b: &Path) -> Result<bool> {
    let (a, b) = (model_tensors(a)?, model_tensors(b)?);
    if a.len() != b.len() {
        return Ok(false);
    }
    for (name, tensor) in &a {
        let Some(other) = b.get(name) else {
            return Ok(false);
        };
        if (tensor - other)?.abs()?.max_all()?.to_scalar::<f32>()? != 0.0 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn partial_files(dir: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect())
}

/// The flags of a run from scratch into `out` that stops after its first epoch.
fn one_epoch_args(out: &Path) -> [&str; 6] {
    [
        "--arch",
        "resnet20",
        "--output",
        path(out),
        "--stop-after-epochs",
        "1",
    ]
}

/// The sample data in `dir` and a run of it from scratch stopped after its first epoch,
/// whose output is returned beside it.
fn one_epoch_from_scratch(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let data = small_data(dir)?;
    let out = dir.join("out");
    let args = one_epoch_args(&out);
    let output = train(&data, &args, None)?;
    ensure!(output.status.success(), "{}", stderr(&output));
    Ok((data, out))
}

/// Killed at every point of both checkpoints' writes (each file's temporary written, each
/// rename, between the state and the model), then resumed: the final model equals an
/// uninterrupted run's bit for bit, or (a kill before the first checkpoint was complete)
/// the resume refuses in one line and a fresh start succeeds. Never a different model,
/// never a temporary file left behind.
#[test]
fn killed_at_every_checkpoint_write_the_run_resumes_exactly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = small_data(dir.path())?;
    let from = repo_path("weights/resnet20.safetensors");
    let straight = dir.path().join("straight");
    let output = train(
        &data,
        &["--model", path(&from), "--output", path(&straight)],
        None,
    )?;
    ensure!(output.status.success(), "{}", stderr(&output));

    // Per checkpoint: four files (state, model, config.json, the curves), each written
    // then renamed, and the point between the first two: two checkpoints in the run.
    let mut points = Vec::new();
    for n in 1..=8 {
        points.push(format!("output-written:{n}"));
        points.push(format!("output-renamed:{n}"));
    }
    points.extend([
        "checkpoint-first-file-written:1".into(),
        "checkpoint-first-file-written:2".into(),
    ]);
    let (mut exact, mut refused) = (Vec::new(), Vec::new());
    for point in &points {
        let out = dir.path().join(format!("run-{}", point.replace(':', "-")));
        let killed = train(
            &data,
            &["--model", path(&from), "--output", path(&out)],
            Some(point),
        )?;
        ensure!(!killed.status.success(), "{point}: the run was not killed");
        let resumed = train(&data, &["--resume", path(&out)], None)?;
        if resumed.status.success() {
            ensure!(
                identical(&out, &straight)?,
                "{point}: resumed to a different model"
            );
            // Every file, byte for byte (the history's numbers re-written exactly).
            for file in [
                "model.safetensors",
                "training-state.safetensors",
                "config.json",
            ] {
                ensure!(
                    std::fs::read(out.join(file))? == std::fs::read(straight.join(file))?,
                    "{point}: {file} differs from the uninterrupted run's"
                );
            }
            exact.push(point.clone());
        } else {
            let text = stderr(&resumed);
            ensure!(
                text.contains("no training state") && text.trim_end().lines().count() == 1,
                "{point}: {text}"
            );
            // Started again as the message says, it ends where the straight run did.
            let again = train(
                &data,
                &[
                    "--model",
                    path(&from),
                    "--output",
                    path(&out),
                    "--overwrite",
                ],
                None,
            )?;
            ensure!(again.status.success(), "{point}: {}", stderr(&again));
            ensure!(
                identical(&out, &straight)?,
                "{point}: restarted to a different model"
            );
            refused.push(point.clone());
        }
        let left = partial_files(&out)?;
        ensure!(left.is_empty(), "{point}: temporary files left: {left:?}");
    }
    eprintln!(
        "{} kill points: {} resumed exactly, {} refused (no complete checkpoint yet): {refused:?}",
        points.len(),
        exact.len(),
        refused.len()
    );
    // Only kills inside the first checkpoint, before its state is renamed into place
    // (the model, config.json, then the state: the third file), leave nothing to resume.
    let first_checkpoint = [
        "output-written:1",
        "output-renamed:1",
        "output-written:2",
        "output-renamed:2",
        "output-written:3",
        "checkpoint-first-file-written:1",
    ];
    ensure!(
        refused
            .iter()
            .all(|p| first_checkpoint.contains(&p.as_str())),
        "refused: {refused:?}"
    );
    ensure!(exact.len() == points.len() - refused.len());
    Ok(())
}

/// Every setting that decides the run is compared on resume: a changed one is refused
/// naming the flag and both values, before anything is written; `--epochs` may grow.
#[test]
fn a_resume_with_other_settings_is_refused_and_touches_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, out) = one_epoch_from_scratch(dir.path())?;
    let before: Vec<Vec<u8>> = ["model.safetensors", "training-state.safetensors"]
        .iter()
        .map(|f| std::fs::read(out.join(f)))
        .collect::<std::io::Result<_>>()?;
    for (flags, expected) in [
        (vec!["--lr", "0.1"], "--lr: the run had 0.05, this one 0.1"),
        (
            vec!["--momentum", "0.5"],
            "--momentum: the run had 0.9, this one 0.5",
        ),
        (vec!["--weight-decay", "0.001"], "--weight-decay"),
        (vec!["--label-smoothing", "0.1"], "--label-smoothing"),
        (vec!["--no-augment"], "augmentation"),
        (vec!["--no-shuffle"], "shuffle"),
        (
            vec!["--schedule", "constant"],
            "--schedule: the run had cosine, this one constant",
        ),
        (vec!["--warmup-epochs", "1"], "--warmup-epochs"),
        (
            vec!["--clip-grad-norm", "1"],
            "--clip-grad-norm: the run had off, this one 1",
        ),
        (
            vec!["--no-decay-on-norm-and-bias"],
            "parameters without decay",
        ),
    ] {
        let mut args = vec!["--resume", path(&out)];
        args.extend(flags.iter());
        let output = train(&data, &args, None)?;
        let text = stderr(&output);
        ensure!(
            !output.status.success() && text.contains(expected),
            "{flags:?}: {text}"
        );
        ensure!(text.trim_end().lines().count() == 1, "{flags:?}: {text}");
    }
    // The data changed: one image fewer, then one image's bytes.
    let image = std::fs::read_dir(data.join("cat"))?
        .next()
        .context("an image")??
        .path();
    let bytes = std::fs::read(&image)?;
    std::fs::write(&image, [&bytes[..], b"\0"].concat())?;
    let output = train(&data, &["--resume", path(&out)], None)?;
    ensure!(
        !output.status.success() && stderr(&output).contains("data fingerprint"),
        "{}",
        stderr(&output)
    );
    std::fs::write(&image, &bytes)?;
    for (file, saved) in ["model.safetensors", "training-state.safetensors"]
        .iter()
        .zip(&before)
    {
        ensure!(
            &std::fs::read(out.join(file))? == saved,
            "{file} was touched"
        );
    }
    // More epochs is allowed.
    let output = train(&data, &["--resume", path(&out), "--epochs", "3"], None)?;
    ensure!(output.status.success(), "{}", stderr(&output));
    Ok(())
}

/// A state whose fields were changed is refused, each in one line.
#[test]
fn a_corrupted_state_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, out) = one_epoch_from_scratch(dir.path())?;
    let state_path = out.join("training-state.safetensors");
    let original = std::fs::read(&state_path)?;
    let file = resnet_io::Checkpoint::open(&state_path)?;
    let tensors: Vec<(String, candle_core::Tensor)> = file
        .tensors()
        .iter()
        .map(|info| {
            Ok((
                info.name.clone(),
                file.load(&info.name, &Device::Cpu, candle_core::DType::F32)?,
            ))
        })
        .collect::<Result<_>>()?;
    let metadata = file.metadata().clone();
    let rewrite = |key: &str, value: &str| -> Result<()> {
        let mut changed = metadata.clone();
        changed.insert(key.to_string(), value.to_string());
        resnet_io::write_tensors(&state_path, &tensors, Some(changed.into_iter().collect()))?;
        Ok(())
    };
    for (key, value, expected) in [
        ("iteration", "999", "iteration 999"),
        ("history", "not json", "history"),
        ("settings", "{", "settings"),
        ("step", "1000", "optimizer steps"),
        ("epoch", "7", "'epoch' 7"),
        ("tensors_sha256", "00", "checksum"),
    ] {
        rewrite(key, value)?;
        let output = train(&data, &["--resume", path(&out)], None)?;
        let text = stderr(&output);
        ensure!(
            !output.status.success() && text.contains(expected),
            "{key}: {text}"
        );
        ensure!(text.trim_end().lines().count() == 1, "{key}: {text}");
    }
    // Four changed bytes in the middle of the tensors' data.
    let mut corrupt = original.clone();
    let middle = corrupt.len() * 3 / 4;
    for byte in &mut corrupt[middle..middle + 4] {
        *byte ^= 0x5a;
    }
    std::fs::write(&state_path, &corrupt)?;
    let output = train(&data, &["--resume", path(&out)], None)?;
    ensure!(
        !output.status.success() && stderr(&output).contains("checksum"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

/// A folder holding a model that no training run wrote is refused unless --overwrite.
#[test]
fn a_foreign_output_folder_is_refused_without_overwrite() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = small_data(dir.path())?;
    let out = dir.path().join("someone-elses-model");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("config.json"), "{\"theirs\": true}")?;
    let args = one_epoch_args(&out);
    let output = train(&data, &args, None)?;
    let text = stderr(&output);
    ensure!(
        !output.status.success() && text.contains("--overwrite") && text.contains("config.json"),
        "{text}"
    );
    ensure!(std::fs::read_to_string(out.join("config.json"))? == "{\"theirs\": true}");
    let output = train(&data, &[&args[..], &["--overwrite"]].concat(), None)?;
    ensure!(output.status.success(), "{}", stderr(&output));
    Ok(())
}

/// A second run on the same output is refused, naming the process that holds it; once
/// that process is gone (killed), its lock is taken over.
#[cfg(unix)]
#[test]
fn one_run_per_output() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = small_data(dir.path())?;
    let out = dir.path().join("out");
    let mut first = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args([
            "--threads",
            "1",
            "train",
            "--arch",
            "resnet20",
            "--data",
            path(&data),
        ])
        .args([
            "--epochs",
            "1000",
            "--batch-size",
            "6",
            "--output",
            path(&out),
        ])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let lock = out.join(".training.lock");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != first.id().to_string() {
        ensure!(
            started.elapsed().as_secs() < 60,
            "the first run never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = train(&data, &["--arch", "resnet20", "--output", path(&out)], None)?;
    let text = stderr(&second);
    first.kill()?;
    first.wait()?;
    ensure!(
        !second.status.success() && text.contains(&format!("process {}", first.id())),
        "{text}"
    );
    let third = train(
        &data,
        &[
            "--arch",
            "resnet20",
            "--output",
            path(&out),
            "--overwrite",
            "--stop-after-epochs",
            "1",
        ],
        None,
    )?;
    ensure!(third.status.success(), "{}", stderr(&third));
    Ok(())
}

/// The same run twice, from scratch with a seed: the same bytes in every file.
#[test]
fn the_same_run_twice_writes_the_same_bytes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = small_data(dir.path())?;
    let run = |name: &str| -> Result<PathBuf> {
        let out = dir.path().join(name);
        let output = train(&data, &["--arch", "resnet20", "--output", path(&out)], None)?;
        ensure!(output.status.success(), "{}", stderr(&output));
        Ok(out)
    };
    let (a, b) = (run("a")?, run("b")?);
    for file in [
        "model.safetensors",
        "training-state.safetensors",
        "config.json",
    ] {
        ensure!(
            std::fs::read(a.join(file))? == std::fs::read(b.join(file))?,
            "{file} differs between two identical runs"
        );
    }
    // Another seed, another start.
    let out = dir.path().join("c");
    let output = train(
        &data,
        &["--arch", "resnet20", "--output", path(&out), "--seed", "4"],
        None,
    )?;
    ensure!(output.status.success(), "{}", stderr(&output));
    ensure!(
        !identical(&a, &out)?,
        "seeds 3 and 4 trained the same network"
    );
    Ok(())
}

/// `--keep-checkpoints 2`: the last two epochs' checkpoints stay, each resumable to the
/// end of the uninterrupted run.
#[test]
fn kept_checkpoints_are_the_last_k_and_each_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = small_data(dir.path())?;
    let out = dir.path().join("out");
    let epochs = ["--epochs", "3"];
    let args = [
        &[
            "--arch",
            "resnet20",
            "--output",
            path(&out),
            "--keep-checkpoints",
            "2",
        ],
        &epochs[..],
    ]
    .concat();
    let output = train(&data, &args, None)?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let kept = out.join("checkpoints");
    let mut names: Vec<String> = std::fs::read_dir(&kept)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    ensure!(names == ["epoch-0002", "epoch-0003"], "{names:?}");
    // The last kept one is the output's own checkpoint.
    for file in ["model.safetensors", "training-state.safetensors"] {
        ensure!(
            std::fs::read(kept.join("epoch-0003").join(file))? == std::fs::read(out.join(file))?
        );
    }
    // Resumed from epoch 2 into another folder, it ends where the run did.
    let again = dir.path().join("again");
    let from = kept.join("epoch-0002");
    let resume = [
        &["--resume", path(&from), "--output", path(&again)],
        &epochs[..],
    ]
    .concat();
    let output = train(&data, &resume, None)?;
    ensure!(output.status.success(), "{}", stderr(&output));
    ensure!(
        identical(&again, &out)?,
        "resumed from a kept checkpoint to another model"
    );
    Ok(())
}

/// Unmounts its folder when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A disk that fills up during a run: the failed checkpoint leaves the previous one
/// complete, and once there is room again the run resumes to the uninterrupted run's
/// model. Needs a 100 MiB tmpfs: skipped where mounting one is not permitted.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_leaves_the_previous_checkpoint_resumable() -> Result<()> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk");
    std::fs::create_dir_all(&disk)?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=100m", "tmpfs", path(&disk)])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs privileges)");
        return Ok(());
    }
    let _unmount = Mounted(disk.clone());
    let data = repo_path("weights/samples");
    let flags = [
        "--arch",
        "resnet20",
        "--epochs",
        "8",
        "--batch-size",
        "10",
        "--lr",
        "0.05",
    ];
    let out = disk.join("out");
    let mut run = Command::new(env!("CARGO_BIN_EXE_resnet"));
    let child = run
        .args(["--threads", "2", "train", "--data", path(&data)])
        .args(flags)
        .args(["--output", path(&out)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Filled up once the first checkpoint is complete.
    let started = std::time::Instant::now();
    while !out.join("training-state.safetensors").exists() {
        ensure!(started.elapsed().as_secs() < 120, "no first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut filler = std::fs::File::create(disk.join("filler"))?;
    let block = vec![0u8; 1 << 20];
    while filler.write_all(&block).is_ok() {}
    drop(filler);
    let failed = child.wait_with_output()?;
    let text = stderr(&failed);
    ensure!(
        !failed.status.success()
            && text.contains("No space left")
            && text.contains(&format!("--resume {}", out.display())),
        "{text}"
    );
    std::fs::remove_file(disk.join("filler"))?;
    let straight = dir.path().join("straight");
    let mut args = vec!["--output", path(&straight)];
    args.extend(flags);
    let output = train(&data, &args, None)?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let mut args = vec!["--resume", path(&out)];
    args.extend(&flags[2..]);
    let output = train(&data, &args, None)?;
    ensure!(output.status.success(), "{}", stderr(&output));
    ensure!(
        identical(&out, &straight)?,
        "resumed after a full disk to another model"
    );
    Ok(())
}
