//! End to end through the real binary: the job scenarios of seed 003 (phases 5, 6 and 8),
//! named by their step, plus failure, timeout, cancel and reconnect behaviour.

use crate::drover;
use drover_client::FollowEvent;
use drover_client::records::{CompactLogBatch, JobView, LogEntryView};
use drover_core::{EventKind, JobSpec, JobState};
use drover_testkit::{
    Proxy, ServerOptions, ServerProc, TestDir, WorkerProc, drover_client, eventually,
    process_exists,
};
use futures::StreamExt;

struct Cluster {
    dir: TestDir,
    server: ServerProc,
    _worker: WorkerProc,
}

async fn cluster() -> Cluster {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let worker = server.worker(dir.path(), "w1", None, &[]).await;
    WorkerProc::wait_connected(&server.client(), 1).await;
    Cluster {
        dir,
        server,
        _worker: worker,
    }
}

impl Cluster {
    async fn cli(&self, args: &[&str]) -> drover_testkit::CliOutput {
        drover().cli(&self.server.url, args).await
    }

    /// `job run` as the seed writes it: prints the id, then `job wait`.
    async fn run_and_wait(&self, args: &[&str]) -> JobView {
        let mut all = vec!["job", "run"];
        all.extend_from_slice(args);
        let out = self.cli(&all).await;
        assert_eq!(out.code, 0, "{out:?}");
        let id = out.stdout.trim().to_string();
        self.server
            .client()
            .wait_job(&id, |_| {})
            .await
            .expect("wait for the job")
    }

    async fn lines(&self, id: &str) -> Vec<String> {
        self.server
            .client()
            .job_logs(id, None)
            .await
            .expect("logs")
            .into_iter()
            .map(|e| e.text)
            .collect()
    }
}

fn command(cmd: &str) -> JobSpec {
    JobSpec {
        command: Some(cmd.into()),
        max_attempts: Some(1),
        ..Default::default()
    }
}

#[tokio::test]
async fn seed003_step_5_1_job_type_1_simple_echo() {
    let c = cluster().await;
    let view = c
        .run_and_wait(&[
            "--name",
            "test-echo",
            "--command",
            "echo 'Hello from drover worker!'",
            "--timeout",
            "30",
        ])
        .await;
    assert_eq!(view.job.state, JobState::Succeeded);
    let id = view.job.id.to_string();
    let get = c.cli(&["job", "get", "--id", &id]).await;
    assert!(
        get.stdout.contains("Status:    SUCCEEDED (Status Code: 0)"),
        "{get:?}"
    );
    assert_eq!(c.lines(&id).await, vec!["Hello from drover worker!"]);
}

#[tokio::test]
async fn seed003_step_5_2_job_type_2_multi_command() {
    let c = cluster().await;
    let view = c
        .run_and_wait(&[
            "--name",
            "test-multicmd",
            "--command",
            "bash -c 'echo Step1 && sleep 1 && echo Step2 && sleep 1 && echo Step3'",
            "--timeout",
            "60",
        ])
        .await;
    assert_eq!(view.job.state, JobState::Succeeded);
    assert_eq!(
        c.lines(&view.job.id.to_string()).await,
        vec!["Step1", "Step2", "Step3"]
    );
}

/// The events of a server-sent stream that has ended: (name, data).
async fn sse_events_of(server: &ServerProc, path: &str) -> (u16, Vec<(String, String)>) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", server.url))
        .bearer_auth(drover_testkit::token_for(&server.url).expect("token"))
        .send()
        .await
        .expect("GET");
    let status = response.status().as_u16();
    let body = response.text().await.expect("body");
    let events = body
        .split("\n\n")
        .filter_map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(str::to_string))
            };
            Some((field("event: ")?, field("data: ")?))
        })
        .collect();
    (status, events)
}

