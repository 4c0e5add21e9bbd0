//! Inference jobs: the node's loaded model generates on a blocking thread; each piece of text
//! becomes a log entry as it comes (so followers see tokens stream), and the completion with
//! its token counts and latency is the run's result. Cancel and timeout stop generation
//! between two tokens.

use crate::executor::{Control, ExecEvent, Execution, OutStream};
use drover_core::{RunOutcome, Timestamp};
use drover_infer::stage::BlockRange;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// The models a node serves, by the name jobs use: loaded here, or served by an external
/// OpenAI-compatible provider the node forwards to.
#[derive(Clone, Default)]
pub struct Models {
    loaded: HashMap<String, Arc<Mutex<drover_infer::Model>>>,
    external: Option<Arc<External>>,
}

/// An OpenAI-compatible inference provider (another drover, a hosted API).
pub struct External {
    pub base_url: String,
    pub api_key: Option<String>,
    pub models: Vec<String>,
    http: reqwest::Client,
}

impl External {
    pub fn new(base_url: String, api_key: Option<String>, models: Vec<String>) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            models,
            http: reqwest::Client::new(),
        }
    }
}

impl Models {
    /// Loads every model and stage (at start: a node that cannot load one refuses to start).
    pub async fn load(
        specs: &[(String, PathBuf)],
        stage_specs: &[crate::StageSpec],
    ) -> Result<Self, drover_infer::InferError> {
        let mut loaded = HashMap::new();
        for (name, path) in specs {
            let path = path.clone();
            let started = Instant::now();
            let model = tokio::task::spawn_blocking(move || drover_infer::Model::load(&path))
                .await
                .map_err(|e| drover_infer::InferError::Tokenizer(e.to_string()))??;
            tracing::info!(model = %name, took_ms = started.elapsed().as_millis() as u64, "model loaded");
            loaded.insert(name.clone(), Arc::new(Mutex::new(model)));
        }
        // A model given as stages (`--blocks`) runs them one after the other, in block
        // order; `drover worker` checked that they cover every block.
        let mut staged: Vec<(&str, &PathBuf, Vec<BlockRange>)> = Vec::new();
        for spec in stage_specs {
            match staged.iter_mut().find(|(name, _, _)| *name == spec.model) {
                Some((_, _, ranges)) => ranges.push(spec.blocks),
                None => staged.push((&spec.model, &spec.path, vec![spec.blocks])),
            }
        }
        for (name, path, mut ranges) in staged {
            ranges.sort_by_key(|r| r.start);
            let path = path.clone();
            let started = Instant::now();
            let described: Vec<String> = ranges.iter().map(ToString::to_string).collect();
            let model = tokio::task::spawn_blocking(move || {
                drover_infer::Model::load_stages(&path, &ranges)
            })
            .await
            .map_err(|e| drover_infer::InferError::Tokenizer(e.to_string()))??;
            tracing::info!(model = %name, stages = ?described, took_ms = started.elapsed().as_millis() as u64, "model loaded as stages");
            loaded.insert(name.to_string(), Arc::new(Mutex::new(model)));
        }
        Ok(Self {
            loaded,
            external: None,
        })
    }

    pub fn with_external(mut self, external: Option<External>) -> Self {
        self.external = external.map(Arc::new);
        self
    }

    fn external_for(&self, name: &str) -> Option<Arc<External>> {
        self.external
            .clone()
            .filter(|e| e.models.iter().any(|m| m == name) && !self.loaded.contains_key(name))
    }

    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty()
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.loaded.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn get(&self, name: &str) -> Option<Arc<Mutex<drover_infer::Model>>> {
        self.loaded.get(name).cloned()
    }
}

const RUNNING: u8 = 0;
const CANCELLED: u8 = 1;
const FENCED: u8 = 2;

