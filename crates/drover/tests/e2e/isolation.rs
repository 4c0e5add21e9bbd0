//! Sandboxed jobs (bubblewrap): no network, a read-only root, their own pid namespace, a
//! writable scratch directory. Under CI=true a machine without a usable bwrap fails these
//! tests; elsewhere they are skipped with a message.

use crate::drover;
use drover_client::records::LogEntryView;
use drover_core::{Isolation, JobSpec, JobState};
use drover_testkit::{ServerOptions, ServerProc, TestDir, WorkerProc, bwrap_usable, drover_client};

fn sandboxed(command: &str) -> JobSpec {
    JobSpec {
        command: Some(command.into()),
        isolation: Isolation::Sandbox,
        max_attempts: Some(1),
        ..Default::default()
    }
}

struct Node {
    _dir: TestDir,
    server: ServerProc,
    worker: WorkerProc,
}

async fn node() -> Node {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let worker = server.worker(dir.path(), "w", None, &[]).await;
    WorkerProc::wait_connected(&server.client(), 1).await;
    Node {
        _dir: dir,
        server,
        worker,
    }
}

/// Runs a job to its end: the job with its runs, and its output lines.
async fn run_view(node: &Node, spec: &JobSpec) -> (drover_client::records::JobView, Vec<String>) {
    let client = node.server.client();
    let job = client.submit_job(spec).await.unwrap();
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    let lines = client
        .job_logs(&job.id.to_string(), None)
        .await
        .unwrap()
        .into_iter()
        .map(|e: LogEntryView| e.text)
        .collect();
    (view, lines)
}

async fn run(node: &Node, spec: &JobSpec) -> (JobState, Vec<String>) {
    let (view, lines) = run_view(node, spec).await;
    (view.job.state, lines)
}

#[tokio::test]
async fn a_sandboxed_job_runs_and_the_node_reports_the_mode() {
    if !bwrap_usable() {
        return;
    }
    let n = node().await;
    let nodes = n.server.client().list_nodes().await.unwrap();
    assert!(
        nodes[0]
            .worker
            .capabilities
            .isolation_modes
            .contains(&"sandbox".to_string())
    );
    let (state, lines) = run(
        &n,
        &sandboxed("echo hello from the sandbox; echo $DROVER_ISOLATION"),
    )
    .await;
    assert_eq!(state, JobState::Succeeded);
    assert_eq!(lines, ["hello from the sandbox", "sandbox"]);
    let out = drover()
        .cli(
            &n.server.url,
            &[
                "job",
                "run",
                "--isolation",
                "sandbox",
                "--command",
                "echo cli",
                "--follow",
            ],
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "cli\n");
}

#[tokio::test]
async fn a_sandboxed_job_cannot_reach_the_network() {
    if !bwrap_usable() {
        return;
    }
    let n = node().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!("bash -c 'echo > /dev/tcp/127.0.0.1/{port}' && echo connected");
    // The same probe reaches the port from an ordinary job …
    let mut plain = sandboxed(&probe);
    plain.isolation = Isolation::Process;
    let (state, lines) = run(&n, &plain).await;
    assert_eq!(
        (state, lines),
        (JobState::Succeeded, vec!["connected".to_string()])
    );
    // … and not from a sandbox.
    let (state, lines) = run(&n, &sandboxed(&probe)).await;
    assert_eq!(state, JobState::Failed, "{lines:?}");
    assert!(!lines.contains(&"connected".to_string()));
}

#[tokio::test]
async fn a_sandboxed_job_writes_only_its_scratch_directory() {
    if !bwrap_usable() {
        return;
    }
    let n = node().await;
    // A place the host may write (the test's own /tmp directory would be on the sandbox's
    // private /tmp, which proves nothing).
    let outside =
        std::path::PathBuf::from(format!("/var/tmp/drover-escape-{}", std::process::id()));
    let (state, lines) = run(
        &n,
        &sandboxed(&format!(
            "echo kept > $DROVER_SCRATCH/file && cat $DROVER_SCRATCH/file; touch {} || echo refused",
            outside.display()
        )),
    )
    .await;
    assert_eq!(state, JobState::Succeeded);
    assert_eq!(lines.first().map(String::as_str), Some("kept"));
    assert!(lines.contains(&"refused".to_string()), "{lines:?}");
    assert!(
        !outside.exists(),
        "the sandbox wrote outside its scratch directory"
    );
}

#[tokio::test]
async fn a_sandboxed_job_cannot_see_the_workers_processes() {
    if !bwrap_usable() {
        return;
    }
    let n = node().await;
    let worker_pid = n.worker.proc.pid();
    let (state, lines) = run(
        &n,
        &sandboxed(&format!(
            "test -e /proc/{worker_pid} && echo visible || echo hidden; echo pid $$"
        )),
    )
    .await;
    assert_eq!(state, JobState::Succeeded);
    assert_eq!(lines[0], "hidden");
    let pid: i32 = lines[1].trim_start_matches("pid ").parse().unwrap();
    assert!(pid < 10, "the job has its own pid namespace: {lines:?}");
}

