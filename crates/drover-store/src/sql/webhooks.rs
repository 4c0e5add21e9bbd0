//! Webhooks and the outbox: deliveries are written with the events they announce.

use super::*;

/// Webhooks as the outbox needs them: id and the events wanted (none = all).
pub(super) type Hooks = Vec<(String, Vec<String>)>;

pub(super) async fn load_hooks(conn: &mut AnyConnection) -> Result<Hooks> {
    let rows = sqlx::query("SELECT id, events FROM webhooks")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|hook| Ok((hook.try_get("id")?, json_column(hook, "events")?)))
        .collect()
}

/// Writes one outbox row per webhook that wants `event`, in the caller's transaction.
pub(super) async fn enqueue_webhooks(
    conn: &mut AnyConnection,
    event: &str,
    key: &str,
    payload: &serde_json::Value,
    now: Timestamp,
) -> Result<()> {
    let hooks = load_hooks(&mut *conn).await?;
    enqueue_for(conn, &hooks, event, key, payload, now).await
}

pub(super) async fn enqueue_for(
    conn: &mut AnyConnection,
    hooks: &Hooks,
    event: &str,
    key: &str,
    payload: &serde_json::Value,
    now: Timestamp,
) -> Result<()> {
    let wanted = hooks
        .iter()
        .filter(|(_, events)| events.is_empty() || events.iter().any(|e| e == event));
    let mut body = None;
    for (webhook_id, _) in wanted {
        if body.is_none() {
            body = Some(serde_json::to_string(payload).map_err(corrupt)?);
        }
        sqlx::query(
            "INSERT INTO webhook_deliveries (webhook_id, event, idempotency_key, payload, state, \
             next_attempt_at, created_at) VALUES ($1, $2, $3, $4, 'PENDING', $5, $6)",
        )
        .bind(webhook_id)
        .bind(event)
        .bind(key)
        .bind(&body)
        .bind(now.0)
        .bind(now.0)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[async_trait]
impl WebhookStore for SqlStore {
    async fn add_webhook(
        &self,
        url: &str,
        secret: &str,
        events: &[String],
    ) -> Result<WebhookRecord> {
        let id = WebhookId::new();
        let now = Timestamp::now();
        sqlx::query(
            "INSERT INTO webhooks (id, url, secret, events, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.to_string())
        .bind(url)
        .bind(secret)
        .bind(serde_json::to_string(events).map_err(corrupt)?)
        .bind(now.0)
        .execute(&self.writer)
        .await?;
        Ok(WebhookRecord {
            id,
            url: url.to_string(),
            events: events.to_vec(),
            created_at: now,
        })
    }

    async fn list_webhooks(&self) -> Result<Vec<WebhookRecord>> {
        let rows = sqlx::query("SELECT id, url, events, created_at FROM webhooks ORDER BY id")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(webhook_from_row).collect()
    }

    async fn due_deliveries(
        &self,
        now: Timestamp,
        per_webhook: u32,
        limit: u32,
    ) -> Result<Vec<(DeliveryRecord, String)>> {
        let rows = sqlx::query(&format!(
            "SELECT * FROM (SELECT {DELIVERY_COLS}, w.secret, ROW_NUMBER() OVER \
             (PARTITION BY d.webhook_id ORDER BY d.id) AS nth FROM webhook_deliveries d \
             JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.state = 'PENDING' AND d.next_attempt_at <= $1) due \
             WHERE nth <= $2 ORDER BY id LIMIT $3"
        ))
        .bind(now.0)
        .bind(i64::from(per_webhook))
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| Ok((delivery_from_row(row)?, row.try_get("secret")?)))
            .collect()
    }

    async fn record_delivery_attempt(
        &self,
        id: i64,
        status: Option<u16>,
        error: Option<&str>,
        delivered: bool,
        retry_at: Option<Timestamp>,
    ) -> Result<()> {
        let now = Timestamp::now();
        let state = match (delivered, retry_at) {
            (true, _) => DeliveryState::Delivered,
            (false, Some(_)) => DeliveryState::Pending,
            (false, None) => DeliveryState::Failed,
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, state = $1, last_status = $2, \
             last_error = $3, next_attempt_at = COALESCE($4, next_attempt_at), delivered_at = $5 \
             WHERE id = $6",
        )
        .bind(state.as_str())
        .bind(status.map(i64::from))
        .bind(error)
        .bind(retry_at.map(|t| t.0))
        .bind(delivered.then_some(now.0))
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn list_deliveries(&self, limit: u32) -> Result<Vec<DeliveryRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLS} FROM webhook_deliveries d \
             JOIN webhooks w ON w.id = d.webhook_id ORDER BY d.id DESC LIMIT $1"
        ))
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }
}
