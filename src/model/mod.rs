//! Loaded models: configuration, canonical weights, tokenizer, and the one
//! instrumented forward pass.

pub mod config;
pub mod decoder;
mod export;
mod families;
pub mod hooks;
pub mod layers;
mod source;
mod text;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use config::{Activation, Family, ModelConfig, NormKind, Positional, Rotary};
pub use decoder::{Decoder, Forward, KvCache, LogitsAt, Weights};
pub use hooks::{At, CaptureId, Hook, Hooks, Site};
pub use text::{Generation, Sampling, TargetProb, TopToken};
pub use tokenizer::{Token, Tokenizer};

use crate::{Error, Result};
use source::{GgufSource, SafetensorsSource, TensorSource};

/// Where to load a model from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory with `config.json`, `*.safetensors` (or an index of
    /// shards) and `tokenizer.json`.
    Dir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face repo id, resolved through the hf-hub cache.
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit (default `main`).
        revision: String,
    },
}

impl ModelSource {
    /// Interprets a string as a local directory, a `.gguf` file, or (with the
    /// `hub` feature) a `owner/name[@revision]` repo id.
    pub fn parse(s: &str) -> Result<Self> {
        let path = Path::new(s);
        if path.is_dir() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        if path.is_file() {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        let looks_like_repo = s.split('/').count() == 2
            && !s.starts_with('.')
            && !s.starts_with('/')
            && !s.ends_with(".gguf")
            && s.split('/').all(|p| !p.is_empty());
        if looks_like_repo {
            let (repo, revision) = match s.split_once('@') {
                Some((r, v)) => (r.to_string(), v.to_string()),
                None => (s.to_string(), "main".to_string()),
            };
            return Ok(ModelSource::Hub { repo, revision });
        }
        Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such directory or file (and not an owner/name hub repo id)",
            ),
        ))
    }
}

/// How to load: device and element type of the weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where weights live and the forward pass runs (default: CPU).
    pub device: Device,
    /// Element type of the weights and activations (default: f32).
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

/// A loaded model: canonical decoder plus tokenizer.
#[derive(Debug, Clone)]
pub struct Model {
    decoder: Decoder,
    tokenizer: Tokenizer,
    source: ModelSource,
    fingerprint: String,
    /// The `config.json` of a directory source, written back on export.
    config_json: Option<serde_json::Value>,
}

impl Model {
    /// Loads a model from a directory, a GGUF file or a hub repo id
    /// (see [`ModelSource::parse`]) on the CPU in f32.
    pub fn load(source: &str) -> Result<Self> {
        Self::load_with(&ModelSource::parse(source)?, &LoadOptions::default())
    }

    /// Loads a model from `source` with explicit options.
    pub fn load_with(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        configure_cpu_threads();
        match source {
            ModelSource::Dir(dir) => Self::load_dir(dir, opts),
            ModelSource::Gguf(path) => Self::load_gguf(path, opts),
            ModelSource::Hub { repo, revision } => Self::load_hub(repo, revision, opts),
        }
    }

