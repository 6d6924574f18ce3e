//! The `resnet` binary end to end, as a user runs it. The CIFAR-10 evaluation runs in CI
//! (release build) and reproduces PyTorch's predictions on the real test set.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

fn resnet(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(args)
        .output()?)
}

fn fixtures() -> PathBuf {
    resnet_tests::fixtures_dir()
}

fn shared() -> Option<PathBuf> {
    resnet_tests::shared_dir("resnet-cli tests")
}

fn stdout_json(output: &Output) -> Result<Value> {
    ensure!(
        output.status.success(),
        "resnet failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[test]
fn cifar10_eval_reproduces_pytorch() -> Result<()> {
    let Some(shared) = shared() else {
        return Ok(());
    };
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(
        shared.join("reference/cifar10-test-predictions.json"),
    )?)?;
    let dir = tempfile::tempdir()?;
    for model in ["resnet20", "resnet32"] {
        let weights = shared.join(format!("weights/cifar10/{model}.safetensors"));
        let predictions = dir.path().join(format!("{model}.json"));
        let output = resnet(&[
            "eval",
            "--model",
            path(&weights),
            "--data",
            path(&shared.join("data/cifar10-test")),
            "--json",
            "--predictions",
            path(&predictions),
        ])?;
        let summary = stdout_json(&output)?;
        let expected = &reference["models"][model];
        let top1 = summary["top1"].as_f64().context("top1")?;
        let expected_top1 = expected["top1"].as_f64().context("reference top1")?;
        assert_eq!(summary["images"], 10_000);
        assert!(summary["images_per_sec"].as_f64().context("speed")? > 0.0);
        assert!(
            (top1 - expected_top1).abs() <= 0.001,
            "{model}: top-1 {top1} against PyTorch's {expected_top1}"
        );
        let ours: Value = serde_json::from_str(&std::fs::read_to_string(&predictions)?)?;
        let expected = expected["predictions"].as_object().context("predictions")?;
        let agreeing = expected
            .iter()
            .filter(|(image, class)| ours["predictions"][image.as_str()] == **class)
            .count();
        let agreement = agreeing as f64 / expected.len() as f64;
        eprintln!("{model}: top-1 {top1}, agreement with PyTorch {agreement}");
        assert!(agreement >= 0.999, "{model}: agreement {agreement}");
    }
    Ok(())
}

#[test]
fn classify_by_hub_id_offline() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let images = fixtures().join("images");
    for (id, dir, labels) in [
        (
            "timm/resnet18_tiny.test",
            "timm_resnet18_tiny",
            ["cat", "dog", "bird", "fish"].as_slice(),
        ),
        (
            "tiny-org/resnet-tiny",
            "transformers_bottleneck_tiny",
            ["red", "green", "blue"].as_slice(),
        ),
    ] {
        resnet_tests::add_to_hub_cache(cache.path(), id, &fixtures().join("models").join(dir))?;
        let output = Command::new(env!("CARGO_BIN_EXE_resnet"))
            .env("HF_HUB_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1")
            .args(["classify", "--model", id, "--top-k", "2", "--json"])
            .arg(images.join("landscape.jpg"))
            .arg(images.join("portrait.png"))
            .output()?;
        let result = stdout_json(&output)?;
        let images = result["images"].as_array().context("images")?;
        assert_eq!(images.len(), 2);
        for image in images {
            let predictions = image["predictions"].as_array().context("predictions")?;
            assert_eq!(predictions.len(), 2);
            let label = predictions[0]["label"].as_str().context("label")?;
            assert!(labels.contains(&label), "{id}: {label}");
            let p0 = predictions[0]["probability"].as_f64().context("p")?;
            let p1 = predictions[1]["probability"].as_f64().context("p")?;
            assert!(p0 >= p1 && p0 <= 1.0 && p1 > 0.0);
        }
    }
    Ok(())
}

#[test]
fn classify_prints_cifar_labels_for_cifar_weights() -> Result<()> {
    let Some(shared) = shared() else {
        return Ok(());
    };
    let weights = shared.join("weights/cifar10/resnet20.safetensors");
    let image = shared.join("data/cifar10-test/ship/0000.jpg");
    let output = resnet(&[
        "classify",
        "--model",
        path(&weights),
        "--top-k",
        "1",
        path(&image),
    ])?;
    let text = String::from_utf8(output.stdout)?;
    assert!(output.status.success() && text.contains("ship"), "{text}");
    Ok(())
}

