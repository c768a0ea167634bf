//! Editing facts: requests, ROME, deltas, the journal and undo.
//!
//! ```no_run
//! use kedit::edit::{EditRequest, Editor};
//! use kedit::stats::Corpus;
//!
//! let model = kedit::Model::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let mut editor = Editor::new(model).with_corpus(Corpus::File("wiki.txt".into()));
//! let req = EditRequest::modify("{} is located in the city of", "The Eiffel Tower", "Paris", "Rome");
//! let edit = editor.apply(&req)?;
//! println!("P(new): {:?} → {:?}", edit.report.before.prompt.new, edit.report.after.prompt.new);
//! editor.undo(edit.id)?;
//! # Ok::<(), kedit::Error>(())
//! ```

pub mod alphaedit;
mod delta;
mod hparams;
pub mod memit;
mod request;
pub mod rome;
mod templates;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

pub use alphaedit::{AlphaEditHParams, NullSpace, NullSpaceThreshold};
pub use delta::{Delta, DeltaInfo, LayerDelta};
pub use hparams::{RomeHParams, StopOn};
pub use memit::{BatchApplied, BatchMethod, BatchReport, BatchTimings, LayerReport, MemitHParams};
pub use request::{with_leading_space, EditKind, EditRequest};
pub use templates::{context_templates, group_weights};

use crate::linalg::SpdSolver;
use crate::model::Model;
use crate::stats::{second_moment, Corpus};
use crate::{Error, Result};

/// Identifies an applied edit in the editor's journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EditId(pub u64);

/// Probabilities of the new and the true target after one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetPair {
    /// The prompt (formatted).
    pub prompt: String,
    /// P(target_new) (teacher-forced, mean-token; `None` for erase).
    pub new: Option<f32>,
    /// P(target_true) (`None` for insert).
    pub true_: Option<f32>,
    /// Rank of the first token of `target_true` among next tokens (0 = top-1).
    pub true_rank: Option<usize>,
}

/// Target probabilities on the prompt, its paraphrases and its neighbours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probes {
    /// The edit prompt itself.
    pub prompt: TargetPair,
    /// Paraphrases of the request.
    pub paraphrases: Vec<TargetPair>,
    /// Neighbour prompts (other subjects).
    pub neighbours: Vec<TargetPair>,
}

/// What an edit did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditReport {
    /// Before the update.
    pub before: Probes,
    /// After the update.
    pub after: Probes,
    /// Frobenius norm of ΔW.
    pub delta_norm: f32,
    /// `‖W' k* − v*‖ / ‖v*‖` after the update.
    pub rewrite_error: f32,
    /// Loss at each step of the v* optimisation (target + KL + decay).
    pub losses: Vec<f32>,
    /// The target part of `losses` at each step: the mean NLL of the new
    /// target; for an erase, the unlikelihood of the true target plus the
    /// NLL of the neutral target when one is given. Empty in reports
    /// written before it was recorded.
    #[serde(default)]
    pub target_losses: Vec<f32>,
    /// For erase: the true target left the top 10 and its probability fell ≥ 10×.
    pub erased: Option<bool>,
    /// Seconds: statistics and templates (first use of a layer), shared
    /// forward pass, optimisation, solve, evaluation.
    pub seconds: Timings,
}

/// Where the time of an edit went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Loading / computing statistics and templates (0 when cached in memory).
    pub setup: f64,
    /// The clean pass that yields k* and the caches.
    pub key: f64,
    /// The δ optimisation.
    pub value: f64,
    /// `u = C⁻¹ k*` and the update.
    pub solve: f64,
    /// Probabilities before and after.
    pub report: f64,
}

/// An applied edit.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Its id in the journal (for [`Editor::undo`]).
    pub id: EditId,
    /// The update.
    pub delta: Delta,
    /// What it did.
    pub report: EditReport,
}

/// Context templates with the (specification, seed) they were sampled with.
type CachedTemplates = Vec<(Vec<(usize, usize)>, u64, Vec<String>)>;

