//! Providers start workers when jobs wait and stop them when they idle: `local` (child
//! processes of the control plane) and `docker` (a container per worker). Provisioning is a
//! recorded workflow: the worker record exists before the worker does, each step and its
//! retries are events, and what was created is destroyed (compensation) if the worker never
//! registers. Reconciliation compares the records with what the provider really has, so
//! nothing is left behind after a crash. One replica at a time does all of this (the
//! `providers` duty); everything it decides is read again from the store on each tick.

mod docker;
mod local;

use crate::AppState;
use drover_core::{EventKind, Timestamp, WorkerId, WorkerState};
use drover_store::{StoreError, Wakeup, WorkerRecord};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Local,
    Docker,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Docker => "docker",
        }
    }
}

/// One provider as configured at start (`--provider docker:max=4,idle=60s`).
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// Workers kept running even with nothing to do.
    pub min: u32,
    /// Workers this provider may have at once (registering ones included).
    pub max: u32,
    /// How long a worker may have no job before it is stopped.
    pub idle: Duration,
    /// Slots of each worker it starts.
    pub slots: u32,
    /// A worker that has not registered this long after it was asked for is destroyed.
    pub register_within: Duration,
    /// A worker that has reached no control plane this long stops its jobs and exits, and
    /// its container or process is gone: nothing it started lives on without a control
    /// plane. Longer than a control-plane restart.
    pub give_up_after: Duration,
    /// The address workers dial; default: the control plane's own.
    pub server_url: Option<String>,
    /// docker: the worker image (holding `/bin/drover`).
    pub image: String,
    /// docker: the network of worker containers (`host` reaches a loopback control plane).
    pub network: String,
    /// local: the `drover` binary to start (default: this one).
    pub binary: Option<PathBuf>,
}

