//! Per-family rules: how a `config.json` (or GGUF metadata) becomes a
//! [`ModelConfig`], and how each family's tensors become the canonical
//! [`Weights`]. Only names, layouts and flags differ; the forward pass is shared.

use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use super::config::*;
use super::decoder::{Attention, Block, Mlp, MlpIn, Weights};
use super::layers::{Linear, Norm};
use super::source::TensorSource;
use crate::{Error, Result};

/// Typed reads from a `config.json`, with errors naming the file and key.
pub(crate) struct JsonConfig<'a> {
    pub path: &'a Path,
    pub value: &'a Value,
}

impl JsonConfig<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, what: &str) -> Error {
        Error::Format {
            path: self.path.to_path_buf(),
            format: "config.json",
            reason: format!("key {key:?} {what}"),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| self.bad(key, "is missing"))?;
        v.as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| self.bad(key, "is not a non-negative integer"))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key).ok_or_else(|| self.bad(key, "is missing"))?;
        v.as_f64().ok_or_else(|| self.bad(key, "is not a number"))
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.f64(key),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "is not a boolean")),
        }
    }

    fn str_or<'s>(&'s self, key: &str, default: &'s str) -> Result<&'s str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.bad(key, "is not a string")),
        }
    }

    fn token_ids(&self, key: &str) -> Vec<u32> {
        match self.get(key) {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        }
    }

    fn unsupported(&self, reason: String) -> Error {
        Error::UnsupportedConfig {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let name = self.str_or(key, default)?;
        Ok(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            other => {
                return Err(self.unsupported(format!(
                "activation {other:?} (supported: gelu_new, gelu_pytorch_tanh, gelu, silu, relu)"
            )))
            }
        })
    }

    /// `rope_theta` and Llama 3 scaling, from the flat keys or from
    /// `rope_parameters` (newer transformers).
    fn rope(&self, rotary_dim: usize, default_theta: f64) -> Result<Rotary> {
        let params = self
            .get("rope_parameters")
            .or_else(|| self.get("rope_scaling"));
        let theta = match self.get("rope_theta") {
            Some(_) => self.f64("rope_theta")?,
            None => params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or(default_theta),
        };
        let mut llama3_scaling = None;
        if let Some(p) = params {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => {}
                "llama3" => {
                    let num = |k: &str| {
                        p.get(k)
                            .and_then(Value::as_f64)
                            .ok_or_else(|| self.bad(&format!("rope_scaling.{k}"), "is missing"))
                    };
                    llama3_scaling = Some(Llama3RopeScaling {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?
                            as usize,
                    });
                }
                other => {
                    return Err(self.unsupported(format!(
                        "rope scaling type {other:?} (supported: default, llama3)"
                    )))
                }
            }
        }
        Ok(Rotary {
            rotary_dim,
            theta,
            llama3_scaling,
        })
    }
}

