//! The tracing engine: clean run, corrupted runs, batched restorations.

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::result::{Grid, TraceResult};
use crate::model::decoder::probs;
use crate::model::hooks::gaussian;
use crate::{At, Error, Hooks, KvCache, LogitsAt, Model, Result, Site};

/// What a trace restores: one of the three kinds of site of the issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The residual stream leaving block `l` ([`Site::ResidPost`]), one layer at a time.
    Residual,
    /// The MLP outputs ([`Site::MlpOut`]) of a window of layers centred on `l`.
    Mlp,
    /// The attention outputs ([`Site::AttnOut`]) of a window of layers centred on `l`.
    Attn,
}

impl Kind {
    /// The three kinds, in the order they are usually shown.
    pub const ALL: [Kind; 3] = [Kind::Residual, Kind::Mlp, Kind::Attn];

    /// Short lowercase name (`residual`, `mlp`, `attn`), used in file names and CSV.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Residual => "residual",
            Kind::Mlp => "mlp",
            Kind::Attn => "attn",
        }
    }

    /// What is restored, in words (for titles).
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Residual => "the residual stream",
            Kind::Mlp => "MLP outputs",
            Kind::Attn => "attention outputs",
        }
    }

    /// Window size used for this kind: 1 for the residual stream, `window` otherwise.
    pub fn window(self, window: usize) -> usize {
        match self {
            Kind::Residual => 1,
            Kind::Mlp | Kind::Attn => window,
        }
    }

    /// The sites restored for layer `l` at token `t`, given the window and
    /// the number of layers.
    pub fn sites(self, l: usize, t: usize, window: usize, n_layers: usize) -> Vec<(Site, usize)> {
        match self {
            Kind::Residual => vec![(Site::ResidPost(l), t)],
            Kind::Mlp => window_layers(l, window, n_layers)
                .map(|x| (Site::MlpOut(x), t))
                .collect(),
            Kind::Attn => window_layers(l, window, n_layers)
                .map(|x| (Site::AttnOut(x), t))
                .collect(),
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Kind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "residual" | "resid" | "hidden" => Ok(Kind::Residual),
            "mlp" => Ok(Kind::Mlp),
            "attn" | "attention" => Ok(Kind::Attn),
            other => Err(Error::invalid(
                "trace kind",
                format!("{other:?} is not one of residual, mlp, attn"),
            )),
        }
    }
}

/// The layers of a window of `window` consecutive layers centred on `l`
/// (`l − ⌊w/2⌋ .. l + ⌈w/2⌉`), clipped to `0..n_layers`.
pub fn window_layers(l: usize, window: usize, n_layers: usize) -> Range<usize> {
    let lo = l.saturating_sub(window / 2);
    let hi = (l + window.div_ceil(2)).min(n_layers);
    lo..hi.max(lo)
}

/// Scale of the Gaussian noise added to the subject's token embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseScale {
    /// `multiplier` × the standard deviation of the entries of the embedding
    /// matrix (the default is 3, as in the causal-tracing literature).
    EmbeddingStd {
        /// Factor applied to the embedding standard deviation (> 0).
        multiplier: f64,
    },
    /// A fixed standard deviation ν (> 0).
    Fixed(f64),
}

impl Default for NoiseScale {
    fn default() -> Self {
        NoiseScale::EmbeddingStd { multiplier: 3.0 }
    }
}

/// How restored runs are computed. Both give the same numbers (to float
/// rounding); the default is much faster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Start each restored run at the lowest restored layer from the
    /// corrupted run's residual stream there (layers below are identical to
    /// the corrupted run), and skip tokens before the subject (restoring them
    /// changes nothing). Many restorations per forward pass.
    #[default]
    ReuseCorrupted,
    /// Run the whole model for every restored run, noise included (the
    /// textbook procedure; useful as a reference and for measurements).
    FullForward,
}

/// Options of [`trace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceOptions {
    /// Noise scale ν (default: 3 × the embedding matrix's standard deviation).
    pub noise: NoiseScale,
    /// Number of noise samples averaged (default 10).
    pub samples: usize,
    /// Number of consecutive layers restored together for MLP and attention
    /// (default 10; clipped at the ends).
    pub window: usize,
    /// Seed of the noise (sample `s` uses a seed derived from `seed` and `s`).
    pub seed: u64,
    /// Which kinds to trace (default: all three).
    pub kinds: Vec<Kind>,
    /// Restored runs per forward pass (default 64). 1 means one forward per
    /// restored site and noise sample.
    pub batch_rows: usize,
    /// How restored runs are computed.
    pub strategy: Strategy,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self {
            noise: NoiseScale::default(),
            samples: 10,
            window: 10,
            seed: 0,
            kinds: Kind::ALL.to_vec(),
            batch_rows: 64,
            strategy: Strategy::default(),
        }
    }
}

