//! Deltas: the low-rank weight updates an edit produced, with everything
//! needed to apply, undo, save and audit them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::request::EditRequest;
use crate::{Error, Result};

/// The update of one layer's `mlp.w_out`: `ΔW = left · rightᵀ`.
#[derive(Debug, Clone)]
pub struct LayerDelta {
    /// The block.
    pub layer: usize,
    /// `[d_model, rank]`, f32.
    pub left: Tensor,
    /// `[d_ff, rank]`, f32.
    pub right: Tensor,
    /// The keys the update was solved for, `[d_ff, n]` (k* for ROME).
    pub keys: Tensor,
    /// The values `W' k` must equal at those keys, `[d_model, n]` (v*).
    pub values: Tensor,
}

impl LayerDelta {
    /// `ΔW` as a dense `[d_model, d_ff]` f32 matrix.
    pub fn dense(&self) -> Result<Tensor> {
        Ok(self.left.matmul(&self.right.t()?)?)
    }

    /// Frobenius norm of `ΔW`, without forming it: `‖L Rᵀ‖² = tr((LᵀL)(RᵀR))`.
    pub fn norm(&self) -> Result<f32> {
        let l = self.left.to_dtype(DType::F64)?;
        let r = self.right.to_dtype(DType::F64)?;
        let sq = (l.t()?.matmul(&l)? * r.t()?.matmul(&r)?)?
            .sum_all()?
            .to_scalar::<f64>()?;
        Ok(sq.max(0.0).sqrt() as f32)
    }
}

/// What [`Delta`] records besides its tensors (stored as JSON in the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaInfo {
    /// `"rome"`, `"memit"`, `"alphaedit"`.
    pub method: String,
    /// Fingerprint of the base model it was computed for.
    pub model_fingerprint: String,
    /// The requests it implements.
    pub requests: Vec<EditRequest>,
    /// The hyper-parameters used, as JSON.
    pub hparams: serde_json::Value,
    /// The layers, in the order of [`Delta::layers`].
    pub layers: Vec<usize>,
    /// kedit version that wrote it.
    pub kedit_version: String,
}

/// A weight update with its provenance. Applying it adds `left · rightᵀ` to
/// each listed layer's `mlp.w_out`.
#[derive(Debug, Clone)]
pub struct Delta {
    /// Method, model, requests and hyper-parameters.
    pub info: DeltaInfo,
    /// Per-layer factors.
    pub layers: Vec<LayerDelta>,
}

const FORMAT: &str = "kedit-delta-1";

impl Delta {
    /// Frobenius norm of the whole update.
    pub fn norm(&self) -> Result<f32> {
        let mut sq = 0.0f64;
        for l in &self.layers {
            sq += f64::from(l.norm()?).powi(2);
        }
        Ok(sq.sqrt() as f32)
    }

    /// Saves to a safetensors file (factors, keys, values) with the JSON
    /// description in its metadata, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let info = serde_json::to_string(&self.info)
            .map_err(|e| Error::invalid("delta", e.to_string()))?;
        let names: Vec<[String; 4]> = self
            .layers
            .iter()
            .map(|l| {
                let p = format!("layer.{}", l.layer);
                [
                    format!("{p}.left"),
                    format!("{p}.right"),
                    format!("{p}.keys"),
                    format!("{p}.values"),
                ]
            })
            .collect();
        let mut tensors = Vec::new();
        for (l, n) in self.layers.iter().zip(&names) {
            tensors.push((n[0].as_str(), &l.left));
            tensors.push((n[1].as_str(), &l.right));
            tensors.push((n[2].as_str(), &l.keys));
            tensors.push((n[3].as_str(), &l.values));
        }
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("kedit".to_string(), info),
        ]);
        crate::io::write_safetensors(path, &tensors, meta)
    }

    /// Loads a delta file, checking its format and the consistency of its
    /// tensors (not yet the model: see `Editor::apply_delta`).
    pub fn load(path: &Path) -> Result<Delta> {
        let (tensors, meta) = crate::io::read_safetensors(path)?;
        let bad = |reason: String| Error::Format {
            path: path.to_path_buf(),
            format: "kedit delta",
            reason,
        };
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!(
                "metadata format is {:?}, expected {FORMAT:?}",
                meta.get("format")
            )));
        }
        let info: DeltaInfo = serde_json::from_str(
            meta.get("kedit")
                .ok_or_else(|| bad("no kedit metadata".into()))?,
        )
        .map_err(|e| bad(format!("metadata: {e}")))?;
        let mut layers = Vec::new();
        for &layer in &info.layers {
            let get = |part: &str| -> Result<Tensor> {
                let name = format!("layer.{layer}.{part}");
                Ok(tensors
                    .get(&name)
                    .ok_or_else(|| bad(format!("tensor {name} is missing")))?
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?)
            };
            let (left, right, keys, values) =
                (get("left")?, get("right")?, get("keys")?, get("values")?);
            let dims = |t: &Tensor, name: &str| -> Result<(usize, usize)> {
                t.dims2().map_err(|_| {
                    bad(format!(
                        "layer {layer} {name} is not a matrix: {:?}",
                        t.dims()
                    ))
                })
            };
            let (d, r) = dims(&left, "left")?;
            let (ff, r2) = dims(&right, "right")?;
            let (ff2, n) = dims(&keys, "keys")?;
            let (d2, n2) = dims(&values, "values")?;
            if r != r2 || ff != ff2 || d != d2 || n != n2 {
                return Err(bad(format!(
                    "layer {layer}: inconsistent shapes left {:?}, right {:?}, keys {:?}, values {:?}",
                    left.dims(),
                    right.dims(),
                    keys.dims(),
                    values.dims()
                )));
            }
            let finite = [&left, &right].iter().all(|t| {
                t.flatten_all()
                    .and_then(|f| f.to_vec1::<f32>())
                    .is_ok_and(|v| v.iter().all(|x| x.is_finite()))
            });
            if !finite {
                return Err(bad(format!("layer {layer} holds non-finite values")));
            }
            layers.push(LayerDelta {
                layer,
                left,
                right,
                keys,
                values,
            });
        }
        Ok(Delta { info, layers })
    }
}
