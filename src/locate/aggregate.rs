//! Averages over many known facts: effects by layer at six token positions,
//! line plots, and the layer(s) to edit.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::plot::{line_plot, Figure, Rgb, Series};
use super::result::{csv_quote, write_file, TraceResult};
use super::trace::{Kind, NoiseScale, TraceOptions, Tracer};
use crate::{Error, Hooks, LogitsAt, Model, Result};

/// A fact to trace: a prompt, the subject in it, and optionally the answer
/// (default: the model's own top-1 next token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    /// The prompt, e.g. `"The Eiffel Tower is located in the city of"`.
    pub prompt: String,
    /// The subject as it occurs in the prompt, e.g. `"The Eiffel Tower"`.
    pub subject: String,
    /// The answer scored (its first token), e.g. `" Paris"`.
    pub answer: Option<String>,
}

/// One record of `known_1000.json` (the causal-tracing facts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownFact {
    /// Record id.
    pub known_id: usize,
    /// The subject.
    pub subject: String,
    /// The true attribute, without a leading space (e.g. `"Antarctica"`).
    pub attribute: String,
    /// The prompt with `{}` for the subject.
    pub template: String,
    /// The formatted prompt.
    pub prompt: String,
    /// Wikidata relation id.
    #[serde(default)]
    pub relation_id: String,
    /// The continuation of the model the file was made with, if recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<String>,
}

impl From<&KnownFact> for Fact {
    fn from(k: &KnownFact) -> Self {
        Fact {
            prompt: k.prompt.clone(),
            subject: k.subject.clone(),
            answer: None,
        }
    }
}

/// Reads a `known_1000.json`-style file (a JSON array of [`KnownFact`]).
pub fn load_known_facts(path: &Path) -> Result<Vec<KnownFact>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        format: "known facts JSON",
        reason: e.to_string(),
    })
}

/// The facts the model gets right: its top-1 next token after the prompt is
/// the first token of `" " + attribute`, and the subject occurs in the
/// prompt. Prompts run in batches of 16; `progress(done, total)` after each.
pub fn facts_known_by(
    model: &Model,
    facts: &[KnownFact],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<KnownFact>> {
    let mut known = Vec::new();
    let mut done = 0;
    for chunk in facts.chunks(16) {
        let mut seqs = Vec::with_capacity(chunk.len());
        let mut expected = Vec::with_capacity(chunk.len());
        let mut keep = Vec::with_capacity(chunk.len());
        for f in chunk {
            if f.subject.trim().is_empty()
                || !f.prompt.contains(&f.subject)
                || f.attribute.trim().is_empty()
            {
                continue;
            }
            seqs.push(model.prompt_ids(&f.prompt)?);
            expected.push(model.target_ids(&format!(" {}", f.attribute.trim()))?[0]);
            keep.push(f);
        }
        if !seqs.is_empty() {
            let batch = model.batch(&seqs)?;
            let out = model.forward(&batch, &LogitsAt::Last, &Hooks::new())?;
            let logits = out
                .logits
                .ok_or_else(|| Error::invalid("known-fact filter", "no logits returned"))?;
            let top: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            for ((f, &want), &got) in keep.iter().zip(&expected).zip(&top) {
                if want == got {
                    known.push((*f).clone());
                }
            }
        }
        done += chunk.len();
        progress(done, facts.len());
    }
    Ok(known)
}

/// The six token positions over which effects are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// The subject's first token.
    FirstSubject,
    /// The subject's tokens between its first and last (averaged; absent for
    /// subjects of one or two tokens).
    MiddleSubject,
    /// The subject's last token.
    LastSubject,
    /// The token right after the subject (unless it is the prompt's last).
    FirstAfter,
    /// Tokens after that, before the last (averaged).
    Further,
    /// The prompt's last token.
    Last,
}

impl Position {
    /// The six positions, in prompt order.
    pub const ALL: [Position; 6] = [
        Position::FirstSubject,
        Position::MiddleSubject,
        Position::LastSubject,
        Position::FirstAfter,
        Position::Further,
        Position::Last,
    ];

