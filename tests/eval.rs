//! Evaluation: dataset readers on the real files and on malformed input,
//! the aggregation of metrics, batched scoring and generation against the
//! model's own one-at-a-time functions, and the runner's modes and resume
//! on a tiny fixture; values on SmolLM2 where it is present.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kedit::edit::{Editor, RomeHParams};
use kedit::eval::{
    greedy_batch, measure, parse_cases, read_cases, read_cases_lenient, score, summarize, Case,
    CaseLine, CaseMetrics, MeasureOptions, Method, Mode, RunOptions, Schema, Summary,
};
use kedit::stats::{Corpus, StatsOptions};
use kedit::{Error, Sampling};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel)
}

#[test]
fn reads_counterfact() {
    let cases = read_cases(&data("counterfact/counterfact_preknown.json")).unwrap();
    assert_eq!(cases.len(), 1093);
    let c = &cases[0];
    assert_eq!(c.schema, Schema::CounterFact);
    assert_eq!(c.id, 0);
    assert_eq!(c.request.prompt, "The mother tongue of {} is");
    assert_eq!(c.request.subject, "Danielle Darrieux");
    assert_eq!(c.request.target_true.as_deref(), Some(" French"));
    assert_eq!(c.request.target_new.as_deref(), Some(" English"));
    assert_eq!(c.paraphrases.len(), 2);
    assert_eq!(c.neighbourhood.len(), 10);
    assert_eq!(c.neighbourhood[0], "The mother tongue of L\u{e9}on Blum is");
    assert_eq!(c.attribute.len(), 10);
    assert_eq!(c.generation.len(), 10);
    assert!(c.locality.is_empty());
    assert_eq!(cases[1].id, 14);
}

#[test]
fn reads_easyedit_and_locates_the_subject() {
    let cases = read_cases(&data("counterfact/easyedit_val.json")).unwrap();
    assert_eq!(cases.len(), 1919);
    for c in &cases {
        assert_eq!(c.schema, Schema::EasyEdit);
        assert_eq!(c.request.prompt.matches("{}").count(), 1);
        assert_eq!(c.paraphrases.len(), 1);
    }
    let edit = read_cases(&data("counterfact/easyedit_edit.json")).unwrap();
    let c = &edit[0];
    assert_eq!(c.request.prompt, "The mother tongue of {} is");
    assert_eq!(c.request.subject, "Danielle Darrieux");
    assert_eq!(c.request.target_true.as_deref(), Some(" French"));
    assert_eq!(
        c.paraphrases,
        ["Where Danielle Darrieux is from, people speak the language of"]
    );
    // Its locality answer is the true target: a CounterFact neighbour too.
    assert_eq!(c.neighbourhood, ["Michel Rocard is a native speaker of"]);
    assert_eq!(c.locality[0].answer, " French");
}

#[test]
fn reads_zsre() {
    let cases = read_cases(&data("zsre/zsre_eval_portability.json")).unwrap();
    assert_eq!(cases.len(), 1037);
    let c = &cases[0];
    assert_eq!(c.schema, Schema::Zsre);
    assert_eq!(c.id, 0);
    assert_eq!(c.request.prompt, "When was the inception of {}?");
    assert_eq!(c.request.subject, "IAAF Combined Events Challenge");
    assert_eq!(c.request.target_new.as_deref(), Some(" 2006"));
    assert_eq!(c.request.target_true.as_deref(), Some(" 1998"));
    assert_eq!(
        c.paraphrases,
        ["When was the IAAF Combined Events Challenge launched?"]
    );
    assert_eq!(
        c.locality[0].prompt,
        "nq question: what is the name of the last episode of spongebob"
    );
    assert_eq!(c.locality[0].answer, " The String");
    assert!(c.neighbourhood.is_empty() && c.generation.is_empty());
    // The training file has two records with an empty new answer: reading
    // it strictly fails on the first, leniently sets both aside.
    let train = data("zsre/zsre_train_1k.json");
    match read_cases(&train) {
        Err(Error::Format { path, reason, .. }) => {
            assert_eq!(path, train);
            assert!(reason.starts_with("record 534:"), "{reason}");
        }
        other => panic!("expected a format error, got {other:?}"),
    }
    let (good, bad) = read_cases_lenient(&train).unwrap();
    assert_eq!((good.len(), bad.len()), (998, 2));
    assert!(bad[1].to_string().contains("record 723:"));
}

