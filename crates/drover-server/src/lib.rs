//! drover's control plane: the HTTP and gRPC APIs on one port, the scheduler, worker
//! sessions with their leases, and the log files. Everything it holds in memory is derived
//! from the store and rebuilt on start.

mod auth;
mod batcher;
mod error;
mod extract;
mod grpc;
mod http;
mod jobs;
mod listener;
mod log_stream;
mod logs;
mod nodes;
mod openai;
pub mod openapi;
pub mod providers;
mod replicas;
mod reservations;
mod run_reports;
mod scheduler;
mod sessions;
mod submissions;
mod webhooks;

pub use error::ApiError;
pub use http::{Access, RouteInfo, route_table};

use drover_core::{JobId, JobState, RunId, Timestamp};
use drover_store::{RetrySettings, Store};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Log files and, unless `database_url` is given, the SQLite database.
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    /// Apply missing migrations at start (otherwise refuse a schema that is behind).
    pub migrate: bool,
    /// How long an assignment stays a worker's without a heartbeat.
    pub lease: Duration,
    pub default_backoff_base: Duration,
    /// First retry delay of a webhook delivery; doubles per attempt, up to 10 minutes.
    pub webhook_backoff_base: Duration,
    /// Attempts per delivery before it is marked FAILED.
    pub webhook_max_attempts: u32,
    /// Providers that start workers on demand; the first also serves jobs that name none.
    pub providers: Vec<providers::ProviderConfig>,
    /// How often providers' records are reconciled with what they run (default 30 s).
    pub reconcile_interval: Option<Duration>,
    /// How long an access token lives (15 minutes by default) and a refresh token (30 days).
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// The first admin's password, when the store has no user yet; `None` generates one
    /// and prints it once.
    pub admin_password: Option<String>,
    /// Serve TLS with this certificate chain and private key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Not ready (`/readyz` 503) while no connected node serves a model.
    pub require_inference: bool,
    /// The isolation modes plain users' command jobs may ask for (admins may ask for any).
    /// Without `process`: a process job has the worker's rights, and a worker run as root,
    /// or as the admin's own account, would hand those to any user.
    pub user_isolation: Vec<drover_core::Isolation>,
    /// Live (active or pending) reservations a plain user may hold at once (admins: any):
    /// a reservation keeps its resource from everyone else's queued jobs.
    pub reservations_per_user: u32,
    /// The longest TTL a plain user may ask of a reservation (admins: up to 24 h).
    pub user_reservation_ttl: Duration,
    /// On a graceful stop, drain and remove the workers providers started (`drover up`);
    /// otherwise they keep running for a restart or another replica to adopt.
    pub remove_workers_on_stop: bool,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            database_url: None,
            migrate: true,
            lease: Duration::from_secs(30),
            default_backoff_base: Duration::from_secs(10),
            webhook_backoff_base: Duration::from_secs(1),
            webhook_max_attempts: 12,
            providers: Vec::new(),
            reconcile_interval: None,
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            admin_password: None,
            tls: None,
            require_inference: false,
            user_isolation: vec![
                drover_core::Isolation::Sandbox,
                drover_core::Isolation::Container,
            ],
            reservations_per_user: 2,
            user_reservation_ttl: Duration::from_secs(3600),
            remove_workers_on_stop: false,
        }
    }

    pub(crate) fn heartbeat_interval(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(100))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the store: {0}")]
    Store(#[from] drover_store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot use the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] listener::TlsError),
    #[error("cannot create the first admin: {0}")]
    Admin(String),
    #[error("--provider {provider}: {source}")]
    Provider {
        provider: &'static str,
        source: providers::ProviderError,
    },
}

/// Something changed; followers re-read the store. Notices only wake readers: the data
/// always comes from the store and the log files, so a missed notice delays, never loses.
#[derive(Debug, Clone)]
pub(crate) enum Notice {
    Job { job_id: JobId },
    Log { run_id: RunId },
}

