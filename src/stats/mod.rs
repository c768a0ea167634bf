//! Second-moment statistics of MLP keys: `C_l = E[k kᵀ]` over a corpus.
//!
//! ROME, MEMIT and AlphaEdit all weigh an update by how keys are spread in
//! ordinary text. The statistics are computed once per (model, layer,
//! corpus, sample count, dtype), cached on disk as safetensors, validated
//! when read back, and recomputed when the cache is stale or corrupt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::model::{At, Hooks, Model, Sampling, Site};
use crate::{Error, Result};

/// Where keys are collected from.
#[derive(Debug, Clone, PartialEq)]
pub enum Corpus {
    /// A plain-text file (one document per non-empty line) or a `.jsonl`
    /// file (one document per line, in its `"text"` field).
    File(PathBuf),
    /// Texts given directly, under a name for the cache key.
    Texts {
        /// Names the corpus in the cache key.
        name: String,
        /// The documents.
        texts: Vec<String>,
    },
    /// Text sampled from the model itself (seeded): for users who give no
    /// corpus (kedit ships no third-party text). Generation is slow on a
    /// CPU, so this corpus has its own sequence count, used instead of
    /// [`StatsOptions::samples`].
    SelfSampled {
        /// Seed of the sampler.
        seed: u64,
        /// Number of sampled sequences (of `max_len` tokens).
        sequences: usize,
    },
}

/// Precision of the accumulation and of the cached matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatsDType {
    /// Batch products in f32, running sum in f64, stored in f32.
    F32,
    /// Everything in f64.
    F64,
}

/// How many samples, how long, how precise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsOptions {
    /// Number of documents (sequences) to use.
    pub samples: usize,
    /// Tokens per sequence at most (longer documents are truncated).
    pub max_len: usize,
    /// Precision.
    pub dtype: StatsDType,
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Directory of the cache (default: `<kedit cache>/stats`); `None`
    /// together with `use_cache = false` disables caching.
    pub cache_dir: Option<PathBuf>,
    /// Read and write the cache.
    pub use_cache: bool,
}

impl StatsOptions {
    /// Checks the options: at least one sample, sequences of at least two
    /// tokens, at least one sequence per pass.
    pub fn validate(&self) -> Result<()> {
        if self.samples == 0 || self.max_len < 2 || self.batch_size == 0 {
            return Err(Error::invalid(
                "statistics options",
                format!(
                    "samples {}, max_len {}, batch_size {}: samples and batch_size must be ≥ 1 and max_len ≥ 2",
                    self.samples, self.max_len, self.batch_size
                ),
            ));
        }
        Ok(())
    }
}

impl Default for StatsOptions {
    fn default() -> Self {
        Self {
            samples: 1000,
            max_len: 128,
            dtype: StatsDType::F32,
            batch_size: 16,
            cache_dir: None,
            use_cache: true,
        }
    }
}

/// `E[k kᵀ]` of the MLP keys of one layer.
#[derive(Debug, Clone)]
pub struct SecondMoment {
    /// The layer.
    pub layer: usize,
    /// `[d_ff, d_ff]`, f32 or f64 on the CPU.
    pub matrix: Tensor,
    /// Number of key vectors (token positions) averaged.
    pub count: usize,
    /// Number of sequences they came from.
    pub samples: usize,
    /// The cache key the matrix is stored under.
    pub key: String,
}

impl SecondMoment {
    /// The matrix as row-major f64.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        Ok(self.matrix.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
    }
}

fn fnv(bytes: &[u8], mut hash: u64) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

impl Corpus {
    /// The default self-sampled corpus: 64 sequences, seed 0.
    pub fn self_sampled() -> Self {
        Corpus::SelfSampled {
            seed: 0,
            sequences: 64,
        }
    }

    /// Number of sequences this corpus yields for the given options.
    pub fn sample_count(&self, opts: &StatsOptions) -> usize {
        match self {
            Corpus::SelfSampled { sequences, .. } => *sequences,
            _ => opts.samples,
        }
    }

    /// A stable short identity of the corpus content, for cache keys.
    pub fn fingerprint(&self) -> Result<String> {
        Ok(match self {
            Corpus::File(p) => {
                let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
                format!("file{:016x}", fnv(&bytes, FNV_START))
            }
            Corpus::Texts { name, texts } => {
                let mut h = fnv(name.as_bytes(), FNV_START);
                for t in texts {
                    h = fnv(t.as_bytes(), fnv(b"\x00", h));
                }
                format!("texts{h:016x}")
            }
            Corpus::SelfSampled { seed, sequences } => format!("self{seed}x{sequences}"),
        })
    }

