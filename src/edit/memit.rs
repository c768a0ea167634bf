//! MEMIT (Meng et al., 2023, "Mass-Editing Memory in a Transformer") and
//! the multi-layer machinery it shares with AlphaEdit.
//!
//! A batch of requests is written into the MLP output matrices of a window
//! of layers `l₁ < … < L`:
//!
//! 1. **Targets.** For each request, `δᵢ` is optimised as ROME's `v*`
//!    shift, at the last layer `L` ([`rome::keys_and_deltas`]). Unlike the
//!    reference, whose clamp and decay are relative to the norm of the
//!    residual `h_L`, both stay relative to the MLP output there, as in
//!    ROME, so one set of [`super::RomeHParams`] serves all three methods. Adding
//!    `δᵢ` to the MLP output of `L` at the subject's last token is adding it
//!    to the residual stream leaving `L`, so the target residual is
//!    `zᵢ = h_L + δᵢ` (`h_L` on the bare prompt, as in the reference).
//! 2. **Layers, ascending.** With the model as already updated at the lower
//!    layers of the window: the keys `K` (`[d_ff, n]`, each the mean MLP key
//!    at the subject's last token over the context templates, averaged
//!    within each group of templates and then over the groups as the
//!    reference does, so the bare prompt weighs half; see
//!    [`super::group_weights`]), the current residuals `h_L`, and the part of what is missing
//!    that this layer takes, `R = (Z − H_L) / (layers left, this one
//!    included)`. Then
//!
//!    `ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹  =  R · [C⁻¹K (λ I + Kᵀ C⁻¹ K)⁻¹]ᵀ`.
//!
//!    The right-hand form is the same matrix (push-through identity): it
//!    reuses the editor's cached Cholesky factor of `C` (one solve with `n`
//!    right-hand sides per layer) and an `n × n` system, so no `d_ff × d_ff`
//!    matrix is formed per batch, let alone per request, and it stays exact
//!    as `λ → 0`, where it maps every key onto its target: `ΔW K = R`.
//!
//! The update is stored as low-rank factors: `left = R` (`[d_model, n]`),
//! `right = C⁻¹K (λI + KᵀC⁻¹K)⁻¹` (`[d_ff, n]`); when `n > d_model` the
//! dense `ΔWᵀ` is smaller, and is stored as `right` with `left = I`.
//!
//! ## The scale of λ
//!
//! The reference code (MEMIT, and EasyEdit's port) weighs
//! `mom2_update_weight · C` with `C = stat.mom2.moment()`, the **mean** of
//! `k kᵀ` over token positions (it does not multiply by `mom2_n_samples`).
//! kedit's [`crate::stats::SecondMoment`] is the same mean, so `λ` means the
//! same thing here. Its effect does not carry over between models, though:
//! for one request, a layer writes the fraction `s / (λ + s)` of its share
//! of the residual, where `s = kᵀ C⁻¹ k` is the key's squared whitened norm.
//! Over the corpus keys the mean of `s` is exactly `tr(C⁻¹ C) = d_ff`, so
//! `s` scales with `d_ff`, and `λ` has to scale with it as well.
//!
//! Measured on SmolLM2-135M (`d_ff = 1536`, `cargo run --release --example
//! memit_scale`): over subject keys of CounterFact, the mean of `s` is
//! 4400–5700 at layers 1–5 (3–4 × `d_ff`). With the literature's
//! `λ = 15,000` (tuned on GPT-J, `d_ff = 16384`), one layer writes only
//! 23–28 % of its share, and over the five layers of the window (each
//! taking `1/(layers left)` of what is still missing) only about half of δ
//! reaches the model. That fits the PyTorch reference's efficacy of 0.54
//! on SmolLM2. [`MemitHParams::for_model`] therefore scales the literature's
//! value by `d_ff / 16384` (λ ≈ 1406 on SmolLM2, where each layer writes
//! 76–80 %). Every batch edit reports what it wrote
//! ([`LayerReport::written`], [`BatchReport::remaining`]).

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use faer::Mat;
use serde::{Deserialize, Serialize};

use super::alphaedit::{AlphaEditHParams, NullSpace};
use super::{add_low_rank, rome, Delta, DeltaInfo, EditId, EditRequest, Editor, LayerDelta};
use crate::linalg::SpdSolver;
use crate::model::decoder::Pass;
use crate::model::{At, Family, Hooks, Model, ModelConfig, Site};
use crate::stats::second_moments;
use crate::{Error, Result};