/// What every API handler answers.
pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// The state every handler extracts.
pub(crate) type SharedState = axum::extract::State<Arc<AppState>>;

pub(crate) struct AppState {
    pub store: Arc<dyn Store>,
    pub config: ServerConfig,
    pub sessions: sessions::Sessions,
    pub notices: broadcast::Sender<Notice>,
    pub logs: logs::LogFiles,
    pub dispatch: Notify,
    /// Where API calls and sessions hand the hot writes, to be written in batches.
    pub submissions: batcher::Batcher<Vec<drover_store::Submission>, submissions::Submitted>,
    pub run_reports: batcher::Batcher<run_reports::RunReport, run_reports::Written>,
    /// Wakes the webhook sender when an event was written.
    pub webhooks: Notify,
    pub metrics: PrometheusHandle,
    /// Bearer tokens found valid a moment ago (see `auth::TokenCache`).
    pub tokens: auth::TokenCache,
    /// Runs that were live when this process started: if their lease lapses, it is because
    /// their worker did not come back after the restart.
    pub recovered: std::sync::Mutex<HashSet<RunId>>,
    /// Set when the store was found unavailable: leases could not be renewed meanwhile, so
    /// the lease sweeper gives every live lease one more lease before it sweeps again.
    pub store_outage: std::sync::atomic::AtomicBool,
    /// When an API call last found the store unavailable (µs since the epoch, 0: never):
    /// for a second after, calls are answered 503 at once instead of each waiting for the
    /// database (`http::store_breaker`).
    pub store_unavailable_at: std::sync::atomic::AtomicI64,
    /// This replica's name when it holds duties.
    pub replica: String,
    /// The address this control plane is reached at, for workers it starts.
    pub advertised: String,
    /// Failed logins, to slow password guessing.
    pub logins: auth::LoginLimiter,
    /// Held by whoever decides who gets a named resource (a dispatch pass that reads
    /// reservations, a reservation being granted), so that two such decisions never both
    /// give away the same free unit.
    pub resource_plan: tokio::sync::Mutex<()>,
    /// Set while a reservation of a worker of this replica waits for its resource: dispatch
    /// passes then admit reservations even when no queued job needs a resource.
    pub reservations_waiting: std::sync::atomic::AtomicBool,
    last_dispatch_nudge: std::sync::atomic::AtomicI64,
    /// Jobs just final, to be announced to the other replicas (see `replicas::publish_final_jobs`).
    final_jobs: tokio::sync::mpsc::UnboundedSender<JobId>,
}

impl AppState {
    pub fn notify_job(&self, job_id: JobId, state: JobState) {
        let _ = self.notices.send(Notice::Job { job_id });
        if state.is_terminal() {
            // Waiters on other replicas: best effort, they also re-read every second.
            let _ = self.final_jobs.send(job_id);
            metrics::counter!("drover_jobs_finished_total", "state" => state.as_str()).increment(1);
        }
    }

    pub fn retry_settings(&self) -> RetrySettings {
        RetrySettings {
            default_backoff_base: self.config.default_backoff_base,
            jitter: rand::random::<f64>(),
        }
    }

    /// Holds `duty` for this replica; true while it is ours.
    pub async fn hold_duty(&self, duty: &str, ttl: Duration) -> bool {
        match self.store.hold_duty(duty, &self.replica, ttl).await {
            Ok(held) => held,
            Err(e) => {
                self.note_store_error(&e);
                tracing::warn!(error = %e, duty, "cannot hold a duty");
                false
            }
        }
    }

