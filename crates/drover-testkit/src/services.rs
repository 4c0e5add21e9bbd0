//! What some tests need from outside drover: bubblewrap, Docker, PostgreSQL.

use crate::running_as_root;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
