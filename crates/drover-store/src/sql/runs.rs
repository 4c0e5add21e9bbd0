//! Attempts: dispatch (the ready queue and assignments), reports, leases and log indexes.

use super::*;

#[async_trait]
impl RunStore for SqlStore {
    async fn ready_jobs(
        &self,
        now: Timestamp,
        after: Option<(i32, JobId)>,
        limit: u32,
    ) -> Result<Vec<ReadyJob>> {
        const READY: &str = "state = 'QUEUED' AND waiting_on = 0 AND not_before <= $1";
        // Without statistics SQLite's planner prefers `jobs_state` and then sorts every
        // queued job on each pass; the queue index is a range read that stops at the limit.
        let jobs = match self.engine {
            Engine::Sqlite => "jobs INDEXED BY jobs_queue",
            Engine::Postgres => "jobs",
        };
        let rows = match after {
            None => {
                sqlx::query(&format!(
                    "SELECT id, priority, spec FROM {jobs} WHERE {READY} \
                     ORDER BY priority DESC, id LIMIT $2"
                ))
                .bind(now.0)
                .bind(limit as i64)
                .fetch_all(&self.reader)
                .await?
            }
            // Keyset pages in queue order, from (priority, id) of the last job seen: the rest
            // of that priority, then the lower ones, each an index range (an OR of the two
            // would scan the whole queue).
            Some((priority, id)) => {
                sqlx::query(&format!(
                    "SELECT id, priority, spec FROM ( \
                       SELECT * FROM (SELECT id, priority, spec FROM {jobs} WHERE {READY} \
                         AND priority = $2 AND id > $3 ORDER BY id LIMIT $4) AS same \
                       UNION ALL \
                       SELECT * FROM (SELECT id, priority, spec FROM {jobs} WHERE {READY} \
                         AND priority < $2 ORDER BY priority DESC, id LIMIT $4) AS lower \
                     ) AS page ORDER BY priority DESC, id LIMIT $4"
                ))
                .bind(now.0)
                .bind(i64::from(priority))
                .bind(id.to_string())
                .bind(limit as i64)
                .fetch_all(&self.reader)
                .await?
            }
        };
        rows.iter()
            .map(|row| {
                let spec: JobSpec = json_column(row, "spec")?;
                Ok(ReadyJob {
                    id: parse(row, "id")?,
                    priority: row.try_get::<i64, _>("priority")? as i32,
                    labels: spec.labels,
                    resources: spec.resources,
                    reservation: spec.reservation,
                    isolation: spec.isolation,
                    provider: spec.provider,
                    model: spec.inference.map(|i| i.model),
                })
            })
            .collect()
    }

    async fn assign_jobs(
        &self,
        plan: &[(JobId, WorkerId)],
        lease_until: Timestamp,
    ) -> Result<Vec<Assignment>> {
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        if plan.len() >= self.read_ahead_from {
            // Read ahead ([`ReadAhead`]): each job is then assigned only if it is still
            // QUEUED on the run it was read with.
            let ids: Vec<JobId> = plan.iter().map(|(j, _)| *j).collect();
            let jobs = self.jobs_read_ahead(&ids).await?;
            match self.assign_in(plan, lease_until, Some(jobs)).await {
                Err(StoreError::ReadAheadStale) => {
                    metrics::counter!("drover_store_read_ahead_stale_total", "kind" => "assign")
                        .increment(1);
                    tracing::debug!("jobs moved after they were read ahead; assigning again");
                }
                made => return made,
            }
        }
        self.assign_in(plan, lease_until, None).await
    }

    async fn advance_runs(&self, batch: Vec<StepRequest>) -> Result<Vec<Result<JobId>>> {
        let mut tx = self.writer.begin().await?;
        let (answers, mut writes) =
            advance_in(&mut tx, batch, &mut Loaded::default(), Timestamp::now()).await?;
        writes.write(&mut tx).await?;
        tx.commit().await?;
        Ok(answers)
    }

    async fn finish_runs(
        &self,
        batch: Vec<FinishRequest>,
        retry: RetrySettings,
    ) -> Result<Vec<Result<Finished>>> {
        let mut tx = self.writer.begin().await?;
        let steps = StepWrites::new(Timestamp::now());
        let answers = finish_in(&mut tx, batch, retry, Loaded::default(), steps).await?;
        tx.commit().await?;
        Ok(answers)
    }

