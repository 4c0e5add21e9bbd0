//! The tokenizer a GGUF model carries: its vocabulary and merges make a byte-level BPE
//! (GPT-2 style, digits split one by one, as SmolLM2 and llama-3 do), its control tokens
//! (`<|im_start|>`, …) are special tokens matched whole.

use crate::InferError;
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// GGUF token types: control tokens and user-defined ones are matched whole.
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

pub struct Built {
    pub tokenizer: Tokenizer,
    pub bos: String,
    pub eos: String,
    pub eos_id: u32,
}

fn strings(content: &Content, key: &'static str) -> Result<Vec<String>, InferError> {
    let values = content
        .metadata
        .get(key)
        .ok_or(InferError::Missing(key))?
        .to_vec()
        .map_err(|e| InferError::Tokenizer(format!("{key}: {e}")))?;
    values
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| InferError::Tokenizer(format!("{key}: {e}")))
        })
        .collect()
}

fn token_id(content: &Content, key: &'static str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

/// Builds the tokenizer from the GGUF's `tokenizer.ggml.*` metadata.
pub fn build_tokenizer(content: &Content) -> Result<Built, InferError> {
    let model = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(InferError::Tokenizer(format!(
            "tokenizer model {model:?}; drover reads byte-level BPE (gpt2) tokenizers"
        )));
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges = strings(content, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(values)) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => Vec::new(),
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Merges = merges
        .iter()
        .filter_map(|m| m.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| InferError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
        .map(|(token, _)| AddedToken::from(token.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    let name = |id: Option<u32>| {
        id.and_then(|i| tokens.get(i as usize))
            .cloned()
            .unwrap_or_default()
    };
    let eos_id = token_id(content, "tokenizer.ggml.eos_token_id")
        .ok_or(InferError::Missing("tokenizer.ggml.eos_token_id"))?;
    Ok(Built {
        bos: name(token_id(content, "tokenizer.ggml.bos_token_id")),
        eos: name(Some(eos_id)),
        eos_id,
        tokenizer,
    })
}
