//! `drover bench split`: one model whole against the same model as stages, in this process,
//! alternated round by round on the same prompt: time to first token, decode tokens/s, and
//! the bytes of hidden states a chain would send per token. The stages run one after the
//! other in this process: no encoding and no network hop.

use super::*;
use drover_infer::stage::BlockRange;
use drover_infer::{ChatMessage, GenerateParams, Model};

pub(super) fn split(
    model: &str,
    blocks: &[String],
    tokens: usize,
    rounds: usize,
) -> anyhow::Result<Figures> {
    let path = drover_infer::resolve_model(model, &drover_infer::default_models_dir())
        .with_context(|| format!("--model {model}: no such file or fetched model"))?;
    let ranges: Vec<BlockRange> = blocks
        .iter()
        .map(|b| b.parse().map_err(|e| anyhow::anyhow!("--blocks {b}: {e}")))
        .collect::<anyhow::Result<_>>()?;
    let mut whole = Model::load(&path)?;
    let mut staged = Model::load_stages(&path, &ranges)?;
    let hidden = drover_infer::stage::hidden_size(&path)?;
    let prompt = whole.chat_prompt(&[ChatMessage {
        role: "user".into(),
        content: "Tell a long story about a lighthouse keeper and a storm.".into(),
    }])?;
    let params = GenerateParams {
        max_tokens: tokens,
        ..Default::default()
    };
    let (mut whole_runs, mut staged_runs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        whole_runs.push(whole.generate(&prompt, &params, |_| true)?);
        staged_runs.push(staged.generate(&prompt, &params, |_| true)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut figures = vec![
        ("model".to_string(), path.display().to_string()),
        (
            "stages".to_string(),
            ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" | "),
        ),
        ("tokens per round".to_string(), tokens.to_string()),
        ("rounds (alternated)".to_string(), rounds.to_string()),
    ];
    for (label, runs) in [("whole", &whole_runs), ("stages", &staged_runs)] {
        let mut ttft: Vec<f64> = runs.iter().map(|g| g.time_to_first_token_ms).collect();
        let mut speed: Vec<f64> = runs.iter().map(|g| g.tokens_per_second).collect();
        figures.push((
            format!("{label}: time to first token (median)"),
            format!("{:.1} ms", median(&mut ttft)),
        ));
        figures.push((
            format!("{label}: decode (median)"),
            format!("{:.1} tokens/s", median(&mut speed)),
        ));
    }
    let same = whole_runs
        .iter()
        .zip(&staged_runs)
        .all(|(w, s)| w.text == s.text);
    figures.push(("same text".into(), same.to_string()));
    figures.push((
        "hidden states per token and hop (f32)".into(),
        format!("{} bytes", hidden * 4),
    ));
    Ok(Figures {
        scenario: "split".into(),
        database: "in process".into(),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}
