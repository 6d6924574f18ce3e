//! ImageFolder trees as torchvision reads them: one folder per class, sorted names give
//! the class index; shared by evaluation and training.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An ImageFolder tree: class names (sorted folder names), every image with its class,
/// and every other entry of the class folders with why it is not scored.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// Class names: the sorted folder names (non-UTF-8 bytes escaped, see [`lossless_name`]).
    pub classes: Vec<String>,
    /// Every image file with its class index, in sorted order.
    pub images: Vec<(PathBuf, usize)>,
    /// Every other entry of the class folders, with why it is not an image.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Sorted entries of `dir`.
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io)?;
    entries.sort();
    Ok(entries)
}

/// How deep class folders are searched, as torchvision's ImageFolder walks them.
const MAX_DEPTH: usize = 16;

/// Every file under `dir` (sub-folders walked, symbolic links to folders not followed):
/// an image to score, or an entry counted with its reason.
fn walk_class(dir: &Path, class: usize, depth: usize, folder: &mut ImageFolder) -> Result<()> {
    for path in entries(dir)? {
        let kind = std::fs::symlink_metadata(&path).map(|m| m.file_type());
        if kind.as_ref().is_ok_and(|k| k.is_dir()) {
            if depth >= MAX_DEPTH {
                folder
                    .skipped
                    .push((path, format!("a folder more than {MAX_DEPTH} levels deep")));
            } else {
                walk_class(&path, class, depth + 1, folder)?;
            }
        } else if !crate::has_image_extension(&path) {
            let reason = format!(
                "not an image file name (expected .{})",
                crate::IMAGE_EXTENSIONS.join(", .")
            );
            folder.skipped.push((path, reason));
        } else if kind.as_ref().is_ok_and(|k| k.is_symlink()) && path.is_dir() {
            folder
                .skipped
                .push((path, "a symbolic link to a folder (not followed)".into()));
        } else {
            // FIFOs, devices and dangling links are counted when they fail to open.
            folder.images.push((path, class));
        }
    }
    Ok(())
}

impl ImageFolder {
    /// Lists `root`: one folder per class, sorted (torchvision's order); sub-folders are
    /// walked (symbolic links to folders are not followed); a class folder without image
    /// files is an error naming it, as torchvision's ImageFolder refuses it.
    pub fn open(root: &Path) -> Result<Self> {
        image_folder(root)
    }
}

fn image_folder(root: &Path) -> Result<ImageFolder> {
    let class_dirs: Vec<PathBuf> = entries(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if class_dirs.is_empty() {
        return Err(Error::Dataset {
            path: root.to_path_buf(),
            reason: "expected an ImageFolder tree (one folder per class), found no folders".into(),
        });
    }
    let mut folder = ImageFolder {
        classes: Vec::new(),
        images: Vec::new(),
        skipped: Vec::new(),
    };
    for (index, dir) in class_dirs.iter().enumerate() {
        folder.classes.push(lossless_name(
            dir.file_name().unwrap_or_default().as_encoded_bytes(),
        ));
        let before = folder.images.len();
        walk_class(dir, index, 0, &mut folder)?;
        if folder.images.len() == before {
            return Err(Error::Dataset {
                path: dir.clone(),
                reason: "the class folder has no image files (torchvision's ImageFolder \
                         refuses an empty class too)"
                    .into(),
            });
        }
    }
    Ok(folder)
}

/// A file name as a string that maps back to its bytes: UTF-8 as it is, `\` doubled,
/// any other byte as `\xNN`.
pub fn lossless_name(bytes: &[u8]) -> String {
    let mut name = String::new();
    for chunk in bytes.utf8_chunks() {
        name.push_str(&chunk.valid().replace('\\', "\\\\"));
        for byte in chunk.invalid() {
            name.push_str(&format!("\\x{byte:02X}"));
        }
    }
    name
}