/// Builds the canonical configuration from a Hugging Face `config.json`.
pub(crate) fn config_from_json(path: &Path, value: &Value) -> Result<ModelConfig> {
    let c = JsonConfig { path, value };
    let model_type = c.str_or("model_type", "")?;
    let family =
        Family::from_model_type(model_type).ok_or_else(|| Error::UnsupportedArchitecture {
            path: path.to_path_buf(),
            found: if model_type.is_empty() {
                "(no model_type)".into()
            } else {
                model_type.into()
            },
            supported: Family::SUPPORTED.into(),
        })?;
    let bos = c.token_ids("bos_token_id").first().copied();
    let eos = c.token_ids("eos_token_id");
    let cfg = match family {
        Family::Gpt2 | Family::GptJ => {
            let d = c.usize("n_embd")?;
            let heads = c.usize("n_head")?;
            if c.bool_or("scale_attn_by_inverse_layer_idx", false)? {
                return Err(c.unsupported("scale_attn_by_inverse_layer_idx = true".into()));
            }
            let gptj = family == Family::GptJ;
            ModelConfig {
                family,
                vocab_size: c.usize("vocab_size")?,
                d_model: d,
                n_layers: c.usize("n_layer")?,
                n_heads: heads,
                n_kv_heads: heads,
                head_dim: d / heads,
                d_ff: c.opt_usize("n_inner")?.unwrap_or(4 * d),
                norm: NormKind::LayerNorm,
                norm_eps: c.f64_or("layer_norm_epsilon", 1e-5)?,
                positional: if gptj {
                    let rd = c.opt_usize("rotary_dim")?.unwrap_or(d / heads);
                    Positional::Rotary(Rotary {
                        rotary_dim: rd,
                        theta: 10000.0,
                        llama3_scaling: None,
                    })
                } else {
                    Positional::Learned
                },
                activation: c.activation("activation_function", "gelu_new")?,
                gated_mlp: false,
                parallel_residual: gptj,
                shared_block_norm: gptj,
                max_positions: c.usize("n_positions")?,
                sliding_window: None,
                tied_embeddings: c.bool_or("tie_word_embeddings", !gptj)?,
                bos_token_id: bos,
                eos_token_ids: eos,
            }
        }
        Family::GptNeoX => {
            let d = c.usize("hidden_size")?;
            let heads = c.usize("num_attention_heads")?;
            let head_dim = d / heads;
            // GPT-NeoX's default rotary fraction is 0.25; newer configs call
            // it partial_rotary_factor (possibly inside rope_parameters).
            let pct = match (c.get("rotary_pct"), c.get("partial_rotary_factor")) {
                (Some(_), _) => c.f64("rotary_pct")?,
                (None, Some(_)) => c.f64("partial_rotary_factor")?,
                (None, None) => c
                    .get("rope_parameters")
                    .and_then(|p| p.get("partial_rotary_factor"))
                    .and_then(Value::as_f64)
                    .unwrap_or(0.25),
            };
            let rotary_dim = (head_dim as f64 * pct) as usize;
            let theta = c.f64_or("rotary_emb_base", 10000.0)?;
            let parallel = c.bool_or("use_parallel_residual", true)?;
            ModelConfig {
                family,
                vocab_size: c.usize("vocab_size")?,
                d_model: d,
                n_layers: c.usize("num_hidden_layers")?,
                n_heads: heads,
                n_kv_heads: heads,
                head_dim,
                d_ff: c.usize("intermediate_size")?,
                norm: NormKind::LayerNorm,
                norm_eps: c.f64_or("layer_norm_eps", 1e-5)?,
                positional: Positional::Rotary(c.rope(rotary_dim, theta)?),
                activation: c.activation("hidden_act", "gelu")?,
                gated_mlp: false,
                parallel_residual: parallel,
                shared_block_norm: false,
                max_positions: c.usize("max_position_embeddings")?,
                sliding_window: None,
                tied_embeddings: c.bool_or("tie_word_embeddings", false)?,
                bos_token_id: bos,
                eos_token_ids: eos,
            }
        }
        Family::Llama | Family::Mistral | Family::Qwen2 => {
            let d = c.usize("hidden_size")?;
            let heads = c.usize("num_attention_heads")?;
            let head_dim = c.opt_usize("head_dim")?.unwrap_or(d / heads);
            let window = match family {
                Family::Mistral => c.opt_usize("sliding_window")?,
                Family::Qwen2 if c.bool_or("use_sliding_window", false)? => {
                    return Err(c.unsupported("Qwen2 use_sliding_window = true".into()))
                }
                _ => None,
            };
            if c.bool_or("mlp_bias", false)? {
                return Err(c.unsupported("mlp_bias = true".into()));
            }
            ModelConfig {
                family,
                vocab_size: c.usize("vocab_size")?,
                d_model: d,
                n_layers: c.usize("num_hidden_layers")?,
                n_heads: heads,
                n_kv_heads: c.opt_usize("num_key_value_heads")?.unwrap_or(heads),
                head_dim,
                d_ff: c.usize("intermediate_size")?,
                norm: NormKind::RmsNorm,
                norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
                positional: Positional::Rotary(c.rope(head_dim, 10000.0)?),
                activation: c.activation("hidden_act", "silu")?,
                gated_mlp: true,
                parallel_residual: false,
                shared_block_norm: false,
                max_positions: c.usize("max_position_embeddings")?,
                sliding_window: window,
                tied_embeddings: c.bool_or("tie_word_embeddings", family == Family::Qwen2)?,
                bos_token_id: bos,
                eos_token_ids: eos,
            }
        }
    };
    validate_config(path, &cfg)?;
    Ok(cfg)
}

