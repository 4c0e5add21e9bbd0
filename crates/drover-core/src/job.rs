//! What a user asks drover to run (`JobSpec`) and how a spec is checked; the rules shared
//! with other inputs are in `validation`, the states a job goes through in `state`.

use crate::ids::{JobId, ReservationId};
use crate::validation::{
    ValidationError, check_resource_amount, check_resource_name, printable_prefix,
    valid_image_reference, valid_resource_name,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::str::FromStr;

pub const MAX_NAME_BYTES: usize = 256;
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
pub const MAX_ARGS: usize = 4096;
pub const MAX_ENV_NAME_BYTES: usize = 1024;
pub const MAX_ENV_VALUE_BYTES: usize = 128 * 1024;
pub const MAX_ENV_TOTAL_BYTES: usize = 512 * 1024;
pub const MAX_TIMEOUT_MS: i64 = 30 * 24 * 3600 * 1000;
pub const MAX_ATTEMPTS: u32 = 100;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
pub const DEFAULT_BACKOFF_BASE_MS: u64 = 10_000;
pub const MAX_BACKOFF_BASE_MS: u64 = 24 * 3600 * 1000;

/// What a user asks drover to run. Unknown fields are refused so that a typo
/// (`"timout"`) is an error, not a silently ignored setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default)]
    pub name: String,
    /// Run by `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Exec'd directly with `args`, no shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Whole-run limit; on expiry the process group gets SIGTERM, then SIGKILL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<i64>,
    /// Higher runs first; FIFO within a priority.
    #[serde(default)]
    pub priority: i32,
    /// One try plus retries; absent means the default (4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Retry delay base: base × 2^(attempt-1), with jitter; absent means the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base_ms: Option<u64>,
    /// Node labels the worker must carry (all of them, with these values).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Named resources the job holds while it runs (`ollama: 1`); a node offers each with
    /// a capacity, and jobs needing one wait while it is used up or reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<String, u32>,
    /// Jobs that must succeed before this one runs; if one fails for good, this one is
    /// SKIPPED.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<JobId>,
    /// Submitting twice with the same key returns the first job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Runs inside this reservation: at once, in submission order, on the reserved node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<ReservationId>,
    /// How the job is isolated on its worker; only workers offering the mode run it.
    #[serde(default, skip_serializing_if = "Isolation::is_default")]
    pub isolation: Isolation,
    /// The container image, for `isolation: container`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Runs only on a worker this provider started (`local`, `docker`); absent means any
    /// worker, and the control plane's first provider starts one when none fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// `command` (a process) or `inference` (a language model on a node serving it).
    #[serde(default, skip_serializing_if = "JobKind::is_default")]
    pub kind: JobKind,
    /// What to generate, for `kind: inference`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<InferenceSpec>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    #[default]
    Command,
    Inference,
}

impl JobKind {
    fn is_default(&self) -> bool {
        *self == Self::Command
    }
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

/// An inference: a model, a prompt (raw) or messages (through the model's chat template),
/// and how to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceSpec {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<ChatTurn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// 0 (the default) is greedy decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

// Validation refuses non-finite floats, so equality is total on specs that exist.
impl Eq for InferenceSpec {}

pub const MAX_INFERENCE_TOKENS: u32 = 4096;
/// The resource an inference holds on its node: one local model workload at a time.
pub const INFERENCE_RESOURCE: &str = "inference";

impl InferenceSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        let field = |f: &str| format!("inference.{f}");
        if self.model.trim().is_empty()
            || self.model.len() > 256
            || self.model.chars().any(char::is_control)
        {
            return Err(ValidationError::new(
                field("model"),
                "is required (1-256 bytes, no control characters)",
            ));
        }
        match (&self.prompt, self.messages.is_empty()) {
            (Some(_), false) => {
                return Err(ValidationError::new(
                    field("messages"),
                    "give a prompt or messages, not both",
                ));
            }
            (None, true) => {
                return Err(ValidationError::new(
                    field("prompt"),
                    "a prompt or messages is required",
                ));
            }
            (Some(p), true) if p.is_empty() || p.len() > 1 << 20 => {
                return Err(ValidationError::new(field("prompt"), "1 byte to 1 MiB"));
            }
            _ => {}
        }
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(ValidationError::new(
                    format!("inference.messages[{i}].role"),
                    "system, user or assistant",
                ));
            }
        }
        if let Some(n) = self.max_tokens
            && (n == 0 || n > MAX_INFERENCE_TOKENS)
        {
            return Err(ValidationError::new(
                field("max_tokens"),
                format!("between 1 and {MAX_INFERENCE_TOKENS}"),
            ));
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return Err(ValidationError::new(
                field("temperature"),
                "between 0 and 2",
            ));
        }
        if let Some(p) = self.top_p
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err(ValidationError::new(field("top_p"), "above 0, at most 1"));
        }
        Ok(())
    }
}

