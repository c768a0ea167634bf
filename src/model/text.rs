//! Text-level operations on a [`Model`]: tokenising with offsets, locating a
//! subject, scoring targets, top-k predictions and generation.

use std::ops::Range;

use candle_core::DType;
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};

use super::decoder::{log_softmax, probs, KvCache, LogitsAt};
use super::hooks::Hooks;
use super::tokenizer::Token;
use super::Model;
use crate::{Error, Result};

/// The teacher-forced probability of a target continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetProb {
    /// Mean negative log-likelihood per target token (the ROME convention).
    pub mean_nll: f32,
    /// Probability of each target token given everything before it.
    pub token_probs: Vec<f32>,
    /// Rank of the first target token among all next tokens after the
    /// prompt (0 = the most likely).
    pub first_rank: usize,
}

impl TargetProb {
    /// `exp(−mean NLL)`: the geometric mean of the token probabilities.
    pub fn prob(&self) -> f32 {
        (-self.mean_nll).exp()
    }
}

/// One of the most likely next tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TopToken {
    /// Token id.
    pub id: u32,
    /// The token decoded to text (e.g. `" Paris"`).
    pub text: String,
    /// Its probability.
    pub prob: f32,
}

/// How to pick generated tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Always the most likely token.
    Greedy,
    /// Sample from the softmax at `temperature`, optionally restricted to the
    /// `top_k` most likely tokens, from a generator seeded with `seed`.
    Sample {
        /// Divides the logits (> 0).
        temperature: f64,
        /// Keep only this many most likely tokens.
        top_k: Option<usize>,
        /// Seed of the sampler.
        seed: u64,
    },
}

/// Output of [`Model::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Ids of the generated tokens only.
    pub ids: Vec<u32>,
    /// The generated text (without the prompt).
    pub text: String,
}

/// Validates a prompt: non-empty after trimming.
fn check_prompt(prompt: &str) -> Result<()> {
    if prompt.trim().is_empty() {
        return Err(Error::invalid("prompt", "it is empty"));
    }
    Ok(())
}