    /// Snake-case name (CSV, JSON).
    pub fn name(self) -> &'static str {
        match self {
            Position::FirstSubject => "first_subject",
            Position::MiddleSubject => "middle_subject",
            Position::LastSubject => "last_subject",
            Position::FirstAfter => "first_after",
            Position::Further => "further",
            Position::Last => "last",
        }
    }

    /// Label in words.
    pub fn label(self) -> &'static str {
        match self {
            Position::FirstSubject => "first subject token",
            Position::MiddleSubject => "middle subject tokens",
            Position::LastSubject => "last subject token",
            Position::FirstAfter => "first subsequent token",
            Position::Further => "further tokens",
            Position::Last => "last token",
        }
    }

    /// The token indices of this position in a prompt of `n_tokens` tokens
    /// whose subject spans `span` (possibly none). The subject positions and
    /// [`Position::Last`] may share a token when the prompt ends with the subject.
    pub fn tokens(self, span: &Range<usize>, n_tokens: usize) -> Vec<usize> {
        if span.is_empty() || span.end > n_tokens || n_tokens == 0 {
            return Vec::new();
        }
        let last = n_tokens - 1;
        match self {
            Position::FirstSubject => vec![span.start],
            Position::MiddleSubject => (span.start + 1..span.end - 1).collect(),
            Position::LastSubject => vec![span.end - 1],
            Position::FirstAfter => {
                if span.end < last {
                    vec![span.end]
                } else {
                    Vec::new()
                }
            }
            Position::Further => (span.end + 1..last).collect(),
            Position::Last => vec![last],
        }
    }

    fn color(self) -> Rgb {
        match self {
            Position::FirstSubject => Rgb(51, 102, 204),
            Position::MiddleSubject => Rgb(34, 170, 153),
            Position::LastSubject => Rgb(204, 34, 34),
            Position::FirstAfter => Rgb(255, 153, 0),
            Position::Further => Rgb(140, 140, 140),
            Position::Last => Rgb(153, 0, 153),
        }
    }
}

/// How many layers to recommend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerScope {
    /// One layer (ROME): where the MLP effect at the last subject token peaks.
    Single,
    /// `n` consecutive layers (MEMIT) with the largest summed MLP effect at
    /// the last subject token.
    Window(usize),
}

/// Average indirect effects over many traced facts, by kind, position and layer.
///
/// Build it with [`aggregate`], or add [`TraceResult`]s one by one with
/// [`Aggregate::add`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Number of layers of the model.
    pub n_layers: usize,
    /// Window of the MLP and attention traces.
    pub window: usize,
    /// Kinds aggregated.
    pub kinds: Vec<Kind>,
    /// Facts added.
    pub n_facts: usize,
    /// Sum over facts of P(clean).
    pub sum_clean: f64,
    /// Sum over facts of P(corrupted).
    pub sum_corrupted: f64,
    /// Facts that have each position (in [`Position::ALL`] order).
    pub counts: Vec<usize>,
    /// `sums[kind][position][layer]`: summed (over facts) mean effect of the
    /// position's tokens.
    pub sums: Vec<Vec<Vec<f64>>>,
}

impl Aggregate {
    /// An empty aggregate.
    pub fn new(n_layers: usize, window: usize, kinds: &[Kind]) -> Self {
        Self {
            n_layers,
            window,
            kinds: kinds.to_vec(),
            n_facts: 0,
            sum_clean: 0.0,
            sum_corrupted: 0.0,
            counts: vec![0; Position::ALL.len()],
            sums: vec![vec![vec![0.0; n_layers]; Position::ALL.len()]; kinds.len()],
        }
    }

    /// Adds one trace. It must have the aggregate's layers, window and kinds.
    pub fn add(&mut self, r: &TraceResult) -> Result<()> {
        if r.n_layers != self.n_layers || r.window != self.window {
            return Err(Error::invalid(
                "trace result",
                format!(
                    "{} layers / window {} do not match the aggregate's {} / {}",
                    r.n_layers, r.window, self.n_layers, self.window
                ),
            ));
        }
        let mut grids = Vec::with_capacity(self.kinds.len());
        for &kind in &self.kinds {
            let g = r
                .grid(kind)
                .ok_or_else(|| Error::invalid("trace result", format!("no {kind} grid")))?;
            if g.n_tokens() != r.tokens.len() || g.n_layers() != self.n_layers {
                return Err(Error::invalid(
                    "trace result",
                    format!("the {kind} grid is not tokens × layers"),
                ));
            }
            grids.push(g);
        }
        let n_tokens = r.tokens.len();
        for (p, pos) in Position::ALL.iter().enumerate() {
            let tokens = pos.tokens(&r.subject_span, n_tokens);
            if tokens.is_empty() {
                continue;
            }
            self.counts[p] += 1;
            for (k, g) in grids.iter().enumerate() {
                for l in 0..self.n_layers {
                    let m = tokens
                        .iter()
                        .map(|&t| f64::from(g.probs[t][l] - r.corrupted_prob))
                        .sum::<f64>()
                        / tokens.len() as f64;
                    self.sums[k][p][l] += m;
                }
            }
        }
        self.n_facts += 1;
        self.sum_clean += f64::from(r.clean_prob);
        self.sum_corrupted += f64::from(r.corrupted_prob);
        Ok(())
    }

