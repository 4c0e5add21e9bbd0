//! The SQL engine, one implementation for SQLite and PostgreSQL through sqlx's `Any`
//! driver: the same statements (`$1` placeholders, which both accept), the same
//! transactions. What differs is set up in [`SqlStore::open`]: SQLite is one file in WAL
//! mode written through a single connection (so writes never contend for its lock inside
//! the process) and read through a pool of read-only connections; PostgreSQL is one pool,
//! and rows that a transaction will change are locked (`FOR UPDATE`) when read, so that
//! replicas never overwrite each other's changes.

use crate::{
    ApiTokenRecord, Assignment, AuditRecord, Cancelled, ConfigAckRecord, DeliveryRecord,
    DeliveryState, EventRecord, FinishRequest, Finished, GroupRecord, GroupState, GroupView,
    IssuedTokens, JobRecord, JoinToken, LogIndex, NodeConfigRecord, ReadyJob, ReservationRecord,
    ReservationState, Result, RetrySettings, Role, RunRecord, RunReportAnswers, RunStep,
    StepRequest, Store, StoreError, Submission, UserRecord, WebhookRecord, WorkerRecord,
    webhook_events,
};
use async_trait::async_trait;
use drover_core::{
    Capabilities, EventKind, GroupId, JobEvent, JobId, JobSpec, JobState, NodeConfig,
    ReservationId, RunId, RunState, Timestamp, WebhookId, WorkerId, WorkerState, retry,
};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{AnyConnection, AnyPool, Executor, Row};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

pub struct SqlStore {
    writer: AnyPool,
    reader: AnyPool,
    engine: Engine,
    url: String,
    /// The smallest assignment or report batch read ahead ([`ReadAhead`]), on SQLite.
    read_ahead_from: usize,
    /// SQLite: copies the WAL into the database beside the writer, until dropped.
    _checkpoints: Option<Checkpoints>,
}

/// SQLite's WAL copied into the database file by a connection of its own, at most every
/// [`CHECKPOINT_EVERY`] and only after the writer was used (an idle control plane does
/// not wake for it): a checkpoint on the writer's commit (SQLite's default) holds the
/// one writer for the copy and two `fsync`s, tens of milliseconds in which no job moves.
/// A passive checkpoint beside it takes no lock a writer waits for. The writer still
/// checkpoints, rarely, when the WAL grows past [`WRITER_CHECKPOINT_PAGES`]: only a
/// checkpoint with no write beside it can leave the WAL wholly copied, for the next write
/// to start it over from its beginning.
struct Checkpoints {
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Checkpoints {
    /// `written` is told each time the writer connection goes back to its pool.
    async fn start(url: &str, written: Arc<tokio::sync::Notify>) -> sqlx::Result<Self> {
        use sqlx::Connection;
        let mut conn = AnyConnection::connect(url).await?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = written.notified() => {}
                }
                metrics::counter!("drover_store_checkpoints_total").increment(1);
                // Told once per run of failures, not four times a second.
                match conn.execute("PRAGMA wal_checkpoint(PASSIVE)").await {
                    Ok(_) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "WAL checkpoint failed; the writer checkpoints");
                    }
                    Err(_) => {}
                }
                // Writes meanwhile leave `written` told: the next checkpoint copies them.
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                }
            }
            let _ = conn.close().await;
        });
        Ok(Self { _stop: stop })
    }
}

/// Below this many jobs a batch reads inside its write transaction: a small batch means
/// the writer is not busy, and reading ahead is one more round trip on each job's way to
/// RUNNING (0.2–0.3 ms more submit → RUNNING, one job at a time). Under load batches
/// carry a hundred jobs and more.
const READ_AHEAD_FROM: usize = 16;

/// The least time between two checkpoints of [`Checkpoints`] (the WAL copied into the
/// database file).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL pages (4 KiB each: 128 MiB) past which the SQLite writer checkpoints itself on a
/// commit ([`Checkpoints`] says why it rarely has to, and why it still must).
const WRITER_CHECKPOINT_PAGES: u32 = 32_768;

/// The PostgreSQL channel replicas nudge each other on.
const CHANNEL: &str = "drover";

/// The columns of a job record, in the order [`JobJson`] reads them.
const JOB_COLUMNS: [&str; 19] = [
    "id",
    "name",
    "spec",
    "state",
    "priority",
    "attempts",
    "max_attempts",
    "exit_code",
    "error",
    "not_before",
    "current_run",
    "group_id",
    "group_position",
    "waiting_on",
    "created_at",
    "updated_at",
    "finished_at",
    "owner",
    "result",
];
const RESERVATION_COLS: &str =
    "id, resource, amount, worker_id, state, created_at, expires_at, ended_at, owner";
const DELIVERY_COLS: &str = "d.id, d.webhook_id, w.url, d.event, d.idempotency_key, d.payload, \
    d.state, d.attempts, d.next_attempt_at, d.last_status, d.last_error, d.created_at, \
    d.delivered_at";
/// The columns of a run record, in the order [`RunJson`] reads them.
const RUN_COLUMNS: [&str; 13] = [
    "id",
    "job_id",
    "attempt",
    "retry_of",
    "worker_id",
    "state",
    "exit_code",
    "error",
    "assigned_at",
    "started_at",
    "finished_at",
    "lease_expires_at",
    "result",
];
const WORKER_COLS: &str = "id, name, state, capabilities, created_at, last_seen_at, provider, \
    resource_id, config_version, config_status, config_error, config_applied_at, applied_version";

/// What `open` does about the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrations {
    /// Apply what is missing (the default for `drover server`).
    Apply,
    /// Refuse to start unless the schema is exactly this binary's.
    Check,
}

fn redact(url: &str) -> String {
    // postgres://user:password@host/db → postgres://user:***@host/db
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn sqlite_pragmas(conn: &mut AnyConnection, read_only: bool) -> sqlx::Result<()> {
    // NORMAL in WAL mode survives a crash of the process (what `kill -9` does); only a
    // power loss can take the last transactions.
    for pragma in [
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = NORMAL",
        "PRAGMA busy_timeout = 10000",
        "PRAGMA foreign_keys = ON",
    ] {
        conn.execute(pragma).await?;
    }
    if read_only {
        conn.execute("PRAGMA query_only = ON").await?;
    } else {
        // The writer walks the upper levels of every index on each write: 16 MiB keeps them
        // cached in a queue of a million jobs (the default 2 MiB re-reads them from the OS).
        conn.execute("PRAGMA cache_size = -16384").await?;
        // A statement that changes many rows keeps the pages it changed in a statement
        // journal, to undo itself alone; past 64 KiB SQLite spills that journal to a temp
        // file (a write per page), and a batch's UPDATE of hundreds of jobs goes past it.
        conn.execute("PRAGMA temp_store = MEMORY").await?;
        // The WAL is copied into the database beside the writer ([`Checkpoints`]); the
        // writer checkpoints only as a backstop, rarely.
        conn.execute(format!("PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES}").as_str())
            .await?;
    }
    Ok(())
}

/// Every drover query is an index lookup or an index range, and the planner must not
/// decide otherwise from statistics: a queue's tables change faster than autovacuum
/// analyzes them (a burst of submissions grows `jobs` tenfold in seconds), and from
/// statistics taken when a table was small it planned the id-list reads and updates of a
/// batch as sequential scans, testing every row against hundreds of ids. Only the cost of
/// a sequential scan changes: a table without a usable index is still scanned.
async fn postgres_settings(conn: &mut AnyConnection) -> sqlx::Result<()> {
    conn.execute("SET enable_seqscan = off").await?;
    Ok(())
}

/// Sets SQLite's allocator up, once per process and before its first connection.
///
/// Allocation statistics off: with them on, every allocation and free takes one
/// process-wide mutex, and the rows a writer thread reads are freed on the runtime's
/// threads: under load the two queue on that mutex (futex waits in both). drover never
/// reads the statistics.
///
/// Allocations through mimalloc rather than the C library's malloc: SQLite allocates and
/// frees for every statement and row, and glibc's malloc (its arena locks, consolidation)
/// was a fifth of the writer thread's time.
fn configure_sqlite_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use libsqlite3_sys::{
            SQLITE_CONFIG_MALLOC, SQLITE_CONFIG_MEMSTATUS, SQLITE_OK, sqlite3_config,
            sqlite3_mem_methods,
        };
        let methods = sqlite3_mem_methods {
            xMalloc: Some(sqlite_mimalloc::malloc),
            xFree: Some(sqlite_mimalloc::free),
            xRealloc: Some(sqlite_mimalloc::realloc),
            xSize: Some(sqlite_mimalloc::size),
            xRoundup: Some(sqlite_mimalloc::roundup),
            xInit: Some(sqlite_mimalloc::init),
            xShutdown: Some(sqlite_mimalloc::shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: sqlite3_config must run before sqlite3_initialize and while no other
        // thread uses SQLite; the Once runs it before this process opens any connection.
        // When SQLite was initialized already it answers SQLITE_MISUSE and changes nothing.
        // SQLite copies `methods` before returning; its functions live as long as the process.
        let (memstatus, malloc) = unsafe {
            (
                sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0 as std::os::raw::c_int),
                sqlite3_config(SQLITE_CONFIG_MALLOC, &raw const methods),
            )
        };
        if memstatus != SQLITE_OK || malloc != SQLITE_OK {
            tracing::debug!(memstatus, malloc, "SQLite keeps its default allocator");
        }
    });
}

/// SQLite's `sqlite3_mem_methods` over mimalloc (16-byte aligned: SQLite needs 8).
mod sqlite_mimalloc {
    use libmimalloc_sys::{mi_free, mi_good_size, mi_malloc, mi_realloc, mi_usable_size};
    use std::os::raw::{c_int, c_void};

    pub unsafe extern "C" fn malloc(n: c_int) -> *mut c_void {
        // SAFETY: any size is valid; SQLite never asks for a negative one.
        unsafe { mi_malloc(n.max(0) as usize) }
    }

    pub unsafe extern "C" fn free(p: *mut c_void) {
        // SAFETY: SQLite frees only what `malloc`/`realloc` gave it.
        unsafe { mi_free(p) }
    }

    pub unsafe extern "C" fn realloc(p: *mut c_void, n: c_int) -> *mut c_void {
        // SAFETY: as `free`.
        unsafe { mi_realloc(p, n.max(0) as usize) }
    }

    pub unsafe extern "C" fn size(p: *mut c_void) -> c_int {
        // SAFETY: as `free`; SQLite's allocations stay far under 2 GiB.
        unsafe { mi_usable_size(p) as c_int }
    }

    pub unsafe extern "C" fn roundup(n: c_int) -> c_int {
        // SAFETY: a pure function of the size.
        unsafe { mi_good_size(n.max(0) as usize).min(c_int::MAX as usize) as c_int }
    }

    pub unsafe extern "C" fn init(_: *mut c_void) -> c_int {
        libsqlite3_sys::SQLITE_OK
    }

    pub unsafe extern "C" fn shutdown(_: *mut c_void) {}
}

