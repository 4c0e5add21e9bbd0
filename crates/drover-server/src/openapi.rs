//! The OpenAPI 3.1 document of the HTTP API, served at `GET /v1/openapi.json`.
//!
//! Each operation is described here, one function per route of `http::routes`, with the
//! handlers' own request and response types, so a changed field changes the document. The
//! unit test below fails when the route table and the document disagree on a method or a
//! path; the errors every operation can answer, and who must be signed in, are added from
//! the route table itself ([`Conventions`]). The functions below are descriptions only:
//! utoipa reads their attributes, nothing calls them. What a handler really answers is
//! checked against them by fuzzing the live API with schemathesis (`tests/openapi.rs`).
#![allow(dead_code)]

use crate::http::access::{
    ApiTokenRequest, CreatedToken, LoginRequest, RefreshRequest, UserRequest,
};
use crate::http::jobs::{BatchRequest, GroupRequest};
use crate::http::nodes::{NodeConfigRequest, TokenRequest};
use crate::http::webhooks::CreatedWebhook;
use crate::http::{Access, route_table};
use crate::openai::CompletionRequest;
use drover_core::records::{
    ApiTokenRecord, AuditRecord, BatchSubmitted, DeliveryRecord, ErrorBody, EventRecord, GroupView,
    IssuedTokens, JobRecord, JobView, JoinToken, LogEntryView, NodeConfigRecord, NodeView,
    ReservationRecord, UserRecord, WebhookRecord,
};
use drover_core::reservation::ReservationRequest;
use drover_core::webhook::WebhookRequest;
use drover_core::{GroupId, JobId, JobSpec, ReservationId, RunId, WorkerId};
use utoipa::OpenApi;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "drover",
        description = "Jobs and inference on a fleet of machines. Every error is an `ErrorBody` \
                       naming its `code` and, for bad input, the `field`. Durations are in \
                       milliseconds (`*_ms`), times RFC 3339, ids UUIDs."
    ),
    paths(
        healthz, readyz, metrics, openapi_json, login, refresh, logout, whoami,
        create_api_token, list_api_tokens, revoke_api_token, list_models, chat_completions,
        completions, submit_job, list_jobs, submit_job_batch, get_job, job_events, job_logs,
        wait_job, cancel_job, retry_run, create_group, get_group, cancel_group,
        create_reservation, get_reservation, release_reservation, create_user, list_users,
        list_audit, add_webhook, list_webhooks, list_deliveries, create_node_token, list_nodes,
        get_node, node_events, revoke_node, list_providers, put_node_config, list_node_configs,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Conventions),
)]
struct ApiDoc;

/// The document, built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    DOC.get_or_init(ApiDoc::openapi)
}

/// The document as served: JSON, made once.
pub fn document_json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| {
        let mut doc = match serde_json::to_value(document()) {
            Ok(doc) => doc,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize the OpenAPI document");
                return "{}".into();
            }
        };
        // utoipa 5.5 writes a link's fields in snake case; OpenAPI names them in camel case.
        if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
            for link in paths
                .values_mut()
                .filter_map(|item| item.as_object_mut())
                .flat_map(|item| item.values_mut())
                .filter_map(|op| op.get_mut("responses")?.as_object_mut())
                .flat_map(|responses| responses.values_mut())
                .filter_map(|response| response.get_mut("links")?.as_object_mut())
                .flat_map(|links| links.values_mut())
                .filter_map(|link| link.as_object_mut())
            {
                for (snake, camel) in [
                    ("operation_id", "operationId"),
                    ("operation_ref", "operationRef"),
                    ("request_body", "requestBody"),
                ] {
                    if let Some(v) = link.remove(snake) {
                        link.insert(camel.into(), v);
                    }
                }
            }
        }
        doc.to_string()
    })
}

/// What holds for every operation, from the route table: the bearer token it needs (none
/// for public routes) and the errors any of them can answer, each an `ErrorBody`.
struct Conventions;

