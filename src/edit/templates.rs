//! Context templates: short texts sampled from the model itself, used as
//! prefixes so that an edit generalises beyond the exact prompt.

use crate::model::{Model, Sampling};
use crate::{Error, Result};

/// The weight of each template of [`context_templates`]`(spec)` in a mean
/// key: the mean within each group (the bare `"{}"`, then each
/// `(tokens, count)` of `spec`), then the mean over the groups. This is how
/// MEMIT's reference averages keys, so the bare prompt weighs as much as
/// all the samples of one length together (ROME averages all templates
/// alike instead).
pub fn group_weights(spec: &[(usize, usize)]) -> Vec<f64> {
    let groups = 1 + spec.iter().filter(|s| s.1 > 0).count();
    let mut weights = vec![1.0 / groups as f64];
    for &(_, count) in spec {
        weights.extend(std::iter::repeat_n(
            1.0 / (groups * count.max(1)) as f64,
            count,
        ));
    }
    weights
}

/// `"{}"` followed by, for each `(tokens, count)`, `count` texts of `tokens`
/// sampled tokens (top-5 sampling, seeded) ending in `". {}"`. Cached per
/// model, specification and seed under `<kedit cache>/templates`.
pub fn context_templates(model: &Model, spec: &[(usize, usize)], seed: u64) -> Result<Vec<String>> {
    let spec_key: Vec<String> = spec.iter().map(|(l, n)| format!("{l}x{n}")).collect();
    let path = crate::fetch::cache_dir().join("templates").join(format!(
        "{}-{}-s{seed}.json",
        model.fingerprint(),
        spec_key.join("_")
    ));
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(templates) = serde_json::from_str::<Vec<String>>(&text) {
            if templates.first().map(String::as_str) == Some("{}")
                && templates.len() == 1 + spec.iter().map(|s| s.1).sum::<usize>()
                && templates.iter().all(|t| t.matches("{}").count() == 1)
            {
                return Ok(templates);
            }
        }
        eprintln!(
            "kedit: ignoring a bad context-template cache {}",
            path.display()
        );
    }
    let start = crate::stats::start_token(model)?;
    let mut templates = vec!["{}".to_string()];
    for (i, &(tokens, count)) in spec.iter().enumerate() {
        if tokens == 0 || count == 0 {
            return Err(Error::invalid(
                "context templates",
                format!("({tokens}, {count}) has a zero"),
            ));
        }
        let sampling = Sampling::Sample {
            temperature: 1.0,
            top_k: Some(5),
            seed: seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
        };
        for ids in model.sample_continuations(&[start], count, tokens, &sampling)? {
            let text = model.tokenizer().decode_text(&ids)?;
            // Braces would be read as placeholders.
            let text = text.replace(['{', '}'], " ");
            templates.push(format!("{text}. {{}}"));
        }
    }
    let json = serde_json::to_string_pretty(&templates)
        .map_err(|e| Error::invalid("templates", e.to_string()))?;
    crate::io::write_atomic(&path, json.as_bytes())?;
    Ok(templates)
}