impl SqlStore {
    /// Opens `sqlite://PATH` (created if missing) or `postgres://…`, and brings the schema
    /// up to date (or checks it, with [`Migrations::Check`]).
    pub async fn open(url: &str, migrations: Migrations) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let unreachable = |e: sqlx::Error| StoreError::Connect {
            url: redact(url),
            message: e.to_string(),
        };
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or(path);
            if path.is_empty() {
                return Err(StoreError::Invalid {
                    field: "database_url",
                    message: "sqlite:// needs a file path".into(),
                });
            }
            if let Some(dir) = std::path::Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Connect {
                    url: url.to_string(),
                    message: format!("cannot create {}: {e}", dir.display()),
                })?;
            }
            let url = format!("sqlite://{path}?mode=rwc");
            configure_sqlite_allocator();
            // No ping before each acquire (sqlx's default): a SQLite connection is a file in
            // this process and cannot have gone away, and the ping was a round trip to its
            // thread before every transaction.
            let written = Arc::new(tokio::sync::Notify::new());
            let released = written.clone();
            let writer = AnyPoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .after_connect(|conn, _| Box::pin(sqlite_pragmas(conn, false)))
                .after_release(move |_, _| {
                    released.notify_one();
                    Box::pin(async { Ok(true) })
                })
                .connect(&url)
                .await
                .map_err(unreachable)?;
            migrate(&SQLITE_MIGRATIONS, &writer, migrations).await?;
            let reader = AnyPoolOptions::new()
                .max_connections(4)
                .test_before_acquire(false)
                .after_connect(|conn, _| Box::pin(sqlite_pragmas(conn, true)))
                .connect(&url)
                .await
                .map_err(unreachable)?;
            let checkpoints = Checkpoints::start(&url, written)
                .await
                .map_err(unreachable)?;
            return Ok(Self {
                writer,
                reader,
                engine: Engine::Sqlite,
                read_ahead_from: READ_AHEAD_FROM,
                url,
                _checkpoints: Some(checkpoints),
            });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // One plain connection first: a refused connection or a wrong password is told
            // at once, not after the pool's acquire timeout.
            use sqlx::Connection;
            AnyConnection::connect(url)
                .await
                .map_err(unreachable)?
                .close()
                .await
                .map_err(unreachable)?;
            // Writes come in batches, one transaction per batch: a few connections keep
            // the server busy. More only contend for it (on a 2-core host, 16 gave 7 %
            // fewer jobs/s than 8, and 4 about as many as 8, with less room for reads).
            let pool = AnyPoolOptions::new()
                .max_connections(8)
                // A healthy pool hands out a connection in microseconds; while the server
                // is down, callers hear so (503) after this, not after sqlx's 30 s.
                .acquire_timeout(Duration::from_secs(3))
                .after_connect(|conn, _| Box::pin(postgres_settings(conn)))
                .connect(url)
                .await
                .map_err(unreachable)?;
            migrate(&POSTGRES_MIGRATIONS, &pool, migrations).await?;
            return Ok(Self {
                writer: pool.clone(),
                reader: pool,
                engine: Engine::Postgres,
                read_ahead_from: usize::MAX,
                url: url.to_string(),
                _checkpoints: None,
            });
        }
        Err(StoreError::Invalid {
            field: "database_url",
            message: format!(
                "{:?} is not supported: use sqlite://PATH or postgres://USER:PASSWORD@HOST/DB",
                redact(url)
            ),
        })
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Reads ahead, on SQLite, every assignment or report batch of at least `jobs` jobs
    /// (16 by default): with 1, every one, as tests do to run each write through it.
    pub fn read_ahead_from(mut self, jobs: usize) -> Self {
        if self.engine == Engine::Sqlite {
            self.read_ahead_from = jobs;
        }
        self
    }

    /// The body of [`Store::assign_jobs`], with the jobs read ahead (SQLite) or read here.
    async fn assign_in(
        &self,
        plan: &[(JobId, WorkerId)],
        lease_until: Timestamp,
        ahead: Option<HashMap<JobId, JobRecord>>,
    ) -> Result<Vec<Assignment>> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let _timer = WriteTimer::start("assign");
        let guarded = ahead.is_some();
        let mut jobs = match ahead {
            Some(jobs) => jobs,
            None => {
                let ids: Vec<JobId> = plan.iter().map(|(j, _)| *j).collect();
                load_jobs(&mut tx, &ids).await?
            }
        };
        let mut made = Vec::with_capacity(plan.len());
        let mut events = Vec::with_capacity(plan.len());
        for &(job_id, worker_id) in plan {
            // Gone, or no longer QUEUED: someone else took or cancelled it.
            let Some(job) = jobs
                .get_mut(&job_id)
                .filter(|j| j.state == JobState::Queued)
            else {
                continue;
            };
            let to = job.state.apply(JobEvent::Assign)?;
            let run = RunRecord {
                id: RunId::new(),
                job_id,
                attempt: job.attempts + 1,
                retry_of: job.current_run,
                worker_id,
                state: RunState::Assigned,
                exit_code: None,
                error: None,
                assigned_at: now,
                started_at: None,
                finished_at: None,
                lease_expires_at: lease_until,
                result: None,
            };
            let kind = EventKind::JobAssigned {
                run_id: run.id,
                worker_id,
                attempt: run.attempt,
            };
            events.push(NewEvent::job(now, job_id, kind));
            job.attempts = run.attempt;
            job.current_run = Some(run.id);
            job.state = to;
            job.status_code = to.status_code();
            job.updated_at = now;
            made.push(Assignment {
                run,
                job: job.clone(),
            });
        }
        const RUN_COLS_NEW: usize = 8;
        for chunk in made.chunks(ROWS_PER_STATEMENT) {
            let sql = binds_for(
                &tx,
                format!(
                    "INSERT INTO runs (id, job_id, attempt, retry_of, worker_id, state, assigned_at, \
                 lease_expires_at) VALUES {}",
                    row_tuples(chunk.len(), RUN_COLS_NEW)
                ),
            );
            let mut query = sqlx::query(&sql);
            for Assignment { run, .. } in chunk {
                query = query
                    .bind(run.id.to_string())
                    .bind(run.job_id.to_string())
                    .bind(i64::from(run.attempt))
                    .bind(run.retry_of.map(|r| r.to_string()))
                    .bind(run.worker_id.to_string())
                    .bind(run.state.as_str())
                    .bind(run.assigned_at.0)
                    .bind(run.lease_expires_at.0);
            }
            query.execute(&mut *tx).await?;
            // Each job points at the run just made for its next attempt, matched by id: the
            // jobs were read, and on PostgreSQL locked, in this transaction, or, read ahead
            // (SQLite), each must still be QUEUED on the run it was read with (its last,
            // the new run's `retry_of`; SQLite's `IS` matches a first attempt's none).
            let (cols, guard) = if guarded {
                (
                    3,
                    " AND jobs.state = 'QUEUED' AND jobs.current_run IS v.column3",
                )
            } else {
                (2, "")
            };
            let sql = binds_for(
                &tx,
                format!(
                    "UPDATE jobs SET attempts = attempts + 1, current_run = v.column2, state = $1, \
                 updated_at = $2 FROM (VALUES {}) AS v WHERE jobs.id = v.column1{guard}",
                    row_tuples_from(3, chunk.len(), cols)
                ),
            );
            let mut query = sqlx::query(&sql)
                .bind(JobState::Assigned.as_str())
                .bind(now.0);
            for Assignment { run, .. } in chunk {
                query = query.bind(run.job_id.to_string()).bind(run.id.to_string());
                if guarded {
                    query = query.bind(run.retry_of.map(|r| r.to_string()));
                }
            }
            let changed = query.execute(&mut *tx).await?.rows_affected();
            if guarded && changed != chunk.len() as u64 {
                return Err(StoreError::ReadAheadStale);
            }
        }
        insert_events(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(made)
    }

    /// One try of [`Store::report_runs`], in one transaction, from the runs and jobs read
    /// ahead in `loaded` (the rest are read here).
    async fn report_in(
        &self,
        mut loaded: Loaded,
        steps: Vec<StepRequest>,
        ends: Vec<FinishRequest>,
        retry: RetrySettings,
    ) -> Result<RunReportAnswers> {
        let mut tx = self.writer.begin().await?;
        let _timer = WriteTimer::start("report");
        let now = Timestamp::now();
        let (stepped, writes) = advance_in(&mut tx, steps, &mut loaded, now).await?;
        let ended = finish_in(&mut tx, ends, retry, loaded, writes).await?;
        tx.commit().await?;
        Ok((stepped, ended))
    }

    /// Jobs as a reader sees them, for [`SqlStore::assign_in`].
    async fn jobs_read_ahead(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobRecord>> {
        load_jobs(&mut *self.reader.acquire().await?, ids).await
    }

    /// Runs and their jobs as a reader sees them, to write in a transaction that expects
    /// them so ([`ReadAhead`]).
    async fn runs_read_ahead(&self, ids: &[RunId]) -> Result<Loaded> {
        let mut loaded = Loaded::default();
        loaded.read(&mut *self.reader.acquire().await?, ids).await?;
        loaded.ahead = Some(ReadAhead::of(&loaded.runs, &loaded.jobs));
        Ok(loaded)
    }
}

async fn migrate(migrator: &Migrator, pool: &AnyPool, mode: Migrations) -> Result<()> {
    let newest_known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    let result = match mode {
        Migrations::Apply => migrator.run(pool).await,
        Migrations::Check => {
            let mut conn = pool.acquire().await?;
            use sqlx::migrate::Migrate;
            conn.ensure_migrations_table().await?;
            let applied = conn.list_applied_migrations().await?;
            let newest_applied = applied.iter().map(|m| m.version).max().unwrap_or(0);
            if newest_applied < newest_known {
                return Err(StoreError::Schema(format!(
                    "the database schema is at version {newest_applied}, this drover needs {newest_known}: run `drover migrate`"
                )));
            }
            if newest_applied > newest_known {
                Err(MigrateError::VersionMissing(newest_applied))
            } else {
                Ok(())
            }
        }
    };
    match result {
        Err(MigrateError::VersionMissing(v)) => Err(StoreError::Schema(format!(
            "the database has schema version {v}, newer than this drover binary knows ({newest_known}): upgrade drover"
        ))),
        other => Ok(other?),
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn parse<T: FromStr>(row: &AnyRow, col: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let text: String = row.try_get(col)?;
    text.parse::<T>()
        .map_err(|e| corrupt(format!("{col} {text:?}: {e}")))
}

fn parse_opt<T: FromStr>(row: &AnyRow, col: &str) -> Result<Option<T>>
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

fn ts(row: &AnyRow, col: &str) -> Result<Timestamp> {
    Ok(Timestamp(row.try_get(col)?))
}

fn ts_opt(row: &AnyRow, col: &str) -> Result<Option<Timestamp>> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(Timestamp))
}

/// The columns of `names` (a `*_COLUMNS` list) of the table `table`, as one JSON
/// array: jobs and runs are read as one text value per record rather than one value per
/// column. sqlx's `Any` driver copies every value of a row on the connection's thread and
/// again into an `AnyValue`; on SQLite that cost more than the B-tree reads behind it (a
/// report batch spent 12 µs per run and job read together as 32 columns, inside its
/// transaction), and serde decodes the array in one pass. `spec` and `result` hold JSON
/// already and are embedded as is.
fn json_record(engine: Engine, table: &str, names: &[&str]) -> String {
    let (array, embed): (&str, fn(&str) -> String) = match engine {
        Engine::Sqlite => ("json_array", |column| format!("json({column})")),
        Engine::Postgres => ("json_build_array", |column| format!("{column}::json")),
    };
    let values: Vec<String> = names
        .iter()
        .map(|name| {
            let column = format!("{table}.{name}");
            match *name {
                "spec" | "result" => embed(&column),
                _ => column,
            }
        })
        .collect();
    let record = format!("{array}({})", values.join(", "));
    match engine {
        Engine::Sqlite => record,
        Engine::Postgres => format!("{record}::text"),
    }
}

/// A job as [`json_record`] gives it ([`JOB_COLUMNS`], in order).
#[derive(serde::Deserialize)]
struct JobJson {
    id: JobId,
    name: String,
    spec: JobSpec,
    state: String,
    priority: i32,
    attempts: u32,
    max_attempts: u32,
    exit_code: Option<i32>,
    error: Option<String>,
    not_before: i64,
    current_run: Option<RunId>,
    group_id: Option<GroupId>,
    group_position: Option<u32>,
    waiting_on: u32,
    created_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
    owner: Option<String>,
    result: Option<serde_json::Value>,
}

impl JobJson {
    fn record(self) -> Result<JobRecord> {
        let state: JobState = self
            .state
            .parse()
            .map_err(|e| corrupt(format!("state {:?}: {e}", self.state)))?;
        Ok(JobRecord {
            id: self.id,
            name: self.name,
            state,
            status_code: state.status_code(),
            priority: self.priority,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            exit_code: self.exit_code,
            error: self.error,
            not_before: Timestamp(self.not_before),
            current_run: self.current_run,
            group_id: self.group_id,
            group_position: self.group_position,
            waiting_on: self.waiting_on,
            created_at: Timestamp(self.created_at),
            updated_at: Timestamp(self.updated_at),
            finished_at: self.finished_at.map(Timestamp),
            spec: self.spec,
            owner: self.owner,
            result: self.result,
        })
    }
}

/// A run as [`json_record`] gives it ([`RUN_COLUMNS`], in order).
#[derive(serde::Deserialize)]
struct RunJson {
    id: RunId,
    job_id: JobId,
    attempt: u32,
    retry_of: Option<RunId>,
    worker_id: WorkerId,
    state: String,
    exit_code: Option<i32>,
    error: Option<String>,
    assigned_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    lease_expires_at: i64,
    result: Option<serde_json::Value>,
}

impl RunJson {
    fn record(self) -> Result<RunRecord> {
        Ok(RunRecord {
            id: self.id,
            job_id: self.job_id,
            attempt: self.attempt,
            retry_of: self.retry_of,
            worker_id: self.worker_id,
            state: self
                .state
                .parse()
                .map_err(|e| corrupt(format!("state {:?}: {e}", self.state)))?,
            exit_code: self.exit_code,
            error: self.error,
            assigned_at: Timestamp(self.assigned_at),
            started_at: self.started_at.map(Timestamp),
            finished_at: self.finished_at.map(Timestamp),
            lease_expires_at: Timestamp(self.lease_expires_at),
            result: self.result,
        })
    }
}

/// The JSON text of the row's column `column`, decoded as `T`.
fn from_json<T: serde::de::DeserializeOwned>(row: &AnyRow, column: usize) -> Result<T> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| corrupt(format!("a record read as JSON: {e}")))
}

fn job_from_row(row: &AnyRow) -> Result<JobRecord> {
    from_json::<JobJson>(row, 0)?.record()
}

fn run_from_row(row: &AnyRow) -> Result<RunRecord> {
    from_json::<RunJson>(row, 0)?.record()
}

/// What to select for [`job_from_row`] from `jobs` (built once per engine).
fn jobs_json(engine: Engine) -> &'static str {
    static SQLITE: LazyLock<String> =
        LazyLock::new(|| json_record(Engine::Sqlite, "jobs", &JOB_COLUMNS));
    static POSTGRES: LazyLock<String> =
        LazyLock::new(|| json_record(Engine::Postgres, "jobs", &JOB_COLUMNS));
    match engine {
        Engine::Sqlite => &SQLITE,
        Engine::Postgres => &POSTGRES,
    }
}

/// What to select for [`run_from_row`] from `runs` (built once per engine).
fn runs_json(engine: Engine) -> &'static str {
    static SQLITE: LazyLock<String> =
        LazyLock::new(|| json_record(Engine::Sqlite, "runs", &RUN_COLUMNS));
    static POSTGRES: LazyLock<String> =
        LazyLock::new(|| json_record(Engine::Postgres, "runs", &RUN_COLUMNS));
    match engine {
        Engine::Sqlite => &SQLITE,
        Engine::Postgres => &POSTGRES,
    }
}

fn worker_from_row(row: &AnyRow) -> Result<WorkerRecord> {
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
        provider: row.try_get("provider")?,
        resource_id: row.try_get("resource_id")?,
        applied_config_version: row
            .try_get::<Option<i64>, _>("applied_version")?
            .map(|v| v as u64),
        config_ack: match row.try_get::<Option<i64>, _>("config_version")? {
            Some(version) => Some(ConfigAckRecord {
                config_version: version as u64,
                applied_at: ts_opt(row, "config_applied_at")?.unwrap_or(Timestamp(0)),
                status: row
                    .try_get::<Option<String>, _>("config_status")?
                    .unwrap_or_default(),
                error: row.try_get("config_error")?,
            }),
            None => None,
        },
    })
}