    async fn report_runs(
        &self,
        mut steps: Vec<StepRequest>,
        mut ends: Vec<FinishRequest>,
        retry: RetrySettings,
    ) -> Result<RunReportAnswers> {
        // A worker does not send a report twice: one that a deadlock rolled back (replicas
        // and lease renewals lock runs too) is written again here rather than lost, and so
        // is one whose rows moved after they were read ahead (SQLite). The batch is copied
        // only for a try that may fail so.
        let tries_allowed = match self.engine {
            Engine::Postgres => TRANSIENT_TRIES,
            Engine::Sqlite => 1,
        };
        let mut read_ahead = steps.len() + ends.len() >= self.read_ahead_from;
        let mut tries = 1;
        loop {
            let (these_steps, these_ends) = if read_ahead || tries < tries_allowed {
                (steps.clone(), ends.clone())
            } else {
                (std::mem::take(&mut steps), std::mem::take(&mut ends))
            };
            let loaded = if read_ahead {
                let ids: Vec<RunId> = (these_steps.iter().map(|s| s.run_id))
                    .chain(these_ends.iter().map(|e| e.run_id))
                    .collect();
                self.runs_read_ahead(&ids).await?
            } else {
                Loaded::default()
            };
            match self.report_in(loaded, these_steps, these_ends, retry).await {
                Err(StoreError::ReadAheadStale) if read_ahead => {
                    metrics::counter!("drover_store_read_ahead_stale_total", "kind" => "report")
                        .increment(1);
                    tracing::debug!("runs moved after they were read ahead; writing them again");
                    read_ahead = false;
                }
                Err(e) if is_transient(&e) && tries < tries_allowed => {
                    tracing::warn!(error = %e, tries, "run reports rolled back; writing them again");
                    tries += 1;
                }
                written => return written,
            }
        }
    }

    async fn renew_leases(&self, workers: &[WorkerId], until: Timestamp) -> Result<u64> {
        if workers.is_empty() {
            return Ok(0);
        }
        // One statement for every worker heard since the last round: heartbeats of a large
        // fleet cost one write per interval, not one per worker. The runs are locked in id
        // order, as every other writer of runs locks them (load_by_ids): in the order of a
        // scan, a renewal and a batch of run reports deadlocked on PostgreSQL.
        let list = placeholders(2, workers.len());
        let mut tx = self.writer.begin().await?;
        let sql = binds_for(
            &tx,
            format!(
                "UPDATE runs SET lease_expires_at = $1 WHERE id IN (SELECT id FROM runs \
                 WHERE worker_id IN ({list}) AND state IN ('ASSIGNED', 'RUNNING') \
                 ORDER BY id{})",
                for_update(&tx)
            ),
        );
        let mut runs = sqlx::query(&sql).bind(until.0);
        for w in workers {
            runs = runs.bind(w.to_string());
        }
        let done = runs.execute(&mut *tx).await?;
        let sql = binds_for(
            &tx,
            format!("UPDATE workers SET last_seen_at = $1 WHERE id IN ({list})"),
        );
        let mut seen = sqlx::query(&sql).bind(Timestamp::now().0);
        for w in workers {
            seen = seen.bind(w.to_string());
        }
        seen.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn renew_all_leases(&self, until: Timestamp) -> Result<u64> {
        // Locked in id order, like every writer of runs (see renew_leases).
        let lock = row_lock(self.engine);
        let done = sqlx::query(&format!(
            "UPDATE runs SET lease_expires_at = CASE WHEN lease_expires_at > $1 THEN lease_expires_at ELSE $1 END \
             WHERE id IN (SELECT id FROM runs WHERE state IN ('ASSIGNED', 'RUNNING') ORDER BY id{lock})",
        ))
        .bind(until.0)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn expired_runs(&self, now: Timestamp) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM runs WHERE state IN ('ASSIGNED', 'RUNNING') \
             AND lease_expires_at < $1 ORDER BY id",
            runs_json(self.engine)
        ))
        .bind(now.0)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn live_runs_of(&self, worker_id: WorkerId) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM runs WHERE worker_id = $1 \
             AND state IN ('ASSIGNED', 'RUNNING') ORDER BY id",
            runs_json(self.engine)
        ))
        .bind(worker_id.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn live_runs(&self) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM runs WHERE state IN ('ASSIGNED', 'RUNNING') ORDER BY id",
            runs_json(self.engine)
        ))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn log_index(&self, run_id: RunId) -> Result<Option<LogIndex>> {
        let row = sqlx::query(
            "SELECT run_id, uri, size_bytes, entry_count, last_seq, gaps FROM log_files \
             WHERE run_id = $1",
        )
        .bind(run_id.to_string())
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| {
            Ok(LogIndex {
                run_id: parse(&row, "run_id")?,
                uri: row.try_get("uri")?,
                size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
                entry_count: row.try_get::<i64, _>("entry_count")? as u64,
                last_seq: row.try_get::<i64, _>("last_seq")? as u64,
                gaps: row.try_get::<i64, _>("gaps")? as u64,
            })
        })
        .transpose()
    }

    async fn put_log_index(&self, index: &LogIndex) -> Result<()> {
        sqlx::query(
            "INSERT INTO log_files (run_id, uri, size_bytes, entry_count, last_seq, gaps) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (run_id) DO UPDATE SET \
             uri = excluded.uri, size_bytes = excluded.size_bytes, \
             entry_count = excluded.entry_count, last_seq = excluded.last_seq, \
             gaps = excluded.gaps",
        )
        .bind(index.run_id.to_string())
        .bind(&index.uri)
        .bind(index.size_bytes as i64)
        .bind(index.entry_count as i64)
        .bind(index.last_seq as i64)
        .bind(index.gaps as i64)
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}
