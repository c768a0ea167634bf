//! Evaluates an editing method on a slice of a CounterFact, EasyEdit-style
//! or zsRE file and prints the metric table.
//!
//! ```sh
//! cargo run --release --example counterfact_eval -- --n 10
//! cargo run --release --example counterfact_eval -- --data ../shared/data/zsre/zsre_eval_portability.json --n 100
//! ```
//!
//! Options (all optional):
//!
//! - `--method rome|memit|alphaedit` (MEMIT and AlphaEdit: one joint update
//!   per batch: all cases in `batch` mode, `EVERY` cases per batch in
//!   `sequential:EVERY` mode); several, comma-separated, run one after the
//!   other on the same slice into `OUT/<method>`, and a sequential run then
//!   draws all of them in `OUT/curve.png` (and `.svg`)
//! - `--data FILE` (default `../shared/data/counterfact/counterfact_preknown.json`)
//! - `--start I`, `--n N` (default 0 and 10; `--n 0`: to the end)
//! - `--layer L` (ROME; default: the editor's for the model)
//! - `--layers L1,L2,…` (MEMIT / AlphaEdit window; default: the editor's)
//! - `--lambda X` (MEMIT's `mom2_update_weight`; default: the editor's)
//! - `--templates T1xN1,T2xN2,…` (context templates of the method: `N`
//!   samples of `T` tokens each, plus the bare prompt; default: the
//!   editor's, `5x5,10x5` for ROME and `10x5` for MEMIT / AlphaEdit)
//! - `--steps N` (at most `N` optimisation steps of δ; default 20)
//! - `--kl X`, `--clamp X` (δ's KL weight and norm clamp, a multiple of
//!   ‖v‖; defaults 0.0625 and 4)
//! - `--lr X` (Adam's learning rate for δ; default 0.5)
//! - `--stop-on target|total` (which loss ends δ's optimisation early: the
//!   target NLL alone, the default, or NLL + KL + decay as the reference)
//! - `--early-stop X` (the threshold of that loss; default 0.05)
//! - `--mode single|batch|sequential|sequential:EVERY` (default single)
//! - `--out DIR` (default `target/eval-out/<data>-<method>-<mode>-l<layer>-f<tokens>`)
//! - `--corpus FILE|self` (key statistics; default the WikiText test file in
//!   `../shared/data/prose/` when present, else text sampled from the model)
//! - `--stats-samples N` (default 1000)
//! - `--fluency-tokens N` (default 100, the published setting; 0: off)
//! - `--model PATH` (default SmolLM2-135M-Instruct, fetched once)
//! - `--reuse-deltas DIR` (single mode: apply the per-case deltas an earlier
//!   run saved in `DIR` instead of editing again, e.g. `OUT/deltas`)
//! - `--skip-bad` (set malformed records aside instead of failing)
//! - `--quiet` (no progress)

use std::path::{Path, PathBuf};
use std::time::Instant;

use kedit::edit::{Editor, StopOn};
use kedit::eval::{
    curve_figure, read_cases, read_cases_lenient, run, MeasureOptions, Method, Mode, RunOptions,
};
use kedit::stats::Corpus;

const DEFAULT_DATA: &str = "../shared/data/counterfact/counterfact_preknown.json";
const DEFAULT_CORPUS: &str = "../shared/data/prose/wikitext-2-raw-test.txt";