    /// Remembers an outage of the store (see `store_outage`).
    pub fn note_store_error(&self, e: &drover_store::StoreError) {
        if e.is_unavailable() {
            self.store_outage
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// True (once) if the run was live when this process started.
    pub fn take_recovered(&self, run_id: RunId) -> bool {
        self.recovered
            .lock()
            .map(|mut set| set.remove(&run_id))
            .unwrap_or(false)
    }

    pub fn advertise_url(&self) -> String {
        self.advertised.clone()
    }

    pub fn lease_until(&self) -> Timestamp {
        Timestamp::now().plus(self.config.lease)
    }
}

fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, which then keeps the figures.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The writing ends of the batchers in [`AppState`], started by [`Server::serve`].
struct Writers {
    submissions: batcher::Gathered<Vec<drover_store::Submission>, submissions::Submitted>,
    run_reports: batcher::Gathered<run_reports::RunReport, run_reports::Written>,
    final_jobs: tokio::sync::mpsc::UnboundedReceiver<JobId>,
}

/// A bound, recovered control plane, ready to serve.
pub struct Server {
    state: Arc<AppState>,
    listener: TcpListener,
    writers: Writers,
    providers: Arc<[providers::Configured]>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Server {
    /// Opens the store (applying migrations), recovers leases, and binds the listener.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let files = listener::raise_file_limit();
        tracing::debug!(
            files,
            connections = listener::max_connections(),
            "file limit"
        );
        // Made private (the database, log files and API address are the control plane's);
        // a directory that exists keeps the mode its owner gave it.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&config.data_dir)
            .map_err(|source| ServerError::DataDir {
                path: config.data_dir.clone(),
                source,
            })?;
        let url = config
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", config.data_dir.join("drover.db").display()));
        let mode = if config.migrate {
            drover_store::Migrations::Apply
        } else {
            drover_store::Migrations::Check
        };
        let store = drover_store::open_with(&url, mode).await?;
        // Recovery: runs that were live when the last process died get one whole lease
        // for their workers to come back; the lease sweeper fails the rest.
        let renewed = store
            .renew_all_leases(Timestamp::now().plus(config.lease))
            .await?;
        let recovered: HashSet<RunId> =
            store.live_runs().await?.into_iter().map(|r| r.id).collect();
        if renewed > 0 {
            tracing::info!(
                runs = renewed,
                "waiting one lease for workers of live runs to reconnect"
            );
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let logs =
            logs::LogFiles::new(config.data_dir.join("logs"), store.clone()).map_err(|source| {
                ServerError::DataDir {
                    path: config.data_dir.join("logs"),
                    source,
                }
            })?;
        ensure_first_admin(store.as_ref(), config.admin_password.as_deref()).await?;
        let providers = if config.providers.is_empty() {
            Vec::new()
        } else {
            let cluster_id = store.cluster_id().await?;
            let mut connected = Vec::new();
            for p in &config.providers {
                let one = providers::connect(p, &cluster_id, &config.data_dir)
                    .await
                    .map_err(|source| ServerError::Provider {
                        provider: p.name(),
                        source,
                    })?;
                connected.push(one);
            }
            connected
        };
        let tls = match &config.tls {
            Some((cert, key)) => Some(listener::tls_config(cert, key)?),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let bound = listener.local_addr().unwrap_or(config.listen);
        let advertised = if bound.ip().is_unspecified() {
            format!("{scheme}://127.0.0.1:{}", bound.port())
        } else {
            format!("{scheme}://{bound}")
        };
        let (notices, _) = broadcast::channel(4096);
        let (submissions, submissions_gathered) = batcher::batcher("submissions");
        let (run_reports, run_reports_gathered) = batcher::batcher_retrying("run reports");
        let (final_jobs, final_jobs_to_publish) = tokio::sync::mpsc::unbounded_channel();
        let state = Arc::new(AppState {
            store,
            config,
            sessions: sessions::Sessions::default(),
            notices,
            logs,
            dispatch: Notify::new(),
            submissions,
            run_reports,
            webhooks: Notify::new(),
            metrics: prometheus(),
            tokens: auth::TokenCache::default(),
            recovered: std::sync::Mutex::new(recovered),
            store_outage: std::sync::atomic::AtomicBool::new(false),
            store_unavailable_at: std::sync::atomic::AtomicI64::new(0),
            replica: format!("replica-{}", drover_core::JobId::new()),
            advertised,
            logins: auth::LoginLimiter::default(),
            resource_plan: tokio::sync::Mutex::new(()),
            reservations_waiting: std::sync::atomic::AtomicBool::new(false),
            last_dispatch_nudge: std::sync::atomic::AtomicI64::new(0),
            final_jobs,
        });
        Ok(Self {
            state,
            listener,
            writers: Writers {
                submissions: submissions_gathered,
                run_reports: run_reports_gathered,
                final_jobs: final_jobs_to_publish,
            },
            providers: providers.into(),
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.state.config.listen)
    }

    /// `https://ADDR` or `http://ADDR`: what clients dial.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.local_addr())
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.state.store.clone()
    }

    /// Serves until `shutdown` resolves, then closes worker streams and stops.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let state = self.state;
        let providers_task = tokio::spawn(providers::run(state.clone(), self.providers.clone()));
        let stop_providers = providers_task.abort_handle();
        let background = [
            tokio::spawn(scheduler::dispatch_loop(state.clone())),
            tokio::spawn(scheduler::lease_sweeper(state.clone())),
            tokio::spawn(scheduler::lease_renewer(state.clone())),
            tokio::spawn(webhooks::delivery_loop(state.clone())),
            tokio::spawn(replicas::listen(state.clone())),
            tokio::spawn(replicas::publish_final_jobs(
                state.clone(),
                self.writers.final_jobs,
            )),
            tokio::spawn(submissions::writer(state.clone(), self.writers.submissions)),
            tokio::spawn(run_reports::writer(state.clone(), self.writers.run_reports)),
            providers_task,
        ];
        let app = http::router(state.clone())
            .merge(grpc::router(state.clone()))
            .fallback(http::unknown_route);
        let closing = state.clone();
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        let provided = self.providers.clone();
        let graceful = async move {
            shutdown.await;
            // Before the streams close: drained workers report the ends of their jobs.
            if closing.config.remove_workers_on_stop {
                stop_providers.abort();
                providers::remove_all(&closing, &provided).await;
            }
            tracing::info!("shutting down: closing worker streams");
            closing.sessions.close_all();
            let _ = stopped_tx.send(());
        };
        let listener =
            listener::ApiListener::new(self.listener, self.tls).map_err(ServerError::Serve)?;
        let serve = listener::serve(listener, app, graceful);
        // Live followers (SSE) do not end by themselves: give in-flight requests a moment.
        let result = tokio::select! {
            () = serve => Ok(()),
            _ = async {
                let _ = stopped_rx.await;
                tokio::time::sleep(Duration::from_secs(3)).await;
            } => Ok(()),
        };
        for task in background {
            task.abort();
        }
        result
    }
}

/// The first start makes the first admin: with the configured password, or a generated one
/// printed once (on stderr, not into the logs).
async fn ensure_first_admin(store: &dyn Store, password: Option<&str>) -> Result<(), ServerError> {
    if store.count_users().await? > 0 {
        return Ok(());
    }
    let (password, generated) = match password {
        Some(p) => (p.to_string(), false),
        None => {
            let bytes: [u8; 12] = rand::random();
            (hex::encode(bytes), true)
        }
    };
    let hash = auth::hash_password(&password).map_err(|e| ServerError::Admin(e.to_string()))?;
    match store
        .create_user("admin", drover_store::Role::Admin, &hash)
        .await
    {
        Ok(_) => {}
        // Another replica made it first.
        Err(drover_store::StoreError::Conflict(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    if generated {
        eprintln!(
            "drover: created the first admin: user `admin`, password `{password}` \
             (shown once; `drover login --username admin` uses it)"
        );
    }
    tracing::info!("created the first admin user `admin`");
    Ok(())
}
