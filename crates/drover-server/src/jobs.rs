//! Job operations shared by the HTTP and gRPC APIs.

use crate::auth::Caller;
use crate::{ApiError, AppState, submissions};
use drover_core::records::GroupView;
use drover_core::{GroupId, JobId, JobSpec, JobState, ValidationError};
use drover_store::{JobRecord, StoreError, Submission};

/// Stores a job of `caller`; `false` when its idempotency key returned an earlier one.
pub async fn submit(
    state: &AppState,
    spec: JobSpec,
    caller: &Caller,
) -> Result<(JobRecord, bool), ApiError> {
    let spec = check_provider(state, spec.validated()?)?;
    check_isolation(state, caller, &spec, "isolation")?;
    let submission = Submission {
        spec,
        owner: Some(caller.user.id.clone()),
    };
    let answer = submissions::store(state, vec![submission]).await?.pop();
    answer.ok_or_else(|| StoreError::BatchFailed("no answer".into()))?
}

/// Stores many jobs in one write (a batch submission); the specs are checked already
/// ([`checked_specs`]). Each answer stands alone.
pub async fn submit_many(
    state: &AppState,
    specs: Vec<JobSpec>,
    caller: &Caller,
) -> Result<Vec<Result<(JobRecord, bool), ApiError>>, ApiError> {
    let request = specs
        .into_iter()
        .map(|spec| Submission {
            spec,
            owner: Some(caller.user.id.clone()),
        })
        .collect();
    submissions::store(state, request).await
}

/// Jobs in one batch submission: what one request body (2 MiB) holds comfortably.
pub const MAX_BATCH_JOBS: usize = 1000;

/// The specs of a many-job request (`what`: "a batch", "a group"), each checked; a bad one
/// refuses the request, named `jobs[i].field`.
pub fn checked_specs(
    state: &AppState,
    caller: &Caller,
    specs: Vec<JobSpec>,
    max: usize,
    what: &str,
) -> Result<Vec<JobSpec>, ApiError> {
    if specs.is_empty() || specs.len() > max {
        return Err(ApiError::invalid(
            "jobs",
            format!("{what} holds 1 to {max} jobs"),
        ));
    }
    specs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let spec = spec
                .validated()
                .and_then(|spec| check_provider(state, spec))
                .map_err(|e| ApiError::invalid(format!("jobs[{i}].{}", e.field), e.message))?;
            check_isolation(state, caller, &spec, &format!("jobs[{i}].isolation"))?;
            Ok(spec)
        })
        .collect()
}

/// A plain user's command job must ask for an isolation mode the control plane lets users
/// have (`--user-isolation`); an inference job runs in the node's model, not a shell.
fn check_isolation(
    state: &AppState,
    caller: &Caller,
    spec: &JobSpec,
    field: &str,
) -> Result<(), ApiError> {
    let allowed = &state.config.user_isolation;
    if caller.is_admin()
        || spec.kind == drover_core::JobKind::Inference
        || allowed.contains(&spec.isolation)
    {
        return Ok(());
    }
    let modes: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
    Err(ApiError::PermissionDenied(format!(
        "{field}: {} is for admins on this control plane (it runs with the worker's rights); \
         users may ask for {} (drover server --user-isolation)",
        spec.isolation.as_str(),
        if modes.is_empty() {
            "none".to_string()
        } else {
            modes.join(" or ")
        }
    )))
}

/// A job may name only a provider this control plane has: otherwise it would wait forever.
pub fn check_provider(state: &AppState, spec: JobSpec) -> Result<JobSpec, ValidationError> {
    match &spec.provider {
        Some(p) if !state.config.providers.iter().any(|c| c.name() == p) => {
            let configured: Vec<&str> = state.config.providers.iter().map(|c| c.name()).collect();
            Err(ValidationError::new(
                "provider",
                format!(
                    "{p:?} is not a provider of this control plane (configured: {})",
                    if configured.is_empty() {
                        "none".to_string()
                    } else {
                        configured.join(", ")
                    }
                ),
            ))
        }
        _ => Ok(spec),
    }
}

/// Fails a live attempt the control plane gave up on (its worker's lease ran out, the
/// worker came back without it, the node was revoked); the retry policy decides what comes
/// next. Followers, the dispatcher (a retry may be queued) and the webhook sender are told.
pub async fn fail_lost_run(
    state: &AppState,
    run_id: drover_core::RunId,
    error: String,
) -> Result<drover_store::Finished, StoreError> {
    let end = drover_store::RunEnd {
        outcome: drover_core::RunOutcome::Failed,
        exit_code: None,
        error: Some(error),
        result: None,
    };
    let finished = state
        .store
        .finish_run(run_id, None, end, state.retry_settings())
        .await?;
    state.notify_job(finished.job.id, finished.job.state);
    state.dispatch.notify_one();
    state.webhooks.notify_one();
    Ok(finished)
}

pub async fn cancel(state: &AppState, id: JobId) -> Result<JobRecord, ApiError> {
    let cancelled = state.store.cancel_job(id, "cancelled by request").await?;
    if let Some(run) = &cancelled.run {
        state
            .tell_everywhere(drover_store::Wakeup::Cancel {
                worker_id: run.worker_id,
                run_id: run.id,
            })
            .await;
    }
    tracing::info_span!("job", job_id = %id).in_scope(|| tracing::info!("cancelled"));
    state.notify_job(id, cancelled.job.state);
    state.dispatch.notify_one();
    state.webhooks.notify_one();
    Ok(cancelled.job)
}

pub fn parse_state(s: &str) -> Result<Option<JobState>, ApiError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<JobState>().map(Some).map_err(ApiError::from)
}

/// Cancels every member of a group not final yet, last first, so that they end CANCELLED
/// rather than SKIPPED by the cancel of the one before.
pub async fn cancel_group(state: &AppState, id: GroupId) -> Result<GroupView, ApiError> {
    let view = state.store.get_group(id).await?;
    for job in view.jobs.iter().rev().filter(|j| !j.state.is_terminal()) {
        match cancel(state, job.id).await {
            // Final meanwhile (it ended, or was skipped with an earlier member).
            Ok(_) | Err(ApiError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(state.store.get_group(id).await?)
}
