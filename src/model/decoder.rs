//! The canonical decoder: one forward pass for every family, with hook points.

use candle_core::{DType, Device, Tensor, D};

use super::config::{ModelConfig, Positional};
use super::hooks::{Hooks, Site};
use super::layers::{activate, apply_rotary, attention_mask, rotary_tables, softmax, Linear, Norm};
use crate::{Error, Result};

/// The attention projections of one block, canonical `[out, in]` weights.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Queries, `[n_heads · head_dim, d_model]`.
    pub wq: Linear,
    /// Keys, `[n_kv_heads · head_dim, d_model]`.
    pub wk: Linear,
    /// Values, `[n_kv_heads · head_dim, d_model]`.
    pub wv: Linear,
    /// Output projection, `[d_model, n_heads · head_dim]`.
    pub wo: Linear,
}

/// The input side of an MLP.
#[derive(Debug, Clone)]
pub enum MlpIn {
    /// `act(w_in x)` (GPT-2, GPT-J, GPT-NeoX).
    Plain {
        /// `[d_ff, d_model]`.
        w_in: Linear,
    },
    /// `act(w_gate x) ⊙ (w_up x)` (Llama family).
    Gated {
        /// `[d_ff, d_model]`, activated.
        w_gate: Linear,
        /// `[d_ff, d_model]`, linear.
        w_up: Linear,
    },
}

/// One MLP. `w_out` is `[d_model, d_ff]` for every family, so an edit is
/// always `W_out += u vᵀ` in the same orientation.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// The projection(s) into the hidden layer.
    pub input: MlpIn,
    /// `[d_model, d_ff]`: the matrix ROME, MEMIT and AlphaEdit edit.
    pub w_out: Linear,
}

/// One decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Norm before attention (and before the MLP when shared).
    pub ln1: Norm,
    /// `None` when attention and MLP share `ln1` (GPT-J).
    pub ln2: Option<Norm>,
    /// Self-attention.
    pub attn: Attention,
    /// The MLP.
    pub mlp: Mlp,
}

/// All weights of a model in the canonical layout.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `[vocab, d_model]`.
    pub embed: Tensor,
    /// `[max_positions, d_model]` for learned positions (GPT-2).
    pub pos_embed: Option<Tensor>,
    /// The decoder blocks, bottom to top.
    pub blocks: Vec<Block>,
    /// Final norm before the unembedding.
    pub ln_f: Norm,
    /// `[vocab, d_model]`; shares storage with `embed` when tied.
    pub unembed: Linear,
}

/// Keys and values of earlier positions, for incremental decoding.
///
/// Rows may hold prefixes of different lengths: row `r` then starts with
/// `pads[r]` padding columns that no query attends to, and its next position
/// is `columns − pads[r]`. A call that extends the cache must give every row
/// the same number of real new tokens.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pads: Vec<usize>,
    columns: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached columns (positions of the longest row).
    pub fn len(&self) -> usize {
        self.columns
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.columns == 0
    }

    /// Keeps, for each row `r`, only its first `lengths[r]` positions of
    /// layers `layers` (left-padded to a common width): the cache of the
    /// prompt prefixes before a per-row split point. Only layers in the range
    /// are kept.
    pub fn prefixes(&self, lengths: &[usize], layers: std::ops::Range<usize>) -> Result<KvCache> {
        let max = lengths.iter().copied().max().unwrap_or(0);
        if lengths.len() != self.pads.len() || self.pads.iter().any(|&p| p > 0) {
            return Err(Error::invalid(
                "KV cache",
                "prefixes need an unpadded cache of the same rows",
            ));
        }
        if max == 0 || max > self.columns {
            return Err(Error::invalid(
                "prefix lengths",
                format!("{lengths:?} for a cache of {} columns", self.columns),
            ));
        }
        let mut out = KvCache {
            layers: vec![None; self.layers.len()],
            pads: lengths.iter().map(|&l| max - l).collect(),
            columns: max,
        };
        for l in layers {
            let Some((k, v)) = self.layers.get(l).and_then(Option::as_ref) else {
                return Err(Error::invalid(
                    "KV cache",
                    format!("layer {l} is not cached"),
                ));
            };
            let cut = |t: &Tensor| -> Result<Tensor> {
                let mut rows = Vec::with_capacity(lengths.len());
                for (r, &len) in lengths.iter().enumerate() {
                    if len == 0 {
                        let (_, h, _, d) = t.dims4()?;
                        rows.push(Tensor::zeros((1, h, max, d), t.dtype(), t.device())?);
                        continue;
                    }
                    let row = t.narrow(0, r, 1)?.narrow(2, 0, len)?;
                    let row = if len < max {
                        let (_, h, _, d) = row.dims4()?;
                        let pad = Tensor::zeros((1, h, max - len, d), row.dtype(), row.device())?;
                        Tensor::cat(&[&pad, &row], 2)?
                    } else {
                        row
                    };
                    rows.push(row);
                }
                Ok(Tensor::cat(&rows, 0)?.contiguous()?)
            };
            out.layers[l] = Some((cut(k)?, cut(v)?));
        }
        Ok(out)
    }

    /// The cache of the given rows, in that order (repeats allowed): one
    /// cached prefix continued in several batch rows.
    pub fn select_rows(&self, rows: &[usize]) -> Result<KvCache> {
        let n = self.pads.len();
        if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
            return Err(Error::invalid(
                "KV cache rows",
                format!("row {bad} is out of range: the cache holds {n} rows"),
            ));
        }
        let mut layers = vec![None; self.layers.len()];
        if !rows.is_empty() {
            let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            for (slot, layer) in layers.iter_mut().zip(&self.layers) {
                if let Some((k, v)) = layer {
                    let idx = Tensor::new(ids.as_slice(), k.device())?;
                    *slot = Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?));
                }
            }
        }
        Ok(KvCache {
            layers,
            pads: rows.iter().map(|&r| self.pads[r]).collect(),
            columns: self.columns,
        })
    }
}

