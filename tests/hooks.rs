//! Hooks: gradients to a `Var`, replace / add / noise semantics, KV cache.

mod common;

use common::*;
use kedit::{
    At, DType, Hooks, KvCache, LoadOptions, LogitsAt, Model, ModelSource, Site, Tensor, Var,
};

fn tiny_f64(family: &str) -> Model {
    let opts = LoadOptions {
        dtype: DType::F64,
        ..Default::default()
    };
    Model::load_with(&ModelSource::Dir(tiny_dir(family)), &opts).unwrap()
}

/// log P(target | seq) with `delta` added to the MLP output of `layer` at `pos`.
fn logp_with_delta(
    model: &Model,
    seq: &[u32],
    layer: usize,
    pos: usize,
    delta: &Tensor,
    target: u32,
) -> Tensor {
    let batch = model.batch(&[seq.to_vec()]).unwrap();
    let mut hooks = Hooks::new();
    hooks.add(Site::MlpOut(layer), At::point(0, pos), delta.clone());
    let out = model.forward(&batch, &LogitsAt::Last, &hooks).unwrap();
    let logp = candle_nn::ops::log_softmax(&out.logits.unwrap(), candle_core::D::Minus1).unwrap();
    logp.get(0).unwrap().get(target as usize).unwrap()
}

/// The gradient reaching a `Var` added at `MlpOut(l)` equals central finite
/// differences, for every family (sequential, parallel, shared-norm blocks).
#[test]
fn gradient_reaches_var_at_mlp_out_and_matches_finite_differences() {
    for family in ["llama", "gpt2", "gptj", "gpt_neox", "qwen2"] {
        let model = tiny_f64(family);
        let expected = load_tensors(&tiny_dir(family).join("expected.safetensors"));
        let seq = ids(&expected["ids_0"]);
        let d = model.config().d_model;
        let (layer, pos, target) = (0, 5, 7u32);
        let init: Vec<f64> = (0..d)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.01)
            .collect();
        let var = Var::from_vec(init.clone(), d, model.device()).unwrap();
        let loss = logp_with_delta(&model, &seq, layer, pos, var.as_tensor(), target);
        let grads = loss.backward().unwrap();
        let grad: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{family}: no gradient reached the Var"))
            .to_vec1()
            .unwrap();
        let eps = 1e-5;
        let mut max_err: f64 = 0.0;
        let mut max_grad: f64 = 0.0;
        for i in (0..d).step_by(5) {
            let mut plus = init.clone();
            plus[i] += eps;
            let mut minus = init.clone();
            minus[i] -= eps;
            let f = |v: Vec<f64>| {
                let t = Tensor::from_vec(v, d, model.device()).unwrap();
                logp_with_delta(&model, &seq, layer, pos, &t, target)
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (f(plus) - f(minus)) / (2.0 * eps);
            max_err = max_err.max((fd - grad[i]).abs());
            max_grad = max_grad.max(grad[i].abs());
        }
        assert!(
            max_grad > 1e-3,
            "{family}: gradient is (nearly) zero: {max_grad}"
        );
        assert!(
            max_err < 1e-6 * (1.0 + max_grad),
            "{family}: |autograd − finite difference| = {max_err}"
        );
    }
}

