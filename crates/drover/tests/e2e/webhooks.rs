//! The webhook scenarios of seed 002 (E2E-WEBHOOK-0x), each a test named by its ID, through
//! the real binary and a real HTTP receiver started by the test.

use crate::drover;
use crate::scheduler::{job, submit, wait};
use drover_client::records::DeliveryState;
use drover_testkit::{
    ServerOptions, ServerProc, TestDir, WebhookReceiver, WorkerProc, drover_client, eventually,
};

fn verify_signature(secret: &str, received: &drover_testkit::Received) {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&received.body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(received.headers.get("x-drover-signature"), Some(&want));
}

async fn with_webhook(
    dir: &TestDir,
    receiver: &WebhookReceiver,
    events: &str,
) -> (ServerProc, WorkerProc) {
    let s = ServerProc::start(
        &drover(),
        dir.path(),
        ServerOptions {
            extra: vec!["--webhook-backoff".into(), "100ms".into()],
            ..Default::default()
        },
    )
    .await;
    let out = drover()
        .cli(
            &s.url,
            &[
                "webhook",
                "add",
                &receiver.url,
                "--events",
                events,
                "--secret",
                "top-secret-1",
            ],
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !out.stdout.contains("top-secret-1") && !out.stderr.contains("top-secret-1"),
        "a secret the user chose is not echoed: {out:?}"
    );
    let w = s.worker(dir.path(), "w", None, &[]).await;
    (s, w)
}

#[tokio::test]
async fn e2e_webhook_01_completed_schema() {
    let dir = TestDir::new();
    let receiver = WebhookReceiver::start(0).await;
    let (s, _w) = with_webhook(&dir, &receiver, "job.run.completed").await;
    let client = s.client();
    let id = submit(&client, &job("echo fine")).await;
    let view = wait(&client, &id).await;
    let got = receiver
        .wait_until("one completion", |r| !r.is_empty())
        .await;
    let body = got[0].json();
    assert_eq!(body["event"], "job.run.completed");
    assert_eq!(body["job_id"], id);
    assert_eq!(body["run_id"], view.runs[0].run.id.to_string());
    assert_eq!(body["state"], "SUCCEEDED");
    assert_eq!(body["exit_code"], 0);
    assert_eq!(body["attempt"], 1);
    assert_eq!(
        got[0].headers.get("x-drover-event").map(String::as_str),
        Some("job.run.completed")
    );
    verify_signature("top-secret-1", &got[0]);
}

#[tokio::test]
async fn e2e_webhook_02_failed_includes_the_error() {
    let dir = TestDir::new();
    let receiver = WebhookReceiver::start(0).await;
    let (s, _w) = with_webhook(&dir, &receiver, "job.run.failed").await;
    let client = s.client();
    let mut spec = job("exit 5");
    spec.max_attempts = Some(1);
    let id = submit(&client, &spec).await;
    wait(&client, &id).await;
    let got = receiver.wait_until("one failure", |r| !r.is_empty()).await;
    let body = got[0].json();
    assert_eq!(body["event"], "job.run.failed");
    assert_eq!(body["exit_code"], 5);
    assert_eq!(body["error"], "exited with code 5");
    assert_eq!(body["will_retry"], false);
    verify_signature("top-secret-1", &got[0]);
}

#[tokio::test]
async fn e2e_webhook_03_skipped_group_members() {
    let dir = TestDir::new();
    let receiver = WebhookReceiver::start(0).await;
    let (s, _w) = with_webhook(&dir, &receiver, "job.run.failed,job.run.skipped").await;
    let client = s.client();
    let mut failing = job("exit 2");
    failing.max_attempts = Some(1);
    let view = client
        .create_group("g", &[failing, job("echo never"), job("echo never")])
        .await
        .unwrap();
    let got = receiver
        .wait_until("a failure and two skips", |r| r.len() >= 3)
        .await;
    // Deliveries travel concurrently; their ids tell the order the events were written in.
    let mut got = got;
    got.sort_by_key(|r| {
        r.headers
            .get("x-drover-delivery")
            .and_then(|d| d.parse::<i64>().ok())
    });
    let events: Vec<String> = got
        .iter()
        .map(|r| r.json()["event"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        events,
        ["job.run.failed", "job.run.skipped", "job.run.skipped"]
    );
    let skipped: Vec<String> = got[1..]
        .iter()
        .map(|r| r.json()["job_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        skipped,
        [view.jobs[1].id.to_string(), view.jobs[2].id.to_string()]
    );
    assert_eq!(got[1].json()["group_id"], view.group.id.to_string());
    assert_eq!(
        got[1].json()["run_id"],
        serde_json::Value::Null,
        "a skipped job never ran"
    );
}

#[tokio::test]
async fn e2e_webhook_04_at_least_once_with_run_id_as_idempotency_key() {
    let dir = TestDir::new();
    // The receiver refuses its first two deliveries.
    let receiver = WebhookReceiver::start(2).await;
    let (mut s, _w) = with_webhook(&dir, &receiver, "job.run.completed").await;
    let client = s.client();
    let id = submit(&client, &job("true")).await;
    let run_id = wait(&client, &id).await.runs[0].run.id.to_string();
    let got = receiver
        .wait_until("a delivery answered 200", |r| {
            r.iter().any(|x| x.answered == 200)
        })
        .await;
    assert_eq!(got.len(), 3, "two refused, then delivered");
    for r in &got {
        assert_eq!(r.headers.get("idempotency-key"), Some(&run_id));
        assert_eq!(r.json()["run_id"], run_id);
    }
    let delivery = eventually("the delivery to be recorded", || async {
        let list = client.list_deliveries(10).await.ok()?;
        list.into_iter()
            .find(|d| d.state == DeliveryState::Delivered)
    })
    .await;
    assert_eq!(delivery.attempts, 3);
    assert_eq!(delivery.last_status, Some(200));

    // A receiver that is down when the event is committed, and a control plane killed
    // before it could deliver: delivered after the restart.
    let down = WebhookReceiver::start(0).await;
    let addr = down
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/hook")
        .to_string();
    drop(down);
    let hook_url = format!("http://{addr}/hook");
    let out = drover()
        .cli(
            &s.url,
            &["webhook", "add", &hook_url, "--events", "job.run.completed"],
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = submit(&client, &job("true")).await;
    let run_id = wait(&client, &id).await.runs[0].run.id.to_string();
    s.restart().await;
    let back = WebhookReceiver::start_on(&addr, 0).await;
    let got = back
        .wait_until("the delivery after the restart", |r| !r.is_empty())
        .await;
    assert_eq!(got[0].headers.get("idempotency-key"), Some(&run_id));
}