/// MEMIT's hyper-parameters. The δ optimisation and the key statistics
/// are the editor's [`super::RomeHParams`] (its `layer` is replaced by the
/// last layer of [`MemitHParams::layers`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemitHParams {
    /// The blocks whose `mlp.w_out` are edited (distinct; applied in
    /// ascending order; the targets live at the largest).
    pub layers: Vec<usize>,
    /// `λ`, the weight of the key statistics `C` (the mean of `k kᵀ`)
    /// against the new keys in `(λ C + K Kᵀ)`: larger keeps the model
    /// closer to itself and writes less of each target.
    pub mom2_update_weight: f64,
    /// Context templates of the targets and keys, as
    /// [`super::RomeHParams::context_templates`]: MEMIT's own choice,
    /// `"{}"` and five samples of 10 tokens, by default.
    #[serde(default = "batch_templates")]
    pub context_templates: Vec<(usize, usize)>,
}

/// The context templates of MEMIT's reference code (and AlphaEdit's, which
/// builds on it): `"{}"` plus five samples of 10 tokens. Fewer than ROME's
/// 21, which makes a request's target about 3.5 times cheaper.
pub fn batch_templates() -> Vec<(usize, usize)> {
    vec![(10, 5)]
}

/// `λ` of the MEMIT paper for GPT-J (`d_ff = 16384`).
pub const LITERATURE_LAMBDA: f64 = 15_000.0;
/// GPT-J's `d_ff`, the model [`LITERATURE_LAMBDA`] was tuned on.
const LITERATURE_D_FF: f64 = 16_384.0;

impl MemitHParams {
    /// Defaults for a model: the window of [`default_layers`] and the
    /// literature's `λ = 15,000` scaled by `d_ff / 16384` (see the module
    /// documentation: the whitened norm of keys grows with `d_ff`).
    pub fn for_model(config: &ModelConfig) -> Self {
        Self {
            layers: default_layers(config),
            mom2_update_weight: LITERATURE_LAMBDA * config.d_ff as f64 / LITERATURE_D_FF,
            context_templates: batch_templates(),
        }
    }
}

/// The default window of edited layers: for SmolLM2-135M the five layers
/// the causal trace recommends (1–5, `docs/locate-smollm2.md`); elsewhere
/// five layers starting at the fraction of the depth the published
/// configurations use (GPT-2 XL 13/48, GPT-J 3/28, Llama-3-8B 4/32).
pub fn default_layers(config: &ModelConfig) -> Vec<usize> {
    let n = config.n_layers;
    if n == 30 && config.d_model == 576 {
        return (1..=5).collect();
    }
    let start_fraction = match config.family {
        Family::Gpt2 => 0.27,
        Family::GptJ | Family::GptNeoX => 0.11,
        Family::Llama | Family::Mistral | Family::Qwen2 => 0.125,
    };
    let width = 5.min(n);
    let start = ((n as f64 * start_fraction).round() as usize).min(n - width);
    (start..start + width).collect()
}

/// A method that edits a batch of requests into a window of layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchMethod {
    /// MEMIT: `ΔW = R Kᵀ (λC + KKᵀ)⁻¹` per layer.
    Memit,
    /// AlphaEdit: the update projected onto the null space of `C`, with the
    /// keys of earlier AlphaEdit edits preserved.
    AlphaEdit,
}

impl BatchMethod {
    /// The name recorded in [`DeltaInfo::method`].
    pub fn name(self) -> &'static str {
        match self {
            BatchMethod::Memit => "memit",
            BatchMethod::AlphaEdit => "alphaedit",
        }
    }
}

/// What happened at one layer of a batch edit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// The block.
    pub layer: usize,
    /// Mean over requests of `‖zᵢ − h_L‖` before this layer's update.
    pub missing: f32,
    /// Mean over requests of `‖ΔW kᵢ‖ / ‖rᵢ‖`: the fraction of its share
    /// of the residual that this layer wrote at the request's own key
    /// (1 when `λ → 0` and keys are independent).
    pub written: f32,
    /// Mean over requests of `kᵢᵀ C⁻¹ kᵢ` (MEMIT; 0 for AlphaEdit).
    pub whitened_key_norm: f64,
    /// Frobenius norm of this layer's `ΔW`.
    pub update_norm: f32,
    /// Ridge added to factorise the small system (0 if none).
    pub ridge: f64,
}

/// Where the time of a batch edit went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchTimings {
    /// Statistics, factorisations / null spaces and templates (0 when cached).
    pub setup: f64,
    /// The δ optimisations of all requests.
    pub targets: f64,
    /// Forward passes for keys and residuals, all layers.
    pub keys: f64,
    /// The linear algebra of all layers.
    pub solve: f64,
}

