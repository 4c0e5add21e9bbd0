//! `drover up`, `drover server`, `drover worker`: the long-running processes.

use crate::output::{self, parse_duration, parse_pairs, usage};
use anyhow::Context;
use clap::Args;
use drover_server::providers::{ProviderConfig, ProviderKind};
use drover_server::{Server, ServerConfig};
use drover_worker::WorkerConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Args, Clone)]
pub struct ServerArgs {
    /// Address of the API (HTTP JSON and gRPC on one port). Port 0 picks a free one; the
    /// address is written to DATA_DIR/api.addr either way.
    #[arg(long, env = "DROVER_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Log files and the SQLite database.
    #[arg(long, env = "DROVER_DATA_DIR", default_value = ".drover")]
    data_dir: PathBuf,
    /// sqlite://PATH (default: DATA_DIR/drover.db) or postgres://USER:PASSWORD@HOST/DB.
    /// Its value is never shown by --help; prefer the environment or --database-url-file to
    /// keep a password out of the process list.
    #[arg(long, env = "DROVER_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Read the database URL from this file (first line), e.g. a mounted secret.
    #[arg(
        long,
        env = "DROVER_DATABASE_URL_FILE",
        conflicts_with = "database_url"
    )]
    database_url_file: Option<PathBuf>,
    /// Do not apply migrations at start; refuse a schema that is behind (`drover migrate`).
    #[arg(long)]
    no_migrate: bool,
    /// How long an assignment survives without a heartbeat from its worker.
    #[arg(long, env = "DROVER_LEASE", default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    /// Base of the exponential retry backoff for jobs that do not set their own.
    #[arg(long, env = "DROVER_BACKOFF_BASE", default_value = "10s", value_parser = parse_duration)]
    backoff_base: Duration,
    /// First retry delay of a failed webhook delivery (doubles per attempt).
    #[arg(long, env = "DROVER_WEBHOOK_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    webhook_backoff: Duration,
    /// Attempts per webhook delivery before it is marked FAILED.
    #[arg(long, env = "DROVER_WEBHOOK_MAX_ATTEMPTS", default_value_t = 12)]
    webhook_max_attempts: u32,
    /// Start workers on demand: `local` or `docker`, with settings after a colon:
    /// `docker:min=0,max=4,idle=60s,slots=1,register-within=60s,give-up=10m,
    /// image=drover-worker:latest,network=host,server=URL` (local also takes binary=PATH).
    /// give-up: a worker that reaches no control plane this long removes itself.
    /// Repeatable; the first one also serves jobs that name no provider.
    #[arg(long = "provider", value_parser = parse_provider)]
    providers: Vec<ProviderConfig>,
    /// The first admin's password, used only when the store has no user yet (otherwise a
    /// password is generated and printed once).
    #[arg(long, env = "DROVER_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// How long an access token from `drover login` lives.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    access_token_ttl: Duration,
    /// Serve TLS (HTTP and gRPC) with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "DROVER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "DROVER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Inference is part of this deployment: /readyz answers 503 while no connected node
    /// serves a model.
    #[arg(long)]
    require_inference: bool,
    /// The isolation modes plain users' jobs may ask for (admins may ask for any). `process`
    /// runs with the worker's rights, root under a root `drover up`: add it only where every
    /// user may have those (e.g. `--user-isolation process,sandbox,container`).
    #[arg(
        long,
        env = "DROVER_USER_ISOLATION",
        value_delimiter = ',',
        default_value = "sandbox,container"
    )]
    user_isolation: Vec<drover_core::Isolation>,
    /// Live (active or pending) reservations a plain user may hold at once; admins are not
    /// limited. A reservation keeps its resource from everyone else's queued jobs.
    #[arg(long, env = "DROVER_MAX_RESERVATIONS_PER_USER", default_value_t = 2)]
    max_reservations_per_user: u32,
    /// The longest TTL a plain user may give a reservation (admins: up to 24 h).
    #[arg(long, env = "DROVER_MAX_RESERVATION_TTL", default_value = "1h", value_parser = parse_duration)]
    max_reservation_ttl: Duration,
    /// How often provider records are checked against what really runs (also at start).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    reconcile_every: Duration,
}