#[tokio::test]
async fn a_follower_gets_the_same_entries_in_the_compact_format() {
    let c = cluster().await;
    let client = c.server.client();
    let job = client
        .submit_job(&command(
            "echo first; printf 'caf\\351\\n'; echo 'to stderr' >&2; echo last",
        ))
        .await
        .expect("submit");
    let id = job.id.to_string();
    client.wait_job(&id, |_| {}).await.expect("wait");

    let logs = format!("/v1/jobs/{id}/logs?follow=true");
    let (status, full) = sse_events_of(&c.server, &logs).await;
    assert_eq!(status, 200);
    let views: Vec<LogEntryView> = full
        .iter()
        .filter(|(name, _)| name == "entries")
        .flat_map(|(_, data)| serde_json::from_str::<Vec<LogEntryView>>(data).expect("entries"))
        .collect();
    assert_eq!(views.len(), 4, "{full:?}");

    let (status, compact) = sse_events_of(&c.server, &format!("{logs}&format=compact")).await;
    assert_eq!(status, 200);
    let batches: Vec<&String> = compact
        .iter()
        .filter(|(name, _)| name == "compact")
        .map(|(_, data)| data)
        .collect();
    assert!(
        batches.iter().all(|data| data.contains(r#""entries":[["#)),
        "entries are arrays: {batches:?}"
    );
    let compact_views: Vec<LogEntryView> = batches
        .iter()
        .flat_map(|data| {
            serde_json::from_str::<CompactLogBatch>(data)
                .expect("compact batch")
                .into_views()
        })
        .collect();
    assert_eq!(compact_views, views, "the same entries, byte for byte");
    assert!(
        compact_views.iter().any(|v| v.data.is_some()),
        "the line that is not UTF-8 keeps its exact bytes"
    );
    assert_eq!(compact.last().map(|(name, _)| name.as_str()), Some("end"));

    let refused = reqwest::Client::new()
        .get(format!("{}/v1/jobs/{id}/logs?format=compact", c.server.url))
        .bearer_auth(drover_testkit::token_for(&c.server.url).expect("token"))
        .send()
        .await
        .expect("GET");
    assert_eq!(refused.status().as_u16(), 400, "compact is for following");
    let refused: serde_json::Value = refused.json().await.expect("error body");
    assert_eq!(refused["error"]["field"], "format", "{refused}");
}

#[tokio::test]
async fn seed003_step_5_3_job_type_3_long_running_streams_while_running() {
    let c = cluster().await;
    let client = c.server.client();
    let job = client
        .submit_job(&command(
            "for i in 1 2 3 4 5; do echo Iteration $i; sleep 2; done",
        ))
        .await
        .unwrap();
    let id = job.id.to_string();
    let mut follow = Box::pin(client.follow_logs(&id, None).await.unwrap());
    let mut seen = Vec::new();
    let mut state_at_first_line = None;
    while let Some(ev) = follow.next().await {
        match ev.unwrap() {
            FollowEvent::Entry(e) => {
                if seen.is_empty() {
                    state_at_first_line = Some(client.get_job(&id).await.unwrap().job.state);
                }
                seen.push(e.text);
            }
            FollowEvent::End(job) => {
                assert_eq!(job.state, JobState::Succeeded);
                break;
            }
        }
    }
    assert_eq!(
        state_at_first_line,
        Some(JobState::Running),
        "the first line must arrive while the job runs"
    );
    let want: Vec<String> = (1..=5).map(|i| format!("Iteration {i}")).collect();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn seed003_step_5_4_job_type_4_environment_variables() {
    let c = cluster().await;
    let view = c
        .run_and_wait(&[
            "--name",
            "test-env",
            "--command",
            "bash -c 'echo MY_VAR=$MY_VAR && echo NUM_VAR=$NUM_VAR'",
            "--env",
            "MY_VAR=hello_world,NUM_VAR=42",
        ])
        .await;
    assert_eq!(view.job.state, JobState::Succeeded);
    assert_eq!(
        c.lines(&view.job.id.to_string()).await,
        vec!["MY_VAR=hello_world", "NUM_VAR=42"]
    );
}

#[tokio::test]
async fn seed003_step_5_5_job_type_5_program_with_arguments() {
    let c = cluster().await;
    let view = c
        .run_and_wait(&[
            "--name",
            "test-args",
            "--command",
            "bash",
            "--args",
            "-c 'echo Processing file test.txt && echo Done'",
            "--timeout",
            "30",
        ])
        .await;
    assert_eq!(view.job.state, JobState::Succeeded);
    assert_eq!(view.job.spec.program.as_deref(), Some("bash"));
    assert_eq!(
        c.lines(&view.job.id.to_string()).await,
        vec!["Processing file test.txt", "Done"]
    );
}

#[tokio::test]
async fn seed003_step_6_2_event_sequence_of_a_successful_job() {
    let c = cluster().await;
    let view = c.run_and_wait(&["--command", "echo ok"]).await;
    let events = c
        .server
        .client()
        .job_events(&view.job.id.to_string())
        .await
        .unwrap();
    let kinds: Vec<&EventKind> = events.iter().map(|e| &e.kind).collect();
    assert!(
        matches!(
            kinds.as_slice(),
            [
                EventKind::JobCreated { .. },
                EventKind::JobAssigned { .. },
                EventKind::JobAccepted { .. },
                EventKind::JobStatusChanged {
                    to: JobState::Running,
                    ..
                },
                EventKind::JobStatusChanged {
                    to: JobState::Succeeded,
                    ..
                },
            ]
        ),
        "{kinds:#?}"
    );
    let cli = c.cli(&["job", "events", &view.job.id.to_string()]).await;
    assert!(cli.stdout.contains("JobAccepted"), "{cli:?}");
}

#[tokio::test]
async fn seed003_step_6_3_log_file_record() {
    let c = cluster().await;
    let view = c
        .run_and_wait(&["--command", "echo one; echo two >&2; printf 'no newline'"])
        .await;
    let log = view.runs[0].log.clone().expect("a log file record");
    assert_eq!(log.entry_count, 3);
    assert!(log.size_bytes > 0);
    assert_eq!(log.gaps, 0);
    let path = log.uri.strip_prefix("file://").expect("a file:// uri");
    let size = std::fs::metadata(path).expect("the log file exists").len();
    assert_eq!(size, log.size_bytes);
    let entries: Vec<LogEntryView> = c
        .server
        .client()
        .job_logs(&view.job.id.to_string(), None)
        .await
        .unwrap();
    let got: Vec<(String, drover_client::records::LogStream)> =
        entries.into_iter().map(|e| (e.text, e.stream)).collect();
    use drover_client::records::LogStream::{Stderr, Stdout};
    assert!(got.contains(&("one".into(), Stdout)));
    assert!(got.contains(&("two".into(), Stderr)));
    assert!(got.contains(&("no newline".into(), Stdout)));
}

#[tokio::test]
async fn seed003_step_8_1_batch_of_five_jobs_all_succeed() {
    let c = cluster().await;
    let mut ids = Vec::new();
    for i in 1..=5 {
        let name = format!("batch-test-{i}");
        let cmd = format!("echo 'Batch test {i}'");
        let out = c
            .cli(&[
                "job",
                "run",
                "--name",
                &name,
                "--command",
                &cmd,
                "--timeout",
                "30",
            ])
            .await;
        assert_eq!(out.code, 0, "{out:?}");
        ids.push(out.stdout.trim().to_string());
    }
    let client = c.server.client();
    for (i, id) in ids.iter().enumerate() {
        let view = client.wait_job(id, |_| {}).await.unwrap();
        assert_eq!(view.job.state, JobState::Succeeded);
        assert_eq!(c.lines(id).await, vec![format!("Batch test {}", i + 1)]);
    }
    let listed = c.cli(&["job", "list", "--state", "succeeded"]).await;
    assert_eq!(listed.stdout.matches("SUCCEEDED").count(), 5, "{listed:?}");
}

#[tokio::test]
async fn a_batch_of_jobs_is_submitted_in_one_request_and_each_runs() {
    let c = cluster().await;
    let client = c.server.client();
    let api_field = |e: drover_client::ClientError| match e {
        drover_client::ClientError::Api { status, field, .. } => (status, field),
        other => panic!("not an API error: {other}"),
    };

    // A bad spec refuses the whole request, naming it; nothing is stored.
    let no_command = JobSpec {
        max_attempts: Some(1),
        ..Default::default()
    };
    let refused = client
        .submit_jobs(&[command("echo a"), no_command])
        .await
        .unwrap_err();
    assert_eq!(api_field(refused), (400, Some("jobs[1].command".into())));
    let empty = client.submit_jobs(&[]).await.unwrap_err();
    assert_eq!(api_field(empty), (400, Some("jobs".into())));
    let too_many = client
        .submit_jobs(&vec![command("true"); 1001])
        .await
        .unwrap_err();
    assert_eq!(api_field(too_many), (400, Some("jobs".into())));
    assert!(client.list_jobs(None, 100).await.unwrap().is_empty());

    // Each job stands alone: a repeated idempotency key names the first job, an unknown
    // dependency refuses only its own job.
    let keyed = JobSpec {
        idempotency_key: Some("batch-key".into()),
        ..command("echo keyed")
    };
    let orphan = JobSpec {
        depends_on: vec![drover_core::JobId::new()],
        ..command("echo orphan")
    };
    let results = client
        .submit_jobs(&[
            command("echo one"),
            keyed.clone(),
            keyed,
            orphan,
            command("echo two"),
        ])
        .await
        .unwrap();
    use drover_client::records::BatchResult;
    let submitted = |i: usize| match &results[i] {
        BatchResult::Submitted { job, created } => (job.id.to_string(), *created),
        BatchResult::Refused { error } => panic!("job {i} refused: {error:?}"),
    };
    assert_eq!(results.len(), 5);
    let (one, two, keyed_first, keyed_again) =
        (submitted(0), submitted(4), submitted(1), submitted(2));
    assert!(one.1 && two.1 && keyed_first.1, "{results:?}");
    assert_eq!(keyed_again, (keyed_first.0.clone(), false));
    match &results[3] {
        BatchResult::Refused { error } => {
            assert_eq!(error.field.as_deref(), Some("depends_on"), "{error:?}")
        }
        other => panic!("the orphan was stored: {other:?}"),
    }
    for (id, line) in [(&one.0, "one"), (&keyed_first.0, "keyed"), (&two.0, "two")] {
        let view = client.wait_job(id, |_| {}).await.unwrap();
        assert_eq!(view.job.state, JobState::Succeeded);
        assert_eq!(c.lines(id).await, vec![line.to_string()]);
    }
    assert_eq!(client.list_jobs(None, 100).await.unwrap().len(), 3);
}

#[tokio::test]
async fn job_submit_sends_a_file_of_specs_and_prints_their_ids() {
    let c = cluster().await;
    let file = c.dir.path().join("jobs.jsonl");
    std::fs::write(
        &file,
        "{\"command\": \"echo one\", \"max_attempts\": 1}\n\n{\"command\": \"echo two\"}\n",
    )
    .unwrap();
    let out = c.cli(&["job", "submit", file.to_str().unwrap()]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let ids: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(ids.len(), 2, "{out:?}");
    for (id, line) in ids.iter().zip(["one", "two"]) {
        let view = c.server.client().wait_job(id, |_| {}).await.unwrap();
        assert_eq!(view.job.state, JobState::Succeeded);
        assert_eq!(c.lines(id).await, vec![line.to_string()]);
    }

    // A bad spec is named by its line and field, and nothing is sent.
    std::fs::write(
        &file,
        "{\"command\": \"echo fine\"}\n{\"comand\": \"echo typo\"}\n",
    )
    .unwrap();
    let out = c.cli(&["job", "submit", file.to_str().unwrap()]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("line 2"), "{out:?}");
    std::fs::write(&file, "[{\"command\": \"echo a\"}, {\"timeout_ms\": 5}]").unwrap();
    let out = c.cli(&["job", "submit", file.to_str().unwrap()]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("job 2: command"), "{out:?}");
    assert_eq!(
        c.server.client().list_jobs(None, 100).await.unwrap().len(),
        2
    );

    // One refused alone (an unknown dependency): the rest are stored, exit 1.
    let missing = drover_core::JobId::new();
    std::fs::write(
        &file,
        format!("{{\"command\": \"echo three\"}}\n{{\"command\": \"true\", \"depends_on\": [\"{missing}\"]}}\n"),
    )
    .unwrap();
    let out = c
        .cli(&["job", "submit", file.to_str().unwrap(), "--output", "json"])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    let results: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["created"], true);
    assert_eq!(results[1]["error"]["field"], "depends_on");
    assert!(out.stderr.contains("job 2 of"), "{out:?}");
}

#[tokio::test]
async fn a_failing_command_fails_with_its_exit_code() {
    let c = cluster().await;
    let out = c
        .cli(&[
            "job",
            "run",
            "--command",
            "echo about to fail; exit 7",
            "--max-attempts",
            "1",
            "--follow",
        ])
        .await;
    assert_eq!(
        out.code, 7,
        "job run --follow exits with the job's code: {out:?}"
    );
    assert!(out.stdout.contains("about to fail"), "{out:?}");
    let jobs = c.server.client().list_jobs(None, 10).await.unwrap();
    assert_eq!(jobs[0].state, JobState::Failed);
    assert_eq!(jobs[0].exit_code, Some(7));
}

/// Starts a job that records its own pid and a background child's pid, then waits.
fn pid_recording_command(pidfile: &std::path::Path) -> String {
    format!(
        "echo $$ > {p}.tmp; sleep 300 & echo $! >> {p}.tmp; mv {p}.tmp {p}; wait",
        p = pidfile.display()
    )
}

async fn read_pids(pidfile: &std::path::Path) -> Vec<i32> {
    eventually("the job to write its pids", || async {
        let text = std::fs::read_to_string(pidfile).ok()?;
        let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (pids.len() == 2).then_some(pids)
    })
    .await
}

async fn assert_all_gone(pids: &[i32]) {
    for &pid in pids {
        eventually(&format!("process {pid} to be gone"), || async {
            (!process_exists(pid)).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn a_timeout_ends_timed_out_and_leaves_no_process_behind() {
    let c = cluster().await;
    let pidfile = c.dir.path().join("timeout.pids");
    let mut spec = command(&pid_recording_command(&pidfile));
    spec.timeout_ms = Some(1500);
    let client = c.server.client();
    let job = client.submit_job(&spec).await.unwrap();
    let pids = read_pids(&pidfile).await;
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::TimedOut);
    assert!(
        view.job
            .error
            .as_deref()
            .unwrap_or("")
            .contains("timed out"),
        "{:?}",
        view.job
    );
    assert_all_gone(&pids).await;
}

#[tokio::test]
async fn cancelling_a_running_job_kills_its_whole_process_tree() {
    let c = cluster().await;
    let pidfile = c.dir.path().join("cancel.pids");
    let client = c.server.client();
    let job = client
        .submit_job(&command(&pid_recording_command(&pidfile)))
        .await
        .unwrap();
    let id = job.id.to_string();
    let pids = read_pids(&pidfile).await;
    let out = c.cli(&["job", "cancel", &id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let view = client.wait_job(&id, |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Cancelled);
    assert_all_gone(&pids).await;
    let again = c.cli(&["job", "cancel", &id]).await;
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("already CANCELLED"), "{again:?}");
}

#[tokio::test]
async fn a_replayed_one_time_token_is_refused() {
    let dir = TestDir::new();
    let d = drover();
    let server = ServerProc::start(&d, dir.path(), ServerOptions::default()).await;
    let token = server.token().await;
    let _first = WorkerProc::start(&d, &server.url, dir.path(), "first", Some(&token), &[]);
    WorkerProc::wait_connected(&server.client(), 1).await;
    let mut second = WorkerProc::start(&d, &server.url, dir.path(), "second", Some(&token), &[]);
    let status = second.proc.wait_exit().await;
    assert!(!status.success());
    let log = second.proc.log_text();
    assert!(log.contains("already used"), "{log}");
    let nodes = server.client().list_nodes().await.unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
}

#[tokio::test]
async fn a_worker_restarted_keeps_its_identity() {
    let dir = TestDir::new();
    let d = drover();
    let server = ServerProc::start(&d, dir.path(), ServerOptions::default()).await;
    let client = server.client();
    let mut worker = server.worker(dir.path(), "w", None, &[]).await;
    WorkerProc::wait_connected(&client, 1).await;
    worker.proc.kill9();
    // A job dispatched to the dead stream before the server sees it close is a lost
    // attempt (flow 1); this test is about the identity, so it waits for the close.
    eventually("the server to see the killed worker gone", || async {
        let nodes = client.list_nodes().await.ok()?;
        nodes.iter().all(|n| !n.connected).then_some(())
    })
    .await;
    // No token this time: the stored credential is enough.
    let _again = WorkerProc::start(&d, &server.url, dir.path(), "w", None, &[]);
    WorkerProc::wait_connected(&client, 1).await;
    let job = client.submit_job(&command("echo back")).await.unwrap();
    let view = client.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded);
    assert_eq!(client.list_nodes().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_worker_cut_off_and_reconnected_loses_no_log_entry() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let client = server.client();
    let proxy = Proxy::start(&server.url).await;
    let _worker = server.worker(dir.path(), "w", Some(&proxy.url), &[]).await;
    WorkerProc::wait_connected(&client, 1).await;
    let job = client
        .submit_job(&command(
            "for i in $(seq 1 400); do echo line $i; sleep 0.01; done",
        ))
        .await
        .unwrap();
    let id = job.id.to_string();
    // Cut the path once some lines are stored, while the job keeps printing.
    eventually("some lines to be stored", || async {
        let n = client.job_logs(&id, None).await.ok()?.len();
        (n >= 20).then_some(())
    })
    .await;
    proxy.cut();
    eventually("the server to see the worker gone", || async {
        let nodes = client.list_nodes().await.ok()?;
        nodes.iter().all(|n| !n.connected).then_some(())
    })
    .await;
    proxy.restore();
    let view = client.wait_job(&id, |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded, "{:?}", view.job);
    assert_eq!(view.runs.len(), 1, "the run must carry on, not be retried");
    let lines: Vec<String> = client
        .job_logs(&id, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    let want: Vec<String> = (1..=400).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want);
    assert_eq!(view.runs[0].log.as_ref().map(|l| l.gaps), Some(0));
}

#[tokio::test]
async fn the_control_plane_killed_keeps_queued_and_finished_jobs() {
    let dir = TestDir::new();
    let d = drover();
    let mut server = ServerProc::start(&d, dir.path(), ServerOptions::default()).await;
    let client = server.client();
    let done = client.submit_job(&command("echo before")).await.unwrap();
    let _worker = server.worker(dir.path(), "w", None, &[]).await;
    client.wait_job(&done.id.to_string(), |_| {}).await.unwrap();
    server.restart().await;
    let client = server.client();
    let view = client.get_job(&done.id.to_string()).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded);
    // The worker reconnects to the restarted control plane and takes new work.
    let after = client.submit_job(&command("echo after")).await.unwrap();
    let view = client
        .wait_job(&after.id.to_string(), |_| {})
        .await
        .unwrap();
    assert_eq!(view.job.state, JobState::Succeeded);
}

#[tokio::test]
async fn drover_up_runs_a_job_in_one_command() {
    let dir = TestDir::new();
    let d = drover();
    let up = drover_testkit::UpProc::start(&d, dir.path(), &[]).await;
    let out = d
        .cli(
            &up.url,
            &[
                "job",
                "run",
                "--command",
                "echo hello from drover",
                "--follow",
            ],
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "hello from drover\n");
    let nodes = d.cli(&up.url, &["node", "list", "--output", "json"]).await;
    let nodes: serde_json::Value = serde_json::from_str(&nodes.stdout).unwrap();
    assert_eq!(nodes.as_array().map(Vec::len), Some(1));
    assert!(up.data_dir.join("drover.db").exists());
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let c = cluster().await;
    c.run_and_wait(&["--command", "true"]).await;
    let http = reqwest_get(&format!("{}/healthz", c.server.url)).await;
    assert_eq!(http.0, 200);
    assert_eq!(
        reqwest_get(&format!("{}/readyz", c.server.url)).await.0,
        200
    );
    let (status, body) = reqwest_get(&format!("{}/metrics", c.server.url)).await;
    assert_eq!(status, 200);
    assert!(body.contains("drover_jobs_submitted_total 1"), "{body}");
    assert!(body.contains("drover_workers_connected 1"), "{body}");
}

async fn reqwest_get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("GET");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test]
async fn the_grpc_job_service_health_and_reflection_answer() {
    use drover_proto::v1::job_service_client::JobServiceClient;
    let c = cluster().await;
    let channel = tonic::transport::Endpoint::from_shared(c.server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut anonymous = JobServiceClient::new(channel.clone());
    let refused = anonymous
        .list_jobs(drover_proto::v1::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", c.server.token).parse().unwrap();
    let mut jobs =
        JobServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
    let spec = drover_proto::v1::JobSpec {
        command: Some("echo over grpc".into()),
        max_attempts: 1,
        ..Default::default()
    };
    let job = jobs
        .submit_job(drover_proto::v1::SubmitJobRequest { spec: Some(spec) })
        .await
        .unwrap()
        .into_inner();
    let view = c.server.client().wait_job(&job.id, |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded);
    let got = jobs
        .get_job(drover_proto::v1::GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, "SUCCEEDED");
    let bad = jobs
        .get_job(drover_proto::v1::GetJobRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let empty = jobs
        .submit_job(drover_proto::v1::SubmitJobRequest {
            spec: Some(drover_proto::v1::JobSpec {
                command: Some(" ".into()),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    assert!(empty.message().starts_with("command:"), "{empty:?}");

    // Many at once: one result per job, or the whole call refused naming the bad one.
    let echo = |text: &str| drover_proto::v1::JobSpec {
        command: Some(format!("echo {text}")),
        max_attempts: 1,
        ..Default::default()
    };
    let refused = jobs
        .submit_jobs(drover_proto::v1::SubmitJobsRequest {
            jobs: vec![echo("a"), drover_proto::v1::JobSpec::default()],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("jobs[1].command"),
        "{refused:?}"
    );
    let orphan = drover_proto::v1::JobSpec {
        depends_on: vec![drover_core::JobId::new().to_string()],
        ..echo("orphan")
    };
    let results = jobs
        .submit_jobs(drover_proto::v1::SubmitJobsRequest {
            jobs: vec![echo("first"), orphan, echo("second")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 3);
    assert!(results[1].job.is_none() && results[1].error.starts_with("depends_on"));
    for (result, line) in [(&results[0], "first"), (&results[2], "second")] {
        let id = &result.job.as_ref().expect("stored").id;
        assert!(result.created && result.error.is_empty());
        let view = c.server.client().wait_job(id, |_| {}).await.unwrap();
        assert_eq!(view.job.state, JobState::Succeeded);
        assert_eq!(c.lines(id).await, vec![line.to_string()]);
    }

    let channel = tonic::transport::Endpoint::from_shared(c.server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "drover.v1.JobService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// The services a reflection service of one version lists (the two versions' types are
/// alike but distinct).
macro_rules! reflected_services {
    ($version:ident, $channel:expr) => {{
        use futures::StreamExt;
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new($channel)
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.next().await.expect("an answer").unwrap();
        match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("not a service list: {other:?}"),
        }
    }};
}

/// Reflection answers in both of its versions (grpcurl 1.8 and grpcio-reflection ask
/// v1alpha) and lists every service, the health service included.
#[tokio::test]
async fn grpc_reflection_answers_v1_and_v1alpha_with_every_service() {
    let c = cluster().await;
    let channel = tonic::transport::Endpoint::from_shared(c.server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let v1alpha = reflected_services!(v1alpha, channel.clone());
    let v1 = reflected_services!(v1, channel);
    for name in [
        "drover.v1.JobService",
        "drover.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            v1alpha.iter().any(|n| n == name),
            "v1alpha lacks {name}: {v1alpha:?}"
        );
        assert!(v1.iter().any(|n| n == name), "v1 lacks {name}: {v1:?}");
    }
}
