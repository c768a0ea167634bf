//! Where weights come from: safetensors shards (memory-mapped) or a GGUF file
//! (dequantised). Both answer requests by Hugging Face tensor name, so that
//! one set of per-family layout rules serves every source.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::{Error, Result};

/// A provider of named tensors, converted to the working dtype and device.
pub(crate) trait TensorSource {
    /// The file (or directory) to name in error messages.
    fn origin(&self) -> &Path;
    /// Whether a tensor of this name exists.
    fn contains(&self, name: &str) -> bool;
    /// Loads one tensor.
    fn load(&mut self, name: &str) -> Result<Tensor>;

    /// Loads one tensor and checks its shape.
    fn load_shaped(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.load(name)?;
        if t.dims() != shape {
            return Err(Error::TensorShape {
                path: self.origin().to_path_buf(),
                name: name.to_string(),
                found: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }
}

/// One memory-mapped safetensors file with its parsed header.
struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, safetensors::tensor::TensorInfo>,
}

/// A set of safetensors shards. Each tensor is copied once from the mapping
/// into the working dtype; its mapped pages are released right after, so a
/// load never holds two full copies of the weights.
pub(crate) struct SafetensorsSource {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
    device: Device,
    dtype: DType,
}

impl SafetensorsSource {
    pub fn open(dir: &Path, paths: &[PathBuf], device: &Device, dtype: DType) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the mapping is read-only and private to this process;
            // kedit never writes to a checkpoint it is reading.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let corrupt = |reason: String| Error::Format {
                path: path.clone(),
                format: "safetensors",
                reason,
            };
            let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| corrupt(e.to_string()))?;
            let data_start = 8 + header_len;
            let mut tensors = HashMap::new();
            let mut data_end = 0;
            for (name, info) in metadata.tensors() {
                data_end = data_end.max(info.data_offsets.1);
                index.insert(name.clone(), files.len());
                tensors.insert(name, info.clone());
            }
            if data_start + data_end != mmap.len() {
                return Err(corrupt(format!(
                    "the header describes {} bytes of data but the file holds {}",
                    data_end,
                    mmap.len().saturating_sub(data_start)
                )));
            }
            files.push(SafetensorsFile {
                path: path.clone(),
                mmap,
                data_start,
                tensors,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
            device: device.clone(),
            dtype,
        })
    }
}

fn candle_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    Some(match dtype {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::I64 => DType::I64,
        safetensors::Dtype::U32 => DType::U32,
        safetensors::Dtype::U8 => DType::U8,
        _ => return None,
    })
}

impl TensorSource for SafetensorsSource {
    fn origin(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load(&mut self, name: &str) -> Result<Tensor> {
        let Some(&file_idx) = self.index.get(name) else {
            return Err(Error::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
            });
        };
        let file = &self.files[file_idx];
        let info = &file.tensors[name];
        let dtype = candle_dtype(info.dtype).ok_or_else(|| Error::Format {
            path: file.path.clone(),
            format: "safetensors",
            reason: format!("tensor {name} has unsupported dtype {:?}", info.dtype),
        })?;
        let (start, end) = (
            file.data_start + info.data_offsets.0,
            file.data_start + info.data_offsets.1,
        );
        let bytes = &file.mmap[start..end];
        let tensor = Tensor::from_raw_buffer(bytes, dtype, &info.shape, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?;
        // The tensor now owns its data: let the kernel drop the mapped pages
        // so that loading never holds the weights twice.
        // SAFETY: the mapping is read-only and file-backed; dropped pages are
        // re-read from the file if touched again, so no data is lost.
        let _ = unsafe {
            file.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
        Ok(tensor)
    }
}

/// A GGUF file. Tensors are requested by their Hugging Face names and mapped
/// to GGUF names; every quantisation candle knows (Q4_0, Q4_1, Q8_0, the
/// K-quants, F16, F32, ...) is dequantised to the working dtype.
pub(crate) struct GgufSource {
    path: PathBuf,
    file: File,
    pub content: gguf_file::Content,
    device: Device,
    dtype: DType,
}

impl GgufSource {
    pub fn open(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            format: "GGUF",
            reason: crate::error::candle_reason(&e),
        })?;
        // Check that every tensor's data lies inside the file, so a truncated
        // download fails here with a clear message, not halfway through.
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            let bytes = elems / block * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > len {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    format: "GGUF",
                    reason: format!("tensor {name} ends at byte {end} but the file has {len} bytes (truncated?)"),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
            device: device.clone(),
            dtype,
        })
    }

    /// A metadata value, or a typed error naming the key.
    pub fn meta(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content.metadata.get(key).ok_or_else(|| Error::Format {
            path: self.path.clone(),
            format: "GGUF",
            reason: format!("metadata key {key} is missing"),
        })
    }

    /// Translates a Hugging Face Llama-style tensor name to its GGUF name.
    fn gguf_name(name: &str) -> Option<String> {
        if name == "model.embed_tokens.weight" {
            return Some("token_embd.weight".into());
        }
        if name == "model.norm.weight" {
            return Some("output_norm.weight".into());
        }
        if name == "lm_head.weight" {
            return Some("output.weight".into());
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let mapped = match rest {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "self_attn.q_proj.bias" => "attn_q.bias",
            "self_attn.k_proj.bias" => "attn_k.bias",
            "self_attn.v_proj.bias" => "attn_v.bias",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            _ => return None,
        };
        Some(format!("blk.{layer}.{mapped}"))
    }
}

impl TensorSource for GgufSource {
    fn origin(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        Self::gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    fn load(&mut self, name: &str) -> Result<Tensor> {
        let gguf_name = Self::gguf_name(name)
            .filter(|g| self.content.tensor_infos.contains_key(g))
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: format!(
                    "{name} (GGUF: {})",
                    Self::gguf_name(name).unwrap_or_default()
                ),
            })?;
        let corrupt = |e: candle_core::Error| Error::Format {
            path: self.path.clone(),
            format: "GGUF",
            reason: format!("tensor {gguf_name}: {e}"),
        };
        let q = self
            .content
            .tensor(&mut self.file, &gguf_name, &Device::Cpu)
            .map_err(corrupt)?;
        let t = q.dequantize(&Device::Cpu).map_err(corrupt)?;
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }
}
