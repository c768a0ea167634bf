//! The editor on tiny fixtures: the rank-one solve, the journal, deltas on
//! disk, export, and bad input (typed errors, weights untouched).

mod common;

use common::*;
use kedit::edit::{Delta, EditRequest, Editor, RomeHParams, StopOn};
use kedit::stats::{Corpus, StatsOptions};
use kedit::{Error, Hooks, LogitsAt, Model, Tensor};

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

fn editor(family: &str, layer: usize, stats_dir: &std::path::Path) -> Editor {
    let model = tiny(family);
    let mut hp = RomeHParams::for_model(model.config());
    hp.layer = layer;
    hp.v_steps = 12;
    hp.context_templates = vec![(3, 2), (5, 2)];
    hp.stats = StatsOptions {
        samples: 40,
        max_len: 24,
        cache_dir: Some(stats_dir.to_path_buf()),
        ..StatsOptions::default()
    };
    Editor::new(model).with_hparams(hp).with_corpus(corpus())
}

fn request() -> EditRequest {
    EditRequest::modify("{} is located in the city of", "the tower", "paris", "rome")
}

fn w_out(model: &Model, layer: usize) -> Vec<Vec<f32>> {
    model.weights().blocks[layer]
        .mlp
        .w_out
        .weight
        .to_vec2()
        .unwrap()
}

fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    let err = (got - want)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let norm = want
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    err / norm
}

/// After a ROME update, `W' k* = v*` (checked independently of the editor).
#[test]
fn rank_one_update_maps_the_key_to_the_value() {
    let dir = tempfile::tempdir().unwrap();
    for family in ["llama", "gpt2", "gpt_neox"] {
        let mut ed = editor(family, 0, dir.path());
        let applied = ed.apply(&request()).unwrap();
        let l = &applied.delta.layers[0];
        let w = &ed.model().weights().blocks[0].mlp.w_out.weight;
        let got = w.matmul(&l.keys).unwrap();
        let err = relative_error(&got, &l.values);
        assert!(err <= 1e-4, "{family}: ‖W'k* − v*‖/‖v*‖ = {err}");
        assert!(applied.report.rewrite_error <= 1e-4);
        // The update is rank one and equals left ⊗ right.
        assert_eq!(l.left.dims(), &[ed.model().config().d_model, 1]);
        assert_eq!(l.right.dims(), &[ed.model().config().d_ff, 1]);
        assert!(applied.report.delta_norm > 0.0);
        // The optimisation made progress on the target.
        let losses = &applied.report.losses;
        assert!(losses.last().unwrap() < &losses[0], "{family}: {losses:?}");
    }
}

/// Undo restores the original weights bit for bit, in any order.
#[test]
fn undo_is_bit_exact_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor("llama", 0, dir.path());
    let original1 = w_out(ed.model(), 1);
    let original0 = w_out(ed.model(), 0);
    let a = ed.apply(&request()).unwrap();
    let b = ed
        .apply(&EditRequest::modify(
            "{} plays the",
            "she",
            "piano",
            "guitar",
        ))
        .unwrap();
    // At the last layer δ reaches only its own position: the subject ends the prompt.
    ed.hparams_mut().layer = 1;
    let c = ed
        .apply(&EditRequest::insert(
            "the mother tongue of {}",
            "his team",
            "french",
        ))
        .unwrap();
    assert_ne!(w_out(ed.model(), 1), original1);
    assert_ne!(w_out(ed.model(), 0), original0);
    // Middle first, then the first, then the last.
    ed.undo(b.id).unwrap();
    ed.undo(a.id).unwrap();
    assert_eq!(w_out(ed.model(), 0), original0, "layer 0 is back exactly");
    assert_ne!(
        w_out(ed.model(), 1),
        original1,
        "the layer-1 edit is still there"
    );
    ed.undo(c.id).unwrap();
    assert_eq!(w_out(ed.model(), 1), original1);
    assert!(ed.undo(c.id).is_err(), "an edit cannot be undone twice");
}

