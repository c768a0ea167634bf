//! The metrics themselves, as pure functions over probabilities, token ids
//! and word lists, so that each can be checked on hand-made inputs.
//!
//! Definitions (after the ROME paper and its evaluation code, restated):
//!
//! - A prompt is scored by the teacher-forced *mean-token* probability of a
//!   target, `P = exp(−mean NLL)` of its tokens appended to the prompt.
//! - **Efficacy** and **paraphrase success**: the fraction of prompts on
//!   which `P(new) > P(true)` (strictly), averaged per case and then over
//!   cases. Their **magnitudes** average `P(new) − P(true)` the same way.
//! - **Neighbourhood success**: the fraction of prompts about *other*
//!   subjects (whose answer is the true target) on which `P(true) > P(new)`;
//!   its magnitude averages `P(true) − P(new)`.
//! - **Score S**: the harmonic mean of the three success rates.
//! - **Fluency**: the n-gram entropy of a generated text (prompt included),
//!   `(2/3 · H₂ + 4/3 · H₃) / 2` with `Hₙ` the entropy in bits of the
//!   frequency distribution of its word n-grams, averaged over texts.
//! - **Top-1 accuracy** (zsRE): the fraction of target tokens that are the
//!   model's most likely next token under teacher forcing.

use std::collections::HashMap;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

/// The probabilities of the new and the true target after one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairProb {
    /// P(target_new).
    pub new: f64,
    /// P(target_true).
    pub true_: f64,
}

impl PairProb {
    /// A pair from mean negative log-likelihoods (`P = exp(−nll)`).
    pub fn from_nll(new_nll: f64, true_nll: f64) -> Self {
        Self {
            new: (-new_nll).exp(),
            true_: (-true_nll).exp(),
        }
    }
}

/// Arithmetic mean; `None` for no values.
pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Fraction of prompts where the new target is strictly more likely than
/// the true one (efficacy, paraphrase success). `None` for no prompts.
pub fn new_beats_true(pairs: &[PairProb]) -> Option<f64> {
    let wins: Vec<f64> = pairs
        .iter()
        .map(|p| f64::from(u8::from(p.new > p.true_)))
        .collect();
    mean(&wins)
}

/// Mean of `P(new) − P(true)` (efficacy and paraphrase magnitude).
pub fn new_minus_true(pairs: &[PairProb]) -> Option<f64> {
    let d: Vec<f64> = pairs.iter().map(|p| p.new - p.true_).collect();
    mean(&d)
}

/// Fraction of prompts where the true target is strictly more likely than
/// the new one (neighbourhood success). `None` for no prompts.
pub fn true_beats_new(pairs: &[PairProb]) -> Option<f64> {
    let wins: Vec<f64> = pairs
        .iter()
        .map(|p| f64::from(u8::from(p.true_ > p.new)))
        .collect();
    mean(&wins)
}

/// Mean of `P(true) − P(new)` (neighbourhood magnitude).
pub fn true_minus_new(pairs: &[PairProb]) -> Option<f64> {
    let d: Vec<f64> = pairs.iter().map(|p| p.true_ - p.new).collect();
    mean(&d)
}

/// Harmonic mean of non-negative values: 0 when any is 0, `None` for none
/// or when a value is negative or not finite.
pub fn harmonic_mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return None;
    }
    if values.contains(&0.0) {
        return Some(0.0);
    }
    Some(values.len() as f64 / values.iter().map(|v| 1.0 / v).sum::<f64>())
}

/// Fraction of `true` values (top-1 token accuracy from per-token hits).
pub fn accuracy(hits: &[bool]) -> Option<f64> {
    let v: Vec<f64> = hits.iter().map(|&h| f64::from(u8::from(h))).collect();
    mean(&v)
}

/// Fraction of positions where two predictions agree (locality as
/// agreement of the edited model's top-1 tokens with the original's).
/// `None` when either is empty or their lengths differ.
pub fn agreement<T: PartialEq>(a: &[T], b: &[T]) -> Option<f64> {
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    let same: Vec<bool> = a.iter().zip(b).map(|(x, y)| x == y).collect();
    accuracy(&same)
}

/// Splits text into words and punctuation marks, approximating the word
/// tokenizer the reference used: a word is a maximal run of alphanumeric
/// characters, optionally joined by single inner apostrophes or hyphens
/// (`"don't"`, `"well-known"`); every other non-space character is a token
/// of its own.
pub fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let end_of = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);
    let mut i = 0;
    while i < chars.len() {
        let (start, c) = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_alphanumeric() {
            let mut j = i + 1;
            while j < chars.len() {
                let d = chars[j].1;
                let joiner = matches!(d, '\'' | '’' | '-')
                    && chars.get(j + 1).is_some_and(|&(_, e)| e.is_alphanumeric());
                if d.is_alphanumeric() {
                    j += 1;
                } else if joiner {
                    j += 2;
                } else {
                    break;
                }
            }
            out.push(&text[start..end_of(j)]);
            i = j;
        } else {
            out.push(&text[start..end_of(i + 1)]);
            i += 1;
        }
    }
    out
}

