//! Small safetensors helpers: atomic writes with JSON-able metadata, and
//! validated reads that report which file is wrong and how.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

struct Bytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Bytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_bytes(t: &Tensor) -> Result<Bytes> {
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    let (dtype, data) = match t.dtype() {
        DType::F64 => (
            safetensors::Dtype::F64,
            flat.to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::U32 => (
            safetensors::Dtype::U32,
            flat.to_vec1::<u32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            safetensors::Dtype::I64,
            flat.to_vec1::<i64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            safetensors::Dtype::BF16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            safetensors::Dtype::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        _ => (
            safetensors::Dtype::F32,
            flat.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
    };
    Ok(Bytes {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

/// Writes `tensors` and `metadata` to `path` atomically: to a temporary file
/// in the same directory, synced, then renamed over `path`. A crash leaves
/// either the old file or the new one, never a torn one.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<(String, Bytes)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.to_string(), to_bytes(t)?)))
        .collect::<Result<_>>()?;
    let views: Vec<(&str, &Bytes)> = bytes.iter().map(|(n, b)| (n.as_str(), b)).collect();
    let buffer = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        format: "safetensors",
        reason: e.to_string(),
    })?;
    write_atomic(path, &buffer)
}

/// Writes `data` to `path` through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Tensors (on the CPU) and metadata of a safetensors file, fully validated.
pub fn read_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let buffer = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let corrupt = |reason: String| Error::Format {
        path: path.to_path_buf(),
        format: "safetensors",
        reason,
    };
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&buffer).map_err(|e| corrupt(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&buffer).map_err(|e| corrupt(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::U32 => DType::U32,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            other => {
                return Err(corrupt(format!(
                    "tensor {name} has unsupported dtype {other:?}"
                )))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
        tensors.insert(name, t);
    }
    Ok((tensors, metadata.metadata().clone().unwrap_or_default()))
}