/// Runs one inference job to its end, reporting like a process would.
pub async fn execute(
    exec: Execution,
    models: Models,
    events: UnboundedSender<ExecEvent>,
    mut control: UnboundedReceiver<Control>,
) {
    let run_id = exec.run_id;
    let exited = |outcome, error: Option<String>, result| ExecEvent::Exited {
        run_id,
        outcome,
        exit_code: Some(if outcome == RunOutcome::Succeeded {
            0
        } else {
            1
        }),
        error,
        result,
    };
    let Some(spec) = exec.spec.inference.clone() else {
        let _ = events.send(exited(
            RunOutcome::Failed,
            Some("an inference job without its inference spec".into()),
            None,
        ));
        return;
    };
    if let Some(external) = models.external_for(&spec.model) {
        let _ = events.send(ExecEvent::Started { run_id });
        let event = match forward(&external, &spec, &exec, run_id, &events, &mut control).await {
            Ok(Ended::Done(result)) => exited(RunOutcome::Succeeded, None, Some(result)),
            Ok(Ended::Cancelled) => exited(RunOutcome::Cancelled, Some("cancelled".into()), None),
            Ok(Ended::Fenced) => exited(
                RunOutcome::Failed,
                Some("stopped: lost the control plane".into()),
                None,
            ),
            Ok(Ended::TimedOut) => exited(RunOutcome::TimedOut, Some("timed out".into()), None),
            Err(e) => exited(RunOutcome::Failed, Some(e), None),
        };
        let _ = events.send(event);
        return;
    }
    let Some(model) = models.get(&spec.model) else {
        let _ = events.send(exited(
            RunOutcome::Failed,
            Some(format!("this node does not serve model {:?}", spec.model)),
            None,
        ));
        return;
    };
    let _ = events.send(ExecEvent::Started { run_id });
    let stop = Arc::new(AtomicU8::new(RUNNING));
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while let Some(c) = control.recv().await {
                let why = match c {
                    Control::Cancel => CANCELLED,
                    Control::Fence => FENCED,
                };
                stop.store(why, Ordering::SeqCst);
            }
            // The control side went away: the run is no longer ours.
            stop.store(FENCED, Ordering::SeqCst);
        })
    };
    let deadline = exec
        .spec
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms.max(0) as u64));
    let out = events.clone();
    let blocking_stop = stop.clone();
    let generated = tokio::task::spawn_blocking(move || {
        let mut model = model.lock().unwrap_or_else(|p| p.into_inner());
        let prompt = match &spec.prompt {
            Some(p) => p.clone(),
            None => {
                let messages: Vec<drover_infer::ChatMessage> = spec
                    .messages
                    .iter()
                    .map(|m| drover_infer::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect();
                model.chat_prompt(&messages)?
            }
        };
        let params = drover_infer::GenerateParams {
            max_tokens: spec.max_tokens.unwrap_or(256) as usize,
            temperature: spec.temperature.unwrap_or(0.0),
            top_p: spec.top_p,
            seed: spec.seed.unwrap_or(299_792_458),
            stop: spec.stop.clone(),
        };
        let mut timed_out = false;
        let generation = model.generate(&prompt, &params, |piece| {
            let _ = out.send(ExecEvent::Output {
                run_id,
                stream: OutStream::Stdout,
                timestamp: Timestamp::now(),
                data: piece.as_bytes().to_vec(),
            });
            if deadline.is_some_and(|d| Instant::now() >= d) {
                timed_out = true;
                return false;
            }
            blocking_stop.load(Ordering::SeqCst) == RUNNING
        })?;
        Ok::<_, drover_infer::InferError>((generation, timed_out))
    })
    .await;
    watcher.abort();
    let event = match generated {
        Ok(Ok((_, true))) => exited(RunOutcome::TimedOut, Some("timed out".into()), None),
        Ok(Ok((generation, false))) => match stop.load(Ordering::SeqCst) {
            CANCELLED => exited(RunOutcome::Cancelled, Some("cancelled".into()), None),
            FENCED => exited(
                RunOutcome::Failed,
                Some("stopped: lost the control plane".into()),
                None,
            ),
            _ => exited(
                RunOutcome::Succeeded,
                None,
                serde_json::to_value(&generation).ok(),
            ),
        },
        Ok(Err(e)) => exited(RunOutcome::Failed, Some(e.to_string()), None),
        Err(e) => exited(
            RunOutcome::Failed,
            Some(format!("inference panicked: {e}")),
            None,
        ),
    };
    let _ = events.send(event);
}

