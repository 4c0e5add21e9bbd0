//! Test harness: real `drover` processes on temporary directories and free ports, and the
//! faults tests inject into them (`kill -9`, SIGSTOP, a cut network path).
//!
//! Every process's stderr goes to a file in the test's directory; set
//! `DROVER_KEEP_TEST_DIRS=1` to keep the directories after the test.

use drover_client::Client;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

pub use drover_client;

mod control_plane;
mod proxy;
mod services;
mod webhook_receiver;

pub use control_plane::*;
pub use proxy::*;
pub use services::*;
pub use webhook_receiver::*;

/// How long harness waits may take before a test fails (a slow CI machine is no reason
/// for a test to fail; a hang is).
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A temporary directory for one test, removed at the end unless asked to keep it.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new() -> Self {
        Self::new_in(&std::env::temp_dir())
    }

    /// In another parent than the system's temporary directory (which sandboxes replace
    /// with a tmpfs of their own, so that a test of what they hide would prove nothing).
    pub fn new_in(parent: &Path) -> Self {
        std::fs::create_dir_all(parent).expect("create the parent directory");
        let dir = tempfile::Builder::new()
            .prefix("drover-test-")
            .tempdir_in(parent)
            .expect("create a temporary directory");
        let path = dir.path().to_path_buf();
        Self {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("DROVER_KEEP_TEST_DIRS").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("kept test directory {}", dir.keep().display());
        }
    }
}

/// A child process that is killed when dropped.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
    name: String,
}

/// How a process under test is started besides its arguments.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Variables added to its environment.
    pub env: Vec<(String, String)>,
    /// Run it as this uid and gid (through `setpriv`; the test must be root).
    pub as_user: Option<u32>,
}

impl Proc {
    fn spawn(bin: &Path, args: &[String], log: PathBuf, name: &str) -> Self {
        Self::spawn_with(bin, args, log, name, &Launch::default())
    }

    fn spawn_with(bin: &Path, args: &[String], log: PathBuf, name: &str, launch: &Launch) -> Self {
        let stderr = std::fs::File::create(&log).expect("create the process log");
        // The test's own config dir: `drover up` stores its login there, not in the user's.
        let config = log.parent().unwrap_or(Path::new(".")).join("config");
        let mut command = match launch.as_user {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .args(["--clear-groups", "--"])
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = command
            .args(args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .env("DROVER_LOG", "info,drover=debug")
            .env("XDG_CONFIG_HOME", &config)
            .env_remove("DROVER_SERVER")
            .env_remove("DROVER_API_TOKEN")
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().expect("clone the log handle"))
            .stderr(stderr)
            .spawn()
            .expect("start drover");
        Self {
            child: Some(child),
            log,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process (SIGSTOP); it keeps its sockets but answers nothing.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.child.take().and_then(|mut c| c.wait().ok())
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit; log: {}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.thaw();
        self.kill9();
    }
}

/// The `drover` binary under test.
#[derive(Clone)]
pub struct Drover {
    pub bin: PathBuf,
}

impl Drover {
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self { bin: bin.into() }
    }

    /// Runs one CLI command against `server` and returns (exit code, stdout, stderr).
    pub async fn cli(&self, server: &str, args: &[&str]) -> CliOutput {
        let mut command = tokio::process::Command::new(&self.bin);
        command
            .args(args)
            .env("DROVER_SERVER", server)
            .env("DROVER_LOG", "warn")
            // Never the login of the person running the tests.
            .env(
                "XDG_CONFIG_HOME",
                std::env::temp_dir().join("drover-test-no-config"),
            );
        match token_for(server) {
            Some(t) => command.env("DROVER_API_TOKEN", t),
            None => command.env_remove("DROVER_API_TOKEN"),
        };
        let out = command
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run drover");
        CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The admin password of every control plane the testkit starts.
pub const ADMIN_PASSWORD: &str = "drover-test-admin";

/// API tokens of the control planes started by this test process, by URL.
static TOKENS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
/// Certificate authorities of the https:// control planes, by URL.
pub(crate) static CAS: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// A client for `url`, trusting the CA of the control plane there, if it serves TLS.
pub fn client_for(url: &str) -> Client {
    let cas = CAS.lock().unwrap_or_else(|p| p.into_inner());
    match cas
        .iter()
        .rev()
        .find(|(u, _)| u == url.trim_end_matches('/'))
    {
        Some((_, path)) => {
            let pem = std::fs::read(path).expect("read the test CA");
            Client::with_ca(url, Some(&pem)).expect("client")
        }
        None => Client::new(url).expect("client"),
    }
}

pub(crate) fn register_token(url: &str, token: &str) {
    let mut tokens = TOKENS.lock().unwrap_or_else(|p| p.into_inner());
    tokens.push((url.trim_end_matches('/').to_string(), token.to_string()));
}

/// The admin API token for the control plane at `url` (the last one started when the URL
/// is another path to it, such as a proxy).
pub fn token_for(url: &str) -> Option<String> {
    let tokens = TOKENS.lock().unwrap_or_else(|p| p.into_inner());
    let url = url.trim_end_matches('/');
    tokens
        .iter()
        .rev()
        .find(|(u, _)| u == url)
        .or(tokens.last())
        .map(|(_, t)| t.clone())
}

/// Signs in as the admin and mints an API token for the rest of the test.
pub(crate) async fn admin_token(url: &str) -> String {
    let client = client_for(url);
    let tokens = client
        .login("admin", ADMIN_PASSWORD)
        .await
        .expect("log in as the test admin");
    let created = client
        .with_token(tokens.access_token)
        .create_api_token("tests", Duration::from_secs(24 * 3600))
        .await
        .expect("mint an API token");
    let token = created["token"].as_str().expect("token").to_string();
    register_token(url, &token);
    token
}

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`]. For
/// conditions no API can announce (a process gone, a file written).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// True while a process with this pid exists and is not a zombie (an orphan whose parent
/// does not reap it is gone for every purpose but the process table).
pub fn process_exists(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// True when the tests run as root (who owns this process).
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}
