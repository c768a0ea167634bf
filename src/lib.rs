//! # kedit
//!
//! Locate and edit what a transformer language model knows, in-process, on
//! CPU or CUDA: load a real checkpoint into one instrumented decoder, trace
//! where a fact lives, and change it with a closed-form low-rank update.
//!
//! ```no_run
//! let model = kedit::Model::load("path/to/model.gguf")?;
//! for t in model.top_k("The capital of France is", 5)? {
//!     println!("{:>8.4} {:?}", t.prob, t.text);
//! }
//! # Ok::<(), kedit::Error>(())
//! ```

#![warn(missing_docs)]

pub mod edit;
mod error;
pub mod eval;
pub mod fetch;
pub mod io;
pub mod linalg;
pub mod locate;
pub mod model;
pub mod stats;

/// The Rust snippets of README.md, compiled as doc tests so that the
/// README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeSnippets;

pub use candle_core::{DType, Device, Tensor, Var};
pub use error::{Error, Result};
pub use locate::{trace, Aggregate, TraceOptions, TraceResult, Tracer};
pub use model::{
    At, Batch, CaptureId, Forward, Generation, Hooks, KvCache, LoadOptions, LogitsAt, Model,
    ModelConfig, ModelSource, Sampling, Site, TargetProb, Token, TopToken,
};
