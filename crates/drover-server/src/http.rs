//! The HTTP JSON API (`/v1/...`), live logs over server-sent events, health and metrics.

use crate::auth::{Caller, Owned, hash_password, verify_password};
use crate::extract::{parse_body, query};
use crate::log_stream::{FOLLOW_POLL, job_logs, wait_for};
use crate::{ApiError, ApiResult, AppState, Notice, SharedState, jobs, scheduler};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use drover_core::records::{
    BatchResult, BatchSubmitted, DeliveryRecord, GroupView, JobView, NodeView, ReservationRecord,
    ReservationState, RunView, WebhookRecord,
};
use drover_core::reservation::ReservationRequest;
use drover_core::schedule::{self, Hold};
use drover_core::webhook::WebhookRequest;
use drover_core::{GroupId, JobId, JobSpec, ReservationId, RunId, Timestamp, WorkerId};
use drover_store::{JobRecord, WorkerRecord};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Request bodies larger than this are refused before parsing.
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health, metrics, login and refresh.
    Public,
    /// Any signed-in user; jobs, runs, groups and reservations only their own.
    User,
    /// Admins only.
    Admin,
}

/// One route of the API and who may call it.
#[derive(Debug, Clone, Copy)]
pub struct RouteInfo {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
}

type AppRouter = Router<Arc<AppState>>;

/// The routes, grouped by access, and the table describing them: a route can only be added
/// with its access level, and tests walk the table.
struct Routes {
    public: AppRouter,
    user: AppRouter,
    admin: AppRouter,
    table: Vec<RouteInfo>,
}

