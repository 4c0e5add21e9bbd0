//! Faults other than a crash of drover's own processes: the database restarted under a
//! burst, or gone for longer than a lease. The invariants are the crash soak's: every job
//! ends as its command dictates, nothing is lost, no attempt runs twice. Each test runs
//! its own PostgreSQL server (the shared test cluster must stay up for the others).

use crate::drover;
use drover_core::{JobSpec, JobState};
use drover_testkit::{
    PgCluster, ServerOptions, ServerProc, TestDir, WebhookReceiver, WorkerProc, drover_client,
    eventually,
};
use std::time::Duration;

const JOBS: usize = 800;

/// A control plane on its own PostgreSQL with a webhook for every ended run, a worker with
/// 16 slots, and a burst of short jobs submitted; returns once some have ended and others
/// are running.
async fn burst(
    dir: &TestDir,
    pg: &PgCluster,
) -> (ServerProc, WorkerProc, Vec<String>, WebhookReceiver) {
    let options = ServerOptions {
        lease: Duration::from_secs(3),
        database_url: Some(pg.url.clone()),
        ..Default::default()
    };
    let server = ServerProc::start(&drover(), dir.path(), options).await;
    let receiver = WebhookReceiver::start(0).await;
    server
        .client()
        .add_webhook(&receiver.url, &["job.run.completed".to_string()], None)
        .await
        .expect("webhook");
    let worker = server
        .worker(dir.path(), "w", None, &["--slots", "16"])
        .await;
    let client = server.client();
    WorkerProc::wait_connected(&client, 1).await;
    let spec = JobSpec {
        command: Some("echo begin; sleep 0.05; echo end".into()),
        max_attempts: Some(3),
        ..Default::default()
    };
    let mut ids = Vec::new();
    for _ in 0..JOBS / 200 {
        let answers = client
            .submit_jobs(&vec![spec.clone(); 200])
            .await
            .expect("submit a batch");
        ids.extend(answers.iter().filter_map(|a| match a {
            drover_client::records::BatchResult::Submitted { job, .. } => Some(job.id.to_string()),
            drover_client::records::BatchResult::Refused { .. } => None,
        }));
    }
    assert_eq!(ids.len(), JOBS);
    eventually("the burst to be under way", || async {
        let done = client.list_jobs(Some("SUCCEEDED"), 1000).await.ok()?.len();
        (done >= 16).then_some(())
    })
    .await;
    (server, worker, ids, receiver)
}

/// Every job succeeded with exactly one attempt and its whole output: no report was lost
/// (a lost end leaves a job RUNNING, then fails it as "worker lost" and runs it again) and
/// nothing ran twice; and every run's end reached the webhook (at least once, keyed by the
/// run id).
async fn assert_each_ran_once(
    client: &drover_client::Client,
    ids: &[String],
    receiver: &WebhookReceiver,
) {
    eventually("every job to end", || async {
        let succeeded = client.list_jobs(Some("SUCCEEDED"), 1000).await.ok()?.len();
        let live = client.list_jobs(None, 1000).await.ok()?;
        let final_count = live.iter().filter(|j| j.state.is_terminal()).count();
        (final_count == ids.len() || succeeded == ids.len()).then_some(())
    })
    .await;
    for id in ids {
        let view = client.get_job(id).await.expect("job");
        assert_eq!(
            view.job.state,
            JobState::Succeeded,
            "{id}: {:?} {:?}",
            view.job.error,
            view.runs.iter().map(|r| &r.run.error).collect::<Vec<_>>()
        );
        assert_eq!(
            view.runs.len(),
            1,
            "{id} ran more than once: {:?}",
            view.runs
        );
        let lines: Vec<String> = client
            .job_logs(id, None)
            .await
            .expect("logs")
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert_eq!(lines, ["begin", "end"], "{id}");
    }
    receiver
        .wait_until("every ended run delivered to the webhook", |got| {
            got.iter()
                .filter(|r| r.answered == 200)
                .filter_map(|r| r.headers.get("idempotency-key"))
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= ids.len()
        })
        .await;
}

/// `pg_ctl restart -m fast` in the middle of a burst: every connection of the control
/// plane drops while workers accept, start and end runs and ship their logs.
#[tokio::test]
async fn a_database_restart_during_a_burst_loses_no_report_and_runs_nothing_twice() {
    let dir = TestDir::new();
    let Some(pg) = PgCluster::start(dir.path()).await else {
        return;
    };
    let (server, _worker, ids, receiver) = burst(&dir, &pg).await;
    // Three restarts one after the other, so that accepts, starts, ends and log batches
    // are each caught in flight.
    for _ in 0..3 {
        pg.restart();
    }
    assert_each_ran_once(&server.client(), &ids, &receiver).await;
}

