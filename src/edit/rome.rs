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
//! models now and then.

use std::time::Instant;

use candle_core::{DType, Tensor, Var, D};

use super::hparams::RomeHParams;
use super::request::{EditKind, EditRequest};
use crate::model::{At, Hooks, LogitsAt, Model, Site};
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
    /// Seconds spent on the shared forward pass (keys, caches).
    pub prepare_seconds: f64,
    /// Seconds spent in the optimisation steps.
    pub optimise_seconds: f64,
}

/// One prompt of the optimisation batch.
struct Row {
    ids: Vec<u32>,
    /// Position of the subject's last token.
    lookup: usize,
    /// Positions whose logits predict a target token, and those tokens.
    targets: Vec<(usize, u32)>,
}

/// Builds the rows: one per context template (prompt + target without its
/// last token), plus the KL row `"{subject} is a"` last.
fn rows(
    model: &Model,
    req: &EditRequest,
    templates: &[String],
    target: &[u32],
) -> Result<Vec<Row>> {
    let mut rows = Vec::with_capacity(templates.len() + 1);
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
        });
    }
    let (tokens, span) = model.subject_tokens("{} is a", &req.subject)?;
    rows.push(Row {
        lookup: span.end - 1,
        targets: Vec::new(),
        ids: tokens.iter().map(|t| t.id).collect(),
    });
    Ok(rows)
}