/// The events of a row ([`EventRow`]): its `data` is one event or an array of them.
fn events_from_row(row: &AnyRow) -> Result<Vec<EventRecord>> {
    let data: String = row.try_get("data")?;
    let kinds: Vec<EventKind> = if data.starts_with('[') {
        serde_json::from_str(&data).map_err(corrupt)?
    } else {
        vec![serde_json::from_str(&data).map_err(corrupt)?]
    };
    let seq: i64 = row.try_get("seq")?;
    let (at, job_id, worker_id) = (
        ts(row, "at")?,
        parse_opt(row, "job_id")?,
        parse_opt(row, "worker_id")?,
    );
    Ok((0..)
        .zip(kinds)
        .map(|(i, kind)| EventRecord {
            seq: seq * EVENTS_PER_ROW as i64 + i,
            at,
            job_id,
            worker_id,
            kind,
        })
        .collect())
}

/// Every event of `rows`, in their order.
fn events_from_rows(rows: &[AnyRow]) -> Result<Vec<EventRecord>> {
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        events.extend(events_from_row(row)?);
    }
    Ok(events)
}

fn user_from_row(row: &AnyRow) -> Result<UserRecord> {
    let role: String = row.try_get("role")?;
    Ok(UserRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: Role::parse(&role).ok_or_else(|| corrupt(format!("role {role}")))?,
        created_at: ts(row, "created_at")?,
    })
}

fn api_token_from_row(row: &AnyRow) -> Result<ApiTokenRecord> {
    Ok(ApiTokenRecord {
        id: row.try_get("id")?,
        name: row
            .try_get::<Option<String>, _>("name")?
            .unwrap_or_default(),
        user: row.try_get("user_name")?,
        created_at: ts(row, "created_at")?,
        expires_at: ts(row, "expires_at")?,
        last_used_at: ts_opt(row, "last_used_at")?,
        revoked_at: ts_opt(row, "revoked_at")?,
    })
}

const API_TOKEN_COLS: &str = "t.id, t.name, u.name AS user_name, t.created_at, t.expires_at, \
    t.last_used_at, t.revoked_at";

/// Inserts one token of `kind` and returns its secret.
async fn insert_token(
    conn: &mut AnyConnection,
    kind: &str,
    user_id: &str,
    family: Option<&str>,
    name: Option<&str>,
    ttl: Duration,
    now: Timestamp,
) -> Result<(String, String)> {
    let prefix = match kind {
        "access" => "drover_at_",
        "refresh" => "drover_rt_",
        _ => "drover_pat_",
    };
    let token = format!("{prefix}{}", random_hex(24));
    let id = JobId::new().to_string();
    sqlx::query(
        "INSERT INTO auth_tokens (token_hash, id, kind, user_id, family, name, created_at, \
         expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(sha256_hex(&token))
    .bind(&id)
    .bind(kind)
    .bind(user_id)
    .bind(family)
    .bind(name)
    .bind(now.0)
    .bind(now.plus(ttl).0)
    .execute(conn)
    .await?;
    Ok((id, token))
}

async fn issue_pair(
    conn: &mut AnyConnection,
    user_id: &str,
    family: &str,
    access_ttl: Duration,
    refresh_ttl: Duration,
    now: Timestamp,
) -> Result<IssuedTokens> {
    let (_, access) =
        insert_token(conn, "access", user_id, Some(family), None, access_ttl, now).await?;
    let (_, refresh) = insert_token(
        conn,
        "refresh",
        user_id,
        Some(family),
        None,
        refresh_ttl,
        now,
    )
    .await?;
    Ok(IssuedTokens {
        access_token: access,
        refresh_token: refresh,
        token_type: "Bearer".into(),
        expires_in: access_ttl.as_secs(),
    })
}

async fn load_user(conn: &mut AnyConnection, id: &str) -> Result<UserRecord> {
    let row = sqlx::query("SELECT id, name, role, created_at FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or(StoreError::UserTokenRefused(
            "the token's user no longer exists",
        ))?;
    user_from_row(&row)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// An event to write with the change it describes.
struct NewEvent {
    at: Timestamp,
    job_id: Option<JobId>,
    worker_id: Option<WorkerId>,
    kind: EventKind,
}

impl NewEvent {
    fn job(at: Timestamp, job_id: JobId, kind: EventKind) -> Self {
        Self {
            at,
            job_id: Some(job_id),
            worker_id: None,
            kind,
        }
    }
}

/// Rows per multi-row statement: a batch costs a few statements, not a few per row (on
/// SQLite every statement is a round trip to the connection's thread), and the binds stay
/// far under both engines' limits.
const ROWS_PER_STATEMENT: usize = 64;

/// The statement as the connection's engine binds it fastest. SQLite looks a `$N`
/// parameter's name up by walking the list of all of them, and sqlx asks the name of every
/// parameter, so a statement of a few hundred `$N` binds costs time quadratic in them (it
/// was a tenth of the control plane's CPU under load). Where the `$N` appear once each, in
/// order from `$1`, anonymous `?` bind the same values, without names. Left as it is
/// otherwise, and on PostgreSQL.
fn binds_for(conn: &AnyConnection, sql: String) -> String {
    if conn.backend_name() != "SQLite" {
        return sql;
    }
    sqlite_anonymous_binds(&sql).unwrap_or(sql)
}

/// `sql` with `$1, $2, …` replaced by `?`, or None when they are not once each in order.
fn sqlite_anonymous_binds(sql: &str) -> Option<String> {
    let mut out = String::with_capacity(sql.len());
    let mut expected = 1usize;
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - at - 1);
        if rest[at + 1..at + 1 + digits].parse::<usize>().ok()? != expected {
            return None;
        }
        expected += 1;
        out.push('?');
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    Some(out)
}

/// `$first, …` for `count` binds.
fn placeholders(first: usize, count: usize) -> String {
    let mut out = String::with_capacity(count * 6);
    push_placeholders(&mut out, first, count);
    out
}

/// Appends `$first, …` for `count` binds (one buffer: these lists run to hundreds of binds
/// per statement, built for every statement of a batch).
fn push_placeholders(out: &mut String, first: usize, count: usize) {
    use std::fmt::Write;
    for i in first..first + count {
        if i > first {
            out.push_str(", ");
        }
        let _ = write!(out, "${i}");
    }
}

/// `($1, …, $cols), (…)` for `rows` rows of `cols` binds.
fn row_tuples(rows: usize, cols: usize) -> String {
    row_tuples_from(1, rows, cols)
}

/// [`row_tuples`] numbered from `$first`.
fn row_tuples_from(first: usize, rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * (cols * 6 + 4));
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        push_placeholders(&mut out, first + r * cols, cols);
        out.push(')');
    }
    out
}

/// Runs and jobs a transaction has read (and changed), as they now stand in it: the ends
/// of a batch reuse what its steps read instead of reading the same rows again.
#[derive(Default)]
struct Loaded {
    runs: HashMap<RunId, RunRecord>,
    jobs: HashMap<JobId, JobRecord>,
    /// Set when `runs` and `jobs` were read ahead of the transaction ([`ReadAhead`]).
    ahead: Option<ReadAhead>,
}

impl Loaded {
    /// Adds the runs of `ids` not held yet, and their jobs not held yet: one row per run
    /// and its job (a job held already may have changed in this transaction; it is kept).
    async fn read(&mut self, conn: &mut AnyConnection, ids: &[RunId]) -> Result<()> {
        let missing: Vec<RunId> = ids
            .iter()
            .filter(|id| !self.runs.contains_key(id))
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let lock = for_update(conn);
        let engine = engine_of(conn);
        let (run, job) = (runs_json(engine), jobs_json(engine));
        for chunk in missing.chunks(ROWS_PER_STATEMENT * 8) {
            // Locked (PostgreSQL) in run id order, each run with its job, as
            // `load_by_ids` locks them.
            let sql = binds_for(
                &*conn,
                format!(
                    "SELECT {run}, {job} FROM runs JOIN jobs ON jobs.id = runs.job_id \
                     WHERE runs.id IN ({}) ORDER BY runs.id{lock}",
                    placeholders(1, chunk.len())
                ),
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            for row in query.fetch_all(&mut *conn).await? {
                let run = from_json::<RunJson>(&row, 0)?.record()?;
                let job_id = run.job_id;
                self.runs.insert(run.id, run);
                if let std::collections::hash_map::Entry::Vacant(held) = self.jobs.entry(job_id) {
                    held.insert(from_json::<JobJson>(&row, 1)?.record()?);
                }
            }
        }
        Ok(())
    }
}

/// Runs and jobs read ahead of a write transaction, on SQLite ([`SqlStore::runs_read_ahead`]),
/// as the transaction expects to find them. SQLite has one writer: a read inside a write
/// transaction is time no other write can use (a quarter of the writer's time under
/// load), while readers run beside it. So the rows are read before, and each write of one
/// of them matches the row as expected and counts the rows it changed: fewer mean a row
/// moved since it was read, and the transaction is given up
/// ([`StoreError::ReadAheadStale`]) and written again with its reads inside. Rows decided
/// on but not written are counted as expected before the transaction settles dependents
/// or commits ([`ReadAhead::check_unwritten`]); from then on nothing else writes until the
/// commit. A job is expected in its state and on its current run: every new attempt moves
/// the run, and a job comes back to a state only through another state.
struct ReadAhead {
    runs: HashMap<RunId, Expected<RunState>>,
    jobs: HashMap<JobId, Expected<(JobState, Option<RunId>)>>,
}

struct Expected<T> {
    stands: T,
    written: bool,
}

impl<T> Expected<T> {
    fn read(stands: T) -> Self {
        Self {
            stands,
            written: false,
        }
    }
}

impl ReadAhead {
    fn of(runs: &HashMap<RunId, RunRecord>, jobs: &HashMap<JobId, JobRecord>) -> Self {
        Self {
            runs: runs
                .values()
                .map(|r| (r.id, Expected::read(r.state)))
                .collect(),
            jobs: jobs
                .values()
                .map(|j| (j.id, Expected::read((j.state, j.current_run))))
                .collect(),
        }
    }

    /// Fails as stale unless every run and job not written yet stands as read.
    async fn check_unwritten(self, conn: &mut AnyConnection) -> Result<()> {
        let runs: Vec<[Option<String>; 3]> = (self.runs.iter())
            .filter(|(_, e)| !e.written)
            .map(|(id, e)| [Some(id.to_string()), Some(e.stands.as_str().into()), None])
            .collect();
        let jobs: Vec<[Option<String>; 3]> = (self.jobs.iter())
            .filter(|(_, e)| !e.written)
            .map(|(id, e)| {
                let (state, current_run) = e.stands;
                let current_run = current_run.map(|r| r.to_string());
                [
                    Some(id.to_string()),
                    Some(state.as_str().into()),
                    current_run,
                ]
            })
            .collect();
        let runs_join = "runs ON runs.id = v.column1 AND runs.state = v.column2";
        let jobs_join = "jobs ON jobs.id = v.column1 AND jobs.state = v.column2 \
                         AND jobs.current_run IS v.column3";
        if count_as_read(conn, runs_join, 2, &runs).await?
            && count_as_read(conn, jobs_join, 3, &jobs).await?
        {
            Ok(())
        } else {
            Err(StoreError::ReadAheadStale)
        }
    }
}

/// Whether each of `rows` (their first `cols` values) finds its match in `join`: one
/// count per statement, no rows handed back.
async fn count_as_read(
    conn: &mut AnyConnection,
    join: &str,
    cols: usize,
    rows: &[[Option<String>; 3]],
) -> Result<bool> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT * 4) {
        let sql = binds_for(
            &*conn,
            format!(
                "SELECT count(*) FROM (VALUES {}) AS v JOIN {join}",
                row_tuples(chunk.len(), cols)
            ),
        );
        let mut query = sqlx::query_scalar::<_, i64>(&sql);
        for row in chunk {
            for value in &row[..cols] {
                query = query.bind(value.clone());
            }
        }
        if query.fetch_one(&mut *conn).await? != chunk.len() as i64 {
            return Ok(false);
        }
    }
    Ok(true)
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// `UPDATE runs SET {set}` (binds `$1…$set_binds`, bound by `bind_set`) for `ids`, which
/// become `to`: by id alone, or, for runs read ahead, only where each still is as expected.
async fn update_runs(
    conn: &mut AnyConnection,
    (set, set_binds): (&str, usize),
    bind_set: &(dyn for<'q> Fn(AnyQuery<'q>) -> AnyQuery<'q> + Sync),
    ids: &[RunId],
    to: RunState,
    mut ahead: Option<&mut ReadAhead>,
) -> Result<()> {
    let mut by_expected: HashMap<Option<RunState>, Vec<RunId>> = HashMap::new();
    for id in ids {
        let expected = ahead
            .as_ref()
            .and_then(|a| a.runs.get(id))
            .map(|e| e.stands);
        by_expected.entry(expected).or_default().push(*id);
    }
    for (expected, ids) in by_expected {
        let state = expected.map(RunState::as_str);
        let changed =
            update_by_id(&mut *conn, "runs", (set, set_binds), bind_set, state, &ids).await?;
        if expected.is_some() && changed != ids.len() as u64 {
            return Err(StoreError::ReadAheadStale);
        }
    }
    if let Some(ahead) = ahead.as_mut() {
        for id in ids {
            if let Some(e) = ahead.runs.get_mut(id) {
                *e = Expected {
                    stands: to,
                    written: true,
                };
            }
        }
    }
    Ok(())
}