fn format_error(text: &str) -> (PathBuf, String) {
    match parse_cases(text, Path::new("bad.json"), None) {
        Err(Error::Format { path, reason, .. }) => (path, reason),
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn malformed_records_are_errors_naming_file_and_record() {
    let good = r#"{"case_id": 3, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris",
                  "target_new": {"str": "Italy"}, "target_true": {"str": "France"}}}"#;
    let missing = r#"{"case_id": 4, "requested_rewrite": {"prompt": "{} is in", "subject": "Rome",
                     "target_true": {"str": "Italy"}}}"#;
    let (path, reason) = format_error(&format!("[{good}, {missing}]"));
    assert_eq!(path, Path::new("bad.json"));
    assert!(
        reason.starts_with("record 1:") && reason.contains("target_new"),
        "{reason}"
    );

    let no_braces = good.replace("{} is in", "Paris is in");
    let (_, reason) = format_error(&format!("[{good}, {good}, {no_braces}]"));
    assert!(reason.starts_with("record 2:"), "{reason}");

    let same = good.replace("Italy", "France");
    let (_, reason) = format_error(&format!("[{same}]"));
    assert!(
        reason.starts_with("record 0:") && reason.contains("equals"),
        "{reason}"
    );

    let zsre = r#"{"subject": "Ramalinaceae", "src": "Which family does it belong to?", "alt": "Lamiinae",
                  "answers": ["Lecanorales"], "rephrase": "r", "loc": "l", "loc_ans": "a"}"#;
    let (_, reason) = format_error(&format!("[{zsre}]"));
    assert!(reason.contains("does not occur"), "{reason}");

    let (_, reason) = format_error(r#"[{"question": "?"}]"#);
    assert!(reason.contains("no known schema"), "{reason}");
    let (_, reason) = format_error(r#"{"not": "an array"}"#);
    assert!(reason.contains("not an array"), "{reason}");
    let (_, reason) = format_error("[{");
    assert!(!reason.is_empty());
    assert!(matches!(
        read_cases(Path::new("/nonexistent/data.json")),
        Err(Error::Io { .. })
    ));
    assert!(parse_cases("[]", Path::new("empty.json"), None)
        .unwrap()
        .is_empty());
}

fn metrics_with(es: f64, ps: f64, ns: f64, flu: f64) -> CaseMetrics {
    CaseMetrics {
        efficacy: Some(es),
        paraphrase: Some(ps),
        neighborhood: Some(ns),
        efficacy_magnitude: Some(es - 0.5),
        paraphrase_magnitude: Some(ps / 2.0),
        neighborhood_magnitude: Some(-ns),
        fluency: Some(flu),
        ..CaseMetrics::default()
    }
}

fn line(id: u64, pre: CaseMetrics, post: CaseMetrics) -> CaseLine {
    CaseLine {
        id,
        record: id as usize,
        edits: 1,
        subject: "s".into(),
        prompt: "p".into(),
        target_true: Some(" t".into()),
        target_new: Some(" n".into()),
        pre,
        post,
        edit: None,
        error: None,
        seconds: 1.5,
    }
}

#[test]
fn summaries_average_cases_and_take_the_harmonic_mean() {
    let lines = [
        line(
            0,
            metrics_with(0.0, 0.0, 1.0, 5.0),
            metrics_with(1.0, 0.5, 1.0, 4.0),
        ),
        line(
            1,
            metrics_with(0.0, 0.5, 0.5, 6.0),
            metrics_with(1.0, 1.0, 0.5, 5.0),
        ),
    ];
    let (s, a) = summarize(&lines);
    assert_eq!(s.n, 2);
    assert_eq!((s.efficacy.pre, s.efficacy.post), (Some(0.0), Some(1.0)));
    assert_eq!(s.paraphrase.post, Some(0.75));
    assert_eq!(s.neighborhood.pre, Some(0.75));
    assert_eq!(s.efficacy_magnitude.post, Some(0.5));
    assert_eq!(s.neighborhood_magnitude.post, Some(-0.75));
    assert_eq!(s.score.pre, Some(0.0));
    let hm = 3.0 / (1.0 / 1.0 + 1.0 / 0.75 + 1.0 / 0.75);
    assert!((s.score.post.unwrap() - hm).abs() < 1e-12);
    assert_eq!(s.fluency.pre, Some(5.5));
    assert_eq!(a.locality.post, None);
    // summary.json has exactly the keys scripts read.
    let json = serde_json::to_value(&s).unwrap();
    let mut keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "efficacy",
            "efficacy_magnitude",
            "fluency",
            "n",
            "neighborhood",
            "neighborhood_magnitude",
            "paraphrase",
            "paraphrase_magnitude",
            "score",
            "seconds"
        ]
    );
    assert_eq!(json["efficacy"]["post"], 1.0);
    let back: Summary = serde_json::from_value(json).unwrap();
    assert_eq!(back, s);
}