/// Where the caller wants logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsAt {
    /// No logits (captures only).
    None,
    /// The last real token of every row: `[batch, vocab]`.
    Last,
    /// Every position: `[batch, seq, vocab]`.
    All,
    /// Chosen `(row, position)` pairs: `[n, vocab]` in the order given.
    Points(Vec<(usize, usize)>),
}

/// The result of a forward pass.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Logits as requested by [`LogitsAt`]; `None` for [`LogitsAt::None`].
    pub logits: Option<Tensor>,
    /// Captured activations, indexed by [`super::hooks::CaptureId`].
    pub captures: Vec<Tensor>,
}

impl Forward {
    /// The capture with this id.
    pub fn capture(&self, id: super::hooks::CaptureId) -> &Tensor {
        &self.captures[id.0]
    }
}

/// What one call of the decoder works on.
pub(crate) struct Pass<'a> {
    pub hooks: &'a Hooks,
    pub captures: Vec<Option<Tensor>>,
    /// Absolute position of the first column (KV cache length before the call).
    pub offset: usize,
}

impl<'a> Pass<'a> {
    fn hook(&mut self, site: Site, x: Tensor) -> Result<Tensor> {
        if self.hooks.is_idle(site) {
            return Ok(x);
        }
        self.hooks.apply(site, x, self.offset, &mut self.captures)
    }

    /// [`Pass::hook`] on a packed stream: hooks address `(row, column)`, so
    /// an active site sees the padded rows.
    fn hook_packed(&mut self, site: Site, x: Tensor, packing: Option<&Packing>) -> Result<Tensor> {
        match packing {
            Some(p) if !self.hooks.is_idle(site) => p.pack(&self.hook(site, p.unpack(&x)?)?),
            _ => self.hook(site, x),
        }
    }
}

/// The real columns of a right-padded batch, flattened.
///
/// Norms, projections and the MLP treat every column on its own, so they
/// run on `[real columns, features]` and skip the padding, which in the
/// editing batches (prompts of different lengths) is a quarter to a half
/// of all columns. Attention needs whole rows: it unpacks, and each padded
/// column reads a copy of its row's last real column (causal attention
/// never lets a real column see the columns after it, so these copies
/// change nothing real, and no gradient reaches them).
pub(crate) struct Packing {
    /// `[real]`: the flat index `r · t + c` of every real column.
    real: Tensor,
    /// `[b · t]`: for every column of the padded layout, the packed index
    /// it reads.
    padded: Tensor,
    rows: usize,
    cols: usize,
}

impl Packing {
    /// `None` when there is no padding to skip.
    fn new(lengths: &[usize], rows: usize, cols: usize, device: &Device) -> Result<Option<Self>> {
        if rows < 2
            || lengths.len() != rows
            || lengths.iter().any(|&n| n == 0 || n > cols)
            || lengths.iter().all(|&n| n == cols)
        {
            return Ok(None);
        }
        let mut real = Vec::with_capacity(lengths.iter().sum());
        let mut padded = Vec::with_capacity(rows * cols);
        for (r, &n) in lengths.iter().enumerate() {
            let first = real.len() as u32;
            real.extend((0..n).map(|c| (r * cols + c) as u32));
            padded.extend((0..cols).map(|c| first + c.min(n - 1) as u32));
        }
        Ok(Some(Self {
            real: Tensor::new(real.as_slice(), device)?,
            padded: Tensor::new(padded.as_slice(), device)?,
            rows,
            cols,
        }))
    }

