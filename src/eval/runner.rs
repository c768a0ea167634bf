//! The evaluation runner: edits a slice of cases with a method in one of
//! three modes, measures before and after, and writes the results as it
//! goes so that an interrupted run resumes where it stopped.
//!
//! Files in the output directory:
//!
//! - `run.json`: the settings; a rerun with other settings is refused.
//! - `cases.jsonl`: one [`CaseLine`] per case (per case and checkpoint in
//!   sequential mode), appended as each is done.
//! - `pre.jsonl`, `deltas.jsonl`, `deltas/`: batch and sequential modes
//!   only: the unedited model's metrics and every applied delta, so that a
//!   rerun replays the edits instead of recomputing them.
//! - `summary.json` ([`Summary`]), `details.json` ([`Report`]) and
//!   `summary.md` (the Markdown table), written at the end.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::data::Case;
use super::measure::{measure, CaseMetrics, MeasureOptions};
use super::metrics;
use crate::edit::{BatchMethod, Delta, EditId, EditRequest, Editor};
use crate::{Error, Result};

/// An editing method the runner can evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// ROME: one rank-one update per request, at the editor's layer.
    Rome,
    /// MEMIT: one joint update of all requests of a call over the editor's
    /// MEMIT window ([`Editor::memit_hparams`]).
    Memit,
    /// AlphaEdit: like MEMIT, confined to the null space of the key
    /// statistics and preserving the keys of earlier AlphaEdit edits.
    #[serde(rename = "alphaedit")]
    AlphaEdit,
}

impl Method {
    /// The method's name (as on the command line).
    pub fn name(self) -> &'static str {
        match self {
            Method::Rome => "rome",
            Method::Memit => "memit",
            Method::AlphaEdit => "alphaedit",
        }
    }

    /// The editor's batch method behind this one (`None` for ROME).
    pub fn batch_method(self) -> Option<BatchMethod> {
        match self {
            Method::Rome => None,
            Method::Memit => Some(BatchMethod::Memit),
            Method::AlphaEdit => Some(BatchMethod::AlphaEdit),
        }
    }

    /// How many requests one call of [`Method::apply`] can take as one
    /// joint update (ROME edits one fact at a time; MEMIT and AlphaEdit
    /// take everything up to the next checkpoint: in batch mode all cases
    /// at once, in sequential mode batches of `every`).
    pub fn max_batch(self) -> usize {
        match self {
            Method::Rome => 1,
            Method::Memit | Method::AlphaEdit => usize::MAX,
        }
    }

    /// Applies the requests to the editor's model (journaled, so each can
    /// be undone), returning one entry per applied delta.
    pub fn apply(self, editor: &mut Editor, requests: &[EditRequest]) -> Result<Vec<AppliedEdit>> {
        match self {
            Method::Memit => apply_batch_method(editor, BatchMethod::Memit, requests),
            Method::AlphaEdit => apply_batch_method(editor, BatchMethod::AlphaEdit, requests),
            Method::Rome => {
                let mut out = Vec::with_capacity(requests.len());
                for req in requests {
                    let t = Instant::now();
                    let a = match editor.apply(req) {
                        Ok(a) => a,
                        Err(e) => {
                            // Leave nothing half-done: undo this call's edits.
                            for done in out.iter().rev() {
                                let done: &AppliedEdit = done;
                                editor.undo(done.id)?;
                            }
                            return Err(e);
                        }
                    };
                    out.push(AppliedEdit {
                        id: a.id,
                        stats: EditStats {
                            seconds: t.elapsed().as_secs_f64(),
                            delta_norm: a.report.delta_norm,
                            rewrite_error: a.report.rewrite_error,
                            final_loss: a.report.losses.last().copied(),
                            steps: a.report.losses.len(),
                            reused: false,
                        },
                        delta: a.delta,
                    });
                }
                Ok(out)
            }
        }
    }
}

/// One joint update of all requests by a batch method: one delta (undone
/// as a whole) whose stats stand for every case of the batch.
fn apply_batch_method(
    editor: &mut Editor,
    method: BatchMethod,
    requests: &[EditRequest],
) -> Result<Vec<AppliedEdit>> {
    let t = Instant::now();
    let done = editor.apply_batch(method, requests)?;
    let finals: Vec<f32> = done
        .report
        .losses
        .iter()
        .filter_map(|l| l.last().copied())
        .collect();
    let stats = EditStats {
        seconds: t.elapsed().as_secs_f64(),
        delta_norm: done.report.delta_norm,
        rewrite_error: done.report.rewrite_error,
        final_loss: (!finals.is_empty()).then(|| finals.iter().sum::<f32>() / finals.len() as f32),
        steps: done.report.losses.iter().map(Vec::len).max().unwrap_or(0),
        reused: false,
    };
    Ok(vec![AppliedEdit {
        id: done.id,
        delta: done.delta,
        stats,
    }])
}

