//! `drover node …`

use crate::output::{self, Output, parse_duration, print_json, usage};
use clap::Subcommand;
use drover_client::records::NodeView;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// One-time join tokens for new workers.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Every node that ever registered.
    List,
    /// One node.
    Get { id: String },
    /// What happened to a node: provisioning steps, registration, connections, its end.
    Events { id: String },
    /// The providers that start and stop nodes on demand.
    Providers,
    /// Node configuration, set centrally: nodes apply it without a restart and answer.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Revoke a node: its credential stops working, its stream is dropped, its runs fail
    /// over to other nodes.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// A new version, for one node (--node) or the nodes carrying --selector labels (none:
    /// every node).
    Set {
        #[arg(long)]
        node: Option<String>,
        /// K=V,K2=V2: the nodes carrying all of these labels.
        #[arg(long)]
        selector: Option<String>,
        /// Labels added to the nodes' own: K=V,K2=V2.
        #[arg(long)]
        labels: Option<String>,
        /// Isolation modes jobs may use: process,sandbox,container.
        #[arg(long)]
        isolation: Option<String>,
        /// Named resources and capacities: gpu=1,ollama=1.
        #[arg(long)]
        resources: Option<String>,
        #[arg(long, value_parser = parse_duration)]
        heartbeat: Option<std::time::Duration>,
    },
    /// Every version, oldest first.
    List,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Mint a one-time token: `drover worker --server URL --token TOKEN` uses it once.
    Create {
        /// How long it stays valid.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

pub async fn run(cmd: NodeCommand, server: &str, output: Output) -> anyhow::Result<ExitCode> {
    let client = crate::login::client(server).await?;
    match cmd {
        NodeCommand::Token(TokenCommand::Create { ttl }) => {
            let ttl = parse_duration(&ttl).map_err(|e| usage!("--ttl: {e}"))?;
            let token = client.create_node_token(ttl).await?;
            match output {
                Output::Json => print_json(&token)?,
                Output::Text => {
                    println!("{}", token.token);
                    eprintln!(
                        "one-time token, valid until {}: drover worker --server {} --token {}",
                        output::time(token.expires_at),
                        client.server().trim_end_matches('/'),
                        token.token
                    );
                }
            }
        }
        NodeCommand::List => {
            let nodes = client.list_nodes().await?;
            match output {
                Output::Json => print_json(&nodes)?,
                Output::Text => {
                    let mut t = output::table(&[
                        "ID",
                        "NAME",
                        "STATE",
                        "CONNECTED",
                        "SLOTS",
                        "LIVE RUNS",
                        "MODELS",
                        "LAST SEEN",
                    ]);
                    for n in &nodes {
                        t.add_row(row(n));
                    }
                    println!("{t}");
                }
            }
        }
        NodeCommand::Config(ConfigCommand::List) => {
            let configs = client.list_node_configs().await?;
            match output {
                Output::Json => print_json(&configs)?,
                Output::Text => {
                    let mut t = output::table(&["VERSION", "FOR", "CONFIG", "CREATED"]);
                    for c in &configs {
                        let target = match c.node {
                            Some(n) => format!("node {n}"),
                            None if c.labels.is_empty() => "every node".into(),
                            None => pairs(&c.labels),
                        };
                        t.add_row(vec![
                            c.version.to_string(),
                            target,
                            serde_json::to_string(&c.config)?,
                            output::time(c.created_at),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
        NodeCommand::Config(ConfigCommand::Set {
            node,
            selector,
            labels,
            isolation,
            resources,
            heartbeat,
        }) => {
            let map = |flag: &str,
                       v: Option<String>|
             -> anyhow::Result<std::collections::BTreeMap<String, String>> {
                Ok(match v {
                    Some(v) => output::parse_pairs(&v)
                        .map_err(|e| usage!("{flag}: {e}"))?
                        .into_iter()
                        .collect(),
                    None => Default::default(),
                })
            };
            let selector = map("--selector", selector)?;
            let resources = match resources {
                Some(r) => Some(
                    map("--resources", Some(r))?
                        .into_iter()
                        .map(|(k, v)| {
                            v.trim()
                                .parse::<u32>()
                                .map(|n| (k.clone(), n))
                                .map_err(|_| usage!("--resources: {k}={v}: a whole number"))
                        })
                        .collect::<anyhow::Result<_>>()?,
                ),
                None => None,
            };
            let config = drover_core::NodeConfig {
                labels: map("--labels", labels)?,
                isolation_modes: isolation
                    .map(|i| i.split(',').map(|m| m.trim().to_string()).collect()),
                resources,
                heartbeat_interval_ms: heartbeat.map(|h| h.as_millis() as u64),
            };
            let record = client
                .put_node_config(node.as_deref(), &selector, &config)
                .await?;
            match output {
                Output::Json => print_json(&record)?,
                Output::Text => println!("node configuration version {}", record.version),
            }
        }
        NodeCommand::Revoke { id } => {
            let n = client.revoke_node(&id).await?;
            match output {
                Output::Json => print_json(&n)?,
                Output::Text => {
                    println!("node {} revoked ({})", n.worker.id, n.worker.state.as_str())
                }
            }
        }
        NodeCommand::Events { id } => {
            let events = client.node_events(&id).await?;
            output::print_events(&events, output)?;
        }
        NodeCommand::Providers => {
            let providers = client.providers().await?;
            match output {
                Output::Json => print_json(&providers)?,
                Output::Text => {
                    let mut t = output::table(&["PROVIDER", "MIN", "MAX", "IDLE", "WORKERS"]);
                    let list = providers["providers"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    for p in &list {
                        t.add_row(vec![
                            p["name"].as_str().unwrap_or("?").to_string(),
                            p["min"].to_string(),
                            p["max"].to_string(),
                            format!("{}s", p["idle_seconds"]),
                            p["workers"].as_array().map_or(0, Vec::len).to_string(),
                        ]);
                    }
                    println!("{t}");
                    println!(
                        "cluster id: {}",
                        providers["cluster_id"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        NodeCommand::Get { id } => {
            let n = client.get_node(&id).await?;
            match output {
                Output::Json => print_json(&n)?,
                Output::Text => {
                    let c = &n.worker.capabilities;
                    println!("Node:       {} ({})", n.worker.id, n.worker.name);
                    println!(
                        "State:      {}{}",
                        n.worker.state.as_str(),
                        if n.connected { ", connected" } else { "" }
                    );
                    println!(
                        "Host:       {} ({} CPUs, {} MiB)",
                        c.hostname,
                        c.cpus,
                        c.memory_bytes >> 20
                    );
                    println!("Slots:      {} ({} live runs)", c.slots, n.live_runs);
                    println!("Isolation:  {}", c.isolation_modes.join(", "));
                    if !c.models.is_empty() {
                        println!("Models:     {}", c.models.join(", "));
                    }
                    if !c.model_blocks.is_empty() {
                        let blocks: Vec<String> =
                            c.model_blocks.iter().map(ToString::to_string).collect();
                        println!("Blocks:     {}", blocks.join(", "));
                    }
                    let labels: Vec<String> =
                        c.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!(
                        "Labels:     {}",
                        if labels.is_empty() {
                            "-".into()
                        } else {
                            labels.join(",")
                        }
                    );
                    if let Some(p) = &n.worker.provider {
                        println!(
                            "Provider:   {p} ({})",
                            n.worker.resource_id.as_deref().unwrap_or("no resource yet")
                        );
                    }
                    println!(
                        "Config:     desired {}, applied {}{}",
                        n.desired_config_version
                            .map_or("-".into(), |v| v.to_string()),
                        n.worker
                            .applied_config_version
                            .map_or("-".into(), |v| v.to_string()),
                        match &n.worker.config_ack {
                            Some(a) if a.status == "failed" => format!(
                                " (version {} failed: {})",
                                a.config_version,
                                a.error.as_deref().unwrap_or("?")
                            ),
                            _ => String::new(),
                        }
                    );
                    println!("Registered: {}", output::time(n.worker.created_at));
                    println!("Last seen:  {}", output::time(n.worker.last_seen_at));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn row(n: &NodeView) -> Vec<String> {
    vec![
        n.worker.id.to_string(),
        n.worker.name.clone(),
        n.worker.state.as_str().to_string(),
        if n.connected { "yes" } else { "no" }.to_string(),
        n.worker.capabilities.slots.to_string(),
        n.live_runs.to_string(),
        models(&n.worker.capabilities),
        output::time(n.worker.last_seen_at),
    ]
}

/// The models a node serves, each with the blocks it holds when it holds them as stages:
/// `smollm2[0-14,15-29]`.
fn models(c: &drover_core::Capabilities) -> String {
    let shown: Vec<String> = c
        .models
        .iter()
        .map(|m| {
            let blocks: Vec<String> = c
                .model_blocks
                .iter()
                .filter(|b| &b.model == m)
                .map(|b| format!("{}-{}", b.first, b.last))
                .collect();
            if blocks.is_empty() {
                m.clone()
            } else {
                format!("{m}[{}]", blocks.join(","))
            }
        })
        .collect();
    if shown.is_empty() {
        "-".into()
    } else {
        shown.join(" ")
    }
}

fn pairs(m: &std::collections::BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
