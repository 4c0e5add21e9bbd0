//! The store conformance suite: every engine runs these same checks.

use drover_core::{Capabilities, JobSpec, JobState, RunOutcome, RunState, Timestamp, WorkerId};
use drover_store::{LogIndex, RetrySettings, RunEnd, Store, StoreError};
use std::time::Duration;

const NO_JITTER: RetrySettings = RetrySettings {
    default_backoff_base: Duration::from_secs(10),
    jitter: 0.0,
};

fn spec(command: &str) -> JobSpec {
    JobSpec {
        command: Some(command.into()),
        ..Default::default()
    }
    .validated()
    .expect("valid spec")
}

fn end(outcome: RunOutcome, exit_code: i32) -> RunEnd {
    RunEnd {
        outcome,
        exit_code: Some(exit_code),
        error: None,
    }
}

fn later() -> Timestamp {
    Timestamp::now().plus(Duration::from_secs(60))
}

async fn worker(store: &dyn Store) -> WorkerId {
    let token = store
        .create_join_token(Duration::from_secs(60))
        .await
        .unwrap();
    let (w, _) = store
        .register_worker(&token.token, "w", &Capabilities::default())
        .await
        .unwrap();
    w.id
}

pub async fn happy_path_writes_events_in_order(store: &dyn Store) {
    let job = store.create_job(spec("echo hi")).await.unwrap();
    assert_eq!(job.state, JobState::Queued);
    let w = worker(store).await;
    let a = store
        .assign_job(job.id, w, later())
        .await
        .unwrap()
        .expect("assigned");
    assert_eq!(a.job.state, JobState::Assigned);
    assert_eq!(a.run.attempt, 1);
    assert!(
        store
            .assign_job(job.id, w, later())
            .await
            .unwrap()
            .is_none(),
        "assigned twice"
    );
    store.accept_run(a.run.id, w).await.unwrap();
    store.start_run(a.run.id, w).await.unwrap();
    let f = store
        .finish_run(a.run.id, Some(w), end(RunOutcome::Succeeded, 0), NO_JITTER)
        .await
        .unwrap();
    assert!(f.changed);
    assert_eq!(f.job.state, JobState::Succeeded);
    assert_eq!(f.job.exit_code, Some(0));
    assert!(f.job.finished_at.is_some());
    assert_eq!(f.run.state, RunState::Succeeded);
    let again = store
        .finish_run(a.run.id, Some(w), end(RunOutcome::Failed, 1), NO_JITTER)
        .await
        .unwrap();
    assert!(!again.changed, "a finished run must not change");
    assert_eq!(again.job.state, JobState::Succeeded);
    let types: Vec<String> = store
        .job_events(job.id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind.type_name().to_string())
        .collect();
    assert_eq!(
        types,
        [
            "JobCreated",
            "JobAssigned",
            "JobAccepted",
            "JobStatusChanged",
            "JobStatusChanged"
        ]
    );
}

pub async fn failures_retry_with_backoff_and_chain_runs(store: &dyn Store) {
    let mut s = spec("false");
    s.max_attempts = Some(2);
    let job = store.create_job(s).await.unwrap();
    let w = worker(store).await;
    let first = store
        .assign_job(job.id, w, later())
        .await
        .unwrap()
        .unwrap()
        .run;
    store.start_run(first.id, w).await.unwrap();
    let f = store
        .finish_run(first.id, Some(w), end(RunOutcome::Failed, 3), NO_JITTER)
        .await
        .unwrap();
    assert_eq!(f.job.state, JobState::Queued);
    assert!(f.job.not_before > Timestamp::now().plus(Duration::from_secs(4)));
    assert!(
        store
            .ready_jobs(Timestamp::now(), 10)
            .await
            .unwrap()
            .iter()
            .all(|r| r.id != job.id),
        "a job in backoff is not ready"
    );
    let ready_later = store.ready_jobs(later(), 10).await.unwrap();
    assert!(ready_later.iter().any(|r| r.id == job.id));
    let second = store
        .assign_job(job.id, w, later())
        .await
        .unwrap()
        .unwrap()
        .run;
    assert_eq!(second.attempt, 2);
    assert_eq!(second.retry_of, Some(first.id));
    store.start_run(second.id, w).await.unwrap();
    let f = store
        .finish_run(second.id, Some(w), end(RunOutcome::TimedOut, -1), NO_JITTER)
        .await
        .unwrap();
    assert_eq!(f.job.state, JobState::TimedOut, "attempts are used up");
    assert_eq!(store.job_runs(job.id).await.unwrap().len(), 2);
}

pub async fn a_worker_ends_only_its_own_runs(store: &dyn Store) {
    let job = store.create_job(spec("true")).await.unwrap();
    let (w, other) = (worker(store).await, worker(store).await);
    let run = store
        .assign_job(job.id, w, later())
        .await
        .unwrap()
        .unwrap()
        .run;
    let err = store
        .finish_run(
            run.id,
            Some(other),
            end(RunOutcome::Succeeded, 0),
            NO_JITTER,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotYourRun { .. }), "{err}");
    assert!(matches!(
        store.start_run(run.id, other).await.unwrap_err(),
        StoreError::NotYourRun { .. }
    ));
    assert_eq!(
        store.get_job(job.id).await.unwrap().state,
        JobState::Assigned
    );
}