struct Args {
    methods: Vec<Method>,
    data: PathBuf,
    start: usize,
    n: usize,
    layer: Option<usize>,
    layers: Option<Vec<usize>>,
    lambda: Option<f64>,
    templates: Option<Vec<(usize, usize)>>,
    steps: Option<usize>,
    kl: Option<f64>,
    clamp: Option<f64>,
    lr: Option<f64>,
    stop_on: Option<StopOn>,
    early_stop: Option<f64>,
    mode: Mode,
    out: Option<PathBuf>,
    corpus: Option<String>,
    stats_samples: usize,
    fluency_tokens: usize,
    model: Option<String>,
    reuse_deltas: Option<PathBuf>,
    skip_bad: bool,
    quiet: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        methods: vec![Method::Rome],
        data: PathBuf::from(DEFAULT_DATA),
        start: 0,
        n: 10,
        layer: None,
        layers: None,
        lambda: None,
        templates: None,
        steps: None,
        kl: None,
        clamp: None,
        lr: None,
        stop_on: None,
        early_stop: None,
        mode: Mode::Single,
        out: None,
        corpus: None,
        stats_samples: 1000,
        fluency_tokens: 100,
        model: None,
        reuse_deltas: None,
        skip_bad: false,
        quiet: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--quiet" {
            a.quiet = true;
            continue;
        }
        if flag == "--skip-bad" {
            a.skip_bad = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| -> Result<usize, String> {
            v.parse()
                .map_err(|_| format!("{flag}: {v:?} is not a non-negative integer"))
        };
        match flag.as_str() {
            "--method" => {
                a.methods = value
                    .split(',')
                    .map(|m| m.trim().parse().map_err(|e| format!("{e}")))
                    .collect::<Result<Vec<Method>, String>>()?
            }
            "--data" => a.data = PathBuf::from(value),
            "--start" => a.start = num(&value)?,
            "--n" => a.n = num(&value)?,
            "--layer" => a.layer = Some(num(&value)?),
            "--layers" => {
                a.layers = Some(
                    value
                        .split(',')
                        .map(|v| num(v.trim()))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
            "--lambda" => {
                a.lambda = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--lambda: {value:?} is not a number"))?,
                )
            }
            "--templates" => {
                let spec = value
                    .split(',')
                    .map(|part| {
                        let (t, n) = part.split_once('x').ok_or_else(|| {
                            format!("--templates: {part:?} is not TOKENSxCOUNT (e.g. 5x10)")
                        })?;
                        Ok((num(t)?, num(n)?))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                a.templates = Some(spec);
            }
            "--steps" => a.steps = Some(num(&value)?),
            "--early-stop" => {
                a.early_stop = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--early-stop: {value:?} is not a number"))?,
                )
            }
            "--kl" | "--clamp" | "--lr" => {
                let x: f64 = value
                    .parse()
                    .map_err(|_| format!("{flag}: {value:?} is not a number"))?;
                match flag.as_str() {
                    "--kl" => a.kl = Some(x),
                    "--clamp" => a.clamp = Some(x),
                    _ => a.lr = Some(x),
                }
            }
            "--stop-on" => {
                a.stop_on = Some(match value.as_str() {
                    "target" => StopOn::TargetLoss,
                    "total" => StopOn::TotalLoss,
                    _ => return Err(format!("--stop-on: {value:?} is not target or total")),
                })
            }
            "--mode" => a.mode = value.parse().map_err(|e| format!("{e}"))?,
            "--out" => a.out = Some(PathBuf::from(value)),
            "--corpus" => a.corpus = Some(value),
            "--stats-samples" => a.stats_samples = num(&value)?,
            "--fluency-tokens" => a.fluency_tokens = num(&value)?,
            "--model" => a.model = Some(value),
            "--reuse-deltas" => a.reuse_deltas = Some(PathBuf::from(value)),
            other => return Err(format!("unknown option {other}")),
        }
    }
    check_flags_apply(&a)?;
    Ok(a)
}

/// Refuses a flag that the chosen methods or mode would ignore, so that a
/// run never looks as if it measured a setting it did not use.
fn check_flags_apply(a: &Args) -> Result<(), String> {
    let asked = |m: Method| a.methods.contains(&m);
    for (i, m) in a.methods.iter().enumerate() {
        if a.methods[..i].contains(m) {
            return Err(format!("--method: {m:?} is named twice"));
        }
    }
    if a.layer.is_some() && !asked(Method::Rome) {
        return Err("--layer sets ROME's layer, and no ROME run is asked for \
                    (--layers sets the MEMIT / AlphaEdit window)"
            .into());
    }
    if a.layers.is_some() && !asked(Method::Memit) && !asked(Method::AlphaEdit) {
        return Err(
            "--layers sets the MEMIT / AlphaEdit window, and neither is asked \
                    for (--layer sets ROME's layer)"
                .into(),
        );
    }
    if a.lambda.is_some() && !asked(Method::Memit) {
        return Err("--lambda sets MEMIT's λ, and no MEMIT run is asked for".into());
    }
    if let Some(dir) = &a.reuse_deltas {
        if a.mode != Mode::Single {
            return Err("--reuse-deltas applies to --mode single only".into());
        }
        if !dir.is_dir() {
            return Err(format!(
                "--reuse-deltas: {} is not a directory",
                dir.display()
            ));
        }
    }
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            let usage = "usage: counterfact_eval [--method rome|memit|alphaedit[,…]] [--data FILE] [--start I] [--n N] [--layer L] [--layers L1,L2,..] [--lambda X] \
                 [--templates TxN,..] [--steps N] [--kl X] [--clamp X] [--lr X] [--stop-on target|total] [--early-stop X] [--mode single|batch|sequential[:EVERY]] [--out DIR] [--corpus FILE|self] \
                 [--stats-samples N] [--fluency-tokens N] [--model PATH] [--reuse-deltas DIR] [--skip-bad] [--quiet]\n\
                 (each option is described at the top of examples/counterfact_eval.rs)";
            // --help asked for the usage: it is the answer, not an error.
            if msg.is_empty() {
                println!("{usage}");
                std::process::exit(0);
            }
            eprintln!("error: {msg}\n{usage}");
            std::process::exit(2);
        }
    };
    if let Err(e) = main_with(args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn main_with(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let wall = Instant::now();
    let cases = if args.skip_bad {
        let (good, bad) = read_cases_lenient(&args.data)?;
        for e in &bad {
            eprintln!("skipped: {e}");
        }
        good
    } else {
        read_cases(&args.data)?
    };
    let end = if args.n == 0 {
        cases.len()
    } else {
        (args.start + args.n).min(cases.len())
    };
    if args.start >= end {
        return Err(format!(
            "--start {} --n {} selects no record of {} ({} records)",
            args.start,
            args.n,
            args.data.display(),
            cases.len()
        )
        .into());
    }
    let slice = &cases[args.start..end];

    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => kedit::fetch::ensure(&kedit::fetch::SMOLLM2_135M)?
            .to_string_lossy()
            .into_owned(),
    };
    let mut runs = Vec::new();
    for &method in &args.methods {
        let (report, out) = run_method(&args, method, &model_path, slice, end)?;
        println!("{}", report.markdown());
        runs.push((method, report, out));
    }
    let base = runs[0].2.clone();
    let curve_dir = if runs.len() > 1 {
        base.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        base
    };
    if runs.iter().any(|(_, r, _)| r.checkpoints.len() > 1) {
        let named: Vec<(String, Vec<kedit::eval::Checkpoint>)> = runs
            .iter()
            .map(|(m, r, _)| (m.name().to_string(), r.checkpoints.clone()))
            .collect();
        let title = format!(
            "Sequential edits: {} cases of {}",
            slice.len(),
            args.data.display()
        );
        let fig = curve_figure(&title, &named);
        fig.save_png(&curve_dir.join("curve.png"), 2)?;
        fig.save_svg(&curve_dir.join("curve.svg"))?;
        println!("curve: {}", curve_dir.join("curve.png").display());
    }
    println!(
        "wall time of this invocation: {:.0} s; files in {}",
        wall.elapsed().as_secs_f64(),
        curve_dir.display()
    );
    Ok(())
}

