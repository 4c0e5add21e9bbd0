//! The store conformance suite on PostgreSQL. Needs DROVER_TEST_POSTGRES_URL (an admin URL
//! of a throwaway cluster; `scripts/test` starts one): each test gets its own database.
//! Without it the tests fail under CI=true and are skipped (with a message) elsewhere.

mod conformance;

use drover_store::prelude::*;
use drover_store::{Migrations, SqlStore, Wakeup};
use std::time::Duration;

use drover_testkit::postgres_database as fresh_database;

/// A store on a fresh database of the test cluster, or None (skipped) without one.
async fn fresh() -> Option<(SqlStore, ())> {
    let url = fresh_database().await?;
    Some((SqlStore::open(&url, Migrations::Apply).await.unwrap(), ()))
}

conformance_suite!(fresh());

#[tokio::test]
async fn replicas_hear_each_other() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let a = SqlStore::open(&url, Migrations::Apply).await.unwrap();
    let b = SqlStore::open(&url, Migrations::Check).await.unwrap();
    let mut heard = b.listen().await.unwrap().expect("PostgreSQL listens");
    a.publish(&Wakeup::Dispatch).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), heard.recv())
        .await
        .unwrap();
    assert_eq!(got, Some(Wakeup::Dispatch));
}

#[tokio::test]
async fn concurrent_assignment_hands_a_job_to_one_worker_only() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let a = std::sync::Arc::new(SqlStore::open(&url, Migrations::Apply).await.unwrap());
    let b = std::sync::Arc::new(SqlStore::open(&url, Migrations::Check).await.unwrap());
    let spec = drover_core::JobSpec {
        command: Some("true".into()),
        ..Default::default()
    };
    let mut jobs = Vec::new();
    for _ in 0..50 {
        jobs.push(a.create_job(spec.clone()).await.unwrap().0.id);
    }
    let token = a.create_join_token(Duration::from_secs(60)).await.unwrap();
    let (w1, _) = a
        .register_worker(&token.token, "w1", &Default::default())
        .await
        .unwrap();
    let token = a.create_join_token(Duration::from_secs(60)).await.unwrap();
    let (w2, _) = a
        .register_worker(&token.token, "w2", &Default::default())
        .await
        .unwrap();
    let lease = drover_core::Timestamp::now().plus(Duration::from_secs(60));
    let race = |store: std::sync::Arc<SqlStore>, worker| {
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let mut won = 0;
            for id in jobs {
                if store.assign_job(id, worker, lease).await.unwrap().is_some() {
                    won += 1;
                }
            }
            won
        })
    };
    let (x, y) = (race(a.clone(), w1.id), race(b.clone(), w2.id));
    let (x, y) = (x.await.unwrap(), y.await.unwrap());
    assert_eq!(x + y, 50, "every job assigned exactly once");
    for id in jobs {
        assert_eq!(a.job_runs(id).await.unwrap().len(), 1);
    }
}

/// Heartbeats renew the leases of a worker's live runs while batches of its run reports
/// lock the same runs. Both must lock them in one order: a renewal that locked them in the
/// order of a table scan deadlocked with report batches (PostgreSQL then rolled one back,
/// and a rolled-back report was lost: the job stayed ASSIGNED for good).
#[tokio::test]
async fn lease_renewals_and_run_reports_never_deadlock() {
    use conformance::{NO_JITTER, end, later, spec, worker};
    use drover_core::RunOutcome;
    use drover_store::{FinishRequest, RunStep, StepRequest};
    let Some(url) = fresh_database().await else {
        return;
    };
    let store = std::sync::Arc::new(SqlStore::open(&url, Migrations::Apply).await.unwrap());
    let worker = worker(&*store).await;
    let lease = later();
    let submissions = (0..2000)
        .map(|_| drover_store::Submission {
            spec: spec("true"),
            owner: None,
        })
        .collect();
    let jobs: Vec<_> = store
        .create_jobs(submissions)
        .await
        .unwrap()
        .into_iter()
        .map(|answer| answer.unwrap().0.id)
        .collect();
    let plan: Vec<_> = jobs.iter().map(|id| (*id, worker)).collect();
    let runs: Vec<_> = store
        .assign_jobs(&plan, lease)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.run.id)
        .collect();
    assert_eq!(runs.len(), jobs.len());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewing = tokio::spawn({
        let (store, stop) = (store.clone(), stop.clone());
        async move {
            let mut renewals = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store.renew_leases(&[worker], lease).await?;
                renewals += 1;
            }
            Ok::<_, drover_store::StoreError>(renewals)
        }
    });
    // Reports in batches the size the server writes, each batch's runs newest first.
    for chunk in runs.chunks(250) {
        let mut chunk = chunk.to_vec();
        chunk.reverse();
        let steps = chunk
            .iter()
            .flat_map(|run_id| {
                [RunStep::Accept, RunStep::Start].map(|step| StepRequest {
                    run_id: *run_id,
                    worker_id: worker,
                    step,
                })
            })
            .collect();
        let ends = chunk
            .iter()
            .map(|run_id| FinishRequest {
                run_id: *run_id,
                worker_id: Some(worker),
                end: end(RunOutcome::Succeeded, 0),
            })
            .collect();
        let (stepped, ended) = store.report_runs(steps, ends, NO_JITTER).await.unwrap();
        assert!(stepped.iter().all(Result::is_ok));
        assert!(ended.iter().all(Result::is_ok));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let renewals = renewing.await.unwrap().expect("every renewal is written");
    assert!(renewals > 0);
    for id in jobs {
        assert_eq!(
            store.get_job(id).await.unwrap().state,
            drover_core::JobState::Succeeded
        );
    }
}
