//! The HTTP JSON API (`/v1/...`), live logs over server-sent events, health and metrics.

pub(crate) mod access;
pub(crate) mod jobs;
pub(crate) mod nodes;
pub(crate) mod reservations;
pub(crate) mod webhooks;

use crate::log_stream::job_logs;
use crate::{ApiError, AppState, SharedState};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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
    .add(Public, "/v1/auth/login", &["POST"], post(access::login))
    .add(Public, "/v1/auth/refresh", &["POST"], post(access::refresh))
    .add(User, "/v1/auth/logout", &["POST"], post(access::logout))
    .add(User, "/v1/auth/whoami", &["GET"], get(access::whoami))
    .add(
        User,
        "/v1/tokens",
        &["POST", "GET"],
        post(access::create_api_token).get(access::list_api_tokens),
    )
    .add(
        User,
        "/v1/tokens/{id}/revoke",
        &["POST"],
        post(access::revoke_api_token),
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
        post(jobs::submit_job).get(jobs::list_jobs),
    )
    .add(
        User,
        "/v1/jobs/batch",
        &["POST"],
        post(jobs::submit_job_batch),
    )
    .add(User, "/v1/jobs/{id}", &["GET"], get(jobs::get_job))
    .add(
        User,
        "/v1/jobs/{id}/events",
        &["GET"],
        get(jobs::job_events),
    )
    .add(User, "/v1/jobs/{id}/logs", &["GET"], get(job_logs))
    .add(User, "/v1/jobs/{id}/wait", &["GET"], get(jobs::wait_job))
    .add(
        User,
        "/v1/jobs/{id}/cancel",
        &["POST"],
        post(jobs::cancel_job),
    )
    .add(
        User,
        "/v1/runs/{id}/retry",
        &["POST"],
        post(jobs::retry_run),
    )
    .add(User, "/v1/groups", &["POST"], post(jobs::create_group))
    .add(User, "/v1/groups/{id}", &["GET"], get(jobs::get_group))
    .add(
        User,
        "/v1/groups/{id}/cancel",
        &["POST"],
        post(jobs::cancel_group),
    )
    .add(
        User,
        "/v1/reservations",
        &["POST"],
        post(reservations::create_reservation),
    )
    .add(
        User,
        "/v1/reservations/{id}",
        &["GET"],
        get(reservations::get_reservation),
    )
    .add(
        User,
        "/v1/reservations/{id}/release",
        &["POST"],
        post(reservations::release_reservation),
    )
    .add(
        Admin,
        "/v1/users",
        &["POST", "GET"],
        post(access::create_user).get(access::list_users),
    )
    .add(Admin, "/v1/audit", &["GET"], get(access::list_audit))
    .add(
        Admin,
        "/v1/webhooks",
        &["POST", "GET"],
        post(webhooks::add_webhook).get(webhooks::list_webhooks),
    )
    .add(
        Admin,
        "/v1/webhooks/deliveries",
        &["GET"],
        get(webhooks::list_deliveries),
    )
    .add(
        Admin,
        "/v1/node-tokens",
        &["POST"],
        post(nodes::create_node_token),
    )
    .add(Admin, "/v1/nodes", &["GET"], get(nodes::list_nodes))
    .add(Admin, "/v1/nodes/{id}", &["GET"], get(nodes::get_node))
    .add(
        Admin,
        "/v1/nodes/{id}/events",
        &["GET"],
        get(nodes::node_events),
    )
    .add(
        Admin,
        "/v1/nodes/{id}/revoke",
        &["POST"],
        post(nodes::revoke_node),
    )
    .add(Admin, "/v1/providers", &["GET"], get(nodes::list_providers))
    .add(
        Admin,
        "/v1/node-configs",
        &["POST", "GET"],
        post(nodes::put_node_config).get(nodes::list_node_configs),
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
