//! Providers: drover starts workers itself when jobs wait, as local processes or Docker
//! containers, and removes them afterwards. The seed 004 common flow (setup → provisioning →
//! registration → execution → verification → cleanup) runs the same way on each provider,
//! and what is left afterwards is checked by asking the OS and the Docker engine, not
//! drover. Under CI=true a machine without a Docker engine fails the Docker tests.

use crate::drover;
use drover_client::records::{EventRecord, NodeView};
use drover_core::{JobSpec, JobState, WorkerState};
use drover_testkit::{
    ServerOptions, ServerProc, TestDir, UpProc, drover_client, eventually, service_available,
};
use std::path::Path;

const WORKER_IMAGE: &str = "drover-worker:test";

/// Builds the worker image from this very binary (scripts/build-images skips the build
/// when the image already holds it). False (skip) without a Docker engine, except in CI.
fn docker_worker_image() -> bool {
    let engine = std::process::Command::new("docker")
        .arg("info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !service_available(
        engine,
        "a Docker engine",
        "the machine's Docker daemon; scripts/test needs it running",
    ) {
        return false;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-images");
    let out = std::process::Command::new(script)
        .args([
            "--worker",
            env!("CARGO_BIN_EXE_drover"),
            "--tag",
            WORKER_IMAGE,
        ])
        .output()
        .expect("run scripts/build-images");
    assert!(
        out.status.success(),
        "scripts/build-images failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Containers (running or not) carrying this label, as Docker lists them.
fn containers_labelled(label: &str) -> Vec<String> {
    docker(&[
        "ps",
        "--all",
        "--quiet",
        "--filter",
        &format!("label={label}"),
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

/// Processes whose environment carries `VAR=value`, as /proc shows them.
fn processes_with_env(var: &str, value: &str) -> Vec<i32> {
    let needle = format!("{var}={value}");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| drover_testkit::process_exists(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .collect()
}

/// The cluster id a control plane labels its providers' resources with.
async fn cluster_id_of(client: &drover_client::Client) -> String {
    client.providers().await.expect("providers")["cluster_id"]
        .as_str()
        .expect("cluster id")
        .to_string()
}

/// A control plane with providers, and a guard that removes whatever its providers left
/// if the test fails half-way (the test itself checks that drover removed everything).
struct Stack {
    _dir: TestDir,
    server: ServerProc,
    cluster_id: String,
    _leftovers: LeftoverGuard,
}

impl Stack {
    async fn start(providers: &[&str]) -> Self {
        let dir = TestDir::new();
        let mut extra = vec!["--reconcile-every".to_string(), "1s".to_string()];
        for p in providers {
            extra.push("--provider".into());
            extra.push(p.to_string());
        }
        let options = ServerOptions {
            extra,
            ..Default::default()
        };
        let server = ServerProc::start(&drover(), dir.path(), options).await;
        let cluster_id = cluster_id_of(&server.client()).await;
        Self {
            _dir: dir,
            server,
            _leftovers: LeftoverGuard(cluster_id.clone()),
            cluster_id,
        }
    }

    fn cluster_label(&self) -> String {
        format!("drover.cluster={}", self.cluster_id)
    }

    async fn provided(&self, provider: &str) -> Vec<NodeView> {
        self.server
            .client()
            .list_nodes()
            .await
            .expect("nodes")
            .into_iter()
            .filter(|n| n.worker.provider.as_deref() == Some(provider))
            .collect()
    }

    async fn events(&self, node: &NodeView) -> Vec<EventRecord> {
        self.server
            .client()
            .node_events(&node.worker.id.to_string())
            .await
            .expect("node events")
    }

    /// Waits until every worker the providers made has ended, and returns them.
    async fn all_ended(&self) -> Vec<NodeView> {
        eventually("every provided worker to end", || async {
            let nodes = self.server.client().list_nodes().await.ok()?;
            nodes
                .iter()
                .all(|n| matches!(n.worker.state, WorkerState::Terminated | WorkerState::Lost))
                .then_some(nodes)
        })
        .await
    }
}

fn job_for(provider: &str, command: &str) -> JobSpec {
    JobSpec {
        command: Some(command.into()),
        provider: Some(provider.into()),
        max_attempts: Some(1),
        ..Default::default()
    }
}

fn types(events: &[EventRecord]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.type_name()).collect()
}

/// The seed 004 common flow on one provider.
async fn common_flow(provider: &str, settings: &str) {
    // 1. Setup: a control plane with the provider and no worker at all.
    let stack = Stack::start(&[&format!("{provider}:{settings},idle=2s")]).await;
    let client = stack.server.client();
    assert!(client.list_nodes().await.unwrap().is_empty());

    // 2. Provisioning: a job waits, the provider is asked for a worker.
    let job = client
        .submit_job(&job_for(provider, "echo hello from $DROVER_JOB_ID; exit 0"))
        .await
        .unwrap();
    let id = job.id.to_string();

    // 3-4. Registration with the one-time token, then execution.
    let view = client.wait_job(&id, |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded, "{view:?}");

    // 5. Verification: result, logs, and the worker that ran it is the provisioned one.
    assert_eq!(view.job.exit_code, Some(0));
    let lines: Vec<String> = client
        .job_logs(&id, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(lines, [format!("hello from {id}")]);
    let nodes = stack.provided(provider).await;
    assert_eq!(nodes.len(), 1, "one worker provisioned: {nodes:?}");
    let node = &nodes[0];
    assert_eq!(view.runs[0].run.worker_id, node.worker.id);
    let resource = node
        .worker
        .resource_id
        .clone()
        .expect("resource id recorded");
    let events = stack.events(node).await;
    let t = types(&events);
    assert_eq!(
        &t[..6],
        [
            "ProvisioningStarted",
            "ProvisioningStepCompleted",
            "ProvisioningStepCompleted",
            "WorkerRegistered",
            "ProvisioningStepCompleted",
            "WorkerConnected",
        ],
        "{events:?}"
    );

    // 6. Cleanup: the idle worker is destroyed and nothing is left.
    let ended = stack.all_ended().await;
    assert_eq!(ended[0].worker.state, WorkerState::Terminated);
    let events = stack.events(node).await;
    assert_eq!(
        types(&events).last(),
        Some(&"WorkerTerminated"),
        "{events:?}"
    );
    let worker_id = node.worker.id.to_string();
    let state_dir = stack
        .server
        .data_dir
        .join("providers/local")
        .join(&worker_id);
    eventually("the worker's resource to be gone", || async {
        let gone = match provider {
            "docker" => {
                containers_labelled(&format!("drover.worker={worker_id}")).is_empty()
                    && docker(&[
                        "ps",
                        "--all",
                        "--quiet",
                        "--filter",
                        &format!("id={resource}"),
                    ])
                    .is_empty()
            }
            _ => {
                let pid: i32 = resource.trim_start_matches("pid:").parse().ok()?;
                processes_with_env("DROVER_PROVIDER_WORKER", &worker_id).is_empty()
                    && !drover_testkit::process_exists(pid)
                    // The node's credential went with it.
                    && !state_dir.exists()
            }
        };
        gone.then_some(())
    })
    .await;
}

#[tokio::test]
async fn seed004_common_flow_on_local() {
    common_flow("local", "max=2").await;
}

#[tokio::test]
async fn seed004_common_flow_on_docker() {
    if !docker_worker_image() {
        return;
    }
    common_flow("docker", &format!("max=2,image={WORKER_IMAGE}")).await;
}

/// Seed 003 steps 6.5 and 6.6: a job for one provider creates nothing on the other.
async fn provider_isolation(asked: &str, other: &str) {
    let stack = Stack::start(&[
        "local:idle=2s",
        &format!("docker:idle=2s,image={WORKER_IMAGE}"),
    ])
    .await;
    let client = stack.server.client();
    let job = client
        .submit_job(&job_for(asked, "echo isolated"))
        .await
        .unwrap();
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded);
    assert_eq!(stack.provided(asked).await.len(), 1);
    assert!(stack.provided(other).await.is_empty(), "no {other} worker");
    let containers = containers_labelled(&stack.cluster_label());
    let processes = processes_with_env("DROVER_PROVIDER_CLUSTER", &stack.cluster_id);
    let (asked_things, other_things) = if asked == "docker" {
        (containers.len(), processes.len())
    } else {
        (processes.len(), containers.len())
    };
    assert_eq!(asked_things, 1, "the {asked} worker runs");
    assert_eq!(other_things, 0, "nothing was started on {other}");
    stack.all_ended().await;
}

#[tokio::test]
async fn seed003_step_6_5_a_docker_job_creates_no_local_worker() {
    if !docker_worker_image() {
        return;
    }
    provider_isolation("docker", "local").await;
}

#[tokio::test]
async fn seed003_step_6_6_a_local_job_creates_no_docker_container() {
    if !docker_worker_image() {
        return;
    }
    provider_isolation("local", "docker").await;
}

#[tokio::test]
async fn a_job_for_a_provider_the_server_does_not_have_is_refused() {
    let stack = Stack::start(&["local"]).await;
    let err = stack
        .server
        .client()
        .submit_job(&job_for("docker", "true"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("provider"), "{text}");
    assert!(text.contains("configured: local"), "{text}");
}

#[tokio::test]
async fn a_worker_that_never_registers_is_destroyed_and_compensation_recorded() {
    if !docker_worker_image() {
        return;
    }
    // The real worker image, told to dial a port where nothing listens: it runs, it never
    // registers.
    let stack = Stack::start(&[&format!(
        "docker:image={WORKER_IMAGE},server=http://127.0.0.1:9,register-within=3s,max=1"
    )])
    .await;
    let client = stack.server.client();
    let job = client.submit_job(&job_for("docker", "true")).await.unwrap();
    let first = eventually("a worker to be provisioned", || async {
        stack.provided("docker").await.into_iter().next()
    })
    .await;
    let worker_id = first.worker.id.to_string();
    eventually("its container to run", || async {
        (!containers_labelled(&format!("drover.worker={worker_id}")).is_empty()).then_some(())
    })
    .await;
    let events = eventually("the compensation", || async {
        let events = stack.events(&first).await;
        types(&events)
            .contains(&"ProvisioningCompensated")
            .then_some(events)
    })
    .await;
    let node = client.get_node(&worker_id).await.unwrap();
    assert_eq!(node.worker.state, WorkerState::Terminated);
    assert!(
        !types(&events).contains(&"WorkerRegistered"),
        "it never registered: {events:?}"
    );
    assert_eq!(
        containers_labelled(&format!("drover.worker={worker_id}")),
        Vec::<String>::new(),
        "its container is gone"
    );
    // Nothing stays behind once nobody needs a worker any more.
    client.cancel_job(&job.id.to_string()).await.unwrap();
    stack.all_ended().await;
    eventually("every container of this control plane to go", || async {
        containers_labelled(&stack.cluster_label())
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn reconciliation_removes_a_container_made_behind_drovers_back() {
    if !docker_worker_image() {
        return;
    }
    let stack = Stack::start(&[&format!("docker:image={WORKER_IMAGE}")]).await;
    let stranger = drover_core::WorkerId::new().to_string();
    let ours = docker(&[
        "run",
        "-d",
        "--label",
        "drover.managed=true",
        "--label",
        &stack.cluster_label(),
        "--label",
        &format!("drover.worker={stranger}"),
        WORKER_IMAGE,
        "sleep",
        "300",
    ]);
    // Another control plane's container is not this one's to remove.
    let theirs = docker(&[
        "run",
        "-d",
        "--label",
        "drover.managed=true",
        "--label",
        "drover.cluster=another-control-plane",
        WORKER_IMAGE,
        "sleep",
        "300",
    ]);
    assert!(!ours.is_empty() && !theirs.is_empty());
    eventually("the unknown container to be removed", || async {
        docker(&[
            "ps",
            "--all",
            "--quiet",
            "--no-trunc",
            "--filter",
            &format!("id={ours}"),
        ])
        .is_empty()
        .then_some(())
    })
    .await;
    let still = docker(&[
        "ps",
        "--all",
        "--quiet",
        "--no-trunc",
        "--filter",
        &format!("id={theirs}"),
    ]);
    docker(&["rm", "-f", &theirs]);
    assert_eq!(still, theirs, "another cluster's container was left alone");
}

/// kill -9 of the control plane while a provisioned worker runs a job: after the restart
/// the worker reconnects, the job finishes, and the idle worker is removed; nothing of
/// this control plane is left in Docker or in the process table.
async fn no_orphans_after_kill_9(provider: &str, settings: &str) {
    let mut stack = Stack::start(&[&format!("{provider}:{settings},idle=2s")]).await;
    let client = stack.server.client();
    let job = client
        .submit_job(&job_for(provider, "echo started; sleep 3; echo done"))
        .await
        .unwrap();
    let id = job.id.to_string();
    eventually("the job to run on a provisioned worker", || async {
        let logs = client.job_logs(&id, None).await.ok()?;
        (!logs.is_empty()).then_some(())
    })
    .await;
    stack.server.kill9();
    stack.server.restart().await;
    let client = stack.server.client();
    let view = client.wait_job(&id, |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded, "{view:?}");
    assert_eq!(
        view.runs.len(),
        1,
        "the worker came back and finished its run"
    );
    stack.all_ended().await;
    eventually("nothing of this control plane to be left", || async {
        (containers_labelled(&stack.cluster_label()).is_empty()
            && processes_with_env("DROVER_PROVIDER_CLUSTER", &stack.cluster_id).is_empty())
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn seed004_no_orphans_after_kill_9_on_docker() {
    if !docker_worker_image() {
        return;
    }
    no_orphans_after_kill_9("docker", &format!("image={WORKER_IMAGE}")).await;
}

#[tokio::test]
async fn seed004_no_orphans_after_kill_9_on_local() {
    no_orphans_after_kill_9("local", "max=1").await;
}

/// Removes, when dropped, whatever a test's providers left (the test checks that drover
/// removed everything; this only keeps a failed test from leaking).
struct LeftoverGuard(String);

impl Drop for LeftoverGuard {
    fn drop(&mut self) {
        for id in containers_labelled(&format!("drover.cluster={}", self.0)) {
            docker(&["rm", "-f", &id]);
        }
        for pid in processes_with_env("DROVER_PROVIDER_CLUSTER", &self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// What this cluster's providers have running: containers, then worker processes.
fn running_of(cluster_id: &str) -> (Vec<String>, Vec<i32>) {
    (
        containers_labelled(&format!("drover.cluster={cluster_id}")),
        processes_with_env("DROVER_PROVIDER_CLUSTER", cluster_id),
    )
}

/// A `drover up` with `provider`, a job run on a worker it started; returns the up, the
/// cluster id and the guard.
async fn up_with_a_provider_worker(
    dir: &TestDir,
    provider: &str,
    settings: &str,
    extra: &[&str],
) -> (UpProc, String, LeftoverGuard) {
    let spec = format!("{provider}:{settings},idle=60s");
    let mut args = vec!["--provider", spec.as_str()];
    args.extend_from_slice(extra);
    let up = UpProc::start(&drover(), dir.path(), &args).await;
    let client = up.client();
    let cluster_id = cluster_id_of(&client).await;
    let guard = LeftoverGuard(cluster_id.clone());
    let job = client
        .submit_job(&job_for(provider, "echo on a provider worker"))
        .await
        .unwrap();
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded, "{view:?}");
    let (containers, processes) = running_of(&cluster_id);
    assert_eq!(
        containers.len() + processes.len(),
        1,
        "one worker started: {containers:?} {processes:?}"
    );
    (up, cluster_id, guard)
}

/// Issue 35: Ctrl-C (SIGTERM) of `drover up` drains and removes the workers its providers
/// started, and says so; with `--keep-workers` they stay (for a restart on the same address
/// to adopt them, as a restarted control plane does in the kill -9 tests above).
async fn stopping_drover_up_leaves_no_worker(provider: &str, settings: &str) {
    let dir = TestDir::new();
    let (mut up, cluster_id, _guard) =
        up_with_a_provider_worker(&dir, provider, settings, &[]).await;
    up.proc.terminate();
    let (containers, processes) = running_of(&cluster_id);
    assert!(
        containers.is_empty() && processes.is_empty(),
        "left after the stop: {containers:?} {processes:?}"
    );
    assert!(
        up.proc
            .log_text()
            .contains("removing the workers providers started"),
        "the stop says what it does: {}",
        up.proc.log_text()
    );

    let kept_dir = TestDir::new();
    let (mut up, cluster_id, _guard) =
        up_with_a_provider_worker(&kept_dir, provider, settings, &["--keep-workers"]).await;
    up.proc.terminate();
    let (containers, processes) = running_of(&cluster_id);
    assert_eq!(
        containers.len() + processes.len(),
        1,
        "--keep-workers kept it"
    );
}

/// Issue 35: a job still running on a provider worker when `drover up` stops is not lost:
/// the worker is removed after the drain wait, and when `drover up` comes back on the same
/// data directory the attempt is failed by its lease and the job retried, on a new worker.
#[tokio::test]
async fn a_job_running_when_drover_up_stops_is_retried_when_it_comes_back() {
    let dir = TestDir::new();
    let marker = dir.path().join("first-attempt-ran");
    let args = ["--provider", "local:max=1,idle=60s", "--lease", "2s"];
    let mut up = UpProc::start(&drover(), dir.path(), &args).await;
    let client = up.client();
    let cluster_id = cluster_id_of(&client).await;
    let _guard = LeftoverGuard(cluster_id.clone());
    let spec = JobSpec {
        max_attempts: Some(2),
        ..job_for(
            "local",
            &format!(
                "if [ -e {m} ]; then echo second; exit 0; fi; touch {m}; echo first; sleep 60",
                m = marker.display()
            ),
        )
    };
    let id = client.submit_job(&spec).await.unwrap().id.to_string();
    eventually("the first attempt to run", || async {
        let logs = client.job_logs(&id, None).await.ok()?;
        (!logs.is_empty()).then_some(())
    })
    .await;
    up.proc.terminate();
    let (containers, processes) = running_of(&cluster_id);
    assert!(
        containers.is_empty() && processes.is_empty(),
        "left after the stop: {containers:?} {processes:?}"
    );

    let mut again = UpProc::start(&drover(), dir.path(), &args).await;
    let client = again.client();
    let view = client.wait_job(&id, |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded, "{view:?}");
    assert_eq!(
        view.runs.len(),
        2,
        "the stopped attempt and its retry: {view:?}"
    );
    assert_eq!(
        view.runs[0].run.state,
        drover_core::RunState::Failed,
        "{view:?}"
    );
    again.proc.terminate();
    let (containers, processes) = running_of(&cluster_id);
    assert!(
        containers.is_empty() && processes.is_empty(),
        "left after the second stop: {containers:?} {processes:?}"
    );
}

/// `NAME_on_local` and `NAME_on_docker`, each running `NAME(provider, settings)`.
macro_rules! on_each_provider {
    ($name:ident, $local:ident, $docker:ident) => {
        #[tokio::test]
        async fn $local() {
            $name("local", "max=1").await;
        }

        #[tokio::test]
        async fn $docker() {
            if !docker_worker_image() {
                return;
            }
            $name("docker", &format!("image={WORKER_IMAGE}")).await;
        }
    };
}

on_each_provider!(
    stopping_drover_up_leaves_no_worker,
    stopping_drover_up_leaves_no_worker_on_local,
    stopping_drover_up_leaves_no_worker_on_docker
);

/// Issue 35: a worker a provider started that reaches no control plane for longer than
/// its provider's `give-up` stops and is gone — its process exits, its container is removed
/// with it — when the control plane dies for good (kill -9, never restarted).
async fn a_worker_cut_off_past_give_up_removes_itself(provider: &str, settings: &str) {
    let mut stack = Stack::start(&[&format!("{provider}:{settings},idle=60s,give-up=2s")]).await;
    let client = stack.server.client();
    let job = client
        .submit_job(&job_for(provider, "echo on a provider worker"))
        .await
        .unwrap();
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded, "{view:?}");
    let (containers, processes) = running_of(&stack.cluster_id);
    assert_eq!(containers.len() + processes.len(), 1, "one worker started");
    stack.server.kill9();
    eventually("the cut-off worker to remove itself", || async {
        let (containers, processes) = running_of(&stack.cluster_id);
        (containers.is_empty() && processes.is_empty()).then_some(())
    })
    .await;
}

on_each_provider!(
    a_worker_cut_off_past_give_up_removes_itself,
    a_worker_cut_off_past_give_up_removes_itself_on_local,
    a_worker_cut_off_past_give_up_removes_itself_on_docker
);