/// `UPDATE {table} SET {set} WHERE [state = …] id IN (…)` for `ids`, in statements of a few
/// hundred: the set's binds first, then the state if given. The rows changed.
async fn update_by_id<Id: ToString>(
    conn: &mut AnyConnection,
    table: &str,
    (set, set_binds): (&str, usize),
    bind_set: &(dyn for<'q> Fn(AnyQuery<'q>) -> AnyQuery<'q> + Sync),
    state: Option<&'static str>,
    ids: &[Id],
) -> Result<u64> {
    let (guard, first) = match state {
        Some(_) => (format!("state = ${} AND ", set_binds + 1), set_binds + 2),
        None => (String::new(), set_binds + 1),
    };
    let mut changed = 0;
    for chunk in ids.chunks(ROWS_PER_STATEMENT * 8) {
        let sql = binds_for(
            &*conn,
            format!(
                "UPDATE {table} SET {set} WHERE {guard}id IN ({})",
                placeholders(first, chunk.len())
            ),
        );
        let mut query = bind_set(sqlx::query(&sql));
        if let Some(state) = state {
            query = query.bind(state);
        }
        for id in chunk {
            query = query.bind(id.to_string());
        }
        changed += query.execute(&mut *conn).await?.rows_affected();
    }
    Ok(changed)
}

/// [`update_runs`] for jobs, which keep their current run.
async fn update_jobs(
    conn: &mut AnyConnection,
    (set, set_binds): (&str, usize),
    bind_set: &(dyn for<'q> Fn(AnyQuery<'q>) -> AnyQuery<'q> + Sync),
    ids: &[JobId],
    to: JobState,
    mut ahead: Option<&mut ReadAhead>,
) -> Result<()> {
    let (expected, by_id): (Vec<&JobId>, Vec<&JobId>) = ids
        .iter()
        .partition(|id| ahead.as_ref().is_some_and(|a| a.jobs.contains_key(id)));
    update_by_id(&mut *conn, "jobs", (set, set_binds), bind_set, None, &by_id).await?;
    if let Some(ahead) = ahead.as_mut() {
        for chunk in expected.chunks(ROWS_PER_STATEMENT * 8) {
            // SQLite's `IS`: a job read ahead may have no current run.
            let sql = binds_for(
                &*conn,
                format!(
                    "UPDATE jobs SET {set} FROM (VALUES {}) AS v WHERE jobs.id = v.column1 \
                     AND jobs.state = v.column2 AND jobs.current_run IS v.column3",
                    row_tuples_from(set_binds + 1, chunk.len(), 3)
                ),
            );
            let mut query = bind_set(sqlx::query(&sql));
            for id in chunk {
                let (state, current_run) = ahead.jobs[*id].stands;
                query = query
                    .bind(id.to_string())
                    .bind(state.as_str())
                    .bind(current_run.map(|r| r.to_string()));
            }
            if query.execute(&mut *conn).await?.rows_affected() != chunk.len() as u64 {
                return Err(StoreError::ReadAheadStale);
            }
            for id in chunk {
                if let Some(e) = ahead.jobs.get_mut(*id) {
                    *e = Expected {
                        stands: (to, e.stands.1),
                        written: true,
                    };
                }
            }
        }
    }
    Ok(())
}

/// Row writes and events of run steps, applied in memory and not yet written: when the
/// same batch also ends a run (a short job reports its start and its end together), the
/// end writes the run and its job once, with their final values, and the step's writes
/// of them are dropped ([`StepWrites::forget_run`], [`StepWrites::forget_job`]).
struct StepWrites {
    now: Timestamp,
    started: std::collections::HashSet<RunId>,
    moved: HashMap<JobId, JobState>,
    events: Vec<NewEvent>,
    /// The batch's runs and jobs were read ahead: the writes expect them as read.
    ahead: Option<ReadAhead>,
}

impl StepWrites {
    fn new(now: Timestamp) -> Self {
        Self {
            now,
            started: std::collections::HashSet::new(),
            moved: HashMap::new(),
            events: Vec::new(),
            ahead: None,
        }
    }

    /// Ends the read-ahead: every run and job read ahead and not written is counted as
    /// read (stale otherwise); from here on the batch writes by id alone.
    async fn check_read_ahead(&mut self, tx: &mut AnyConnection) -> Result<()> {
        match self.ahead.take() {
            Some(ahead) => ahead.check_unwritten(tx).await,
            None => Ok(()),
        }
    }

    fn forget_run(&mut self, id: RunId) {
        self.started.remove(&id);
    }

    fn forget_job(&mut self, id: JobId) {
        self.moved.remove(&id);
    }

    /// Writes what is left, in the caller's transaction.
    async fn write(&mut self, tx: &mut AnyConnection) -> Result<()> {
        let started: Vec<RunId> = self.started.drain().collect();
        let now = self.now.0;
        update_runs(
            &mut *tx,
            ("state = $1, started_at = $2", 2),
            &|q| q.bind(RunState::Running.as_str()).bind(now),
            &started,
            RunState::Running,
            self.ahead.as_mut(),
        )
        .await?;
        let moved: Vec<(JobId, JobState)> = self.moved.drain().collect();
        set_job_states(&mut *tx, &moved, self.now, self.ahead.as_mut()).await?;
        insert_events(&mut *tx, &std::mem::take(&mut self.events)).await
    }
}

/// The body of [`Store::advance_runs`], inside the caller's transaction: the steps are
/// applied to `loaded` and their writes returned, for the caller to write
/// ([`StepWrites::write`]) or to hand to the ends of the same batch.
async fn advance_in(
    tx: &mut AnyConnection,
    batch: Vec<StepRequest>,
    loaded: &mut Loaded,
    now: Timestamp,
) -> Result<(Vec<Result<JobId>>, StepWrites)> {
    let mut writes = StepWrites::new(now);
    writes.ahead = loaded.ahead.take();
    if batch.is_empty() {
        return Ok((Vec::new(), writes));
    }
    let run_ids: Vec<RunId> = batch.iter().map(|r| r.run_id).collect();
    loaded.read(&mut *tx, &run_ids).await?;
    let Loaded { runs, jobs, .. } = loaded;
    let StepWrites {
        started,
        moved,
        events,
        ..
    } = &mut writes;
    let mut answers = Vec::with_capacity(batch.len());
    // Applied in order in memory, then written once: an accept and the start of the
    // same run may share the batch.
    for req in batch {
        let answer = (|| {
            let run = runs
                .get_mut(&req.run_id)
                .ok_or_else(|| StoreError::NotFound {
                    kind: "run",
                    id: req.run_id.to_string(),
                })?;
            if run.worker_id != req.worker_id {
                return Err(StoreError::NotYourRun { run_id: run.id });
            }
            if run.state != RunState::Assigned {
                return Err(live_run_conflict(run));
            }
            let job = jobs
                .get_mut(&run.job_id)
                .ok_or_else(|| StoreError::NotFound {
                    kind: "job",
                    id: run.job_id.to_string(),
                })?;
            // A refused event takes back those of the same step: a refused step changes nothing.
            let from = job.state;
            let mut to = from;
            let kept = events.len();
            for &event in req.step.job_events() {
                let next = to.apply(event).inspect_err(|_| events.truncate(kept))?;
                let kind = match event {
                    // An accept leaves the job ASSIGNED: only its event is written.
                    JobEvent::Accept => EventKind::JobAccepted {
                        run_id: run.id,
                        worker_id: run.worker_id,
                    },
                    _ => EventKind::for_transition(to, event, next, Some(run.id), None, None),
                };
                events.push(NewEvent::job(now, job.id, kind));
                to = next;
            }
            if to != from {
                job.state = to;
                job.status_code = to.status_code();
                job.updated_at = now;
                moved.insert(job.id, to);
            }
            if req.step != RunStep::Accept {
                run.state = RunState::Running;
                run.started_at = Some(now);
                started.insert(run.id);
            }
            Ok(job.id)
        })();
        answers.push(answer);
    }
    Ok((answers, writes))
}

/// The body of [`Store::finish_runs`], inside the caller's transaction.
///
/// `steps` are the writes of steps in the same batch (already applied to `loaded`); they
/// are written here, less what the ends write anyway.
async fn finish_in(
    tx: &mut AnyConnection,
    batch: Vec<FinishRequest>,
    retry: RetrySettings,
    loaded: Loaded,
    mut steps: StepWrites,
) -> Result<Vec<Result<Finished>>> {
    if batch.is_empty() {
        steps.write(tx).await?;
        steps.check_read_ahead(tx).await?;
        return Ok(Vec::new());
    }
    let mut writing = FinishBatch::read(&mut *tx, &batch, retry, loaded, steps).await?;
    let mut answers = Vec::with_capacity(batch.len());
    for req in batch {
        answers.push(writing.finish(&mut *tx, req).await?);
    }
    writing.flush(&mut *tx).await?;
    writing.steps.check_read_ahead(tx).await?;
    Ok(answers)
}

async fn insert_event(
    conn: &mut AnyConnection,
    at: Timestamp,
    job_id: Option<JobId>,
    worker_id: Option<WorkerId>,
    kind: &EventKind,
) -> Result<()> {
    let event = NewEvent {
        at,
        job_id,
        worker_id,
        kind: kind.clone(),
    };
    insert_events(conn, &[event]).await
}

async fn insert_events(conn: &mut AnyConnection, events: &[NewEvent]) -> Result<()> {
    let rows = event_rows(events);
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = binds_for(
            &*conn,
            format!(
                "INSERT INTO events (at, job_id, worker_id, type, data) VALUES {}",
                row_tuples(chunk.len(), 5)
            ),
        );
        let mut query = sqlx::query(&sql);
        for row in chunk {
            query = query
                .bind(row.at.0)
                .bind(row.job_id.map(|j| j.to_string()))
                .bind(row.worker_id.map(|w| w.to_string()))
                .bind(row.types())
                .bind(row.data()?);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Events a row of `events` holds at most: the events of a row are numbered
/// `seq * EVENTS_PER_ROW + i` ([`events_from_row`]).
const EVENTS_PER_ROW: usize = 8;

/// One row of `events`: one event, or several of one job at one instant.
struct EventRow<'a> {
    at: Timestamp,
    job_id: Option<JobId>,
    worker_id: Option<WorkerId>,
    kinds: Vec<&'a EventKind>,
}

impl EventRow<'_> {
    /// The `type` column: the events' types, comma-separated.
    fn types(&self) -> String {
        let mut types = String::new();
        for kind in &self.kinds {
            if !types.is_empty() {
                types.push(',');
            }
            types.push_str(kind.type_name());
        }
        types
    }

    /// The event as a JSON object, or several as an array of them.
    fn data(&self) -> Result<String> {
        match self.kinds.as_slice() {
            [one] => serde_json::to_string(one),
            many => serde_json::to_string(many),
        }
        .map_err(corrupt)
    }
}

/// `events` as rows: the events of one job at one instant share a row (a run report
/// writes three for a job that started and ended in one batch), up to
/// [`EVENTS_PER_ROW`]. Rows are written in the order their first event came, so each
/// job's events, and each worker's, keep their order; an event naming a worker has a row
/// of its own and ends its job's open row. Every row is a table entry and an index
/// entry: on SQLite the events were two fifths of the writer's time per job.
fn event_rows(events: &[NewEvent]) -> Vec<EventRow<'_>> {
    let mut rows: Vec<EventRow<'_>> = Vec::with_capacity(events.len());
    let mut open: HashMap<JobId, usize> = HashMap::new();
    for e in events {
        // Only the events of a job alone (naming no worker) share rows.
        let alone = e.job_id.filter(|_| e.worker_id.is_none());
        let joins = alone
            .and_then(|job| open.get(&job).copied())
            .filter(|&i| rows[i].at == e.at && rows[i].kinds.len() < EVENTS_PER_ROW);
        if let Some(i) = joins {
            rows[i].kinds.push(&e.kind);
            continue;
        }
        if let Some(job) = e.job_id {
            match alone {
                Some(_) => open.insert(job, rows.len()),
                None => open.remove(&job),
            };
        }
        rows.push(EventRow {
            at: e.at,
            job_id: e.job_id,
            worker_id: e.worker_id,
            kinds: vec![&e.kind],
        });
    }
    rows
}

/// Rows by id, `FOR UPDATE` on PostgreSQL (in id order, so that replicas locking
/// overlapping sets queue up rather than deadlock).
async fn load_by_ids<K: ToString + Eq + std::hash::Hash + Copy, T>(
    conn: &mut AnyConnection,
    sql: &str,
    ids: &[K],
    from_row: fn(&AnyRow) -> Result<T>,
    key: fn(&T) -> K,
) -> Result<HashMap<K, T>> {
    let lock = for_update(conn);
    let mut found = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT * 8) {
        let sql = binds_for(
            &*conn,
            format!(
                "{sql} WHERE id IN ({}) ORDER BY id{lock}",
                placeholders(1, chunk.len())
            ),
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.to_string());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let record = from_row(&row)?;
            found.insert(key(&record), record);
        }
    }
    Ok(found)
}

async fn load_jobs(conn: &mut AnyConnection, ids: &[JobId]) -> Result<HashMap<JobId, JobRecord>> {
    let sql = format!("SELECT {} FROM jobs", jobs_json(engine_of(conn)));
    load_by_ids(conn, &sql, ids, job_from_row, |j| j.id).await
}

/// Moves many jobs at once: one statement per target state, not one per job.
///
/// A caller that read the jobs in this transaction (locked on PostgreSQL, [`for_update`];
/// SQLite has one writer) checked their state there, so the statements select by id
/// alone: a `state = …` guard besides would be redundant, and on PostgreSQL it let the
/// planner pick `jobs_state` from statistics taken while the queue was small, then test
/// every queued job against the id list. Jobs read ahead (SQLite) are matched as read.
async fn set_job_states(
    conn: &mut AnyConnection,
    changes: &[(JobId, JobState)],
    now: Timestamp,
    mut ahead: Option<&mut ReadAhead>,
) -> Result<()> {
    let mut by_target: HashMap<JobState, Vec<JobId>> = HashMap::new();
    for (id, to) in changes {
        by_target.entry(*to).or_default().push(*id);
    }
    for (to, ids) in by_target {
        let finished = to.is_terminal().then_some(now.0);
        update_jobs(
            &mut *conn,
            ("state = $1, updated_at = $2, finished_at = $3", 3),
            &|q| q.bind(to.as_str()).bind(now.0).bind(finished),
            &ids,
            to,
            ahead.as_deref_mut(),
        )
        .await?;
    }
    Ok(())
}