/// What a batch edit did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchReport {
    /// `"memit"` or `"alphaedit"`.
    pub method: String,
    /// Number of requests.
    pub requests: usize,
    /// Frobenius norm of the whole update.
    pub delta_norm: f32,
    /// `max over layers of ‖W' K − V‖ / ‖V‖` with `V = W K + R` (0 only as
    /// `λ → 0`; a diagnostic, not a target).
    pub rewrite_error: f32,
    /// Loss at each step of each request's δ optimisation.
    pub losses: Vec<Vec<f32>>,
    /// Mean `‖δᵢ‖`.
    pub target_norm: f32,
    /// Mean over requests of `‖zᵢ − h_L‖ / ‖δᵢ‖` after every layer was
    /// updated: the part of the targets that was not written (0 = all).
    pub remaining: f32,
    /// Per layer, ascending.
    pub layers: Vec<LayerReport>,
    /// Timings.
    pub seconds: BatchTimings,
}

/// An applied batch edit.
#[derive(Debug, Clone)]
pub struct BatchApplied {
    /// Its id in the journal (for [`Editor::undo`]).
    pub id: EditId,
    /// The update (one [`LayerDelta`] per layer of the window).
    pub delta: Delta,
    /// What it did.
    pub report: BatchReport,
}

/// Prompts whose keys and residuals a batch edit reads: every context
/// template filled with every request, cut after the subject's last token
/// (later tokens cannot change what the causal model computes there).
///
/// The layers of a window are read in ascending order, each after the one
/// below was updated. Updating `W_out` of layer `l` changes nothing below
/// its output, so the residual entering `l` is kept from one read to the
/// next, and the next read of the template rows starts there instead of at
/// the embeddings (for a window of five consecutive layers from 1, ten
/// block evaluations per token instead of twenty).
struct KeyRows {
    /// Token ids, ending at the subject's last token.
    ids: Vec<Vec<u32>>,
    /// The request of each row.
    owner: Vec<usize>,
    /// The weight of each row in its request's mean key.
    weight: Vec<f64>,
    /// Per request, the row of its bare prompt (template `"{}"`).
    bare: Vec<usize>,
    /// The rows other than the bare prompts, by length, in passes.
    chunks: Vec<Vec<usize>>,
    /// The residual entering `layer` for every chunk, from the last read.
    kept: Option<(usize, Vec<Tensor>)>,
}

/// Rows per forward pass (rows of similar length are grouped).
const ROWS_PER_PASS: usize = 64;

impl KeyRows {
    /// Rows of every template (weighted by `weights` in the mean keys)
    /// filled with every request.
    fn new(
        model: &Model,
        requests: &[EditRequest],
        templates: &[String],
        weights: &[f64],
    ) -> Result<Self> {
        if weights.len() != templates.len() {
            return Err(Error::invalid(
                "context templates",
                format!(
                    "{} templates but {} weights",
                    templates.len(),
                    weights.len()
                ),
            ));
        }
        let bare_template = templates
            .iter()
            .position(|t| t == "{}")
            .ok_or_else(|| Error::invalid("context templates", "they lack the bare \"{}\""))?;
        let mut rows = KeyRows {
            ids: Vec::with_capacity(requests.len() * templates.len()),
            owner: Vec::new(),
            weight: Vec::new(),
            bare: Vec::with_capacity(requests.len()),
            chunks: Vec::new(),
            kept: None,
        };
        for (i, req) in requests.iter().enumerate() {
            for (t, template) in templates.iter().enumerate() {
                let prompt = template.replacen("{}", &req.prompt, 1);
                let (tokens, span) = model.subject_tokens(&prompt, &req.subject)?;
                if t == bare_template {
                    rows.bare.push(rows.ids.len());
                }
                rows.ids
                    .push(tokens[..span.end].iter().map(|t| t.id).collect());
                rows.owner.push(i);
                rows.weight.push(weights[t]);
            }
        }
        let mut is_bare = vec![false; rows.ids.len()];
        for &r in &rows.bare {
            is_bare[r] = true;
        }
        let mut rest: Vec<usize> = (0..rows.ids.len()).filter(|&r| !is_bare[r]).collect();
        rest.sort_by_key(|&r| rows.ids[r].len());
        rows.chunks = rest.chunks(ROWS_PER_PASS).map(<[usize]>::to_vec).collect();
        Ok(rows)
    }

    fn n_requests(&self) -> usize {
        self.bare.len()
    }

