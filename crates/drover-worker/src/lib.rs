//! drover's node agent. It registers once with a one-time token, keeps the node credential
//! in its state directory, and holds one stream to the control plane over which it takes
//! assignments and sends heartbeats, log entries and results. When the stream breaks it
//! reconnects with backoff; runs carry on, and whatever the server has not acknowledged
//! (log entries, results) is kept and sent again.

mod executor;
mod inference;
mod ollama;
mod spawn;
pub mod watchdog;

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub use executor::MAX_ENTRY_BYTES;

use drover_core::{Capabilities, JobSpec, RunId};
use drover_proto::v1::{
    self, server_message::Body as In, worker_message::Body as Out,
    worker_service_client::WorkerServiceClient,
};
use executor::{Control, ExecEvent, Execution, OutStream};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

/// Bytes per log message, at most (and at least one entry, itself at most 64 KiB): well
/// under the 4 MiB a gRPC message may hold.
const LOG_MESSAGE_BYTES: usize = 1 << 20;
/// What an entry costs in a message besides its bytes, at most: its sequence number,
/// stream, timestamp, length and field tags.
const LOG_ENTRY_OVERHEAD: usize = 32;
/// Log messages of one run sent and not yet acknowledged, at most. Entries produced
/// meanwhile wait for an acknowledgement and travel together: a fast producer's lines go
/// in a few large messages (one store write each) instead of thousands of one-line ones
/// that the control plane stores one write at a time, falling behind.
const LOG_BATCHES_IN_FLIGHT: usize = 4;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Reconnects stay prompt: a restarted control plane waits one lease for its workers.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The control plane, e.g. `http://127.0.0.1:7700`.
    pub server: String,
    /// One-time token; needed only the first time (no credential in `state_dir` yet).
    pub token: Option<String>,
    pub state_dir: PathBuf,
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Named resources this node offers, with their capacity (`ollama: 1`).
    pub resources: BTreeMap<String, u32>,
    /// Jobs run at once; 0 means one per CPU.
    pub slots: u32,
    /// Between SIGTERM and SIGKILL when a job is stopped.
    pub kill_grace: Duration,
    /// How jobs run: real processes, or `noop` (benchmarks and tests of the control plane).
    pub executor: ExecutorKind,
    /// For an `https://` server: the certificate authority (PEM) its certificate must
    /// chain to; without it, the system's roots.
    pub ca_cert: Option<PathBuf>,
    /// Models to serve: (the name jobs use, the GGUF file). Loaded at start.
    pub models: Vec<(String, PathBuf)>,
    /// Serve an Ollama-compatible API for those models on this address.
    pub ollama_listen: Option<std::net::SocketAddr>,
    /// An OpenAI-compatible provider serving models for this node instead of loading
    /// them: (base URL, API key, model names).
    pub external_inference: Option<(String, Option<String>, Vec<String>)>,
    /// Besides the state directory, paths sandboxed jobs must not see (`drover up` names
    /// its data directory).
    pub hidden_paths: Vec<PathBuf>,
}

/// How a worker runs what it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutorKind {
    /// Each job a process group (`/bin/sh -c`, or the program with its arguments).
    #[default]
    Process,
    /// Every job succeeds at once, without running anything. Kept for benchmarking the
    /// control plane, the store and the protocol (`drover bench throughput --executor noop`).
    Noop,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot serve the model: {0}")]
    Model(String),
    #[error(
        "this worker has no node credential in {state_dir} yet: give a one-time token (drover node token create)"
    )]
    NoToken { state_dir: PathBuf },
    #[error("registration refused by {server}: {message}")]
    RegistrationRefused { server: String, message: String },
    #[error(
        "the control plane refused this node's credential ({message}); remove {path} and register again with a new token"
    )]
    CredentialRefused { path: PathBuf, message: String },
    #[error("bad server address {server:?}: {message}")]
    BadServer { server: String, message: String },
    #[error("cannot use the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a registered node keeps between starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeCredential {
    node_id: String,
    credential: String,
    server: String,
}

fn credential_path(state_dir: &Path) -> PathBuf {
    state_dir.join("node.json")
}

fn state_dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |source| WorkerError::StateDir {
        path: path.to_path_buf(),
        source,
    }
}

