//! Nodes: join tokens, the fleet, revoking, node configurations, providers.

use crate::auth::Caller;
use crate::extract::{PathId, parse_body};
use crate::{ApiError, ApiResult, AppState, SharedState, nodes};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use drover_core::WorkerId;
use drover_core::records::NodeView;
use drover_store::WorkerRecord;
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenRequest {
    ttl_ms: Option<u64>,
    ttl_seconds: Option<u64>,
}

pub(super) async fn create_node_token(
    State(state): SharedState,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<drover_store::JoinToken>)> {
    let req: TokenRequest = if body.is_empty() {
        TokenRequest::default()
    } else {
        parse_body(&body)?
    };
    let ttl = drover_core::validation::duration_field(
        ("ttl_ms", req.ttl_ms),
        ("ttl_seconds", req.ttl_seconds),
        Duration::from_secs(3600),
        Duration::from_secs(30 * 24 * 3600),
        "30 days",
    )?;
    let token = state.store.create_join_token(ttl).await?;
    Ok((StatusCode::CREATED, Json(token)))
}

/// A node as the API shows it; `configs` are the node configuration versions (read once
/// for a whole listing).
async fn node_view(
    state: &AppState,
    worker: WorkerRecord,
    configs: &[drover_store::NodeConfigRecord],
) -> ApiResult<NodeView> {
    let live_runs = state.store.live_runs_of(worker.id).await?.len();
    // Across replicas the store knows: READY and heard from within a lease.
    let connected = worker.state == drover_core::WorkerState::Ready
        && drover_core::Timestamp::now().since(worker.last_seen_at) <= state.config.lease;
    let desired_config_version =
        drover_store::desired_config(configs, worker.id, &worker.capabilities.labels)
            .map(|c| c.version);
    Ok(NodeView {
        worker,
        connected,
        live_runs,
        desired_config_version,
    })
}

pub(super) async fn list_nodes(State(state): SharedState) -> ApiResult<Json<Vec<NodeView>>> {
    let configs = state.store.list_node_configs().await?;
    let mut out = Vec::new();
    for w in state.store.list_workers().await? {
        out.push(node_view(&state, w, &configs).await?);
    }
    Ok(Json(out))
}

pub(super) async fn get_node(
    State(state): SharedState,
    PathId(id): PathId<WorkerId>,
) -> ApiResult<Json<NodeView>> {
    let worker = state.store.get_worker(id).await?;
    let configs = state.store.list_node_configs().await?;
    Ok(Json(node_view(&state, worker, &configs).await?))
}

pub(super) async fn node_events(
    State(state): SharedState,
    PathId(id): PathId<WorkerId>,
) -> ApiResult<Json<Vec<drover_store::EventRecord>>> {
    state.store.get_worker(id).await?;
    Ok(Json(state.store.worker_events(id).await?))
}

/// The providers configured on this control plane, with the cluster id their resources
/// are labelled with.
pub(super) async fn list_providers(
    State(state): SharedState,
) -> ApiResult<Json<serde_json::Value>> {
    let cluster_id = state.store.cluster_id().await?;
    let mut providers = Vec::new();
    for config in &state.config.providers {
        let mut p = crate::providers::describe(config);
        let workers: Vec<String> = state
            .store
            .provided_workers(config.name())
            .await?
            .iter()
            .map(|w| w.id.to_string())
            .collect();
        p["workers"] = serde_json::json!(workers);
        providers.push(p);
    }
    Ok(Json(serde_json::json!({
        "cluster_id": cluster_id,
        "providers": providers,
    })))
}

/// Revokes a node: its credential stops working, its stream is dropped, and its runs fail
/// over to other nodes through the retry policy.
pub(super) async fn revoke_node(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    PathId(id): PathId<WorkerId>,
) -> ApiResult<Json<NodeView>> {
    nodes::revoke(&state, id, &caller.user.name).await?;
    state
        .audit(
            Some(&caller.user.name),
            "node.revoke",
            Some(id.to_string()),
            false,
            None,
            None,
        )
        .await;
    let worker = state.store.get_worker(id).await?;
    let configs = state.store.list_node_configs().await?;
    Ok(Json(node_view(&state, worker, &configs).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeConfigRequest {
    /// One node; otherwise the nodes carrying every one of `labels` (none: every node).
    node: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    config: drover_core::NodeConfig,
}

/// A new configuration version; connected nodes it concerns get it at once and answer.
pub(super) async fn put_node_config(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<drover_store::NodeConfigRecord>)> {
    let req: NodeConfigRequest = parse_body(&body)?;
    let node = req
        .node
        .as_deref()
        .map(|n| {
            n.parse::<WorkerId>()
                .map_err(|e| ApiError::invalid("node", e.to_string()))
        })
        .transpose()?;
    if let Some(n) = node {
        state.store.get_worker(n).await?;
    }
    let config = req.config.validated()?;
    let record = state
        .store
        .put_node_config(node, &req.labels, &config)
        .await?;
    state.tell_everywhere(drover_store::Wakeup::Configs).await;
    state
        .audit(
            Some(&caller.user.name),
            "node.config",
            Some(format!("version {}", record.version)),
            false,
            None,
            None,
        )
        .await;
    Ok((StatusCode::CREATED, Json(record)))
}

pub(super) async fn list_node_configs(
    State(state): SharedState,
) -> ApiResult<Json<Vec<drover_store::NodeConfigRecord>>> {
    Ok(Json(state.store.list_node_configs().await?))
}