    /// Token sequences of the corpus: up to `samples` documents, each
    /// truncated to `max_len` tokens (sequences shorter than 2 tokens skipped).
    pub fn sequences(
        &self,
        model: &Model,
        samples: usize,
        max_len: usize,
    ) -> Result<Vec<Vec<u32>>> {
        if samples == 0 || max_len < 2 {
            return Err(Error::invalid(
                "statistics options",
                "samples must be ≥ 1 and max_len ≥ 2",
            ));
        }
        let texts: Vec<String> = match self {
            Corpus::File(path) => read_documents(path, samples)?,
            Corpus::Texts { texts, .. } => texts.clone(),
            Corpus::SelfSampled { seed, sequences } => {
                return self_sampled(model, *sequences, max_len, *seed)
            }
        };
        let mut seqs = Vec::with_capacity(samples);
        for text in texts.iter().filter(|t| !t.trim().is_empty()) {
            let mut ids = model.tokenizer().encode_ids(text, true)?;
            ids.truncate(max_len);
            if ids.len() >= 2 {
                seqs.push(ids);
            }
            if seqs.len() == samples {
                break;
            }
        }
        if seqs.is_empty() {
            return Err(Error::invalid(
                "corpus",
                "it holds no document of at least 2 tokens",
            ));
        }
        Ok(seqs)
    }
}

/// Documents of a text or JSONL file.
fn read_documents(path: &Path, limit: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if jsonl {
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| Error::Format {
                    path: path.to_path_buf(),
                    format: "JSONL",
                    reason: format!("line {}: {e}", i + 1),
                })?;
            let text = value
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| Error::Format {
                    path: path.to_path_buf(),
                    format: "JSONL",
                    reason: format!("line {} has no string field \"text\"", i + 1),
                })?;
            docs.push(text.to_string());
        } else {
            docs.push(line.to_string());
        }
        if docs.len() >= limit * 2 {
            // Some documents may be too short to use; read a margin, not the whole file.
            break;
        }
    }
    Ok(docs)
}

/// Sequences sampled from the model (temperature 1, full vocabulary),
/// starting from its document-start token.
fn self_sampled(model: &Model, samples: usize, max_len: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    let start = start_token(model)?;
    eprintln!("kedit: no corpus given: sampling {samples} sequences of {max_len} tokens from the model itself (seed {seed})");
    let mut seqs = Vec::with_capacity(samples);
    let chunk = 32;
    let mut i = 0;
    while seqs.len() < samples {
        let n = chunk.min(samples - seqs.len());
        let sampling = Sampling::Sample {
            temperature: 1.0,
            top_k: None,
            seed: seed.wrapping_add(i),
        };
        for cont in model.sample_continuations(&[start], n, max_len - 1, &sampling)? {
            let mut ids = vec![start];
            ids.extend(cont);
            seqs.push(ids);
        }
        i += 1;
    }
    Ok(seqs)
}

/// The token a document starts with: `<|endoftext|>` when the vocabulary
/// has it (GPT-2 style), else BOS, else the first EOS.
pub fn start_token(model: &Model) -> Result<u32> {
    let tok = model.tokenizer();
    tok.token_to_id("<|endoftext|>")
        .or(model.config().bos_token_id)
        .or(model.config().eos_token_ids.first().copied())
        .ok_or_else(|| {
            Error::invalid(
                "model",
                "it has no <|endoftext|>, BOS or EOS token to start a sample from",
            )
        })
}

/// The cache key of one layer's statistics.
fn cache_key(
    model: &Model,
    layer: usize,
    corpus: &Corpus,
    corpus_fp: &str,
    opts: &StatsOptions,
) -> String {
    format!(
        "{}-l{layer}-{corpus_fp}-n{}-len{}-{:?}",
        model.fingerprint(),
        corpus.sample_count(opts),
        opts.max_len,
        opts.dtype
    )
    .to_lowercase()
}

fn cache_dir(opts: &StatsOptions) -> PathBuf {
    opts.cache_dir
        .clone()
        .unwrap_or_else(|| crate::fetch::cache_dir().join("stats"))
}

/// Reads a cached matrix and checks it against its key and the model's
/// `d_ff`. Any mismatch is an error naming the file.
pub fn read_cached(path: &Path, key: &str, d_ff: usize) -> Result<SecondMoment> {
    let (tensors, meta) = crate::io::read_safetensors(path)?;
    let bad = |reason: String| Error::Format {
        path: path.to_path_buf(),
        format: "kedit statistics cache",
        reason,
    };
    if meta.get("key").map(String::as_str) != Some(key) {
        return Err(bad(format!("its key {:?} is not {key:?}", meta.get("key"))));
    }
    let matrix = tensors
        .get("mom2")
        .ok_or_else(|| bad("no tensor mom2".into()))?;
    if matrix.dims() != [d_ff, d_ff] {
        return Err(bad(format!(
            "mom2 has shape {:?}, expected [{d_ff}, {d_ff}]",
            matrix.dims()
        )));
    }
    let num = |k: &str| -> Result<usize> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("metadata {k} is missing")))
    };
    let layer = num("layer")?;
    let all_finite = matrix
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .iter()
        .all(|x| x.is_finite());
    if !all_finite {
        return Err(bad("mom2 holds non-finite values".into()));
    }
    Ok(SecondMoment {
        layer,
        matrix: matrix.clone(),
        count: num("count")?,
        samples: num("samples")?,
        key: key.to_string(),
    })
}

