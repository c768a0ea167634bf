//! The canonical decoder configuration.
//!
//! Every supported family is described by the same struct; what differs
//! between GPT-2, GPT-J, GPT-NeoX and the Llama family is data here, never a
//! separate forward pass.

use serde::{Deserialize, Serialize};

/// The source family of a checkpoint. It decides only how weights are named
/// and laid out on disk; the forward pass is the same for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// GPT-2 (`GPT2LMHeadModel`).
    Gpt2,
    /// GPT-J (`GPTJForCausalLM`).
    GptJ,
    /// GPT-NeoX and Pythia (`GPTNeoXForCausalLM`).
    GptNeoX,
    /// Llama 2/3, SmolLM2 (`LlamaForCausalLM`).
    Llama,
    /// Mistral (`MistralForCausalLM`).
    Mistral,
    /// Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`, q/k/v biases).
    Qwen2,
}

impl Family {
    /// All families kedit can load, as shown in error messages.
    pub const SUPPORTED: &'static str = "gpt2 (GPT2LMHeadModel), gptj (GPTJForCausalLM), \
        gpt_neox (GPTNeoXForCausalLM, Pythia), llama (LlamaForCausalLM, SmolLM2), \
        mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM)";

    /// The `model_type` string of a Hugging Face `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::GptJ => "gptj",
            Family::GptNeoX => "gpt_neox",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
        }
    }

    /// Parses a `model_type` (Hugging Face) or `general.architecture` (GGUF) string.
    pub fn from_model_type(s: &str) -> Option<Self> {
        Some(match s {
            "gpt2" => Family::Gpt2,
            "gptj" => Family::GptJ,
            "gpt_neox" | "gptneox" => Family::GptNeoX,
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            _ => return None,
        })
    }
}

/// Normalisation layer kind.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// LayerNorm with weight and bias.
    LayerNorm,
    /// RMSNorm with weight only.
    RmsNorm,
}

/// MLP activation function.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The tanh approximation of GELU (GPT-2, GPT-J: `gelu_new`).
    GeluTanh,
    /// Exact (erf) GELU (GPT-NeoX: `gelu`).
    Gelu,
    /// SiLU, used gated in the Llama family.
    Silu,
    /// ReLU.
    Relu,
}

/// How token positions enter the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positional {
    /// A learned position embedding added to the token embedding (GPT-2).
    Learned,
    /// Rotary embeddings on q and k.
    Rotary(Rotary),
}

/// Rotary position embedding parameters.
///
/// kedit uses one rotary convention for every family: the "half split" form
/// (dimension `i` is paired with `i + rotary_dim / 2`). Checkpoints stored for
/// the interleaved form (GPT-J, GGUF Llama) have their q/k rows permuted at
/// load so that the same forward pass serves them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rotary {
    /// Number of leading dimensions of each head that rotate (even, ≤ head_dim).
    pub rotary_dim: usize,
    /// Base of the inverse frequencies.
    pub theta: f64,
    /// Llama 3 style frequency scaling, if the checkpoint uses it.
    pub llama3_scaling: Option<Llama3RopeScaling>,
}

/// The `rope_scaling = {"rope_type": "llama3", ...}` parameters of Llama 3.1+.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// Overall stretch of long wavelengths.
    pub factor: f64,
    /// Wavelengths above `original / low_freq_factor` are stretched fully.
    pub low_freq_factor: f64,
    /// Wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// Context length of the unscaled model.
    pub original_max_position_embeddings: usize,
}

/// The canonical decoder's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Where the layout came from (decides export names only).
    pub family: Family,
    /// Rows of the embedding and unembedding.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (< n_heads for grouped-query attention).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Hidden width of the MLP (the width of `MlpKey`).
    pub d_ff: usize,
    /// LayerNorm or RMSNorm.
    pub norm: NormKind,
    /// Epsilon of every norm.
    pub norm_eps: f64,
    /// Learned or rotary positions.
    pub positional: Positional,
    /// The MLP's activation.
    pub activation: Activation,
    /// `w_gate` / `w_up` (SwiGLU) instead of a single `w_in`.
    pub gated_mlp: bool,
    /// Attention and MLP read the same block input and are summed
    /// (GPT-J, GPT-NeoX), instead of running one after the other.
    pub parallel_residual: bool,
    /// Parallel blocks with a single norm shared by attention and MLP (GPT-J).
    pub shared_block_norm: bool,
    /// Maximum sequence length the checkpoint supports.
    pub max_positions: usize,
    /// Each token attends only to this many most recent tokens (Mistral).
    pub sliding_window: Option<usize>,
    /// The unembedding is the token embedding matrix.
    pub tied_embeddings: bool,
    /// Beginning-of-sequence token, if the tokenizer has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s).
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Number of attention heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}