impl FromStr for Method {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "rome" => Ok(Method::Rome),
            "memit" => Ok(Method::Memit),
            "alphaedit" => Ok(Method::AlphaEdit),
            _ => Err(Error::invalid(
                "method",
                format!("{s:?} is not a method kedit evaluates (known: rome, memit, alphaedit)"),
            )),
        }
    }
}

/// A delta applied by [`Method::apply`].
#[derive(Debug, Clone)]
pub struct AppliedEdit {
    /// Its id in the editor's journal.
    pub id: EditId,
    /// The update.
    pub delta: Delta,
    /// What it took.
    pub stats: EditStats,
}

/// Cost and diagnostics of one applied delta. A batch method's one delta
/// covers all cases of its batch: each of them reports the batch's stats
/// (seconds of the whole batch, mean final loss, most steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditStats {
    /// Wall time of the edit (statistics included when first computed).
    pub seconds: f64,
    /// Frobenius norm of ΔW.
    pub delta_norm: f32,
    /// `‖W' k − v‖ / ‖v‖` after the update.
    pub rewrite_error: f32,
    /// Loss at the last optimisation step.
    pub final_loss: Option<f32>,
    /// Optimisation steps taken.
    pub steps: usize,
    /// The delta was read from an earlier run, not computed.
    #[serde(default)]
    pub reused: bool,
}

/// How edits and measurements interleave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Per case: measure, edit, measure, undo.
    Single,
    /// Measure every case, apply all edits, measure every case.
    Batch,
    /// Edits accumulate; every case edited so far is measured after every
    /// `every` edits and at the end (a curve).
    Sequential {
        /// Edits between checkpoints.
        every: usize,
    },
}

impl Mode {
    /// The numbers of applied edits after which cases are measured.
    fn checkpoints(self, n: usize) -> Vec<usize> {
        match self {
            Mode::Single => Vec::new(),
            Mode::Batch => vec![n],
            Mode::Sequential { every } => {
                let every = every.max(1);
                let mut v: Vec<usize> = (1..=n / every).map(|i| i * every).collect();
                if v.last() != Some(&n) {
                    v.push(n);
                }
                v
            }
        }
    }
}

impl FromStr for Mode {
    type Err = Error;

    /// `single`, `batch`, `sequential` (checkpoints every 50 edits) or
    /// `sequential:N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "mode",
                format!("{s:?} is not single, batch, sequential or sequential:N"),
            )
        };
        match s.to_ascii_lowercase().as_str() {
            "single" => Ok(Mode::Single),
            "batch" => Ok(Mode::Batch),
            "sequential" => Ok(Mode::Sequential { every: 50 }),
            other => {
                let every = other
                    .strip_prefix("sequential:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(bad)?;
                Ok(Mode::Sequential { every })
            }
        }
    }
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The editing method.
    pub method: Method,
    /// Single, batch or sequential.
    pub mode: Mode,
    /// Where the results go (created if needed).
    pub out_dir: PathBuf,
    /// Fluency length and scoring batch size.
    pub measure: MeasureOptions,
    /// Anything else that identifies the run (data file, corpus, …):
    /// stored in `run.json` and compared on resume.
    pub description: serde_json::Value,
    /// Show a progress bar (on a terminal; elsewhere one line per case).
    pub progress: bool,
    /// Single mode: the `deltas` directory of an earlier run whose saved
    /// per-case deltas are applied instead of recomputed (a delta is used
    /// only when it was made for this model and this case's request), e.g.
    /// to add fluency to a finished run without editing again.
    pub reuse_deltas: Option<PathBuf>,
}

impl RunOptions {
    /// ROME in single-edit mode into `out_dir`, fluency at the default length.
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        Self {
            method: Method::Rome,
            mode: Mode::Single,
            out_dir: out_dir.into(),
            measure: MeasureOptions::default(),
            description: serde_json::Value::Null,
            progress: true,
            reuse_deltas: None,
        }
    }
}

/// One line of `cases.jsonl`: a case measured before and after editing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseLine {
    /// The case id.
    pub id: u64,
    /// Its record index in the data file.
    pub record: usize,
    /// Edits applied when `post` was measured (1 in single mode).
    pub edits: usize,
    /// The subject.
    pub subject: String,
    /// The edit prompt, formatted.
    pub prompt: String,
    /// The true target.
    pub target_true: Option<String>,
    /// The new target.
    pub target_new: Option<String>,
    /// On the unedited model.
    pub pre: CaseMetrics,
    /// On the edited model.
    pub post: CaseMetrics,
    /// The case's own edit.
    pub edit: Option<EditStats>,
    /// Why the case's edit failed (then it was not applied).
    pub error: Option<String>,
    /// Seconds spent on this line (measurements and, in single mode, the edit).
    pub seconds: f64,
}