/// `E[k kᵀ]` of `MlpKey(layer)`, from the cache when valid, else computed
/// (and cached).
pub fn second_moment(
    model: &Model,
    layer: usize,
    corpus: &Corpus,
    opts: &StatsOptions,
) -> Result<SecondMoment> {
    Ok(second_moments(model, &[layer], corpus, opts)?.remove(0))
}

/// `E[k kᵀ]` for several layers, computed in one pass over the corpus for
/// the layers that are not cached.
pub fn second_moments(
    model: &Model,
    layers: &[usize],
    corpus: &Corpus,
    opts: &StatsOptions,
) -> Result<Vec<SecondMoment>> {
    let n_layers = model.config().n_layers;
    if let Some(&bad) = layers.iter().find(|&&l| l >= n_layers) {
        return Err(Error::invalid(
            "layer",
            format!("{bad} is out of range: the model has {n_layers} layers"),
        ));
    }
    if opts.batch_size == 0 {
        return Err(Error::invalid(
            "statistics options",
            "batch_size must be ≥ 1",
        ));
    }
    let d_ff = model.config().d_ff;
    let corpus_fp = corpus.fingerprint()?;
    let dir = cache_dir(opts);
    let mut found: HashMap<usize, SecondMoment> = HashMap::new();
    let mut missing = Vec::new();
    for &l in layers {
        let key = cache_key(model, l, corpus, &corpus_fp, opts);
        let path = dir.join(format!("{key}.safetensors"));
        if opts.use_cache && path.exists() {
            match read_cached(&path, &key, d_ff) {
                Ok(m) => {
                    found.insert(l, m);
                    continue;
                }
                Err(e) => eprintln!("kedit: ignoring a bad statistics cache, recomputing: {e}"),
            }
        }
        if !missing.contains(&l) {
            missing.push(l);
        }
    }
    if !missing.is_empty() {
        for m in compute(model, &missing, corpus, &corpus_fp, opts)? {
            if opts.use_cache {
                let path = dir.join(format!("{}.safetensors", m.key));
                let meta = HashMap::from([
                    ("key".to_string(), m.key.clone()),
                    ("layer".to_string(), m.layer.to_string()),
                    ("count".to_string(), m.count.to_string()),
                    ("samples".to_string(), m.samples.to_string()),
                    ("format".to_string(), "kedit-stats-1".to_string()),
                ]);
                crate::io::write_safetensors(&path, &[("mom2", &m.matrix)], meta)?;
            }
            found.insert(m.layer, m);
        }
    }
    Ok(layers.iter().map(|l| found[l].clone()).collect())
}

/// One pass over the corpus accumulating `Σ k kᵀ` for every layer asked.
fn compute(
    model: &Model,
    layers: &[usize],
    corpus: &Corpus,
    corpus_fp: &str,
    opts: &StatsOptions,
) -> Result<Vec<SecondMoment>> {
    let d_ff = model.config().d_ff;
    let seqs = corpus.sequences(model, corpus.sample_count(opts), opts.max_len)?;
    let top = *layers.iter().max().expect("at least one layer");
    let bar = ProgressBar::new(seqs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} sequences ({eta} left)")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("kedit: key statistics of layers {layers:?}"));
    let acc_dtype = match opts.dtype {
        StatsDType::F32 => DType::F32,
        StatsDType::F64 => DType::F64,
    };
    let mut sums: Vec<Tensor> = layers
        .iter()
        .map(|_| Tensor::zeros((d_ff, d_ff), DType::F64, model.device()))
        .collect::<candle_core::Result<_>>()?;
    let mut count = 0usize;
    for chunk in seqs.chunks(opts.batch_size) {
        let batch = model.batch(chunk)?;
        let points: Vec<(usize, usize)> = chunk
            .iter()
            .enumerate()
            .flat_map(|(r, s)| (0..s.len()).map(move |p| (r, p)))
            .collect();
        count += points.len();
        let mut hooks = Hooks::new();
        let ids: Vec<_> = layers
            .iter()
            .map(|&l| hooks.capture(Site::MlpKey(l), At::Points(points.clone())))
            .collect();
        let out = model.forward_until(&batch, top, &hooks)?;
        for (sum, id) in sums.iter_mut().zip(ids) {
            let k = out.capture(id).to_dtype(acc_dtype)?;
            let kk = k.t()?.matmul(&k)?.to_dtype(DType::F64)?;
            *sum = (&*sum + kk)?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let store = match opts.dtype {
        StatsDType::F32 => DType::F32,
        StatsDType::F64 => DType::F64,
    };
    layers
        .iter()
        .zip(sums)
        .map(|(&layer, sum)| {
            let matrix = (sum / count as f64)?
                .to_dtype(store)?
                .to_device(&candle_core::Device::Cpu)?;
            Ok(SecondMoment {
                layer,
                matrix,
                count,
                samples: seqs.len(),
                key: cache_key(model, layer, corpus, corpus_fp, opts),
            })
        })
        .collect()
}