impl utoipa::Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "an access token from /v1/auth/login, or an API token (drover token create)",
                    ))
                    .build(),
            ),
        );
        let table = route_table();
        // Where the ids of later calls come from, for clients and for fuzzers that follow
        // links from a creation to the calls on what it created.
        let links: [(&str, &str, &str, &[&str]); 4] = [
            (
                "/v1/jobs",
                "201",
                "$response.body#/id",
                &[
                    "get_job",
                    "job_events",
                    "job_logs",
                    "wait_job",
                    "cancel_job",
                ],
            ),
            (
                "/v1/jobs/{id}",
                "200",
                "$response.body#/runs/0/run/id",
                &["retry_run"],
            ),
            (
                "/v1/groups",
                "201",
                "$response.body#/group/id",
                &["get_group", "cancel_group"],
            ),
            (
                "/v1/reservations",
                "201",
                "$response.body#/id",
                &["get_reservation", "release_reservation"],
            ),
        ];
        for (path, status, id, targets) in links {
            let response = doc
                .paths
                .paths
                .get_mut(path)
                .and_then(|item| item.post.as_mut().or(item.get.as_mut()))
                .and_then(|op| op.responses.responses.get_mut(status));
            if let Some(RefOr::T(response)) = response {
                for target in targets {
                    let link = utoipa::openapi::link::LinkBuilder::new()
                        .operation_id(*target)
                        .parameter("id", id)
                        .build();
                    response.links.insert((*target).to_string(), RefOr::T(link));
                }
            }
        }
        for (path, item) in doc.paths.paths.iter_mut() {
            let operations: [(&str, &mut Option<Operation>); 2] =
                [("GET", &mut item.get), ("POST", &mut item.post)];
            for (method, operation) in operations {
                let Some(op) = operation else { continue };
                let access = table
                    .iter()
                    .find(|r| r.path == path && r.method == method)
                    .map(|r| r.access);
                let mut errors = vec![
                    (400, "bad input: the field is named"),
                    (404, "no such route, or no such object of the caller's"),
                    (413, "the body is over 2 MiB"),
                    (503, "the database is unavailable; try again"),
                ];
                match access {
                    Some(Access::Public) => {
                        op.security = Some(Vec::new());
                        errors.push((429, "too many failed logins; wait"));
                    }
                    _ => {
                        op.security =
                            Some(vec![utoipa::openapi::security::SecurityRequirement::new(
                                "bearer",
                                Vec::<String>::new(),
                            )]);
                        errors.push((401, "no valid token"));
                        errors.push((403, "not the caller's, or admins only"));
                        errors.push((409, "the object's state does not allow it"));
                    }
                }
                for (status, description) in errors {
                    let key = status.to_string();
                    if op.responses.responses.contains_key(&key) {
                        continue;
                    }
                    let response = ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                                    "ErrorBody",
                                ))))
                                .build(),
                        )
                        .build();
                    op.responses.responses.insert(key, RefOr::T(response));
                }
            }
        }
    }
}

// ----------------------------------------------------------------- health and metrics

/// Alive: answers while the process runs, whatever the database does.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "ok", body = String, content_type = "text/plain")))]
fn healthz() {}

/// Ready: the database answers within a second (and, with --require-inference, a node
/// serves a model).
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "ready", body = String, content_type = "text/plain"),
        (status = 503, description = "not ready, and why", body = String, content_type = "text/plain"),
    ))]
fn readyz() {}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "text exposition format", body = String, content_type = "text/plain")))]
fn metrics() {}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health",
    responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
fn openapi_json() {}

// ----------------------------------------------------------------- users and tokens

/// Signs in: an access token and a refresh token.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = IssuedTokens), (status = 401, description = "wrong user or password", body = ErrorBody)))]
fn login() {}

/// A new access token for a refresh token, which is used up.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = IssuedTokens), (status = 401, description = "unknown, used or expired refresh token", body = ErrorBody)))]
fn refresh() {}

/// Ends the session of the token used.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", responses((status = 204, description = "signed out")))]
fn logout() {}

/// The caller.
#[utoipa::path(get, path = "/v1/auth/whoami", tag = "auth", responses((status = 200, body = UserRecord)))]
fn whoami() {}

/// An API token for scripts, shown once.
#[utoipa::path(post, path = "/v1/tokens", tag = "auth", request_body = ApiTokenRequest,
    responses((status = 201, body = CreatedToken)))]
fn create_api_token() {}

/// The caller's API tokens (an admin's: everyone's).
#[utoipa::path(get, path = "/v1/tokens", tag = "auth", responses((status = 200, body = Vec<ApiTokenRecord>)))]
fn list_api_tokens() {}

