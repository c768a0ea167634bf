//! Tokenizers: loaded from `tokenizer.json`, or rebuilt from GGUF metadata.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::{Error, Result};

/// One token of an encoded text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Token id.
    pub id: u32,
    /// The token's text as the vocabulary spells it.
    pub text: String,
    /// Byte range of the token in the input string (empty for added special tokens).
    pub bytes: Range<usize>,
    /// Character range of the token in the input string.
    pub chars: Range<usize>,
}

/// A tokenizer with the few operations kedit needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab {})", self.inner.get_vocab_size(true))
    }
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{context}: {e}"))
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            format: "tokenizer.json",
            reason: e.to_string(),
        })?;
        Ok(Self { inner })
    }

    /// Wraps an existing `tokenizers::Tokenizer`.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Rebuilds a byte-level BPE tokenizer from GGUF metadata
    /// (`tokenizer.ggml.*`): vocabulary, merges, pre-tokenizer by the `pre`
    /// name, special (control) tokens, and BOS when `add_bos_token` says so.
    pub fn from_gguf(path: &Path, meta: &HashMap<String, Value>) -> Result<Self> {
        let corrupt = |reason: String| Error::Format {
            path: path.to_path_buf(),
            format: "GGUF tokenizer",
            reason,
        };
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| corrupt(format!("metadata key {k} is missing")))
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| corrupt(e.to_string()))?;
        if model != "gpt2" {
            return Err(Error::UnsupportedConfig {
                path: path.to_path_buf(),
                reason: format!(
                    "GGUF tokenizer model {model:?} (supported: gpt2, i.e. byte-level BPE)"
                ),
            });
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            get(k)?
                .to_vec()
                .map_err(|e| corrupt(e.to_string()))?
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| corrupt(format!("{k}: {e}")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges_raw = strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match meta.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| corrupt(e.to_string()))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges_raw
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| corrupt(format!("merge {m:?} is not two tokens")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| corrupt(format!("BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let pre = meta
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("default");
        inner.with_pre_tokenizer(Some(pre_tokenizer(path, pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control tokens (type 3) such as <|im_start|> are matched whole.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| corrupt(format!("special tokens: {e}")))?;

        let u32_of = |k: &str| meta.get(k).and_then(|v| v.to_u32().ok());
        let add_bos = meta
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        if add_bos {
            let bos = u32_of("tokenizer.ggml.bos_token_id").ok_or_else(|| {
                corrupt("add_bos_token is set but bos_token_id is missing".into())
            })?;
            let bos_text = tokens
                .get(bos as usize)
                .ok_or_else(|| corrupt(format!("bos_token_id {bos} is outside the vocabulary")))?;
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos_text}:0 $A:0"))
                .map_err(|e| corrupt(format!("BOS template: {e}")))?
                .try_pair(format!("{bos_text}:0 $A:0 $B:1"))
                .map_err(|e| corrupt(format!("BOS template: {e}")))?
                .special_tokens(vec![(bos_text.clone(), bos)])
                .build()
                .map_err(|e| corrupt(format!("BOS template: {e}")))?;
            inner.with_post_processor(Some(post));
        }
        Ok(Self { inner })
    }

    /// Encodes `text`. With `special`, the tokenizer's own additions (such as
    /// a BOS token) are included, as a model expects at the start of a prompt.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<Token>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| tok_err(&format!("encoding {text:?}"), e))?;
        let char_of_byte = |b: usize| text[..b.min(text.len())].chars().count();
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_tokens())
            .zip(enc.get_offsets())
            .map(|((&id, tok), &(s, e))| Token {
                id,
                text: tok.clone(),
                bytes: s..e,
                chars: char_of_byte(s)..char_of_byte(e),
            })
            .collect())
    }

    /// Token ids of `text`, with or without the tokenizer's special additions.
    pub fn encode_ids(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| tok_err(&format!("encoding {text:?}"), e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids into text (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err(&format!("decoding {ids:?}"), e))
    }

    /// Decodes ids into text, leaving special tokens out.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| tok_err(&format!("decoding {ids:?}"), e))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token spelled exactly so in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// The pre-tokenizer llama.cpp records by name in `tokenizer.ggml.pre`.
fn pre_tokenizer(path: &Path, pre: &str) -> Result<PreTokenizerWrapper> {
    // GPT-2's split pattern is built into ByteLevel(use_regex = true).
    let byte_level = |use_regex: bool| ByteLevel::new(false, true, use_regex).into();
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| tok_err("pre-tokenizer regex", e))?
        .into())
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // SmolLM / StarCoder: digits split one by one, then GPT-2 byte level.
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into()
        }
        "qwen2" | "deepseek-r1-qwen" => Sequence::new(vec![
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")?,
            byte_level(false),
        ])
        .into(),
        "llama3" | "llama-bpe" | "llama-v3" => Sequence::new(vec![
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")?,
            byte_level(false),
        ])
        .into(),
        other => {
            return Err(Error::UnsupportedConfig {
                path: path.to_path_buf(),
                reason: format!(
                    "GGUF pre-tokenizer {other:?} (supported: default/gpt2, smollm, starcoder, qwen2, llama3/llama-bpe)"
                ),
            })
        }
    })
}