    /// `[rows, cols, f]` → `[real, f]`.
    fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let f = x.dim(D::Minus1)?;
        Ok(x.reshape((self.rows * self.cols, f))?
            .index_select(&self.real, 0)?)
    }

    /// `[real, f]` → `[rows, cols, f]`.
    fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let f = x.dim(D::Minus1)?;
        Ok(x.index_select(&self.padded, 0)?
            .reshape((self.rows, self.cols, f))?)
    }
}

/// The decoder itself: configuration plus weights.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// Shape and family flags.
    pub config: ModelConfig,
    /// Canonical weights.
    pub weights: Weights,
    /// Where weights live.
    pub device: Device,
    /// Element type of weights and activations.
    pub dtype: DType,
}

impl Decoder {
    /// Token (and learned position) embeddings of `ids` (`[batch, seq]`, u32).
    pub(crate) fn embed(&self, ids: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self
            .weights
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.d_model))?;
        let x = pass.hook(Site::Embed, x)?;
        Ok(match (&self.config.positional, &self.weights.pos_embed) {
            (Positional::Learned, Some(pos)) => {
                if pass.offset + t > self.config.max_positions {
                    return Err(Error::invalid(
                        "sequence",
                        format!(
                            "{} positions exceed the model's maximum of {}",
                            pass.offset + t,
                            self.config.max_positions
                        ),
                    ));
                }
                x.broadcast_add(&pos.narrow(0, pass.offset, t)?)?
            }
            _ => x,
        })
    }

    /// Runs blocks `layers` on the residual stream `x` (`[batch, seq, d_model]`,
    /// right-padded: row `r` holds `lengths[r]` real columns).
    ///
    /// Token-wise work (norms, projections, the MLP: nearly all of the
    /// arithmetic) runs on the real columns only ([`Packing`]); attention
    /// and hooks see the padded rows.
    pub(crate) fn blocks(
        &self,
        x: Tensor,
        layers: std::ops::Range<usize>,
        pass: &mut Pass,
        mut cache: Option<&mut KvCache>,
        lengths: &[usize],
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let packing = Packing::new(lengths, b, t, &self.device)?;
        let packing = packing.as_ref();
        let mut x = match packing {
            Some(p) => p.pack(&x)?,
            None => x,
        };
        let (cached, pads) = match cache.as_deref_mut() {
            Some(c) => {
                if c.layers.len() < self.config.n_layers {
                    c.layers.resize(self.config.n_layers, None);
                }
                if c.pads.is_empty() {
                    c.pads = vec![0; b];
                }
                if c.pads.len() != b {
                    return Err(Error::invalid(
                        "KV cache",
                        format!("it holds {} rows but the input has {b}", c.pads.len()),
                    ));
                }
                (c.columns, c.pads.clone())
            }
            None => (0, vec![0; b]),
        };
        let starts: Vec<usize> = pads.iter().map(|p| cached - p).collect();
        let rotary = match &self.config.positional {
            Positional::Rotary(r) => Some(rotary_tables(r, &starts, t, &self.device)?),
            Positional::Learned => None,
        };
        let mask = attention_mask(t, cached, &pads, self.config.sliding_window, &self.device)?
            .map(|m| m.to_dtype(self.dtype))
            .transpose()?;
        for l in layers {
            let block = &self.weights.blocks[l];
            x = pass.hook_packed(Site::ResidPre(l), x, packing)?;
            let h1 = block.ln1.forward(&x)?;
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let rows = (b, t, packing);
            let attn = self.attention(l, &h1, rows, rotary.as_ref(), mask.as_ref(), kv)?;
            let attn = pass.hook_packed(Site::AttnOut(l), attn, packing)?;
            if self.config.parallel_residual {
                let h2 = match &block.ln2 {
                    Some(ln2) => ln2.forward(&x)?,
                    None => h1,
                };
                let mlp = self.mlp(l, &h2, pass, packing)?;
                x = ((x + attn)? + mlp)?;
            } else {
                x = (x + attn)?;
                let h2 = match &block.ln2 {
                    Some(ln2) => ln2.forward(&x)?,
                    None => block.ln1.forward(&x)?,
                };
                let mlp = self.mlp(l, &h2, pass, packing)?;
                x = (x + mlp)?;
            }
            x = pass.hook_packed(Site::ResidPost(l), x, packing)?;
        }
        if let Some(c) = cache {
            c.columns = cached + t;
        }
        match packing {
            Some(p) => p.unpack(&x),
            None => Ok(x),
        }
    }

    fn mlp(
        &self,
        l: usize,
        h: &Tensor,
        pass: &mut Pass,
        packing: Option<&Packing>,
    ) -> Result<Tensor> {
        let mlp = &self.weights.blocks[l].mlp;
        let key = match &mlp.input {
            MlpIn::Plain { w_in } => activate(self.config.activation, &w_in.forward(h)?)?,
            MlpIn::Gated { w_gate, w_up } => {
                (activate(self.config.activation, &w_gate.forward(h)?)? * w_up.forward(h)?)?
            }
        };
        let key = pass.hook_packed(Site::MlpKey(l), key, packing)?;
        let out = mlp.w_out.forward(&key)?;
        pass.hook_packed(Site::MlpOut(l), out, packing)
    }

    /// Self-attention of block `l` on `h`: `[b, t, d_model]`, or the real
    /// columns of those rows when `packing` is given (then the projections
    /// run on those, and the scores on the padded rows).
    fn attention(
        &self,
        l: usize,
        h: &Tensor,
        (b, t, packing): (usize, usize, Option<&Packing>),
        rotary: Option<&(Tensor, Tensor)>,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let attn = &self.weights.blocks[l].attn;
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            let y = match packing {
                Some(p) => p.unpack(&y)?,
                None => y,
            };
            Ok(y.reshape((b, t, heads, cfg.head_dim))?.transpose(1, 2)?)
        };
        let mut q = split(attn.wq.forward(h)?, cfg.n_heads)?;
        let mut k = split(attn.wk.forward(h)?, cfg.n_kv_heads)?;
        let v = split(attn.wv.forward(h)?, cfg.n_kv_heads)?;
        if let (Some((cos, sin)), Positional::Rotary(r)) = (rotary, &cfg.positional) {
            q = apply_rotary(&q, cos, sin, r.rotary_dim)?;
            k = apply_rotary(&k, cos, sin, r.rotary_dim)?;
        }
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k.contiguous()?, v.contiguous()?),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let (k, v) = (self.repeat_kv(k)?, self.repeat_kv(v)?);
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, cfg.n_heads * cfg.head_dim))?;
        let out = match packing {
            Some(p) => p.pack(&out)?,
            None => out,
        };
        attn.wo.forward(&out)
    }

    /// Expands grouped key/value heads to one per query head.
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let g = self.config.group_size();
        if g == 1 {
            return Ok(x);
        }
        let (b, kvh, t, d) = x.dims4()?;
        Ok(x.unsqueeze(2)?
            .broadcast_as((b, kvh, g, t, d))?
            .reshape((b, kvh * g, t, d))?)
    }

    /// Final norm and unembedding of the residual stream `x` at the positions asked for.
    pub(crate) fn head(
        &self,
        x: &Tensor,
        lengths: &[usize],
        at: &LogitsAt,
    ) -> Result<Option<Tensor>> {
        let (b, t, d) = x.dims3()?;
        let rows = match at {
            LogitsAt::None => return Ok(None),
            LogitsAt::All => {
                let logits = self.unembed(&x.reshape((b * t, d))?)?;
                return Ok(Some(logits.reshape((b, t, ()))?));
            }
            LogitsAt::Last => {
                let ids: Vec<u32> = lengths
                    .iter()
                    .enumerate()
                    .map(|(r, &len)| (r * t + len - 1) as u32)
                    .collect();
                ids
            }
            LogitsAt::Points(points) => {
                let mut ids = Vec::with_capacity(points.len());
                for &(r, p) in points {
                    if r >= b || p >= lengths[r] {
                        return Err(Error::invalid(
                            "logits position",
                            format!(
                                "({r}, {p}) is outside the batch ({b} rows, lengths {lengths:?})"
                            ),
                        ));
                    }
                    ids.push((r * t + p) as u32);
                }
                ids
            }
        };
        let ids = Tensor::new(rows.as_slice(), &self.device)?;
        let picked = x.reshape((b * t, d))?.index_select(&ids, 0)?;
        Ok(Some(self.unembed(&picked)?))
    }

    fn unembed(&self, x: &Tensor) -> Result<Tensor> {
        let normed = self.weights.ln_f.forward(x)?;
        self.weights.unembed.forward(&normed)
    }

    /// Runs the whole model on a padded batch.
    pub(crate) fn run(
        &self,
        ids: &Tensor,
        lengths: &[usize],
        at: &LogitsAt,
        hooks: &Hooks,
        cache: Option<&mut KvCache>,
    ) -> Result<Forward> {
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let (b, _t) = ids.dims2()?;
        let abs_lengths: Vec<usize> = lengths.iter().map(|l| l + offset).collect();
        hooks.validate(self.config.n_layers, b, &abs_lengths)?;
        let mut pass = Pass {
            hooks,
            captures: vec![None; hooks.n_captures()],
            offset,
        };
        let x = self.embed(ids, &mut pass)?;
        let x = self.blocks(x, 0..self.config.n_layers, &mut pass, cache, lengths)?;
        let logits = self.head(&x, lengths, at)?;
        let captures = collect_captures(pass.captures)?;
        Ok(Forward { logits, captures })
    }
}

