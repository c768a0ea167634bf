//! Writing a (possibly edited) model back to disk as a Hugging Face
//! directory in its source family's layout, so any tool can load it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use super::config::{Family, Positional};
use super::decoder::MlpIn;
use super::Model;
use crate::{Error, Result};

/// Inverse of the load-time permutation: half-split rotary rows back to the
/// interleaved order (GPT-J).
fn half_to_interleaved(
    t: &Tensor,
    heads: usize,
    head_dim: usize,
    rotary_dim: usize,
) -> Result<Tensor> {
    let rest: Vec<usize> = t.dims()[1..].to_vec();
    let shape = |dims: &[usize]| -> Vec<usize> { dims.iter().chain(&rest).copied().collect() };
    let x = t.reshape(shape(&[heads, head_dim]))?;
    let rot = x
        .narrow(1, 0, rotary_dim)?
        .reshape(shape(&[heads, 2, rotary_dim / 2]))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(shape(&[heads, rotary_dim]))?;
    let x = if rotary_dim < head_dim {
        Tensor::cat(&[&rot, &x.narrow(1, rotary_dim, head_dim - rotary_dim)?], 1)?
    } else {
        rot
    };
    Ok(x.reshape(shape(&[heads * head_dim]))?)
}

impl Model {
    /// Writes `config.json`, `model.safetensors` and `tokenizer.json` into
    /// `dir` in the source family's Hugging Face layout (a GGUF-sourced
    /// Llama or Qwen2 is written with Hugging Face names). The files reload
    /// with [`Model::load`] and carry every applied edit.
    pub fn export(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors = self.export_tensors()?;
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        crate::io::write_safetensors(&dir.join("model.safetensors"), &refs, meta)?;
        let config = serde_json::to_string_pretty(&self.export_config())
            .map_err(|e| Error::invalid("config", e.to_string()))?;
        crate::io::write_atomic(&dir.join("config.json"), config.as_bytes())?;
        let tok = self
            .tokenizer()
            .inner()
            .to_string(true)
            .map_err(|e| Error::Tokenizer(format!("serialising: {e}")))?;
        crate::io::write_atomic(&dir.join("tokenizer.json"), tok.as_bytes())
    }

