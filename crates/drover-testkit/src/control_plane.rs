//! `drover server`, `drover worker` and `drover up` under test.

use crate::{
    ADMIN_PASSWORD, CAS, DEADLINE, Drover, Launch, Proc, admin_token, client_for, eventually,
    on_postgres, postgres_database, register_token,
};
use drover_client::Client;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
