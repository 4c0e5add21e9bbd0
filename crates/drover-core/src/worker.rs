//! Workers (nodes): what they can do and where they are in their life.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkerState {
    Registering,
    Ready,
    Draining,
    Lost,
    Terminated,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registering => "REGISTERING",
            Self::Ready => "READY",
            Self::Draining => "DRAINING",
            Self::Lost => "LOST",
            Self::Terminated => "TERMINATED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Registering,
            Self::Ready,
            Self::Draining,
            Self::Lost,
            Self::Terminated,
        ]
        .into_iter()
        .find(|w| w.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Capabilities {
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// Jobs run at once.
    pub slots: u32,
    pub isolation_modes: Vec<String>,
    pub version: String,
    /// Named resources and their capacity on this node (`ollama: 1`).
    #[serde(default)]
    pub resources: BTreeMap<String, u32>,
}
