//! What replicas share: duties held by one through a lease row, wake-ups through
//! LISTEN/NOTIFY on PostgreSQL.

use super::*;

/// The PostgreSQL channel replicas nudge each other on.
pub(super) const CHANNEL: &str = "drover";

#[async_trait]
impl ReplicaStore for SqlStore {
    async fn hold_duty(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let now = Timestamp::now();
        let done = sqlx::query(
            "INSERT INTO duties (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE duties.holder = excluded.holder OR duties.expires_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(now.plus(ttl).0)
        .bind(now.0)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn publish(&self, wakeup: &crate::Wakeup) -> Result<()> {
        if self.engine != Engine::Postgres {
            return Ok(());
        }
        let payload = serde_json::to_string(wakeup).map_err(corrupt)?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn listen(&self) -> Result<Option<tokio::sync::mpsc::Receiver<crate::Wakeup>>> {
        if self.engine != Engine::Postgres {
            return Ok(None);
        }
        let mut listener = sqlx::postgres::PgListener::connect(&self.url).await?;
        listener.listen(CHANNEL).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                // PgListener reconnects by itself; a notification lost meanwhile only
                // delays a wake-up.
                match listener.recv().await {
                    Ok(n) => {
                        if let Ok(w) = serde_json::from_str(n.payload())
                            && tx.send(w).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "replica notifications interrupted");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(Some(rx))
    }
}
