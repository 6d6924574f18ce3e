//! Reading a safetensors file that came from the internet.
//!
//! Policy: the header is read and checked in full before any tensor data is touched —
//! header length against the file size and a 100 MB cap, UTF-8, JSON, duplicate keys,
//! known dtypes, shape products with overflow checks, offsets that tile the data section
//! exactly (no gap, no overlap, nothing past the end). Tensor data is then read with
//! ordinary reads, one tensor at a time, never memory-mapped: a file truncated or
//! rewritten while open gives an I/O error, not SIGBUS, and memory stays near the size of
//! the tensors themselves. Only regular files are opened, non-blocking, so a FIFO or a
//! device such as /dev/zero is refused instead of blocking or reading forever.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

/// Largest header accepted, as the safetensors crate itself limits it.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name in the file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

enum Source {
    File(Mutex<File>),
    Memory(Vec<u8>),
}

/// A safetensors file whose header has been validated; tensors are read on demand.
pub struct Checkpoint {
    path: PathBuf,
    source: Source,
    data_start: u64,
    tensors: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a non-regular file is, for the error message.
pub(crate) fn file_kind(file_type: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file (checked again on the open handle),
/// never blocking on a FIFO.
pub(crate) fn open_regular_file(path: &Path) -> Result<File> {
    let metadata = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if !metadata.is_file() {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
            found: file_kind(metadata.file_type()),
        });
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        // Should the path be swapped for a FIFO after the check above, opening it must
        // not block waiting for a writer.
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| io_error(path, e))?;
    let metadata = file.metadata().map_err(|e| io_error(path, e))?;
    if !metadata.is_file() {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
            found: file_kind(metadata.file_type()),
        });
    }
    Ok(file)
}

/// The header's top-level entries in file order, keeping duplicates (serde_json's map
/// would silently keep the last one).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

