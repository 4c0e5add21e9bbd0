//! The scheduler scenarios of seed 002, each a test named by its ID, through the real
//! binary. Jobs write `NAME start|end NANOS` lines to a trace file, so that order and
//! overlap are read from what really ran.

use crate::drover;
use drover_client::Client;
use drover_client::records::{GroupState, JobView};
use drover_core::{EventKind, JobSpec, JobState, RunState};
use drover_testkit::{
    ServerOptions, ServerProc, TestDir, UpProc, WebhookReceiver, WorkerProc, drover_client,
    eventually, process_exists,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Trace(PathBuf);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    name: String,
    start: u128,
    end: Option<u128>,
}

impl Trace {
    fn new(dir: &Path) -> Self {
        Self(dir.join("trace"))
    }

    /// A command that records its start, sleeps, and records its end.
    fn command(&self, name: &str, seconds: f32) -> String {
        format!(
            "echo \"{name} start $(date +%s%N)\" >> {t}; sleep {seconds}; echo \"{name} end $(date +%s%N)\" >> {t}",
            t = self.0.display()
        )
    }

    fn spans(&self) -> Vec<Span> {
        let text = std::fs::read_to_string(&self.0).unwrap_or_default();
        let mut spans: Vec<Span> = Vec::new();
        for line in text.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [name, kind, ns] = parts[..] else {
                continue;
            };
            let ns: u128 = ns.parse().unwrap_or(0);
            match kind {
                "start" => spans.push(Span {
                    name: name.into(),
                    start: ns,
                    end: None,
                }),
                _ => {
                    if let Some(s) = spans
                        .iter_mut()
                        .rev()
                        .find(|s| s.name == name && s.end.is_none())
                    {
                        s.end = Some(ns);
                    }
                }
            }
        }
        spans
    }

    fn order(&self) -> Vec<String> {
        self.spans().into_iter().map(|s| s.name).collect()
    }
}

fn overlaps(a: &Span, b: &Span) -> bool {
    let (ae, be) = (a.end.unwrap_or(u128::MAX), b.end.unwrap_or(u128::MAX));
    a.start < be && b.start < ae
}

pub(crate) fn job(command: &str) -> JobSpec {
    JobSpec {
        command: Some(command.into()),
        ..Default::default()
    }
}

fn needing(command: &str, resource: &str) -> JobSpec {
    let mut s = job(command);
    s.resources.insert(resource.into(), 1);
    s
}

pub(crate) async fn submit(client: &Client, spec: &JobSpec) -> String {
    client
        .submit_job(spec)
        .await
        .expect("submit")
        .id
        .to_string()
}

pub(crate) async fn wait(client: &Client, id: &str) -> JobView {
    client.wait_job(id, |_| {}).await.expect("wait")
}

async fn server(dir: &TestDir) -> ServerProc {
    ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await
}

/// A server whose leases lapse after two seconds, for tests of lost workers.
async fn short_lease_server(dir: &TestDir) -> ServerProc {
    let options = ServerOptions {
        lease: Duration::from_secs(2),
        ..Default::default()
    };
    ServerProc::start(&drover(), dir.path(), options).await
}

#[tokio::test]
async fn e2e_norm_01_single_job_lifecycle() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let _w = s.worker(dir.path(), "w", None, &[]).await;
    let client = s.client();
    let id = submit(&client, &job("echo done")).await;
    let view = wait(&client, &id).await;
    assert_eq!(view.job.state, JobState::Succeeded);
    assert_eq!(view.runs.len(), 1);
    assert_eq!(view.runs[0].run.state, RunState::Succeeded);
}

#[tokio::test]
async fn e2e_norm_02_priority_ordering() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let client = s.client();
    let trace = Trace::new(dir.path());
    let mut ids = Vec::new();
    for (name, priority) in [("low", 1), ("high", 10), ("mid", 5), ("low2", 1)] {
        let mut spec = job(&trace.command(name, 0.05));
        spec.priority = priority;
        ids.push(submit(&client, &spec).await);
    }
    // The worker joins once everything is queued, and runs one job at a time.
    let _w = s.worker(dir.path(), "w", None, &["--slots", "1"]).await;
    for id in &ids {
        assert_eq!(wait(&client, id).await.job.state, JobState::Succeeded);
    }
    assert_eq!(trace.order(), ["high", "mid", "low", "low2"]);
}

