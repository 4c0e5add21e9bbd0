//! The store conformance suite on PostgreSQL. Needs DROVER_TEST_POSTGRES_URL (an admin URL
//! of a throwaway cluster; `scripts/test` starts one): each test gets its own database.
//! Without it the tests fail under CI=true and are skipped (with a message) elsewhere.

mod conformance;

use drover_store::{Migrations, SqlStore, Store, Wakeup};
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