/// Rejects internally inconsistent configurations.
pub(crate) fn validate_config(path: &Path, cfg: &ModelConfig) -> Result<()> {
    let bad = |reason: String| {
        Err(Error::UnsupportedConfig {
            path: path.to_path_buf(),
            reason,
        })
    };
    if cfg.n_layers == 0 || cfg.d_model == 0 || cfg.n_heads == 0 || cfg.vocab_size == 0 {
        return bad("a zero dimension (layers, d_model, heads or vocab)".into());
    }
    if cfg.n_kv_heads == 0 || cfg.n_heads % cfg.n_kv_heads != 0 {
        return bad(format!(
            "{} heads are not a multiple of {} key/value heads",
            cfg.n_heads, cfg.n_kv_heads
        ));
    }
    if let Positional::Rotary(r) = &cfg.positional {
        if r.rotary_dim == 0 || r.rotary_dim % 2 != 0 || r.rotary_dim > cfg.head_dim {
            return bad(format!(
                "rotary dimension {} for head dimension {}",
                r.rotary_dim, cfg.head_dim
            ));
        }
    }
    Ok(())
}

/// Reorders the rows of a q/k projection (weight `[heads·head_dim, in]` or
/// bias `[heads·head_dim]`) from the interleaved rotary convention (pairs
/// `2i, 2i+1`) to the half-split one (pairs `i, i + r/2`) within the first
/// `rotary_dim` rows of every head. Since q and k get the same permutation,
/// attention scores are unchanged.
pub(crate) fn interleaved_to_half(
    t: &Tensor,
    heads: usize,
    head_dim: usize,
    rotary_dim: usize,
) -> Result<Tensor> {
    let rest: Vec<usize> = t.dims()[1..].to_vec();
    let mut per_head = vec![heads, head_dim];
    per_head.extend(&rest);
    let x = t.reshape(per_head)?;
    let rot = x.narrow(1, 0, rotary_dim)?;
    let mut pairs = vec![heads, rotary_dim / 2, 2];
    pairs.extend(&rest);
    let mut back = vec![heads, rotary_dim];
    back.extend(&rest);
    let rot = rot
        .reshape(pairs)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(back)?;
    let x = if rotary_dim < head_dim {
        Tensor::cat(&[&rot, &x.narrow(1, rotary_dim, head_dim - rotary_dim)?], 1)?
    } else {
        rot
    };
    let mut flat = vec![heads * head_dim];
    flat.extend(&rest);
    Ok(x.reshape(flat)?)
}

/// Loads the canonical weights of `cfg.family` from `src`.
pub(crate) fn build_weights(
    cfg: &ModelConfig,
    src: &mut dyn TensorSource,
    gguf_llama: bool,
) -> Result<Weights> {
    match cfg.family {
        Family::Gpt2 => gpt2(cfg, src),
        Family::GptJ => gptj(cfg, src),
        Family::GptNeoX => neox(cfg, src),
        Family::Llama | Family::Mistral | Family::Qwen2 => llama(cfg, src, gguf_llama),
    }
}

