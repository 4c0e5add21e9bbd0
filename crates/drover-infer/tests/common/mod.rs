//! A tiny random llama (2 blocks, hidden 64) and a byte-level tokenizer, written as GGUF by
//! the test itself: the engine is tested without any downloaded model.
#![allow(dead_code)] // each test file uses a part

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

pub const HIDDEN: usize = 64;
const HEADS: u32 = 4;
const KV_HEADS: u32 = 2;
const FFN: usize = 128;
pub const BLOCKS: usize = 2;

/// The tiny model; `store` gives each weight matrix the type it is written in.
pub fn tiny_model(path: &std::path::Path, store: &dyn Fn(Tensor) -> QTensor, tied_head: bool) {
    let dev = Device::Cpu;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.push("he".into());
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    tokens.extend(specials.iter().map(|s| s.to_string()));
    let types: Vec<gguf_file::Value> = tokens
        .iter()
        .map(|t| gguf_file::Value::I32(if specials.contains(&t.as_str()) { 3 } else { 1 }))
        .collect();
    let vocab = tokens.len();
    let eos = tokens.iter().position(|t| t == "<|im_end|>").unwrap() as u32;
    let strings = |v: &[String]| {
        gguf_file::Value::Array(
            v.iter()
                .map(|s| gguf_file::Value::String(s.clone()))
                .collect(),
        )
    };
    let metadata: Vec<(&str, gguf_file::Value)> = vec![
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("general.name", gguf_file::Value::String("tiny".into())),
        ("llama.attention.head_count", gguf_file::Value::U32(HEADS)),
        (
            "llama.attention.head_count_kv",
            gguf_file::Value::U32(KV_HEADS),
        ),
        ("llama.block_count", gguf_file::Value::U32(BLOCKS as u32)),
        (
            "llama.embedding_length",
            gguf_file::Value::U32(HIDDEN as u32),
        ),
        (
            "llama.rope.dimension_count",
            gguf_file::Value::U32(HIDDEN as u32 / HEADS),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-5),
        ),
        ("llama.context_length", gguf_file::Value::U32(512)),
        (
            "tokenizer.ggml.model",
            gguf_file::Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.merges", strings(&["h e".to_string()])),
        ("tokenizer.ggml.token_type", gguf_file::Value::Array(types)),
        (
            "tokenizer.ggml.bos_token_id",
            gguf_file::Value::U32(eos - 1),
        ),
        ("tokenizer.ggml.eos_token_id", gguf_file::Value::U32(eos)),
    ];
    let kv = HIDDEN / HEADS as usize * KV_HEADS as usize;
    // Weights from a fixed sequence (xorshift64, uniform with a standard deviation of 0.5):
    // the CPU device's generator cannot be seeded, and with weights drawn anew on each run
    // the model's first token was now and then its end-of-turn token — no text at all.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut random = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
                (unit * 2.0 - 1.0) * 0.866
            })
            .collect();
        store(Tensor::from_vec(values, shape, &dev).unwrap())
    };
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &dev).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), random(&[vocab, HIDDEN])),
        ("output_norm.weight".into(), ones(HIDDEN)),
    ];
    // A tied head (as SmolLM2's) reuses the token embedding: no `output.weight`.
    if !tied_head {
        tensors.push(("output.weight".into(), random(&[vocab, HIDDEN])));
    }
    for b in 0..BLOCKS {
        let p = format!("blk.{b}");
        tensors.push((format!("{p}.attn_q.weight"), random(&[HIDDEN, HIDDEN])));
        tensors.push((format!("{p}.attn_k.weight"), random(&[kv, HIDDEN])));
        tensors.push((format!("{p}.attn_v.weight"), random(&[kv, HIDDEN])));
        tensors.push((format!("{p}.attn_output.weight"), random(&[HIDDEN, HIDDEN])));
        tensors.push((format!("{p}.ffn_gate.weight"), random(&[FFN, HIDDEN])));
        tensors.push((format!("{p}.ffn_up.weight"), random(&[FFN, HIDDEN])));
        tensors.push((format!("{p}.ffn_down.weight"), random(&[HIDDEN, FFN])));
        tensors.push((format!("{p}.attn_norm.weight"), ones(HIDDEN)));
        tensors.push((format!("{p}.ffn_norm.weight"), ones(HIDDEN)));
    }
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md, &ts).unwrap();
}

pub fn temp_model() -> (tempfile::TempDir, std::path::PathBuf) {
    temp_model_of(&|t| QTensor::quantize(&t, GgmlDType::F32).unwrap())
}

pub fn temp_model_of(store: &dyn Fn(Tensor) -> QTensor) -> (tempfile::TempDir, std::path::PathBuf) {
    temp_model_with(store, false)
}

/// The tiny model written with `store`, its head tied to its embedding or not.
pub fn temp_model_with(
    store: &dyn Fn(Tensor) -> QTensor,
    tied_head: bool,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_model(&path, store, tied_head);
    (dir, path)
}
