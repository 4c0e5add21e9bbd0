//! `drover group …`, `drover reserve`, `drover webhook …`: the scheduler's other objects.

use crate::output::{self, Output, parse_duration, print_json, usage};
use anyhow::Context;
use clap::{Args, Subcommand};
use drover_client::records::GroupView;
use drover_core::records::ReservationState;
use drover_core::{JobSpec, JobState};
use serde::Deserialize;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Run the jobs of FILE (YAML or JSON: a list of job specs, or {name, jobs}) one after
    /// another; after one fails for good, the rest are SKIPPED.
    Run {
        file: PathBuf,
        /// Group name (default: the file's, or the file name).
        #[arg(long)]
        name: Option<String>,
        /// Wait until every member is final; exit 0 only if the group COMPLETED.
        #[arg(long)]
        wait: bool,
    },
    /// A group's state and members.
    Get { id: String },
    /// Cancel every member not final yet.
    Cancel { id: String },
}

/// A group file's long form; the short one is the list of specs alone.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedGroupFile {
    #[serde(default)]
    name: Option<String>,
    jobs: Vec<JobSpec>,
}

/// A group file: a YAML (or JSON) list of job specs, or `name:` and `jobs:`. Every spec is
/// checked as the server would; an error names the field (`jobs[1].priority: …`).
fn parse_group_file(text: &str) -> Result<(Option<String>, Vec<JobSpec>), String> {
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| format!("not YAML or JSON: {e}"))?;
    let (name, jobs, prefix) = match value {
        serde_yaml_ng::Value::Sequence(_) => (None, output::decode::<Vec<JobSpec>, _>(value)?, ""),
        serde_yaml_ng::Value::Mapping(_) => {
            let file: NamedGroupFile = output::decode(value)?;
            (file.name, file.jobs, "jobs")
        }
        _ => return Err("a group file is a list of job specs, or `name:` and `jobs:`".into()),
    };
    let jobs = jobs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            spec.validated()
                .map_err(|e| format!("{prefix}[{i}].{}: {}", e.field, e.message))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name, jobs))
}

