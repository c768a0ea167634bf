//! The real model: SmolLM2-135M-Instruct from its GGUF (fetched by
//! `cargo run --release --example fetch_model`), against transformers'
//! logits on the same dequantised file (tests/fixtures/make_fixtures.py).

mod common;

use common::*;
use kedit::{Hooks, LogitsAt, Sampling};

fn reference() -> (
    serde_json::Value,
    std::collections::HashMap<String, kedit::Tensor>,
) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let json = std::fs::read_to_string(dir.join("smollm2_reference.json")).unwrap();
    (
        serde_json::from_str(&json).unwrap(),
        load_tensors(&dir.join("smollm2_reference.safetensors")),
    )
}

#[test]
fn config_from_gguf_metadata() {
    let Some(model) = smollm2() else { return };
    let c = model.config();
    assert_eq!(c.family, kedit::model::Family::Llama);
    assert_eq!(
        (c.n_layers, c.d_model, c.d_ff, c.vocab_size),
        (30, 576, 1536, 49152)
    );
    assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim), (9, 3, 64));
    assert!(c.tied_embeddings);
}

#[test]
fn tokenizer_matches_transformers() {
    let Some(model) = smollm2() else { return };
    let (json, _) = reference();
    for p in json["prompts"].as_array().unwrap() {
        let want: Vec<u32> = p["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = model.prompt_ids(p["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(got, want, "ids of {}", p["prompt"]);
    }
    for (text, ids) in json["probe_ids"].as_object().unwrap() {
        let want: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(model.target_ids(text).unwrap(), want, "ids of {text:?}");
    }
    // Digits split one by one, control tokens stay whole, decoding round-trips.
    let tok = model.tokenizer();
    assert_eq!(tok.encode_ids("1234", false).unwrap().len(), 4);
    assert_eq!(tok.encode_ids("<|im_start|>user", false).unwrap()[0], 1);
    let text = "Grüße aus Köln, 2026!";
    assert_eq!(
        tok.decode(&tok.encode_ids(text, false).unwrap()).unwrap(),
        text
    );
}

/// Last-position logits of 5 prompts within 1e-3 of transformers, same top-1.
#[test]
fn logits_match_transformers() {
    let Some(model) = smollm2() else { return };
    let (json, tensors) = reference();
    let prompts = json["prompts"].as_array().unwrap();
    let seqs: Vec<Vec<u32>> = (0..prompts.len())
        .map(|i| ids(&tensors[&format!("ids_{i}")]))
        .collect();
    let batch = model.batch(&seqs).unwrap();
    let logits = model
        .forward(&batch, &LogitsAt::Last, &Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let got = logits.get(i).unwrap();
        let want = &tensors[&format!("last_logits_{i}")];
        let diff = max_abs_diff(&got, want);
        assert!(diff < 1e-3, "prompt {i}: max |Δlogit| = {diff}");
        let top1 = got.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(
            top1 as u64,
            p["top5"][0]["id"].as_u64().unwrap(),
            "top-1 of prompt {i}"
        );
    }
    // Every position of prompt 0.
    let all = model
        .forward(
            &model.batch(&seqs[..1]).unwrap(),
            &LogitsAt::All,
            &Hooks::new(),
        )
        .unwrap()
        .logits
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = max_abs_diff(&all, &tensors["logits_0"]);
    assert!(diff < 1e-3, "all positions of prompt 0: {diff}");
}

#[test]
fn knows_the_capital_of_france() {
    let Some(model) = smollm2() else { return };
    let top = model.top_k("The capital of France is", 5).unwrap();
    assert_eq!(top[0].text, " Paris");
    assert!(
        (top[0].prob - 0.7725).abs() < 2e-3,
        "P(Paris) = {}",
        top[0].prob
    );
    // Teacher-forced target probability of a one-token target equals its softmax probability.
    let tp = model
        .target_prob("The capital of France is", " Paris")
        .unwrap();
    assert!((tp.prob() - top[0].prob).abs() < 1e-5);
    assert_eq!(tp.first_rank, 0);
    // transformers' top-5 here is Paris, the, London, Le, New.
    assert_eq!(
        model
            .target_prob("The capital of France is", " London")
            .unwrap()
            .first_rank,
        2
    );
    // A multi-token target: mean NLL over its tokens.
    let tp = model
        .target_prob("The Eiffel Tower is located in", " the city of Paris")
        .unwrap();
    assert_eq!(tp.token_probs.len(), 4);
    let mean = -tp.token_probs.iter().map(|p| p.ln()).sum::<f32>() / 4.0;
    assert!((tp.mean_nll - mean).abs() < 1e-5);
}

#[test]
fn subject_span_in_prompt() {
    let Some(model) = smollm2() else { return };
    let (tokens, span) = model
        .subject_tokens("{} is located in the city of", "The Eiffel Tower")
        .unwrap();
    let subject: String = tokens[span.clone()]
        .iter()
        .map(|t| t.text.clone())
        .collect();
    assert_eq!(subject.replace('Ġ', " "), "The Eiffel Tower");
    assert_eq!(span, 0..4);
    let (tokens, span) = model
        .find_subject("Where is the Eiffel Tower?", "Eiffel Tower")
        .unwrap();
    assert_eq!(tokens[span.start].text, "ĠE");
    assert_eq!(tokens[span.end - 1].text, "ĠTower");
}

#[test]
fn greedy_generation_is_deterministic_and_consistent_with_top1() {
    let Some(model) = smollm2() else { return };
    let g1 = model
        .generate("The capital of France is", 6, &Sampling::Greedy)
        .unwrap();
    let g2 = model
        .generate("The capital of France is", 6, &Sampling::Greedy)
        .unwrap();
    assert_eq!(g1, g2);
    assert!(g1.text.starts_with(" Paris"), "{:?}", g1.text);
    let s = Sampling::Sample {
        temperature: 1.0,
        top_k: Some(50),
        seed: 3,
    };
    let a = model.generate("Once upon a time", 8, &s).unwrap();
    let b = model.generate("Once upon a time", 8, &s).unwrap();
    assert_eq!(a, b, "same seed, same sample");
}
