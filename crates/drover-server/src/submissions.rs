//! Submitted jobs, written in batches: API calls hand their jobs to [`store`], which queues
//! them on the submissions batcher; [`writer`] writes what gathered meanwhile, consecutive
//! requests together in one transaction. Both ends of that batcher are here.

use crate::batcher::Gathered;
use crate::{ApiError, AppState};
use drover_store::{JobRecord, Store, StoreError, Submission};
use std::sync::Arc;

/// What the store answered for each job of one submission request, in order.
pub type Submitted = Vec<Result<(JobRecord, bool), StoreError>>;

/// Jobs per transaction when the submission requests that gathered are written together:
/// a commit rewrites the hot pages (the tails of the jobs and events tables and their
/// indexes) once, whatever it holds.
const JOBS_PER_WRITE: usize = 1024;

/// Stores the jobs of one request (one job, or a batch). Their specs are validated already;
/// each answer stands alone: a job refused by the store (an unknown dependency, say) does
/// not keep the others out. `true` beside a job: created now (`false`: its idempotency key
/// returned an earlier one). Followers, the dispatchers and the webhook sender are told.
pub async fn store(
    state: &AppState,
    request: Vec<Submission>,
) -> Result<Vec<Result<(JobRecord, bool), ApiError>>, ApiError> {
    let count = request.len();
    let answers = state.submissions.call(request).await?;
    if answers.len() != count {
        return Err(
            StoreError::BatchFailed(format!("{} answers for {count} jobs", answers.len())).into(),
        );
    }
    let mut any_created = false;
    let answers = answers
        .into_iter()
        .map(|answer| {
            let (job, created) = answer?;
            if created {
                announce(state, &job);
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

fn announce(state: &AppState, job: &JobRecord) {
    metrics::counter!("drover_jobs_submitted_total").increment(1);
    tracing::info_span!("job", job_id = %job.id)
        .in_scope(|| tracing::info!(name = %job.name, "submitted"));
    state.notify_job(job.id, job.state);
}

/// The writing end: runs until the server stops.
pub async fn writer(state: Arc<AppState>, gathered: Gathered<Vec<Submission>, Submitted>) {
    gathered
        .write_with(move |batch| {
            let store = state.store.clone();
            async move { write(&*store, batch).await }
        })
        .await
}

/// Writes gathered submission requests (one job, or a batch of up to
/// [`crate::jobs::MAX_BATCH_JOBS`]), consecutive requests together in transactions of up to
/// [`JOBS_PER_WRITE`] jobs. A request is never split: its jobs are written in one
/// transaction, or none are.
async fn write(
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

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::{JobId, JobSpec};
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
        let answers = write(&store, requests).await.expect("written");
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
