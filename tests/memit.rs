//! MEMIT and AlphaEdit on tiny fixtures: the multi-layer solve, the
//! null-space projector, the journal (bit-exact undo, earlier AlphaEdit
//! keys), delta files and bad input (typed errors, weights untouched).

mod common;

use common::*;
use kedit::edit::{
    rome, BatchMethod, Delta, EditRequest, Editor, NullSpace, NullSpaceThreshold, RomeHParams,
};
use kedit::stats::{Corpus, StatsOptions};
use kedit::{At, DType, Error, Hooks, Model, Site, Tensor};

fn corpus() -> Corpus {
    let words = "the capital of france is paris and the capital of italy is rome . the tower is located in the city of paris \
                 she plays the piano and he plays the guitar . the mother tongue of his team is english";
    let texts: Vec<String> = (0..40)
        .map(|i| {
            let w: Vec<&str> = words.split(' ').collect();
            let start = (i * 7) % w.len();
            w.iter()
                .cycle()
                .skip(start)
                .take(12 + i % 9)
                .copied()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    Corpus::Texts {
        name: "tiny-test".into(),
        texts,
    }
}

/// A few short texts: fewer key vectors than `d_ff` (96), so `C` is
/// singular and its null space is large.
fn small_corpus() -> Corpus {
    Corpus::Texts {
        name: "tiny-small".into(),
        texts: vec![
            "the capital of france is paris".into(),
            "she plays the piano".into(),
            "the tower is located in the city of paris".into(),
        ],
    }
}

fn stats(dir: &std::path::Path) -> StatsOptions {
    StatsOptions {
        samples: 40,
        max_len: 24,
        cache_dir: Some(dir.to_path_buf()),
        ..StatsOptions::default()
    }
}

fn editor(layers: &[usize], dir: &std::path::Path) -> Editor {
    let model = tiny("llama");
    let mut hp = RomeHParams::for_model(model.config());
    hp.v_steps = 12;
    hp.context_templates = vec![(3, 2), (5, 2)];
    hp.stats = stats(dir);
    let mut ed = Editor::new(model).with_hparams(hp).with_corpus(corpus());
    {
        // The template cache file is written atomically per process, not
        // per thread: the first sampling of the templates is serialised.
        static TEMPLATES: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
        ed.context_templates().unwrap();
    }
    ed.memit_hparams_mut().layers = layers.to_vec();
    ed.alphaedit_hparams_mut().layers = layers.to_vec();
    // The same (small) templates for the batch methods as for ROME.
    ed.memit_hparams_mut().context_templates = vec![(3, 2), (5, 2)];
    ed.alphaedit_hparams_mut().context_templates = vec![(3, 2), (5, 2)];
    ed
}

/// Subjects end their prompts: the fixtures have two layers, and δ at the
/// last layer reaches no later position.
fn requests() -> Vec<EditRequest> {
    vec![
        EditRequest::modify("the capital of {}", "france", "paris", "rome"),
        EditRequest::insert("the mother tongue of {}", "his team", "french"),
        EditRequest::erase("the tower is located in {}", "the city of", "paris"),
    ]
}

fn w_out(model: &Model, layer: usize) -> Vec<Vec<f32>> {
    model.weights().blocks[layer]
        .mlp
        .w_out
        .weight
        .to_vec2()
        .unwrap()
}

fn norm(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    norm(&(got - want).unwrap()) / norm(want)
}

/// The MLP key at the subject's last token at `layer`, averaged over the
/// templates with `weights`, one template at a time.
fn mean_key(
    model: &Model,
    req: &EditRequest,
    templates: &[String],
    weights: &[f64],
    layer: usize,
) -> Vec<f32> {
    let mut mean = vec![0f32; model.config().d_ff];
    for (t, w) in templates.iter().zip(weights) {
        let prompt = t.replacen("{}", &req.prompt, 1);
        let (tokens, span) = model.subject_tokens(&prompt, &req.subject).unwrap();
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        let batch = model.batch(&[ids]).unwrap();
        let mut hooks = Hooks::new();
        let id = hooks.capture(Site::MlpKey(layer), At::point(0, span.end - 1));
        let out = model.forward_until(&batch, layer, &hooks).unwrap();
        let k: Vec<f32> = out.capture(id).squeeze(0).unwrap().to_vec1().unwrap();
        for (m, x) in mean.iter_mut().zip(k) {
            *m += x * *w as f32;
        }
    }
    mean
}

/// One layer, one request, λ → 0: the update maps the key onto its target
/// `W k + δ` (δ recomputed independently with ROME's optimiser).
#[test]
fn single_layer_memit_reproduces_its_target_as_lambda_goes_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    for layer in [0, 1] {
        let mut ed = editor(&[layer], dir.path());
        ed.memit_hparams_mut().mom2_update_weight = 0.0;
        let before = ed.model().weights().blocks[layer].mlp.w_out.weight.clone();
        let req = requests().remove(0);
        let done = ed
            .apply_batch(BatchMethod::Memit, std::slice::from_ref(&req))
            .unwrap();
        let l = &done.delta.layers[0];
        assert_eq!(l.layer, layer);
        assert_eq!(l.left.dims(), &[64, 1]);
        assert_eq!(l.right.dims(), &[96, 1]);
        let w = &ed.model().weights().blocks[layer].mlp.w_out.weight;
        let err = relative_error(&w.matmul(&l.keys).unwrap(), &l.values);
        assert!(err <= 1e-4, "layer {layer}: ‖W'k − v‖/‖v‖ = {err}");
        assert!(done.report.rewrite_error <= 1e-4);
        assert!(
            (done.report.layers[0].written - 1.0).abs() < 1e-4,
            "{:#?}",
            done.report
        );

        // The target at the key is W k + δ, with δ from ROME's optimiser at this layer.
        let mut hp = ed.hparams().clone();
        hp.layer = layer;
        let spec = ed.memit_hparams().context_templates.clone();
        let templates = ed.templates_for(&spec).unwrap().to_vec();
        let kv = rome::key_and_delta(&tiny("llama"), &req, &templates, &hp).unwrap();
        let target = (before.matmul(&l.keys).unwrap().squeeze(1).unwrap() + &kv.delta).unwrap();
        let err = relative_error(&l.values.squeeze(1).unwrap(), &target);
        assert!(err <= 1e-4, "layer {layer}: value vs W k + δ: {err}");
        // The key: the group-weighted mean over the same templates.
        let weights = kedit::edit::group_weights(&spec);
        let want = mean_key(ed.model(), &req, &templates, &weights, layer);
        let want = Tensor::new(want.as_slice(), &kedit::Device::Cpu).unwrap();
        let err = relative_error(&l.keys.squeeze(1).unwrap(), &want);
        assert!(
            err <= 1e-5,
            "layer {layer}: key vs the weighted mean key: {err}"
        );
    }
}

/// With λ > 0 a batch over two layers writes part of each target; undoing
/// it (between ROME edits) restores the weights bit for bit.
#[test]
fn batch_deltas_undo_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor(&[0, 1], dir.path());
    // The random fixture's key statistics have no small eigenvalues: take
    // the lower part of the spectrum as the "null space".
    ed.alphaedit_hparams_mut().nullspace_threshold = NullSpaceThreshold::Relative(0.3);
    let original = [w_out(ed.model(), 0), w_out(ed.model(), 1)];
    ed.hparams_mut().layer = 1;
    let rome_edit = ed
        .apply(&EditRequest::modify(
            "she plays the {}",
            "piano",
            "and",
            "guitar",
        ))
        .unwrap();
    let after_rome = [w_out(ed.model(), 0), w_out(ed.model(), 1)];
    for method in [BatchMethod::Memit, BatchMethod::AlphaEdit] {
        let done = ed.apply_batch(method, &requests()).unwrap();
        assert_eq!(done.delta.info.method, method.name());
        assert_eq!(done.delta.info.layers, vec![0, 1]);
        assert_eq!(done.delta.info.requests, requests());
        for l in &done.delta.layers {
            assert_eq!(l.left.dims(), &[64, 3]);
            assert_eq!(l.right.dims(), &[96, 3]);
            assert_eq!(l.keys.dims(), &[96, 3]);
        }
        let r = &done.report;
        assert_eq!(r.losses.len(), 3);
        assert!(r.delta_norm > 0.0 && r.target_norm > 0.0, "{r:#?}");
        assert!(
            r.remaining < 1.0,
            "{method:?}: part of the targets was written: {r:?}"
        );
        assert_ne!(w_out(ed.model(), 0), after_rome[0]);
        ed.undo(done.id).unwrap();
        assert_eq!(w_out(ed.model(), 0), after_rome[0], "{method:?}");
        assert_eq!(w_out(ed.model(), 1), after_rome[1], "{method:?}");
    }
    // Batch, then undo the ROME edit under it, then the batch.
    let done = ed.apply_batch(BatchMethod::Memit, &requests()).unwrap();
    ed.undo(rome_edit.id).unwrap();
    ed.undo(done.id).unwrap();
    assert_eq!(w_out(ed.model(), 0), original[0]);
    assert_eq!(w_out(ed.model(), 1), original[1]);
    assert_eq!(ed.edits().count(), 0);
}

