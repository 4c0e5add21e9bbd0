//! `drover bench …`: workloads that print figures. No test asserts a duration; these are
//! what the figures in docs/benchmarks.md come from.
//!
//! Unless `--server` is given, a bench starts its own control plane (`drover server`) and
//! workers (`drover worker`) as child processes on a temporary directory, so that the
//! control plane's memory and CPU can be read from /proc.

use crate::output::{self, Output, print_json};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use drover_client::records::BatchResult;
use drover_client::{Client, FollowEvent};
use drover_core::{JobSpec, Timestamp};
use futures::StreamExt;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// N jobs through the queue: jobs/s from first submit to last completion.
    Throughput {
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        /// noop: workers complete jobs without running them (measures the control plane,
        /// the store and the protocol); process: each job runs `true`.
        #[arg(long, value_enum, default_value_t = crate::serve::Executor::Noop)]
        executor: crate::serve::Executor,
        #[command(flatten)]
        setup: Setup,
    },
    /// One job at a time on an idle warm worker: submit → RUNNING and submit → final.
    Latency {
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        #[command(flatten)]
        setup: Setup,
    },
    /// Latency and submit rate with a deep queue: N jobs queued (that no worker takes),
    /// then higher-priority jobs one at a time, against the same on an empty queue.
    Backlog {
        /// Jobs left queued (the figure is 1,000,000; filling takes a while).
        #[arg(long, default_value_t = 1_000_000)]
        queued: usize,
        /// Probe jobs timed on the empty queue, then on the deep one.
        #[arg(long, default_value_t = 200)]
        jobs: usize,
        #[command(flatten)]
        setup: Setup,
    },
    /// M simulated workers connected and heartbeating (completing jobs at once): the control
    /// plane's CPU while idle, and dispatch latency meanwhile.
    Workers {
        /// Simulated workers to connect.
        #[arg(long, default_value_t = 1000)]
        simulated: usize,
        /// How long the idle CPU is measured.
        #[arg(long, default_value = "10s", value_parser = crate::output::parse_duration)]
        idle: Duration,
        #[arg(long, default_value_t = 200)]
        jobs: usize,
        #[command(flatten)]
        setup: Setup,
    },
    /// One job printing many lines: lines/s stored, and the delay a live follower sees.
    Logs {
        #[arg(long, default_value_t = 1_000_000)]
        lines: usize,
        #[command(flatten)]
        setup: Setup,
    },
}

#[derive(Args, Clone)]
pub struct Setup {
    /// Measure a running control plane instead of starting one (its memory is not read).
    #[arg(long = "target")]
    target: Option<String>,
    /// Database of the control plane the bench starts (default: SQLite in a temp dir).
    #[arg(long)]
    database_url: Option<String>,
    /// Workers the bench starts.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per worker (default: 256 with the noop executor, whose jobs hold a slot for no
    /// time, so that the figure is the control plane's and not 32 slots' round trips; 16
    /// otherwise).
    #[arg(long)]
    slots: Option<u32>,
    /// Submission requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Jobs per submission request (`POST /v1/jobs/batch`, up to 1,000); 1 submits each job
    /// alone (`POST /v1/jobs`).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    batch: u16,
}

impl Setup {
    fn slots(&self, executor: crate::serve::Executor) -> u32 {
        self.slots.unwrap_or(match executor {
            crate::serve::Executor::Noop => 256,
            crate::serve::Executor::Process => 16,
        })
    }
}

/// The control plane and workers a bench started.
struct Fleet {
    client: Client,
    server_pid: Option<u32>,
    worker_pids: Vec<u32>,
    _children: Children,
    _dir: Option<tempfile::TempDir>,
}