impl Checkpoint {
    /// Opens `path` and validates its header; no tensor data is read yet.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = open_regular_file(path)?;
        let file_len = file.metadata().map_err(|e| io_error(path, e))?.len();
        let invalid = |reason: String| Error::InvalidFile {
            path: path.to_path_buf(),
            reason,
        };
        if file_len < 8 {
            return Err(invalid(format!(
                "the file is {file_len} bytes, shorter than the 8-byte header length"
            )));
        }
        let mut prefix = [0u8; 8];
        file.read_exact(&mut prefix)
            .map_err(|e| io_error(path, e))?;
        let header_len = check_header_len(u64::from_le_bytes(prefix), file_len).map_err(invalid)?;
        // header_len <= MAX_HEADER_BYTES, so this allocation is bounded.
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                invalid("the file ended inside its header (truncated while reading?)".into())
            } else {
                io_error(path, e)
            }
        })?;
        let (tensors, metadata) =
            parse_header(&header, file_len - 8 - header_len).map_err(invalid)?;
        Ok(Self {
            path: path.to_path_buf(),
            source: Source::File(Mutex::new(file)),
            data_start: 8 + header_len,
            tensors,
            metadata,
        })
    }

    /// Validates an in-memory safetensors buffer; `label` names it in errors.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        let path = label.into();
        let invalid = |reason: String| Error::InvalidFile {
            path: path.clone(),
            reason,
        };
        let file_len = bytes.len() as u64;
        let Some(prefix) = bytes.first_chunk::<8>() else {
            return Err(invalid(format!(
                "the file is {file_len} bytes, shorter than the 8-byte header length"
            )));
        };
        let header_len =
            check_header_len(u64::from_le_bytes(*prefix), file_len).map_err(invalid)?;
        let header = &bytes[8..8 + header_len as usize];
        let (tensors, metadata) =
            parse_header(header, file_len - 8 - header_len).map_err(invalid)?;
        Ok(Self {
            path,
            source: Source::Memory(bytes),
            data_start: 8 + header_len,
            tensors,
            metadata,
        })
    }

    /// The file's path (or the label given to [`Checkpoint::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor's header entry, in data order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The entry of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The header's `__metadata__` strings.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Reads tensor `info`'s bytes.
    fn read_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>> {
        let (begin, end) = info.data_offsets;
        let mut buffer = vec![0u8; (end - begin) as usize];
        self.read_into(info, &mut buffer)?;
        Ok(buffer)
    }

    /// Fills `buffer` (exactly the tensor's size) with tensor `info`'s bytes.
    fn read_into(&self, info: &TensorInfo, buffer: &mut [u8]) -> Result<()> {
        let (begin, end) = info.data_offsets;
        match &self.source {
            Source::Memory(bytes) => {
                let range = (self.data_start + begin) as usize..(self.data_start + end) as usize;
                buffer.copy_from_slice(&bytes[range]);
                Ok(())
            }
            Source::File(file) => {
                let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                file.seek(SeekFrom::Start(self.data_start + begin))
                    .and_then(|_| file.read_exact(buffer))
                    .map_err(|e| {
                        if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            self.tensor_error(
                                &info.name,
                                "the file ended before this tensor's data (truncated while open?)"
                                    .into(),
                            )
                        } else {
                            io_error(&self.path, e)
                        }
                    })
            }
        }
    }

    fn tensor_error(&self, tensor: &str, reason: String) -> Error {
        Error::InvalidTensor {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            reason,
        }
    }

    /// Reads tensor `info`'s data straight into a buffer of its element type: no
    /// intermediate byte copy, so loading peaks near the size of the tensors themselves.
    fn read_typed<T: FloatElement>(&self, info: &TensorInfo) -> Result<Tensor> {
        let mut values = vec![T::zeroed(); info.elem_count()];
        self.read_into(info, bytemuck::cast_slice_mut(&mut values))?;
        if cfg!(target_endian = "big") {
            for value in &mut values {
                *value = value.swap_bytes();
            }
        }
        if let Some(index) = values.iter().position(|v| !v.is_finite_value()) {
            return Err(self.tensor_error(
                &info.name,
                format!("element {index} is NaN or infinite; weights must be finite"),
            ));
        }
        Ok(Tensor::from_vec(
            values,
            info.shape.as_slice(),
            &Device::Cpu,
        )?)
    }

    /// Reads tensor `name` onto `device` as `dtype`. Floating-point data must be finite:
    /// a NaN or infinity is an error naming the tensor and the element.
    pub fn load(&self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        let info = self
            .info(name)
            .ok_or_else(|| self.tensor_error(name, "not in the file".into()))?;
        let typed = match info.dtype {
            Dtype::F32 => Some(self.read_typed::<f32>(info)?),
            Dtype::F16 => Some(self.read_typed::<half::f16>(info)?),
            Dtype::BF16 => Some(self.read_typed::<half::bf16>(info)?),
            _ => None,
        };
        if let Some(tensor) = typed {
            return Ok(tensor.to_dtype(dtype)?.to_device(device)?);
        }
        let bytes = self.read_bytes(info)?;
        if let Some(index) = first_non_finite(&bytes, info.dtype) {
            return Err(self.tensor_error(
                name,
                format!("element {index} is NaN or infinite; weights must be finite"),
            ));
        }
        let view = TensorView::new(info.dtype, info.shape.clone(), &bytes)
            .map_err(|e| self.tensor_error(name, e.to_string()))?;
        let tensor = view
            .load(device)
            .map_err(|e| self.tensor_error(name, e.to_string()))?;
        Ok(tensor.to_dtype(dtype)?)
    }
}

fn check_header_len(header_len: u64, file_len: u64) -> std::result::Result<u64, String> {
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} is absurd (the limit is {MAX_HEADER_BYTES} bytes)"
        ));
    }
    if header_len > file_len - 8 {
        return Err(format!(
            "header length {header_len} runs past the end of the {file_len}-byte file"
        ));
    }
    Ok(header_len)
}

type Header = (Vec<TensorInfo>, BTreeMap<String, String>);