/// How long a hot write transaction held its connection, from its first statement to its
/// commit, recorded when dropped as `drover_store_write_seconds{kind}`. On SQLite one
/// connection writes, so these times summed over a run say how busy that serial stage was
/// (`drover bench throughput` prints them).
struct WriteTimer {
    kind: &'static str,
    began: std::time::Instant,
}

impl WriteTimer {
    fn start(kind: &'static str) -> Self {
        Self {
            kind,
            began: std::time::Instant::now(),
        }
    }
}

impl Drop for WriteTimer {
    fn drop(&mut self) {
        metrics::histogram!("drover_store_write_seconds", "kind" => self.kind)
            .record(self.began.elapsed().as_secs_f64());
    }
}

/// Tries of a transaction that PostgreSQL rolled back to break a deadlock or a
/// serialization conflict.
const TRANSIENT_TRIES: usize = 3;

/// A failure that running the same transaction again may not meet: PostgreSQL's
/// `deadlock_detected` (40P01) and `serialization_failure` (40001).
fn is_transient(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

/// On PostgreSQL, locks the row for the rest of the transaction: every writer of a job (and
/// of its runs) reads the job first, so concurrent changes from replicas queue up instead
/// of overwriting each other.
fn for_update(conn: &AnyConnection) -> &'static str {
    row_lock(engine_of(conn))
}

fn engine_of(conn: &AnyConnection) -> Engine {
    match conn.backend_name() {
        "PostgreSQL" => Engine::Postgres,
        _ => Engine::Sqlite,
    }
}

/// The locking clause of [`for_update`], by engine (SQLite has one writer: no row locks).
fn row_lock(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => " FOR UPDATE",
        Engine::Sqlite => "",
    }
}

async fn load_job(conn: &mut AnyConnection, id: JobId) -> Result<JobRecord> {
    let lock = for_update(conn);
    let sql = format!(
        "SELECT {} FROM jobs WHERE id = $1{lock}",
        jobs_json(engine_of(conn))
    );
    load_one(conn, &sql, "job", id, job_from_row).await
}

async fn load_run(conn: &mut AnyConnection, id: RunId) -> Result<RunRecord> {
    let sql = format!(
        "SELECT {} FROM runs WHERE id = $1",
        runs_json(engine_of(conn))
    );
    load_one(conn, &sql, "run", id, run_from_row).await
}

/// The one row `sql` selects by `id` (its `$1`), or NotFound naming `kind`.
async fn load_one<T>(
    conn: &mut AnyConnection,
    sql: &str,
    kind: &'static str,
    id: impl ToString,
    from_row: fn(&AnyRow) -> Result<T>,
) -> Result<T> {
    let id = id.to_string();
    let row = sqlx::query(sql)
        .bind(&id)
        .fetch_optional(conn)
        .await?
        .ok_or(StoreError::NotFound { kind, id })?;
    from_row(&row)
}

/// Moves a job through `event`, writing the state and its event in the caller's transaction.
async fn transition(
    conn: &mut AnyConnection,
    job: &JobRecord,
    event: JobEvent,
    run_id: Option<RunId>,
    kind: Option<EventKind>,
    now: Timestamp,
) -> Result<JobState> {
    let to = job.state.apply(event)?;
    set_job_states(&mut *conn, &[(job.id, to)], now, None).await?;
    let kind =
        kind.unwrap_or_else(|| EventKind::for_transition(job.state, event, to, run_id, None, None));
    insert_event(conn, now, Some(job.id), None, &kind).await?;
    Ok(to)
}

fn live_run_conflict(run: &RunRecord) -> StoreError {
    StoreError::Conflict(format!("run {} is already {}", run.id, run.state))
}

fn reservation_from_row(row: &AnyRow) -> Result<ReservationRecord> {
    let state: String = row.try_get("state")?;
    Ok(ReservationRecord {
        id: parse(row, "id")?,
        resource: row.try_get("resource")?,
        amount: row.try_get::<i64, _>("amount")? as u32,
        worker_id: parse(row, "worker_id")?,
        state: ReservationState::parse(&state)
            .ok_or_else(|| corrupt(format!("reservation state {state}")))?,
        created_at: ts(row, "created_at")?,
        expires_at: ts(row, "expires_at")?,
        ended_at: ts_opt(row, "ended_at")?,
        owner: row.try_get("owner")?,
    })
}

fn delivery_from_row(row: &AnyRow) -> Result<DeliveryRecord> {
    let state: String = row.try_get("state")?;
    let payload: String = row.try_get("payload")?;
    Ok(DeliveryRecord {
        id: row.try_get("id")?,
        webhook_id: parse(row, "webhook_id")?,
        url: row.try_get("url")?,
        event: row.try_get("event")?,
        idempotency_key: row.try_get("idempotency_key")?,
        payload: serde_json::from_str(&payload).map_err(corrupt)?,
        state: DeliveryState::parse(&state)
            .ok_or_else(|| corrupt(format!("delivery state {state}")))?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        next_attempt_at: ts(row, "next_attempt_at")?,
        last_status: row
            .try_get::<Option<i64>, _>("last_status")?
            .map(|s| s as u16),
        last_error: row.try_get("last_error")?,
        created_at: ts(row, "created_at")?,
        delivered_at: ts_opt(row, "delivered_at")?,
    })
}

async fn load_group(conn: &mut AnyConnection, id: GroupId) -> Result<GroupView> {
    let row =
        sqlx::query("SELECT id, name, state, created_at, finished_at FROM groups WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "group",
                id: id.to_string(),
            })?;
    let state: String = row.try_get("state")?;
    let group = GroupRecord {
        id: parse(&row, "id")?,
        name: row.try_get("name")?,
        state: GroupState::parse(&state).ok_or_else(|| corrupt(format!("group state {state}")))?,
        created_at: ts(&row, "created_at")?,
        finished_at: ts_opt(&row, "finished_at")?,
    };
    let rows = sqlx::query(&format!(
        "SELECT {} FROM jobs WHERE group_id = $1 ORDER BY group_position",
        jobs_json(engine_of(conn))
    ))
    .bind(id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    let jobs = rows.iter().map(job_from_row).collect::<Result<_>>()?;
    Ok(GroupView { group, jobs })
}

/// Inserts a validated job (in the caller's transaction), with its dependencies. A job whose
/// dependency already failed for good is skipped at once.
async fn insert_job(
    conn: &mut AnyConnection,
    spec: &JobSpec,
    group: Option<(GroupId, u32)>,
    extra_dependency: Option<JobId>,
    owner: Option<&str>,
    now: Timestamp,
) -> Result<JobRecord> {
    let mut deps: Vec<JobId> = spec.depends_on.clone();
    deps.extend(extra_dependency);
    deps.sort();
    deps.dedup();
    let mut waiting_on: i64 = 0;
    let mut failed_dependency = None;
    for dep in &deps {
        let row = sqlx::query("SELECT state, owner FROM jobs WHERE id = $1")
            .bind(dep.to_string())
            .fetch_optional(&mut *conn)
            .await?;
        let (state, dep_owner) = match &row {
            Some(row) => (
                Some(row.try_get::<String, _>("state")?),
                row.try_get::<Option<String>, _>("owner")?,
            ),
            None => (None, None),
        };
        // Another user's job is as good as absent: waiting on it would tell its outcome.
        let foreign = matches!((owner, dep_owner.as_deref()), (Some(me), Some(them)) if me != them);
        let state: JobState = state
            .filter(|_| !foreign)
            .ok_or_else(|| StoreError::Invalid {
                field: "depends_on",
                message: format!("job {dep} does not exist"),
            })?
            .parse()
            .map_err(corrupt)?;
        match state {
            JobState::Succeeded => {}
            s if s.is_terminal() => failed_dependency = Some((*dep, s)),
            _ => waiting_on += 1,
        }
    }
    if let Some(reservation) = spec.reservation {
        let row = sqlx::query("SELECT state, owner FROM reservations WHERE id = $1")
            .bind(reservation.to_string())
            .fetch_optional(&mut *conn)
            .await?;
        let (state, held_by) = match &row {
            Some(row) => (
                Some(row.try_get::<String, _>("state")?),
                row.try_get::<Option<String>, _>("owner")?,
            ),
            None => (None, None),
        };
        // A reservation's jobs jump the queue and use what it holds: only its owner's.
        if let (Some(held_by), Some(owner)) = (held_by.as_deref(), owner)
            && held_by != owner
        {
            return Err(StoreError::Invalid {
                field: "reservation",
                message: format!("reservation {reservation} belongs to another user"),
            });
        }
        match state.as_deref() {
            // A pending reservation's jobs wait with it and start when it is active.
            Some("ACTIVE" | "PENDING") => {}
            Some(other) => {
                return Err(StoreError::Invalid {
                    field: "reservation",
                    message: format!("reservation {reservation} is {other}"),
                });
            }
            None => {
                return Err(StoreError::Invalid {
                    field: "reservation",
                    message: format!("reservation {reservation} does not exist"),
                });
            }
        }
    }
    let job = new_job(spec.clone(), group, waiting_on as u32, owner, now);
    let id = job.id;
    insert_jobs(&mut *conn, std::slice::from_ref(&job)).await?;
    for dep in &deps {
        sqlx::query("INSERT INTO job_deps (job_id, depends_on) VALUES ($1, $2)")
            .bind(id.to_string())
            .bind(dep.to_string())
            .execute(&mut *conn)
            .await?;
    }
    let kind = EventKind::JobCreated {
        name: spec.name.clone(),
    };
    insert_event(&mut *conn, now, Some(id), None, &kind).await?;
    if let Some((dep, state)) = failed_dependency {
        skip_job(&mut *conn, &job, dep, state, now).await?;
        return load_job(conn, id).await;
    }
    Ok(job)
}

/// Stores one job, or finds the job its idempotency key already made (`false`).
async fn create_one(
    conn: &mut AnyConnection,
    spec: &JobSpec,
    owner: Option<&str>,
    now: Timestamp,
) -> Result<(JobRecord, bool)> {
    if let Some(key) = &spec.idempotency_key {
        let existing: Option<String> =
            sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(id) = existing {
            let job = load_job(conn, id.parse().map_err(corrupt)?).await?;
            return Ok((job, false));
        }
    }
    Ok((insert_job(conn, spec, None, None, owner, now).await?, true))
}

/// A job as stored by [`insert_jobs`], before anything happened to it.
fn new_job(
    spec: JobSpec,
    group: Option<(GroupId, u32)>,
    waiting_on: u32,
    owner: Option<&str>,
    now: Timestamp,
) -> JobRecord {
    JobRecord {
        id: JobId::new(),
        name: spec.name.clone(),
        state: JobState::Queued,
        status_code: JobState::Queued.status_code(),
        priority: spec.priority,
        attempts: 0,
        max_attempts: spec.max_attempts(),
        exit_code: None,
        error: None,
        not_before: now,
        current_run: None,
        group_id: group.map(|(g, _)| g),
        group_position: group.map(|(_, p)| p),
        waiting_on,
        created_at: now,
        updated_at: now,
        finished_at: None,
        spec,
        result: None,
        owner: owner.map(str::to_string),
    }
}