impl ProviderConfig {
    pub fn new(kind: ProviderKind) -> Self {
        Self {
            kind,
            min: 0,
            max: 4,
            idle: Duration::from_secs(60),
            slots: 1,
            register_within: Duration::from_secs(60),
            give_up_after: Duration::from_secs(600),
            server_url: None,
            image: "drover-worker:latest".into(),
            network: "host".into(),
            binary: None,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind.as_str()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("docker: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("cannot start the local worker {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("unknown resource id {0:?}")]
    BadResource(String),
    #[error("the worker container did not start: {0}")]
    NotStarted(String),
}

/// What a provider is asked to start.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub worker_id: WorkerId,
    pub name: String,
    pub server_url: String,
    pub token: String,
    pub slots: u32,
    /// `drover worker --give-up-after`: see [`ProviderConfig::give_up_after`].
    pub give_up_after: Duration,
}

impl Launch {
    /// The `drover worker` arguments every provider passes.
    pub fn worker_args(&self, state_dir: &str) -> Vec<String> {
        vec![
            "worker".into(),
            "--name".into(),
            self.name.clone(),
            "--slots".into(),
            self.slots.to_string(),
            "--state-dir".into(),
            state_dir.into(),
            "--give-up-after".into(),
            format!("{}ms", self.give_up_after.as_millis()),
        ]
    }
}

/// Something a provider runs that is labelled as this control plane's.
#[derive(Debug, Clone)]
pub(crate) struct Resource {
    pub id: String,
    /// The worker record it was made for, from its label.
    pub worker_id: Option<WorkerId>,
}

#[async_trait::async_trait]
pub(crate) trait Provider: Send + Sync {
    /// Starts a worker; returns the resource id. A half-made resource is removed before
    /// an error is returned.
    async fn create(&self, launch: &Launch) -> Result<String, ProviderError>;
    /// Stops and removes a resource; one already gone is not an error.
    async fn destroy(&self, resource_id: &str) -> Result<(), ProviderError>;
    /// Every resource labelled as this control plane's (cluster id), running or not.
    async fn list(&self) -> Result<Vec<Resource>, ProviderError>;
}

/// A configured provider, ready to be asked.
pub(crate) struct Configured {
    pub config: ProviderConfig,
    provider: Box<dyn Provider>,
}

/// Connects a configured provider; one that cannot work (no Docker engine) stops the
/// control plane at start rather than leaving jobs waiting for it.
pub(crate) async fn connect(
    config: &ProviderConfig,
    cluster_id: &str,
    data_dir: &std::path::Path,
) -> Result<Configured, ProviderError> {
    let provider: Box<dyn Provider> = match config.kind {
        ProviderKind::Local => Box::new(local::LocalProvider::new(
            config,
            cluster_id,
            data_dir.join("providers/local"),
        )?),
        ProviderKind::Docker => {
            Box::new(docker::DockerProvider::connect(config, cluster_id).await?)
        }
    };
    Ok(Configured {
        config: config.clone(),
        provider,
    })
}

/// How often reconciliation runs besides at start.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// An unconstrained job waits this long for an existing worker before one is started.
const PATIENCE: Duration = Duration::from_secs(1);
const CREATE_ATTEMPTS: u32 = 3;

/// The providers duty: reconcile, compensate, scale up for waiting jobs, stop idle workers.
pub(crate) async fn run(state: Arc<AppState>, providers: Arc<[Configured]>) {
    if providers.is_empty() {
        return;
    }
    // Per provider: since when each of its workers has had nothing to do.
    let mut idle_since: Vec<HashMap<WorkerId, Instant>> = vec![HashMap::new(); providers.len()];
    let mut last_reconcile: Option<Instant> = None;
    let reconcile_every = state.config.reconcile_interval.unwrap_or(RECONCILE_EVERY);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !state.hold_duty("providers", Duration::from_secs(15)).await {
            last_reconcile = None;
            continue;
        }
        let reconcile = last_reconcile.is_none_or(|t| t.elapsed() >= reconcile_every);
        for (index, (p, idle_since)) in providers.iter().zip(&mut idle_since).enumerate() {
            let span = tracing::info_span!("provider", provider = p.config.name());
            let default = index == 0;
            let result = async {
                if reconcile {
                    reconcile_provider(&state, p).await?;
                }
                let workers = compensate_overdue(&state, p).await?;
                scale(&state, p, workers, default, idle_since).await
            }
            .instrument(span)
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "provider tick failed; trying again");
            }
        }
        if reconcile {
            last_reconcile = Some(Instant::now());
        }
    }
}

/// How long a stopping `drover up` waits for its provider workers' jobs to end before it
/// removes the workers anyway (their runs are then failed and retried by the next control
/// plane, through their leases).
const DRAIN_ON_STOP: Duration = Duration::from_secs(10);

