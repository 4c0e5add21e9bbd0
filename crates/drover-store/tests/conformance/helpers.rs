//! What the store's tests build over and over: a valid spec, a run's end, a registered
//! worker, an assigned run. Shared by the conformance suite and the store's own unit tests
//! (which include this file by path), so that both build things the same way.

// Two test crates include this file; each uses a part of it.
#![allow(dead_code)]

use drover_core::{Capabilities, JobId, JobSpec, RunId, RunOutcome, Timestamp, WorkerId};
use drover_store::{RetrySettings, RunEnd, Store};
use std::time::Duration;

pub const NO_JITTER: RetrySettings = RetrySettings {
    default_backoff_base: Duration::from_secs(10),
    jitter: 0.0,
};

pub fn spec(command: &str) -> JobSpec {
    JobSpec {
        command: Some(command.into()),
        ..Default::default()
    }
    .validated()
    .expect("valid spec")
}

pub fn end(outcome: RunOutcome, exit_code: i32) -> RunEnd {
    RunEnd {
        outcome,
        exit_code: Some(exit_code),
        error: None,
        // What the run produced is kept with it and with its job.
        result: Some(serde_json::json!({"exit": exit_code})),
    }
}

pub fn later() -> Timestamp {
    Timestamp::now().plus(Duration::from_secs(60))
}

pub async fn worker(store: &dyn Store) -> WorkerId {
    let token = store
        .create_join_token(Duration::from_secs(60))
        .await
        .unwrap();
    let (w, _) = store
        .register_worker(&token.token, "w", &Capabilities::default())
        .await
        .unwrap();
    w.id
}

/// A queued job of `command`.
pub async fn queued_job(store: &dyn Store, command: &str) -> JobId {
    store.create_job(spec(command)).await.unwrap().0.id
}

/// A job assigned to a new worker: (job, run, worker).
pub async fn assigned_run(store: &dyn Store) -> (JobId, RunId, WorkerId) {
    let job = queued_job(store, "true").await;
    let w = worker(store).await;
    let run = store
        .assign_job(job, w, later())
        .await
        .unwrap()
        .expect("assignable")
        .run;
    (job, run.id, w)
}
