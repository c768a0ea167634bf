//! Bad input gets a typed `kedit::Error` that names the input; nothing panics.

mod common;

use std::path::Path;

use common::*;
use kedit::{At, Error, Hooks, LogitsAt, Model, Site};

/// A copy of a tiny fixture directory that a test may damage.
fn scratch_copy(family: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_dir(family)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load(dir: &Path) -> Result<Model, Error> {
    Model::load(dir.to_str().unwrap())
}

#[test]
fn missing_directory_or_file() {
    let err = Model::load("/nonexistent/kedit-model").unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/kedit-model"),
        "{err}"
    );

    let dir = scratch_copy("llama");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("tokenizer.json"),
        "{err}"
    );

    let dir = scratch_copy("llama");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let dir = scratch_copy("llama");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Format {
                format: "safetensors",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::write(&path, b"not a safetensors file").unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
}

#[test]
fn corrupt_or_truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let err = Model::load(path.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, Error::Format { format: "GGUF", .. }), "{err}");

    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let err = Model::load(path.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, Error::Format { format: "GGUF", .. }), "{err}");

    // The real file cut short: the header reads, the tensor data is missing.
    if let Some(real) = smollm2_path() {
        let bytes = std::fs::read(real).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = Model::load(path.to_str().unwrap()).unwrap_err();
        assert!(
            matches!(err, Error::Format { format: "GGUF", .. })
                && err.to_string().contains("truncated"),
            "{err}"
        );
    }
}

#[test]
fn unsupported_architecture_lists_supported_ones() {
    let dir = scratch_copy("llama");
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"llama\"", "\"bert\"");
    std::fs::write(&cfg, text).unwrap();
    let err = load(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::UnsupportedArchitecture { .. }),
        "{msg}"
    );
    for name in [
        "bert", "gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2",
    ] {
        assert!(msg.contains(name), "{msg} should mention {name}");
    }
}

/// Rewrites the fixture's weights through `edit` and returns the load error.
fn load_with_edited_weights(
    edit: impl Fn(&mut std::collections::HashMap<String, kedit::Tensor>),
) -> Error {
    let dir = scratch_copy("llama");
    let path = dir.path().join("model.safetensors");
    let mut tensors = load_tensors(&path);
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    load(dir.path()).unwrap_err()
}

#[test]
fn missing_tensor_is_named() {
    let name = "model.layers.1.mlp.down_proj.weight";
    let err = load_with_edited_weights(|t| {
        t.remove(name);
    });
    assert!(
        matches!(&err, Error::MissingTensor { name: n, .. } if n == name),
        "{err}"
    );
    assert!(err.to_string().contains(name));
}

#[test]
fn wrong_shape_is_named() {
    let name = "model.layers.0.self_attn.k_proj.weight";
    let err = load_with_edited_weights(|t| {
        let w = t[name].clone();
        let (a, b) = w.dims2().unwrap();
        t.insert(name.to_string(), w.reshape((b, a)).unwrap());
    });
    assert!(
        matches!(&err, Error::TensorShape { name: n, .. } if n == name),
        "{err}"
    );
}

#[test]
fn empty_prompt_and_target() {
    let model = tiny("llama");
    for bad in ["", "   "] {
        let err = model.top_k(bad, 3).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput { what, .. } if what == "prompt"),
            "{err}"
        );
    }
    let err = model.target_prob("hello", " ").unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { what, .. } if what == "target"),
        "{err}"
    );
    let err = model.batch(&[vec![1, 2], vec![]]).unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    let err = model.batch(&[vec![1, 100_000]]).unwrap_err();
    assert!(err.to_string().contains("100000"), "{err}");
}

#[test]
fn site_layer_out_of_range() {
    let model = tiny("llama");
    let batch = model.batch(&[vec![1, 2, 3]]).unwrap();
    let mut hooks = Hooks::new();
    hooks.capture(Site::MlpOut(2), At::All);
    let err = model.forward(&batch, &LogitsAt::Last, &hooks).unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    assert!(
        err.to_string().contains("layer 2") && err.to_string().contains("2 layers"),
        "{err}"
    );
}

#[test]
fn positions_out_of_range() {
    let model = tiny("llama");
    let batch = model.batch(&[vec![1, 2, 3], vec![4]]).unwrap();
    let mut hooks = Hooks::new();
    hooks.capture(Site::ResidPre(0), At::point(1, 1));
    let err = model.forward(&batch, &LogitsAt::Last, &hooks).unwrap_err();
    assert!(
        err.to_string().contains("position 1") && err.to_string().contains("row 1"),
        "{err}"
    );

    let mut hooks = Hooks::new();
    hooks.capture(Site::ResidPre(0), At::point(2, 0));
    let err = model.forward(&batch, &LogitsAt::Last, &hooks).unwrap_err();
    assert!(err.to_string().contains("row 2"), "{err}");

    let err = model
        .forward(&batch, &LogitsAt::Points(vec![(0, 3)]), &Hooks::new())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
}

#[test]
fn subject_not_in_prompt() {
    let model = tiny("llama");
    let err = model
        .find_subject("the cat sat on the mat", "dog")
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { what, .. } if what == "subject"),
        "{err}"
    );
    assert!(err.to_string().contains("dog"), "{err}");
    let err = model
        .subject_tokens("no placeholder here", "cat")
        .unwrap_err();
    assert!(err.to_string().contains("{}"), "{err}");
    let err = model.subject_tokens("{} sat", "").unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { what, .. } if what == "subject"),
        "{err}"
    );
}
