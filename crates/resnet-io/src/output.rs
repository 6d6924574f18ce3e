//! Writing output files, one policy for converted checkpoints, output tensors and
//! predictions:
//!
//! - the destination is checked before any work: a directory, FIFO or device is refused,
//!   a symbolic link is written through (the link stays, its target is replaced), and the
//!   folder must be writable: the temporary file is created in it at once;
//! - the data goes to that temporary file (`.NAME.XXXXXX.partial`, beside the
//!   destination), is flushed to disk, then renamed over the destination, so a reader
//!   never sees half a file and an interrupted write never leaves one;
//! - a new file gets the usual mode (0666 less the umask); a replaced file keeps its mode;
//! - the temporary file is removed on error, when dropped, and by
//!   [`remove_partial_outputs`] (for a SIGINT/SIGTERM handler).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::checkpoint::file_kind;
use crate::error::{Error, Result};

/// A test hook for fault injection: where the environment variable
/// `RESNET_TEST_ABORT_AT` is `NAME` or `NAME:N`, the process aborts (as a SIGKILL would
/// end it: no destructors, no cleanup) the first (or N-th) time it reaches the point
/// `NAME`. The points: `output-written` (a temporary output file written and flushed, not
/// yet renamed) and `output-renamed` (renamed into place), and the training
/// checkpoint's own. Tests use it to check that a run killed anywhere resumes exactly.
#[doc(hidden)]
pub fn fault_point(name: &str) {
    // Only the wanted point is ever counted, so one counter does.
    static REACHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Ok(wanted) = std::env::var("RESNET_TEST_ABORT_AT") else {
        return;
    };
    let (point, nth) = match wanted.split_once(':') {
        Some((point, n)) => (point, n.parse::<usize>().unwrap_or(1)),
        None => (wanted.as_str(), 1),
    };
    if point == name && REACHED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == nth {
        eprintln!("RESNET_TEST_ABORT_AT: aborting at {name}:{nth}");
        std::process::abort();
    }
}

/// Removes the temporary files (`.NAME.XXXXXX.partial`) that an earlier process, killed
/// while writing `NAME` in `folder`, left there. Returns how many it removed. Call it only
/// where no other process writes the same outputs (a training run holds its lock).
pub fn remove_stale_partials(folder: &Path, names: &[&str]) -> usize {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return 0;
    };
    let own = PARTIAL.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut removed = 0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        let stale = file_name.ends_with(".partial")
            && names
                .iter()
                .any(|name| file_name.starts_with(&format!(".{name}.")))
            && entry.file_type().is_ok_and(|t| t.is_file())
            && !own.contains(&entry.path());
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Temporary files not yet renamed into place, for [`remove_partial_outputs`].
static PARTIAL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes every temporary output file of this process not yet renamed into place: call
/// it from a SIGINT/SIGTERM handler before exiting.
pub fn remove_partial_outputs() {
    let partial = PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
    for path in partial.iter() {
        let _ = std::fs::remove_file(path);
    }
}

/// An output file being written: created (checked) at once, in place at [`commit`].
///
/// [`commit`]: OutputFile::commit
#[derive(Debug)]
pub struct OutputFile {
    destination: PathBuf,
    /// `None` once committed.
    temporary: Option<tempfile::NamedTempFile>,
    temporary_path: PathBuf,
    replaces: bool,
}

impl OutputFile {
    /// Checks `path` as a destination and creates the temporary file beside it.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let given = path.as_ref();
        let io = |path: &Path, source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut destination = given.to_path_buf();
        if std::fs::symlink_metadata(given).is_ok_and(|m| m.file_type().is_symlink()) {
            // Write through the link: its target is the file replaced.
            destination = std::fs::canonicalize(given).map_err(|source| Error::Io {
                path: given.to_path_buf(),
                source: std::io::Error::new(
                    source.kind(),
                    format!("a symbolic link whose target cannot be reached ({source})"),
                ),
            })?;
        }
        let existing = match std::fs::metadata(&destination) {
            Ok(metadata) if metadata.is_file() => Some(metadata),
            Ok(metadata) => {
                return Err(Error::NotAFile {
                    path: given.to_path_buf(),
                    found: file_kind(metadata.file_type()),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(given, e)),
        };
        let folder = match destination.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = destination
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::NotAFile {
                path: given.to_path_buf(),
                found: "a path without a file name",
            })?;
        let prefix = format!(".{name}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".partial");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Given to open(2), which applies the umask, as for any new file.
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let temporary = builder.tempfile_in(&folder).map_err(|source| Error::Io {
            path: given.to_path_buf(),
            source: std::io::Error::new(
                source.kind(),
                format!("cannot write in {} ({source})", folder.display()),
            ),
        })?;
        if let Some(existing) = &existing {
            std::fs::set_permissions(temporary.path(), existing.permissions())
                .map_err(|e| io(temporary.path(), e))?;
        }
        let temporary_path = temporary.path().to_path_buf();
        PARTIAL
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(temporary_path.clone());
        Ok(Self {
            destination,
            temporary: Some(temporary),
            temporary_path,
            replaces: existing.is_some(),
        })
    }

    /// The temporary file's path, for writers that take a path.
    pub fn temporary_path(&self) -> &Path {
        &self.temporary_path
    }

    /// The open temporary file.
    pub fn file(&mut self) -> Result<&mut File> {
        match &mut self.temporary {
            Some(temporary) => Ok(temporary.as_file_mut()),
            None => Err(Error::Io {
                path: self.temporary_path.clone(),
                source: std::io::Error::other("already committed"),
            }),
        }
    }

    /// Where the file goes (a symbolic link's target).
    pub fn destination(&self) -> &Path {
        &self.destination
    }

    /// Whether committing replaces an existing file.
    pub fn replaces_existing(&self) -> bool {
        self.replaces
    }

    /// Flushes the data to disk and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        let Some(temporary) = self.temporary.take() else {
            return Ok(());
        };
        temporary.as_file().sync_all().map_err(|source| Error::Io {
            path: self.temporary_path.clone(),
            source,
        })?;
        fault_point("output-written");
        temporary
            .persist(&self.destination)
            .map(drop)
            .map_err(|e| Error::Io {
                path: self.destination.clone(),
                source: e.error,
            })?;
        // The rename itself reaches the disk with the folder's entry.
        #[cfg(unix)]
        if let Some(folder) = self.destination.parent() {
            let folder = if folder.as_os_str().is_empty() {
                Path::new(".")
            } else {
                folder
            };
            if let Ok(folder) = File::open(folder) {
                let _ = folder.sync_all();
            }
        }
        fault_point("output-renamed");
        Ok(())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        // The temporary file (if not renamed) is removed by its own drop, after this.
        unregister(&self.temporary_path);
    }
}

fn unregister(path: &Path) {
    PARTIAL
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| p != path);
}

/// Writes `bytes` to `path` under this policy.
pub fn write_output(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut output = OutputFile::create(path)?;
    let temporary = output.temporary_path().to_path_buf();
    output
        .file()?
        .write_all(bytes)
        .map_err(|source| Error::Io {
            path: temporary,
            source,
        })?;
    output.commit()
}