pub async fn group(cmd: GroupCommand, server: &str, output: Output) -> anyhow::Result<ExitCode> {
    let client = crate::login::client(server).await?;
    match cmd {
        GroupCommand::Run { file, name, wait } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            // YAML is a superset of JSON, so one parser reads both.
            let (file_name, jobs) =
                parse_group_file(&text).map_err(|e| usage!("{}: {e}", file.display()))?;
            let name = name.or(file_name).unwrap_or_else(|| {
                file.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            let view = client.create_group(&name, &jobs).await?;
            if !wait {
                match output {
                    Output::Json => print_json(&view)?,
                    Output::Text => println!("{}", view.group.id),
                }
                return Ok(ExitCode::SUCCESS);
            }
            for job in &view.jobs {
                crate::job::wait(&client, &job.id.to_string()).await?;
            }
            let view = client.get_group(&view.group.id.to_string()).await?;
            print_group(&view, output)?;
            Ok(
                if view.group.state == drover_core::records::GroupState::Completed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                },
            )
        }
        GroupCommand::Get { id } => {
            print_group(&client.get_group(&id).await?, output)?;
            Ok(ExitCode::SUCCESS)
        }
        GroupCommand::Cancel { id } => {
            print_group(&client.cancel_group(&id).await?, output)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_group(view: &GroupView, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(view);
    }
    println!("Group:   {} ({})", view.group.id, view.group.name);
    println!("State:   {}", view.group.state.as_str());
    println!("Created: {}", output::time(view.group.created_at));
    println!("Ended:   {}", output::time_opt(view.group.finished_at));
    let mut t = output::table(&["#", "JOB", "NAME", "STATE", "ATTEMPTS", "EXIT"]);
    for j in &view.jobs {
        let mut row = vec![j.group_position.map(|p| p.to_string()).unwrap_or_default()];
        row.extend(output::job_cells(j));
        t.add_row(row);
    }
    println!("{t}");
    if let Some(j) = view
        .jobs
        .iter()
        .find(|j| matches!(j.state, JobState::Failed | JobState::TimedOut))
    {
        println!(
            "Stopped at {} ({}): {}",
            j.id,
            j.state,
            j.error.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ReserveArgs {
    /// The named resource to hold (e.g. ollama).
    #[arg(long, required_unless_present = "release")]
    resource: Option<String>,
    #[arg(long, default_value_t = 1)]
    amount: u32,
    /// The node to hold it on (default: a connected node offering it).
    #[arg(long)]
    node: Option<String>,
    /// It ends by itself after this long unless released.
    #[arg(long, default_value = "60s")]
    ttl: String,
    /// Release this reservation instead of taking one.
    #[arg(long, value_name = "ID", conflicts_with = "resource")]
    release: Option<String>,
    /// When the resource is busy, fail (exit 1) instead of queueing for it: by default the
    /// reservation is PENDING until the resource frees, and jobs submitted into it wait.
    #[arg(long)]
    no_wait: bool,
}

pub async fn reserve(args: ReserveArgs, server: &str, output: Output) -> anyhow::Result<ExitCode> {
    let client = crate::login::client(server).await?;
    let r = match (&args.release, &args.resource) {
        (Some(id), _) => client.release_reservation(id).await?,
        (None, Some(resource)) => {
            let ttl = parse_duration(&args.ttl).map_err(|e| usage!("--ttl: {e}"))?;
            client
                .reserve(
                    resource,
                    args.amount,
                    args.node.as_deref(),
                    ttl,
                    !args.no_wait,
                )
                .await?
        }
        (None, None) => return Err(usage!("--resource: is required")),
    };
    match output {
        Output::Json => print_json(&r)?,
        Output::Text => {
            println!("{}", r.id);
            if r.state == ReservationState::Pending {
                eprintln!(
                    "reservation {} of {} {} on node {}: PENDING, the resource is in use; it \
                     becomes ACTIVE when it frees (before queued jobs take it), and jobs run \
                     with --reservation {} start then",
                    r.id, r.amount, r.resource, r.worker_id, r.id
                );
            } else {
                eprintln!(
                    "reservation {} of {} {} on node {}: {} until {}",
                    r.id,
                    r.amount,
                    r.resource,
                    r.worker_id,
                    r.state.as_str(),
                    output::time(r.ended_at.unwrap_or(r.expires_at))
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum WebhookCommand {
    /// Subscribe URL to job events; deliveries are signed with HMAC-SHA256 of the body
    /// (header X-Drover-Signature: sha256=HEX).
    Add {
        url: String,
        /// Comma-separated: job.run.completed,job.run.failed,job.run.timed_out,
        /// job.run.cancelled,job.run.skipped (default: all).
        #[arg(long)]
        events: Option<String>,
        /// Signing secret (default: generated and printed once).
        #[arg(long)]
        secret: Option<String>,
    },
    /// Subscribed webhooks.
    List,
    /// Delivery attempts and their outcomes, newest first.
    Deliveries {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

pub async fn webhook(
    cmd: WebhookCommand,
    server: &str,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let client = crate::login::client(server).await?;
    match cmd {
        WebhookCommand::Add {
            url,
            events,
            secret,
        } => {
            let events: Vec<String> = events
                .map(|e| {
                    e.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            let (hook, secret) = client.add_webhook(&url, &events, secret.as_deref()).await?;
            match output {
                Output::Json => match &secret {
                    Some(secret) => {
                        print_json(&serde_json::json!({ "webhook": hook, "secret": secret }))?
                    }
                    None => print_json(&serde_json::json!({ "webhook": hook }))?,
                },
                Output::Text => {
                    println!("{}", hook.id);
                    if let Some(secret) = secret {
                        eprintln!("signing secret (shown once): {secret}");
                    }
                }
            }
        }
        WebhookCommand::List => {
            let hooks = client.list_webhooks().await?;
            match output {
                Output::Json => print_json(&hooks)?,
                Output::Text => {
                    let mut t = output::table(&["ID", "URL", "EVENTS", "CREATED"]);
                    for h in &hooks {
                        let events = if h.events.is_empty() {
                            "all".to_string()
                        } else {
                            h.events.join(",")
                        };
                        t.add_row(vec![
                            h.id.to_string(),
                            h.url.clone(),
                            events,
                            output::time(h.created_at),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
        WebhookCommand::Deliveries { limit } => {
            let list = client.list_deliveries(limit).await?;
            match output {
                Output::Json => print_json(&list)?,
                Output::Text => {
                    let mut t =
                        output::table(&["ID", "EVENT", "KEY", "STATE", "ATTEMPTS", "LAST", "URL"]);
                    for d in &list {
                        let last = match (d.last_status, &d.last_error) {
                            (_, Some(e)) => e.chars().take(40).collect(),
                            (Some(s), None) => s.to_string(),
                            (None, None) => "-".into(),
                        };
                        t.add_row(vec![
                            d.id.to_string(),
                            d.event.clone(),
                            d.idempotency_key.clone(),
                            d.state.as_str().to_string(),
                            d.attempts.to_string(),
                            last,
                            d.url.clone(),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
