//! The SQLite engine: one file in WAL mode. Writes go through a single connection so that
//! they never contend for SQLite's write lock inside the process; reads use a small pool
//! of read-only connections, which WAL lets run beside the writer.

use crate::{
    Assignment, Cancelled, EventRecord, Finished, JobRecord, JoinToken, LogIndex, ReadyJob, Result,
    RetrySettings, RunEnd, RunRecord, Store, StoreError, WorkerRecord,
};
use async_trait::async_trait;
use drover_core::{
    Capabilities, EventKind, JobEvent, JobId, JobSpec, JobState, RunId, RunState, Timestamp,
    WorkerId, WorkerState, retry,
};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

const JOB_COLS: &str = "id, name, spec, state, priority, attempts, max_attempts, exit_code, \
    error, not_before, current_run, created_at, updated_at, finished_at";
const RUN_COLS: &str = "id, job_id, attempt, retry_of, worker_id, state, exit_code, error, \
    assigned_at, started_at, finished_at, lease_expires_at";
const WORKER_COLS: &str = "id, name, state, capabilities, created_at, last_seen_at";

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Conflict(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        // NORMAL in WAL mode survives a crash of the process (what `kill -9` does); only
        // a power loss can take the last transactions.
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { writer, reader })
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn parse<T: FromStr>(row: &SqliteRow, col: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let text: String = row.try_get(col)?;
    text.parse::<T>()
        .map_err(|e| corrupt(format!("{col} {text:?}: {e}")))
}

fn parse_opt<T: FromStr>(row: &SqliteRow, col: &str) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| {
        t.parse::<T>()
            .map_err(|e| corrupt(format!("{col} {t:?}: {e}")))
    })
    .transpose()
}

fn ts(row: &SqliteRow, col: &str) -> Result<Timestamp> {
    Ok(Timestamp(row.try_get(col)?))
}

fn ts_opt(row: &SqliteRow, col: &str) -> Result<Option<Timestamp>> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(Timestamp))
}

fn job_from_row(row: &SqliteRow) -> Result<JobRecord> {
    let spec: String = row.try_get("spec")?;
    let spec: JobSpec = serde_json::from_str(&spec).map_err(corrupt)?;
    let state: JobState = parse(row, "state")?;
    Ok(JobRecord {
        id: parse(row, "id")?,
        name: row.try_get("name")?,
        state,
        status_code: state.status_code(),
        priority: row.try_get("priority")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
        exit_code: row.try_get("exit_code")?,
        error: row.try_get("error")?,
        not_before: ts(row, "not_before")?,
        current_run: parse_opt(row, "current_run")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
        finished_at: ts_opt(row, "finished_at")?,
        spec,
    })
}

fn run_from_row(row: &SqliteRow) -> Result<RunRecord> {
    Ok(RunRecord {
        id: parse(row, "id")?,
        job_id: parse(row, "job_id")?,
        attempt: row.try_get::<i64, _>("attempt")? as u32,
        retry_of: parse_opt(row, "retry_of")?,
        worker_id: parse(row, "worker_id")?,
        state: parse(row, "state")?,
        exit_code: row.try_get("exit_code")?,
        error: row.try_get("error")?,
        assigned_at: ts(row, "assigned_at")?,
        started_at: ts_opt(row, "started_at")?,
        finished_at: ts_opt(row, "finished_at")?,
        lease_expires_at: ts(row, "lease_expires_at")?,
    })
}

fn worker_from_row(row: &SqliteRow) -> Result<WorkerRecord> {
    let state: String = row.try_get("state")?;
    let caps: String = row.try_get("capabilities")?;
    Ok(WorkerRecord {
        id: parse(row, "id")?,
        name: row.try_get("name")?,
        state: WorkerState::parse(&state)
            .ok_or_else(|| corrupt(format!("worker state {state}")))?,
        capabilities: serde_json::from_str(&caps).map_err(corrupt)?,
        created_at: ts(row, "created_at")?,
        last_seen_at: ts(row, "last_seen_at")?,
    })
}

