//! The hub downloader against a hub on 127.0.0.1 (`resnet_tests::hub_server`): the real
//! download path, with the failures a network has. After each failure the cache holds
//! nothing a lookup would take for the model: no `snapshots/` entry, no `refs/main`, no
//! blob under its final name; only a broken-off transfer keeps its bytes, as
//! `blobs/SHA.incomplete`, for the next run to resume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use resnet_io::{resolve_model_in, HubClient};
use resnet_tests::hub_server::{Faults, HubServer, COMMIT};
use resnet_tests::model_fixture;

const ID: &str = "tiny-org/resnet18-tiny";

fn fixture_files() -> Result<HashMap<String, Vec<u8>>> {
    let dir = model_fixture("timm_resnet18_tiny");
    let mut files = HashMap::new();
    for name in ["config.json", "model.safetensors"] {
        files.insert(name.to_string(), std::fs::read(dir.join(name))?);
    }
    Ok(files)
}

fn weights_len() -> Result<usize> {
    Ok(fixture_files()?["model.safetensors"].len())
}

struct Setup {
    server: HubServer,
    cache: tempfile::TempDir,
}

impl Setup {
    fn new() -> Result<Self> {
        Ok(Self {
            server: HubServer::start(ID, fixture_files()?)?,
            cache: tempfile::tempdir()?,
        })
    }

    fn client(&self) -> HubClient {
        HubClient::from_env(self.cache.path())
            .with_endpoint(&self.server.endpoint)
            .with_token(None)
            .with_offline(false)
            .with_timeout(Duration::from_secs(5))
            .with_retries(0)
    }

    fn repo(&self) -> PathBuf {
        self.cache.path().join("models--tiny-org--resnet18-tiny")
    }