impl Model {
    /// Tokenises a prompt the way the model expects it (with a BOS token
    /// where the tokenizer adds one), with byte and character offsets.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<Token>> {
        check_prompt(prompt)?;
        let tokens = self.tokenizer().encode(prompt, true)?;
        if tokens.is_empty() {
            return Err(Error::invalid(
                "prompt",
                format!("{prompt:?} tokenises to nothing"),
            ));
        }
        Ok(tokens)
    }

    /// Token ids of a prompt (see [`Model::tokenize`]).
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        Ok(self.tokenize(prompt)?.into_iter().map(|t| t.id).collect())
    }

    /// Token ids of a continuation, without special tokens. A target is
    /// appended to a prompt as is, so give it its leading space (`" Paris"`).
    pub fn target_ids(&self, target: &str) -> Result<Vec<u32>> {
        if target.trim().is_empty() {
            return Err(Error::invalid("target", "it is empty or whitespace"));
        }
        let ids = self.tokenizer().encode_ids(target, false)?;
        if ids.is_empty() {
            return Err(Error::invalid(
                "target",
                format!("{target:?} tokenises to nothing"),
            ));
        }
        Ok(ids)
    }

    /// Formats `template` (which contains `{}`) with `subject` and returns
    /// the prompt's tokens and the token range covering the subject.
    pub fn subject_tokens(
        &self,
        template: &str,
        subject: &str,
    ) -> Result<(Vec<Token>, Range<usize>)> {
        if !template.contains("{}") {
            return Err(Error::invalid(
                "prompt template",
                format!("{template:?} has no {{}} for the subject"),
            ));
        }
        if subject.trim().is_empty() {
            return Err(Error::invalid("subject", "it is empty"));
        }
        let prompt = template.replacen("{}", subject, 1);
        let start = template.find("{}").expect("checked above");
        self.span_of(&prompt, start..start + subject.len(), subject)
    }

    /// Tokens of an already formatted `prompt` and the token range covering
    /// the first occurrence of `subject` in it.
    pub fn find_subject(&self, prompt: &str, subject: &str) -> Result<(Vec<Token>, Range<usize>)> {
        if subject.trim().is_empty() {
            return Err(Error::invalid("subject", "it is empty"));
        }
        let start = prompt.find(subject).ok_or_else(|| {
            Error::invalid(
                "subject",
                format!("{subject:?} does not occur in the prompt {prompt:?}"),
            )
        })?;
        self.span_of(prompt, start..start + subject.len(), subject)
    }

    fn span_of(
        &self,
        prompt: &str,
        bytes: Range<usize>,
        subject: &str,
    ) -> Result<(Vec<Token>, Range<usize>)> {
        let tokens = self.tokenize(prompt)?;
        // A token belongs to the subject when its bytes overlap the subject's
        // (" Eiffel" counts: its leading space lies outside, its word inside).
        let inside: Vec<usize> = tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                t.bytes.start < bytes.end && t.bytes.end > bytes.start && !t.bytes.is_empty()
            })
            .map(|(i, _)| i)
            .collect();
        match (inside.first(), inside.last()) {
            (Some(&a), Some(&b)) => Ok((tokens, a..b + 1)),
            _ => Err(Error::invalid(
                "subject",
                format!("{subject:?} covers no token of the prompt {prompt:?}"),
            )),
        }
    }

    /// Teacher-forced probabilities of `target` after each prompt, in one
    /// batched forward pass with logits only at the target positions.
    pub fn target_probs(&self, pairs: &[(&str, &str)]) -> Result<Vec<TargetProb>> {
        let mut seqs = Vec::with_capacity(pairs.len());
        let mut points = Vec::new();
        let mut spans = Vec::with_capacity(pairs.len());
        for (row, (prompt, target)) in pairs.iter().enumerate() {
            let mut ids = self.prompt_ids(prompt)?;
            let tgt = self.target_ids(target)?;
            let p = ids.len();
            ids.extend(&tgt);
            // Logits at position i predict token i + 1.
            let first = points.len();
            points.extend((p - 1..p - 1 + tgt.len()).map(|pos| (row, pos)));
            spans.push((first, tgt));
            seqs.push(ids);
        }
        let batch = self.batch(&seqs)?;
        let out = self.forward(&batch, &LogitsAt::Points(points), &Hooks::new())?;
        let logp = log_softmax(&out.logits.expect("logits requested"))?;
        let logp: Vec<Vec<f32>> = logp.to_vec2()?;
        Ok(spans
            .into_iter()
            .map(|(first, tgt)| {
                let lp: Vec<f32> = tgt
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| logp[first + i][id as usize])
                    .collect();
                let row = &logp[first];
                let first_rank = row.iter().filter(|&&x| x > row[tgt[0] as usize]).count();
                TargetProb {
                    mean_nll: -lp.iter().sum::<f32>() / lp.len() as f32,
                    token_probs: lp.iter().map(|x| x.exp()).collect(),
                    first_rank,
                }
            })
            .collect())
    }

    /// Teacher-forced probability of `target` after `prompt`.
    pub fn target_prob(&self, prompt: &str, target: &str) -> Result<TargetProb> {
        Ok(self.target_probs(&[(prompt, target)])?.remove(0))
    }

    /// The `k` most likely next tokens after `prompt`.
    pub fn top_k(&self, prompt: &str, k: usize) -> Result<Vec<TopToken>> {
        let ids = self.prompt_ids(prompt)?;
        let batch = self.batch(&[ids])?;
        let out = self.forward(&batch, &LogitsAt::Last, &Hooks::new())?;
        let p: Vec<f32> = probs(&out.logits.expect("logits requested").squeeze(0)?)?.to_vec1()?;
        self.top_of(&p, k)
    }

    /// The `k` most likely tokens of a probability vector.
    pub fn top_of(&self, p: &[f32], k: usize) -> Result<Vec<TopToken>> {
        let mut order: Vec<usize> = (0..p.len()).collect();
        let k = k.min(p.len());
        order.select_nth_unstable_by(k.saturating_sub(1).min(p.len() - 1), |&a, &b| {
            p[b].total_cmp(&p[a])
        });
        order.truncate(k);
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        order
            .into_iter()
            .map(|id| {
                Ok(TopToken {
                    id: id as u32,
                    text: self.tokenizer().decode(&[id as u32])?,
                    prob: p[id],
                })
            })
            .collect()
    }

    /// Samples `n` continuations of `new_tokens` tokens each after the token
    /// ids `prefix`, as one batch with a KV cache (no early stop).
    pub fn sample_continuations(
        &self,
        prefix: &[u32],
        n: usize,
        new_tokens: usize,
        sampling: &Sampling,
    ) -> Result<Vec<Vec<u32>>> {
        if prefix.is_empty() || n == 0 {
            return Err(Error::invalid("sampling", "an empty prefix or zero rows"));
        }
        let mut processor = logits_processor(sampling)?;
        let rows = vec![prefix.to_vec(); n];
        let batch = self.batch(&rows)?;
        let mut cache = KvCache::new();
        let hooks = Hooks::new();
        let mut logits = self
            .decoder()
            .run(
                &batch.ids,
                &batch.lengths,
                &LogitsAt::Last,
                &hooks,
                Some(&mut cache),
            )?
            .logits
            .expect("logits requested");
        let mut out = vec![Vec::with_capacity(new_tokens); n];
        for step in 0..new_tokens {
            let logits32 = logits.to_dtype(DType::F32)?;
            let mut next = Vec::with_capacity(n);
            for (r, row) in out.iter_mut().enumerate() {
                let id = processor.sample(&logits32.get(r)?)?;
                row.push(id);
                next.push(id);
            }
            if step + 1 == new_tokens {
                break;
            }
            let ids = candle_core::Tensor::from_vec(next, (n, 1), self.device())?;
            logits = self
                .decoder()
                .run(&ids, &vec![1; n], &LogitsAt::Last, &hooks, Some(&mut cache))?
                .logits
                .expect("logits requested");
        }
        Ok(out)
    }

    /// Generates up to `max_new_tokens` after `prompt` with a KV cache,
    /// stopping early at an end-of-sequence token.
    pub fn generate(
        &self,
        prompt: &str,
        max_new_tokens: usize,
        sampling: &Sampling,
    ) -> Result<Generation> {
        let ids = self.prompt_ids(prompt)?;
        let room = self.config().max_positions.saturating_sub(ids.len());
        let max_new = max_new_tokens.min(room);
        let mut processor = logits_processor(sampling)?;
        let mut cache = KvCache::new();
        let hooks = Hooks::new();
        let mut logits = self.forward_cached(&ids, &mut cache, &hooks)?;
        let mut out = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            let next = processor.sample(&logits.to_dtype(DType::F32)?)?;
            out.push(next);
            if self.config().eos_token_ids.contains(&next) || out.len() == max_new {
                break;
            }
            logits = self.forward_cached(&[next], &mut cache, &hooks)?;
        }
        Ok(Generation {
            text: self.tokenizer().decode(&out)?,
            ids: out,
        })
    }
}

fn logits_processor(sampling: &Sampling) -> Result<LogitsProcessor> {
    Ok(match sampling {
        Sampling::Greedy => LogitsProcessor::from_sampling(0, CandleSampling::ArgMax),
        Sampling::Sample {
            temperature,
            top_k,
            seed,
        } => {
            if !(temperature.is_finite() && *temperature > 0.0) {
                return Err(Error::invalid(
                    "temperature",
                    format!("{temperature} must be > 0"),
                ));
            }
            let s = match top_k {
                Some(k) => CandleSampling::TopK {
                    k: *k,
                    temperature: *temperature,
                },
                None => CandleSampling::All {
                    temperature: *temperature,
                },
            };
            LogitsProcessor::from_sampling(*seed, s)
        }
    })
}