fn parse_provider(s: &str) -> Result<ProviderConfig, String> {
    let (kind, settings) = s.split_once(':').unwrap_or((s, ""));
    let kind = match kind.trim() {
        "local" => ProviderKind::Local,
        "docker" => ProviderKind::Docker,
        other => return Err(format!("unknown provider {other:?}; one of local, docker")),
    };
    let mut c = ProviderConfig::new(kind);
    let count = |k: &str, v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{k}={v}: give a whole number"))
    };
    for (k, v) in parse_pairs(settings)? {
        match k.as_str() {
            "min" => c.min = count(&k, &v)?,
            "max" => c.max = count(&k, &v)?,
            "slots" => c.slots = count(&k, &v)?.max(1),
            "idle" => c.idle = parse_duration(&v).map_err(|e| format!("idle: {e}"))?,
            "register-within" => {
                c.register_within =
                    parse_duration(&v).map_err(|e| format!("register-within: {e}"))?
            }
            "give-up" => {
                c.give_up_after = parse_duration(&v).map_err(|e| format!("give-up: {e}"))?
            }
            "server" => c.server_url = Some(v),
            "image" if kind == ProviderKind::Docker => c.image = v,
            "network" if kind == ProviderKind::Docker => c.network = v,
            "binary" if kind == ProviderKind::Local => c.binary = Some(PathBuf::from(v)),
            other => return Err(format!("unknown {} provider setting {other:?}", c.name())),
        }
    }
    if c.max == 0 || c.min > c.max {
        return Err(format!(
            "min={} max={}: max must be at least 1 and at least min",
            c.min, c.max
        ));
    }
    Ok(c)
}

impl ServerArgs {
    fn config(&self) -> anyhow::Result<ServerConfig> {
        let mut c = ServerConfig::new(self.listen, self.data_dir.clone());
        c.database_url = match &self.database_url_file {
            Some(file) => Some(read_secret_file(file, "--database-url-file")?),
            None => self.database_url.clone(),
        };
        c.migrate = !self.no_migrate;
        c.lease = self.lease;
        c.default_backoff_base = self.backoff_base;
        c.webhook_backoff_base = self.webhook_backoff;
        c.webhook_max_attempts = self.webhook_max_attempts.max(1);
        c.providers = self.providers.clone();
        c.reconcile_interval = Some(self.reconcile_every);
        c.admin_password = self.admin_password.clone();
        c.access_ttl = self.access_token_ttl;
        c.tls = self.tls_cert.clone().zip(self.tls_key.clone());
        c.require_inference = self.require_inference;
        c.user_isolation = self.user_isolation.clone();
        c.reservations_per_user = self.max_reservations_per_user;
        c.user_reservation_ttl = self.max_reservation_ttl;
        Ok(c)
    }
}

#[derive(Args, Clone)]
pub struct WorkerOptions {
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Node labels: K=V,K2=V2.
    #[arg(long)]
    labels: Option<String>,
    /// Named resources this node offers, with capacities: ollama=1,gpu=2.
    #[arg(long)]
    resources: Option<String>,
    /// Jobs run at once (default: one per CPU).
    #[arg(long, default_value_t = 0)]
    slots: u32,
    /// Between SIGTERM and SIGKILL when a job is stopped.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    kill_grace: Duration,
    /// Stop this worker's jobs and exit when no control plane has answered for this long
    /// (workers that providers start get their provider's `give-up`, 10 minutes by
    /// default). Unset: keep trying for ever.
    #[arg(long, env = "DROVER_GIVE_UP_AFTER", value_parser = parse_duration)]
    give_up_after: Option<Duration>,
    /// A model to serve, loaded at start: `smollm2` (fetched with `drover model fetch`), a
    /// GGUF path, or NAME=PATH. Repeatable; inference jobs naming it run here.
    #[arg(long = "model")]
    models: Vec<String>,
    /// Load a --model as stages, each holding blocks FIRST-LAST (both included), run one
    /// after the other: `--model smollm2 --blocks 0-14 --blocks 15-29`. With several
    /// models, name it: `--blocks smollm2:15-29`. For now a node's stages must cover every
    /// block of the model (chains across nodes are not built yet).
    #[arg(long = "blocks", value_name = "[MODEL:]FIRST-LAST")]
    blocks: Vec<String>,
    /// Serve an Ollama-compatible API (/api/tags, /api/generate, /api/chat) for this
    /// node's models on this address.
    #[arg(long)]
    ollama_listen: Option<SocketAddr>,
    /// An OpenAI-compatible provider (…/v1) that serves --openai-model for this node
    /// instead of a local model; many of its jobs run at once.
    #[arg(long, env = "DROVER_OPENAI_BASE_URL", requires = "openai_models")]
    openai_base_url: Option<String>,
    #[arg(long, env = "DROVER_OPENAI_API_KEY", hide_env_values = true)]
    openai_api_key: Option<String>,
    /// A model name the provider serves (repeatable).
    #[arg(long = "openai-model")]
    openai_models: Vec<String>,
    /// Where `drover model fetch` keeps models.
    #[arg(long, env = "DROVER_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// `process` runs jobs; `noop` completes every job at once without running it (for
    /// benchmarks of the control plane).
    #[arg(long, value_enum, default_value_t = Executor::Process)]
    executor: Executor,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Executor {
    Process,
    Noop,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// This node must serve inference: refuse to start without a model.
    #[arg(long)]
    require_inference: bool,
    /// One-time token from `drover node token create` (first start only).
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the node keeps its credential and run scratch directories.
    #[arg(long, env = "DROVER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    options: WorkerOptions,
}

#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    worker: WorkerOptions,
    /// On a graceful stop, leave the workers that providers started running (the next
    /// `drover up` on this data directory adopts them). By default they are removed.
    #[arg(long)]
    keep_workers: bool,
}