/// A MEMIT delta saved and loaded applies to a fresh model with the same
/// result; the file keeps method, requests and hyper-parameters.
#[test]
fn memit_delta_round_trips_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor(&[0, 1], dir.path());
    let done = ed.apply_batch(BatchMethod::Memit, &requests()).unwrap();
    let path = dir.path().join("batch.delta.safetensors");
    done.delta.save(&path).unwrap();
    let loaded = Delta::load(&path).unwrap();
    assert_eq!(loaded.info, done.delta.info);
    assert_eq!(loaded.info.method, "memit");
    assert!(loaded.info.hparams["method"]["mom2_update_weight"].is_number());
    let mut fresh = editor(&[0, 1], dir.path());
    fresh.apply_delta(&loaded).unwrap();
    for layer in [0, 1] {
        assert_eq!(w_out(fresh.model(), layer), w_out(ed.model(), layer));
    }
    assert!(fresh.rewrite_error(&loaded).unwrap() < 1.0);
}

/// A hand-made delta that repeats a layer, or whose keys do not fit the
/// model, is refused before anything changes.
#[test]
fn malformed_batch_deltas_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor(&[0, 1], dir.path());
    let done = ed.apply_batch(BatchMethod::Memit, &requests()).unwrap();
    ed.undo(done.id).unwrap();
    let original = [w_out(ed.model(), 0), w_out(ed.model(), 1)];

    let mut repeated = done.delta.clone();
    repeated.layers[1] = repeated.layers[0].clone();
    let err = ed.apply_delta(&repeated).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { what, reason } if what == "delta" && reason.contains("more than once")),
        "{err}"
    );

    let mut bad_keys = done.delta.clone();
    bad_keys.layers[0].keys = bad_keys.layers[0].keys.narrow(0, 0, 10).unwrap();
    let err = ed.apply_delta(&bad_keys).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { what, reason } if what == "delta" && reason.contains("keys")),
        "{err}"
    );

    let mut bad_rank = done.delta.clone();
    bad_rank.layers[0].left = bad_rank.layers[0].left.narrow(1, 0, 2).unwrap();
    assert!(ed.apply_delta(&bad_rank).is_err());

    assert_eq!(w_out(ed.model(), 0), original[0]);
    assert_eq!(w_out(ed.model(), 1), original[1]);
    assert_eq!(ed.edits().count(), 0);
}

