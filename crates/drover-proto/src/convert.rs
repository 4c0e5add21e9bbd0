//! Conversions between the wire types and drover-core's domain types.

use crate::v1;
use drover_core::{Capabilities, JobSpec, RunOutcome};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl From<&JobSpec> for v1::JobSpec {
    fn from(s: &JobSpec) -> Self {
        Self {
            name: s.name.clone(),
            command: s.command.clone(),
            program: s.program.clone(),
            args: s.args.clone(),
            env: s.env.clone().into_iter().collect(),
            working_dir: s.working_dir.clone(),
            timeout_ms: s.timeout_ms.map(|t| t.max(0) as u64),
            priority: s.priority,
            max_attempts: s.max_attempts.unwrap_or(0),
            backoff_base_ms: s.backoff_base_ms.unwrap_or(0),
            labels: s.labels.clone().into_iter().collect(),
            resources: s.resources.clone().into_iter().collect(),
            depends_on: s.depends_on.iter().map(ToString::to_string).collect(),
            idempotency_key: s.idempotency_key.clone(),
            reservation: s.reservation.map(|r| r.to_string()),
            isolation: s.isolation.as_str().to_string(),
            image: s.image.clone(),
            provider: s.provider.clone(),
            kind: match s.kind {
                drover_core::JobKind::Command => String::new(),
                drover_core::JobKind::Inference => "inference".into(),
            },
            inference_json: s
                .inference
                .as_ref()
                .and_then(|i| serde_json::to_string(i).ok()),
        }
    }
}

impl TryFrom<v1::JobSpec> for JobSpec {
    type Error = ConvertError;
    fn try_from(s: v1::JobSpec) -> Result<Self, ConvertError> {
        let timeout_ms = s
            .timeout_ms
            .map(|t| {
                i64::try_from(t).map_err(|_| ConvertError::Invalid {
                    field: "timeout_ms",
                    message: "is too large".into(),
                })
            })
            .transpose()?;
        Ok(Self {
            name: s.name,
            command: s.command,
            program: s.program,
            args: s.args,
            env: s.env.into_iter().collect(),
            working_dir: s.working_dir,
            timeout_ms,
            priority: s.priority,
            max_attempts: (s.max_attempts != 0).then_some(s.max_attempts),
            backoff_base_ms: (s.backoff_base_ms != 0).then_some(s.backoff_base_ms),
            labels: s.labels.into_iter().collect(),
            resources: s.resources.into_iter().collect(),
            depends_on: s
                .depends_on
                .iter()
                .map(|d| d.parse())
                .collect::<Result<_, _>>()
                .map_err(|e: drover_core::IdError| ConvertError::Invalid {
                    field: "depends_on",
                    message: e.to_string(),
                })?,
            idempotency_key: s.idempotency_key,
            isolation: if s.isolation.is_empty() {
                drover_core::Isolation::Process
            } else {
                s.isolation
                    .parse()
                    .map_err(|e: drover_core::ValidationError| ConvertError::Invalid {
                        field: "isolation",
                        message: e.message,
                    })?
            },
            image: s.image,
            provider: s.provider,
            kind: match s.kind.as_str() {
                "" | "command" => drover_core::JobKind::Command,
                "inference" => drover_core::JobKind::Inference,
                other => {
                    return Err(ConvertError::Invalid {
                        field: "kind",
                        message: format!("unknown kind {other:?}; command or inference"),
                    });
                }
            },
            inference: s
                .inference_json
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| ConvertError::Invalid {
                    field: "inference",
                    message: e.to_string(),
                })?,
            reservation: s.reservation.map(|r| r.parse()).transpose().map_err(
                |e: drover_core::IdError| ConvertError::Invalid {
                    field: "reservation",
                    message: e.to_string(),
                },
            )?,
        })
    }
}

impl From<&Capabilities> for v1::Capabilities {
    fn from(c: &Capabilities) -> Self {
        Self {
            hostname: c.hostname.clone(),
            cpus: c.cpus,
            memory_bytes: c.memory_bytes,
            labels: c.labels.clone().into_iter().collect(),
            slots: c.slots,
            isolation_modes: c.isolation_modes.clone(),
            models: c.models.clone(),
            model_blocks: c
                .model_blocks
                .iter()
                .map(|b| v1::ModelBlocks {
                    model: b.model.clone(),
                    first: b.first,
                    last: b.last,
                    total: b.total,
                })
                .collect(),
            version: c.version.clone(),
            resources: c.resources.clone().into_iter().collect(),
        }
    }
}

impl From<v1::Capabilities> for Capabilities {
    fn from(c: v1::Capabilities) -> Self {
        Self {
            hostname: c.hostname,
            cpus: c.cpus,
            memory_bytes: c.memory_bytes,
            labels: c.labels.into_iter().collect(),
            slots: c.slots,
            isolation_modes: c.isolation_modes,
            models: c.models,
            // A range that is not one (first after last, past the model's end) is dropped:
            // a node cannot make the scheduler believe in blocks no model has.
            model_blocks: c
                .model_blocks
                .into_iter()
                .filter(|b| b.first <= b.last && b.last < b.total)
                .map(|b| drover_core::worker::ModelBlocks {
                    model: b.model,
                    first: b.first,
                    last: b.last,
                    total: b.total,
                })
                .collect(),
            version: c.version,
            resources: c.resources.into_iter().collect(),
        }
    }
}

impl From<RunOutcome> for v1::RunOutcome {
    fn from(o: RunOutcome) -> Self {
        match o {
            RunOutcome::Succeeded => Self::Succeeded,
            RunOutcome::Failed => Self::Failed,
            RunOutcome::TimedOut => Self::TimedOut,
            RunOutcome::Cancelled => Self::Cancelled,
        }
    }
}

impl TryFrom<v1::RunOutcome> for RunOutcome {
    type Error = ConvertError;
    fn try_from(o: v1::RunOutcome) -> Result<Self, ConvertError> {
        match o {
            v1::RunOutcome::Succeeded => Ok(Self::Succeeded),
            v1::RunOutcome::Failed => Ok(Self::Failed),
            v1::RunOutcome::TimedOut => Ok(Self::TimedOut),
            v1::RunOutcome::Cancelled => Ok(Self::Cancelled),
            v1::RunOutcome::Unspecified => Err(ConvertError::Invalid {
                field: "outcome",
                message: "must be set".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_spec_round_trips() {
        let spec = JobSpec {
            name: "n".into(),
            program: Some("bash".into()),
            args: vec!["-c".into(), "echo hi".into()],
            env: [("A".to_string(), "1".to_string())].into(),
            timeout_ms: Some(5_000),
            priority: 3,
            max_attempts: Some(2),
            ..Default::default()
        };
        let wire = v1::JobSpec::from(&spec);
        assert_eq!(JobSpec::try_from(wire), Ok(spec));
    }
}