/// A metric before and after editing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PrePost {
    /// Unedited model.
    pub pre: Option<f64>,
    /// Edited model.
    pub post: Option<f64>,
}

/// `summary.json`: the CounterFact metrics averaged over cases.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of cases.
    pub n: usize,
    /// Efficacy success (ES).
    pub efficacy: PrePost,
    /// Paraphrase success (PS).
    pub paraphrase: PrePost,
    /// Neighbourhood success (NS).
    pub neighborhood: PrePost,
    /// Efficacy magnitude (EM).
    pub efficacy_magnitude: PrePost,
    /// Paraphrase magnitude (PM).
    pub paraphrase_magnitude: PrePost,
    /// Neighbourhood magnitude (NM).
    pub neighborhood_magnitude: PrePost,
    /// S: harmonic mean of ES, PS and NS.
    pub score: PrePost,
    /// Mean n-gram entropy of generations.
    pub fluency: PrePost,
    /// Seconds of work behind these numbers (summed over resumed runs).
    pub seconds: f64,
}

/// Top-1 token accuracies averaged over cases (the zsRE metrics).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Accuracies {
    /// New target on the edit prompt.
    pub edit: PrePost,
    /// New target on the paraphrases.
    pub paraphrase: PrePost,
    /// Locality answers on their prompts.
    pub locality: PrePost,
    /// Locality top-1 tokens unchanged by the edit (post only).
    pub locality_agreement: PrePost,
}

/// The metrics after one number of edits (sequential mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Edits applied.
    pub edits: usize,
    /// CounterFact metrics over the cases edited so far.
    pub summary: Summary,
    /// Accuracies over the same cases.
    pub accuracy: Accuracies,
}

/// `details.json`: the summary with the accuracies, settings and costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The CounterFact metrics (also `summary.json`).
    pub summary: Summary,
    /// The top-1 accuracies.
    pub accuracy: Accuracies,
    /// The method's name.
    pub method: String,
    /// The mode.
    pub mode: Mode,
    /// The edited layers (ROME: one; MEMIT / AlphaEdit: the window).
    pub layers: Vec<usize>,
    /// Tokens generated per prompt for fluency (0: off).
    pub fluency_tokens: usize,
    /// Cases whose edit failed (scored as unedited).
    pub failed: usize,
    /// Seconds per edit (per batch edit in batch / sequential modes).
    pub edit_seconds: EditSeconds,
    /// Batch and sequential modes: the metrics at each checkpoint.
    pub checkpoints: Vec<Checkpoint>,
    /// The run's description (data, corpus, …).
    pub description: serde_json::Value,
}

/// Mean and median of the seconds per edit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EditSeconds {
    /// Mean (none without edits).
    pub mean: Option<f64>,
    /// Median (the mean of the two middle values for an even count).
    pub median: Option<f64>,
}

fn mean_of(lines: &[CaseLine], f: impl Fn(&CaseMetrics) -> Option<f64>) -> PrePost {
    let pre: Vec<f64> = lines.iter().filter_map(|l| f(&l.pre)).collect();
    let post: Vec<f64> = lines.iter().filter_map(|l| f(&l.post)).collect();
    PrePost {
        pre: metrics::mean(&pre),
        post: metrics::mean(&post),
    }
}

/// Averages case lines: each metric over the cases that have it; S from
/// the averaged rates. `seconds` is left 0.
pub fn summarize(lines: &[CaseLine]) -> (Summary, Accuracies) {
    let efficacy = mean_of(lines, |m| m.efficacy);
    let paraphrase = mean_of(lines, |m| m.paraphrase);
    let neighborhood = mean_of(lines, |m| m.neighborhood);
    let hm = |get: fn(&PrePost) -> Option<f64>| -> Option<f64> {
        metrics::harmonic_mean(&[get(&efficacy)?, get(&paraphrase)?, get(&neighborhood)?])
    };
    let score = PrePost {
        pre: hm(|p| p.pre),
        post: hm(|p| p.post),
    };
    let summary = Summary {
        n: lines.len(),
        efficacy,
        paraphrase,
        neighborhood,
        efficacy_magnitude: mean_of(lines, |m| m.efficacy_magnitude),
        paraphrase_magnitude: mean_of(lines, |m| m.paraphrase_magnitude),
        neighborhood_magnitude: mean_of(lines, |m| m.neighborhood_magnitude),
        score,
        fluency: mean_of(lines, |m| m.fluency),
        seconds: 0.0,
    };
    let accuracy = Accuracies {
        edit: mean_of(lines, |m| m.edit_accuracy),
        paraphrase: mean_of(lines, |m| m.paraphrase_accuracy),
        locality: mean_of(lines, |m| m.locality_accuracy),
        locality_agreement: mean_of(lines, |m| m.locality_agreement),
    };
    (summary, accuracy)
}

