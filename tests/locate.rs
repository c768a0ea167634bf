//! Causal tracing: restoration identities, determinism, shapes, strategies,
//! bad input, pictures, aggregation; and the Eiffel Tower on SmolLM2.

mod common;

use common::*;
use kedit::locate::{
    trace, Aggregate, Kind, LayerScope, NoiseScale, Position, Strategy, TraceOptions, TraceResult,
    Tracer,
};
use kedit::{Error, Site};

const PROMPT: &str = "The tower in paris is located in the city of";
const SUBJECT: &str = "tower in paris";

fn opts(samples: usize) -> TraceOptions {
    TraceOptions {
        samples,
        window: 3,
        seed: 11,
        ..Default::default()
    }
}

fn is_invalid(e: &Error) -> bool {
    matches!(e, Error::InvalidInput { .. })
}

/// Restoring the residual stream of one layer at every token undoes the
/// corruption completely: P(answer) is the clean probability again.
#[test]
fn restoring_a_whole_residual_layer_gives_the_clean_probability() {
    for family in ["llama", "gpt2", "gpt_neox", "qwen2"] {
        let model = tiny(family);
        let tracer = Tracer::new(&model, PROMPT, SUBJECT, None, &opts(4)).unwrap();
        let n_tokens = tracer.tokens().len();
        assert!(
            (tracer.corrupted_prob() - tracer.clean_prob()).abs() > 1e-4,
            "{family}: the noise changed nothing"
        );
        let mut sets = Vec::new();
        for l in 0..tracer.n_layers() {
            sets.push((0..n_tokens).map(|t| (Site::ResidPost(l), t)).collect());
            sets.push((0..n_tokens).map(|t| (Site::ResidPre(l), t)).collect());
        }
        for (i, p) in tracer
            .restored_probs(&sets)
            .unwrap()
            .into_iter()
            .enumerate()
        {
            let diff = (p - tracer.clean_prob()).abs();
            assert!(
                diff < 1e-5,
                "{family} set {i}: {p} vs clean {}",
                tracer.clean_prob()
            );
        }
        // Nothing restored: the corrupted probability.
        let none = tracer.restored_probs(&[Vec::new()]).unwrap()[0];
        assert!((none - tracer.corrupted_prob()).abs() < 1e-6);
    }
}

/// Restoring every MLP and attention output of every layer at every token
/// (through hooks inside the blocks) also gives the clean probability.
#[test]
fn restoring_all_mlp_and_attention_outputs_gives_the_clean_probability() {
    let model = tiny("llama");
    let tracer = Tracer::new(&model, PROMPT, SUBJECT, Some("paris"), &opts(2)).unwrap();
    let n_tokens = tracer.tokens().len();
    let mut set = Vec::new();
    for l in 0..tracer.n_layers() {
        for t in 0..n_tokens {
            set.push((Site::MlpOut(l), t));
            set.push((Site::AttnOut(l), t));
        }
    }
    let p = tracer.restored_probs(&[set]).unwrap()[0];
    assert!(
        (p - tracer.clean_prob()).abs() < 1e-5,
        "{p} vs {}",
        tracer.clean_prob()
    );
}

#[test]
fn grids_are_tokens_by_layers_and_same_seed_gives_same_grid() {
    let model = tiny("gpt2");
    let a = trace(&model, PROMPT, SUBJECT, None, &opts(3)).unwrap();
    let n_tokens = model.tokenize(PROMPT).unwrap().len();
    assert_eq!(a.tokens.len(), n_tokens);
    assert_eq!(a.subject_span, 1..4);
    assert_eq!(a.grids.len(), 3);
    for kind in Kind::ALL {
        let g = a.grid(kind).unwrap();
        assert_eq!(g.n_tokens(), n_tokens, "{kind}");
        assert_eq!(g.n_layers(), model.config().n_layers, "{kind}");
        assert!(g.probs.iter().all(|r| r.len() == model.config().n_layers));
        assert!(g
            .probs
            .iter()
            .flatten()
            .all(|p| p.is_finite() && (0.0..=1.0).contains(p)));
    }
    assert_eq!(a.grid(Kind::Mlp).unwrap().window, 3);
    assert_eq!(a.grid(Kind::Residual).unwrap().window, 1);

    let b = trace(&model, PROMPT, SUBJECT, None, &opts(3)).unwrap();
    assert_eq!(a, b, "same seed, different result");
    let mut other = opts(3);
    other.seed = 12;
    let c = trace(&model, PROMPT, SUBJECT, None, &other).unwrap();
    assert_ne!(a.grids, c.grids, "another seed gave the same grids");
}