fn parse_header(header: &[u8], data_len: u64) -> std::result::Result<Header, String> {
    let text =
        std::str::from_utf8(header).map_err(|e| format!("the header is not valid UTF-8 ({e})"))?;
    let Entries(entries) =
        serde_json::from_str(text).map_err(|e| format!("the header is not valid JSON ({e})"))?;
    let mut seen = std::collections::HashSet::new();
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(format!("the header names '{name}' twice"));
        }
        if name == "__metadata__" {
            metadata = serde_json::from_value(value)
                .map_err(|e| format!("__metadata__ must map strings to strings ({e})"))?;
            continue;
        }
        let raw: RawTensorInfo = serde_json::from_value(value)
            .map_err(|e| format!("tensor '{name}': malformed entry ({e})"))?;
        tensors.push(check_tensor_info(name, raw)?);
    }
    tensors.sort_by_key(|t| t.data_offsets);
    let mut expected_begin = 0u64;
    for info in &tensors {
        let (begin, end) = info.data_offsets;
        if begin < expected_begin {
            return Err(format!(
                "tensor '{}' at bytes {begin}..{end} overlaps the previous tensor, which ends at {expected_begin}",
                info.name
            ));
        }
        if begin > expected_begin {
            return Err(format!(
                "gap in the data: bytes {expected_begin}..{begin} belong to no tensor (before '{}')",
                info.name
            ));
        }
        expected_begin = end;
    }
    if expected_begin != data_len {
        return Err(format!(
            "the tensors cover {expected_begin} bytes of data but the file holds {data_len}"
        ));
    }
    Ok((tensors, metadata))
}

fn check_tensor_info(name: String, raw: RawTensorInfo) -> std::result::Result<TensorInfo, String> {
    let dtype: Dtype = serde_json::from_value(serde_json::Value::String(raw.dtype.clone()))
        .map_err(|_| format!("tensor '{name}': unknown dtype '{}'", raw.dtype))?;
    let (begin, end) = raw.data_offsets;
    if end < begin {
        return Err(format!(
            "tensor '{name}': data_offsets [{begin}, {end}] end before they begin"
        ));
    }
    let overflow = || format!("tensor '{name}': shape {:?} overflows", raw.shape);
    let elements = raw
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    let bits = elements
        .checked_mul(dtype.bitsize() as u64)
        .ok_or_else(overflow)?;
    if bits % 8 != 0 || bits / 8 != end - begin {
        return Err(format!(
            "tensor '{name}': dtype {dtype} and shape {:?} need {bits} bits, but data_offsets [{begin}, {end}] hold {} bytes",
            raw.shape,
            end - begin
        ));
    }
    let shape = raw
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| overflow()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        data_offsets: (begin, end),
    })
}

/// The float element types a parameter may be stored as.
trait FloatElement: bytemuck::Pod + candle_core::WithDType {
    fn is_finite_value(&self) -> bool;
    fn swap_bytes(self) -> Self;
}

impl FloatElement for f32 {
    fn is_finite_value(&self) -> bool {
        self.is_finite()
    }
    fn swap_bytes(self) -> Self {
        f32::from_bits(self.to_bits().swap_bytes())
    }
}

impl FloatElement for half::f16 {
    fn is_finite_value(&self) -> bool {
        self.is_finite()
    }
    fn swap_bytes(self) -> Self {
        half::f16::from_bits(self.to_bits().swap_bytes())
    }
}

impl FloatElement for half::bf16 {
    fn is_finite_value(&self) -> bool {
        self.is_finite()
    }
    fn swap_bytes(self) -> Self {
        half::bf16::from_bits(self.to_bits().swap_bytes())
    }
}

/// Index of the first NaN or infinite element of little-endian f64 data, if any (F32,
/// F16 and BF16 are checked on their typed buffers in `read_typed`).
fn first_non_finite(bytes: &[u8], dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F64 => bytes.chunks_exact(8).position(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            !f64::from_le_bytes(a).is_finite()
        }),
        _ => None,
    }
}
