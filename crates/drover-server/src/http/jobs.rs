//! Jobs, their runs and groups.

use crate::auth::{Caller, Owned};
use crate::extract::{parse_body, query};
use crate::log_stream::{FOLLOW_POLL, wait_for};
use crate::{ApiError, ApiResult, AppState, Notice, SharedState, jobs};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use drover_core::records::{BatchResult, BatchSubmitted, GroupView, JobView, RunView};
use drover_core::{GroupId, JobId, JobSpec, RunId};
use drover_store::JobRecord;
use serde::Deserialize;
use std::time::Duration;

pub(super) async fn submit_job(
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
pub(super) async fn submit_job_batch(
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
pub(super) struct ListQuery {
    #[serde(default)]
    state: String,
    limit: Option<u32>,
}

pub(super) async fn list_jobs(
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

pub(super) async fn get_job(
    State(state): SharedState,
    Owned(id): Owned<JobId>,
) -> ApiResult<Json<JobView>> {
    Ok(Json(job_view(&state, id).await?))
}

pub(super) async fn job_events(
    State(state): SharedState,
    Owned(id): Owned<JobId>,
) -> ApiResult<Json<Vec<drover_store::EventRecord>>> {
    state.store.get_job(id).await?;
    Ok(Json(state.store.job_events(id).await?))
}

pub(super) async fn cancel_job(
    State(state): SharedState,
    Owned(id): Owned<JobId>,
) -> ApiResult<Json<JobRecord>> {
    Ok(Json(jobs::cancel(&state, id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitQuery {
    timeout_ms: Option<u64>,
}

/// Long poll: answers when the job is final, or with its current state after the timeout.
pub(super) async fn wait_job(
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

/// Retries a finished attempt by hand: a new attempt in the same chain.
pub(super) async fn retry_run(
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

pub(super) async fn create_group(
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

pub(super) async fn get_group(
    State(state): SharedState,
    Owned(id): Owned<GroupId>,
) -> ApiResult<Json<GroupView>> {
    Ok(Json(state.store.get_group(id).await?))
}

pub(super) async fn cancel_group(
    State(state): SharedState,
    Owned(id): Owned<GroupId>,
) -> ApiResult<Json<GroupView>> {
    Ok(Json(jobs::cancel_group(&state, id).await?))
}
