//! Several control-plane replicas on one PostgreSQL database, behind one address. Needs the
//! test cluster of `scripts/test` (DROVER_TEST_POSTGRES_URL); fails without it under CI=true.

use crate::drover;
use drover_client::Client;
use drover_core::{JobSpec, JobState};
use drover_testkit::{
    Proxy, ServerOptions, ServerProc, TestDir, WebhookReceiver, WorkerProc, drover_client,
    eventually, postgres_database,
};
use std::time::Duration;

async fn replicas(dir: &TestDir, url: &str, n: usize) -> Vec<ServerProc> {
    let mut out = Vec::new();
    for i in 0..n {
        let options = ServerOptions {
            lease: Duration::from_secs(5),
            database_url: Some(url.to_string()),
            ..Default::default()
        };
        out.push(
            ServerProc::start_named(&drover(), dir.path(), &format!("replica{i}"), options).await,
        );
    }
    out
}

#[tokio::test]
async fn three_replicas_1000_jobs_one_replica_killed() {
    let Some(url) = postgres_database().await else {
        return;
    };
    let dir = TestDir::new();
    let mut servers = replicas(&dir, &url, 3).await;
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let balancer = Proxy::balance(&urls.iter().map(String::as_str).collect::<Vec<_>>()).await;
    // Two workers behind the one address: the balancer sends them to different replicas.
    let _w1 = servers[0]
        .worker(dir.path(), "w1", Some(&balancer.url), &["--slots", "4"])
        .await;
    WorkerProc::wait_connected(&servers[0].client(), 1).await;
    let _w2 = servers[0]
        .worker(dir.path(), "w2", Some(&balancer.url), &["--slots", "4"])
        .await;
    WorkerProc::wait_connected(&servers[0].client(), 2).await;
    let clients: Vec<Client> = servers.iter().map(|s| s.client()).collect();
    let receiver = WebhookReceiver::start(0).await;
    clients[0]
        .add_webhook(&receiver.url, &["job.run.completed".into()], None)
        .await
        .unwrap();
    let spec = JobSpec {
        command: Some("true".into()),
        ..Default::default()
    };
    let mut ids = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..1000 {
        let alive: Vec<&Client> = if i < 500 {
            clients.iter().collect()
        } else {
            clients[1..].iter().collect()
        };
        let client = alive[i % alive.len()];
        ids.push(
            client
                .submit_job(&spec)
                .await
                .expect("submit")
                .id
                .to_string(),
        );
        if i == 500 {
            // The replica the first worker went to dies mid-stream.
            servers[0].kill9();
        }
    }
    eprintln!("submitted in {:?}", started.elapsed());
    let client = &clients[1];
    for id in &ids {
        let view = client.wait_job(id, |_| {}).await.expect("wait");
        assert_eq!(view.job.state, JobState::Succeeded, "{:?}", view.runs);
        // Never assigned twice at once: attempts of a job follow one another.
        for pair in view.runs.windows(2) {
            let end = pair[0].run.finished_at.expect("an earlier attempt ended");
            assert!(end <= pair[1].run.assigned_at, "job {id} ran twice at once");
        }
    }
    eprintln!("all final after {:?}", started.elapsed());
    // Whichever replica held the delivery duty, every completion was delivered.
    receiver
        .wait_until("a completion for every job", |got| {
            let jobs: std::collections::HashSet<String> = got
                .iter()
                .filter_map(|r| r.json()["job_id"].as_str().map(String::from))
                .collect();
            ids.iter().all(|id| jobs.contains(id))
        })
        .await;
    // The workers of the dead replica are back, on the others.
    eventually("both workers reattached", || async {
        let nodes = clients[2].list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.connected).count() == 2).then_some(())
    })
    .await;
    drop(servers);
}

#[tokio::test]
async fn a_job_submitted_to_one_replica_runs_on_a_worker_of_another_promptly() {
    let Some(url) = postgres_database().await else {
        return;
    };
    let dir = TestDir::new();
    let servers = replicas(&dir, &url, 2).await;
    let _w = servers[1].worker(dir.path(), "w", None, &[]).await;
    WorkerProc::wait_connected(&servers[1].client(), 1).await;
    let spec = JobSpec {
        command: Some("echo cross-replica".into()),
        ..Default::default()
    };
    let job = servers[0].client().submit_job(&spec).await.unwrap();
    let view = servers[0]
        .client()
        .wait_job(&job.id.to_string(), |_| {})
        .await
        .unwrap();
    assert_eq!(view.job.state, JobState::Succeeded);
    // Logs stored by one replica are read through the other.
    let logs = servers[0]
        .client()
        .job_logs(&job.id.to_string(), None)
        .await
        .unwrap();
    assert_eq!(logs[0].text, "cross-replica");
    // A cancel sent to one replica reaches a worker connected to the other.
    let long = JobSpec {
        command: Some("sleep 300".into()),
        ..Default::default()
    };
    let job = servers[0].client().submit_job(&long).await.unwrap();
    let id = job.id.to_string();
    eventually("the job to run", || async {
        let view = servers[0].client().get_job(&id).await.ok()?;
        (view.job.state == JobState::Running).then_some(())
    })
    .await;
    servers[0].client().cancel_job(&id).await.unwrap();
    eventually("the worker to free its slot", || async {
        let nodes = servers[1].client().list_nodes().await.ok()?;
        (nodes[0].live_runs == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn migrate_and_bad_database_urls() {
    let d = drover();
    let dir = TestDir::new();
    let out = tokio::process::Command::new(&d.bin)
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args([
            "--database-url",
            "postgres://drover:hunter2@127.0.0.1:9/none",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the database"), "{err}");
    assert!(
        !err.contains("hunter2"),
        "the password must not be printed: {err}"
    );
    let out = tokio::process::Command::new(&d.bin)
        .args(["migrate", "--database-url", "mysql://x"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("database_url"));
    let Some(url) = postgres_database().await else {
        return;
    };
    // A wrong password is told as such, without the password.
    let wrong = url.replacen("drover-test@", "not-the-password@", 1);
    assert_ne!(
        wrong, url,
        "the test cluster uses a password (scripts/test)"
    );
    let out = tokio::process::Command::new(&d.bin)
        .args(["migrate", "--database-url", &wrong])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
    // --no-migrate refuses an empty database; `drover migrate` prepares it.
    let refused = tokio::process::Command::new(&d.bin)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--no-migrate",
            "--database-url",
            &url,
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("drover migrate"));
    let out = tokio::process::Command::new(&d.bin)
        .args(["migrate", "--database-url", &url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let options = ServerOptions {
        database_url: Some(url),
        extra: vec!["--no-migrate".into()],
        ..Default::default()
    };
    let s = ServerProc::start(&d, dir.path(), options).await;
    assert!(s.client().ready().await);
}
