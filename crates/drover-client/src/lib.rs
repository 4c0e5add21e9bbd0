//! A typed client of drover's HTTP API, used by the CLI, the tests and anyone scripting
//! drover from Rust.

use drover_core::JobSpec;
use drover_core::records::{
    ApiTokenRecord, AuditRecord, BatchResult, BatchSubmitted, CompactLogBatch, DeliveryRecord,
    ErrorBody, EventRecord, GroupView, IssuedTokens, JobRecord, JobView, JoinToken, LogEntryView,
    NodeView, ReservationRecord, UserRecord, WebhookRecord,
};
use futures::{Stream, StreamExt};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use std::time::Duration;

pub use drover_core::records;

/// The address `drover up` and `drover server` listen on unless told otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7700";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the request; `field` names the input at fault when there is one.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        field: Option<String>,
        message: String,
    },
    #[error(
        "cannot reach drover at {server}: {message} (is `drover up` running? set --server or DROVER_SERVER)"
    )]
    Unreachable { server: String, message: String },
    #[error("bad server address {0:?}")]
    BadServer(String),
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    /// Sent as `Authorization: Bearer …` with every request.
    token: Option<String>,
}

/// What a live log follower receives.
#[derive(Debug, Clone, PartialEq)]
pub enum FollowEvent {
    Entry(LogEntryView),
    /// The job is final; nothing more will come.
    End(Box<JobRecord>),
}

impl Client {
    pub fn new(server: &str) -> Result<Self> {
        Self::with_ca(server, None)
    }

