//! Nodes: join tokens, registration and credentials, states, provisioning, node
//! configuration.

use super::*;

#[async_trait]
impl WorkerStore for SqlStore {
    async fn create_join_token(&self, ttl: Duration) -> Result<JoinToken> {
        let token = format!("drover-join-{}", random_hex(20));
        let now = Timestamp::now();
        let expires_at = now.plus(ttl);
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, created_at, expires_at) VALUES ($1, $2, $3)",
        )
        .bind(sha256_hex(&token))
        .bind(now.0)
        .bind(expires_at.0)
        .execute(&self.writer)
        .await?;
        Ok(JoinToken { token, expires_at })
    }

    async fn register_worker(
        &self,
        token: &str,
        name: &str,
        capabilities: &Capabilities,
    ) -> Result<(WorkerRecord, String)> {
        let now = Timestamp::now();
        let hash = sha256_hex(token);
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "SELECT expires_at, used_at, worker_id FROM join_tokens WHERE token_hash = $1",
        )
        .bind(&hash)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::JoinTokenRefused("unknown token"))?;
        if row.try_get::<Option<i64>, _>("used_at")?.is_some() {
            return Err(StoreError::JoinTokenRefused(
                "this one-time token was already used",
            ));
        }
        if row.try_get::<i64, _>("expires_at")? < now.0 {
            return Err(StoreError::JoinTokenRefused("token expired"));
        }
        let provisioned: Option<WorkerId> = parse_opt(&row, "worker_id")?;
        let id = provisioned.unwrap_or_default();
        let secret = random_hex(32);
        // Conditional: of concurrent registrations with one token, whichever UPDATE comes
        // second finds it used (PostgreSQL re-checks the row after the first commits).
        let taken = sqlx::query(
            "UPDATE join_tokens SET used_at = $1, used_by = $2 \
             WHERE token_hash = $3 AND used_at IS NULL",
        )
        .bind(now.0)
        .bind(id.to_string())
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
        if taken.rows_affected() != 1 {
            return Err(StoreError::JoinTokenRefused(
                "this one-time token was already used",
            ));
        }
        let caps = serde_json::to_string(capabilities).map_err(corrupt)?;
        if provisioned.is_some() {
            // The record the provider made: it takes the node's name, capabilities and
            // credential, unless provisioning was given up meanwhile.
            let done = sqlx::query(
                "UPDATE workers SET name = $1, capabilities = $2, credential_hash = $3, \
                 last_seen_at = $4 WHERE id = $5 AND ended_at IS NULL",
            )
            .bind(name)
            .bind(&caps)
            .bind(sha256_hex(&secret))
            .bind(now.0)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::JoinTokenRefused(
                    "the provisioning of this worker was given up",
                ));
            }
        } else {
            sqlx::query(
                "INSERT INTO workers (id, name, state, capabilities, credential_hash, \
                 created_at, last_seen_at) VALUES ($1, $2, 'REGISTERING', $3, $4, $5, $6)",
            )
            .bind(id.to_string())
            .bind(name)
            .bind(&caps)
            .bind(sha256_hex(&secret))
            .bind(now.0)
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        }
        let kind = EventKind::WorkerRegistered {
            worker_id: id,
            name: name.to_string(),
        };
        insert_event(&mut tx, now, None, Some(id), &kind).await?;
        if provisioned.is_some() {
            let step = EventKind::ProvisioningStepCompleted {
                step: "worker_registered".into(),
                resource_id: None,
            };
            insert_event(&mut tx, now, None, Some(id), &step).await?;
        }
        tx.commit().await?;
        let worker = self.get_worker(id).await?;
        Ok((worker, format!("{id}.{secret}")))
    }

    async fn authenticate_worker(&self, credential: &str) -> Result<WorkerRecord> {
        let (id, secret) = credential
            .split_once('.')
            .ok_or(StoreError::NodeCredentialRefused)?;
        let id: WorkerId = id.parse().map_err(|_| StoreError::NodeCredentialRefused)?;
        let row = sqlx::query(&format!(
            "SELECT {WORKER_COLS}, credential_hash FROM workers WHERE id = $1 \
             AND ended_at IS NULL"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NodeCredentialRefused)?;
        let stored: String = row.try_get("credential_hash")?;
        if stored != sha256_hex(secret) {
            return Err(StoreError::NodeCredentialRefused);
        }
        worker_from_row(&row)
    }

    async fn set_worker_state(
        &self,
        id: WorkerId,
        state: WorkerState,
        capabilities: Option<&Capabilities>,
        session: &str,
    ) -> Result<()> {
        let now = Timestamp::now();
        let caps = capabilities
            .map(serde_json::to_string)
            .transpose()
            .map_err(corrupt)?;
        let mut tx = self.writer.begin().await?;
        // READY takes the node for this session; any other state applies only while the
        // session is still the node's (an older stream ending on another replica must not
        // mark a reconnected node lost).
        let done = sqlx::query(
            "UPDATE workers SET state = $1, capabilities = COALESCE($2, capabilities), \
             last_seen_at = $3, session = $4 WHERE id = $5 AND ($6 OR session = $4) \
             AND ended_at IS NULL",
        )
        .bind(state.as_str())
        .bind(caps)
        .bind(now.0)
        .bind(session)
        .bind(id.to_string())
        .bind(state == WorkerState::Ready)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(());
        }
        let kind = match state {
            WorkerState::Ready => Some(EventKind::WorkerConnected { worker_id: id }),
            WorkerState::Lost => Some(EventKind::WorkerLost {
                worker_id: id,
                reason: "stream ended".into(),
            }),
            _ => None,
        };
        if let Some(kind) = kind {
            insert_event(&mut tx, now, None, Some(id), &kind).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_worker(&self, id: WorkerId) -> Result<WorkerRecord> {
        let row = sqlx::query(&format!("SELECT {WORKER_COLS} FROM workers WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "worker",
                id: id.to_string(),
            })?;
        worker_from_row(&row)
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(&format!("SELECT {WORKER_COLS} FROM workers ORDER BY id"))
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(worker_from_row).collect()
    }

    async fn worker_events(&self, id: WorkerId) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT seq, at, job_id, worker_id, data FROM events WHERE worker_id = $1 \
             ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?;
        events_from_rows(&rows)
    }

    async fn cluster_id(&self) -> Result<String> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ('cluster_id', $1) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(random_hex(8))
        .execute(&self.writer)
        .await?;
        let row = sqlx::query("SELECT value FROM settings WHERE name = 'cluster_id'")
            .fetch_one(&self.writer)
            .await?;
        Ok(row.try_get("value")?)
    }

    async fn begin_provisioning(
        &self,
        provider: &str,
        name: &str,
        register_by: Timestamp,
    ) -> Result<(WorkerRecord, JoinToken)> {
        let now = Timestamp::now();
        let id = WorkerId::new();
        let token = format!("drover-join-{}", random_hex(20));
        let mut tx = self.writer.begin().await?;
        // No credential until it registers: an empty hash matches no secret.
        sqlx::query(
            "INSERT INTO workers (id, name, state, capabilities, credential_hash, created_at, \
             last_seen_at, provider) VALUES ($1, $2, 'REGISTERING', '{}', '', $3, $3, $4)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(now.0)
        .bind(provider)
        .execute(&mut *tx)
        .await?;
        let started = EventKind::ProvisioningStarted {
            provider: provider.to_string(),
        };
        insert_event(&mut tx, now, None, Some(id), &started).await?;
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, created_at, expires_at, worker_id) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(sha256_hex(&token))
        .bind(now.0)
        .bind(register_by.0)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        let minted = EventKind::ProvisioningStepCompleted {
            step: "token_minted".into(),
            resource_id: None,
        };
        insert_event(&mut tx, now, None, Some(id), &minted).await?;
        tx.commit().await?;
        let worker = self.get_worker(id).await?;
        Ok((
            worker,
            JoinToken {
                token,
                expires_at: register_by,
            },
        ))
    }

    async fn set_worker_resource(&self, id: WorkerId, resource_id: &str) -> Result<()> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("UPDATE workers SET resource_id = $1 WHERE id = $2")
            .bind(resource_id)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "worker",
                id: id.to_string(),
            });
        }
        let step = EventKind::ProvisioningStepCompleted {
            step: "resource_created".into(),
            resource_id: Some(resource_id.to_string()),
        };
        insert_event(&mut tx, now, None, Some(id), &step).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_worker_event(&self, id: Option<WorkerId>, kind: &EventKind) -> Result<()> {
        let mut conn = self.writer.acquire().await?;
        insert_event(&mut conn, Timestamp::now(), None, id, kind).await
    }

    async fn end_worker(
        &self,
        id: WorkerId,
        state: WorkerState,
        event: &EventKind,
    ) -> Result<bool> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query(
            "UPDATE workers SET state = $1, ended_at = $2, session = NULL \
             WHERE id = $3 AND ended_at IS NULL",
        )
        .bind(state.as_str())
        .bind(now.0)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        // A token not yet used must not register a worker that was given up.
        sqlx::query("DELETE FROM join_tokens WHERE worker_id = $1 AND used_at IS NULL")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        insert_event(&mut tx, now, None, Some(id), event).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn provided_workers(&self, provider: &str) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {WORKER_COLS} FROM workers WHERE provider = $1 AND ended_at IS NULL \
             ORDER BY id"
        ))
        .bind(provider)
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(worker_from_row).collect()
    }

    async fn put_node_config(
        &self,
        node: Option<WorkerId>,
        labels: &std::collections::BTreeMap<String, String>,
        config: &NodeConfig,
    ) -> Result<NodeConfigRecord> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO node_configs (node_id, labels, config, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(node.map(|n| n.to_string()))
        .bind(serde_json::to_string(labels).map_err(corrupt)?)
        .bind(serde_json::to_string(config).map_err(corrupt)?)
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM node_configs")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(NodeConfigRecord {
            version: version as u64,
            node,
            labels: labels.clone(),
            config: config.clone(),
            created_at: now,
        })
    }

    async fn list_node_configs(&self) -> Result<Vec<NodeConfigRecord>> {
        let rows = sqlx::query(
            "SELECT version, node_id, labels, config, created_at FROM node_configs \
             ORDER BY version",
        )
        .fetch_all(&self.writer)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(NodeConfigRecord {
                    version: row.try_get::<i64, _>("version")? as u64,
                    node: parse_opt(row, "node_id")?,
                    labels: json_column(row, "labels")?,
                    config: json_column(row, "config")?,
                    created_at: ts(row, "created_at")?,
                })
            })
            .collect()
    }

    async fn ack_node_config(
        &self,
        worker_id: WorkerId,
        ack: &ConfigAckRecord,
        capabilities: Option<&Capabilities>,
    ) -> Result<()> {
        let now = Timestamp::now();
        let applied = ack.status == "applied";
        let caps = capabilities
            .map(serde_json::to_string)
            .transpose()
            .map_err(corrupt)?;
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE workers SET config_version = $1, config_status = $2, config_error = $3, \
             config_applied_at = $4, \
             applied_version = CASE WHEN $5 THEN $1 ELSE applied_version END, \
             capabilities = COALESCE($6, capabilities) WHERE id = $7",
        )
        .bind(ack.config_version as i64)
        .bind(&ack.status)
        .bind(&ack.error)
        .bind(ack.applied_at.0)
        .bind(applied)
        .bind(caps)
        .bind(worker_id.to_string())
        .execute(&mut *tx)
        .await?;
        let event = EventKind::WorkerConfigAcked {
            config_version: ack.config_version,
            status: ack.status.clone(),
            error: ack.error.clone(),
        };
        insert_event(&mut tx, now, None, Some(worker_id), &event).await?;
        tx.commit().await?;
        Ok(())
    }
}
