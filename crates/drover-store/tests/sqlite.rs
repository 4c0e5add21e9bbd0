//! The store conformance suite on the SQLite engine.

mod conformance;

use drover_store::SqliteStore;

macro_rules! conformance_tests {
    ($($name:ident),+ $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path().join("drover.db")).await.unwrap();
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
);

#[tokio::test]
async fn reopening_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    let id = {
        let store = SqliteStore::open(&path).await.unwrap();
        let spec = drover_core::JobSpec {
            command: Some("true".into()),
            ..Default::default()
        };
        drover_store::Store::create_job(&store, spec)
            .await
            .unwrap()
            .0
            .id
    };
    let store = SqliteStore::open(&path).await.unwrap();
    let job = drover_store::Store::get_job(&store, id).await.unwrap();
    assert_eq!(job.state, drover_core::JobState::Queued);
}
