//! The workers connected to this control plane right now, each with its stream and the runs
//! it holds. Derived state: rebuilt as workers reconnect.

use drover_core::schedule::FreeWorker;
use drover_core::{ReservationId, RunId, WorkerId};
use drover_proto::v1::ServerMessage;
use drover_proto::v1::server_message::Body;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc::UnboundedSender;

/// What a run holds on its worker while it is there.
#[derive(Debug, Clone, Default)]
pub struct Held {
    pub resources: BTreeMap<String, u32>,
    /// The reservation whose capacity the run uses, if it runs inside one.
    pub reservation: Option<ReservationId>,
}

struct Session {
    id: u64,
    tx: UnboundedSender<ServerMessage>,
    slots: u32,
    labels: BTreeMap<String, String>,
    capacity: BTreeMap<String, u32>,
    isolation_modes: Vec<String>,
    /// The provider that started the worker, if one did.
    provider: Option<String>,
    /// Models it serves.
    models: Vec<String>,
    /// Being stopped by its provider: no new work.
    draining: bool,
    /// The labels the node connected with: configuration selectors match these.
    base_labels: BTreeMap<String, String>,
    /// The newest configuration version sent on this stream.
    config_sent: u64,
    /// Told when the stream must end now (the node was revoked).
    close: std::sync::Arc<tokio::sync::Notify>,
    /// When the worker last said anything: a silent (frozen, cut off) worker gets no work.
    last_heard: std::time::Instant,
    /// Runs the worker holds, counted against its slots and resources until it reports
    /// their end.
    active: HashMap<RunId, Held>,
}

