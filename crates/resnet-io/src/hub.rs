//! Downloading a model from the Hugging Face hub into the standard cache, laid out as
//! `huggingface_hub` lays it out (`models--OWNER--NAME/{blobs,snapshots,refs}`), so that
//! Python and this crate share one cache.
//!
//! The server is untrusted like any file: the commit and ETag it sends become file names
//! only when they are plain hex/alphanumeric strings, shard names come through
//! [`safetensors_paths`]'s checks, every byte count is checked against the announced size
//! and LFS files against their SHA-256. A transfer that breaks off is resumed (HTTP
//! `Range`) from `blobs/ETAG.incomplete`, within the run and by the next run; a file
//! becomes visible under `snapshots/` only once complete and verified, and `refs/main`
//! only once every file of the model is there.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::load::safetensors_paths;
use crate::model_dir::{looks_like_hub_id, read_model_dir, ModelSource};

/// The hub's address unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Seconds without a byte before a request is abandoned, unless
/// `HF_HUB_DOWNLOAD_TIMEOUT` says otherwise (`huggingface_hub`'s variable and default).
const DEFAULT_TIMEOUT_SECS: u64 = 10;
/// Files that are read when the repository has them.
const OPTIONAL_FILES: &[&str] = &["config.json", "preprocessor_config.json"];

/// Told how a download goes, to draw a progress bar.
pub trait DownloadProgress {
    /// A file of `total` bytes starts, `resumed_from` of them already on disk.
    fn start(&mut self, file: &str, total: u64, resumed_from: u64);
    /// `bytes` more arrived.
    fn advance(&mut self, bytes: u64);
    /// The file is complete (or failed).
    fn finish(&mut self);
}

/// No progress reported.
impl DownloadProgress for () {
    fn start(&mut self, _: &str, _: u64, _: u64) {}
    fn advance(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// Where and how to download: endpoint, token, cache, timeout, retries.
#[derive(Debug, Clone)]
pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    cache_dir: PathBuf,
    timeout: Duration,
    retries: u32,
    offline: bool,
}

impl HubClient {
    /// The settings `huggingface_hub` reads: `HF_ENDPOINT`, `HF_TOKEN` (else the token
    /// file `huggingface-cli login` writes), `HF_HUB_DOWNLOAD_TIMEOUT`, `HF_HUB_OFFLINE`;
    /// files go to `cache_dir`.
    pub fn from_env(cache_dir: &Path) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let token = var("HF_TOKEN").or_else(|| hf_hub::Cache::from_env().token());
        let timeout = var("HF_HUB_DOWNLOAD_TIMEOUT")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(Duration::from_secs(DEFAULT_TIMEOUT_SECS), |s| {
                Duration::from_secs_f64(s.min(86_400.0))
            });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Self {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token,
            cache_dir: cache_dir.to_path_buf(),
            timeout,
            retries: 3,
            offline,
        }
        .with_endpoint_normalised()
    }

    /// Downloads from `endpoint` (`http://127.0.0.1:PORT` in tests) instead.
    pub fn with_endpoint(mut self, endpoint: &str) -> Self {
        self.endpoint = endpoint.to_string();
        self.with_endpoint_normalised()
    }

    fn with_endpoint_normalised(mut self) -> Self {
        self.endpoint = self.endpoint.trim().trim_end_matches('/').to_string();
        self
    }