/// The `--blocks` ranges, checked against the models' files: each names one of the node's
/// models (or the only one), lies inside it, and overlaps no other range of that model.
/// A model given ranges is served as those stages only, so it leaves `models`.
fn stage_specs(
    blocks: &[String],
    models: &mut Vec<(String, PathBuf)>,
) -> anyhow::Result<Vec<drover_worker::StageSpec>> {
    use drover_infer::stage::BlockRange;
    let mut stages: Vec<drover_worker::StageSpec> = Vec::new();
    for spec in blocks {
        let (model, range) = match spec.rsplit_once(':') {
            Some((model, range)) => (Some(model), range),
            None => (None, spec.as_str()),
        };
        let range: BlockRange = range.parse().map_err(|e| usage!("--blocks {spec}: {e}"))?;
        let (name, path) = match model {
            Some(m) => models.iter().find(|(name, _)| name == m).ok_or_else(|| {
                usage!("--blocks {spec}: {m} is not a --model of this node")
            })?,
            None => match models.as_slice() {
                [only] => only,
                [] => return Err(usage!("--blocks {spec}: give the model with --model")),
                _ => {
                    return Err(usage!(
                        "--blocks {spec}: this node has several models; name one                          (--blocks MODEL:{range})"
                    ));
                }
            },
        }
        .clone();
        let total = drover_infer::stage::block_count(&path)
            .map_err(|e| anyhow::anyhow!("--blocks {spec}: {e}"))?;
        if range.end > total {
            return Err(usage!(
                "--blocks {spec}: {name} has {total} blocks (0-{})",
                total - 1
            ));
        }
        if let Some(other) = stages
            .iter()
            .find(|s| s.model == name && s.blocks.start < range.end && range.start < s.blocks.end)
        {
            return Err(usage!(
                "--blocks {spec}: overlaps blocks {} of {name} on this node",
                other.blocks
            ));
        }
        stages.push(drover_worker::StageSpec {
            model: name,
            path,
            blocks: range,
            total,
        });
    }
    // Until chains span nodes, a node runs a split model only through stages of its own.
    for (name, _) in models.iter() {
        let mut ranges: Vec<BlockRange> = stages
            .iter()
            .filter(|s| &s.model == name)
            .map(|s| s.blocks)
            .collect();
        let Some(total) = stages.iter().find(|s| &s.model == name).map(|s| s.total) else {
            continue;
        };
        ranges.sort_by_key(|r| r.start);
        let covered = ranges.iter().map(BlockRange::len).sum::<usize>();
        if covered != total {
            let given: Vec<String> = ranges.iter().map(ToString::to_string).collect();
            return Err(usage!(
                "--blocks: blocks {} of {name} leave some of its {total} blocks out; a node \
                 serves a split model through stages of its own that cover every block \
                 (e.g. --blocks 0-{} --blocks {}-{}), chains across nodes are not built yet",
                given.join(", "),
                total / 2 - 1,
                total / 2,
                total - 1
            ));
        }
    }
    models.retain(|(name, _)| !stages.iter().any(|s| &s.model == name));
    Ok(stages)
}

/// A node that must serve inference needs a model or an external provider.
fn check_inference_path(o: &WorkerOptions, required: bool) -> anyhow::Result<()> {
    if required && o.models.is_empty() && o.openai_base_url.is_none() {
        anyhow::bail!(
            "--require-inference: this node has no inference path; give --model smollm2 (after \
             drover model fetch smollm2), a GGUF path, or --openai-base-url"
        );
    }
    Ok(())
}