/// A delta at a position only changes logits at that position and later.
#[test]
fn add_at_a_point_only_affects_later_positions() {
    let model = tiny("llama");
    let seq: Vec<u32> = vec![3, 14, 15, 92, 65, 35];
    let batch = model.batch(&[seq]).unwrap();
    let clean = model
        .forward(&batch, &LogitsAt::All, &Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let mut hooks = Hooks::new();
    let delta = Tensor::ones(model.config().d_model, DType::F32, model.device()).unwrap();
    hooks.add(Site::ResidPre(1), At::point(0, 3), delta);
    let hooked = model
        .forward(&batch, &LogitsAt::All, &hooks)
        .unwrap()
        .logits
        .unwrap();
    for p in 0..6 {
        let diff = max_abs_diff(
            &clean.get(0).unwrap().get(p).unwrap(),
            &hooked.get(0).unwrap().get(p).unwrap(),
        );
        if p < 3 {
            assert_eq!(diff, 0.0, "position {p} before the hook changed");
        } else {
            assert!(diff > 1e-3, "position {p} after the hook did not change");
        }
    }
}

/// Replacing a site with the value captured in another run reproduces that
/// run exactly (the basis of causal tracing's restoration).
#[test]
fn replace_with_captured_value_restores_the_clean_run() {
    let model = tiny("gpt2");
    let seq: Vec<u32> = vec![5, 6, 7, 8, 9];
    let batch = model.batch(&[seq]).unwrap();
    let n = model.config().n_layers;
    // Clean run: capture the residual leaving the last block at every position.
    let mut hooks = Hooks::new();
    let cap = hooks.capture(Site::ResidPost(n - 1), At::All);
    let clean = model.forward(&batch, &LogitsAt::All, &hooks).unwrap();
    // Corrupted run with noise on the embeddings of tokens 1..3 ...
    let mut noisy = Hooks::new();
    noisy.noise(Site::Embed, At::Points(vec![(0, 1), (0, 2)]), 1.0, 42);
    let corrupted = model
        .forward(&batch, &LogitsAt::All, &noisy)
        .unwrap()
        .logits
        .unwrap();
    let clean_logits = clean.logits.unwrap();
    assert!(max_abs_diff(&clean_logits, &corrupted) > 1e-2);
    // ... and with the clean residual put back everywhere: logits are clean again.
    noisy.replace(
        Site::ResidPost(n - 1),
        At::All,
        clean.captures[cap.0].clone(),
    );
    let restored = model
        .forward(&batch, &LogitsAt::All, &noisy)
        .unwrap()
        .logits
        .unwrap();
    assert!(max_abs_diff(&clean_logits, &restored) < 1e-5);
}

/// Seeded noise is reproducible and has the asked-for scale.
#[test]
fn noise_is_seeded_and_scaled() {
    let a = kedit::model::hooks::gaussian(&[1000, 50], 3.0, 7, &candle_core::Device::Cpu).unwrap();
    let b = kedit::model::hooks::gaussian(&[1000, 50], 3.0, 7, &candle_core::Device::Cpu).unwrap();
    let c = kedit::model::hooks::gaussian(&[1000, 50], 3.0, 8, &candle_core::Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(max_abs_diff(&a, &c) > 0.1);
    let v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
    assert!(mean.abs() < 0.05, "mean {mean}");
    assert!((std - 3.0).abs() < 0.05, "std {std}");
}

/// Incremental decoding with a KV cache gives the logits of a full run.
#[test]
fn kv_cache_matches_full_forward() {
    for family in ["llama", "gpt2", "gpt_neox", "mistral"] {
        let model = tiny(family);
        let seq: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
        let full = model
            .forward(
                &model.batch(std::slice::from_ref(&seq)).unwrap(),
                &LogitsAt::All,
                &Hooks::new(),
            )
            .unwrap()
            .logits
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut cache = KvCache::new();
        let hooks = Hooks::new();
        model.forward_cached(&seq[..5], &mut cache, &hooks).unwrap();
        for (i, &tok) in seq.iter().enumerate().skip(5) {
            let step = model.forward_cached(&[tok], &mut cache, &hooks).unwrap();
            let diff = max_abs_diff(&step, &full.get(i).unwrap());
            assert!(diff < 1e-4, "{family} position {i}: {diff}");
        }
        assert_eq!(cache.len(), seq.len());
    }
}

/// Captures at points return exactly the rows of a full capture.
#[test]
fn point_captures_are_rows_of_full_captures() {
    let model = tiny("qwen2");
    let batch = model.batch(&[vec![1, 2, 3, 4], vec![9, 8]]).unwrap();
    let mut hooks = Hooks::new();
    let all = hooks.capture(Site::MlpKey(1), At::All);
    let some = hooks.capture(Site::MlpKey(1), At::Points(vec![(1, 1), (0, 2)]));
    let out = model.forward(&batch, &LogitsAt::None, &hooks).unwrap();
    let all = out.capture(all);
    let some = out.capture(some);
    assert_eq!(some.dims(), &[2, model.config().d_ff]);
    assert_eq!(
        max_abs_diff(&some.get(0).unwrap(), &all.get(1).unwrap().get(1).unwrap()),
        0.0
    );
    assert_eq!(
        max_abs_diff(&some.get(1).unwrap(), &all.get(0).unwrap().get(2).unwrap()),
        0.0
    );
}

/// Splitting rows at different points, caching the prefixes and running only
/// the suffix columns from a middle layer reproduces the full run's logits
/// (the mechanism that lets the v* optimisation skip δ-independent work).
#[test]
fn ragged_prefix_cache_and_forward_from_match_full_run() {
    for family in ["llama", "gpt2", "gptj", "mistral"] {
        let model = tiny(family);
        let seqs: Vec<Vec<u32>> = vec![
            vec![3, 14, 15, 92, 65, 35, 89],
            vec![27, 18, 28, 18],
            vec![5, 6, 7, 8, 9, 10],
        ];
        let splits = [4usize, 1, 3];
        let layer = 1;
        let batch = model.batch(&seqs).unwrap();
        let mut hooks = Hooks::new();
        let resid = hooks.capture(Site::ResidPre(layer), At::All);
        let (full, cache) = model
            .forward_with_cache(&batch, &LogitsAt::All, &hooks)
            .unwrap();
        let full_logits = full.logits.clone().unwrap();
        let resid = full.capture(resid);
        // Suffix columns of every row, right-padded.
        let lens: Vec<usize> = seqs.iter().zip(splits).map(|(s, p)| s.len() - p).collect();
        let width = *lens.iter().max().unwrap();
        let rows: Vec<Tensor> = (0..seqs.len())
            .map(|r| {
                let row = resid.get(r).unwrap().narrow(0, splits[r], lens[r]).unwrap();
                row.pad_with_zeros(0, 0, width - lens[r]).unwrap()
            })
            .collect();
        let suffix = Tensor::stack(&rows, 0).unwrap();
        let mut prefix = cache
            .prefixes(&splits, layer..model.config().n_layers)
            .unwrap();
        let out = model
            .forward_from(
                layer,
                &suffix,
                &lens,
                &LogitsAt::All,
                &Hooks::new(),
                Some(&mut prefix),
            )
            .unwrap()
            .logits
            .unwrap();
        for r in 0..seqs.len() {
            let want = full_logits
                .get(r)
                .unwrap()
                .narrow(0, splits[r], lens[r])
                .unwrap();
            let got = out.get(r).unwrap().narrow(0, 0, lens[r]).unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-4, "{family} row {r}: {diff}");
        }
    }
}

/// In a right-padded batch (where the decoder runs norms, projections and
/// MLPs on the real columns only), hooks act on each row as they do on the
/// row alone: an `Add` at one row's point moves that row's logits as it
/// would alone and leaves the other row as it is without it,
/// captures are those of the rows alone, and the gradient reaching the
/// added `Var` is the single-row gradient.
#[test]
fn hooks_and_gradients_in_a_padded_batch_equal_each_row_alone() {
    for family in ["llama", "gpt2", "gptj", "gpt_neox", "qwen2"] {
        let model = tiny_f64(family);
        let expected = load_tensors(&tiny_dir(family).join("expected.safetensors"));
        let long = ids(&expected["ids_0"]);
        let short: Vec<u32> = ids(&expected["ids_1"]).into_iter().take(4).collect();
        assert!(
            long.len() > short.len() + 2,
            "{family}: rows of equal length"
        );
        let d = model.config().d_model;
        let (layer, pos, target) = (0, 2, 3usize);
        let init: Vec<f64> = (0..d).map(|i| ((i * 13 % 7) as f64 - 3.0) * 0.02).collect();
        let var = Var::from_vec(init, d, model.device()).unwrap();

        // The short row alone, with δ at (0, pos): logits, key capture, gradient.
        let run = |seqs: &[Vec<u32>], row: usize, with_delta: bool| {
            let batch = model.batch(seqs).unwrap();
            let mut hooks = Hooks::new();
            if with_delta {
                hooks.add(
                    Site::MlpOut(layer),
                    At::point(row, pos),
                    var.as_tensor().clone(),
                );
            }
            let key = hooks.capture(Site::MlpKey(layer + 1), At::All);
            let out = model.forward(&batch, &LogitsAt::Last, &hooks).unwrap();
            let key = out.capture(key).clone();
            (out.logits.unwrap(), key)
        };
        let grad_of = |logits: &Tensor, row: usize| -> Tensor {
            let logp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1).unwrap();
            let loss = logp.get(row).unwrap().get(target).unwrap();
            loss.backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .clone()
        };
        let (alone_logits, alone_key) = run(std::slice::from_ref(&short), 0, true);
        let alone_grad = grad_of(&alone_logits, 0);
        let (plain_long, _) = run(std::slice::from_ref(&long), 0, false);

        let seqs = vec![long.clone(), short.clone()];
        let (logits, key) = run(&seqs, 1, true);
        let batch_grad = grad_of(&logits, 1);
        let tol = 1e-9;
        let max_abs_diff = max_abs_diff_f64;
        let diff = max_abs_diff(&logits.get(1).unwrap(), &alone_logits.get(0).unwrap());
        assert!(
            diff < tol,
            "{family}: edited row differs from alone by {diff}"
        );
        let diff = max_abs_diff(&logits.get(0).unwrap(), &plain_long.get(0).unwrap());
        assert!(diff < tol, "{family}: the other row moved by {diff}");
        let got = key.get(1).unwrap().narrow(0, 0, short.len()).unwrap();
        let diff = max_abs_diff(&got, &alone_key.get(0).unwrap());
        assert!(
            diff < tol,
            "{family}: key capture differs from alone by {diff}"
        );
        let diff = max_abs_diff(&batch_grad, &alone_grad);
        assert!(
            diff < tol,
            "{family}: gradient differs from alone by {diff}"
        );
        let norm: f64 = alone_grad
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(norm > 1e-12, "{family}: no gradient reached δ");
    }
}

/// Largest absolute difference, computed in f64.
fn max_abs_diff_f64(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
