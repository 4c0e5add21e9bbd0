//! Webhooks and their deliveries.

use crate::extract::{parse_body, query};
use crate::{ApiResult, SharedState};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use drover_core::records::{DeliveryRecord, WebhookRecord};
use drover_core::webhook::WebhookRequest;
use serde::{Deserialize, Serialize};

/// The webhook as created: a generated secret is shown this once; one the caller chose is
/// not sent back (it would land in logs and terminals for nothing).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct CreatedWebhook {
    #[serde(flatten)]
    webhook: WebhookRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

pub(super) async fn add_webhook(
    State(state): SharedState,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<CreatedWebhook>)> {
    let req = parse_body::<WebhookRequest>(&body)?.validated()?;
    let (secret, generated) = match req.secret {
        Some(s) => (s, false),
        None => {
            use rand::Rng;
            let bytes: [u8; 24] = rand::rng().random();
            (hex::encode(bytes), true)
        }
    };
    let webhook = state
        .store
        .add_webhook(&req.url, &secret, &req.events)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook {
            webhook,
            secret: generated.then_some(secret),
        }),
    ))
}

pub(super) async fn list_webhooks(
    State(state): SharedState,
) -> ApiResult<Json<Vec<WebhookRecord>>> {
    Ok(Json(state.store.list_webhooks().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeliveriesQuery {
    limit: Option<u32>,
}

pub(super) async fn list_deliveries(
    State(state): SharedState,
    q: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<DeliveryRecord>>> {
    let limit = query(q)?.limit.unwrap_or(100).clamp(1, 10_000);
    Ok(Json(state.store.list_deliveries(limit).await?))
}