/// Computes `k*` and `δ` for `req` at `hp.layer`.
pub fn key_and_delta(
    model: &Model,
    req: &EditRequest,
    templates: &[String],
    hp: &RomeHParams,
) -> Result<KeyValue> {
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
    let target = model.target_ids(req.objective_target())?;
    let rows = rows(model, req, templates, &target)?;
    let n_rewrite = rows.len() - 1;
    let kl_row = n_rewrite;
    let kl_pos = rows[kl_row].ids.len() - 1;

    // One clean pass over every row gives everything that does not depend on
    // δ: the keys, the MLP output v at the subject, the residual stream
    // leaving the edited layer, the KV cache of every later layer, and the
    // original next-token distribution of the KL prompt.
    let seqs: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
    let batch = model.batch(&seqs)?;
    let mut hooks = Hooks::new();
    let lookups: Vec<(usize, usize)> = rows
        .iter()
        .enumerate()
        .map(|(r, row)| (r, row.lookup))
        .collect();
    let keys_id = hooks.capture(
        Site::MlpKey(layer),
        At::Points(lookups[..n_rewrite].to_vec()),
    );
    let out_id = hooks.capture(Site::MlpOut(layer), At::point(0, rows[0].lookup));
    let resid_id = hooks.capture(Site::ResidPost(layer), At::All);
    let (clean, cache) =
        model.forward_with_cache(&batch, &LogitsAt::Points(vec![(kl_row, kl_pos)]), &hooks)?;
    let key = clean.capture(keys_id).to_dtype(DType::F32)?.mean(0)?;
    let value_norm = clean
        .capture(out_id)
        .to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()?;
    let kl_init = candle_nn::ops::log_softmax(
        &clean
            .logits
            .clone()
            .expect("logits requested")
            .to_dtype(DType::F32)?,
        D::Minus1,
    )?
    .squeeze(0)?;
    let resid = clean.capture(resid_id);

    // Only the columns from the subject's last token on depend on δ: keep
    // each row's prefix in the cache and run just the suffix from layer + 1.
    let splits: Vec<usize> = rows.iter().map(|r| r.lookup).collect();
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
    let prefix = if splits.iter().any(|&s| s > 0) {
        Some(cache.prefixes(&splits, layer + 1..cfg.n_layers)?)
    } else {
        None
    };
    drop(cache);
    // δ enters at suffix column 0 of every row (the subject's last token).
    let mut first_col = vec![0f32; width];
    first_col[0] = 1.0;
    let first_col = Tensor::from_vec(first_col, (1, width, 1), model.device())?;
    let mut points = Vec::new();
    let mut target_ids = Vec::new();
    for (r, row) in rows[..n_rewrite].iter().enumerate() {
        for &(pos, tok) in &row.targets {
            points.push((r, pos - row.lookup));
            target_ids.push(tok);
        }
    }
    let n_target_points = points.len();
    points.push((kl_row, kl_pos - rows[kl_row].lookup));
    let prepare_seconds = started.elapsed().as_secs_f64();

    // The rows are split into shards that run forward and backward on
    // separate threads: candle's CPU kernels use one core well, not two.
    let n_shards = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(rows.len());
    let shards = shard_rows(&rows, n_shards)
        .into_iter()
        .map(|range| -> Result<Shard> {
            let (start, len) = (range.start, range.len());
            let mut pts = Vec::new();
            let mut ids = Vec::new();
            for (i, &(r, c)) in points[..n_target_points].iter().enumerate() {
                if range.contains(&r) {
                    pts.push((r - start, c));
                    ids.push(target_ids[i]);
                }
            }
            let n_targets = pts.len();
            let kl = range.contains(&kl_row);
            if kl {
                pts.push((kl_row - start, points[n_target_points].1));
            }
            Ok(Shard {
                suffix: suffix.narrow(0, start, len)?,
                lens: suffix_lens[range.clone()].to_vec(),
                cache: prefix
                    .as_ref()
                    .map(|c| c.select_rows(&range.clone().collect::<Vec<_>>()))
                    .transpose()?,
                target_ids: Tensor::from_vec(ids, (n_targets, 1), model.device())?,
                points: pts,
                kl,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let started = Instant::now();
    let delta = Var::zeros(cfg.d_model, DType::F32, model.device())?;
    let mut adam = Adam::new(cfg.d_model, hp.v_lr);
    let max_norm = hp.clamp_norm_factor * f64::from(value_norm);
    let value_sq = f64::from(value_norm).powi(2).max(1e-12);
    let ctx = StepContext {
        model,
        layer,
        first_col: &first_col,
        kl_init: &kl_init,
        kind: req.kind,
        n_target_points,
        kl_factor: hp.kl_factor,
    };
    let mut losses = Vec::with_capacity(hp.v_steps);
    for step in 0..hp.v_steps {
        let want_grad = step + 1 < hp.v_steps;
        let results: Vec<Result<(f32, Option<Tensor>)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .iter()
                .map(|shard| {
                    let ctx = &ctx;
                    let delta = &delta;
                    scope.spawn(move || ctx.shard_step(shard, delta, want_grad))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::NonFinite("a v* worker thread panicked".into()))
                    })
                })
                .collect()
        });
        let delta_now: Vec<f32> = delta.as_tensor().to_vec1()?;
        let delta_sq: f64 = delta_now.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let mut loss_value = (hp.v_weight_decay * delta_sq / value_sq) as f32;
        let mut grad = vec![0f32; cfg.d_model];
        for r in results {
            let (part, g) = r?;
            loss_value += part;
            if let Some(g) = g {
                for (a, b) in grad.iter_mut().zip(g.to_vec1::<f32>()?) {
                    *a += b;
                }
            }
        }
        if !loss_value.is_finite() {
            return Err(Error::NonFinite(format!(
                "the v* optimisation loss at step {step} ({loss_value})"
            )));
        }
        losses.push(loss_value);
        if req.kind != EditKind::Erase && f64::from(loss_value) < hp.early_stop_loss {
            break;
        }
        if !want_grad {
            break;
        }
        // d(decay)/dδ = 2 · weight_decay · δ / ‖v‖².
        let decay_scale = (2.0 * hp.v_weight_decay / value_sq) as f32;
        for (g, d) in grad.iter_mut().zip(&delta_now) {
            *g += decay_scale * d;
        }
        let mut next = adam.step(&delta_now, &grad);
        // Keep ‖δ‖ within clamp_norm_factor × ‖v‖.
        let norm = next
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        if norm > max_norm {
            let scale = (max_norm / norm) as f32;
            next.iter_mut().for_each(|x| *x *= scale);
        }
        delta.set(&Tensor::from_vec(next, cfg.d_model, model.device())?)?;
    }
    let delta_value = delta.as_tensor().detach();
    if delta_value.to_vec1::<f32>()?.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite("the optimised δ".into()));
    }
    Ok(KeyValue {
        key,
        delta: delta_value,
        losses,
        prepare_seconds,
        optimise_seconds: started.elapsed().as_secs_f64(),
    })
}

