//! Test harness: real `drover` processes on temporary directories and free ports, and the
//! faults tests inject into them (`kill -9`, SIGSTOP, a cut network path).
//!
//! Every process's stderr goes to a file in the test's directory; set
//! `DROVER_KEEP_TEST_DIRS=1` to keep the directories after the test.

use drover_client::Client;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

pub use drover_client;

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
static CAS: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

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

fn register_token(url: &str, token: &str) {
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
async fn admin_token(url: &str) -> String {
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

/// Options for a control plane under test.
#[derive(Clone)]
pub struct ServerOptions {
    pub lease: Duration,
    pub backoff_base: Duration,
    pub extra: Vec<String>,
    /// None: SQLite in the data directory, or a fresh PostgreSQL database when
    /// DROVER_TEST_ENGINE=postgres.
    pub database_url: Option<String>,
    /// The CA of the server's TLS certificate (with --tls-cert/--tls-key in `extra`).
    pub ca_cert: Option<PathBuf>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(5),
            backoff_base: Duration::from_millis(200),
            extra: Vec::new(),
            database_url: None,
            ca_cert: None,
        }
    }
}

/// Whether a test that needs an outside service may run: true when the service is there.
/// When it is not, the test fails under CI=true (a missing service must never pass for a
/// green run) and is skipped elsewhere, with a message saying what would provide it.
pub fn service_available(available: bool, what: &str, provided_by: &str) -> bool {
    if !available {
        assert!(
            std::env::var("CI").is_err(),
            "{what} is missing: these tests cannot run ({provided_by})"
        );
        eprintln!("skipped: {what} is missing ({provided_by})");
    }
    available
}

