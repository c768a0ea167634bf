//! Curves of sequential runs: efficacy, paraphrase and neighbourhood
//! success against the number of edits applied, one run per method.

use crate::locate::plot::{line_plot, Rgb, Series};
use crate::locate::Figure;

use super::runner::Checkpoint;

/// A metric of the figure: its label, how to read it from a checkpoint,
/// and its colour for the first run and for the others.
type MetricLine = (&'static str, fn(&Checkpoint) -> Option<f64>, [Rgb; 2]);

/// ES / PS / NS (post-edit, over every case edited so far) at each
/// checkpoint of each run, as a line plot. The x axis is the checkpoints of
/// the longest run; runs are told apart by line width, metrics by colour.
pub fn curve_figure(title: &str, runs: &[(String, Vec<Checkpoint>)]) -> Figure {
    let metrics: [MetricLine; 3] = [
        (
            "ES",
            |c| c.summary.efficacy.post,
            [Rgb(31, 90, 168), Rgb(120, 170, 230)],
        ),
        (
            "PS",
            |c| c.summary.paraphrase.post,
            [Rgb(30, 130, 60), Rgb(130, 200, 140)],
        ),
        (
            "NS",
            |c| c.summary.neighborhood.post,
            [Rgb(190, 50, 40), Rgb(240, 150, 130)],
        ),
    ];
    let longest = runs
        .iter()
        .max_by_key(|(_, c)| c.len())
        .map(|(_, c)| c.as_slice())
        .unwrap_or_default();
    let x_labels: Vec<String> = longest.iter().map(|c| c.edits.to_string()).collect();
    let mut series = Vec::new();
    for (r, (name, checkpoints)) in runs.iter().enumerate() {
        for (metric, get, colours) in &metrics {
            series.push(Series {
                label: format!("{name} {metric}"),
                color: colours[r.min(1)],
                width: if r == 0 { 3.0 } else { 1.5 },
                values: checkpoints
                    .iter()
                    .map(|c| get(c).map_or(f32::NAN, |v| v as f32))
                    .collect(),
            });
        }
    }
    line_plot(
        &[title.to_string()],
        "edits applied",
        "success rate over the cases edited so far",
        &series,
        Some(&x_labels),
    )
}