    /// Loads a Hugging Face style directory.
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            ));
        }
        let config_path = dir.join("config.json");
        let config_text =
            std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&config_text).map_err(|e| Error::Format {
                path: config_path.clone(),
                format: "config.json",
                reason: e.to_string(),
            })?;
        let config = families::config_from_json(&config_path, &json)?;
        let shards = safetensors_files(dir)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let mut src = SafetensorsSource::open(dir, &shards, &opts.device, opts.dtype)?;
        let weights = families::build_weights(&config, &mut src, false)?;
        let mut model = Self::assemble(
            config,
            weights,
            tokenizer,
            ModelSource::Dir(dir.to_path_buf()),
            opts,
        )?;
        model.config_json = Some(json);
        Ok(model)
    }

    /// Loads a GGUF file (Llama and Qwen2 architectures), dequantising every
    /// tensor to `opts.dtype` and rebuilding the tokenizer from its metadata.
    pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let mut src = GgufSource::open(path, &opts.device, opts.dtype)?;
        let config = gguf_config(path, &src)?;
        let tokenizer = Tokenizer::from_gguf(path, &src.content.metadata)?;
        let gguf_llama = config.family == Family::Llama;
        let weights = families::build_weights(&config, &mut src, gguf_llama)?;
        Self::assemble(
            config,
            weights,
            tokenizer,
            ModelSource::Gguf(path.to_path_buf()),
            opts,
        )
    }

    /// Resolves a Hugging Face repo id through hf-hub (its cache honoured;
    /// with `HF_HUB_OFFLINE=1` only the cache is used) and loads it.
    #[cfg(feature = "hub")]
    pub fn load_hub(repo: &str, revision: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = hub::fetch(repo, revision)?;
        let mut model = Self::load_dir(&dir, opts)?;
        model.source = ModelSource::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
        };
        Ok(model)
    }

    /// Without the `hub` feature a repo id cannot be resolved.
    #[cfg(not(feature = "hub"))]
    pub fn load_hub(repo: &str, _revision: &str, _opts: &LoadOptions) -> Result<Self> {
        Err(Error::Source {
            source_name: repo.to_string(),
            reason:
                "kedit was built without the `hub` feature; pass a local directory or GGUF file"
                    .into(),
        })
    }

    fn assemble(
        config: ModelConfig,
        weights: Weights,
        tokenizer: Tokenizer,
        source: ModelSource,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let fingerprint = fingerprint(&config, &weights)?;
        Ok(Self {
            decoder: Decoder {
                config,
                weights,
                device: opts.device.clone(),
                dtype: opts.dtype,
            },
            tokenizer,
            source,
            fingerprint,
            config_json: None,
        })
    }

    /// The canonical configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.decoder.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.decoder.device
    }

    /// The element type of weights and activations.
    pub fn dtype(&self) -> DType {
        self.decoder.dtype
    }

    /// Where the model was loaded from.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// A short hash of the configuration and of samples of every weight as
    /// loaded, identifying the base model (edits do not change it).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The canonical weights.
    pub fn weights(&self) -> &Weights {
        &self.decoder.weights
    }

    /// Mutable canonical weights (for editors).
    pub fn weights_mut(&mut self) -> &mut Weights {
        &mut self.decoder.weights
    }

    /// The decoder (configuration and weights).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Runs the model on a padded batch of token ids.
    ///
    /// `at` selects where logits are computed (the unembedding is the largest
    /// matrix of a small model: ask only for what you need); `hooks` observe
    /// and intervene.
    pub fn forward(&self, batch: &Batch, at: &LogitsAt, hooks: &Hooks) -> Result<Forward> {
        self.decoder
            .run(&batch.ids, &batch.lengths, at, hooks, None)
    }

    /// Runs new tokens of one sequence through the model, extending `cache`;
    /// returns the logits of the last new token (`[vocab]`).
    pub fn forward_cached(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        hooks: &Hooks,
    ) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::invalid("token ids", "no tokens to run"));
        }
        let t = Tensor::new(ids, self.device())?.unsqueeze(0)?;
        let out = self
            .decoder
            .run(&t, &[ids.len()], &LogitsAt::Last, hooks, Some(cache))?;
        Ok(out.logits.expect("logits were requested").squeeze(0)?)
    }

    /// Runs the embedding and blocks `0..=last_layer` only, for captures
    /// (statistics, keys): the layers above and the unembedding are skipped.
    pub fn forward_until(
        &self,
        batch: &Batch,
        last_layer: usize,
        hooks: &Hooks,
    ) -> Result<Forward> {
        self.decoder
            .run_until(&batch.ids, &batch.lengths, last_layer, hooks)
    }

    /// Runs blocks `first_layer..` and the head on a given residual stream
    /// `resid` (`[batch, cols, d_model]`, the input of block `first_layer`).
    ///
    /// With `cache` (see [`KvCache::prefixes`]) the columns continue each
    /// row's cached prefix, so work on the prefix is not repeated; the cache
    /// is extended, so pass a clone to keep it. `lengths` are the real
    /// column counts of each row; hook points and `at` index these columns.
    pub fn forward_from(
        &self,
        first_layer: usize,
        resid: &Tensor,
        lengths: &[usize],
        at: &LogitsAt,
        hooks: &Hooks,
        cache: Option<&mut KvCache>,
    ) -> Result<Forward> {
        self.decoder
            .run_from(first_layer, resid, lengths, at, hooks, cache)
    }

    /// Runs a batch and also returns the KV cache of every layer (all
    /// columns), for [`KvCache::prefixes`].
    pub fn forward_with_cache(
        &self,
        batch: &Batch,
        at: &LogitsAt,
        hooks: &Hooks,
    ) -> Result<(Forward, KvCache)> {
        let mut cache = KvCache::new();
        let out = self
            .decoder
            .run(&batch.ids, &batch.lengths, at, hooks, Some(&mut cache))?;
        Ok((out, cache))
    }

    /// A batch of token-id sequences, right-padded.
    pub fn batch(&self, seqs: &[Vec<u32>]) -> Result<Batch> {
        Batch::new(seqs, self.device(), self.config().vocab_size)
    }
}