#[test]
fn modes_and_methods_parse() {
    assert_eq!("rome".parse::<Method>().unwrap(), Method::Rome);
    assert!("memit2".parse::<Method>().is_err());
    assert_eq!("single".parse::<Mode>().unwrap(), Mode::Single);
    assert_eq!("batch".parse::<Mode>().unwrap(), Mode::Batch);
    assert_eq!(
        "sequential".parse::<Mode>().unwrap(),
        Mode::Sequential { every: 50 }
    );
    assert_eq!(
        "sequential:7".parse::<Mode>().unwrap(),
        Mode::Sequential { every: 7 }
    );
    assert!("sequential:0".parse::<Mode>().is_err());
}

#[test]
fn batched_scoring_matches_target_probs_on_a_tiny_model() {
    let model = tiny("llama");
    let pairs = [
        ("the capital of france is", " paris"),
        ("the tower is located in the city of", " rome and paris"),
        ("she plays", " the piano"),
        ("the capital of france is", " rome"),
        // Targets that share a row: one a prefix of another's context.
        ("the tower is located in the city of", " rome and london"),
        ("the tower is located in the city of", " rome"),
        ("the tower is located in the city of", " rome and"),
        ("the tower is located in the city of", " paris"),
    ];
    for chunk in [1, 3, 64] {
        let got = score(&model, &pairs, chunk).unwrap();
        let want = model.target_probs(&pairs).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g.mean_nll - f64::from(w.mean_nll)).abs() < 1e-5);
            assert_eq!(g.hits.len(), w.token_probs.len());
            assert_eq!(g.hits[0], w.first_rank == 0, "first hit against rank");
            let mean_p: f32 =
                w.token_probs.iter().map(|p| p.ln()).sum::<f32>() / w.token_probs.len() as f32;
            assert!((g.mean_nll + f64::from(mean_p)).abs() < 1e-4);
        }
        // A hit is the argmax of the next-token distribution.
        let top = model.top_k("the capital of france is", 1).unwrap()[0].id;
        assert_eq!(got[0].top1[0], top);
        let paris = model.target_ids(" paris").unwrap()[0];
        assert_eq!(got[0].hits[0], top == paris);
    }
}

#[test]
fn batched_greedy_generation_matches_generate() {
    let model = tiny("llama");
    let prompts = ["the capital of", "she plays the piano and he", "a"];
    let got = greedy_batch(&model, &prompts, 12).unwrap();
    for (p, g) in prompts.iter().zip(&got) {
        let want = model.generate(p, 12, &Sampling::Greedy).unwrap();
        assert_eq!(g, &want.ids, "prompt {p:?}");
    }
}

fn tiny_corpus() -> Corpus {
    let text = "the capital of france is paris and the capital of italy is rome . the tower is in the city of paris";
    let words: Vec<&str> = text.split(' ').collect();
    Corpus::Texts {
        name: "eval-tiny".into(),
        texts: (0..30)
            .map(|i| {
                words
                    .iter()
                    .cycle()
                    .skip(i * 5 % words.len())
                    .take(10 + i % 7)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect(),
    }
}

fn tiny_editor(stats: &Path) -> Editor {
    let model = tiny("llama");
    let mut hp = RomeHParams::for_model(model.config());
    hp.layer = 0;
    hp.v_steps = 6;
    hp.context_templates = vec![(3, 2)];
    hp.stats = StatsOptions {
        samples: 30,
        max_len: 20,
        cache_dir: Some(stats.to_path_buf()),
        ..StatsOptions::default()
    };
    Editor::new(model)
        .with_hparams(hp)
        .with_corpus(tiny_corpus())
}

fn tiny_cases() -> Vec<Case> {
    let rec = |id: u64, subject: &str, new: &str, old: &str| {
        format!(
            r#"{{"case_id": {id}, "requested_rewrite": {{"prompt": "the capital of {{}} is", "subject": "{subject}",
                "target_new": {{"str": "{new}"}}, "target_true": {{"str": "{old}"}}}},
               "paraphrase_prompts": ["what is the capital of {subject} ?"],
               "neighborhood_prompts": ["the tower is in the city of", "the capital of italy is"],
               "generation_prompts": ["{subject} is", "{subject} is", "the capital of {subject}"]}}"#
        )
    };
    let text = format!(
        "[{}, {}, {}]",
        rec(7, "france", "rome", "paris"),
        rec(8, "italy", "paris", "rome"),
        rec(9, "the tower", "italy", "france")
    );
    parse_cases(&text, Path::new("tiny.json"), None).unwrap()
}