impl Session {
    fn free_resources(&self) -> BTreeMap<String, u32> {
        let mut free = self.capacity.clone();
        for held in self.active.values() {
            for (name, amount) in &held.resources {
                if let Some(f) = free.get_mut(name) {
                    *f = f.saturating_sub(*amount);
                }
            }
        }
        free
    }
}

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<WorkerId, Session>>,
    next_id: AtomicU64,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, Session>> {
        // A panic while holding this lock leaves plain data behind; keep going with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes this stream the worker's one session, replacing (and so closing) an older one.
    pub fn attach(
        &self,
        worker_id: WorkerId,
        tx: UnboundedSender<ServerMessage>,
        caps: &drover_core::Capabilities,
        provider: Option<String>,
        active: HashMap<RunId, Held>,
    ) -> (u64, std::sync::Arc<tokio::sync::Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = std::sync::Arc::new(tokio::sync::Notify::new());
        let session = Session {
            id,
            tx,
            slots: caps.slots.max(1),
            labels: caps.labels.clone(),
            capacity: caps.resources.clone(),
            isolation_modes: caps.isolation_modes.clone(),
            provider,
            models: caps.models.clone(),
            draining: false,
            base_labels: caps.labels.clone(),
            config_sent: 0,
            close: close.clone(),
            last_heard: std::time::Instant::now(),
            active,
        };
        self.lock().insert(worker_id, session);
        metrics::gauge!("drover_workers_connected").set(self.count() as f64);
        (id, close)
    }

    /// Removes the session if it is still the worker's current one.
    pub fn detach(&self, worker_id: WorkerId, session_id: u64) -> bool {
        let mut map = self.lock();
        let current = map.get(&worker_id).is_some_and(|s| s.id == session_id);
        if current {
            map.remove(&worker_id);
        }
        let n = map.len();
        drop(map);
        metrics::gauge!("drover_workers_connected").set(n as f64);
        current
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Workers heard from within `window`.
    pub fn heard_within(&self, window: std::time::Duration) -> Vec<WorkerId> {
        self.lock()
            .iter()
            .filter(|(_, s)| s.last_heard.elapsed() <= window)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The worker said something: it is alive.
    pub fn heard_from(&self, worker_id: WorkerId) {
        if let Some(s) = self.lock().get_mut(&worker_id) {
            s.last_heard = std::time::Instant::now();
        }
    }

    /// Workers with a free slot that were heard from within `silence`.
    pub fn free_workers(&self, silence: std::time::Duration) -> Vec<FreeWorker> {
        self.lock()
            .iter()
            .filter(|(_, s)| (s.active.len() as u32) < s.slots && !s.draining)
            .filter(|(_, s)| s.last_heard.elapsed() <= silence)
            .map(|(id, s)| FreeWorker {
                worker_id: *id,
                free_slots: s.slots - s.active.len() as u32,
                labels: s.labels.clone(),
                free_resources: s.free_resources(),
                isolation_modes: s.isolation_modes.clone(),
                provider: s.provider.clone(),
                models: s.models.clone(),
            })
            .collect()
    }

    /// How much of `resource` a worker of this replica has that running jobs do not use;
    /// `None` when the worker is not connected here.
    pub fn free_resource(&self, worker_id: WorkerId, resource: &str) -> Option<u32> {
        self.lock()
            .get(&worker_id)
            .map(|s| s.free_resources().get(resource).copied().unwrap_or(0))
    }

    /// How much of `resource` the running jobs of a reservation use.
    pub fn reservation_usage(&self, reservation: ReservationId, resource: &str) -> u32 {
        self.lock()
            .values()
            .flat_map(|s| s.active.values())
            .filter(|h| h.reservation == Some(reservation))
            .map(|h| h.resources.get(resource).copied().unwrap_or(1))
            .sum()
    }

    /// A connected worker offering at least `amount` of `resource` (the given one, or the
    /// one with the most of it free).
    pub fn worker_offering(
        &self,
        resource: &str,
        amount: u32,
        node: Option<WorkerId>,
    ) -> Option<WorkerId> {
        self.lock()
            .iter()
            .filter(|(id, _)| node.is_none_or(|n| n == **id))
            .filter(|(_, s)| s.capacity.get(resource).copied().unwrap_or(0) >= amount)
            .max_by_key(|(id, s)| (s.free_resources().get(resource).copied().unwrap_or(0), **id))
            .map(|(id, _)| *id)
    }

    /// Counts a run against the worker's slots and sends it the assignment. False when the
    /// worker is gone; its lease then runs out and the retry policy takes over.
    pub fn assign(&self, worker_id: WorkerId, run_id: RunId, held: Held, msg: Body) -> bool {
        let mut map = self.lock();
        let Some(s) = map.get_mut(&worker_id) else {
            return false;
        };
        s.active.insert(run_id, held);
        s.tx.send(ServerMessage { body: Some(msg) }).is_ok()
    }

    /// Connected workers with the labels configuration selectors match and the newest
    /// version already sent to them.
    pub fn config_targets(&self) -> Vec<(WorkerId, BTreeMap<String, String>, u64)> {
        self.lock()
            .iter()
            .map(|(id, s)| (*id, s.base_labels.clone(), s.config_sent))
            .collect()
    }

    /// Sends a configuration version unless one as new was sent already.
    pub fn send_config(&self, worker_id: WorkerId, version: u64, msg: Body) {
        if let Some(s) = self.lock().get_mut(&worker_id)
            && version > s.config_sent
            && s.tx.send(ServerMessage { body: Some(msg) }).is_ok()
        {
            s.config_sent = version;
        }
    }

    /// The node applied a configuration: schedule by what it offers now.
    pub fn update_capabilities(&self, worker_id: WorkerId, caps: &drover_core::Capabilities) {
        if let Some(s) = self.lock().get_mut(&worker_id) {
            s.labels = caps.labels.clone();
            s.capacity = caps.resources.clone();
            s.isolation_modes = caps.isolation_modes.clone();
            s.slots = caps.slots.max(1);
            s.models = caps.models.clone();
        }
    }

    /// Drops the worker's stream (its credential was revoked).
    pub fn drop_worker(&self, worker_id: WorkerId) {
        if let Some(s) = self.lock().remove(&worker_id) {
            s.close.notify_one();
        }
    }

    /// The worker's provider is about to stop it: it gets no new work from now on.
    pub fn drain(&self, worker_id: WorkerId) {
        if let Some(s) = self.lock().get_mut(&worker_id) {
            s.draining = true;
        }
    }

    /// Whether this replica handed the run to this worker and it has not ended yet.
    pub fn holds(&self, worker_id: WorkerId, run_id: RunId) -> bool {
        self.lock()
            .get(&worker_id)
            .is_some_and(|s| s.active.contains_key(&run_id))
    }

    pub fn release(&self, worker_id: WorkerId, run_id: RunId) {
        if let Some(s) = self.lock().get_mut(&worker_id) {
            s.active.remove(&run_id);
        }
    }

    pub fn send(&self, worker_id: WorkerId, msg: Body) -> bool {
        self.lock()
            .get(&worker_id)
            .is_some_and(|s| s.tx.send(ServerMessage { body: Some(msg) }).is_ok())
    }

    /// Drops every stream's sender, which ends the streams (used at shutdown).
    pub fn close_all(&self) {
        self.lock().clear();
    }
}
