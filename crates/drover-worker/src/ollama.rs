//! An Ollama-compatible API for the models this node holds (`drover worker --ollama-listen
//! 127.0.0.1:11434`): `GET /api/tags`, `POST /api/generate`, `POST /api/chat`, streaming
//! NDJSON by default as Ollama does. It runs on the node's loaded models directly, one
//! generation at a time per model (the model's lock), beside the node's inference jobs.

use crate::inference::Models;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_infer::{ChatMessage, GenerateParams};
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::SocketAddr;
use tokio::sync::mpsc;

/// Largest request body the inference APIs take.
pub const MAX_BODY: usize = 10 * 1024 * 1024;
/// Longest a request may take, streaming included.
pub const MAX_REQUEST: std::time::Duration = std::time::Duration::from_secs(120);

fn router(models: Models) -> Router {
    Router::new()
        .route("/api/tags", get(tags))
        .route("/api/generate", post(generate))
        .route("/api/chat", post(chat))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(announced_size))
        .with_state(models)
}

/// Refuses a body announced as too large before reading any of it.
async fn announced_size(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|n| n > MAX_BODY) {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "the body is over 10 MiB");
    }
    next.run(req).await
}

/// The same API on a Unix socket, for the node's own jobs (sandboxes have no network):
/// bodies over 10 MiB and requests over 120 s are refused.
pub async fn start_unix(
    path: &std::path::Path,
    models: Models,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    // Sandboxed jobs run as another user (see executor.rs) and must be able to connect; the
    // socket is reached only through the node's state directory or the sandbox's bind.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let app = router(models).layer(axum::middleware::from_fn(deadline));
    tracing::info!(socket = %path.display(), "inference socket for jobs");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the inference socket stopped");
        }
    }))
}

/// Ends a request (and its stream) that runs past [`MAX_REQUEST`].
async fn deadline(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = tokio::time::Instant::now();
    let response = match tokio::time::timeout(MAX_REQUEST, next.run(req)).await {
        Ok(r) => r,
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "the request took over 120 s"),
    };
    let (parts, body) = response.into_parts();
    let left = MAX_REQUEST.saturating_sub(started.elapsed());
    let stream = futures::StreamExt::take_until(body.into_data_stream(), tokio::time::sleep(left));
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Binds the address (a taken one stops the node at start) and serves in the background.
pub async fn start(
    addr: SocketAddr,
    models: Models,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let app = router(models);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "Ollama-compatible API listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the Ollama-compatible API stopped");
        }
    }))
}

async fn tags(State(models): State<Models>) -> Json<Value> {
    let list: Vec<Value> = models
        .names()
        .into_iter()
        .map(|n| json!({"name": n, "model": n, "details": {"format": "gguf", "family": "llama"}}))
        .collect();
    Json(json!({ "models": list }))
}

#[derive(Deserialize, Default)]
struct Options {
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    num_predict: Option<i64>,
    #[serde(default)]
    stop: Vec<String>,
}

#[derive(Deserialize)]
struct GenerateRequest {
    model: String,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    stream: Option<bool>,
    #[serde(default)]
    options: Options,
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    #[serde(default)]
    options: Options,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// The request body; clients of Ollama often send JSON without a content type.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

async fn generate(State(models): State<Models>, body: Bytes) -> Response {
    let req: GenerateRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let prompt = if req.raw {
        Prompt::Raw(req.prompt)
    } else {
        let mut messages = Vec::new();
        if let Some(system) = req.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system,
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: req.prompt,
        });
        Prompt::Chat(messages)
    };
    run(
        models,
        req.model,
        prompt,
        req.options,
        req.stream.unwrap_or(true),
        false,
    )
    .await
}

async fn chat(State(models): State<Models>, body: Bytes) -> Response {
    let req: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let prompt = Prompt::Chat(req.messages);
    run(
        models,
        req.model,
        prompt,
        req.options,
        req.stream.unwrap_or(true),
        true,
    )
    .await
}

enum Prompt {
    Raw(String),
    Chat(Vec<ChatMessage>),
}

/// One line of the answer: a piece (`done: false`) or the end with its figures.
fn line(model: &str, chat: bool, piece: &str, end: Option<&drover_infer::Generation>) -> Value {
    let mut v = json!({
        "model": model,
        "created_at": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        "done": end.is_some(),
    });
    if chat {
        v["message"] = json!({"role": "assistant", "content": piece});
    } else {
        v["response"] = json!(piece);
    }
    if let Some(g) = end {
        v["done_reason"] = json!(g.finish_reason);
        v["prompt_eval_count"] = json!(g.prompt_tokens);
        v["eval_count"] = json!(g.completion_tokens);
    }
    v
}

async fn run(
    models: Models,
    name: String,
    prompt: Prompt,
    options: Options,
    stream: bool,
    chat: bool,
) -> Response {
    let Some(model) = models.get(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("model {name:?} not found on this node"),
        );
    };
    let params = GenerateParams {
        max_tokens: options
            .num_predict
            .filter(|n| *n > 0)
            .map_or(256, |n| n.min(4096) as usize),
        temperature: options.temperature.unwrap_or(0.0),
        top_p: options.top_p,
        seed: options.seed.unwrap_or(299_792_458),
        stop: options.stop,
    };
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    let model_name = name.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let mut model = model.lock().unwrap_or_else(|p| p.into_inner());
        let text = match prompt {
            Prompt::Raw(p) => p,
            Prompt::Chat(messages) => model.chat_prompt(&messages)?,
        };
        let generation = model.generate(&text, &params, |piece| {
            // A client that went away stops the generation.
            !stream || tx.send(line(&model_name, chat, piece, None)).is_ok()
        })?;
        let _ = tx.send(line(&model_name, chat, "", Some(&generation)));
        Ok::<_, drover_infer::InferError>(generation)
    });
    if stream {
        let body = futures::StreamExt::map(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            |v| Ok::<_, std::convert::Infallible>(format!("{v}\n")),
        );
        return (
            [("content-type", "application/x-ndjson")],
            Body::from_stream(body),
        )
            .into_response();
    }
    drop(rx);
    match worker.await {
        Ok(Ok(generation)) => {
            let mut whole = line(&name, chat, &generation.text, Some(&generation));
            whole["done"] = json!(true);
            Json(whole).into_response()
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