fn cell(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{v:.3}"))
}

impl Report {
    /// The results as Markdown: a metric × (pre, post) table, the settings
    /// and, for sequential runs, the curve.
    pub fn markdown(&self) -> String {
        let s = &self.summary;
        let a = &self.accuracy;
        let fluency = if self.fluency_tokens > 0 {
            format!("fluency (n-gram entropy, {} tokens)", self.fluency_tokens)
        } else {
            "fluency (off)".into()
        };
        let rows: [(&str, PrePost); 12] = [
            ("efficacy success (ES)", s.efficacy),
            ("paraphrase success (PS)", s.paraphrase),
            ("neighbourhood success (NS)", s.neighborhood),
            ("efficacy magnitude (EM)", s.efficacy_magnitude),
            ("paraphrase magnitude (PM)", s.paraphrase_magnitude),
            ("neighbourhood magnitude (NM)", s.neighborhood_magnitude),
            ("score S", s.score),
            (&fluency, s.fluency),
            ("edit top-1 accuracy", a.edit),
            ("paraphrase top-1 accuracy", a.paraphrase),
            ("locality top-1 accuracy", a.locality),
            ("locality agreement with unedited", a.locality_agreement),
        ];
        let mut out = String::new();
        let _ = writeln!(out, "| metric | pre | post |\n| --- | ---: | ---: |");
        for (name, v) in rows {
            if v.pre.is_some() || v.post.is_some() {
                let _ = writeln!(out, "| {name} | {} | {} |", cell(v.pre), cell(v.post));
            }
        }
        let _ = writeln!(
            out,
            "\n{} cases, method {}, mode {}, {} {}, {} failed edits, {:.0} s{}",
            s.n,
            self.method,
            match self.mode {
                Mode::Single => "single".to_string(),
                Mode::Batch => "batch".to_string(),
                Mode::Sequential { every } => format!("sequential (every {every})"),
            },
            if self.layers.len() == 1 {
                "layer"
            } else {
                "layers"
            },
            self.layers
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            self.failed,
            s.seconds,
            match (self.edit_seconds.mean, self.edit_seconds.median) {
                // In batch and sequential modes every case of a batch
                // carries its batch's time: say so rather than "per edit".
                (Some(m), Some(med)) => match self.mode {
                    Mode::Single => format!(" (per edit: mean {m:.1} s, median {med:.1} s)"),
                    _ => format!(" (per batch update: mean {m:.1} s, median {med:.1} s)"),
                },
                _ => String::new(),
            }
        );
        if self.checkpoints.len() > 1 {
            let _ = writeln!(
                out,
                "\n| edits | ES | PS | NS | S | fluency | edit acc. | locality acc. |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            for c in &self.checkpoints {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    c.edits,
                    cell(c.summary.efficacy.post),
                    cell(c.summary.paraphrase.post),
                    cell(c.summary.neighborhood.post),
                    cell(c.summary.score.post),
                    cell(c.summary.fluency.post),
                    cell(c.accuracy.edit.post),
                    cell(c.accuracy.locality.post),
                );
            }
        }
        out
    }
}

