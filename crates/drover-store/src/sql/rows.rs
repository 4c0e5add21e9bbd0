//! Row decoding: the column lists each table is read with, and a record from each row
//! (JSON columns decoded here, not inline).

use super::*;

/// The columns of a job record, in the order [`JobJson`] reads them.
pub(super) const JOB_COLUMNS: [&str; 19] = [
    "id",
    "name",
    "spec",
    "state",
    "priority",
    "attempts",
    "max_attempts",
    "exit_code",
    "error",
    "not_before",
    "current_run",
    "group_id",
    "group_position",
    "waiting_on",
    "created_at",
    "updated_at",
    "finished_at",
    "owner",
    "result",
];

pub(super) const RESERVATION_COLS: &str =
    "id, resource, amount, worker_id, state, created_at, expires_at, ended_at, owner";

pub(super) const DELIVERY_COLS: &str = "d.id, d.webhook_id, w.url, d.event, d.idempotency_key, d.payload, \
    d.state, d.attempts, d.next_attempt_at, d.last_status, d.last_error, d.created_at, \
    d.delivered_at";

/// The columns of a run record, in the order [`RunJson`] reads them.
pub(super) const RUN_COLUMNS: [&str; 13] = [
    "id",
    "job_id",
    "attempt",
    "retry_of",
    "worker_id",
    "state",
    "exit_code",
    "error",
    "assigned_at",
    "started_at",
    "finished_at",
    "lease_expires_at",
    "result",
];

pub(super) const WORKER_COLS: &str = "id, name, state, capabilities, created_at, last_seen_at, provider, \
    resource_id, config_version, config_status, config_error, config_applied_at, applied_version";

pub(super) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub(super) fn parse<T: FromStr>(row: &AnyRow, col: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let text: String = row.try_get(col)?;
    text.parse::<T>()
        .map_err(|e| corrupt(format!("{col} {text:?}: {e}")))
}

pub(super) fn parse_opt<T: FromStr>(row: &AnyRow, col: &str) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| {
        t.parse::<T>()
            .map_err(|e| corrupt(format!("{col} {t:?}: {e}")))
    })
    .transpose()
}

pub(super) fn ts(row: &AnyRow, col: &str) -> Result<Timestamp> {
    Ok(Timestamp(row.try_get(col)?))
}

pub(super) fn ts_opt(row: &AnyRow, col: &str) -> Result<Option<Timestamp>> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(Timestamp))
}

/// The columns of `names` (a `*_COLUMNS` list) of the table `table`, as one JSON
/// array: jobs and runs are read as one text value per record rather than one value per
/// column. sqlx's `Any` driver copies every value of a row on the connection's thread and
/// again into an `AnyValue`; on SQLite that cost more than the B-tree reads behind it (a
/// report batch spent 12 µs per run and job read together as 32 columns, inside its
/// transaction), and serde decodes the array in one pass. `spec` and `result` hold JSON
/// already and are embedded as is.
pub(super) fn json_record(engine: Engine, table: &str, names: &[&str]) -> String {
    let (array, embed): (&str, fn(&str) -> String) = match engine {
        Engine::Sqlite => ("json_array", |column| format!("json({column})")),
        Engine::Postgres => ("json_build_array", |column| format!("{column}::json")),
    };
    let values: Vec<String> = names
        .iter()
        .map(|name| {
            let column = format!("{table}.{name}");
            match *name {
                "spec" | "result" => embed(&column),
                _ => column,
            }
        })
        .collect();
    let record = format!("{array}({})", values.join(", "));
    match engine {
        Engine::Sqlite => record,
        Engine::Postgres => format!("{record}::text"),
    }
}

/// A job as [`json_record`] gives it ([`JOB_COLUMNS`], in order).
#[derive(serde::Deserialize)]
pub(super) struct JobJson {
    pub(super) id: JobId,
    pub(super) name: String,
    pub(super) spec: JobSpec,
    pub(super) state: String,
    pub(super) priority: i32,
    pub(super) attempts: u32,
    pub(super) max_attempts: u32,
    pub(super) exit_code: Option<i32>,
    pub(super) error: Option<String>,
    pub(super) not_before: i64,
    pub(super) current_run: Option<RunId>,
    pub(super) group_id: Option<GroupId>,
    pub(super) group_position: Option<u32>,
    pub(super) waiting_on: u32,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) finished_at: Option<i64>,
    pub(super) owner: Option<String>,
    pub(super) result: Option<serde_json::Value>,
}

