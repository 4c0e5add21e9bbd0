//! `drover`: the one binary. The CLI parses, the crates do the work.

mod bench;
mod infer;
mod job;
mod login;
mod node;
mod output;
mod sched;
mod serve;

use clap::{Parser, Subcommand};
use output::Output;
use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: the control plane allocates and frees small
/// buffers (rows, events, messages) on one thread and drops them on another, which glibc
/// serves with arena locks and consolidation — a tenth of the machine in the noop bench.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Run jobs and models on a fleet of machines"
)]
struct Cli {
    /// The control plane to talk to.
    #[arg(long, global = true, env = "DROVER_SERVER", default_value = drover_client::DEFAULT_SERVER)]
    server: String,
    /// Speak for the user of this access or API token (default: what `drover login` stored).
    #[arg(
        long = "api-token",
        global = true,
        env = "DROVER_API_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// For an https:// control plane: the certificate authority (PEM) its certificate
    /// must chain to.
    #[arg(long, global = true, env = "DROVER_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// How to print results.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Control plane and one local worker in one process, data in ./.drover.
    Up(Box<serve::UpArgs>),
    /// The control plane alone.
    Server(Box<serve::ServerArgs>),
    /// A worker (node agent) that joins a control plane.
    Worker(Box<serve::WorkerArgs>),
    /// Apply the database schema migrations (the server does it at start unless
    /// --no-migrate).
    Migrate(serve::MigrateArgs),
    /// Submit, inspect, follow and cancel jobs.
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Nodes (workers) and their join tokens.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Jobs that run in sequence, stopping at the first failure.
    #[command(subcommand)]
    Group(sched::GroupCommand),
    /// Hold a named resource of a node for interactive use; jobs submitted into the
    /// reservation (job run --reservation ID) start at once, others needing it wait.
    Reserve(sched::ReserveArgs),
    /// Webhooks: HTTP callbacks when job runs end.
    #[command(subcommand)]
    Webhook(sched::WebhookCommand),
    /// Sign in; the tokens are kept in the config dir for this server.
    Login(login::LoginArgs),
    /// Sign out: the stored tokens are revoked and forgotten.
    Logout,
    /// API tokens for automation.
    #[command(subcommand, name = "token")]
    ApiToken(login::TokenCommand),
    /// Users (admins only).
    #[command(subcommand)]
    User(login::UserCommand),
    /// The audit trail: logins, tokens, node registrations and revocations, refusals.
    Audit {
        #[arg(long, default_value_t = 200)]
        limit: u32,
    },
    /// Models nodes can serve: fetch them, list them.
    #[command(subcommand)]
    Model(infer::ModelCommand),
    /// Run an inference on a node serving the model; tokens stream as they come.
    Infer(infer::InferArgs),
    /// Measure throughput, latency and log streaming; prints figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Started by a worker: stops its jobs if it freezes or dies (reads its stdin).
    #[command(hide = true)]
    WorkerWatchdog {
        #[arg(long)]
        timeout_ms: u64,
    },
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let long_running = matches!(
        cli.command,
        Command::Up(_) | Command::Server(_) | Command::Worker(_) | Command::WorkerWatchdog { .. }
    );
    init_tracing(if long_running { "info" } else { "warn" });
    login::set_token(cli.token.clone());
    login::set_ca_cert(cli.ca_cert.clone());
    let result = match cli.command {
        Command::Up(args) => serve::up(*args).await,
        Command::Server(args) => serve::server(*args).await,
        Command::Worker(args) => serve::worker(*args, &cli.server).await,
        Command::Migrate(args) => serve::migrate(args).await,
        Command::WorkerWatchdog { timeout_ms } => {
            // Blocking on purpose: its own threads, no runtime needed.
            drover_worker::watchdog::run(std::time::Duration::from_millis(timeout_ms));
            Ok(ExitCode::SUCCESS)
        }
        Command::Job(cmd) => job::run(cmd, &cli.server, cli.output).await,
        Command::Node(cmd) => node::run(cmd, &cli.server, cli.output).await,
        Command::Group(cmd) => sched::group(cmd, &cli.server, cli.output).await,
        Command::Reserve(args) => sched::reserve(args, &cli.server, cli.output).await,
        Command::Webhook(cmd) => sched::webhook(cmd, &cli.server, cli.output).await,
        Command::Login(args) => login::login(args, &cli.server, cli.output).await,
        Command::Logout => login::logout(&cli.server).await,
        Command::ApiToken(cmd) => login::token(cmd, &cli.server, cli.output).await,
        Command::User(cmd) => login::user(cmd, &cli.server, cli.output).await,
        Command::Audit { limit } => login::audit(limit, &cli.server, cli.output).await,
        Command::Model(cmd) => infer::model(cmd, cli.output).await,
        Command::Infer(args) => infer::infer(args, &cli.server, cli.output).await,
        Command::Bench(cmd) => bench::run(cmd, cli.output).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Bad input exits 2 (as clap does for what it checks), anything else 1.
            let invalid = e.downcast_ref::<output::UsageError>().is_some()
                || e.downcast_ref::<drover_client::ClientError>()
                    .is_some_and(|c| {
                        matches!(c, drover_client::ClientError::Api { status: 400, .. })
                    });
            ExitCode::from(if invalid { 2 } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every subcommand's flags are consistent (clap checks names, conflicts, defaults).
    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
