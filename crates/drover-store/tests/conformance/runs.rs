//! Conformance: Attempts: dispatch, reports, leases, log indexes.

use super::*;

pub async fn happy_path_writes_events_in_order(store: &dyn Store) {
    let job = store.create_job(spec("echo hi")).await.unwrap().0;
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
    assert_eq!(f.job.result, Some(serde_json::json!({"exit": 0})));
    assert_eq!(f.run.result, Some(serde_json::json!({"exit": 0})));
    assert!(f.job.finished_at.is_some());
    assert_eq!(f.run.state, RunState::Succeeded);
    let again = store
        .finish_run(a.run.id, Some(w), end(RunOutcome::Failed, 1), NO_JITTER)
        .await
        .unwrap();
    assert!(!again.changed, "a finished run must not change");
    assert_eq!(again.job.state, JobState::Succeeded);
    let types = job_event_types(store, job.id).await;
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
    let job = store.create_job(s).await.unwrap().0;
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
            .ready_jobs(Timestamp::now(), None, 10)
            .await
            .unwrap()
            .iter()
            .all(|r| r.id != job.id),
        "a job in backoff is not ready"
    );
    let ready_later = store.ready_jobs(later(), None, 10).await.unwrap();
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
    let job = store.create_job(spec("true")).await.unwrap().0;
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

pub async fn queue_order_is_priority_then_fifo(store: &dyn Store) {
    let mut ids = Vec::new();
    for prio in [0, 5, 0, 5] {
        let mut s = spec("true");
        s.priority = prio;
        ids.push(store.create_job(s).await.unwrap().0.id);
    }
    let ready: Vec<_> = store
        .ready_jobs(Timestamp::now(), None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .filter(|id| ids.contains(id))
        .collect();
    assert_eq!(ready, vec![ids[1], ids[3], ids[0], ids[2]]);
    // Pages continue where the last one stopped.
    let first = store.ready_jobs(Timestamp::now(), None, 1).await.unwrap();
    let next = store
        .ready_jobs(
            Timestamp::now(),
            Some((first[0].priority, first[0].id)),
            100,
        )
        .await
        .unwrap();
    assert!(next.iter().all(|r| r.id != first[0].id));
    assert_eq!(
        next.len() + 1,
        store
            .ready_jobs(Timestamp::now(), None, 1000)
            .await
            .unwrap()
            .len()
    );
}

pub async fn leases_expire_unless_renewed(store: &dyn Store) {
    let job = store.create_job(spec("true")).await.unwrap().0;
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
    assert_eq!(
        store
            .renew_leases(&[w, worker(store).await], later())
            .await
            .unwrap(),
        1
    );
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
    let job = store.create_job(spec("true")).await.unwrap().0;
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

pub async fn a_finished_run_is_retried_by_hand(store: &dyn Store) {
    let w = worker(store).await;
    let mut s = spec("false");
    s.max_attempts = Some(1);
    let job = store.create_job(s).await.unwrap().0;
    run_to_end(store, job.id, w, RunOutcome::Failed).await;
    let failed = store.get_job(job.id).await.unwrap();
    let first_run = failed.current_run.unwrap();
    let again = store.resubmit_run(first_run).await.unwrap();
    assert_eq!(again.state, JobState::Queued);
    let second = store
        .assign_job(job.id, w, later())
        .await
        .unwrap()
        .unwrap()
        .run;
    assert_eq!((second.attempt, second.retry_of), (2, Some(first_run)));
    assert!(matches!(
        store.resubmit_run(first_run).await.unwrap_err(),
        StoreError::Conflict(_)
    ));
}

/// A worker that starts a run before saying it took it reports both in one step: the same
/// history as an accept and a start, in one write; refused whole when either is refused.
pub async fn one_step_accepts_and_starts(store: &dyn Store) {
    let (job, cancelled) = (
        store.create_job(spec("true")).await.unwrap().0,
        store.create_job(spec("true")).await.unwrap().0,
    );
    let w = worker(store).await;
    let made = store
        .assign_jobs(&[(job.id, w), (cancelled.id, w)], later())
        .await
        .unwrap();
    let (run, cancelled_run) = (made[0].run.id, made[1].run.id);
    store.cancel_job(cancelled.id, "not wanted").await.unwrap();
    let step = |run_id| StepRequest {
        run_id,
        worker_id: w,
        step: RunStep::AcceptAndStart,
    };
    let answers = store
        .advance_runs(vec![step(run), step(cancelled_run), step(run)])
        .await
        .unwrap();
    assert_eq!(answers[0].as_ref().unwrap(), &job.id);
    assert!(
        matches!(answers[1], Err(StoreError::Conflict(_))),
        "{:?}",
        answers[1]
    );
    assert!(
        matches!(answers[2], Err(StoreError::Conflict(_))),
        "accepted and started twice: {:?}",
        answers[2]
    );
    assert_eq!(
        store.get_job(job.id).await.unwrap().state,
        JobState::Running
    );
    let stored = store.get_run(run).await.unwrap();
    assert_eq!(stored.state, RunState::Running);
    assert!(stored.started_at.is_some());
    assert_eq!(
        job_event_types(store, job.id).await,
        [
            "JobCreated",
            "JobAssigned",
            "JobAccepted",
            "JobStatusChanged"
        ]
    );
    let history = job_event_types(store, cancelled.id).await;
    assert_eq!(
        store.get_job(cancelled.id).await.unwrap().state,
        JobState::Cancelled
    );
    assert!(!history.contains(&"JobAccepted"), "{history:?}");
}
