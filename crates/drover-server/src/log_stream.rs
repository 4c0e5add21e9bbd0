//! A job's log over HTTP: read whole from the log files, or followed as server-sent events
//! while it is written, attempt after attempt, until the job is final. The OpenAI API
//! follows an inference job's tokens through the same [`follow_logs`].

use crate::auth::Owned;
use crate::extract::query;
use crate::logs::Entry;
use crate::{ApiError, ApiResult, AppState, Notice, SharedState};
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use drover_core::JobId;
use drover_core::RunId;
use drover_core::records::{CompactLogBatch, LogEntryView};
use drover_store::{JobRecord, RunRecord};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// A follower re-reads the store at least this often, even without a notice.
pub(crate) const FOLLOW_POLL: Duration = Duration::from_secs(1);
const READ_CHUNK: u64 = 1 << 20;
/// Log entries per server-sent event when following.
const FOLLOW_BATCH: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogsQuery {
    attempt: Option<u32>,
    #[serde(default)]
    follow: bool,
    #[serde(default)]
    format: FollowFormat,
}

/// How a follower receives entries: `entries`, a JSON array of `LogEntryView`s per event;
/// `compact`, a `CompactLogBatch` per event (for followers of fast producers).
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FollowFormat {
    #[default]
    Entries,
    Compact,
}

fn entry_view(run: &RunRecord, e: Entry) -> LogEntryView {
    let (text, data) = match String::from_utf8(e.data) {
        Ok(text) => (text, None),
        Err(not_utf8) => {
            let bytes = not_utf8.into_bytes();
            let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
            (String::from_utf8_lossy(&bytes).into_owned(), Some(data))
        }
    };
    LogEntryView {
        run_id: run.id,
        attempt: run.attempt,
        seq: e.seq,
        stream: e.stream,
        timestamp: e.timestamp,
        text,
        data,
    }
}

fn pick_run(runs: &[RunRecord], attempt: Option<u32>) -> ApiResult<Option<RunRecord>> {
    match attempt {
        None => Ok(runs.last().cloned()),
        Some(n) => runs
            .iter()
            .find(|r| r.attempt == n)
            .cloned()
            .map(Some)
            .ok_or_else(|| ApiError::invalid("attempt", format!("the job has no attempt {n}"))),
    }
}

pub(crate) async fn job_logs(
    State(state): SharedState,
    Owned(id): Owned<JobId>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    state.store.get_job(id).await?;
    if q.format == FollowFormat::Compact && !q.follow {
        return Err(ApiError::invalid(
            "format",
            "format=compact is for following (follow=true); a stored log reads as a JSON array",
        ));
    }
    if q.follow {
        let (tx, rx) = mpsc::channel::<Followed>(256);
        tokio::spawn(follow_logs(state.clone(), id, q.attempt, tx));
        let format = q.format;
        let stream = futures::StreamExt::map(ReceiverStream::new(rx), move |f| {
            Ok::<_, Infallible>(match (f, format) {
                (Followed::Entries(batch), FollowFormat::Entries) => sse_json("entries", &batch),
                (Followed::Entries(batch), FollowFormat::Compact) => {
                    sse_json("compact", &CompactLogBatch::from_views(batch))
                }
                (Followed::End(job), _) => sse_json("end", &job),
            })
        });
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let runs = state.store.job_runs(id).await?;
    let mut out = Vec::new();
    if let Some(run) = pick_run(&runs, q.attempt)? {
        let mut offset = 0;
        loop {
            let (entries, next) = state
                .logs
                .read_from(run.id, offset, READ_CHUNK)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            if entries.is_empty() {
                break;
            }
            out.extend(entries.into_iter().map(|e| entry_view(&run, e)));
            offset = next;
        }
    }
    Ok(Json(out).into_response())
}

fn sse_json(name: &str, value: &impl Serialize) -> Event {
    // Serialized whole, then handed over: `json_data` writes through a writer that looks
    // for line breaks in every small piece serde emits (a third of a follower's cost).
    match serde_json::to_string(value) {
        Ok(json) => Event::default().event(name).data(json),
        Err(_) => Event::default().event(name),
    }
}

/// What a follower of a job's log receives.
pub(crate) enum Followed {
    Entries(Vec<LogEntryView>),
    /// The job is final: nothing more comes.
    End(Box<JobRecord>),
}

/// Streams a job's log entries as they are stored, moving on to the next attempt when the
/// job is retried, and ends with the job when it is final.
pub(crate) async fn follow_logs(
    state: Arc<AppState>,
    id: JobId,
    attempt: Option<u32>,
    tx: mpsc::Sender<Followed>,
) {
    let mut notices = state.notices.subscribe();
    let mut following: Option<(RunId, u64)> = None;
    loop {
        let (job, runs) = match (
            state.store.get_job(id).await,
            state.store.job_runs(id).await,
        ) {
            (Ok(job), Ok(runs)) => (job, runs),
            _ => return,
        };
        let run = match pick_run(&runs, attempt) {
            Ok(run) => run,
            Err(_) => return,
        };
        // Everything stored so far, before looking at the job again.
        while let Some(run) = &run {
            let offset = match following {
                Some((r, off)) if r == run.id => off,
                _ => 0,
            };
            let (entries, next) = match state.logs.read_from(run.id, offset, READ_CHUNK).await {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read log");
                    return;
                }
            };
            following = Some((run.id, next));
            if entries.is_empty() {
                break;
            }
            // One event per batch: a follower of a fast producer must not pay an event per
            // line.
            let mut entries = entries.into_iter().peekable();
            while entries.peek().is_some() {
                let batch: Vec<LogEntryView> = entries
                    .by_ref()
                    .take(FOLLOW_BATCH)
                    .map(|e| entry_view(run, e))
                    .collect();
                if tx.send(Followed::Entries(batch)).await.is_err() {
                    return;
                }
            }
        }
        let run_done = run.as_ref().is_none_or(|r| r.state.is_terminal());
        let finished = job.state.is_terminal() || (attempt.is_some() && run_done);
        if finished {
            let _ = tx.send(Followed::End(Box::new(job))).await;
            return;
        }
        let run_id = run.as_ref().map(|r| r.id);
        let deadline = tokio::time::Instant::now() + FOLLOW_POLL;
        wait_for(&mut notices, deadline, |n| match n {
            Notice::Job { job_id, .. } => *job_id == id,
            Notice::Log { run_id: r } => Some(*r) == run_id,
        })
        .await;
        if tx.is_closed() {
            return;
        }
    }
}

/// Waits until a notice matching `wanted` arrives, the deadline passes, or notices were
/// missed (the caller re-reads the store in every case).
pub(crate) async fn wait_for(
    notices: &mut broadcast::Receiver<Notice>,
    deadline: tokio::time::Instant,
    wanted: impl Fn(&Notice) -> bool,
) {
    let _ = tokio::time::timeout_at(deadline, async {
        loop {
            match notices.recv().await {
                Ok(n) if wanted(&n) => return,
                Ok(_) => continue,
                Err(_) => return,
            }
        }
    })
    .await;
}
