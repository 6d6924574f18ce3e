//! `resnet train` end to end: step for step as torch.optim.SGD, and the bad inputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use resnet_tests::{assert_close, F32_RELATIVE_TOLERANCE};

fn resnet(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(args)
        .output()?)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A path inside the repository (the embedded model, the sample images).
fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

/// The first `per_class` images of each class of `source`, as an ImageFolder tree in `dir`.
fn subset(source: &Path, dir: &Path, per_class: usize) -> Result<()> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(source)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    classes.sort();
    for class in classes {
        let name = class.file_name().context("class name")?;
        std::fs::create_dir_all(dir.join(name))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&class)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        files.sort();
        for file in files.iter().take(per_class) {
            std::fs::copy(
                file,
                dir.join(name).join(file.file_name().context("file name")?),
            )?;
        }
    }
    Ok(())
}

/// Runs the training issue's parity command (`--lr` varies) on the first 6 images of
/// each class of the CIFAR-10 training set and compares the saved checkpoint with the
/// fixture `fixtures/train/resnet20_sgd_3_steps_{name}.safetensors`
/// (`fixtures/generate_train_step.py`) within `tolerance` (max |Δ| ≤ tolerance · max
/// |reference|, per tensor). Returns the number of tensors compared.
fn check_train_steps(shared: &Path, lr: &str, name: &str, tolerance: f64) -> Result<usize> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    subset(&shared.join("data/cifar10-train"), &data, 6)?;
    let out = dir.path().join("out.safetensors");
    let model = shared.join("weights/cifar10/resnet20.safetensors");
    let output = parity_command(&model, &data, lr, &out)?;
    let ours = candle_core::safetensors::load(&out, &Device::Cpu)?;
    let fixture =
        resnet_tests::fixtures_dir().join(format!("train/resnet20_sgd_3_steps_{name}.safetensors"));
    let expected = candle_core::safetensors::load(&fixture, &Device::Cpu)?;
    let mut compared = 0;
    for (tensor_name, reference) in &expected {
        if tensor_name == "losses" {
            continue;
        }
        let tensor = ours
            .get(tensor_name)
            .with_context(|| format!("{tensor_name} not saved"))?;
        assert_close(
            tensor,
            reference,
            tolerance,
            &format!("{name}: {tensor_name}"),
        )?;
        compared += 1;
    }
    assert_eq!(
        compared,
        ours.len(),
        "every saved tensor compared, CIFAR names kept"
    );
    check_mean_loss(&output, &expected, tolerance, name)?;
    Ok(compared)
}

/// The epoch's mean train loss (`--json`) against the mean of the fixture's `losses`.
fn check_mean_loss(
    output: &Output,
    expected: &std::collections::HashMap<String, candle_core::Tensor>,
    tolerance: f64,
    name: &str,
) -> Result<()> {
    let epoch: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let mean_loss = f64::from(expected["losses"].mean_all()?.to_scalar::<f32>()?);
    let ours_loss = epoch["train_loss"].as_f64().context("train_loss")?;
    ensure!(
        (ours_loss - mean_loss).abs() <= tolerance * mean_loss.abs(),
        "{name}: mean loss {ours_loss} against {mean_loss}"
    );
    Ok(())
}

/// The training issue's parity command: one epoch of `model` on `data`, batch 20, SGD at
/// `lr` with momentum 0.9 and weight decay 5e-4, constant rate, sorted order, no
/// augmentation, the result saved to `out`.
fn parity_command(model: &Path, data: &Path, lr: &str, out: &Path) -> Result<Output> {
    let output = resnet(&[
        "train",
        "--model",
        path(model),
        "--data",
        path(data),
        "--epochs",
        "1",
        "--batch-size",
        "20",
        "--lr",
        lr,
        "--momentum",
        "0.9",
        "--weight-decay",
        "5e-4",
        "--schedule",
        "constant",
        "--no-shuffle",
        "--no-augment",
        "--output",
        path(out),
        "--json",
    ])?;
    ensure!(output.status.success(), "{}", stderr(&output));
    Ok(output)
}

