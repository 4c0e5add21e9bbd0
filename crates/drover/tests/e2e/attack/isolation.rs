//! Jobs probing their surroundings in every isolation mode (see the module above).

use crate::drover;
use drover_client::Client;
use drover_core::{Isolation, JobSpec, JobState};
use drover_testkit::{
    Launch, ServerOptions, ServerProc, TestDir, UpProc, WorkerProc, bwrap_usable, drover_client,
    eventually,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::plain_user;
/// A test directory outside /tmp (see the module comment), readable by other users so that
/// an unprivileged worker can reach its own state directory inside it.
fn attack_dir() -> TestDir {
    let dir = TestDir::new_in(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("attack"));
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod test dir");
    dir
}

/// Variables a worker is started with that no job may see.
const CANARIES: &[(&str, &str)] = &[
    ("DROVER_ADMIN_PASSWORD", "canary-admin-password-5f1c"),
    ("OPENAI_API_KEY", "canary-openai-key-5f1c"),
    (
        "DATABASE_URL",
        "postgres://drover:canary-db-password-5f1c@db/drover",
    ),
];

fn canary_launch(as_user: Option<u32>) -> Launch {
    Launch {
        env: CANARIES
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        as_user,
    }
}

const IMAGE: &str = "drover-busybox:latest";

fn docker_usable() -> bool {
    drover_testkit::docker_image_usable(IMAGE)
}

/// What a probe looks for, on the host.
struct Secrets {
    /// Files a job must not read: (what, path).
    files: Vec<(&'static str, PathBuf)>,
    /// A directory of drover's a job must not write in.
    data_dir: PathBuf,
    /// The worker's pid (host namespace).
    worker_pid: i32,
}

/// Whether the worker's environment reached the job.
const ENVIRONMENT_PROBE: &str =
    "if env | grep -q canary-; then echo environment=leaked; else echo environment=clean; fi";

/// A shell script (POSIX sh and busybox) printing `what=verdict` lines.
fn probe_script(secrets: &Secrets, port: u16) -> String {
    let mut s = String::from(
        "r() { if cat \"$2\" >/dev/null 2>&1; then echo \"$1=readable\"; else echo \"$1=hidden\"; fi; }\n\
         w() { if (echo x > \"$2\") 2>/dev/null; then echo \"$1=written\"; else echo \"$1=refused\"; fi; }\n",
    );
    for (what, path) in &secrets.files {
        s.push_str(&format!("r {what} '{}'\n", path.display()));
    }
    s.push_str("r shadow /etc/shadow\n");
    let marker = format!("drover-attack-{}", std::process::id());
    for (what, dir) in [
        ("write_usr", PathBuf::from("/usr")),
        ("write_etc", PathBuf::from("/etc")),
        ("write_data_dir", secrets.data_dir.clone()),
    ] {
        s.push_str(&format!("w {what} '{}/{marker}'\n", dir.display()));
    }
    let pid = secrets.worker_pid;
    s.push_str(&format!(
        "mount -o remount,rw / 2>/dev/null && echo remount=done || echo remount=refused\n\
         if [ -e /var/run/docker.sock ] || [ -e /run/docker.sock ]; then echo docker_socket=visible; else echo docker_socket=hidden; fi\n\
         echo caps=$(grep CapEff /proc/self/status | tr -d 'CapEff:\\t ')\n\
         echo uid=$(id -u)\n\
         if [ -e /proc/{pid}/status ]; then echo worker_process=visible; else echo worker_process=hidden; fi\n\
         kill -0 {pid} 2>/dev/null && echo signal_worker=sent || echo signal_worker=refused\n\
         echo interfaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ,)\n\
         if env | grep -q canary-; then echo environment=leaked; else echo environment=clean; fi\n\
         for d in /root /home /var/run /var/lib; do if ls -A \"$d\" 2>/dev/null | grep -q .; then echo \"listed$d=yes\"; fi; done\n\
         if ls -A /run 2>/dev/null | grep -qvE '^(drover|mount)$' || ls -A /run/mount 2>/dev/null | grep -q .; then echo listed/run=$(ls -A /run | tr '\\n' ' '); fi\n\
         echo port={port}\n"
    ));
    s
}

fn verdicts(lines: &[String]) -> BTreeMap<String, String> {
    lines
        .iter()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn run_probe(client: &Client, spec: JobSpec) -> BTreeMap<String, String> {
    let job = client.submit_job(&spec).await.expect("submit the probe");
    let id = job.id.to_string();
    let view = client.wait_job(&id, |_| {}).await.expect("wait");
    let lines: Vec<String> = client
        .job_logs(&id, None)
        .await
        .expect("logs")
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(
        view.job.state,
        JobState::Succeeded,
        "the probe runs to its end: {:?} {lines:?}",
        view.job.error
    );
    verdicts(&lines)
}

pub(super) fn probe_spec(script: &str, isolation: Isolation) -> JobSpec {
    JobSpec {
        command: Some(script.to_string()),
        isolation,
        image: (isolation == Isolation::Container).then(|| IMAGE.to_string()),
        max_attempts: Some(1),
        ..Default::default()
    }
}

/// What every isolating mode promises (spec/product.md §9); `mode` names the case.
fn assert_isolated(mode: &str, v: &BTreeMap<String, String>, secrets: &Secrets) {
    let get = |k: &str| v.get(k).map(String::as_str).unwrap_or("missing");
    for (what, _) in &secrets.files {
        assert_eq!(get(what), "hidden", "{mode}: {what} — {v:?}");
    }
    assert_eq!(get("shadow"), "hidden", "{mode}: {v:?}");
    for what in ["write_usr", "write_etc"] {
        assert_eq!(get(what), "refused", "{mode}: {what} — {v:?}");
    }
    // Where a sandbox shows the path of its scratch directory, the directories above it
    // are its own (an empty tmpfs), so a write there may succeed: what counts is the host.
    let marker = secrets
        .data_dir
        .join(format!("drover-attack-{}", std::process::id()));
    assert!(!marker.exists(), "{mode}: wrote {}", marker.display());
    assert_eq!(get("remount"), "refused", "{mode}: {v:?}");
    assert_eq!(get("docker_socket"), "hidden", "{mode}: {v:?}");
    assert_eq!(
        get("caps"),
        "0000000000000000",
        "{mode}: capabilities — {v:?}"
    );
    assert_ne!(get("uid"), "0", "{mode}: root in the job — {v:?}");
    assert_eq!(get("worker_process"), "hidden", "{mode}: {v:?}");
    assert_eq!(get("signal_worker"), "refused", "{mode}: {v:?}");
    assert_eq!(
        get("interfaces"),
        "lo,",
        "{mode}: a network beyond loopback — {v:?}"
    );
    assert_eq!(get("environment"), "clean", "{mode}: {v:?}");
    let listed: Vec<_> = v.keys().filter(|k| k.starts_with("listed")).collect();
    assert!(
        listed.is_empty(),
        "{mode}: host directories visible: {listed:?} in {v:?}"
    );
    for (_, dir) in [("usr", "/usr"), ("etc", "/etc")] {
        let marker = Path::new(dir).join(format!("drover-attack-{}", std::process::id()));
        assert!(!marker.exists(), "{mode}: wrote {}", marker.display());
    }
}

/// Job A keeps a secret in its scratch directory; job B, of another user, looks for it.
async fn other_jobs_scratch_is_hidden(
    owner: &Client,
    other: &Client,
    isolation: Isolation,
    mode: &str,
) {
    let keeper = probe_spec(
        "echo secret-of-a > \"$DROVER_SCRATCH/secret\"; echo \"scratch=$DROVER_SCRATCH\"; sleep 60",
        isolation,
    );
    let job = owner.submit_job(&keeper).await.expect("submit");
    let id = job.id.to_string();
    let scratch = eventually("the keeper to say where its scratch is", || async {
        let logs = owner.job_logs(&id, None).await.ok()?;
        logs.iter()
            .find_map(|e| e.text.strip_prefix("scratch=").map(str::to_string))
    })
    .await;
    let probe = probe_spec(
        &format!(
            "if cat '{scratch}/secret' 2>/dev/null; then echo other_scratch=readable; \
             else echo other_scratch=hidden; fi; \
             if ls -A '{}' 2>/dev/null | grep -qv \"^$(basename \"$DROVER_SCRATCH\")$\"; \
             then echo scratch_parent=listed; fi",
            Path::new(&scratch)
                .parent()
                .unwrap_or(Path::new("/"))
                .display()
        ),
        isolation,
    );
    let v = run_probe(other, probe).await;
    assert_eq!(
        v.get("other_scratch").map(String::as_str),
        Some("hidden"),
        "{mode}: {v:?}"
    );
    // A container's scratch is its own /tmp, whose parent is the image's root.
    if isolation != Isolation::Container {
        assert!(!v.contains_key("scratch_parent"), "{mode}: {v:?}");
    }
    owner.cancel_job(&id).await.expect("cancel the keeper");
}

/// `drover up` as root, as people run it: the control plane's database, the node's
/// credential and the CLI's login sit in the data and config directories.
#[tokio::test]
async fn isolation_under_a_root_worker_drover_up() {
    if !drover_testkit::running_as_root() {
        eprintln!("skipped: the root worker case needs the test to run as root");
        return;
    }
    let sandbox = bwrap_usable();
    let container = docker_usable();
    let dir = attack_dir();
    let up = UpProc::start_with(&drover(), dir.path(), &[], &canary_launch(None)).await;
    let admin = up.client();
    let mallory = plain_user(&admin, &up.url, "mallory").await;
    let alice = plain_user(&admin, &up.url, "alice").await;
    let secrets = Secrets {
        files: vec![
            ("database", up.data_dir.join("drover.db")),
            ("node_credential", up.data_dir.join("worker/node.json")),
            (
                "cli_credentials",
                dir.path().join("config/drover/credentials.json"),
            ),
        ],
        data_dir: up.data_dir.clone(),
        worker_pid: up.proc.pid(),
    };
    for (_, f) in &secrets.files {
        assert!(f.exists(), "the secret {} exists on the host", f.display());
    }
    let script = probe_script(&secrets, 0);
    // A process job runs with the worker's rights (root here): plain users may not ask for
    // one, and the admin's never gets the worker's environment.
    let refused = mallory
        .submit_job(&probe_spec(ENVIRONMENT_PROBE, Isolation::Process))
        .await;
    assert!(refused.is_err(), "a plain user ran a process job as root");
    let v = run_probe(&admin, probe_spec(ENVIRONMENT_PROBE, Isolation::Process)).await;
    assert_eq!(
        v.get("environment").map(String::as_str),
        Some("clean"),
        "{v:?}"
    );
    if sandbox {
        let v = run_probe(&mallory, probe_spec(&script, Isolation::Sandbox)).await;
        assert_isolated("sandbox under root", &v, &secrets);
        assert_eq!(v.get("uid").map(String::as_str), Some("65534"));
        other_jobs_scratch_is_hidden(&alice, &mallory, Isolation::Sandbox, "sandbox").await;
    }
    if container {
        let v = run_probe(&mallory, probe_spec(&script, Isolation::Container)).await;
        assert_isolated("container under root", &v, &secrets);
        other_jobs_scratch_is_hidden(&alice, &mallory, Isolation::Container, "container").await;
    }
    // Nothing was written on the host.
    let marker = up
        .data_dir
        .join(format!("drover-attack-{}", std::process::id()));
    assert!(!marker.exists());
}

/// A worker running as an unprivileged user (uid 4242): the sandbox must hide that user's
/// own files too (the node's credential is readable by it).
#[tokio::test]
async fn isolation_under_an_unprivileged_worker() {
    if !drover_testkit::running_as_root() {
        eprintln!("skipped: starting a worker as another user needs the test to run as root");
        return;
    }
    if !bwrap_usable() {
        return;
    }
    let dir = attack_dir();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let admin = server.client();
    let token = server.token().await;
    let worker = WorkerProc::start_with(
        &drover(),
        &server.url,
        dir.path(),
        "unprivileged",
        Some(&token),
        &[],
        &canary_launch(Some(4242)),
    );
    WorkerProc::wait_connected(&admin, 1).await;
    let nodes = admin.list_nodes().await.expect("nodes");
    assert!(
        nodes[0]
            .worker
            .capabilities
            .isolation_modes
            .contains(&"sandbox".to_string()),
        "an unprivileged worker offers sandboxes: {nodes:?}; log: {}",
        worker.proc.log_text()
    );
    let mallory = plain_user(&admin, &server.url, "mallory").await;
    let alice = plain_user(&admin, &server.url, "alice").await;
    let credential = worker.state_dir.join("node.json");
    assert!(credential.exists());
    let secrets = Secrets {
        files: vec![
            ("node_credential", credential),
            ("database", server.data_dir.join("drover.db")),
        ],
        data_dir: worker.state_dir.clone(),
        worker_pid: worker.proc.pid(),
    };
    let script = probe_script(&secrets, 0);
    let process_probe = format!(
        "{ENVIRONMENT_PROBE}\nif cat '{}' >/dev/null; then echo node_credential=readable; fi",
        secrets.files[0].1.display()
    );
    let v = run_probe(&admin, probe_spec(&process_probe, Isolation::Process)).await;
    assert_eq!(
        v.get("environment").map(String::as_str),
        Some("clean"),
        "{v:?}"
    );
    assert_eq!(
        v.get("node_credential").map(String::as_str),
        Some("readable"),
        "a process job has the worker's rights (the probe itself works): {v:?}"
    );
    let v = run_probe(&mallory, probe_spec(&script, Isolation::Sandbox)).await;
    assert_isolated("sandbox under uid 4242", &v, &secrets);
    other_jobs_scratch_is_hidden(&alice, &mallory, Isolation::Sandbox, "sandbox").await;
}
