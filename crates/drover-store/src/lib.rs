//! The store: the only truth of drover (architecture invariant 1). The [`Store`] trait is
//! what the control plane uses; each engine (SQLite today) implements it and passes the one
//! conformance suite in `tests/`. Every state change and the event describing it are
//! written in one transaction (invariant 2).

// The test helpers shared with the conformance suite name this crate `drover_store`.
#[cfg(test)]
extern crate self as drover_store;

mod sql;

pub use drover_core::records::*;
pub use sql::{Engine, Migrations, SqlStore};

use async_trait::async_trait;
use drover_core::{
    Capabilities, EventKind, GroupId, JobEvent, JobId, JobSpec, JobState, NodeConfig,
    ReservationId, RunId, Timestamp, TransitionError, WorkerId, WorkerState,
};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// A worker's one-time join token is unknown, used or expired.
    #[error("join token refused: {0}")]
    JoinTokenRefused(&'static str),
    /// A node's credential is unknown, malformed or revoked.
    #[error("node credential refused")]
    NodeCredentialRefused,
    /// A user's access, refresh or API token is unknown, revoked or expired.
    #[error("{0}")]
    UserTokenRefused(&'static str),
    #[error("run {run_id} belongs to another worker")]
    NotYourRun { run_id: RunId },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot open the database {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{0}")]
    Schema(String),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A batched write failed as a whole (the database's error, shared by its requests).
    #[error("the store could not write: {0}")]
    BatchFailed(String),
    #[error("corrupt record in the store: {0}")]
    Corrupt(String),
    /// Rows read ahead of a write transaction changed before it wrote them. The store
    /// writes the batch again, reading inside the transaction; callers do not see it.
    #[error("records changed since they were read; the write is retried")]
    ReadAheadStale,
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl StoreError {
    /// The database could not be reached or went away (a restart, a network fault, a pool
    /// with no connection to give): the same write may succeed later, unlike a refusal.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // Connection exceptions (08…), the server shutting down or starting
                // (57P01–57P03), too many connections (53300).
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    code.starts_with("08")
                        || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
                }),
                _ => false,
            },
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Answers of [`Store::report_runs`]: one per step (the run's job), one per end.
pub type RunReportAnswers = (Vec<Result<JobId>>, Vec<Result<Finished>>);

/// A nudge from one control-plane replica to the others. Only a wake-up: the receiver
/// re-reads the store, so a lost one delays, never loses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind")]
pub enum Wakeup {
    /// Work became ready: run a dispatch pass.
    Dispatch,
    /// Tell this worker, if connected to you, to stop this run.
    Cancel { worker_id: WorkerId, run_id: RunId },
    /// Tell this worker, if connected to you, that this run is no longer its own.
    Forget { worker_id: WorkerId, run_id: RunId },
    /// These jobs reached a final state (many per notice: one each was a round trip per job).
    Jobs { job_ids: Vec<JobId> },
    /// This worker is being stopped by its provider: give it no new work.
    Drain { worker_id: WorkerId },
    /// This worker's credential was revoked: drop its stream.
    Revoke { worker_id: WorkerId },
    /// A node configuration version was added: send it to the nodes it concerns.
    Configs,
    /// Access or API tokens were revoked: forget the ones found valid before.
    TokensRevoked,
}

/// One attempt's end, as reported.
#[derive(Debug, Clone)]
pub struct FinishRequest {
    pub run_id: RunId,
    pub worker_id: Option<WorkerId>,
    pub end: RunEnd,
}

/// A worker's word on one of its runs before it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStep {
    /// The worker took the assignment.
    Accept,
    /// The work itself began.
    Start,
    /// Both at once: the worker took the assignment and began it before saying either, so
    /// one step records the accept and the start (one message, one write, not two).
    AcceptAndStart,
}

impl RunStep {
    /// The job events this step applies, in order.
    pub fn job_events(self) -> &'static [JobEvent] {
        match self {
            Self::Accept => &[JobEvent::Accept],
            Self::Start => &[JobEvent::Start],
            Self::AcceptAndStart => &[JobEvent::Accept, JobEvent::Start],
        }
    }
}

/// One [`RunStep`] as reported.
#[derive(Debug, Clone, Copy)]
pub struct StepRequest {
    pub run_id: RunId,
    pub worker_id: WorkerId,
    pub step: RunStep,
}

/// A validated spec to store as a job, on behalf of its owner.
#[derive(Debug, Clone)]
pub struct Submission {
    pub spec: JobSpec,
    pub owner: Option<String>,
}

/// The one answer of a batch of one.
fn only<T>(mut answers: Vec<Result<T>>) -> Result<T> {
    answers
        .pop()
        .unwrap_or_else(|| Err(StoreError::Corrupt("an empty batch answer".into())))
}

/// What the retry policy needs from the server's configuration.
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    /// Base of the exponential backoff when the job does not set its own.
    pub default_backoff_base: Duration,
    /// A number in [0, 1) drawn by the caller, so the store stays deterministic in tests.
    pub jitter: f64,
}

