//! Completions come in bursts (many workers ending runs at once): the sessions hand their
//! reports to this one task, which writes whatever has gathered in one transaction. Under
//! no load a report is written alone and at once; nothing waits for a batch to fill.

use crate::AppState;
use drover_store::{FinishRequest, Finished, StoreError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// At most this many reports per transaction.
const MAX_BATCH: usize = 256;

pub type Reply = oneshot::Sender<Result<Finished, StoreError>>;
pub type Queue = mpsc::UnboundedSender<(FinishRequest, Reply)>;

pub async fn run(state: Arc<AppState>, mut queue: mpsc::UnboundedReceiver<(FinishRequest, Reply)>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        metrics::histogram!("drover_finish_batch_size").record(requests.len() as f64);
        match state
            .store
            .finish_runs(requests, state.retry_settings())
            .await
        {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record run ends; the workers will report them again");
                let message = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Conflict(message.clone())));
                }
            }
        }
    }
}

/// Queues a report and waits for its answer.
pub async fn finish(state: &AppState, request: FinishRequest) -> Result<Finished, StoreError> {
    let (tx, rx) = oneshot::channel();
    state
        .finisher
        .send((request, tx))
        .map_err(|_| StoreError::Conflict("the control plane is shutting down".into()))?;
    rx.await
        .map_err(|_| StoreError::Conflict("the control plane is shutting down".into()))?
}
