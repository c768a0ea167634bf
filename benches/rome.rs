//! One ROME edit on SmolLM2-135M (f32, CPU) with statistics and context
//! templates already cached: `cargo bench --bench rome`.
//!
//! Needs the model (`cargo run --release --example fetch_model`) and the
//! WikiText file of ../shared/data for the key statistics.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use kedit::edit::{EditRequest, Editor};
use kedit::stats::Corpus;

fn rome(c: &mut Criterion) {
    let Some(path) = kedit::fetch::find(&kedit::fetch::SMOLLM2_135M) else {
        eprintln!(
            "SmolLM2 not in the kedit cache: run `cargo run --release --example fetch_model`"
        );
        return;
    };
    let wiki = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/prose/wikitext-2-raw-test.txt");
    let model = kedit::Model::load(path.to_str().expect("utf-8 path")).expect("SmolLM2");
    let mut editor = Editor::new(model).with_corpus(Corpus::File(wiki));
    let layer = editor.hparams().layer;
    editor.solver(layer).expect("statistics");
    editor.context_templates().expect("templates");
    let req = EditRequest::modify(
        "{} is located in the city of",
        "The Eiffel Tower",
        "Paris",
        "Rome",
    );
    let mut splits = Vec::new();
    let mut group = c.benchmark_group("rome_smollm2");
    group.sample_size(10);
    group.bench_function("modify_eiffel_tower", |b| {
        b.iter(|| {
            let applied = editor.apply(&req).expect("edit");
            splits.push(applied.report.seconds.clone());
            editor.undo(applied.id).expect("undo");
        })
    });
    group.finish();
    let n = splits.len() as f64;
    let mean = |f: fn(&kedit::edit::Timings) -> f64| splits.iter().map(f).sum::<f64>() / n;
    eprintln!(
        "mean split over {} edits: k* {:.2} s, v* {:.2} s, solve {:.4} s, report {:.2} s",
        splits.len(),
        mean(|t| t.key),
        mean(|t| t.value),
        mean(|t| t.solve),
        mean(|t| t.report)
    );
}

criterion_group!(benches, rome);
criterion_main!(benches);