/// A delta saved to a file and applied to a fresh copy of the model gives
/// the same weights; a delta for another model or a corrupt file is refused.
#[test]
fn delta_round_trips_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor("llama", 0, dir.path());
    let applied = ed.apply(&request()).unwrap();
    let path = dir.path().join("eiffel.delta.safetensors");
    applied.delta.save(&path).unwrap();
    let loaded = Delta::load(&path).unwrap();
    assert_eq!(loaded.info, applied.delta.info);
    let mut fresh = editor("llama", 0, dir.path());
    fresh.apply_delta(&loaded).unwrap();
    assert_eq!(w_out(fresh.model(), 0), w_out(ed.model(), 0));

    let mut other = editor("qwen2", 0, dir.path());
    let before = w_out(other.model(), 0);
    let err = other.apply_delta(&loaded).unwrap_err();
    assert!(err.to_string().contains("made for model"), "{err}");
    assert_eq!(w_out(other.model(), 0), before);

    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        Delta::load(&path).unwrap_err(),
        Error::Format { .. }
    ));
    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(
        Delta::load(&path).unwrap_err(),
        Error::Format { .. }
    ));
}

/// An exported model reloads with the same logits, for every family, and an
/// edited one reloads with its edit.
#[test]
fn export_round_trips_for_every_family() {
    let dir = tempfile::tempdir().unwrap();
    for family in ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral"] {
        let model = tiny(family);
        let out = dir.path().join(family);
        model.export(&out).unwrap();
        let reloaded = Model::load(out.to_str().unwrap()).unwrap();
        let batch = model.batch(&[vec![3, 17, 42, 99, 5, 64]]).unwrap();
        let a = model
            .forward(&batch, &LogitsAt::All, &Hooks::new())
            .unwrap()
            .logits
            .unwrap();
        let b = reloaded
            .forward(&batch, &LogitsAt::All, &Hooks::new())
            .unwrap()
            .logits
            .unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{family}");
        assert_eq!(reloaded.fingerprint(), model.fingerprint(), "{family}");
    }
    let mut ed = editor("llama", 0, dir.path());
    ed.apply(&request()).unwrap();
    let out = dir.path().join("edited");
    ed.model().export(&out).unwrap();
    let reloaded = Model::load(out.to_str().unwrap()).unwrap();
    assert_eq!(w_out(&reloaded, 0), w_out(ed.model(), 0));
    assert_ne!(w_out(&reloaded, 0), w_out(&tiny("llama"), 0));
}

/// Bad requests and settings fail before any weight changes.
#[test]
fn bad_requests_leave_weights_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor("llama", 1, dir.path());
    let before = w_out(ed.model(), 1);
    let cases = [
        EditRequest::modify("no placeholder", "the tower", "paris", "rome"),
        EditRequest::modify("{} is in", "the tower", "paris", "   "),
        EditRequest::modify("{} is in", "the tower", "rome", "rome"),
        EditRequest::modify("{} is in", "", "paris", "rome"),
        EditRequest::modify("{} is near {}", "the tower", "paris", "rome"),
    ];
    for req in &cases {
        let err = ed.apply(req).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{req:?}: {err}");
    }
    ed.hparams_mut().layer = 7;
    let err = ed.apply(&request()).unwrap_err();
    assert!(
        err.to_string().contains("layer 7") || err.to_string().contains("7 is out of range"),
        "{err}"
    );
    assert_eq!(w_out(ed.model(), 1), before);
    assert_eq!(ed.edits().count(), 0);
}

/// Settings that cannot give an edit are refused by name before any work.
#[test]
fn bad_hyper_parameters_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor("llama", 1, dir.path());
    let before = w_out(ed.model(), 1);
    let good = ed.hparams().clone();
    type Spoil = fn(&mut RomeHParams);
    let cases: [(&str, Spoil); 6] = [
        ("v_steps", |h| h.v_steps = 0),
        ("v_lr", |h| h.v_lr = f64::NAN),
        ("clamp_norm_factor", |h| h.clamp_norm_factor = -1.0),
        ("kl_factor", |h| h.kl_factor = f64::INFINITY),
        ("early_stop_loss", |h| h.early_stop_loss = -0.5),
        ("context_templates", |h| h.context_templates = vec![(0, 3)]),
    ];
    for (name, spoil) in cases {
        *ed.hparams_mut() = good.clone();
        spoil(ed.hparams_mut());
        let err = ed.apply(&request()).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput { what, .. } if what == name),
            "{name}: {err}"
        );
        let err = ed
            .apply_batch(kedit::edit::BatchMethod::Memit, &[request()])
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput { what, .. } if what == name),
            "{name} (MEMIT): {err}"
        );
    }
    assert_eq!(w_out(ed.model(), 1), before);
    assert_eq!(ed.edits().count(), 0);
}