    /// Facts that have position `pos`.
    pub fn count(&self, pos: Position) -> usize {
        Position::ALL
            .iter()
            .position(|&p| p == pos)
            .map_or(0, |i| self.counts[i])
    }

    /// Mean P(clean) over the facts.
    pub fn mean_clean_prob(&self) -> f64 {
        self.sum_clean / self.n_facts.max(1) as f64
    }

    /// Mean P(corrupted) over the facts.
    pub fn mean_corrupted_prob(&self) -> f64 {
        self.sum_corrupted / self.n_facts.max(1) as f64
    }

    /// Average indirect effect by layer of `kind` at `pos`, over the facts
    /// that have that position (`None` if the kind was not aggregated or no
    /// fact has the position).
    pub fn mean_effect(&self, kind: Kind, pos: Position) -> Option<Vec<f32>> {
        let k = self.kinds.iter().position(|&x| x == kind)?;
        let p = Position::ALL.iter().position(|&x| x == pos)?;
        let n = self.counts[p];
        if n == 0 {
            return None;
        }
        Some(
            self.sums[k][p]
                .iter()
                .map(|&s| (s / n as f64) as f32)
                .collect(),
        )
    }

    /// The recommended layer(s) to edit: from the MLP effect at the last
    /// subject token, its peak ([`LayerScope::Single`]) or the window of
    /// `n` consecutive layers with the largest sum ([`LayerScope::Window`]).
    pub fn recommend_layers(&self, scope: LayerScope) -> Result<Vec<usize>> {
        let curve = self
            .mean_effect(Kind::Mlp, Position::LastSubject)
            .ok_or_else(|| {
                Error::invalid(
                    "aggregate",
                    "no MLP effect at the last subject token (trace the mlp kind over at least one fact)",
                )
            })?;
        let width = match scope {
            LayerScope::Single => 1,
            LayerScope::Window(0) => {
                return Err(Error::invalid("layer window", "0 layers"));
            }
            LayerScope::Window(w) => w.min(curve.len()),
        };
        let mut best = (0, f64::NEG_INFINITY);
        for start in 0..=curve.len() - width {
            let s: f64 = curve[start..start + width]
                .iter()
                .map(|&v| f64::from(v))
                .sum();
            if s > best.1 {
                best = (start, s);
            }
        }
        Ok((best.0..best.0 + width).collect())
    }