    /// A client that trusts the certificate authority in `ca_pem` (PEM) for `https://`
    /// servers, besides the usual roots.
    pub fn with_ca(server: &str, ca_pem: Option<&[u8]>) -> Result<Self> {
        let base = Url::parse(server).map_err(|_| ClientError::BadServer(server.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::BadServer(server.to_string()));
        }
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(pem) = ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| ClientError::BadServer(format!("the CA certificate: {e}")))?;
            builder = builder.add_root_certificate(ca);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Self {
            http,
            base,
            token: None,
        })
    }

    /// The same client, speaking for the user of `token` (an access or API token).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn server(&self) -> &str {
        self.base.as_str()
    }

    /// `segments` are percent-encoded, so an id typed by a user cannot change the path.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            path.extend(segments);
        }
        url
    }

    fn unreachable(&self, e: reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            server: self.base.to_string(),
            message: e.to_string(),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => ClientError::Api {
                status: status.as_u16(),
                code: body.error.code,
                field: body.error.field,
                message: body.error.message,
            },
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                code: status.canonical_reason().unwrap_or("error").to_lowercase(),
                field: None,
                message: format!("{status}: {}", text.trim()),
            },
        })
    }

    async fn json<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T> {
        let response = self.send(request).await?;
        let bytes = response.bytes().await.map_err(|e| self.unreachable(e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn request(&self, method: Method, segments: &[&str]) -> reqwest::RequestBuilder {
        let request = self.http.request(method, self.url(segments));
        match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    /// Raw access to any route, for tools and tests that walk the API.
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut request = self.request(method, segments);
        if let Some(b) = body {
            request = request.json(&b);
        }
        let response = self.send(request).await?;
        let text = response.text().await.map_err(|e| self.unreachable(e))?;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<IssuedTokens> {
        let body = serde_json::json!({"username": username, "password": password});
        self.json(
            self.request(Method::POST, &["v1", "auth", "login"])
                .json(&body),
        )
        .await
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<IssuedTokens> {
        let body = serde_json::json!({"refresh_token": refresh_token});
        self.json(
            self.request(Method::POST, &["v1", "auth", "refresh"])
                .json(&body),
        )
        .await
    }

    /// Revokes the login the client's access token belongs to.
    pub async fn logout(&self) -> Result<()> {
        self.send(self.request(Method::POST, &["v1", "auth", "logout"]))
            .await
            .map(|_| ())
    }

    pub async fn whoami(&self) -> Result<UserRecord> {
        self.json(self.request(Method::GET, &["v1", "auth", "whoami"]))
            .await
    }

    /// A new API token: its record and, shown once, its secret (`token`).
    pub async fn create_api_token(
        &self,
        name: &str,
        expires_in: Duration,
    ) -> Result<serde_json::Value> {
        let body = serde_json::json!({"name": name, "expires_in_ms": (expires_in.as_millis() as u64).max(1)});
        self.json(self.request(Method::POST, &["v1", "tokens"]).json(&body))
            .await
    }

    pub async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRecord>> {
        self.json(self.request(Method::GET, &["v1", "tokens"]))
            .await
    }

    pub async fn revoke_api_token(&self, id: &str) -> Result<ApiTokenRecord> {
        self.json(self.request(Method::POST, &["v1", "tokens", id, "revoke"]))
            .await
    }

    pub async fn create_user(&self, name: &str, password: &str, role: &str) -> Result<UserRecord> {
        let body = serde_json::json!({"name": name, "password": password, "role": role});
        self.json(self.request(Method::POST, &["v1", "users"]).json(&body))
            .await
    }

    pub async fn list_users(&self) -> Result<Vec<UserRecord>> {
        self.json(self.request(Method::GET, &["v1", "users"])).await
    }

    pub async fn audit(&self, limit: u32) -> Result<Vec<AuditRecord>> {
        self.json(
            self.request(Method::GET, &["v1", "audit"])
                .query(&[("limit", limit)]),
        )
        .await
    }

    /// A new node configuration version for one node, or the nodes carrying `labels`.
    pub async fn put_node_config(
        &self,
        node: Option<&str>,
        labels: &std::collections::BTreeMap<String, String>,
        config: &drover_core::NodeConfig,
    ) -> Result<records::NodeConfigRecord> {
        let body = serde_json::json!({"node": node, "labels": labels, "config": config});
        self.json(
            self.request(Method::POST, &["v1", "node-configs"])
                .json(&body),
        )
        .await
    }

    pub async fn list_node_configs(&self) -> Result<Vec<records::NodeConfigRecord>> {
        self.json(self.request(Method::GET, &["v1", "node-configs"]))
            .await
    }

    pub async fn revoke_node(&self, id: &str) -> Result<NodeView> {
        self.json(self.request(Method::POST, &["v1", "nodes", id, "revoke"]))
            .await
    }

    pub async fn submit_job(&self, spec: &JobSpec) -> Result<JobRecord> {
        self.json(self.request(Method::POST, &["v1", "jobs"]).json(spec))
            .await
    }

    /// Submits up to 1,000 jobs in one request and one write; one result per job, in order.
    pub async fn submit_jobs(&self, specs: &[JobSpec]) -> Result<Vec<BatchResult>> {
        let body = serde_json::json!({ "jobs": specs });
        let answer: BatchSubmitted = self
            .json(
                self.request(Method::POST, &["v1", "jobs", "batch"])
                    .json(&body),
            )
            .await?;
        Ok(answer.results)
    }

    /// Sends a raw body as a job submission (for scripts that build JSON themselves).
    pub async fn submit_job_raw(&self, body: Vec<u8>) -> Result<JobRecord> {
        let request = self
            .request(Method::POST, &["v1", "jobs"])
            .header("content-type", "application/json")
            .body(body);
        self.json(request).await
    }

    pub async fn get_job(&self, id: &str) -> Result<JobView> {
        self.json(self.request(Method::GET, &["v1", "jobs", id]))
            .await
    }

    pub async fn list_jobs(&self, state: Option<&str>, limit: u32) -> Result<Vec<JobRecord>> {
        let mut request = self
            .request(Method::GET, &["v1", "jobs"])
            .query(&[("limit", limit.to_string())]);
        if let Some(state) = state {
            request = request.query(&[("state", state)]);
        }
        self.json(request).await
    }

    pub async fn job_events(&self, id: &str) -> Result<Vec<EventRecord>> {
        self.json(self.request(Method::GET, &["v1", "jobs", id, "events"]))
            .await
    }

    pub async fn job_logs(&self, id: &str, attempt: Option<u32>) -> Result<Vec<LogEntryView>> {
        let mut request = self.request(Method::GET, &["v1", "jobs", id, "logs"]);
        if let Some(a) = attempt {
            request = request.query(&[("attempt", a)]);
        }
        self.json(request).await
    }

    pub async fn cancel_job(&self, id: &str) -> Result<JobRecord> {
        self.json(self.request(Method::POST, &["v1", "jobs", id, "cancel"]))
            .await
    }

    /// Waits until the job is final. `on_wait` is called with the job each time the wait
    /// is renewed (for progress displays).
    pub async fn wait_job(&self, id: &str, mut on_wait: impl FnMut(&JobView)) -> Result<JobView> {
        loop {
            let request = self
                .request(Method::GET, &["v1", "jobs", id, "wait"])
                .query(&[("timeout_ms", 10_000)]);
            let view: JobView = self.json(request).await?;
            if view.job.state.is_terminal() {
                return Ok(view);
            }
            on_wait(&view);
        }
    }

    /// Follows the job's log live (server-sent events) until the job is final.
    pub async fn follow_logs(
        &self,
        id: &str,
        attempt: Option<u32>,
    ) -> Result<impl Stream<Item = Result<FollowEvent>> + use<>> {
        let mut request = self
            .request(Method::GET, &["v1", "jobs", id, "logs"])
            .query(&[("follow", "true"), ("format", "compact")]);
        if let Some(a) = attempt {
            request = request.query(&[("attempt", a)]);
        }
        let response = self.send(request).await?;
        // Entries come in batches (`compact`: one attempt's entries); each is handed on alone.
        let decoded = sse_events(response.bytes_stream()).map(|ev| {
            let (name, data) = ev?;
            let protocol = |e: serde_json::Error| ClientError::Protocol(e.to_string());
            Ok(match name.as_str() {
                "compact" => serde_json::from_str::<CompactLogBatch>(&data)
                    .map_err(protocol)?
                    .into_views()
                    .map(FollowEvent::Entry)
                    .collect(),
                "end" => vec![FollowEvent::End(Box::new(
                    serde_json::from_str(&data).map_err(protocol)?,
                ))],
                _ => Vec::new(),
            })
        });
        Ok(decoded.flat_map(|batch: Result<Vec<FollowEvent>>| {
            futures::stream::iter(match batch {
                Ok(events) => events.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })
        }))
    }

    /// Retries a finished attempt by hand.
    pub async fn retry_run(&self, run_id: &str) -> Result<JobRecord> {
        self.json(self.request(Method::POST, &["v1", "runs", run_id, "retry"]))
            .await
    }

    /// Submits jobs that run one after another, stopping at the first that fails for good.
    pub async fn create_group(&self, name: &str, jobs: &[JobSpec]) -> Result<GroupView> {
        let body = serde_json::json!({ "name": name, "jobs": jobs });
        self.json(self.request(Method::POST, &["v1", "groups"]).json(&body))
            .await
    }

    pub async fn get_group(&self, id: &str) -> Result<GroupView> {
        self.json(self.request(Method::GET, &["v1", "groups", id]))
            .await
    }

    pub async fn cancel_group(&self, id: &str) -> Result<GroupView> {
        self.json(self.request(Method::POST, &["v1", "groups", id, "cancel"]))
            .await
    }

    /// Reserves `amount` of `resource`. When it is busy, the reservation is PENDING until
    /// it frees (`wait`), or refused with 409 (`!wait`).
    pub async fn reserve(
        &self,
        resource: &str,
        amount: u32,
        node: Option<&str>,
        ttl: Duration,
        wait: bool,
    ) -> Result<ReservationRecord> {
        let body = drover_core::reservation::ReservationRequest {
            resource: resource.to_string(),
            amount: Some(amount),
            node: node.map(str::to_string),
            ttl_ms: Some((ttl.as_millis() as u64).max(1)),
            ttl_seconds: None,
            wait: Some(wait),
        };
        self.json(
            self.request(Method::POST, &["v1", "reservations"])
                .json(&body),
        )
        .await
    }

    pub async fn get_reservation(&self, id: &str) -> Result<ReservationRecord> {
        self.json(self.request(Method::GET, &["v1", "reservations", id]))
            .await
    }

    pub async fn release_reservation(&self, id: &str) -> Result<ReservationRecord> {
        self.json(self.request(Method::POST, &["v1", "reservations", id, "release"]))
            .await
    }

    /// Subscribes `url` to `events` (all when empty); returns the webhook and, when none was
    /// given, the secret the server generated.
    pub async fn add_webhook(
        &self,
        url: &str,
        events: &[String],
        secret: Option<&str>,
    ) -> Result<(WebhookRecord, Option<String>)> {
        let body = serde_json::json!({ "url": url, "events": events, "secret": secret });
        let v: serde_json::Value = self
            .json(self.request(Method::POST, &["v1", "webhooks"]).json(&body))
            .await?;
        // Sent back only when the server generated it.
        let secret = v["secret"].as_str().map(str::to_string);
        let hook = serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok((hook, secret))
    }

    pub async fn list_webhooks(&self) -> Result<Vec<WebhookRecord>> {
        self.json(self.request(Method::GET, &["v1", "webhooks"]))
            .await
    }

    pub async fn list_deliveries(&self, limit: u32) -> Result<Vec<DeliveryRecord>> {
        let request = self
            .request(Method::GET, &["v1", "webhooks", "deliveries"])
            .query(&[("limit", limit)]);
        self.json(request).await
    }

    pub async fn create_node_token(&self, ttl: Duration) -> Result<JoinToken> {
        let body = serde_json::json!({ "ttl_ms": (ttl.as_millis() as u64).max(1) });
        self.json(
            self.request(Method::POST, &["v1", "node-tokens"])
                .json(&body),
        )
        .await
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeView>> {
        self.json(self.request(Method::GET, &["v1", "nodes"])).await
    }

    pub async fn get_node(&self, id: &str) -> Result<NodeView> {
        self.json(self.request(Method::GET, &["v1", "nodes", id]))
            .await
    }

    pub async fn node_events(&self, id: &str) -> Result<Vec<EventRecord>> {
        self.json(self.request(Method::GET, &["v1", "nodes", id, "events"]))
            .await
    }

    /// The providers of the control plane and its cluster id (what their resources are
    /// labelled with).
    pub async fn providers(&self) -> Result<serde_json::Value> {
        self.json(self.request(Method::GET, &["v1", "providers"]))
            .await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String> {
        let response = self.send(self.request(Method::GET, &["metrics"])).await?;
        response.text().await.map_err(|e| self.unreachable(e))
    }

    /// True once the server answers `/readyz` with 200.
    /// True when the process answers at all (`/healthz`).
    pub async fn healthy(&self) -> bool {
        matches!(
            self.http.get(self.url(&["healthz"])).send().await,
            Ok(r) if r.status() == StatusCode::OK
        )
    }

    /// True when the control plane is ready to work (`/readyz`: its store answers, and a
    /// model is served when inference is required).
    pub async fn ready(&self) -> bool {
        matches!(
            self.http.get(self.url(&["readyz"])).send().await,
            Ok(r) if r.status() == StatusCode::OK
        )
    }
}

/// Splits a server-sent-event byte stream into (event name, data) pairs.
fn sse_events(
    bytes: impl Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
) -> impl Stream<Item = Result<(String, String)>> {
    futures::stream::unfold(
        (bytes, SseParser::default(), false),
        |(mut bytes, mut parser, done)| async move {
            loop {
                if let Some(event) = parser.next_event() {
                    return Some((Ok(event), (bytes, parser, done)));
                }
                if done {
                    return None;
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => parser.push(&chunk),
                    Some(Err(e)) => {
                        let err = ClientError::Protocol(format!("event stream broke: {e}"));
                        return Some((Err(err), (bytes, parser, true)));
                    }
                    None => return None,
                }
            }
        },
    )
}

/// Server-sent events, parsed a line at a time as bytes arrive: every byte is looked at
/// once, however the events are cut into chunks (a follower of a busy log receives events
/// of a few hundred kilobytes in many chunks).
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    /// Where the first line not parsed yet starts.
    pos: usize,
    name: Option<String>,
    data: Vec<u8>,
    has_data: bool,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) {
        // Parsed lines are dropped once they are most of the buffer, so that keeping the
        // rest costs a copy now and then, not one per event.
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    fn next_event(&mut self) -> Option<(String, String)> {
        while let Some(len) = memchr::memchr(b'\n', &self.buf[self.pos..]) {
            let line = &self.buf[self.pos..self.pos + len];
            self.pos += len + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                let name = self.name.take();
                if !std::mem::take(&mut self.has_data) {
                    continue;
                }
                let data = std::mem::take(&mut self.data);
                let data = String::from_utf8(data)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                return Some((name.unwrap_or_else(|| "message".into()), data));
            } else if let Some(v) = line.strip_prefix(b"event:") {
                self.name = Some(String::from_utf8_lossy(v).trim().to_string());
            } else if let Some(v) = line.strip_prefix(b"data:") {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data
                    .extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
                self.has_data = true;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::SseParser;

    fn parse_in_chunks(stream: &[u8], chunk: usize) -> Vec<(String, String)> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for piece in stream.chunks(chunk) {
            parser.push(piece);
            while let Some(event) = parser.next_event() {
                events.push(event);
            }
        }
        events
    }

    #[test]
    fn events_are_the_same_however_the_stream_is_cut() {
        let stream = b"event: entries\ndata: [1,2]\n\n:keep-alive\n\n\
                       event:end\r\ndata: {\"a\":1}\r\ndata: second\r\n\r\ndata: plain\n\n";
        let want = vec![
            ("entries".to_string(), "[1,2]".to_string()),
            ("end".to_string(), "{\"a\":1}\nsecond".to_string()),
            ("message".to_string(), "plain".to_string()),
        ];
        for chunk in 1..=stream.len() {
            assert_eq!(
                parse_in_chunks(stream, chunk),
                want,
                "chunks of {chunk} bytes"
            );
        }
    }

    #[test]
    fn an_event_without_its_blank_line_is_not_given_out() {
        assert!(parse_in_chunks(b"event: entries\ndata: [1]\n", 4).is_empty());
    }
}