/// Applies, journals and undoes edits of one model.
pub struct Editor {
    model: Model,
    hparams: RomeHParams,
    corpus: Corpus,
    /// Factorised statistics per layer, with the options they were made with.
    solvers: HashMap<usize, (crate::stats::StatsOptions, Arc<SpdSolver>)>,
    /// Context templates by the (specification, seed) they were sampled with.
    templates: CachedTemplates,
    journal: Vec<(EditId, Delta)>,
    originals: HashMap<usize, Tensor>,
    next_id: u64,
    /// MEMIT's window and λ.
    memit: MemitHParams,
    /// AlphaEdit's window, threshold and ridge.
    alphaedit: AlphaEditHParams,
    /// Null spaces of the key statistics per layer (AlphaEdit).
    null_spaces: alphaedit::NullSpaceCache,
}

impl std::fmt::Debug for Editor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Editor")
            .field("layer", &self.hparams.layer)
            .field("corpus", &self.corpus)
            .field("edits", &self.journal.len())
            .finish()
    }
}

impl Editor {
    /// An editor with the model family's default hyper-parameters and a
    /// corpus sampled from the model itself (see [`Editor::with_corpus`]).
    pub fn new(model: Model) -> Self {
        let hparams = RomeHParams::for_model(model.config());
        let memit = MemitHParams::for_model(model.config());
        let alphaedit = AlphaEditHParams::for_model(model.config());
        Self {
            model,
            hparams,
            corpus: Corpus::self_sampled(),
            solvers: HashMap::new(),
            templates: Vec::new(),
            journal: Vec::new(),
            originals: HashMap::new(),
            next_id: 0,
            memit,
            alphaedit,
            null_spaces: HashMap::new(),
        }
    }

    /// Uses these hyper-parameters.
    pub fn with_hparams(mut self, hparams: RomeHParams) -> Self {
        if hparams.stats != self.hparams.stats {
            self.solvers.clear();
        }
        self.hparams = hparams;
        self
    }

    /// Uses this corpus for the key statistics.
    pub fn with_corpus(mut self, corpus: Corpus) -> Self {
        if corpus != self.corpus {
            self.solvers.clear();
        }
        self.corpus = corpus;
        self
    }

    /// The hyper-parameters.
    pub fn hparams(&self) -> &RomeHParams {
        &self.hparams
    }

    /// Mutable hyper-parameters (the layer can change between edits).
    pub fn hparams_mut(&mut self) -> &mut RomeHParams {
        &mut self.hparams
    }

    /// The model as currently edited.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Gives the (edited) model back.
    pub fn into_model(self) -> Model {
        self.model
    }

    /// The applied edits, oldest first.
    pub fn edits(&self) -> impl Iterator<Item = (EditId, &Delta)> {
        self.journal.iter().map(|(id, d)| (*id, d))
    }

    /// The context templates of ROME's hyper-parameters (sampled and
    /// cached on first use).
    pub fn context_templates(&mut self) -> Result<&[String]> {
        let spec = self.hparams.context_templates.clone();
        self.templates_for(&spec)
    }

    /// Context templates of a specification (see [`context_templates`]),
    /// with the seed of ROME's hyper-parameters, cached in memory.
    pub fn templates_for(&mut self, spec: &[(usize, usize)]) -> Result<&[String]> {
        let seed = self.hparams.templates_seed;
        let found = self
            .templates
            .iter()
            .position(|(s, k, _)| s.as_slice() == spec && *k == seed);
        let i = match found {
            Some(i) => i,
            None => {
                let templates = context_templates(&self.model, spec, seed)?;
                self.templates.push((spec.to_vec(), seed, templates));
                self.templates.len() - 1
            }
        };
        Ok(&self.templates[i].2)
    }

    /// Runs `f` on the model as loaded: the layers edits touched get their
    /// original weights for the call and the edited ones back after it
    /// (cheap: tensors are shared, not copied). Key statistics belong to
    /// the base model, whose fingerprint keys their disk cache, however
    /// many edits were applied before they were first needed.
    pub(crate) fn on_base_model<T>(&mut self, f: impl FnOnce(&Model) -> Result<T>) -> Result<T> {
        let mut edited = Vec::with_capacity(self.originals.len());
        for (&layer, original) in &self.originals {
            let slot = &mut self.model.weights_mut().blocks[layer].mlp.w_out.weight;
            edited.push((layer, std::mem::replace(slot, original.clone())));
        }
        let out = f(&self.model);
        for (layer, w) in edited {
            self.model.weights_mut().blocks[layer].mlp.w_out.weight = w;
        }
        out
    }

