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

mod fleet;
mod measure;
mod scenarios;
mod simulated;
mod split;

use fleet::*;
use measure::*;
use scenarios::*;
use simulated::*;
use split::*;

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
    /// A model whole against the same model as stages (in this process, alternated):
    /// time to first token, decode tokens/s, bytes per token between stages.
    Split {
        /// A fetched model's name or a GGUF path.
        #[arg(long, default_value = "smollm2")]
        model: String,
        /// The stages, FIRST-LAST each, covering every block in order.
        #[arg(long, value_delimiter = ',', default_value = "0-14,15-29")]
        blocks: Vec<String>,
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
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

pub async fn run(cmd: BenchCommand, output: Output) -> anyhow::Result<ExitCode> {
    let figures = match cmd {
        BenchCommand::Throughput {
            jobs,
            executor,
            setup,
        } => throughput(jobs, executor, &setup).await?,
        BenchCommand::Latency { jobs, setup } => latency(jobs, &setup).await?,
        BenchCommand::Logs { lines, setup } => logs(lines, &setup).await?,
        BenchCommand::Split {
            model,
            blocks,
            tokens,
            rounds,
        } => {
            tokio::task::spawn_blocking(move || split(&model, &blocks, tokens, rounds.max(1)))
                .await??
        }
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