/// Jobs and groups: what users submit, read and cancel.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Stores a validated spec as a QUEUED job with its `JobCreated` event. With an
    /// idempotency key already used, returns the first job and `false`.
    async fn create_job(&self, spec: JobSpec) -> Result<(JobRecord, bool)> {
        self.create_job_for(spec, None).await
    }
    /// [`Store::create_job`] on behalf of a user, who then owns the job.
    async fn create_job_for(
        &self,
        spec: JobSpec,
        owner: Option<&str>,
    ) -> Result<(JobRecord, bool)> {
        let submission = Submission {
            spec,
            owner: owner.map(str::to_string),
        };
        only(self.create_jobs(vec![submission]).await?)
    }
    /// [`Store::create_job_for`] for many jobs in one transaction (submissions come in
    /// bursts); each gets its own answer, in order.
    async fn create_jobs(&self, batch: Vec<Submission>) -> Result<Vec<Result<(JobRecord, bool)>>>;
    /// Stores a group: its members run in order, each waiting for the one before.
    async fn create_group(&self, name: &str, specs: Vec<JobSpec>) -> Result<GroupView> {
        self.create_group_for(name, specs, None).await
    }
    async fn create_group_for(
        &self,
        name: &str,
        specs: Vec<JobSpec>,
        owner: Option<&str>,
    ) -> Result<GroupView>;
    async fn get_group(&self, id: GroupId) -> Result<GroupView>;
    /// Retries a finished attempt by hand: the job goes back to QUEUED for one more attempt.
    async fn resubmit_run(&self, run_id: RunId) -> Result<JobRecord>;
    async fn get_job(&self, id: JobId) -> Result<JobRecord>;
    async fn list_jobs(&self, state: Option<JobState>, limit: u32) -> Result<Vec<JobRecord>> {
        self.list_jobs_of(state, None, limit).await
    }
    /// Newest first; only `owner`'s when given.
    async fn list_jobs_of(
        &self,
        state: Option<JobState>,
        owner: Option<&str>,
        limit: u32,
    ) -> Result<Vec<JobRecord>>;
    async fn job_runs(&self, id: JobId) -> Result<Vec<RunRecord>>;
    async fn job_events(&self, id: JobId) -> Result<Vec<EventRecord>>;
    async fn get_run(&self, id: RunId) -> Result<RunRecord>;
    /// Cancels a job that is not finished. A job with a live run also gets that run
    /// recorded CANCELLED; the caller tells the worker to kill it.
    async fn cancel_job(&self, id: JobId, reason: &str) -> Result<Cancelled>;
}

