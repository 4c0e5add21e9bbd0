//! The OpenAI-compatible API over the fleet: `GET /v1/models`, `POST /v1/chat/completions`
//! and `POST /v1/completions`, streaming (server-sent events) or not. Each request runs as
//! an inference job, so it is queued, scheduled on a node serving the model, logged and
//! visible like any job; its id comes back in `X-Drover-Job`.

use crate::auth::Caller;
use crate::extract::parse_body;
use crate::log_stream::{Followed, follow_logs};
use crate::{ApiError, AppState, SharedState, jobs};
use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use drover_core::{ChatTurn, InferenceSpec, JobKind, JobSpec, JobState, Timestamp};
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Models served by the nodes that are up, across replicas (from the store).
async fn served_models(state: &AppState) -> Result<Vec<String>, ApiError> {
    let mut names: Vec<String> = state
        .store
        .list_workers()
        .await?
        .into_iter()
        .filter(|w| w.state == drover_core::WorkerState::Ready)
        .flat_map(|w| w.capabilities.models)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

pub async fn models(State(state): SharedState) -> Result<Json<Value>, ApiError> {
    let names = served_models(&state).await?;
    let data: Vec<Value> = names
        .iter()
        .map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": "drover"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields drover uses; others OpenAI clients send (user, n=1, …) are accepted and
/// ignored, as OpenAI-compatible servers do.
#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct CompletionRequest {
    model: String,
    #[serde(default)]
    messages: Vec<ChatTurn>,
    #[serde(default)]
    prompt: Option<String>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Chat,
    Text,
}

impl Flavour {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Self::Chat, false) => "chat.completion",
            (Self::Chat, true) => "chat.completion.chunk",
            (Self::Text, _) => "text_completion",
        }
    }

    fn choice(self, text: &str, finish: Option<&str>, chunk: bool) -> Value {
        match (self, chunk) {
            (Self::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }),
            (Self::Chat, true) => json!({
                "index": 0,
                "delta": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }),
            (Self::Text, _) => json!({"index": 0, "text": text, "finish_reason": finish}),
        }
    }
}

pub async fn chat_completions(
    state: SharedState,
    caller: Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    complete(state, caller, body, Flavour::Chat).await
}

pub async fn completions(
    state: SharedState,
    caller: Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    complete(state, caller, body, Flavour::Text).await
}

async fn complete(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
    flavour: Flavour,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&body)?;
    let (prompt, messages) = match flavour {
        Flavour::Chat => {
            if req.messages.is_empty() {
                return Err(ApiError::invalid("messages", "at least one message"));
            }
            (None, req.messages)
        }
        Flavour::Text => (
            Some(
                req.prompt
                    .ok_or_else(|| ApiError::invalid("prompt", "is required"))?,
            ),
            Vec::new(),
        ),
    };
    let spec = JobSpec {
        kind: JobKind::Inference,
        inference: Some(InferenceSpec {
            model: req.model.clone(),
            prompt,
            messages,
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            stop: match req.stop {
                Some(Stop::One(s)) => vec![s],
                Some(Stop::Many(v)) => v,
                None => Vec::new(),
            },
        }),
        max_attempts: Some(1),
        ..Default::default()
    };
    let spec = spec.validated()?;
    // OpenAI clients expect an unknown model to be an error, not a wait.
    if !served_models(&state).await?.contains(&req.model) {
        return Err(ApiError::ModelNotFound(req.model));
    }
    let (job, _) = jobs::submit(&state, spec, &caller).await?;
    let id = format!("drover-{}", job.id);
    let created = Timestamp::now().as_micros() / 1_000_000;
    let (tx, rx) = mpsc::channel::<Followed>(256);
    tokio::spawn(follow_logs(state.clone(), job.id, None, tx));
    let job_header = [("x-drover-job", job.id.to_string())];
    if req.stream {
        let model = req.model.clone();
        let stream = futures::StreamExt::flat_map(ReceiverStream::new(rx), move |f| {
            let events: Vec<Event> = match f {
                Followed::Entries(batch) => batch
                    .iter()
                    .map(|e| {
                        chunk_event(
                            &id,
                            created,
                            &model,
                            flavour.choice(&e.text, None, true),
                            flavour,
                        )
                    })
                    .collect(),
                Followed::End(job) => {
                    let finish = finish_reason(&job);
                    let mut last = vec![chunk_event(
                        &id,
                        created,
                        &model,
                        flavour.choice("", Some(&finish), true),
                        flavour,
                    )];
                    if job.state != JobState::Succeeded {
                        let error =
                            json!({"error": {"message": job.error.clone().unwrap_or_default()}});
                        last.push(Event::default().data(error.to_string()));
                    }
                    last.push(Event::default().data("[DONE]"));
                    last
                }
            };
            futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>))
        });
        return Ok((
            job_header,
            Sse::new(stream).keep_alive(KeepAlive::default()),
        )
            .into_response());
    }
    let mut rx = rx;
    let mut text = String::new();
    let mut finished = None;
    while let Some(f) = rx.recv().await {
        match f {
            Followed::Entries(batch) => batch.iter().for_each(|e| text.push_str(&e.text)),
            Followed::End(job) => {
                finished = Some(job);
                break;
            }
        }
    }
    let job =
        finished.ok_or_else(|| ApiError::Internal("the job's log stream ended early".into()))?;
    if job.state != JobState::Succeeded {
        return Err(ApiError::Conflict(format!(
            "inference job {} is {}: {}",
            job.id,
            job.state,
            job.error.clone().unwrap_or_default()
        )));
    }
    let result = job.result.clone().unwrap_or(Value::Null);
    let text = result["text"].as_str().map(str::to_string).unwrap_or(text);
    let prompt_tokens = result["prompt_tokens"].as_u64().unwrap_or(0);
    let completion_tokens = result["completion_tokens"].as_u64().unwrap_or(0);
    let body = json!({
        "id": id,
        "object": flavour.object(false),
        "created": created,
        "model": req.model,
        "choices": [flavour.choice(&text, Some(&finish_reason(&job)), false)],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    });
    Ok((job_header, Json(body)).into_response())
}

fn finish_reason(job: &drover_core::records::JobRecord) -> String {
    job.result
        .as_ref()
        .and_then(|r| r["finish_reason"].as_str())
        .unwrap_or("stop")
        .to_string()
}

fn chunk_event(id: &str, created: i64, model: &str, choice: Value, flavour: Flavour) -> Event {
    let chunk = json!({
        "id": id,
        "object": flavour.object(true),
        "created": created,
        "model": model,
        "choices": [choice],
    });
    Event::default().data(chunk.to_string())
}
