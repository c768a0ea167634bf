//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use kedit::{Model, Tensor};

/// A tiny random-weight fixture directory.
pub fn tiny_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(family)
}

/// Loads a tiny fixture model.
pub fn tiny(family: &str) -> Model {
    Model::load(tiny_dir(family).to_str().unwrap())
        .unwrap_or_else(|e| panic!("loading {family}: {e}"))
}

/// Tensors of a safetensors file.
pub fn load_tensors(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The SmolLM2 GGUF from the kedit cache. Under CI (`CI` set) a missing
/// model fails the test loudly; elsewhere the test is skipped with a note.
pub fn smollm2_path() -> Option<PathBuf> {
    match kedit::fetch::find(&kedit::fetch::SMOLLM2_135M) {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => panic!(
            "SmolLM2 is not in the kedit cache ({}); run `cargo run --release --example fetch_model` first",
            kedit::fetch::cache_dir().display()
        ),
        None => {
            eprintln!("SKIPPED: SmolLM2 not in the kedit cache; run `cargo run --release --example fetch_model`");
            None
        }
    }
}

/// SmolLM2, loaded once per test binary.
pub fn smollm2() -> Option<&'static Model> {
    use std::sync::OnceLock;
    static MODEL: OnceLock<Option<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            smollm2_path().map(|p| Model::load(p.to_str().unwrap()).expect("loading SmolLM2"))
        })
        .as_ref()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(candle_core::DType::F32).unwrap() - b.to_dtype(candle_core::DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// i64 ids tensor → Vec<u32>.
pub fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}
