//! Readers of the evaluation datasets in their original schemas, each
//! turned into the same [`Case`].
//!
//! - **CounterFact** (ROME): `requested_rewrite {prompt with {}, subject,
//!   target_new.str, target_true.str}`, `paraphrase_prompts`,
//!   `neighborhood_prompts`, `attribute_prompts`, `generation_prompts`.
//! - **EasyEdit** style: `prompt` (formatted), `subject`, `target_new`,
//!   `ground_truth`, `rephrase_prompt`, `locality_prompt`,
//!   `locality_ground_truth`.
//! - **zsRE** (MEND / EasyEdit): `src` (a question), `subject`, `alt` (the
//!   new answer), `answers` (the true ones), `rephrase`, `loc`, `loc_ans`.
//!
//! EasyEdit and zsRE prompts are formatted; the subject is located in the
//! prompt (exactly, else ignoring ASCII case) to build the `{}` template.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::edit::{with_leading_space, EditKind, EditRequest};
use crate::{Error, Result};

/// The schema of a dataset file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schema {
    /// ROME's CounterFact.
    CounterFact,
    /// EasyEdit's flat CounterFact-style records.
    EasyEdit,
    /// zsRE question answering (MEND / EasyEdit).
    Zsre,
}

impl Schema {
    fn name(self) -> &'static str {
        match self {
            Schema::CounterFact => "CounterFact dataset",
            Schema::EasyEdit => "EasyEdit dataset",
            Schema::Zsre => "zsRE dataset",
        }
    }

    /// Guesses the schema from the fields of a record.
    pub fn detect(record: &serde_json::Value) -> Option<Schema> {
        let has = |k: &str| record.get(k).is_some();
        if has("requested_rewrite") {
            Some(Schema::CounterFact)
        } else if has("src") && has("alt") {
            Some(Schema::Zsre)
        } else if has("prompt") && has("target_new") {
            Some(Schema::EasyEdit)
        } else {
            None
        }
    }
}

/// A prompt whose answer must survive an edit (zsRE `loc` / `loc_ans`,
/// EasyEdit `locality_prompt` / `locality_ground_truth`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Locality {
    /// The prompt (formatted).
    pub prompt: String,
    /// Its answer, with a leading space.
    pub answer: String,
}

/// One evaluation case: an edit and the prompts that judge it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// The dataset's case id (`case_id`), else the record's index.
    pub id: u64,
    /// Index of the record in its file.
    pub record: usize,
    /// The schema it was read from.
    pub schema: Schema,
    /// The edit (a modify; an insert when the record has no true answer).
    /// Its paraphrase and neighbour lists are left empty: the evaluation
    /// scores them itself, batched.
    pub request: EditRequest,
    /// Other phrasings of the edit prompt (formatted).
    pub paraphrases: Vec<String>,
    /// Prompts about other subjects whose answer is the true target.
    pub neighbourhood: Vec<String>,
    /// Prompts about other subjects whose answer is the new target
    /// (CounterFact `attribute_prompts`; read, not scored).
    pub attribute: Vec<String>,
    /// Prompts for generation (fluency).
    pub generation: Vec<String>,
    /// Prompts with their own answers, scored by top-1 accuracy.
    pub locality: Vec<Locality>,
}

/// Reads a dataset file (a JSON array), detecting its schema from the
/// first record.
pub fn read_cases(path: &Path) -> Result<Vec<Case>> {
    read_cases_as(path, None)
}

/// Reads a dataset file in the given schema (`None`: detect).
pub fn read_cases_as(path: &Path, schema: Option<Schema>) -> Result<Vec<Case>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_cases(&text, path, schema)
}

/// Parses dataset text; `path` only names the source in errors. The first
/// malformed record is an error naming the file and the record's index.
pub fn parse_cases(text: &str, path: &Path, schema: Option<Schema>) -> Result<Vec<Case>> {
    parse_records(text, path, schema)?.into_iter().collect()
}

/// Reads a dataset file, setting malformed records aside instead of
/// failing: returns the good cases and one error per bad record (some
/// published files hold a few, e.g. an empty `alt` in zsRE). A file that
/// is not a JSON array of a known schema is still an error.
pub fn read_cases_lenient(path: &Path) -> Result<(Vec<Case>, Vec<Error>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for r in parse_records(&text, path, None)? {
        match r {
            Ok(c) => good.push(c),
            Err(e) => bad.push(e),
        }
    }
    Ok((good, bad))
}

