//! Causal tracing on SmolLM2-135M-Instruct (or `--model PATH`).
//!
//! One fact → three heatmaps (SVG + PNG), JSON and CSV:
//!
//! ```text
//! cargo run --release --example causal_trace -- \
//!     --prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower" \
//!     [--answer " Paris"] [--out trace_out] [--samples 10] [--window 10] [--noise NU] [--seed 0]
//! ```
//!
//! The average over the first N facts of `known_1000.json` that the model gets
//! right (its top-1 is the attribute's first token) → line plots per kind,
//! tables, and the recommended layers:
//!
//! ```text
//! cargo run --release --example causal_trace -- --known 100 [--samples 10] [--out trace_out]
//! ```
//!
//! `--compare` times one trace with batched restorations against one forward
//! pass per restored site (on a few layers, extrapolated).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kedit::locate::{
    facts_known_by, load_known_facts, Aggregate, Fact, Kind, LayerScope, NoiseScale, Strategy,
    TraceOptions, Tracer,
};
use kedit::{Model, Site};

struct Args {
    model: Option<String>,
    prompt: String,
    subject: String,
    answer: Option<String>,
    out: PathBuf,
    known: Option<usize>,
    data: PathBuf,
    opts: TraceOptions,
    compare: bool,
    memit_width: usize,
}

fn usage() -> &'static str {
    "usage: causal_trace [--model PATH] [--prompt P --subject S [--answer A]] [--known N [--data FILE]] \
     [--out DIR] [--samples N] [--window W] [--noise NU] [--seed S] [--kinds residual,mlp,attn] \
     [--batch-rows R] [--memit-width W] [--compare]"
}

fn parse() -> Result<Args, Box<dyn std::error::Error>> {
    let mut a = Args {
        model: None,
        prompt: "The Eiffel Tower is located in the city of".into(),
        subject: "The Eiffel Tower".into(),
        answer: None,
        out: PathBuf::from("trace_out"),
        known: None,
        data: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/known_1000.json"
        )),
        opts: TraceOptions::default(),
        compare: false,
        memit_width: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{}", usage()))
        };
        match flag.as_str() {
            "--model" => a.model = Some(value()?),
            "--prompt" => a.prompt = value()?,
            "--subject" => a.subject = value()?,
            "--answer" => a.answer = Some(value()?),
            "--out" => a.out = PathBuf::from(value()?),
            "--known" => a.known = Some(common::parse_value(&flag, &value()?)?),
            "--data" => a.data = PathBuf::from(value()?),
            "--samples" => a.opts.samples = common::parse_value(&flag, &value()?)?,
            "--window" => a.opts.window = common::parse_value(&flag, &value()?)?,
            "--noise" => a.opts.noise = NoiseScale::Fixed(common::parse_value(&flag, &value()?)?),
            "--seed" => a.opts.seed = common::parse_value(&flag, &value()?)?,
            "--batch-rows" => a.opts.batch_rows = common::parse_value(&flag, &value()?)?,
            "--memit-width" => a.memit_width = common::parse_value(&flag, &value()?)?,
            "--kinds" => {
                a.opts.kinds = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<Vec<Kind>, _>>()?
            }
            "--compare" => a.compare = true,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{}", usage()).into()),
        }
    }
    Ok(a)
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}]"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

mod common;

fn main() -> std::process::ExitCode {
    common::exit_status(run())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse()?;
    let path = match &args.model {
        Some(p) => p.clone(),
        None => kedit::fetch::ensure(&kedit::fetch::SMOLLM2_135M)?
            .display()
            .to_string(),
    };
    let start = Instant::now();
    let model = Model::load(&path)?;
    println!(
        "loaded {path} ({} layers) in {:.2} s",
        model.config().n_layers,
        start.elapsed().as_secs_f64()
    );
    if args.compare {
        return compare(&model, &args);
    }
    match args.known {
        Some(n) => known(&model, &args, n),
        None => one(&model, &args),
    }
}