/// Sets candle's CPU threading for editing workloads, unless the user chose
/// otherwise through the same environment variables.
///
/// - `CANDLE_NUM_THREADS=1`: candle's pool for element-wise ops synchronises
///   through spinning barriers; at the tensor sizes of editing (a few
///   thousand elements) that costs far more than it saves: a ROME v*
///   optimisation on SmolLM2 ran 3× slower with it on 2 cores.
/// - `RAYON_NUM_THREADS` = the count candle picks itself (physical cores):
///   candle 0.11 asks for its thread count on every matrix product, and
///   without the variable that means reading and parsing `/proc/cpuinfo`
///   each time (about 50 µs, thousands of times per v* step).
fn configure_cpu_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Called before any candle kernel of this process has read the
        // variables; they change nothing else in candle.
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = candle_core::utils::get_num_threads();
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}

/// Token ids of several sequences, right-padded to a common length.
///
/// Right padding needs no attention mask beyond the causal one: real tokens
/// never attend to the padding after them, and every row's positions start at 0.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, max_len]`, u32.
    pub ids: Tensor,
    /// Real length of each row.
    pub lengths: Vec<usize>,
}

impl Batch {
    /// Builds a batch; every sequence must be non-empty and every id < `vocab`.
    pub fn new(seqs: &[Vec<u32>], device: &Device, vocab: usize) -> Result<Self> {
        if seqs.is_empty() {
            return Err(Error::invalid("batch", "no sequences"));
        }
        let max_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(seqs.len() * max_len);
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(Error::invalid(
                    format!("sequence {i} of the batch"),
                    "it is empty",
                ));
            }
            if let Some(&bad) = s.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::invalid(
                    format!("sequence {i} of the batch"),
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(0u32, max_len - s.len()));
        }
        Ok(Self {
            ids: Tensor::from_vec(flat, (seqs.len(), max_len), device)?,
            lengths: seqs.iter().map(Vec::len).collect(),
        })
    }
}

/// The safetensors files of a directory: the shards named by
/// `model.safetensors.index.json`, else every `*.safetensors` file.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: index.clone(),
            format: "safetensors index",
            reason: e.to_string(),
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Format {
                path: index.clone(),
                format: "safetensors index",
                reason: "no weight_map object".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        for f in &files {
            if !f.is_file() {
                return Err(Error::io(
                    f,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard named by the index is missing",
                    ),
                ));
            }
        }
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::io(
            dir.join("model.safetensors"),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no *.safetensors file in the directory",
            ),
        ));
    }
    Ok(files)
}