/// How a job is isolated on its worker.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A process group of the worker's user, with the worker's view of the machine.
    #[default]
    Process,
    /// No network (a loopback of its own), a read-only root, its own pid namespace, a
    /// writable scratch directory; dies with the worker (bubblewrap).
    Sandbox,
    /// A container of `image`, with no network unless the worker allows it.
    Container,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Sandbox => "sandbox",
            Self::Container => "container",
        }
    }

    fn is_default(&self) -> bool {
        *self == Self::Process
    }
}

impl FromStr for Isolation {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, ValidationError> {
        match s {
            "process" => Ok(Self::Process),
            "sandbox" => Ok(Self::Sandbox),
            "container" => Ok(Self::Container),
            other => Err(ValidationError::new(
                "isolation",
                format!("unknown isolation {other:?}; one of process, sandbox, container"),
            )),
        }
    }
}

pub const MAX_DEPENDENCIES: usize = 1000;
impl JobSpec {
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS)
    }

    /// Checks every rule and fills in the name when none was given.
    pub fn validated(mut self) -> Result<Self, ValidationError> {
        if self.name.len() > MAX_NAME_BYTES {
            return Err(ValidationError::new(
                "name",
                format!("is {} bytes; at most {MAX_NAME_BYTES}", self.name.len()),
            ));
        }
        if self.name.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "name",
                "must not contain control characters",
            ));
        }
        match (self.kind, &self.inference) {
            (JobKind::Inference, None) => {
                return Err(ValidationError::new(
                    "inference",
                    "is required with kind inference (model and prompt or messages)",
                ));
            }
            (JobKind::Command, Some(_)) => {
                return Err(ValidationError::new(
                    "inference",
                    "goes with kind inference",
                ));
            }
            (JobKind::Inference, Some(spec)) => {
                spec.validate()?;
                if self.command.is_some() || self.program.is_some() {
                    return Err(ValidationError::new(
                        "command",
                        "an inference job runs a model, not a command",
                    ));
                }
                if self.isolation != Isolation::Process {
                    return Err(ValidationError::new(
                        "isolation",
                        "an inference job runs in the node's model, not in a sandbox",
                    ));
                }
                self.resources
                    .entry(INFERENCE_RESOURCE.to_string())
                    .or_insert(1);
                if self.name.trim().is_empty() {
                    self.name = format!("inference {}", spec.model);
                }
            }
            (JobKind::Command, None) => {}
        }
        match (&self.command, &self.program) {
            _ if self.kind == JobKind::Inference => {}
            (Some(_), Some(_)) => {
                return Err(ValidationError::new(
                    "command",
                    "give either command (run by /bin/sh -c) or program with args, not both",
                ));
            }
            (None, None) => {
                return Err(ValidationError::new(
                    "command",
                    "is required (or give program)",
                ));
            }
            (Some(command), None) => {
                if command.trim().is_empty() {
                    return Err(ValidationError::new("command", "must not be empty"));
                }
                if command.len() > MAX_COMMAND_BYTES {
                    return Err(ValidationError::new(
                        "command",
                        format!("is over {MAX_COMMAND_BYTES} bytes"),
                    ));
                }
                if command.contains('\0') {
                    return Err(ValidationError::new("command", "must not contain NUL"));
                }
                if !self.args.is_empty() {
                    return Err(ValidationError::new(
                        "args",
                        "go with program; with command, put them in the command line",
                    ));
                }
            }
            (None, Some(program)) => {
                if program.trim().is_empty() {
                    return Err(ValidationError::new("program", "must not be empty"));
                }
                if program.len() > 4096 || program.chars().any(char::is_control) {
                    return Err(ValidationError::new(
                        "program",
                        "at most 4096 bytes, without control characters",
                    ));
                }
                if self.args.len() > MAX_ARGS {
                    return Err(ValidationError::new(
                        "args",
                        format!("more than {MAX_ARGS} arguments"),
                    ));
                }
                let args_bytes: usize = self.args.iter().map(String::len).sum();
                if args_bytes > MAX_COMMAND_BYTES {
                    return Err(ValidationError::new(
                        "args",
                        format!("are over {MAX_COMMAND_BYTES} bytes"),
                    ));
                }
                if let Some(i) = self.args.iter().position(|a| a.contains('\0')) {
                    return Err(ValidationError::new(
                        format!("args[{i}]"),
                        "must not contain NUL",
                    ));
                }
            }
        }
        let mut env_total = 0;
        for (name, value) in &self.env {
            let field = format!("env.{}", printable_prefix(name));
            if name.is_empty() {
                return Err(ValidationError::new(
                    "env",
                    "a variable name must not be empty",
                ));
            }
            if name.contains('=') || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(ValidationError::new(
                    field,
                    "a variable name must not contain '=', white space or control characters",
                ));
            }
            if name.len() > MAX_ENV_NAME_BYTES {
                return Err(ValidationError::new(
                    field,
                    format!("name is over {MAX_ENV_NAME_BYTES} bytes"),
                ));
            }
            if value.contains('\0') {
                return Err(ValidationError::new(field, "value must not contain NUL"));
            }
            if value.len() > MAX_ENV_VALUE_BYTES {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "value is {} bytes; at most {MAX_ENV_VALUE_BYTES}",
                        value.len()
                    ),
                ));
            }
            env_total += name.len() + value.len();
        }
        if env_total > MAX_ENV_TOTAL_BYTES {
            return Err(ValidationError::new(
                "env",
                format!("is {env_total} bytes in all; at most {MAX_ENV_TOTAL_BYTES}"),
            ));
        }
        if let Some(dir) = &self.working_dir
            && (!dir.starts_with('/') || dir.len() > 4096 || dir.chars().any(char::is_control))
        {
            return Err(ValidationError::new(
                "working_dir",
                "must be an absolute path (at most 4096 bytes) without control characters",
            ));
        }
        if let Some(ms) = self.timeout_ms {
            if ms <= 0 {
                return Err(ValidationError::new(
                    "timeout_ms",
                    format!("must be positive, got {ms}"),
                ));
            }
            if ms > MAX_TIMEOUT_MS {
                return Err(ValidationError::new(
                    "timeout_ms",
                    "must be at most 30 days",
                ));
            }
        }
        if let Some(n) = self.max_attempts
            && !(1..=MAX_ATTEMPTS).contains(&n)
        {
            return Err(ValidationError::new(
                "max_attempts",
                format!("must be between 1 and {MAX_ATTEMPTS}, got {n}"),
            ));
        }
        if let Some(ms) = self.backoff_base_ms
            && ms > MAX_BACKOFF_BASE_MS
        {
            return Err(ValidationError::new(
                "backoff_base_ms",
                "must be at most one day",
            ));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(ValidationError::new(
                "labels",
                format!("{} labels; at most {MAX_LABELS}", self.labels.len()),
            ));
        }
        for (k, v) in &self.labels {
            if k.is_empty()
                || k.len() > 256
                || v.len() > 256
                || k.chars().chain(v.chars()).any(char::is_control)
            {
                return Err(ValidationError::new(
                    format!("labels.{}", printable_prefix(k)),
                    "label names must be 1-256 bytes and values at most 256 bytes, \
                     without control characters",
                ));
            }
        }
        if self.resources.len() > MAX_LABELS {
            return Err(ValidationError::new(
                "resources",
                format!("{} resources; at most {MAX_LABELS}", self.resources.len()),
            ));
        }
        for (k, &v) in &self.resources {
            let field = format!("resources.{}", printable_prefix(k));
            check_resource_name(&field, k)?;
            check_resource_amount(&field, v)?;
        }
        if self.depends_on.len() > MAX_DEPENDENCIES {
            return Err(ValidationError::new(
                "depends_on",
                format!("at most {MAX_DEPENDENCIES} dependencies"),
            ));
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > 256 || key.chars().any(char::is_control))
        {
            return Err(ValidationError::new(
                "idempotency_key",
                "must be 1-256 bytes without control characters",
            ));
        }
        match (self.isolation, &self.image) {
            (Isolation::Container, None) => {
                return Err(ValidationError::new(
                    "image",
                    "is required with isolation container",
                ));
            }
            (Isolation::Container, Some(image)) if !valid_image_reference(image) => {
                return Err(ValidationError::new(
                    "image",
                    "must be an image reference: [HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST], \
                     lower-case name components (at most 512 bytes)",
                ));
            }
            (Isolation::Process | Isolation::Sandbox, Some(_)) => {
                return Err(ValidationError::new(
                    "image",
                    "goes with isolation container",
                ));
            }
            _ => {}
        }
        if let Some(provider) = &self.provider
            && !valid_resource_name(provider)
        {
            return Err(ValidationError::new(
                "provider",
                "a provider name is 1-64 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        if self.name.trim().is_empty() {
            self.name = self.default_name();
        }
        Ok(self)
    }

    fn default_name(&self) -> String {
        let base = match (&self.command, &self.program) {
            (Some(c), _) => c.trim().to_string(),
            (None, Some(p)) => std::iter::once(p.as_str())
                .chain(self.args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            (None, None) => "job".to_string(),
        };
        let flat: String = base
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let mut name = String::new();
        for c in flat.chars() {
            if name.len() + c.len_utf8() > 64 {
                break;
            }
            name.push(c);
        }
        name
    }
}

/// At most this many labels, and as many resources, on a job.
pub const MAX_LABELS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &str) -> JobSpec {
        JobSpec {
            command: Some(command.into()),
            ..Default::default()
        }
    }

    #[test]
    fn fields_that_reach_a_command_line_or_a_path_are_refused_with_control_characters() {
        let container = |image: &str| JobSpec {
            isolation: Isolation::Container,
            image: Some(image.into()),
            ..spec("true")
        };
        assert_eq!(field_of(container("--volume=/:/host:ro")), "image");
        let mut s = spec("true");
        s.env.insert("A\nB".into(), "x".into());
        assert_eq!(field_of(s), "env.A\\nB");
        let mut s = spec("true");
        s.env.insert("A B".into(), "x".into());
        assert_eq!(field_of(s), "env.A B");
        let mut s = spec("true");
        s.labels.insert("zone".into(), "a\u{0}".into());
        assert_eq!(field_of(s), "labels.zone");
        let mut s = spec("true");
        s.labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(field_of(s), "labels");
        for dir in ["relative/dir", "/tmp/a\nb", ""] {
            let s = JobSpec {
                working_dir: Some(dir.into()),
                ..spec("true")
            };
            assert_eq!(field_of(s), "working_dir", "{dir:?}");
        }
        let s = JobSpec {
            program: Some("/bin/echo\r".into()),
            ..Default::default()
        };
        assert_eq!(field_of(s), "program");
    }

    fn field_of(spec: JobSpec) -> String {
        spec.validated().unwrap_err().field
    }

    #[test]
    fn bad_specs_name_their_field() {
        let cases: Vec<(JobSpec, &str)> = vec![
            (spec("   "), "command"),
            (JobSpec::default(), "command"),
            (
                JobSpec {
                    program: Some("ls".into()),
                    ..spec("ls")
                },
                "command",
            ),
            (
                JobSpec {
                    timeout_ms: Some(0),
                    ..spec("true")
                },
                "timeout_ms",
            ),
            (
                JobSpec {
                    timeout_ms: Some(-5),
                    ..spec("true")
                },
                "timeout_ms",
            ),
            (
                JobSpec {
                    env: [("A=B".to_string(), "x".to_string())].into(),
                    ..spec("true")
                },
                "env.A=B",
            ),
            (
                JobSpec {
                    env: [("A\0".to_string(), "x".to_string())].into(),
                    ..spec("true")
                },
                "env.A\\0",
            ),
            (
                JobSpec {
                    env: [("BIG".to_string(), "x".repeat(1 << 20))].into(),
                    ..spec("true")
                },
                "env.BIG",
            ),
            (
                JobSpec {
                    name: "n".repeat(257),
                    ..spec("true")
                },
                "name",
            ),
            (
                JobSpec {
                    max_attempts: Some(0),
                    ..spec("true")
                },
                "max_attempts",
            ),
            (
                JobSpec {
                    args: vec!["x".into()],
                    ..spec("true")
                },
                "args",
            ),
        ];
        for (spec, field) in cases {
            assert_eq!(field_of(spec.clone()), field, "{spec:?}");
        }
    }

    #[test]
    fn a_name_is_derived_when_missing() {
        let s = spec("echo hello").validated().unwrap();
        assert_eq!(s.name, "echo hello");
        assert_eq!(s.max_attempts(), DEFAULT_MAX_ATTEMPTS);
    }

    #[test]
    fn unknown_json_fields_are_refused() {
        let err = serde_json::from_str::<JobSpec>(r#"{"command":"true","timout_ms":5}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `timout_ms`"), "{err}");
    }
}
