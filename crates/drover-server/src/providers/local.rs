//! The `local` provider: `drover worker` child processes on the control plane's machine.
//! Each is labelled through its environment (cluster id and worker id), which is how
//! reconciliation finds them again after the control plane restarted: they outlive it on
//! purpose, like containers do, and reconnect.

use super::{Launch, Provider, ProviderConfig, ProviderError, Resource};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const CLUSTER_VAR: &str = "DROVER_PROVIDER_CLUSTER";
const WORKER_VAR: &str = "DROVER_PROVIDER_WORKER";
/// Between SIGTERM and SIGKILL: the worker stops its jobs and closes its stream.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub(super) struct LocalProvider {
    binary: PathBuf,
    dir: PathBuf,
    cluster_id: String,
}

impl LocalProvider {
    pub fn new(
        config: &ProviderConfig,
        cluster_id: &str,
        dir: PathBuf,
    ) -> Result<Self, ProviderError> {
        std::fs::create_dir_all(&dir)?;
        let binary = match &config.binary {
            Some(b) => b.clone(),
            None => std::env::current_exe()?,
        };
        Ok(Self {
            binary,
            dir,
            cluster_id: cluster_id.to_string(),
        })
    }

    fn state_dir(&self, worker: &str) -> PathBuf {
        self.dir.join(worker)
    }
}

fn pid_of(resource_id: &str) -> Result<i32, ProviderError> {
    resource_id
        .strip_prefix("pid:")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| ProviderError::BadResource(resource_id.to_string()))
}

/// The labels of a live (not zombie) process, read from its environment.
fn labels_of(pid: i32) -> Option<(String, Option<String>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name, which may itself hold spaces.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let mut cluster = None;
    let mut worker = None;
    for var in environ.split(|b| *b == 0) {
        let var = String::from_utf8_lossy(var);
        if let Some(v) = var.strip_prefix(&format!("{CLUSTER_VAR}=")) {
            cluster = Some(v.to_string());
        } else if let Some(v) = var.strip_prefix(&format!("{WORKER_VAR}=")) {
            worker = Some(v.to_string());
        }
    }
    Some((cluster?, worker))
}

impl LocalProvider {
    fn is_ours(&self, pid: i32) -> bool {
        labels_of(pid).is_some_and(|(c, _)| c == self.cluster_id)
    }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    async fn create(&self, launch: &Launch) -> Result<String, ProviderError> {
        let worker = launch.worker_id.to_string();
        let state_dir = self.state_dir(&worker);
        std::fs::create_dir_all(&state_dir)?;
        let log = std::fs::File::create(self.dir.join(format!("{worker}.log")))?;
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args(launch.worker_args(&state_dir.to_string_lossy()))
            .arg("--server")
            .arg(&launch.server_url)
            .env("DROVER_TOKEN", &launch.token)
            .env(CLUSTER_VAR, &self.cluster_id)
            .env(WORKER_VAR, &worker)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for the control plane's terminal does
            // not stop the workers it manages.
            .process_group(0);
        let mut child = command.spawn().map_err(|source| ProviderError::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        let pid = child
            .id()
            .ok_or_else(|| ProviderError::NotStarted("the worker exited at once".into()))?;
        // Reap it whenever it ends; after a restart, init does.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(format!("pid:{pid}"))
    }

    async fn destroy(&self, resource_id: &str) -> Result<(), ProviderError> {
        let pid = pid_of(resource_id)?;
        // A pid no longer ours (ended, reused by another program) is not touched.
        if let Some((cluster, worker)) = labels_of(pid)
            && cluster == self.cluster_id
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while self.is_ours(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if self.is_ours(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            // Its credential goes with it.
            if let Some(worker) = worker {
                let _ = std::fs::remove_dir_all(self.state_dir(&worker));
            }
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Resource>, ProviderError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some((cluster, worker)) = labels_of(pid)
                && cluster == self.cluster_id
            {
                out.push(Resource {
                    id: format!("pid:{pid}"),
                    worker_id: worker.and_then(|w| w.parse().ok()),
                });
            }
        }
        Ok(out)
    }
}