#[tokio::test]
async fn e2e_norm_03_cancel_before_dispatch() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let client = s.client();
    let trace = Trace::new(dir.path());
    let cancelled = submit(&client, &job(&trace.command("cancelled", 0.0))).await;
    let kept = submit(&client, &job(&trace.command("kept", 0.0))).await;
    let out = drover().cli(&s.url, &["job", "cancel", &cancelled]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let _w = s.worker(dir.path(), "w", None, &[]).await;
    assert_eq!(wait(&client, &kept).await.job.state, JobState::Succeeded);
    let view = client.get_job(&cancelled).await.unwrap();
    assert_eq!(view.job.state, JobState::Cancelled);
    assert!(
        view.runs.is_empty(),
        "a job cancelled before dispatch never runs"
    );
    assert_eq!(trace.order(), ["kept"]);
}

/// A server and a worker that offers `ollama` once, with room for several jobs.
async fn ollama_node(dir: &TestDir) -> (ServerProc, WorkerProc) {
    let s = server(dir).await;
    let w = s
        .worker(
            dir.path(),
            "node",
            None,
            &["--resources", "ollama=1", "--slots", "4"],
        )
        .await;
    WorkerProc::wait_connected(&s.client(), 1).await;
    // The store calls a node connected as soon as its stream claims it; reservations are
    // taken from the sessions the replica has attached, a moment later (the gauge).
    let client = s.client();
    eventually("the node's session to be attached", || async {
        let metrics = client.metrics().await.ok()?;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("drover_workers_connected "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|n| *n >= 1.0)
            .map(|_| ())
    })
    .await;
    (s, w)
}