    /// Sends `token` as a bearer token to the endpoint (never to the hosts it redirects to).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Abandons a connection or a read after `timeout` without progress.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Resumes a broken transfer up to `retries` times within one download.
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Refuses to touch the network (as `HF_HUB_OFFLINE=1`).
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// The cache the files go to.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Downloads model `id` (`owner/name`): `config.json` and `preprocessor_config.json`
    /// where the repository has them, and `model.safetensors` or the shards of
    /// `model.safetensors.index.json`; then reads it as a model directory.
    pub fn download_model(
        &self,
        id: &str,
        progress: &mut dyn DownloadProgress,
    ) -> Result<ModelSource> {
        let fail = |file: &str, reason: String| Error::Download {
            id: id.to_string(),
            file: file.to_string(),
            reason,
        };
        if !looks_like_hub_id(id) {
            return Err(Error::NotFound {
                id: id.to_string(),
                reason: "not a hub id of the form owner/name".into(),
            });
        }
        if self.offline {
            return Err(fail(
                "model.safetensors",
                format!(
                    "not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set: unset it \
                     to download, or fetch the model where there is a network \
                     (`huggingface-cli download {id}`)",
                    self.cache_dir.display()
                ),
            ));
        }
        let repo = RepoDownload {
            client: self,
            agent: self.agent(),
            id,
            dir: self
                .cache_dir
                .join(format!("models--{}", id.replace('/', "--"))),
        };
        // The first file fixes the commit; the others are asked for at that commit, so
        // that a push during the download cannot mix two versions.
        let weights = match repo.fetch("main", "model.safetensors", progress)? {
            Some(file) => file,
            None => repo
                .fetch("main", "model.safetensors.index.json", progress)?
                .ok_or_else(|| {
                    fail(
                        "model.safetensors",
                        "the repository has no model.safetensors (nor a sharded \
                         model.safetensors.index.json): only safetensors weights are read; \
                         convert a .pth/.bin with scripts/convert_pth.py"
                            .into(),
                    )
                })?,
        };
        let mut files = vec![weights.clone()];
        if weights.name.ends_with(".index.json") {
            let index = repo.snapshot_path(&weights);
            repo.link(&weights)?;
            for shard in safetensors_paths(&index)? {
                let name = shard
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                let file = repo
                    .fetch(&weights.commit, name, progress)?
                    .ok_or_else(|| fail(name, "listed in the index but not on the hub".into()))?;
                files.push(file);
            }
        }
        for name in OPTIONAL_FILES {
            files.extend(repo.fetch(&weights.commit, name, progress)?);
        }
        for file in &files {
            repo.link(file)?;
        }
        repo.set_ref(&weights.commit)?;
        read_model_dir(&repo.dir.join("snapshots").join(&weights.commit))
    }

    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(self.timeout)
            .timeout_read(self.timeout)
            .timeout_write(self.timeout)
            .try_proxy_from_env(true)
            .user_agent(concat!("resnet-io/", env!("CARGO_PKG_VERSION")))
            .build()
    }
}

/// One file of the repository, as the hub describes it.
#[derive(Debug, Clone)]
struct RemoteFile {
    name: String,
    commit: String,
    etag: String,
    size: u64,
    /// Where the bytes are (the hub itself, or the CDN it redirects to).
    url: String,
}

impl RemoteFile {
    /// LFS files are named by the SHA-256 of their content.
    fn sha256(&self) -> Option<&str> {
        (self.etag.len() == 64 && self.etag.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(self.etag.as_str())
    }
}

struct RepoDownload<'a> {
    client: &'a HubClient,
    agent: ureq::Agent,
    id: &'a str,
    dir: PathBuf,
}

