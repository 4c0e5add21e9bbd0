//! The store conformance suite on PostgreSQL. Needs DROVER_TEST_POSTGRES_URL (an admin URL
//! of a throwaway cluster; `scripts/test` starts one): each test gets its own database.
//! Without it the tests fail under CI=true and are skipped (with a message) elsewhere.

mod conformance;

use drover_store::{Migrations, SqlStore, Store, Wakeup};
use std::time::Duration;

/// A fresh database on the test cluster, or None (skip) outside CI.
async fn fresh_database() -> Option<String> {
    let Ok(admin) = std::env::var("DROVER_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("CI").is_err(),
            "DROVER_TEST_POSTGRES_URL is not set: PostgreSQL tests cannot run (scripts/test sets it up)"
        );
        eprintln!("skipped: DROVER_TEST_POSTGRES_URL is not set (scripts/test sets it up)");
        return None;
    };
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to the test cluster");
    let name = format!("store_{}", uuid_like());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    let (base, _) = admin.rsplit_once('/').expect("a database name in the URL");
    Some(format!("{base}/{name}"))
}

fn uuid_like() -> String {
    drover_core::JobId::new().to_string().replace('-', "")
}

macro_rules! conformance_tests {
    ($($name:ident),+ $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let Some(url) = fresh_database().await else { return };
            let store = SqlStore::open(&url, Migrations::Apply).await.unwrap();
            conformance::$name(&store).await;
        }
    )+};
}

conformance_tests!(
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
    webhook_events_are_written_with_the_change,
    duties_are_held_by_one_holder_at_a_time,
);

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