/// Keys are averaged within each group of templates, then over groups:
/// the bare prompt weighs as much as each group of samples.
#[test]
fn template_group_weights_follow_the_reference() {
    let w = kedit::edit::group_weights(&[(10, 5)]);
    assert_eq!(w.len(), 6);
    assert!((w[0] - 0.5).abs() < 1e-12);
    assert!(w[1..].iter().all(|&x| (x - 0.1).abs() < 1e-12));
    let w = kedit::edit::group_weights(&[(5, 10), (10, 10)]);
    assert_eq!(w.len(), 21);
    assert!((w[0] - 1.0 / 3.0).abs() < 1e-12);
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    assert_eq!(kedit::edit::group_weights(&[]), vec![1.0]);
}

/// Deterministic pseudo-random numbers in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn l2(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `‖P k₀‖ ≤ 1e-3 ‖k₀‖` for the keys `C` was built from, while other
/// vectors keep most of their length.
#[test]
fn projector_annihilates_the_keys_it_was_built_from() {
    let d = 40;
    let keys: Vec<Vec<f64>> = (0..5).map(|i| noise(d, i)).collect();
    let mut c = vec![0.0; d * d];
    for k in &keys {
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] += k[i] * k[j] / keys.len() as f64;
            }
        }
    }
    let ns = NullSpace::from_second_moment(&c, d, NullSpaceThreshold::Relative(1e-8)).unwrap();
    assert_eq!(ns.dim(), d - 5);
    for k in &keys {
        let pk = ns.project(k).unwrap();
        assert!(l2(&pk) <= 1e-3 * l2(k), "{} vs {}", l2(&pk), l2(k));
    }
    let v = noise(d, 99);
    assert!(l2(&ns.project(&v).unwrap()) > 0.5 * l2(&v));
    assert!(ns.project(&v[..3]).is_err());
}

