//! Who the CLI speaks for: `--token`/`DROVER_API_TOKEN`, or what `drover login` (or
//! `drover up`) stored for that server in the user's config dir, refreshed when it expires.
//! Also `drover login|logout|token|user|audit`.

use crate::output::{self, Output, parse_duration, print_json, usage};
use anyhow::Context;
use clap::{Args, Subcommand};
use drover_client::Client;
use drover_core::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

static TOKEN: OnceLock<Option<String>> = OnceLock::new();
static CA_CERT: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The certificate authority `--ca-cert` names, for https:// servers.
pub fn set_ca_cert(path: Option<PathBuf>) {
    let _ = CA_CERT.set(path);
}

pub fn ca_cert() -> Option<PathBuf> {
    CA_CERT.get().cloned().flatten()
}

/// A plain client for `server`, trusting `--ca-cert` when given.
pub fn anonymous(server: &str) -> anyhow::Result<Client> {
    match ca_cert() {
        Some(path) => {
            let pem = std::fs::read(&path)
                .with_context(|| format!("--ca-cert: cannot read {}", path.display()))?;
            Ok(Client::with_ca(server, Some(&pem))?)
        }
        None => Ok(Client::new(server)?),
    }
}

/// The token given on the command line or in the environment, for every client made after.
pub fn set_token(token: Option<String>) {
    let _ = TOKEN.set(token);
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Credentials {
    servers: BTreeMap<String, Saved>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Saved {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    /// Microseconds since the epoch when the access token expires.
    #[serde(default)]
    expires_at: i64,
    /// A long-lived API token (what `drover up` stores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_token: Option<String>,
}

fn credentials_path() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("drover/credentials.json")
}

fn key(server: &str) -> String {
    server.trim_end_matches('/').to_string()
}

fn load() -> Credentials {
    std::fs::read(credentials_path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save(creds: &Credentials) -> anyhow::Result<()> {
    let path = credentials_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(creds)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn remember(server: &str, saved: Saved) -> anyhow::Result<()> {
    let mut creds = load();
    creds.servers.insert(key(server), saved);
    save(&creds)
}

/// The API token stored for `server`, if any.
pub fn stored_api_token(server: &str) -> Option<String> {
    load()
        .servers
        .get(&key(server))
        .and_then(|s| s.api_token.clone())
}

/// Stores a long-lived API token for `server` (used by `drover up` on loopback).
pub fn remember_api_token(server: &str, token: &str) -> anyhow::Result<()> {
    remember(
        server,
        Saved {
            api_token: Some(token.to_string()),
            ..Default::default()
        },
    )
}

fn saved_tokens(server: &str, tokens: &drover_client::records::IssuedTokens) -> Saved {
    Saved {
        access_token: Some(tokens.access_token.clone()),
        refresh_token: Some(tokens.refresh_token.clone()),
        expires_at: Timestamp::now()
            .plus(Duration::from_secs(tokens.expires_in.saturating_sub(10)))
            .0,
        api_token: load()
            .servers
            .get(&key(server))
            .and_then(|s| s.api_token.clone()),
    }
}

/// A client for `server` speaking for the stored or given user.
pub async fn client(server: &str) -> anyhow::Result<Client> {
    let client = anonymous(server)?;
    if let Some(Some(token)) = TOKEN.get() {
        return Ok(client.with_token(token.clone()));
    }
    let Some(saved) = load().servers.get(&key(server)).cloned() else {
        return Ok(client);
    };
    if let Some(access) = &saved.access_token
        && saved.expires_at > Timestamp::now().0
    {
        return Ok(client.with_token(access.clone()));
    }
    if let Some(refresh) = &saved.refresh_token {
        match client.refresh(refresh).await {
            Ok(tokens) => {
                remember(server, saved_tokens(server, &tokens))?;
                return Ok(client.with_token(tokens.access_token));
            }
            Err(e) => tracing::warn!(error = %e, "cannot refresh the stored login"),
        }
    }
    Ok(match saved.api_token {
        Some(t) => client.with_token(t),
        None => client,
    })
}

#[derive(Args)]
pub struct LoginArgs {
    #[arg(long, default_value = "admin")]
    username: String,
    /// Read the password from standard input instead of prompting.
    #[arg(long)]
    password_stdin: bool,
}

fn read_password(from_stdin: bool, prompt: &str) -> anyhow::Result<String> {
    let password = if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        rpassword::prompt_password(prompt)?
    };
    anyhow::ensure!(!password.is_empty(), "an empty password");
    Ok(password)
}

pub async fn login(args: LoginArgs, server: &str, output: Output) -> anyhow::Result<ExitCode> {
    let password = read_password(args.password_stdin, "Password: ")?;
    let client = anonymous(server)?;
    let tokens = client.login(&args.username, &password).await?;
    remember(server, saved_tokens(server, &tokens))?;
    match output {
        Output::Json => print_json(&serde_json::json!({
            "username": args.username,
            "server": key(server),
            "expires_in": tokens.expires_in,
        }))?,
        Output::Text => println!("logged in to {} as {}", key(server), args.username),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logout(server: &str) -> anyhow::Result<ExitCode> {
    let mut creds = load();
    if let Some(saved) = creds.servers.remove(&key(server)) {
        if let Some(access) = saved.access_token {
            let client = anonymous(server)?.with_token(access);
            if let Err(e) = client.logout().await {
                tracing::warn!(error = %e, "the server did not take the logout");
            }
        }
        save(&creds)?;
    }
    println!("logged out of {}", key(server));
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// An API token for automation, shown once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "90d")]
        expires: String,
    },
    /// Your API tokens (every user's for an admin), with their last use.
    List,
    Revoke {
        id: String,
    },
}

pub async fn token(cmd: TokenCommand, server: &str, output: Output) -> anyhow::Result<ExitCode> {
    let client = client(server).await?;
    match cmd {
        TokenCommand::Create { name, expires } => {
            let ttl = parse_duration(&expires).map_err(|e| usage!("--expires: {e}"))?;
            let created = client.create_api_token(&name, ttl).await?;
            match output {
                Output::Json => print_json(&created)?,
                Output::Text => {
                    println!("{}", created["token"].as_str().unwrap_or_default());
                    eprintln!("API token {name} (shown once); use it as DROVER_API_TOKEN");
                }
            }
        }
        TokenCommand::List => {
            let tokens = client.list_api_tokens().await?;
            match output {
                Output::Json => print_json(&tokens)?,
                Output::Text => {
                    let mut t =
                        output::table(&["ID", "NAME", "USER", "EXPIRES", "LAST USED", "REVOKED"]);
                    for k in &tokens {
                        t.add_row(vec![
                            k.id.clone(),
                            k.name.clone(),
                            k.user.clone(),
                            output::time(k.expires_at),
                            output::time_opt(k.last_used_at),
                            output::time_opt(k.revoked_at),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let k = client.revoke_api_token(&id).await?;
            match output {
                Output::Json => print_json(&k)?,
                Output::Text => println!("revoked {}", k.id),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Add a user (admins only); the password is prompted or read from stdin.
    Add {
        name: String,
        #[arg(long, default_value = "user")]
        role: String,
        #[arg(long)]
        password_stdin: bool,
    },
    List,
}

pub async fn user(cmd: UserCommand, server: &str, output: Output) -> anyhow::Result<ExitCode> {
    let client = client(server).await?;
    match cmd {
        UserCommand::Add {
            name,
            role,
            password_stdin,
        } => {
            let password = read_password(password_stdin, &format!("Password for {name}: "))?;
            let u = client.create_user(&name, &password, &role).await?;
            match output {
                Output::Json => print_json(&u)?,
                Output::Text => println!("user {} ({})", u.name, u.role.as_str()),
            }
        }
        UserCommand::List => {
            let users = client.list_users().await?;
            match output {
                Output::Json => print_json(&users)?,
                Output::Text => {
                    let mut t = output::table(&["NAME", "ROLE", "CREATED"]);
                    for u in &users {
                        t.add_row(vec![
                            u.name.clone(),
                            u.role.as_str().to_string(),
                            output::time(u.created_at),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(limit: u32, server: &str, output: Output) -> anyhow::Result<ExitCode> {
    let records = client(server).await?.audit(limit).await?;
    match output {
        Output::Json => print_json(&records)?,
        Output::Text => {
            let mut t = output::table(&["TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "DETAIL"]);
            for r in &records {
                t.add_row(vec![
                    output::time(r.at),
                    r.actor.clone().unwrap_or_default(),
                    r.action.clone(),
                    r.target.clone().unwrap_or_default(),
                    r.outcome.clone(),
                    r.detail.clone().unwrap_or_default(),
                ]);
            }
            println!("{t}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