/// A diverging optimisation is a typed error, not a corrupted model.
#[test]
fn non_finite_loss_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor("llama", 0, dir.path());
    let before = w_out(ed.model(), 0);
    ed.hparams_mut().v_lr = 1e38;
    ed.hparams_mut().clamp_norm_factor = 1e30;
    let err = ed.apply(&request()).unwrap_err();
    assert!(matches!(err, Error::NonFinite(_)), "{err}");
    assert_eq!(w_out(ed.model(), 0), before);
}

/// A statistics cache of the wrong shape is detected: read as an error,
/// recomputed (and rewritten) when used.
#[test]
fn bad_statistics_cache_is_detected_and_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny("llama");
    let opts = StatsOptions {
        samples: 40,
        max_len: 24,
        cache_dir: Some(dir.path().to_path_buf()),
        ..StatsOptions::default()
    };
    let good = kedit::stats::second_moment(&model, 1, &corpus(), &opts).unwrap();
    let path = dir.path().join(format!("{}.safetensors", good.key));
    assert!(path.exists());
    // E[k kᵀ] is symmetric with a positive diagonal.
    let m: Vec<Vec<f32>> = good.matrix.to_vec2().unwrap();
    assert!((0..m.len()).all(|i| m[i][i] > 0.0 && (m[i][3] - m[3][i]).abs() < 1e-6));
    // Overwrite with a matrix of the wrong shape under the same key.
    let wrong = Tensor::zeros((3, 3), kedit::DType::F32, &kedit::Device::Cpu).unwrap();
    let meta = std::collections::HashMap::from([
        ("key".to_string(), good.key.clone()),
        ("layer".to_string(), "1".to_string()),
        ("count".to_string(), "1".to_string()),
        ("samples".to_string(), "1".to_string()),
    ]);
    kedit::io::write_safetensors(&path, &[("mom2", &wrong)], meta).unwrap();
    let err = kedit::stats::read_cached(&path, &good.key, model.config().d_ff).unwrap_err();
    assert!(err.to_string().contains("shape"), "{err}");
    let again = kedit::stats::second_moment(&model, 1, &corpus(), &opts).unwrap();
    assert_eq!(max_abs_diff(&again.matrix, &good.matrix), 0.0);
    assert!(kedit::stats::read_cached(&path, &good.key, model.config().d_ff).is_ok());
}

/// Statistics first needed after an edit of a lower layer are those of the
/// base model (the disk cache is keyed by the base model's fingerprint),
/// and the edit stays applied.
#[test]
fn statistics_needed_after_an_edit_come_from_the_base_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut ed = editor("llama", 0, dir.path());
    let edit = ed.apply(&request()).unwrap();
    let edited = w_out(ed.model(), 0);
    ed.hparams_mut().layer = 1;
    ed.solver(1).unwrap();
    assert_eq!(w_out(ed.model(), 0), edited, "the edit is still applied");

    let opts = ed.hparams().stats.clone();
    let cached = kedit::stats::second_moment(&tiny("llama"), 1, &corpus(), &opts).unwrap();
    let fresh = kedit::stats::second_moment(
        &tiny("llama"),
        1,
        &corpus(),
        &StatsOptions {
            use_cache: false,
            ..opts.clone()
        },
    )
    .unwrap();
    let on_edited = kedit::stats::second_moment(
        ed.model(),
        1,
        &corpus(),
        &StatsOptions {
            use_cache: false,
            ..opts
        },
    )
    .unwrap();
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(kedit::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(flat(&cached.matrix), flat(&fresh.matrix));
    assert_ne!(
        flat(&on_edited.matrix),
        flat(&fresh.matrix),
        "the edit at layer 0 changes the keys of layer 1"
    );
    ed.undo(edit.id).unwrap();
}