/// Batched restorations from the corrupted residual equal one whole
/// forward pass per restored site and sample.
#[test]
fn batched_reuse_equals_one_full_forward_per_site() {
    for family in ["llama", "gpt2"] {
        let model = tiny(family);
        let fast = trace(&model, PROMPT, SUBJECT, None, &opts(2)).unwrap();
        let slow_opts = TraceOptions {
            strategy: Strategy::FullForward,
            batch_rows: 1,
            ..opts(2)
        };
        let slow = trace(&model, PROMPT, SUBJECT, None, &slow_opts).unwrap();
        assert!((fast.corrupted_prob - slow.corrupted_prob).abs() < 1e-6);
        for kind in Kind::ALL {
            let (f, s) = (fast.grid(kind).unwrap(), slow.grid(kind).unwrap());
            for (t, (rf, rs)) in f.probs.iter().zip(&s.probs).enumerate() {
                for (l, (a, b)) in rf.iter().zip(rs).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{family} {kind} token {t} layer {l}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// Tokens before the subject see no noise, so restoring them changes nothing.
#[test]
fn tokens_before_the_subject_have_no_effect() {
    let model = tiny("qwen2");
    let r = trace(&model, PROMPT, SUBJECT, None, &opts(2)).unwrap();
    for kind in Kind::ALL {
        for l in 0..r.n_layers {
            assert_eq!(r.effect(kind, 0, l), Some(0.0), "{kind} layer {l}");
        }
    }
}

#[test]
fn json_and_csv_round_trip() {
    let model = tiny("llama");
    let r = trace(&model, PROMPT, SUBJECT, Some("paris"), &opts(2)).unwrap();
    assert_eq!(r.answer, "paris");
    let mut back = TraceResult::from_json(&r.to_json().unwrap()).unwrap();
    // JSON may round the last bit of an f64.
    assert!((back.noise_std - r.noise_std).abs() < 1e-12);
    back.noise_std = r.noise_std;
    assert_eq!(back, r);
    let csv = r.to_csv();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "kind,token_index,token,is_subject,layer,prob,effect"
    );
    assert_eq!(lines.len(), 1 + 3 * r.tokens.len() * r.n_layers);
    assert!(lines[1].starts_with("residual,0,\"The\",false,0,"));
    let dir = tempfile::tempdir().unwrap();
    r.save_json(&dir.path().join("t.json")).unwrap();
    let loaded = TraceResult::load_json(&dir.path().join("t.json")).unwrap();
    assert_eq!(loaded.grids, r.grids);
}

#[test]
fn heatmaps_are_written_as_svg_and_png() {
    let model = tiny("llama");
    let r = trace(&model, PROMPT, SUBJECT, Some("paris"), &opts(2)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = r.save_heatmaps(dir.path(), "eiffel").unwrap();
    assert_eq!(files.len(), 6);
    let svg = std::fs::read_to_string(dir.path().join("eiffel_mlp.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    assert!(svg.contains("&quot;paris&quot;"), "title names the answer");
    assert!(
        svg.contains("&quot;tower&quot;*"),
        "subject tokens are marked"
    );
    let png = std::fs::read(dir.path().join("eiffel_mlp.png")).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    let fig = r.heatmap(Kind::Mlp).unwrap();
    assert_eq!(info.width as f64, (fig.width * 2.0).ceil());
    assert_eq!(info.height as f64, (fig.height * 2.0).ceil());
}

#[test]
fn bad_input_gives_typed_errors() {
    let model = tiny("llama");
    let ok = opts(2);
    let err = |r: kedit::Result<TraceResult>| r.expect_err("bad input was accepted");

    let e = err(trace(&model, PROMPT, "eiffel", None, &ok));
    assert!(is_invalid(&e) && e.to_string().contains("subject"), "{e}");
    let e = err(trace(&model, PROMPT, SUBJECT, Some(""), &ok));
    assert!(is_invalid(&e) && e.to_string().contains("answer"), "{e}");
    let e = err(trace(&model, PROMPT, SUBJECT, Some("   "), &ok));
    assert!(is_invalid(&e) && e.to_string().contains("answer"), "{e}");
    for nu in [0.0, -1.0, f64::NAN] {
        let o = TraceOptions {
            noise: NoiseScale::Fixed(nu),
            ..ok.clone()
        };
        let e = err(trace(&model, PROMPT, SUBJECT, None, &o));
        assert!(is_invalid(&e) && e.to_string().contains("noise"), "{e}");
    }
    let o = TraceOptions {
        noise: NoiseScale::EmbeddingStd { multiplier: 0.0 },
        ..ok.clone()
    };
    assert!(is_invalid(&err(trace(&model, PROMPT, SUBJECT, None, &o))));
    let o = TraceOptions {
        samples: 0,
        ..ok.clone()
    };
    let e = err(trace(&model, PROMPT, SUBJECT, None, &o));
    assert!(is_invalid(&e) && e.to_string().contains("samples"), "{e}");
    let o = TraceOptions {
        window: 0,
        ..ok.clone()
    };
    let e = err(trace(&model, PROMPT, SUBJECT, None, &o));
    assert!(is_invalid(&e) && e.to_string().contains("window"), "{e}");
    // Restoring a site of a layer the model does not have.
    let tracer = Tracer::new(&model, PROMPT, SUBJECT, None, &ok).unwrap();
    let e = tracer
        .restored_probs(&[vec![(Site::MlpOut(99), 0)]])
        .expect_err("layer 99 accepted");
    assert!(is_invalid(&e), "{e}");
    let e = tracer
        .restored_probs(&[vec![(Site::MlpOut(0), 99)]])
        .expect_err("token 99 accepted");
    assert!(is_invalid(&e), "{e}");
}

#[test]
fn aggregate_averages_positions_and_recommends_layers() {
    let model = tiny("llama");
    let o = TraceOptions {
        noise: NoiseScale::Fixed(1.0),
        ..opts(2)
    };
    let prompts = [
        (PROMPT, SUBJECT),
        ("the capital of france is", "france"),
        ("paris is the capital of", "paris"),
    ];
    let n_layers = model.config().n_layers;
    let mut agg = Aggregate::new(n_layers, 3, &Kind::ALL);
    let mut results = Vec::new();
    for (p, s) in prompts {
        let r = trace(&model, p, s, None, &o).unwrap();
        agg.add(&r).unwrap();
        results.push(r);
    }
    assert_eq!(agg.n_facts, 3);
    assert_eq!(agg.count(Position::FirstSubject), 3);
    assert_eq!(agg.count(Position::MiddleSubject), 1);
    assert_eq!(agg.count(Position::Last), 3);
    // The last-subject MLP curve is the mean of the three facts' cells.
    let curve = agg.mean_effect(Kind::Mlp, Position::LastSubject).unwrap();
    for (l, &v) in curve.iter().enumerate() {
        let want: f32 = results
            .iter()
            .map(|r| r.effect(Kind::Mlp, r.subject_span.end - 1, l).unwrap())
            .sum::<f32>()
            / 3.0;
        assert!((v - want).abs() < 1e-6);
    }
    // The first layer of the highest effect.
    let best = curve.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let peak = curve.iter().position(|&v| v == best).unwrap();
    assert_eq!(
        agg.recommend_layers(LayerScope::Single).unwrap(),
        vec![peak]
    );
    assert_eq!(
        agg.recommend_layers(LayerScope::Window(5)).unwrap(),
        (0..n_layers).collect::<Vec<_>>(),
        "a window wider than the model is clipped"
    );
    assert!(agg.recommend_layers(LayerScope::Window(0)).is_err());
    let table = agg.table_markdown(Kind::Mlp).unwrap();
    assert_eq!(table.lines().count(), 2 + n_layers + 1);
    let dir = tempfile::tempdir().unwrap();
    let files = agg.save(dir.path(), "agg").unwrap();
    assert_eq!(files.len(), 8);
    // The convenience function traces only the MLP kind and agrees.
    let facts: Vec<kedit::locate::Fact> = prompts
        .iter()
        .map(|(p, s)| kedit::locate::Fact {
            prompt: p.to_string(),
            subject: s.to_string(),
            answer: None,
        })
        .collect();
    let layers = kedit::locate::recommend_layers(&model, &facts, &o, LayerScope::Single).unwrap();
    assert_eq!(layers, vec![peak]);
}

/// The facts file parses (tests read shared data relative to the crate root).
#[test]
fn known_facts_file_parses() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/known_1000.json");
    let facts = kedit::locate::load_known_facts(&path).unwrap();
    assert_eq!(facts.len(), 1209);
    assert_eq!(facts[0].subject, "Vinson Massif");
    assert_eq!(facts[0].attribute, "Antarctica");
    assert!(facts.iter().all(|f| f.prompt.contains(&f.subject)));
    let missing = kedit::locate::load_known_facts(std::path::Path::new("no/such/file.json"));
    assert!(matches!(missing, Err(Error::Io { .. })));
}

/// The real model: corrupting "The Eiffel Tower" makes " Paris" much less
/// likely, and the MLP effect is strongest at a subject token. To stay fast,
/// 3 noise samples and MLP windows centred on every fifth layer.
#[test]
fn smollm2_eiffel_tower_is_traced_to_the_subject() {
    let Some(model) = smollm2() else { return };
    let o = TraceOptions {
        samples: 3,
        ..Default::default()
    };
    let tracer = Tracer::new(
        model,
        "The Eiffel Tower is located in the city of",
        "The Eiffel Tower",
        Some(" Paris"),
        &o,
    )
    .unwrap();
    assert_eq!(tracer.answer(), " Paris");
    let (clean, corrupted) = (tracer.clean_prob(), tracer.corrupted_prob());
    assert!(clean > 0.2, "clean {clean}");
    assert!(
        corrupted < 0.5 * clean,
        "corrupted {corrupted} vs clean {clean}"
    );
    let n_layers = tracer.n_layers();
    let n_tokens = tracer.tokens().len();
    let mut cells = Vec::new();
    let mut sets = Vec::new();
    for t in 0..n_tokens {
        for l in (0..n_layers).step_by(5) {
            cells.push((t, l));
            sets.push(Kind::Mlp.sites(l, t, o.window, n_layers));
        }
    }
    let p = tracer.restored_probs(&sets).unwrap();
    let best = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
    let (t, l) = cells[best];
    assert!(
        tracer.subject_span().contains(&t),
        "strongest MLP effect {} at token {t} {:?} (layer {l}), subject {:?}",
        p[best] - corrupted,
        tracer.tokens()[t],
        tracer.subject_span()
    );
    assert!(p[best] - corrupted > 0.1, "effect {}", p[best] - corrupted);
}
