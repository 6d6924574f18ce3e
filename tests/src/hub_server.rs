//! A Hugging Face hub on 127.0.0.1 for the download tests: the hub's URL layout
//! (`/{owner}/{name}/resolve/{revision}/{file}`), its headers (`X-Repo-Commit`, `ETag`,
//! and for LFS files a redirect to a CDN with `X-Linked-Etag` = SHA-256 and
//! `X-Linked-Size`), HTTP ranges, and the failures a real network has: a transfer cut
//! off, a wrong size, corrupt bytes, a server that stalls, 404s.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// The commit every file of the served repository is at.
pub const COMMIT: &str = "c0ffee0000000000000000000000000000c0ffee";

/// What the server does wrong, changeable while it runs.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Close the connection after this many bytes of a weights GET.
    pub cut_after: Option<usize>,
    /// Announce a weights size this many bytes smaller than the file.
    pub announce_smaller_by: usize,
    /// Flip a byte of the weights it sends.
    pub corrupt: bool,
    /// Send the weights' response headers, then nothing.
    pub stall: bool,
    /// Send this as `X-Repo-Commit` instead of [`COMMIT`].
    pub commit: Option<String>,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    /// `HEAD`, `GET`.
    pub method: String,
    /// The path.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

struct State {
    repo: String,
    files: HashMap<String, Vec<u8>>,
    faults: Faults,
    requests: Vec<Request>,
}

/// The server; it stops serving when dropped (its threads end with the test process).
pub struct HubServer {
    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT`.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl HubServer {
    /// Serves `files` (name -> bytes) as the repository `repo` (`owner/name`);
    /// `.safetensors` files as LFS files behind a CDN redirect.
    pub fn start(repo: &str, files: HashMap<String, Vec<u8>>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(State {
            repo: repo.to_string(),
            files,
            faults: Faults::default(),
            requests: Vec::new(),
        }));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let _ = serve(stream, &state);
                });
            }
        });
        Ok(Self { endpoint, state })
    }

    /// Changes what goes wrong from the next request on.
    pub fn set_faults(&self, faults: Faults) {
        if let Ok(mut state) = self.state.lock() {
            state.faults = faults;
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state
            .lock()
            .map(|s| s.requests.clone())
            .unwrap_or_default()
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            if let Some((key, value)) = header.split_once(':') {
                headers.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let request = Request {
            method: method.clone(),
            path: path.clone(),
            range: headers.get("range").cloned(),
            authorization: headers.get("authorization").cloned(),
        };
        let (repo, files, faults) = {
            let mut state = state
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?;
            state.requests.push(request.clone());
            (
                state.repo.clone(),
                state.files.clone(),
                state.faults.clone(),
            )
        };
        if !respond(&mut writer, &request, &repo, &files, &faults)? {
            return Ok(());
        }
    }
}

/// Writes one response; `false` when the connection is to be closed.
fn respond(
    out: &mut TcpStream,
    request: &Request,
    repo: &str,
    files: &HashMap<String, Vec<u8>>,
    faults: &Faults,
) -> std::io::Result<bool> {
    let head = request.method == "HEAD";
    // The CDN: /cdn/SHA256, the bytes of an LFS file.
    if let Some(sha) = request.path.strip_prefix("/cdn/") {
        let Some((_, bytes)) = files.iter().find(|(_, b)| sha256_hex(b) == sha) else {
            return status(out, 404, &[]);
        };
        return send_bytes(out, request, bytes, faults, true);
    }
    let prefix = format!("/{repo}/resolve/");
    let Some(rest) = request.path.strip_prefix(&prefix) else {
        return status(out, 401, &[("X-Error-Code", "RepositoryNotFound".into())]);
    };
    let file = rest.split_once('/').map(|(_, f)| f).unwrap_or_default();
    let Some(bytes) = files.get(file) else {
        return status(out, 404, &[("X-Error-Code", "EntryNotFound".into())]);
    };
    let lfs = file.ends_with(".safetensors");
    let commit = faults.commit.clone().unwrap_or_else(|| COMMIT.into());
    if lfs {
        let sha = sha256_hex(bytes);
        let size = bytes.len().saturating_sub(faults.announce_smaller_by);
        let location = format!("http://{}/cdn/{sha}", out.local_addr()?);
        let headers = [
            ("Location", location),
            ("X-Repo-Commit", commit),
            ("X-Linked-Etag", format!("\"{sha}\"")),
            ("X-Linked-Size", size.to_string()),
            ("ETag", "\"0123abcd\"".into()),
        ];
        return status(out, 302, &headers);
    }
    if head {
        let etag = format!("\"{}\"", &sha256_hex(bytes)[..40]);
        let headers = [
            ("X-Repo-Commit", commit),
            ("ETag", etag),
            ("Content-Length", bytes.len().to_string()),
        ];
        write!(out, "HTTP/1.1 200 OK\r\n")?;
        for (key, value) in headers {
            write!(out, "{key}: {value}\r\n")?;
        }
        write!(out, "\r\n")?;
        return Ok(true);
    }
    send_bytes(out, request, bytes, &Faults::default(), false)
}

fn status(out: &mut TcpStream, code: u16, headers: &[(&str, String)]) -> std::io::Result<bool> {
    write!(out, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\n")?;
    for (key, value) in headers {
        write!(out, "{key}: {value}\r\n")?;
    }
    write!(out, "\r\n")?;
    Ok(true)
}

/// The bytes from the requested range on, with the faults of an LFS download.
fn send_bytes(
    out: &mut TcpStream,
    request: &Request,
    bytes: &[u8],
    faults: &Faults,
    lfs: bool,
) -> std::io::Result<bool> {
    let mut body = bytes.to_vec();
    if lfs && faults.corrupt {
        if let Some(last) = body.last_mut() {
            *last ^= 0xff;
        }
    }
    let start = request
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(0)
        .min(body.len());
    let part = &body[start..];
    if request.range.is_some() {
        write!(
            out,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{}\r\n",
            body.len().saturating_sub(1),
            body.len()
        )?;
    } else {
        write!(out, "HTTP/1.1 200 OK\r\n")?;
    }
    write!(out, "Content-Length: {}\r\n\r\n", part.len())?;
    if request.method == "HEAD" {
        return Ok(true);
    }
    if lfs && faults.stall {
        out.flush()?;
        std::thread::sleep(Duration::from_secs(60));
        return Ok(false);
    }
    match faults.cut_after.filter(|_| lfs) {
        Some(cut) => {
            out.write_all(&part[..cut.min(part.len())])?;
            out.flush()?;
            let _ = out.shutdown(std::net::Shutdown::Both);
            Ok(false)
        }
        None => {
            out.write_all(part)?;
            Ok(true)
        }
    }
}
