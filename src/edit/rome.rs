//! ROME (Meng et al., 2022, "Locating and Editing Factual Associations in
//! GPT"), with the consistency correction of r-ROME (Gupta et al., 2024).
//!
//! An MLP's output matrix is read as a key–value memory: the key `k` is the
//! activated hidden layer at the subject's last token, the value `W k` is
//! what the MLP writes into the residual stream. One fact is one pair:
//!
//! 1. `k*` — the mean key over the prompt prefixed by context templates.
//! 2. `δ` — a vector added to the MLP output at the subject's last token in
//!    every one of those prompts, optimised so that the model continues with
//!    the target (KL-regularised, norm-clamped). The desired value is then
//!    `v* = W k* + δ`.
//! 3. The rank-one update that maps `k*` to `v*` while disturbing other keys
//!    least under their second moment `C = E[k kᵀ]`:
//!
//!    `u = C⁻¹ k*`,  `ΔW = (v* − W k*) uᵀ / (uᵀ k*)`,  so `W' k* = v*`.
//!
//! Using the same averaged `k*` on both sides of the solve is r-ROME's fix:
//! mixing it with a single-prompt key is what makes original ROME collapse
//! models now and then. kedit adds one constraint to the direction of the
//! update (see [`key_and_delta_for_update`]).
//!
//! The same optimisation gives MEMIT's and AlphaEdit's targets, for many
//! requests at once ([`keys_and_deltas`]): the prompts of a group of
//! requests run as one batch, each request with its own `δ`, and a request
//! leaves the batch as soon as it has converged.

use std::time::Instant;

use candle_core::{DType, Tensor, Var, D};

use super::hparams::{RomeHParams, StopOn};
use super::request::{EditKind, EditRequest};
use crate::linalg::SpdSolver;
use crate::model::{At, Hooks, KvCache, LogitsAt, Model, Site};
use crate::{Error, Result};

/// `k*` and `δ` for one request, with how the optimisation went.
#[derive(Debug, Clone)]
pub struct KeyValue {
    /// The mean key at the subject's last token, `[d_ff]`, f32.
    pub key: Tensor,
    /// The optimised shift of the MLP output, `[d_model]`, f32.
    pub delta: Tensor,
    /// Total loss at each step taken.
    pub losses: Vec<f32>,
    /// The target part of `losses` (see [`crate::edit::EditReport::target_losses`]).
    pub target_losses: Vec<f32>,
    /// Seconds spent on the shared forward pass (keys, caches); for a
    /// request optimised in a group, the group's time over its size.
    pub prepare_seconds: f64,
    /// Seconds spent in the optimisation steps (likewise).
    pub optimise_seconds: f64,
    /// How strongly the update reaches each optimisation prompt
    /// (`aᵀk_r`, the rewrite prompts then the KL prompt); all ones when the
    /// optimisation did not model the update.
    pub row_scales: Vec<f32>,
    /// With [`key_and_delta_for_update`]: the direction `a` of the update
    /// `ΔW = δ aᵀ` (f64, `[d_ff]`, `aᵀk* = 1`) that the optimisation modelled.
    pub direction: Option<Vec<f64>>,
}

/// What the loss does with a target's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Objective {
    /// Negative log-likelihood: make the target likely.
    Likelihood,
    /// Unlikelihood, `−log(1 − p)`: make it unlikely.
    Unlikelihood,
}

/// One prompt of the optimisation batch.
struct Row {
    ids: Vec<u32>,
    /// Position of the subject's last token.
    lookup: usize,
    /// Positions whose logits predict a target token, and those tokens.
    targets: Vec<(usize, u32)>,
    /// What the loss does with them.
    objective: Objective,
    /// Weight of each target point: one over the number of points of the
    /// same request and objective (the mean over prompts of the mean over
    /// the target's tokens, as in ROME).
    weight: f32,
    /// The request (index in its group).
    request: usize,
    /// The KL prompt `"{subject} is a"` (no targets).
    kl: bool,
}