#[test]
fn forward_the_article_test() -> Result<()> {
    let output = resnet(&["forward", "--arch", "resnet101", "--shape", "4,3,224,224"])?;
    let text = String::from_utf8(output.stdout)?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("input [4, 3, 224, 224] -> logits [4, 1000]"),
        "{text}"
    );
    Ok(())
}

#[test]
fn forward_tensor_in_tensor_out_matches_the_reference() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("logits.safetensors");
    let model = fixtures().join("models/transformers_basic_tiny");
    let input = fixtures().join("models/transformers_basic_tiny.expected.safetensors");
    let output = resnet(&[
        "forward",
        "--arch",
        "auto",
        "--model",
        path(&model),
        "--input",
        path(&input),
        "--output",
        path(&out),
    ])?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ours = candle_core::safetensors::load(&out, &candle_core::Device::Cpu)?;
    let reference = candle_core::safetensors::load(&input, &candle_core::Device::Cpu)?;
    let diff = (&ours["logits"] - &reference["expected"])?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    let scale = reference["expected"].abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff <= 1e-4 * scale, "max |Δ| {diff}");
    Ok(())
}

#[test]
fn inspect_and_convert() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = fixtures().join("models/transformers_bottleneck_tiny");
    let report = stdout_json(&resnet(&["inspect", path(&model), "--json"])?)?;
    assert_eq!(report["naming"], "transformers");
    assert_eq!(report["ok"], true);
    let converted = dir.path().join("converted.safetensors");
    let output = resnet(&["convert", path(&model), path(&converted), "--dtype", "f16"])?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = stdout_json(&resnet(&["inspect", path(&converted), "--json"])?)?;
    assert_eq!(report["naming"], "torchvision");
    assert_eq!(report["ok"], true);
    assert_eq!(report["dtypes"]["F16"], report["tensors"]);
    let text = String::from_utf8(resnet(&["inspect", path(&converted)])?.stdout)?;
    assert!(
        text.contains("naming:       torchvision") && text.contains("0 missing"),
        "{text}"
    );
    Ok(())
}

#[test]
fn bench_json() -> Result<()> {
    let summary = stdout_json(&resnet(&[
        "bench", "--arch", "resnet20", "--batch", "2", "--iters", "2", "--warmup", "0", "--json",
    ])?)?;
    assert!(summary["median_ms"].as_f64().context("median_ms")? > 0.0);
    assert!(
        summary["images_per_sec"]
            .as_f64()
            .context("images_per_sec")?
            > 0.0
    );
    Ok(())
}

#[test]
fn eval_counts_unreadable_images_and_goes_on() -> Result<()> {
    let data = tempfile::tempdir()?;
    let images = fixtures().join("images");
    for (class, files) in [
        ("a_first", ["landscape.jpg", "square.jpg"]),
        ("b_second", ["portrait.png", "small.png"]),
    ] {
        let dir = data.path().join(class);
        std::fs::create_dir(&dir)?;
        for file in files {
            std::fs::copy(images.join(file), dir.join(file))?;
        }
    }
    std::fs::write(
        data.path().join("b_second/corrupt.jpg"),
        b"\xFF\xD8\xFF\xE0 truncated",
    )?;
    std::fs::write(data.path().join("README.txt"), "not a class folder")?;
    let model = fixtures().join("models/transformers_basic_tiny");
    let output = resnet(&[
        "eval",
        "--model",
        path(&model),
        "--data",
        path(data.path()),
        "--batch-size",
        "2",
        "--json",
    ])?;
    let summary = stdout_json(&output)?;
    assert_eq!(summary["images"], 4);
    assert_eq!(summary["unreadable"], 1);
    let stderr = String::from_utf8(output.stderr)?;
    assert!(stderr.contains("corrupt.jpg"), "{stderr}");
    let per_class = summary["per_class"].as_object().context("per_class")?;
    assert_eq!(
        per_class.keys().collect::<Vec<_>>(),
        ["a_first", "b_second"]
    );
    Ok(())
}