impl JobJson {
    pub(super) fn record(self) -> Result<JobRecord> {
        let state: JobState = self
            .state
            .parse()
            .map_err(|e| corrupt(format!("state {:?}: {e}", self.state)))?;
        Ok(JobRecord {
            id: self.id,
            name: self.name,
            state,
            status_code: state.status_code(),
            priority: self.priority,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            exit_code: self.exit_code,
            error: self.error,
            not_before: Timestamp(self.not_before),
            current_run: self.current_run,
            group_id: self.group_id,
            group_position: self.group_position,
            waiting_on: self.waiting_on,
            created_at: Timestamp(self.created_at),
            updated_at: Timestamp(self.updated_at),
            finished_at: self.finished_at.map(Timestamp),
            spec: self.spec,
            owner: self.owner,
            result: self.result,
        })
    }
}

/// A run as [`json_record`] gives it ([`RUN_COLUMNS`], in order).
#[derive(serde::Deserialize)]
pub(super) struct RunJson {
    pub(super) id: RunId,
    pub(super) job_id: JobId,
    pub(super) attempt: u32,
    pub(super) retry_of: Option<RunId>,
    pub(super) worker_id: WorkerId,
    pub(super) state: String,
    pub(super) exit_code: Option<i32>,
    pub(super) error: Option<String>,
    pub(super) assigned_at: i64,
    pub(super) started_at: Option<i64>,
    pub(super) finished_at: Option<i64>,
    pub(super) lease_expires_at: i64,
    pub(super) result: Option<serde_json::Value>,
}

impl RunJson {
    pub(super) fn record(self) -> Result<RunRecord> {
        Ok(RunRecord {
            id: self.id,
            job_id: self.job_id,
            attempt: self.attempt,
            retry_of: self.retry_of,
            worker_id: self.worker_id,
            state: self
                .state
                .parse()
                .map_err(|e| corrupt(format!("state {:?}: {e}", self.state)))?,
            exit_code: self.exit_code,
            error: self.error,
            assigned_at: Timestamp(self.assigned_at),
            started_at: self.started_at.map(Timestamp),
            finished_at: self.finished_at.map(Timestamp),
            lease_expires_at: Timestamp(self.lease_expires_at),
            result: self.result,
        })
    }
}

/// The JSON text of the row's column named `name`, decoded as `T`.
pub(super) fn json_column<T: serde::de::DeserializeOwned>(row: &AnyRow, name: &str) -> Result<T> {
    let text: String = row.try_get(name)?;
    serde_json::from_str(&text).map_err(|e| corrupt(format!("column {name}: {e}")))
}

pub(super) fn webhook_from_row(row: &AnyRow) -> Result<WebhookRecord> {
    Ok(WebhookRecord {
        id: parse(row, "id")?,
        url: row.try_get("url")?,
        events: json_column(row, "events")?,
        created_at: ts(row, "created_at")?,
    })
}

/// The JSON text of the row's column `column`, decoded as `T`.
pub(super) fn from_json<T: serde::de::DeserializeOwned>(row: &AnyRow, column: usize) -> Result<T> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| corrupt(format!("a record read as JSON: {e}")))
}

pub(super) fn job_from_row(row: &AnyRow) -> Result<JobRecord> {
    from_json::<JobJson>(row, 0)?.record()
}

pub(super) fn run_from_row(row: &AnyRow) -> Result<RunRecord> {
    from_json::<RunJson>(row, 0)?.record()
}

/// What to select for [`job_from_row`] from `jobs` (built once per engine).
pub(super) fn jobs_json(engine: Engine) -> &'static str {
    static SQLITE: LazyLock<String> =
        LazyLock::new(|| json_record(Engine::Sqlite, "jobs", &JOB_COLUMNS));
    static POSTGRES: LazyLock<String> =
        LazyLock::new(|| json_record(Engine::Postgres, "jobs", &JOB_COLUMNS));
    match engine {
        Engine::Sqlite => &SQLITE,
        Engine::Postgres => &POSTGRES,
    }
}

/// What to select for [`run_from_row`] from `runs` (built once per engine).
pub(super) fn runs_json(engine: Engine) -> &'static str {
    static SQLITE: LazyLock<String> =
        LazyLock::new(|| json_record(Engine::Sqlite, "runs", &RUN_COLUMNS));
    static POSTGRES: LazyLock<String> =
        LazyLock::new(|| json_record(Engine::Postgres, "runs", &RUN_COLUMNS));
    match engine {
        Engine::Sqlite => &SQLITE,
        Engine::Postgres => &POSTGRES,
    }
}

