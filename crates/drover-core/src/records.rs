//! What the store returns. These are also the shapes of the HTTP API's JSON.

use crate::{
    Capabilities, EventKind, JobId, JobSpec, JobState, RunId, RunOutcome, RunState, Timestamp,
    WorkerId, WorkerState,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub name: String,
    pub state: JobState,
    /// 0 succeeded, 1 failed, 2 timed out, 3 cancelled, 4 skipped, 10+ not final.
    pub status_code: i32,
    pub priority: i32,
    pub attempts: u32,
    pub max_attempts: u32,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub not_before: Timestamp,
    pub current_run: Option<RunId>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    pub spec: JobSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: RunId,
    pub job_id: JobId,
    pub attempt: u32,
    /// The run this one retries: a job's attempts form a chain.
    pub retry_of: Option<RunId>,
    pub worker_id: WorkerId,
    pub state: RunState,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub assigned_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub lease_expires_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: i64,
    pub at: Timestamp,
    pub job_id: Option<JobId>,
    /// The node the event is about (named apart from the `worker_id` some events carry).
    #[serde(rename = "node_id")]
    pub worker_id: Option<WorkerId>,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub name: String,
    pub state: WorkerState,
    pub capabilities: Capabilities,
    pub created_at: Timestamp,
    pub last_seen_at: Timestamp,
}

/// Where a run's log lives and how much of it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogIndex {
    pub run_id: RunId,
    /// `file:///…` of the append-only log file.
    pub uri: String,
    pub size_bytes: u64,
    pub entry_count: u64,
    /// Highest sequence number stored; 0 when none is.
    pub last_seq: u64,
    /// Sequence numbers skipped over (never received).
    pub gaps: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyJob {
    pub id: JobId,
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub run: RunRecord,
    pub job: JobRecord,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEnd {
    pub outcome: RunOutcome,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub job: JobRecord,
    pub run: RunRecord,
    /// False when the run had already ended: nothing was changed.
    pub changed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cancelled {
    pub job: JobRecord,
    /// The live run that was cancelled with it, for the worker to kill.
    pub run: Option<RunRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Shown once; the store keeps only its hash.
    pub token: String,
    pub expires_at: Timestamp,
}

/// A run with where its log is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunView {
    #[serde(flatten)]
    pub run: RunRecord,
    pub log: Option<LogIndex>,
}

/// A job with its chain of attempts, as `GET /v1/jobs/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: JobRecord,
    pub runs: Vec<RunView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub worker: WorkerRecord,
    pub connected: bool,
    pub live_runs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One log entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntryView {
    pub run_id: RunId,
    pub attempt: u32,
    pub seq: u64,
    pub stream: LogStream,
    pub timestamp: Timestamp,
    /// The line as text (invalid UTF-8 replaced).
    pub text: String,
    /// The exact bytes, base64.
    pub data: String,
}

/// The body of every API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}