fn parse_records(text: &str, path: &Path, schema: Option<Schema>) -> Result<Vec<Result<Case>>> {
    let bad = |format: &'static str, reason: String| Error::Format {
        path: path.to_path_buf(),
        format,
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad("JSON dataset", e.to_string()))?;
    let serde_json::Value::Array(records) = value else {
        return Err(bad(
            "JSON dataset",
            "the top level is not an array of records".into(),
        ));
    };
    let schema = match schema {
        Some(s) => s,
        None => match records.first() {
            None => return Ok(Vec::new()),
            Some(r) => Schema::detect(r).ok_or_else(|| {
                bad(
                    "JSON dataset",
                    "record 0 matches no known schema (CounterFact, EasyEdit, zsRE)".into(),
                )
            })?,
        },
    };
    Ok(records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            case_from(schema, r, i)
                .map_err(|reason| bad(schema.name(), format!("record {i}: {reason}")))
        })
        .collect())
}

fn field<T: DeserializeOwned>(record: serde_json::Value) -> std::result::Result<T, String> {
    serde_json::from_value(record).map_err(|e| e.to_string())
}

#[derive(Deserialize)]
struct CfRecord {
    case_id: Option<u64>,
    requested_rewrite: CfRewrite,
    #[serde(default)]
    paraphrase_prompts: Vec<String>,
    #[serde(default)]
    neighborhood_prompts: Vec<String>,
    #[serde(default)]
    attribute_prompts: Vec<String>,
    #[serde(default)]
    generation_prompts: Vec<String>,
}

#[derive(Deserialize)]
struct CfRewrite {
    prompt: String,
    subject: String,
    target_new: CfTarget,
    target_true: CfTarget,
}

#[derive(Deserialize)]
struct CfTarget {
    str: String,
}

/// A string or a list of strings (EasyEdit files use both).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct EeRecord {
    case_id: Option<u64>,
    prompt: String,
    subject: String,
    target_new: String,
    ground_truth: Option<String>,
    rephrase_prompt: Option<OneOrMany>,
    locality_prompt: Option<OneOrMany>,
    locality_ground_truth: Option<OneOrMany>,
}

#[derive(Deserialize)]
struct ZsreRecord {
    case_id: Option<u64>,
    subject: String,
    src: String,
    alt: String,
    #[serde(default)]
    answers: Vec<String>,
    rephrase: Option<String>,
    loc: Option<String>,
    loc_ans: Option<String>,
}

/// The template of a formatted prompt: the first occurrence of `subject`
/// (exact, else ignoring ASCII case) replaced by `{}`. Returns the template
/// and the subject as it is written in the prompt.
pub fn template_of(prompt: &str, subject: &str) -> Option<(String, String)> {
    let subject = subject.trim();
    if subject.is_empty() || prompt.contains("{}") {
        return None;
    }
    let start = prompt.find(subject).or_else(|| {
        prompt.char_indices().map(|(i, _)| i).find(|&i| {
            prompt
                .get(i..i + subject.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(subject))
        })
    })?;
    let end = start + subject.len();
    Some((
        format!("{}{{}}{}", &prompt[..start], &prompt[end..]),
        prompt[start..end].to_string(),
    ))
}

fn request(
    template: String,
    subject: &str,
    target_true: Option<&str>,
    target_new: &str,
) -> std::result::Result<EditRequest, String> {
    let req = match target_true.filter(|t| !t.trim().is_empty()) {
        Some(t) => EditRequest::modify(&template, subject, t, target_new),
        None => EditRequest::insert(&template, subject, target_new),
    };
    req.validate().map_err(|e| e.to_string())?;
    Ok(req)
}

fn locate(prompt: &str, subject: &str) -> std::result::Result<(String, String), String> {
    template_of(prompt, subject).ok_or_else(|| {
        format!("the subject {subject:?} does not occur in the prompt {prompt:?} (or the prompt already holds {{}})")
    })
}