async fn reserve(url: &str) -> String {
    let out = drover()
        .cli(url, &["reserve", "--resource", "ollama", "--ttl", "60s"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    out.stdout.trim().to_string()
}

#[tokio::test]
async fn e2e_direct_01_direct_job_on_an_empty_queue_runs_at_once() {
    let dir = TestDir::new();
    let (s, _w) = ollama_node(&dir).await;
    let client = s.client();
    let reservation = reserve(&s.url).await;
    let mut direct = needing("echo direct", "ollama");
    direct.reservation = Some(reservation.parse().unwrap());
    let id = submit(&client, &direct).await;
    let view = wait(&client, &id).await;
    assert_eq!(view.job.state, JobState::Succeeded);
    let started = view.runs[0].run.started_at.unwrap();
    assert!(started.since(view.job.created_at) < Duration::from_secs(5));
}

#[tokio::test]
async fn e2e_direct_02_arrival_order_is_preserved() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let client = s.client();
    let trace = Trace::new(dir.path());
    // Between queued jobs, a direct job keeps its place in arrival order.
    let mut ids = Vec::new();
    for name in ["job1", "direct", "job2"] {
        ids.push(submit(&client, &needing(&trace.command(name, 0.1), "ollama")).await);
    }
    let _w = s
        .worker(
            dir.path(),
            "node",
            None,
            &["--resources", "ollama=1", "--slots", "4"],
        )
        .await;
    for id in &ids {
        assert_eq!(wait(&client, id).await.job.state, JobState::Succeeded);
    }
    assert_eq!(trace.order(), ["job1", "direct", "job2"]);
    // Inside a reservation, jobs run at once, one at a time, in submission order.
    let reservation: drover_core::ReservationId = reserve(&s.url).await.parse().unwrap();
    let mut ids = Vec::new();
    for name in ["r1", "r2", "r3"] {
        let mut spec = needing(&trace.command(name, 0.1), "ollama");
        spec.reservation = Some(reservation);
        ids.push(submit(&client, &spec).await);
    }
    for id in &ids {
        assert_eq!(wait(&client, id).await.job.state, JobState::Succeeded);
    }
    let spans = trace.spans();
    let r: Vec<&Span> = spans.iter().filter(|s| s.name.starts_with('r')).collect();
    assert_eq!(
        r.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["r1", "r2", "r3"]
    );
    assert!(!overlaps(r[0], r[1]) && !overlaps(r[1], r[2]));
}

/// Seed order with the resource busy when the reservation is asked for: the running job
/// keeps it (no pre-emption), the reservation waits PENDING and takes it when it frees,
/// before the job queued earlier; capacity is never exceeded.
#[tokio::test]
async fn e2e_direct_02_a_reservation_asked_while_the_resource_is_busy_waits_its_turn() {
    let dir = TestDir::new();
    let (s, _w) = ollama_node(&dir).await;
    let client = s.client();
    let trace = Trace::new(dir.path());
    let job1 = submit(&client, &needing(&trace.command("job1", 1.5), "ollama")).await;
    eventually("job1 to hold the resource", || async {
        let view = client.get_job(&job1).await.ok()?;
        (view.job.state == JobState::Running).then_some(())
    })
    .await;
    let job2 = submit(&client, &needing(&trace.command("job2", 0.1), "ollama")).await;
    // Asked not to wait: refused, nothing held.
    let refused = drover()
        .cli(&s.url, &["reserve", "--resource", "ollama", "--no-wait"])
        .await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("in use"), "{refused:?}");
    // Asked to wait: PENDING, and a second one queues behind it.
    let reserve_json = || async {
        let out = drover()
            .cli(
                &s.url,
                &["--output", "json", "reserve", "--resource", "ollama"],
            )
            .await;
        assert_eq!(out.code, 0, "{out:?}");
        serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = reserve_json().await;
    assert_eq!(first["state"], "PENDING", "{first}");
    let second = reserve_json().await;
    assert_eq!(second["state"], "PENDING", "{second}");
    let out = drover()
        .cli(
            &s.url,
            &["reserve", "--release", second["id"].as_str().unwrap()],
        )
        .await;
    assert_eq!(
        out.code, 0,
        "a pending reservation can be released: {out:?}"
    );
    let reservation: drover_core::ReservationId = first["id"].as_str().unwrap().parse().unwrap();
    let mut direct = needing(&trace.command("direct", 0.1), "ollama");
    direct.reservation = Some(reservation);
    let direct = submit(&client, &direct).await;
    assert_eq!(wait(&client, &direct).await.job.state, JobState::Succeeded);
    let held = client
        .get_reservation(&reservation.to_string())
        .await
        .unwrap();
    assert_eq!(held.state.as_str(), "ACTIVE");
    // The queued job still waits: the reservation holds the resource until released.
    assert_eq!(
        client.get_job(&job2).await.unwrap().job.state,
        JobState::Queued
    );
    let out = drover()
        .cli(&s.url, &["reserve", "--release", &reservation.to_string()])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(wait(&client, &job2).await.job.state, JobState::Succeeded);
    assert_eq!(trace.order(), ["job1", "direct", "job2"]);
    let spans = trace.spans();
    assert!(
        !overlaps(&spans[0], &spans[1]) && !overlaps(&spans[1], &spans[2]),
        "one unit of ollama, one job at a time: {spans:?}"
    );
}

#[tokio::test]
async fn e2e_direct_03_a_reservation_pauses_the_queue() {
    let dir = TestDir::new();
    let (s, _w) = ollama_node(&dir).await;
    let client = s.client();
    let reservation = reserve(&s.url).await;
    let queued = submit(&client, &needing("echo queued", "ollama")).await;
    // Work that does not need the resource goes on.
    let plain = submit(&client, &job("echo plain")).await;
    assert_eq!(wait(&client, &plain).await.job.state, JobState::Succeeded);
    // A job inside the reservation runs; the queued one still waits after it.
    let mut direct = needing("echo direct", "ollama");
    direct.reservation = Some(reservation.parse().unwrap());
    let direct = submit(&client, &direct).await;
    assert_eq!(wait(&client, &direct).await.job.state, JobState::Succeeded);
    assert_eq!(
        client.get_job(&queued).await.unwrap().job.state,
        JobState::Queued
    );
    let out = drover()
        .cli(&s.url, &["reserve", "--release", &reservation])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(wait(&client, &queued).await.job.state, JobState::Succeeded);
}

fn fail_once(marker: &Path, ok: &str) -> String {
    format!(
        "if [ -e {m} ]; then echo {ok}; else touch {m}; echo failing >&2; exit 1; fi",
        m = marker.display()
    )
}

#[tokio::test]
async fn e2e_retry_01_a_single_failure_is_retried() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let _w = s.worker(dir.path(), "w", None, &[]).await;
    let client = s.client();
    let id = submit(
        &client,
        &job(&fail_once(&dir.path().join("m"), "second time lucky")),
    )
    .await;
    let view = wait(&client, &id).await;
    assert_eq!(view.job.state, JobState::Succeeded);
    assert_eq!(view.runs.len(), 2);
    assert_eq!(view.runs[0].run.state, RunState::Failed);
    let events = client.job_events(&id).await.unwrap();
    assert!(events.iter().any(|e| matches!(
        e.kind,
        EventKind::JobRetryScheduled {
            next_attempt: 2,
            ..
        }
    )));
    let logs = client.job_logs(&id, None).await.unwrap();
    assert_eq!(logs[0].text, "second time lucky");
    let first = client.job_logs(&id, Some(1)).await.unwrap();
    assert_eq!(first[0].text, "failing");
}

#[tokio::test]
async fn e2e_retry_02_four_attempts_at_most() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let _w = s.worker(dir.path(), "w", None, &[]).await;
    let client = s.client();
    let id = submit(&client, &job("exit 9")).await;
    let view = wait(&client, &id).await;
    assert_eq!(view.job.state, JobState::Failed);
    assert_eq!(view.job.exit_code, Some(9));
    assert_eq!(view.job.attempts, 4, "one try and three retries");
    assert_eq!(view.runs.len(), 4);
    assert!(view.runs.iter().all(|r| r.run.state == RunState::Failed));
    // Backoff: each retry waited longer than the one before (base 200 ms, doubling).
    let gaps: Vec<Duration> = view
        .runs
        .windows(2)
        .map(|w| w[1].run.assigned_at.since(w[0].run.finished_at.unwrap()))
        .collect();
    assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(400), "{gaps:?}");
}