impl Decoder {
    /// Embeds `ids` and runs blocks `0..=last_layer` only (no head): for
    /// statistics and keys, which never need the layers above.
    pub(crate) fn run_until(
        &self,
        ids: &Tensor,
        lengths: &[usize],
        last_layer: usize,
        hooks: &Hooks,
    ) -> Result<Forward> {
        if last_layer >= self.config.n_layers {
            return Err(Error::invalid(
                "layer",
                format!(
                    "{last_layer} is out of range: the model has {} layers",
                    self.config.n_layers
                ),
            ));
        }
        let (b, _) = ids.dims2()?;
        hooks.validate(last_layer + 1, b, lengths)?;
        let mut pass = Pass {
            hooks,
            captures: vec![None; hooks.n_captures()],
            offset: 0,
        };
        let x = self.embed(ids, &mut pass)?;
        self.blocks(x, 0..last_layer + 1, &mut pass, None, lengths)?;
        Ok(Forward {
            logits: None,
            captures: collect_captures(pass.captures)?,
        })
    }

    /// Runs blocks `first_layer..` and the head on a residual stream `x`
    /// (`[batch, cols, d_model]`, the input of block `first_layer`) whose rows
    /// continue the prefixes held in `cache` (positions continue after them).
    /// Hook points and `at` index the columns of `x`.
    pub(crate) fn run_from(
        &self,
        first_layer: usize,
        x: &Tensor,
        lengths: &[usize],
        at: &LogitsAt,
        hooks: &Hooks,
        cache: Option<&mut KvCache>,
    ) -> Result<Forward> {
        if first_layer > self.config.n_layers {
            return Err(Error::invalid(
                "layer",
                format!(
                    "{first_layer} is out of range: the model has {} layers",
                    self.config.n_layers
                ),
            ));
        }
        let (b, _, d) = x.dims3()?;
        if d != self.config.d_model || lengths.len() != b {
            return Err(Error::invalid(
                "residual stream",
                format!(
                    "shape {:?} with {} lengths for d_model {}",
                    x.dims(),
                    lengths.len(),
                    self.config.d_model
                ),
            ));
        }
        hooks.validate(self.config.n_layers, b, lengths)?;
        for h in hooks.hooks() {
            if h.site.layer().is_none_or(|l| l < first_layer) {
                return Err(Error::invalid(
                    format!("hook site {:?}", h.site),
                    format!("it lies below layer {first_layer}, where this pass starts"),
                ));
            }
        }
        let mut pass = Pass {
            hooks,
            captures: vec![None; hooks.n_captures()],
            offset: 0,
        };
        let x = self.blocks(
            x.clone(),
            first_layer..self.config.n_layers,
            &mut pass,
            cache,
            lengths,
        )?;
        let logits = self.head(&x, lengths, at)?;
        Ok(Forward {
            logits,
            captures: collect_captures(pass.captures)?,
        })
    }
}

pub(crate) fn collect_captures(captures: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    captures
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            c.ok_or_else(|| {
                Error::invalid(
                    format!("capture {i}"),
                    "its site was not reached (points outside this call's positions?)",
                )
            })
        })
        .collect()
}

/// Softmax probabilities of logits over the vocabulary (last dimension), in f32.
pub fn probs(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax_last_dim(
        &logits.to_dtype(DType::F32)?,
    )?)
}

/// Log-probabilities over the last dimension, in f32, differentiable.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}
