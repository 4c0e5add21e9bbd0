//! Conformance: Jobs and groups.

use super::*;

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

pub async fn missing_things_are_not_found(store: &dyn Store) {
    let err = store.get_job(drover_core::JobId::new()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { kind: "job", .. }),
        "{err}"
    );
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