/// The rows of one request: every context template with every objective
/// target (prompt + target without its last token), then the KL row.
fn request_rows(
    model: &Model,
    req: &EditRequest,
    templates: &[String],
    request: usize,
) -> Result<Vec<Row>> {
    let mut objectives = Vec::new();
    let text = |t: &Option<String>| t.clone().unwrap_or_default();
    match req.kind {
        EditKind::Modify | EditKind::Insert => {
            objectives.push((text(&req.target_new), Objective::Likelihood))
        }
        EditKind::Erase => {
            objectives.push((text(&req.target_true), Objective::Unlikelihood));
            // Erasing towards a neutral answer.
            if req.target_new.is_some() {
                objectives.push((text(&req.target_new), Objective::Likelihood));
            }
        }
    }
    let mut rows = Vec::with_capacity(objectives.len() * templates.len() + 1);
    for (target, objective) in &objectives {
        let target = model.target_ids(target)?;
        let weight = 1.0 / (target.len() * templates.len()) as f32;
        for template in templates {
            let prompt = template.replacen("{}", &req.prompt, 1);
            let (tokens, span) = model.subject_tokens(&prompt, &req.subject)?;
            let mut ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
            let p = ids.len();
            ids.extend(&target[..target.len() - 1]);
            let targets = target
                .iter()
                .enumerate()
                .map(|(i, &t)| (p - 1 + i, t))
                .collect();
            rows.push(Row {
                ids,
                lookup: span.end - 1,
                targets,
                objective: *objective,
                weight,
                request,
                kl: false,
            });
        }
    }
    let (tokens, span) = model.subject_tokens("{} is a", &req.subject)?;
    rows.push(Row {
        lookup: span.end - 1,
        targets: Vec::new(),
        ids: tokens.iter().map(|t| t.id).collect(),
        objective: Objective::Likelihood,
        weight: 0.0,
        request,
        kl: true,
    });
    Ok(rows)
}

/// Computes `k*` and `δ` for `req` at `hp.layer`, adding the same `δ` to
/// the MLP output at the subject in every prompt (MEMIT's residual target).
pub fn key_and_delta(
    model: &Model,
    req: &EditRequest,
    templates: &[String],
    hp: &RomeHParams,
) -> Result<KeyValue> {
    let mut out = optimise(model, &[req], templates, hp, None)?;
    Ok(out.remove(0))
}

/// [`key_and_delta`] for many requests, each with its own `δ`, in groups
/// whose prompts run as one batch (MEMIT's and AlphaEdit's targets).
/// Per-request results equal [`key_and_delta`]'s up to float rounding.
pub fn keys_and_deltas(
    model: &Model,
    reqs: &[EditRequest],
    templates: &[String],
    hp: &RomeHParams,
) -> Result<Vec<KeyValue>> {
    let per_request = 2 * templates.len() + 1;
    let group = (ROWS_PER_GROUP / per_request).max(1);
    let mut out = Vec::with_capacity(reqs.len());
    for chunk in reqs.chunks(group) {
        let refs: Vec<&EditRequest> = chunk.iter().collect();
        out.extend(optimise(model, &refs, templates, hp, None)?);
    }
    Ok(out)
}

/// Rows (prompts) optimised together in [`keys_and_deltas`]: enough for
/// matrix products that use the cores well, few enough to keep the
/// activations of one step small.
const ROWS_PER_GROUP: usize = 112;

/// Computes `k*`, `δ` and the direction `a` of the rank-one update
/// `ΔW = δ aᵀ` (`solver` factorises `C`; see [`KeyValue::direction`]).
///
/// Such an update moves the MLP output at a key `k` by `δ · aᵀk`, not by
/// `δ`: prompts whose subject key lies far from `k*` in the metric of `C`
/// receive only a fraction of it. The bare prompt is the extreme case (its
/// subject starts the text; on SmolLM2 plain ROME's `u = C⁻¹k*` reaches it
/// with as little as a tenth of `δ`), so `a` is also constrained to reach
/// it fully, and the optimisation adds to each prompt the shift the update
/// will really make there: `δ` is chosen for the edited model rather than
/// for an idealised one.
pub fn key_and_delta_for_update(
    model: &Model,
    req: &EditRequest,
    templates: &[String],
    hp: &RomeHParams,
    solver: &SpdSolver,
) -> Result<KeyValue> {
    let mut out = optimise(model, &[req], templates, hp, Some(solver))?;
    Ok(out.remove(0))
}

