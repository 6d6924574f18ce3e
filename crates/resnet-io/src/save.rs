//! Writing models and converting checkpoints.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use resnet_core::{ResNet, ResNetConfig};

use crate::error::{Error, Result};
use crate::load::{load_resnet, WeightFiles};
use crate::naming::NamingScheme;
use crate::output::OutputFile;

/// Metadata key under which the architecture is stored as JSON.
pub const CONFIG_METADATA_KEY: &str = "resnet_config";

/// The architecture stored in a checkpoint's metadata by [`save`], if any.
pub fn config_from_metadata(
    metadata: &std::collections::BTreeMap<String, String>,
) -> Option<ResNetConfig> {
    serde_json::from_str(metadata.get(CONFIG_METADATA_KEY)?).ok()
}

/// Writes every tensor of `model` (parameters and BatchNorm statistics) to `path` in
/// `scheme`'s naming and `dtype`, with the architecture in the metadata, as an
/// [`OutputFile`] (atomically; a FIFO, device or directory is refused). Loading it back
/// gives the same network (bit for bit in the same dtype).
pub fn save(
    model: &ResNet,
    path: impl AsRef<Path>,
    scheme: NamingScheme,
    dtype: DType,
) -> Result<()> {
    let path = path.as_ref();
    let scheme = scheme.for_config(model.config());
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, tensor) in model.named_tensors()? {
        let file_name = scheme
            .from_torchvision(&name)
            .ok_or_else(|| Error::InvalidTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                reason: format!("has no name in the {scheme} scheme"),
            })?;
        let tensor = tensor
            .to_dtype(dtype)?
            .to_device(&Device::Cpu)?
            .contiguous()?;
        let tensor = tensor.reshape(scheme.file_shape(&name, tensor.dims()))?;
        tensors.insert(file_name, tensor);
    }
    let config = serde_json::to_string(model.config()).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let metadata = HashMap::from([
        (CONFIG_METADATA_KEY.to_string(), config),
        ("format".to_string(), "pt".to_string()),
        ("naming".to_string(), scheme.to_string()),
    ]);
    let views: Vec<(String, Tensor)> = tensors.into_iter().collect();
    write_tensors(path, &views, Some(metadata))
}

/// Writes `tensors` (on any device, contiguous or not) as a safetensors file through an
/// [`OutputFile`]: checked destination, atomic replacement, the umask's mode.
pub fn write_tensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    write_tensors_to(OutputFile::create(path)?, tensors, metadata)
}

/// [`write_tensors`] to an [`OutputFile`] created (and so checked) earlier.
pub fn write_tensors_to(
    mut output: OutputFile,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    use std::io::Write;
    let path = output.destination().to_path_buf();
    let on_cpu = tensors
        .iter()
        .map(|(name, t)| Ok((name.as_str(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let io_error = |e: String| Error::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    };
    let bytes = safetensors::serialize(on_cpu.iter().map(|(n, t)| (*n, t)), metadata)
        .map_err(|e| io_error(e.to_string()))?;
    let bytes = with_sorted_header(bytes).map_err(io_error)?;
    let temporary = output.temporary_path().to_path_buf();
    output
        .file()?
        .write_all(&bytes)
        .map_err(|source| Error::Io {
            path: temporary,
            source,
        })?;
    output.commit()
}

/// The same safetensors bytes with the header's keys sorted (the metadata's included), so
/// that the same tensors and metadata always make the same file: `safetensors` writes the
/// metadata in a `HashMap`'s order, which changes from run to run. The header keeps its
/// length (the same JSON, reordered), padded with spaces to a multiple of 8 as before.
fn with_sorted_header(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    use std::collections::BTreeMap;
    let length = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or("a safetensors file shorter than its header length")?;
    let end = usize::try_from(length)
        .ok()
        .and_then(|l| l.checked_add(8))
        .filter(|&end| end <= bytes.len())
        .ok_or("a header longer than the file")?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..end]).map_err(|e| e.to_string())?;
    let sorted: BTreeMap<String, serde_json::Value> = header
        .into_iter()
        .map(|(key, value)| match value {
            serde_json::Value::Object(map) => {
                let map: BTreeMap<String, serde_json::Value> = map.into_iter().collect();
                serde_json::to_value(map).map(|v| (key, v))
            }
            other => Ok((key, other)),
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut json = serde_json::to_vec(&sorted).map_err(|e| e.to_string())?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - end);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[end..]);
    Ok(out)
}

/// Converts a checkpoint of any naming scheme and dtype to `scheme` and `dtype`: loads it
/// (fully validated, for `config` or as [`load_resnet`] finds it) on the CPU and writes it
/// back. Returns the architecture.
pub fn convert(
    input: &WeightFiles,
    output: impl AsRef<Path>,
    scheme: NamingScheme,
    dtype: DType,
    config: Option<&ResNetConfig>,
) -> Result<ResNetConfig> {
    // The destination is checked before the (possibly long) load.
    drop(OutputFile::create(output.as_ref())?);
    let loaded = load_resnet(input, config, &Device::Cpu, dtype)?;
    save(&loaded.model, output, scheme, dtype)?;
    Ok(loaded.config)
}
