//! A model cut into stages computes what the whole model does: the tiny random llama (2
//! blocks), cut 1|1 with its hidden states sent through the wire format in f32, gives the
//! logits of candle's own whole model within 1e-5, over a prompt and the decoding steps
//! after it; a stage refuses what it cannot take, naming it.

mod common;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::temp_model_with;
use drover_infer::stage::{BlockRange, Stage, StageCache, StageInput, StageOutput, wire};

const PROMPT: [u32; 6] = [70, 71, 72, 73, 74, 75];
const STEPS: usize = 8;

fn logits_of(output: StageOutput) -> Vec<f32> {
    match output {
        StageOutput::Logits(l) => l.to_vec1::<f32>().unwrap(),
        StageOutput::Hidden(_) => panic!("the last stage gave hidden states"),
    }
}

fn hidden_of(output: StageOutput) -> Tensor {
    match output {
        StageOutput::Hidden(h) => h,
        StageOutput::Logits(_) => panic!("a first stage gave logits"),
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "{what}: logits differ by up to {worst}");
}

/// candle's whole model: logits after the prompt, then after each greedy token.
fn whole_model(path: &std::path::Path) -> Vec<Vec<f32>> {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let mut out = Vec::new();
    let input = Tensor::new(&PROMPT[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut logits: Vec<f32> = model
        .forward(&input, 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    for position in PROMPT.len()..PROMPT.len() + STEPS {
        let next = argmax(&logits);
        out.push(logits);
        let input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = model
            .forward(&input, position)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
    out.push(logits);
    out
}

/// The same generation through `stages` in order, the hidden states between two stages
/// sent through the wire format as `wire_type`.
fn through_stages(stages: &[Stage], wire_type: wire::WireType) -> Vec<Vec<f32>> {
    let mut caches: Vec<StageCache> = stages.iter().map(Stage::new_cache).collect();
    let mut step = |tokens: Vec<u32>| {
        let mut input = StageInput::Tokens(tokens);
        for (i, (stage, cache)) in stages.iter().zip(caches.iter_mut()).enumerate() {
            let output = stage.forward(cache, input).unwrap();
            if i + 1 == stages.len() {
                return logits_of(output);
            }
            let bytes = wire::encode(&hidden_of(output), wire_type).unwrap();
            input = StageInput::Hidden(wire::decode(&bytes, &Device::Cpu).unwrap());
        }
        unreachable!("the last stage returns")
    };
    let mut out = vec![step(PROMPT.to_vec())];
    for _ in 0..STEPS {
        let next = argmax(out.last().unwrap());
        out.push(step(vec![next]));
    }
    out
}

fn range(s: &str) -> BlockRange {
    s.parse().unwrap()
}

fn check_split_equals_whole(store: &dyn Fn(Tensor) -> QTensor, tied_head: bool) {
    let (_dir, path) = temp_model_with(store, tied_head);
    let want = whole_model(&path);
    let whole = [Stage::load(&path, range("0-1")).unwrap()];
    let split = [
        Stage::load(&path, range("0-0")).unwrap(),
        Stage::load(&path, range("1-1")).unwrap(),
    ];
    assert!(split[0].is_first() && !split[0].is_last());
    assert!(!split[1].is_first() && split[1].is_last());
    for (what, got) in [
        ("one stage", through_stages(&whole, wire::WireType::F32)),
        ("split 1|1", through_stages(&split, wire::WireType::F32)),
    ] {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("{what}, step {i}"), g, w);
        }
    }
    // f16 on the wire: half the bytes, the same greedy tokens on this model.
    let half = through_stages(&split, wire::WireType::F16);
    let tokens = |l: &[Vec<f32>]| l.iter().map(|v| argmax(v)).collect::<Vec<_>>();
    assert_eq!(tokens(&half), tokens(&want));
}

#[test]
fn a_split_model_gives_the_whole_models_logits() {
    check_split_equals_whole(&|t| QTensor::quantize(&t, GgmlDType::F32).unwrap(), false);
}

/// Quantized weights and a head tied to the embedding (as SmolLM2's): the last stage loads
/// the embedding table for its head.
#[test]
fn a_split_quantized_model_with_a_tied_head_gives_the_whole_models_logits() {
    check_split_equals_whole(&|t| QTensor::quantize(&t, GgmlDType::Q8_0).unwrap(), true);
}

#[test]
fn a_stage_refuses_what_it_cannot_take() {
    let (_dir, path) = temp_model_with(&|t| QTensor::quantize(&t, GgmlDType::F32).unwrap(), false);
    let past_the_end = Stage::load(&path, range("1-2"))
        .err()
        .expect("blocks past the model");
    assert!(
        past_the_end.to_string().contains("2 blocks"),
        "{past_the_end}"
    );

    let second = Stage::load(&path, range("1-1")).unwrap();
    let mut cache = second.new_cache();
    let tokens = second
        .forward(&mut cache, StageInput::Tokens(vec![1, 2]))
        .err()
        .expect("tokens to a middle stage");
    assert!(
        tokens.to_string().contains("take hidden states"),
        "{tokens}"
    );
    let wrong = Tensor::zeros((1, 3, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
    let shape = second
        .forward(&mut cache, StageInput::Hidden(wrong))
        .err()
        .expect("a wrong width");
    assert!(shape.to_string().contains("[1, tokens, 64]"), "{shape}");
    assert_eq!(cache.positions(), 0, "nothing was processed");
}
