//! The store conformance suite: every engine runs these same checks.
//! `conformance_suite!(open)` makes one test per check, each on a store `open` returns.

#[macro_export]
macro_rules! conformance_suite {
    ($open:expr) => {
        $crate::conformance_suite!(@tests $open;
            happy_path_writes_events_in_order,
            failures_retry_with_backoff_and_chain_runs,
            a_worker_ends_only_its_own_runs,
            cancellation,
            queue_order_is_priority_then_fifo,
            join_tokens_work_once,
            leases_expire_unless_renewed,
            log_index_round_trips,
            missing_things_are_not_found,
            idempotency_keys_return_the_first_job,
            groups_run_in_order_and_stop_on_failure,
            a_group_that_succeeds_completes,
            dependencies_form_a_dag,
            a_finished_run_is_retried_by_hand,
            reservations_expire,
            pending_reservations_wait_then_hold_for_their_whole_ttl,
            webhook_events_are_written_with_the_change,
            duties_are_held_by_one_holder_at_a_time,
            provisioning_is_a_recorded_workflow,
            a_given_up_provisioning_refuses_its_token,
            logins_rotate_and_a_reused_refresh_token_revokes_the_login,
            api_tokens_and_owners,
            batches_answer_each_request_and_match_single_writes,
            listing_by_state_finds_each_state_indexed_or_not,
            one_step_accepts_and_starts,
            a_join_token_registers_one_node_under_concurrent_callers,
            concurrent_rotations_of_a_refresh_token_rotate_it_once,
        );
    };
    (@tests $open:expr; $($name:ident),+ $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let Some((store, _guard)) = $open.await else { return };
            conformance::$name(&store).await;
        }
    )+};
}

use drover_core::{Capabilities, JobSpec, JobState, RunOutcome, RunState, Timestamp, WorkerId};
use drover_store::{
    LogIndex, ReservationState, RetrySettings, RunEnd, RunStep, StepRequest, Store, StoreError,
    Submission,
};
use std::time::Duration;

pub const NO_JITTER: RetrySettings = RetrySettings {
    default_backoff_base: Duration::from_secs(10),
    jitter: 0.0,
};

pub fn spec(command: &str) -> JobSpec {
    JobSpec {
        command: Some(command.into()),
        ..Default::default()
    }
    .validated()
    .expect("valid spec")
}

pub fn end(outcome: RunOutcome, exit_code: i32) -> RunEnd {
    RunEnd {
        outcome,
        exit_code: Some(exit_code),
        error: None,
        // What the run produced is kept with it and with its job.
        result: Some(serde_json::json!({"exit": exit_code})),
    }
}

pub fn later() -> Timestamp {
    Timestamp::now().plus(Duration::from_secs(60))
}