/// Child processes, killed when the bench ends, however it ends (a failed start too).
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(args: &[String], log: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the drover binary")?;
    let log = std::fs::File::create(log)?;
    Ok(Command::new(exe)
        .args(args)
        .env("DROVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

async fn fleet(setup: &Setup, executor: crate::serve::Executor) -> anyhow::Result<Fleet> {
    if let Some(url) = &setup.target {
        return Ok(Fleet {
            client: crate::login::client(url).await?,
            server_pid: None,
            worker_pids: Vec::new(),
            _children: Children::default(),
            _dir: None,
        });
    }
    let dir = tempfile::Builder::new().prefix("drover-bench-").tempdir()?;
    let data = dir.path().join("server");
    // A throwaway control plane on loopback: 74 random bits of a UUIDv7 are plenty.
    let admin_password = drover_core::JobId::new().to_string();
    let mut args: Vec<String> = vec![
        "server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--admin-password".into(),
        admin_password.clone(),
    ];
    if let Some(db) = &setup.database_url {
        args.extend(["--database-url".into(), db.clone()]);
    }
    std::fs::create_dir_all(&data)?;
    let server = spawn(&args, &dir.path().join("server.log"))?;
    let server_pid = server.id();
    let mut children = Children(vec![server]);
    let addr_file = data.join("api.addr");
    let started = Instant::now();
    let url = loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file)
            && text.ends_with('\n')
        {
            break text.trim().to_string();
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the control plane did not start; see {}",
                dir.path().join("server.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let client = Client::new(&url)?;
    let tokens = match client.login("admin", &admin_password).await {
        Ok(tokens) => tokens,
        Err(e) if setup.database_url.is_some() => bail!(
            "cannot sign in to the control plane the bench started ({e}): the bench needs an \
             empty database (it creates its own admin), and --database-url names one in use"
        ),
        Err(e) => return Err(e.into()),
    };
    let client = client.with_token(tokens.access_token);
    let mut worker_pids = Vec::new();
    for i in 0..setup.workers {
        let token = client
            .create_node_token(Duration::from_secs(600))
            .await?
            .token;
        let executor_name = match executor {
            crate::serve::Executor::Noop => "noop",
            crate::serve::Executor::Process => "process",
        };
        let args: Vec<String> = [
            "worker",
            "--server",
            &url,
            "--token",
            &token,
            "--name",
            &format!("bench-{i}"),
            "--slots",
            &setup.slots(executor).to_string(),
            "--executor",
            executor_name,
            "--state-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().join(format!("worker-{i}")).display().to_string()])
        .collect();
        let worker = spawn(&args, &dir.path().join(format!("worker-{i}.log")))?;
        worker_pids.push(worker.id());
        children.0.push(worker);
    }
    while client
        .list_nodes()
        .await
        .map(|n| n.iter().filter(|n| n.connected).count())
        .unwrap_or(0)
        < setup.workers
    {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the workers did not connect");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Fleet {
        client,
        server_pid: Some(server_pid),
        worker_pids,
        _children: children,
        _dir: Some(dir),
    })
}

/// Peak resident memory (MiB) and CPU seconds of a process, from /proc.
fn process_usage(pid: Option<u32>) -> (Option<f64>, Option<f64>) {
    let Some(pid) = pid else { return (None, None) };
    let peak = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0);
    let cpu = process_cpu(&pid.to_string(), false);
    (peak, cpu)
}

/// CPU seconds a process has used (`pid` a number or `self`), with those of the children
/// it has waited for when `with_children` (a worker's job processes), from /proc.
fn process_cpu(pid: &str, with_children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime, stime, cutime and cstime are fields 14 to 17 of stat, 12 to 15 after the
    // name; Linux reports them in USER_HZ, which is 100.
    let count = if with_children { 4 } else { 2 };
    let mut ticks = 0.0;
    for field in fields.get(11..11 + count)? {
        ticks += field.parse::<f64>().ok()?;
    }
    Some(ticks / 100.0)
}

/// CPU seconds used so far: by the control plane, the workers (with their jobs) and the
/// bench itself, and by the whole machine (busy, and busy plus idle, over its `cores`).
#[derive(Clone, Copy)]
struct CpuReading {
    control_plane: f64,
    workers: f64,
    bench: f64,
    machine_busy: f64,
    machine_all: f64,
    cores: usize,
}

impl CpuReading {
    /// None for a control plane the bench did not start, or without /proc.
    fn take(fleet: &Fleet) -> Option<Self> {
        let control_plane = process_cpu(&fleet.server_pid?.to_string(), false)?;
        let mut workers = 0.0;
        for pid in &fleet.worker_pids {
            workers += process_cpu(&pid.to_string(), true)?;
        }
        let bench = process_cpu("self", false)?;
        // The first line of /proc/stat: user nice system idle iowait irq softirq steal
        // (guest time is counted in user already), in USER_HZ.
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<f64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|t| t.parse::<f64>().ok())
            .collect::<Option<_>>()?;
        let all: f64 = ticks.iter().sum();
        let idle = ticks.get(3)? + ticks.get(4)?;
        // The cores that line sums (`cpu0`, `cpu1`, …), which a container's CPU limit
        // does not change.
        let cores = stat
            .lines()
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        Some(Self {
            control_plane,
            workers,
            bench,
            machine_busy: (all - idle) / 100.0,
            machine_all: all / 100.0,
            cores,
        })
    }

    /// Where the CPU went between `before` and `self`, per job, and how busy the machine
    /// was: at 100 % the run was bound by CPU; below, by waits (a serial stage, hand-offs).
    fn figures(self, before: Self, jobs: usize) -> Vec<(String, String)> {
        let per_job = |after: f64, before: f64| per_job_us(after - before, jobs);
        let busy = (self.machine_busy - before.machine_busy)
            / (self.machine_all - before.machine_all).max(f64::MIN_POSITIVE);
        let control_plane = per_job(self.control_plane, before.control_plane);
        let workers = per_job(self.workers, before.workers);
        let bench = per_job(self.bench, before.bench);
        // The database server (PostgreSQL on this host), the kernel's threads, anything else.
        let rest =
            per_job(self.machine_busy, before.machine_busy) - control_plane - workers - bench;
        vec![
            (
                "CPU per job: control plane · workers · bench client · rest of the machine".into(),
                format!(
                    "{control_plane:.0} µs · {workers:.0} µs · {bench:.0} µs · {:.0} µs",
                    rest.max(0.0)
                ),
            ),
            (
                "machine busy during the run".into(),
                format!("{:.0} % of {} cores", busy * 100.0, self.cores),
            ),
        ]
    }
}

#[derive(Serialize)]
struct Figures {
    scenario: String,
    database: String,
    figures: Vec<Figure>,
}

#[derive(Serialize)]
struct Figure {
    name: String,
    value: String,
}

/// Runs `jobs` copies of `spec` one at a time; figures for submit → RUNNING, submit → final
/// (the server's clock) and the client's round trip, each name prefixed by `label`.
async fn probe(
    client: &Client,
    spec: &JobSpec,
    jobs: usize,
    label: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let (mut to_running, mut to_final, mut seen) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..jobs {
        let t0 = Instant::now();
        let job = client.submit_job(spec).await?;
        let view = client.wait_job(&job.id.to_string(), |_| {}).await?;
        seen.push(t0.elapsed());
        if let Some(run) = view.runs.first() {
            if let Some(started) = run.run.started_at {
                to_running.push(started.since(view.job.created_at));
            }
            if let Some(finished) = run.run.finished_at {
                to_final.push(finished.since(view.job.created_at));
            }
        }
    }
    let mut figures = Vec::new();
    for (name, list) in [
        ("submit → RUNNING", &mut to_running),
        ("submit → final", &mut to_final),
        ("client round trip (submit, wait)", &mut seen),
    ] {
        list.sort();
        figures.push((
            format!("{label}{name}"),
            format!(
                "p50 {} · p90 {} · p99 {} · max {}",
                ms(percentile(list, 0.5)),
                ms(percentile(list, 0.9)),
                ms(percentile(list, 0.99)),
                ms(list.last().copied().unwrap_or_default())
            ),
        ));
    }
    Ok(figures)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Submits `n` copies of `spec`, `setup.batch` per request, with `setup.concurrency`
/// requests in flight; returns the ids.
async fn submit_all(
    client: &Client,
    spec: &JobSpec,
    n: usize,
    setup: &Setup,
) -> anyhow::Result<Vec<String>> {
    let per_request = usize::from(setup.batch);
    let requests = n.div_ceil(per_request);
    let spec = Arc::new(spec.clone());
    let answers: Vec<anyhow::Result<Vec<String>>> = futures::stream::iter(0..requests)
        .map(|r| {
            let (client, spec) = (client.clone(), spec.clone());
            let count = per_request.min(n - r * per_request);
            async move {
                if count == 1 {
                    return Ok(vec![client.submit_job(&spec).await?.id.to_string()]);
                }
                let specs = vec![(*spec).clone(); count];
                client
                    .submit_jobs(&specs)
                    .await?
                    .into_iter()
                    .map(|result| match result {
                        BatchResult::Submitted { job, .. } => Ok(job.id.to_string()),
                        BatchResult::Refused { error } => {
                            bail!("a job of the batch was refused: {}", error.message)
                        }
                    })
                    .collect()
            }
        })
        .buffer_unordered(setup.concurrency.max(1))
        .collect()
        .await;
    let mut ids = Vec::with_capacity(n);
    for answer in answers {
        ids.extend(answer?);
    }
    Ok(ids)
}

/// Waits until `n` more jobs than `before` finished, reading the server's counter.
async fn wait_finished(client: &Client, before: u64, n: u64) -> anyhow::Result<()> {
    let bar = output::spinner("waiting for the jobs to finish");
    loop {
        let done = finished_count(client).await?.saturating_sub(before);
        if let Some(bar) = &bar {
            bar.set_message(format!("{done}/{n} jobs finished"));
        }
        if done >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

/// The samples of the metric `name` in /metrics' text: each one's labels (`{…}`, or empty)
/// and value.
fn metric_samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> {
    text.lines().filter_map(move |line| {
        let (labels, value) = line.strip_prefix(name)?.rsplit_once(' ')?;
        (labels.is_empty() || labels.starts_with('{')).then_some(())?;
        Some((labels, value.parse().ok()?))
    })
}

/// `drover_jobs_finished_total` summed over states, from /metrics.
async fn finished_count(client: &Client) -> anyhow::Result<u64> {
    let text = client.metrics().await?;
    Ok(metric_samples(&text, "drover_jobs_finished_total")
        .map(|(_, value)| value)
        .sum::<f64>() as u64)
}

/// The control plane's hot write transactions so far, by kind: how many, and the seconds
/// they were open (`drover_store_write_seconds_{count,sum}{kind="…"}` from /metrics).
#[derive(Default)]
struct WriteTotals {
    transactions: HashMap<String, f64>,
    seconds: HashMap<String, f64>,
}

async fn write_totals(client: &Client) -> anyhow::Result<WriteTotals> {
    let text = client.metrics().await?;
    let by_kind = |name| {
        metric_samples(&text, name)
            .filter_map(|(labels, value)| {
                let kind = labels.strip_prefix("{kind=\"")?.split_once('"')?.0;
                Some((kind.to_string(), value))
            })
            .collect()
    };
    Ok(WriteTotals {
        transactions: by_kind("drover_store_write_seconds_count"),
        seconds: by_kind("drover_store_write_seconds_sum"),
    })
}

/// How the write transactions of a run went, by kind: jobs per transaction (the batches
/// the writer saw), how long they were open per job, and how many were open at once on
/// average over `wall`: on SQLite, where one connection writes, that is how busy the
/// writer was (near 100 % it is the serial stage that bounds the run); on PostgreSQL, how
/// many of the pool's connections writes kept busy.
fn write_figures(
    before: &WriteTotals,
    after: &WriteTotals,
    jobs: usize,
    wall: Duration,
    one_writer: bool,
) -> Vec<(String, String)> {
    const KINDS: [&str; 3] = ["submit", "assign", "report"];
    let grown = |of: fn(&WriteTotals) -> &HashMap<String, f64>| {
        KINDS.map(|kind| {
            of(after).get(kind).copied().unwrap_or(0.0)
                - of(before).get(kind).copied().unwrap_or(0.0)
        })
    };
    let transactions = grown(|t| &t.transactions);
    let seconds = grown(|t| &t.seconds);
    // A dash where the control plane wrote no such transaction (its metrics not reached).
    let per_transaction = transactions.map(|n| {
        if n >= 1.0 {
            format!("{:.1}", jobs as f64 / n)
        } else {
            "–".into()
        }
    });
    let per_job = seconds.map(|s| per_job_us(s, jobs));
    let mut figures = vec![
        (
            "jobs per write transaction: submit · assign · report".into(),
            per_transaction.join(" · "),
        ),
        (
            "write transactions open per job: submit · assign · report".into(),
            format!(
                "{:.0} µs · {:.0} µs · {:.0} µs",
                per_job[0], per_job[1], per_job[2]
            ),
        ),
    ];
    let open_at_once = seconds.iter().sum::<f64>() / wall.as_secs_f64().max(f64::MIN_POSITIVE);
    figures.push(if one_writer {
        (
            "the one SQLite writer busy during the run".into(),
            format!("{:.0} %", open_at_once * 100.0),
        )
    } else {
        (
            "write transactions open at once, on average".into(),
            format!("{open_at_once:.1}"),
        )
    });
    figures
}

pub async fn run(cmd: BenchCommand, output: Output) -> anyhow::Result<ExitCode> {
    let figures = match cmd {
        BenchCommand::Throughput {
            jobs,
            executor,
            setup,
        } => throughput(jobs, executor, &setup).await?,
        BenchCommand::Latency { jobs, setup } => latency(jobs, &setup).await?,
        BenchCommand::Logs { lines, setup } => logs(lines, &setup).await?,
        BenchCommand::Backlog {
            queued,
            jobs,
            setup,
        } => backlog(queued, jobs, &setup).await?,
        BenchCommand::Workers {
            simulated,
            idle,
            jobs,
            setup,
        } => simulated_workers(simulated, idle, jobs, &setup).await?,
    };
    match output {
        Output::Json => print_json(&figures)?,
        Output::Text => {
            println!("{} ({})", figures.scenario, figures.database);
            let mut t = output::table(&["FIGURE", "VALUE"]);
            for f in &figures.figures {
                t.add_row(vec![f.name.clone(), f.value.clone()]);
            }
            println!("{t}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn database_name(setup: &Setup) -> String {
    match (&setup.target, &setup.database_url) {
        (Some(t), _) => format!("target {t}"),
        _ if on_own_sqlite(setup) => "SQLite".into(),
        _ => "PostgreSQL".into(),
    }
}

/// True when the bench's own control plane runs on SQLite (one writer connection).
fn on_own_sqlite(setup: &Setup) -> bool {
    setup.target.is_none()
        && !setup
            .database_url
            .as_deref()
            .is_some_and(|db| db.starts_with("postgres"))
}

/// Microseconds per job of `seconds` spent over a run of `jobs`.
fn per_job_us(seconds: f64, jobs: usize) -> f64 {
    seconds / jobs.max(1) as f64 * 1e6
}

fn usage_figures(fleet: &Fleet, figures: &mut Vec<(String, String)>) {
    let (peak, cpu) = process_usage(fleet.server_pid);
    if let Some(peak) = peak {
        figures.push(("control plane peak memory".into(), format!("{peak:.1} MiB")));
    }
    if let Some(cpu) = cpu {
        figures.push(("control plane CPU time".into(), format!("{cpu:.2} s")));
    }
}

async fn throughput(
    jobs: usize,
    executor: crate::serve::Executor,
    setup: &Setup,
) -> anyhow::Result<Figures> {
    let fleet = fleet(setup, executor).await?;
    let before = finished_count(&fleet.client).await?;
    let spec = JobSpec {
        command: Some("true".into()),
        max_attempts: Some(1),
        ..Default::default()
    };
    let writes_before = write_totals(&fleet.client).await?;
    let cpu_before = CpuReading::take(&fleet);
    let started = Instant::now();
    submit_all(&fleet.client, &spec, jobs, setup).await?;
    let submitted = started.elapsed();
    wait_finished(&fleet.client, before, jobs as u64).await?;
    let total = started.elapsed();
    let cpu_after = CpuReading::take(&fleet);
    let writes_after = write_totals(&fleet.client).await?;
    let mut figures = vec![
        ("jobs".into(), jobs.to_string()),
        (
            "executor".into(),
            if executor == crate::serve::Executor::Noop {
                "noop"
            } else {
                "process"
            }
            .to_string(),
        ),
        (
            "workers × slots".into(),
            format!("{} × {}", setup.workers, setup.slots(executor)),
        ),
        ("jobs per submit request".into(), setup.batch.to_string()),
        (
            "submit rate".into(),
            format!("{:.0} jobs/s", jobs as f64 / submitted.as_secs_f64()),
        ),
        (
            "first submit → last completion".into(),
            format!("{:.2} s", total.as_secs_f64()),
        ),
        (
            "throughput".into(),
            format!("{:.0} jobs/s", jobs as f64 / total.as_secs_f64()),
        ),
    ];
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        figures.extend(after.figures(before, jobs));
    }
    let one_writer = on_own_sqlite(setup);
    figures.extend(write_figures(
        &writes_before,
        &writes_after,
        jobs,
        total,
        one_writer,
    ));
    usage_figures(&fleet, &mut figures);
    Ok(Figures {
        scenario: "throughput".into(),
        database: database_name(setup),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}

async fn latency(jobs: usize, setup: &Setup) -> anyhow::Result<Figures> {
    let mut one = setup.clone();
    one.workers = 1;
    let fleet = fleet(&one, crate::serve::Executor::Process).await?;
    let spec = JobSpec {
        command: Some("true".into()),
        max_attempts: Some(1),
        ..Default::default()
    };
    let mut figures = vec![("jobs".into(), jobs.to_string())];
    figures.extend(probe(&fleet.client, &spec, jobs, "").await?);
    usage_figures(&fleet, &mut figures);
    Ok(Figures {
        scenario: "latency".into(),
        database: database_name(setup),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}

async fn logs(lines: usize, setup: &Setup) -> anyhow::Result<Figures> {
    let mut one = setup.clone();
    one.workers = 1;
    let fleet = fleet(&one, crate::serve::Executor::Process).await?;
    let spec = JobSpec {
        command: Some(format!("seq 1 {lines}")),
        max_attempts: Some(1),
        ..Default::default()
    };
    let job = fleet.client.submit_job(&spec).await?;
    let id = job.id.to_string();
    let mut follow = Box::pin(fleet.client.follow_logs(&id, None).await?);
    let mut delays = Vec::with_capacity(lines);
    let mut received = 0usize;
    while let Some(ev) = follow.next().await {
        match ev? {
            FollowEvent::Entry(e) => {
                received += 1;
                delays.push(Timestamp::now().since(e.timestamp));
            }
            FollowEvent::End(_) => break,
        }
    }
    let view = fleet.client.get_job(&id).await?;
    let run = view.runs.first().context("the job never ran")?;
    let stored = run.log.as_ref().map(|l| l.entry_count).unwrap_or(0);
    let took = match (run.run.started_at, run.run.finished_at) {
        (Some(s), Some(f)) => f.since(s),
        _ => Duration::ZERO,
    };
    delays.sort();
    let mut figures = vec![
        ("lines printed".into(), lines.to_string()),
        ("lines stored".into(), stored.to_string()),
        ("lines followed".into(), received.to_string()),
        (
            "job run time".into(),
            format!("{:.2} s", took.as_secs_f64()),
        ),
        (
            "stored rate".into(),
            format!(
                "{:.0} lines/s",
                stored as f64 / took.as_secs_f64().max(1e-9)
            ),
        ),
        (
            "follower delay".into(),
            format!(
                "p50 {} · p99 {} · max {}",
                ms(percentile(&delays, 0.5)),
                ms(percentile(&delays, 0.99)),
                ms(delays.last().copied().unwrap_or_default())
            ),
        ),
    ];
    usage_figures(&fleet, &mut figures);
    Ok(Figures {
        scenario: "logs".into(),
        database: database_name(setup),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}

async fn backlog(queued: usize, jobs: usize, setup: &Setup) -> anyhow::Result<Figures> {
    let mut one = setup.clone();
    one.workers = 1;
    let fleet = fleet(&one, crate::serve::Executor::Process).await?;
    let probe_spec = JobSpec {
        command: Some("true".into()),
        max_attempts: Some(1),
        priority: 1,
        ..Default::default()
    };
    let mut figures = vec![
        ("queued".into(), queued.to_string()),
        ("probes".into(), jobs.to_string()),
    ];
    figures.extend(probe(&fleet.client, &probe_spec, jobs, "empty queue: ").await?);
    // Jobs no worker takes (a label none has), so the queue stays deep.
    let mut stuck = JobSpec {
        command: Some("true".into()),
        ..Default::default()
    };
    stuck.labels.insert("bench".into(), "backlog".into());
    let started = Instant::now();
    submit_all(&fleet.client, &stuck, queued, setup).await?;
    let took = started.elapsed();
    figures.push((
        "submit rate while filling".into(),
        format!("{:.0} jobs/s", queued as f64 / took.as_secs_f64()),
    ));
    figures.extend(probe(&fleet.client, &probe_spec, jobs, "deep queue: ").await?);
    usage_figures(&fleet, &mut figures);
    Ok(Figures {
        scenario: "backlog".into(),
        database: database_name(setup),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}

/// A worker simulated inside the bench: registers, keeps its stream, heartbeats, and
/// completes every assignment at once.
async fn simulated_worker(server: String, token: String, name: String) -> anyhow::Result<()> {
    use drover_proto::v1::{self, server_message::Body as In, worker_message::Body as Out};
    let channel = tonic::transport::Endpoint::from_shared(server)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = v1::worker_service_client::WorkerServiceClient::new(channel);
    let caps = v1::Capabilities {
        hostname: name.clone(),
        cpus: 1,
        slots: 4,
        isolation_modes: vec!["process".into()],
        ..Default::default()
    };
    let reg = client
        .register(v1::RegisterRequest {
            token,
            name,
            capabilities: Some(caps.clone()),
        })
        .await?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let send = |body| {
        let _ = tx.send(v1::WorkerMessage { body: Some(body) });
    };
    send(Out::Hello(v1::Hello {
        capabilities: Some(caps),
        active_run_ids: Vec::new(),
    }));
    let mut request = tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", reg.credential).parse()?,
    );
    let mut inbound = client.session(request).await?.into_inner();
    let mut beat = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            msg = inbound.message() => match msg? {
                Some(v1::ServerMessage { body: Some(In::Welcome(w)) }) => {
                    beat = tokio::time::interval(Duration::from_millis(w.heartbeat_interval_ms.max(100)));
                }
                Some(v1::ServerMessage { body: Some(In::Assignment(a)) }) => {
                    send(Out::Started(v1::RunStarted { run_id: a.run_id.clone(), accepts: true }));
                    send(Out::Finished(v1::RunFinished {
                        run_id: a.run_id,
                        outcome: v1::RunOutcome::Succeeded as i32,
                        exit_code: Some(0),
                        error: None,
                        last_seq: 0,
                        result_json: None,
                    }));
                }
                Some(_) => {}
                None => return Ok(()),
            },
            _ = beat.tick() => send(Out::Heartbeat(v1::Heartbeat {})),
        }
    }
}

async fn simulated_workers(
    workers: usize,
    idle: Duration,
    jobs: usize,
    setup: &Setup,
) -> anyhow::Result<Figures> {
    let mut none = setup.clone();
    none.workers = 0;
    let fleet = fleet(&none, crate::serve::Executor::Noop).await?;
    let server = fleet.client.server().trim_end_matches('/').to_string();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..workers {
        let token = fleet
            .client
            .create_node_token(Duration::from_secs(600))
            .await?
            .token;
        tasks.push(tokio::spawn(simulated_worker(
            server.clone(),
            token,
            format!("sim-{i}"),
        )));
    }
    while fleet
        .client
        .list_nodes()
        .await
        .map(|n| n.iter().filter(|n| n.connected).count())
        .unwrap_or(0)
        < workers
    {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the simulated workers did not all connect");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_time = started.elapsed();
    let (_, cpu_before) = process_usage(fleet.server_pid);
    tokio::time::sleep(idle).await;
    let (_, cpu_after) = process_usage(fleet.server_pid);
    let mut figures = vec![
        ("simulated workers".into(), workers.to_string()),
        (
            "all connected after".into(),
            format!("{:.1} s", connect_time.as_secs_f64()),
        ),
    ];
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        figures.push((
            format!("control plane CPU while idle ({} s)", idle.as_secs()),
            format!("{:.1} % of one core", (b - a) / idle.as_secs_f64() * 100.0),
        ));
    }
    let spec = JobSpec {
        command: Some("true".into()),
        max_attempts: Some(1),
        ..Default::default()
    };
    figures.extend(probe(&fleet.client, &spec, jobs, "").await?);
    usage_figures(&fleet, &mut figures);
    for t in tasks {
        t.abort();
    }
    Ok(Figures {
        scenario: "workers".into(),
        database: database_name(setup),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}
