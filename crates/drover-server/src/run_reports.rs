//! What workers say about their runs (accepted, started, ended), written in batches in the
//! order they arrived: a run's accept, start and end reach the store in that order, because
//! they go through one queue and a batch writes its steps before its ends.

use crate::AppState;
use crate::batcher::Gathered;
use drover_core::JobId;
use drover_store::{FinishRequest, Finished, RetrySettings, StepRequest, Store, StoreError};
use std::sync::Arc;

#[derive(Clone)]
pub enum RunReport {
    Step(StepRequest),
    End(FinishRequest),
}

pub enum Written {
    Step(JobId),
    End(Box<Finished>),
}

/// The writing end: runs until the server stops. The other end is the session's
/// (`grpc.rs`), which queues each report as it arrives.
pub async fn writer(state: Arc<AppState>, gathered: Gathered<RunReport, Written>) {
    gathered
        .write_with(move |batch| {
            let state = state.clone();
            async move { write(&*state.store, batch, state.retry_settings()).await }
        })
        .await
}

/// Writes a batch: its steps, then its ends, in one transaction.
async fn write(
    store: &dyn Store,
    batch: Vec<RunReport>,
    retry: RetrySettings,
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    let mut steps = Vec::new();
    let mut ends = Vec::new();
    let is_step: Vec<bool> = batch
        .into_iter()
        .map(|report| match report {
            RunReport::Step(s) => {
                steps.push(s);
                true
            }
            RunReport::End(e) => {
                ends.push(e);
                false
            }
        })
        .collect();
    let (steps_written, ends_written) = store.report_runs(steps, ends, retry).await?;
    let mut steps_written = steps_written.into_iter();
    let mut ends_written = ends_written.into_iter();
    let short = || {
        Err(StoreError::BatchFailed(
            "a batch answer went missing".into(),
        ))
    };
    Ok(is_step
        .into_iter()
        .map(|step| match step {
            true => steps_written
                .next()
                .map_or_else(short, |a| a.map(Written::Step)),
            false => ends_written
                .next()
                .map_or_else(short, |a| a.map(|f| Written::End(Box::new(f)))),
        })
        .collect())
}