#[tokio::test]
async fn e2e_retry_03_the_retry_chain_is_linked() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let _w = s.worker(dir.path(), "w", None, &[]).await;
    let client = s.client();
    let mut spec = job("exit 1");
    spec.max_attempts = Some(3);
    let id = submit(&client, &spec).await;
    let view = wait(&client, &id).await;
    assert_eq!(view.runs.len(), 3);
    assert_eq!(view.runs[0].run.retry_of, None);
    for pair in view.runs.windows(2) {
        assert_eq!(pair[1].run.retry_of, Some(pair[0].run.id));
        assert_eq!(pair[1].run.attempt, pair[0].run.attempt + 1);
    }
    // A retry by hand continues the same chain.
    let last = view.runs[2].run.id.to_string();
    let out = drover().cli(&s.url, &["job", "retry", &last]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let view = wait(&client, &id).await;
    assert_eq!(view.runs.len(), 4);
    assert_eq!(view.runs[3].run.retry_of, Some(view.runs[2].run.id));
    let stale = drover()
        .cli(&s.url, &["job", "retry", &view.runs[0].run.id.to_string()])
        .await;
    assert_ne!(stale.code, 0);
    assert!(stale.stderr.contains("not the latest attempt"), "{stale:?}");
    let get = drover().cli(&s.url, &["job", "get", &id]).await;
    assert!(get.stdout.contains("RETRY OF"), "{get:?}");
}

/// Submits a job that, the first time, records its pid and sleeps; any later attempt
/// succeeds at once. Returns the job id and the first attempt's pid once it runs.
async fn submit_first_sleeps(client: &Client, dir: &Path) -> (String, i32) {
    let (marker, pidfile) = (dir.join("m"), dir.join("pid"));
    let command = format!(
        "if [ -e {m} ]; then echo again; exit 0; fi; touch {m}; echo $$ > {p}; exec sleep 300",
        m = marker.display(),
        p = pidfile.display()
    );
    let id = submit(client, &job(&command)).await;
    let pid: i32 = eventually("the job to start", || async {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    })
    .await;
    (id, pid)
}

async fn assert_process_gone(pid: i32) {
    eventually("the job's process to die with its worker", || async {
        (!process_exists(pid)).then_some(())
    })
    .await;
}

/// Kills the control plane and the worker while a job runs; restarts the control plane
/// alone. Returns the job id and the server.
async fn crash_during_running(dir: &TestDir) -> (ServerProc, String) {
    let mut s = short_lease_server(dir).await;
    let mut w = s.worker(dir.path(), "doomed", None, &[]).await;
    let (id, pid) = submit_first_sleeps(&s.client(), dir.path()).await;
    s.kill9();
    w.proc.kill9();
    assert_process_gone(pid).await;
    s.restart().await;
    (s, id)
}

#[tokio::test]
async fn e2e_recovery_01_a_running_job_is_recorded_failed_after_a_crash() {
    let dir = TestDir::new();
    let (s, id) = crash_during_running(&dir).await;
    let client = s.client();
    let failed = eventually("recovery to fail the lost attempt", || async {
        let view = client.get_job(&id).await.ok()?;
        let first = view.runs.first()?.run.clone();
        (first.state == RunState::Failed).then_some(first)
    })
    .await;
    let error = failed.error.unwrap_or_default();
    assert!(
        error.starts_with("recovery: the control plane restarted")
            && error.contains("within the lease"),
        "{error}"
    );
}

