//! Measuring a model on cases: batched teacher-forced scoring, batched
//! greedy generation, and the per-case metrics built from them.

use std::collections::HashMap;

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::data::Case;
use super::metrics::{self, PairProb};
use crate::model::decoder::log_softmax;
use crate::model::{Hooks, LogitsAt, Model};
use crate::{Error, Result};

/// Rows per forward pass when scoring (keeps memory and padding bounded).
pub const DEFAULT_CHUNK: usize = 64;

/// A target scored after a prompt under teacher forcing.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Mean negative log-likelihood per target token.
    pub mean_nll: f64,
    /// For each target token: is it the model's most likely next token?
    pub hits: Vec<bool>,
    /// The model's most likely next token at each target position.
    pub top1: Vec<u32>,
}

impl Scored {
    /// `exp(−mean NLL)`, the mean-token probability.
    pub fn prob(&self) -> f64 {
        (-self.mean_nll).exp()
    }
}

/// Scores `(prompt, target)` pairs: the target (give it its leading space)
/// is appended to the prompt's tokens as is, exactly as
/// [`Model::target_probs`] does, with logits only at the target positions.
///
/// Targets after the same prompt share a forward pass where they can: the
/// pass over `prompt + c` gives, at each position `p − 1 + i`, the next-token
/// distribution after `prompt + c[..i]`, which scores every target `t` with
/// `t[..len − 1]` a prefix of `c`. So single-token targets of a prompt (most
/// CounterFact answers) cost no extra row, and a prompt with a one-token
/// and a two-token target runs once instead of twice. Rows are sorted by
/// length and run in forward passes of at most `chunk` rows.
pub fn score(model: &Model, pairs: &[(&str, &str)], chunk: usize) -> Result<Vec<Scored>> {
    let chunk = chunk.max(1);
    // Each pair's tokens, then the distinct prompts' token ids.
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    let mut prompt_index: HashMap<&str, usize> = HashMap::new();
    let mut tokenised = Vec::with_capacity(pairs.len());
    for &(prompt, target) in pairs {
        let p = match prompt_index.get(prompt) {
            Some(&p) => p,
            None => {
                prompts.push(model.prompt_ids(prompt)?);
                prompt_index.insert(prompt, prompts.len() - 1);
                prompts.len() - 1
            }
        };
        tokenised.push((p, model.target_ids(target)?));
    }
    let (rows, served_by) = plan_rows(&tokenised);
    let mut pairs_of_row: Vec<Vec<usize>> = vec![Vec::new(); rows.len()];
    for (i, &r) in served_by.iter().enumerate() {
        pairs_of_row[r].push(i);
    }
    let row_len = |r: usize| prompts[rows[r].0].len() + rows[r].1.len();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&r| row_len(r));
    let mut out: Vec<Option<Scored>> = vec![None; pairs.len()];
    for group in order.chunks(chunk) {
        let mut seqs = Vec::with_capacity(group.len());
        let mut points = Vec::new();
        let mut wanted = Vec::new();
        for (b, &r) in group.iter().enumerate() {
            let (p, continuation) = &rows[r];
            let mut ids = prompts[*p].clone();
            let start = ids.len() - 1;
            ids.extend(continuation);
            seqs.push(ids);
            // Logits at position j predict token j + 1.
            for &i in &pairs_of_row[r] {
                let target = &tokenised[i].1;
                points.extend((start..start + target.len()).map(|pos| (b, pos)));
                wanted.extend(target.iter().copied());
            }
        }
        let batch = model.batch(&seqs)?;
        let fwd = model.forward(&batch, &LogitsAt::Points(points), &Hooks::new())?;
        let logits = fwd
            .logits
            .ok_or_else(|| Error::invalid("scoring", "the forward pass returned no logits"))?
            .to_dtype(DType::F32)?;
        let idx = Tensor::from_vec(wanted, (logits.dim(0)?, 1), logits.device())?;
        let lp: Vec<f32> = log_softmax(&logits)?
            .gather(&idx, 1)?
            .squeeze(1)?
            .to_vec1()?;
        let top: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let mut at = 0;
        for &r in group {
            for &i in &pairs_of_row[r] {
                let target = &tokenised[i].1;
                let lp = &lp[at..at + target.len()];
                let top1 = top[at..at + target.len()].to_vec();
                at += target.len();
                let sum: f64 = lp.iter().map(|&x| f64::from(x)).sum();
                out[i] = Some(Scored {
                    mean_nll: -sum / target.len() as f64,
                    hits: top1.iter().zip(target).map(|(a, b)| a == b).collect(),
                    top1,
                });
            }
        }
    }
    out.into_iter()
        .map(|s| s.ok_or_else(|| Error::invalid("scoring", "a pair was not scored")))
        .collect()
}

