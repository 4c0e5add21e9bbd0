//! Workers (nodes): what they can do and where they are in their life.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
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
    /// The models this node serves (inference jobs naming one run here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Block ranges of models this node serves as a stage of a split model (`--blocks`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_blocks: Vec<ModelBlocks>,
}

/// Blocks `first..=last` of a model of `total` blocks, served by one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelBlocks {
    pub model: String,
    pub first: u32,
    pub last: u32,
    pub total: u32,
}

impl std::fmt::Display for ModelBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}[{}-{} of {}]",
            self.model, self.first, self.last, self.total
        )
    }
}

/// What an admin sets for nodes centrally (`POST /v1/node-configs`): each field left out
/// keeps what the node was started with. Labels are added to the node's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The isolation modes jobs may use on the node (a subset of what it can do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation_modes: Option<Vec<String>>,
    /// Named resources and capacities, replacing the node's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<BTreeMap<String, u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
}

impl NodeConfig {
    /// Checks the rules of each field, named as in `POST /v1/node-configs` (`config.…`).
    pub fn validated(self) -> Result<Self, crate::ValidationError> {
        if let Some(ms) = self.heartbeat_interval_ms
            && !(100..=60_000).contains(&ms)
        {
            return Err(crate::ValidationError::new(
                "config.heartbeat_interval_ms",
                format!("must be between 100 and 60000, got {ms}"),
            ));
        }
        for (name, &amount) in self.resources.iter().flatten() {
            let field = format!("config.resources.{name}");
            crate::validation::check_resource_name(&field, name)?;
            crate::validation::check_resource_amount(&field, amount)?;
        }
        Ok(self)
    }

    /// The capabilities a node started with `base` has under this config, or why it cannot
    /// apply it (the node then keeps its previous config).
    pub fn apply(&self, base: &Capabilities) -> Result<Capabilities, String> {
        let mut caps = base.clone();
        for (k, v) in &self.labels {
            caps.labels.insert(k.clone(), v.clone());
        }
        if let Some(modes) = &self.isolation_modes {
            for m in modes {
                if !base.isolation_modes.contains(m) {
                    return Err(format!(
                        "isolation mode {m:?} is not available on this node (it offers {})",
                        base.isolation_modes.join(", ")
                    ));
                }
            }
            if !modes.iter().any(|m| m == "process") {
                return Err("isolation_modes must keep \"process\"".into());
            }
            caps.isolation_modes = modes.clone();
        }
        if let Some(resources) = &self.resources {
            if let Some((name, _)) = resources.iter().find(|(_, v)| **v == 0) {
                return Err(format!("resources.{name}: a capacity must be above 0"));
            }
            caps.resources = resources.clone();
        }
        if let Some(ms) = self.heartbeat_interval_ms
            && !(100..=60_000).contains(&ms)
        {
            return Err(format!(
                "heartbeat_interval_ms: {ms} is outside 100..=60000"
            ));
        }
        Ok(caps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Capabilities {
        Capabilities {
            isolation_modes: vec!["process".into(), "sandbox".into()],
            labels: BTreeMap::from([("os".into(), "linux".into())]),
            ..Default::default()
        }
    }

    #[test]
    fn a_config_adds_labels_and_narrows_isolation() {
        let config = NodeConfig {
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            isolation_modes: Some(vec!["process".into()]),
            ..Default::default()
        };
        let caps = config.apply(&base()).expect("applies");
        assert_eq!(caps.labels.len(), 2);
        assert_eq!(caps.isolation_modes, vec!["process".to_string()]);
    }

    #[test]
    fn a_config_the_node_cannot_honour_is_refused_with_the_reason() {
        let config = NodeConfig {
            isolation_modes: Some(vec!["process".into(), "container".into()]),
            ..Default::default()
        };
        let err = config.apply(&base()).unwrap_err();
        assert!(err.contains("container"), "{err}");
        let config = NodeConfig {
            heartbeat_interval_ms: Some(5),
            ..Default::default()
        };
        assert!(config.apply(&base()).is_err());
    }
}