/// The parity command on a timm-style model directory (config.json + model.safetensors):
/// timm's resnet18 with 10 classes, seeded weights (`hashed_tensor`, which the fixture
/// script's `hash_init` reproduces), a 32x32 `pretrained_cfg` with crop_pct 1 and
/// ImageNet's mean and std; lr 0.01 against PyTorch in float64. This network is
/// ill-conditioned in float32 (hashed weights, BatchNorm over 1x1 maps): PyTorch's own
/// float32 run ends up to 17% of a tensor's largest value from its float64 run (the
/// fixture's `float32_deviation`) and differs about as much between an AVX2 and an
/// AVX-512 CPU, so the tensors and the mean loss are held to that deviation (rounded up to
/// 0.2): a check of the model directory's plumbing (timm's names kept, its
/// `pretrained_cfg` applied), which the ResNet-20 tests hold to 1e-4. The fixture keeps every running statistic and a strided sample of each other
/// tensor (resnet18 is 45 MB): every `step`-th value, step = ceil(n / 2048) above 4096
/// values (`fixtures/generate_train_step.py`).
#[test]
fn train_command_as_pytorch_sgd_on_a_timm_model_directory() -> Result<()> {
    let Some(shared) =
        resnet_tests::shared_dir("train_command_as_pytorch_sgd_on_a_timm_model_directory")
    else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    subset(&shared.join("data/cifar10-train"), &data, 6)?;
    let model_dir = dir.path().join("timm-resnet18");
    std::fs::create_dir(&model_dir)?;
    let config = resnet_core::ResNetConfig::resnet18().with_num_classes(10);
    let seeded = resnet_tests::hashed_var_builder(candle_core::DType::F32, &Device::Cpu);
    let model = resnet_core::ResNet::new(&config, seeded)?;
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        model.named_tensors()?.into_iter().collect();
    candle_core::safetensors::save(&tensors, model_dir.join("model.safetensors"))?;
    let timm_config = serde_json::json!({
        "architecture": "resnet18",
        "num_classes": 10,
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
    });
    std::fs::write(model_dir.join("config.json"), timm_config.to_string())?;

    let out = dir.path().join("out.safetensors");
    let output = parity_command(&model_dir, &data, "0.01", &out)?;
    let ours = candle_core::safetensors::load(&out, &Device::Cpu)?;
    let fixture =
        resnet_tests::fixtures_dir().join("train/resnet18_timm_sgd_3_steps_lr0.01_f64.safetensors");
    let expected = candle_core::safetensors::load(&fixture, &Device::Cpu)?;
    let deviation: f64 = resnet_io::Checkpoint::open(&fixture)?
        .metadata()
        .get("float32_deviation")
        .context("float32_deviation")?
        .parse()?;
    const ILL_CONDITIONED_TOLERANCE: f64 = 0.2;
    ensure!(
        deviation <= ILL_CONDITIONED_TOLERANCE,
        "the fixture's deviation {deviation}"
    );
    let mut compared = 0;
    for (name, reference) in &expected {
        if name == "losses" {
            continue;
        }
        let tensor = ours
            .get(name)
            .with_context(|| format!("{name} not saved"))?
            .flatten_all()?;
        let count = tensor.elem_count();
        let step = if count <= 4096 || name.contains("running") {
            1
        } else {
            count.div_ceil(2048)
        };
        let indices: Vec<u32> = (0..count).step_by(step).map(|i| i as u32).collect();
        let indices = candle_core::Tensor::new(indices.as_slice(), &Device::Cpu)?;
        let sampled = tensor.index_select(&indices, 0)?;
        assert_close(
            &sampled,
            reference,
            ILL_CONDITIONED_TOLERANCE,
            &format!("resnet18: {name}"),
        )?;
        compared += 1;
    }
    assert_eq!(
        compared,
        ours.len(),
        "every saved tensor compared, timm names kept"
    );
    assert_eq!(compared, 102);
    check_mean_loss(&output, &expected, ILL_CONDITIONED_TOLERANCE, "resnet18")
}

/// The training issue's step-parity command, as given (lr 0.1): this short run diverges
/// (loss 1.70 -> 4.00 -> 3.44), and PyTorch's own float32 run ends 1.6e-3 (relative)
/// from its float64 run, so the reference is PyTorch in float64 and the tolerance that
/// float32 error, rounded up: 2e-3, stated before the test first ran.
#[test]
fn train_command_as_pytorch_sgd_at_lr_0_1() -> Result<()> {
    let Some(shared) = resnet_tests::shared_dir("train_command_as_pytorch_sgd_at_lr_0_1") else {
        return Ok(());
    };
    assert_eq!(check_train_steps(&shared, "0.1", "lr0.1_f64", 2e-3)?, 97);
    Ok(())
}

