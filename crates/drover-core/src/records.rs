//! What the store returns. These are also the shapes of the HTTP API's JSON.

use crate::{
    Capabilities, EventKind, GroupId, JobId, JobSpec, JobState, ReservationId, RunId, RunOutcome,
    RunState, Timestamp, WebhookId, WorkerId, WorkerState,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The group the job belongs to and its place in it (0-based).
    pub group_id: Option<GroupId>,
    pub group_position: Option<u32>,
    /// Dependencies that have not succeeded yet; the job waits while this is above 0.
    pub waiting_on: u32,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    pub spec: JobSpec,
    /// What the last attempt produced, for jobs that produce one (an inference's
    /// completion and figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The user who submitted it (absent for jobs from before users existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub name: String,
    pub state: WorkerState,
    pub capabilities: Capabilities,
    pub created_at: Timestamp,
    pub last_seen_at: Timestamp,
    /// The provider that started the node (`local`, `docker`); absent when it joined by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The provider's id of what runs the node (a process id, a container id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// The node configuration version in force on the node, and how its last answer went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_config_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_ack: Option<ConfigAckRecord>,
}

/// A node's last answer to a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigAckRecord {
    pub config_version: u64,
    pub applied_at: Timestamp,
    /// `applied` or `failed`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One version of node configuration and the nodes it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeConfigRecord {
    pub version: u64,
    /// For this node only; otherwise for the nodes carrying every label of `labels` (none:
    /// every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<WorkerId>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub config: crate::NodeConfig,
    pub created_at: Timestamp,
}

impl NodeConfigRecord {
    pub fn concerns(
        &self,
        node: WorkerId,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        match self.node {
            Some(n) => n == node,
            None => self.labels.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }
}

/// The newest configuration that concerns a node.
pub fn desired_config<'a>(
    configs: &'a [NodeConfigRecord],
    node: WorkerId,
    labels: &std::collections::BTreeMap<String, String>,
) -> Option<&'a NodeConfigRecord> {
    configs
        .iter()
        .filter(|c| c.concerns(node, labels))
        .max_by_key(|c| c.version)
}

/// Where a run's log lives and how much of it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    pub resources: BTreeMap<String, u32>,
    pub reservation: Option<ReservationId>,
    pub isolation: crate::Isolation,
    pub provider: Option<String>,
    pub model: Option<String>,
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
    /// What the attempt produced (JSON), if anything.
    pub result: Option<serde_json::Value>,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinToken {
    /// Shown once; the store keeps only its hash.
    pub token: String,
    pub expires_at: Timestamp,
}

/// A run with where its log is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunView {
    #[serde(flatten)]
    pub run: RunRecord,
    pub log: Option<LogIndex>,
}

/// A job with its chain of attempts, as `GET /v1/jobs/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    #[serde(flatten)]
    pub job: JobRecord,
    pub runs: Vec<RunView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    #[serde(flatten)]
    pub worker: WorkerRecord,
    pub connected: bool,
    pub live_runs: usize,
    /// The newest configuration version that concerns the node (what it should apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_config_version: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One log entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogEntryView {
    pub run_id: RunId,
    pub attempt: u32,
    pub seq: u64,
    pub stream: LogStream,
    pub timestamp: Timestamp,
    /// The line as text (invalid UTF-8 replaced).
    pub text: String,
    /// The exact bytes, base64, when they are not valid UTF-8 (otherwise `text` is exact):
    /// a follower of a fast producer should not receive every line twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// One attempt's log entries as a follower asking for the compact format receives them
/// (`GET /v1/jobs/{id}/logs?follow=true&format=compact`, event `compact`): the run and
/// attempt once, then each entry as `[seq, timestamp_us, stream, text]` — stream 1 is stdout,
/// 2 stderr — with a fifth element, the exact bytes in base64, when they are not valid UTF-8.
/// A follower of a fast producer decodes it at several times the rate of `LogEntryView`s
/// (no keys, no UUID and no RFC 3339 time per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactLogBatch {
    pub run_id: RunId,
    pub attempt: u32,
    pub entries: Vec<CompactLogEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactLogEntry {
    pub seq: u64,
    pub timestamp: Timestamp,
    pub stream: LogStream,
    pub text: String,
    pub data: Option<String>,
}

