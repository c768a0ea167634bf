//! The one error type of kedit.
//!
//! Every variant says which input was wrong and how, so that a caller can show
//! the message to a person without further context.

use std::path::PathBuf;

/// Everything that can go wrong in kedit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory the caller named does not exist, or cannot be
    /// read or written (the same variant serves both directions, so the
    /// message names the path and what the operating system said).
    #[error("cannot access {path}: {source}")]
    Io {
        /// The path that could not be read or written.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// A model source is not a directory, a GGUF file or a hub repo id we can resolve.
    #[error("model source {source_name}: {reason}")]
    Source {
        /// The source as given.
        source_name: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// A file exists but its contents are not what its format promises
    /// (truncated safetensors, corrupt GGUF, malformed config.json, ...).
    #[error("{path}: corrupt or unreadable {format}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The format it should have had.
        format: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The checkpoint names an architecture kedit cannot run.
    #[error("unsupported architecture {found:?} in {path}; supported: {supported}")]
    UnsupportedArchitecture {
        /// The file naming the architecture.
        path: PathBuf,
        /// The architecture found.
        found: String,
        /// The architectures kedit supports.
        supported: String,
    },

    /// A configuration value kedit does not implement (instead of guessing).
    #[error("{path}: unsupported configuration: {reason}")]
    UnsupportedConfig {
        /// The configuration file.
        path: PathBuf,
        /// The setting that is not implemented.
        reason: String,
    },

    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("{path}: missing tensor {name}")]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's name in the checkpoint.
        name: String,
    },

    /// A tensor is present but has the wrong shape.
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's name in the checkpoint.
        name: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },

    /// A tokenizer could not be built or could not encode / decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An argument of a call is out of its valid range or inconsistent
    /// (empty prompt, layer out of range, subject not in prompt, ...).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which argument.
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A numeric computation produced NaN or infinity.
    #[error("non-finite value in {0}")]
    NonFinite(String),

    /// Fetching a model (from a hub or a package registry) failed.
    #[error("fetching {what} failed: {reason}")]
    Fetch {
        /// What was being fetched.
        what: String,
        /// Why it failed.
        reason: String,
    },

    /// An error of the tensor library that is not attributable to an input.
    #[error("tensor operation failed: {}", candle_reason(.0))]
    Candle(#[from] candle_core::Error),
}

/// A tensor-library error's message without the backtrace that candle
/// appends when `RUST_BACKTRACE` is set (it belongs in a debugger, not in
/// an error message).
pub(crate) fn candle_reason(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_reason(inner),
        other => other.to_string(),
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// kedit's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