fn linear(
    src: &mut dyn TensorSource,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<Linear> {
    Ok(Linear {
        weight: src.load_shaped(&format!("{prefix}.weight"), &[out, inp])?,
        bias: if bias {
            Some(src.load_shaped(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        },
    })
}

fn norm(cfg: &ModelConfig, src: &mut dyn TensorSource, prefix: &str, bias: bool) -> Result<Norm> {
    Ok(Norm {
        kind: cfg.norm,
        weight: src.load_shaped(&format!("{prefix}.weight"), &[cfg.d_model])?,
        bias: if bias {
            Some(src.load_shaped(&format!("{prefix}.bias"), &[cfg.d_model])?)
        } else {
            None
        },
        eps: cfg.norm_eps,
    })
}

/// The unembedding: tied to the embedding or its own `[vocab, d]` matrix.
fn unembed(
    cfg: &ModelConfig,
    src: &mut dyn TensorSource,
    embed: &Tensor,
    name: &str,
    bias: bool,
) -> Result<Linear> {
    if cfg.tied_embeddings {
        return Ok(Linear {
            weight: embed.clone(),
            bias: None,
        });
    }
    linear(src, name, cfg.vocab_size, cfg.d_model, bias)
}

/// GPT-2 keeps its `Conv1D` weights as `[in, out]`: transpose to `[out, in]`.
fn conv1d(src: &mut dyn TensorSource, prefix: &str, inp: usize, out: usize) -> Result<Linear> {
    let w = src.load_shaped(&format!("{prefix}.weight"), &[inp, out])?;
    Ok(Linear {
        weight: w.t()?.contiguous()?,
        bias: Some(src.load_shaped(&format!("{prefix}.bias"), &[out])?),
    })
}

fn gpt2(cfg: &ModelConfig, src: &mut dyn TensorSource) -> Result<Weights> {
    // Checkpoints saved from GPT2LMHeadModel prefix "transformer."; the
    // original ones do not.
    let p = if src.contains("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let d = cfg.d_model;
    let embed = src.load_shaped(&format!("{p}wte.weight"), &[cfg.vocab_size, d])?;
    let pos = src.load_shaped(&format!("{p}wpe.weight"), &[cfg.max_positions, d])?;
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let b = format!("{p}h.{l}");
        let qkv = conv1d(src, &format!("{b}.attn.c_attn"), d, 3 * d)?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear {
                weight: qkv.weight.narrow(0, i * d, d)?.contiguous()?,
                bias: Some(
                    qkv.bias
                        .as_ref()
                        .expect("c_attn has a bias")
                        .narrow(0, i * d, d)?
                        .contiguous()?,
                ),
            })
        };
        blocks.push(Block {
            ln1: norm(cfg, src, &format!("{b}.ln_1"), true)?,
            ln2: Some(norm(cfg, src, &format!("{b}.ln_2"), true)?),
            attn: Attention {
                wq: part(0)?,
                wk: part(1)?,
                wv: part(2)?,
                wo: conv1d(src, &format!("{b}.attn.c_proj"), d, d)?,
            },
            mlp: Mlp {
                input: MlpIn::Plain {
                    w_in: conv1d(src, &format!("{b}.mlp.c_fc"), d, cfg.d_ff)?,
                },
                w_out: conv1d(src, &format!("{b}.mlp.c_proj"), cfg.d_ff, d)?,
            },
        });
    }
    let ln_f = norm(cfg, src, &format!("{p}ln_f"), true)?;
    let unembed = unembed(cfg, src, &embed, "lm_head", false)?;
    Ok(Weights {
        embed,
        pos_embed: Some(pos),
        blocks,
        ln_f,
        unembed,
    })
}

fn rotary_dim(cfg: &ModelConfig) -> usize {
    match &cfg.positional {
        Positional::Rotary(r) => r.rotary_dim,
        Positional::Learned => 0,
    }
}

fn gptj(cfg: &ModelConfig, src: &mut dyn TensorSource) -> Result<Weights> {
    let d = cfg.d_model;
    let embed = src.load_shaped("transformer.wte.weight", &[cfg.vocab_size, d])?;
    let rd = rotary_dim(cfg);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let b = format!("transformer.h.{l}");
        let mut wq = linear(src, &format!("{b}.attn.q_proj"), d, d, false)?;
        let mut wk = linear(src, &format!("{b}.attn.k_proj"), d, d, false)?;
        // GPT-J rotates interleaved pairs; the canonical decoder rotates halves.
        wq.weight = interleaved_to_half(&wq.weight, cfg.n_heads, cfg.head_dim, rd)?;
        wk.weight = interleaved_to_half(&wk.weight, cfg.n_heads, cfg.head_dim, rd)?;
        blocks.push(Block {
            ln1: norm(cfg, src, &format!("{b}.ln_1"), true)?,
            ln2: None,
            attn: Attention {
                wq,
                wk,
                wv: linear(src, &format!("{b}.attn.v_proj"), d, d, false)?,
                wo: linear(src, &format!("{b}.attn.out_proj"), d, d, false)?,
            },
            mlp: Mlp {
                input: MlpIn::Plain {
                    w_in: linear(src, &format!("{b}.mlp.fc_in"), cfg.d_ff, d, true)?,
                },
                w_out: linear(src, &format!("{b}.mlp.fc_out"), d, cfg.d_ff, true)?,
            },
        });
    }
    let ln_f = norm(cfg, src, "transformer.ln_f", true)?;
    let unembed = unembed(cfg, src, &embed, "lm_head", true)?;
    Ok(Weights {
        embed,
        pos_embed: None,
        blocks,
        ln_f,
        unembed,
    })
}