    /// Mean key of each request at `key_layer` (`[d_ff, n]`, when asked)
    /// and the residual leaving `resid_layer` at each bare prompt
    /// (`[d_model, n]`), with the model as it is now. Successive calls must
    /// ask for ascending key layers, and the model may only have changed
    /// at or above the previous call's key layer.
    fn read(
        &mut self,
        model: &Model,
        key_layer: Option<usize>,
        resid_layer: usize,
    ) -> Result<(Option<Mat<f64>>, Mat<f64>)> {
        let cfg = model.config();
        let n = self.n_requests();
        let mut keys = key_layer.map(|_| Mat::<f64>::zeros(cfg.d_ff, n));
        let mut resid = Mat::<f64>::zeros(cfg.d_model, n);
        let add_keys = |keys: &mut Mat<f64>, rows: &[usize], k: &Tensor| -> Result<()> {
            let k: Vec<Vec<f64>> = k.to_dtype(DType::F64)?.to_vec2()?;
            for (&row, k) in rows.iter().zip(&k) {
                let (owner, weight) = (self.owner[row], self.weight[row]);
                for (j, x) in k.iter().enumerate() {
                    keys[(j, owner)] += x * weight;
                }
            }
            Ok(())
        };

        // The bare prompts (one per request): keys and the residual at the
        // top of the window, from the embeddings.
        let mut bare: Vec<usize> = self.bare.clone();
        bare.sort_by_key(|&r| self.ids[r].len());
        let top = key_layer.map_or(resid_layer, |k| k.max(resid_layer));
        for chunk in bare.chunks(ROWS_PER_PASS) {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|&r| self.ids[r].clone()).collect();
            let batch = model.batch(&seqs)?;
            let last: Vec<(usize, usize)> = seqs
                .iter()
                .enumerate()
                .map(|(i, s)| (i, s.len() - 1))
                .collect();
            let mut hooks = Hooks::new();
            let key_id =
                key_layer.map(|l| hooks.capture(Site::MlpKey(l), At::Points(last.clone())));
            let resid_id = hooks.capture(Site::ResidPost(resid_layer), At::Points(last));
            let out = model.forward_until(&batch, top, &hooks)?;
            if let (Some(id), Some(keys)) = (key_id, keys.as_mut()) {
                add_keys(keys, chunk, out.capture(id))?;
            }
            let h: Vec<Vec<f64>> = out.capture(resid_id).to_dtype(DType::F64)?.to_vec2()?;
            for (&row, h) in chunk.iter().zip(&h) {
                let owner = self.owner[row];
                for (j, x) in h.iter().enumerate() {
                    resid[(j, owner)] = *x;
                }
            }
        }

        // The other templates: keys only, resuming from the kept residual.
        let (Some(layer), Some(keys_acc)) = (key_layer, keys.as_mut()) else {
            return Ok((keys, resid));
        };
        let decoder = model.decoder();
        let mut kept = Vec::with_capacity(self.chunks.len());
        for (c, chunk) in self.chunks.iter().enumerate() {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|&r| self.ids[r].clone()).collect();
            let no_hooks = Hooks::new();
            let mut plain = Pass {
                hooks: &no_hooks,
                captures: Vec::new(),
                offset: 0,
            };
            let (mut x, start) = match &self.kept {
                Some((from, xs)) if *from <= layer => (xs[c].clone(), *from),
                _ => (decoder.embed(&model.batch(&seqs)?.ids, &mut plain)?, 0),
            };
            let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
            if start < layer {
                x = decoder.blocks(x, start..layer, &mut plain, None, &lengths)?;
            }
            let last: Vec<(usize, usize)> = seqs
                .iter()
                .enumerate()
                .map(|(i, s)| (i, s.len() - 1))
                .collect();
            let mut hooks = Hooks::new();
            hooks.capture(Site::MlpKey(layer), At::Points(last));
            let mut pass = Pass {
                hooks: &hooks,
                captures: vec![None],
                offset: 0,
            };
            decoder.blocks(x.clone(), layer..layer + 1, &mut pass, None, &lengths)?;
            let k = pass.captures[0]
                .take()
                .ok_or_else(|| Error::invalid("keys", "the key capture produced nothing"))?;
            add_keys(keys_acc, chunk, &k)?;
            kept.push(x);
        }
        self.kept = Some((layer, kept));
        Ok((keys, resid))
    }
}

