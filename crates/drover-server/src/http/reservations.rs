//! Reservations of named resources.

use crate::auth::{Caller, Owned};
use crate::extract::parse_body;
use crate::{ApiResult, SharedState, reservations};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use drover_core::ReservationId;
use drover_core::records::ReservationRecord;
use drover_core::reservation::ReservationRequest;

pub(super) async fn create_reservation(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<ReservationRecord>)> {
    let req = parse_body::<ReservationRequest>(&body)?.validated()?;
    let r = reservations::grant(&state, req, &caller).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

pub(super) async fn get_reservation(
    State(state): SharedState,
    Owned(id): Owned<ReservationId>,
) -> ApiResult<Json<ReservationRecord>> {
    Ok(Json(state.store.get_reservation(id).await?))
}

pub(super) async fn release_reservation(
    State(state): SharedState,
    Owned(id): Owned<ReservationId>,
) -> ApiResult<Json<ReservationRecord>> {
    let r = state.store.release_reservation(id).await?;
    state.dispatch.notify_one();
    Ok(Json(r))
}
