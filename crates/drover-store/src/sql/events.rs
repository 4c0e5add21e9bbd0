//! Events: written with the change they record, many per statement.

use super::*;

/// An event to write with the change it describes.
pub(super) struct NewEvent {
    pub(super) at: Timestamp,
    pub(super) job_id: Option<JobId>,
    pub(super) worker_id: Option<WorkerId>,
    pub(super) kind: EventKind,
}

impl NewEvent {
    pub(super) fn job(at: Timestamp, job_id: JobId, kind: EventKind) -> Self {
        Self {
            at,
            job_id: Some(job_id),
            worker_id: None,
            kind,
        }
    }
}

pub(super) async fn insert_event(
    conn: &mut AnyConnection,
    at: Timestamp,
    job_id: Option<JobId>,
    worker_id: Option<WorkerId>,
    kind: &EventKind,
) -> Result<()> {
    let event = NewEvent {
        at,
        job_id,
        worker_id,
        kind: kind.clone(),
    };
    insert_events(conn, &[event]).await
}

pub(super) async fn insert_events(conn: &mut AnyConnection, events: &[NewEvent]) -> Result<()> {
    let rows = event_rows(events);
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = binds_for(
            &*conn,
            format!(
                "INSERT INTO events (at, job_id, worker_id, type, data) VALUES {}",
                row_tuples(chunk.len(), 5)
            ),
        );
        let mut query = sqlx::query(&sql);
        for row in chunk {
            query = query
                .bind(row.at.0)
                .bind(row.job_id.map(|j| j.to_string()))
                .bind(row.worker_id.map(|w| w.to_string()))
                .bind(row.types())
                .bind(row.data()?);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Events a row of `events` holds at most: the events of a row are numbered
/// `seq * EVENTS_PER_ROW + i` ([`events_from_row`]).
pub(super) const EVENTS_PER_ROW: usize = 8;

/// One row of `events`: one event, or several of one job at one instant.
pub(super) struct EventRow<'a> {
    pub(super) at: Timestamp,
    pub(super) job_id: Option<JobId>,
    pub(super) worker_id: Option<WorkerId>,
    pub(super) kinds: Vec<&'a EventKind>,
}

impl EventRow<'_> {
    /// The `type` column: the events' types, comma-separated.
    pub(super) fn types(&self) -> String {
        let mut types = String::new();
        for kind in &self.kinds {
            if !types.is_empty() {
                types.push(',');
            }
            types.push_str(kind.type_name());
        }
        types
    }

    /// The event as a JSON object, or several as an array of them.
    pub(super) fn data(&self) -> Result<String> {
        match self.kinds.as_slice() {
            [one] => serde_json::to_string(one),
            many => serde_json::to_string(many),
        }
        .map_err(corrupt)
    }
}

/// `events` as rows: the events of one job at one instant share a row (a run report
/// writes three for a job that started and ended in one batch), up to
/// [`EVENTS_PER_ROW`]. Rows are written in the order their first event came, so each
/// job's events, and each worker's, keep their order; an event naming a worker has a row
/// of its own and ends its job's open row. Every row is a table entry and an index
/// entry: on SQLite the events were two fifths of the writer's time per job.
pub(super) fn event_rows(events: &[NewEvent]) -> Vec<EventRow<'_>> {
    let mut rows: Vec<EventRow<'_>> = Vec::with_capacity(events.len());
    let mut open: HashMap<JobId, usize> = HashMap::new();
    for e in events {
        // Only the events of a job alone (naming no worker) share rows.
        let alone = e.job_id.filter(|_| e.worker_id.is_none());
        let joins = alone
            .and_then(|job| open.get(&job).copied())
            .filter(|&i| rows[i].at == e.at && rows[i].kinds.len() < EVENTS_PER_ROW);
        if let Some(i) = joins {
            rows[i].kinds.push(&e.kind);
            continue;
        }
        if let Some(job) = e.job_id {
            match alone {
                Some(_) => open.insert(job, rows.len()),
                None => open.remove(&job),
            };
        }
        rows.push(EventRow {
            at: e.at,
            job_id: e.job_id,
            worker_id: e.worker_id,
            kinds: vec![&e.kind],
        });
    }
    rows
}

/// The webhook event and payload for an attempt that ended (or a job that never ran).
pub(super) fn run_event(
    job: &JobRecord,
    run: Option<&RunRecord>,
    state: &str,
    will_retry: bool,
    now: Timestamp,
) -> (&'static str, String, serde_json::Value) {
    let event = match state {
        "SUCCEEDED" => webhook_events::COMPLETED,
        "TIMED_OUT" => webhook_events::TIMED_OUT,
        "CANCELLED" => webhook_events::CANCELLED,
        "SKIPPED" => webhook_events::SKIPPED,
        _ => webhook_events::FAILED,
    };
    let key = run
        .map(|r| r.id.to_string())
        .unwrap_or_else(|| job.id.to_string());
    let payload = serde_json::json!({
        "event": event,
        "run_id": run.map(|r| r.id),
        "job_id": job.id,
        "job_name": job.name,
        "attempt": run.map(|r| r.attempt),
        "state": state,
        "exit_code": run.and_then(|r| r.exit_code),
        "error": run.and_then(|r| r.error.clone()).or_else(|| job.error.clone()),
        "will_retry": will_retry,
        "group_id": job.group_id,
        "occurred_at": now,
    });
    (event, key, payload)
}