/// How one layer's right factor is solved.
enum LayerSolve {
    /// MEMIT: the Cholesky factor of `C` and `λ`.
    Memit { solver: Arc<SpdSolver>, lambda: f64 },
    /// AlphaEdit: the null space of `C`, the keys of earlier AlphaEdit
    /// edits at this layer (`[d_ff, m]`) and the ridge `α`.
    AlphaEdit {
        null_space: Arc<NullSpace>,
        earlier: Mat<f64>,
        l2: f64,
    },
}

/// The right factor of one layer: `ΔW = R · rightᵀ`.
pub(super) struct Solved {
    pub(super) right: Mat<f64>,
    pub(super) whitened_key_norm: f64,
    pub(super) ridge: f64,
}

impl LayerSolve {
    fn solve(&self, keys: &Mat<f64>) -> Result<Solved> {
        match self {
            LayerSolve::Memit { solver, lambda } => memit_right(solver, *lambda, keys),
            LayerSolve::AlphaEdit {
                null_space,
                earlier,
                l2,
            } => super::alphaedit::alphaedit_right(null_space, earlier, keys, *l2),
        }
    }
}

/// `C⁻¹K (λI + KᵀC⁻¹K)⁻¹`, i.e. `(λC + KKᵀ)⁻¹ K`.
fn memit_right(solver: &SpdSolver, lambda: f64, keys: &Mat<f64>) -> Result<Solved> {
    let (d_ff, n) = (keys.nrows(), keys.ncols());
    let u = from_row_major(&solver.solve(&to_row_major(keys), n)?, d_ff, n);
    let mut small = keys.transpose() * &u;
    let whitened_key_norm = (0..n).map(|i| small[(i, i)]).sum::<f64>() / n as f64;
    for i in 0..n {
        for j in 0..i {
            let s = 0.5 * (small[(i, j)] + small[(j, i)]);
            small[(i, j)] = s;
            small[(j, i)] = s;
        }
        small[(i, i)] += lambda;
    }
    let small_solver = SpdSolver::new(&to_row_major(&small), n)?;
    // X = S⁻¹ Uᵀ, right = Xᵀ = U S⁻¹ (S symmetric).
    let x = small_solver.solve(&to_row_major(&u.transpose().to_owned()), d_ff)?;
    let right = Mat::from_fn(d_ff, n, |i, j| x[j * d_ff + i]);
    Ok(Solved {
        right,
        whitened_key_norm,
        ridge: small_solver.ridge,
    })
}

pub(super) fn to_row_major(m: &Mat<f64>) -> Vec<f64> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut out = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            out.push(m[(i, j)]);
        }
    }
    out
}

pub(super) fn from_row_major(v: &[f64], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
}

/// A `[rows, cols]` f32 tensor of a faer matrix.
fn to_tensor(m: &Mat<f64>, device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = to_row_major(m).into_iter().map(|x| x as f32).collect();
    Ok(Tensor::from_vec(v, (m.nrows(), m.ncols()), device)?)
}

/// Columns of a `[n, width]` tensor as a `[width, n]` f64 matrix.
fn columns_of(rows: &Tensor) -> Result<Mat<f64>> {
    let v: Vec<Vec<f64>> = rows.to_dtype(DType::F64)?.to_vec2()?;
    let width = v.first().map_or(0, Vec::len);
    Ok(Mat::from_fn(width, v.len(), |i, j| v[j][i]))
}

fn column_norm(m: &Mat<f64>, j: usize) -> f64 {
    (0..m.nrows())
        .map(|i| m[(i, j)].powi(2))
        .sum::<f64>()
        .sqrt()
}

fn all_finite(m: &Mat<f64>) -> bool {
    (0..m.ncols()).all(|j| (0..m.nrows()).all(|i| m[(i, j)].is_finite()))
}

impl Editor {
    /// MEMIT's hyper-parameters.
    pub fn memit_hparams(&self) -> &MemitHParams {
        &self.memit
    }

    /// Mutable MEMIT hyper-parameters.
    pub fn memit_hparams_mut(&mut self) -> &mut MemitHParams {
        &mut self.memit
    }

    /// Uses these MEMIT hyper-parameters.
    pub fn with_memit_hparams(mut self, hparams: MemitHParams) -> Self {
        self.memit = hparams;
        self
    }

    /// AlphaEdit's hyper-parameters.
    pub fn alphaedit_hparams(&self) -> &AlphaEditHParams {
        &self.alphaedit
    }

    /// Mutable AlphaEdit hyper-parameters.
    pub fn alphaedit_hparams_mut(&mut self) -> &mut AlphaEditHParams {
        &mut self.alphaedit
    }

    /// Uses these AlphaEdit hyper-parameters.
    pub fn with_alphaedit_hparams(mut self, hparams: AlphaEditHParams) -> Self {
        self.alphaedit = hparams;
        self
    }