enum Ended {
    Done(serde_json::Value),
    Cancelled,
    Fenced,
    TimedOut,
}

/// Runs the inference on the external provider: a streaming chat (or text) completion whose
/// pieces become log entries as they arrive.
async fn forward(
    external: &External,
    spec: &drover_core::InferenceSpec,
    exec: &Execution,
    run_id: drover_core::RunId,
    events: &UnboundedSender<ExecEvent>,
    control: &mut UnboundedReceiver<Control>,
) -> Result<Ended, String> {
    use futures::StreamExt;
    let started = Instant::now();
    let (path, mut body) = match &spec.prompt {
        Some(p) => ("completions", serde_json::json!({"prompt": p})),
        None => (
            "chat/completions",
            serde_json::json!({"messages": spec.messages}),
        ),
    };
    body["model"] = serde_json::json!(spec.model);
    body["stream"] = serde_json::json!(true);
    body["max_tokens"] = serde_json::json!(spec.max_tokens.unwrap_or(256));
    if let Some(t) = spec.temperature {
        body["temperature"] = serde_json::json!(t);
    }
    if let Some(p) = spec.top_p {
        body["top_p"] = serde_json::json!(p);
    }
    if let Some(s) = spec.seed {
        body["seed"] = serde_json::json!(s);
    }
    if !spec.stop.is_empty() {
        body["stop"] = serde_json::json!(spec.stop);
    }
    let mut request = external
        .http
        .post(format!("{}/{path}", external.base_url))
        .json(&body);
    if let Some(key) = &external.api_key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("the inference provider {}: {e}", external.base_url))?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        return Err(format!(
            "the inference provider answered {status}: {}",
            text.trim()
        ));
    }
    let deadline = exec
        .spec
        .timeout_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms.max(0) as u64));
    let mut bytes = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut text = String::new();
    let mut pieces = 0u64;
    let mut first: Option<Duration> = None;
    let mut finish = "stop".to_string();
    let mut usage = serde_json::Value::Null;
    loop {
        let next = tokio::select! {
            c = control.recv() => return Ok(match c {
                Some(Control::Cancel) => Ended::Cancelled,
                _ => Ended::Fenced,
            }),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => return Ok(Ended::TimedOut),
            next = bytes.next() => next,
        };
        let Some(chunk) = next else { break };
        buffer.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            let choice = &v["choices"][0];
            let piece = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str())
                .unwrap_or("");
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.to_string();
            }
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
            if piece.is_empty() {
                continue;
            }
            first.get_or_insert_with(|| started.elapsed());
            pieces += 1;
            text.push_str(piece);
            let _ = events.send(ExecEvent::Output {
                run_id,
                stream: OutStream::Stdout,
                timestamp: Timestamp::now(),
                data: piece.as_bytes().to_vec(),
            });
        }
    }
    let elapsed = started.elapsed();
    let ttft = first.unwrap_or(elapsed);
    let decode = elapsed.saturating_sub(ttft).as_secs_f64();
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(pieces);
    Ok(Ended::Done(serde_json::json!({
        "text": text,
        "prompt_tokens": usage["prompt_tokens"].as_u64().unwrap_or(0),
        "completion_tokens": completion_tokens,
        "finish_reason": finish,
        "time_to_first_token_ms": ttft.as_secs_f64() * 1000.0,
        "tokens_per_second": if decode > 0.0 && pieces > 1 { (pieces - 1) as f64 / decode } else { 0.0 },
        "provider": external.base_url,
    })))
}
