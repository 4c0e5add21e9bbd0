//! Webhook delivery: reads due rows of the outbox (written with the state change they
//! report), POSTs each signed with HMAC-SHA256 of the body, and records every attempt.
//! At least once: a row stays PENDING until a 2xx answer is recorded, so a crash between
//! the POST and the record sends it again after the restart; receivers deduplicate by the
//! `Idempotency-Key` header (the run id).

use crate::AppState;
use drover_core::Timestamp;
use drover_core::WebhookId;
use drover_core::records::DeliveryRecord;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Due deliveries read per pass.
const BATCH: u32 = 256;
/// Deliveries in flight at once, in all.
const CONCURRENCY: usize = 64;
/// Deliveries in flight at once to one webhook: an endpoint that hangs holds this many
/// and no more, and the others' deliveries go on beside it.
const PER_WEBHOOK: usize = 4;
const IDLE_TICK: Duration = Duration::from_millis(500);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// `sha256=<hex>` of HMAC-SHA256(secret, body): the `X-Drover-Signature` header.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends due deliveries, each in a task of its own, at most [`PER_WEBHOOK`] to one
/// webhook and [`CONCURRENCY`] in all: a slow or hanging endpoint delays only its own.
pub async fn delivery_loop(state: Arc<AppState>) {
    let http = match reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; webhooks are off");
            return;
        }
    };
    // Deliveries in flight (by id) and how many each webhook has.
    let mut in_flight: HashSet<i64> = HashSet::new();
    let mut per_webhook: HashMap<WebhookId, usize> = HashMap::new();
    let mut sending: JoinSet<(i64, WebhookId)> = JoinSet::new();
    loop {
        // One replica delivers; the outbox rows wait for whichever holds the duty.
        let due = if state.hold_duty("webhook-delivery", IDLE_TICK * 3).await {
            match state
                .store
                .due_deliveries(Timestamp::now(), PER_WEBHOOK as u32, BATCH)
                .await
            {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the webhook outbox");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        for (delivery, secret) in due {
            let lane = per_webhook.entry(delivery.webhook_id).or_default();
            if in_flight.len() >= CONCURRENCY
                || *lane >= PER_WEBHOOK
                || !in_flight.insert(delivery.id)
            {
                continue;
            }
            *lane += 1;
            let (state, http) = (state.clone(), http.clone());
            sending.spawn(async move {
                let key = (delivery.id, delivery.webhook_id);
                deliver(&state, &http, delivery, &secret).await;
                key
            });
        }
        // Until one ends (its lane has room again), new work is written, or a tick.
        tokio::select! {
            Some(ended) = sending.join_next() => {
                if let Ok((id, webhook)) = ended {
                    in_flight.remove(&id);
                    if let Some(lane) = per_webhook.get_mut(&webhook) {
                        *lane = lane.saturating_sub(1);
                    }
                }
                // Drain what else ended meanwhile.
                while let Some(Ok((id, webhook))) = sending.try_join_next() {
                    in_flight.remove(&id);
                    if let Some(lane) = per_webhook.get_mut(&webhook) {
                        *lane = lane.saturating_sub(1);
                    }
                }
            }
            _ = tokio::time::timeout(IDLE_TICK, state.webhooks.notified()) => {}
        }
        per_webhook.retain(|_, n| *n > 0);
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