impl CompactLogBatch {
    /// None for no entries. The entries are those of one attempt, as a follower's batches are.
    pub fn from_views(views: Vec<LogEntryView>) -> Option<Self> {
        let first = views.first()?;
        let (run_id, attempt) = (first.run_id, first.attempt);
        Some(Self {
            run_id,
            attempt,
            entries: views
                .into_iter()
                .map(|v| CompactLogEntry {
                    seq: v.seq,
                    timestamp: v.timestamp,
                    stream: v.stream,
                    text: v.text,
                    data: v.data,
                })
                .collect(),
        })
    }

    pub fn into_views(self) -> impl Iterator<Item = LogEntryView> {
        let (run_id, attempt) = (self.run_id, self.attempt);
        self.entries.into_iter().map(move |e| LogEntryView {
            run_id,
            attempt,
            seq: e.seq,
            stream: e.stream,
            timestamp: e.timestamp,
            text: e.text,
            data: e.data,
        })
    }
}

impl LogStream {
    /// 1 stdout, 2 stderr: in the compact follow format and in the control plane's log files.
    pub fn number(self) -> u8 {
        match self {
            Self::Stdout => 1,
            Self::Stderr => 2,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            1 => Some(Self::Stdout),
            2 => Some(Self::Stderr),
            _ => None,
        }
    }
}

impl Serialize for CompactLogEntry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut tuple = serializer.serialize_tuple(if self.data.is_some() { 5 } else { 4 })?;
        tuple.serialize_element(&self.seq)?;
        tuple.serialize_element(&self.timestamp.as_micros())?;
        tuple.serialize_element(&self.stream.number())?;
        tuple.serialize_element(&self.text)?;
        if let Some(data) = &self.data {
            tuple.serialize_element(data)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for CompactLogEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntryVisitor;
        impl<'de> serde::de::Visitor<'de> for EntryVisitor {
            type Value = CompactLogEntry;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("[seq, timestamp_us, stream (1 or 2), text] and optionally data")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                use serde::de::Error;
                let missing = |i| A::Error::invalid_length(i, &self);
                let entry_seq: u64 = seq.next_element()?.ok_or_else(|| missing(0))?;
                let micros: i64 = seq.next_element()?.ok_or_else(|| missing(1))?;
                let number = seq.next_element::<u8>()?.ok_or_else(|| missing(2))?;
                let stream = LogStream::from_number(number).ok_or_else(|| {
                    A::Error::custom(format!("stream {number}: 1 (stdout) or 2 (stderr)"))
                })?;
                let text: String = seq.next_element()?.ok_or_else(|| missing(3))?;
                let data: Option<String> = seq.next_element()?;
                Ok(CompactLogEntry {
                    seq: entry_seq,
                    timestamp: Timestamp(micros),
                    stream,
                    text,
                    data,
                })
            }
        }
        deserializer.deserialize_seq(EntryVisitor)
    }
}

/// The body of every API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

/// The answer of `POST /v1/jobs/batch`: one result per submitted job, in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchSubmitted {
    pub results: Vec<BatchResult>,
}