fn endpoint(server: &str, ca_cert: Option<&Path>) -> Result<Endpoint, WorkerError> {
    let bad = |message: String| WorkerError::BadServer {
        server: server.to_string(),
        message,
    };
    let mut endpoint = Endpoint::from_shared(server.to_string())
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
        })
        .map_err(|e| bad(e.to_string()))?;
    if server.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        match ca_cert {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    bad(format!(
                        "cannot read the CA certificate {}: {e}",
                        path.display()
                    ))
                })?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            None => tls = tls.with_enabled_roots(),
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    }
    Ok(endpoint)
}

pub fn capabilities(config: &WorkerConfig) -> Capabilities {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    Capabilities {
        hostname: hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        cpus,
        memory_bytes: total_memory(),
        labels: config.labels.clone(),
        slots: if config.slots == 0 {
            cpus
        } else {
            config.slots
        },
        isolation_modes: isolation_modes(),
        version: env!("CARGO_PKG_VERSION").into(),
        resources: {
            let mut r = config.resources.clone();
            let slots = if config.slots == 0 {
                cpus
            } else {
                config.slots
            };
            // One local model workload at a time, unless the node says otherwise; an
            // external provider takes as many at once as the node has slots.
            let capacity = if config.models.is_empty() { slots } else { 1 };
            if !config.models.is_empty() || config.external_inference.is_some() {
                r.entry(drover_core::job::INFERENCE_RESOURCE.to_string())
                    .or_insert(capacity);
            }
            r
        },
        models: {
            let mut names: Vec<String> =
                config.models.iter().map(|(name, _)| name.clone()).collect();
            if let Some((_, _, external)) = &config.external_inference {
                names.extend(external.iter().cloned());
            }
            names.sort();
            names.dedup();
            names
        },
    }
}

/// The isolation modes this machine can give jobs (probed once).
fn isolation_modes() -> Vec<String> {
    static MODES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    MODES
        .get_or_init(|| {
            let mut modes = vec!["process".to_string()];
            // Said at start, as a warning: a user whose sandbox jobs stay queued looks here.
            match executor::sandbox_unavailable_reason() {
                None => modes.push("sandbox".into()),
                Some(why) => tracing::warn!("no sandbox jobs on this node: {why}"),
            }
            if executor::docker_available() {
                modes.push("container".into());
            } else {
                tracing::warn!(
                    "no container jobs on this node: no Docker engine answers here (install \
                     Docker, e.g. apt-get install docker.io, and let this user reach its socket)"
                );
            }
            modes
        })
        .clone()
}

fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Loads the node credential, registering with the one-time token first if there is none.
async fn ensure_registered(
    config: &WorkerConfig,
    caps: &Capabilities,
) -> Result<NodeCredential, WorkerError> {
    let path = credential_path(&config.state_dir);
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(cred) = serde_json::from_str::<NodeCredential>(&text)
    {
        if config.token.is_some() {
            tracing::info!(node_id = %cred.node_id, "already registered; the token is not needed");
        }
        return Ok(cred);
    }
    let token = config.token.clone().ok_or_else(|| WorkerError::NoToken {
        state_dir: config.state_dir.clone(),
    })?;
    let mut delay = BACKOFF_MIN;
    let response = loop {
        let refused = |message: String| WorkerError::RegistrationRefused {
            server: config.server.clone(),
            message,
        };
        let attempt = async {
            let channel = endpoint(&config.server, config.ca_cert.as_deref())?
                .connect()
                .await
                .map_err(|e| refused(format!("cannot connect: {e}")))?;
            WorkerServiceClient::new(channel)
                .register(v1::RegisterRequest {
                    token: token.clone(),
                    name: config.name.clone().unwrap_or_default(),
                    capabilities: Some(caps.into()),
                })
                .await
                .map_err(|s| (s.code(), refused(s.message().to_string())))
                .map_err(|(code, e)| {
                    if code == tonic::Code::Unavailable {
                        refused("server unavailable".into())
                    } else {
                        e
                    }
                })
        };
        match attempt.await {
            Ok(r) => break r.into_inner(),
            // A refused token is final; an unreachable server is worth waiting for.
            Err(WorkerError::RegistrationRefused { message, .. })
                if message.starts_with("cannot connect") || message == "server unavailable" =>
            {
                tracing::warn!(%message, "registration: server not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
            Err(e) => return Err(e),
        }
    };
    let cred = NodeCredential {
        node_id: response.node_id,
        credential: response.credential,
        server: config.server.clone(),
    };
    std::fs::create_dir_all(&config.state_dir).map_err(state_dir_error(&config.state_dir))?;
    let text = serde_json::to_string_pretty(&cred).unwrap_or_default();
    write_private(&path, &text).map_err(state_dir_error(&path))?;
    tracing::info!(node_id = %cred.node_id, "registered");
    Ok(cred)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// A run this worker holds, from assignment until the server acknowledges its end.
struct HeldRun {
    next_seq: u64,
    /// Sent (or not yet) and not yet acknowledged.
    unacked: VecDeque<v1::LogEntry>,
    /// Highest sequence number sent on the current connection.
    sent_seq: u64,
    /// The last sequence number of each log message sent and not yet acknowledged.
    batches_in_flight: VecDeque<u64>,
    /// The process's output credit (see `executor::OUTPUT_CREDIT`), given back as entries
    /// are acknowledged; None for runs whose output is not read from pipes (inference).
    output_credit: Option<Arc<Semaphore>>,
    finished: Option<v1::RunFinished>,
    control: Option<UnboundedSender<Control>>,
    /// Whether the control plane was told this run was taken. A process is told at its
    /// start (or its failure to start), so that the accept and the start travel and are
    /// written together instead of one write after the other.
    accepted: bool,
}

impl Drop for HeldRun {
    /// A forgotten run's output readers stop waiting for credit.
    fn drop(&mut self) {
        if let Some(credit) = &self.output_credit {
            credit.close();
        }
    }
}

struct Agent {
    config: WorkerConfig,
    node_id: String,
    inference_socket: Option<PathBuf>,
    /// Where runs get their scratch directories (see `executor::jobs_dir`).
    jobs_dir: PathBuf,
    models: inference::Models,
    /// A heartbeat interval set by node configuration (never slower than the server asks).
    heartbeat_override: Option<Duration>,
    caps: Capabilities,
    runs: HashMap<RunId, HeldRun>,
    events_tx: UnboundedSender<ExecEvent>,
    /// When the control plane was last heard from, and the lease it grants.
    last_contact: tokio::time::Instant,
    lease: Duration,
    fenced: bool,
}

enum SessionEnd {
    Shutdown,
    Disconnected(String),
}

/// Runs the worker until `shutdown` resolves. Running jobs are stopped at shutdown; their
/// leases lapse on the control plane and the retry policy takes over.
fn agent_uses_containers(caps: &Capabilities) -> bool {
    caps.isolation_modes.iter().any(|m| m == "container")
}

/// Removes a directory, with what is left in it, when dropped.
struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn run(
    mut config: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WorkerError> {
    // The node's credential and its runs' scratch directories are the node's alone; a
    // directory that exists keeps the mode its owner gave it.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&config.state_dir)
        .map_err(state_dir_error(&config.state_dir))?;
    // Absolute, because jobs run in other directories (and sandboxes bind it by path).
    config.state_dir =
        std::fs::canonicalize(&config.state_dir).map_err(state_dir_error(&config.state_dir))?;
    let caps = capabilities(&config);
    tokio::pin!(shutdown);
    let models = inference::Models::load(&config.models)
        .await
        .map_err(|e| WorkerError::Model(e.to_string()))?
        .with_external(
            config
                .external_inference
                .clone()
                .map(|(url, key, names)| inference::External::new(url, key, names)),
        );
    let jobs_dir =
        executor::jobs_dir(&config.state_dir).map_err(state_dir_error(&config.state_dir))?;
    // Outside the state directory (a root worker's, in /run), it goes when the worker does.
    let _jobs_dir_guard =
        (!jobs_dir.starts_with(&config.state_dir)).then(|| RemoveDirOnDrop(jobs_dir.clone()));
    if config.executor == ExecutorKind::Process {
        // Stops the jobs if this process freezes or dies (watchdog.rs); until the control
        // plane names its lease, half of the default one.
        let started = std::env::current_exe()
            .and_then(|program| watchdog::start(&program, Duration::from_secs(15)));
        if let Err(e) = started {
            tracing::warn!(error = %e, "no watchdog: jobs of a frozen worker would run on");
        }
    }
    let mut inference_socket = (!models.is_empty()).then(|| jobs_dir.join("inference.sock"));
    let _socket = match &inference_socket {
        Some(path) => match ollama::start_unix(path, models.clone()).await {
            Ok(task) => Some(AbortOnDrop(task)),
            Err(e) => {
                // Jobs then have no inference path of their own; the node still serves.
                tracing::warn!(socket = %path.display(), error = %e, "no inference socket for jobs");
                inference_socket = None;
                None
            }
        },
        None => None,
    };
    let _ollama = match config.ollama_listen {
        Some(addr) => Some(AbortOnDrop(
            ollama::start(addr, models.clone())
                .await
                .map_err(|e| WorkerError::Model(format!("--ollama-listen {addr}: {e}")))?,
        )),
        None => None,
    };
    // A worker that cannot register yet (control plane unreachable) still stops when told.
    let cred = tokio::select! {
        cred = ensure_registered(&config, &caps) => cred?,
        _ = &mut shutdown => {
            tracing::info!("stopped before registering");
            return Ok(());
        }
    };
    let span = tracing::info_span!("worker", node_id = %cred.node_id);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    if agent_uses_containers(&caps) {
        // Job containers of an earlier life of this node (killed with -9) have no one to
        // report to: remove them before taking new work.
        executor::remove_containers_of_node(&cred.node_id).await;
    }
    let mut agent = Agent {
        config,
        node_id: cred.node_id.clone(),
        inference_socket,
        jobs_dir,
        models,
        heartbeat_override: None,
        caps,
        runs: HashMap::new(),
        events_tx,
        last_contact: tokio::time::Instant::now(),
        lease: Duration::from_secs(30),
        fenced: false,
    };
    let mut delay = BACKOFF_MIN;
    async {
        loop {
            let started = tokio::time::Instant::now();
            match agent.session(&cred, &mut events_rx, &mut shutdown).await {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::Disconnected(why)) => {
                    tracing::warn!(reason = %why, "disconnected from the control plane");
                }
                Err(e @ WorkerError::CredentialRefused { .. }) => return Err(e),
                Err(e) => tracing::warn!(error = %e, "cannot reach the control plane"),
            }
            if started.elapsed() > Duration::from_secs(10) {
                delay = BACKOFF_MIN;
            }
            let jittered = delay.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            let wait = tokio::time::sleep(jittered);
            tokio::pin!(wait);
            // Runs go on while disconnected: keep taking their output, and stop them once
            // the control plane may have given them to another worker.
            let mut fence_check = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    Some(ev) = events_rx.recv() => agent.on_exec_event(ev, None),
                    _ = fence_check.tick() => agent.fence_if_stale(),
                    _ = &mut shutdown => { agent.stop_all(); return Ok(()); }
                }
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
        agent.stop_all();
        Ok(())
    }
    .instrument(span)
    .await
}

fn send(out: Option<&UnboundedSender<v1::WorkerMessage>>, body: Out) {
    if let Some(out) = out {
        let _ = out.send(v1::WorkerMessage { body: Some(body) });
    }
}

/// [`send_unsent_logs`] if the run has room in its window of unacknowledged messages; if
/// not, they go on its next acknowledgement.
fn send_unsent_logs_in_window(
    run_id: &RunId,
    held: &mut HeldRun,
    out: &UnboundedSender<v1::WorkerMessage>,
) {
    if held.batches_in_flight.len() < LOG_BATCHES_IN_FLIGHT {
        send_unsent_logs(run_id, held, out);
    }
}

/// Sends the run's entries not sent on this connection yet.
fn send_unsent_logs(run_id: &RunId, held: &mut HeldRun, out: &UnboundedSender<v1::WorkerMessage>) {
    // Entries are numbered one by one, so the unsent ones are the last few: found without
    // walking those still waiting for their acknowledgement.
    let unsent = (held.next_seq - held.sent_seq) as usize;
    if unsent > 0 {
        let first_unsent = held.unacked.len().saturating_sub(unsent);
        send_logs_from(run_id, held, first_unsent, out);
    }
}

/// Sends the run's unacknowledged entries from `first` on, in messages of at most
/// [`LOG_MESSAGE_BYTES`], each counted in flight until acknowledged.
fn send_logs_from(
    run_id: &RunId,
    held: &mut HeldRun,
    first: usize,
    out: &UnboundedSender<v1::WorkerMessage>,
) {
    let mut entries = Vec::new();
    let mut bytes = 0;
    let mut pending = held.unacked.range(first..).peekable();
    while let Some(entry) = pending.next() {
        bytes += LOG_ENTRY_OVERHEAD + entry.data.len();
        entries.push(entry.clone());
        let full = pending
            .peek()
            .is_some_and(|next| bytes + LOG_ENTRY_OVERHEAD + next.data.len() > LOG_MESSAGE_BYTES);
        if full || pending.peek().is_none() {
            held.batches_in_flight.push_back(entry.seq);
            send(
                Some(out),
                Out::Logs(v1::LogBatch {
                    run_id: run_id.to_string(),
                    entries: std::mem::take(&mut entries),
                }),
            );
            bytes = 0;
        }
    }
    held.sent_seq = held.next_seq;
}

impl Agent {
    async fn session(
        &mut self,
        cred: &NodeCredential,
        events_rx: &mut UnboundedReceiver<ExecEvent>,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<SessionEnd, WorkerError> {
        let unreachable = |e: &dyn std::fmt::Display| WorkerError::BadServer {
            server: self.config.server.clone(),
            message: e.to_string(),
        };
        let channel: Channel = endpoint(&self.config.server, self.config.ca_cert.as_deref())?
            .connect()
            .await
            .map_err(|e| unreachable(&e))?;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let hello = v1::Hello {
            capabilities: Some((&self.caps).into()),
            active_run_ids: self.runs.keys().map(ToString::to_string).collect(),
        };
        send(Some(&out_tx), Out::Hello(hello));
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(out_rx));
        let bearer = format!("Bearer {}", cred.credential)
            .parse()
            .map_err(|_| unreachable(&"the stored credential is not valid ASCII"))?;
        request.metadata_mut().insert("authorization", bearer);
        let mut inbound = match WorkerServiceClient::new(channel).session(request).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                return Err(WorkerError::CredentialRefused {
                    path: credential_path(&self.config.state_dir),
                    message: s.message().to_string(),
                });
            }
            Err(s) => return Err(unreachable(&s)),
        };
        let welcome = match inbound.message().await {
            Ok(Some(v1::ServerMessage {
                body: Some(In::Welcome(w)),
            })) => w,
            Ok(_) => {
                return Ok(SessionEnd::Disconnected(
                    "stream closed before Welcome".into(),
                ));
            }
            Err(s) => return Ok(SessionEnd::Disconnected(s.to_string())),
        };
        tracing::info!(runs = self.runs.len(), "connected");
        self.last_contact = tokio::time::Instant::now();
        self.lease = Duration::from_millis(welcome.lease_ms.max(100));
        watchdog::set_timeout(self.lease / 2);
        self.fenced = false;
        self.resend_backlog(&out_tx);
        let server_interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(50));
        let every = |o: Option<Duration>| {
            let mut t =
                tokio::time::interval(o.map_or(server_interval, |o| o.min(server_interval)));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut heartbeat = every(self.heartbeat_override);
        // Connected is not heard: a path that drops packets keeps the stream open for as
        // long as HTTP/2 takes to notice. Heartbeats are answered, so half a lease without
        // any word means the leases may lapse: fence then, whatever the stream looks like.
        let mut fence_check = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = fence_check.tick() => {
                    self.fence_if_stale();
                    if self.fenced {
                        return Ok(SessionEnd::Disconnected(
                            "no word from the control plane for half a lease".into(),
                        ));
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(v1::ServerMessage { body: Some(In::Config(c)) })) => {
                        self.last_contact = tokio::time::Instant::now();
                        self.apply_config(c, &out_tx);
                        heartbeat = every(self.heartbeat_override);
                    }
                    Ok(Some(v1::ServerMessage { body: Some(body) })) => {
                        self.last_contact = tokio::time::Instant::now();
                        self.on_server_message(body, &out_tx);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(SessionEnd::Disconnected("the control plane closed the stream".into())),
                    Err(s) => return Ok(SessionEnd::Disconnected(s.message().to_string())),
                },
                _ = heartbeat.tick() => send(Some(&out_tx), Out::Heartbeat(v1::Heartbeat {})),
                Some(ev) = events_rx.recv() => {
                    self.on_exec_event(ev, Some(&out_tx));
                    // Take whatever else is ready so that entries travel in batches.
                    let mut batched = 0;
                    while batched < 4096 {
                        match events_rx.try_recv() {
                            Ok(ev) => self.on_exec_event(ev, Some(&out_tx)),
                            Err(_) => break,
                        }
                        batched += 1;
                    }
                    self.flush(&out_tx);
                }
                _ = shutdown.as_mut() => return Ok(SessionEnd::Shutdown),
            }
        }
    }

    /// After a reconnect: every unacknowledged entry and result again, in order.
    fn resend_backlog(&mut self, out: &UnboundedSender<v1::WorkerMessage>) {
        for (run_id, held) in &mut self.runs {
            held.batches_in_flight.clear();
            send_logs_from(run_id, held, 0, out);
            if let Some(f) = &held.finished {
                send(Some(out), Out::Finished(f.clone()));
            }
        }
    }

    /// Applies a configuration from the control plane to what this node was started with,
    /// and answers: applied with the capabilities it has now, or failed with the reason
    /// (the previous configuration stays in force).
    fn apply_config(&mut self, c: v1::NodeConfig, out: &UnboundedSender<v1::WorkerMessage>) {
        let applied = serde_json::from_str::<drover_core::NodeConfig>(&c.json)
            .map_err(|e| format!("cannot read the configuration: {e}"))
            .and_then(|config| {
                let caps = config.apply(&self.caps)?;
                Ok((config, caps))
            });
        let ack = match applied {
            Ok((config, caps)) => {
                self.heartbeat_override = config.heartbeat_interval_ms.map(Duration::from_millis);
                tracing::info!(version = c.version, "node configuration applied");
                v1::ConfigAck {
                    version: c.version,
                    applied_at_us: drover_core::Timestamp::now().as_micros(),
                    status: "applied".into(),
                    error: String::new(),
                    capabilities: Some((&caps).into()),
                }
            }
            Err(error) => {
                tracing::warn!(version = c.version, error = %error, "node configuration refused");
                v1::ConfigAck {
                    version: c.version,
                    applied_at_us: drover_core::Timestamp::now().as_micros(),
                    status: "failed".into(),
                    error,
                    capabilities: None,
                }
            }
        };
        send(Some(out), Out::ConfigAck(ack));
    }

    fn on_server_message(&mut self, body: In, out: &UnboundedSender<v1::WorkerMessage>) {
        match body {
            In::Welcome(_) | In::Config(_) | In::HeartbeatAck(_) => {}
            In::Assignment(a) => self.start(a, out),
            In::Cancel(c) => {
                if let Some(held) = c.run_id.parse().ok().and_then(|id| self.runs.get(&id))
                    && let Some(control) = &held.control
                {
                    tracing::info!(run_id = %c.run_id, reason = %c.reason, "cancelling");
                    let _ = control.send(Control::Cancel);
                }
            }
            In::LogAck(ack) => {
                if let Ok(run_id) = ack.run_id.parse::<RunId>()
                    && let Some(held) = self.runs.get_mut(&run_id)
                {
                    let mut stored_cost = 0;
                    while let Some(entry) = held.unacked.pop_front_if(|e| e.seq <= ack.seq) {
                        stored_cost += executor::output_cost(entry.data.len()) as usize;
                    }
                    if let Some(credit) = &held.output_credit {
                        credit.add_permits(stored_cost);
                    }
                    while held
                        .batches_in_flight
                        .front()
                        .is_some_and(|&s| s <= ack.seq)
                    {
                        held.batches_in_flight.pop_front();
                    }
                    send_unsent_logs_in_window(&run_id, held, out);
                }
            }
            In::FinishAck(ack) => {
                if let Ok(id) = ack.run_id.parse() {
                    self.runs.remove(&id);
                }
            }
            In::Forget(f) => {
                // Dropping the control sender stops the process if it still runs.
                if let Ok(id) = f.run_id.parse::<RunId>()
                    && self.runs.remove(&id).is_some()
                {
                    tracing::warn!(run_id = %id, "the control plane no longer counts this run as ours; stopped");
                }
            }
        }
    }

    fn start(&mut self, a: v1::Assignment, out: &UnboundedSender<v1::WorkerMessage>) {
        let Ok(run_id) = a.run_id.parse::<RunId>() else {
            tracing::warn!(run_id = %a.run_id, "assignment with a malformed run id");
            return;
        };
        if self.runs.contains_key(&run_id) {
            return;
        }
        let spec = match a.spec.map(JobSpec::try_from) {
            Some(Ok(spec)) => spec,
            _ => {
                tracing::warn!(%run_id, "assignment without a usable spec");
                return;
            }
        };
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let inference = spec.kind == drover_core::JobKind::Inference
            && self.config.executor == ExecutorKind::Process;
        let output_credit = Arc::new(Semaphore::new(executor::OUTPUT_CREDIT));
        self.runs.insert(
            run_id,
            HeldRun {
                next_seq: 0,
                unacked: VecDeque::new(),
                sent_seq: 0,
                batches_in_flight: VecDeque::new(),
                output_credit: (!inference).then(|| output_credit.clone()),
                finished: None,
                control: Some(control_tx),
                accepted: false,
            },
        );
        let exec = Execution {
            run_id,
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            spec,
            scratch_dir: self.jobs_dir.join(run_id.to_string()),
            node_id: self.node_id.clone(),
            inference_socket: self.inference_socket.clone(),
            kill_grace: self.config.kill_grace,
            output_credit,
            hidden_paths: std::iter::once(self.config.state_dir.clone())
                .chain(self.config.hidden_paths.iter().cloned())
                .collect(),
        };
        let span = tracing::info_span!("job", job_id = %a.job_id, run_id = %run_id);
        if inference {
            // A model may take a while to load before the run starts: say it is taken now.
            self.accept(run_id, Some(out));
            tokio::spawn(
                inference::execute(
                    exec,
                    self.models.clone(),
                    self.events_tx.clone(),
                    control_rx,
                )
                .instrument(span),
            );
            return;
        }
        match self.config.executor {
            ExecutorKind::Process => {
                tokio::spawn(
                    executor::execute(exec, self.events_tx.clone(), control_rx).instrument(span),
                );
            }
            ExecutorKind::Noop => {
                let _ = self.events_tx.send(ExecEvent::Started { run_id });
                let _ = self.events_tx.send(ExecEvent::Exited {
                    run_id,
                    outcome: drover_core::RunOutcome::Succeeded,
                    exit_code: Some(0),
                    error: None,
                    result: None,
                });
            }
        }
    }

    fn on_exec_event(&mut self, ev: ExecEvent, out: Option<&UnboundedSender<v1::WorkerMessage>>) {
        match ev {
            ExecEvent::Started { run_id } => {
                if let Some(held) = self.runs.get_mut(&run_id) {
                    // Not accepted yet: the start says both, in one message.
                    let accepts = !std::mem::replace(&mut held.accepted, true);
                    send(
                        out,
                        Out::Started(v1::RunStarted {
                            run_id: run_id.to_string(),
                            accepts,
                        }),
                    );
                }
            }
            ExecEvent::Output {
                run_id,
                stream,
                timestamp,
                data,
            } => {
                if let Some(held) = self.runs.get_mut(&run_id) {
                    held.next_seq += 1;
                    held.unacked.push_back(v1::LogEntry {
                        seq: held.next_seq,
                        stream: match stream {
                            OutStream::Stdout => v1::LogStream::Stdout,
                            OutStream::Stderr => v1::LogStream::Stderr,
                        } as i32,
                        timestamp_us: timestamp.as_micros(),
                        data,
                    });
                }
            }
            ExecEvent::Exited {
                run_id,
                outcome,
                exit_code,
                error,
                result,
            } => {
                // Its last lines go before its end, whatever its window.
                if let Some(out) = out
                    && let Some(held) = self.runs.get_mut(&run_id)
                {
                    send_unsent_logs(&run_id, held, out);
                }
                self.accept(run_id, out);
                if let Some(held) = self.runs.get_mut(&run_id) {
                    tracing::info!(%run_id, ?outcome, ?exit_code, "run ended");
                    let finished = v1::RunFinished {
                        run_id: run_id.to_string(),
                        outcome: v1::RunOutcome::from(outcome) as i32,
                        exit_code,
                        error,
                        last_seq: held.next_seq,
                        result_json: result.map(|r| r.to_string()),
                    };
                    held.control = None;
                    held.finished = Some(finished.clone());
                    send(out, Out::Finished(finished));
                }
            }
        }
    }

    /// Tells the control plane the run was taken, once.
    fn accept(&mut self, run_id: RunId, out: Option<&UnboundedSender<v1::WorkerMessage>>) {
        if let Some(held) = self.runs.get_mut(&run_id)
            && !held.accepted
        {
            held.accepted = true;
            send(
                out,
                Out::Accepted(v1::RunAccepted {
                    run_id: run_id.to_string(),
                }),
            );
        }
    }

    /// Sends the entries produced since the last flush, one message per run, for runs with
    /// room in their window of unacknowledged messages; the others send on their next ack.
    fn flush(&mut self, out: &UnboundedSender<v1::WorkerMessage>) {
        for (run_id, held) in &mut self.runs {
            send_unsent_logs_in_window(run_id, held, out);
        }
    }

    /// The control plane renews leases on heartbeats, every third of a lease. Half a lease
    /// after the last word from it, its view of this worker's leases may be about to lapse
    /// and the attempts to be retried elsewhere: stop them here first.
    fn fence_if_stale(&mut self) {
        if self.fenced || self.last_contact.elapsed() < self.lease / 2 {
            return;
        }
        self.fenced = true;
        let mut stopped = 0;
        for held in self.runs.values() {
            if let Some(control) = &held.control {
                let _ = control.send(Control::Fence);
                stopped += 1;
            }
        }
        if stopped > 0 {
            tracing::warn!(
                runs = stopped,
                "no word from the control plane for half a lease: stopping running jobs"
            );
        }
    }

    fn stop_all(&mut self) {
        // Dropping the control senders stops every running process group.
        self.runs.clear();
    }
}

