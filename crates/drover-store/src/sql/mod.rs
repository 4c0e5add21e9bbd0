//! The SQL engine, one implementation for SQLite and PostgreSQL through sqlx's `Any`
//! driver: the same statements (`$1` placeholders, which both accept), the same
//! transactions. What differs is set up in [`SqlStore::open`]: SQLite is one file in WAL
//! mode written through a single connection (so writes never contend for its lock inside
//! the process) and read through a pool of read-only connections; PostgreSQL is one pool,
//! and rows that a transaction will change are locked (`FOR UPDATE`) when read, so that
//! replicas never overwrite each other's changes.

use crate::prelude::*;
use crate::{
    ApiTokenRecord, Assignment, AuditRecord, Cancelled, ConfigAckRecord, DeliveryRecord,
    DeliveryState, EventRecord, FinishRequest, Finished, GroupRecord, GroupState, GroupView,
    IssuedTokens, JobRecord, JoinToken, LogIndex, NodeConfigRecord, ReadyJob, ReservationRecord,
    ReservationState, Result, RetrySettings, Role, RunRecord, RunReportAnswers, RunStep,
    StepRequest, StoreError, Submission, UserRecord, WebhookRecord, WorkerRecord, webhook_events,
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

mod access;
mod events;
mod jobs;
mod replicas;
mod reservations;
mod rows;
mod runs;
mod statements;
mod webhooks;
mod workers;
mod writes;

use access::*;
use events::*;
use jobs::*;
use rows::*;
use statements::*;
use webhooks::*;
use writes::*;

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

/// The least time between two checkpoints of [`Checkpoints`] (the WAL copied into the
/// database file).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL pages (4 KiB each: 128 MiB) past which the SQLite writer checkpoints itself on a
/// commit ([`Checkpoints`] says why it rarely has to, and why it still must).
const WRITER_CHECKPOINT_PAGES: u32 = 32_768;

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

/// The conformance suite's builders, shared so both build things the same way.
#[cfg(test)]
#[path = "../../tests/conformance/helpers.rs"]
mod test_helpers;

#[cfg(test)]
mod tests {
    use super::test_helpers::{NO_JITTER as RETRY, assigned_run, end, later, queued_job};
    use super::{
        EVENTS_PER_ROW, NewEvent, SqlStore, event_rows, placeholders, row_tuples,
        sqlite_anonymous_binds,
    };
    use crate::prelude::*;
    use crate::{Migrations, RunStep, StepRequest, StoreError};
    use drover_core::{JobState, RunOutcome, RunState};

    /// A SQLite store with one job assigned to a worker: (store, dir, job, run, worker).
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
        let (job, run, worker) = assigned_run(&store).await;
        (store, dir, job, run, worker)
    }

    fn succeeded(
        run_id: drover_core::RunId,
        worker_id: drover_core::WorkerId,
    ) -> crate::FinishRequest {
        crate::FinishRequest {
            run_id,
            worker_id: Some(worker_id),
            end: end(RunOutcome::Succeeded, 0),
        }
    }

    /// Read ahead and unchanged since, an assignment and a report are written as read:
    /// the guarded writes find every row they expect (a stale try would be an error here).
    #[tokio::test]
    async fn batches_read_ahead_are_written_as_read() {
        let (store, _dir, _, _, worker) = one_assigned_run().await;
        let job = store
            .get_job(queued_job(&store, "true").await)
            .await
            .unwrap();
        let ahead = store.jobs_read_ahead(&[job.id]).await.unwrap();
        let made = store
            .assign_in(&[(job.id, worker)], later(), Some(ahead))
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
        let job = store
            .get_job(queued_job(&store, "true").await)
            .await
            .unwrap();
        let ahead = store.jobs_read_ahead(&[job.id]).await.unwrap();
        store.cancel_job(job.id, "not wanted").await.unwrap();
        let later = later();
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
            at: drover_core::Timestamp(at),
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