/// What became of one job of a batch: stored (or found by its idempotency key), or refused
/// alone (an unknown dependency or reservation) while the others were stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum BatchResult {
    Submitted {
        job: Box<JobRecord>,
        /// False when the idempotency key named a job submitted before.
        created: bool,
    },
    Refused {
        error: ErrorDetail,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum GroupState {
    /// Some member is not final yet.
    Running,
    /// Every member succeeded.
    Completed,
    /// A member failed for good; the ones after it were skipped.
    Partial,
    /// The group was cancelled.
    Cancelled,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Completed => "COMPLETED",
            Self::Partial => "PARTIAL",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Completed,
            Self::Partial,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|g| g.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupRecord {
    pub id: GroupId,
    pub name: String,
    pub state: GroupState,
    pub created_at: Timestamp,
    pub finished_at: Option<Timestamp>,
}

/// A group with its members in order, as `GET /v1/groups/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupView {
    #[serde(flatten)]
    pub group: GroupRecord,
    pub jobs: Vec<JobRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReservationState {
    /// Granted, waiting for the resource to free: no queued job takes it meanwhile, and
    /// the reservation's jobs start when it becomes active.
    Pending,
    Active,
    Released,
    Expired,
}

impl ReservationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Active => "ACTIVE",
            Self::Released => "RELEASED",
            Self::Expired => "EXPIRED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Active, Self::Released, Self::Expired]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// A direct claim on a resource of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReservationRecord {
    pub id: ReservationId,
    pub resource: String,
    pub amount: u32,
    pub worker_id: WorkerId,
    pub state: ReservationState,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookRecord {
    pub id: WebhookId,
    pub url: String,
    /// Event names delivered (`job.run.completed`, …); empty means all.
    pub events: Vec<String>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeliveryState {
    Pending,
    Delivered,
    /// Gave up after the last attempt.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Delivered => "DELIVERED",
            Self::Failed => "FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// One event for one webhook: the outbox row, written with the state change it reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryRecord {
    pub id: i64,
    pub webhook_id: WebhookId,
    pub url: String,
    pub event: String,
    /// The run id (or, for a job that never ran, the job id): receivers deduplicate by it.
    pub idempotency_key: String,
    pub payload: serde_json::Value,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt_at: Timestamp,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub delivered_at: Option<Timestamp>,
}

/// Webhook event names.
pub mod webhook_events {
    pub const COMPLETED: &str = "job.run.completed";
    pub const FAILED: &str = "job.run.failed";
    pub const TIMED_OUT: &str = "job.run.timed_out";
    pub const CANCELLED: &str = "job.run.cancelled";
    pub const SKIPPED: &str = "job.run.skipped";
    pub const ALL: &[&str] = &[COMPLETED, FAILED, TIMED_OUT, CANCELLED, SKIPPED];
}

/// What a user may do: a `user` sees and controls their own jobs, groups and reservations;
/// an `admin` everything, and manages nodes, users, tokens, webhooks and providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::User => "user",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Self::Admin),
            "user" => Some(Self::User),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: Timestamp,
}

/// A token for automation, as listed (the secret is shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiTokenRecord {
    pub id: String,
    pub name: String,
    pub user: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub last_used_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

/// What a login or a refresh hands out (`POST /v1/auth/login`, `/v1/auth/refresh`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IssuedTokens {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: String,
    /// Seconds the access token is valid.
    pub expires_in: u64,
}

/// One line of the audit trail: who did (or tried) what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub seq: i64,
    pub at: Timestamp,
    pub actor: Option<String>,
    pub action: String,
    pub target: Option<String>,
    /// `ok` or `refused`.
    pub outcome: String,
    pub address: Option<String>,
    pub detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(seq: u64, stream: LogStream, text: &str, data: Option<&str>) -> LogEntryView {
        LogEntryView {
            run_id: "0193f3a0-0000-7000-8000-000000000001"
                .parse()
                .expect("run id"),
            attempt: 2,
            seq,
            stream,
            timestamp: Timestamp(1_795_561_243_054_031),
            text: text.into(),
            data: data.map(str::to_string),
        }
    }

    #[test]
    fn a_compact_batch_carries_every_field_of_its_entries() {
        let views = vec![
            view(7, LogStream::Stdout, "hello \"there\"", None),
            view(9, LogStream::Stderr, "caf\u{fffd}", Some("Y2Fm6Q==")),
        ];
        let batch = CompactLogBatch::from_views(views.clone()).expect("entries");
        let json = serde_json::to_string(&batch).expect("serialize");
        assert!(
            json.contains(r#""entries":[[7,1795561243054031,1,"hello \"there\""],[9,1795561243054031,2,"caf�","Y2Fm6Q=="]]"#),
            "{json}"
        );
        let back: CompactLogBatch = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back.into_views().collect::<Vec<_>>(), views);
        assert_eq!(CompactLogBatch::from_views(Vec::new()), None);
    }

    #[test]
    fn a_compact_entry_with_a_bad_stream_or_too_few_elements_is_refused() {
        let run = r#"{"run_id":"0193f3a0-0000-7000-8000-000000000001","attempt":1,"entries":"#;
        for (entries, says) in [
            ("[[1,2,3,\"x\"]]", "stream 3"),
            ("[[1,2,1]]", "invalid length 3"),
        ] {
            let err = serde_json::from_str::<CompactLogBatch>(&format!("{run}{entries}}}"))
                .expect_err(entries)
                .to_string();
            assert!(err.contains(says), "{entries}: {err}");
        }
    }
}