#[tokio::test]
async fn e2e_recovery_02_the_recovered_job_is_retried() {
    let dir = TestDir::new();
    let (s, id) = crash_during_running(&dir).await;
    let client = s.client();
    let _fresh = s.worker(dir.path(), "fresh", None, &[]).await;
    let view = wait(&client, &id).await;
    assert_eq!(view.job.state, JobState::Succeeded);
    assert_eq!(view.runs.len(), 2);
    assert_eq!(view.runs[0].run.state, RunState::Failed);
    assert_eq!(view.runs[1].run.retry_of, Some(view.runs[0].run.id));
    assert_ne!(view.runs[1].run.worker_id, view.runs[0].run.worker_id);
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn e2e_group_01_members_run_in_sequence() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let _w = s.worker(dir.path(), "w", None, &["--slots", "4"]).await;
    let trace = Trace::new(dir.path());
    let yaml: String = ["first", "second", "third"]
        .iter()
        .map(|n| format!("- name: {n}\n  command: '{}'\n", trace.command(n, 0.2)))
        .collect();
    let file = write_file(dir.path(), "pipeline.yaml", &yaml);
    let out = drover()
        .cli(&s.url, &["group", "run", file.to_str().unwrap(), "--wait"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("COMPLETED"), "{out:?}");
    let spans = trace.spans();
    assert_eq!(trace.order(), ["first", "second", "third"]);
    assert!(!overlaps(&spans[0], &spans[1]) && !overlaps(&spans[1], &spans[2]));
}

#[tokio::test]
async fn e2e_group_02_stop_on_failure_skips_the_rest() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let _w = s.worker(dir.path(), "w", None, &[]).await;
    let trace = Trace::new(dir.path());
    let json = serde_json::json!({
        "name": "stops",
        "jobs": [
            { "name": "one", "command": trace.command("one", 0.0) },
            { "name": "two", "command": "exit 4", "max_attempts": 2 },
            { "name": "three", "command": trace.command("three", 0.0) },
        ]
    });
    let file = write_file(dir.path(), "g.json", &json.to_string());
    let out = drover()
        .cli(
            &s.url,
            &[
                "group",
                "run",
                file.to_str().unwrap(),
                "--wait",
                "-o",
                "json",
            ],
        )
        .await;
    assert_eq!(out.code, 1, "a PARTIAL group exits 1: {out:?}");
    let view: drover_client::records::GroupView = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(view.group.state, GroupState::Partial);
    let states: Vec<JobState> = view.jobs.iter().map(|j| j.state).collect();
    assert_eq!(
        states,
        [JobState::Succeeded, JobState::Failed, JobState::Skipped]
    );
    assert_eq!(
        view.jobs[1].attempts, 2,
        "the failing member used all its attempts"
    );
    assert_eq!(trace.order(), ["one"], "the skipped member never ran");
}

#[tokio::test]
async fn e2e_group_03_a_group_that_succeeds_completes() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let _w = s.worker(dir.path(), "w", None, &[]).await;
    let client = s.client();
    let view = client
        .create_group("ok", &[job("echo a"), job("echo b"), job("echo c")])
        .await
        .unwrap();
    let last = view.jobs[2].id.to_string();
    wait(&client, &last).await;
    let view = client.get_group(&view.group.id.to_string()).await.unwrap();
    assert_eq!(view.group.state, GroupState::Completed);
    assert!(view.group.finished_at.is_some());
    // The group's end is decided in the last member's transaction: it is never later.
    assert_eq!(view.group.finished_at, view.jobs[2].finished_at);
}

#[tokio::test]
async fn dependencies_form_a_dag_end_to_end() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let _w = s.worker(dir.path(), "w", None, &["--slots", "4"]).await;
    let client = s.client();
    let trace = Trace::new(dir.path());
    let a = submit(&client, &job(&trace.command("a", 0.2))).await;
    let b = submit(&client, &job(&trace.command("b", 0.2))).await;
    let mut c = job(&trace.command("c", 0.0));
    c.depends_on = vec![a.parse().unwrap(), b.parse().unwrap()];
    let c = submit(&client, &c).await;
    let mut doomed = job("exit 1");
    doomed.max_attempts = Some(1);
    let doomed = submit(&client, &doomed).await;
    let mut d = job(&trace.command("d", 0.0));
    d.depends_on = vec![doomed.parse().unwrap()];
    let d = submit(&client, &d).await;
    assert_eq!(wait(&client, &c).await.job.state, JobState::Succeeded);
    assert_eq!(wait(&client, &d).await.job.state, JobState::Skipped);
    let spans = trace.spans();
    let at = |n: &str| spans.iter().find(|s| s.name == n).cloned().unwrap();
    assert!(at("c").start >= at("a").end.unwrap() && at("c").start >= at("b").end.unwrap());
    assert!(spans.iter().all(|s| s.name != "d"));
}

#[tokio::test]
async fn idempotency_keys_return_the_first_job_end_to_end() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let d = drover();
    let args = [
        "job",
        "run",
        "--command",
        "true",
        "--idempotency-key",
        "nightly-2026-11-24",
    ];
    let first = d.cli(&s.url, &args).await;
    let second = d.cli(&s.url, &args).await;
    assert_eq!(first.stdout, second.stdout);
    assert_eq!(s.client().list_jobs(None, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn pipe_03_an_exclusive_resource_is_never_shared() {
    let dir = TestDir::new();
    let (s, _w) = ollama_node(&dir).await;
    let client = s.client();
    let trace = Trace::new(dir.path());
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            submit(
                &client,
                &needing(&trace.command(&format!("ollama{i}"), 0.3), "ollama"),
            )
            .await,
        );
    }
    for i in 0..2 {
        ids.push(submit(&client, &job(&trace.command(&format!("api{i}"), 0.5))).await);
    }
    for id in &ids {
        assert_eq!(wait(&client, id).await.job.state, JobState::Succeeded);
    }
    let spans = trace.spans();
    let local: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("ollama"))
        .collect();
    assert_eq!(local.len(), 4);
    for (i, a) in local.iter().enumerate() {
        for b in &local[i + 1..] {
            assert!(!overlaps(a, b), "{a:?} and {b:?} held ollama together");
        }
    }
    let external: Vec<&Span> = spans.iter().filter(|s| s.name.starts_with("api")).collect();
    assert!(
        external
            .iter()
            .any(|e| local.iter().any(|l| overlaps(e, l))),
        "an external job runs beside the local one"
    );
}

