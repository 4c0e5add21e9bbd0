//! The log window: a run's entries are sent in batches of at most LOG_MESSAGE_BYTES, at
//! most LOG_BATCHES_IN_FLIGHT unconfirmed; what is not confirmed is sent again after a
//! reconnect.

use super::*;

/// Bytes per log message, at most (and at least one entry, itself at most 64 KiB): well
/// under the 4 MiB a gRPC message may hold.
pub(crate) const LOG_MESSAGE_BYTES: usize = 1 << 20;

/// What an entry costs in a message besides its bytes, at most: its sequence number,
/// stream, timestamp, length and field tags.
pub(crate) const LOG_ENTRY_OVERHEAD: usize = 32;

/// Log messages of one run sent and not yet acknowledged, at most. Entries produced
/// meanwhile wait for an acknowledgement and travel together: a fast producer's lines go
/// in a few large messages (one store write each) instead of thousands of one-line ones
/// that the control plane stores one write at a time, falling behind.
pub(crate) const LOG_BATCHES_IN_FLIGHT: usize = 4;

pub(crate) fn send(out: Option<&UnboundedSender<v1::WorkerMessage>>, body: Out) {
    if let Some(out) = out {
        let _ = out.send(v1::WorkerMessage { body: Some(body) });
    }
}

/// [`send_unsent_logs`] if the run has room in its window of unacknowledged messages; if
/// not, they go on its next acknowledgement.
pub(crate) fn send_unsent_logs_in_window(
    run_id: &RunId,
    held: &mut HeldRun,
    out: &UnboundedSender<v1::WorkerMessage>,
) {
    if held.batches_in_flight.len() < LOG_BATCHES_IN_FLIGHT {
        send_unsent_logs(run_id, held, out);
    }
}

/// Sends the run's entries not sent on this connection yet.
pub(crate) fn send_unsent_logs(
    run_id: &RunId,
    held: &mut HeldRun,
    out: &UnboundedSender<v1::WorkerMessage>,
) {
    // Entries are numbered one by one, so the unsent ones are the last few: found without
    // walking those still waiting for their acknowledgement.
    let unsent = (held.next_seq - held.sent_seq) as usize;
    if unsent > 0 {
        let first_unsent = held.unacked.len().saturating_sub(unsent);
        send_logs_from(run_id, held, first_unsent, out);
    }
}

/// Sends the run's unacknowledged entries from `first` on, in messages of at most
/// [`LOG_MESSAGE_BYTES`], each counted in flight until acknowledged.
pub(crate) fn send_logs_from(
    run_id: &RunId,
    held: &mut HeldRun,
    first: usize,
    out: &UnboundedSender<v1::WorkerMessage>,
) {
    let mut entries = Vec::new();
    let mut bytes = 0;
    let mut pending = held.unacked.range(first..).peekable();
    while let Some(entry) = pending.next() {
        bytes += LOG_ENTRY_OVERHEAD + entry.data.len();
        entries.push(entry.clone());
        let full = pending
            .peek()
            .is_some_and(|next| bytes + LOG_ENTRY_OVERHEAD + next.data.len() > LOG_MESSAGE_BYTES);
        if full || pending.peek().is_none() {
            held.batches_in_flight.push_back(entry.seq);
            send(
                Some(out),
                Out::Logs(v1::LogBatch {
                    run_id: run_id.to_string(),
                    entries: std::mem::take(&mut entries),
                }),
            );
            bytes = 0;
        }
    }
    held.sent_seq = held.next_seq;
}
