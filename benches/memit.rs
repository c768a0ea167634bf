//! MEMIT and AlphaEdit on SmolLM2-135M (f32, CPU), statistics and context
//! templates already cached: `cargo bench --bench memit`.
//!
//! - `memit_smollm2/batch_N`: one MEMIT batch of the first `N` records of
//!   CounterFact (`counterfact_preknown.json`), δ optimisations included.
//!   `N` is `KEDIT_BENCH_MEMIT_N` (default 10; the 100-edit batch is
//!   `KEDIT_BENCH_MEMIT_N=100 cargo bench --bench memit -- batch`).
//! - `memit_smollm2/keys_and_solve_N`: the same batch with δ's optimisation
//!   cut to one loss evaluation and no update (zero targets; every other
//!   step as in a real edit): the key passes and the per-layer solves that
//!   MEMIT adds to ROME's work, plus one forward pass of the target prompts.
//! - `alphaedit_smollm2/null_space_layer_L`: the projector of one layer
//!   (eigendecomposition of the 1536 × 1536 `C` and the basis), as when its
//!   disk cache is cold.
//!
//! Needs the model (`cargo run --release --example fetch_model`) and the
//! WikiText and CounterFact files of ../shared/data.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use kedit::edit::{BatchMethod, BatchTimings, EditRequest, Editor, NullSpace};
use kedit::stats::{second_moment, Corpus};

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel)
}

fn editor() -> Option<Editor> {
    let Some(path) = kedit::fetch::find(&kedit::fetch::SMOLLM2_135M) else {
        eprintln!(
            "SmolLM2 not in the kedit cache: run `cargo run --release --example fetch_model`"
        );
        return None;
    };
    let model = kedit::Model::load(path.to_str().expect("utf-8 path")).expect("SmolLM2");
    let wiki = data("prose/wikitext-2-raw-test.txt");
    let mut editor = Editor::new(model).with_corpus(Corpus::File(wiki));
    for l in editor.memit_hparams().layers.clone() {
        editor.solver(l).expect("statistics");
    }
    let spec = editor.memit_hparams().context_templates.clone();
    editor.templates_for(&spec).expect("templates");
    Some(editor)
}

fn requests(n: usize) -> Vec<EditRequest> {
    let cases = kedit::eval::read_cases(&data("counterfact/counterfact_preknown.json"))
        .expect("CounterFact");
    cases.into_iter().take(n).map(|c| c.request).collect()
}

fn memit(c: &mut Criterion) {
    let Some(mut editor) = editor() else { return };
    let n: usize = std::env::var("KEDIT_BENCH_MEMIT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let reqs = requests(n);
    let mut splits: Vec<BatchTimings> = Vec::new();
    let mut group = c.benchmark_group("memit_smollm2");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(1));
    group.bench_function(format!("batch_{n}"), |b| {
        b.iter(|| {
            let (_, report) = editor
                .compute_batch(BatchMethod::Memit, &reqs)
                .expect("MEMIT batch");
            splits.push(report.seconds);
        })
    });
    let steps = editor.hparams().v_steps;
    // One step is one loss evaluation without an update: δ stays zero
    // (zero steps is refused as a hyper-parameter).
    editor.hparams_mut().v_steps = 1;
    group.bench_function(format!("keys_and_solve_{n}"), |b| {
        b.iter(|| {
            editor
                .compute_batch(BatchMethod::Memit, &reqs)
                .expect("MEMIT batch")
        })
    });
    editor.hparams_mut().v_steps = steps;
    group.finish();
    if !splits.is_empty() {
        let k = splits.len() as f64;
        let mean = |f: fn(&BatchTimings) -> f64| splits.iter().map(f).sum::<f64>() / k;
        eprintln!(
            "mean split of a {n}-request batch over {} runs: targets {:.1} s, keys {:.2} s, solve {:.3} s",
            splits.len(),
            mean(|t| t.targets),
            mean(|t| t.keys),
            mean(|t| t.solve)
        );
    }

    let layer = *editor.memit_hparams().layers.last().expect("a layer");
    let stats = second_moment(
        editor.model(),
        layer,
        &Corpus::File(data("prose/wikitext-2-raw-test.txt")),
        &editor.hparams().stats,
    )
    .expect("statistics");
    let matrix = stats.to_f64_vec().expect("f64");
    let d_ff = editor.model().config().d_ff;
    let threshold = editor.alphaedit_hparams().nullspace_threshold;
    let mut group = c.benchmark_group("alphaedit_smollm2");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(1));
    group.bench_function(format!("null_space_layer_{layer}"), |b| {
        b.iter(|| NullSpace::from_second_moment(&matrix, d_ff, threshold).expect("null space"))
    });
    group.finish();
}

criterion_group!(benches, memit);
criterion_main!(benches);