/// The canonical configuration from GGUF metadata (`general.architecture`
/// llama or qwen2).
fn gguf_config(path: &Path, src: &GgufSource) -> Result<ModelConfig> {
    let arch = src
        .meta("general.architecture")?
        .to_string()
        .map_err(|e| gguf_err(path, crate::error::candle_reason(&e)))?
        .clone();
    let family = match arch.as_str() {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        other => {
            return Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: other.to_string(),
                supported: "GGUF: llama (Llama, SmolLM2, Mistral-style), qwen2".into(),
            })
        }
    };
    let num = |key: &str| -> Result<usize> {
        let v = src.meta(&format!("{arch}.{key}"))?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .map(|x| x as usize)
            .map_err(|e| {
                gguf_err(
                    path,
                    format!("{arch}.{key}: {}", crate::error::candle_reason(&e)),
                )
            })
    };
    let float = |key: &str, default: f64| -> f64 {
        src.content
            .metadata
            .get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_f32().ok())
            .map_or(default, f64::from)
    };
    let d_model = num("embedding_length")?;
    let n_heads = num("attention.head_count")?;
    let n_kv_heads = num("attention.head_count_kv").unwrap_or(n_heads);
    let head_dim = num("attention.key_length").unwrap_or(d_model / n_heads);
    let vocab_size = src
        .meta("tokenizer.ggml.tokens")?
        .to_vec()
        .map_err(|e| gguf_err(path, crate::error::candle_reason(&e)))?
        .len();
    let token = |key: &str| src.content.metadata.get(key).and_then(|v| v.to_u32().ok());
    let config = ModelConfig {
        family,
        vocab_size,
        d_model,
        n_layers: num("block_count")?,
        n_heads,
        n_kv_heads,
        head_dim,
        d_ff: num("feed_forward_length")?,
        norm: NormKind::RmsNorm,
        norm_eps: float("attention.layer_norm_rms_epsilon", 1e-6),
        positional: Positional::Rotary(Rotary {
            rotary_dim: num("rope.dimension_count").unwrap_or(head_dim),
            theta: float("rope.freq_base", 10000.0),
            llama3_scaling: None,
        }),
        activation: Activation::Silu,
        gated_mlp: true,
        parallel_residual: false,
        shared_block_norm: false,
        max_positions: num("context_length")?,
        sliding_window: None,
        tied_embeddings: !src.contains("lm_head.weight"),
        bos_token_id: token("tokenizer.ggml.bos_token_id"),
        eos_token_ids: token("tokenizer.ggml.eos_token_id").into_iter().collect(),
    };
    families::validate_config(path, &config)?;
    Ok(config)
}

fn gguf_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        format: "GGUF",
        reason: e.to_string(),
    }
}

/// FNV-1a over the configuration and the first and last 64 values of every
/// weight tensor: cheap, stable, and different for different checkpoints.
fn fingerprint(config: &ModelConfig, weights: &Weights) -> Result<String> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(serde_json::to_string(config).unwrap_or_default().as_bytes());
    let mut sample = |t: &Tensor| -> Result<()> {
        let flat = t.flatten_all()?;
        let n = flat.elem_count();
        let k = n.min(64);
        for part in [flat.narrow(0, 0, k)?, flat.narrow(0, n - k, k)?] {
            for v in part.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                feed(&v.to_le_bytes());
            }
        }
        Ok(())
    };
    sample(&weights.embed)?;
    for b in &weights.blocks {
        for t in [
            &b.attn.wq.weight,
            &b.attn.wk.weight,
            &b.attn.wv.weight,
            &b.attn.wo.weight,
            &b.mlp.w_out.weight,
        ] {
            sample(t)?;
        }
    }
    sample(&weights.unembed.weight)?;
    Ok(format!("{hash:016x}"))
}

#[cfg(feature = "hub")]
mod hub {
    use std::path::PathBuf;

    use hf_hub::{Repo, RepoType};

    use crate::{Error, Result};

    /// Downloads (or finds in the cache) the files of a repo and returns the
    /// snapshot directory that holds them.
    pub fn fetch(repo_id: &str, revision: &str) -> Result<PathBuf> {
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        let err = |reason: String| Error::Fetch {
            what: format!("{repo_id}@{revision}"),
            reason,
        };
        type Getter<'a> = Box<dyn Fn(&str) -> Result<PathBuf> + 'a>;
        let get: Getter = if offline {
            let cache = hf_hub::Cache::from_env().repo(repo.clone());
            Box::new(move |f: &str| {
                cache.get(f).ok_or_else(|| {
                    err(format!(
                        "{f} is not in the hf-hub cache and HF_HUB_OFFLINE is set"
                    ))
                })
            })
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .build()
                .map_err(|e| err(e.to_string()))?
                .repo(repo.clone());
            Box::new(move |f: &str| api.get(f).map_err(|e| err(format!("{f}: {e}"))))
        };
        let config = get("config.json")?;
        get("tokenizer.json")?;
        match get("model.safetensors.index.json") {
            Ok(index) => {
                let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| Error::Format {
                        path: index.clone(),
                        format: "safetensors index",
                        reason: e.to_string(),
                    })?;
                let mut files: Vec<String> = json
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        m.values()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                files.sort();
                files.dedup();
                for f in files {
                    get(&f)?;
                }
            }
            Err(_) => {
                get("model.safetensors")?;
            }
        }
        Ok(config.parent().map(PathBuf::from).unwrap_or_default())
    }
}