pub(super) fn worker_from_row(row: &AnyRow) -> Result<WorkerRecord> {
    let state: String = row.try_get("state")?;
    let caps: String = row.try_get("capabilities")?;
    Ok(WorkerRecord {
        id: parse(row, "id")?,
        name: row.try_get("name")?,
        state: WorkerState::parse(&state)
            .ok_or_else(|| corrupt(format!("worker state {state}")))?,
        capabilities: serde_json::from_str(&caps).map_err(corrupt)?,
        created_at: ts(row, "created_at")?,
        last_seen_at: ts(row, "last_seen_at")?,
        provider: row.try_get("provider")?,
        resource_id: row.try_get("resource_id")?,
        applied_config_version: row
            .try_get::<Option<i64>, _>("applied_version")?
            .map(|v| v as u64),
        config_ack: match row.try_get::<Option<i64>, _>("config_version")? {
            Some(version) => Some(ConfigAckRecord {
                config_version: version as u64,
                applied_at: ts_opt(row, "config_applied_at")?.unwrap_or(Timestamp(0)),
                status: row
                    .try_get::<Option<String>, _>("config_status")?
                    .unwrap_or_default(),
                error: row.try_get("config_error")?,
            }),
            None => None,
        },
    })
}

/// The events of a row ([`EventRow`]): its `data` is one event or an array of them.
pub(super) fn events_from_row(row: &AnyRow) -> Result<Vec<EventRecord>> {
    let data: String = row.try_get("data")?;
    let kinds: Vec<EventKind> = if data.starts_with('[') {
        serde_json::from_str(&data).map_err(corrupt)?
    } else {
        vec![serde_json::from_str(&data).map_err(corrupt)?]
    };
    let seq: i64 = row.try_get("seq")?;
    let (at, job_id, worker_id) = (
        ts(row, "at")?,
        parse_opt(row, "job_id")?,
        parse_opt(row, "worker_id")?,
    );
    Ok((0..)
        .zip(kinds)
        .map(|(i, kind)| EventRecord {
            seq: seq * EVENTS_PER_ROW as i64 + i,
            at,
            job_id,
            worker_id,
            kind,
        })
        .collect())
}

/// Every event of `rows`, in their order.
pub(super) fn events_from_rows(rows: &[AnyRow]) -> Result<Vec<EventRecord>> {
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        events.extend(events_from_row(row)?);
    }
    Ok(events)
}

pub(super) fn user_from_row(row: &AnyRow) -> Result<UserRecord> {
    let role: String = row.try_get("role")?;
    Ok(UserRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: Role::parse(&role).ok_or_else(|| corrupt(format!("role {role}")))?,
        created_at: ts(row, "created_at")?,
    })
}

pub(super) fn api_token_from_row(row: &AnyRow) -> Result<ApiTokenRecord> {
    Ok(ApiTokenRecord {
        id: row.try_get("id")?,
        name: row
            .try_get::<Option<String>, _>("name")?
            .unwrap_or_default(),
        user: row.try_get("user_name")?,
        created_at: ts(row, "created_at")?,
        expires_at: ts(row, "expires_at")?,
        last_used_at: ts_opt(row, "last_used_at")?,
        revoked_at: ts_opt(row, "revoked_at")?,
    })
}

pub(super) const API_TOKEN_COLS: &str = "t.id, t.name, u.name AS user_name, t.created_at, t.expires_at, \
    t.last_used_at, t.revoked_at";

pub(super) fn reservation_from_row(row: &AnyRow) -> Result<ReservationRecord> {
    let state: String = row.try_get("state")?;
    Ok(ReservationRecord {
        id: parse(row, "id")?,
        resource: row.try_get("resource")?,
        amount: row.try_get::<i64, _>("amount")? as u32,
        worker_id: parse(row, "worker_id")?,
        state: ReservationState::parse(&state)
            .ok_or_else(|| corrupt(format!("reservation state {state}")))?,
        created_at: ts(row, "created_at")?,
        expires_at: ts(row, "expires_at")?,
        ended_at: ts_opt(row, "ended_at")?,
        owner: row.try_get("owner")?,
    })
}

pub(super) fn delivery_from_row(row: &AnyRow) -> Result<DeliveryRecord> {
    let state: String = row.try_get("state")?;
    let payload: String = row.try_get("payload")?;
    Ok(DeliveryRecord {
        id: row.try_get("id")?,
        webhook_id: parse(row, "webhook_id")?,
        url: row.try_get("url")?,
        event: row.try_get("event")?,
        idempotency_key: row.try_get("idempotency_key")?,
        payload: serde_json::from_str(&payload).map_err(corrupt)?,
        state: DeliveryState::parse(&state)
            .ok_or_else(|| corrupt(format!("delivery state {state}")))?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        next_attempt_at: ts(row, "next_attempt_at")?,
        last_status: row
            .try_get::<Option<i64>, _>("last_status")?
            .map(|s| s as u16),
        last_error: row.try_get("last_error")?,
        created_at: ts(row, "created_at")?,
        delivered_at: ts_opt(row, "delivered_at")?,
    })
}