    /// Every file under the cache, relative to it.
    fn entries(&self) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() && !path.is_symlink() {
                    walk(&path, root, out);
                } else if let Ok(relative) = path.strip_prefix(root) {
                    out.push(relative.display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(self.cache.path(), self.cache.path(), &mut out);
        out.sort();
        out
    }

    /// Nothing a lookup would take for the model; only `.incomplete` files, if any.
    fn assert_nothing_usable(&self) -> Result<()> {
        let entries = self.entries();
        ensure!(
            entries.iter().all(|e| e.ends_with(".incomplete")),
            "left in the cache: {entries:?}"
        );
        ensure!(resolve_model_in(ID, self.cache.path()).is_err());
        Ok(())
    }
}

fn error_of(result: resnet_io::Result<resnet_io::ModelSource>) -> Result<String> {
    match result {
        Ok(_) => anyhow::bail!("the download succeeded"),
        Err(error) => Ok(error.to_string()),
    }
}

#[test]
fn downloads_into_the_standard_cache_layout_and_loads() -> Result<()> {
    let setup = Setup::new()?;
    let client = setup.client().with_token(Some("hf_secret".into()));
    let source = client.download_model(ID, &mut ())?;
    let loaded = source.load(None, &Device::Cpu, DType::F32)?;
    assert_eq!(loaded.config.num_classes, 4);
    assert_eq!(
        source.labels(4).context("labels from config.json")?,
        ["cat", "dog", "bird", "fish"]
    );
    // huggingface_hub's layout: snapshot links into blobs, refs/main = the commit.
    let repo = setup.repo();
    assert_eq!(std::fs::read_to_string(repo.join("refs/main"))?, COMMIT);
    let link = repo
        .join("snapshots")
        .join(COMMIT)
        .join("model.safetensors");
    assert!(link.is_symlink(), "{}", link.display());
    assert_eq!(
        std::fs::read(&link)?,
        fixture_files()?["model.safetensors"],
        "the bytes served"
    );
    assert!(!setup.entries().iter().any(|e| e.ends_with(".incomplete")));
    // The token goes to the hub's own URLs.
    let requests = setup.server.requests();
    let hub_requests: Vec<_> = requests
        .iter()
        .filter(|r| r.path.contains("/resolve/"))
        .collect();
    ensure!(!hub_requests.is_empty());
    for request in hub_requests {
        assert_eq!(request.authorization.as_deref(), Some("Bearer hf_secret"));
    }
    // Found offline afterwards, by the plain cache lookup.
    resolve_model_in(ID, setup.cache.path())?;
    // A second download finds the blobs complete and fetches no bytes.
    let before = setup.server.requests().len();
    setup.client().download_model(ID, &mut ())?;
    let after = setup.server.requests();
    assert!(
        after[before..].iter().all(|r| r.method == "HEAD"),
        "{after:?}"
    );
    Ok(())
}

#[test]
fn an_interrupted_transfer_is_kept_and_resumed() -> Result<()> {
    let setup = Setup::new()?;
    let cut = weights_len()? / 3;
    setup.server.set_faults(Faults {
        cut_after: Some(cut),
        ..Faults::default()
    });
    let error = error_of(setup.client().download_model(ID, &mut ()))?;
    assert!(error.contains("run again to resume"), "{error}");
    setup.assert_nothing_usable()?;
    let partial: Vec<_> = setup
        .entries()
        .into_iter()
        .filter(|e| e.ends_with(".incomplete"))
        .collect();
    assert_eq!(partial.len(), 1, "{partial:?}");
    assert_eq!(
        std::fs::metadata(setup.cache.path().join(&partial[0]))?.len(),
        cut as u64
    );

    // The next run asks for the rest only, and the result is exact.
    setup.server.set_faults(Faults::default());
    let source = setup.client().download_model(ID, &mut ())?;
    let last_get = setup
        .server
        .requests()
        .into_iter()
        .rfind(|r| r.method == "GET" && r.path.starts_with("/cdn/"))
        .context("a GET")?;
    assert_eq!(last_get.range, Some(format!("bytes={cut}-")));
    assert_eq!(
        std::fs::read(&source.weights[0])?,
        fixture_files()?["model.safetensors"]
    );
    Ok(())
}

#[test]
fn a_transfer_broken_off_several_times_resumes_within_one_run() -> Result<()> {
    let setup = Setup::new()?;
    setup.server.set_faults(Faults {
        cut_after: Some(weights_len()? / 3 + 1),
        ..Faults::default()
    });
    let source = setup.client().with_retries(3).download_model(ID, &mut ())?;
    assert_eq!(
        std::fs::read(&source.weights[0])?,
        fixture_files()?["model.safetensors"]
    );
    Ok(())
}

#[test]
fn a_wrong_size_is_refused_and_nothing_kept() -> Result<()> {
    let setup = Setup::new()?;
    setup.server.set_faults(Faults {
        announce_smaller_by: 10,
        ..Faults::default()
    });
    let error = error_of(setup.client().download_model(ID, &mut ()))?;
    assert!(error.contains("more than the"), "{error}");
    setup.assert_nothing_usable()?;
    assert!(setup.entries().is_empty(), "{:?}", setup.entries());
    Ok(())
}

#[test]
fn corrupt_bytes_fail_the_sha256_check_and_nothing_is_kept() -> Result<()> {
    let setup = Setup::new()?;
    setup.server.set_faults(Faults {
        corrupt: true,
        ..Faults::default()
    });
    let error = error_of(setup.client().download_model(ID, &mut ()))?;
    assert!(error.contains("SHA-256 mismatch"), "{error}");
    assert!(setup.entries().is_empty(), "{:?}", setup.entries());
    Ok(())
}

#[test]
fn a_stalled_server_times_out() -> Result<()> {
    let setup = Setup::new()?;
    setup.server.set_faults(Faults {
        stall: true,
        ..Faults::default()
    });
    let started = Instant::now();
    let client = setup.client().with_timeout(Duration::from_secs(1));
    let error = error_of(client.download_model(ID, &mut ()))?;
    assert!(error.to_lowercase().contains("timed out"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(15));
    setup.assert_nothing_usable()?;
    assert!(setup.entries().is_empty(), "{:?}", setup.entries());
    Ok(())
}

#[test]
fn missing_repositories_and_files_are_clean_errors() -> Result<()> {
    let setup = Setup::new()?;
    let error = error_of(setup.client().download_model("nobody/nothing", &mut ()))?;
    assert!(error.contains("no such repository"), "{error}");

    let only_config = HashMap::from([("config.json".to_string(), b"{}".to_vec())]);
    let server = HubServer::start(ID, only_config)?;
    let client = setup.client().with_endpoint(&server.endpoint);
    let error = error_of(client.download_model(ID, &mut ()))?;
    assert!(error.contains("has no model.safetensors"), "{error}");
    setup.assert_nothing_usable()?;
    assert!(setup.entries().is_empty(), "{:?}", setup.entries());
    Ok(())
}

#[test]
fn offline_mode_never_touches_the_network() -> Result<()> {
    let setup = Setup::new()?;
    let error = error_of(
        setup
            .client()
            .with_offline(true)
            .download_model(ID, &mut ()),
    )?;
    assert!(error.contains("HF_HUB_OFFLINE"), "{error}");
    assert!(setup.server.requests().is_empty());
    Ok(())
}

#[test]
fn hostile_ids_and_headers_never_become_paths() -> Result<()> {
    let setup = Setup::new()?;
    for id in ["../../etc", "a/b/c", "owner/..", "/abs/path"] {
        let error = error_of(setup.client().download_model(id, &mut ()))?;
        assert!(error.contains("not a hub id"), "{id}: {error}");
    }
    // The commit and ETag a server sends name directories and files in the cache.
    setup.server.set_faults(Faults {
        commit: Some("../../../escape".into()),
        ..Faults::default()
    });
    let error = error_of(setup.client().download_model(ID, &mut ()))?;
    assert!(error.contains("X-Repo-Commit"), "{error}");
    assert!(setup.entries().is_empty(), "{:?}", setup.entries());
    assert!(setup.server.requests().iter().all(|r| r.method == "HEAD"));
    Ok(())
}