/// The same command at lr 0.01, where float32 is exact (PyTorch's float32 and float64
/// runs agree within 2e-7): the project's f32 tolerance, 1e-4, against PyTorch float32.
#[test]
fn train_command_as_pytorch_sgd_at_lr_0_01() -> Result<()> {
    let Some(shared) = resnet_tests::shared_dir("train_command_as_pytorch_sgd_at_lr_0_01") else {
        return Ok(());
    };
    let compared = check_train_steps(&shared, "0.01", "lr0.01_f32", F32_RELATIVE_TOLERANCE)?;
    assert_eq!(compared, 97);
    Ok(())
}

#[test]
fn trains_writes_a_model_directory_every_command_reads() -> Result<()> {
    let samples = repo_path("weights/samples");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    subset(&samples, &data, 2)?;
    let out = dir.path().join("model");
    let model = repo_path("weights/resnet20.safetensors");
    let output = resnet(&[
        "train",
        "--model",
        path(&model),
        "--data",
        path(&data),
        "--val",
        path(&data),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--output",
        path(&out),
        "--json",
    ])?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<serde_json::Result<_>>()?;
    assert_eq!(lines.len(), 2, "one JSON line per epoch");
    let curves = std::fs::read_to_string(out.join("training-curves.svg"))?;
    assert!(
        curves.starts_with("<svg") && curves.matches("<polyline").count() == 2,
        "{curves}"
    );
    assert!(out.join("training-state.safetensors").is_file());
    assert!(lines[1]["val_top1"].as_f64().is_some());
    let eval = resnet(&[
        "eval",
        "--model",
        path(&out),
        "--data",
        path(&data),
        "--json",
    ])?;
    ensure!(eval.status.success(), "{}", stderr(&eval));
    let summary: serde_json::Value = serde_json::from_slice(&eval.stdout)?;
    assert_eq!(summary["images"], 20);
    // A frozen backbone with a new head: only fc changes.
    let small = dir.path().join("three");
    subset(&data, &small, 2)?;
    for class in ["automobile", "bird", "cat", "deer", "dog", "frog", "horse"] {
        std::fs::remove_dir_all(small.join(class))?;
    }
    let frozen = dir.path().join("frozen.safetensors");
    let output = resnet(&[
        "train",
        "--model",
        path(&model),
        "--data",
        path(&small),
        "--epochs",
        "1",
        "--batch-size",
        "3",
        "--freeze-backbone",
        "--output",
        path(&frozen),
    ])?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let before = candle_core::safetensors::load(&model, &Device::Cpu)?;
    let after = candle_core::safetensors::load(&frozen, &Device::Cpu)?;
    assert_eq!(after["linear.weight"].dims(), &[3, 64]);
    for (name, tensor) in &after {
        if !name.starts_with("linear.") {
            let diff = (tensor - &before[name])?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name} changed with a frozen backbone");
        }
    }
    Ok(())
}

