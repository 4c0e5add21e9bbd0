//! Webhook delivery: reads due rows of the outbox (written with the state change they
//! report), POSTs each signed with HMAC-SHA256 of the body, and records every attempt.
//! At least once: a row stays PENDING until a 2xx answer is recorded, so a crash between
//! the POST and the record sends it again after the restart; receivers deduplicate by the
//! `Idempotency-Key` header (the run id).

use crate::AppState;
use drover_core::Timestamp;
use drover_core::records::DeliveryRecord;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

const BATCH: u32 = 64;
const CONCURRENCY: usize = 8;
const IDLE_TICK: Duration = Duration::from_millis(500);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// `sha256=<hex>` of HMAC-SHA256(secret, body): the `X-Drover-Signature` header.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub async fn delivery_loop(state: Arc<AppState>) {
    let http = match reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; webhooks are off");
            return;
        }
    };
    loop {
        // One replica delivers; the outbox rows wait for whichever holds the duty.
        if !state.hold_duty("webhook-delivery", IDLE_TICK * 3).await {
            let _ = tokio::time::timeout(IDLE_TICK, state.webhooks.notified()).await;
            continue;
        }
        let due = match state.store.due_deliveries(Timestamp::now(), BATCH).await {
            Ok(due) => due,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the webhook outbox");
                Vec::new()
            }
        };
        if due.is_empty() {
            let _ = tokio::time::timeout(IDLE_TICK, state.webhooks.notified()).await;
            continue;
        }
        futures::stream::iter(due)
            .for_each_concurrent(CONCURRENCY, |(delivery, secret)| {
                let (state, http) = (state.clone(), http.clone());
                async move { deliver(&state, &http, delivery, &secret).await }
            })
            .await;
    }
}

async fn deliver(state: &AppState, http: &reqwest::Client, d: DeliveryRecord, secret: &str) {
    let body = serde_json::to_vec(&d.payload).unwrap_or_default();
    let result = http
        .post(&d.url)
        .header("content-type", "application/json")
        .header("x-drover-event", &d.event)
        .header("x-drover-delivery", d.id.to_string())
        .header("idempotency-key", &d.idempotency_key)
        .header("x-drover-signature", signature(secret, &body))
        .body(body)
        .send()
        .await;
    let (status, error) = match result {
        Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
        Ok(r) => (
            Some(r.status().as_u16()),
            Some(format!("answered {}", r.status())),
        ),
        Err(e) => (None, Some(e.to_string())),
    };
    let delivered = error.is_none();
    let attempt = d.attempts + 1;
    let retry_at = (!delivered && attempt < state.config.webhook_max_attempts).then(|| {
        let exp = attempt.saturating_sub(1).min(20);
        let delay = state
            .config
            .webhook_backoff_base
            .saturating_mul(1 << exp)
            .min(MAX_BACKOFF);
        Timestamp::now().plus(delay.mul_f64(0.75 + rand::random::<f64>() / 2.0))
    });
    metrics::counter!("drover_webhook_attempts_total", "delivered" => delivered.to_string())
        .increment(1);
    match &error {
        None => {
            tracing::info!(delivery = d.id, event = %d.event, url = %d.url, "webhook delivered")
        }
        Some(e) => {
            tracing::warn!(delivery = d.id, attempt, error = %e, url = %d.url, "webhook delivery failed")
        }
    }
    if let Err(e) = state
        .store
        .record_delivery_attempt(d.id, status, error.as_deref(), delivered, retry_at)
        .await
    {
        tracing::error!(error = %e, delivery = d.id, "cannot record a webhook attempt");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
