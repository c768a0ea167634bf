//! MEMIT on the real model (SmolLM2-135M-Instruct): one batch of three
//! CounterFact-style requests flips all three answers over the default
//! window (layers 1–5), leaves an unrelated fact alone and undoes bit for
//! bit. Key statistics: the WikiText test file of ../shared/data (1000
//! lines), cached on disk after the first run.

mod common;

use std::path::PathBuf;

use common::*;
use kedit::edit::{BatchMethod, EditRequest, Editor};
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
fn memit_batch_flips_three_answers_on_smollm2() {
    let Some(path) = smollm2_path() else { return };
    assert!(wikitext().is_file(), "missing {}", wikitext().display());
    let model = Model::load(path.to_str().unwrap()).unwrap();
    let mut editor = Editor::new(model).with_corpus(Corpus::File(wikitext()));
    let layers = editor.memit_hparams().layers.clone();
    assert_eq!(layers, vec![1, 2, 3, 4, 5]);
    let originals: Vec<_> = layers.iter().map(|&l| w_out(editor.model(), l)).collect();

    let requests = vec![
        EditRequest::modify(
            "{} is located in the city of",
            "The Eiffel Tower",
            "Paris",
            "Rome",
        ),
        EditRequest::modify(
            "The mother tongue of {} is",
            "Danielle Darrieux",
            "French",
            "English",
        ),
        EditRequest::modify("{} is produced by", "Honda Insight", "Honda", "Suzuki"),
    ];
    let unrelated = "The capital of France is";
    assert_eq!(top1(editor.model(), unrelated), " Paris");
    for req in &requests {
        let p = editor.model().target_probs(&[(
            req.formatted_prompt().as_str(),
            req.target_new.as_deref().unwrap(),
        )]);
        assert!(p.unwrap()[0].prob() < 0.1, "{req:?} is new to the model");
    }

    let done = editor.apply_batch(BatchMethod::Memit, &requests).unwrap();
    let r = &done.report;
    eprintln!(
        "MEMIT, 3 requests: {:.1} s (setup {:.1}, targets {:.1}, keys {:.1}, solve {:.2}), \
         remaining {:.3}, layers {:?}",
        r.seconds.setup + r.seconds.targets + r.seconds.keys + r.seconds.solve,
        r.seconds.setup,
        r.seconds.targets,
        r.seconds.keys,
        r.seconds.solve,
        r.remaining,
        r.layers
            .iter()
            .map(|l| (l.layer, l.written, l.whitened_key_norm.round()))
            .collect::<Vec<_>>()
    );
    for req in &requests {
        let want = req.target_new.as_deref().unwrap();
        let got = top1(editor.model(), &req.formatted_prompt());
        assert!(
            want.starts_with(&got) && !got.trim().is_empty(),
            "{:?}: top-1 {got:?}, wanted {want:?}",
            req.formatted_prompt()
        );
    }
    assert_eq!(top1(editor.model(), unrelated), " Paris");
    assert!(r.remaining < 0.5, "most of δ was written: {}", r.remaining);
    assert_eq!(done.delta.layers.len(), 5);

    editor.undo(done.id).unwrap();
    for (l, original) in layers.iter().zip(&originals) {
        assert_eq!(&w_out(editor.model(), *l), original, "layer {l}");
    }
}
