//! Loading and saving ResNet checkpoints for [`resnet_core`], from files that are not
//! trusted.
//!
//! - [`Checkpoint`] reads a safetensors file defensively: the whole header is checked
//!   before any data is read, data is read (never memory-mapped) one tensor at a time,
//!   and only regular files are opened.
//! - [`NamingScheme`] recognises torchvision/timm, HF transformers and CIFAR names and
//!   maps them to torchvision's in one place.
//! - [`inspect`] infers the architecture and reports loaded / missing / unexpected /
//!   mismatched tensors without failing; [`load_resnet`] fails on any of them.
//! - [`resolve_model`] finds a file, a model directory or a hub id in the local
//!   Hugging Face cache (with the `hub` feature, downloading it there when missing); [`PreprocessConfig`] turns images into inputs as timm does.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//!
//! # fn main() -> resnet_io::Result<()> {
//! let loaded = resnet_io::load_file("resnet20.safetensors", None, &Device::Cpu, DType::F32)?;
//! println!("{} ({} scheme)", loaded.config.describe(), loaded.scheme);
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
// The README's examples run as doctests of this crate.
#![doc = ""]
#![cfg_attr(doctest, doc = include_str!("../../../README.md"))]
#![deny(missing_docs)]

/// The book's chapters (`docs/src`), whose examples run as doctests of this crate as the
/// README's do: this crate's dev-dependencies reach every workspace crate.
#[cfg(doctest)]
mod book {
    macro_rules! chapters {
        ($($name:ident = $path:literal),* $(,)?) => {
            $(#[doc = include_str!(concat!("../../../docs/src/", $path))] struct $name;)*
        };
    }
    chapters! {
        Introduction = "introduction.md",
        GettingStarted = "getting-started.md",
        CommandLine = "cli.md",
        Library = "library/README.md",
        Models = "library/models.md",
        Loading = "library/loading.md",
        Features = "library/features.md",
        TrainingFromAProgram = "library/training.md",
        Training = "training.md",
        Formats = "formats.md",
        Exactness = "exactness.md",
        Performance = "performance.md",
        UntrustedInput = "untrusted-input.md",
        Gpu = "gpu.md",
        Development = "development.md",
    }
}

mod checkpoint;
mod error;
#[cfg(feature = "hub")]
#[cfg_attr(docsrs, doc(cfg(feature = "hub")))]
mod hub;
mod image_folder;
mod image_formats;
mod image_read;
mod infer;
mod keras;
mod labels;
mod load;
mod model_dir;
mod naming;
mod output;
mod preprocess;
mod report;
mod resample;
mod save;

pub use checkpoint::{Checkpoint, TensorInfo, MAX_HEADER_BYTES};
pub use error::{Error, Result};
#[cfg(feature = "hub")]
pub use hub::{DownloadProgress, HubClient, DEFAULT_ENDPOINT};
pub use image_folder::{lossless_name, ImageFolder};
pub use image_read::{
    decode_image, decode_image_bytes, decode_memory_budget, has_image_extension, read_image_bytes,
    set_decode_memory_budget, DEFAULT_DECODE_MEMORY_BUDGET, IMAGE_EXTENSIONS, MAX_IMAGE_FILE_BYTES,
    MAX_IMAGE_PIXELS,
};
pub use infer::{infer_config, Shapes};
pub use keras::{is_keras_path, keras_checkpoint, open_keras, MAX_KERAS_FILE_BYTES};
pub use labels::{builtin_labels, read_labels, CIFAR10};
pub use load::{
    inspect, load_file, load_resnet, safetensors_paths, Inspection, LoadedModel, WeightFiles,
};
#[cfg(feature = "hub")]
pub use model_dir::resolve_model_with;
pub use model_dir::{
    hub_cache_dir, read_model_dir, resolve_model, resolve_model_in, write_model_dir, ModelSource,
};
pub use naming::{is_ignored, NamingScheme};
pub use output::{
    fault_point, remove_partial_outputs, remove_stale_partials, write_output, OutputFile,
};
pub use preprocess::{batch, Interpolation, PreprocessConfig, Resize, IMAGENET_MEAN, IMAGENET_STD};
pub use report::{LoadReport, ShapeMismatch};
/// Pillow's `Image.resize`, bit for bit (nearest, bilinear and bicubic, antialiased).
pub use resample::resize as resize_like_pillow;
pub use safetensors::Dtype;
pub use save::{
    config_from_metadata, convert, save, write_tensors, write_tensors_to, CONFIG_METADATA_KEY,
};