/// The database gone for twice a lease under a burst: callers hear 503 at once, readiness
/// says so, and when it is back every run that ended meanwhile is recorded as it ended
/// rather than failed as "worker lost" and run again.
#[tokio::test]
async fn a_database_down_for_longer_than_a_lease_loses_no_report_and_runs_nothing_twice() {
    let dir = TestDir::new();
    let Some(pg) = PgCluster::start(dir.path()).await else {
        return;
    };
    let (server, _worker, ids, receiver) = burst(&dir, &pg).await;
    pg.stop();
    let started = std::time::Instant::now();
    let http = reqwest::Client::new();
    let answer = http
        .get(format!("{}/v1/jobs", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status().as_u16(), 503);
    let body: serde_json::Value = answer.json().await.expect("json error");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    // Right after, calls are answered at once by the breaker, saying so.
    let again: serde_json::Value = http
        .get(format!("{}/v1/jobs", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json error");
    assert_eq!(again["error"]["code"], "unavailable", "{again}");
    assert!(
        again["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("a moment ago")),
        "{again}"
    );
    let ready = http
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 503);
    // The outage itself: twice the lease, counted from the stop.
    let outage = Duration::from_secs(6);
    tokio::time::sleep(outage.saturating_sub(started.elapsed())).await;
    pg.start_again();
    assert_each_ran_once(&server.client(), &ids, &receiver).await;
}

/// One webhook endpoint accepts connections and never answers; another is healthy. The
/// healthy one gets every delivery while the first still hangs: a slow endpoint holds its
/// own lane, not the delivery loop.
#[tokio::test]
async fn a_hanging_webhook_endpoint_does_not_delay_another() {
    // Accepts and holds every connection, reading nothing, answering nothing.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hanging_url = format!("http://{}/hook", hanging.local_addr().expect("addr"));
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let holder = held.clone();
    let accept = tokio::spawn(async move {
        while let Ok((socket, _)) = hanging.accept().await {
            holder.lock().expect("held").push(socket);
        }
    });
    let healthy = WebhookReceiver::start(0).await;
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let client = server.client();
    let events = vec!["job.run.completed".to_string()];
    client
        .add_webhook(&hanging_url, &events, None)
        .await
        .expect("hanging webhook");
    client
        .add_webhook(&healthy.url, &events, None)
        .await
        .expect("healthy webhook");
    let _worker = server
        .worker(dir.path(), "w", None, &["--slots", "8"])
        .await;
    WorkerProc::wait_connected(&client, 1).await;
    let jobs = 40;
    let spec = JobSpec {
        command: Some("true".into()),
        max_attempts: Some(1),
        ..Default::default()
    };
    client.submit_jobs(&vec![spec; jobs]).await.expect("submit");
    healthy
        .wait_until("every delivery to the healthy endpoint", |got| {
            got.iter().filter(|r| r.answered == 200).count() >= jobs
        })
        .await;
    let pending_to_hanging = client
        .list_deliveries(1000)
        .await
        .expect("deliveries")
        .iter()
        .filter(|d| {
            d.url == hanging_url && d.state != drover_client::records::DeliveryState::Delivered
        })
        .count();
    assert_eq!(
        pending_to_hanging, jobs,
        "the hanging endpoint got nothing through"
    );
    assert!(
        !held.lock().expect("held").is_empty(),
        "drover did try the hanging endpoint"
    );
    accept.abort();
}

/// 1,100 connections that never send a byte and 50 that send their headers a byte at a
/// time: the control plane cuts them all (first byte within 10 s, headers within 10 s) and
/// serves authenticated calls and health checks meanwhile.
#[tokio::test]
async fn idle_and_slow_connections_are_cut_and_the_api_serves_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let addr = server.url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("an idle connection"),
        );
    }
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("a slow connection");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: drover\r\n")
            .await
            .expect("write");
        slow.push(s);
    }
    // Slowloris: a header byte now and then, never the end of the headers.
    let dripping = tokio::spawn(async move {
        for _ in 0..15 {
            for s in &mut slow {
                let _ = s.write_all(b"X").await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        slow
    });
    let client = server.client();
    assert!(client.healthy().await, "/healthz under the flood");
    client
        .list_jobs(None, 10)
        .await
        .expect("an authenticated call under the flood");
    // Every idle connection is closed by the server (a read ends).
    for (i, conn) in idle.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(drover_testkit::DEADLINE, conn.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "idle connection {i} is still open: {read:?}"
        );
    }
    client
        .list_jobs(None, 10)
        .await
        .expect("an authenticated call after the flood");
    // The slow ones are closed too (with a 408 at most), never served.
    let slow = dripping.await.expect("the drip");
    for (i, mut conn) in slow.into_iter().enumerate() {
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(drover_testkit::DEADLINE, conn.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "slow connection {i} is still open");
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "slow connection {i} got {text}"
        );
    }
}