    /// Computes and applies one joint update of all `requests` with a batch
    /// method (journaled: [`Editor::undo`] removes the whole batch). On any
    /// error the weights are untouched.
    ///
    /// ```no_run
    /// # use kedit::edit::{BatchMethod, EditRequest, Editor};
    /// # let mut editor = Editor::new(kedit::Model::load("m.gguf")?);
    /// let requests = vec![
    ///     EditRequest::modify("{} is located in the city of", "The Eiffel Tower", "Paris", "Rome"),
    ///     EditRequest::modify("The mother tongue of {} is", "Danielle Darrieux", "French", "English"),
    /// ];
    /// let done = editor.apply_batch(BatchMethod::Memit, &requests)?;
    /// println!("{:?} of the targets not written", done.report.remaining);
    /// editor.undo(done.id)?;
    /// # Ok::<(), kedit::Error>(())
    /// ```
    pub fn apply_batch(
        &mut self,
        method: BatchMethod,
        requests: &[EditRequest],
    ) -> Result<BatchApplied> {
        let (delta, mut report) = self.compute_batch(method, requests)?;
        let id = self.apply_delta(&delta)?;
        // The caller gets no id on error, so the edit must not stay applied.
        match self.rewrite_error(&delta) {
            Ok(e) => report.rewrite_error = e,
            Err(e) => {
                self.undo(id)?;
                return Err(e);
            }
        }
        Ok(BatchApplied { id, delta, report })
    }

    /// Computes the update of a batch method without applying it (the
    /// model is changed while computing and restored before returning).
    pub fn compute_batch(
        &mut self,
        method: BatchMethod,
        requests: &[EditRequest],
    ) -> Result<(Delta, BatchReport)> {
        let (layers, spec) = match method {
            BatchMethod::Memit => (
                self.memit.layers.clone(),
                self.memit.context_templates.clone(),
            ),
            BatchMethod::AlphaEdit => (
                self.alphaedit.layers.clone(),
                self.alphaedit.context_templates.clone(),
            ),
        };
        let layers = self.check_batch(method, requests, &layers)?;

        let t = Instant::now();
        let templates = self.templates_for(&spec)?.to_vec();
        let solves = self.layer_solves(method, &layers)?;
        let mut seconds = BatchTimings {
            setup: t.elapsed().as_secs_f64(),
            ..Default::default()
        };

        let top = *layers.last().expect("checked non-empty");
        let mut z_hparams = self.hparams.clone();
        z_hparams.layer = top;
        let t = Instant::now();
        let mut deltas = Vec::with_capacity(requests.len());
        let mut losses = Vec::with_capacity(requests.len());
        for kv in rome::keys_and_deltas(&self.model, requests, &templates, &z_hparams)? {
            deltas.push(
                kv.delta
                    .to_dtype(DType::F32)?
                    .to_device(&candle_core::Device::Cpu)?,
            );
            losses.push(kv.losses);
        }
        let shifts = columns_of(&Tensor::stack(&deltas, 0)?)?;
        seconds.targets = t.elapsed().as_secs_f64();

        let mut rows = KeyRows::new(
            &self.model,
            requests,
            &templates,
            &super::templates::group_weights(&spec),
        )?;
        // The window's weights, to put back whatever happens.
        let saved: Vec<(usize, Tensor)> = layers
            .iter()
            .map(|&l| (l, self.model.weights().blocks[l].mlp.w_out.weight.clone()))
            .collect();
        let outcome = self.write_layers(&layers, &solves, &mut rows, &shifts, &mut seconds);
        for (l, w) in saved {
            self.model.weights_mut().blocks[l].mlp.w_out.weight = w;
        }
        let (layer_deltas, layer_reports, remaining) = outcome?;

        let n = requests.len();
        let target_norm = (0..n).map(|j| column_norm(&shifts, j)).sum::<f64>() / n as f64;
        let hparams = serde_json::json!({
            "method": match method {
                BatchMethod::Memit => serde_json::to_value(&self.memit),
                BatchMethod::AlphaEdit => serde_json::to_value(&self.alphaedit),
            }
            .unwrap_or_default(),
            "targets": serde_json::to_value(&z_hparams).unwrap_or_default(),
        });
        let delta = Delta {
            info: DeltaInfo {
                method: method.name().into(),
                model_fingerprint: self.model.fingerprint().to_string(),
                requests: requests.to_vec(),
                hparams,
                layers: layers.clone(),
                kedit_version: env!("CARGO_PKG_VERSION").into(),
            },
            layers: layer_deltas,
        };
        let report = BatchReport {
            method: method.name().into(),
            requests: n,
            delta_norm: delta.norm()?,
            rewrite_error: 0.0,
            losses,
            target_norm: target_norm as f32,
            remaining,
            layers: layer_reports,
            seconds,
        };
        Ok((delta, report))
    }

