//! ROME on the real model (SmolLM2-135M-Instruct): the edits of the
//! quickstart really change the model's answers, and nothing else breaks.
//! Key statistics: the WikiText test file of ../shared/data (1000 lines),
//! cached on disk after the first run.

mod common;

use std::path::PathBuf;

use common::*;
use kedit::edit::{Delta, EditRequest, Editor};
use kedit::stats::Corpus;
use kedit::Model;

fn wikitext() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/prose/wikitext-2-raw-test.txt")
}

fn top1(model: &Model, prompt: &str) -> String {
    model.top_k(prompt, 1).unwrap()[0].text.clone()
}

fn w_out(model: &Model, layer: usize) -> Vec<Vec<f32>> {
    model.weights().blocks[layer]
        .mlp
        .w_out
        .weight
        .to_vec2()
        .unwrap()
}

#[test]
fn modify_insert_erase_undo_save_export_on_smollm2() {
    let Some(path) = smollm2_path() else { return };
    assert!(wikitext().is_file(), "missing {}", wikitext().display());
    let model = Model::load(path.to_str().unwrap()).unwrap();
    let mut editor = Editor::new(model).with_corpus(Corpus::File(wikitext()));
    let layer = editor.hparams().layer;
    let original = w_out(editor.model(), layer);

    // Modify: the Eiffel Tower moves to Rome.
    let req = EditRequest::modify(
        "{} is located in the city of",
        "The Eiffel Tower",
        "Paris",
        "Rome",
    )
    .with_paraphrases(&[
        "The Eiffel Tower, located in the heart of",
        "Where is the Eiffel Tower? It is in the city of",
    ])
    .with_neighbours(&[
        "The Louvre is located in the city of",
        "The capital of France is",
    ]);
    let modify = editor.apply(&req).unwrap();
    let r = &modify.report;
    let (new, old) = (r.after.prompt.new.unwrap(), r.after.prompt.true_.unwrap());
    assert!(new > old, "P(Rome) {new} > P(Paris) {old} on the prompt");
    assert!(
        r.before.prompt.new.unwrap() < 0.05,
        "the model did not know Rome before"
    );
    assert!(
        r.after
            .paraphrases
            .iter()
            .any(|p| p.new.unwrap() > p.true_.unwrap()),
        "Rome beats Paris on at least one paraphrase: {:?}",
        r.after.paraphrases
    );
    assert_eq!(top1(editor.model(), "The capital of France is"), " Paris");
    assert_eq!(
        top1(editor.model(), "The Eiffel Tower is located in the city of"),
        " Rome"
    );
    assert!(r.rewrite_error <= 1e-4, "W'k* = v*: {}", r.rewrite_error);
    // Checked independently of the editor's own report.
    let l = &modify.delta.layers[0];
    let w = &editor.model().weights().blocks[layer].mlp.w_out.weight;
    let got = w.matmul(&l.keys).unwrap();
    let err = (&got - &l.values)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let norm = l
        .values
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err / norm <= 1e-4, "‖W'k* − v*‖/‖v*‖ = {}", err / norm);

    // The delta survives a file and reapplies to a fresh copy identically.
    let dir = tempfile::tempdir().unwrap();
    let delta_path = dir.path().join("eiffel.safetensors");
    modify.delta.save(&delta_path).unwrap();
    let mut fresh = Editor::new(Model::load(path.to_str().unwrap()).unwrap());
    fresh
        .apply_delta(&Delta::load(&delta_path).unwrap())
        .unwrap();
    assert_eq!(w_out(fresh.model(), layer), w_out(editor.model(), layer));
    drop(fresh);

    // The edited model exports with Hugging Face Llama names and reloads with the edit.
    let export = dir.path().join("smollm2-edited");
    editor.model().export(&export).unwrap();
    let reloaded = Model::load(export.to_str().unwrap()).unwrap();
    assert_eq!(reloaded.config().family, kedit::model::Family::Llama);
    assert_eq!(
        top1(&reloaded, "The Eiffel Tower is located in the city of"),
        " Rome"
    );
    assert_eq!(top1(&reloaded, "The capital of France is"), " Paris");
    drop(reloaded);

    // Insert: a fact about a subject the model has never seen becomes top-1.
    let insert = editor
        .apply(&EditRequest::insert(
            "{} was born in the city of",
            "Zorvan Kettleby",
            "Lisbon",
        ))
        .unwrap();
    assert!(insert.report.before.prompt.new.unwrap() < 0.05);
    assert_eq!(
        top1(editor.model(), "Zorvan Kettleby was born in the city of"),
        " Lisbon"
    );

    // Erase: French leaves the top 10 and its probability falls at least 10×.
    let erase = editor
        .apply(&EditRequest::erase(
            "The mother tongue of {} is",
            "Danielle Darrieux",
            "French",
        ))
        .unwrap();
    let (b, a) = (
        erase.report.before.prompt.true_.unwrap(),
        erase.report.after.prompt.true_.unwrap(),
    );
    assert_eq!(erase.report.before.prompt.true_rank, Some(0));
    assert!(
        erase.report.after.prompt.true_rank.unwrap() >= 10,
        "{:?}",
        erase.report.after.prompt
    );
    assert!(a * 10.0 <= b, "P(French) {b} → {a}");
    assert_eq!(erase.report.erased, Some(true));

    // Undo, out of order: the original weights come back bit for bit.
    editor.undo(insert.id).unwrap();
    editor.undo(modify.id).unwrap();
    editor.undo(erase.id).unwrap();
    assert_eq!(w_out(editor.model(), layer), original);
    assert_eq!(
        top1(editor.model(), "The Eiffel Tower is located in the city of"),
        " Paris"
    );
}
