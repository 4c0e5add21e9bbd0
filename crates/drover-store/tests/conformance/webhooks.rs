//! Conformance: Webhooks and their outbox.

use super::*;

pub async fn webhook_events_are_written_with_the_change(store: &dyn Store) {
    let hook = store
        .add_webhook(
            "http://127.0.0.1:9/hook",
            "s3cret",
            &["job.run.failed".into()],
        )
        .await
        .unwrap();
    let w = worker(store).await;
    let ok = store.create_job(spec("true")).await.unwrap().0;
    run_to_end(store, ok.id, w, RunOutcome::Succeeded).await;
    let mut s = spec("false");
    s.max_attempts = Some(1);
    let bad = store.create_job(s).await.unwrap().0;
    run_to_end(store, bad.id, w, RunOutcome::Failed).await;
    let due = store.due_deliveries(later(), 100, 100).await.unwrap();
    let mine: Vec<_> = due
        .iter()
        .filter(|(d, _)| d.webhook_id == hook.id)
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "only the failure matches the filter: {mine:?}"
    );
    let (d, secret) = mine[0];
    assert_eq!(secret, "s3cret");
    assert_eq!(d.event, "job.run.failed");
    assert_eq!(d.payload["job_id"], bad.id.to_string());
    assert_eq!(d.idempotency_key, d.payload["run_id"].as_str().unwrap());
    store
        .record_delivery_attempt(d.id, Some(500), Some("boom"), false, Some(later()))
        .await
        .unwrap();
    assert!(
        store
            .due_deliveries(Timestamp::now(), 100, 100)
            .await
            .unwrap()
            .iter()
            .all(|(x, _)| x.id != d.id)
    );
    store
        .record_delivery_attempt(d.id, Some(200), None, true, None)
        .await
        .unwrap();
    // A webhook with a backlog takes at most `per_webhook` rows of a page, oldest first;
    // another's rows still come.
    let busy = store
        .add_webhook("http://127.0.0.1:9/busy", "b", &["job.run.failed".into()])
        .await
        .unwrap();
    for _ in 0..5 {
        let mut s = spec("false");
        s.max_attempts = Some(1);
        let job = store.create_job(s).await.unwrap().0;
        run_to_end(store, job.id, w, RunOutcome::Failed).await;
    }
    let page = store.due_deliveries(later(), 2, 100).await.unwrap();
    let of = |hook: &drover_core::records::WebhookRecord| -> Vec<i64> {
        page.iter()
            .filter(|(x, _)| x.webhook_id == hook.id)
            .map(|(x, _)| x.id)
            .collect()
    };
    assert_eq!(of(&busy).len(), 2, "{page:?}");
    assert_eq!(of(&hook).len(), 2, "{page:?}");
    assert!(of(&busy).windows(2).all(|w| w[0] < w[1]));
    let listed = store.list_deliveries(100).await.unwrap();
    let got = listed.iter().find(|x| x.id == d.id).unwrap();
    assert_eq!(
        (got.attempts, got.state),
        (2, drover_store::DeliveryState::Delivered)
    );
}