#[tokio::test]
async fn pipe_05_crash_during_execution_in_drover_up() {
    let dir = TestDir::new();
    let d = drover();
    let mut up = UpProc::start(&d, dir.path(), &["--lease", "2s"]).await;
    let client = up.client();
    let (id, pid) = submit_first_sleeps(&client, dir.path()).await;
    up.proc.kill9();
    assert_process_gone(pid).await;
    let up = UpProc::start(&d, dir.path(), &["--lease", "2s"]).await;
    let client = up.client();
    let view = wait(&client, &id).await;
    assert_eq!(view.job.state, JobState::Succeeded);
    assert_eq!(view.runs.len(), 2);
    let first = &view.runs[0].run;
    assert_eq!(first.state, RunState::Failed);
    // The local worker came back without the attempt, but the restart lost it: the error
    // says so as on the lease path (E2E-RECOVERY-01).
    let error = first.error.as_deref().unwrap_or("");
    assert!(
        error.starts_with("recovery: the control plane restarted")
            && error.contains("came back without"),
        "{first:?}"
    );
}

#[tokio::test]
async fn a_frozen_worker_loses_its_job_to_another() {
    let dir = TestDir::new();
    let s = short_lease_server(&dir).await;
    let client = s.client();
    let frozen = s.worker(dir.path(), "frozen", None, &[]).await;
    WorkerProc::wait_connected(&client, 1).await;
    let marker = dir.path().join("m");
    let id = submit(
        &client,
        &job(&format!(
            "if [ -e {m} ]; then echo rescued; exit 0; fi; touch {m}; sleep 300",
            m = marker.display()
        )),
    )
    .await;
    eventually("the job to run", || async { marker.exists().then_some(()) }).await;
    frozen.proc.freeze();
    let _rescuer = s.worker(dir.path(), "rescuer", None, &[]).await;
    let view = wait(&client, &id).await;
    assert_eq!(view.job.state, JobState::Succeeded);
    assert!(
        view.runs[0]
            .run
            .error
            .as_deref()
            .unwrap_or("")
            .starts_with("worker lost")
    );
    let logs = client.job_logs(&id, None).await.unwrap();
    assert_eq!(logs[0].text, "rescued");
    frozen.proc.thaw();
}