/// One method's run over the slice: its editor, output directory and report.
fn run_method(
    args: &Args,
    method: Method,
    model_path: &str,
    slice: &[kedit::eval::Case],
    end: usize,
) -> Result<(kedit::eval::Report, PathBuf), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let model = kedit::Model::load(model_path)?;
    eprintln!(
        "model {model_path} loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let corpus = match args.corpus.as_deref() {
        Some("self") => Corpus::self_sampled(),
        Some(p) => Corpus::File(PathBuf::from(p)),
        None if Path::new(DEFAULT_CORPUS).is_file() => Corpus::File(PathBuf::from(DEFAULT_CORPUS)),
        None => Corpus::self_sampled(),
    };
    let corpus_name = match &corpus {
        Corpus::File(p) => format!("{} ({} samples)", p.display(), args.stats_samples),
        Corpus::SelfSampled { seed, sequences } => {
            format!("self-sampled (seed {seed}, {sequences} sequences)")
        }
        Corpus::Texts { name, texts } => format!("{name} ({} texts)", texts.len()),
    };
    let mut editor = Editor::new(model).with_corpus(corpus);
    if let Some(l) = args.layer {
        editor.hparams_mut().layer = l;
    }
    if let Some(layers) = &args.layers {
        editor.memit_hparams_mut().layers = layers.clone();
        editor.alphaedit_hparams_mut().layers = layers.clone();
    }
    if let Some(lambda) = args.lambda {
        editor.memit_hparams_mut().mom2_update_weight = lambda;
    }
    editor.hparams_mut().stats.samples = args.stats_samples;
    if let Some(steps) = args.steps {
        editor.hparams_mut().v_steps = steps;
    }
    if let Some(kl) = args.kl {
        editor.hparams_mut().kl_factor = kl;
    }
    if let Some(clamp) = args.clamp {
        editor.hparams_mut().clamp_norm_factor = clamp;
    }
    if let Some(lr) = args.lr {
        editor.hparams_mut().v_lr = lr;
    }
    if let Some(stop_on) = args.stop_on {
        editor.hparams_mut().early_stop_on = stop_on;
    }
    if let Some(threshold) = args.early_stop {
        editor.hparams_mut().early_stop_loss = threshold;
    }
    if let Some(spec) = &args.templates {
        match method {
            Method::Rome => editor.hparams_mut().context_templates = spec.clone(),
            Method::Memit => editor.memit_hparams_mut().context_templates = spec.clone(),
            Method::AlphaEdit => editor.alphaedit_hparams_mut().context_templates = spec.clone(),
        }
    }
    let layer = editor.hparams().layer;
    // Names the edited layers in the output directory and the log.
    let layer_tag = match method {
        Method::Rome => format!("l{layer}"),
        Method::Memit => format!(
            "l{}-lambda{}",
            join(&editor.memit_hparams().layers),
            editor.memit_hparams().mom2_update_weight
        ),
        Method::AlphaEdit => format!("l{}", join(&editor.alphaedit_hparams().layers)),
    };

    let mode_name = match args.mode {
        Mode::Single => "single".to_string(),
        Mode::Batch => "batch".to_string(),
        Mode::Sequential { every } => format!("seq{every}"),
    };
    let stem = args
        .data
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let out = match (&args.out, args.methods.len()) {
        (Some(dir), 1) => dir.clone(),
        (Some(dir), _) => dir.join(method.name()),
        (None, _) => PathBuf::from("target/eval-out").join(format!(
            "{stem}-{}-{mode_name}-{layer_tag}-f{}",
            method.name(),
            args.fluency_tokens
        )),
    };
    eprintln!(
        "{} records {}..{} of {} ({} schema), method {}, mode {mode_name}, layers {layer_tag}, \
         corpus {corpus_name}, fluency {} tokens → {}",
        slice.len(),
        args.start,
        end,
        args.data.display(),
        serde_json::to_string(&slice[0].schema)?.trim_matches('"'),
        method.name(),
        args.fluency_tokens,
        out.display()
    );
    let mut description = serde_json::json!({
        "data": args.data.display().to_string(),
        "corpus": corpus_name,
    });
    // Batch methods' settings identify the run too (ROME's description is
    // left as it was, so that earlier ROME runs still resume).
    let method_hparams = match method {
        Method::Rome => None,
        Method::Memit => Some(serde_json::to_value(editor.memit_hparams())?),
        Method::AlphaEdit => Some(serde_json::to_value(editor.alphaedit_hparams())?),
    };
    if let Some(h) = method_hparams {
        description["method_hparams"] = h;
    }
    let opts = RunOptions {
        method,
        mode: args.mode,
        out_dir: out.clone(),
        measure: MeasureOptions {
            fluency_tokens: args.fluency_tokens,
            ..MeasureOptions::default()
        },
        description,
        progress: !args.quiet,
        reuse_deltas: args.reuse_deltas.clone(),
    };
    let report = run(&mut editor, slice, &opts)?;
    Ok((report, out))
}

/// `1-2-3` for a list of layers.
fn join(layers: &[usize]) -> String {
    layers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("-")
}