/// Writes new jobs (see [`new_job`]), many rows per statement.
async fn insert_jobs(conn: &mut AnyConnection, jobs: &[JobRecord]) -> Result<()> {
    const COLS: usize = 15;
    for chunk in jobs.chunks(ROWS_PER_STATEMENT) {
        let sql = binds_for(
            &*conn,
            format!(
                "INSERT INTO jobs (id, name, spec, state, priority, max_attempts, not_before, \
             idempotency_key, group_id, group_position, waiting_on, reservation_id, created_at, \
             updated_at, owner) VALUES {}",
                row_tuples(chunk.len(), COLS)
            ),
        );
        let mut query = sqlx::query(&sql);
        for job in chunk {
            query = query
                .bind(job.id.to_string())
                .bind(&job.name)
                .bind(serde_json::to_string(&job.spec).map_err(corrupt)?)
                .bind(job.state.as_str())
                .bind(i64::from(job.priority))
                .bind(i64::from(job.max_attempts))
                .bind(job.not_before.0)
                .bind(&job.spec.idempotency_key)
                .bind(job.group_id.map(|g| g.to_string()))
                .bind(job.group_position.map(i64::from))
                .bind(i64::from(job.waiting_on))
                .bind(job.spec.reservation.map(|r| r.to_string()))
                .bind(job.created_at.0)
                .bind(job.updated_at.0)
                .bind(&job.owner);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Webhooks as the outbox needs them: id and the events wanted (none = all).
type Hooks = Vec<(String, Vec<String>)>;

async fn load_hooks(conn: &mut AnyConnection) -> Result<Hooks> {
    let rows = sqlx::query("SELECT id, events FROM webhooks")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|hook| {
            let events: String = hook.try_get("events")?;
            let events: Vec<String> = serde_json::from_str(&events).map_err(corrupt)?;
            Ok((hook.try_get("id")?, events))
        })
        .collect()
}

/// Writes one outbox row per webhook that wants `event`, in the caller's transaction.
async fn enqueue_webhooks(
    conn: &mut AnyConnection,
    event: &str,
    key: &str,
    payload: &serde_json::Value,
    now: Timestamp,
) -> Result<()> {
    let hooks = load_hooks(&mut *conn).await?;
    enqueue_for(conn, &hooks, event, key, payload, now).await
}

async fn enqueue_for(
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

/// The webhook event and payload for an attempt that ended (or a job that never ran).
fn run_event(
    job: &JobRecord,
    run: Option<&RunRecord>,
    state: &str,
    will_retry: bool,
    now: Timestamp,
) -> (&'static str, String, serde_json::Value) {
    let event = match state {
        "SUCCEEDED" => webhook_events::COMPLETED,
        "TIMED_OUT" => webhook_events::TIMED_OUT,
        "CANCELLED" => webhook_events::CANCELLED,
        "SKIPPED" => webhook_events::SKIPPED,
        _ => webhook_events::FAILED,
    };
    let key = run
        .map(|r| r.id.to_string())
        .unwrap_or_else(|| job.id.to_string());
    let payload = serde_json::json!({
        "event": event,
        "run_id": run.map(|r| r.id),
        "job_id": job.id,
        "job_name": job.name,
        "attempt": run.map(|r| r.attempt),
        "state": state,
        "exit_code": run.and_then(|r| r.exit_code),
        "error": run.and_then(|r| r.error.clone()).or_else(|| job.error.clone()),
        "will_retry": will_retry,
        "group_id": job.group_id,
        "occurred_at": now,
    });
    (event, key, payload)
}

async fn skip_job(
    conn: &mut AnyConnection,
    job: &JobRecord,
    dependency: JobId,
    dependency_state: JobState,
    now: Timestamp,
) -> Result<()> {
    let error = format!("skipped: dependency {dependency} ended {dependency_state}");
    let kind = EventKind::JobStatusChanged {
        from: job.state,
        to: JobState::Skipped,
        run_id: None,
        exit_code: None,
        error: Some(error.clone()),
    };
    transition(&mut *conn, job, JobEvent::Skip, None, Some(kind), now).await?;
    sqlx::query("UPDATE jobs SET error = $1 WHERE id = $2")
        .bind(&error)
        .bind(job.id.to_string())
        .execute(&mut *conn)
        .await?;
    let job = load_job(&mut *conn, job.id).await?;
    let (event, key, payload) = run_event(&job, None, "SKIPPED", false, now);
    enqueue_webhooks(&mut *conn, event, &key, &payload, now).await?;
    Ok(())
}

/// After a job became final: releases or skips the jobs waiting on it (transitively) and
/// settles the groups involved, all in the caller's transaction.
async fn settle_final(conn: &mut AnyConnection, job: &JobRecord, now: Timestamp) -> Result<()> {
    let mut work = vec![(job.id, job.state, job.group_id)];
    let mut groups: Vec<GroupId> = Vec::new();
    while let Some((id, state, group)) = work.pop() {
        groups.extend(group);
        let dependents: Vec<String> =
            sqlx::query_scalar("SELECT job_id FROM job_deps WHERE depends_on = $1")
                .bind(id.to_string())
                .fetch_all(&mut *conn)
                .await?;
        for dependent in dependents {
            let dependent: JobId = dependent.parse().map_err(corrupt)?;
            if state == JobState::Succeeded {
                sqlx::query(
                    "UPDATE jobs SET waiting_on = waiting_on - 1 WHERE id = $1 AND waiting_on > 0",
                )
                .bind(dependent.to_string())
                .execute(&mut *conn)
                .await?;
                continue;
            }
            let d = load_job(&mut *conn, dependent).await?;
            if d.state == JobState::Queued {
                skip_job(&mut *conn, &d, id, state, now).await?;
                work.push((d.id, JobState::Skipped, d.group_id));
            }
        }
    }
    groups.sort();
    groups.dedup();
    for group in groups {
        settle_group(&mut *conn, group, now).await?;
    }
    Ok(())
}

/// Decides a group's final state once every member is final (in the same transaction as
/// the last member's change).
async fn settle_group(conn: &mut AnyConnection, id: GroupId, now: Timestamp) -> Result<()> {
    let view = load_group(&mut *conn, id).await?;
    if view.group.state != GroupState::Running || view.jobs.iter().any(|j| !j.state.is_terminal()) {
        return Ok(());
    }
    let state = if view.jobs.iter().all(|j| j.state == JobState::Succeeded) {
        GroupState::Completed
    } else if view.jobs.iter().any(|j| j.state == JobState::Cancelled) {
        GroupState::Cancelled
    } else {
        GroupState::Partial
    };
    sqlx::query("UPDATE groups SET state = $1, finished_at = $2 WHERE id = $3")
        .bind(state.as_str())
        .bind(now.0)
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
    let kind = EventKind::GroupFinished {
        group_id: id,
        state: state.as_str().to_string(),
    };
    insert_event(conn, now, None, None, &kind).await
}

/// What a batch of run ends shares: the records read up front (kept up to date as the
/// batch goes), the webhooks, which jobs others wait on, and the events to write.
struct FinishBatch {
    /// Steps of the same batch not written yet; written first at each flush.
    steps: StepWrites,
    runs: HashMap<RunId, RunRecord>,
    jobs: HashMap<JobId, JobRecord>,
    hooks: Hooks,
    awaited: std::collections::HashSet<JobId>,
    events: Vec<NewEvent>,
    /// Row changes not written yet, grouped by their values: most runs of a batch end
    /// alike (exit 0, no error), so a batch costs a few statements, not two per run.
    run_writes: HashMap<RunEndValues, Vec<RunId>>,
    job_writes: HashMap<JobEndValues, Vec<JobId>>,
    pending_jobs: std::collections::HashSet<JobId>,
    retry: RetrySettings,
    now: Timestamp,
}

#[derive(PartialEq, Eq, Hash)]
struct RunEndValues {
    state: RunState,
    exit_code: Option<i64>,
    error: Option<String>,
    result: Option<String>,
}

#[derive(PartialEq, Eq, Hash)]
struct JobEndValues {
    to: JobState,
    finished: bool,
    exit_code: Option<i64>,
    error: Option<String>,
    result: Option<String>,
    not_before: Option<i64>,
}

impl FinishBatch {
    async fn read(
        conn: &mut AnyConnection,
        batch: &[FinishRequest],
        retry: RetrySettings,
        mut loaded: Loaded,
        steps: StepWrites,
    ) -> Result<Self> {
        let run_ids: Vec<RunId> = batch.iter().map(|r| r.run_id).collect();
        loaded.read(&mut *conn, &run_ids).await?;
        let Loaded { runs, jobs, .. } = loaded;
        let mut job_ids: Vec<JobId> = run_ids
            .iter()
            .filter_map(|id| runs.get(id))
            .map(|r| r.job_id)
            .collect();
        job_ids.sort();
        job_ids.dedup();
        let hooks = load_hooks(&mut *conn).await?;
        let mut awaited = std::collections::HashSet::new();
        for chunk in job_ids.chunks(ROWS_PER_STATEMENT * 8) {
            let sql = binds_for(
                &*conn,
                format!(
                    "SELECT DISTINCT depends_on FROM job_deps WHERE depends_on IN ({})",
                    placeholders(1, chunk.len())
                ),
            );
            let mut query = sqlx::query_scalar::<_, String>(&sql);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            for id in query.fetch_all(&mut *conn).await? {
                awaited.insert(id.parse().map_err(corrupt)?);
            }
        }
        Ok(Self {
            now: steps.now,
            steps,
            runs,
            jobs,
            hooks,
            awaited,
            events: Vec::new(),
            run_writes: HashMap::new(),
            job_writes: HashMap::new(),
            pending_jobs: std::collections::HashSet::new(),
            retry,
        })
    }

    /// Writes the row changes and events gathered so far.
    async fn flush(&mut self, conn: &mut AnyConnection) -> Result<()> {
        // The steps' events are written with the ends': a job that started and ended in
        // this batch has its events of it in one row ([`event_rows`]).
        let mut events = std::mem::take(&mut self.steps.events);
        self.steps.write(&mut *conn).await?;
        let now = self.now.0;
        for (values, ids) in std::mem::take(&mut self.run_writes) {
            update_runs(
                &mut *conn,
                (
                    "state = $1, exit_code = $2, error = $3, finished_at = $4, \
                     started_at = COALESCE(started_at, $5), result = $6",
                    6,
                ),
                &|q| {
                    q.bind(values.state.as_str())
                        .bind(values.exit_code)
                        .bind(values.error.clone())
                        .bind(now)
                        .bind(now)
                        .bind(values.result.clone())
                },
                &ids,
                values.state,
                self.steps.ahead.as_mut(),
            )
            .await?;
        }
        self.pending_jobs.clear();
        for (values, ids) in std::mem::take(&mut self.job_writes) {
            update_jobs(
                &mut *conn,
                (
                    "state = $1, updated_at = $2, finished_at = $3, exit_code = $4, \
                     error = $5, result = $6, not_before = COALESCE($7, not_before)",
                    7,
                ),
                &|q| {
                    q.bind(values.to.as_str())
                        .bind(now)
                        .bind(values.finished.then_some(now))
                        .bind(values.exit_code)
                        .bind(values.error.clone())
                        .bind(values.result.clone())
                        .bind(values.not_before)
                },
                &ids,
                values.to,
                self.steps.ahead.as_mut(),
            )
            .await?;
        }
        events.append(&mut self.events);
        insert_events(&mut *conn, &events).await
    }

    /// Records one attempt's end (see `Store::finish_run`). Every refusal is found before
    /// anything is written, so a refused report leaves no trace and needs no savepoint; the
    /// outer error is the database's and fails the batch.
    async fn finish(
        &mut self,
        conn: &mut AnyConnection,
        req: FinishRequest,
    ) -> Result<Result<Finished>> {
        let now = self.now;
        let Some(mut run) = self.runs.get(&req.run_id).cloned() else {
            return Ok(Err(StoreError::NotFound {
                kind: "run",
                id: req.run_id.to_string(),
            }));
        };
        if req.worker_id.is_some_and(|w| w != run.worker_id) {
            return Ok(Err(StoreError::NotYourRun { run_id: run.id }));
        }
        let Some(mut job) = self.jobs.get(&run.job_id).cloned() else {
            return Ok(Err(StoreError::NotFound {
                kind: "job",
                id: run.job_id.to_string(),
            }));
        };
        if run.state.is_terminal() {
            return Ok(Ok(Finished {
                job,
                run,
                changed: false,
            }));
        }
        let end = req.end;
        // Decide: only the job's current attempt moves the job; a stale run just ends.
        let mut moves = Vec::new();
        let mut not_before = None;
        let mut to = job.state;
        if job.current_run == Some(run.id) && !job.state.is_terminal() {
            // A result whose start was never recorded still passes through RUNNING, so
            // that the event history stays a walk of the transition table.
            if to == JobState::Assigned && end.outcome != drover_core::RunOutcome::Failed {
                let next = match to.apply(JobEvent::Start) {
                    Ok(next) => next,
                    Err(e) => return Ok(Err(e.into())),
                };
                moves.push(EventKind::for_transition(
                    to,
                    JobEvent::Start,
                    next,
                    Some(run.id),
                    None,
                    None,
                ));
                to = next;
            }
            let retrying =
                end.outcome.is_retryable() && retry::should_retry(run.attempt, job.max_attempts);
            let (event, kind) = if retrying {
                let base = job
                    .spec
                    .backoff_base_ms
                    .map(Duration::from_millis)
                    .unwrap_or(self.retry.default_backoff_base);
                let at = now.plus(retry::backoff_delay(base, run.attempt, self.retry.jitter));
                not_before = Some(at);
                let kind = EventKind::JobRetryScheduled {
                    run_id: run.id,
                    next_attempt: run.attempt + 1,
                    not_before: at,
                    error: end.error.clone(),
                };
                (JobEvent::Retry, Some(kind))
            } else {
                (end.outcome.final_event(), None)
            };
            let next = match to.apply(event) {
                Ok(next) => next,
                Err(e) => return Ok(Err(e.into())),
            };
            moves.push(kind.unwrap_or_else(|| {
                EventKind::for_transition(
                    to,
                    event,
                    next,
                    Some(run.id),
                    end.exit_code,
                    end.error.clone(),
                )
            }));
            to = next;
        }
        // Write.
        let result = end
            .result
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(corrupt)?;
        run.state = end.outcome.run_state();
        run.exit_code = end.exit_code;
        run.error = end.error.clone();
        run.finished_at = Some(now);
        run.started_at = run.started_at.or(Some(now));
        run.result = end.result.clone();
        let values = RunEndValues {
            state: run.state,
            exit_code: end.exit_code.map(i64::from),
            error: end.error.clone(),
            result: result.clone(),
        };
        self.run_writes.entry(values).or_default().push(run.id);
        self.steps.forget_run(run.id);
        if !moves.is_empty() {
            self.steps.forget_job(job.id);
            if !self.pending_jobs.insert(job.id) {
                // The same job moving twice in a batch: the first move is written first.
                self.flush(&mut *conn).await?;
                self.pending_jobs.insert(job.id);
            }
            job.state = to;
            job.status_code = to.status_code();
            job.updated_at = now;
            job.finished_at = to.is_terminal().then_some(now);
            job.exit_code = end.exit_code;
            job.error = end.error.clone();
            job.result = end.result.clone();
            job.not_before = not_before.unwrap_or(job.not_before);
            let values = JobEndValues {
                to,
                finished: to.is_terminal(),
                exit_code: end.exit_code.map(i64::from),
                error: end.error.clone(),
                result,
                not_before: not_before.map(|t| t.0),
            };
            self.job_writes.entry(values).or_default().push(job.id);
            let events = moves
                .into_iter()
                .map(|kind| NewEvent::job(now, job.id, kind));
            self.events.extend(events);
        }
        // The payload is built only for a cluster that has webhooks: most batches have none.
        if !self.hooks.is_empty() {
            let will_retry = job.state == JobState::Queued;
            let (event, key, payload) =
                run_event(&job, Some(&run), run.state.as_str(), will_retry, now);
            enqueue_for(&mut *conn, &self.hooks, event, &key, &payload, now).await?;
        }
        if job.state.is_terminal()
            && job.current_run == Some(run.id)
            && (job.group_id.is_some() || self.awaited.contains(&job.id))
        {
            // Dependents and groups are settled with everything so far written, in order;
            // what that changes is read again from the store from here on.
            self.flush(&mut *conn).await?;
            // Settling reads and writes other jobs: the rows read ahead are checked first.
            self.steps.check_read_ahead(&mut *conn).await?;
            settle_final(&mut *conn, &job, now).await?;
            let job_ids: Vec<JobId> = self.jobs.keys().copied().collect();
            self.jobs = load_jobs(&mut *conn, &job_ids).await?;
            job = self.jobs.get(&job.id).cloned().unwrap_or(job);
        }
        self.runs.insert(run.id, run.clone());
        self.jobs.insert(job.id, job.clone());
        Ok(Ok(Finished {
            job,
            run,
            changed: true,
        }))
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn create_jobs(&self, batch: Vec<Submission>) -> Result<Vec<Result<(JobRecord, bool)>>> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let _timer = WriteTimer::start("submit");
        // Plain jobs (no key, dependency or reservation to look up) are written together
        // at the end; the others each in a savepoint, so that one refusal stays its own.
        let mut answers: Vec<Option<Result<(JobRecord, bool)>>> = Vec::with_capacity(batch.len());
        let mut plain = Vec::new();
        for Submission { spec, owner } in batch {
            if spec.idempotency_key.is_none()
                && spec.depends_on.is_empty()
                && spec.reservation.is_none()
            {
                plain.push(new_job(spec, None, 0, owner.as_deref(), now));
                answers.push(None);
                continue;
            }
            let mut one = sqlx::Connection::begin(&mut *tx).await?;
            let answer = create_one(&mut one, &spec, owner.as_deref(), now).await;
            if answer.is_ok() {
                one.commit().await?;
            } else {
                one.rollback().await?;
            }
            answers.push(Some(answer));
        }
        insert_jobs(&mut tx, &plain).await?;
        let events: Vec<NewEvent> = plain
            .iter()
            .map(|j| {
                NewEvent::job(
                    now,
                    j.id,
                    EventKind::JobCreated {
                        name: j.name.clone(),
                    },
                )
            })
            .collect();
        insert_events(&mut tx, &events).await?;
        tx.commit().await?;
        let mut plain = plain.into_iter();
        Ok(answers
            .into_iter()
            .map(|a| match a {
                Some(answer) => answer,
                None => plain
                    .next()
                    .map(|job| (job, true))
                    .ok_or_else(|| corrupt("a batch answer without its job")),
            })
            .collect())
    }

    async fn create_group_for(
        &self,
        name: &str,
        specs: Vec<JobSpec>,
        owner: Option<&str>,
    ) -> Result<GroupView> {
        let now = Timestamp::now();
        let id = GroupId::new();
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO groups (id, name, state, created_at, owner) \
             VALUES ($1, $2, 'RUNNING', $3, $4)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(now.0)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        let mut previous = None;
        for (position, spec) in specs.iter().enumerate() {
            let job = insert_job(
                &mut tx,
                spec,
                Some((id, position as u32)),
                previous,
                owner,
                now,
            )
            .await?;
            previous = Some(job.id);
        }
        settle_group(&mut tx, id, now).await?;
        let view = load_group(&mut tx, id).await?;
        tx.commit().await?;
        Ok(view)
    }

    async fn get_group(&self, id: GroupId) -> Result<GroupView> {
        let mut conn = self.reader.acquire().await?;
        load_group(&mut conn, id).await
    }

    async fn resubmit_run(&self, run_id: RunId) -> Result<JobRecord> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let run = load_run(&mut tx, run_id).await?;
        let job = load_job(&mut tx, run.job_id).await?;
        if job.current_run != Some(run_id) {
            return Err(StoreError::Conflict(format!(
                "run {run_id} is not the latest attempt of job {}; retry {} instead",
                job.id,
                job.current_run.map(|r| r.to_string()).unwrap_or_default()
            )));
        }
        if !matches!(
            job.state,
            JobState::Failed | JobState::TimedOut | JobState::Cancelled
        ) {
            return Err(StoreError::Conflict(format!(
                "job {} is {}; only a failed, timed out or cancelled job can be retried",
                job.id, job.state
            )));
        }
        let kind = EventKind::JobResubmitted {
            from: job.state,
            run_id,
            next_attempt: job.attempts + 1,
        };
        transition(
            &mut tx,
            &job,
            JobEvent::Resubmit,
            Some(run_id),
            Some(kind),
            now,
        )
        .await?;
        sqlx::query(
            "UPDATE jobs SET not_before = $1, max_attempts = CASE WHEN max_attempts > attempts THEN max_attempts ELSE attempts + 1 END              WHERE id = $2",
        )
        .bind(now.0)
        .bind(job.id.to_string())
        .execute(&mut *tx)
        .await?;
        if let Some(group) = job.group_id {
            sqlx::query("UPDATE groups SET state = 'RUNNING', finished_at = NULL WHERE id = $1")
                .bind(group.to_string())
                .execute(&mut *tx)
                .await?;
        }
        let job = load_job(&mut tx, job.id).await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn get_job(&self, id: JobId) -> Result<JobRecord> {
        let mut conn = self.reader.acquire().await?;
        load_job(&mut conn, id).await
    }

    async fn list_jobs_of(
        &self,
        state: Option<JobState>,
        owner: Option<&str>,
        limit: u32,
    ) -> Result<Vec<JobRecord>> {
        // The state is written into the statement (one of a fixed set of names): a bound
        // one could not be planned on `jobs_unsuccessful`, whose condition names states.
        let in_state = state
            .map(|s| format!("state = '{}'", s.as_str()))
            .unwrap_or_else(|| "TRUE".into());
        let rows = sqlx::query(&format!(
            "SELECT {} FROM jobs WHERE {in_state} \
             AND ($1 IS NULL OR owner = $1) ORDER BY id DESC LIMIT $2",
            jobs_json(self.engine)
        ))
        .bind(owner)
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn job_runs(&self, id: JobId) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM runs WHERE job_id = $1 ORDER BY attempt",
            runs_json(self.engine)
        ))
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn job_events(&self, id: JobId) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT seq, at, job_id, worker_id, data FROM events WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?;
        events_from_rows(&rows)
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
                    "UPDATE runs SET state = 'CANCELLED', error = $1, finished_at = $2 WHERE id = $3",
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
        sqlx::query("UPDATE jobs SET error = $1 WHERE id = $2")
            .bind(reason)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let job = load_job(&mut tx, id).await?;
        let (event, key, payload) = run_event(&job, run.as_ref(), "CANCELLED", false, now);
        enqueue_webhooks(&mut tx, event, &key, &payload, now).await?;
        settle_final(&mut tx, &job, now).await?;
        let job = load_job(&mut tx, id).await?;
        tx.commit().await?;
        Ok(Cancelled { job, run })
    }

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
                let spec: String = row.try_get("spec")?;
                let spec: JobSpec = serde_json::from_str(&spec).map_err(corrupt)?;
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
                let labels: String = row.try_get("labels")?;
                let config: String = row.try_get("config")?;
                Ok(NodeConfigRecord {
                    version: row.try_get::<i64, _>("version")? as u64,
                    node: parse_opt(row, "node_id")?,
                    labels: serde_json::from_str(&labels).map_err(corrupt)?,
                    config: serde_json::from_str(&config).map_err(corrupt)?,
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

    async fn count_users(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.writer)
            .await?;
        Ok(n as u64)
    }

    async fn create_user(&self, name: &str, role: Role, password_hash: &str) -> Result<UserRecord> {
        let now = Timestamp::now();
        let id = JobId::new().to_string();
        let taken: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.writer)
            .await?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "user {name:?} already exists"
            )));
        }
        sqlx::query(
            "INSERT INTO users (id, name, role, password_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(name)
        .bind(role.as_str())
        .bind(password_hash)
        .bind(now.0)
        .execute(&self.writer)
        .await?;
        Ok(UserRecord {
            id,
            name: name.to_string(),
            role,
            created_at: now,
        })
    }

    async fn user_by_name(&self, name: &str) -> Result<Option<(UserRecord, String)>> {
        let row = sqlx::query(
            "SELECT id, name, role, created_at, password_hash FROM users WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.reader)
        .await?;
        match row {
            Some(row) => Ok(Some((user_from_row(&row)?, row.try_get("password_hash")?))),
            None => Ok(None),
        }
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        let rows = sqlx::query("SELECT id, name, role, created_at FROM users ORDER BY name")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn issue_tokens(
        &self,
        user_id: &str,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Result<IssuedTokens> {
        let now = Timestamp::now();
        let family = JobId::new().to_string();
        let mut tx = self.writer.begin().await?;
        let pair = issue_pair(&mut tx, user_id, &family, access_ttl, refresh_ttl, now).await?;
        tx.commit().await?;
        Ok(pair)
    }

    async fn rotate_refresh(
        &self,
        refresh_token: &str,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Result<(UserRecord, IssuedTokens)> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "SELECT user_id, family, expires_at, used_at, revoked_at FROM auth_tokens \
             WHERE token_hash = $1 AND kind = 'refresh'",
        )
        .bind(sha256_hex(refresh_token))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::UserTokenRefused("unknown refresh token"))?;
        let family: String = row.try_get("family")?;
        let user_id: String = row.try_get("user_id")?;
        if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Err(StoreError::UserTokenRefused(
                "this refresh token was revoked",
            ));
        }
        if row.try_get::<i64, _>("expires_at")? < now.0 {
            return Err(StoreError::UserTokenRefused("this refresh token expired"));
        }
        // Conditional: of concurrent rotations of one token exactly one marks it used; the
        // others (PostgreSQL re-checks the row after the first commits) are reuse.
        let rotated = match row.try_get::<Option<i64>, _>("used_at")? {
            Some(_) => false,
            None => {
                sqlx::query(
                    "UPDATE auth_tokens SET used_at = $1 \
                     WHERE token_hash = $2 AND used_at IS NULL AND revoked_at IS NULL",
                )
                .bind(now.0)
                .bind(sha256_hex(refresh_token))
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1
            }
        };
        if !rotated {
            // Reuse: whoever holds the newer one and whoever replays this one are the same
            // login; neither is trusted any more. A rotation that won the race has
            // committed by now (this UPDATE waited for its lock), so its pair is revoked too.
            sqlx::query(
                "UPDATE auth_tokens SET revoked_at = $1 WHERE family = $2 AND revoked_at IS NULL",
            )
            .bind(now.0)
            .bind(&family)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Err(StoreError::UserTokenRefused(
                "this refresh token was already used; every token of its login is now revoked",
            ));
        }
        let user = load_user(&mut tx, &user_id).await?;
        let pair = issue_pair(&mut tx, &user_id, &family, access_ttl, refresh_ttl, now).await?;
        tx.commit().await?;
        Ok((user, pair))
    }

    async fn revoke_family(&self, token: &str) -> Result<UserRecord> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "SELECT user_id, family FROM auth_tokens WHERE token_hash = $1 \
             AND kind IN ('access', 'refresh')",
        )
        .bind(sha256_hex(token))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::UserTokenRefused("unknown token"))?;
        let family: String = row.try_get("family")?;
        let user_id: String = row.try_get("user_id")?;
        sqlx::query(
            "UPDATE auth_tokens SET revoked_at = $1 WHERE family = $2 AND revoked_at IS NULL",
        )
        .bind(now.0)
        .bind(&family)
        .execute(&mut *tx)
        .await?;
        let user = load_user(&mut tx, &user_id).await?;
        tx.commit().await?;
        Ok(user)
    }

    async fn authenticate_token_until(&self, token: &str) -> Result<(UserRecord, Timestamp)> {
        let now = Timestamp::now();
        let row = sqlx::query(
            "SELECT t.kind, t.expires_at, t.revoked_at, t.last_used_at, t.token_hash, \
             u.id, u.name, u.role, u.created_at FROM auth_tokens t \
             JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
        )
        .bind(sha256_hex(token))
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::UserTokenRefused("unknown token"))?;
        let kind: String = row.try_get("kind")?;
        if kind == "refresh" {
            return Err(StoreError::UserTokenRefused(
                "a refresh token only buys new tokens (POST /v1/auth/refresh)",
            ));
        }
        if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Err(StoreError::UserTokenRefused("this token was revoked"));
        }
        if row.try_get::<i64, _>("expires_at")? < now.0 {
            return Err(StoreError::UserTokenRefused("this token expired"));
        }
        if kind == "api" {
            // Last use to the minute: one write a minute per token, not one per request.
            let last: Option<i64> = row.try_get("last_used_at")?;
            if last.is_none_or(|t| now.0 - t > 60_000_000) {
                sqlx::query("UPDATE auth_tokens SET last_used_at = $1 WHERE token_hash = $2")
                    .bind(now.0)
                    .bind(row.try_get::<String, _>("token_hash")?)
                    .execute(&self.writer)
                    .await?;
            }
        }
        Ok((user_from_row(&row)?, ts(&row, "expires_at")?))
    }

    async fn create_api_token(
        &self,
        user_id: &str,
        name: &str,
        ttl: Duration,
    ) -> Result<(ApiTokenRecord, String)> {
        let now = Timestamp::now();
        let mut conn = self.writer.acquire().await?;
        let (id, token) =
            insert_token(&mut conn, "api", user_id, None, Some(name), ttl, now).await?;
        let row = sqlx::query(&format!(
            "SELECT {API_TOKEN_COLS} FROM auth_tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.id = $1"
        ))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        Ok((api_token_from_row(&row)?, token))
    }

    async fn list_api_tokens(&self, user_id: Option<&str>) -> Result<Vec<ApiTokenRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {API_TOKEN_COLS} FROM auth_tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.kind = 'api' AND ($1 IS NULL OR t.user_id = $1) ORDER BY t.id"
        ))
        .bind(user_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(api_token_from_row).collect()
    }

    async fn revoke_api_token(&self, id: &str, user_id: Option<&str>) -> Result<ApiTokenRecord> {
        let now = Timestamp::now();
        let done = sqlx::query(
            "UPDATE auth_tokens SET revoked_at = $1 WHERE id = $2 AND kind = 'api' \
             AND ($3 IS NULL OR user_id = $3) AND revoked_at IS NULL",
        )
        .bind(now.0)
        .bind(id)
        .bind(user_id)
        .execute(&self.writer)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {API_TOKEN_COLS} FROM auth_tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.id = $1 AND t.kind = 'api' AND ($2 IS NULL OR t.user_id = $2)"
        ))
        .bind(id)
        .bind(user_id)
        .fetch_optional(&self.writer)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "token",
            id: id.to_string(),
        })?;
        let token = api_token_from_row(&row)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "token {id} is already revoked"
            )));
        }
        Ok(token)
    }

    async fn audit(&self, entry: &AuditRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit (at, actor, action, target, outcome, address, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(entry.at.0)
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(&entry.outcome)
        .bind(&entry.address)
        .bind(&entry.detail)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditRecord>> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target, outcome, address, detail FROM audit \
             ORDER BY seq DESC LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        let mut out = rows
            .iter()
            .map(|row| {
                Ok(AuditRecord {
                    seq: row.try_get("seq")?,
                    at: ts(row, "at")?,
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    target: row.try_get("target")?,
                    outcome: row.try_get("outcome")?,
                    address: row.try_get("address")?,
                    detail: row.try_get("detail")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

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
        rows.iter()
            .map(|row| {
                let events: String = row.try_get("events")?;
                Ok(WebhookRecord {
                    id: parse(row, "id")?,
                    url: row.try_get("url")?,
                    events: serde_json::from_str(&events).map_err(corrupt)?,
                    created_at: ts(row, "created_at")?,
                })
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::{
        EVENTS_PER_ROW, NewEvent, SqlStore, event_rows, placeholders, row_tuples,
        sqlite_anonymous_binds,
    };
    use crate::{
        FinishRequest, Migrations, RetrySettings, RunEnd, RunStep, StepRequest, Store, StoreError,
    };
    use drover_core::{Capabilities, JobSpec, JobState, RunOutcome, RunState, Timestamp};
    use std::time::Duration;

    const RETRY: RetrySettings = RetrySettings {
        default_backoff_base: Duration::from_secs(10),
        jitter: 0.0,
    };

    async fn queued_job(store: &SqlStore) -> super::JobRecord {
        let spec = JobSpec {
            command: Some("true".into()),
            ..Default::default()
        };
        store.create_job(spec).await.unwrap().0
    }

    /// A SQLite store with one job assigned to a worker: (store, job, run, worker).
    async fn one_assigned_run() -> (
        SqlStore,
        tempfile::TempDir,
        drover_core::JobId,
        drover_core::RunId,
        drover_core::WorkerId,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("drover.db").display());
        let store = SqlStore::open(&url, Migrations::Apply).await.unwrap();
        let job = queued_job(&store).await;
        let token = store
            .create_join_token(Duration::from_secs(60))
            .await
            .unwrap();
        let (worker, _) = store
            .register_worker(&token.token, "w", &Capabilities::default())
            .await
            .unwrap();
        let later = Timestamp::now().plus(Duration::from_secs(60));
        let made = store.assign_job(job.id, worker.id, later).await.unwrap();
        let run = made.expect("assigned").run.id;
        (store, dir, job.id, run, worker.id)
    }

    fn succeeded(run_id: drover_core::RunId, worker_id: drover_core::WorkerId) -> FinishRequest {
        FinishRequest {
            run_id,
            worker_id: Some(worker_id),
            end: RunEnd {
                outcome: RunOutcome::Succeeded,
                exit_code: Some(0),
                error: None,
                result: None,
            },
        }
    }

    /// Read ahead and unchanged since, an assignment and a report are written as read:
    /// the guarded writes find every row they expect (a stale try would be an error here).
    #[tokio::test]
    async fn batches_read_ahead_are_written_as_read() {
        let (store, _dir, _, _, worker) = one_assigned_run().await;
        let job = queued_job(&store).await;
        let ahead = store.jobs_read_ahead(&[job.id]).await.unwrap();
        let later = Timestamp::now().plus(Duration::from_secs(60));
        let made = store
            .assign_in(&[(job.id, worker)], later, Some(ahead))
            .await
            .unwrap();
        let run = made[0].run.id;
        assert_eq!(store.get_job(job.id).await.unwrap(), made[0].job);

        let step = StepRequest {
            run_id: run,
            worker_id: worker,
            step: RunStep::AcceptAndStart,
        };
        let ahead = store.runs_read_ahead(&[run]).await.unwrap();
        let (stepped, _) = store
            .report_in(ahead, vec![step], Vec::new(), RETRY)
            .await
            .unwrap();
        assert_eq!(stepped[0].as_ref().ok(), Some(&job.id));
        assert_eq!(
            store.get_job(job.id).await.unwrap().state,
            JobState::Running
        );
        let ahead = store.runs_read_ahead(&[run]).await.unwrap();
        let (_, ended) = store
            .report_in(ahead, Vec::new(), vec![succeeded(run, worker)], RETRY)
            .await
            .unwrap();
        let ended = ended.into_iter().next().unwrap().unwrap();
        assert!(ended.changed);
        assert_eq!(store.get_job(job.id).await.unwrap(), ended.job);
        assert_eq!(ended.job.state, JobState::Succeeded);
        assert_eq!(store.get_run(run).await.unwrap().state, RunState::Succeeded);
    }

    /// A report whose run was cancelled after it was read ahead: the guarded write finds
    /// the run moved, the try writes nothing, and the report written again sees the
    /// cancellation (the run had ended: nothing changes).
    #[tokio::test]
    async fn a_report_read_ahead_of_a_cancel_is_written_again() {
        let (store, _dir, job, run, worker) = one_assigned_run().await;
        let stale = store.runs_read_ahead(&[run]).await.unwrap();
        store.cancel_job(job, "not wanted").await.unwrap();
        let events = store.job_events(job).await.unwrap().len();
        let tried = store
            .report_in(stale, Vec::new(), vec![succeeded(run, worker)], RETRY)
            .await;
        assert!(
            matches!(tried, Err(StoreError::ReadAheadStale)),
            "{tried:?}"
        );
        assert_eq!(store.get_run(run).await.unwrap().state, RunState::Cancelled);
        assert_eq!(store.job_events(job).await.unwrap().len(), events);

        let (_, ended) = store
            .report_runs(Vec::new(), vec![succeeded(run, worker)], RETRY)
            .await
            .unwrap();
        let ended = ended.into_iter().next().unwrap().unwrap();
        assert!(!ended.changed);
        assert_eq!(ended.job.state, JobState::Cancelled);
        assert_eq!(store.job_events(job).await.unwrap().len(), events);
    }

    /// An accept writes no row of its run or job: what it was decided on is counted as
    /// read before the commit, and a cancelled run is refused when written again.
    #[tokio::test]
    async fn an_accept_read_ahead_of_a_cancel_is_refused() {
        let (store, _dir, job, run, worker) = one_assigned_run().await;
        let stale = store.runs_read_ahead(&[run]).await.unwrap();
        store.cancel_job(job, "not wanted").await.unwrap();
        let events = store.job_events(job).await.unwrap().len();
        let accept = StepRequest {
            run_id: run,
            worker_id: worker,
            step: RunStep::Accept,
        };
        let tried = store
            .report_in(stale, vec![accept], Vec::new(), RETRY)
            .await;
        assert!(
            matches!(tried, Err(StoreError::ReadAheadStale)),
            "{tried:?}"
        );
        assert_eq!(store.job_events(job).await.unwrap().len(), events);

        let (stepped, _) = store
            .report_runs(vec![accept], Vec::new(), RETRY)
            .await
            .unwrap();
        assert!(
            matches!(stepped[0], Err(StoreError::Conflict(_))),
            "{stepped:?}"
        );
        assert_eq!(store.job_events(job).await.unwrap().len(), events);
    }

    /// A job cancelled after it was read ahead for assignment is not assigned: the try
    /// leaves no run behind, and the assignment done again leaves the job out.
    #[tokio::test]
    async fn an_assignment_read_ahead_of_a_cancel_leaves_the_job_out() {
        let (store, _dir, _, _, worker) = one_assigned_run().await;
        let job = queued_job(&store).await;
        let ahead = store.jobs_read_ahead(&[job.id]).await.unwrap();
        store.cancel_job(job.id, "not wanted").await.unwrap();
        let later = Timestamp::now().plus(Duration::from_secs(60));
        let tried = store
            .assign_in(&[(job.id, worker)], later, Some(ahead))
            .await;
        assert!(
            matches!(tried, Err(StoreError::ReadAheadStale)),
            "{tried:?}"
        );
        assert!(store.job_runs(job.id).await.unwrap().is_empty());

        let made = store.assign_jobs(&[(job.id, worker)], later).await.unwrap();
        assert!(made.is_empty());
        assert_eq!(
            store.get_job(job.id).await.unwrap().state,
            JobState::Cancelled
        );
        assert!(store.job_runs(job.id).await.unwrap().is_empty());
    }

    #[test]
    fn placeholder_lists_number_binds_in_order() {
        assert_eq!(placeholders(3, 3), "$3, $4, $5");
        assert_eq!(placeholders(1, 0), "");
        assert_eq!(row_tuples(2, 2), "($1, $2), ($3, $4)");
        assert_eq!(row_tuples(1, 1), "($1)");
    }

    #[test]
    fn binds_in_order_become_anonymous() {
        assert_eq!(
            sqlite_anonymous_binds("UPDATE t SET a = $1 WHERE id IN ($2, $3)").as_deref(),
            Some("UPDATE t SET a = ? WHERE id IN (?, ?)")
        );
        assert_eq!(
            sqlite_anonymous_binds("SELECT 1").as_deref(),
            Some("SELECT 1")
        );
    }

    #[test]
    fn binds_out_of_order_or_repeated_stay_named() {
        assert_eq!(sqlite_anonymous_binds("a = $2 AND b = $1"), None);
        assert_eq!(sqlite_anonymous_binds("a = $1 OR b = $1"), None);
        assert_eq!(sqlite_anonymous_binds("a = $1 AND b = $"), None);
    }

    /// A job's events of one report batch share a row; read back, each is there, in
    /// order, with a seq of its own.
    #[tokio::test]
    async fn a_jobs_events_of_one_batch_share_a_row() {
        let (store, _dir, job, run, worker) = one_assigned_run().await;
        let step = StepRequest {
            run_id: run,
            worker_id: worker,
            step: RunStep::AcceptAndStart,
        };
        let (stepped, ended) = store
            .report_runs(vec![step], vec![succeeded(run, worker)], RETRY)
            .await
            .unwrap();
        assert!(stepped[0].is_ok() && ended[0].is_ok());
        let events = store.job_events(job).await.unwrap();
        let types: Vec<&str> = events.iter().map(|e| e.kind.type_name()).collect();
        assert_eq!(
            types,
            [
                "JobCreated",
                "JobAssigned",
                "JobAccepted",
                "JobStatusChanged",
                "JobStatusChanged"
            ]
        );
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(events.iter().all(|e| e.job_id == Some(job)));
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE job_id = $1")
            .bind(job.to_string())
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(
            rows, 3,
            "created, assigned, and the report's three in one row"
        );
    }

    fn event(
        at: i64,
        job: Option<drover_core::JobId>,
        worker: Option<drover_core::WorkerId>,
    ) -> NewEvent {
        NewEvent {
            at: Timestamp(at),
            job_id: job,
            worker_id: worker,
            kind: drover_core::EventKind::JobCreated {
                name: String::new(),
            },
        }
    }

    /// Rows as the indexes of `events` they hold.
    fn grouping(events: &[NewEvent]) -> Vec<Vec<usize>> {
        let index = |kind: &drover_core::EventKind| {
            events
                .iter()
                .position(|e| std::ptr::eq(&e.kind, kind))
                .unwrap()
        };
        event_rows(events)
            .iter()
            .map(|row| row.kinds.iter().map(|k| index(k)).collect())
            .collect()
    }

    #[test]
    fn events_share_rows_by_job_and_instant_and_keep_their_order() {
        let (a, b) = (drover_core::JobId::new(), drover_core::JobId::new());
        let w = drover_core::WorkerId::new();
        // Interleaved jobs: each job's events in one row, rows in order of their first.
        let events = [
            event(1, Some(a), None),
            event(1, Some(b), None),
            event(1, Some(a), None),
        ];
        assert_eq!(grouping(&events), [vec![0, 2], vec![1]]);
        // An event naming a worker has its own row and closes its job's row: the job's
        // events stay in order when read back by seq.
        let events = [
            event(1, Some(a), None),
            event(1, Some(a), Some(w)),
            event(1, Some(a), None),
        ];
        assert_eq!(grouping(&events), [vec![0], vec![1], vec![2]]);
        // Worker events and events of other instants are rows of their own.
        let events = [
            event(1, None, Some(w)),
            event(1, None, Some(w)),
            event(1, Some(a), None),
            event(2, Some(a), None),
        ];
        assert_eq!(grouping(&events), [vec![0], vec![1], vec![2], vec![3]]);
        // A row holds at most EVENTS_PER_ROW.
        let events: Vec<NewEvent> = (0..EVENTS_PER_ROW + 2)
            .map(|_| event(1, Some(a), None))
            .collect();
        assert_eq!(
            grouping(&events),
            [
                (0..EVENTS_PER_ROW).collect::<Vec<_>>(),
                vec![EVENTS_PER_ROW, EVENTS_PER_ROW + 1]
            ]
        );
    }
}