#[test]
fn bad_training_inputs_are_one_line_errors() -> Result<()> {
    let samples = repo_path("weights/samples");
    let dir = tempfile::tempdir()?;
    let one_class = dir.path().join("one");
    std::fs::create_dir_all(one_class.join("cat"))?;
    std::fs::copy(samples.join("cat/0000.jpg"), one_class.join("cat/0000.jpg"))?;
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("cat"))?;
    std::fs::create_dir_all(empty.join("dog"))?;
    let samples = path(&samples);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--arch",
                "resnet20",
                "--data",
                path(&one_class),
                "--epochs",
                "1",
            ],
            "needs at least 2",
        ),
        (
            vec![
                "--arch",
                "resnet20",
                "--data",
                path(&empty),
                "--epochs",
                "1",
            ],
            "no image files",
        ),
        (
            vec![
                "--arch",
                "resnet20",
                "--data",
                samples,
                "--epochs",
                "1",
                "--num-classes",
                "7",
            ],
            "--num-classes 7 contradicts",
        ),
        (
            vec![
                "--arch",
                "resnet20",
                "--data",
                samples,
                "--epochs",
                "1",
                "--batch-size",
                "1000",
            ],
            "larger than the 100 images",
        ),
        (
            vec![
                "--arch",
                "resnet20",
                "--data",
                samples,
                "--epochs",
                "1",
                "--output",
                "/proc/no/such",
            ],
            "/proc/no/such",
        ),
        (
            vec![
                "--arch",
                "resnet20",
                "--data",
                samples,
                "--epochs",
                "1",
                "--lr",
                "1e30",
                "--batch-size",
                "50",
            ],
            "training diverged",
        ),
    ];
    let mut cases = cases;
    for (flag, value, expected) in [
        (
            "--grad-accum-steps",
            "0",
            "--grad-accum-steps: expected at least 1",
        ),
        (
            "--clip-grad-norm",
            "-1",
            "--clip-grad-norm: expected a finite number above 0",
        ),
        (
            "--clip-grad-norm",
            "NaN",
            "--clip-grad-norm: expected a finite number above 0",
        ),
        (
            "--ema-decay",
            "1",
            "--ema-decay: expected a number in [0, 1)",
        ),
        (
            "--ema-decay",
            "-0.5",
            "--ema-decay: expected a number in [0, 1)",
        ),
        ("--mixup", "-0.2", "--mixup: expected an alpha >= 0"),
        ("--cutmix", "-1", "--cutmix: expected an alpha >= 0"),
        ("--val-every", "0", "--val-every: expected at least 1"),
        ("--schedule", "linear", "unknown schedule 'linear'"),
    ] {
        let args = vec![
            "--arch", "resnet20", "--data", samples, "--epochs", "1", flag, value,
        ];
        cases.push((args, expected));
    }
    for (args, expected) in cases {
        let mut full = vec!["train"];
        full.extend(args.iter().copied());
        let output = resnet(&full)?;
        let text = stderr(&output);
        assert!(!output.status.success(), "{full:?} succeeded");
        assert!(
            text.contains(expected),
            "{full:?}: expected '{expected}' in '{text}'"
        );
        assert_eq!(text.trim_end().lines().count(), 1, "{full:?}: {text}");
    }
    Ok(())
}

