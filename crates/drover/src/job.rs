//! `drover job …`

use crate::output::{self, Output, parse_duration, parse_pairs, print_json, usage};
use anyhow::{Context, bail};
use base64::Engine;
use clap::{Args, Subcommand};
use drover_client::records::{BatchResult, JobRecord, JobView, LogEntryView, LogStream};
use drover_client::{Client, FollowEvent};
use drover_core::{JobSpec, JobState};
use futures::StreamExt;
use std::io::Write;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum JobCommand {
    /// Submit a job; prints its id (or follows it with --follow, waits with --wait).
    Run(Box<RunArgs>),
    /// A job's state, status code, attempts and exit code.
    Get(JobRef),
    /// Jobs, newest first.
    List {
        /// Only jobs in this state (QUEUED, RUNNING, SUCCEEDED, FAILED, …).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// A job's output; -f follows it live until the job ends.
    Logs {
        #[command(flatten)]
        job: JobRef,
        #[arg(long, short = 'f')]
        follow: bool,
        /// Which attempt (default: the latest).
        #[arg(long)]
        attempt: Option<u32>,
    },
    /// What happened to a job, in order.
    Events(JobRef),
    /// Cancel a queued or running job.
    Cancel(JobRef),
    /// Wait until a job ends; exits with its exit code.
    Wait(JobRef),
    /// Retry a finished (failed, timed out, cancelled) attempt by hand: one more attempt
    /// in the same chain.
    Retry {
        /// The run (attempt) to retry: `drover job get` lists them.
        run_id: String,
    },
    /// Submit many jobs from a file of JSON job specs (the body of `POST /v1/jobs`), one
    /// per line or one JSON array; 1,000 per request. Prints each job's id, in order.
    Submit {
        /// The file; `-` reads standard input.
        file: String,
    },
}

/// Jobs per batch request (the server's limit).
const SUBMIT_BATCH: usize = 1000;

/// `job submit FILE`: every spec is read and checked first (a bad one is named by its line
/// or array position, exit 2, nothing sent); then they go 1,000 per request. Exits 1 if the
/// server refused any job alone (an unknown dependency, say).
async fn submit_file(client: &Client, file: &str, output: Output) -> anyhow::Result<ExitCode> {
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
    };
    let specs = match parse_specs(&text) {
        Ok(specs) if specs.is_empty() => {
            eprintln!("error: {file} holds no job spec");
            return Ok(ExitCode::from(2));
        }
        Ok(specs) => specs,
        Err(e) => {
            eprintln!("error: {file}: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut refused = 0;
    let mut results = Vec::with_capacity(specs.len());
    for chunk in specs.chunks(SUBMIT_BATCH) {
        for result in client.submit_jobs(chunk).await? {
            match &result {
                BatchResult::Refused { error } => {
                    refused += 1;
                    let n = results.len() + 1;
                    eprintln!("error: job {n} of {file} was refused: {}", error.message);
                }
                BatchResult::Submitted { job, .. } if output == Output::Text => {
                    println!("{}", job.id)
                }
                BatchResult::Submitted { .. } => {}
            }
            results.push(result);
        }
    }
    if output == Output::Json {
        print_json(&results)?;
    }
    Ok(if refused > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Job specs from a JSON array or JSON Lines (blank lines skipped), each checked as the
/// server would; an error names the line (or the array position) and the field.
fn parse_specs(text: &str) -> Result<Vec<JobSpec>, String> {
    let check = |spec: JobSpec, at: String| {
        spec.validated()
            .map_err(|e| format!("{at}: {}: {}", e.field, e.message))
    };
    if text.trim_start().starts_with('[') {
        let specs: Vec<JobSpec> =
            output::decode_json(text).map_err(|e| format!("not a JSON array of job specs: {e}"))?;
        return specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| check(spec, format!("job {}", i + 1)))
            .collect();
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let spec: JobSpec =
                output::decode_json(line).map_err(|e| format!("line {}: {e}", i + 1))?;
            check(spec, format!("line {}", i + 1))
        })
        .collect()
}

/// A job id, positional or as `--id` (as in scripts written for other job CLIs).
#[derive(Args)]
pub struct JobRef {
    #[arg(value_name = "ID", required_unless_present = "id_flag")]
    id: Option<String>,
    #[arg(long = "id", value_name = "ID", conflicts_with = "id")]
    id_flag: Option<String>,
}

impl JobRef {
    fn id(&self) -> &str {
        self.id
            .as_deref()
            .or(self.id_flag.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[arg(long)]
    name: Option<String>,
    /// Run by /bin/sh -c; with --args, the program to exec (no shell).
    #[arg(long)]
    command: Option<String>,
    /// Arguments for the program given in --command, split like a shell would.
    #[arg(long, allow_hyphen_values = true)]
    args: Option<String>,
    /// Program and arguments after `--`, exec'd with no shell.
    #[arg(last = true)]
    argv: Vec<String>,
    /// Environment: K=V,K2=V2 (repeatable).
    #[arg(long)]
    env: Vec<String>,
    #[arg(long)]
    working_dir: Option<String>,
    /// Whole-run limit: 30 (seconds), 500ms, 5m, 1h.
    #[arg(long, allow_hyphen_values = true)]
    timeout: Option<String>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i32,
    /// One try plus retries (default 4).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Base of the retry backoff: 10s, 500ms, …
    #[arg(long)]
    backoff: Option<String>,
    /// Node labels the worker must carry: K=V,K2=V2.
    #[arg(long)]
    labels: Option<String>,
    /// Named resources held while running: ollama=1.
    #[arg(long)]
    resources: Option<String>,
    /// A job that must succeed first (repeatable).
    #[arg(long = "depends-on")]
    depends_on: Vec<String>,
    /// Submitting again with the same key returns the first job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Run inside this reservation (`drover reserve`).
    #[arg(long)]
    reservation: Option<String>,
    /// process (default), sandbox (no network, read-only root, own pid namespace) or
    /// container (with --image).
    #[arg(long)]
    isolation: Option<String>,
    /// Run only on a worker this provider started (local, docker).
    #[arg(long)]
    provider: Option<String>,
    /// Container image, for --isolation container.
    #[arg(long)]
    image: Option<String>,
    /// `command` (default) or `inference` (with --model and --prompt; `drover infer` is the
    /// short way).
    #[arg(long, default_value = "command")]
    kind: String,
    /// For --kind inference: the model, as nodes serve it.
    #[arg(long)]
    model: Option<String>,
    /// For --kind inference: the user's message (through the model's chat template).
    #[arg(long)]
    prompt: Option<String>,
    /// For --kind inference: the most tokens to generate.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Wait until the job ends and exit with its exit code.
    #[arg(long, conflicts_with = "follow")]
    wait: bool,
    /// Print the job's output live until it ends; exit with its exit code.
    #[arg(long, short = 'f')]
    follow: bool,
}

impl RunArgs {
    fn spec(&self) -> anyhow::Result<JobSpec> {
        let mut spec = JobSpec {
            name: self.name.clone().unwrap_or_default(),
            working_dir: self.working_dir.clone(),
            priority: self.priority,
            max_attempts: self.max_attempts,
            ..Default::default()
        };
        match self.kind.as_str() {
            "command" => {}
            "inference" => {
                let (Some(model), Some(prompt)) = (&self.model, &self.prompt) else {
                    return Err(usage!("--kind inference: give --model and --prompt"));
                };
                spec.kind = drover_core::JobKind::Inference;
                spec.inference = Some(drover_core::InferenceSpec {
                    model: model.clone(),
                    messages: vec![drover_core::ChatTurn {
                        role: "user".into(),
                        content: prompt.clone(),
                    }],
                    max_tokens: self.max_tokens,
                    ..Default::default()
                });
                return Ok(spec);
            }
            other => {
                return Err(usage!(
                    "--kind: {other:?} is not a kind; command or inference"
                ));
            }
        }
        match (&self.command, &self.args, self.argv.as_slice()) {
            (Some(_), _, [_, ..]) => {
                return Err(usage!(
                    "--command: give either --command or a program after --, not both"
                ));
            }
            (Some(program), Some(args), []) => {
                spec.program = Some(program.clone());
                spec.args = shell_words::split(args).context("--args: unbalanced quotes")?;
            }
            (Some(command), None, []) => spec.command = Some(command.clone()),
            (None, Some(_), _) => return Err(usage!("--args: goes with --command PROGRAM")),
            (None, None, [program, args @ ..]) => {
                spec.program = Some(program.clone());
                spec.args = args.to_vec();
            }
            (None, None, []) => {
                return Err(usage!(
                    "--command: is required (or give a program after --)"
                ));
            }
        }
        for list in &self.env {
            for (k, v) in parse_pairs(list).map_err(|e| usage!("--env: {e}"))? {
                spec.env.insert(k, v);
            }
        }
        if let Some(labels) = &self.labels {
            for (k, v) in parse_pairs(labels).map_err(|e| usage!("--labels: {e}"))? {
                spec.labels.insert(k, v);
            }
        }
        if let Some(r) = &self.resources {
            for (k, v) in parse_pairs(r).map_err(|e| usage!("--resources: {e}"))? {
                let n: u32 = v.trim().parse().map_err(|_| {
                    usage!("--resources: {k}={v}: the amount must be a whole number")
                })?;
                spec.resources.insert(k, n);
            }
        }
        for d in &self.depends_on {
            spec.depends_on
                .push(d.parse().map_err(|e| usage!("--depends-on: {e}"))?);
        }
        spec.idempotency_key = self.idempotency_key.clone();
        if let Some(i) = &self.isolation {
            spec.isolation = i
                .parse()
                .map_err(|e: drover_core::ValidationError| usage!("--isolation: {}", e.message))?;
        }
        spec.image = self.image.clone();
        spec.provider = self.provider.clone();
        if let Some(r) = &self.reservation {
            spec.reservation = Some(r.parse().map_err(|e| usage!("--reservation: {e}"))?);
        }
        if let Some(t) = &self.timeout {
            let d = parse_duration(t).map_err(|e| usage!("--timeout: {e}"))?;
            spec.timeout_ms = Some(d.as_millis().min(i64::MAX as u128) as i64);
        }
        if let Some(b) = &self.backoff {
            let d = parse_duration(b).map_err(|e| usage!("--backoff: {e}"))?;
            spec.backoff_base_ms = Some(d.as_millis() as u64);
        }
        Ok(spec)
    }
}

pub async fn run(cmd: JobCommand, server: &str, output: Output) -> anyhow::Result<ExitCode> {
    let client = crate::login::client(server).await?;
    match cmd {
        JobCommand::Run(args) => run_job(&client, *args, output).await,
        JobCommand::Get(job) => {
            let view = client.get_job(job.id()).await?;
            match output {
                Output::Json => print_json(&view)?,
                Output::Text => print_job(&view),
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::List { state, limit } => {
            let jobs = client.list_jobs(state.as_deref(), limit).await?;
            match output {
                Output::Json => print_json(&jobs)?,
                Output::Text => {
                    let mut t =
                        output::table(&["ID", "NAME", "STATE", "ATTEMPTS", "EXIT", "CREATED"]);
                    for j in &jobs {
                        let mut row = output::job_cells(j);
                        row.push(output::time(j.created_at));
                        t.add_row(row);
                    }
                    println!("{t}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Logs {
            job,
            follow,
            attempt,
        } => {
            if follow {
                let end = follow_logs(&client, job.id(), attempt, output).await?;
                return Ok(exit_code_of(&end));
            }
            for entry in client.job_logs(job.id(), attempt).await? {
                print_entry(&entry, output)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Events(job) => {
            let events = client.job_events(job.id()).await?;
            output::print_events(&events, output)?;
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Cancel(job) => {
            let j = client.cancel_job(job.id()).await?;
            match output {
                Output::Json => print_json(&j)?,
                Output::Text => println!("{} {}", j.id, j.state),
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Wait(job) => {
            let view = wait(&client, job.id()).await?;
            finish(&view.job, output)
        }
        JobCommand::Retry { run_id } => {
            let j = client.retry_run(&run_id).await?;
            match output {
                Output::Json => print_json(&j)?,
                Output::Text => println!("{} {} (attempt {} next)", j.id, j.state, j.attempts + 1),
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Submit { file } => submit_file(&client, &file, output).await,
    }
}

async fn run_job(client: &Client, args: RunArgs, output: Output) -> anyhow::Result<ExitCode> {
    let spec = args.spec()?;
    let job = client.submit_job(&spec).await?;
    if !args.wait && !args.follow {
        match output {
            Output::Json => print_json(&job)?,
            Output::Text => println!("{}", job.id),
        }
        return Ok(ExitCode::SUCCESS);
    }
    if output == Output::Text {
        eprintln!("job {} submitted", job.id);
    }
    let end = if args.follow {
        follow_logs(client, &job.id.to_string(), None, output).await?
    } else {
        wait(client, &job.id.to_string()).await?.job
    };
    finish(&end, output)
}

pub async fn wait(client: &Client, id: &str) -> anyhow::Result<JobView> {
    let bar = output::spinner(&format!("waiting for job {id}"));
    let view = client
        .wait_job(id, |v| {
            if let Some(bar) = &bar {
                bar.set_message(format!(
                    "job {id}: {} (attempt {})",
                    v.job.state, v.job.attempts
                ));
            }
        })
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(view?)
}

/// Prints the final status and turns the job's outcome into the process exit code.
fn finish(job: &JobRecord, output: Output) -> anyhow::Result<ExitCode> {
    match output {
        Output::Json => print_json(job)?,
        Output::Text => {
            let mut line = format!("job {} {}", job.id, job.state);
            if let Some(code) = job.exit_code {
                line.push_str(&format!(" (exit code {code})"));
            }
            if let Some(err) = job
                .error
                .as_deref()
                .filter(|_| job.state != JobState::Succeeded)
            {
                line.push_str(&format!(": {err}"));
            }
            eprintln!("{line}");
        }
    }
    Ok(exit_code_of(job))
}

/// The job's exit code when it has one; otherwise 124 for a timeout (as timeout(1) does),
/// 130 for a cancel, 1 for any other failure.
fn exit_code_of(job: &JobRecord) -> ExitCode {
    let code = match (job.state, job.exit_code) {
        (JobState::Succeeded, _) => 0,
        (JobState::TimedOut, _) => 124,
        (JobState::Cancelled, _) => 130,
        (_, Some(c)) if (1..=255).contains(&c) => c,
        _ => 1,
    };
    ExitCode::from(code as u8)
}

async fn follow_logs(
    client: &Client,
    id: &str,
    attempt: Option<u32>,
    output: Output,
) -> anyhow::Result<JobRecord> {
    let mut events = Box::pin(client.follow_logs(id, attempt).await?);
    while let Some(ev) = events.next().await {
        match ev? {
            FollowEvent::Entry(entry) => print_entry(&entry, output)?,
            FollowEvent::End(job) => return Ok(*job),
        }
    }
    // The stream broke before the end: report the job as it is now.
    let view = client.get_job(id).await?;
    if !view.job.state.is_terminal() {
        bail!("the log stream ended before job {id} did");
    }
    Ok(view.job)
}

fn print_entry(entry: &LogEntryView, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string(entry)?);
        return Ok(());
    }
    let bytes = entry
        .data
        .as_ref()
        .and_then(|data| base64::engine::general_purpose::STANDARD.decode(data).ok())
        .unwrap_or_else(|| entry.text.clone().into_bytes());
    let result = match entry.stream {
        LogStream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)
                .and_then(|_| out.write_all(b"\n"))
                .and_then(|_| out.flush())
        }
        LogStream::Stderr => {
            let mut err = std::io::stderr().lock();
            err.write_all(&bytes).and_then(|_| err.write_all(b"\n"))
        }
    };
    // A closed pipe (`| head`) is the reader's choice, not an error.
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn print_job(view: &JobView) {
    let j = &view.job;
    println!("Job:       {} ({})", j.id, j.name);
    println!("Status:    {} (Status Code: {})", j.state, j.status_code);
    println!("Attempts:  {} of {}", j.attempts, j.max_attempts);
    println!(
        "Exit code: {}",
        j.exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into())
    );
    if let Some(err) = &j.error {
        println!("Error:     {err}");
    }
    println!("Created:   {}", output::time(j.created_at));
    println!("Finished:  {}", output::time_opt(j.finished_at));
    if view.runs.is_empty() {
        return;
    }
    println!("Runs:");
    let mut t = output::table(&[
        "#", "RUN", "STATE", "EXIT", "WORKER", "STARTED", "TOOK", "RETRY OF",
    ]);
    for r in &view.runs {
        let run = &r.run;
        let took = match (run.started_at, run.finished_at) {
            (Some(s), Some(f)) => output::duration(f.since(s)),
            _ => "-".into(),
        };
        t.add_row(vec![
            run.attempt.to_string(),
            run.id.to_string(),
            run.state.to_string(),
            run.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            run.worker_id.to_string(),
            output::time_opt(run.started_at),
            took,
            run.retry_of
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{t}");
}