pub async fn worker(store: &dyn Store) -> WorkerId {
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

pub async fn cancellation(store: &dyn Store) {
    let queued = store.create_job(spec("sleep 100")).await.unwrap().0;
    let c = store.cancel_job(queued.id, "by test").await.unwrap();
    assert_eq!(c.job.state, JobState::Cancelled);
    assert!(c.run.is_none());
    assert!(matches!(
        store.cancel_job(queued.id, "again").await.unwrap_err(),
        StoreError::Conflict(_)
    ));
    let running = store.create_job(spec("sleep 100")).await.unwrap().0;
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
    assert!(matches!(err, StoreError::JoinTokenRefused(_)), "{err}");
    assert!(matches!(
        store
            .register_worker("drover-join-bogus", "c", &caps)
            .await
            .unwrap_err(),
        StoreError::JoinTokenRefused(_)
    ));
    let expired = store.create_join_token(Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(matches!(
        store
            .register_worker(&expired.token, "d", &caps)
            .await
            .unwrap_err(),
        StoreError::JoinTokenRefused(_)
    ));
    assert_eq!(
        store.authenticate_worker(&credential).await.unwrap().id,
        w.id
    );
    let forged = format!("{}.{}", w.id, "0".repeat(64));
    assert!(matches!(
        store.authenticate_worker(&forged).await.unwrap_err(),
        StoreError::NodeCredentialRefused
    ));
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

pub async fn missing_things_are_not_found(store: &dyn Store) {
    let err = store.get_job(drover_core::JobId::new()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { kind: "job", .. }),
        "{err}"
    );
}

async fn run_to_end(store: &dyn Store, job: drover_core::JobId, w: WorkerId, outcome: RunOutcome) {
    let run = store
        .assign_job(job, w, later())
        .await
        .unwrap()
        .expect("assignable")
        .run;
    store.start_run(run.id, w).await.unwrap();
    let code = if outcome == RunOutcome::Succeeded {
        0
    } else {
        1
    };
    store
        .finish_run(run.id, Some(w), end(outcome, code), NO_JITTER)
        .await
        .unwrap();
}

fn is_ready(ready: &[drover_store::ReadyJob], id: drover_core::JobId) -> bool {
    ready.iter().any(|r| r.id == id)
}

pub async fn idempotency_keys_return_the_first_job(store: &dyn Store) {
    let mut s = spec("true");
    s.idempotency_key = Some("order-42".into());
    let (first, created) = store.create_job(s.clone()).await.unwrap();
    assert!(created);
    let (again, created) = store.create_job(s).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, first.id);
}

pub async fn groups_run_in_order_and_stop_on_failure(store: &dyn Store) {
    let w = worker(store).await;
    let mut specs: Vec<JobSpec> = (0..3).map(|i| spec(&format!("step {i}"))).collect();
    specs[1].max_attempts = Some(1);
    let g = store.create_group("g", specs).await.unwrap();
    let ids: Vec<_> = g.jobs.iter().map(|j| j.id).collect();
    assert_eq!(g.group.state, drover_store::GroupState::Running);
    let ready = store.ready_jobs(later(), None, 100).await.unwrap();
    assert!(is_ready(&ready, ids[0]) && !is_ready(&ready, ids[1]) && !is_ready(&ready, ids[2]));
    run_to_end(store, ids[0], w, RunOutcome::Succeeded).await;
    let ready = store.ready_jobs(later(), None, 100).await.unwrap();
    assert!(is_ready(&ready, ids[1]) && !is_ready(&ready, ids[2]));
    run_to_end(store, ids[1], w, RunOutcome::Failed).await;
    let g = store.get_group(g.group.id).await.unwrap();
    let states: Vec<JobState> = g.jobs.iter().map(|j| j.state).collect();
    assert_eq!(
        states,
        [JobState::Succeeded, JobState::Failed, JobState::Skipped]
    );
    assert_eq!(g.group.state, drover_store::GroupState::Partial);
    assert!(g.group.finished_at.is_some());
}

pub async fn a_group_that_succeeds_completes(store: &dyn Store) {
    let w = worker(store).await;
    let g = store
        .create_group("ok", vec![spec("a"), spec("b")])
        .await
        .unwrap();
    for job in &g.jobs {
        run_to_end(store, job.id, w, RunOutcome::Succeeded).await;
    }
    let g = store.get_group(g.group.id).await.unwrap();
    assert_eq!(g.group.state, drover_store::GroupState::Completed);
}

pub async fn dependencies_form_a_dag(store: &dyn Store) {
    let w = worker(store).await;
    let a = store.create_job(spec("a")).await.unwrap().0;
    let b = store.create_job(spec("b")).await.unwrap().0;
    let mut c = spec("c");
    c.depends_on = vec![a.id, b.id];
    let c = store.create_job(c).await.unwrap().0;
    assert_eq!(c.waiting_on, 2);
    run_to_end(store, a.id, w, RunOutcome::Succeeded).await;
    assert!(!is_ready(
        &store.ready_jobs(later(), None, 100).await.unwrap(),
        c.id
    ));
    run_to_end(store, b.id, w, RunOutcome::Succeeded).await;
    assert!(is_ready(
        &store.ready_jobs(later(), None, 100).await.unwrap(),
        c.id
    ));
    let mut bad = spec("x");
    bad.depends_on = vec![drover_core::JobId::new()];
    assert!(matches!(
        store.create_job(bad).await.unwrap_err(),
        StoreError::Invalid {
            field: "depends_on",
            ..
        }
    ));
    // Depending on a job that already failed: skipped at once.
    let mut f = spec("false");
    f.max_attempts = Some(1);
    let f = store.create_job(f).await.unwrap().0;
    run_to_end(store, f.id, w, RunOutcome::Failed).await;
    let mut late = spec("late");
    late.depends_on = vec![f.id];
    assert_eq!(
        store.create_job(late).await.unwrap().0.state,
        JobState::Skipped
    );
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

pub async fn reservations_expire(store: &dyn Store) {
    let w = worker(store).await;
    let r = store
        .create_reservation(
            "ollama",
            1,
            w,
            Duration::from_millis(1),
            None,
            ReservationState::Active,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let active = store.live_reservations(Timestamp::now()).await.unwrap();
    assert!(active.iter().all(|a| a.id != r.id));
    assert_eq!(
        store.get_reservation(r.id).await.unwrap().state,
        ReservationState::Expired
    );
    // Read past its TTL, a reservation is expired even if no dispatch pass looked yet.
    let unseen = store
        .create_reservation(
            "ollama",
            1,
            w,
            Duration::from_millis(1),
            None,
            ReservationState::Active,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let read = store.get_reservation(unseen.id).await.unwrap();
    assert_eq!(read.state, ReservationState::Expired);
    assert_eq!(read.ended_at, Some(read.expires_at));
    assert_eq!(store.get_reservation(unseen.id).await.unwrap(), read);
    let held = store
        .create_reservation(
            "ollama",
            1,
            w,
            Duration::from_secs(60),
            None,
            ReservationState::Active,
        )
        .await
        .unwrap();
    let released = store.release_reservation(held.id).await.unwrap();
    assert_eq!(released.state, ReservationState::Released);
    let mut s = spec("true");
    s.reservation = Some(held.id);
    assert!(matches!(
        store.create_job(s).await.unwrap_err(),
        StoreError::Invalid {
            field: "reservation",
            ..
        }
    ));
}

pub async fn pending_reservations_wait_then_hold_for_their_whole_ttl(store: &dyn Store) {
    let w = worker(store).await;
    let ttl = Duration::from_secs(60);
    let r = store
        .create_reservation("ollama", 1, w, ttl, Some("ana"), ReservationState::Pending)
        .await
        .unwrap();
    assert_eq!(r.state, ReservationState::Pending);
    // Jobs may be submitted into it; they wait with it.
    let mut s = spec("true");
    s.reservation = Some(r.id);
    store.create_job_for(s, Some("ana")).await.unwrap();
    let live = store.live_reservations(Timestamp::now()).await.unwrap();
    assert_eq!(live.iter().map(|l| l.id).collect::<Vec<_>>(), vec![r.id]);
    // Activated once; the TTL counts from then.
    let later = r.created_at.plus(Duration::from_secs(5));
    assert!(store.activate_reservation(r.id, later).await.unwrap());
    assert!(!store.activate_reservation(r.id, later).await.unwrap());
    let active = store.get_reservation(r.id).await.unwrap();
    assert_eq!(active.state, ReservationState::Active);
    assert_eq!(active.expires_at, later.plus(ttl));
    // A pending one can be released, and one that waited past its TTL expires unused.
    let waiting = store
        .create_reservation("ollama", 1, w, ttl, None, ReservationState::Pending)
        .await
        .unwrap();
    assert_eq!(
        store.release_reservation(waiting.id).await.unwrap().state,
        ReservationState::Released
    );
    let stale = store
        .create_reservation(
            "ollama",
            1,
            w,
            Duration::from_millis(1),
            None,
            ReservationState::Pending,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(
        !store
            .activate_reservation(stale.id, Timestamp::now())
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_reservation(stale.id).await.unwrap().state,
        ReservationState::Expired
    );
}

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

pub async fn duties_are_held_by_one_holder_at_a_time(store: &dyn Store) {
    let ttl = Duration::from_millis(200);
    assert!(store.hold_duty("sweeper", "a", ttl).await.unwrap());
    assert!(!store.hold_duty("sweeper", "b", ttl).await.unwrap());
    assert!(
        store.hold_duty("sweeper", "a", ttl).await.unwrap(),
        "renewal"
    );
    assert!(store.hold_duty("other", "b", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        store.hold_duty("sweeper", "b", ttl).await.unwrap(),
        "taken over after the ttl"
    );
    assert!(!store.hold_duty("sweeper", "a", ttl).await.unwrap());
}

fn event_types(events: &[drover_store::EventRecord]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.type_name()).collect()
}

pub async fn provisioning_is_a_recorded_workflow(store: &impl Store) {
    let cluster = store.cluster_id().await.expect("cluster id");
    assert_eq!(store.cluster_id().await.expect("again"), cluster, "stable");
    let by = Timestamp::now().plus(Duration::from_secs(60));
    let (worker, token) = store
        .begin_provisioning("docker", "docker-1", by)
        .await
        .expect("begin");
    assert_eq!(worker.state, drover_core::WorkerState::Registering);
    assert_eq!(worker.provider.as_deref(), Some("docker"));
    assert_eq!(
        store.provided_workers("docker").await.expect("list").len(),
        1
    );
    assert!(
        store
            .provided_workers("local")
            .await
            .expect("list")
            .is_empty()
    );
    store
        .set_worker_resource(worker.id, "c0ffee")
        .await
        .expect("resource");
    let (registered, credential) = store
        .register_worker(&token.token, "in-container", &Capabilities::default())
        .await
        .expect("register the provisioned record");
    assert_eq!(
        registered.id, worker.id,
        "the token registers that very record"
    );
    assert_eq!(registered.resource_id.as_deref(), Some("c0ffee"));
    store
        .authenticate_worker(&credential)
        .await
        .expect("credential works");
    let ended = drover_core::EventKind::WorkerTerminated {
        reason: "idle".into(),
    };
    assert!(
        store
            .end_worker(worker.id, drover_core::WorkerState::Terminated, &ended)
            .await
            .expect("end")
    );
    assert!(
        !store
            .end_worker(worker.id, drover_core::WorkerState::Terminated, &ended)
            .await
            .expect("end twice"),
        "ending twice changes nothing"
    );
    assert!(matches!(
        store.authenticate_worker(&credential).await,
        Err(StoreError::NodeCredentialRefused)
    ));
    assert!(
        store
            .provided_workers("docker")
            .await
            .expect("list")
            .is_empty()
    );
    let got = store.get_worker(worker.id).await.expect("get");
    assert_eq!(got.state, drover_core::WorkerState::Terminated);
    let events = store.worker_events(worker.id).await.expect("events");
    assert_eq!(
        event_types(&events),
        vec![
            "ProvisioningStarted",
            "ProvisioningStepCompleted",
            "ProvisioningStepCompleted",
            "WorkerRegistered",
            "ProvisioningStepCompleted",
            "WorkerTerminated",
        ]
    );
}

pub async fn a_given_up_provisioning_refuses_its_token(store: &impl Store) {
    let by = Timestamp::now().plus(Duration::from_secs(60));
    let (worker, token) = store
        .begin_provisioning("local", "local-1", by)
        .await
        .expect("begin");
    let compensated = drover_core::EventKind::ProvisioningCompensated {
        reason: "never registered".into(),
        resource_id: None,
    };
    store
        .end_worker(
            worker.id,
            drover_core::WorkerState::Terminated,
            &compensated,
        )
        .await
        .expect("end");
    let refused = store
        .register_worker(&token.token, "late", &Capabilities::default())
        .await;
    assert!(
        matches!(refused, Err(StoreError::JoinTokenRefused(_))),
        "{refused:?}"
    );
}

pub async fn logins_rotate_and_a_reused_refresh_token_revokes_the_login(store: &impl Store) {
    use drover_store::Role;
    let ttl = Duration::from_secs(900);
    let alice = store
        .create_user("alice", Role::User, "hash")
        .await
        .expect("user");
    assert!(matches!(
        store.create_user("alice", Role::Admin, "h").await,
        Err(StoreError::Conflict(_))
    ));
    let first = store
        .issue_tokens(&alice.id, ttl, ttl)
        .await
        .expect("login");
    let who = store
        .authenticate_token(&first.access_token)
        .await
        .expect("access works");
    assert_eq!(who.name, "alice");
    assert!(
        store
            .authenticate_token(&first.refresh_token)
            .await
            .is_err(),
        "a refresh token is no access token"
    );
    let (_, second) = store
        .rotate_refresh(&first.refresh_token, ttl, ttl)
        .await
        .expect("rotate");
    store
        .authenticate_token(&second.access_token)
        .await
        .expect("new access works");
    // The old refresh token again: the whole login is revoked.
    assert!(matches!(
        store.rotate_refresh(&first.refresh_token, ttl, ttl).await,
        Err(StoreError::UserTokenRefused(_))
    ));
    assert!(
        store
            .authenticate_token(&second.access_token)
            .await
            .is_err()
    );
    assert!(
        store
            .rotate_refresh(&second.refresh_token, ttl, ttl)
            .await
            .is_err()
    );
    // Logout revokes a login's tokens.
    let third = store
        .issue_tokens(&alice.id, ttl, ttl)
        .await
        .expect("login");
    store
        .revoke_family(&third.access_token)
        .await
        .expect("logout");
    assert!(store.authenticate_token(&third.access_token).await.is_err());
    assert!(
        store
            .rotate_refresh(&third.refresh_token, ttl, ttl)
            .await
            .is_err()
    );
    // An expired access token is refused.
    let short = store
        .issue_tokens(&alice.id, Duration::from_micros(1), ttl)
        .await
        .expect("login");
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(store.authenticate_token(&short.access_token).await.is_err());
}

pub async fn api_tokens_and_owners(store: &impl Store) {
    use drover_store::Role;
    let bob = store
        .create_user("bob", Role::User, "hash")
        .await
        .expect("user");
    let (record, secret) = store
        .create_api_token(&bob.id, "ci", Duration::from_secs(60))
        .await
        .expect("token");
    assert_eq!(record.user, "bob");
    assert_eq!(
        store.authenticate_token(&secret).await.expect("works").id,
        bob.id
    );
    let listed = store.list_api_tokens(Some(&bob.id)).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].last_used_at.is_some(), "last use recorded");
    assert!(matches!(
        store
            .revoke_api_token(&record.id, Some("someone-else"))
            .await,
        Err(StoreError::NotFound { .. })
    ));
    store
        .revoke_api_token(&record.id, Some(&bob.id))
        .await
        .expect("revoke");
    assert!(store.authenticate_token(&secret).await.is_err());
    let (mine, _) = store
        .create_job_for(spec("true"), Some(&bob.id))
        .await
        .expect("job");
    store.create_job(spec("true")).await.expect("job");
    assert_eq!(mine.owner.as_deref(), Some(bob.id.as_str()));
    let of_bob = store
        .list_jobs_of(None, Some(&bob.id), 100)
        .await
        .expect("list");
    assert_eq!(of_bob.len(), 1);
    assert_eq!(store.list_jobs(None, 100).await.expect("all").len(), 2);
    store
        .audit(&drover_store::AuditRecord {
            seq: 0,
            at: Timestamp::now(),
            actor: Some("bob".into()),
            action: "login".into(),
            target: None,
            outcome: "ok".into(),
            address: Some("127.0.0.1".into()),
            detail: None,
        })
        .await
        .expect("audit");
    let audit = store.list_audit(10).await.expect("audit list");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, "login");
}

/// The batch writes the control plane uses under load: one refusal stays its own, the
/// records they answer with are what the store holds, and the history they write is the
/// one single writes would have written.
pub async fn batches_answer_each_request_and_match_single_writes(store: &dyn Store) {
    let missing = drover_core::JobId::new();
    let keyed = JobSpec {
        idempotency_key: Some("batch-key".into()),
        ..spec("true")
    };
    let orphan = JobSpec {
        depends_on: vec![missing],
        ..spec("true")
    };
    let submissions: Vec<Submission> = [spec("a"), keyed.clone(), orphan, spec("b"), keyed]
        .into_iter()
        .map(|spec| Submission {
            spec,
            owner: Some("alice".into()),
        })
        .collect();
    let answers = store.create_jobs(submissions).await.unwrap();
    assert_eq!(answers.len(), 5);
    let (a, created_a) = answers[0].as_ref().unwrap().clone();
    let (k, created_k) = answers[1].as_ref().unwrap().clone();
    assert!(matches!(
        answers[2],
        Err(StoreError::Invalid {
            field: "depends_on",
            ..
        })
    ));
    let (b, _) = answers[3].as_ref().unwrap().clone();
    let (k_again, created_again) = answers[4].as_ref().unwrap().clone();
    assert!(created_a && created_k && !created_again);
    assert_eq!(k_again.id, k.id, "the key answered with its first job");
    for job in [&a, &k, &b] {
        assert_eq!(
            &store.get_job(job.id).await.unwrap(),
            job,
            "answer = stored"
        );
        assert_eq!(job.owner.as_deref(), Some("alice"));
    }
    assert_eq!(
        store
            .list_jobs(Some(JobState::Queued), 10)
            .await
            .unwrap()
            .len(),
        3,
        "the refused one left nothing behind"
    );

    // A plan naming a job twice, and one that is no longer QUEUED.
    let w = worker(store).await;
    store.cancel_job(b.id, "not wanted").await.unwrap();
    let made = store
        .assign_jobs(&[(a.id, w), (b.id, w), (k.id, w), (a.id, w)], later())
        .await
        .unwrap();
    let assigned: Vec<_> = made.iter().map(|m| m.job.id).collect();
    assert_eq!(assigned, vec![a.id, k.id]);
    for m in &made {
        assert_eq!(
            store.get_job(m.job.id).await.unwrap(),
            m.job,
            "answer = stored"
        );
        assert_eq!(
            store.get_run(m.run.id).await.unwrap(),
            m.run,
            "answer = stored"
        );
        assert_eq!(m.job.current_run, Some(m.run.id));
        assert_eq!(m.job.attempts, 1);
    }
    let (run_a, run_k) = (made[0].run.id, made[1].run.id);

    // An accept and a start of the same run in one batch, a start of someone else's run,
    // and a second start of a run already started.
    let other = worker(store).await;
    let step = |run_id, worker_id, step| StepRequest {
        run_id,
        worker_id,
        step,
    };
    let answers = store
        .advance_runs(vec![
            step(run_a, w, RunStep::Accept),
            step(run_k, other, RunStep::Start),
            step(run_a, w, RunStep::Start),
            step(run_a, w, RunStep::Start),
            step(run_k, w, RunStep::Accept),
        ])
        .await
        .unwrap();
    assert_eq!(answers[0].as_ref().unwrap(), &a.id);
    assert!(matches!(answers[1], Err(StoreError::NotYourRun { .. })));
    assert_eq!(answers[2].as_ref().unwrap(), &a.id);
    assert!(
        matches!(answers[3], Err(StoreError::Conflict(_))),
        "started twice"
    );
    assert_eq!(answers[4].as_ref().unwrap(), &k.id);
    assert_eq!(store.get_job(a.id).await.unwrap().state, JobState::Running);
    assert_eq!(store.get_run(run_a).await.unwrap().state, RunState::Running);
    assert_eq!(store.get_job(k.id).await.unwrap().state, JobState::Assigned);
    let kinds = job_event_types(store, a.id).await;
    assert_eq!(
        kinds,
        [
            "JobCreated",
            "JobAssigned",
            "JobAccepted",
            "JobStatusChanged"
        ],
        "the same history as single writes"
    );

    // Ends: a run reported twice in one batch, someone else's, and a job others wait on.
    let waiting = JobSpec {
        depends_on: vec![a.id],
        ..spec("after a")
    };
    let waiting = store.create_job(waiting).await.unwrap().0;
    assert_eq!(waiting.waiting_on, 1);
    let ended = |run_id, worker_id| drover_store::FinishRequest {
        run_id,
        worker_id: Some(worker_id),
        end: end(RunOutcome::Succeeded, 0),
    };
    let answers = store
        .finish_runs(
            vec![ended(run_a, w), ended(run_k, other), ended(run_a, w)],
            NO_JITTER,
        )
        .await
        .unwrap();
    let first = answers[0].as_ref().unwrap();
    assert!(first.changed);
    assert_eq!(first.job.state, JobState::Succeeded);
    assert_eq!(
        &store.get_job(a.id).await.unwrap(),
        &first.job,
        "answer = stored"
    );
    assert_eq!(
        &store.get_run(run_a).await.unwrap(),
        &first.run,
        "answer = stored"
    );
    assert!(matches!(answers[1], Err(StoreError::NotYourRun { .. })));
    assert!(
        !answers[2].as_ref().unwrap().changed,
        "the second report changes nothing"
    );
    assert_eq!(store.get_job(k.id).await.unwrap().state, JobState::Assigned);
    assert_eq!(store.get_job(waiting.id).await.unwrap().waiting_on, 0);

    // A run's start and its end reported together: written in that order, in one call.
    let (stepped, ended_answers) = store
        .report_runs(
            vec![
                step(run_k, w, RunStep::Start),
                step(run_k, other, RunStep::Start),
            ],
            vec![ended(run_k, w)],
            NO_JITTER,
        )
        .await
        .unwrap();
    assert_eq!(stepped[0].as_ref().unwrap(), &k.id);
    assert!(matches!(stepped[1], Err(StoreError::NotYourRun { .. })));
    let done = ended_answers[0].as_ref().unwrap();
    assert_eq!(done.job.state, JobState::Succeeded);
    assert_eq!(
        &store.get_job(k.id).await.unwrap(),
        &done.job,
        "answer = stored"
    );
    let run = store.get_run(run_k).await.unwrap();
    assert_eq!(run.state, RunState::Succeeded);
    assert!(run.started_at.is_some() && run.started_at <= run.finished_at);
    let kinds = job_event_types(store, k.id).await;
    assert_eq!(
        kinds[kinds.len() - 2..],
        ["JobStatusChanged", "JobStatusChanged"]
    );
    assert_eq!(run.started_at, done.run.started_at, "answer = stored");

    // A start reported with an end that is refused: the start is still written.
    let m = store.create_job(spec("m")).await.unwrap().0;
    let made = store.assign_jobs(&[(m.id, w)], later()).await.unwrap();
    let run_m = made[0].run.id;
    let (stepped, ended_answers) = store
        .report_runs(
            vec![
                step(run_m, w, RunStep::Accept),
                step(run_m, w, RunStep::Start),
            ],
            vec![ended(run_m, other)],
            NO_JITTER,
        )
        .await
        .unwrap();
    assert!(stepped.iter().all(|s| s.is_ok()));
    assert!(matches!(
        ended_answers[0],
        Err(StoreError::NotYourRun { .. })
    ));
    assert_eq!(store.get_job(m.id).await.unwrap().state, JobState::Running);
    let run = store.get_run(run_m).await.unwrap();
    assert_eq!(run.state, RunState::Running);
    assert!(run.started_at.is_some());
    assert_eq!(
        job_event_types(store, m.id).await,
        [
            "JobCreated",
            "JobAssigned",
            "JobAccepted",
            "JobStatusChanged"
        ]
    );
}

/// The types of a job's events, oldest first.
/// Failed, timed-out, cancelled and skipped jobs are listed through their own partial
/// index, the others by walking the primary key: both must find exactly the jobs in the
/// state, newest first, and honour the owner.
pub async fn listing_by_state_finds_each_state_indexed_or_not(store: &dyn Store) {
    let w = worker(store).await;
    let new_job = || async { store.create_job(spec("true")).await.unwrap().0.id };
    let queued = new_job().await;
    let succeeded = new_job().await;
    run_to_end(store, succeeded, w, RunOutcome::Succeeded).await;
    let mut once = spec("false");
    once.max_attempts = Some(1);
    let failed = store.create_job(once).await.unwrap().0.id;
    run_to_end(store, failed, w, RunOutcome::Failed).await;
    let cancelled = new_job().await;
    store.cancel_job(cancelled, "by test").await.unwrap();
    let later_cancelled = new_job().await;
    store.cancel_job(later_cancelled, "by test").await.unwrap();
    let listed = |state| async move {
        store
            .list_jobs(Some(state), 100)
            .await
            .unwrap()
            .into_iter()
            .map(|j| {
                assert_eq!(j.state, state);
                j.id
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(listed(JobState::Queued).await, vec![queued]);
    assert_eq!(listed(JobState::Succeeded).await, vec![succeeded]);
    assert_eq!(listed(JobState::Failed).await, vec![failed]);
    assert_eq!(
        listed(JobState::Cancelled).await,
        vec![later_cancelled, cancelled],
        "newest first"
    );
    assert!(listed(JobState::TimedOut).await.is_empty());
    assert!(
        store
            .list_jobs_of(Some(JobState::Failed), Some("nobody"), 100)
            .await
            .unwrap()
            .is_empty(),
        "another owner's jobs are not listed"
    );
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

async fn job_event_types(store: &dyn Store, job_id: drover_core::JobId) -> Vec<&'static str> {
    event_types(&store.job_events(job_id).await.unwrap())
}

/// Many registrations racing with one one-time token: exactly one node registers (on
/// PostgreSQL they run on separate connections at once; SQLite's one writer orders them).
pub async fn a_join_token_registers_one_node_under_concurrent_callers(store: &impl Store) {
    let caps = Capabilities::default();
    // Several rounds: each is one race, which a lost update does not lose every time.
    for round in 0..8 {
        let token = store
            .create_join_token(Duration::from_secs(60))
            .await
            .expect("token");
        let names: Vec<String> = (0..16).map(|i| format!("racer-{round}-{i}")).collect();
        let results = futures::future::join_all(
            names
                .iter()
                .map(|name| store.register_worker(&token.token, name, &caps)),
        )
        .await;
        let registered = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(registered, 1, "round {round}: {results:?}");
        for refused in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(refused, StoreError::JoinTokenRefused(_)),
                "{refused:?}"
            );
        }
    }
    let workers = store.list_workers().await.expect("workers");
    assert_eq!(
        workers
            .iter()
            .filter(|w| w.name.starts_with("racer-"))
            .count(),
        8
    );
}

/// Many rotations racing with one refresh token: at most one rotates it, the others are
/// reuse, and reuse revokes every token of the login, the winner's new pair included.
pub async fn concurrent_rotations_of_a_refresh_token_rotate_it_once(store: &impl Store) {
    use drover_store::Role;
    let carol = store
        .create_user("carol", Role::User, "x")
        .await
        .expect("user");
    let ttl = Duration::from_secs(600);
    let login = store
        .issue_tokens(&carol.id, ttl, ttl)
        .await
        .expect("login");
    let results = futures::future::join_all(
        (0..16).map(|_| store.rotate_refresh(&login.refresh_token, ttl, ttl)),
    )
    .await;
    let rotated: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(rotated.len(), 1, "exactly one rotation wins: {results:?}");
    for (_, pair) in rotated {
        assert!(
            store.authenticate_token(&pair.access_token).await.is_err(),
            "the reuse revoked the winner's access token too"
        );
        assert!(
            store
                .rotate_refresh(&pair.refresh_token, ttl, ttl)
                .await
                .is_err()
        );
    }
    assert!(store.authenticate_token(&login.access_token).await.is_err());
}
