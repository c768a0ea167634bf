//! One 16-token forward pass on SmolLM2-135M (f32, CPU) and on a tiny fixture.
//!
//! `cargo bench --bench forward`. SmolLM2 is taken from the kedit cache
//! (`cargo run --release --example fetch_model`); without it only the tiny
//! fixture is measured.

use criterion::{criterion_group, criterion_main, Criterion};
use kedit::{Hooks, LogitsAt, Model};

const TEXT: &str =
    "The Eiffel Tower is located in the city of Paris, and it was built for the world fair of 1889";

fn sixteen_tokens(model: &Model) -> Vec<u32> {
    let mut ids = model.prompt_ids(TEXT).expect("tokenize");
    let vocab = model.config().vocab_size as u32;
    ids.iter_mut().for_each(|i| *i %= vocab);
    ids.resize(16, ids[0]);
    ids
}

fn bench_model(c: &mut Criterion, name: &str, model: &Model) {
    let batch = model.batch(&[sixteen_tokens(model)]).expect("batch");
    let hooks = Hooks::new();
    let mut group = c.benchmark_group(format!("forward_16_tokens/{name}"));
    group.sample_size(30);
    group.bench_function("logits_all_positions", |b| {
        b.iter(|| {
            model
                .forward(&batch, &LogitsAt::All, &hooks)
                .expect("forward")
        })
    });
    group.bench_function("logits_last_position", |b| {
        b.iter(|| {
            model
                .forward(&batch, &LogitsAt::Last, &hooks)
                .expect("forward")
        })
    });
    group.finish();
}

fn forward(c: &mut Criterion) {
    let tiny_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/llama");
    let tiny = Model::load(tiny_dir).expect("tiny fixture");
    bench_model(c, "tiny_llama", &tiny);
    match kedit::fetch::find(&kedit::fetch::SMOLLM2_135M) {
        Some(path) => {
            let model = Model::load(path.to_str().expect("utf-8 path")).expect("SmolLM2");
            bench_model(c, "smollm2_135m_f32", &model);
        }
        None => eprintln!(
            "SmolLM2 not in the kedit cache: run `cargo run --release --example fetch_model`"
        ),
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