impl TraceOptions {
    /// Checks the options: ν > 0, n > 0, window > 0, batch rows > 0, some kind.
    pub fn validate(&self) -> Result<()> {
        match self.noise {
            NoiseScale::EmbeddingStd { multiplier } => {
                if !(multiplier.is_finite() && multiplier > 0.0) {
                    return Err(Error::invalid(
                        "noise multiplier",
                        format!("{multiplier} must be finite and > 0"),
                    ));
                }
            }
            NoiseScale::Fixed(nu) => check_nu(nu)?,
        }
        if self.samples == 0 {
            return Err(Error::invalid(
                "noise samples",
                "n = 0: at least one noise sample is needed",
            ));
        }
        if self.window == 0 {
            return Err(Error::invalid(
                "window",
                "0 layers: the window must restore at least one layer",
            ));
        }
        if self.batch_rows == 0 {
            return Err(Error::invalid("batch rows", "0 rows per forward pass"));
        }
        if self.kinds.is_empty() {
            return Err(Error::invalid("trace kinds", "no kind to trace"));
        }
        Ok(())
    }

    /// The noise standard deviation ν these options give on `model`.
    pub fn noise_std(&self, model: &Model) -> Result<f64> {
        self.validate()?;
        let nu = match self.noise {
            NoiseScale::EmbeddingStd { multiplier } => multiplier * embedding_std(model)?,
            NoiseScale::Fixed(nu) => nu,
        };
        check_nu(nu)?;
        Ok(nu)
    }
}

fn check_nu(nu: f64) -> Result<()> {
    if !(nu.is_finite() && nu > 0.0) {
        return Err(Error::invalid(
            "noise scale ν",
            format!("{nu} must be finite and > 0"),
        ));
    }
    Ok(())
}

/// Standard deviation of all entries of the token-embedding matrix
/// (accumulated in f64, a block of rows at a time).
pub fn embedding_std(model: &Model) -> Result<f64> {
    let embed = &model.weights().embed;
    let (rows, _) = embed.dims2()?;
    let (mut n, mut sum, mut sum_sq) = (0f64, 0f64, 0f64);
    let step = 4096;
    let mut start = 0;
    while start < rows {
        let len = step.min(rows - start);
        let block: Vec<f32> = embed
            .narrow(0, start, len)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        for v in block {
            let v = f64::from(v);
            sum += v;
            sum_sq += v * v;
        }
        n += (len * embed.dim(1)?) as f64;
        start += len;
    }
    if n == 0.0 {
        return Err(Error::invalid("embedding matrix", "it is empty"));
    }
    let mean = sum / n;
    let var = (sum_sq / n - mean * mean).max(0.0);
    Ok(var.sqrt())
}

