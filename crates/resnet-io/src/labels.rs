//! Class names: built in for ImageNet-1k and CIFAR-10, or read from a file.

use std::path::Path;

use crate::error::{Error, Result};
use crate::load::read_small_text;

const IMAGENET1K: &str = include_str!("../data/imagenet1k_labels.txt");

/// CIFAR-10's classes in index order (the sorted ImageFolder order too).
pub const CIFAR10: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The built-in names for a model of `num_classes` classes: ImageNet-1k for 1000,
/// CIFAR-10 for 10, none otherwise.
pub fn builtin_labels(num_classes: usize) -> Option<Vec<String>> {
    match num_classes {
        1000 => Some(IMAGENET1K.lines().map(String::from).collect()),
        10 => Some(CIFAR10.iter().map(|s| s.to_string()).collect()),
        _ => None,
    }
}

/// Reads a label file, one name per line, which must name exactly `num_classes` classes.
pub fn read_labels(path: &Path, num_classes: usize) -> Result<Vec<String>> {
    let labels: Vec<String> = read_small_text(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if labels.len() != num_classes {
        return Err(Error::Config {
            path: path.to_path_buf(),
            reason: format!(
                "the model has {num_classes} classes but the label file names {}",
                labels.len()
            ),
        });
    }
    Ok(labels)
}
