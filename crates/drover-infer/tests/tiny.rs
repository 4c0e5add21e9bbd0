//! A tiny random llama (2 blocks, hidden 64) and a byte-level tokenizer, written as GGUF in
//! the test and loaded back: the engine works without any downloaded model.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use drover_infer::{ChatMessage, GenerateParams, Model};

mod common;

use common::{temp_model, temp_model_of};

#[test]
fn a_tiny_random_llama_round_trips_through_gguf_and_generates() {
    let (_dir, path) = temp_model();
    let mut model = Model::load(&path).expect("load");
    assert_eq!(model.name(), "tiny");
    let prompt = model
        .chat_prompt(&[ChatMessage {
            role: "user".into(),
            content: "hello".into(),
        }])
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    );
    let params = GenerateParams {
        max_tokens: 12,
        temperature: 0.8,
        top_p: Some(0.9),
        seed: 7,
        ..Default::default()
    };
    let first = model.generate(&prompt, &params, |_| true).unwrap();
    let again = model.generate(&prompt, &params, |_| true).unwrap();
    assert_eq!(first.text, again.text, "the same seed gives the same text");
    assert!(first.completion_tokens > 0);
    let greedy = GenerateParams {
        max_tokens: 12,
        ..Default::default()
    };
    let a = model.generate(&prompt, &greedy, |_| true).unwrap();
    let b = model.generate(&prompt, &greedy, |_| true).unwrap();
    assert_eq!((a.text, a.completion_tokens), (b.text, b.completion_tokens));
}

#[test]
fn the_byte_level_tokenizer_round_trips_any_text() {
    let (_dir, path) = temp_model();
    let model = Model::load(&path).expect("load");
    for text in [
        "hello there",
        "digits 0123456789",
        "emoji 🦀 déjà",
        "<|im_start|>x<|im_end|>",
    ] {
        let ids = model.encode(text).unwrap();
        assert_eq!(model.tokenizer().decode(&ids, false).unwrap(), text);
    }
    assert_eq!(model.encode("he").unwrap().len(), 1, "the merge applies");
    assert_eq!(model.encode("2024").unwrap().len(), 4, "digits one by one");
    // A multi-byte character split across tokens decodes whole once both are there.
    let crab = model.encode("🦀").unwrap();
    assert_eq!(crab.len(), 4);
    let partial = model.tokenizer().decode(&crab[..2], false).unwrap();
    assert!(
        partial.contains('\u{FFFD}'),
        "half a character is not text yet: {partial:?}"
    );
}

/// Q4_1 weights run requantized to Q8_0 (candle has no SIMD kernel for Q4_1): a Q4_1 model
/// generates exactly what the same weights written requantized generate.
#[test]
fn a_q4_1_model_generates_as_its_weights_requantized_to_q8_0() {
    let q4_1 = |t: Tensor| QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
    let requantized = |t: Tensor| {
        let back = q4_1(t).dequantize(&Device::Cpu).unwrap();
        QTensor::quantize(&back, GgmlDType::Q8_0).unwrap()
    };
    let (_a, as_q4_1) = temp_model_of(&q4_1);
    let (_b, as_q8_0) = temp_model_of(&requantized);
    let generate = |path: &std::path::Path| {
        let mut model = Model::load(path).expect("load");
        let prompt = model
            .chat_prompt(&[ChatMessage {
                role: "user".into(),
                content: "hello there".into(),
            }])
            .unwrap();
        let greedy = GenerateParams {
            max_tokens: 24,
            ..Default::default()
        };
        let out = model.generate(&prompt, &greedy, |_| true).unwrap();
        (out.text, out.completion_tokens)
    };
    let from_q4_1 = generate(&as_q4_1);
    assert!(from_q4_1.1 > 0, "{from_q4_1:?}");
    assert_eq!(from_q4_1, generate(&as_q8_0));
}
