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

mod capabilities;
mod credentials;
mod log_window;
mod session;

pub use capabilities::capabilities;
use capabilities::*;
use credentials::*;
pub use credentials::{forget_credential, stored_credential};
use log_window::*;
use session::*;

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
use drover_core::{Capabilities, JobSpec, RunId};
use drover_proto::v1::{
    self, server_message::Body as In, worker_message::Body as Out,
    worker_service_client::WorkerServiceClient,
};
pub use executor::MAX_ENTRY_BYTES;
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
    /// Stop the jobs and exit when no control plane has answered for this long.
    pub give_up_after: Option<Duration>,
    /// How jobs run: real processes, or `noop` (benchmarks and tests of the control plane).
    pub executor: ExecutorKind,
    /// For an `https://` server: the certificate authority (PEM) its certificate must
    /// chain to; without it, the system's roots.
    pub ca_cert: Option<PathBuf>,
    /// Models to serve: (the name jobs use, the GGUF file). Loaded at start.
    pub models: Vec<(String, PathBuf)>,
    /// Block ranges of models this node serves as a stage of a split model.
    pub stages: Vec<StageSpec>,
    /// Serve an Ollama-compatible API for those models on this address.
    pub ollama_listen: Option<std::net::SocketAddr>,
    /// An OpenAI-compatible provider serving models for this node instead of loading
    /// them: (base URL, API key, model names).
    pub external_inference: Option<(String, Option<String>, Vec<String>)>,
    /// Besides the state directory, paths sandboxed jobs must not see (`drover up` names
    /// its data directory).
    pub hidden_paths: Vec<PathBuf>,
}

/// Blocks of a model served as one stage of a split model (`--blocks`).
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// The name jobs use.
    pub model: String,
    pub path: PathBuf,
    pub blocks: drover_infer::stage::BlockRange,
    /// Blocks of the whole model.
    pub total: usize,
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
    #[error(
        "no control plane answered for {after:?}: this worker stopped its jobs and exits \
         (--give-up-after)"
    )]
    GaveUp { after: Duration },
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
    let models = inference::Models::load(&config.models, &config.stages)
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
            // Nothing started for a control plane may outlive it: past the bound, the jobs
            // stop (the control plane that comes back fails and retries them by their
            // leases) and this process ends (a provider's container is removed with it).
            if let Some(bound) = agent.config.give_up_after
                && agent.last_contact.elapsed() >= bound
            {
                agent.stop_all();
                return Err(WorkerError::GaveUp { after: bound });
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