fn neox(cfg: &ModelConfig, src: &mut dyn TensorSource) -> Result<Weights> {
    let d = cfg.d_model;
    let (h, hd) = (cfg.n_heads, cfg.head_dim);
    let embed = src.load_shaped("gpt_neox.embed_in.weight", &[cfg.vocab_size, d])?;
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let b = format!("gpt_neox.layers.{l}");
        // The fused projection is laid out [heads, (q, k, v), head_dim].
        let qkv = linear(
            src,
            &format!("{b}.attention.query_key_value"),
            3 * d,
            d,
            true,
        )?;
        let w = qkv.weight.reshape((h, 3, hd, d))?;
        let bias = qkv
            .bias
            .as_ref()
            .expect("query_key_value has a bias")
            .reshape((h, 3, hd))?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear {
                weight: w.narrow(1, i, 1)?.contiguous()?.reshape((d, d))?,
                bias: Some(bias.narrow(1, i, 1)?.contiguous()?.reshape(d)?),
            })
        };
        blocks.push(Block {
            ln1: norm(cfg, src, &format!("{b}.input_layernorm"), true)?,
            ln2: Some(norm(
                cfg,
                src,
                &format!("{b}.post_attention_layernorm"),
                true,
            )?),
            attn: Attention {
                wq: part(0)?,
                wk: part(1)?,
                wv: part(2)?,
                wo: linear(src, &format!("{b}.attention.dense"), d, d, true)?,
            },
            mlp: Mlp {
                input: MlpIn::Plain {
                    w_in: linear(src, &format!("{b}.mlp.dense_h_to_4h"), cfg.d_ff, d, true)?,
                },
                w_out: linear(src, &format!("{b}.mlp.dense_4h_to_h"), d, cfg.d_ff, true)?,
            },
        });
    }
    let ln_f = norm(cfg, src, "gpt_neox.final_layer_norm", true)?;
    let unembed = unembed(cfg, src, &embed, "embed_out", false)?;
    Ok(Weights {
        embed,
        pos_embed: None,
        blocks,
        ln_f,
        unembed,
    })
}

fn llama(cfg: &ModelConfig, src: &mut dyn TensorSource, gguf_llama: bool) -> Result<Weights> {
    let d = cfg.d_model;
    let q_dim = cfg.n_heads * cfg.head_dim;
    let kv_dim = cfg.n_kv_heads * cfg.head_dim;
    let qkv_bias = cfg.family == Family::Qwen2;
    let embed = src.load_shaped("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let b = format!("model.layers.{l}");
        let mut wq = linear(src, &format!("{b}.self_attn.q_proj"), q_dim, d, qkv_bias)?;
        let mut wk = linear(src, &format!("{b}.self_attn.k_proj"), kv_dim, d, qkv_bias)?;
        if gguf_llama {
            // llama.cpp's converter permutes Llama q/k rows into the
            // interleaved rotary form; undo it.
            wq.weight = interleaved_to_half(&wq.weight, cfg.n_heads, cfg.head_dim, cfg.head_dim)?;
            wk.weight =
                interleaved_to_half(&wk.weight, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim)?;
        }
        blocks.push(Block {
            ln1: norm(cfg, src, &format!("{b}.input_layernorm"), false)?,
            ln2: Some(norm(
                cfg,
                src,
                &format!("{b}.post_attention_layernorm"),
                false,
            )?),
            attn: Attention {
                wq,
                wk,
                wv: linear(src, &format!("{b}.self_attn.v_proj"), kv_dim, d, qkv_bias)?,
                wo: linear(src, &format!("{b}.self_attn.o_proj"), d, q_dim, false)?,
            },
            mlp: Mlp {
                input: MlpIn::Gated {
                    w_gate: linear(src, &format!("{b}.mlp.gate_proj"), cfg.d_ff, d, false)?,
                    w_up: linear(src, &format!("{b}.mlp.up_proj"), cfg.d_ff, d, false)?,
                },
                w_out: linear(src, &format!("{b}.mlp.down_proj"), d, cfg.d_ff, false)?,
            },
        });
    }
    let ln_f = norm(cfg, src, "model.norm", false)?;
    let unembed = unembed(cfg, src, &embed, "lm_head", false)?;
    Ok(Weights {
        embed,
        pos_embed: None,
        blocks,
        ln_f,
        unembed,
    })
}