impl RepoDownload<'_> {
    fn error(&self, file: &str, reason: impl Into<String>) -> Error {
        Error::Download {
            id: self.id.to_string(),
            file: file.to_string(),
            reason: reason.into(),
        }
    }

    fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The file `name` at `revision` in the cache's blobs, downloaded unless already
    /// there; `None` when the repository has no such file.
    fn fetch(
        &self,
        revision: &str,
        name: &str,
        progress: &mut dyn DownloadProgress,
    ) -> Result<Option<RemoteFile>> {
        let Some(file) = self.describe(revision, name)? else {
            return Ok(None);
        };
        let blob = self.dir.join("blobs").join(&file.etag);
        let complete = std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == file.size);
        if !complete {
            self.download(&file, &blob, progress)?;
        }
        Ok(Some(file))
    }

    /// A HEAD request for `name`, following the hub's relative redirects (a renamed
    /// repository) but not its absolute one (the CDN, which is where the bytes are).
    fn describe(&self, revision: &str, name: &str) -> Result<Option<RemoteFile>> {
        let endpoint = &self.client.endpoint;
        let mut url = format!("{endpoint}/{}/resolve/{revision}/{name}", self.id);
        for _ in 0..5 {
            let response = match self.request("HEAD", &url).call() {
                Ok(response) => response,
                Err(ureq::Error::Status(404, response))
                    if response.header("X-Error-Code") != Some("RepositoryNotFound") =>
                {
                    return Ok(None)
                }
                Err(error) => return Err(self.error(name, describe_error(&url, error))),
            };
            let location = response.header("Location").map(str::to_string);
            if let (300..=399, Some(location)) = (response.status(), &location) {
                if location.starts_with('/') {
                    url = format!("{endpoint}{location}");
                    continue;
                }
            }
            return self.remote_file(name, &url, &response).map(Some);
        }
        Err(self.error(name, format!("{url}: more than 5 redirects")))
    }

    fn remote_file(&self, name: &str, url: &str, response: &ureq::Response) -> Result<RemoteFile> {
        let header = |key: &str| response.header(key).map(|v| v.trim().trim_matches('"'));
        let commit = header("X-Repo-Commit")
            .filter(|c| (7..=64).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                self.error(name, format!("{url}: no valid X-Repo-Commit header (is this a Hugging Face hub endpoint?)"))
            })?;
        let etag = header("X-Linked-Etag")
            .or_else(|| header("ETag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"'))
            .filter(|e| {
                (1..=128).contains(&e.len()) && e.bytes().all(|b| b.is_ascii_alphanumeric())
            })
            .ok_or_else(|| self.error(name, format!("{url}: no valid ETag header")))?;
        let size = header("X-Linked-Size")
            .or_else(|| header("Content-Length"))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                self.error(
                    name,
                    format!("{url}: no valid size (X-Linked-Size or Content-Length)"),
                )
            })?;
        let url = match response.header("Location") {
            Some(location) if (300..=399).contains(&response.status()) => location.to_string(),
            _ => url.to_string(),
        };
        Ok(RemoteFile {
            name: name.to_string(),
            commit: commit.to_ascii_lowercase(),
            etag: etag.to_string(),
            size,
            url,
        })
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request = self
            .agent
            .request(method, url)
            .set("Accept-Encoding", "identity");
        // The token goes to the hub only, never to the CDN it redirects to.
        match &self.client.token {
            Some(token) if url.starts_with(&format!("{}/", self.client.endpoint)) => {
                request.set("Authorization", &format!("Bearer {token}"))
            }
            _ => request,
        }
    }

    /// Downloads `file` to `blob`, through `blob.incomplete`, resuming what an earlier
    /// attempt left; verified before it is renamed into place.
    fn download(
        &self,
        file: &RemoteFile,
        blob: &Path,
        progress: &mut dyn DownloadProgress,
    ) -> Result<()> {
        let partial = blob.with_extension("incomplete");
        if let Some(dir) = partial.parent() {
            std::fs::create_dir_all(dir).map_err(Self::io_error(dir))?;
        }
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .map_err(Self::io_error(&partial))?;
        // Two processes fetching the same blob take turns.
        out.lock().map_err(Self::io_error(&partial))?;
        let mut have = out.metadata().map_err(Self::io_error(&partial))?.len();
        if have > file.size {
            out.set_len(0).map_err(Self::io_error(&partial))?;
            have = 0;
        }
        progress.start(&file.name, file.size, have);
        let mut attempt = 0;
        let result = loop {
            match self.transfer(file, &mut out, &partial, &mut have, progress) {
                Ok(()) => break Ok(()),
                Err(Transfer::Fatal(reason)) => break Err(reason),
                Err(Transfer::Broken(reason)) if attempt >= self.client.retries => {
                    break Err(format!(
                        "{reason} (after {} attempts; {have} of {} bytes kept in {}: run again to resume)",
                        attempt + 1,
                        file.size,
                        partial.display()
                    ))
                }
                Err(Transfer::Broken(_)) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200 << attempt.min(5)));
                }
            }
        };
        progress.finish();
        let verified = result.and_then(|()| verify(file, &partial));
        if let Err(reason) = verified {
            if have == file.size || have == 0 {
                // Complete but wrong, or nothing: nothing worth resuming.
                let _ = std::fs::remove_file(&partial);
            }
            return Err(self.error(&file.name, reason));
        }
        out.sync_all().map_err(Self::io_error(&partial))?;
        drop(out);
        std::fs::rename(&partial, blob).map_err(Self::io_error(blob))
    }

    /// One GET from `have` bytes on.
    fn transfer(
        &self,
        file: &RemoteFile,
        out: &mut File,
        partial: &Path,
        have: &mut u64,
        progress: &mut dyn DownloadProgress,
    ) -> std::result::Result<(), Transfer> {
        if *have == file.size {
            return Ok(());
        }
        let response = match self
            .request("GET", &file.url)
            .set("Range", &format!("bytes={have}-"))
            .call()
        {
            Ok(response) => response,
            Err(ureq::Error::Status(code, response)) if code >= 500 || code == 429 => {
                return Err(Transfer::Broken(describe_error(
                    &file.url,
                    ureq::Error::Status(code, response),
                )))
            }
            Err(ureq::Error::Status(code, response)) => {
                return Err(Transfer::Fatal(describe_error(
                    &file.url,
                    ureq::Error::Status(code, response),
                )))
            }
            Err(error) => return Err(Transfer::Broken(describe_error(&file.url, error))),
        };
        match response.status() {
            206 => {}
            // The whole file, not the range: start again.
            200 => {
                out.set_len(0)
                    .map_err(|e| Transfer::Fatal(format!("{}: {e}", partial.display())))?;
                *have = 0;
                progress.start(&file.name, file.size, 0);
            }
            code => {
                return Err(Transfer::Fatal(format!(
                    "{}: unexpected HTTP {code}",
                    file.url
                )))
            }
        }
        let mut body = response.into_reader();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let read = match body.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(e) => {
                    return Err(Transfer::Broken(format!(
                        "{}: transfer broken off: {e}",
                        file.url
                    )))
                }
            };
            if *have + read as u64 > file.size {
                let _ = out.set_len(0);
                *have = 0;
                return Err(Transfer::Fatal(format!(
                    "{}: the server sent more than the {} bytes it announced",
                    file.url, file.size
                )));
            }
            out.write_all(&buffer[..read])
                .map_err(|e| Transfer::Fatal(format!("{}: {e}", partial.display())))?;
            *have += read as u64;
            progress.advance(read as u64);
        }
        if *have < file.size {
            return Err(Transfer::Broken(format!(
                "{}: the transfer ended after {have} of {} bytes",
                file.url, file.size
            )));
        }
        Ok(())
    }

    fn snapshot_path(&self, file: &RemoteFile) -> PathBuf {
        self.dir
            .join("snapshots")
            .join(&file.commit)
            .join(&file.name)
    }

    /// `snapshots/COMMIT/NAME` -> `../../blobs/ETAG`, as `huggingface_hub` links them.
    fn link(&self, file: &RemoteFile) -> Result<()> {
        let link = self.snapshot_path(file);
        if let Some(dir) = link.parent() {
            std::fs::create_dir_all(dir).map_err(Self::io_error(dir))?;
        }
        let _ = std::fs::remove_file(&link);
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(Path::new("../../blobs").join(&file.etag), &link);
        #[cfg(not(unix))]
        let linked = std::fs::copy(self.dir.join("blobs").join(&file.etag), &link).map(|_| ());
        linked.map_err(Self::io_error(&link))
    }

    /// `refs/main` names the commit, written last and atomically: a cache lookup never
    /// sees a half-downloaded snapshot.
    fn set_ref(&self, commit: &str) -> Result<()> {
        let refs = self.dir.join("refs");
        std::fs::create_dir_all(&refs).map_err(Self::io_error(&refs))?;
        let temporary = refs.join(".main.incomplete");
        std::fs::write(&temporary, commit).map_err(Self::io_error(&temporary))?;
        let main = refs.join("main");
        std::fs::rename(&temporary, &main).map_err(Self::io_error(&main))
    }
}