#[test]
fn every_error_is_one_line_and_a_failure_exit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let not_an_image = dir.path().join("broken.jpg");
    std::fs::write(&not_an_image, b"\xFF\xD8\xFF\xE0 definitely not a jpeg")?;
    let weights = fixtures().join("models/timm_resnet18_tiny");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["classify", "--model", "/no/such/model.safetensors", "x.jpg"],
            "not found",
        ),
        (
            vec!["forward", "--arch", "resnet19", "--shape", "1,3,224,224"],
            "unknown ResNet architecture 'resnet19'",
        ),
        (
            vec!["classify", "--model", path(&weights), path(&not_an_image)],
            "broken.jpg: cannot decode JPEG",
        ),
        (
            vec!["forward", "--arch", "resnet18", "--shape", "1,3,x,224"],
            "invalid shape",
        ),
        (
            vec!["bench", "--arch", "resnet18", "--device", "tpu"],
            "unknown device 'tpu'",
        ),
        (
            vec!["eval", "--model", path(&weights), "--data", "/no/such/dir"],
            "/no/such/dir",
        ),
        (
            vec!["forward", "--arch", "resnet18", "--shape", "1,3,8,8"],
            "too small",
        ),
        (
            vec![
                "classify",
                "--model",
                path(&weights),
                "--dtype",
                "f64",
                "x.jpg",
            ],
            "unknown dtype 'f64'",
        ),
    ];
    for (args, expected) in cases {
        let output = resnet(&args)?;
        let stderr = String::from_utf8(output.stderr)?;
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected '{expected}' in '{stderr}'"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
            "{args:?}: {stderr}"
        );
        if stderr.starts_with("error: ") && !stderr.contains("Usage") {
            assert_eq!(
                stderr.trim_end().lines().count(),
                1,
                "{args:?}: one line, got '{stderr}'"
            );
        }
    }
    Ok(())
}

#[test]
fn a_hub_id_missing_from_the_cache_is_downloaded_by_default() -> Result<()> {
    use resnet_tests::hub_server::HubServer;
    let dir = fixtures().join("models/timm_resnet18_tiny");
    let mut files = std::collections::HashMap::new();
    for name in ["config.json", "model.safetensors"] {
        files.insert(name.to_string(), std::fs::read(dir.join(name))?);
    }
    let server = HubServer::start("tiny-org/resnet18-tiny", files)?;
    let cache = tempfile::tempdir()?;
    let classify = |offline: &str| {
        Command::new(env!("CARGO_BIN_EXE_resnet"))
            .env("HF_ENDPOINT", &server.endpoint)
            .env("HF_HUB_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", offline)
            .env_remove("HF_TOKEN")
            .args(["classify", "--model", "tiny-org/resnet18-tiny", "--json"])
            .arg(fixtures().join("images/square.jpg"))
            .output()
    };
    // Offline and not cached: a clear message, no request.
    let output = classify("1")?;
    let stderr = String::from_utf8(output.stderr)?;
    assert!(
        !output.status.success() && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
    assert!(server.requests().is_empty());
    // Online: downloaded, said so, classified.
    let output = classify("0")?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let result = stdout_json(&output)?;
    assert!(stderr.contains("downloading model.safetensors"), "{stderr}");
    assert_eq!(result["images"].as_array().map(Vec::len), Some(1));
    // Offline again: served from the cache.
    let output = classify("1")?;
    stdout_json(&output)?;
    Ok(())
}

#[test]
fn bench_train_times_a_full_training_step() -> Result<()> {
    let summary = stdout_json(&resnet(&[
        "bench", "--arch", "resnet20", "--batch", "4", "--iters", "2", "--warmup", "0", "--train",
        "--json",
    ])?)?;
    assert_eq!(summary["train"], true);
    for field in [
        "median_ms",
        "images_per_sec",
        "forward_ms",
        "backward_ms",
        "update_ms",
    ] {
        assert!(
            summary[field].as_f64().context(field)? > 0.0,
            "{field}: {summary}"
        );
    }
    // The training path checks sizes before allocating, as inference does.
    let output = resnet(&["bench", "--arch", "resnet18", "--train", "--size", "100000"])?;
    assert!(!output.status.success());
    assert!(String::from_utf8(output.stderr)?.contains("GB for its activations"));
    Ok(())
}