    /// The factorised `C` of a layer (statistics from the cache or computed
    /// on the base model), kept in memory while the statistics options stay
    /// the same.
    pub fn solver(&mut self, layer: usize) -> Result<Arc<SpdSolver>> {
        if let Some((opts, s)) = self.solvers.get(&layer) {
            if *opts == self.hparams.stats {
                return Ok(s.clone());
            }
        }
        let (corpus, opts) = (self.corpus.clone(), self.hparams.stats.clone());
        let stats = self.on_base_model(|model| second_moment(model, layer, &corpus, &opts))?;
        let solver = Arc::new(SpdSolver::new(
            &stats.to_f64_vec()?,
            self.model.config().d_ff,
        )?);
        self.solvers
            .insert(layer, (self.hparams.stats.clone(), solver.clone()));
        Ok(solver)
    }

    /// Checks ROME's settings (the layer, the statistics options) without
    /// a request; returns the edited layer.
    pub fn check_rome_settings(&self) -> Result<Vec<usize>> {
        let layer = self.hparams.layer;
        let n_layers = self.model.config().n_layers;
        if layer >= n_layers {
            return Err(Error::invalid(
                "layer",
                format!("{layer} is out of range: the model has {n_layers} layers"),
            ));
        }
        self.hparams.validate()?;
        Ok(vec![layer])
    }

    /// Computes the ROME update for `req` without applying it.
    pub fn compute(&mut self, req: &EditRequest) -> Result<(Delta, rome::KeyValue, Timings)> {
        req.validate()?;
        self.hparams.validate()?;
        let layer = self.hparams.layer;
        let n_layers = self.model.config().n_layers;
        if layer >= n_layers {
            return Err(Error::invalid(
                "layer",
                format!("{layer} is out of range: the model has {n_layers} layers"),
            ));
        }
        // Requests that cannot be tokenised fail before any expensive work.
        self.model.subject_tokens(&req.prompt, &req.subject)?;
        self.model.target_ids(req.objective_target())?;

        let t = Instant::now();
        let solver = self.solver(layer)?;
        let templates = self.context_templates()?.to_vec();
        let mut timings = Timings {
            setup: t.elapsed().as_secs_f64(),
            ..Default::default()
        };
        let kv =
            rome::key_and_delta_for_update(&self.model, req, &templates, &self.hparams, &solver)?;
        timings.key = kv.prepare_seconds;
        timings.value = kv.optimise_seconds;

        let t = Instant::now();
        let direction = kv
            .direction
            .clone()
            .ok_or_else(|| Error::NonFinite("the update direction is missing".into()))?;
        let w = &self.model.weights().blocks[layer].mlp.w_out.weight;
        let device = w.device().clone();
        let key = kv.key.to_device(&device)?.to_dtype(w.dtype())?;
        let wk = w
            .matmul(&key.unsqueeze(1)?)?
            .squeeze(1)?
            .to_dtype(DType::F32)?;
        let delta = kv.delta.to_device(&device)?;
        // ΔW = δ aᵀ with aᵀk* = 1, so W' k* = W k* + δ = v*.
        let value = (&wk + &delta)?;
        let left = delta.unsqueeze(1)?;
        let right = Tensor::from_vec(
            direction.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
            (direction.len(), 1),
            &device,
        )?;
        timings.solve = t.elapsed().as_secs_f64();
        let delta = Delta {
            info: DeltaInfo {
                method: "rome".into(),
                model_fingerprint: self.model.fingerprint().to_string(),
                requests: vec![req.clone()],
                hparams: serde_json::to_value(&self.hparams).unwrap_or_default(),
                layers: vec![layer],
                kedit_version: env!("CARGO_PKG_VERSION").into(),
            },
            layers: vec![LayerDelta {
                layer,
                left,
                right,
                keys: kv.key.unsqueeze(1)?,
                values: value.unsqueeze(1)?,
            }],
        };
        Ok((delta, kv, timings))
    }