/// Reads a JSON-lines file written by the runner. A last line cut short
/// by an interruption is dropped (and cut from the file); any other bad
/// line is an error naming the file and line.
fn read_lines<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    if complete.len() != text.len() {
        eprintln!(
            "kedit eval: dropping an unfinished last line of {}",
            path.display()
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        f.set_len(complete.len() as u64)
            .map_err(|e| Error::io(path, e))?;
    }
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Format {
                path: path.to_path_buf(),
                format: "kedit evaluation JSON lines",
                reason: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// Appends `value` as one JSON line and returns it as read back, so that
/// a resumed run computes from exactly the numbers a fresh one does.
fn append_line<T: Serialize + DeserializeOwned>(path: &Path, value: T) -> Result<T> {
    let mut line =
        serde_json::to_string(&value).map_err(|e| Error::invalid("result line", e.to_string()))?;
    let back: T =
        serde_json::from_str(&line).map_err(|e| Error::invalid("result line", e.to_string()))?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(line.as_bytes())
        .and_then(|_| f.flush())
        .map_err(|e| Error::io(path, e))?;
    Ok(back)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| Error::invalid("report", e.to_string()))?;
    write_text(path, &(text + "\n"))
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunConfig {
    method: Method,
    mode: Mode,
    model: String,
    hparams: serde_json::Value,
    fluency_tokens: usize,
    description: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PreLine {
    id: u64,
    metrics: CaseMetrics,
    seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeltaEntry {
    ids: Vec<u64>,
    files: Vec<String>,
    stats: Vec<EditStats>,
    error: Option<String>,
    seconds: f64,
}

impl DeltaEntry {
    /// The stats of the entry's `i`-th case: its own delta's, or the one
    /// delta of a batch method shared by all its cases.
    fn stats_of(&self, i: usize) -> Option<EditStats> {
        match self.stats.len() {
            1 => self.stats.first().cloned(),
            _ => self.stats.get(i).cloned(),
        }
    }
}

/// Errors of one request (it cannot be edited) are recorded and the run
/// goes on; errors of files, tensors or the model stop it.
fn is_case_error(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidInput { .. } | Error::NonFinite(_) | Error::Tokenizer(_)
    )
}

struct Progress {
    bar: ProgressBar,
    lines: bool,
}

impl Progress {
    fn new(show: bool, total: usize, what: &str) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if show && terminal {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta}] {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(what.to_string());
            b
        } else {
            ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::hidden())
        };
        Self {
            bar,
            lines: show && !terminal,
        }
    }

    fn step(&self, msg: String) {
        if self.lines {
            eprintln!(
                "[{}/{}] {msg}",
                self.bar.position() + 1,
                self.bar.length().unwrap_or(0)
            );
        }
        self.bar.set_message(msg);
        self.bar.inc(1);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn running_means(lines: &[CaseLine]) -> String {
    let (s, a) = summarize(lines);
    let f = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.2}"));
    let mut m = String::new();
    if s.efficacy.post.is_some() {
        let _ = write!(
            m,
            "ES {}→{} PS {}→{} NS {}→{}",
            f(s.efficacy.pre),
            f(s.efficacy.post),
            f(s.paraphrase.pre),
            f(s.paraphrase.post),
            f(s.neighborhood.pre),
            f(s.neighborhood.post)
        );
    }
    if s.fluency.post.is_some() {
        let _ = write!(m, " flu {}→{}", f(s.fluency.pre), f(s.fluency.post));
    }
    if a.locality.post.is_some() {
        let _ = write!(
            m,
            " acc {}/{}/{}",
            f(a.edit.post),
            f(a.paraphrase.post),
            f(a.locality.post)
        );
    }
    m
}

fn line_for(case: &Case, edits: usize, pre: CaseMetrics, post: CaseMetrics) -> CaseLine {
    let req = &case.request;
    CaseLine {
        id: case.id,
        record: case.record,
        edits,
        subject: req.subject.clone(),
        prompt: req.formatted_prompt(),
        target_true: req.target_true.clone(),
        target_new: req.target_new.clone(),
        pre,
        post,
        edit: None,
        error: None,
        seconds: 0.0,
    }
}

/// Runs an evaluation of `cases` (a slice of a dataset) with the editor's
/// model and hyper-parameters, writing into `opts.out_dir`, and returns
/// the report. Cases already in the directory's `cases.jsonl` are not
/// redone. In batch and sequential modes the editor must hold no edits.
pub fn run(editor: &mut Editor, cases: &[Case], opts: &RunOptions) -> Result<Report> {
    let started = Instant::now();
    // Settings are checked once, before any case: an invalid one is the
    // run's error, not a failed edit of every case.
    let layers = match opts.method.batch_method() {
        None => editor.check_rome_settings()?,
        Some(method) => editor.check_batch_settings(method)?,
    };
    let mut seen = HashSet::new();
    if let Some(c) = cases.iter().find(|c| !seen.insert(c.id)) {
        return Err(Error::invalid(
            "cases",
            format!("case id {} occurs twice in the slice", c.id),
        ));
    }
    let dir = &opts.out_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = RunConfig {
        method: opts.method,
        mode: opts.mode,
        model: editor.model().fingerprint().to_string(),
        hparams: serde_json::to_value(editor.hparams()).unwrap_or_default(),
        fluency_tokens: opts.measure.fluency_tokens,
        description: opts.description.clone(),
    };
    let config_path = dir.join("run.json");
    if config_path.exists() {
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let old: RunConfig = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: config_path.clone(),
            format: "kedit run settings",
            reason: e.to_string(),
        })?;
        if old != config {
            return Err(Error::invalid(
                "output directory",
                format!(
                    "{} holds a run with other settings (see its run.json); choose another directory",
                    dir.display()
                ),
            ));
        }
    } else {
        write_json(&config_path, &config)?;
    }

    let (lines, mut checkpoints, extra_seconds) = match opts.mode {
        Mode::Single => (run_single(editor, cases, opts)?, Vec::new(), 0.0),
        Mode::Batch | Mode::Sequential { .. } => run_accumulating(editor, cases, opts)?,
    };
    let (mut summary, accuracy) = summarize(&lines);
    let mut edit_times: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.edit.as_ref().map(|e| e.seconds))
        .collect();
    edit_times.sort_by(f64::total_cmp);
    let median = match edit_times.len() {
        0 => None,
        n if n % 2 == 1 => Some(edit_times[n / 2]),
        n => Some(0.5 * (edit_times[n / 2 - 1] + edit_times[n / 2])),
    };
    summary.seconds = lines.iter().map(|l| l.seconds).sum::<f64>() + extra_seconds;
    for c in &mut checkpoints {
        c.summary.seconds = summary.seconds;
    }
    let report = Report {
        summary: summary.clone(),
        accuracy,
        method: opts.method.name().into(),
        mode: opts.mode,
        layers,
        fluency_tokens: opts.measure.fluency_tokens,
        failed: lines.iter().filter(|l| l.error.is_some()).count(),
        edit_seconds: EditSeconds {
            mean: metrics::mean(&edit_times),
            median,
        },
        checkpoints,
        description: opts.description.clone(),
    };
    write_json(&dir.join("summary.json"), &summary)?;
    write_json(&dir.join("details.json"), &report)?;
    write_text(&dir.join("summary.md"), &report.markdown())?;
    if opts.progress {
        eprintln!(
            "kedit eval: {} cases in {:.0} s this run; results in {}",
            lines.len(),
            started.elapsed().as_secs_f64(),
            dir.display()
        );
    }
    Ok(report)
}