/// What the optimisation of one group keeps fixed: the clean pass's
/// suffixes, caches and reference distributions, and the target points.
struct Problem<'a> {
    model: &'a Model,
    layer: usize,
    rows: Vec<Row>,
    /// `[rows, width, d_model]`: the residual leaving the edited layer from
    /// each row's subject token on (right-padded).
    suffix: Tensor,
    /// Suffix length of each row.
    suffix_lens: Vec<usize>,
    /// How strongly δ reaches each row (1 unless the update was modelled).
    row_scales: Vec<f32>,
    /// The prefixes (before the subject's last token) of every row in the
    /// layers above the edited one; `None` when every prefix is empty.
    prefix: Option<KvCache>,
    /// `[requests, vocab]`: log-probabilities after each KL prompt, unedited.
    kl_init: Tensor,
    kl_factor: f64,
}

/// A group of rows that one thread runs.
struct Shard {
    /// `[n, width, d_model]`.
    suffix: Tensor,
    /// `[n, width, 1]`: where δ is added (column 0) and how strongly.
    shift_mask: Tensor,
    /// `[n]`: the request (row of δ) of each row.
    owners: Tensor,
    lens: Vec<usize>,
    cache: Option<KvCache>,
    /// Logit positions: the target points, then the KL points.
    points: Vec<(usize, usize)>,
    /// `[targets, 1]`.
    target_ids: Tensor,
    /// `[targets]`: point weights of likelihood points (0 for the others).
    likelihood_weights: Tensor,
    /// `[targets]`: point weights of unlikelihood points (0 for the others).
    unlikelihood_weights: Tensor,
    /// The request of each target point, then of each KL point.
    point_owners: Vec<usize>,
    /// `[kl points, vocab]`.
    kl_init: Option<Tensor>,
}

