//! Replicas telling each other: wake-ups (dispatch, cancel, revoke, new node
//! configurations, revoked tokens, final jobs) published through the store (PostgreSQL
//! LISTEN/NOTIFY; nothing with SQLite) and carried out by the replica holding the worker or
//! the waiter. A lost wake-up only delays: everyone re-reads the store on their own.

use crate::{AppState, Notice};
use drover_core::{JobId, Timestamp};
use std::sync::Arc;

impl AppState {
    /// Wakes this replica's dispatcher, and the other replicas' at most every few
    /// milliseconds, so that bursts of submissions do not become a burst of NOTIFYs.
    pub async fn nudge_dispatch(&self) {
        self.dispatch.notify_one();
        let now = Timestamp::now().as_micros();
        let last = self
            .last_dispatch_nudge
            .load(std::sync::atomic::Ordering::Relaxed);
        if now - last < 5_000 {
            return;
        }
        self.last_dispatch_nudge
            .store(now, std::sync::atomic::Ordering::Relaxed);
        self.publish(drover_store::Wakeup::Dispatch).await;
    }

    /// Carries out a wake-up on this replica: it acts only on the workers connected here.
    pub async fn apply_here(&self, wakeup: &drover_store::Wakeup) {
        use drover_proto::v1::{self, server_message::Body};
        use drover_store::Wakeup;
        match *wakeup {
            Wakeup::Dispatch => self.dispatch.notify_one(),
            Wakeup::Cancel { worker_id, run_id } => {
                // The worker kills the process group; its slot frees when it reports the end.
                self.sessions.send(
                    worker_id,
                    Body::Cancel(v1::CancelRun {
                        run_id: run_id.to_string(),
                        reason: "cancelled by request".into(),
                    }),
                );
            }
            Wakeup::Forget { worker_id, run_id } => {
                self.sessions.release(worker_id, run_id);
                self.sessions.send(
                    worker_id,
                    Body::Forget(v1::ForgetRun {
                        run_id: run_id.to_string(),
                    }),
                );
            }
            Wakeup::Jobs { ref job_ids } => {
                for &job_id in job_ids.iter() {
                    let _ = self.notices.send(Notice::Job { job_id });
                }
            }
            Wakeup::Drain { worker_id } => self.sessions.drain(worker_id),
            Wakeup::Revoke { worker_id } => self.sessions.drop_worker(worker_id),
            Wakeup::Configs => self.push_configs().await,
            Wakeup::TokensRevoked => self.tokens.clear(),
        }
    }

    /// Carries out a wake-up here and on every other replica (the worker it names may be
    /// connected to any of them).
    pub async fn tell_everywhere(&self, wakeup: drover_store::Wakeup) {
        self.apply_here(&wakeup).await;
        self.publish(wakeup).await;
    }

    /// Tells the other replicas; a failure only delays them (they re-read the store).
    pub async fn publish(&self, wakeup: drover_store::Wakeup) {
        if let Err(e) = self.store.publish(&wakeup).await {
            tracing::warn!(error = %e, "cannot notify the other replicas");
        }
    }

    /// Sends each connected node the newest configuration that concerns it, if it has not
    /// had it yet.
    pub async fn push_configs(&self) {
        let configs = match self.store.list_node_configs().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read node configurations");
                return;
            }
        };
        for (worker_id, labels, sent) in self.sessions.config_targets() {
            let Some(desired) = drover_store::desired_config(&configs, worker_id, &labels) else {
                continue;
            };
            if desired.version <= sent {
                continue;
            }
            let json = match serde_json::to_string(&desired.config) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a node configuration");
                    continue;
                }
            };
            let msg =
                drover_proto::v1::server_message::Body::Config(drover_proto::v1::NodeConfig {
                    version: desired.version,
                    json,
                });
            self.sessions.send_config(worker_id, desired.version, msg);
        }
    }
}

/// Tells the other replicas' waiters which jobs are final, many per notice.
pub async fn publish_final_jobs(
    state: Arc<AppState>,
    mut final_jobs: tokio::sync::mpsc::UnboundedReceiver<JobId>,
) {
    // A PostgreSQL notice carries under 8,000 bytes; a job id takes 39 in JSON.
    const IDS_PER_NOTICE: usize = 150;
    let mut job_ids = Vec::with_capacity(IDS_PER_NOTICE);
    while final_jobs.recv_many(&mut job_ids, IDS_PER_NOTICE).await > 0 {
        let job_ids = std::mem::take(&mut job_ids);
        state.publish(drover_store::Wakeup::Jobs { job_ids }).await;
    }
}

/// Carries out what other replicas ask of this one (PostgreSQL only).
pub async fn listen(state: Arc<AppState>) {
    let mut heard = match state.store.listen().await {
        Ok(Some(rx)) => rx,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen to the other replicas; they will be heard on the next poll");
            return;
        }
    };
    while let Some(wakeup) = heard.recv().await {
        state.apply_here(&wakeup).await;
    }
}