/// Plans the forward rows of [`score`]: for `(prompt index, target ids)`
/// pairs (targets non-empty), rows `(prompt index, continuation)` and the
/// row that serves each pair. A pair is served by a row of its prompt whose
/// continuation starts with all of the target but its last token; targets
/// are placed longest first, so shorter ones find a row already there.
fn plan_rows(pairs: &[(usize, Vec<u32>)]) -> (Vec<(usize, Vec<u32>)>, Vec<usize>) {
    let mut rows: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut rows_of_prompt: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut served_by = vec![0usize; pairs.len()];
    let mut by_length: Vec<usize> = (0..pairs.len()).collect();
    by_length.sort_by_key(|&i| std::cmp::Reverse(pairs[i].1.len()));
    for i in by_length {
        let (p, target) = &pairs[i];
        let needed = &target[..target.len() - 1];
        let candidates = rows_of_prompt.entry(*p).or_default();
        served_by[i] = match candidates.iter().find(|&&r| rows[r].1.starts_with(needed)) {
            Some(&r) => r,
            None => {
                rows.push((*p, needed.to_vec()));
                candidates.push(rows.len() - 1);
                rows.len() - 1
            }
        };
    }
    (rows, served_by)
}

/// Greedy continuations of several prompts at once (a ragged KV cache):
/// up to `max_new` token ids per prompt, each row cut after its first
/// end-of-sequence token. Same ids as [`Model::generate`] with
/// [`crate::Sampling::Greedy`], prompt by prompt.
pub fn greedy_batch(model: &Model, prompts: &[&str], max_new: usize) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() || max_new == 0 {
        return Ok(vec![Vec::new(); prompts.len()]);
    }
    let seqs: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| model.prompt_ids(p))
        .collect::<Result<_>>()?;
    let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let max_new = max_new.min(model.config().max_positions.saturating_sub(longest));
    let n = seqs.len();
    let mut out = vec![Vec::with_capacity(max_new); n];
    if max_new == 0 {
        return Ok(out);
    }
    let hooks = Hooks::new();
    let batch = model.batch(&seqs)?;
    let (fwd, cache) = model.forward_with_cache(&batch, &LogitsAt::Last, &hooks)?;
    let mut cache = cache.prefixes(&batch.lengths, 0..model.config().n_layers)?;
    let mut logits = fwd
        .logits
        .ok_or_else(|| Error::invalid("generation", "the forward pass returned no logits"))?;
    let eos = &model.config().eos_token_ids;
    let mut done = vec![false; n];
    for step in 0..max_new {
        let next: Vec<u32> = logits.to_dtype(DType::F32)?.argmax(D::Minus1)?.to_vec1()?;
        for (r, &id) in next.iter().enumerate() {
            if !done[r] {
                out[r].push(id);
                done[r] = eos.contains(&id);
            }
        }
        if step + 1 == max_new || done.iter().all(|&d| d) {
            break;
        }
        let ids = Tensor::from_vec(next, (n, 1), model.device())?;
        logits = model
            .decoder()
            .run(&ids, &vec![1; n], &LogitsAt::Last, &hooks, Some(&mut cache))?
            .logits
            .ok_or_else(|| Error::invalid("generation", "the forward pass returned no logits"))?;
    }
    Ok(out)
}

/// How to measure cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasureOptions {
    /// Tokens generated per generation prompt for fluency (0: no fluency).
    pub fluency_tokens: usize,
    /// Rows per forward pass when scoring.
    pub chunk: usize,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        Self {
            fluency_tokens: 100,
            chunk: DEFAULT_CHUNK,
        }
    }
}

/// Raw probabilities behind a case's CounterFact metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaseProbs {
    /// The edit prompt (`None` when the case has no true target).
    pub prompt: Option<PairProb>,
    /// Each paraphrase.
    pub paraphrases: Vec<PairProb>,
    /// Each neighbourhood prompt.
    pub neighbourhood: Vec<PairProb>,
}

