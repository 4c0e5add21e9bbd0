//! Reservations of a node's named resources, granted against what running jobs use and
//! what other reservations hold or wait for.

use crate::{ApiError, AppState, scheduler};
use drover_core::records::{ReservationRecord, ReservationState};
use drover_core::reservation::ValidReservation;
use drover_core::schedule::{self, Hold};
use drover_core::{ReservationId, Timestamp};

/// Grants a reservation: ACTIVE when its worker has the resource free (less what other
/// reservations hold or wait for), else PENDING until it frees (the dispatcher admits it,
/// oldest first), or 409 when the caller asked not to wait.
pub async fn grant(
    state: &AppState,
    req: ValidReservation,
    owner: &str,
) -> Result<ReservationRecord, ApiError> {
    let worker = state
        .sessions
        .worker_offering(&req.resource, req.amount, req.node)
        .ok_or_else(|| {
            ApiError::Conflict(match req.node {
                Some(n) => format!(
                    "node {n} is not connected or does not offer {} of resource {:?}",
                    req.amount, req.resource
                ),
                None => format!(
                    "no connected node offers {} of resource {:?}",
                    req.amount, req.resource
                ),
            })
        })?;
    let now = Timestamp::now();
    let plan = state.resource_plan.lock().await;
    let mut holds = scheduler::read_holds(state, now).await?;
    let asked = Hold {
        reservation_id: ReservationId::new(),
        worker_id: worker,
        resource: req.resource.clone(),
        amount: req.amount,
        in_use: 0,
        pending: true,
    };
    holds.push(asked.clone());
    let free_now = schedule::admit_reservations(&mut holds, |w, resource| {
        state.sessions.free_resource(w, resource)
    })
    .contains(&asked.reservation_id);
    if !free_now && !req.wait {
        return Err(ApiError::Conflict(format!(
            "resource {:?} on node {worker} is in use or reserved; ask with wait=true to \
             queue for it",
            req.resource
        )));
    }
    let r = state
        .store
        .create_reservation(
            &req.resource,
            req.amount,
            worker,
            req.ttl,
            Some(owner),
            if free_now {
                ReservationState::Active
            } else {
                ReservationState::Pending
            },
        )
        .await?;
    if !free_now {
        state
            .reservations_waiting
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    drop(plan);
    tracing::info!(reservation = %r.id, resource = %r.resource, worker_id = %worker, state = r.state.as_str(), "reservation granted");
    Ok(r)
}