/// The same on the model: the null space of a layer's statistics (from a
/// corpus of fewer key vectors than `d_ff`) annihilates those keys.
#[test]
fn editor_null_space_annihilates_corpus_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor(&[0], dir.path()).with_corpus(small_corpus());
    ed.alphaedit_hparams_mut().nullspace_threshold = NullSpaceThreshold::Relative(1e-7);
    let ns = ed.null_space(0).unwrap();
    let opts = stats(dir.path());
    let seqs = small_corpus()
        .sequences(ed.model(), opts.samples, opts.max_len)
        .unwrap();
    let n_keys: usize = seqs.iter().map(Vec::len).sum();
    assert!(n_keys < 96);
    assert!(
        ns.dim() >= 96 - n_keys,
        "dim {} with {n_keys} keys",
        ns.dim()
    );
    for s in &seqs {
        let batch = ed.model().batch(std::slice::from_ref(s)).unwrap();
        let mut hooks = Hooks::new();
        let id = hooks.capture(Site::MlpKey(0), At::row(0, s.len()));
        let out = ed.model().forward_until(&batch, 0, &hooks).unwrap();
        let keys: Vec<Vec<f64>> = out
            .capture(id)
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2()
            .unwrap();
        for k in &keys {
            let pk = ns.project(k).unwrap();
            assert!(l2(&pk) <= 1e-3 * l2(k), "{} vs {}", l2(&pk), l2(k));
        }
    }
    // Read back from the disk cache by a new editor: the same basis.
    let mut again = editor(&[0], dir.path()).with_corpus(small_corpus());
    again.alphaedit_hparams_mut().nullspace_threshold = NullSpaceThreshold::Relative(1e-7);
    let cached = again.null_space(0).unwrap();
    assert_eq!(cached.dim(), ns.dim());
    assert!(std::fs::read_dir(dir.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("-null-")));
}