impl Routes {
    fn add(
        mut self,
        access: Access,
        path: &'static str,
        methods: &[&'static str],
        route: axum::routing::MethodRouter<Arc<AppState>>,
    ) -> Self {
        for method in methods {
            self.table.push(RouteInfo {
                method,
                path,
                access,
            });
        }
        let group = match access {
            Access::Public => &mut self.public,
            Access::User => &mut self.user,
            Access::Admin => &mut self.admin,
        };
        *group = std::mem::take(group).route(path, route);
        self
    }
}

fn routes() -> Routes {
    use Access::{Admin, Public, User};
    Routes {
        public: Router::new(),
        user: Router::new(),
        admin: Router::new(),
        table: Vec::new(),
    }
    .add(Public, "/healthz", &["GET"], get(|| async { "ok\n" }))
    .add(Public, "/readyz", &["GET"], get(readyz))
    .add(Public, "/metrics", &["GET"], get(metrics))
    .add(Public, "/v1/openapi.json", &["GET"], get(openapi_json))
    .add(Public, "/v1/auth/login", &["POST"], post(login))
    .add(Public, "/v1/auth/refresh", &["POST"], post(refresh))
    .add(User, "/v1/auth/logout", &["POST"], post(logout))
    .add(User, "/v1/auth/whoami", &["GET"], get(whoami))
    .add(
        User,
        "/v1/tokens",
        &["POST", "GET"],
        post(create_api_token).get(list_api_tokens),
    )
    .add(
        User,
        "/v1/tokens/{id}/revoke",
        &["POST"],
        post(revoke_api_token),
    )
    .add(User, "/v1/models", &["GET"], get(crate::openai::models))
    .add(
        User,
        "/v1/chat/completions",
        &["POST"],
        post(crate::openai::chat_completions),
    )
    .add(
        User,
        "/v1/completions",
        &["POST"],
        post(crate::openai::completions),
    )
    .add(
        User,
        "/v1/jobs",
        &["POST", "GET"],
        post(submit_job).get(list_jobs),
    )
    .add(User, "/v1/jobs/batch", &["POST"], post(submit_job_batch))
    .add(User, "/v1/jobs/{id}", &["GET"], get(get_job))
    .add(User, "/v1/jobs/{id}/events", &["GET"], get(job_events))
    .add(User, "/v1/jobs/{id}/logs", &["GET"], get(job_logs))
    .add(User, "/v1/jobs/{id}/wait", &["GET"], get(wait_job))
    .add(User, "/v1/jobs/{id}/cancel", &["POST"], post(cancel_job))
    .add(User, "/v1/runs/{id}/retry", &["POST"], post(retry_run))
    .add(User, "/v1/groups", &["POST"], post(create_group))
    .add(User, "/v1/groups/{id}", &["GET"], get(get_group))
    .add(
        User,
        "/v1/groups/{id}/cancel",
        &["POST"],
        post(cancel_group),
    )
    .add(
        User,
        "/v1/reservations",
        &["POST"],
        post(create_reservation),
    )
    .add(
        User,
        "/v1/reservations/{id}",
        &["GET"],
        get(get_reservation),
    )
    .add(
        User,
        "/v1/reservations/{id}/release",
        &["POST"],
        post(release_reservation),
    )
    .add(
        Admin,
        "/v1/users",
        &["POST", "GET"],
        post(create_user).get(list_users),
    )
    .add(Admin, "/v1/audit", &["GET"], get(list_audit))
    .add(
        Admin,
        "/v1/webhooks",
        &["POST", "GET"],
        post(add_webhook).get(list_webhooks),
    )
    .add(
        Admin,
        "/v1/webhooks/deliveries",
        &["GET"],
        get(list_deliveries),
    )
    .add(Admin, "/v1/node-tokens", &["POST"], post(create_node_token))
    .add(Admin, "/v1/nodes", &["GET"], get(list_nodes))
    .add(Admin, "/v1/nodes/{id}", &["GET"], get(get_node))
    .add(Admin, "/v1/nodes/{id}/events", &["GET"], get(node_events))
    .add(Admin, "/v1/nodes/{id}/revoke", &["POST"], post(revoke_node))
    .add(Admin, "/v1/providers", &["GET"], get(list_providers))
    .add(
        Admin,
        "/v1/node-configs",
        &["POST", "GET"],
        post(put_node_config).get(list_node_configs),
    )
}

/// Every route with its access level, for tests and documentation.
pub fn route_table() -> Vec<RouteInfo> {
    routes().table
}

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let r = routes();
    let user = axum::middleware::from_fn_with_state(state.clone(), crate::auth::require_user);
    let admin = axum::middleware::from_fn_with_state(state.clone(), crate::auth::require_admin);
    let breaker = axum::middleware::from_fn_with_state(state.clone(), store_breaker);
    r.public
        .merge(r.user.route_layer(user))
        .merge(r.admin.route_layer(admin))
        .route_layer(breaker)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// How long after a call found the store unavailable others are answered 503 at once.
const BREAKER_OPEN: Duration = Duration::from_secs(1);

/// While the database is unreachable, calls are answered 503 at once rather than each
/// waiting for the pool to give up; one call a second goes through to find out whether it
/// is back. Health, readiness and metrics are answered as always.
async fn store_breaker(
    State(state): SharedState,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use std::sync::atomic::Ordering;
    let probe = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
    if probe {
        return next.run(req).await;
    }
    let last = state.store_unavailable_at.load(Ordering::Relaxed);
    let now = drover_core::Timestamp::now().0;
    if last > 0 && now - last < BREAKER_OPEN.as_micros() as i64 {
        return ApiError::Unavailable(
            "the database was unreachable a moment ago; try again in a second".into(),
        )
        .into_response();
    }
    let response = next.run(req).await;
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        state
            .store_unavailable_at
            .store(drover_core::Timestamp::now().0, Ordering::Relaxed);
    }
    response
}

/// What no route matches: a gRPC call gets gRPC's `UNIMPLEMENTED`, anything else 404 with
/// the JSON error every refusal has (tonic's own fallback answered 200 with an empty body).
pub(crate) async fn unknown_route(
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Response {
    let grpc = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented(format!("no gRPC method {}", uri.path()))
            .into_http::<axum::body::Body>();
    }
    let path: String = uri.path().chars().take(256).collect();
    ApiError::NotFound(format!("no route {method} {path}")).into_response()
}

