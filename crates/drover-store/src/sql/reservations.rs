//! Reservations: pending, active, released or expired.

use super::*;

#[async_trait]
impl ReservationStore for SqlStore {
    async fn create_reservation(
        &self,
        resource: &str,
        amount: u32,
        worker_id: WorkerId,
        ttl: Duration,
        owner: Option<&str>,
        state: ReservationState,
    ) -> Result<ReservationRecord> {
        let now = Timestamp::now();
        let id = ReservationId::new();
        sqlx::query(
            "INSERT INTO reservations (id, resource, amount, worker_id, state, created_at, \
             expires_at, owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id.to_string())
        .bind(resource)
        .bind(amount as i64)
        .bind(worker_id.to_string())
        .bind(state.as_str())
        .bind(now.0)
        .bind(now.plus(ttl).0)
        .bind(owner)
        .execute(&self.writer)
        .await?;
        self.get_reservation(id).await
    }

    async fn get_reservation(&self, id: ReservationId) -> Result<ReservationRecord> {
        let row = sqlx::query(&format!(
            "SELECT {RESERVATION_COLS} FROM reservations WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.writer)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "reservation",
            id: id.to_string(),
        })?;
        let mut reservation = reservation_from_row(&row)?;
        // Past its TTL it is expired, whether or not a dispatch pass has marked it so yet
        // (passes read reservations only when a queued job needs resources).
        if matches!(
            reservation.state,
            ReservationState::Active | ReservationState::Pending
        ) && reservation.expires_at <= Timestamp::now()
        {
            sqlx::query(
                "UPDATE reservations SET state = 'EXPIRED', ended_at = expires_at \
                 WHERE id = $1 AND state IN ('PENDING', 'ACTIVE')",
            )
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
            reservation.state = ReservationState::Expired;
            reservation.ended_at = Some(reservation.expires_at);
        }
        Ok(reservation)
    }

    async fn release_reservation(&self, id: ReservationId) -> Result<ReservationRecord> {
        let current = self.get_reservation(id).await?;
        if !matches!(
            current.state,
            ReservationState::Active | ReservationState::Pending
        ) {
            return Err(StoreError::Conflict(format!(
                "reservation {id} is already {}",
                current.state.as_str()
            )));
        }
        sqlx::query(
            "UPDATE reservations SET state = 'RELEASED', ended_at = $1 \
             WHERE id = $2 AND state IN ('PENDING', 'ACTIVE')",
        )
        .bind(Timestamp::now().0)
        .bind(id.to_string())
        .execute(&self.writer)
        .await?;
        self.get_reservation(id).await
    }

    async fn live_reservations(&self, now: Timestamp) -> Result<Vec<ReservationRecord>> {
        sqlx::query(
            "UPDATE reservations SET state = 'EXPIRED', ended_at = expires_at \
             WHERE state IN ('PENDING', 'ACTIVE') AND expires_at <= $1",
        )
        .bind(now.0)
        .execute(&self.writer)
        .await?;
        let rows = sqlx::query(&format!(
            "SELECT {RESERVATION_COLS} FROM reservations \
             WHERE state IN ('PENDING', 'ACTIVE') ORDER BY id"
        ))
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(reservation_from_row).collect()
    }

    async fn activate_reservation(&self, id: ReservationId, now: Timestamp) -> Result<bool> {
        // The TTL is how long it is held: it starts again when the hold begins.
        let done = sqlx::query(
            "UPDATE reservations SET state = 'ACTIVE', expires_at = $1 + (expires_at - created_at) \
             WHERE id = $2 AND state = 'PENDING' AND expires_at > $1",
        )
        .bind(now.0)
        .bind(id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