/// A second AlphaEdit batch leaves the first batch's keys (and the corpus
/// keys) where they were; undoing the first batch drops its keys.
#[test]
fn alphaedit_preserves_earlier_edits_and_undo_forgets_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor(&[1], dir.path()).with_corpus(small_corpus());
    ed.alphaedit_hparams_mut().nullspace_threshold = NullSpaceThreshold::Relative(1e-7);
    ed.alphaedit_hparams_mut().l2 = 1e-6;
    let reqs = requests();
    let first = ed.apply_batch(BatchMethod::AlphaEdit, &reqs[..2]).unwrap();
    let second_req = EditRequest::modify("the capital of {}", "italy", "rome", "paris");
    let second = ed
        .apply_batch(BatchMethod::AlphaEdit, std::slice::from_ref(&second_req))
        .unwrap();
    let dw = second.delta.layers[0].dense().unwrap();
    let k_first = &first.delta.layers[0].keys;
    let moved = norm(&dw.matmul(k_first).unwrap());
    let scale = norm(&dw) * norm(k_first);
    assert!(moved <= 1e-3 * scale, "ΔW₂ K₁: {moved} vs {scale}");
    // The second edit itself was written.
    let own = norm(&dw.matmul(&second.delta.layers[0].keys).unwrap());
    assert!(own > 1e-2 * norm(&dw) * norm(&second.delta.layers[0].keys));

    // Without the first batch the second one is what a fresh editor computes.
    ed.undo(second.id).unwrap();
    ed.undo(first.id).unwrap();
    let (again, _) = ed
        .compute_batch(BatchMethod::AlphaEdit, std::slice::from_ref(&second_req))
        .unwrap();
    let mut fresh = editor(&[1], dir.path()).with_corpus(small_corpus());
    fresh.alphaedit_hparams_mut().nullspace_threshold = NullSpaceThreshold::Relative(1e-7);
    fresh.alphaedit_hparams_mut().l2 = 1e-6;
    let (alone, _) = fresh
        .compute_batch(BatchMethod::AlphaEdit, std::slice::from_ref(&second_req))
        .unwrap();
    let (a, b) = (
        again.layers[0].dense().unwrap(),
        alone.layers[0].dense().unwrap(),
    );
    assert!(relative_error(&a, &b) < 1e-5);
    assert!(
        relative_error(&dw, &b) > 1e-3,
        "the first batch's keys mattered"
    );
}

/// Bad batches and settings are typed errors; nothing is applied.
#[test]
fn bad_batches_are_typed_errors_and_leave_weights_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor(&[0, 1], dir.path());
    let before = [w_out(ed.model(), 0), w_out(ed.model(), 1)];
    let invalid = |r: Result<kedit::edit::BatchApplied, Error>| match r {
        Err(e @ Error::InvalidInput { .. }) => e.to_string(),
        other => panic!("expected InvalidInput, got {:?}", other.map(|a| a.report)),
    };
    for method in [BatchMethod::Memit, BatchMethod::AlphaEdit] {
        assert!(invalid(ed.apply_batch(method, &[])).contains("no request"));
        let mut reqs = requests();
        reqs[1] = EditRequest::modify("no placeholder", "x", "a", "b");
        assert!(invalid(ed.apply_batch(method, &reqs)).contains("request 1"));
        // The same prompt and subject twice, with the same or another target.
        let mut reqs = requests();
        reqs.push(requests()[0].clone());
        let msg = invalid(ed.apply_batch(method, &reqs));
        assert!(
            msg.contains("request 3") && msg.contains("request 0"),
            "{msg}"
        );
        reqs[3] = EditRequest::modify("the capital of {}", "france", "paris", "lyon");
        assert!(invalid(ed.apply_batch(method, &reqs)).contains("same prompt and subject"));
    }
    ed.memit_hparams_mut().layers = vec![0, 7];
    assert!(invalid(ed.apply_batch(BatchMethod::Memit, &requests())).contains("7 is out of range"));
    ed.memit_hparams_mut().layers = vec![1, 1];
    assert!(invalid(ed.apply_batch(BatchMethod::Memit, &requests())).contains("twice"));
    ed.memit_hparams_mut().layers = vec![];
    assert!(invalid(ed.apply_batch(BatchMethod::Memit, &requests())).contains("empty"));
    ed.memit_hparams_mut().layers = vec![0, 1];
    ed.memit_hparams_mut().mom2_update_weight = f64::NAN;
    invalid(ed.apply_batch(BatchMethod::Memit, &requests()));
    ed.memit_hparams_mut().mom2_update_weight = 1.0;
    ed.alphaedit_hparams_mut().l2 = -1.0;
    invalid(ed.apply_batch(BatchMethod::AlphaEdit, &requests()));
    ed.alphaedit_hparams_mut().l2 = 10.0;
    ed.alphaedit_hparams_mut().nullspace_threshold = NullSpaceThreshold::Absolute(0.0);
    invalid(ed.apply_batch(BatchMethod::AlphaEdit, &requests()));
    // A threshold below every eigenvalue: an empty null space, no edit possible.
    ed.alphaedit_hparams_mut().nullspace_threshold = NullSpaceThreshold::Absolute(1e-300);
    assert!(invalid(ed.apply_batch(BatchMethod::AlphaEdit, &requests())).contains("null space"));
    assert!(ed.null_space(5).is_err());
    // A diverging optimisation.
    ed.hparams_mut().v_lr = 1e38;
    ed.hparams_mut().clamp_norm_factor = 1e30;
    let err = ed.apply_batch(BatchMethod::Memit, &requests()).unwrap_err();
    assert!(matches!(err, Error::NonFinite(_)), "{err}");

    assert_eq!(w_out(ed.model(), 0), before[0]);
    assert_eq!(w_out(ed.model(), 1), before[1]);
    assert_eq!(ed.edits().count(), 0);
}