    /// Computes and applies the ROME update for `req`, reporting target
    /// probabilities before and after. On any error the weights are untouched.
    pub fn apply(&mut self, req: &EditRequest) -> Result<Applied> {
        let (delta, kv, mut timings) = self.compute(req)?;
        let t = Instant::now();
        let before = self.probes(req)?;
        timings.report = t.elapsed().as_secs_f64();
        let id = self.apply_delta(&delta)?;
        let t = Instant::now();
        // The caller gets no id on error, so the edit must not stay applied.
        let measured = self
            .probes(req)
            .and_then(|after| Ok((after, self.rewrite_error(&delta)?)));
        let (after, rewrite_error) = match measured {
            Ok(m) => m,
            Err(e) => {
                self.undo(id)?;
                return Err(e);
            }
        };
        timings.report += t.elapsed().as_secs_f64();
        let erased = (req.kind == EditKind::Erase).then(|| {
            let (b, a) = (
                before.prompt.true_.unwrap_or(0.0),
                after.prompt.true_.unwrap_or(1.0),
            );
            after.prompt.true_rank.is_some_and(|r| r >= 10) && a * 10.0 <= b
        });
        let report = EditReport {
            before,
            after,
            delta_norm: delta.norm()?,
            rewrite_error,
            losses: kv.losses,
            target_losses: kv.target_losses,
            erased,
            seconds: timings,
        };
        Ok(Applied { id, delta, report })
    }

    /// `max over layers of ‖W' k − v‖ / ‖v‖` for a delta's keys and values,
    /// with the current weights.
    pub fn rewrite_error(&self, delta: &Delta) -> Result<f32> {
        let mut worst = 0f32;
        for l in &delta.layers {
            let w = &self.model.weights().blocks[l.layer].mlp.w_out.weight;
            let k = l.keys.to_device(w.device())?.to_dtype(w.dtype())?;
            let got = w.matmul(&k)?.to_dtype(DType::F32)?;
            let want = l.values.to_device(w.device())?;
            let err = (got - &want)?
                .sqr()?
                .sum_all()?
                .sqrt()?
                .to_scalar::<f32>()?;
            let norm = want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            worst = worst.max(err / norm.max(f32::MIN_POSITIVE));
        }
        Ok(worst)
    }

    /// Target probabilities of a request on its prompt, paraphrases and
    /// neighbours, in batched forward passes.
    pub fn probes(&self, req: &EditRequest) -> Result<Probes> {
        let mut prompts = vec![req.formatted_prompt()];
        prompts.extend(req.paraphrases.iter().cloned());
        prompts.extend(req.neighbours.iter().cloned());
        let score = |target: &Option<String>| -> Result<Option<Vec<crate::model::TargetProb>>> {
            let Some(t) = target else { return Ok(None) };
            let pairs: Vec<(&str, &str)> =
                prompts.iter().map(|p| (p.as_str(), t.as_str())).collect();
            let mut out = Vec::with_capacity(pairs.len());
            for chunk in pairs.chunks(32) {
                out.extend(self.model.target_probs(chunk)?);
            }
            Ok(Some(out))
        };
        let new = score(&req.target_new)?;
        let old = score(&req.target_true)?;
        let mut pairs = prompts.iter().enumerate().map(|(i, p)| TargetPair {
            prompt: p.clone(),
            new: new.as_ref().map(|v| v[i].prob()),
            true_: old.as_ref().map(|v| v[i].prob()),
            true_rank: old.as_ref().map(|v| v[i].first_rank),
        });
        let prompt = pairs.next().expect("the prompt itself");
        let paraphrases: Vec<TargetPair> = pairs.by_ref().take(req.paraphrases.len()).collect();
        let neighbours: Vec<TargetPair> = pairs.collect();
        Ok(Probes {
            prompt,
            paraphrases,
            neighbours,
        })
    }