/// The early stop compares the loss the hyper-parameters name with the
/// threshold: the target part alone (the default) or the total with the KL
/// and decay terms (the reference's rule).
#[test]
fn early_stop_follows_the_named_loss() {
    let dir = tempfile::tempdir().unwrap();
    let run = |stop_on: StopOn, threshold: f64| {
        let mut ed = editor("llama", 0, dir.path());
        let hp = ed.hparams_mut();
        hp.early_stop_on = stop_on;
        hp.early_stop_loss = threshold;
        hp.kl_factor = 1.0; // a KL term large enough for the rules to differ
        ed.apply(&request()).unwrap().report
    };
    // The whole trajectory first (a threshold of 0 never stops).
    let full = run(StopOn::TargetLoss, 0.0);
    let steps = full.losses.len();
    assert_eq!(steps, 12);
    assert_eq!(full.target_losses.len(), steps);
    for (total, target) in full.losses.iter().zip(&full.target_losses) {
        assert!(total + 1e-6 >= *target, "KL and decay are not negative");
    }
    // A threshold just above the target loss half way: each rule stops
    // after the first step whose loss is below it (or runs all steps), and
    // the target rule stops first, the KL term being positive after step 0.
    let threshold = f64::from(full.target_losses[steps / 2]) * 1.000_01;
    let stop_after = |losses: &[f32]| {
        losses
            .iter()
            .position(|&l| f64::from(l) < threshold)
            .map_or(steps, |s| s + 1)
    };
    let target_rule = run(StopOn::TargetLoss, threshold);
    assert_eq!(target_rule.losses.len(), stop_after(&full.target_losses));
    assert_eq!(
        target_rule.losses[..],
        full.losses[..target_rule.losses.len()]
    );
    let total_rule = run(StopOn::TotalLoss, threshold);
    assert_eq!(total_rule.losses.len(), stop_after(&full.losses));
    assert!(total_rule.losses.len() > target_rule.losses.len());
}

/// Hyper-parameters saved before the stop rule was a setting read back
/// with the rule they were made with (the total loss); new defaults stop
/// on the target loss.
#[test]
fn hyper_parameters_without_a_stop_rule_read_as_the_total_loss() {
    let hp = RomeHParams::for_model(tiny("llama").config());
    assert_eq!(hp.early_stop_on, StopOn::TargetLoss);
    let mut json = serde_json::to_value(&hp).unwrap();
    json.as_object_mut().unwrap().remove("early_stop_on");
    let old: RomeHParams = serde_json::from_value(json).unwrap();
    assert_eq!(old.early_stop_on, StopOn::TotalLoss);
    assert_eq!(
        RomeHParams {
            early_stop_on: StopOn::TargetLoss,
            ..old
        },
        hp
    );
}

/// `target_losses` is the target part of `losses`: with no KL and no decay
/// the two are equal; with a KL term the total exceeds it after the first
/// step (δ = 0 at step 0, where the KL is zero).
#[test]
fn target_losses_are_the_target_part_of_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let run = |kl: f64, decay: f64| {
        let mut ed = editor("llama", 0, dir.path());
        let hp = ed.hparams_mut();
        hp.kl_factor = kl;
        hp.v_weight_decay = decay;
        hp.early_stop_loss = 0.0;
        ed.apply(&request()).unwrap().report
    };
    let plain = run(0.0, 0.0);
    assert_eq!(plain.losses, plain.target_losses);
    let with_kl = run(1.0, 0.0);
    // At δ = 0 the KL is zero up to the rounding of two equal softmaxes.
    let (total, target) = (with_kl.losses[0], with_kl.target_losses[0]);
    assert!(
        (total - target).abs() <= 1e-5 * target,
        "{total} vs {target}"
    );
    for (total, target) in with_kl.losses.iter().zip(&with_kl.target_losses).skip(1) {
        assert!(total > target, "{total} ≤ {target}");
    }
}