/// Seed of noise sample `s`: a SplitMix64 hash of the trace seed and `s`, so
/// that more samples extend, rather than change, the first ones.
fn sample_seed(seed: u64, s: usize) -> u64 {
    let mut z = seed.wrapping_add((s as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One restored run: a noise sample and the (site, token) pairs set back to
/// their clean values.
#[derive(Debug, Clone)]
struct Row {
    sample: usize,
    sites: Vec<(Site, usize)>,
}

/// A prepared trace of one prompt: the clean run, the corrupted runs and
/// everything needed to run restorations.
///
/// [`trace`] is the one-call form; a `Tracer` also answers arbitrary
/// restorations with [`Tracer::restored_probs`].
#[derive(Debug)]
pub struct Tracer<'m> {
    model: &'m Model,
    opts: TraceOptions,
    noise_std: f64,
    prompt: String,
    subject: String,
    ids: Vec<u32>,
    tokens: Vec<String>,
    span: Range<usize>,
    answer_id: u32,
    answer: String,
    clean_prob: f32,
    /// Clean activations `[T, width]` of every hookable site but `Embed`.
    clean: BTreeMap<Site, Tensor>,
    /// Noise added to the subject's embeddings, `[span_len, d_model]`, per sample.
    noise: Vec<Tensor>,
    /// `corrupted_in[a]`: the residual entering block `a` in the corrupted
    /// runs, `[samples, T, d_model]`; `a = n_layers` is the final residual.
    corrupted_in: Vec<Tensor>,
    /// Keys and values of every block in the corrupted runs (one row per sample).
    corrupted_cache: Option<KvCache>,
    corrupted_probs: Vec<f32>,
}

impl<'m> Tracer<'m> {
    /// Prepares a trace: tokenises, finds the subject, runs the clean pass
    /// (recording every site) and the corrupted passes.
    ///
    /// `answer` defaults to the model's own top-1 next token; a given answer
    /// is scored by its first token (give it its leading space, `" Paris"`).
    pub fn new(
        model: &'m Model,
        prompt: &str,
        subject: &str,
        answer: Option<&str>,
        opts: &TraceOptions,
    ) -> Result<Self> {
        opts.validate()?;
        let noise_std = opts.noise_std(model)?;
        let (toks, span) = model.find_subject(prompt, subject)?;
        let given_answer = match answer {
            Some(a) => Some(
                model.target_ids(a).map_err(|e| match e {
                    Error::InvalidInput { reason, .. } => Error::invalid("answer", reason),
                    other => other,
                })?[0],
            ),
            None => None,
        };
        let ids: Vec<u32> = toks.iter().map(|t| t.id).collect();
        let tokens = ids
            .iter()
            .map(|&id| model.tokenizer().decode(&[id]))
            .collect::<Result<Vec<_>>>()?;
        let n_layers = model.config().n_layers;
        let t_len = ids.len();
        let device = model.device().clone();

        // Clean run: every site at every position.
        let batch = model.batch(std::slice::from_ref(&ids))?;
        let mut hooks = Hooks::new();
        let mut wanted = Vec::new();
        for l in 0..n_layers {
            for site in [
                Site::ResidPre(l),
                Site::AttnOut(l),
                Site::MlpKey(l),
                Site::MlpOut(l),
                Site::ResidPost(l),
            ] {
                wanted.push((site, hooks.capture(site, At::All)));
            }
        }
        let out = model.forward(&batch, &LogitsAt::Last, &hooks)?;
        let mut clean = BTreeMap::new();
        for (site, id) in wanted {
            clean.insert(site, out.capture(id).squeeze(0)?);
        }
        let logits = out
            .logits
            .ok_or_else(|| Error::invalid("clean run", "no logits were returned"))?;
        let p: Vec<f32> = probs(&logits.squeeze(0)?)?.to_vec1()?;
        let answer_id = match given_answer {
            Some(id) => id,
            None => argmax(&p) as u32,
        };
        let clean_prob = *p.get(answer_id as usize).ok_or_else(|| {
            Error::invalid(
                "answer",
                format!("token id {answer_id} is outside the vocabulary"),
            )
        })?;
        let answer = model.tokenizer().decode(&[answer_id])?;

        // Noise samples on the subject's embeddings.
        let d = model.config().d_model;
        let mut noise = Vec::with_capacity(opts.samples);
        for s in 0..opts.samples {
            let seed = sample_seed(opts.seed, s);
            noise.push(
                gaussian(&[span.len(), d], noise_std, seed, &device)?.to_dtype(model.dtype())?,
            );
        }

        let mut tracer = Self {
            model,
            opts: opts.clone(),
            noise_std,
            prompt: prompt.to_string(),
            subject: subject.to_string(),
            ids,
            tokens,
            span,
            answer_id,
            answer,
            clean_prob,
            clean,
            noise,
            corrupted_in: Vec::new(),
            corrupted_cache: None,
            corrupted_probs: Vec::new(),
        };
        tracer.run_corrupted(t_len)?;
        Ok(tracer)
    }

    /// Corrupted runs (noise only), all samples in one batch, recording
    /// (for the reuse strategy) the residual entering every block, the final
    /// one, and every block's keys and values.
    fn run_corrupted(&mut self, t_len: usize) -> Result<()> {
        let n_layers = self.model.config().n_layers;
        let samples: Vec<usize> = (0..self.opts.samples).collect();
        let batch = self.model.batch(&vec![self.ids.clone(); samples.len()])?;
        let mut hooks = Hooks::new();
        self.add_noise(&mut hooks, &samples)?;
        let logits = match self.opts.strategy {
            Strategy::FullForward => self.model.forward(&batch, &LogitsAt::Last, &hooks)?.logits,
            Strategy::ReuseCorrupted => {
                let mut caps = Vec::with_capacity(n_layers + 1);
                for l in 0..n_layers {
                    caps.push(hooks.capture(Site::ResidPre(l), At::All));
                }
                caps.push(hooks.capture(Site::ResidPost(n_layers - 1), At::All));
                let (out, cache) =
                    self.model
                        .forward_with_cache(&batch, &LogitsAt::Last, &hooks)?;
                self.corrupted_in = caps.into_iter().map(|id| out.capture(id).clone()).collect();
                debug_assert!(self
                    .corrupted_in
                    .iter()
                    .all(|t| t.dim(1).ok() == Some(t_len)));
                self.corrupted_cache = Some(cache);
                out.logits
            }
        };
        let logits =
            logits.ok_or_else(|| Error::invalid("corrupted run", "no logits were returned"))?;
        self.corrupted_probs = self.answer_probs(&logits)?;
        Ok(())
    }

    /// Adds the noise of sample `samples[i]` to row `i`'s subject embeddings.
    fn add_noise(&self, hooks: &mut Hooks, samples: &[usize]) -> Result<()> {
        let mut points = Vec::with_capacity(samples.len() * self.span.len());
        let mut values = Vec::with_capacity(samples.len());
        for (row, &s) in samples.iter().enumerate() {
            points.extend(self.span.clone().map(|p| (row, p)));
            values.push(self.noise[s].clone());
        }
        hooks.add(Site::Embed, At::Points(points), Tensor::cat(&values, 0)?);
        Ok(())
    }

    /// P(answer) of every row of `logits` (`[rows, vocab]`).
    fn answer_probs(&self, logits: &Tensor) -> Result<Vec<f32>> {
        let p = probs(logits)?;
        Ok(p.narrow(1, self.answer_id as usize, 1)?
            .squeeze(1)?
            .to_vec1()?)
    }

    /// Number of layers of the model.
    pub fn n_layers(&self) -> usize {
        self.model.config().n_layers
    }

    /// The prompt's tokens, decoded one by one.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// Token range of the subject.
    pub fn subject_span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// The answer token's id.
    pub fn answer_id(&self) -> u32 {
        self.answer_id
    }

    /// The answer token, decoded.
    pub fn answer(&self) -> &str {
        &self.answer
    }

    /// The noise scale ν in use.
    pub fn noise_std(&self) -> f64 {
        self.noise_std
    }

    /// P(answer) in the clean run.
    pub fn clean_prob(&self) -> f32 {
        self.clean_prob
    }

    /// P(answer) in the corrupted run, averaged over the noise samples.
    pub fn corrupted_prob(&self) -> f32 {
        mean(&self.corrupted_probs)
    }

    /// P(answer) in the corrupted run of each noise sample.
    pub fn corrupted_probs(&self) -> &[f32] {
        &self.corrupted_probs
    }

    /// P(answer) when each set of `(site, token)` pairs is restored to its
    /// clean value in the corrupted run, averaged over the noise samples.
    ///
    /// Sites may be [`Site::ResidPre`], [`Site::AttnOut`], [`Site::MlpKey`],
    /// [`Site::MlpOut`] or [`Site::ResidPost`] of any layer; a pair listed
    /// twice counts once. An empty set gives the corrupted probability.
    pub fn restored_probs(&self, sets: &[Vec<(Site, usize)>]) -> Result<Vec<f32>> {
        let mut rows = Vec::with_capacity(sets.len() * self.opts.samples);
        for set in sets {
            let mut set = set.clone();
            for &(site, t) in &set {
                self.check_site(site, t)?;
            }
            set.sort();
            set.dedup();
            for s in 0..self.opts.samples {
                rows.push(Row {
                    sample: s,
                    sites: set.clone(),
                });
            }
        }
        let p = self.run_rows(&rows, &mut |_, _| {})?;
        Ok(p.chunks(self.opts.samples.max(1)).map(mean).collect())
    }

    fn check_site(&self, site: Site, t: usize) -> Result<()> {
        if t >= self.ids.len() {
            return Err(Error::invalid(
                "restored token",
                format!(
                    "position {t} is out of range: the prompt has {} tokens",
                    self.ids.len()
                ),
            ));
        }
        if site == Site::Embed {
            return Err(Error::invalid(
                "restored site",
                "Embed cannot be restored (restore ResidPre(0) instead)",
            ));
        }
        if !self.clean.contains_key(&site) {
            return Err(Error::invalid(
                "restored site",
                format!(
                    "{site:?} is out of range: the model has {} layers",
                    self.n_layers()
                ),
            ));
        }
        Ok(())
    }

    /// Runs the full trace: every kind of the options, every layer and token.
    pub fn run(&self) -> Result<TraceResult> {
        self.run_with_progress(&mut |_, _| {})
    }

    /// [`Tracer::run`], calling `progress(done, total)` (restored runs) after
    /// every forward pass.
    pub fn run_with_progress(&self, progress: &mut dyn FnMut(usize, usize)) -> Result<TraceResult> {
        let n_layers = self.n_layers();
        let t_len = self.ids.len();
        let samples = self.opts.samples;
        // Tokens before the subject see no noise: restoring them changes
        // nothing, so the reuse strategy does not run them.
        let first = match self.opts.strategy {
            Strategy::ReuseCorrupted => self.span.start,
            Strategy::FullForward => 0,
        };
        let mut rows = Vec::new();
        let mut cells = Vec::new();
        for &kind in &self.opts.kinds {
            for t in first..t_len {
                for l in 0..n_layers {
                    cells.push((kind, t, l));
                    let sites = kind.sites(l, t, self.opts.window, n_layers);
                    rows.extend((0..samples).map(|s| Row {
                        sample: s,
                        sites: sites.clone(),
                    }));
                }
            }
        }
        let p = self.run_rows(&rows, progress)?;
        let corrupted = self.corrupted_prob();
        let mut grids: Vec<Grid> = self
            .opts
            .kinds
            .iter()
            .map(|&kind| Grid {
                kind,
                window: kind.window(self.opts.window),
                probs: vec![vec![corrupted; n_layers]; t_len],
            })
            .collect();
        for ((kind, t, l), chunk) in cells.into_iter().zip(p.chunks(samples)) {
            if let Some(g) = grids.iter_mut().find(|g| g.kind == kind) {
                g.probs[t][l] = mean(chunk);
            }
        }
        Ok(TraceResult {
            prompt: self.prompt.clone(),
            subject: self.subject.clone(),
            answer: self.answer.clone(),
            answer_id: self.answer_id,
            tokens: self.tokens.clone(),
            token_ids: self.ids.clone(),
            subject_span: self.span.clone(),
            n_layers,
            clean_prob: self.clean_prob,
            corrupted_prob: corrupted,
            noise_std: self.noise_std,
            samples,
            window: self.opts.window,
            seed: self.opts.seed,
            grids,
        })
    }

    /// P(answer) of every row, in order.
    fn run_rows(&self, rows: &[Row], progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<f32>> {
        let total = rows.len();
        let mut out = vec![0f32; total];
        let mut done = 0;
        match self.opts.strategy {
            Strategy::FullForward => {
                let order: Vec<usize> = (0..total).collect();
                for chunk in balanced_chunks(&order, self.opts.batch_rows) {
                    let p = self.run_full(rows, chunk)?;
                    for (&i, v) in chunk.iter().zip(p) {
                        out[i] = v;
                    }
                    done += chunk.len();
                    progress(done, total);
                }
            }
            Strategy::ReuseCorrupted => {
                let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
                for (i, row) in rows.iter().enumerate() {
                    groups.entry(self.start_layer(row)).or_default().push(i);
                }
                for (start, mut members) in groups {
                    // Rows restoring later tokens share a longer cached prefix.
                    members.sort_by_key(|&i| self.row_token(&rows[i]));
                    for chunk in balanced_chunks(&members, self.opts.batch_rows) {
                        let p = self.run_from(start, rows, chunk)?;
                        for (&i, v) in chunk.iter().zip(p) {
                            out[i] = v;
                        }
                        done += chunk.len();
                        progress(done, total);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The block a restored run must start at: its lowest restored site
    /// (`ResidPost(l)` is the input of block `l + 1`).
    fn start_layer(&self, row: &Row) -> usize {
        row.sites
            .iter()
            .map(|&(site, _)| match site {
                Site::ResidPost(l) => l + 1,
                other => other.layer().unwrap_or(0),
            })
            .min()
            .unwrap_or(self.n_layers())
    }

    /// The first token a restored run changes (the last token when it
    /// restores nothing): positions before it equal the corrupted run.
    fn row_token(&self, row: &Row) -> usize {
        let last = self.ids.len() - 1;
        row.sites
            .iter()
            .map(|&(_, t)| t)
            .min()
            .unwrap_or(last)
            .min(last)
    }

    /// Replace hooks setting each listed (row, site, token) to its clean value.
    fn restore_hooks(
        &self,
        hooks: &mut Hooks,
        by_site: BTreeMap<Site, Vec<(usize, usize)>>,
    ) -> Result<()> {
        for (site, points) in by_site {
            let values = self.clean_at(site, &points)?;
            hooks.replace(site, At::Points(points), values);
        }
        Ok(())
    }

    /// Clean values of `site` at the tokens of `points`, `[points, width]`.
    fn clean_at(&self, site: Site, points: &[(usize, usize)]) -> Result<Tensor> {
        let clean = self
            .clean
            .get(&site)
            .ok_or_else(|| Error::invalid("restored site", format!("{site:?} was not recorded")))?;
        let idx: Vec<u32> = points.iter().map(|&(_, t)| t as u32).collect();
        Ok(clean.index_select(&Tensor::new(idx.as_slice(), clean.device())?, 0)?)
    }

    /// Whole-model forward passes of the rows `chunk`, noise included.
    fn run_full(&self, rows: &[Row], chunk: &[usize]) -> Result<Vec<f32>> {
        let batch = self.model.batch(&vec![self.ids.clone(); chunk.len()])?;
        let mut hooks = Hooks::new();
        let samples: Vec<usize> = chunk.iter().map(|&i| rows[i].sample).collect();
        self.add_noise(&mut hooks, &samples)?;
        let mut by_site: BTreeMap<Site, Vec<(usize, usize)>> = BTreeMap::new();
        for (r, &i) in chunk.iter().enumerate() {
            for &(site, t) in &rows[i].sites {
                by_site.entry(site).or_default().push((r, t));
            }
        }
        self.restore_hooks(&mut hooks, by_site)?;
        let out = self.model.forward(&batch, &LogitsAt::Last, &hooks)?;
        let logits = out
            .logits
            .ok_or_else(|| Error::invalid("restored run", "no logits were returned"))?;
        self.answer_probs(&logits)
    }

    /// Forward passes of the rows `chunk` from block `start`, whose input is
    /// the corrupted residual with the rows' input-level restorations
    /// applied. Columns before the chunk's first restored token are not
    /// recomputed: their keys and values come from the corrupted runs.
    fn run_from(&self, start: usize, rows: &[Row], chunk: &[usize]) -> Result<Vec<f32>> {
        let n_layers = self.n_layers();
        let t_len = self.ids.len();
        let device: &Device = self.model.device();
        let b = chunk.len();
        let t0 = chunk
            .iter()
            .map(|&i| self.row_token(&rows[i]))
            .min()
            .unwrap_or(0);
        let cols = t_len - t0;
        let samples: Vec<usize> = chunk.iter().map(|&i| rows[i].sample).collect();
        let sample_ids: Vec<u32> = samples.iter().map(|&s| s as u32).collect();
        let mut x = self.corrupted_in[start]
            .index_select(&Tensor::new(sample_ids.as_slice(), device)?, 0)?
            .narrow(1, t0, cols)?
            .contiguous()?;

        // Split the restorations into the block input and hooks further up;
        // points index the columns t0.. of this pass.
        let mut input_points: Vec<(usize, usize)> = Vec::new();
        let mut by_site: BTreeMap<Site, Vec<(usize, usize)>> = BTreeMap::new();
        for (r, &i) in chunk.iter().enumerate() {
            for &(site, t) in &rows[i].sites {
                let is_input = match site {
                    Site::ResidPre(l) => l == start,
                    Site::ResidPost(l) => l + 1 == start,
                    _ => false,
                };
                if is_input {
                    input_points.push((r, t));
                } else {
                    by_site.entry(site).or_default().push((r, t));
                }
            }
        }
        input_points.sort();
        input_points.dedup();
        if !input_points.is_empty() {
            let input_site = if start < n_layers {
                Site::ResidPre(start)
            } else {
                Site::ResidPost(n_layers - 1)
            };
            let values = self.clean_at(input_site, &input_points)?;
            let d = x.dim(2)?;
            let flat_ids: Vec<u32> = input_points
                .iter()
                .map(|&(r, t)| (r * cols + t - t0) as u32)
                .collect();
            let ids = Tensor::new(flat_ids.as_slice(), device)?;
            let flat = x.reshape((b * cols, d))?;
            let current = flat.index_select(&ids, 0)?;
            let diff = (values.to_dtype(flat.dtype())? - current)?;
            x = flat.index_add(&ids, &diff, 0)?.reshape((b, cols, d))?;
        }

        let mut hooks = Hooks::new();
        for (site, points) in by_site {
            let values = self.clean_at(site, &points)?;
            let local = points.iter().map(|&(r, t)| (r, t - t0)).collect();
            hooks.replace(site, At::Points(local), values);
        }
        let lengths = vec![cols; b];
        let mut cache = match (&self.corrupted_cache, t0 > 0 && start < n_layers) {
            (Some(full), true) => Some(
                full.prefixes(&vec![t0; self.opts.samples], start..n_layers)?
                    .select_rows(&samples)?,
            ),
            (None, true) => {
                return Err(Error::invalid(
                    "restored run",
                    "the corrupted runs kept no keys and values",
                ))
            }
            _ => None,
        };
        let out = self.model.forward_from(
            start,
            &x,
            &lengths,
            &LogitsAt::Last,
            &hooks,
            cache.as_mut(),
        )?;
        let logits = out
            .logits
            .ok_or_else(|| Error::invalid("restored run", "no logits were returned"))?;
        self.answer_probs(&logits)
    }
}

/// Splits `items` into the fewest chunks of at most `max` items, of nearly
/// equal sizes.
fn balanced_chunks<T>(items: &[T], max: usize) -> Vec<&[T]> {
    if items.is_empty() {
        return Vec::new();
    }
    let n_chunks = items.len().div_ceil(max.max(1));
    let base = items.len() / n_chunks;
    let extra = items.len() % n_chunks;
    let mut out = Vec::with_capacity(n_chunks);
    let mut start = 0;
    for c in 0..n_chunks {
        let len = base + usize::from(c < extra);
        out.push(&items[start..start + len]);
        start += len;
    }
    out
}

fn mean(v: &[f32]) -> f32 {
    if v.is_empty() {
        return f32::NAN;
    }
    (v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64) as f32
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Causal tracing of one fact: how much of P(answer) each (token, layer)
/// site carries once the subject is corrupted (see [`TraceResult`]).
///
/// `answer` defaults to the model's own top-1 next token; a given answer is
/// scored by its first token (give it its leading space, `" Paris"`).
///
/// ```no_run
/// use kedit::locate::{trace, Kind, TraceOptions};
/// let model = kedit::Model::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// let result = trace(
///     &model,
///     "The Eiffel Tower is located in the city of",
///     "The Eiffel Tower",
///     Some(" Paris"),
///     &TraceOptions::default(),
/// )?;
/// println!("clean {:.3} corrupted {:.3}", result.clean_prob, result.corrupted_prob);
/// let (t, l) = result.grid(Kind::Mlp).unwrap().argmax();
/// println!("strongest MLP effect at {:?}, layer {l}", result.tokens[t]);
/// # Ok::<(), kedit::Error>(())
/// ```
pub fn trace(
    model: &Model,
    prompt: &str,
    subject: &str,
    answer: Option<&str>,
    opts: &TraceOptions,
) -> Result<TraceResult> {
    Tracer::new(model, prompt, subject, answer, opts)?.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_centred_and_clipped() {
        assert_eq!(window_layers(0, 10, 30), 0..5);
        assert_eq!(window_layers(12, 10, 30), 7..17);
        assert_eq!(window_layers(29, 10, 30), 24..30);
        assert_eq!(window_layers(3, 1, 30), 3..4);
        assert_eq!(window_layers(3, 3, 30), 2..5);
    }

    #[test]
    fn balanced_chunks_cover_everything() {
        let v: Vec<usize> = (0..130).collect();
        let c = balanced_chunks(&v, 64);
        assert_eq!(c.len(), 3);
        assert_eq!(c.iter().map(|x| x.len()).sum::<usize>(), 130);
        assert!(c.iter().all(|x| x.len() <= 64 && x.len() >= 43));
        assert!(balanced_chunks::<usize>(&[], 4).is_empty());
    }

    #[test]
    fn sample_seeds_differ() {
        assert_ne!(sample_seed(0, 0), sample_seed(0, 1));
        assert_ne!(sample_seed(0, 0), sample_seed(1, 0));
    }
}