impl Problem<'_> {
    /// Splits `active` rows into `n` shards of about equal numbers of
    /// suffix tokens, rows of similar length together (less padding).
    fn shards(&self, active: &[usize], n: usize) -> Result<Vec<Shard>> {
        let mut order = active.to_vec();
        order.sort_by_key(|&r| (self.suffix_lens[r], r));
        let total: usize = order.iter().map(|&r| self.suffix_lens[r]).sum();
        let per = total.div_ceil(n.max(1));
        let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
        let mut acc = 0;
        for &r in &order {
            if acc >= per && groups.len() < n {
                groups.push(Vec::new());
                acc = 0;
            }
            acc += self.suffix_lens[r];
            groups.last_mut().expect("non-empty").push(r);
        }
        groups
            .into_iter()
            .filter(|g| !g.is_empty())
            .map(|g| self.shard(&g))
            .collect()
    }

    fn shard(&self, rows: &[usize]) -> Result<Shard> {
        let device = self.model.device();
        let width = rows.iter().map(|&r| self.suffix_lens[r]).max().unwrap_or(1);
        let index = Tensor::new(
            rows.iter()
                .map(|&r| r as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            device,
        )?;
        let suffix = self
            .suffix
            .index_select(&index, 0)?
            .narrow(1, 0, width)?
            .contiguous()?;
        let mut mask = vec![0f32; rows.len() * width];
        for (i, &r) in rows.iter().enumerate() {
            mask[i * width] = self.row_scales[r];
        }
        let shift_mask = Tensor::from_vec(mask, (rows.len(), width, 1), device)?;
        let owners: Vec<u32> = rows.iter().map(|&r| self.rows[r].request as u32).collect();
        let owners = Tensor::new(owners.as_slice(), device)?;
        let mut points = Vec::new();
        let mut target_ids = Vec::new();
        let (mut like, mut unlike) = (Vec::new(), Vec::new());
        let mut point_owners = Vec::new();
        for (i, &r) in rows.iter().enumerate() {
            let row = &self.rows[r];
            for &(pos, tok) in &row.targets {
                points.push((i, pos - row.lookup));
                target_ids.push(tok);
                let (l, u) = match row.objective {
                    Objective::Likelihood => (row.weight, 0.0),
                    Objective::Unlikelihood => (0.0, row.weight),
                };
                like.push(l);
                unlike.push(u);
                point_owners.push(row.request);
            }
        }
        let n_targets = target_ids.len();
        let mut kl_requests = Vec::new();
        for (i, &r) in rows.iter().enumerate() {
            let row = &self.rows[r];
            if row.kl {
                points.push((i, row.ids.len() - 1 - row.lookup));
                point_owners.push(row.request);
                kl_requests.push(row.request as u32);
            }
        }
        let kl_init = if kl_requests.is_empty() {
            None
        } else {
            let index = Tensor::new(kl_requests.as_slice(), device)?;
            Some(self.kl_init.index_select(&index, 0)?)
        };
        Ok(Shard {
            suffix,
            shift_mask,
            owners,
            lens: rows.iter().map(|&r| self.suffix_lens[r]).collect(),
            cache: self
                .prefix
                .as_ref()
                .map(|c| c.select_rows(rows))
                .transpose()?,
            points,
            target_ids: Tensor::from_vec(target_ids, (n_targets, 1), device)?,
            likelihood_weights: Tensor::from_vec(like, n_targets, device)?,
            unlikelihood_weights: Tensor::from_vec(unlike, n_targets, device)?,
            point_owners,
            kl_init,
        })
    }

    /// The loss of each point of `shard` (target points weighted, KL
    /// points times the KL factor) and, if asked, the gradient of their
    /// sum for every row of `delta` (`[requests, d_model]`).
    fn step(
        &self,
        shard: &Shard,
        delta: &Var,
        want_grad: bool,
    ) -> Result<(Vec<f32>, Option<Tensor>)> {
        let per_row = delta.as_tensor().index_select(&shard.owners, 0)?;
        let shift = shard.shift_mask.broadcast_mul(&per_row.unsqueeze(1)?)?;
        let x = (&shard.suffix + shift)?.to_dtype(self.model.dtype())?;
        let mut cache = shard.cache.clone();
        let out = self.model.forward_from(
            self.layer + 1,
            &x,
            &shard.lens,
            &LogitsAt::Points(shard.points.clone()),
            &Hooks::new(),
            cache.as_mut(),
        )?;
        let logits = out.logits.expect("logits requested").to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let n_targets = shard.target_ids.dim(0)?;
        let mut parts = Vec::with_capacity(2);
        if n_targets > 0 {
            let target_logp = logp
                .narrow(0, 0, n_targets)?
                .gather(&shard.target_ids, 1)?
                .squeeze(1)?;
            let nll = target_logp.neg()?;
            // −log(1 − p), kept finite where p rounds to 1.
            let unlikely = target_logp
                .exp()?
                .affine(-1.0, 1.0)?
                .clamp(1e-6f32, 1.0f32)?
                .log()?
                .neg()?;
            parts.push(
                ((nll * &shard.likelihood_weights)? + (unlikely * &shard.unlikelihood_weights)?)?,
            );
        }
        if let Some(kl_init) = &shard.kl_init {
            let kl_logp = logp.narrow(0, n_targets, kl_init.dim(0)?)?;
            let kl = (kl_logp.exp()? * (&kl_logp - kl_init)?)?.sum(1)?;
            parts.push((kl * self.kl_factor)?);
        }
        let per_point = Tensor::cat(&parts, 0)?;
        let values: Vec<f32> = per_point.to_vec1()?;
        if !want_grad || values.iter().any(|v| !v.is_finite()) {
            return Ok((values, None));
        }
        let grads = per_point.sum_all()?.backward()?;
        Ok((values, grads.get(delta.as_tensor()).cloned()))
    }
}