/// Revokes an API token.
#[utoipa::path(post, path = "/v1/tokens/{id}/revoke", tag = "auth",
    params(("id" = String, Path, description = "token id")),
    responses((status = 200, body = ApiTokenRecord)))]
fn revoke_api_token() {}

/// Users (admins only).
#[utoipa::path(post, path = "/v1/users", tag = "auth", request_body = UserRequest,
    responses((status = 201, body = UserRecord)))]
fn create_user() {}

#[utoipa::path(get, path = "/v1/users", tag = "auth", responses((status = 200, body = Vec<UserRecord>)))]
fn list_users() {}

/// The audit trail, newest first (admins only).
#[utoipa::path(get, path = "/v1/audit", tag = "auth",
    params(("limit" = Option<u32>, Query, description = "at most this many (default 200)")),
    responses((status = 200, body = Vec<AuditRecord>)))]
fn list_audit() {}

// ----------------------------------------------------------------- inference

/// Models served by connected nodes (OpenAI's list).
#[utoipa::path(get, path = "/v1/models", tag = "inference", responses((status = 200, body = Object)))]
fn list_models() {}

/// OpenAI-compatible chat completion; `stream: true` answers server-sent events.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "inference", request_body = CompletionRequest,
    responses((status = 200, content((Object = "application/json"), (Object = "text/event-stream")))))]
fn chat_completions() {}

/// OpenAI-compatible text completion of `prompt`.
#[utoipa::path(post, path = "/v1/completions", tag = "inference", request_body = CompletionRequest,
    responses((status = 200, content((Object = "application/json"), (Object = "text/event-stream")))))]
fn completions() {}

// ----------------------------------------------------------------- jobs

/// Queues a job (with an idempotency key already used: the first job, 200).
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = JobSpec,
    responses((status = 201, body = JobRecord), (status = 200, description = "the job this idempotency key made", body = JobRecord)))]
fn submit_job() {}

/// The caller's jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(
        ("state" = Option<String>, Query, description = "only jobs in this state (QUEUED, RUNNING, SUCCEEDED, …)"),
        ("limit" = Option<u32>, Query, description = "at most this many (default 100)"),
    ),
    responses((status = 200, body = Vec<JobRecord>)))]
fn list_jobs() {}

/// Up to 1,000 jobs in one request; each is stored or refused alone.
#[utoipa::path(post, path = "/v1/jobs/batch", tag = "jobs", request_body = BatchRequest,
    responses((status = 201, body = BatchSubmitted)))]
fn submit_job_batch() {}

/// A job with its attempts.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = JobId, Path)),
    responses((status = 200, body = JobView)))]
fn get_job() {}

/// A job's events, oldest first.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = JobId, Path)),
    responses((status = 200, body = Vec<EventRecord>)))]
fn job_events() {}

/// A job's output; `follow=true` streams it as server-sent events until the job ends.
#[utoipa::path(get, path = "/v1/jobs/{id}/logs", tag = "jobs",
    params(
        ("id" = JobId, Path),
        ("attempt" = Option<u32>, Query, description = "this attempt (default: the last)"),
        ("follow" = Option<bool>, Query, description = "stream until the job ends"),
        ("format" = Option<String>, Query, description = "entries (default) or compact, when following"),
    ),
    responses((status = 200, content((Vec<LogEntryView> = "application/json"), (Object = "text/event-stream")))))]
fn job_logs() {}

/// Long poll: the job when it is final, or as it is after the timeout.
#[utoipa::path(get, path = "/v1/jobs/{id}/wait", tag = "jobs",
    params(("id" = JobId, Path), ("timeout_ms" = Option<u64>, Query, description = "default 30 000, at most 300 000")),
    responses((status = 200, body = JobView)))]
fn wait_job() {}

/// Cancels a job that is not final.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = JobId, Path)),
    responses((status = 200, body = JobRecord)))]
fn cancel_job() {}

/// Runs a finished attempt again, as a new attempt of its job.
#[utoipa::path(post, path = "/v1/runs/{id}/retry", tag = "jobs", params(("id" = RunId, Path)),
    responses((status = 200, body = JobRecord)))]
fn retry_run() {}

/// A group: its jobs run in order, each after the one before succeeded.
#[utoipa::path(post, path = "/v1/groups", tag = "jobs", request_body = GroupRequest,
    responses((status = 201, body = GroupView)))]
fn create_group() {}