#[tokio::test]
async fn bad_isolation_input_is_refused() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let d = drover();
    let out = d
        .cli(
            &server.url,
            &["job", "run", "--command", "true", "--isolation", "vm"],
        )
        .await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("--isolation"), "{out:?}");
    let out = d
        .cli(
            &server.url,
            &[
                "job",
                "run",
                "--command",
                "true",
                "--isolation",
                "container",
            ],
        )
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("image"), "{out:?}");
    assert!(
        server
            .client()
            .list_jobs(None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

const IMAGE: &str = "drover-busybox:latest";

fn docker_usable() -> bool {
    drover_testkit::docker_image_usable(IMAGE)
}

fn containerised(command: &str) -> JobSpec {
    JobSpec {
        command: Some(command.into()),
        isolation: Isolation::Container,
        image: Some(IMAGE.into()),
        max_attempts: Some(1),
        ..Default::default()
    }
}

fn containers_of(run_id: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["ps", "--all", "--quiet", "--filter"])
        .arg(format!("label=drover.run={run_id}"))
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn a_container_job_streams_its_output_and_exit_code_without_network() {
    if !docker_usable() {
        return;
    }
    let n = node().await;
    let nodes = n.server.client().list_nodes().await.unwrap();
    assert!(
        nodes[0]
            .worker
            .capabilities
            .isolation_modes
            .contains(&"container".to_string())
    );
    let mut spec = containerised("echo hello from $WHERE; ls /sys/class/net; exit 3");
    spec.env.insert("WHERE".into(), "a container".into());
    let (view, lines) = run_view(&n, &spec).await;
    assert_eq!(view.job.state, JobState::Failed);
    assert_eq!(view.job.exit_code, Some(3));
    assert_eq!(
        lines,
        ["hello from a container", "lo"],
        "only a loopback: no network"
    );
    assert_eq!(
        containers_of(&view.runs[0].run.id.to_string()),
        "",
        "removed when it ended"
    );
}

/// Waits until the job's container printed something; returns its run id.
async fn started_run(client: &drover_client::Client, id: &str) -> String {
    drover_testkit::eventually("the container to start", || async {
        let logs = client.job_logs(id, None).await.ok()?;
        let view = client.get_job(id).await.ok()?;
        (!logs.is_empty()).then(|| view.runs[0].run.id.to_string())
    })
    .await
}

async fn stop_removes_the_container(timeout: bool) {
    if !docker_usable() {
        return;
    }
    let n = node().await;
    let client = n.server.client();
    let mut spec = containerised("echo started; sleep 300");
    if timeout {
        spec.timeout_ms = Some(3000);
    }
    let job = client.submit_job(&spec).await.unwrap();
    let id = job.id.to_string();
    let run_id = started_run(&client, &id).await;
    assert_ne!(containers_of(&run_id), "", "the container runs");
    if !timeout {
        client.cancel_job(&id).await.unwrap();
    }
    let view = client.wait_job(&id, |_| {}).await.unwrap();
    let want = if timeout {
        JobState::TimedOut
    } else {
        JobState::Cancelled
    };
    assert_eq!(view.job.state, want);
    drover_testkit::eventually("the container to be removed", || async {
        containers_of(&run_id).is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn cancelling_a_container_job_removes_its_container() {
    stop_removes_the_container(false).await;
}

#[tokio::test]
async fn a_container_job_that_times_out_is_removed() {
    stop_removes_the_container(true).await;
}

/// `drover up` keeps its worker's state in ./.drover/worker, a relative path: sandboxes bind
/// the run's scratch directory by path, so the worker must make it absolute.
#[tokio::test]
async fn a_worker_with_a_relative_state_dir_runs_sandboxed_jobs() {
    if !bwrap_usable() {
        return;
    }
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let token = server.token().await;
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args([
            "worker",
            "--server",
            &server.url,
            "--token",
            &token,
            "--state-dir",
            "relative/state",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    WorkerProc::wait_connected(&server.client(), 1).await;
    let client = server.client();
    let job = client.submit_job(&sandboxed("echo inside")).await.unwrap();
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded, "{:?}", view.job.error);
    let _ = worker.kill().await;
}

#[tokio::test]
async fn job_containers_of_a_killed_worker_are_removed_when_it_comes_back() {
    if !docker_usable() {
        return;
    }
    let mut n = node().await;
    let client = n.server.client();
    let job = client
        .submit_job(&containerised("echo started; sleep 300"))
        .await
        .unwrap();
    let id = job.id.to_string();
    let run_id = started_run(&client, &id).await;
    n.worker.proc.kill9();
    assert_ne!(
        containers_of(&run_id),
        "",
        "the engine keeps the container of a killed worker"
    );
    let _back = WorkerProc::start(&drover(), &n.server.url, n._dir.path(), "w", None, &[]);
    drover_testkit::eventually("the left-over container to be removed", || async {
        containers_of(&run_id).is_empty().then_some(())
    })
    .await;
}