/// Attempts: dispatch, the reports of workers, leases, and where each run's log is.
#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// QUEUED jobs whose backoff has passed and whose dependencies succeeded, highest
    /// priority then oldest first; `after` continues from the last (priority, id) seen.
    async fn ready_jobs(
        &self,
        now: Timestamp,
        after: Option<(i32, JobId)>,
        limit: u32,
    ) -> Result<Vec<ReadyJob>>;
    /// Hands a QUEUED job to a worker: a new run with a lease, `JobAssigned`. `None` when
    /// the job is no longer QUEUED (someone else took or cancelled it).
    async fn assign_job(
        &self,
        job_id: JobId,
        worker_id: WorkerId,
        lease_until: Timestamp,
    ) -> Result<Option<Assignment>> {
        Ok(self
            .assign_jobs(&[(job_id, worker_id)], lease_until)
            .await?
            .pop())
    }
    /// [`Store::assign_job`] for a whole dispatch plan in one transaction; the answer
    /// holds the assignments made, in plan order (a job no longer QUEUED is left out).
    async fn assign_jobs(
        &self,
        plan: &[(JobId, WorkerId)],
        lease_until: Timestamp,
    ) -> Result<Vec<Assignment>>;
    async fn accept_run(&self, run_id: RunId, worker_id: WorkerId) -> Result<()> {
        self.advance_run(run_id, worker_id, RunStep::Accept).await
    }
    async fn start_run(&self, run_id: RunId, worker_id: WorkerId) -> Result<()> {
        self.advance_run(run_id, worker_id, RunStep::Start).await
    }
    async fn advance_run(&self, run_id: RunId, worker_id: WorkerId, step: RunStep) -> Result<()> {
        let request = StepRequest {
            run_id,
            worker_id,
            step,
        };
        only(self.advance_runs(vec![request]).await?).map(|_| ())
    }
    /// Records accepts and starts of assigned runs, many in one transaction, in order (an
    /// accept and the start of the same run may share a batch); each answer is the run's
    /// job. A run must be the worker's own and still ASSIGNED.
    async fn advance_runs(&self, batch: Vec<StepRequest>) -> Result<Vec<Result<JobId>>>;
    /// Records how an attempt ended and applies the retry policy. `worker_id` is checked
    /// when given (a worker may end only its own runs); `None` is the control plane itself
    /// (lease expiry, recovery). Ending a run that already ended changes nothing.
    async fn finish_run(
        &self,
        run_id: RunId,
        worker_id: Option<WorkerId>,
        end: RunEnd,
        retry: RetrySettings,
    ) -> Result<Finished> {
        let request = FinishRequest {
            run_id,
            worker_id,
            end,
        };
        only(self.finish_runs(vec![request], retry).await?)
    }
    /// [`Store::finish_run`] for many runs in one transaction (completions come in bursts);
    /// each gets its own answer.
    async fn finish_runs(
        &self,
        batch: Vec<FinishRequest>,
        retry: RetrySettings,
    ) -> Result<Vec<Result<Finished>>>;
    /// Steps, then ends, of runs as workers reported them: [`Store::advance_runs`] and
    /// [`Store::finish_runs`] in one transaction (either list may be empty).
    async fn report_runs(
        &self,
        steps: Vec<StepRequest>,
        ends: Vec<FinishRequest>,
        retry: RetrySettings,
    ) -> Result<RunReportAnswers>;
    /// Extends the leases of every live run of these workers, and notes them seen.
    async fn renew_leases(&self, workers: &[WorkerId], until: Timestamp) -> Result<u64>;
    /// Extends every live lease (at start, so that workers get a whole lease to come back).
    async fn renew_all_leases(&self, until: Timestamp) -> Result<u64>;
    /// Live runs (ASSIGNED or RUNNING) whose lease ended before `now`.
    async fn expired_runs(&self, now: Timestamp) -> Result<Vec<RunRecord>>;
    async fn live_runs_of(&self, worker_id: WorkerId) -> Result<Vec<RunRecord>>;
    /// Every live run (ASSIGNED or RUNNING), of any worker.
    async fn live_runs(&self) -> Result<Vec<RunRecord>>;

    async fn log_index(&self, run_id: RunId) -> Result<Option<LogIndex>>;
    /// Records that the run's log file now holds `index` (size, entries, last sequence).
    async fn put_log_index(&self, index: &LogIndex) -> Result<()>;
}