    /// Validates a batch before any expensive work; returns the layers in
    /// ascending order.
    fn check_batch(
        &self,
        method: BatchMethod,
        requests: &[EditRequest],
        layers: &[usize],
    ) -> Result<Vec<usize>> {
        if requests.is_empty() {
            return Err(Error::invalid("batch", "it holds no request"));
        }
        let sorted = self.check_window(method, layers)?;
        // One key gets one value: two requests on the same prompt and
        // subject share their keys. With different targets the least-squares
        // solve splits the difference and neither is written; with the same
        // target the request counts twice against every other one. Either
        // way the batch would not do what its caller asked.
        let mut seen = std::collections::HashMap::new();
        for (i, req) in requests.iter().enumerate() {
            if let Some(first) = seen.insert((req.prompt.as_str(), req.subject.as_str()), i) {
                return Err(Error::invalid(
                    format!("request {i} of the batch"),
                    format!(
                        "it edits the same prompt and subject as request {first} \
                         ({:?}, {:?}); one batch writes one value per key: edit them \
                         in separate batches or keep one",
                        req.prompt, req.subject
                    ),
                ));
            }
        }
        for (i, req) in requests.iter().enumerate() {
            let in_batch = |e: Error| match e {
                Error::InvalidInput { what, reason } => Error::InvalidInput {
                    what: format!("{what} (request {i} of the batch)"),
                    reason,
                },
                other => other,
            };
            req.validate().map_err(in_batch)?;
            self.model
                .subject_tokens(&req.prompt, &req.subject)
                .map_err(in_batch)?;
            self.model
                .target_ids(req.objective_target())
                .map_err(in_batch)?;
        }
        Ok(sorted)
    }

    /// Checks a batch method's settings (its layer window, `λ` or null-space
    /// settings, the statistics options) without any request; returns the
    /// window in ascending order.
    pub fn check_batch_settings(&self, method: BatchMethod) -> Result<Vec<usize>> {
        let layers = match method {
            BatchMethod::Memit => &self.memit.layers,
            BatchMethod::AlphaEdit => &self.alphaedit.layers,
        };
        self.check_window(method, layers)
    }