fn cases() -> Vec<kedit::eval::Case> {
    let rec = |id: u64, subject: &str, new: &str, old: &str| {
        format!(
            r#"{{"case_id": {id}, "requested_rewrite": {{"prompt": "the capital of {{}}", "subject": "{subject}",
                "target_new": {{"str": "{new}"}}, "target_true": {{"str": "{old}"}}}},
               "paraphrase_prompts": ["what is the capital of {subject}"],
               "neighborhood_prompts": ["the tower is in the city of"],
               "generation_prompts": ["{subject} is"]}}"#
        )
    };
    let text = format!(
        "[{}, {}, {}]",
        rec(7, "france", "rome", "paris"),
        rec(8, "italy", "paris", "rome"),
        rec(9, "the tower", "italy", "france")
    );
    kedit::eval::parse_cases(&text, std::path::Path::new("tiny.json"), None).unwrap()
}

/// The evaluation runner takes MEMIT and AlphaEdit: one joint update per
/// batch (all cases in batch mode, `every` cases in sequential mode), and
/// a rerun replays the saved batch deltas.
#[test]
fn runner_edits_in_batches_with_memit_and_alphaedit() {
    use kedit::eval::{MeasureOptions, Method, Mode, RunOptions};
    assert_eq!("memit".parse::<Method>().unwrap(), Method::Memit);
    assert_eq!("AlphaEdit".parse::<Method>().unwrap(), Method::AlphaEdit);
    assert_eq!(Method::Memit.max_batch(), usize::MAX);
    let dir = tempfile::tempdir().unwrap();
    let opts = |out: &std::path::Path, method: Method, mode: Mode| RunOptions {
        method,
        mode,
        measure: MeasureOptions {
            fluency_tokens: 4,
            chunk: 5,
        },
        progress: false,
        ..RunOptions::new(out)
    };
    let out = tempfile::tempdir().unwrap();
    let mut ed = editor(&[0, 1], dir.path());
    let o = opts(out.path(), Method::Memit, Mode::Sequential { every: 2 });
    let report = kedit::eval::run(&mut ed, &cases(), &o).unwrap();
    assert_eq!(report.summary.n, 3);
    assert_eq!(report.failed, 0);
    let batches: Vec<Vec<usize>> = ed
        .edits()
        .map(|(_, d)| vec![d.info.requests.len(), d.layers.len()])
        .collect();
    assert_eq!(batches, [[2, 2], [1, 2]]);
    let weights = w_out(ed.model(), 0);
    let lines = std::fs::read_to_string(out.path().join("cases.jsonl")).unwrap();
    assert!(lines
        .lines()
        .all(|l| l.contains("\"delta_norm\"") && !l.contains("\"edit\":null")));
    let mut fresh = editor(&[0, 1], dir.path());
    let again = kedit::eval::run(&mut fresh, &cases(), &o).unwrap();
    assert_eq!(again.summary, report.summary);
    assert_eq!(w_out(fresh.model(), 0), weights);

    let out = tempfile::tempdir().unwrap();
    let mut ed = editor(&[0, 1], dir.path());
    ed.alphaedit_hparams_mut().nullspace_threshold = NullSpaceThreshold::Relative(0.3);
    let report = kedit::eval::run(
        &mut ed,
        &cases(),
        &opts(out.path(), Method::AlphaEdit, Mode::Batch),
    )
    .unwrap();
    assert_eq!(report.checkpoints.len(), 1);
    assert_eq!(ed.edits().count(), 1);
    assert_eq!(ed.edits().next().unwrap().1.info.method, "alphaedit");
    assert_eq!(report.layers, vec![0, 1]);

    // Invalid settings are the run's error, before any case is edited or
    // written, not a failed edit of every case.
    for (method, bad) in [
        (Method::Memit, "layers"),
        (Method::Memit, "lambda"),
        (Method::AlphaEdit, "l2"),
        (Method::Rome, "samples"),
    ] {
        let out = tempfile::tempdir().unwrap();
        let mut ed = editor(&[0, 1], dir.path());
        match bad {
            "layers" => ed.memit_hparams_mut().layers = vec![0, 99],
            "lambda" => ed.memit_hparams_mut().mom2_update_weight = -5.0,
            "l2" => ed.alphaedit_hparams_mut().l2 = f64::NAN,
            _ => ed.hparams_mut().stats.samples = 0,
        }
        let err = kedit::eval::run(&mut ed, &cases(), &opts(out.path(), method, Mode::Batch))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{bad}: {err}");
        assert!(!out.path().join("cases.jsonl").exists(), "{bad}");
        assert_eq!(ed.edits().count(), 0);
    }
}

