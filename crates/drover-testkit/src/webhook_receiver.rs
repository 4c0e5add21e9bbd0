//! A real HTTP endpoint that records the webhooks it receives.

use crate::DEADLINE;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

/// One request a [`WebhookReceiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// The status it answered.
    pub answered: u16,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    /// Requests still to refuse with 500 before answering 200.
    fail_next: Mutex<usize>,
    arrived: tokio::sync::Notify,
}

/// A real HTTP server standing for a user's webhook endpoint. It can refuse its first
/// deliveries to exercise retries.
pub struct WebhookReceiver {
    pub url: String,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start(fail_first: usize) -> Self {
        Self::start_on("127.0.0.1:0", fail_first).await
    }

    /// Listens on a given address (to come up where a server already sends).
    pub async fn start_on(addr: &str, fail_first: usize) -> Self {
        use axum::http::HeaderMap;
        let state = Arc::new(ReceiverState {
            fail_next: Mutex::new(fail_first),
            ..Default::default()
        });
        let shared = state.clone();
        let app =
            axum::Router::new().fallback(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = shared.clone();
                async move {
                    let answered = {
                        let mut fail = state.fail_next.lock().expect("receiver state");
                        if *fail > 0 {
                            *fail -= 1;
                            500
                        } else {
                            200
                        }
                    };
                    let headers = headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                        .collect();
                    state
                        .received
                        .lock()
                        .expect("receiver state")
                        .push(Received {
                            headers,
                            body: body.to_vec(),
                            answered,
                        });
                    state.arrived.notify_waiters();
                    axum::http::StatusCode::from_u16(answered).unwrap_or_default()
                }
            });
        let listener = TcpListener::bind(addr).await.expect("bind the receiver");
        let url = format!(
            "http://{}/hook",
            listener.local_addr().expect("receiver addr")
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state, task }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("receiver state").clone()
    }

    /// Waits until `pred` holds for what was received so far.
    pub async fn wait_until(
        &self,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let arrived = self.state.arrived.notified();
            let got = self.received();
            if pred(&got) {
                return got;
            }
            assert!(
                tokio::time::timeout_at(deadline, arrived).await.is_ok() || pred(&self.received()),
                "timed out waiting for webhooks: {what}; got {got:#?}"
            );
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