    fn check_window(&self, method: BatchMethod, layers: &[usize]) -> Result<Vec<usize>> {
        // MEMIT's and AlphaEdit's targets use ROME's optimisation settings.
        self.hparams.validate()?;
        let n_layers = self.model.config().n_layers;
        if layers.is_empty() {
            return Err(Error::invalid(
                "layers",
                "the window of edited layers is empty",
            ));
        }
        if let Some(&bad) = layers.iter().find(|&&l| l >= n_layers) {
            return Err(Error::invalid(
                "layer",
                format!("{bad} is out of range: the model has {n_layers} layers"),
            ));
        }
        let mut sorted = layers.to_vec();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::invalid(
                "layers",
                format!("{layers:?} lists a layer twice"),
            ));
        }
        match method {
            BatchMethod::Memit => {
                let l = self.memit.mom2_update_weight;
                if !(l.is_finite() && l >= 0.0) {
                    return Err(Error::invalid(
                        "mom2_update_weight",
                        format!("{l} is not a finite number ≥ 0"),
                    ));
                }
            }
            BatchMethod::AlphaEdit => self.alphaedit.validate()?,
        }
        Ok(sorted)
    }

    /// The per-layer solvers (statistics of all missing layers in one pass
    /// over the corpus, then cached in memory).
    fn layer_solves(&mut self, method: BatchMethod, layers: &[usize]) -> Result<Vec<LayerSolve>> {
        let stats_opts = self.hparams.stats.clone();
        let missing: Vec<usize> = layers
            .iter()
            .copied()
            .filter(|l| match method {
                BatchMethod::Memit => {
                    !matches!(self.solvers.get(l), Some((o, _)) if *o == stats_opts)
                }
                BatchMethod::AlphaEdit => !self.null_space_is_cached(*l),
            })
            .collect();
        if !missing.is_empty() {
            // Warms the disk cache of every missing layer in one corpus pass.
            let corpus = self.corpus.clone();
            self.on_base_model(|model| second_moments(model, &missing, &corpus, &stats_opts))?;
        }
        let mut out = Vec::with_capacity(layers.len());
        for &l in layers {
            out.push(match method {
                BatchMethod::Memit => LayerSolve::Memit {
                    solver: self.solver(l)?,
                    lambda: self.memit.mom2_update_weight,
                },
                BatchMethod::AlphaEdit => LayerSolve::AlphaEdit {
                    null_space: {
                        let ns = self.null_space(l)?;
                        if ns.dim() == 0 {
                            return Err(Error::invalid(
                                "null space",
                                format!(
                                    "it is empty at layer {l}: no eigenvalue of C is below {:e}; \
                                     raise nullspace_threshold",
                                    ns.threshold
                                ),
                            ));
                        }
                        ns
                    },
                    earlier: self.alphaedit_keys(l)?,
                    l2: self.alphaedit.l2,
                },
            });
        }
        Ok(out)
    }

    /// The ascending loop over layers; changes the model's weights (the
    /// caller restores them).
    #[allow(clippy::type_complexity)]
    fn write_layers(
        &mut self,
        layers: &[usize],
        solves: &[LayerSolve],
        rows: &mut KeyRows,
        shifts: &Mat<f64>,
        seconds: &mut BatchTimings,
    ) -> Result<(Vec<LayerDelta>, Vec<LayerReport>, f32)> {
        let top = *layers.last().expect("non-empty");
        let (d_model, n) = (shifts.nrows(), shifts.ncols());
        let mut targets: Option<Mat<f64>> = None;
        let mut out = Vec::with_capacity(layers.len());
        let mut reports = Vec::with_capacity(layers.len());
        for (i, (&layer, solve)) in layers.iter().zip(solves).enumerate() {
            let t = Instant::now();
            let (keys, resid) = rows.read(&self.model, Some(layer), top)?;
            let keys = keys.expect("keys were asked for");
            seconds.keys += t.elapsed().as_secs_f64();

            let t = Instant::now();
            // Before any update the residual is h_L itself: z = h_L + δ.
            let z = targets.get_or_insert_with(|| &resid + shifts);
            let missing = &*z - &resid;
            let left_layers = (layers.len() - i) as f64;
            let share = &missing * faer::Scale(1.0 / left_layers);
            let solved = solve.solve(&keys)?;
            let (left, right) = if n > d_model {
                // Rank d_model: ΔW = I · (right Rᵀ)ᵀ is smaller than the factors.
                (
                    Mat::<f64>::identity(d_model, d_model),
                    &solved.right * share.transpose(),
                )
            } else {
                (share.clone(), solved.right.clone())
            };
            if !(all_finite(&left) && all_finite(&right)) {
                return Err(Error::NonFinite(format!("the update of layer {layer}")));
            }
            // How much of each request's share this layer writes at its key.
            let written_cols = &share * (solved.right.transpose() * &keys);
            let written = (0..n)
                .map(|j| column_norm(&written_cols, j) / column_norm(&share, j).max(1e-30))
                .sum::<f64>()
                / n as f64;
            let missing_norm = (0..n).map(|j| column_norm(&missing, j)).sum::<f64>() / n as f64;

            let w = self.model.weights().blocks[layer].mlp.w_out.weight.clone();
            let device = w.device().clone();
            let keys_t = to_tensor(&keys, &device)?;
            let values = (w
                .matmul(&keys_t.to_dtype(w.dtype())?)?
                .to_dtype(DType::F32)?
                + to_tensor(&share, &device)?)?;
            let ld = LayerDelta {
                layer,
                left: to_tensor(&left, &device)?,
                right: to_tensor(&right, &device)?,
                keys: keys_t,
                values,
            };
            // The lower layers must be updated before the next layer's keys
            // are read; apply_delta later adds the same factors the same way.
            self.model.weights_mut().blocks[layer].mlp.w_out.weight = add_low_rank(&w, &ld)?;
            reports.push(LayerReport {
                layer,
                missing: missing_norm as f32,
                written: written as f32,
                whitened_key_norm: solved.whitened_key_norm,
                update_norm: ld.norm()?,
                ridge: solved.ridge,
            });
            out.push(ld);
            seconds.solve += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let (_, resid) = rows.read(&self.model, None, top)?;
        seconds.keys += t.elapsed().as_secs_f64();
        let z = targets.expect("at least one layer");
        let left_over = &z - &resid;
        let remaining = (0..n)
            .map(|j| column_norm(&left_over, j) / column_norm(shifts, j).max(1e-30))
            .sum::<f64>()
            / n as f64;
        Ok((out, reports, remaining as f32))
    }
}