fn one(model: &Model, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let tracer = Tracer::new(
        model,
        &args.prompt,
        &args.subject,
        args.answer.as_deref(),
        &args.opts,
    )?;
    println!(
        "answer {:?}: p clean {:.4}, corrupted {:.4} (noise {:.4}, {} samples)",
        tracer.answer(),
        tracer.clean_prob(),
        tracer.corrupted_prob(),
        tracer.noise_std(),
        args.opts.samples
    );
    let pb = bar(0, "restored runs");
    let result = tracer.run_with_progress(&mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    println!("traced in {:.1} s", start.elapsed().as_secs_f64());
    for g in &result.grids {
        let (t, l) = g.argmax();
        println!(
            "{:>8}: strongest effect {:+.4} at token {t} {:?}{} layer {l}",
            g.kind.name(),
            g.probs[t][l] - result.corrupted_prob,
            result.tokens[t],
            if result.is_subject(t) {
                " (subject)"
            } else {
                ""
            },
        );
    }
    std::fs::create_dir_all(&args.out)?;
    result.save_json(&args.out.join("trace.json"))?;
    result.save_csv(&args.out.join("trace.csv"))?;
    for f in result.save_heatmaps(&args.out, "trace")? {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn known(model: &Model, args: &Args, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let all = load_known_facts(&args.data)?;
    let start = Instant::now();
    // Filter in blocks until N facts the model knows are found.
    let pb = bar(all.len(), "filtering known facts");
    let mut known = Vec::new();
    let mut seen = 0;
    for block in all.chunks(64) {
        if known.len() >= n {
            break;
        }
        known.extend(facts_known_by(model, block, &mut |done, _| {
            pb.set_position((seen + done) as u64)
        })?);
        seen += block.len();
    }
    pb.finish_and_clear();
    let filter_time = start.elapsed();
    println!(
        "{} of the first {seen} of {} facts known by the model (top-1 = attribute's first token), filtered in {:.1} s",
        known.len(),
        all.len(),
        filter_time.as_secs_f64()
    );
    let facts: Vec<Fact> = known.iter().take(n).map(Fact::from).collect();
    let mut opts = args.opts.clone();
    opts.noise = NoiseScale::Fixed(opts.noise_std(model)?);
    println!(
        "tracing {} facts: {} samples, window {}, noise {:.4}, kinds {:?}",
        facts.len(),
        opts.samples,
        opts.window,
        match opts.noise {
            NoiseScale::Fixed(nu) => nu,
            NoiseScale::EmbeddingStd { .. } => f64::NAN,
        },
        opts.kinds
    );
    let mut agg = Aggregate::new(model.config().n_layers, opts.window, &opts.kinds);
    let pb = bar(facts.len(), "facts");
    let start = Instant::now();
    let mut per_fact = Vec::with_capacity(facts.len());
    let mut traces = Vec::with_capacity(facts.len());
    for f in &facts {
        let t = Instant::now();
        let r = Tracer::new(model, &f.prompt, &f.subject, f.answer.as_deref(), &opts)?.run()?;
        per_fact.push(t.elapsed());
        agg.add(&r)?;
        traces.push(r);
        pb.inc(1);
        if pb.is_hidden() && traces.len() % 10 == 0 {
            // No terminal for the bar (output redirected): a line every 10 facts.
            eprintln!(
                "{} / {} facts traced, {:.0} s",
                traces.len(),
                facts.len(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    pb.finish_and_clear();
    let total = start.elapsed();
    let mut sorted = per_fact.clone();
    sorted.sort();
    let median = sorted
        .get(sorted.len() / 2)
        .copied()
        .unwrap_or(Duration::ZERO);
    let mean_tokens =
        traces.iter().map(|r| r.tokens.len()).sum::<usize>() as f64 / traces.len().max(1) as f64;
    println!(
        "\ntraced {} facts in {:.1} s (median {:.2} s per fact, mean {:.1} tokens per prompt)",
        facts.len(),
        total.as_secs_f64(),
        median.as_secs_f64(),
        mean_tokens
    );
    println!(
        "mean p clean {:.4}, corrupted {:.4}",
        agg.mean_clean_prob(),
        agg.mean_corrupted_prob()
    );
    for &kind in &opts.kinds {
        println!("\n### {kind}: average indirect effect by layer\n");
        print!("{}", agg.table_markdown(kind).unwrap_or_default());
    }
    if opts.kinds.contains(&Kind::Mlp) {
        let rome = agg.recommend_layers(LayerScope::Single)?;
        let memit = agg.recommend_layers(LayerScope::Window(args.memit_width))?;
        println!("\nrecommended layers: ROME {rome:?}, MEMIT {memit:?}");
    }
    for f in agg.save(&args.out, "aggregate")? {
        println!("wrote {}", f.display());
    }
    let traces_path = args.out.join("traces.jsonl");
    let lines: Vec<String> = traces
        .iter()
        .map(|r| serde_json::to_string(r).unwrap_or_default())
        .collect();
    std::fs::write(&traces_path, lines.join("\n") + "\n")?;
    println!("wrote {}", traces_path.display());
    Ok(())
}

/// Times the batched trace of one fact against one forward pass per
/// restored site and sample (measured on a few layers, extrapolated).
fn compare(model: &Model, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut opts = args.opts.clone();
    opts.noise = NoiseScale::Fixed(opts.noise_std(model)?);
    let t = Instant::now();
    let fast = Tracer::new(
        model,
        &args.prompt,
        &args.subject,
        args.answer.as_deref(),
        &opts,
    )?
    .run()?;
    let fast_s = t.elapsed().as_secs_f64();
    let rows = opts.kinds.len() * fast.tokens.len() * fast.n_layers * opts.samples;
    println!(
        "batched trace ({:?}, {} rows per pass): {fast_s:.2} s for {} kinds × {} tokens × {} layers × {} samples = {rows} restored runs",
        opts.strategy,
        opts.batch_rows,
        opts.kinds.len(),
        fast.tokens.len(),
        fast.n_layers,
        opts.samples
    );
    // Unbatched: one whole forward pass per restored site and sample, on a
    // sample of cells spread over kinds, tokens and layers.
    let slow_opts = TraceOptions {
        strategy: Strategy::FullForward,
        batch_rows: 1,
        ..opts.clone()
    };
    let slow = Tracer::new(
        model,
        &args.prompt,
        &args.subject,
        args.answer.as_deref(),
        &slow_opts,
    )?;
    let n_layers = slow.n_layers();
    let n_tokens = slow.tokens().len();
    let mut sets: Vec<Vec<(Site, usize)>> = Vec::new();
    for (i, &kind) in opts.kinds.iter().enumerate() {
        for l in [0, n_layers / 2, n_layers - 1] {
            let tok = (i + l) % n_tokens;
            sets.push(kind.sites(l, tok, opts.window, n_layers));
        }
    }
    let t = Instant::now();
    slow.restored_probs(&sets)?;
    let per_run = t.elapsed().as_secs_f64() / (sets.len() * opts.samples) as f64;
    let slow_s = per_run * rows as f64;
    println!(
        "unbatched (one forward per restored site and sample): {:.1} ms per run → {slow_s:.1} s for {rows} runs (extrapolated from {} runs)",
        per_run * 1e3,
        sets.len() * opts.samples
    );
    println!("speed-up of the batched trace: {:.1}×", slow_s / fast_s);
    // Batching alone (whole forward passes, many rows per pass).
    let batched_full = TraceOptions {
        strategy: Strategy::FullForward,
        ..opts.clone()
    };
    let t = Instant::now();
    Tracer::new(
        model,
        &args.prompt,
        &args.subject,
        args.answer.as_deref(),
        &batched_full,
    )?
    .run()?;
    let bf = t.elapsed().as_secs_f64();
    println!(
        "batched whole forward passes ({} rows per pass): {bf:.2} s ({:.1}× over unbatched); reuse of the corrupted prefix adds {:.1}×",
        opts.batch_rows,
        slow_s / bf,
        bf / fast_s
    );
    Ok(())
}