/// Optimises `δ` for every request of a group at `hp.layer`.
fn optimise(
    model: &Model,
    reqs: &[&EditRequest],
    templates: &[String],
    hp: &RomeHParams,
    solver: Option<&SpdSolver>,
) -> Result<Vec<KeyValue>> {
    let started = Instant::now();
    let cfg = model.config();
    let layer = hp.layer;
    if layer >= cfg.n_layers {
        return Err(Error::invalid(
            "layer",
            format!(
                "{layer} is out of range: the model has {} layers",
                cfg.n_layers
            ),
        ));
    }
    let n_req = reqs.len();
    let mut rows = Vec::new();
    let mut first_row = Vec::with_capacity(n_req);
    for (i, req) in reqs.iter().enumerate() {
        first_row.push(rows.len());
        rows.extend(request_rows(model, req, templates, i)?);
    }
    let n_rows = rows.len();
    let row_range = |i: usize| first_row[i]..first_row.get(i + 1).copied().unwrap_or(n_rows);

    // One clean pass over every row gives everything that does not depend on
    // δ: the keys, the MLP output v at the subject, the residual stream
    // leaving the edited layer, the KV cache of every later layer, and the
    // original next-token distribution of the KL prompts.
    let seqs: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
    let batch = model.batch(&seqs)?;
    let mut hooks = Hooks::new();
    let lookups: Vec<(usize, usize)> = rows
        .iter()
        .enumerate()
        .map(|(r, row)| (r, row.lookup))
        .collect();
    let keys_id = hooks.capture(Site::MlpKey(layer), At::Points(lookups));
    let out_id = hooks.capture(
        Site::MlpOut(layer),
        At::Points(first_row.iter().map(|&r| (r, rows[r].lookup)).collect()),
    );
    let resid_id = hooks.capture(Site::ResidPost(layer), At::All);
    let kl_points: Vec<(usize, usize)> = (0..n_req)
        .map(|i| {
            let r = row_range(i).end - 1;
            (r, rows[r].ids.len() - 1)
        })
        .collect();
    let (clean, cache) = model.forward_with_cache(&batch, &LogitsAt::Points(kl_points), &hooks)?;
    let row_keys = clean.capture(keys_id).to_dtype(DType::F32)?;
    let value_norms: Vec<f32> = clean
        .capture(out_id)
        .to_dtype(DType::F32)?
        .sqr()?
        .sum(1)?
        .sqrt()?
        .to_vec1()?;
    let kl_init = candle_nn::ops::log_softmax(
        &clean
            .logits
            .clone()
            .expect("logits requested")
            .to_dtype(DType::F32)?,
        D::Minus1,
    )?;

    // Per request: k* over its rewrite rows, and where the update reaches.
    let bare = templates.iter().position(|t| t == "{}");
    let mut keys = Vec::with_capacity(n_req);
    let mut directions = Vec::with_capacity(n_req);
    let mut row_scales = vec![1f32; rows.len()];
    for i in 0..n_req {
        let range = row_range(i);
        let request_keys = row_keys.narrow(0, range.start, range.len())?;
        let key = request_keys.narrow(0, 0, range.len() - 1)?.mean(0)?;
        if let Some(solver) = solver {
            let (a, reach) = update_direction(solver, &key, &request_keys, bare)?;
            row_scales[range].copy_from_slice(&reach);
            directions.push(Some(a));
        } else {
            directions.push(None);
        }
        keys.push(key);
    }

    // Only the columns from the subject's last token on depend on δ: keep
    // each row's prefix in the cache and run just the suffix from layer + 1.
    let resid = clean.capture(resid_id);
    let suffix_lens: Vec<usize> = rows.iter().map(|r| r.ids.len() - r.lookup).collect();
    let width = *suffix_lens.iter().max().expect("rows");
    let suffix_rows: Vec<Tensor> = rows
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let part = resid.get(r)?.narrow(0, row.lookup, suffix_lens[r])?;
            part.pad_with_zeros(0, 0, width - suffix_lens[r])
        })
        .collect::<candle_core::Result<_>>()?;
    let suffix = Tensor::stack(&suffix_rows, 0)?.to_dtype(DType::F32)?;
    let splits: Vec<usize> = rows.iter().map(|r| r.lookup).collect();
    let prefix = if splits.iter().any(|&s| s > 0) {
        Some(cache.prefixes(&splits, layer + 1..cfg.n_layers)?)
    } else {
        None
    };
    drop(cache);
    drop(clean);
    let problem = Problem {
        model,
        layer,
        rows,
        suffix,
        suffix_lens,
        row_scales,
        prefix,
        kl_init,
        kl_factor: hp.kl_factor,
    };
    let prepare_seconds = started.elapsed().as_secs_f64();

    // The rows are split into shards that run forward and backward as
    // parallel tasks: candle's CPU kernels use one core well, not two. The
    // tasks run in rayon's pool, where candle's matrix products also run
    // theirs, so the cores are shared rather than oversubscribed.
    let n_threads = rayon::current_num_threads().clamp(1, 4);
    let started = Instant::now();
    let delta = Var::zeros((n_req, cfg.d_model), DType::F32, model.device())?;
    let mut adams: Vec<Adam> = (0..n_req)
        .map(|_| Adam::new(cfg.d_model, hp.v_lr))
        .collect();
    let value_sq: Vec<f64> = value_norms
        .iter()
        .map(|&v| f64::from(v).powi(2).max(1e-12))
        .collect();
    let mut active = vec![true; n_req];
    let active_rows = |active: &[bool]| -> Vec<usize> {
        (0..problem.rows.len())
            .filter(|&r| active[problem.rows[r].request])
            .collect()
    };
    let mut shards = problem.shards(&active_rows(&active), n_threads)?;
    let mut losses = vec![Vec::with_capacity(hp.v_steps); n_req];
    let mut target_losses = vec![Vec::with_capacity(hp.v_steps); n_req];
    for step in 0..hp.v_steps {
        let want_grad = step + 1 < hp.v_steps;
        let results: Vec<Result<(Vec<f32>, Option<Tensor>)>> = {
            use rayon::prelude::*;
            shards
                .par_iter()
                .map(|shard| problem.step(shard, &delta, want_grad))
                .collect()
        };
        let mut delta_now: Vec<Vec<f32>> = delta.as_tensor().to_vec2()?;
        let mut loss = vec![0f64; n_req];
        // The target part of each loss (NLL or unlikelihood), for the stop rule.
        let mut target_loss = vec![0f64; n_req];
        let mut grad = vec![vec![0f32; cfg.d_model]; n_req];
        for (shard, result) in shards.iter().zip(results) {
            let (values, g) = result?;
            // A shard's points are its target points, then its KL points.
            let n_targets = shard.target_ids.dim(0)?;
            for (point, (&owner, v)) in shard.point_owners.iter().zip(values).enumerate() {
                loss[owner] += f64::from(v);
                if point < n_targets {
                    target_loss[owner] += f64::from(v);
                }
            }
            if let Some(g) = g {
                for (sum, part) in grad.iter_mut().zip(g.to_vec2::<f32>()?) {
                    sum.iter_mut().zip(part).for_each(|(a, b)| *a += b);
                }
            }
        }
        let mut changed = false;
        for i in 0..n_req {
            if !active[i] {
                continue;
            }
            let delta_sq: f64 = delta_now[i].iter().map(|&x| f64::from(x).powi(2)).sum();
            let total = (loss[i] + hp.v_weight_decay * delta_sq / value_sq[i]) as f32;
            if !total.is_finite() {
                return Err(Error::NonFinite(format!(
                    "the v* optimisation loss of request {i} ({:?}) at step {step} ({total})",
                    reqs[i].subject
                )));
            }
            losses[i].push(total);
            target_losses[i].push(target_loss[i] as f32);
            let stop_value = match hp.early_stop_on {
                StopOn::TotalLoss => f64::from(total),
                StopOn::TargetLoss => target_loss[i],
            };
            if reqs[i].kind != EditKind::Erase && stop_value < hp.early_stop_loss {
                active[i] = false;
                changed = true;
                continue;
            }
            if !want_grad {
                continue;
            }
            // d(decay)/dδ = 2 · weight_decay · δ / ‖v‖².
            let decay_scale = (2.0 * hp.v_weight_decay / value_sq[i]) as f32;
            for (g, d) in grad[i].iter_mut().zip(&delta_now[i]) {
                *g += decay_scale * d;
            }
            let mut next = adams[i].step(&delta_now[i], &grad[i]);
            // Keep ‖δ‖ within clamp_norm_factor × ‖v‖.
            let max_norm = hp.clamp_norm_factor * f64::from(value_norms[i]);
            let norm = next
                .iter()
                .map(|&x| f64::from(x).powi(2))
                .sum::<f64>()
                .sqrt();
            if norm > max_norm {
                let scale = (max_norm / norm) as f32;
                next.iter_mut().for_each(|x| *x *= scale);
            }
            delta_now[i] = next;
        }
        if !want_grad || !active.contains(&true) {
            break;
        }
        let flat: Vec<f32> = delta_now.concat();
        delta.set(&Tensor::from_vec(
            flat,
            (n_req, cfg.d_model),
            model.device(),
        )?)?;
        if changed {
            shards = problem.shards(&active_rows(&active), n_threads)?;
        }
    }
    let optimise_seconds = started.elapsed().as_secs_f64();
    let deltas = delta.as_tensor().detach();
    if deltas
        .to_vec2::<f32>()?
        .iter()
        .flatten()
        .any(|x| !x.is_finite())
    {
        return Err(Error::NonFinite("the optimised δ".into()));
    }
    let share = 1.0 / n_req as f64;
    let mut out = Vec::with_capacity(n_req);
    for (i, (key, direction)) in keys.into_iter().zip(directions).enumerate() {
        let range = row_range(i);
        out.push(KeyValue {
            key,
            delta: deltas.get(i)?,
            losses: std::mem::take(&mut losses[i]),
            target_losses: std::mem::take(&mut target_losses[i]),
            prepare_seconds: prepare_seconds * share,
            optimise_seconds: optimise_seconds * share,
            row_scales: problem.row_scales[range].to_vec(),
            direction,
        });
    }
    Ok(out)
}