/// Nodes: joining, their credentials and states, the workers providers start, and node configuration.
#[async_trait]
pub trait WorkerStore: Send + Sync + 'static {
    /// Mints a one-time join token; only its hash is kept.
    async fn create_join_token(&self, ttl: Duration) -> Result<JoinToken>;
    /// Trades a join token for a node: the token is spent in the same transaction.
    async fn register_worker(
        &self,
        token: &str,
        name: &str,
        capabilities: &Capabilities,
    ) -> Result<(WorkerRecord, String)>;
    async fn authenticate_worker(&self, credential: &str) -> Result<WorkerRecord>;
    /// Records a node's state as seen by one stream (`session`, unique per connection).
    async fn set_worker_state(
        &self,
        id: WorkerId,
        state: WorkerState,
        capabilities: Option<&Capabilities>,
        session: &str,
    ) -> Result<()>;
    async fn get_worker(&self, id: WorkerId) -> Result<WorkerRecord>;
    async fn list_workers(&self) -> Result<Vec<WorkerRecord>>;
    /// What happened to a worker: registration, connections, provisioning steps, its end.
    async fn worker_events(&self, id: WorkerId) -> Result<Vec<EventRecord>>;

    /// This installation's id, made on first use and shared by every replica: providers
    /// label what they create with it.
    async fn cluster_id(&self) -> Result<String>;
    /// Starts provisioning a worker of `provider`: a REGISTERING worker record (it exists
    /// before the worker does) and a one-time token that registers that very record,
    /// valid until `register_by`. Events `ProvisioningStarted` and the `token_minted` step.
    async fn begin_provisioning(
        &self,
        provider: &str,
        name: &str,
        register_by: Timestamp,
    ) -> Result<(WorkerRecord, JoinToken)>;
    /// Records what the provider created for the worker (the `resource_created` step).
    async fn set_worker_resource(&self, id: WorkerId, resource_id: &str) -> Result<()>;
    /// Appends an event that changes no state (a failed step, a removed orphan).
    async fn record_worker_event(&self, id: Option<WorkerId>, kind: &EventKind) -> Result<()>;
    /// Ends a worker for good (`TERMINATED`, or `LOST` when its resource vanished): its
    /// credential and unused token stop working, `event` is written. False if it had
    /// already ended.
    async fn end_worker(&self, id: WorkerId, state: WorkerState, event: &EventKind)
    -> Result<bool>;
    /// Workers of `provider` that have not ended, oldest first.
    async fn provided_workers(&self, provider: &str) -> Result<Vec<WorkerRecord>>;

    /// A new configuration version for one node or for the nodes matching `labels`.
    async fn put_node_config(
        &self,
        node: Option<WorkerId>,
        labels: &std::collections::BTreeMap<String, String>,
        config: &NodeConfig,
    ) -> Result<NodeConfigRecord>;
    /// Every configuration version, oldest first.
    async fn list_node_configs(&self) -> Result<Vec<NodeConfigRecord>>;
    /// Records a node's answer (`WorkerConfigAcked`); when it applied the version, its new
    /// capabilities are kept too.
    async fn ack_node_config(
        &self,
        worker_id: WorkerId,
        ack: &ConfigAckRecord,
        capabilities: Option<&Capabilities>,
    ) -> Result<()>;
}

/// Reservations of a node's named resource.
#[async_trait]
pub trait ReservationStore: Send + Sync + 'static {
    async fn create_reservation(
        &self,
        resource: &str,
        amount: u32,
        worker_id: WorkerId,
        ttl: Duration,
        owner: Option<&str>,
        state: ReservationState,
    ) -> Result<ReservationRecord>;
    async fn get_reservation(&self, id: ReservationId) -> Result<ReservationRecord>;
    /// Ends a pending or active reservation.
    async fn release_reservation(&self, id: ReservationId) -> Result<ReservationRecord>;
    /// Pending and active reservations, oldest first; those past their TTL are marked
    /// EXPIRED first.
    async fn live_reservations(&self, now: Timestamp) -> Result<Vec<ReservationRecord>>;
    /// A pending reservation becomes active: its TTL starts again from `now`. False when it
    /// was no longer pending.
    async fn activate_reservation(&self, id: ReservationId, now: Timestamp) -> Result<bool>;
}

/// Webhooks and the outbox of their deliveries.
#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    async fn add_webhook(
        &self,
        url: &str,
        secret: &str,
        events: &[String],
    ) -> Result<WebhookRecord>;
    async fn list_webhooks(&self) -> Result<Vec<WebhookRecord>>;
    /// Pending deliveries whose time has come, oldest first, with the webhook's secret; at
    /// most `per_webhook` of each webhook, so that one endpoint's backlog does not fill the
    /// page.
    async fn due_deliveries(
        &self,
        now: Timestamp,
        per_webhook: u32,
        limit: u32,
    ) -> Result<Vec<(DeliveryRecord, String)>>;
    /// Records one delivery attempt: delivered, or tried again at `retry_at` (None: give up).
    async fn record_delivery_attempt(
        &self,
        id: i64,
        status: Option<u16>,
        error: Option<&str>,
        delivered: bool,
        retry_at: Option<Timestamp>,
    ) -> Result<()>;
    async fn list_deliveries(&self, limit: u32) -> Result<Vec<DeliveryRecord>>;
}

