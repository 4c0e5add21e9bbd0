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

mod access;
mod jobs;
mod replicas;
mod reservations;
mod runs;
mod webhooks;
mod workers;
pub use access::*;
pub use jobs::*;
pub use replicas::*;
pub use reservations::*;
pub use runs::*;
pub use webhooks::*;
pub use workers::*;

/// The builders shared with the store's own unit tests (`src/sql/mod.rs`).
pub mod helpers;
pub use helpers::*;

use drover_core::{Capabilities, JobSpec, JobState, RunOutcome, RunState, Timestamp, WorkerId};
use drover_store::{
    LogIndex, ReservationState, RunStep, StepRequest, Store, StoreError, Submission,
};
use std::time::Duration;

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

fn event_types(events: &[drover_store::EventRecord]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.type_name()).collect()
}

async fn job_event_types(store: &dyn Store, job_id: drover_core::JobId) -> Vec<&'static str> {
    event_types(&store.job_events(job_id).await.unwrap())
}