fn case_from(
    schema: Schema,
    record: serde_json::Value,
    index: usize,
) -> std::result::Result<Case, String> {
    let empty = Case {
        id: index as u64,
        record: index,
        schema,
        request: EditRequest::insert("{}", "-", "-"),
        paraphrases: Vec::new(),
        neighbourhood: Vec::new(),
        attribute: Vec::new(),
        generation: Vec::new(),
        locality: Vec::new(),
    };
    match schema {
        Schema::CounterFact => {
            let r: CfRecord = field(record)?;
            let rw = r.requested_rewrite;
            if rw.prompt.matches("{}").count() != 1 {
                return Err(format!(
                    "requested_rewrite.prompt {:?} must hold exactly one {{}}",
                    rw.prompt
                ));
            }
            let req = request(
                rw.prompt,
                &rw.subject,
                Some(&rw.target_true.str),
                &rw.target_new.str,
            )?;
            if req.kind != EditKind::Modify {
                return Err("requested_rewrite.target_true.str is empty".into());
            }
            Ok(Case {
                id: r.case_id.unwrap_or(index as u64),
                request: req,
                paraphrases: r.paraphrase_prompts,
                neighbourhood: r.neighborhood_prompts,
                attribute: r.attribute_prompts,
                generation: r.generation_prompts,
                ..empty
            })
        }
        Schema::EasyEdit => {
            let r: EeRecord = field(record)?;
            let (template, subject) = locate(&r.prompt, &r.subject)?;
            let req = request(template, &subject, r.ground_truth.as_deref(), &r.target_new)?;
            let prompts = r
                .locality_prompt
                .map(OneOrMany::into_vec)
                .unwrap_or_default();
            let answers = r
                .locality_ground_truth
                .map(OneOrMany::into_vec)
                .unwrap_or_default();
            if !answers.is_empty() && answers.len() != prompts.len() {
                return Err(format!(
                    "{} locality prompts but {} locality answers",
                    prompts.len(),
                    answers.len()
                ));
            }
            let mut neighbourhood = Vec::new();
            let mut locality = Vec::new();
            for (i, p) in prompts.into_iter().enumerate() {
                // Without its own answer a locality prompt is a CounterFact
                // neighbour: its answer is the edit's true target.
                let answer = answers.get(i).or(r.ground_truth.as_ref());
                if let Some(a) = answer.filter(|a| !a.trim().is_empty()) {
                    let same = r.ground_truth.as_deref().map(str::trim) == Some(a.trim());
                    if same && req.kind == EditKind::Modify {
                        neighbourhood.push(p.clone());
                    }
                    locality.push(Locality {
                        prompt: p,
                        answer: with_leading_space(a),
                    });
                }
            }
            Ok(Case {
                id: r.case_id.unwrap_or(index as u64),
                request: req,
                paraphrases: r
                    .rephrase_prompt
                    .map(OneOrMany::into_vec)
                    .unwrap_or_default(),
                neighbourhood,
                locality,
                ..empty
            })
        }
        Schema::Zsre => {
            let r: ZsreRecord = field(record)?;
            let (template, subject) = locate(&r.src, &r.subject)?;
            // A true answer equal to the new one makes no modify: score it as an insert.
            let truth = r
                .answers
                .first()
                .filter(|a| a.trim() != r.alt.trim())
                .map(String::as_str);
            let req = request(template, &subject, truth, &r.alt)?;
            let locality = match (r.loc, r.loc_ans) {
                (Some(p), Some(a)) if !p.trim().is_empty() && !a.trim().is_empty() => {
                    vec![Locality {
                        prompt: p,
                        answer: with_leading_space(&a),
                    }]
                }
                _ => Vec::new(),
            };
            Ok(Case {
                id: r.case_id.unwrap_or(index as u64),
                request: req,
                paraphrases: r.rephrase.into_iter().collect(),
                locality,
                ..empty
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_from_formatted_prompts() {
        assert_eq!(
            template_of("When was IAAF Games founded?", "IAAF Games"),
            Some(("When was {} founded?".into(), "IAAF Games".into()))
        );
        assert_eq!(
            template_of("what family is ramalinaceae in?", "Ramalinaceae"),
            Some(("what family is {} in?".into(), "ramalinaceae".into()))
        );
        assert_eq!(template_of("no subject here", "Paris"), None);
        assert_eq!(template_of("Ä {} x", "x"), None);
        assert_eq!(
            template_of("Ünïcode Café is", "café"),
            Some(("Ünïcode {} is".into(), "Café".into()))
        );
    }
}