/// A run stopped after epoch 1 and resumed ends with the same bits as one run straight
/// through: model, BatchNorm statistics, momentum, data order and augmentation all resume.
#[test]
fn a_resumed_run_ends_bit_identical_to_one_straight_through() -> Result<()> {
    let samples = repo_path("weights/samples");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    subset(&samples, &data, 2)?;
    let model = repo_path("weights/resnet20.safetensors");
    // The run's settings; each call adds where it starts from and where it writes.
    let settings = [
        "--data",
        path(&data),
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--lr",
        "0.05",
    ];
    let train = |from: [&str; 2], seed: &str, extra: &[&str]| -> Result<Output> {
        let mut args = vec!["train", from[0], from[1], "--seed", seed];
        args.extend_from_slice(&settings);
        args.extend_from_slice(extra);
        resnet(&args)
    };
    let start = ["--model", path(&model)];
    let straight = dir.path().join("straight.safetensors");
    let output = train(start, "3", &["--output", path(&straight)])?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let resumed = dir.path().join("resumed.safetensors");
    let output = train(
        start,
        "3",
        &["--output", path(&resumed), "--stop-after-epochs", "1"],
    )?;
    ensure!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8(output.stdout)?.contains("continue with --resume"));
    let after_one = candle_core::safetensors::load(&resumed, &Device::Cpu)?;
    let output = train(["--resume", path(&resumed)], "3", &[])?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let (a, b) = (
        candle_core::safetensors::load(&straight, &Device::Cpu)?,
        candle_core::safetensors::load(&resumed, &Device::Cpu)?,
    );
    assert_eq!(a.len(), b.len());
    let mut moved = false;
    for (name, tensor) in &a {
        let diff = (tensor - &b[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name} differs after resuming");
        moved |= (tensor - &after_one[name])?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?
            > 0.0;
    }
    assert!(moved, "the resumed run trained its second epoch");
    // Resuming with other settings is refused.
    let output = train(["--resume", path(&resumed)], "4", &[])?;
    assert!(
        !output.status.success() && stderr(&output).contains("--seed 3"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

/// Ctrl-C (SIGINT) finishes the step, writes a checkpoint mid-epoch, and `--resume`
/// from it ends bit-identical to a run straight through.
#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_mid_epoch_and_the_run_resumes_exactly() -> Result<()> {
    let samples = repo_path("weights/samples");
    let model = repo_path("weights/resnet20.safetensors");
    let dir = tempfile::tempdir()?;
    let args = |output: &Path| -> Vec<String> {
        [
            "train",
            "--data",
            path(&samples),
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--lr",
            "0.01",
            "--output",
            path(output),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let straight = dir.path().join("straight.safetensors");
    let output = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(args(&straight))
        .args(["--model", path(&model)])
        .output()?;
    ensure!(output.status.success(), "{}", stderr(&output));

    let interrupted = dir.path().join("interrupted.safetensors");
    let child = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(args(&interrupted))
        .args(["--model", path(&model)])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()?;
    let output = child.wait_with_output()?;
    let text = stderr(&output);
    if output.status.success() {
        eprintln!("SKIPPED: the run ended before the signal ({text})");
        return Ok(());
    }
    assert!(
        text.contains("interrupted after step") && text.contains("--resume"),
        "{text}"
    );
    let mut resume = args(&interrupted);
    resume.extend(["--resume".to_string(), path(&interrupted).to_string()]);
    let output = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(&resume)
        .output()?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let (a, b) = (
        candle_core::safetensors::load(&straight, &Device::Cpu)?,
        candle_core::safetensors::load(&interrupted, &Device::Cpu)?,
    );
    for (name, tensor) in &a {
        let diff = (tensor - &b[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(
            diff, 0.0,
            "{name} differs after the interrupted run resumed"
        );
    }
    Ok(())
}

/// A run driven from a program with the library (`Trainer`, EMA, accumulation, clipping)
/// and stopped after its first epoch continues with `resnet train --resume`, and ends
/// with the same bits as the command straight through; resuming with another
/// architecture's state or other flags is refused without touching what is saved.
#[test]
fn a_run_started_from_a_program_resumes_with_the_command() -> Result<()> {
    use resnet_train::{
        optimizer, parameters, with_new_head, Augmentation, Checkpointer, OptimizerKind,
        OptimizerSettings, Trainer, TrainerConfig, TrainingSet,
    };
    let samples = repo_path("weights/samples");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    subset(&samples, &data, 3)?;
    let model_path = repo_path("weights/resnet20.safetensors");
    let flags = [
        "--data",
        path(&data),
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--lr",
        "0.05",
        "--grad-accum-steps",
        "2",
        "--clip-grad-norm",
        "1.0",
        "--ema-decay",
        "0.5",
        "--seed",
        "5",
    ];

    // The program: epoch 1 of 2.
    let from_program = dir.path().join("program");
    {
        let loaded =
            resnet_io::load_file(&model_path, None, &Device::Cpu, candle_core::DType::F32)?;
        let preprocess = resnet_io::PreprocessConfig::cifar();
        let set = std::sync::Arc::new(TrainingSet::open(
            &data,
            preprocess.clone(),
            Augmentation::for_input(preprocess.size),
            5,
            true,
        )?);
        let (model, varmap) = with_new_head(&loaded.model, set.classes().len())?;
        let settings = OptimizerSettings {
            lr: 0.05,
            ..OptimizerSettings::default()
        };
        let sgd = optimizer(OptimizerKind::Sgd, parameters(&varmap, false), &settings)?;
        let config = TrainerConfig {
            epochs: 2,
            batch_size: 6,
            grad_accum_steps: 2,
            clip_grad_norm: Some(1.0),
            ema_decay: Some(0.5),
            stop_after_epochs: Some(1),
            ..TrainerConfig::default()
        };
        let checkpoints = Checkpointer::new(
            &from_program,
            loaded.scheme,
            set.classes().to_vec(),
            preprocess,
        )?;
        let mut trainer = Trainer::new(model, varmap, sgd, set, config)?.checkpoint_to(checkpoints);
        let outcome = trainer.run(&std::sync::atomic::AtomicBool::new(false), &mut ())?;
        assert_eq!(outcome, resnet_train::Outcome::Paused { epochs: 1 });
    }
    let mut args = vec!["train", "--resume", path(&from_program)];
    args.extend_from_slice(&flags);
    let output = resnet(&args)?;
    ensure!(output.status.success(), "{}", stderr(&output));

    // The command straight through.
    let straight = dir.path().join("straight");
    let mut args = vec![
        "train",
        "--model",
        path(&model_path),
        "--output",
        path(&straight),
    ];
    args.extend_from_slice(&flags);
    let output = resnet(&args)?;
    ensure!(output.status.success(), "{}", stderr(&output));
    for file in ["model.safetensors", "training-state.safetensors"] {
        let a = candle_core::safetensors::load(straight.join(file), &Device::Cpu)?;
        let b = candle_core::safetensors::load(from_program.join(file), &Device::Cpu)?;
        assert_eq!(a.len(), b.len(), "{file}");
        for (name, tensor) in &a {
            let diff = (tensor - &b[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{file}: {name} differs");
        }
    }

    // Refusals leave the saved run as it was: a state of another architecture, then the
    // run's own state with other flags.
    let files = ["model.safetensors", "training-state.safetensors"];
    let saved: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(straight.join(f)))
        .collect::<std::io::Result<_>>()?;
    let other = dir.path().join("other");
    let output = resnet(&[
        "train",
        "--arch",
        "resnet32",
        "--data",
        path(&data),
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--seed",
        "5",
        "--output",
        path(&other),
    ])?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let refused = |run_flags: Vec<&str>, expected: &str| -> Result<()> {
        let mut full = vec!["train", "--resume", path(&straight)];
        full.extend(run_flags);
        let output = resnet(&full)?;
        let text = stderr(&output);
        ensure!(
            !output.status.success() && text.contains(expected),
            "{full:?}: {text}"
        );
        ensure!(text.trim_end().lines().count() == 1, "{text}");
        Ok(())
    };
    let without_ema: Vec<&str> = flags
        .iter()
        .copied()
        .filter(|a| !matches!(*a, "--ema-decay" | "0.5"))
        .collect();
    let adamw: Vec<&str> = flags
        .iter()
        .copied()
        .chain(["--optimizer", "adamw"])
        .collect();
    std::fs::copy(
        other.join("training-state.safetensors"),
        straight.join("training-state.safetensors"),
    )?;
    refused(flags.to_vec(), "the run trained")?;
    std::fs::write(straight.join("training-state.safetensors"), &saved[1])?;
    refused(without_ema, "--ema-decay: the run had 0.5, this one off")?;
    refused(adamw, "the run used --optimizer sgd")?;
    for (file, bytes) in files.iter().zip(&saved) {
        assert_eq!(
            &std::fs::read(straight.join(file))?,
            bytes,
            "{file} was touched"
        );
    }
    Ok(())
}

/// The recipe flags end to end: mixup and cutmix with label smoothing, an EMA, validation
/// every second epoch with the best model kept; the JSON lines report both networks'
/// top-1 where validated, and the best model loads in `eval`.
#[test]
fn recipe_flags_run_end_to_end() -> Result<()> {
    let samples = repo_path("weights/samples");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    subset(&samples, &data, 2)?;
    let out = dir.path().join("out");
    let output = resnet(&[
        "train",
        "--model",
        path(&repo_path("weights/resnet20.safetensors")),
        "--data",
        path(&data),
        "--val",
        path(&data),
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--mixup",
        "0.8",
        "--cutmix",
        "1.0",
        "--label-smoothing",
        "0.1",
        "--ema-decay",
        "0.9",
        "--val-every",
        "2",
        "--keep-best",
        "--output",
        path(&out),
        "--json",
    ])?;
    ensure!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    ensure!(lines.len() == 3, "{lines:?}");
    // Validated after epoch 2 (its turn) and 3 (the last), not after 1.
    ensure!(lines[0]["val_top1"].is_null(), "{}", lines[0]);
    for line in &lines[1..] {
        ensure!(
            line["val_top1"].is_f64() && line["raw_val_top1"].is_f64(),
            "{line}"
        );
        ensure!(
            line["train_loss"].as_f64().is_some_and(f64::is_finite),
            "{line}"
        );
    }
    let best = out.join("best");
    ensure!(best.join("model.safetensors").is_file() && best.join("config.json").is_file());
    let state =
        resnet_train::TrainingState::read(&out.join("training-state.safetensors"), &Device::Cpu)?;
    ensure!(
        state.history.len() == 3 && state.best_top1.is_some(),
        "{state:?}"
    );
    ensure!(
        !state.trained_tensors.is_empty(),
        "the EMA run keeps the trained tensors"
    );
    let output = resnet(&[
        "eval",
        "--model",
        path(&best),
        "--data",
        path(&data),
        "--json",
    ])?;
    ensure!(output.status.success(), "{}", stderr(&output));
    Ok(())
}