fn event_from_row(row: &SqliteRow) -> Result<EventRecord> {
    let data: String = row.try_get("data")?;
    Ok(EventRecord {
        seq: row.try_get("seq")?,
        at: ts(row, "at")?,
        job_id: parse_opt(row, "job_id")?,
        worker_id: parse_opt(row, "worker_id")?,
        kind: serde_json::from_str(&data).map_err(corrupt)?,
    })
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

async fn insert_event(
    conn: &mut SqliteConnection,
    at: Timestamp,
    job_id: Option<JobId>,
    worker_id: Option<WorkerId>,
    kind: &EventKind,
) -> Result<()> {
    let data = serde_json::to_string(kind).map_err(corrupt)?;
    sqlx::query("INSERT INTO events (at, job_id, worker_id, type, data) VALUES (?, ?, ?, ?, ?)")
        .bind(at.0)
        .bind(job_id.map(|j| j.to_string()))
        .bind(worker_id.map(|w| w.to_string()))
        .bind(kind.type_name())
        .bind(data)
        .execute(conn)
        .await?;
    Ok(())
}

async fn load_job(conn: &mut SqliteConnection, id: JobId) -> Result<JobRecord> {
    let row = sqlx::query(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?"))
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "job",
            id: id.to_string(),
        })?;
    job_from_row(&row)
}

async fn load_run(conn: &mut SqliteConnection, id: RunId) -> Result<RunRecord> {
    let row = sqlx::query(&format!("SELECT {RUN_COLS} FROM runs WHERE id = ?"))
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "run",
            id: id.to_string(),
        })?;
    run_from_row(&row)
}

