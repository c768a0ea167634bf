//! What an edit asks for.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The three kinds of edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditKind {
    /// Replace the model's answer `target_true` with `target_new`.
    Modify,
    /// Add an answer where the model has none (`target_true` absent).
    Insert,
    /// Remove the answer `target_true` (unlikelihood objective).
    Erase,
}

/// One fact to edit: `prompt` with `{}` where the subject goes, e.g.
/// `"{} is located in the city of"` with subject `"The Eiffel Tower"`.
///
/// Targets are continuations of the prompt. Like the ROME and CounterFact
/// conventions, a target without leading whitespace gets one space
/// (`"Rome"` → `" Rome"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditRequest {
    /// Template with one `{}` for the subject.
    pub prompt: String,
    /// The subject whose fact is edited.
    pub subject: String,
    /// The new answer (modify, insert).
    pub target_new: Option<String>,
    /// The current answer (modify, erase).
    pub target_true: Option<String>,
    /// Modify, insert or erase.
    pub kind: EditKind,
    /// Other phrasings of the same question (formatted, no `{}`), reported on.
    #[serde(default)]
    pub paraphrases: Vec<String>,
    /// Prompts about other subjects whose answers must not change, reported on.
    #[serde(default)]
    pub neighbours: Vec<String>,
}

/// `" " + target` unless the target already starts with whitespace.
pub fn with_leading_space(target: &str) -> String {
    if target.starts_with(char::is_whitespace) {
        target.to_string()
    } else {
        format!(" {target}")
    }
}

impl EditRequest {
    fn new(
        prompt: &str,
        subject: &str,
        kind: EditKind,
        new: Option<&str>,
        old: Option<&str>,
    ) -> Self {
        Self {
            prompt: prompt.to_string(),
            subject: subject.to_string(),
            target_new: new.map(with_leading_space),
            target_true: old.map(with_leading_space),
            kind,
            paraphrases: Vec::new(),
            neighbours: Vec::new(),
        }
    }

    /// Change the answer from `target_true` to `target_new`.
    pub fn modify(prompt: &str, subject: &str, target_true: &str, target_new: &str) -> Self {
        Self::new(
            prompt,
            subject,
            EditKind::Modify,
            Some(target_new),
            Some(target_true),
        )
    }

    /// Teach an answer the model does not have.
    pub fn insert(prompt: &str, subject: &str, target_new: &str) -> Self {
        Self::new(prompt, subject, EditKind::Insert, Some(target_new), None)
    }

    /// Remove the answer `target_true`.
    pub fn erase(prompt: &str, subject: &str, target_true: &str) -> Self {
        Self::new(prompt, subject, EditKind::Erase, None, Some(target_true))
    }

    /// Adds paraphrase prompts (formatted, answered by the same target) to report on.
    pub fn with_paraphrases<S: AsRef<str>>(mut self, prompts: &[S]) -> Self {
        self.paraphrases = prompts.iter().map(|p| p.as_ref().to_string()).collect();
        self
    }

    /// Adds neighbour prompts (other subjects, answers must stay) to report on.
    pub fn with_neighbours<S: AsRef<str>>(mut self, prompts: &[S]) -> Self {
        self.neighbours = prompts.iter().map(|p| p.as_ref().to_string()).collect();
        self
    }

    /// The prompt with the subject filled in.
    pub fn formatted_prompt(&self) -> String {
        self.prompt.replacen("{}", &self.subject, 1)
    }

    /// The target the optimisation drives towards (modify, insert) or away
    /// from (erase).
    pub fn objective_target(&self) -> &str {
        match self.kind {
            EditKind::Erase => self.target_true.as_deref().unwrap_or_default(),
            _ => self.target_new.as_deref().unwrap_or_default(),
        }
    }

    /// Checks the request on its own (before any model work).
    pub fn validate(&self) -> Result<()> {
        if !self.prompt.contains("{}") {
            return Err(Error::invalid(
                "edit prompt",
                format!("{:?} has no {{}} where the subject goes", self.prompt),
            ));
        }
        if self.prompt.matches("{}").count() > 1 {
            return Err(Error::invalid(
                "edit prompt",
                format!(
                    "{:?} has more than one {{}}: the subject goes in exactly one place",
                    self.prompt
                ),
            ));
        }
        if self.subject.trim().is_empty() {
            return Err(Error::invalid("edit subject", "it is empty"));
        }
        let present = |t: &Option<String>, name: &str| -> Result<()> {
            match t {
                Some(s) if !s.trim().is_empty() => Ok(()),
                Some(_) => Err(Error::invalid(name, "it is empty or whitespace")),
                None => Err(Error::invalid(
                    name,
                    format!("a {:?} edit needs one", self.kind),
                )),
            }
        };
        match self.kind {
            EditKind::Modify => {
                present(&self.target_new, "target_new")?;
                present(&self.target_true, "target_true")?;
                let (a, b) = (
                    self.target_new.as_deref().unwrap_or_default(),
                    self.target_true.as_deref().unwrap_or_default(),
                );
                if a.trim() == b.trim() {
                    return Err(Error::invalid(
                        "target_new",
                        format!("{a:?} equals target_true"),
                    ));
                }
            }
            EditKind::Insert => {
                present(&self.target_new, "target_new")?;
                if self.target_true.is_some() {
                    return Err(Error::invalid(
                        "target_true",
                        "an insert has no current answer; use modify",
                    ));
                }
            }
            EditKind::Erase => present(&self.target_true, "target_true")?,
        }
        // Probes are reported on after the edit; an empty one would only
        // fail there, after the weights changed.
        let probes = [
            ("paraphrase", &self.paraphrases),
            ("neighbour", &self.neighbours),
        ];
        for (kind, prompts) in probes {
            if let Some(i) = prompts.iter().position(|p| p.trim().is_empty()) {
                return Err(Error::invalid(
                    format!("{kind} {i} of the request"),
                    "it is empty or whitespace",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_get_a_leading_space() {
        let r = EditRequest::modify("{} is in", "Paris", "France", " Italy");
        assert_eq!(r.target_true.as_deref(), Some(" France"));
        assert_eq!(r.target_new.as_deref(), Some(" Italy"));
        assert_eq!(r.formatted_prompt(), "Paris is in");
    }

    #[test]
    fn empty_probes_are_named() {
        let r = EditRequest::modify("{} is in", "Paris", "France", "Italy")
            .with_paraphrases(&["Paris lies in", " "]);
        let e = r.validate().unwrap_err().to_string();
        assert!(e.contains("paraphrase 1 of the request"), "{e}");
        let r = EditRequest::modify("{} is in", "Paris", "France", "Italy").with_neighbours(&[""]);
        let e = r.validate().unwrap_err().to_string();
        assert!(e.contains("neighbour 0 of the request"), "{e}");
    }

    #[test]
    fn invalid_requests_are_rejected() {
        assert!(EditRequest::modify("no placeholder", "x", "a", "b")
            .validate()
            .is_err());
        assert!(EditRequest::modify("{} is", " ", "a", "b")
            .validate()
            .is_err());
        assert!(EditRequest::modify("{} is", "x", "Rome", " Rome")
            .validate()
            .is_err());
        assert!(EditRequest::insert("{} is", "x", "   ").validate().is_err());
        assert!(EditRequest::erase("{} is", "x", "a").validate().is_ok());
    }
}