/// 500 jobs with mixed outcomes; the control plane is killed three times and a worker once.
/// At the end every job is final in the state its command dictates, attempts stay within
/// max_attempts, no two attempts of a job overlapped, and every ended run was delivered to
/// the webhook at least once.
#[tokio::test]
async fn crash_soak_500_jobs_three_control_plane_kills_and_a_worker_kill() {
    let dir = TestDir::new();
    let d = drover();
    let receiver = WebhookReceiver::start(0).await;
    let mut s = ServerProc::start(
        &d,
        dir.path(),
        ServerOptions {
            lease: Duration::from_secs(4),
            backoff_base: Duration::from_millis(50),
            extra: vec!["--webhook-backoff".into(), "100ms".into()],
            ..Default::default()
        },
    )
    .await;
    let client = s.client();
    client
        .add_webhook(&receiver.url, &[], Some("soak-secret"))
        .await
        .unwrap();
    let mut w1 = s.worker(dir.path(), "w1", None, &["--slots", "4"]).await;
    let _w2 = s.worker(dir.path(), "w2", None, &["--slots", "4"]).await;
    let trace = dir.path().join("trace");
    let markers = dir.path().join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    let mut expected: BTreeMap<String, (JobState, u32)> = BTreeMap::new();
    for i in 0..500 {
        let record = |body: &str| {
            format!(
                "echo \"$DROVER_JOB_ID $DROVER_ATTEMPT start $(date +%s%N)\" >> {t}; {body}; rc=$?; echo \"$DROVER_JOB_ID $DROVER_ATTEMPT end $(date +%s%N)\" >> {t}; exit $rc",
                t = trace.display()
            )
        };
        let (spec, want) = match i % 4 {
            0 => (job(&record("true")), JobState::Succeeded),
            1 => {
                let m = markers.join(i.to_string());
                (
                    job(&record(&format!(
                        "if [ -e {m} ]; then true; else touch {m}; false; fi",
                        m = m.display()
                    ))),
                    JobState::Succeeded,
                )
            }
            2 => {
                let mut s = job(&record("false"));
                s.max_attempts = Some(2);
                (s, JobState::Failed)
            }
            _ => {
                let mut s = job("exec sleep 5");
                s.timeout_ms = Some(200);
                s.max_attempts = Some(1);
                (s, JobState::TimedOut)
            }
        };
        let max = spec.max_attempts.unwrap_or(4);
        let id = submit(&client, &spec).await;
        expected.insert(id, (want, max));
        if i == 120 || i == 260 || i == 400 {
            s.restart().await;
        }
        if i == 330 {
            w1.proc.kill9();
        }
    }
    let client = s.client();
    // The killed worker's attempts come back through lease expiry; the rest finish.
    for (id, (want, max)) in &expected {
        let view = wait(&client, id).await;
        let job = &view.job;
        if job.state != *want {
            // An attempt whose worker was killed, or did not reconnect within the lease after
            // a restart, is failed; the retry policy then decides, and a job with no
            // attempts left stays FAILED.
            let lost = view.runs.iter().any(|r| {
                let e = r.run.error.as_deref().unwrap_or("");
                e.contains("worker lost") || e.starts_with("recovery:")
            });
            assert!(
                lost && job.state == JobState::Failed,
                "job {id}: {:?} (want {want:?}) {:#?}",
                job.state,
                view.runs
            );
        }
        assert!(
            job.attempts <= *max,
            "job {id} ran {} times, max {max}",
            job.attempts
        );
        assert_eq!(job.attempts as usize, view.runs.len());
    }
    // No two attempts of one job overlapped.
    let text = std::fs::read_to_string(&trace).unwrap_or_default();
    let mut spans: BTreeMap<String, Vec<(u128, u128)>> = BTreeMap::new();
    let mut open: BTreeMap<(String, String), u128> = BTreeMap::new();
    for line in text.lines() {
        let p: Vec<&str> = line.split_whitespace().collect();
        let [job, attempt, kind, ns] = p[..] else {
            continue;
        };
        let ns: u128 = ns.parse().unwrap_or(0);
        match kind {
            "start" => {
                open.insert((job.into(), attempt.into()), ns);
            }
            _ => {
                if let Some(start) = open.remove(&(job.to_string(), attempt.to_string())) {
                    spans.entry(job.into()).or_default().push((start, ns));
                }
            }
        }
    }
    for (job, mut list) in spans {
        list.sort();
        for pair in list.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "attempts of job {job} overlapped: {list:?}"
            );
        }
    }
    // Every ended run was delivered at least once.
    let mut run_ids = Vec::new();
    for id in expected.keys() {
        for r in client.get_job(id).await.unwrap().runs {
            run_ids.push(r.run.id.to_string());
        }
    }
    receiver
        .wait_until("a delivery for every run", |got| {
            let keys: std::collections::HashSet<&str> = got
                .iter()
                .filter(|r| r.answered == 200)
                .filter_map(|r| r.headers.get("idempotency-key").map(String::as_str))
                .collect();
            run_ids.iter().all(|r| keys.contains(r.as_str()))
        })
        .await;
}

#[tokio::test]
async fn a_worker_cut_off_past_its_lease_stops_its_job_before_another_runs_it() {
    cut_off_worker_stops_first(false).await;
}

/// The same with the path black-holed instead of refused: the worker's connection looks
/// open (HTTP/2 would take 20 s or more to notice), and the worker must still stop its job
/// at half a lease without word from the control plane (heartbeats are answered).
#[tokio::test]
async fn a_worker_whose_packets_are_dropped_stops_its_job_before_another_runs_it() {
    cut_off_worker_stops_first(true).await;
}

