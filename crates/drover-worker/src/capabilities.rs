//! What this node offers: slots, memory, labels, resources, models, and the isolation
//! modes this machine can give jobs (probed once).

use super::*;

pub fn capabilities(config: &WorkerConfig) -> Capabilities {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    Capabilities {
        hostname: hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        cpus,
        memory_bytes: total_memory(),
        labels: config.labels.clone(),
        slots: if config.slots == 0 {
            cpus
        } else {
            config.slots
        },
        isolation_modes: isolation_modes(),
        version: env!("CARGO_PKG_VERSION").into(),
        resources: {
            let mut r = config.resources.clone();
            let slots = if config.slots == 0 {
                cpus
            } else {
                config.slots
            };
            // One local model workload at a time, unless the node says otherwise; an
            // external provider takes as many at once as the node has slots.
            let local = !config.models.is_empty() || !config.stages.is_empty();
            let capacity = if local { 1 } else { slots };
            if local || config.external_inference.is_some() {
                r.entry(drover_core::job::INFERENCE_RESOURCE.to_string())
                    .or_insert(capacity);
            }
            r
        },
        models: {
            let mut names: Vec<String> = config
                .models
                .iter()
                .map(|(name, _)| name.clone())
                .chain(config.stages.iter().map(|s| s.model.clone()))
                .collect();
            if let Some((_, _, external)) = &config.external_inference {
                names.extend(external.iter().cloned());
            }
            names.sort();
            names.dedup();
            names
        },
        model_blocks: config
            .stages
            .iter()
            .map(|s| drover_core::worker::ModelBlocks {
                model: s.model.clone(),
                first: s.blocks.start as u32,
                last: (s.blocks.end - 1) as u32,
                total: s.total as u32,
            })
            .collect(),
    }
}

/// The isolation modes this machine can give jobs (probed once).
pub(crate) fn isolation_modes() -> Vec<String> {
    static MODES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    MODES
        .get_or_init(|| {
            let mut modes = vec!["process".to_string()];
            // Said at start, as a warning: a user whose sandbox jobs stay queued looks here.
            match executor::sandbox_unavailable_reason() {
                None => modes.push("sandbox".into()),
                Some(why) => tracing::warn!("no sandbox jobs on this node: {why}"),
            }
            if executor::docker_available() {
                modes.push("container".into());
            } else {
                tracing::warn!(
                    "no container jobs on this node: no Docker engine answers here (install \
                     Docker, e.g. apt-get install docker.io, and let this user reach its socket)"
                );
            }
            modes
        })
        .clone()
}

pub(crate) fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Runs the worker until `shutdown` resolves. Running jobs are stopped at shutdown; their
/// leases lapse on the control plane and the retry policy takes over.
pub(crate) fn agent_uses_containers(caps: &Capabilities) -> bool {
    caps.isolation_modes.iter().any(|m| m == "container")
}
