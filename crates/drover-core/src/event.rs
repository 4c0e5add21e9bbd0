//! The append-only record of what happened. Each event is written in the same transaction
//! as the state change it describes.

use crate::ids::{GroupId, RunId, WorkerId};
use crate::state::{JobEvent, JobState};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type")]
pub enum EventKind {
    JobCreated {
        name: String,
    },
    JobAssigned {
        run_id: RunId,
        worker_id: WorkerId,
        attempt: u32,
    },
    JobAccepted {
        run_id: RunId,
        worker_id: WorkerId,
    },
    JobStatusChanged {
        from: JobState,
        to: JobState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_id: Option<RunId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    JobRetryScheduled {
        run_id: RunId,
        next_attempt: u32,
        not_before: Timestamp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    JobCancelled {
        from: JobState,
        reason: String,
    },
    /// A user retried a finished attempt by hand.
    JobResubmitted {
        from: JobState,
        run_id: RunId,
        next_attempt: u32,
    },
    /// Every member of the group is final.
    GroupFinished {
        group_id: GroupId,
        state: String,
    },
    WorkerRegistered {
        worker_id: WorkerId,
        name: String,
    },
    WorkerConnected {
        worker_id: WorkerId,
    },
    WorkerLost {
        worker_id: WorkerId,
        reason: String,
    },
    /// A provider was asked for this worker (its record exists before the worker does).
    ProvisioningStarted {
        provider: String,
    },
    /// One step of provisioning: `token_minted`, `resource_created`, `worker_registered`.
    ProvisioningStepCompleted {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resource_id: Option<String>,
    },
    /// A step failed; `will_retry` says whether another attempt follows.
    ProvisioningStepFailed {
        step: String,
        attempt: u32,
        error: String,
        will_retry: bool,
    },
    /// Provisioning gave up; nothing it created is left.
    ProvisioningFailed {
        error: String,
    },
    /// What provisioning created was destroyed because the worker never registered (or
    /// could not start).
    ProvisioningCompensated {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resource_id: Option<String>,
    },
    /// The provider stopped the worker and removed what ran it.
    WorkerTerminated {
        reason: String,
    },
    /// A node answered a configuration version.
    WorkerConfigAcked {
        config_version: u64,
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Reconciliation removed a provider resource that no live worker record owns.
    OrphanRemoved {
        provider: String,
        resource_id: String,
    },
}

impl EventKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::JobCreated { .. } => "JobCreated",
            Self::JobAssigned { .. } => "JobAssigned",
            Self::JobAccepted { .. } => "JobAccepted",
            Self::JobStatusChanged { .. } => "JobStatusChanged",
            Self::JobRetryScheduled { .. } => "JobRetryScheduled",
            Self::JobCancelled { .. } => "JobCancelled",
            Self::JobResubmitted { .. } => "JobResubmitted",
            Self::GroupFinished { .. } => "GroupFinished",
            Self::WorkerRegistered { .. } => "WorkerRegistered",
            Self::WorkerConnected { .. } => "WorkerConnected",
            Self::WorkerLost { .. } => "WorkerLost",
            Self::ProvisioningStarted { .. } => "ProvisioningStarted",
            Self::ProvisioningStepCompleted { .. } => "ProvisioningStepCompleted",
            Self::ProvisioningStepFailed { .. } => "ProvisioningStepFailed",
            Self::ProvisioningFailed { .. } => "ProvisioningFailed",
            Self::ProvisioningCompensated { .. } => "ProvisioningCompensated",
            Self::WorkerTerminated { .. } => "WorkerTerminated",
            Self::OrphanRemoved { .. } => "OrphanRemoved",
            Self::WorkerConfigAcked { .. } => "WorkerConfigAcked",
        }
    }

    /// The event describing a job transition that ended an attempt or moved the job.
    /// `Assign` and `Accept` carry ids the caller adds, so they are built directly.
    pub fn for_transition(
        from: JobState,
        event: JobEvent,
        to: JobState,
        run_id: Option<RunId>,
        exit_code: Option<i32>,
        error: Option<String>,
    ) -> Self {
        match event {
            JobEvent::Cancel => Self::JobCancelled {
                from,
                reason: error.unwrap_or_else(|| "cancelled by request".into()),
            },
            _ => Self::JobStatusChanged {
                from,
                to,
                run_id,
                exit_code,
                error,
            },
        }
    }
}