/// The keys a batch delta stores at each layer are the keys of the edited
/// model there (the mean over the templates, read independently).
#[test]
fn stored_keys_are_the_edited_models_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor(&[0, 1], dir.path());
    let templates = ed.context_templates().unwrap().to_vec();
    let reqs = requests();
    let done = ed.apply_batch(BatchMethod::Memit, &reqs).unwrap();
    for l in &done.delta.layers {
        let stored: Vec<Vec<f32>> = l.keys.t().unwrap().to_vec2().unwrap();
        for (i, req) in reqs.iter().enumerate() {
            let weights = kedit::edit::group_weights(&ed.memit_hparams().context_templates);
            let mean = mean_key(ed.model(), req, &templates, &weights, l.layer);
            let err: f32 = mean
                .iter()
                .zip(&stored[i])
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                .sqrt();
            let norm: f32 = mean.iter().map(|a| a * a).sum::<f32>().sqrt();
            assert!(
                err <= 1e-5 * norm.max(1.0),
                "layer {} request {i}: {err} vs {norm}",
                l.layer
            );
        }
    }
}

/// The targets of a batch are optimised together (one batch of prompts,
/// one δ per request, converged requests leaving it early), and each
/// equals the target optimised alone; an erase towards a neutral answer
/// is among them.
#[test]
fn batched_targets_equal_targets_optimised_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor(&[1], dir.path());
    let templates = ed.context_templates().unwrap().to_vec();
    let mut hp = ed.hparams().clone();
    hp.layer = 0;
    // High enough that some requests stop early and others do not.
    hp.early_stop_loss = 2.0;
    let mut reqs = requests();
    let mut neutral = EditRequest::erase("the capital of {}", "germany", "berlin");
    neutral.target_new = Some(" nothing".into());
    reqs.push(neutral);
    let together = rome::keys_and_deltas(ed.model(), &reqs, &templates, &hp).unwrap();
    assert_eq!(together.len(), reqs.len());
    let steps: Vec<usize> = together.iter().map(|kv| kv.losses.len()).collect();
    assert!(
        steps.iter().any(|&s| s < hp.v_steps) && steps.contains(&hp.v_steps),
        "steps taken {steps:?}"
    );
    for (i, (req, kv)) in reqs.iter().zip(&together).enumerate() {
        let alone = rome::key_and_delta(ed.model(), req, &templates, &hp).unwrap();
        assert_eq!(kv.losses.len(), alone.losses.len(), "request {i}");
        let err = relative_error(&kv.delta, &alone.delta);
        assert!(err <= 1e-4, "request {i}: δ differs by {err}");
        let err = relative_error(&kv.key, &alone.key);
        assert!(err <= 1e-5, "request {i}: k* differs by {err}");
        for (a, b) in kv.losses.iter().zip(&alone.losses) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "request {i}: {a} vs {b}"
            );
        }
    }
    // The neutral erase (two objectives) makes progress.
    assert!(together[3].losses.last().unwrap() < together[3].losses.first().unwrap());
}