#[utoipa::path(get, path = "/v1/groups/{id}", tag = "jobs", params(("id" = GroupId, Path)),
    responses((status = 200, body = GroupView)))]
fn get_group() {}

/// Cancels every member not final yet.
#[utoipa::path(post, path = "/v1/groups/{id}/cancel", tag = "jobs", params(("id" = GroupId, Path)),
    responses((status = 200, body = GroupView)))]
fn cancel_group() {}

// ----------------------------------------------------------------- reservations

/// Holds a resource of a node: ACTIVE at once when it is free, else PENDING until it
/// frees (or 409 with `wait: false`).
#[utoipa::path(post, path = "/v1/reservations", tag = "reservations", request_body = ReservationRequest,
    responses((status = 201, body = ReservationRecord)))]
fn create_reservation() {}

#[utoipa::path(get, path = "/v1/reservations/{id}", tag = "reservations", params(("id" = ReservationId, Path)),
    responses((status = 200, body = ReservationRecord)))]
fn get_reservation() {}

#[utoipa::path(post, path = "/v1/reservations/{id}/release", tag = "reservations", params(("id" = ReservationId, Path)),
    responses((status = 200, body = ReservationRecord)))]
fn release_reservation() {}

// ----------------------------------------------------------------- webhooks (admins)

/// Subscribes a URL to job events; a generated secret is shown this once.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = WebhookRequest,
    responses((status = 201, body = CreatedWebhook)))]
fn add_webhook() {}

#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", responses((status = 200, body = Vec<WebhookRecord>)))]
fn list_webhooks() {}

/// Deliveries, newest first.
#[utoipa::path(get, path = "/v1/webhooks/deliveries", tag = "webhooks",
    params(("limit" = Option<u32>, Query, description = "at most this many (default 100)")),
    responses((status = 200, body = Vec<DeliveryRecord>)))]
fn list_deliveries() {}

// ----------------------------------------------------------------- nodes (admins)

/// A one-time join token for a worker.
#[utoipa::path(post, path = "/v1/node-tokens", tag = "nodes", request_body(content = TokenRequest, description = "optional"),
    responses((status = 201, body = JoinToken)))]
fn create_node_token() {}

#[utoipa::path(get, path = "/v1/nodes", tag = "nodes", responses((status = 200, body = Vec<NodeView>)))]
fn list_nodes() {}

#[utoipa::path(get, path = "/v1/nodes/{id}", tag = "nodes", params(("id" = WorkerId, Path)),
    responses((status = 200, body = NodeView)))]
fn get_node() {}

#[utoipa::path(get, path = "/v1/nodes/{id}/events", tag = "nodes", params(("id" = WorkerId, Path)),
    responses((status = 200, body = Vec<EventRecord>)))]
fn node_events() {}

/// The node's credential stops working; its attempts fail over.
#[utoipa::path(post, path = "/v1/nodes/{id}/revoke", tag = "nodes", params(("id" = WorkerId, Path)),
    responses((status = 200, body = NodeView)))]
fn revoke_node() {}

/// The providers that start workers, and the workers each started.
#[utoipa::path(get, path = "/v1/providers", tag = "nodes", responses((status = 200, body = Object)))]
fn list_providers() {}

/// A new node configuration version; the nodes it concerns get it at once.
#[utoipa::path(post, path = "/v1/node-configs", tag = "nodes", request_body = NodeConfigRequest,
    responses((status = 201, body = NodeConfigRecord)))]
fn put_node_config() {}

#[utoipa::path(get, path = "/v1/node-configs", tag = "nodes", responses((status = 200, body = Vec<NodeConfigRecord>)))]
fn list_node_configs() {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The document and the route table list the same operations: a route added without
    /// its description (or a description of a route that is gone) fails here.
    #[test]
    fn the_openapi_document_describes_every_route_and_only_those() {
        let table: BTreeSet<(String, String)> = route_table()
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        let mut documented = BTreeSet::new();
        for (path, item) in &document().paths.paths {
            if item.get.is_some() {
                documented.insert(("GET".to_string(), path.clone()));
            }
            if item.post.is_some() {
                documented.insert(("POST".to_string(), path.clone()));
            }
            assert!(
                item.put.is_none() && item.delete.is_none() && item.patch.is_none(),
                "{path}: only GET and POST are routed"
            );
        }
        assert_eq!(table, documented);
    }
}
