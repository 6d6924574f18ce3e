//! The one error type of this crate: every variant names the file it is about.

use std::path::PathBuf;

use crate::report::LoadReport;

/// Everything that can go wrong reading, validating, loading or saving a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The path is a directory, a FIFO, a device...: never read from.
    #[error("{}: expected a regular file, found {found}", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        found: &'static str,
    },
    /// The bytes are not a well-formed safetensors file.
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, with expected and found values.
        reason: String,
    },
    /// One tensor is malformed or holds values a ResNet cannot have.
    #[error("{}: tensor '{tensor}': {reason}", path.display())]
    InvalidTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The tensor names follow no naming scheme this crate knows.
    #[error("{}: unknown checkpoint naming scheme: {reason}", path.display())]
    UnknownScheme {
        /// The file.
        path: PathBuf,
        /// Which keys were seen.
        reason: String,
    },
    /// The architecture cannot be read off the tensors.
    #[error("{}: cannot infer the architecture: {reason}", path.display())]
    Infer {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The checkpoint does not fit the architecture: one line (see
    /// [`LoadReport::summary`]); the report lists every problem.
    #[error("{}: checkpoint does not fit {architecture}: {}", path.display(), report.summary())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The architecture it was checked against.
        architecture: String,
        /// Loaded, missing, unexpected and mismatched tensors.
        report: Box<LoadReport>,
    },
    /// A model directory's `config.json` cannot be used.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A model given by hub id is not in the local Hugging Face cache.
    #[error("model '{id}' not found: {reason}")]
    NotFound {
        /// The model id or path given.
        id: String,
        /// Where it was looked for.
        reason: String,
    },
    /// A model could not be downloaded from the hub.
    #[error("model '{id}': downloading {file}: {reason}")]
    Download {
        /// The hub id.
        id: String,
        /// The file of the repository.
        file: String,
        /// What went wrong, and what to do about it.
        reason: String,
    },
    /// A Keras weights file or archive cannot be read.
    #[error("{}: not a readable Keras weights file: {reason}", path.display())]
    Keras {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A data folder cannot be used.
    #[error("{}: {reason}", path.display())]
    Dataset {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An image cannot be decoded or preprocessed.
    #[error("{}: {reason}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
