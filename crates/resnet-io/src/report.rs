//! The validation report: which tensors fit the architecture and which do not.

use std::fmt;

use safetensors::Dtype;

use crate::naming::NamingScheme;

/// A tensor whose shape is not the one the architecture needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// torchvision name.
    pub name: String,
    /// Name in the file.
    pub file_name: String,
    /// The shape the architecture needs.
    pub expected: Vec<usize>,
    /// The shape in the file.
    pub found: Vec<usize>,
}

/// Everything the header says about a checkpoint against an architecture, before any
/// data is read: the same report that a failed load carries, and that `inspect` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// The naming scheme of the file.
    pub scheme: NamingScheme,
    /// Tensors present with the expected shape and an accepted dtype (torchvision names).
    pub loaded: Vec<String>,
    /// Tensors the architecture needs that the file lacks, with their expected shape.
    pub missing: Vec<(String, Vec<usize>)>,
    /// Tensors of the file that the architecture has no place for (file names).
    pub unexpected: Vec<String>,
    /// Tensors present with another shape.
    pub mismatched: Vec<ShapeMismatch>,
    /// Parameters stored as something other than F32, F16 or BF16 (file name, dtype):
    /// never converted silently.
    pub wrong_dtype: Vec<(String, Dtype)>,
    /// Tensors accepted and not used (`num_batches_tracked`).
    pub ignored: Vec<String>,
}

impl LoadReport {
    /// An empty report for a file of `scheme`.
    pub fn new(scheme: NamingScheme) -> Self {
        Self {
            scheme,
            loaded: Vec::new(),
            missing: Vec::new(),
            unexpected: Vec::new(),
            mismatched: Vec::new(),
            wrong_dtype: Vec::new(),
            ignored: Vec::new(),
        }
    }

    /// True when the file fits the architecture exactly.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.mismatched.is_empty()
            && self.wrong_dtype.is_empty()
    }
}

impl LoadReport {
    /// One line: the counts, and the first few names of each kind of problem.
    pub fn summary(&self) -> String {
        fn first<T>(items: &[T], show: impl Fn(&T) -> String) -> String {
            let mut shown: Vec<String> = items.iter().take(2).map(show).collect();
            if items.len() > 2 {
                shown.push(format!("{} more", items.len() - 2));
            }
            shown.join(", ")
        }
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            let names = first(&self.missing, |(n, _)| n.clone());
            parts.push(format!("{} missing ({names})", self.missing.len()));
        }
        if !self.unexpected.is_empty() {
            let names = first(&self.unexpected, String::clone);
            parts.push(format!("{} unexpected ({names})", self.unexpected.len()));
        }
        if !self.mismatched.is_empty() {
            let names = first(&self.mismatched, |m| {
                format!("{}: expected {:?}, found {:?}", m.name, m.expected, m.found)
            });
            parts.push(format!(
                "{} with the wrong shape ({names})",
                self.mismatched.len()
            ));
        }
        if !self.wrong_dtype.is_empty() {
            let names = first(&self.wrong_dtype, |(n, d)| {
                format!("{n}: expected F32, F16 or BF16, found {d}")
            });
            parts.push(format!(
                "{} with the wrong dtype ({names})",
                self.wrong_dtype.len()
            ));
        }
        if parts.is_empty() {
            return format!("{} loaded", self.loaded.len());
        }
        format!("{} loaded, {}", self.loaded.len(), parts.join(", "))
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} loaded, {} missing, {} unexpected, {} with the wrong shape, {} with the wrong dtype, {} ignored",
            self.loaded.len(),
            self.missing.len(),
            self.unexpected.len(),
            self.mismatched.len(),
            self.wrong_dtype.len(),
            self.ignored.len()
        )?;
        for (name, shape) in &self.missing {
            writeln!(f, "  missing:    {name} (expected shape {shape:?})")?;
        }
        for name in &self.unexpected {
            writeln!(f, "  unexpected: {name}")?;
        }
        for m in &self.mismatched {
            let alias = if m.file_name == m.name {
                String::new()
            } else {
                format!(" (in the file: {})", m.file_name)
            };
            writeln!(
                f,
                "  shape:      {}{alias}: expected {:?}, found {:?}",
                m.name, m.expected, m.found
            )?;
        }
        for (name, dtype) in &self.wrong_dtype {
            writeln!(
                f,
                "  dtype:      {name}: expected F32, F16 or BF16, found {dtype}"
            )?;
        }
        Ok(())
    }
}