/// The node credential kept in `state_dir`, if the node registered before.
pub fn stored_credential(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(credential_path(state_dir)).ok()?;
    serde_json::from_str::<NodeCredential>(&text)
        .ok()
        .map(|c| c.credential)
}

/// Throws the stored credential away, so that the next start registers anew.
pub fn forget_credential(state_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(credential_path(state_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn held_with(entries: impl IntoIterator<Item = Vec<u8>>) -> HeldRun {
        let mut held = HeldRun {
            next_seq: 0,
            unacked: VecDeque::new(),
            sent_seq: 0,
            batches_in_flight: VecDeque::new(),
            output_credit: None,
            finished: None,
            control: None,
            accepted: true,
        };
        for data in entries {
            held.next_seq += 1;
            held.unacked.push_back(v1::LogEntry {
                seq: held.next_seq,
                stream: v1::LogStream::Stdout as i32,
                timestamp_us: 1_795_561_243_054_031,
                data,
            });
        }
        held
    }

    fn sent_batches(held: &mut HeldRun) -> Vec<v1::LogBatch> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        send_unsent_logs(&RunId::new(), held, &tx);
        drop(tx);
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| match m.body {
                Some(Out::Logs(batch)) => Some(batch),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn log_messages_stay_under_the_grpc_limit_whatever_the_line_length() {
        const GRPC_LIMIT: usize = 4 << 20;
        let short = (0..400_000u32).map(|i| i.to_string().into_bytes());
        let long = (0..200).map(|_| vec![b'x'; executor::MAX_ENTRY_BYTES]);
        for (what, mut held) in [("short", held_with(short)), ("long", held_with(long))] {
            let batches = sent_batches(&mut held);
            assert!(batches.len() > 1, "{what}: one message for everything");
            for batch in &batches {
                assert!(
                    batch.encoded_len() < GRPC_LIMIT,
                    "{what}: {} bytes",
                    batch.encoded_len()
                );
            }
            let seqs: Vec<u64> = batches
                .iter()
                .flat_map(|b| b.entries.iter().map(|e| e.seq))
                .collect();
            assert_eq!(
                seqs,
                (1..=held.next_seq).collect::<Vec<_>>(),
                "{what}: every entry once, in order"
            );
            let last_of_each: Vec<u64> = batches
                .iter()
                .filter_map(|b| b.entries.last().map(|e| e.seq))
                .collect();
            assert_eq!(Vec::from(held.batches_in_flight.clone()), last_of_each);
            assert_eq!(held.sent_seq, held.next_seq);
            assert!(
                sent_batches(&mut held).is_empty(),
                "{what}: nothing is sent twice"
            );
        }
    }
}