/// A worker frozen with SIGSTOP cannot fence: its watchdog (a process beside it) kills the
/// job at half a lease, before the lease lapses and the retry starts elsewhere. The retry
/// looks for the first attempt's process (a zombie of the frozen worker counts as gone).
#[tokio::test]
async fn a_frozen_workers_job_is_stopped_before_another_runs_it() {
    let dir = TestDir::new();
    let s = short_lease_server(&dir).await;
    let client = s.client();
    let frozen = s.worker(dir.path(), "frozen", None, &[]).await;
    WorkerProc::wait_connected(&client, 1).await;
    let marker = dir.path().join("m");
    let pid_file = dir.path().join("pid");
    let command = format!(
        "if [ -e {m} ]; then \
           state=$(awk '/^State:/ {{print $2}}' /proc/$(cat {p})/status 2>/dev/null); \
           if [ -n \"$state\" ] && [ \"$state\" != Z ]; then echo overlap; else echo alone; fi; \
           exit 0; \
         fi; \
         touch {m}; echo $$ > {p}; sleep 300",
        m = marker.display(),
        p = pid_file.display(),
    );
    let id = submit(&client, &job(&command)).await;
    eventually("the first attempt to start", || async {
        std::fs::read_to_string(&pid_file)
            .ok()
            .filter(|t| t.ends_with('\n'))
            .map(|_| ())
    })
    .await;
    frozen.proc.freeze();
    let _other = s.worker(dir.path(), "other", None, &[]).await;
    let view = wait(&client, &id).await;
    frozen.proc.thaw();
    assert_eq!(view.job.state, JobState::Succeeded, "{view:?}");
    assert_eq!(view.runs.len(), 2);
    let lines: Vec<String> = client
        .job_logs(&id, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(
        lines,
        ["alone"],
        "the frozen worker's attempt still ran when the retry began"
    );
}

async fn cut_off_worker_stops_first(black_hole: bool) {
    let dir = TestDir::new();
    let s = short_lease_server(&dir).await;
    let client = s.client();
    let proxy = drover_testkit::Proxy::start(&s.url).await;
    let _cut = s.worker(dir.path(), "cut", Some(&proxy.url), &[]).await;
    WorkerProc::wait_connected(&client, 1).await;
    let trace = Trace::new(dir.path());
    let marker = dir.path().join("m");
    // The first attempt records when it is stopped (SIGTERM), so overlap can be checked.
    let command = format!(
        "if [ -e {m} ]; then {again}; exit 0; fi; touch {m}; \
         trap 'echo \"first end $(date +%s%N)\" >> {t}; exit 143' TERM; \
         echo \"first start $(date +%s%N)\" >> {t}; sleep 300 & wait",
        m = marker.display(),
        t = trace.0.display(),
        again = trace.command("second", 0.0),
    );
    let id = submit(&client, &job(&command)).await;
    eventually("the first attempt to start", || async {
        trace.order().contains(&"first".to_string()).then_some(())
    })
    .await;
    if black_hole {
        proxy.black_hole();
    } else {
        proxy.cut();
    }
    let _other = s.worker(dir.path(), "other", None, &[]).await;
    let view = wait(&client, &id).await;
    assert_eq!(view.job.state, JobState::Succeeded);
    assert_eq!(view.runs.len(), 2);
    let spans = trace.spans();
    let first = spans.iter().find(|s| s.name == "first").unwrap();
    let second = spans.iter().find(|s| s.name == "second").unwrap();
    // The cut-off worker stopped its process before the retry began elsewhere.
    assert!(first.end.is_some(), "{spans:?}");
    assert!(!overlaps(first, second), "{spans:?}");
    proxy.restore();
}

#[tokio::test]
async fn jobs_no_worker_can_run_do_not_block_the_queue() {
    let dir = TestDir::new();
    let s = server(&dir).await;
    let client = s.client();
    // More unrunnable jobs than one page of the queue, all ahead of a runnable one.
    let mut gpu = job("true");
    gpu.labels.insert("gpu".into(), "h100".into());
    gpu.priority = 5;
    let specs = vec![gpu; 700];
    for spec in &specs {
        client.submit_job(spec).await.unwrap();
    }
    let runnable = submit(&client, &job("echo finally")).await;
    let _w = s.worker(dir.path(), "cpu-only", None, &[]).await;
    assert_eq!(
        wait(&client, &runnable).await.job.state,
        JobState::Succeeded
    );
}

/// The head of the queue full of jobs no worker can take (a label nobody has, at a higher
/// priority): a runnable job far behind them still runs, found by the dispatcher's walk
/// past the head, which goes on pass after pass from where it stopped.
#[tokio::test]
async fn a_runnable_job_behind_a_deep_queue_of_unrunnable_ones_still_runs() {
    use futures::StreamExt;
    let dir = TestDir::new();
    let s = server(&dir).await;
    let _w = s.worker(dir.path(), "w", None, &[]).await;
    let client = s.client();
    let mut stuck = job("true");
    stuck.priority = 10;
    stuck.labels.insert("pool".into(), "nobody-has-this".into());
    let submitted: Vec<String> = futures::stream::iter(0..1500)
        .map(|_| {
            let (client, stuck) = (client.clone(), stuck.clone());
            async move { submit(&client, &stuck).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(submitted.len(), 1500);
    let behind = submit(&client, &job("echo found")).await;
    let view = wait(&client, &behind).await;
    assert_eq!(view.job.state, JobState::Succeeded);
    let still_queued = client
        .get_job(&submitted[0])
        .await
        .expect("a stuck job")
        .job
        .state;
    assert_eq!(still_queued, JobState::Queued, "no worker has the label");
}
