//! The outcome of a trace: grids, probabilities, tokens; JSON, CSV, pictures.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::plot::{heatmap, Figure};
use super::trace::Kind;
use crate::{Error, Result};

/// P(answer) with one (token, layer) cell restored, for one kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    /// What was restored.
    pub kind: Kind,
    /// Layers restored together (1 for the residual stream).
    pub window: usize,
    /// `probs[token][layer]`: P(answer) with the site(s) of that cell
    /// restored, averaged over the noise samples. For the MLP and attention
    /// kinds, `layer` is the centre of the restored window.
    pub probs: Vec<Vec<f32>>,
}

impl Grid {
    /// Number of token rows.
    pub fn n_tokens(&self) -> usize {
        self.probs.len()
    }

    /// Number of layer columns.
    pub fn n_layers(&self) -> usize {
        self.probs.first().map_or(0, Vec::len)
    }

    /// The (token, layer) of the largest probability (first on ties).
    pub fn argmax(&self) -> (usize, usize) {
        let mut best = (0, 0);
        let mut value = f32::NEG_INFINITY;
        for (t, row) in self.probs.iter().enumerate() {
            for (l, &p) in row.iter().enumerate() {
                if p > value {
                    value = p;
                    best = (t, l);
                }
            }
        }
        best
    }

    /// Smallest and largest probability of the grid.
    pub fn range(&self) -> (f32, f32) {
        self.probs
            .iter()
            .flatten()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &p| {
                (lo.min(p), hi.max(p))
            })
    }
}

/// Result of [`super::trace`]: for each kind, P(answer) with each (token,
/// layer) restored in the corrupted run, next to the clean and corrupted
/// probabilities. The indirect effect of a cell is its probability minus
/// [`TraceResult::corrupted_prob`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceResult {
    /// The prompt traced.
    pub prompt: String,
    /// The subject whose token embeddings were corrupted.
    pub subject: String,
    /// The answer token, decoded (e.g. `" Paris"`).
    pub answer: String,
    /// The answer token's id.
    pub answer_id: u32,
    /// The prompt's tokens, decoded one by one.
    pub tokens: Vec<String>,
    /// The prompt's token ids.
    pub token_ids: Vec<u32>,
    /// Token range of the subject.
    pub subject_span: Range<usize>,
    /// Number of layers of the model.
    pub n_layers: usize,
    /// P(answer) in the clean run.
    pub clean_prob: f32,
    /// P(answer) in the corrupted run, averaged over the noise samples.
    pub corrupted_prob: f32,
    /// Noise scale ν used.
    pub noise_std: f64,
    /// Number of noise samples.
    pub samples: usize,
    /// Window of the MLP and attention kinds.
    pub window: usize,
    /// Seed of the noise.
    pub seed: u64,
    /// One grid per traced kind, `tokens × layers`.
    pub grids: Vec<Grid>,
}

impl TraceResult {
    /// The grid of `kind`, if it was traced.
    pub fn grid(&self, kind: Kind) -> Option<&Grid> {
        self.grids.iter().find(|g| g.kind == kind)
    }

    /// Indirect effect (restored − corrupted probability) of a cell, if the
    /// kind was traced and the cell exists.
    pub fn effect(&self, kind: Kind, token: usize, layer: usize) -> Option<f32> {
        let p = self.grid(kind)?.probs.get(token)?.get(layer)?;
        Some(p - self.corrupted_prob)
    }

    /// True when token `t` belongs to the subject.
    pub fn is_subject(&self, t: usize) -> bool {
        self.subject_span.contains(&t)
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid("trace result", format!("cannot serialise: {e}")))
    }

    /// Parses the JSON written by [`TraceResult::to_json`].
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::invalid("trace result JSON", e.to_string()))
    }

    /// CSV, one line per cell: `kind,token_index,token,is_subject,layer,prob,effect`
    /// (token text quoted, quotes doubled).
    pub fn to_csv(&self) -> String {
        let mut out = String::from("kind,token_index,token,is_subject,layer,prob,effect\n");
        for g in &self.grids {
            for (t, row) in g.probs.iter().enumerate() {
                let token = self.tokens.get(t).map_or("", String::as_str);
                for (l, &p) in row.iter().enumerate() {
                    out.push_str(&format!(
                        "{},{},{},{},{},{},{}\n",
                        g.kind.name(),
                        t,
                        csv_quote(token),
                        self.is_subject(t),
                        l,
                        p,
                        p - self.corrupted_prob
                    ));
                }
            }
        }
        out
    }

    /// Writes [`TraceResult::to_json`] to `path`.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        write_file(path, self.to_json()?.as_bytes())
    }

    /// Reads a file written by [`TraceResult::save_json`].
    pub fn load_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            format: "trace result JSON",
            reason: e.to_string(),
        })
    }

    /// Writes [`TraceResult::to_csv`] to `path`.
    pub fn save_csv(&self, path: &Path) -> Result<()> {
        write_file(path, self.to_csv().as_bytes())
    }

    /// The heatmap of one kind (tokens as rows, subject tokens marked, layers
    /// as columns, a colour bar, the answer in the title).
    pub fn heatmap(&self, kind: Kind) -> Result<Figure> {
        let grid = self
            .grid(kind)
            .ok_or_else(|| Error::invalid("heatmap kind", format!("{kind} was not traced")))?;
        Ok(heatmap(self, grid))
    }

    /// Writes `{stem}_{kind}.svg` and `{stem}_{kind}.png` for every traced
    /// kind into `dir` (created if needed) and returns the paths written.
    pub fn save_heatmaps(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut written = Vec::new();
        for g in &self.grids {
            let fig = heatmap(self, g);
            let svg = dir.join(format!("{stem}_{}.svg", g.kind.name()));
            fig.save_svg(&svg)?;
            let png = dir.join(format!("{stem}_{}.png", g.kind.name()));
            fig.save_png(&png, 2)?;
            written.push(svg);
            written.push(png);
        }
        Ok(written)
    }
}

/// Quotes a CSV field (always), doubling inner quotes.
pub(crate) fn csv_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Writes `bytes` to `path`, creating the parent directory.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}