fn run_single(editor: &mut Editor, cases: &[Case], opts: &RunOptions) -> Result<Vec<CaseLine>> {
    let path = opts.out_dir.join("cases.jsonl");
    let ids: HashSet<u64> = cases.iter().map(|c| c.id).collect();
    let mut done: HashMap<u64, CaseLine> = read_lines::<CaseLine>(&path)?
        .into_iter()
        .filter(|l| ids.contains(&l.id))
        .map(|l| (l.id, l))
        .collect();
    let todo: Vec<&Case> = cases.iter().filter(|c| !done.contains_key(&c.id)).collect();
    if opts.progress && !done.is_empty() {
        eprintln!(
            "kedit eval: resuming: {} of {} cases already in {}",
            done.len(),
            cases.len(),
            path.display()
        );
    }
    let mut lines: Vec<CaseLine> = cases
        .iter()
        .filter_map(|c| done.get(&c.id).cloned())
        .collect();
    let delta_dir = opts.out_dir.join("deltas");
    std::fs::create_dir_all(&delta_dir).map_err(|e| Error::io(&delta_dir, e))?;
    let progress = Progress::new(opts.progress, todo.len(), opts.method.name());
    for case in todo {
        let t = Instant::now();
        let pre = measure(editor.model(), &[case], &opts.measure)?.remove(0);
        let outcome = match saved_delta(editor, opts, case)? {
            Some(delta) => {
                let t = Instant::now();
                let id = editor.apply_delta(&delta)?;
                let stats = EditStats {
                    seconds: t.elapsed().as_secs_f64(),
                    delta_norm: delta.norm()?,
                    rewrite_error: editor.rewrite_error(&delta)?,
                    final_loss: None,
                    steps: 0,
                    reused: true,
                };
                Ok(vec![AppliedEdit { id, delta, stats }])
            }
            None => opts
                .method
                .apply(editor, std::slice::from_ref(&case.request)),
        };
        let mut line = match outcome {
            Ok(applied) => {
                let measured = (|| -> Result<CaseMetrics> {
                    // Kept so that the case can be re-measured without re-editing.
                    for (i, a) in applied.iter().enumerate() {
                        let file = format!("case-{}-{i}.safetensors", case.id);
                        a.delta.save(&delta_dir.join(file))?;
                    }
                    Ok(measure(editor.model(), &[case], &opts.measure)?.remove(0))
                })();
                // Undone even when measuring failed: the editor stays clean.
                for a in applied.iter().rev() {
                    editor.undo(a.id)?;
                }
                let mut post = measured?;
                post.compare_locality(&pre);
                let mut line = line_for(case, 1, pre, post);
                line.edit = applied.into_iter().next().map(|a| a.stats);
                line
            }
            Err(e) if is_case_error(&e) => {
                let mut post = pre.clone();
                post.compare_locality(&pre);
                let mut line = line_for(case, 1, pre, post);
                line.error = Some(e.to_string());
                line
            }
            Err(e) => return Err(e),
        };
        line.seconds = t.elapsed().as_secs_f64();
        let line = append_line(&path, line)?;
        lines.push(line.clone());
        done.insert(line.id, line.clone());
        let status = match &line.error {
            Some(e) => format!("case {} failed: {e}", line.id),
            None => format!(
                "case {} {:.0}s | mean of {}: {}",
                line.id,
                line.seconds,
                lines.len(),
                running_means(&lines)
            ),
        };
        progress.step(status);
    }
    progress.finish();
    // In the slice's order.
    Ok(cases.iter().filter_map(|c| done.remove(&c.id)).collect())
}