/// True when bubblewrap can build a sandbox here; under CI=true a missing one fails the test.
pub fn bwrap_usable() -> bool {
    let ok = Command::new("bwrap")
        .args(["--unshare-all", "--ro-bind", "/", "/", "--", "/bin/true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    service_available(
        ok,
        "a usable bubblewrap (bwrap)",
        "scripts/test installs it",
    )
}

/// True when the Docker engine answers and the locally built `image` exists (scripts/test
/// builds it with scripts/build-images); under CI=true a missing one fails the test.
pub fn docker_image_usable(image: &str) -> bool {
    let ok = Command::new("docker")
        .args(["image", "inspect", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    service_available(
        ok,
        &format!("a Docker engine with {image}"),
        "scripts/test builds it with scripts/build-images",
    )
}

/// A fresh database on the test PostgreSQL cluster (DROVER_TEST_POSTGRES_URL, which
/// `scripts/test` sets up). None when there is none: callers skip, except under CI=true,
/// where this fails the test.
pub async fn postgres_database() -> Option<String> {
    let admin = std::env::var("DROVER_TEST_POSTGRES_URL").ok();
    if !service_available(
        admin.is_some(),
        "DROVER_TEST_POSTGRES_URL",
        "scripts/test starts a PostgreSQL cluster and sets it",
    ) {
        return None;
    }
    let admin = admin.unwrap_or_default();
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to the test PostgreSQL cluster");
    let name = format!("e2e_{}", drover_core::JobId::new().0.simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    let (base, _) = admin.rsplit_once('/').expect("a database name in the URL");
    Some(format!("{base}/{name}"))
}

/// True when the end-to-end suites run with PostgreSQL behind every control plane.
pub fn on_postgres() -> bool {
    std::env::var("DROVER_TEST_ENGINE").is_ok_and(|e| e == "postgres")
}

/// A `drover server` process on its own data directory and a free port.
pub struct ServerProc {
    pub proc: Proc,
    pub url: String,
    pub data_dir: PathBuf,
    /// An admin API token.
    pub token: String,
    drover: Drover,
    options: ServerOptions,
    starts: u32,
}

async fn wait_for_addr_file(file: &Path, proc: &Proc) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && text.ends_with('\n')
        {
            return text.trim().to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "drover did not write {}; log: {}",
            file.display(),
            proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_ready(url: &str, proc: &Proc) {
    let client = client_for(url);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    // Up, not ready: a control plane requiring inference is not ready before a model node.
    while !client.healthy().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drover at {url} never became ready; log: {}",
            proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl ServerProc {
    pub async fn start(drover: &Drover, dir: &Path, options: ServerOptions) -> Self {
        Self::start_named(drover, dir, "server", options).await
    }

    /// A control plane with its own data directory `dir/name` (replicas side by side).
    pub async fn start_named(
        drover: &Drover,
        dir: &Path,
        name: &str,
        mut options: ServerOptions,
    ) -> Self {
        if options.database_url.is_none() && on_postgres() {
            options.database_url = Some(
                postgres_database()
                    .await
                    .expect("DROVER_TEST_ENGINE=postgres needs DROVER_TEST_POSTGRES_URL"),
            );
        }
        let data_dir = dir.join(name);
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let (proc, url) = Self::launch(drover, &data_dir, &options, "127.0.0.1:0", 0).await;
        let token = admin_token(&url).await;
        Self {
            proc,
            url,
            data_dir,
            token,
            drover: drover.clone(),
            options,
            starts: 1,
        }
    }

    async fn launch(
        drover: &Drover,
        data_dir: &Path,
        options: &ServerOptions,
        listen: &str,
        n: u32,
    ) -> (Proc, String) {
        let addr_file = data_dir.join("api.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut args: Vec<String> = vec![
            "server".into(),
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--lease".into(),
            format!("{}ms", options.lease.as_millis()),
            "--backoff-base".into(),
            format!("{}ms", options.backoff_base.as_millis()),
            "--admin-password".into(),
            ADMIN_PASSWORD.into(),
        ];
        if let Some(url) = &options.database_url {
            args.extend(["--database-url".into(), url.clone()]);
        }
        args.extend(options.extra.iter().cloned());
        let log = data_dir.join(format!("server-{n}.log"));
        let proc = Proc::spawn(&drover.bin, &args, log, "drover server");
        let url = wait_for_addr_file(&addr_file, &proc).await;
        if let Some(ca) = &options.ca_cert {
            let mut cas = CAS.lock().unwrap_or_else(|p| p.into_inner());
            cas.push((url.trim_end_matches('/').to_string(), ca.clone()));
        }
        wait_ready(&url, &proc).await;
        (proc, url)
    }

    /// A client speaking as the admin.
    pub fn client(&self) -> Client {
        client_for(&self.url).with_token(self.token.clone())
    }

    /// `kill -9` of the control plane.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts the control plane again on the same data directory and the same port, so
    /// that workers find it where they left it.
    pub async fn restart(&mut self) {
        self.proc.kill9();
        let listen = self.url.trim_start_matches("http://").to_string();
        let (proc, url) = Self::launch(
            &self.drover,
            &self.data_dir,
            &self.options,
            &listen,
            self.starts,
        )
        .await;
        self.starts += 1;
        self.proc = proc;
        self.url = url;
    }

    pub async fn token(&self) -> String {
        self.client()
            .create_node_token(Duration::from_secs(600))
            .await
            .expect("mint a join token")
            .token
    }

    /// Starts a worker against this server (or `via`, e.g. a proxy) with a fresh token.
    pub async fn worker(
        &self,
        dir: &Path,
        name: &str,
        via: Option<&str>,
        extra: &[&str],
    ) -> WorkerProc {
        let token = self.token().await;
        WorkerProc::start(
            &self.drover,
            via.unwrap_or(&self.url),
            dir,
            name,
            Some(&token),
            extra,
        )
    }
}

/// A `drover worker` process.
pub struct WorkerProc {
    pub proc: Proc,
    pub state_dir: PathBuf,
}

impl WorkerProc {
    pub fn start(
        drover: &Drover,
        server: &str,
        dir: &Path,
        name: &str,
        token: Option<&str>,
        extra: &[&str],
    ) -> Self {
        Self::start_with(drover, server, dir, name, token, extra, &Launch::default())
    }

    /// A worker with a changed environment or as another user (its state directory is
    /// then made theirs).
    pub fn start_with(
        drover: &Drover,
        server: &str,
        dir: &Path,
        name: &str,
        token: Option<&str>,
        extra: &[&str],
        launch: &Launch,
    ) -> Self {
        let state_dir = dir.join(format!("worker-{name}"));
        std::fs::create_dir_all(&state_dir).expect("state dir");
        if let Some(uid) = launch.as_user {
            std::os::unix::fs::chown(&state_dir, Some(uid), Some(uid)).expect("chown state dir");
        }
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--server".into(),
            server.into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--name".into(),
            name.into(),
            "--kill-grace".into(),
            "1s".into(),
        ];
        if let Some(t) = token {
            args.extend(["--token".into(), t.into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let n = std::fs::read_dir(&state_dir)
            .map(|d| d.count())
            .unwrap_or(0);
        let log = state_dir.join(format!("worker-{n}.log"));
        let proc = Proc::spawn_with(&drover.bin, &args, log, "drover worker", launch);
        Self { proc, state_dir }
    }

    /// Waits until the server lists `count` connected nodes.
    pub async fn wait_connected(client: &Client, count: usize) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let nodes = client.list_nodes().await.unwrap_or_default();
            if nodes.iter().filter(|n| n.connected).count() >= count {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "fewer than {count} workers connected: {nodes:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A `drover up` process: control plane and local worker in one.
pub struct UpProc {
    pub proc: Proc,
    pub url: String,
    pub data_dir: PathBuf,
    pub token: String,
}

impl UpProc {
    pub async fn start(drover: &Drover, dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(drover, dir, extra, &Launch::default()).await
    }

    pub async fn start_with(drover: &Drover, dir: &Path, extra: &[&str], launch: &Launch) -> Self {
        let data_dir = dir.join("drover-up");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let _ = std::fs::remove_file(data_dir.join("api.addr"));
        let mut args: Vec<String> = vec![
            "up".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let proc = Proc::spawn_with(
            &drover.bin,
            &args,
            dir.join(format!("up-{n}.log")),
            "drover up",
            launch,
        );
        let url = wait_for_addr_file(&data_dir.join("api.addr"), &proc).await;
        wait_ready(&url, &proc).await;
        // `drover up` signed the local user in by itself: its token is in the config dir.
        let credentials = dir.join("config/drover/credentials.json");
        let token = eventually("drover up to store its login", || async {
            let text = std::fs::read_to_string(&credentials).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            json["servers"][url.trim_end_matches('/')]["api_token"]
                .as_str()
                .map(str::to_string)
        })
        .await;
        register_token(&url, &token);
        Self {
            proc,
            url,
            data_dir,
            token,
        }
    }

    /// What `drover up` printed once it said it is up (its banner ends "Stop with Ctrl-C.").
    pub async fn banner(&self) -> String {
        let log = self.proc.log.clone();
        eventually("drover up's banner", || async {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|text| text.contains("Stop with Ctrl-C."))
        })
        .await
    }

    /// A client speaking as the admin, with the login `drover up` stored.
    pub fn client(&self) -> Client {
        Client::new(&self.url)
            .expect("client")
            .with_token(self.token.clone())
    }
}

/// A TCP proxy the test can cut and restore, standing for a network path between a worker
/// and the control plane.
pub struct Proxy {
    pub url: String,
    state: Arc<Mutex<ProxyState>>,
    accept: tokio::task::JoinHandle<()>,
    /// Set: bytes are dropped both ways, connections stay open (a black-holed path).
    dropping: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct ProxyState {
    cut: bool,
    connections: Vec<tokio::task::AbortHandle>,
}

/// Copies `from` to `to` until either ends; while `dropping` is set, what is read is
/// thrown away (packets lost on the way, the connection still open).
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dropping: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if dropping.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(target_url: &str) -> Self {
        Self::balance(&[target_url]).await
    }

    /// A proxy in front of several targets, as a load balancer would be: each connection
    /// goes to the next target in turn, skipping those that refuse.
    pub async fn balance(target_urls: &[&str]) -> Self {
        let targets: Vec<String> = target_urls
            .iter()
            .map(|t| t.trim_start_matches("http://").to_string())
            .collect();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy addr"));
        let state: Arc<Mutex<ProxyState>> = Arc::default();
        let shared = state.clone();
        let dropping: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let dropping_in_accept = dropping.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut st = shared.lock().expect("proxy state");
                if st.cut {
                    drop(inbound);
                    continue;
                }
                let (targets, next) = (targets.clone(), next.clone());
                let dropping = dropping_in_accept.clone();
                let task = tokio::spawn(async move {
                    for _ in 0..targets.len() {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Ok(outbound) = TcpStream::connect(&targets[i % targets.len()]).await
                        {
                            let (in_read, in_write) = inbound.into_split();
                            let (out_read, out_write) = outbound.into_split();
                            tokio::select! {
                                () = forward(in_read, out_write, dropping.clone()) => {}
                                () = forward(out_read, in_write, dropping) => {}
                            }
                            return;
                        }
                    }
                    drop(inbound);
                });
                st.connections.push(task.abort_handle());
            }
        });
        Self {
            url,
            state,
            accept,
            dropping,
        }
    }

    /// Drops every byte both ways while keeping connections open, as a network path that
    /// loses packets does (nothing is refused, nothing answers), until [`Proxy::restore`].
    pub fn black_hole(&self) {
        self.dropping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        let mut st = self.state.lock().expect("proxy state");
        st.cut = true;
        for c in st.connections.drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.state.lock().expect("proxy state").cut = false;
        self.dropping
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
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

/// One request a [`WebhookReceiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// The status it answered.
    pub answered: u16,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    /// Requests still to refuse with 500 before answering 200.
    fail_next: Mutex<usize>,
    arrived: tokio::sync::Notify,
}

/// A real HTTP server standing for a user's webhook endpoint. It can refuse its first
/// deliveries to exercise retries.
pub struct WebhookReceiver {
    pub url: String,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start(fail_first: usize) -> Self {
        Self::start_on("127.0.0.1:0", fail_first).await
    }

    /// Listens on a given address (to come up where a server already sends).
    pub async fn start_on(addr: &str, fail_first: usize) -> Self {
        use axum::http::HeaderMap;
        let state = Arc::new(ReceiverState {
            fail_next: Mutex::new(fail_first),
            ..Default::default()
        });
        let shared = state.clone();
        let app =
            axum::Router::new().fallback(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = shared.clone();
                async move {
                    let answered = {
                        let mut fail = state.fail_next.lock().expect("receiver state");
                        if *fail > 0 {
                            *fail -= 1;
                            500
                        } else {
                            200
                        }
                    };
                    let headers = headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                        .collect();
                    state
                        .received
                        .lock()
                        .expect("receiver state")
                        .push(Received {
                            headers,
                            body: body.to_vec(),
                            answered,
                        });
                    state.arrived.notify_waiters();
                    axum::http::StatusCode::from_u16(answered).unwrap_or_default()
                }
            });
        let listener = TcpListener::bind(addr).await.expect("bind the receiver");
        let url = format!(
            "http://{}/hook",
            listener.local_addr().expect("receiver addr")
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state, task }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("receiver state").clone()
    }

    /// Waits until `pred` holds for what was received so far.
    pub async fn wait_until(
        &self,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let arrived = self.state.arrived.notified();
            let got = self.received();
            if pred(&got) {
                return got;
            }
            assert!(
                tokio::time::timeout_at(deadline, arrived).await.is_ok() || pred(&self.received()),
                "timed out waiting for webhooks: {what}; got {got:#?}"
            );
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// True when the tests run as root (who owns this process).
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// A PostgreSQL server of the test's own (on a free port, in the test's directory), for
/// tests that restart or stop the database; the shared test cluster must stay up for the
/// others. Needs the PostgreSQL server binaries (scripts/test installs them); run as root,
/// it runs the server as the `postgres` user.
pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    pub port: u16,
    pub url: String,
}

impl PgCluster {
    /// None when no PostgreSQL server binaries are installed (under CI=true: fails).
    pub async fn start(dir: &Path) -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                let mut found: Vec<PathBuf> = versions
                    .flatten()
                    .map(|v| v.path().join("bin"))
                    .filter(|b| b.join("initdb").exists())
                    .collect();
                found.sort();
                found.pop()
            });
        if !service_available(
            bin.is_some(),
            "the PostgreSQL server binaries",
            "scripts/test installs them",
        ) {
            return None;
        }
        let bin = bin.unwrap_or_default();
        let root = dir.join("pg");
        std::fs::create_dir_all(&root).expect("pg dir");
        let as_root = running_as_root();
        if as_root {
            // The server refuses to run as root; its own user must reach its directory.
            let mut walk = Some(root.as_path());
            while let Some(d) = walk {
                if let Ok(meta) = std::fs::metadata(d) {
                    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
                    let _ = std::fs::set_permissions(
                        d,
                        std::os::unix::fs::PermissionsExt::from_mode(mode | 0o011),
                    );
                }
                walk = d.parent();
            }
            let _ = Command::new("chown").arg("postgres").arg(&root).status();
        }
        let password = root.join("pw");
        std::fs::write(&password, "drover-test").expect("pw");
        if as_root {
            let _ = Command::new("chown")
                .arg("postgres")
                .arg(&password)
                .status();
        }
        let data = root.join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let cluster = Self {
            log: root.join("log"),
            url: format!("postgres://drover:drover-test@127.0.0.1:{port}/postgres"),
            bin,
            data,
            port,
        };
        let status = cluster
            .command("initdb")
            .arg("-D")
            .arg(&cluster.data)
            .args([
                "-U",
                "drover",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", password.display()))
            .stdout(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        cluster.pg_ctl("start");
        Some(cluster)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl(&self, action: &str) {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("-w");
        if action != "stop" {
            c.arg("-o").arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
                self.port,
                self.data.display()
            ));
        }
        c.arg(action);
        if action != "start" {
            c.args(["-m", "fast"]);
        }
        let status = c.stdout(Stdio::null()).status().expect("pg_ctl");
        assert!(status.success(), "pg_ctl {action} failed");
    }

    /// `pg_ctl restart -m fast`: every connection is dropped.
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    pub fn stop(&self) {
        self.pg_ctl("stop");
    }

    pub fn start_again(&self) {
        self.pg_ctl("start");
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