    /// A Markdown table of the average effect of `kind`: one row per layer,
    /// one column per position, and the number of facts per position.
    pub fn table_markdown(&self, kind: Kind) -> Option<String> {
        if !self.kinds.contains(&kind) {
            return None;
        }
        let curves: Vec<Option<Vec<f32>>> = Position::ALL
            .iter()
            .map(|&p| self.mean_effect(kind, p))
            .collect();
        let mut s = String::from("| layer |");
        for p in Position::ALL {
            s.push_str(&format!(" {} |", p.label()));
        }
        s.push_str("\n| ---: |");
        for _ in Position::ALL {
            s.push_str(" ---: |");
        }
        s.push('\n');
        for l in 0..self.n_layers {
            s.push_str(&format!("| {l} |"));
            for c in &curves {
                match c {
                    Some(v) => s.push_str(&format!(" {:.4} |", v[l])),
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        s.push_str("| facts |");
        for p in Position::ALL {
            s.push_str(&format!(" {} |", self.count(p)));
        }
        s.push('\n');
        Some(s)
    }

    /// CSV: `kind,position,layer,effect,facts`.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("kind,position,layer,effect,facts\n");
        for &kind in &self.kinds {
            for p in Position::ALL {
                if let Some(v) = self.mean_effect(kind, p) {
                    for (l, e) in v.iter().enumerate() {
                        s.push_str(&format!(
                            "{},{},{l},{e},{}\n",
                            kind.name(),
                            csv_quote(p.name()),
                            self.count(p)
                        ));
                    }
                }
            }
        }
        s
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid("aggregate", format!("cannot serialise: {e}")))
    }

    /// The line plot of `kind`: average effect by layer, one line per position.
    pub fn line_plot(&self, kind: Kind) -> Result<Figure> {
        if !self.kinds.contains(&kind) {
            return Err(Error::invalid(
                "plot kind",
                format!("{kind} was not aggregated"),
            ));
        }
        let series: Vec<Series> = Position::ALL
            .iter()
            .filter_map(|&p| {
                self.mean_effect(kind, p).map(|values| Series {
                    label: format!("{} ({})", p.label(), self.count(p)),
                    color: p.color(),
                    width: if p == Position::LastSubject { 3.0 } else { 1.8 },
                    values,
                })
            })
            .collect();
        let what = match kind {
            Kind::Residual => "the residual stream (one layer)".to_string(),
            k => format!("{} (window of {} layers)", k.describe(), self.window),
        };
        let titles = vec![
            format!("Average indirect effect of restoring {what}"),
            format!(
                "{} facts; mean p clean {:.3}, corrupted {:.3}",
                self.n_facts,
                self.mean_clean_prob(),
                self.mean_corrupted_prob()
            ),
        ];
        let x_title = match kind {
            Kind::Residual => "layer".to_string(),
            _ => format!("centre of the window of {} layers", self.window),
        };
        Ok(line_plot(
            &titles,
            &x_title,
            "p(restored) - p(corrupted)",
            &series,
            None,
        ))
    }

    /// Writes `{stem}_{kind}.svg` / `.png` line plots, `{stem}.csv` and
    /// `{stem}.json` into `dir`; returns the paths written.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut written = Vec::new();
        for &kind in &self.kinds {
            let fig = self.line_plot(kind)?;
            let svg = dir.join(format!("{stem}_{}.svg", kind.name()));
            fig.save_svg(&svg)?;
            let png = dir.join(format!("{stem}_{}.png", kind.name()));
            fig.save_png(&png, 2)?;
            written.push(svg);
            written.push(png);
        }
        let csv = dir.join(format!("{stem}.csv"));
        write_file(&csv, self.to_csv().as_bytes())?;
        let json = dir.join(format!("{stem}.json"));
        write_file(&json, self.to_json()?.as_bytes())?;
        written.push(csv);
        written.push(json);
        Ok(written)
    }
}

/// Traces every fact and averages the effects (see [`Aggregate`]); the
/// noise scale is resolved once. `progress(done, total)` after each fact.
pub fn aggregate(
    model: &Model,
    facts: &[Fact],
    opts: &TraceOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Aggregate> {
    let mut opts = opts.clone();
    opts.noise = NoiseScale::Fixed(opts.noise_std(model)?);
    let mut agg = Aggregate::new(model.config().n_layers, opts.window, &opts.kinds);
    for (i, f) in facts.iter().enumerate() {
        let r = Tracer::new(model, &f.prompt, &f.subject, f.answer.as_deref(), &opts)?.run()?;
        agg.add(&r)?;
        progress(i + 1, facts.len());
    }
    Ok(agg)
}

/// The layer(s) to edit on `model`, from the MLP traces of `facts` (only the
/// MLP kind is traced): see [`Aggregate::recommend_layers`].
pub fn recommend_layers(
    model: &Model,
    facts: &[Fact],
    opts: &TraceOptions,
    scope: LayerScope,
) -> Result<Vec<usize>> {
    if facts.is_empty() {
        return Err(Error::invalid("facts", "no fact to trace"));
    }
    let mut opts = opts.clone();
    opts.kinds = vec![Kind::Mlp];
    aggregate(model, facts, &opts, &mut |_, _| {})?.recommend_layers(scope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_a_prompt() {
        // tokens: 0 1 [2 3 4 5] 6 7 8 9
        let span = 2..6;
        assert_eq!(Position::FirstSubject.tokens(&span, 10), vec![2]);
        assert_eq!(Position::MiddleSubject.tokens(&span, 10), vec![3, 4]);
        assert_eq!(Position::LastSubject.tokens(&span, 10), vec![5]);
        assert_eq!(Position::FirstAfter.tokens(&span, 10), vec![6]);
        assert_eq!(Position::Further.tokens(&span, 10), vec![7, 8]);
        assert_eq!(Position::Last.tokens(&span, 10), vec![9]);
        // One-token subject right before the last token.
        let span = 0..1;
        assert_eq!(
            Position::MiddleSubject.tokens(&span, 2),
            Vec::<usize>::new()
        );
        assert_eq!(Position::FirstAfter.tokens(&span, 2), Vec::<usize>::new());
        assert_eq!(Position::Further.tokens(&span, 2), Vec::<usize>::new());
        assert_eq!(Position::Last.tokens(&span, 2), vec![1]);
    }
}