/// The delta of `case` saved by an earlier single-mode run, if
/// [`RunOptions::reuse_deltas`] names one that fits this model and request.
fn saved_delta(editor: &Editor, opts: &RunOptions, case: &Case) -> Result<Option<Delta>> {
    let Some(dir) = &opts.reuse_deltas else {
        return Ok(None);
    };
    let path = dir.join(format!("case-{}-0.safetensors", case.id));
    if !path.is_file() {
        return Ok(None);
    }
    let delta = Delta::load(&path)?;
    let fits = delta.info.model_fingerprint == editor.model().fingerprint()
        && delta.info.method == opts.method.name()
        && delta.info.requests.len() == 1
        && delta.info.requests[0] == case.request;
    Ok(fits.then_some(delta))
}

/// Cases measured per call of [`measure`] in batch and sequential modes.
const MEASURE_GROUP: usize = 8;

fn run_accumulating(
    editor: &mut Editor,
    cases: &[Case],
    opts: &RunOptions,
) -> Result<(Vec<CaseLine>, Vec<Checkpoint>, f64)> {
    if editor.edits().next().is_some() {
        return Err(Error::invalid(
            "editor",
            "batch and sequential evaluation need an editor without applied edits",
        ));
    }
    let dir = &opts.out_dir;
    let n = cases.len();
    let ids: HashSet<u64> = cases.iter().map(|c| c.id).collect();

    // 1. The unedited model.
    let pre_path = dir.join("pre.jsonl");
    let mut pre: HashMap<u64, PreLine> = read_lines::<PreLine>(&pre_path)?
        .into_iter()
        .filter(|l| ids.contains(&l.id))
        .map(|l| (l.id, l))
        .collect();
    let todo: Vec<&Case> = cases.iter().filter(|c| !pre.contains_key(&c.id)).collect();
    let progress = Progress::new(opts.progress, todo.len(), "pre");
    for group in todo.chunks(MEASURE_GROUP) {
        let t = Instant::now();
        let m = measure(editor.model(), group, &opts.measure)?;
        let share = t.elapsed().as_secs_f64() / group.len() as f64;
        for (case, metrics) in group.iter().zip(m) {
            let line = PreLine {
                id: case.id,
                metrics,
                seconds: share,
            };
            let line = append_line(&pre_path, line)?;
            pre.insert(case.id, line);
            progress.step(format!("case {} (unedited)", case.id));
        }
    }
    progress.finish();

    // 2. Replay the edits already made.
    let deltas_path = dir.join("deltas.jsonl");
    let delta_dir = dir.join("deltas");
    std::fs::create_dir_all(&delta_dir).map_err(|e| Error::io(&delta_dir, e))?;
    let entries: Vec<DeltaEntry> = read_lines(&deltas_path)?;
    let mut applied = 0usize;
    for entry in &entries {
        let expected: Vec<u64> = cases
            .iter()
            .skip(applied)
            .take(entry.ids.len())
            .map(|c| c.id)
            .collect();
        if expected != entry.ids {
            return Err(Error::invalid(
                "output directory",
                format!(
                    "{} holds edits of cases {:?} where this slice has {:?}; choose another directory",
                    dir.display(),
                    entry.ids,
                    expected
                ),
            ));
        }
        for file in &entry.files {
            let delta = Delta::load(&delta_dir.join(file))?;
            editor.apply_delta(&delta)?;
        }
        applied += entry.ids.len();
    }
    if opts.progress && applied > 0 {
        eprintln!("kedit eval: resuming: replayed the edits of {applied} cases");
    }
    let mut edit_info: HashMap<u64, (Option<EditStats>, Option<String>)> = HashMap::new();
    let mut edit_seconds: f64 = 0.0;
    for e in &entries {
        edit_seconds += e.seconds;
        for (i, id) in e.ids.iter().enumerate() {
            edit_info.insert(*id, (e.stats_of(i), e.error.clone()));
        }
    }

    // 3. Edit up to each checkpoint, then measure every case edited so far.
    let cases_path = dir.join("cases.jsonl");
    let mut lines: HashMap<(usize, u64), CaseLine> = read_lines::<CaseLine>(&cases_path)?
        .into_iter()
        .filter(|l| ids.contains(&l.id))
        .map(|l| ((l.edits, l.id), l))
        .collect();
    let marks = opts.mode.checkpoints(n);
    let progress = Progress::new(opts.progress, n - applied, opts.method.name());
    let mut k = applied;
    loop {
        if marks.contains(&k) {
            progress
                .bar
                .set_message(format!("measuring {k} cases after {k} edits"));
            let todo: Vec<&Case> = cases[..k]
                .iter()
                .filter(|c| !lines.contains_key(&(k, c.id)))
                .collect();
            for group in todo.chunks(MEASURE_GROUP) {
                let t = Instant::now();
                let m = measure(editor.model(), group, &opts.measure)?;
                let share = t.elapsed().as_secs_f64() / group.len() as f64;
                for (case, mut post) in group.iter().zip(m) {
                    let pre_m = pre
                        .get(&case.id)
                        .map(|p| p.metrics.clone())
                        .unwrap_or_default();
                    post.compare_locality(&pre_m);
                    let mut line = line_for(case, k, pre_m, post);
                    if let Some((stats, error)) = edit_info.get(&case.id) {
                        line.edit = stats.clone();
                        line.error = error.clone();
                    }
                    line.seconds = share;
                    let line = append_line(&cases_path, line)?;
                    lines.insert((k, case.id), line);
                }
            }
            if opts.progress && marks.len() > 1 {
                let now: Vec<CaseLine> = cases[..k]
                    .iter()
                    .filter_map(|c| lines.get(&(k, c.id)).cloned())
                    .collect();
                progress
                    .bar
                    .println(format!("after {k} edits: {}", running_means(&now)));
                if progress.lines {
                    eprintln!("after {k} edits: {}", running_means(&now));
                }
            }
        }
        if k == n {
            break;
        }
        let next_mark = marks.iter().copied().find(|&m| m > k).unwrap_or(n);
        let step = opts.method.max_batch().max(1).min(next_mark - k);
        let group = &cases[k..k + step];
        let requests: Vec<EditRequest> = group.iter().map(|c| c.request.clone()).collect();
        let t = Instant::now();
        let entry = match opts.method.apply(editor, &requests) {
            Ok(done) => {
                let mut files = Vec::with_capacity(done.len());
                for (i, a) in done.iter().enumerate() {
                    let file = format!("{:06}-{}-{i}.safetensors", k, group[0].id);
                    a.delta.save(&delta_dir.join(&file))?;
                    files.push(file);
                }
                DeltaEntry {
                    ids: group.iter().map(|c| c.id).collect(),
                    files,
                    stats: done.into_iter().map(|a| a.stats).collect(),
                    error: None,
                    seconds: t.elapsed().as_secs_f64(),
                }
            }
            Err(e) if is_case_error(&e) => DeltaEntry {
                ids: group.iter().map(|c| c.id).collect(),
                files: Vec::new(),
                stats: Vec::new(),
                error: Some(e.to_string()),
                seconds: t.elapsed().as_secs_f64(),
            },
            Err(e) => return Err(e),
        };
        let entry = append_line(&deltas_path, entry)?;
        edit_seconds += entry.seconds;
        for (i, id) in entry.ids.iter().enumerate() {
            edit_info.insert(*id, (entry.stats_of(i), entry.error.clone()));
        }
        k += step;
        let msg = match &entry.error {
            Some(e) => format!("case {} failed: {e}", group[0].id),
            None => format!("case {} edited in {:.0}s", group[0].id, entry.seconds),
        };
        for _ in 0..step {
            progress.step(msg.clone());
        }
    }
    progress.finish();

    let collect = |k: usize| -> Vec<CaseLine> {
        cases[..k]
            .iter()
            .filter_map(|c| lines.get(&(k, c.id)).cloned())
            .collect()
    };
    let checkpoints = marks
        .iter()
        .map(|&k| {
            let (summary, accuracy) = summarize(&collect(k));
            Checkpoint {
                edits: k,
                summary,
                accuracy,
            }
        })
        .collect();
    let pre_seconds: f64 = cases
        .iter()
        .filter_map(|c| pre.get(&c.id).map(|p| p.seconds))
        .sum();
    let earlier: f64 = marks[..marks.len().saturating_sub(1)]
        .iter()
        .flat_map(|&k| collect(k))
        .map(|l| l.seconds)
        .sum();
    Ok((
        collect(n),
        checkpoints,
        pre_seconds + edit_seconds + earlier,
    ))
}