/// A group of rows that one thread runs.
struct Shard {
    suffix: Tensor,
    lens: Vec<usize>,
    cache: Option<crate::model::KvCache>,
    points: Vec<(usize, usize)>,
    target_ids: Tensor,
    kl: bool,
}

/// What every shard's step shares.
struct StepContext<'a> {
    model: &'a Model,
    layer: usize,
    first_col: &'a Tensor,
    kl_init: &'a Tensor,
    kind: EditKind,
    n_target_points: usize,
    kl_factor: f64,
}

impl StepContext<'_> {
    /// This shard's part of the loss (objective over all target points,
    /// plus the KL term if it holds the KL row) and its gradient for δ.
    fn shard_step(
        &self,
        shard: &Shard,
        delta: &Var,
        want_grad: bool,
    ) -> Result<(f32, Option<Tensor>)> {
        let d_model = self.model.config().d_model;
        let width = shard.suffix.dim(1)?;
        let shift = self
            .first_col
            .narrow(1, 0, width)?
            .broadcast_mul(&delta.as_tensor().reshape((1, 1, d_model))?)?;
        let x = shard
            .suffix
            .broadcast_add(&shift)?
            .to_dtype(self.model.dtype())?;
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
        let scale = -1.0 / self.n_target_points as f64;
        let mut loss = Tensor::zeros((), DType::F32, logp.device())?;
        if n_targets > 0 {
            let target_logp = logp
                .narrow(0, 0, n_targets)?
                .gather(&shard.target_ids, 1)?
                .squeeze(1)?;
            loss = match self.kind {
                // Mean over prompts of the mean NLL of the target tokens.
                EditKind::Modify | EditKind::Insert => (target_logp.sum_all()? * scale)?,
                // Unlikelihood: push every target token's probability to zero.
                EditKind::Erase => {
                    let keep = target_logp
                        .exp()?
                        .affine(-1.0, 1.0)?
                        .clamp(1e-6f32, 1.0f32)?;
                    (keep.log()?.sum_all()? * scale)?
                }
            };
        }
        if shard.kl {
            let kl_logp = logp.get(n_targets)?;
            let kl = (kl_logp.exp()? * (&kl_logp - self.kl_init)?)?.sum_all()?;
            loss = (loss + (kl * self.kl_factor)?)?;
        }
        let value = loss.to_scalar::<f32>()?;
        if !want_grad || !value.is_finite() {
            return Ok((value, None));
        }
        let grads = loss.backward()?;
        let grad = match grads.get(delta.as_tensor()) {
            Some(g) => g.clone(),
            None => Tensor::zeros(d_model, DType::F32, delta.device())?,
        };
        Ok((value, Some(grad)))
    }
}

/// Contiguous groups of rows with about equal numbers of suffix tokens.
fn shard_rows(rows: &[Row], n: usize) -> Vec<std::ops::Range<usize>> {
    let total: usize = rows.iter().map(|r| r.ids.len() - r.lookup).sum();
    let per = total.div_ceil(n.max(1));
    let mut out = Vec::new();
    let (mut start, mut acc) = (0, 0);
    for (i, r) in rows.iter().enumerate() {
        acc += r.ids.len() - r.lookup;
        if acc >= per && out.len() + 1 < n {
            out.push(start..i + 1);
            start = i + 1;
            acc = 0;
        }
    }
    if start < rows.len() {
        out.push(start..rows.len());
    }
    out
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