    fn export_config(&self) -> serde_json::Value {
        if let Some(original) = &self.config_json {
            return original.clone();
        }
        let c = self.config();
        let theta = match &c.positional {
            Positional::Rotary(r) => r.theta,
            Positional::Learned => 10000.0,
        };
        let arch = match c.family {
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        json!({
            "architectures": [arch],
            "model_type": c.family.model_type(),
            "hidden_size": c.d_model,
            "intermediate_size": c.d_ff,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": theta,
            "max_position_embeddings": c.max_positions,
            "vocab_size": c.vocab_size,
            "tie_word_embeddings": c.tied_embeddings,
            "hidden_act": "silu",
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_ids.first(),
            "torch_dtype": "float32",
        })
    }

    /// Every tensor under its source-family name.
    fn export_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let c = self.config();
        let w = self.weights();
        let mut out: Vec<(String, Tensor)> = Vec::new();
        let mut put = |name: String, t: &Tensor| out.push((name, t.clone()));
        match c.family {
            Family::Llama | Family::Mistral | Family::Qwen2 => {
                put("model.embed_tokens.weight".into(), &w.embed);
                for (l, b) in w.blocks.iter().enumerate() {
                    let p = format!("model.layers.{l}");
                    put(format!("{p}.input_layernorm.weight"), &b.ln1.weight);
                    if let Some(ln2) = &b.ln2 {
                        put(format!("{p}.post_attention_layernorm.weight"), &ln2.weight);
                    }
                    for (name, lin) in [
                        ("q_proj", &b.attn.wq),
                        ("k_proj", &b.attn.wk),
                        ("v_proj", &b.attn.wv),
                        ("o_proj", &b.attn.wo),
                    ] {
                        put(format!("{p}.self_attn.{name}.weight"), &lin.weight);
                        if let Some(bias) = &lin.bias {
                            put(format!("{p}.self_attn.{name}.bias"), bias);
                        }
                    }
                    if let MlpIn::Gated { w_gate, w_up } = &b.mlp.input {
                        put(format!("{p}.mlp.gate_proj.weight"), &w_gate.weight);
                        put(format!("{p}.mlp.up_proj.weight"), &w_up.weight);
                    }
                    put(format!("{p}.mlp.down_proj.weight"), &b.mlp.w_out.weight);
                }
                put("model.norm.weight".into(), &w.ln_f.weight);
                if !c.tied_embeddings {
                    put("lm_head.weight".into(), &w.unembed.weight);
                }
            }
            Family::Gpt2 => {
                put("transformer.wte.weight".into(), &w.embed);
                if let Some(pos) = &w.pos_embed {
                    put("transformer.wpe.weight".into(), pos);
                }
                for (l, b) in w.blocks.iter().enumerate() {
                    let p = format!("transformer.h.{l}");
                    put_norm(&mut out, &format!("{p}.ln_1"), &b.ln1);
                    if let Some(ln2) = &b.ln2 {
                        put_norm(&mut out, &format!("{p}.ln_2"), ln2);
                    }
                    let qkv_w = Tensor::cat(
                        &[&b.attn.wq.weight, &b.attn.wk.weight, &b.attn.wv.weight],
                        0,
                    )?;
                    out.push((format!("{p}.attn.c_attn.weight"), qkv_w.t()?.contiguous()?));
                    let biases: Vec<&Tensor> = [&b.attn.wq, &b.attn.wk, &b.attn.wv]
                        .iter()
                        .filter_map(|l| l.bias.as_ref())
                        .collect();
                    out.push((format!("{p}.attn.c_attn.bias"), Tensor::cat(&biases, 0)?));
                    conv1d(&mut out, &format!("{p}.attn.c_proj"), &b.attn.wo)?;
                    if let MlpIn::Plain { w_in } = &b.mlp.input {
                        conv1d(&mut out, &format!("{p}.mlp.c_fc"), w_in)?;
                    }
                    conv1d(&mut out, &format!("{p}.mlp.c_proj"), &b.mlp.w_out)?;
                }
                put_norm(&mut out, "transformer.ln_f", &w.ln_f);
                if !c.tied_embeddings {
                    out.push(("lm_head.weight".into(), w.unembed.weight.clone()));
                }
            }
            Family::GptJ => {
                out.push(("transformer.wte.weight".into(), w.embed.clone()));
                let rd = match &c.positional {
                    Positional::Rotary(r) => r.rotary_dim,
                    Positional::Learned => c.head_dim,
                };
                for (l, b) in w.blocks.iter().enumerate() {
                    let p = format!("transformer.h.{l}");
                    put_norm(&mut out, &format!("{p}.ln_1"), &b.ln1);
                    let q = half_to_interleaved(&b.attn.wq.weight, c.n_heads, c.head_dim, rd)?;
                    let k = half_to_interleaved(&b.attn.wk.weight, c.n_heads, c.head_dim, rd)?;
                    out.push((format!("{p}.attn.q_proj.weight"), q));
                    out.push((format!("{p}.attn.k_proj.weight"), k));
                    out.push((format!("{p}.attn.v_proj.weight"), b.attn.wv.weight.clone()));
                    out.push((
                        format!("{p}.attn.out_proj.weight"),
                        b.attn.wo.weight.clone(),
                    ));
                    if let MlpIn::Plain { w_in } = &b.mlp.input {
                        put_linear(&mut out, &format!("{p}.mlp.fc_in"), w_in);
                    }
                    put_linear(&mut out, &format!("{p}.mlp.fc_out"), &b.mlp.w_out);
                }
                put_norm(&mut out, "transformer.ln_f", &w.ln_f);
                put_linear(&mut out, "lm_head", &w.unembed);
            }
            Family::GptNeoX => {
                out.push(("gpt_neox.embed_in.weight".into(), w.embed.clone()));
                let (h, hd, d) = (c.n_heads, c.head_dim, c.d_model);
                for (l, b) in w.blocks.iter().enumerate() {
                    let p = format!("gpt_neox.layers.{l}");
                    put_norm(&mut out, &format!("{p}.input_layernorm"), &b.ln1);
                    if let Some(ln2) = &b.ln2 {
                        put_norm(&mut out, &format!("{p}.post_attention_layernorm"), ln2);
                    }
                    // Fuse back into the [heads, (q, k, v), head_dim] layout.
                    let parts = [&b.attn.wq, &b.attn.wk, &b.attn.wv];
                    let ws: Vec<Tensor> = parts
                        .iter()
                        .map(|l| l.weight.reshape((h, 1, hd, d)))
                        .collect::<candle_core::Result<_>>()?;
                    out.push((
                        format!("{p}.attention.query_key_value.weight"),
                        Tensor::cat(&ws, 1)?.reshape((3 * d, d))?,
                    ));
                    let bs: Vec<Tensor> = parts
                        .iter()
                        .map(|l| match &l.bias {
                            Some(bias) => Ok(bias.reshape((h, 1, hd))?),
                            None => Ok(Tensor::zeros(
                                (h, 1, hd),
                                l.weight.dtype(),
                                l.weight.device(),
                            )?),
                        })
                        .collect::<Result<_>>()?;
                    out.push((
                        format!("{p}.attention.query_key_value.bias"),
                        Tensor::cat(&bs, 1)?.reshape(3 * d)?,
                    ));
                    put_linear(&mut out, &format!("{p}.attention.dense"), &b.attn.wo);
                    if let MlpIn::Plain { w_in } = &b.mlp.input {
                        put_linear(&mut out, &format!("{p}.mlp.dense_h_to_4h"), w_in);
                    }
                    put_linear(&mut out, &format!("{p}.mlp.dense_4h_to_h"), &b.mlp.w_out);
                }
                put_norm(&mut out, "gpt_neox.final_layer_norm", &w.ln_f);
                if !c.tied_embeddings {
                    out.push(("embed_out.weight".into(), w.unembed.weight.clone()));
                }
            }
        }
        Ok(out)
    }
}

fn put_norm(out: &mut Vec<(String, Tensor)>, prefix: &str, n: &super::layers::Norm) {
    out.push((format!("{prefix}.weight"), n.weight.clone()));
    if let Some(b) = &n.bias {
        out.push((format!("{prefix}.bias"), b.clone()));
    }
}

fn put_linear(out: &mut Vec<(String, Tensor)>, prefix: &str, l: &super::layers::Linear) {
    out.push((format!("{prefix}.weight"), l.weight.clone()));
    if let Some(b) = &l.bias {
        out.push((format!("{prefix}.bias"), b.clone()));
    }
}

/// GPT-2's `Conv1D` stores `[in, out]`.
fn conv1d(out: &mut Vec<(String, Tensor)>, prefix: &str, l: &super::layers::Linear) -> Result<()> {
    out.push((format!("{prefix}.weight"), l.weight.t()?.contiguous()?));
    if let Some(b) = &l.bias {
        out.push((format!("{prefix}.bias"), b.clone()));
    }
    Ok(())
}
