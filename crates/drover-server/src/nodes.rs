//! Node operations, written once for whichever API or loop needs them.

use crate::{ApiError, AppState, jobs};
use drover_core::{EventKind, WorkerId, WorkerState};
use drover_store::Wakeup;

/// Revokes a node: its credential stops working, its stream is dropped on whichever replica
/// holds it, and its live runs fail over to other nodes through the retry policy.
pub async fn revoke(state: &AppState, id: WorkerId, by: &str) -> Result<(), ApiError> {
    state.store.get_worker(id).await?;
    let event = EventKind::WorkerTerminated {
        reason: format!("revoked by {by}"),
    };
    state
        .store
        .end_worker(id, WorkerState::Terminated, &event)
        .await?;
    state
        .tell_everywhere(Wakeup::Revoke { worker_id: id })
        .await;
    for run in state.store.live_runs_of(id).await? {
        jobs::fail_lost_run(state, run.id, "node revoked".into()).await?;
    }
    tracing::info_span!("worker", worker_id = %id).in_scope(|| tracing::info!(by, "revoked"));
    Ok(())
}
