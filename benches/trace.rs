//! One full causal trace (residual, MLP and attention; every layer and token;
//! 10 noise samples) of "The Eiffel Tower is located in the city of" →
//! " Paris" on SmolLM2-135M (f32, CPU), and the same on a tiny fixture with
//! batched restorations versus one forward pass per restored site.
//!
//! `cargo bench --bench trace`. SmolLM2 is taken from the kedit cache
//! (`cargo run --release --example fetch_model`); without it only the tiny
//! fixture is measured. A SmolLM2 trace takes minutes on two cores, so its
//! group runs the minimum of 10 samples.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use kedit::locate::{trace, Strategy, TraceOptions};
use kedit::Model;

fn trace_bench(c: &mut Criterion) {
    let tiny_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/llama");
    let tiny = Model::load(tiny_dir).expect("tiny fixture");
    let prompt = "The tower in paris is located in the city of";
    let subject = "tower in paris";
    let opts = TraceOptions::default();
    let mut group = c.benchmark_group("trace/tiny_llama");
    group.sample_size(20);
    group.bench_function("batched_reuse", |b| {
        b.iter(|| trace(&tiny, prompt, subject, None, &opts).expect("trace"))
    });
    let unbatched = TraceOptions {
        strategy: Strategy::FullForward,
        batch_rows: 1,
        ..opts.clone()
    };
    group.bench_function("one_forward_per_site", |b| {
        b.iter(|| trace(&tiny, prompt, subject, None, &unbatched).expect("trace"))
    });
    group.finish();

    let Some(path) = kedit::fetch::find(&kedit::fetch::SMOLLM2_135M) else {
        eprintln!(
            "SmolLM2 not in the kedit cache: run `cargo run --release --example fetch_model`"
        );
        return;
    };
    let model = Model::load(path.to_str().expect("utf-8 path")).expect("SmolLM2");
    let opts = TraceOptions::default();
    let mut group = c.benchmark_group("trace/smollm2_135m_f32");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(60));
    group.bench_function("eiffel_3_kinds_n10", |b| {
        b.iter(|| {
            trace(
                &model,
                "The Eiffel Tower is located in the city of",
                "The Eiffel Tower",
                Some(" Paris"),
                &opts,
            )
            .expect("trace")
        })
    });
    group.finish();
}

criterion_group!(benches, trace_bench);
criterion_main!(benches);