/// What replicas of the control plane share: duties held by one, wake-ups for all.
#[async_trait]
pub trait ReplicaStore: Send + Sync + 'static {
    /// Takes or keeps the duty `name` for `holder` for `ttl`: true while `holder` has it.
    /// Duties that must run once across replicas (lease expiry, webhook delivery) are done
    /// only by their holder; when it dies, another takes over once the ttl lapses.
    async fn hold_duty(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool>;
    /// Tells the other replicas (PostgreSQL NOTIFY); nothing to do on SQLite.
    async fn publish(&self, wakeup: &Wakeup) -> Result<()>;
    /// What the other replicas publish; `None` where there can be no other replica.
    async fn listen(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Wakeup>>>;
}

/// Users, their tokens and the audit trail.
#[async_trait]
pub trait AccessStore: Send + Sync + 'static {
    async fn count_users(&self) -> Result<u64>;
    /// A new user; a taken name is a conflict.
    async fn create_user(&self, name: &str, role: Role, password_hash: &str) -> Result<UserRecord>;
    /// The user and their password hash.
    async fn user_by_name(&self, name: &str) -> Result<Option<(UserRecord, String)>>;
    async fn list_users(&self) -> Result<Vec<UserRecord>>;
    /// A login: an access and a refresh token in a new family.
    async fn issue_tokens(
        &self,
        user_id: &str,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Result<IssuedTokens>;
    /// Trades a refresh token for a new pair in its family. A refresh token presented a
    /// second time was stolen or replayed: the whole family is revoked and refused.
    async fn rotate_refresh(
        &self,
        refresh_token: &str,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Result<(UserRecord, IssuedTokens)>;
    /// Logout: revokes the family of this access or refresh token. Returns its user.
    async fn revoke_family(&self, token: &str) -> Result<UserRecord>;
    /// The user an access or API token speaks for, if it is valid now.
    async fn authenticate_token(&self, token: &str) -> Result<UserRecord> {
        Ok(self.authenticate_token_until(token).await?.0)
    }
    /// [`Store::authenticate_token`], with the moment the token expires.
    async fn authenticate_token_until(&self, token: &str) -> Result<(UserRecord, Timestamp)>;
    async fn create_api_token(
        &self,
        user_id: &str,
        name: &str,
        ttl: Duration,
    ) -> Result<(ApiTokenRecord, String)>;
    /// API tokens, of one user or (None) everyone's.
    async fn list_api_tokens(&self, user_id: Option<&str>) -> Result<Vec<ApiTokenRecord>>;
    /// Revokes an API token; `user_id` restricts it to that user's tokens.
    async fn revoke_api_token(&self, id: &str, user_id: Option<&str>) -> Result<ApiTokenRecord>;
    async fn audit(&self, entry: &AuditRecord) -> Result<()>;
    /// The newest `limit` audit records, newest last.
    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditRecord>>;
}

/// Everything the control plane keeps: one trait per aggregate, gathered. Callers bring the
/// aggregates they use into scope (`use drover_store::prelude::*` brings all).
pub trait Store:
    JobStore + RunStore + WorkerStore + ReservationStore + WebhookStore + ReplicaStore + AccessStore
{
}

impl<
    T: JobStore
        + RunStore
        + WorkerStore
        + ReservationStore
        + WebhookStore
        + ReplicaStore
        + AccessStore,
> Store for T
{
}

/// The store's traits, for `use drover_store::prelude::*`.
pub mod prelude {
    pub use crate::{
        AccessStore, JobStore, ReplicaStore, ReservationStore, RunStore, Store, WebhookStore,
        WorkerStore,
    };
}

/// Opens the store named by a URL (`sqlite://PATH` or `postgres://…`), applying migrations.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn Store>> {
    open_with(url, Migrations::Apply).await
}

pub async fn open_with(url: &str, migrations: Migrations) -> Result<std::sync::Arc<dyn Store>> {
    Ok(std::sync::Arc::new(SqlStore::open(url, migrations).await?))
}
