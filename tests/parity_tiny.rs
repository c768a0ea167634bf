//! Parity with Hugging Face transformers on tiny random checkpoints of every
//! supported family (fixtures and expected values: tests/fixtures/make_fixtures.py).

mod common;

use common::*;
use kedit::{At, Hooks, LogitsAt, Site};

const FAMILIES: [&str; 6] = ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral"];
const TOL: f32 = 1e-4;

/// Both reference sequences run as one right-padded batch: each row's logits
/// must match transformers' logits for that sequence run alone.
#[test]
fn logits_match_transformers_in_a_padded_batch() {
    for family in FAMILIES {
        let model = tiny(family);
        let expected = load_tensors(&tiny_dir(family).join("expected.safetensors"));
        let seqs = vec![ids(&expected["ids_0"]), ids(&expected["ids_1"])];
        let batch = model.batch(&seqs).unwrap();
        let out = model
            .forward(&batch, &LogitsAt::All, &Hooks::new())
            .unwrap();
        let logits = out.logits.unwrap();
        for (row, seq) in seqs.iter().enumerate() {
            let got = logits.get(row).unwrap().narrow(0, 0, seq.len()).unwrap();
            let want = &expected[&format!("logits_{row}")];
            let diff = max_abs_diff(&got, want);
            assert!(diff < TOL, "{family} row {row}: max |Δlogit| = {diff}");
        }
    }
}

/// The hook sites see what transformers' modules see: the residual stream
/// entering each block, the MLP key (input of the output projection) and
/// the MLP output.
#[test]
fn hook_sites_match_transformers_activations() {
    for family in FAMILIES {
        let model = tiny(family);
        let expected = load_tensors(&tiny_dir(family).join("expected.safetensors"));
        let seq = ids(&expected["ids_0"]);
        let batch = model.batch(&[seq]).unwrap();
        let mut hooks = Hooks::new();
        let n_layers = model.config().n_layers;
        let mut caps = Vec::new();
        for l in 0..n_layers {
            caps.push((
                l,
                hooks.capture(Site::ResidPre(l), At::All),
                hooks.capture(Site::MlpKey(l), At::All),
                hooks.capture(Site::MlpOut(l), At::All),
            ));
        }
        let out = model.forward(&batch, &LogitsAt::None, &hooks).unwrap();
        assert!(out.logits.is_none());
        for (l, resid, key, mlp) in caps {
            for (name, id) in [("hidden", resid), ("mlp_key", key), ("mlp_out", mlp)] {
                let got = out.capture(id).squeeze(0).unwrap();
                let want = &expected[&format!("{name}_0_{l}")];
                let diff = max_abs_diff(&got, want);
                assert!(diff < TOL, "{family} {name} layer {l}: max |Δ| = {diff}");
            }
        }
    }
}

/// Logits asked for at chosen points equal the same entries of a full run.
#[test]
fn logits_at_points_equal_full_logits() {
    let model = tiny("llama");
    let expected = load_tensors(&tiny_dir("llama").join("expected.safetensors"));
    let seqs = vec![ids(&expected["ids_0"]), ids(&expected["ids_1"])];
    let batch = model.batch(&seqs).unwrap();
    let all = model
        .forward(&batch, &LogitsAt::All, &Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let points = vec![(1, 4), (0, 0), (0, 8)];
    let some = model
        .forward(&batch, &LogitsAt::Points(points.clone()), &Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(some.dims(), &[3, model.config().vocab_size]);
    for (i, (r, p)) in points.into_iter().enumerate() {
        let want = all.get(r).unwrap().get(p).unwrap();
        assert!(max_abs_diff(&some.get(i).unwrap(), &want) < 1e-5);
    }
    let last = model
        .forward(&batch, &LogitsAt::Last, &Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    assert!(max_abs_diff(&last.get(1).unwrap(), &all.get(1).unwrap().get(4).unwrap()) < 1e-5);
}
