//! Job operations shared by the HTTP and gRPC APIs.

use crate::auth::Caller;
use crate::{ApiError, AppState};
use drover_core::{JobId, JobSpec, JobState, ValidationError};
use drover_store::{JobRecord, Store, StoreError, Submission};

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
    let answer = state.submissions.call(vec![submission]).await?.pop();
    let (job, created) = answer.ok_or_else(|| StoreError::BatchFailed("no answer".into()))??;
    if !created {
        return Ok((job, false));
    }
    announce_submitted(state, &job);
    state.nudge_dispatch().await;
    state.webhooks.notify_one();
    Ok((job, true))
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

/// What the store answered for each job of one submission request, in order.
pub type Submitted = Vec<Result<(JobRecord, bool), StoreError>>;

/// Jobs per transaction when the submission requests that gathered are written together:
/// a commit rewrites the hot pages (the tails of the jobs and events tables and their
/// indexes) once, whatever it holds.
const JOBS_PER_WRITE: usize = 1024;

/// Writes gathered submission requests (one job, or a batch of up to [`MAX_BATCH_JOBS`]),
/// consecutive requests together in transactions of up to [`JOBS_PER_WRITE`] jobs. A
/// request is never split: its jobs are written in one transaction, or none are.
pub async fn write_submissions(
    store: &dyn Store,
    requests: Vec<Vec<Submission>>,
) -> Result<Vec<Result<Submitted, StoreError>>, StoreError> {
    let mut answers = Vec::with_capacity(requests.len());
    let mut requests = requests.into_iter().peekable();
    while requests.peek().is_some() {
        let mut sizes = Vec::new();
        let mut jobs = Vec::new();
        while let Some(request) =
            requests.next_if(|next| sizes.is_empty() || jobs.len() + next.len() <= JOBS_PER_WRITE)
        {
            sizes.push(request.len());
            jobs.extend(request);
        }
        let count = jobs.len();
        match store.create_jobs(jobs).await {
            Ok(written) if written.len() == count => {
                let mut written = written.into_iter();
                for size in sizes {
                    answers.push(Ok(written.by_ref().take(size).collect()));
                }
            }
            outcome => {
                let message = match outcome {
                    Ok(written) => format!("{} answers for {count} jobs", written.len()),
                    Err(e) => e.to_string(),
                };
                tracing::error!(%message, "cannot write submissions");
                answers.extend(
                    sizes
                        .iter()
                        .map(|_| Err(StoreError::BatchFailed(message.clone()))),
                );
            }
        }
    }
    Ok(answers)
}

/// Stores many jobs in one write (a batch submission). The specs are validated already;
/// each answer stands alone: a job refused by the store (an unknown dependency, say) does
/// not keep the others out.
pub async fn submit_many(
    state: &AppState,
    specs: Vec<JobSpec>,
    caller: &Caller,
) -> Result<Vec<Result<(JobRecord, bool), ApiError>>, ApiError> {
    let owner = Some(caller.user.id.as_str());
    let submissions = specs
        .into_iter()
        .map(|spec| Submission {
            spec,
            owner: owner.map(str::to_string),
        })
        .collect();
    let answers = state.submissions.call(submissions).await?;
    let mut any_created = false;
    let answers = answers
        .into_iter()
        .map(|answer| {
            let (job, created) = answer?;
            if created {
                announce_submitted(state, &job);
                any_created = true;
            }
            Ok((job, created))
        })
        .collect();
    if any_created {
        state.nudge_dispatch().await;
        state.webhooks.notify_one();
    }
    Ok(answers)
}

fn announce_submitted(state: &AppState, job: &JobRecord) {
    metrics::counter!("drover_jobs_submitted_total").increment(1);
    tracing::info_span!("job", job_id = %job.id)
        .in_scope(|| tracing::info!(name = %job.name, "submitted"));
    state.notify_job(job.id, job.state);
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

pub fn parse_id(s: &str) -> Result<JobId, ApiError> {
    s.parse::<JobId>().map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_store::prelude::*;
    use drover_store::{Migrations, SqlStore};

    fn submission(name: String, depends_on: Vec<JobId>) -> Submission {
        let spec = JobSpec {
            name,
            command: Some("true".into()),
            depends_on,
            ..Default::default()
        };
        Submission {
            spec: spec.validated().expect("a valid spec"),
            owner: None,
        }
    }

    #[tokio::test]
    async fn gathered_requests_are_answered_each_with_its_own_jobs_in_order() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}", dir.path().join("drover.db").display());
        let store = SqlStore::open(&url, Migrations::Apply)
            .await
            .expect("a store");
        // 1,000 + 30 passes the per-transaction limit: the second request starts the next
        // transaction rather than being cut in two.
        let sizes = [1000, 30, 1000, 1];
        let requests: Vec<Vec<Submission>> = sizes
            .iter()
            .enumerate()
            .map(|(r, &size)| {
                (0..size)
                    .map(|j| {
                        // One job of the second request waits on a job that does not exist:
                        // refused alone.
                        let depends_on = if (r, j) == (1, 7) {
                            vec![JobId::new()]
                        } else {
                            Vec::new()
                        };
                        submission(format!("r{r}-{j}"), depends_on)
                    })
                    .collect()
            })
            .collect();
        let answers = write_submissions(&store, requests).await.expect("written");
        assert_eq!(answers.len(), sizes.len());
        for (r, (answer, &size)) in answers.into_iter().zip(&sizes).enumerate() {
            let jobs = answer.expect("a request answered");
            assert_eq!(jobs.len(), size, "request {r}");
            for (j, job) in jobs.into_iter().enumerate() {
                if (r, j) == (1, 7) {
                    assert!(job.is_err(), "an unknown dependency is refused");
                    continue;
                }
                let (job, created) = job.expect("stored");
                assert!(created);
                assert_eq!(job.name, format!("r{r}-{j}"));
                assert_eq!(
                    store.get_job(job.id).await.expect("readable").name,
                    job.name
                );
            }
        }
    }
}