/// Entropy in bits of the frequency distribution of the `n`-grams of
/// `tokens` (0 when there are fewer than `n` tokens).
pub fn ngram_entropy<T: Eq + Hash>(tokens: &[T], n: usize) -> f64 {
    if n == 0 || tokens.len() < n {
        return 0.0;
    }
    let mut counts: HashMap<&[T], usize> = HashMap::new();
    for gram in tokens.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    let total = (tokens.len() - n + 1) as f64;
    // Summed in a fixed order: the same text gives the same bits every time.
    let mut counts: Vec<usize> = counts.into_values().collect();
    counts.sort_unstable();
    counts
        .into_iter()
        .map(|c| {
            let f = c as f64 / total;
            -f * f.log2()
        })
        .sum()
}

/// The fluency entropy of one token sequence: `(2/3 · H₂ + 4/3 · H₃) / 2`.
pub fn fluency_entropy<T: Eq + Hash>(tokens: &[T]) -> f64 {
    (2.0 / 3.0 * ngram_entropy(tokens, 2) + 4.0 / 3.0 * ngram_entropy(tokens, 3)) / 2.0
}

/// The fluency of a set of texts: the mean over texts of
/// [`fluency_entropy`] of their [`words`]. `None` for no texts.
pub fn fluency<S: AsRef<str>>(texts: &[S]) -> Option<f64> {
    let per: Vec<f64> = texts
        .iter()
        .map(|t| fluency_entropy(&words(t.as_ref())))
        .collect();
    mean(&per)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn rates_and_magnitudes() {
        let pairs = [
            PairProb {
                new: 0.5,
                true_: 0.1,
            },
            PairProb {
                new: 0.2,
                true_: 0.3,
            },
            PairProb {
                new: 0.25,
                true_: 0.25,
            },
            PairProb {
                new: 0.6,
                true_: 0.2,
            },
        ];
        assert_eq!(new_beats_true(&pairs), Some(0.5));
        assert_eq!(true_beats_new(&pairs), Some(0.25));
        assert!(close(
            new_minus_true(&pairs).unwrap(),
            (0.4 - 0.1 + 0.0 + 0.4) / 4.0
        ));
        assert!(close(true_minus_new(&pairs).unwrap(), -(0.7 / 4.0)));
        assert_eq!(new_beats_true(&[]), None);
        let p = PairProb::from_nll(0.0, 2f64.ln());
        assert!(close(p.new, 1.0) && close(p.true_, 0.5));
    }

    #[test]
    fn harmonic_mean_values() {
        assert!(close(harmonic_mean(&[1.0, 0.5, 0.25]).unwrap(), 3.0 / 7.0));
        assert_eq!(harmonic_mean(&[1.0, 0.0]), Some(0.0));
        assert_eq!(harmonic_mean(&[]), None);
        assert_eq!(harmonic_mean(&[f64::NAN]), None);
    }

    #[test]
    fn accuracy_and_agreement() {
        assert_eq!(accuracy(&[true, false, true, true]), Some(0.75));
        assert_eq!(accuracy(&[]), None);
        assert_eq!(agreement(&[1u32, 2, 3], &[1, 5, 3]), Some(2.0 / 3.0));
        assert_eq!(agreement(&[1u32], &[1, 2]), None);
    }

    #[test]
    fn word_splitting() {
        assert_eq!(
            words("Paris's well-known, \"tower\"  is tall."),
            vec![
                "Paris's",
                "well-known",
                ",",
                "\"",
                "tower",
                "\"",
                "is",
                "tall",
                "."
            ]
        );
        assert_eq!(words("  "), Vec::<&str>::new());
        assert_eq!(words("a-"), vec!["a", "-"]);
        assert_eq!(words("Café 10%"), vec!["Café", "10", "%"]);
    }

    #[test]
    fn entropies() {
        // 4 distinct bigrams, each once: 2 bits; 3 distinct trigrams: log2 3.
        let t = ["a", "b", "c", "d", "e"];
        assert!(close(ngram_entropy(&t, 2), 2.0));
        assert!(close(ngram_entropy(&t, 3), 3f64.log2()));
        assert!(close(
            fluency_entropy(&t),
            (2.0 / 3.0 * 2.0 + 4.0 / 3.0 * 3f64.log2()) / 2.0
        ));
        // A repeated word has one bigram and one trigram: zero entropy.
        assert_eq!(fluency_entropy(&["x"; 10]), 0.0);
        // "a b a b a": bigrams ab ×2, ba ×2 → 1 bit; trigrams aba ×2, bab ×1.
        let h3 = -(2.0 / 3.0 * (2.0f64 / 3.0).log2() + 1.0 / 3.0 * (1.0f64 / 3.0).log2());
        let t = ["a", "b", "a", "b", "a"];
        assert!(close(ngram_entropy(&t, 2), 1.0));
        assert!(close(ngram_entropy(&t, 3), h3));
        assert_eq!(ngram_entropy(&["a"], 2), 0.0);
        assert!(close(
            fluency(&["x x x x", "a b c d e"]).unwrap(),
            (0.0 + fluency_entropy(&["a", "b", "c", "d", "e"])) / 2.0
        ));
    }
}
