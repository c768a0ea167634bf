//! Evaluation of edits with the standard benchmarks' metrics.
//!
//! - [`data`]: readers of CounterFact (ROME), EasyEdit-style and zsRE files,
//!   each record becoming a [`Case`].
//! - [`metrics`]: the metric definitions as pure functions (efficacy,
//!   paraphrase and neighbourhood success and magnitudes, the score S,
//!   n-gram-entropy fluency, top-1 token accuracy).
//! - [`measure`](mod@measure): scoring a model on cases (batched teacher forcing and
//!   greedy generation).
//! - [`curve`]: ES / PS / NS against the number of edits of sequential
//!   runs, as a figure (SVG / PNG).
//! - [`runner`]: single, batch and sequential runs over a dataset slice
//!   that write `cases.jsonl`, `summary.json` and a Markdown table, and
//!   resume when interrupted.
//!
//! ```no_run
//! use kedit::edit::Editor;
//! use kedit::eval::{read_cases, run, RunOptions};
//! use kedit::stats::Corpus;
//!
//! let model = kedit::Model::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let mut editor = Editor::new(model).with_corpus(Corpus::File("wiki.txt".into()));
//! let cases = read_cases("counterfact.json".as_ref())?;
//! let report = run(&mut editor, &cases[..10], &RunOptions::new("out"))?;
//! println!("{}", report.markdown());
//! # Ok::<(), kedit::Error>(())
//! ```

pub mod curve;
pub mod data;
pub mod measure;
pub mod metrics;
pub mod runner;

pub use curve::curve_figure;
pub use data::{
    parse_cases, read_cases, read_cases_as, read_cases_lenient, template_of, Case, Locality, Schema,
};
pub use measure::{greedy_batch, measure, score, CaseMetrics, CaseProbs, MeasureOptions, Scored};
pub use metrics::PairProb;
pub use runner::{
    run, summarize, Accuracies, AppliedEdit, CaseLine, Checkpoint, EditSeconds, EditStats, Method,
    Mode, PrePost, Report, RunOptions, Summary,
};
