//! The main job of kedit on a real model (SmolLM2-135M-Instruct, fetched once):
//! change a fact, show that it took and what it did not touch, add a fact,
//! erase a fact, undo everything, and save a delta file.
//!
//! ```text
//! cargo run --release --example quickstart
//! cargo run --release --example quickstart -- --corpus path/to/text.txt --out kedit-out
//! ```
//!
//! Without `--corpus`, the key statistics come from text sampled from the
//! model itself (64 sequences, a few minutes on a CPU the first time, then
//! cached).

use std::path::PathBuf;
use std::time::Instant;

use kedit::edit::{EditRequest, Editor};
use kedit::stats::Corpus;
use kedit::Model;

fn show(model: &Model, prompt: &str) -> kedit::Result<()> {
    let top = model.top_k(prompt, 3)?;
    let list: Vec<String> = top
        .iter()
        .map(|t| format!("{:?} {:.3}", t.text, t.prob))
        .collect();
    println!("    {prompt:<48} → {}", list.join(", "));
    Ok(())
}

mod common;

fn main() -> std::process::ExitCode {
    common::exit_status(run())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let (mut out, mut corpus_path) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--out" => &mut out,
            "--corpus" => &mut corpus_path,
            other => {
                return Err(format!(
                    "unknown option {other:?} (usage: quickstart [--corpus FILE] [--out DIR])"
                )
                .into())
            }
        };
        *slot = Some(args.next().ok_or(format!("{flag} needs a value"))?);
    }
    let out_dir = PathBuf::from(out.unwrap_or_else(|| "kedit-out".into()));
    let corpus = match corpus_path {
        Some(path) => Corpus::File(path.into()),
        None => Corpus::self_sampled(),
    };

    let t = Instant::now();
    let path = kedit::fetch::ensure(&kedit::fetch::SMOLLM2_135M)?;
    let model = Model::load(path.to_str().ok_or("non-UTF-8 path")?)?;
    println!(
        "loaded SmolLM2-135M-Instruct ({} layers) in {:.1} s",
        model.config().n_layers,
        t.elapsed().as_secs_f64()
    );

    let eiffel = "The Eiffel Tower is located in the city of";
    let paraphrases = [
        "The Eiffel Tower, located in the heart of",
        "Where is the Eiffel Tower? It is in the city of",
    ];
    let neighbours = [
        "The Louvre is located in the city of",
        "The capital of France is",
    ];
    println!("\nbefore:");
    for p in std::iter::once(eiffel).chain(paraphrases).chain(neighbours) {
        show(&model, p)?;
    }

    let mut editor = Editor::new(model).with_corpus(corpus);
    let layer = editor.hparams().layer;
    let t = Instant::now();
    editor.solver(layer)?;
    editor.context_templates()?;
    println!("\nkey statistics and context templates for layer {layer} ready in {:.1} s (cached on disk)", t.elapsed().as_secs_f64());

    // 1. Modify.
    let modify = EditRequest::modify(
        "{} is located in the city of",
        "The Eiffel Tower",
        "Paris",
        "Rome",
    )
    .with_paraphrases(&paraphrases)
    .with_neighbours(&neighbours);
    let t = Instant::now();
    let edit = editor.apply(&modify)?;
    let s = &edit.report.seconds;
    println!(
        "\nMODIFY Eiffel Tower: Paris → Rome in {:.1} s (k* {:.1} s, v* {:.1} s over {} steps, solve {:.3} s); ‖ΔW‖ = {:.2}, ‖W'k* − v*‖/‖v*‖ = {:.1e}",
        t.elapsed().as_secs_f64(),
        s.key,
        s.value,
        edit.report.losses.len(),
        s.solve,
        edit.report.delta_norm,
        edit.report.rewrite_error
    );
    for p in std::iter::once(eiffel).chain(paraphrases).chain(neighbours) {
        show(editor.model(), p)?;
    }
    std::fs::create_dir_all(&out_dir)?;
    let delta_path = out_dir.join("eiffel-rome.delta.safetensors");
    edit.delta.save(&delta_path)?;
    println!("    saved the delta to {}", delta_path.display());

    // 2. Insert a fact about a subject the model has never seen.
    let insert = EditRequest::insert("{} was born in the city of", "Zorvan Kettleby", "Lisbon");
    let t = Instant::now();
    editor.apply(&insert)?;
    println!(
        "\nINSERT Zorvan Kettleby was born in Lisbon ({:.1} s):",
        t.elapsed().as_secs_f64()
    );
    show(editor.model(), "Zorvan Kettleby was born in the city of")?;

    // 3. Erase a fact.
    let erase = EditRequest::erase("The mother tongue of {} is", "Danielle Darrieux", "French");
    let before = editor
        .model()
        .top_k("The mother tongue of Danielle Darrieux is", 3)?;
    let t = Instant::now();
    let erased = editor.apply(&erase)?;
    println!(
        "\nERASE Danielle Darrieux's mother tongue (French) ({:.1} s): P(French) {:.4} → {:.4}, rank {} → {}, erased: {}",
        t.elapsed().as_secs_f64(),
        erased.report.before.prompt.true_.unwrap_or(0.0),
        erased.report.after.prompt.true_.unwrap_or(0.0),
        erased.report.before.prompt.true_rank.unwrap_or(0),
        erased.report.after.prompt.true_rank.unwrap_or(0),
        erased.report.erased.unwrap_or(false)
    );
    println!(
        "    before: {:?}",
        before.iter().map(|t| t.text.clone()).collect::<Vec<_>>()
    );
    show(editor.model(), "The mother tongue of Danielle Darrieux is")?;

    // 4. Undo everything.
    let t = Instant::now();
    editor.undo_all()?;
    println!(
        "\nUNDO all edits ({:.3} s): the original weights are back bit for bit",
        t.elapsed().as_secs_f64()
    );
    for p in [
        eiffel,
        "Zorvan Kettleby was born in the city of",
        "The mother tongue of Danielle Darrieux is",
    ] {
        show(editor.model(), p)?;
    }
    Ok(())
}