pub async fn cancellation(store: &dyn Store) {
    let queued = store.create_job(spec("sleep 100")).await.unwrap();
    let c = store.cancel_job(queued.id, "by test").await.unwrap();
    assert_eq!(c.job.state, JobState::Cancelled);
    assert!(c.run.is_none());
    assert!(matches!(
        store.cancel_job(queued.id, "again").await.unwrap_err(),
        StoreError::Conflict(_)
    ));
    let running = store.create_job(spec("sleep 100")).await.unwrap();
    let w = worker(store).await;
    let run = store
        .assign_job(running.id, w, later())
        .await
        .unwrap()
        .unwrap()
        .run;
    store.start_run(run.id, w).await.unwrap();
    let c = store.cancel_job(running.id, "by test").await.unwrap();
    assert_eq!(c.job.state, JobState::Cancelled);
    assert_eq!(c.run.expect("live run").state, RunState::Cancelled);
    // The worker's late report changes nothing.
    let f = store
        .finish_run(run.id, Some(w), end(RunOutcome::Cancelled, -15), NO_JITTER)
        .await
        .unwrap();
    assert!(!f.changed);
    assert_eq!(f.job.state, JobState::Cancelled);
}

pub async fn queue_order_is_priority_then_fifo(store: &dyn Store) {
    let mut ids = Vec::new();
    for prio in [0, 5, 0, 5] {
        let mut s = spec("true");
        s.priority = prio;
        ids.push(store.create_job(s).await.unwrap().id);
    }
    let ready: Vec<_> = store
        .ready_jobs(Timestamp::now(), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .filter(|id| ids.contains(id))
        .collect();
    assert_eq!(ready, vec![ids[1], ids[3], ids[0], ids[2]]);
}

pub async fn join_tokens_work_once(store: &dyn Store) {
    let token = store
        .create_join_token(Duration::from_secs(60))
        .await
        .unwrap();
    let caps = Capabilities::default();
    let (w, credential) = store
        .register_worker(&token.token, "a", &caps)
        .await
        .unwrap();
    let err = store
        .register_worker(&token.token, "b", &caps)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::TokenRefused(_)), "{err}");
    assert!(matches!(
        store
            .register_worker("drover-join-bogus", "c", &caps)
            .await
            .unwrap_err(),
        StoreError::TokenRefused(_)
    ));
    let expired = store.create_join_token(Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(matches!(
        store
            .register_worker(&expired.token, "d", &caps)
            .await
            .unwrap_err(),
        StoreError::TokenRefused(_)
    ));
    assert_eq!(
        store.authenticate_worker(&credential).await.unwrap().id,
        w.id
    );
    let forged = format!("{}.{}", w.id, "0".repeat(64));
    assert!(matches!(
        store.authenticate_worker(&forged).await.unwrap_err(),
        StoreError::Unauthenticated
    ));
}

pub async fn leases_expire_unless_renewed(store: &dyn Store) {
    let job = store.create_job(spec("true")).await.unwrap();
    let w = worker(store).await;
    let soon = Timestamp::now().plus(Duration::from_millis(1));
    let run = store
        .assign_job(job.id, w, soon)
        .await
        .unwrap()
        .unwrap()
        .run;
    let probe = Timestamp::now().plus(Duration::from_secs(1));
    assert!(
        store
            .expired_runs(probe)
            .await
            .unwrap()
            .iter()
            .any(|r| r.id == run.id)
    );
    assert_eq!(store.renew_leases(w, later()).await.unwrap(), 1);
    assert!(
        store
            .expired_runs(probe)
            .await
            .unwrap()
            .iter()
            .all(|r| r.id != run.id)
    );
    assert_eq!(store.live_runs_of(w).await.unwrap().len(), 1);
}

pub async fn log_index_round_trips(store: &dyn Store) {
    let job = store.create_job(spec("true")).await.unwrap();
    let w = worker(store).await;
    let run = store
        .assign_job(job.id, w, later())
        .await
        .unwrap()
        .unwrap()
        .run;
    assert_eq!(store.log_index(run.id).await.unwrap(), None);
    let mut index = LogIndex {
        run_id: run.id,
        uri: "file:///tmp/x.log".into(),
        size_bytes: 10,
        entry_count: 1,
        last_seq: 1,
        gaps: 0,
    };
    store.put_log_index(&index).await.unwrap();
    index.size_bytes = 20;
    index.entry_count = 2;
    index.last_seq = 2;
    store.put_log_index(&index).await.unwrap();
    assert_eq!(store.log_index(run.id).await.unwrap(), Some(index));
}

pub async fn missing_things_are_not_found(store: &dyn Store) {
    let err = store.get_job(drover_core::JobId::new()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { kind: "job", .. }),
        "{err}"
    );
}