/// Why a transfer stopped: worth resuming, or not.
enum Transfer {
    Broken(String),
    Fatal(String),
}

/// Size, and SHA-256 where the hub names the file by it.
fn verify(file: &RemoteFile, path: &Path) -> std::result::Result<(), String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if size != file.size {
        return Err(format!("expected {} bytes, found {size}", file.size));
    }
    let Some(expected) = file.sha256() else {
        return Ok(());
    };
    let mut hasher = Sha256::new();
    let mut reader = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::copy(&mut reader, &mut hasher).map_err(|e| format!("{}: {e}", path.display()))?;
    let found: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if !found.eq_ignore_ascii_case(expected) {
        return Err(format!(
            "SHA-256 mismatch: the hub says {expected}, the downloaded bytes hash to {found}"
        ));
    }
    Ok(())
}

/// One line for a failed request, with what to do about it.
fn describe_error(url: &str, error: ureq::Error) -> String {
    match error {
        ureq::Error::Status(code, response) => {
            let hint = match (code, response.header("X-Error-Code")) {
                (_, Some("RepositoryNotFound")) => {
                    ": no such repository (or it is private: set HF_TOKEN)"
                }
                (_, Some("GatedRepo")) => {
                    ": the repository is gated: accept its terms on the hub and set HF_TOKEN"
                }
                (401 | 403, _) => ": access denied (private or gated: set HF_TOKEN)",
                (404, _) => ": not found",
                _ => "",
            };
            format!("{url}: HTTP {code}{hint}")
        }
        // ureq's message names the URL itself.
        ureq::Error::Transport(transport) => transport.to_string(),
    }
}
