//! Writes come in bursts: many clients submitting, many workers accepting, starting and
//! ending runs at once. Callers hand their request to one task per kind of write, which
//! writes whatever has gathered in one transaction and answers each caller. Under no load
//! a request is written alone and at once; nothing waits for a batch to fill.

use drover_store::StoreError;
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// At most this many requests per transaction. Larger batches write each hot page (the
/// tails of the tables and indexes) once per commit for more rows: 1,024 rather than 256
/// moved the noop benchmark from about 5,500 to 6,500 jobs/s.
const MAX_BATCH: usize = 1024;

type Pending<Req, Resp> = (Req, oneshot::Sender<Result<Resp, StoreError>>);

/// Where callers hand their requests.
pub struct Batcher<Req, Resp> {
    queue: mpsc::UnboundedSender<Pending<Req, Resp>>,
}

/// The writing end, run by [`Gathered::write_with`] once the server serves.
pub struct Gathered<Req, Resp> {
    what: &'static str,
    queue: mpsc::UnboundedReceiver<Pending<Req, Resp>>,
    /// Write a batch again, with backoff, while the store is unavailable, instead of
    /// answering its requests with the error (see [`batcher_retrying`]).
    retry_unavailable: bool,
}

/// Longest wait between two tries of a batch while the store is unavailable.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(2);

/// A batcher for writes of one kind (`what` names them in logs and metrics).
pub fn batcher<Req, Resp>(what: &'static str) -> (Batcher<Req, Resp>, Gathered<Req, Resp>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let gathered = Gathered {
        what,
        queue: rx,
        retry_unavailable: false,
    };
    (Batcher { queue: tx }, gathered)
}

/// A batcher whose batches are written again while the store is unavailable (a database
/// restart): for writes nobody could send again by themselves, such as a worker's run
/// reports (a worker sends an accept or a start once). The batches queued behind wait, so
/// the order of writes is kept.
pub fn batcher_retrying<Req, Resp>(
    what: &'static str,
) -> (Batcher<Req, Resp>, Gathered<Req, Resp>) {
    let (queue, mut gathered) = batcher(what);
    gathered.retry_unavailable = true;
    (queue, gathered)
}

impl<Req, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Queues a request and waits for its own answer.
    pub async fn call(&self, request: Req) -> Result<Resp, StoreError> {
        self.queue(request).await
    }

    /// Queues a request now (requests are written in the order they were queued) and
    /// returns its answer to wait for.
    pub fn queue(
        &self,
        request: Req,
    ) -> impl Future<Output = Result<Resp, StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let queued = self.queue.send((request, tx)).is_ok();
        async move {
            let closed = || StoreError::Conflict("the control plane is shutting down".into());
            if !queued {
                return Err(closed());
            }
            rx.await.map_err(|_| closed())?
        }
    }
}

impl<Req: Clone, Resp> Gathered<Req, Resp> {
    /// Writes batches with `write` (one answer per request, in order) until every
    /// [`Batcher`] is gone.
    pub async fn write_with<F, Fut>(mut self, mut write: F)
    where
        F: FnMut(Vec<Req>) -> Fut,
        Fut: Future<Output = Result<Vec<Result<Resp, StoreError>>, StoreError>>,
    {
        while let Some(first) = self.queue.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let (mut requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            metrics::histogram!("drover_write_batch_size", "kind" => self.what)
                .record(requests.len() as f64);
            let mut wait = Duration::from_millis(50);
            let written = loop {
                let tried = if self.retry_unavailable {
                    write(requests.clone()).await
                } else {
                    write(std::mem::take(&mut requests)).await
                };
                match tried {
                    Err(e) if self.retry_unavailable && e.is_unavailable() => {
                        tracing::warn!(error = %e, batch = self.what, retry_in = ?wait, "the store is unavailable; the batch will be written again");
                        metrics::counter!("drover_write_retries_total", "kind" => self.what)
                            .increment(1);
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(MAX_RETRY_WAIT);
                    }
                    other => break other,
                }
            };
            match written {
                Ok(answers) if answers.len() == replies.len() => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                }
                Ok(answers) => {
                    let message = format!(
                        "{} answers for a batch of {} {}",
                        answers.len(),
                        replies.len(),
                        self.what
                    );
                    tracing::error!("{message}");
                    for reply in replies {
                        let _ = reply.send(Err(StoreError::BatchFailed(message.clone())));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, batch = self.what, "cannot write a batch; every request in it gets the error");
                    let message = e.to_string();
                    for reply in replies {
                        let _ = reply.send(Err(StoreError::BatchFailed(message.clone())));
                    }
                }
            }
        }
    }
}