    /// Applies a delta (computed here or loaded from a file) and journals it.
    /// It must have been made for this base model.
    pub fn apply_delta(&mut self, delta: &Delta) -> Result<EditId> {
        if delta.info.model_fingerprint != self.model.fingerprint() {
            return Err(Error::invalid(
                "delta",
                format!(
                    "it was made for model {} but this model is {}",
                    delta.info.model_fingerprint,
                    self.model.fingerprint()
                ),
            ));
        }
        let cfg = self.model.config();
        let mut seen = std::collections::HashSet::new();
        for l in &delta.layers {
            if l.layer >= cfg.n_layers {
                return Err(Error::invalid(
                    "delta",
                    format!("layer {} is out of range", l.layer),
                ));
            }
            // Every layer's update is computed from the current weights
            // before any is swapped in, so a repeated layer would keep only
            // its last update while undo replays both.
            if !seen.insert(l.layer) {
                return Err(Error::invalid(
                    "delta",
                    format!("layer {} appears more than once", l.layer),
                ));
            }
            let (left, right) = (l.left.dims(), l.right.dims());
            let n_keys = l.keys.dims().get(1).copied().unwrap_or(0);
            let shapes_fit = left.len() == 2
                && right.len() == 2
                && left[1] == right[1]
                && l.keys.dims() == [cfg.d_ff, n_keys]
                && l.values.dims() == [cfg.d_model, n_keys];
            if !shapes_fit {
                return Err(Error::invalid(
                    "delta",
                    format!(
                        "layer {}: factors {:?} × {:?}, keys {:?}, values {:?} are not \
                         [d_model, r] × [d_ff, r], [d_ff, n], [d_model, n]",
                        l.layer,
                        l.left.dims(),
                        l.right.dims(),
                        l.keys.dims(),
                        l.values.dims()
                    ),
                ));
            }
            if l.left.dim(0)? != cfg.d_model || l.right.dim(0)? != cfg.d_ff {
                return Err(Error::invalid(
                    "delta",
                    format!(
                        "layer {} factors {:?} × {:?} do not fit d_model {} / d_ff {}",
                        l.layer,
                        l.left.dims(),
                        l.right.dims(),
                        cfg.d_model,
                        cfg.d_ff
                    ),
                ));
            }
        }
        // Compute every new matrix first, then swap them in: nothing is half-applied.
        let mut updated = Vec::with_capacity(delta.layers.len());
        for l in &delta.layers {
            let w = &self.model.weights().blocks[l.layer].mlp.w_out.weight;
            updated.push((l.layer, add_low_rank(w, l)?));
        }
        for (layer, w) in updated {
            let slot = &mut self.model.weights_mut().blocks[layer].mlp.w_out.weight;
            self.originals.entry(layer).or_insert_with(|| slot.clone());
            *slot = w;
        }
        let id = EditId(self.next_id);
        self.next_id += 1;
        self.journal.push((id, delta.clone()));
        Ok(id)
    }

    /// Removes one edit. The layers it touched are rebuilt from the original
    /// weights plus the remaining edits in their order, so undoing every
    /// edit, in any order, restores the original weights bit for bit.
    pub fn undo(&mut self, id: EditId) -> Result<Delta> {
        let pos = self
            .journal
            .iter()
            .position(|(i, _)| *i == id)
            .ok_or_else(|| Error::invalid("edit id", format!("{} is not an applied edit", id.0)))?;
        let touched: Vec<usize> = self.journal[pos].1.layers.iter().map(|l| l.layer).collect();
        let mut rebuilt = Vec::new();
        for &layer in &touched {
            let mut w = self.originals[&layer].clone();
            for (i, (_, d)) in self.journal.iter().enumerate() {
                if i == pos {
                    continue;
                }
                for l in d.layers.iter().filter(|l| l.layer == layer) {
                    w = add_low_rank(&w, l)?;
                }
            }
            rebuilt.push((layer, w));
        }
        for (layer, w) in rebuilt {
            self.model.weights_mut().blocks[layer].mlp.w_out.weight = w;
        }
        Ok(self.journal.remove(pos).1)
    }

    /// Undoes every edit (newest first).
    pub fn undo_all(&mut self) -> Result<()> {
        while let Some((id, _)) = self.journal.last().map(|(i, d)| (*i, d.clone())) {
            self.undo(id)?;
        }
        Ok(())
    }
}

/// `W + left · rightᵀ` in W's dtype and device.
fn add_low_rank(w: &Tensor, l: &LayerDelta) -> Result<Tensor> {
    let dw = l
        .left
        .to_device(w.device())?
        .matmul(&l.right.to_device(w.device())?.t()?)?;
    Ok((w + dw.to_dtype(w.dtype())?)?)
}