fn worker_config(
    server: String,
    token: Option<String>,
    state_dir: PathBuf,
    o: &WorkerOptions,
    require_inference: bool,
) -> anyhow::Result<WorkerConfig> {
    let labels = match &o.labels {
        Some(l) => parse_pairs(l)
            .map_err(|e| usage!("--labels: {e}"))?
            .into_iter()
            .collect(),
        None => Default::default(),
    };
    let mut resources = std::collections::BTreeMap::new();
    if let Some(r) = &o.resources {
        for (name, amount) in parse_pairs(r).map_err(|e| usage!("--resources: {e}"))? {
            let amount: u32 = amount.trim().parse().map_err(|_| {
                usage!("--resources: {name}={amount}: the capacity must be a whole number")
            })?;
            if !drover_core::validation::valid_resource_name(&name) || amount == 0 {
                anyhow::bail!(
                    "--resources: {name}={amount}: give NAME=CAPACITY with a capacity above 0"
                );
            }
            resources.insert(name, amount);
        }
    }
    let models_dir = o
        .models_dir
        .clone()
        .unwrap_or_else(drover_infer::default_models_dir);
    check_inference_path(o, require_inference)?;
    let mut models = Vec::new();
    for spec in &o.models {
        let (name, path) = match spec.split_once('=') {
            Some((name, path)) => (name.to_string(), PathBuf::from(path)),
            None => match drover_infer::resolve_model(spec, &models_dir) {
                Some(path) if Path::new(spec).is_file() => (
                    path.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| spec.clone()),
                    path,
                ),
                Some(path) => (spec.clone(), path),
                None => anyhow::bail!(
                    "--model {spec}: no such file, and no fetched model of that name in {} \
                     (drover model fetch {spec})",
                    models_dir.display()
                ),
            },
        };
        models.push((name, path));
    }
    let stages = stage_specs(&o.blocks, &mut models)?;
    Ok(WorkerConfig {
        external_inference: o
            .openai_base_url
            .clone()
            .map(|url| (url, o.openai_api_key.clone(), o.openai_models.clone())),
        models,
        stages,
        ollama_listen: o.ollama_listen,
        server,
        token,
        state_dir,
        name: o.name.clone(),
        labels,
        resources,
        slots: o.slots,
        kill_grace: o.kill_grace,
        give_up_after: o.give_up_after,
        executor: match o.executor {
            Executor::Process => drover_worker::ExecutorKind::Process,
            Executor::Noop => drover_worker::ExecutorKind::Noop,
        },
        ca_cert: None,
        hidden_paths: Vec::new(),
    })
}