fn opts(dir: &Path, mode: Mode) -> RunOptions {
    RunOptions {
        mode,
        measure: MeasureOptions {
            fluency_tokens: 8,
            chunk: 5,
        },
        progress: false,
        ..RunOptions::new(dir)
    }
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn runner_single_mode_writes_files_undoes_and_resumes() {
    let stats = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut editor = tiny_editor(stats.path());
    let before = editor.model().weights().blocks[0]
        .mlp
        .w_out
        .weight
        .to_vec2::<f32>()
        .unwrap();
    let cases = tiny_cases();
    let o = opts(out.path(), Mode::Single);
    let report = kedit::eval::run(&mut editor, &cases[..2], &o).unwrap();
    assert_eq!(report.summary.n, 2);
    assert_eq!(report.failed, 0);
    // Undone after each case: the weights are the original ones.
    assert_eq!(editor.edits().count(), 0);
    let after = editor.model().weights().blocks[0]
        .mlp
        .w_out
        .weight
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(before, after);

    let lines = read_lines(&out.path().join("cases.jsonl"));
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], 7);
    assert!(lines[0]["pre"]["fluency"].as_f64().is_some());
    let pre = &lines[0]["pre"]["probs"]["prompt"];
    let es = lines[0]["pre"]["efficacy"].as_f64().unwrap();
    assert_eq!(
        es,
        f64::from(u8::from(pre["new"].as_f64() > pre["true_"].as_f64()))
    );
    // The pre metrics are the unedited model's, measured directly.
    let direct = measure(
        &tiny("llama"),
        &[&cases[0]],
        &MeasureOptions {
            fluency_tokens: 8,
            chunk: 64,
        },
    )
    .unwrap();
    let pre_line: CaseMetrics = serde_json::from_value(lines[0]["pre"].clone()).unwrap();
    assert_eq!(pre_line.efficacy, direct[0].efficacy);
    assert_eq!(pre_line.generations, direct[0].generations);
    assert!(
        (pre_line.neighborhood_magnitude.unwrap() - direct[0].neighborhood_magnitude.unwrap())
            .abs()
            < 1e-6
    );

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["n"], 2);
    assert!(summary["efficacy"]["pre"].is_number());
    let md = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    assert!(md.contains("| efficacy success (ES) |"));

    // A rerun over a longer slice edits only the new case; a cut last line is dropped.
    let path = out.path().join("cases.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"id\": 9, \"rec");
    std::fs::write(&path, text).unwrap();
    let report = kedit::eval::run(&mut editor, &cases, &o).unwrap();
    assert_eq!(report.summary.n, 3);
    let lines = read_lines(&path);
    assert_eq!(
        lines
            .iter()
            .map(|l| l["id"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [7, 8, 9]
    );
    // The edits did something: the new targets gained.
    let s = &report.summary;
    assert!(s.efficacy_magnitude.post.unwrap() > s.efficacy_magnitude.pre.unwrap());
    assert!(lines
        .iter()
        .all(|l| l["edit"]["delta_norm"].as_f64().unwrap() > 0.0));

    // Re-measuring with the saved deltas reproduces the post-edit numbers
    // without editing again.
    let out2 = tempfile::tempdir().unwrap();
    let o2 = RunOptions {
        reuse_deltas: Some(out.path().join("deltas")),
        ..opts(out2.path(), Mode::Single)
    };
    let again = kedit::eval::run(&mut editor, &cases, &o2).unwrap();
    assert_eq!(again.summary.efficacy, report.summary.efficacy);
    assert_eq!(again.summary.paraphrase, report.summary.paraphrase);
    assert_eq!(again.summary.fluency, report.summary.fluency);
    let lines2 = read_lines(&out2.path().join("cases.jsonl"));
    assert!(lines2.iter().all(|l| l["edit"]["reused"] == true));
    assert_eq!(editor.edits().count(), 0);

    // Other settings in the same directory are refused.
    let other = RunOptions {
        measure: MeasureOptions {
            fluency_tokens: 3,
            chunk: 5,
        },
        ..o.clone()
    };
    assert!(matches!(
        kedit::eval::run(&mut editor, &cases, &other),
        Err(Error::InvalidInput { .. })
    ));
}

#[test]
fn runner_sequential_and_batch_modes() {
    let stats = tempfile::tempdir().unwrap();
    let cases = tiny_cases();

    let out = tempfile::tempdir().unwrap();
    let mut editor = tiny_editor(stats.path());
    let o = opts(out.path(), Mode::Sequential { every: 2 });
    let report = kedit::eval::run(&mut editor, &cases, &o).unwrap();
    eprintln!(
        "{}",
        std::fs::read_to_string(out.path().join("deltas.jsonl")).unwrap()
    );
    eprintln!(
        "{}",
        std::fs::read_to_string(out.path().join("cases.jsonl")).unwrap()
    );
    // Checkpoints after 2 and 3 edits; all edits stay applied.
    assert_eq!(
        report
            .checkpoints
            .iter()
            .map(|c| c.edits)
            .collect::<Vec<_>>(),
        [2, 3]
    );
    assert_eq!(report.checkpoints[0].summary.n, 2);
    assert_eq!(report.summary.n, 3);
    assert_eq!(editor.edits().count(), 3);
    let lines = read_lines(&out.path().join("cases.jsonl"));
    assert_eq!(lines.len(), 5);
    assert_eq!(
        lines
            .iter()
            .map(|l| l["edits"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [2, 2, 3, 3, 3]
    );
    let w_seq = editor.model().weights().blocks[0]
        .mlp
        .w_out
        .weight
        .to_vec2::<f32>()
        .unwrap();

    // A rerun replays the saved deltas: same weights, nothing recomputed.
    let mut fresh = tiny_editor(stats.path());
    let again = kedit::eval::run(&mut fresh, &cases, &o).unwrap();
    assert_eq!(again.summary, report.summary);
    let w_replayed = fresh.model().weights().blocks[0]
        .mlp
        .w_out
        .weight
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(w_seq, w_replayed);
    assert_eq!(read_lines(&out.path().join("cases.jsonl")).len(), 5);

    // Batch mode: one checkpoint after all edits; same edits as sequential
    // for ROME (applied one after another).
    let out_b = tempfile::tempdir().unwrap();
    let mut editor = tiny_editor(stats.path());
    let report = kedit::eval::run(&mut editor, &cases, &opts(out_b.path(), Mode::Batch)).unwrap();
    assert_eq!(report.checkpoints.len(), 1);
    assert_eq!(report.summary.efficacy.post, again.summary.efficacy.post);
    let w_batch = editor.model().weights().blocks[0]
        .mlp
        .w_out
        .weight
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(w_seq, w_batch);

    // An editor that already holds edits is refused.
    let out_c = tempfile::tempdir().unwrap();
    assert!(kedit::eval::run(&mut editor, &cases, &opts(out_c.path(), Mode::Batch)).is_err());
}

#[test]
fn smollm2_counterfact_case_before_editing() {
    let Some(model) = smollm2() else { return };
    let cases = read_cases(&data("counterfact/counterfact_preknown.json")).unwrap();
    let m = measure(
        model,
        &[&cases[0]],
        &MeasureOptions {
            fluency_tokens: 20,
            chunk: 64,
        },
    )
    .unwrap()
    .remove(0);
    // The unedited model prefers " French" for Danielle Darrieux.
    assert_eq!(m.efficacy, Some(0.0));
    let p = m.probs.prompt.unwrap();
    let want = model
        .target_probs(&[
            ("The mother tongue of Danielle Darrieux is", " English"),
            ("The mother tongue of Danielle Darrieux is", " French"),
        ])
        .unwrap();
    assert!((p.new - f64::from(want[0].prob())).abs() < 1e-5);
    assert!((p.true_ - f64::from(want[1].prob())).abs() < 1e-5);
    assert_eq!(m.probs.neighbourhood.len(), 10);
    // Three distinct generation prompts, each generated once.
    assert_eq!(m.generations.len(), 3);
    let f = m.fluency.unwrap();
    assert!(f > 1.0 && f < 10.0, "fluency {f}");

    let z = read_cases(&data("zsre/zsre_eval_portability.json")).unwrap();
    let m = measure(model, &[&z[0]], &MeasureOptions::default())
        .unwrap()
        .remove(0);
    assert!(m.edit_accuracy.is_some() && m.locality_accuracy.is_some());
    assert_eq!(m.locality_top1.len(), 1);
    assert_eq!(m.fluency, None);
}