/// The direction `a` of the rank-one update `ΔW = δ aᵀ`, and how strongly
/// it reaches each row key (`aᵀk_r`).
///
/// `a` is the least-change direction (in the metric of `C`) with `aᵀk* = 1`
/// and, when a bare prompt is among the rows, also `aᵀk_bare = 1`: the
/// solve uses the same keys on both sides (r-ROME), and the prompt as the
/// user wrote it gets the whole of `δ`. With `K = [k*, k_bare]`,
/// `a = C⁻¹K (KᵀC⁻¹K)⁻¹ 1`; with `k*` alone it is ROME's `C⁻¹k* / k*ᵀC⁻¹k*`.
fn update_direction(
    solver: &SpdSolver,
    key: &Tensor,
    row_keys: &Tensor,
    bare_row: Option<usize>,
) -> Result<(Vec<f64>, Vec<f32>)> {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let k: Vec<f64> = key.to_dtype(DType::F64)?.to_vec1()?;
    let rows: Vec<Vec<f64>> = row_keys.to_dtype(DType::F64)?.to_vec2()?;
    let u = solver.solve(&k, 1)?;
    let uk = dot(&u, &k);
    if !(uk.is_finite() && uk.abs() > 1e-30) {
        return Err(Error::NonFinite(format!(
            "uᵀk* = {uk} in the rank-one solve"
        )));
    }
    let mut direction: Vec<f64> = u.iter().map(|x| x / uk).collect();
    if let Some(b) = bare_row {
        let kb = &rows[b];
        let ub = solver.solve(kb, 1)?;
        // G = KᵀC⁻¹K for K = [k*, k_bare]; a = [u, ub] G⁻¹ [1, 1]ᵀ.
        let (g00, g01, g11) = (uk, dot(&u, kb), dot(&ub, kb));
        let det = g00 * g11 - g01 * g01;
        // Skip the second constraint when the two keys are (nearly)
        // parallel in C's metric: the first already covers the bare prompt.
        if det.is_finite() && det > 1e-6 * g00 * g11 {
            let (c0, c1) = ((g11 - g01) / det, (g00 - g01) / det);
            direction = u.iter().zip(&ub).map(|(a, b)| c0 * a + c1 * b).collect();
        }
    }
    let reach = rows.iter().map(|r| dot(&direction, r) as f32).collect();
    Ok((direction, reach))
}

/// Adam (Kingma & Ba, 2015) with PyTorch's default moments, on a plain vector.
struct Adam {
    lr: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Adam {
    fn new(n: usize, lr: f64) -> Self {
        Self {
            lr,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    fn step(&mut self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        const EPS: f64 = 1e-8;
        self.t += 1;
        let (c1, c2) = (1.0 - B1.powi(self.t), 1.0 - B2.powi(self.t));
        x.iter()
            .zip(grad)
            .enumerate()
            .map(|(i, (&x, &g))| {
                let g = f64::from(g);
                self.m[i] = B1 * self.m[i] + (1.0 - B1) * g;
                self.v[i] = B2 * self.v[i] + (1.0 - B2) * g * g;
                let step = self.lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + EPS);
                (f64::from(x) - step) as f32
            })
            .collect()
    }
}