/// The first line of a file holding a secret (a database URL with its password).
fn read_secret_file(file: &Path, flag: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", file.display()))?;
    let line = text.lines().next().unwrap_or_default().trim();
    if line.is_empty() {
        anyhow::bail!("{flag} {}: the file is empty", file.display());
    }
    Ok(line.to_string())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn bind(args: &ServerArgs, remove_workers_on_stop: bool) -> anyhow::Result<Server> {
    let mut config = args.config()?;
    config.remove_workers_on_stop = remove_workers_on_stop;
    let server = Server::bind(config).await?;
    let addr_file = args.data_dir.join("api.addr");
    std::fs::write(&addr_file, format!("{}\n", server.url()))
        .with_context(|| format!("cannot write {}", addr_file.display()))?;
    Ok(server)
}

pub async fn server(args: ServerArgs) -> anyhow::Result<ExitCode> {
    // Replicas and restarts adopt a server's workers: a graceful stop keeps them.
    let server = bind(&args, false).await?;
    tracing::info!(api = %server.url(), "drover server listening");
    server.serve(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn worker(args: WorkerArgs, server: &str) -> anyhow::Result<ExitCode> {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let mut config = worker_config(
        server.to_string(),
        args.token.clone(),
        state_dir,
        &args.options,
        args.require_inference,
    )?;
    config.ca_cert = crate::login::ca_cert();
    drover_worker::run(config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

fn default_state_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("drover/worker")
}

pub async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    // Fail fast, before anything is created.
    check_inference_path(&args.worker, args.server.require_inference)?;
    let server = bind(&args.server, !args.keep_workers).await?;
    let url = server.url();
    let store = server.store();
    let worker_dir = args.server.data_dir.join("worker");
    // The local worker registers once; a credential the store does not know (a deleted
    // database) is thrown away and the worker registers anew.
    let known = match drover_worker::stored_credential(&worker_dir) {
        Some(c) => store.authenticate_worker(&c).await.is_ok(),
        None => false,
    };
    let token = if known {
        None
    } else {
        drover_worker::forget_credential(&worker_dir)?;
        Some(
            store
                .create_join_token(Duration::from_secs(600))
                .await?
                .token,
        )
    };
    // One command stays one command: on this machine the CLI speaks as the admin, through
    // an API token kept in the user's config dir.
    let local = server.local_addr().ip().is_loopback();
    let still_valid = match crate::login::stored_api_token(&url) {
        Some(t) => store.authenticate_token(&t).await.is_ok(),
        None => false,
    };
    if local
        && !still_valid
        && let Some((admin, _)) = store.user_by_name("admin").await?
    {
        let (_, token) = store
            .create_api_token(&admin.id, "drover up", Duration::from_secs(365 * 24 * 3600))
            .await?;
        crate::login::remember_api_token(&url, &token)?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut server_task = tokio::spawn(server.serve(stopped(stop_rx.clone())));
    let mut config = worker_config(
        url.clone(),
        token,
        worker_dir,
        &args.worker,
        args.server.require_inference,
    )?;
    // The local worker trusts the control plane's own certificate.
    config.ca_cert = crate::login::ca_cert().or_else(|| args.server.tls_cert.clone());
    // Sandboxed jobs must not see the database, whatever the data directory's place.
    config.hidden_paths = std::fs::canonicalize(&args.server.data_dir)
        .into_iter()
        .collect();
    let capabilities = drover_worker::capabilities(&config);
    let started = drover_core::Timestamp::now();
    let mut worker_task = tokio::spawn(drover_worker::run(config, stopped(stop_rx)));
    // "Up" means a first job or request is served at once: the local worker is connected,
    // with its models loaded.
    let ready = tokio::select! {
        r = local_worker_ready(store.as_ref(), started, &capabilities.models) => r,
        r = &mut worker_task => Err(anyhow::anyhow!("the local worker stopped: {}", match r {
            Ok(Ok(())) => "without an error".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        })),
        _ = shutdown_signal() => Ok(()),
    };
    if let Err(e) = ready {
        let _ = stop_tx.send(true);
        return Err(e);
    }
    let server_flag = if url == drover_client::DEFAULT_SERVER {
        String::new()
    } else {
        format!(" --server {url}")
    };
    println!("drover is up");
    println!("  API:    {url}  (HTTP JSON and gRPC)");
    println!("  data:   {}", args.server.data_dir.display());
    println!("  worker: local, {} slots", capabilities.slots);
    if !capabilities.models.is_empty() {
        println!("  models: {}", capabilities.models.join(", "));
    }
    println!();
    println!("Try it from another terminal:");
    println!("  drover{server_flag} job run --command 'echo hello from drover' --follow");
    if let Some(model) = capabilities.models.first() {
        println!("  drover{server_flag} infer --model {model} --prompt 'Say hello'");
    }
    println!("Stop with Ctrl-C.");
    let result: anyhow::Result<()> = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        r = &mut server_task => Err(anyhow::anyhow!("the control plane stopped: {:?}", r.map(|r| r.map_err(|e| e.to_string())))),
        r = &mut worker_task => Err(anyhow::anyhow!("the local worker stopped: {}", match r {
            Ok(Ok(())) => "without an error".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        })),
    };
    let _ = stop_tx.send(true);
    // The local worker stops its jobs (their kill grace); the control plane gives the jobs
    // of the workers its providers started 10 s, then removes those workers. Bounded, so a
    // stop that hangs still ends.
    let _ = tokio::time::timeout(Duration::from_secs(45), async {
        let _ = (&mut worker_task).await;
        let _ = (&mut server_task).await;
    })
    .await;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Waits until the local worker is connected (heard from since `started`) and serves
/// `models`, with a spinner on a terminal: loading a model takes seconds.
async fn local_worker_ready(
    store: &dyn drover_store::Store,
    started: drover_core::Timestamp,
    models: &[String],
) -> anyhow::Result<()> {
    let what = if models.is_empty() {
        "starting the local worker".to_string()
    } else {
        format!("loading {}", models.join(", "))
    };
    let spinner = output::spinner(&what);
    loop {
        let workers = store.list_workers().await?;
        let ready = workers.iter().any(|w| {
            w.state == drover_core::WorkerState::Ready
                && w.last_seen_at >= started
                && models.iter().all(|m| w.capabilities.models.contains(m))
        });
        if ready {
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Args)]
pub struct MigrateArgs {
    /// sqlite://PATH or postgres://USER:PASSWORD@HOST/DB.
    #[arg(long, env = "DROVER_DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

/// Applies the schema migrations this binary carries, and nothing else.
pub async fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    drover_store::open_with(&args.database_url, drover_store::Migrations::Apply).await?;
    println!("schema up to date");
    Ok(ExitCode::SUCCESS)
}