async fn set_job_state(
    conn: &mut SqliteConnection,
    job: &JobRecord,
    to: JobState,
    now: Timestamp,
) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET state = ?, updated_at = ?, finished_at = ? WHERE id = ? AND state = ?",
    )
    .bind(to.as_str())
    .bind(now.0)
    .bind(to.is_terminal().then_some(now.0))
    .bind(job.id.to_string())
    .bind(job.state.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves a job through `event`, writing the state and its event in the caller's transaction.
async fn transition(
    conn: &mut SqliteConnection,
    job: &JobRecord,
    event: JobEvent,
    run_id: Option<RunId>,
    kind: Option<EventKind>,
    now: Timestamp,
) -> Result<JobState> {
    let to = job.state.apply(event)?;
    set_job_state(&mut *conn, job, to, now).await?;
    let kind =
        kind.unwrap_or_else(|| EventKind::for_transition(job.state, event, to, run_id, None, None));
    insert_event(conn, now, Some(job.id), None, &kind).await?;
    Ok(to)
}

/// Checks that the run exists and is the worker's.
async fn own_run(
    conn: &mut SqliteConnection,
    run_id: RunId,
    worker: WorkerId,
) -> Result<RunRecord> {
    let run = load_run(conn, run_id).await?;
    if run.worker_id != worker {
        return Err(StoreError::NotYourRun { run_id });
    }
    Ok(run)
}

fn live_run_conflict(run: &RunRecord) -> StoreError {
    StoreError::Conflict(format!("run {} is already {}", run.id, run.state))
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_job(&self, spec: JobSpec) -> Result<JobRecord> {
        let id = JobId::new();
        let now = Timestamp::now();
        let spec_json = serde_json::to_string(&spec).map_err(corrupt)?;
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO jobs (id, name, spec, state, priority, max_attempts, not_before, \
             created_at, updated_at) VALUES (?, ?, ?, 'QUEUED', ?, ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(&spec.name)
        .bind(spec_json)
        .bind(spec.priority)
        .bind(spec.max_attempts() as i64)
        .bind(now.0)
        .bind(now.0)
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        let kind = EventKind::JobCreated {
            name: spec.name.clone(),
        };
        insert_event(&mut tx, now, Some(id), None, &kind).await?;
        let job = load_job(&mut tx, id).await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn get_job(&self, id: JobId) -> Result<JobRecord> {
        let mut conn = self.reader.acquire().await?;
        load_job(&mut conn, id).await
    }

    async fn list_jobs(&self, state: Option<JobState>, limit: u32) -> Result<Vec<JobRecord>> {
        let rows = match state {
            Some(s) => {
                sqlx::query(&format!(
                    "SELECT {JOB_COLS} FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?"
                ))
                .bind(s.as_str())
                .bind(limit as i64)
                .fetch_all(&self.reader)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {JOB_COLS} FROM jobs ORDER BY id DESC LIMIT ?"
                ))
                .bind(limit as i64)
                .fetch_all(&self.reader)
                .await?
            }
        };
        rows.iter().map(job_from_row).collect()
    }

    async fn job_runs(&self, id: JobId) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE job_id = ? ORDER BY attempt"
        ))
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn job_events(&self, id: JobId) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT seq, at, job_id, worker_id, data FROM events WHERE job_id = ? ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn get_run(&self, id: RunId) -> Result<RunRecord> {
        let mut conn = self.reader.acquire().await?;
        load_run(&mut conn, id).await
    }

    async fn cancel_job(&self, id: JobId, reason: &str) -> Result<Cancelled> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let job = load_job(&mut tx, id).await?;
        if job.state.is_terminal() {
            return Err(StoreError::Conflict(format!(
                "job {id} is already {}; only a queued, assigned or running job can be cancelled",
                job.state
            )));
        }
        let mut run = None;
        if let Some(run_id) = job.current_run {
            let live = load_run(&mut tx, run_id).await?;
            if !live.state.is_terminal() {
                sqlx::query(
                    "UPDATE runs SET state = 'CANCELLED', error = ?, finished_at = ? WHERE id = ?",
                )
                .bind(reason)
                .bind(now.0)
                .bind(run_id.to_string())
                .execute(&mut *tx)
                .await?;
                run = Some(load_run(&mut tx, run_id).await?);
            }
        }
        let kind = EventKind::JobCancelled {
            from: job.state,
            reason: reason.to_string(),
        };
        transition(&mut tx, &job, JobEvent::Cancel, None, Some(kind), now).await?;
        sqlx::query("UPDATE jobs SET error = ? WHERE id = ?")
            .bind(reason)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let job = load_job(&mut tx, id).await?;
        tx.commit().await?;
        Ok(Cancelled { job, run })
    }

    async fn ready_jobs(&self, now: Timestamp, limit: u32) -> Result<Vec<ReadyJob>> {
        let rows = sqlx::query(
            "SELECT id, priority, spec FROM jobs WHERE state = 'QUEUED' AND not_before <= ? \
             ORDER BY priority DESC, id LIMIT ?",
        )
        .bind(now.0)
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let spec: String = row.try_get("spec")?;
                let spec: JobSpec = serde_json::from_str(&spec).map_err(corrupt)?;
                Ok(ReadyJob {
                    id: parse(row, "id")?,
                    priority: row.try_get("priority")?,
                    labels: spec.labels,
                })
            })
            .collect()
    }

    async fn assign_job(
        &self,
        job_id: JobId,
        worker_id: WorkerId,
        lease_until: Timestamp,
    ) -> Result<Option<Assignment>> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let job = load_job(&mut tx, job_id).await?;
        if job.state != JobState::Queued {
            return Ok(None);
        }
        let run_id = RunId::new();
        let attempt = job.attempts + 1;
        sqlx::query(
            "INSERT INTO runs (id, job_id, attempt, retry_of, worker_id, state, assigned_at, \
             lease_expires_at) VALUES (?, ?, ?, ?, ?, 'ASSIGNED', ?, ?)",
        )
        .bind(run_id.to_string())
        .bind(job_id.to_string())
        .bind(attempt as i64)
        .bind(job.current_run.map(|r| r.to_string()))
        .bind(worker_id.to_string())
        .bind(now.0)
        .bind(lease_until.0)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE jobs SET attempts = ?, current_run = ? WHERE id = ?")
            .bind(attempt as i64)
            .bind(run_id.to_string())
            .bind(job_id.to_string())
            .execute(&mut *tx)
            .await?;
        let kind = EventKind::JobAssigned {
            run_id,
            worker_id,
            attempt,
        };
        transition(
            &mut tx,
            &job,
            JobEvent::Assign,
            Some(run_id),
            Some(kind),
            now,
        )
        .await?;
        let run = load_run(&mut tx, run_id).await?;
        let job = load_job(&mut tx, job_id).await?;
        tx.commit().await?;
        Ok(Some(Assignment { run, job }))
    }

    async fn accept_run(&self, run_id: RunId, worker_id: WorkerId) -> Result<()> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let run = own_run(&mut tx, run_id, worker_id).await?;
        if run.state != RunState::Assigned {
            return Err(live_run_conflict(&run));
        }
        let job = load_job(&mut tx, run.job_id).await?;
        let kind = EventKind::JobAccepted { run_id, worker_id };
        transition(
            &mut tx,
            &job,
            JobEvent::Accept,
            Some(run_id),
            Some(kind),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn start_run(&self, run_id: RunId, worker_id: WorkerId) -> Result<()> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let run = own_run(&mut tx, run_id, worker_id).await?;
        if run.state != RunState::Assigned {
            return Err(live_run_conflict(&run));
        }
        let job = load_job(&mut tx, run.job_id).await?;
        sqlx::query("UPDATE runs SET state = 'RUNNING', started_at = ? WHERE id = ?")
            .bind(now.0)
            .bind(run_id.to_string())
            .execute(&mut *tx)
            .await?;
        transition(&mut tx, &job, JobEvent::Start, Some(run_id), None, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn finish_run(
        &self,
        run_id: RunId,
        worker_id: Option<WorkerId>,
        end: RunEnd,
        retry: RetrySettings,
    ) -> Result<Finished> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let run = match worker_id {
            Some(w) => own_run(&mut tx, run_id, w).await?,
            None => load_run(&mut tx, run_id).await?,
        };
        let mut job = load_job(&mut tx, run.job_id).await?;
        if run.state.is_terminal() {
            tx.commit().await?;
            return Ok(Finished {
                job,
                run,
                changed: false,
            });
        }
        sqlx::query(
            "UPDATE runs SET state = ?, exit_code = ?, error = ?, finished_at = ?, \
             started_at = COALESCE(started_at, ?) WHERE id = ?",
        )
        .bind(end.outcome.run_state().as_str())
        .bind(end.exit_code)
        .bind(&end.error)
        .bind(now.0)
        .bind(now.0)
        .bind(run_id.to_string())
        .execute(&mut *tx)
        .await?;
        // Only the job's current attempt moves the job; a stale run just ends.
        if job.current_run == Some(run_id) && !job.state.is_terminal() {
            // A result whose start was never recorded still passes through RUNNING, so
            // that the event history stays a walk of the transition table.
            if job.state == JobState::Assigned && end.outcome != drover_core::RunOutcome::Failed {
                transition(&mut tx, &job, JobEvent::Start, Some(run_id), None, now).await?;
                job = load_job(&mut tx, job.id).await?;
            }
            let retrying =
                end.outcome.is_retryable() && retry::should_retry(run.attempt, job.max_attempts);
            sqlx::query("UPDATE jobs SET exit_code = ?, error = ? WHERE id = ?")
                .bind(end.exit_code)
                .bind(&end.error)
                .bind(job.id.to_string())
                .execute(&mut *tx)
                .await?;
            if retrying {
                let base = job
                    .spec
                    .backoff_base_ms
                    .map(Duration::from_millis)
                    .unwrap_or(retry.default_backoff_base);
                let not_before = now.plus(retry::backoff_delay(base, run.attempt, retry.jitter));
                sqlx::query("UPDATE jobs SET not_before = ? WHERE id = ?")
                    .bind(not_before.0)
                    .bind(job.id.to_string())
                    .execute(&mut *tx)
                    .await?;
                let kind = EventKind::JobRetryScheduled {
                    run_id,
                    next_attempt: run.attempt + 1,
                    not_before,
                    error: end.error.clone(),
                };
                transition(
                    &mut tx,
                    &job,
                    JobEvent::Retry,
                    Some(run_id),
                    Some(kind),
                    now,
                )
                .await?;
            } else {
                let event = end.outcome.final_event();
                let to = job.state.apply(event)?;
                let kind = EventKind::for_transition(
                    job.state,
                    event,
                    to,
                    Some(run_id),
                    end.exit_code,
                    end.error.clone(),
                );
                transition(&mut tx, &job, event, Some(run_id), Some(kind), now).await?;
            }
        }
        let job = load_job(&mut tx, run.job_id).await?;
        let run = load_run(&mut tx, run_id).await?;
        tx.commit().await?;
        Ok(Finished {
            job,
            run,
            changed: true,
        })
    }

    async fn renew_leases(&self, worker_id: WorkerId, until: Timestamp) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE runs SET lease_expires_at = ? WHERE worker_id = ? \
             AND state IN ('ASSIGNED', 'RUNNING')",
        )
        .bind(until.0)
        .bind(worker_id.to_string())
        .execute(&self.writer)
        .await?;
        sqlx::query("UPDATE workers SET last_seen_at = ? WHERE id = ?")
            .bind(Timestamp::now().0)
            .bind(worker_id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn renew_all_leases(&self, until: Timestamp) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE runs SET lease_expires_at = MAX(lease_expires_at, ?) \
             WHERE state IN ('ASSIGNED', 'RUNNING')",
        )
        .bind(until.0)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn expired_runs(&self, now: Timestamp) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE state IN ('ASSIGNED', 'RUNNING') \
             AND lease_expires_at < ? ORDER BY id"
        ))
        .bind(now.0)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn live_runs_of(&self, worker_id: WorkerId) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE worker_id = ? \
             AND state IN ('ASSIGNED', 'RUNNING') ORDER BY id"
        ))
        .bind(worker_id.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn create_join_token(&self, ttl: Duration) -> Result<JoinToken> {
        let token = format!("drover-join-{}", random_hex(20));
        let now = Timestamp::now();
        let expires_at = now.plus(ttl);
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, created_at, expires_at) VALUES (?, ?, ?)",
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
        let row = sqlx::query("SELECT expires_at, used_at FROM join_tokens WHERE token_hash = ?")
            .bind(&hash)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::TokenRefused("unknown token"))?;
        if row.try_get::<Option<i64>, _>("used_at")?.is_some() {
            return Err(StoreError::TokenRefused(
                "this one-time token was already used",
            ));
        }
        if row.try_get::<i64, _>("expires_at")? < now.0 {
            return Err(StoreError::TokenRefused("token expired"));
        }
        let id = WorkerId::new();
        let secret = random_hex(32);
        sqlx::query("UPDATE join_tokens SET used_at = ?, used_by = ? WHERE token_hash = ?")
            .bind(now.0)
            .bind(id.to_string())
            .bind(&hash)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO workers (id, name, state, capabilities, credential_hash, created_at, \
             last_seen_at) VALUES (?, ?, 'REGISTERING', ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(serde_json::to_string(capabilities).map_err(corrupt)?)
        .bind(sha256_hex(&secret))
        .bind(now.0)
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        let kind = EventKind::WorkerRegistered {
            worker_id: id,
            name: name.to_string(),
        };
        insert_event(&mut tx, now, None, Some(id), &kind).await?;
        tx.commit().await?;
        let worker = self.get_worker(id).await?;
        Ok((worker, format!("{id}.{secret}")))
    }

    async fn authenticate_worker(&self, credential: &str) -> Result<WorkerRecord> {
        let (id, secret) = credential
            .split_once('.')
            .ok_or(StoreError::Unauthenticated)?;
        let id: WorkerId = id.parse().map_err(|_| StoreError::Unauthenticated)?;
        let row = sqlx::query(&format!(
            "SELECT {WORKER_COLS}, credential_hash FROM workers WHERE id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::Unauthenticated)?;
        let stored: String = row.try_get("credential_hash")?;
        if stored != sha256_hex(secret) {
            return Err(StoreError::Unauthenticated);
        }
        worker_from_row(&row)
    }

    async fn set_worker_state(
        &self,
        id: WorkerId,
        state: WorkerState,
        capabilities: Option<&Capabilities>,
    ) -> Result<()> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let caps = capabilities
            .map(serde_json::to_string)
            .transpose()
            .map_err(corrupt)?;
        let previous: Option<String> = sqlx::query_scalar("SELECT state FROM workers WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let previous = previous.ok_or_else(|| StoreError::NotFound {
            kind: "worker",
            id: id.to_string(),
        })?;
        sqlx::query(
            "UPDATE workers SET state = ?, capabilities = COALESCE(?, capabilities), \
             last_seen_at = ? WHERE id = ?",
        )
        .bind(state.as_str())
        .bind(caps)
        .bind(now.0)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        let kind = match state {
            WorkerState::Ready => Some(EventKind::WorkerConnected { worker_id: id }),
            WorkerState::Lost if previous != state.as_str() => Some(EventKind::WorkerLost {
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
        let row = sqlx::query(&format!("SELECT {WORKER_COLS} FROM workers WHERE id = ?"))
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

    async fn log_index(&self, run_id: RunId) -> Result<Option<LogIndex>> {
        let row = sqlx::query(
            "SELECT run_id, uri, size_bytes, entry_count, last_seq, gaps FROM log_files \
             WHERE run_id = ?",
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
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET \
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