/// The metrics of one case on one state of the model. Rates are in
/// `[0, 1]`; a metric the case cannot have (no neighbours, no generation
/// prompts, fluency off) is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaseMetrics {
    /// P(new) > P(true) on the edit prompt (0 or 1).
    pub efficacy: Option<f64>,
    /// Fraction of paraphrases with P(new) > P(true).
    pub paraphrase: Option<f64>,
    /// Fraction of neighbourhood prompts with P(true) > P(new).
    pub neighborhood: Option<f64>,
    /// P(new) − P(true) on the edit prompt.
    pub efficacy_magnitude: Option<f64>,
    /// Mean P(new) − P(true) over paraphrases.
    pub paraphrase_magnitude: Option<f64>,
    /// Mean P(true) − P(new) over neighbourhood prompts.
    pub neighborhood_magnitude: Option<f64>,
    /// Mean n-gram entropy of greedy generations (prompt included).
    pub fluency: Option<f64>,
    /// Top-1 token accuracy of the new target on the edit prompt.
    pub edit_accuracy: Option<f64>,
    /// Mean top-1 token accuracy of the new target over paraphrases.
    pub paraphrase_accuracy: Option<f64>,
    /// Mean top-1 token accuracy of the locality answers.
    pub locality_accuracy: Option<f64>,
    /// Mean fraction of locality positions whose top-1 token is unchanged
    /// from the unedited model (set when comparing with it).
    pub locality_agreement: Option<f64>,
    /// The probabilities behind the rates.
    pub probs: CaseProbs,
    /// Top-1 tokens at each locality answer position (for agreement).
    pub locality_top1: Vec<Vec<u32>>,
    /// The distinct generated texts (prompt included).
    pub generations: Vec<String>,
}

impl CaseMetrics {
    /// Sets [`CaseMetrics::locality_agreement`] against the unedited
    /// model's metrics of the same case.
    pub fn compare_locality(&mut self, original: &CaseMetrics) {
        let per: Vec<f64> = self
            .locality_top1
            .iter()
            .zip(&original.locality_top1)
            .filter_map(|(a, b)| metrics::agreement(a, b))
            .collect();
        self.locality_agreement = metrics::mean(&per);
    }
}

