//! Reservations of a node's named resources, granted against what running jobs use and
//! what other reservations hold or wait for.

use crate::auth::Caller;
use crate::{ApiError, AppState, scheduler};
use drover_core::records::{ReservationRecord, ReservationState};
use drover_core::reservation::ValidReservation;
use drover_core::schedule::{self, Hold};
use drover_core::{ReservationId, Timestamp, ValidationError};

/// Grants a reservation: ACTIVE when its worker has the resource free (less what other
/// reservations hold or wait for), else PENDING until it frees (the dispatcher admits it,
/// oldest first), or 409 when the caller asked not to wait. A plain user holds at most
/// `reservations_per_user` live ones, each of at most `user_reservation_ttl`: otherwise
/// one user could keep a shared resource from everyone's queued jobs for a day.
pub async fn grant(
    state: &AppState,
    req: ValidReservation,
    caller: &Caller,
) -> Result<ReservationRecord, ApiError> {
    let limits = !caller.is_admin();
    let max_ttl = state.config.user_reservation_ttl;
    if limits && req.ttl > max_ttl {
        return Err(ValidationError::new(
            "ttl_ms",
            format!(
                "a user's reservation lasts at most {} s, ttl_ms {} (this control plane's \
                 --max-reservation-ttl)",
                max_ttl.as_secs(),
                max_ttl.as_millis()
            ),
        )
        .into());
    }
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
    let live = state.store.live_reservations(now).await?;
    if limits {
        let per_user = state.config.reservations_per_user;
        let held = live
            .iter()
            .filter(|r| r.owner.as_deref() == Some(caller.user.id.as_str()))
            .count();
        if held >= per_user as usize {
            return Err(ApiError::Conflict(format!(
                "you hold {held} live reservations, the most a user may (this control \
                 plane's --max-reservations-per-user); release one first"
            )));
        }
    }
    let mut holds = scheduler::holds_of(state, live, now).await?;
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
            Some(caller.user.id.as_str()),
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