/// On a graceful stop of `drover up`: every worker its providers started is drained (no new
/// work), given [`DRAIN_ON_STOP`] to finish its jobs, then ended and removed, so that
/// nothing it started outlives it.
pub(crate) async fn remove_all(state: &AppState, providers: &[Configured]) {
    let mut started = Vec::new();
    for p in providers {
        match state.store.provided_workers(p.config.name()).await {
            Ok(workers) => started.extend(
                workers
                    .into_iter()
                    .filter(|w| w.state != WorkerState::Terminated),
            ),
            Err(e) => {
                tracing::warn!(error = %e, provider = p.config.name(), "cannot list this provider's workers; reconciliation removes them at the next start")
            }
        }
    }
    tracing::info!(
        workers = started.len(),
        "stopping: removing the workers providers started (drover up --keep-workers keeps them)"
    );
    for w in &started {
        state.apply_here(&Wakeup::Drain { worker_id: w.id }).await;
    }
    let deadline = Instant::now() + DRAIN_ON_STOP;
    loop {
        let mut busy = 0;
        for w in &started {
            busy += state.store.live_runs_of(w.id).await.map_or(0, |r| r.len());
        }
        if busy == 0 || Instant::now() >= deadline {
            if busy > 0 {
                tracing::warn!(
                    runs = busy,
                    "stopping: jobs still running on provider workers are stopped; the next control plane retries them"
                );
            }
            break;
        }
        tracing::info!(
            runs = busy,
            "stopping: waiting for jobs on provider workers to end"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for w in &started {
        let event = EventKind::WorkerTerminated {
            reason: "the control plane stopped (drover up)".into(),
        };
        if let Err(e) = state
            .store
            .end_worker(w.id, WorkerState::Terminated, &event)
            .await
        {
            tracing::warn!(worker_id = %w.id, error = %e, "cannot end the worker's record");
        }
    }
    // Everything labelled as this cluster's goes, whatever its record says (a worker lost
    // earlier, a resource whose removal failed before).
    for p in providers {
        let resources = match p.provider.list().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, provider = p.config.name(), "cannot list this provider's resources; reconciliation removes them at the next start");
                continue;
            }
        };
        for r in resources {
            if let Err(e) = p.provider.destroy(&r.id).await {
                tracing::warn!(resource = %r.id, error = %e, "cannot remove a worker; reconciliation removes it at the next start");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TickError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

/// Records and reality agree afterwards: unknown resources are removed, records whose
/// resource vanished are LOST, a resource whose record missed its id gets it.
async fn reconcile_provider(state: &AppState, p: &Configured) -> Result<(), TickError> {
    let name = p.config.name();
    // Records first: a resource created after this read has a record made before it.
    let records = state.store.provided_workers(name).await?;
    let resources = p.provider.list().await?;
    let by_id: HashMap<WorkerId, &WorkerRecord> = records.iter().map(|w| (w.id, w)).collect();
    for r in &resources {
        let owner = match r.worker_id {
            Some(id) => match by_id.get(&id) {
                Some(w) => Some((*w).clone()),
                // Made after the records were read?
                None => match state.store.get_worker(id).await {
                    Ok(w) if w.state != WorkerState::Terminated && w.state != WorkerState::Lost => {
                        Some(w)
                    }
                    _ => None,
                },
            },
            None => None,
        };
        match owner {
            Some(w) if w.resource_id.is_none() => {
                // The control plane died between creating it and writing it down.
                tracing::info!(worker_id = %w.id, resource = %r.id, "adopting a resource");
                state.store.set_worker_resource(w.id, &r.id).await?;
            }
            Some(_) => {}
            None => {
                tracing::warn!(resource = %r.id, "removing a resource no live worker owns");
                p.provider.destroy(&r.id).await?;
                let event = EventKind::OrphanRemoved {
                    provider: name.to_string(),
                    resource_id: r.id.clone(),
                };
                state.store.record_worker_event(r.worker_id, &event).await?;
            }
        }
    }
    let present: HashSet<&str> = resources.iter().map(|r| r.id.as_str()).collect();
    for w in &records {
        if let Some(rid) = &w.resource_id
            && !present.contains(rid.as_str())
        {
            tracing::warn!(worker_id = %w.id, resource = %rid, "worker's resource is gone");
            let event = EventKind::WorkerLost {
                worker_id: w.id,
                reason: format!("its {name} resource {rid} is gone"),
            };
            state
                .store
                .end_worker(w.id, WorkerState::Lost, &event)
                .await?;
        }
    }
    Ok(())
}

/// Workers that did not register in time: destroy what was made for them. Returns the
/// provider's workers that are still live, for the rest of the tick.
async fn compensate_overdue(
    state: &AppState,
    p: &Configured,
) -> Result<Vec<WorkerRecord>, TickError> {
    let now = Timestamp::now();
    let mut live = Vec::new();
    for w in state.store.provided_workers(p.config.name()).await? {
        if w.state != WorkerState::Registering || w.created_at.plus(p.config.register_within) > now
        {
            live.push(w);
            continue;
        }
        if let Some(rid) = &w.resource_id
            && let Err(e) = p.provider.destroy(rid).await
        {
            // The record still says REGISTERING past its time: the next tick tries again.
            let failed = EventKind::ProvisioningStepFailed {
                step: "compensation".into(),
                attempt: 1,
                error: e.to_string(),
                will_retry: true,
            };
            state.store.record_worker_event(Some(w.id), &failed).await?;
            live.push(w);
            continue;
        }
        let event = EventKind::ProvisioningCompensated {
            reason: format!(
                "the worker did not register within {}",
                humantime_secs(p.config.register_within)
            ),
            resource_id: w.resource_id.clone(),
        };
        state
            .store
            .end_worker(w.id, WorkerState::Terminated, &event)
            .await?;
        tracing::warn!(worker_id = %w.id, "provisioning compensated: never registered");
    }
    Ok(live)
}

fn humantime_secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// Starts workers for waiting jobs (and up to `min`), stops those idle past `idle`.
async fn scale(
    state: &AppState,
    p: &Configured,
    workers: Vec<WorkerRecord>,
    default: bool,
    idle_since: &mut HashMap<WorkerId, Instant>,
) -> Result<(), TickError> {
    let config = &p.config;
    let mut busy: HashMap<WorkerId, u32> = HashMap::new();
    for run in state.store.live_runs().await? {
        *busy.entry(run.worker_id).or_default() += 1;
    }
    let slots = config.slots.max(1);
    let registering = workers
        .iter()
        .filter(|w| w.state == WorkerState::Registering)
        .count() as u32;
    let free_slots: u32 = workers
        .iter()
        .filter(|w| w.state == WorkerState::Ready)
        .map(|w| slots.saturating_sub(busy.get(&w.id).copied().unwrap_or(0)))
        .sum();
    let demand = waiting_jobs_for(state, config, default).await?;
    let uncovered = demand.saturating_sub(free_slots + registering * slots);
    let count = workers.len() as u32;
    let wanted = uncovered
        .div_ceil(slots)
        .max(config.min.saturating_sub(count))
        .min(config.max.saturating_sub(count));
    for _ in 0..wanted {
        provision(state, p).await?;
    }
    // Stop idle workers beyond `min`, and workers gone silent as long.
    let mut remaining = count + wanted;
    for w in &workers {
        if w.state == WorkerState::Registering || busy.contains_key(&w.id) {
            idle_since.remove(&w.id);
            continue;
        }
        let since = *idle_since.entry(w.id).or_insert_with(Instant::now);
        if since.elapsed() < config.idle || remaining <= config.min {
            continue;
        }
        tracing::debug!(worker_id = %w.id, "terminating");
        if terminate(state, p, w, "idle").await? {
            idle_since.remove(&w.id);
            remaining -= 1;
        }
    }
    idle_since.retain(|id, _| workers.iter().any(|w| w.id == *id));
    Ok(())
}

/// Ready jobs this provider's workers would run: those asking for it, and (for the first
/// provider) those asking for none that have waited a moment for an existing worker.
async fn waiting_jobs_for(
    state: &AppState,
    config: &ProviderConfig,
    default: bool,
) -> Result<u32, StoreError> {
    let now = Timestamp::now();
    let patience = now.0 - PATIENCE.as_micros() as i64;
    let jobs = state.store.ready_jobs(now, None, 1000).await?;
    let count = jobs
        .iter()
        .filter(|j| match &j.provider {
            Some(p) => p == config.name(),
            None => {
                default
                    && j.labels.is_empty()
                    && j.resources.is_empty()
                    && j.reservation.is_none()
                    && (config.kind == ProviderKind::Local
                        || j.isolation == drover_core::Isolation::Process)
                    && j.id.created_at().is_some_and(|t| t.0 <= patience)
            }
        })
        .count();
    Ok(count as u32)
}

/// The provisioning workflow for one worker: record, token, resource (with retries).
async fn provision(state: &AppState, p: &Configured) -> Result<(), TickError> {
    let config = &p.config;
    let register_by = Timestamp::now().plus(config.register_within);
    let name = format!("{}-{}", config.name(), &WorkerId::new().to_string()[24..]);
    let (worker, token) = state
        .store
        .begin_provisioning(config.name(), &name, register_by)
        .await?;
    let span = tracing::info_span!("worker", worker_id = %worker.id);
    span.in_scope(|| tracing::info!(name = %name, "provisioning a worker"));
    let launch = Launch {
        worker_id: worker.id,
        name,
        server_url: config
            .server_url
            .clone()
            .unwrap_or_else(|| state.advertise_url()),
        token: token.token,
        slots: config.slots.max(1),
        give_up_after: config.give_up_after,
    };
    let mut last_error = String::new();
    for attempt in 1..=CREATE_ATTEMPTS {
        match p.provider.create(&launch).await {
            Ok(resource_id) => {
                tracing::info!(worker_id = %worker.id, resource = %resource_id, "worker resource created");
                state
                    .store
                    .set_worker_resource(worker.id, &resource_id)
                    .await?;
                return Ok(());
            }
            Err(e) => {
                last_error = e.to_string();
                let will_retry = attempt < CREATE_ATTEMPTS;
                tracing::warn!(worker_id = %worker.id, error = %e, attempt, will_retry, "cannot create the worker");
                let failed = EventKind::ProvisioningStepFailed {
                    step: "resource_created".into(),
                    attempt,
                    error: last_error.clone(),
                    will_retry,
                };
                state
                    .store
                    .record_worker_event(Some(worker.id), &failed)
                    .await?;
                if will_retry {
                    tokio::time::sleep(Duration::from_millis(500) * attempt).await;
                }
            }
        }
    }
    let failed = EventKind::ProvisioningFailed { error: last_error };
    state
        .store
        .end_worker(worker.id, WorkerState::Terminated, &failed)
        .await?;
    Ok(())
}

/// Stops a worker: no new work, then its record ends (so that its stream closing is not
/// taken for a loss), then its resource goes. False when it picked up work meanwhile (it is
/// stopped once idle again). A resource that outlives a failed removal belongs to an ended
/// worker, which is what reconciliation removes: the record is what carries the retry.
async fn terminate(
    state: &AppState,
    p: &Configured,
    w: &WorkerRecord,
    why: &str,
) -> Result<bool, TickError> {
    state
        .tell_everywhere(Wakeup::Drain { worker_id: w.id })
        .await;
    if !state.store.live_runs_of(w.id).await?.is_empty() {
        return Ok(false);
    }
    let event = EventKind::WorkerTerminated {
        reason: format!("{why} for {}", humantime_secs(p.config.idle)),
    };
    if !state
        .store
        .end_worker(w.id, WorkerState::Terminated, &event)
        .await?
    {
        return Ok(true);
    }
    if let Some(rid) = &w.resource_id
        && let Err(e) = p.provider.destroy(rid).await
    {
        tracing::warn!(worker_id = %w.id, error = %e, "cannot remove the worker's resource yet");
        let failed = EventKind::ProvisioningStepFailed {
            step: "destroy".into(),
            attempt: 1,
            error: e.to_string(),
            will_retry: true,
        };
        state.store.record_worker_event(Some(w.id), &failed).await?;
    }
    tracing::info!(worker_id = %w.id, "worker terminated");
    Ok(true)
}

/// What `GET /v1/providers` shows.
pub(crate) fn describe(config: &ProviderConfig) -> serde_json::Value {
    serde_json::json!({
        "name": config.name(),
        "min": config.min,
        "max": config.max,
        "idle_seconds": config.idle.as_secs_f64(),
        "slots": config.slots,
        "register_within_seconds": config.register_within.as_secs_f64(),
        "image": (config.kind == ProviderKind::Docker).then_some(&config.image),
    })
}