/// Measures several cases on the model as it is, batching the scoring of
/// all their prompts (and the generations of each case).
pub fn measure(model: &Model, cases: &[&Case], opts: &MeasureOptions) -> Result<Vec<CaseMetrics>> {
    // Distinct (prompt, target) rows over all cases.
    let mut keys: HashMap<(String, String), usize> = HashMap::new();
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |prompt: &str, target: &str| -> usize {
        let key = (prompt.to_string(), target.to_string());
        *keys.entry(key.clone()).or_insert_with(|| {
            rows.push(key);
            rows.len() - 1
        })
    };
    struct Plan {
        prompt: (Option<usize>, Option<usize>),
        paraphrases: Vec<(Option<usize>, Option<usize>)>,
        neighbourhood: Vec<(usize, usize)>,
        locality: Vec<usize>,
    }
    let mut plans = Vec::with_capacity(cases.len());
    for case in cases {
        let req = &case.request;
        let new = req.target_new.as_deref();
        let old = req.target_true.as_deref();
        let mut pair = |p: &str| (new.map(|t| row(p, t)), old.map(|t| row(p, t)));
        let prompt = pair(&req.formatted_prompt());
        let paraphrases = case.paraphrases.iter().map(|p| pair(p)).collect();
        let neighbourhood = match (new, old) {
            (Some(n), Some(o)) => case
                .neighbourhood
                .iter()
                .map(|p| (row(p, n), row(p, o)))
                .collect(),
            _ => Vec::new(),
        };
        let locality = case
            .locality
            .iter()
            .map(|l| row(&l.prompt, &l.answer))
            .collect();
        plans.push(Plan {
            prompt,
            paraphrases,
            neighbourhood,
            locality,
        });
    }
    let pairs: Vec<(&str, &str)> = rows.iter().map(|(p, t)| (p.as_str(), t.as_str())).collect();
    let scored = score(model, &pairs, opts.chunk)?;

    let prob_pair = |(n, o): (Option<usize>, Option<usize>)| -> Option<PairProb> {
        Some(PairProb {
            new: scored[n?].prob(),
            true_: scored[o?].prob(),
        })
    };
    let acc = |i: usize| metrics::accuracy(&scored[i].hits);
    let mut out = Vec::with_capacity(cases.len());
    for (case, plan) in cases.iter().zip(plans) {
        let prompt = prob_pair(plan.prompt);
        let paraphrases: Vec<PairProb> = plan
            .paraphrases
            .iter()
            .filter_map(|&p| prob_pair(p))
            .collect();
        let neighbourhood: Vec<PairProb> = plan
            .neighbourhood
            .iter()
            .map(|&(n, o)| PairProb {
                new: scored[n].prob(),
                true_: scored[o].prob(),
            })
            .collect();
        let para_acc: Vec<f64> = plan.paraphrases.iter().filter_map(|p| acc(p.0?)).collect();
        let loc_acc: Vec<f64> = plan.locality.iter().filter_map(|&i| acc(i)).collect();
        let (fluency, generations) = if opts.fluency_tokens > 0 && !case.generation.is_empty() {
            fluency_of(model, &case.generation, opts.fluency_tokens)?
        } else {
            (None, Vec::new())
        };
        let one = prompt.map(|p| vec![p]).unwrap_or_default();
        out.push(CaseMetrics {
            efficacy: metrics::new_beats_true(&one),
            paraphrase: metrics::new_beats_true(&paraphrases),
            neighborhood: metrics::true_beats_new(&neighbourhood),
            efficacy_magnitude: metrics::new_minus_true(&one),
            paraphrase_magnitude: metrics::new_minus_true(&paraphrases),
            neighborhood_magnitude: metrics::true_minus_new(&neighbourhood),
            fluency,
            edit_accuracy: plan.prompt.0.and_then(acc),
            paraphrase_accuracy: metrics::mean(&para_acc),
            locality_accuracy: metrics::mean(&loc_acc),
            locality_agreement: None,
            probs: CaseProbs {
                prompt,
                paraphrases,
                neighbourhood,
            },
            locality_top1: plan
                .locality
                .iter()
                .map(|&i| scored[i].top1.clone())
                .collect(),
            generations,
        });
    }
    Ok(out)
}

/// Fluency of greedy generations: identical prompts give identical greedy
/// texts, so each distinct prompt is generated once and weighted by its
/// count. Returns the mean entropy and the distinct texts.
fn fluency_of(
    model: &Model,
    prompts: &[String],
    tokens: usize,
) -> Result<(Option<f64>, Vec<String>)> {
    let mut distinct: Vec<&str> = Vec::new();
    for p in prompts {
        if !distinct.contains(&p.as_str()) {
            distinct.push(p);
        }
    }
    let ids = greedy_batch(model, &distinct, tokens)?;
    let mut texts = Vec::with_capacity(distinct.len());
    let eos = &model.config().eos_token_ids;
    for (p, ids) in distinct.iter().zip(&ids) {
        let end = ids
            .iter()
            .position(|t| eos.contains(t))
            .unwrap_or(ids.len());
        texts.push(format!("{p}{}", model.tokenizer().decode(&ids[..end])?));
    }
    let per: Vec<f64> = prompts
        .iter()
        .map(|p| {
            let i = distinct.iter().position(|d| d == p).unwrap_or(0);
            metrics::fluency_entropy(&metrics::words(&texts[i]))
        })
        .collect();
    Ok((metrics::mean(&per), texts))
}

#[cfg(test)]
mod tests {
    use super::plan_rows;

    #[test]
    fn targets_after_one_prompt_share_rows() {
        let pairs = vec![
            (0, vec![7]),       // one token: any row of prompt 0
            (0, vec![5, 6, 9]), // needs [5, 6]
            (0, vec![5, 8]),    // needs [5]: inside [5, 6]
            (0, vec![4, 1]),    // needs [4]: a row of its own
            (1, vec![7]),       // another prompt: its own row
        ];
        let (rows, served_by) = plan_rows(&pairs);
        assert_eq!(rows, vec![(0, vec![5, 6]), (0, vec![4]), (1, vec![])]);
        assert_eq!(served_by, vec![0, 0, 0, 1, 2]);
    }
}
