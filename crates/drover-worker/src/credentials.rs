//! The node's identity: registering with a one-time join token, the credential file
//! (0600, written atomically), and the endpoint it is presented to.

use super::*;

/// What a registered node keeps between starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NodeCredential {
    pub(crate) node_id: String,
    pub(crate) credential: String,
    pub(crate) server: String,
}

pub(crate) fn credential_path(state_dir: &Path) -> PathBuf {
    state_dir.join("node.json")
}

pub(crate) fn state_dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |source| WorkerError::StateDir {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn endpoint(server: &str, ca_cert: Option<&Path>) -> Result<Endpoint, WorkerError> {
    let bad = |message: String| WorkerError::BadServer {
        server: server.to_string(),
        message,
    };
    let mut endpoint = Endpoint::from_shared(server.to_string())
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
        })
        .map_err(|e| bad(e.to_string()))?;
    if server.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        match ca_cert {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    bad(format!(
                        "cannot read the CA certificate {}: {e}",
                        path.display()
                    ))
                })?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            None => tls = tls.with_enabled_roots(),
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    }
    Ok(endpoint)
}

/// Loads the node credential, registering with the one-time token first if there is none.
pub(crate) async fn ensure_registered(
    config: &WorkerConfig,
    caps: &Capabilities,
) -> Result<NodeCredential, WorkerError> {
    let path = credential_path(&config.state_dir);
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(cred) = serde_json::from_str::<NodeCredential>(&text)
    {
        if config.token.is_some() {
            tracing::info!(node_id = %cred.node_id, "already registered; the token is not needed");
        }
        return Ok(cred);
    }
    let token = config.token.clone().ok_or_else(|| WorkerError::NoToken {
        state_dir: config.state_dir.clone(),
    })?;
    let mut delay = BACKOFF_MIN;
    let response = loop {
        let refused = |message: String| WorkerError::RegistrationRefused {
            server: config.server.clone(),
            message,
        };
        let attempt = async {
            let channel = endpoint(&config.server, config.ca_cert.as_deref())?
                .connect()
                .await
                .map_err(|e| refused(format!("cannot connect: {e}")))?;
            WorkerServiceClient::new(channel)
                .register(v1::RegisterRequest {
                    token: token.clone(),
                    name: config.name.clone().unwrap_or_default(),
                    capabilities: Some(caps.into()),
                })
                .await
                .map_err(|s| (s.code(), refused(s.message().to_string())))
                .map_err(|(code, e)| {
                    if code == tonic::Code::Unavailable {
                        refused("server unavailable".into())
                    } else {
                        e
                    }
                })
        };
        match attempt.await {
            Ok(r) => break r.into_inner(),
            // A refused token is final; an unreachable server is worth waiting for.
            Err(WorkerError::RegistrationRefused { message, .. })
                if message.starts_with("cannot connect") || message == "server unavailable" =>
            {
                tracing::warn!(%message, "registration: server not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
            Err(e) => return Err(e),
        }
    };
    let cred = NodeCredential {
        node_id: response.node_id,
        credential: response.credential,
        server: config.server.clone(),
    };
    std::fs::create_dir_all(&config.state_dir).map_err(state_dir_error(&config.state_dir))?;
    let text = serde_json::to_string_pretty(&cred).unwrap_or_default();
    write_private(&path, &text).map_err(state_dir_error(&path))?;
    tracing::info!(node_id = %cred.node_id, "registered");
    Ok(cred)
}

pub(crate) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// The node credential kept in `state_dir`, if the node registered before.
pub fn stored_credential(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(credential_path(state_dir)).ok()?;
    serde_json::from_str::<NodeCredential>(&text)
        .ok()
        .map(|c| c.credential)
}

/// Throws the stored credential away, so that the next start registers anew.
pub fn forget_credential(state_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(credential_path(state_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