async fn readyz(State(state): SharedState) -> Response {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    // A probe answers within a second whatever the database does.
    match tokio::time::timeout(Duration::from_secs(1), state.store.list_jobs(None, 1)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return unavailable(format!("store unavailable: {e}\n")),
        Err(_) => return unavailable("store unavailable: no answer within 1 s\n".into()),
    }
    if state.config.require_inference {
        let serving = match state.store.list_workers().await {
            Ok(workers) => workers.iter().any(|w| {
                w.state == drover_core::WorkerState::Ready && !w.capabilities.models.is_empty()
            }),
            Err(e) => return unavailable(format!("store unavailable: {e}\n")),
        };
        if !serving {
            return unavailable(
                "inference is required and no connected node serves a model \
                 (drover worker --model …)\n"
                    .into(),
            );
        }
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// The OpenAPI document (`crate::openapi`).
async fn openapi_json() -> Response {
    (
        [("content-type", "application/json")],
        crate::openapi::document_json(),
    )
        .into_response()
}

async fn metrics(State(state): SharedState) -> Response {
    metrics::gauge!("drover_workers_connected").set(state.sessions.count() as f64);
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn submit_job(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<JobRecord>)> {
    let spec: JobSpec = parse_body(&body)?;
    let (job, created) = jobs::submit(&state, spec, &caller).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(job)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchRequest {
    jobs: Vec<JobSpec>,
}

/// Many jobs in one request and one write: every spec is checked first (a bad one refuses
/// the whole request, naming `jobs[i].field`), then each job is stored or refused alone.
async fn submit_job_batch(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<BatchSubmitted>)> {
    let req: BatchRequest = parse_body(&body)?;
    let specs = jobs::checked_specs(&state, &caller, req.jobs, jobs::MAX_BATCH_JOBS, "a batch")?;
    let answers = jobs::submit_many(&state, specs, &caller).await?;
    let any_created = answers.iter().any(|a| matches!(a, Ok((_, true))));
    let results = answers
        .into_iter()
        .map(|answer| match answer {
            Ok((job, created)) => BatchResult::Submitted {
                job: Box::new(job),
                created,
            },
            Err(e) => BatchResult::Refused { error: e.detail() },
        })
        .collect();
    let status = if any_created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(BatchSubmitted { results })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    state: String,
    limit: Option<u32>,
}

async fn list_jobs(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<JobRecord>>> {
    let q = query(q)?;
    let filter = jobs::parse_state(&q.state)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    Ok(Json(
        state
            .store
            .list_jobs_of(filter, caller.owner_filter(), limit)
            .await?,
    ))
}

async fn job_view(state: &AppState, id: JobId) -> ApiResult<JobView> {
    let job = state.store.get_job(id).await?;
    let mut runs = Vec::new();
    for run in state.store.job_runs(id).await? {
        let log = state.store.log_index(run.id).await?;
        runs.push(RunView { run, log });
    }
    Ok(JobView { job, runs })
}

async fn get_job(State(state): SharedState, Owned(id): Owned<JobId>) -> ApiResult<Json<JobView>> {
    Ok(Json(job_view(&state, id).await?))
}

async fn job_events(
    State(state): SharedState,
    Owned(id): Owned<JobId>,
) -> ApiResult<Json<Vec<drover_store::EventRecord>>> {
    state.store.get_job(id).await?;
    Ok(Json(state.store.job_events(id).await?))
}

async fn cancel_job(
    State(state): SharedState,
    Owned(id): Owned<JobId>,
) -> ApiResult<Json<JobRecord>> {
    Ok(Json(jobs::cancel(&state, id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    timeout_ms: Option<u64>,
}

/// Long poll: answers when the job is final, or with its current state after the timeout.
async fn wait_job(
    State(state): SharedState,
    Owned(id): Owned<JobId>,
    q: Result<Query<WaitQuery>, QueryRejection>,
) -> ApiResult<Json<JobView>> {
    let timeout = Duration::from_millis(query(q)?.timeout_ms.unwrap_or(30_000).min(300_000));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut notices = state.notices.subscribe();
    loop {
        let job = state.store.get_job(id).await?;
        if job.state.is_terminal() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(job_view(&state, id).await?));
        }
        // Re-read at least every second: the change may come from another replica.
        let next = deadline.min(tokio::time::Instant::now() + FOLLOW_POLL);
        wait_for(
            &mut notices,
            next,
            |n| matches!(n, Notice::Job { job_id, .. } if *job_id == id),
        )
        .await;
    }
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenRequest {
    ttl_ms: Option<u64>,
    ttl_seconds: Option<u64>,
}

async fn create_node_token(
    State(state): SharedState,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<drover_store::JoinToken>)> {
    let req: TokenRequest = if body.is_empty() {
        TokenRequest::default()
    } else {
        parse_body(&body)?
    };
    let ttl = drover_core::job::duration_field(
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

async fn list_nodes(State(state): SharedState) -> ApiResult<Json<Vec<NodeView>>> {
    let configs = state.store.list_node_configs().await?;
    let mut out = Vec::new();
    for w in state.store.list_workers().await? {
        out.push(node_view(&state, w, &configs).await?);
    }
    Ok(Json(out))
}

async fn get_node(State(state): SharedState, Path(id): Path<String>) -> ApiResult<Json<NodeView>> {
    let id: WorkerId = id
        .parse()
        .map_err(|e: drover_core::IdError| ApiError::invalid("id", e.to_string()))?;
    let worker = state.store.get_worker(id).await?;
    let configs = state.store.list_node_configs().await?;
    Ok(Json(node_view(&state, worker, &configs).await?))
}

async fn node_events(
    State(state): SharedState,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<drover_store::EventRecord>>> {
    let id: WorkerId = parse_path_id(&id)?;
    state.store.get_worker(id).await?;
    Ok(Json(state.store.worker_events(id).await?))
}

/// The providers configured on this control plane, with the cluster id their resources
/// are labelled with.
async fn list_providers(State(state): SharedState) -> ApiResult<Json<serde_json::Value>> {
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

fn parse_path_id<T: std::str::FromStr<Err = drover_core::IdError>>(s: &str) -> ApiResult<T> {
    s.parse::<T>()
        .map_err(|e| ApiError::invalid("id", e.to_string()))
}

/// Retries a finished attempt by hand: a new attempt in the same chain.
async fn retry_run(
    State(state): SharedState,
    Owned(run_id): Owned<RunId>,
) -> ApiResult<Json<JobRecord>> {
    let job = state.store.resubmit_run(run_id).await?;
    tracing::info_span!("job", job_id = %job.id)
        .in_scope(|| tracing::info!(%run_id, "retried by hand"));
    state.notify_job(job.id, job.state);
    state.dispatch.notify_one();
    Ok(Json(job))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupRequest {
    #[serde(default)]
    name: String,
    jobs: Vec<JobSpec>,
}

const MAX_GROUP_JOBS: usize = 1000;

async fn create_group(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<GroupView>)> {
    let req: GroupRequest = parse_body(&body)?;
    let specs = jobs::checked_specs(&state, &caller, req.jobs, MAX_GROUP_JOBS, "a group")?;
    if req.name.len() > drover_core::job::MAX_NAME_BYTES || req.name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name",
            "at most 256 bytes, no control characters",
        ));
    }
    if let Some(i) = specs.iter().position(|s| s.idempotency_key.is_some()) {
        return Err(ApiError::invalid(
            format!("jobs[{i}].idempotency_key"),
            "is not supported inside a group",
        ));
    }
    let name = if req.name.trim().is_empty() {
        "group".to_string()
    } else {
        req.name
    };
    let view = state
        .store
        .create_group_for(&name, specs, Some(&caller.user.id))
        .await?;
    for job in &view.jobs {
        state.notify_job(job.id, job.state);
    }
    state.dispatch.notify_one();
    Ok((StatusCode::CREATED, Json(view)))
}

async fn get_group(
    State(state): SharedState,
    Owned(id): Owned<GroupId>,
) -> ApiResult<Json<GroupView>> {
    Ok(Json(state.store.get_group(id).await?))
}

/// Cancels every member not final yet, last first, so that they end CANCELLED rather than
/// SKIPPED by the cancel of the one before.
async fn cancel_group(
    State(state): SharedState,
    Owned(id): Owned<GroupId>,
) -> ApiResult<Json<GroupView>> {
    let view = state.store.get_group(id).await?;
    for job in view.jobs.iter().rev().filter(|j| !j.state.is_terminal()) {
        match jobs::cancel(&state, job.id).await {
            Ok(_) | Err(ApiError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Json(state.store.get_group(id).await?))
}

/// Grants a reservation: ACTIVE when its worker has the resource free (less what other
/// reservations hold or wait for), else PENDING until it frees, or 409 when the caller
/// asked not to wait.
async fn create_reservation(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<ReservationRecord>)> {
    let req = parse_body::<ReservationRequest>(&body)?.validated()?;
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
    let mut holds = scheduler::read_holds(&state, now).await?;
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
            Some(&caller.user.id),
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
    Ok((StatusCode::CREATED, Json(r)))
}

async fn get_reservation(
    State(state): SharedState,
    Owned(id): Owned<ReservationId>,
) -> ApiResult<Json<ReservationRecord>> {
    Ok(Json(state.store.get_reservation(id).await?))
}

async fn release_reservation(
    State(state): SharedState,
    Owned(id): Owned<ReservationId>,
) -> ApiResult<Json<ReservationRecord>> {
    let r = state.store.release_reservation(id).await?;
    state.dispatch.notify_one();
    Ok(Json(r))
}

/// The webhook as created: a generated secret is shown this once; one the caller chose is
/// not sent back (it would land in logs and terminals for nothing).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct CreatedWebhook {
    #[serde(flatten)]
    webhook: WebhookRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

async fn add_webhook(
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

async fn list_webhooks(State(state): SharedState) -> ApiResult<Json<Vec<WebhookRecord>>> {
    Ok(Json(state.store.list_webhooks().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveriesQuery {
    limit: Option<u32>,
}

async fn list_deliveries(
    State(state): SharedState,
    q: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<DeliveryRecord>>> {
    let limit = query(q)?.limit.unwrap_or(100).clamp(1, 10_000);
    Ok(Json(state.store.list_deliveries(limit).await?))
}

// ----------------------------------------------------------------- auth

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginRequest {
    username: String,
    password: String,
}

async fn login(
    State(state): SharedState,
    axum::extract::ConnectInfo(crate::listener::PeerAddr(peer)): axum::extract::ConnectInfo<
        crate::listener::PeerAddr,
    >,
    body: Bytes,
) -> ApiResult<Json<drover_store::IssuedTokens>> {
    let req: LoginRequest = parse_body(&body)?;
    let address = Some(peer.ip().to_string());
    // Nothing of an oversized or malformed name is looked up, limited by or kept: no user
    // has such a name, and the audit trail must not grow by what an anonymous caller sends.
    let name_ok = drover_core::access::validate_user_name(&req.username).is_ok();
    if req.password.len() > drover_core::access::MAX_PASSWORD_BYTES {
        return Err(ApiError::invalid("password", "at most 1024 bytes"));
    }
    let name = name_ok.then_some(req.username.as_str());
    if let Some(wait) = state.logins.blocked(address.as_deref()) {
        state
            .audit(
                name,
                "login",
                None,
                true,
                address,
                Some("rate limited".into()),
            )
            .await;
        return Err(ApiError::TooManyRequests(format!(
            "too many failed logins from this address; try again in {wait} s"
        )));
    }
    let found = match name {
        Some(name) => state.store.user_by_name(name).await?,
        None => None,
    };
    if let Some((user, _)) = &found {
        // A user whose password is being guessed from many addresses: every attempt at it
        // is slowed, none refused, so the right password still gets in.
        let slow = state.logins.slowdown(&user.id);
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
    }
    // An unknown user costs a verification too, so that the time taken does not tell
    // whether a user exists.
    let user_id = found.as_ref().map(|(u, _)| u.id.clone());
    let password = req.password.clone();
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), hash),
        None => (None, crate::auth::unknown_user_hash().to_string()),
    };
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    let Some(user) = user.filter(|_| ok) else {
        state.logins.failed(user_id.as_deref(), address.as_deref());
        let detail = if name_ok {
            "wrong user name or password"
        } else {
            "not a valid user name"
        };
        state
            .audit(name, "login", None, true, address, Some(detail.into()))
            .await;
        return Err(ApiError::Unauthenticated(
            "wrong user name or password".into(),
        ));
    };
    state.logins.succeeded(&user.id, address.as_deref());
    let tokens = state
        .store
        .issue_tokens(&user.id, state.config.access_ttl, state.config.refresh_ttl)
        .await?;
    state
        .audit(Some(&user.name), "login", None, false, address, None)
        .await;
    Ok(Json(tokens))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshRequest {
    refresh_token: String,
}

async fn refresh(
    State(state): SharedState,
    body: Bytes,
) -> ApiResult<Json<drover_store::IssuedTokens>> {
    let req: RefreshRequest = parse_body(&body)?;
    match state
        .store
        .rotate_refresh(
            &req.refresh_token,
            state.config.access_ttl,
            state.config.refresh_ttl,
        )
        .await
    {
        Ok((_, tokens)) => Ok(Json(tokens)),
        Err(e) => {
            // A reused refresh token revoked its whole login.
            state.tokens_revoked().await;
            state
                .audit(None, "token.refresh", None, true, None, Some(e.to_string()))
                .await;
            Err(e.into())
        }
    }
}

async fn logout(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
) -> ApiResult<StatusCode> {
    if let Some(token) = crate::auth::bearer(&headers)
        && token.starts_with("drover_at_")
    {
        state.store.revoke_family(token).await?;
        state.tokens_revoked().await;
    }
    state
        .audit(Some(&caller.user.name), "logout", None, false, None, None)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

async fn whoami(Extension(caller): Extension<Caller>) -> Json<drover_store::UserRecord> {
    Json(caller.user)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiTokenRequest {
    name: String,
    expires_in_ms: Option<u64>,
    expires_in_seconds: Option<u64>,
}

fn default_token_ttl() -> u64 {
    90 * 24 * 3600
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct CreatedToken {
    #[serde(flatten)]
    record: drover_store::ApiTokenRecord,
    /// Shown once: only its hash is kept.
    token: String,
}

async fn create_api_token(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let req: ApiTokenRequest = parse_body(&body)?;
    if req.name.trim().is_empty() || req.name.len() > 128 || req.name.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "name",
            "1-128 characters, no control characters",
        ));
    }
    let expires_in = drover_core::job::duration_field(
        ("expires_in_ms", req.expires_in_ms),
        ("expires_in_seconds", req.expires_in_seconds),
        Duration::from_secs(default_token_ttl()),
        Duration::from_secs(5 * 365 * 24 * 3600),
        "5 years",
    )?;
    let (record, token) = state
        .store
        .create_api_token(&caller.user.id, &req.name, expires_in)
        .await?;
    state
        .audit(
            Some(&caller.user.name),
            "token.create",
            Some(record.id.clone()),
            false,
            None,
            Some(req.name),
        )
        .await;
    Ok((StatusCode::CREATED, Json(CreatedToken { record, token })))
}

async fn list_api_tokens(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<drover_store::ApiTokenRecord>>> {
    Ok(Json(
        state.store.list_api_tokens(caller.owner_filter()).await?,
    ))
}

async fn revoke_api_token(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<drover_store::ApiTokenRecord>> {
    let record = state
        .store
        .revoke_api_token(&id, caller.owner_filter())
        .await?;
    state.tokens_revoked().await;
    state
        .audit(
            Some(&caller.user.name),
            "token.revoke",
            Some(id),
            false,
            None,
            None,
        )
        .await;
    Ok(Json(record))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserRequest {
    name: String,
    password: String,
    #[serde(default = "default_role")]
    role: String,
}

fn default_role() -> String {
    "user".into()
}

async fn create_user(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<drover_store::UserRecord>)> {
    let req: UserRequest = parse_body(&body)?;
    drover_core::access::validate_user_name(&req.name)?;
    drover_core::access::validate_new_password(&req.password)?;
    let role = drover_store::Role::parse(&req.role)
        .ok_or_else(|| ApiError::invalid("role", "admin or user"))?;
    let password = req.password.clone();
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let user = state.store.create_user(&req.name, role, &hash).await?;
    state
        .audit(
            Some(&caller.user.name),
            "user.create",
            Some(user.name.clone()),
            false,
            None,
            Some(role.as_str().into()),
        )
        .await;
    Ok((StatusCode::CREATED, Json(user)))
}

async fn list_users(State(state): SharedState) -> ApiResult<Json<Vec<drover_store::UserRecord>>> {
    Ok(Json(state.store.list_users().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<u32>,
}

async fn list_audit(
    State(state): SharedState,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<drover_store::AuditRecord>>> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(200).clamp(1, 10_000);
    Ok(Json(state.store.list_audit(limit).await?))
}

/// Revokes a node: its credential stops working, its stream is dropped, and its runs fail
/// over to other nodes through the retry policy.
async fn revoke_node(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeView>> {
    let id: WorkerId = parse_path_id(&id)?;
    state.store.get_worker(id).await?;
    let event = drover_core::EventKind::WorkerTerminated {
        reason: format!("revoked by {}", caller.user.name),
    };
    state
        .store
        .end_worker(id, drover_core::WorkerState::Terminated, &event)
        .await?;
    state
        .tell_everywhere(drover_store::Wakeup::Revoke { worker_id: id })
        .await;
    for run in state.store.live_runs_of(id).await? {
        jobs::fail_lost_run(&state, run.id, "node revoked".into()).await?;
    }
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
async fn put_node_config(
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

async fn list_node_configs(
    State(state): SharedState,
) -> ApiResult<Json<Vec<drover_store::NodeConfigRecord>>> {
    Ok(Json(state.store.list_node_configs().await?))
}
