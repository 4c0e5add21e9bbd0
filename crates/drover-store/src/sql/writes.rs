//! The batched writes of attempts: what workers report (accepts, starts, ends) and what
//! ends a run, read ahead of the write transaction and written in as few statements as
//! the batch allows.

use super::*;

/// Below this many jobs a batch reads inside its write transaction: a small batch means
/// the writer is not busy, and reading ahead is one more round trip on each job's way to
/// RUNNING (0.2–0.3 ms more submit → RUNNING, one job at a time). Under load batches
/// carry a hundred jobs and more.
pub(super) const READ_AHEAD_FROM: usize = 16;

/// Runs and jobs a transaction has read (and changed), as they now stand in it: the ends
/// of a batch reuse what its steps read instead of reading the same rows again.
#[derive(Default)]
pub(super) struct Loaded {
    pub(super) runs: HashMap<RunId, RunRecord>,
    pub(super) jobs: HashMap<JobId, JobRecord>,
    /// Set when `runs` and `jobs` were read ahead of the transaction ([`ReadAhead`]).
    pub(super) ahead: Option<ReadAhead>,
}

impl Loaded {
    /// Adds the runs of `ids` not held yet, and their jobs not held yet: one row per run
    /// and its job (a job held already may have changed in this transaction; it is kept).
    pub(super) async fn read(&mut self, conn: &mut AnyConnection, ids: &[RunId]) -> Result<()> {
        let missing: Vec<RunId> = ids
            .iter()
            .filter(|id| !self.runs.contains_key(id))
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let lock = for_update(conn);
        let engine = engine_of(conn);
        let (run, job) = (runs_json(engine), jobs_json(engine));
        for chunk in missing.chunks(ROWS_PER_STATEMENT * 8) {
            // Locked (PostgreSQL) in run id order, each run with its job, as
            // `load_by_ids` locks them.
            let sql = binds_for(
                &*conn,
                format!(
                    "SELECT {run}, {job} FROM runs JOIN jobs ON jobs.id = runs.job_id \
                     WHERE runs.id IN ({}) ORDER BY runs.id{lock}",
                    placeholders(1, chunk.len())
                ),
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            for row in query.fetch_all(&mut *conn).await? {
                let run = from_json::<RunJson>(&row, 0)?.record()?;
                let job_id = run.job_id;
                self.runs.insert(run.id, run);
                if let std::collections::hash_map::Entry::Vacant(held) = self.jobs.entry(job_id) {
                    held.insert(from_json::<JobJson>(&row, 1)?.record()?);
                }
            }
        }
        Ok(())
    }
}

/// Runs and jobs read ahead of a write transaction, on SQLite ([`SqlStore::runs_read_ahead`]),
/// as the transaction expects to find them. SQLite has one writer: a read inside a write
/// transaction is time no other write can use (a quarter of the writer's time under
/// load), while readers run beside it. So the rows are read before, and each write of one
/// of them matches the row as expected and counts the rows it changed: fewer mean a row
/// moved since it was read, and the transaction is given up
/// ([`StoreError::ReadAheadStale`]) and written again with its reads inside. Rows decided
/// on but not written are counted as expected before the transaction settles dependents
/// or commits ([`ReadAhead::check_unwritten`]); from then on nothing else writes until the
/// commit. A job is expected in its state and on its current run: every new attempt moves
/// the run, and a job comes back to a state only through another state.
pub(super) struct ReadAhead {
    pub(super) runs: HashMap<RunId, Expected<RunState>>,
    pub(super) jobs: HashMap<JobId, Expected<(JobState, Option<RunId>)>>,
}

pub(super) struct Expected<T> {
    pub(super) stands: T,
    pub(super) written: bool,
}

impl<T> Expected<T> {
    pub(super) fn read(stands: T) -> Self {
        Self {
            stands,
            written: false,
        }
    }
}

impl ReadAhead {
    pub(super) fn of(runs: &HashMap<RunId, RunRecord>, jobs: &HashMap<JobId, JobRecord>) -> Self {
        Self {
            runs: runs
                .values()
                .map(|r| (r.id, Expected::read(r.state)))
                .collect(),
            jobs: jobs
                .values()
                .map(|j| (j.id, Expected::read((j.state, j.current_run))))
                .collect(),
        }
    }

    /// Fails as stale unless every run and job not written yet stands as read.
    pub(super) async fn check_unwritten(self, conn: &mut AnyConnection) -> Result<()> {
        let runs: Vec<[Option<String>; 3]> = (self.runs.iter())
            .filter(|(_, e)| !e.written)
            .map(|(id, e)| [Some(id.to_string()), Some(e.stands.as_str().into()), None])
            .collect();
        let jobs: Vec<[Option<String>; 3]> = (self.jobs.iter())
            .filter(|(_, e)| !e.written)
            .map(|(id, e)| {
                let (state, current_run) = e.stands;
                let current_run = current_run.map(|r| r.to_string());
                [
                    Some(id.to_string()),
                    Some(state.as_str().into()),
                    current_run,
                ]
            })
            .collect();
        let runs_join = "runs ON runs.id = v.column1 AND runs.state = v.column2";
        let jobs_join = "jobs ON jobs.id = v.column1 AND jobs.state = v.column2 \
                         AND jobs.current_run IS v.column3";
        if count_as_read(conn, runs_join, 2, &runs).await?
            && count_as_read(conn, jobs_join, 3, &jobs).await?
        {
            Ok(())
        } else {
            Err(StoreError::ReadAheadStale)
        }
    }
}

/// Whether each of `rows` (their first `cols` values) finds its match in `join`: one
/// count per statement, no rows handed back.
pub(super) async fn count_as_read(
    conn: &mut AnyConnection,
    join: &str,
    cols: usize,
    rows: &[[Option<String>; 3]],
) -> Result<bool> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT * 4) {
        let sql = binds_for(
            &*conn,
            format!(
                "SELECT count(*) FROM (VALUES {}) AS v JOIN {join}",
                row_tuples(chunk.len(), cols)
            ),
        );
        let mut query = sqlx::query_scalar::<_, i64>(&sql);
        for row in chunk {
            for value in &row[..cols] {
                query = query.bind(value.clone());
            }
        }
        if query.fetch_one(&mut *conn).await? != chunk.len() as i64 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `UPDATE runs SET {set}` (binds `$1…$set_binds`, bound by `bind_set`) for `ids`, which
/// become `to`: by id alone, or, for runs read ahead, only where each still is as expected.
pub(super) async fn update_runs(
    conn: &mut AnyConnection,
    (set, set_binds): (&str, usize),
    bind_set: &(dyn for<'q> Fn(AnyQuery<'q>) -> AnyQuery<'q> + Sync),
    ids: &[RunId],
    to: RunState,
    mut ahead: Option<&mut ReadAhead>,
) -> Result<()> {
    let mut by_expected: HashMap<Option<RunState>, Vec<RunId>> = HashMap::new();
    for id in ids {
        let expected = ahead
            .as_ref()
            .and_then(|a| a.runs.get(id))
            .map(|e| e.stands);
        by_expected.entry(expected).or_default().push(*id);
    }
    for (expected, ids) in by_expected {
        let state = expected.map(RunState::as_str);
        let changed =
            update_by_id(&mut *conn, "runs", (set, set_binds), bind_set, state, &ids).await?;
        if expected.is_some() && changed != ids.len() as u64 {
            return Err(StoreError::ReadAheadStale);
        }
    }
    if let Some(ahead) = ahead.as_mut() {
        for id in ids {
            if let Some(e) = ahead.runs.get_mut(id) {
                *e = Expected {
                    stands: to,
                    written: true,
                };
            }
        }
    }
    Ok(())
}

/// [`update_runs`] for jobs, which keep their current run.
pub(super) async fn update_jobs(
    conn: &mut AnyConnection,
    (set, set_binds): (&str, usize),
    bind_set: &(dyn for<'q> Fn(AnyQuery<'q>) -> AnyQuery<'q> + Sync),
    ids: &[JobId],
    to: JobState,
    mut ahead: Option<&mut ReadAhead>,
) -> Result<()> {
    let (expected, by_id): (Vec<&JobId>, Vec<&JobId>) = ids
        .iter()
        .partition(|id| ahead.as_ref().is_some_and(|a| a.jobs.contains_key(id)));
    update_by_id(&mut *conn, "jobs", (set, set_binds), bind_set, None, &by_id).await?;
    if let Some(ahead) = ahead.as_mut() {
        for chunk in expected.chunks(ROWS_PER_STATEMENT * 8) {
            // SQLite's `IS`: a job read ahead may have no current run.
            let sql = binds_for(
                &*conn,
                format!(
                    "UPDATE jobs SET {set} FROM (VALUES {}) AS v WHERE jobs.id = v.column1 \
                     AND jobs.state = v.column2 AND jobs.current_run IS v.column3",
                    row_tuples_from(set_binds + 1, chunk.len(), 3)
                ),
            );
            let mut query = bind_set(sqlx::query(&sql));
            for id in chunk {
                let (state, current_run) = ahead.jobs[*id].stands;
                query = query
                    .bind(id.to_string())
                    .bind(state.as_str())
                    .bind(current_run.map(|r| r.to_string()));
            }
            if query.execute(&mut *conn).await?.rows_affected() != chunk.len() as u64 {
                return Err(StoreError::ReadAheadStale);
            }
            for id in chunk {
                if let Some(e) = ahead.jobs.get_mut(*id) {
                    *e = Expected {
                        stands: (to, e.stands.1),
                        written: true,
                    };
                }
            }
        }
    }
    Ok(())
}

/// Row writes and events of run steps, applied in memory and not yet written: when the
/// same batch also ends a run (a short job reports its start and its end together), the
/// end writes the run and its job once, with their final values, and the step's writes
/// of them are dropped ([`StepWrites::forget_run`], [`StepWrites::forget_job`]).
pub(super) struct StepWrites {
    pub(super) now: Timestamp,
    pub(super) started: std::collections::HashSet<RunId>,
    pub(super) moved: HashMap<JobId, JobState>,
    pub(super) events: Vec<NewEvent>,
    /// The batch's runs and jobs were read ahead: the writes expect them as read.
    pub(super) ahead: Option<ReadAhead>,
}

impl StepWrites {
    pub(super) fn new(now: Timestamp) -> Self {
        Self {
            now,
            started: std::collections::HashSet::new(),
            moved: HashMap::new(),
            events: Vec::new(),
            ahead: None,
        }
    }

    /// Ends the read-ahead: every run and job read ahead and not written is counted as
    /// read (stale otherwise); from here on the batch writes by id alone.
    pub(super) async fn check_read_ahead(&mut self, tx: &mut AnyConnection) -> Result<()> {
        match self.ahead.take() {
            Some(ahead) => ahead.check_unwritten(tx).await,
            None => Ok(()),
        }
    }

    pub(super) fn forget_run(&mut self, id: RunId) {
        self.started.remove(&id);
    }

    pub(super) fn forget_job(&mut self, id: JobId) {
        self.moved.remove(&id);
    }

    /// Writes what is left, in the caller's transaction.
    pub(super) async fn write(&mut self, tx: &mut AnyConnection) -> Result<()> {
        let started: Vec<RunId> = self.started.drain().collect();
        let now = self.now.0;
        update_runs(
            &mut *tx,
            ("state = $1, started_at = $2", 2),
            &|q| q.bind(RunState::Running.as_str()).bind(now),
            &started,
            RunState::Running,
            self.ahead.as_mut(),
        )
        .await?;
        let moved: Vec<(JobId, JobState)> = self.moved.drain().collect();
        set_job_states(&mut *tx, &moved, self.now, self.ahead.as_mut()).await?;
        insert_events(&mut *tx, &std::mem::take(&mut self.events)).await
    }
}

/// The body of [`Store::advance_runs`], inside the caller's transaction: the steps are
/// applied to `loaded` and their writes returned, for the caller to write
/// ([`StepWrites::write`]) or to hand to the ends of the same batch.
pub(super) async fn advance_in(
    tx: &mut AnyConnection,
    batch: Vec<StepRequest>,
    loaded: &mut Loaded,
    now: Timestamp,
) -> Result<(Vec<Result<JobId>>, StepWrites)> {
    let mut writes = StepWrites::new(now);
    writes.ahead = loaded.ahead.take();
    if batch.is_empty() {
        return Ok((Vec::new(), writes));
    }
    let run_ids: Vec<RunId> = batch.iter().map(|r| r.run_id).collect();
    loaded.read(&mut *tx, &run_ids).await?;
    let Loaded { runs, jobs, .. } = loaded;
    let StepWrites {
        started,
        moved,
        events,
        ..
    } = &mut writes;
    let mut answers = Vec::with_capacity(batch.len());
    // Applied in order in memory, then written once: an accept and the start of the
    // same run may share the batch.
    for req in batch {
        let answer = (|| {
            let run = runs
                .get_mut(&req.run_id)
                .ok_or_else(|| StoreError::NotFound {
                    kind: "run",
                    id: req.run_id.to_string(),
                })?;
            if run.worker_id != req.worker_id {
                return Err(StoreError::NotYourRun { run_id: run.id });
            }
            if run.state != RunState::Assigned {
                return Err(live_run_conflict(run));
            }
            let job = jobs
                .get_mut(&run.job_id)
                .ok_or_else(|| StoreError::NotFound {
                    kind: "job",
                    id: run.job_id.to_string(),
                })?;
            // A refused event takes back those of the same step: a refused step changes nothing.
            let from = job.state;
            let mut to = from;
            let kept = events.len();
            for &event in req.step.job_events() {
                let next = to.apply(event).inspect_err(|_| events.truncate(kept))?;
                let kind = match event {
                    // An accept leaves the job ASSIGNED: only its event is written.
                    JobEvent::Accept => EventKind::JobAccepted {
                        run_id: run.id,
                        worker_id: run.worker_id,
                    },
                    _ => EventKind::for_transition(to, event, next, Some(run.id), None, None),
                };
                events.push(NewEvent::job(now, job.id, kind));
                to = next;
            }
            if to != from {
                job.state = to;
                job.status_code = to.status_code();
                job.updated_at = now;
                moved.insert(job.id, to);
            }
            if req.step != RunStep::Accept {
                run.state = RunState::Running;
                run.started_at = Some(now);
                started.insert(run.id);
            }
            Ok(job.id)
        })();
        answers.push(answer);
    }
    Ok((answers, writes))
}

/// The body of [`Store::finish_runs`], inside the caller's transaction.
///
/// `steps` are the writes of steps in the same batch (already applied to `loaded`); they
/// are written here, less what the ends write anyway.
pub(super) async fn finish_in(
    tx: &mut AnyConnection,
    batch: Vec<FinishRequest>,
    retry: RetrySettings,
    loaded: Loaded,
    mut steps: StepWrites,
) -> Result<Vec<Result<Finished>>> {
    if batch.is_empty() {
        steps.write(tx).await?;
        steps.check_read_ahead(tx).await?;
        return Ok(Vec::new());
    }
    let mut writing = FinishBatch::read(&mut *tx, &batch, retry, loaded, steps).await?;
    let mut answers = Vec::with_capacity(batch.len());
    for req in batch {
        answers.push(writing.finish(&mut *tx, req).await?);
    }
    writing.flush(&mut *tx).await?;
    writing.steps.check_read_ahead(tx).await?;
    Ok(answers)
}

/// Moves many jobs at once: one statement per target state, not one per job.
///
/// A caller that read the jobs in this transaction (locked on PostgreSQL, [`for_update`];
/// SQLite has one writer) checked their state there, so the statements select by id
/// alone: a `state = …` guard besides would be redundant, and on PostgreSQL it let the
/// planner pick `jobs_state` from statistics taken while the queue was small, then test
/// every queued job against the id list. Jobs read ahead (SQLite) are matched as read.
pub(super) async fn set_job_states(
    conn: &mut AnyConnection,
    changes: &[(JobId, JobState)],
    now: Timestamp,
    mut ahead: Option<&mut ReadAhead>,
) -> Result<()> {
    let mut by_target: HashMap<JobState, Vec<JobId>> = HashMap::new();
    for (id, to) in changes {
        by_target.entry(*to).or_default().push(*id);
    }
    for (to, ids) in by_target {
        let finished = to.is_terminal().then_some(now.0);
        update_jobs(
            &mut *conn,
            ("state = $1, updated_at = $2, finished_at = $3", 3),
            &|q| q.bind(to.as_str()).bind(now.0).bind(finished),
            &ids,
            to,
            ahead.as_deref_mut(),
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn load_run(conn: &mut AnyConnection, id: RunId) -> Result<RunRecord> {
    let sql = format!(
        "SELECT {} FROM runs WHERE id = $1",
        runs_json(engine_of(conn))
    );
    load_one(conn, &sql, "run", id, run_from_row).await
}

/// Moves a job through `event`, writing the state and its event in the caller's transaction.
pub(super) async fn transition(
    conn: &mut AnyConnection,
    job: &JobRecord,
    event: JobEvent,
    run_id: Option<RunId>,
    kind: Option<EventKind>,
    now: Timestamp,
) -> Result<JobState> {
    let to = job.state.apply(event)?;
    set_job_states(&mut *conn, &[(job.id, to)], now, None).await?;
    let kind =
        kind.unwrap_or_else(|| EventKind::for_transition(job.state, event, to, run_id, None, None));
    insert_event(conn, now, Some(job.id), None, &kind).await?;
    Ok(to)
}

pub(super) fn live_run_conflict(run: &RunRecord) -> StoreError {
    StoreError::Conflict(format!("run {} is already {}", run.id, run.state))
}

/// What a batch of run ends shares: the records read up front (kept up to date as the
/// batch goes), the webhooks, which jobs others wait on, and the events to write.
pub(super) struct FinishBatch {
    /// Steps of the same batch not written yet; written first at each flush.
    pub(super) steps: StepWrites,
    pub(super) runs: HashMap<RunId, RunRecord>,
    pub(super) jobs: HashMap<JobId, JobRecord>,
    pub(super) hooks: Hooks,
    pub(super) awaited: std::collections::HashSet<JobId>,
    pub(super) events: Vec<NewEvent>,
    /// Row changes not written yet, grouped by their values: most runs of a batch end
    /// alike (exit 0, no error), so a batch costs a few statements, not two per run.
    pub(super) run_writes: HashMap<RunEndValues, Vec<RunId>>,
    pub(super) job_writes: HashMap<JobEndValues, Vec<JobId>>,
    pub(super) pending_jobs: std::collections::HashSet<JobId>,
    pub(super) retry: RetrySettings,
    pub(super) now: Timestamp,
}

#[derive(PartialEq, Eq, Hash)]
pub(super) struct RunEndValues {
    pub(super) state: RunState,
    pub(super) exit_code: Option<i64>,
    pub(super) error: Option<String>,
    pub(super) result: Option<String>,
}

#[derive(PartialEq, Eq, Hash)]
pub(super) struct JobEndValues {
    pub(super) to: JobState,
    pub(super) finished: bool,
    pub(super) exit_code: Option<i64>,
    pub(super) error: Option<String>,
    pub(super) result: Option<String>,
    pub(super) not_before: Option<i64>,
}

impl FinishBatch {
    pub(super) async fn read(
        conn: &mut AnyConnection,
        batch: &[FinishRequest],
        retry: RetrySettings,
        mut loaded: Loaded,
        steps: StepWrites,
    ) -> Result<Self> {
        let run_ids: Vec<RunId> = batch.iter().map(|r| r.run_id).collect();
        loaded.read(&mut *conn, &run_ids).await?;
        let Loaded { runs, jobs, .. } = loaded;
        let mut job_ids: Vec<JobId> = run_ids
            .iter()
            .filter_map(|id| runs.get(id))
            .map(|r| r.job_id)
            .collect();
        job_ids.sort();
        job_ids.dedup();
        let hooks = load_hooks(&mut *conn).await?;
        let mut awaited = std::collections::HashSet::new();
        for chunk in job_ids.chunks(ROWS_PER_STATEMENT * 8) {
            let sql = binds_for(
                &*conn,
                format!(
                    "SELECT DISTINCT depends_on FROM job_deps WHERE depends_on IN ({})",
                    placeholders(1, chunk.len())
                ),
            );
            let mut query = sqlx::query_scalar::<_, String>(&sql);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            for id in query.fetch_all(&mut *conn).await? {
                awaited.insert(id.parse().map_err(corrupt)?);
            }
        }
        Ok(Self {
            now: steps.now,
            steps,
            runs,
            jobs,
            hooks,
            awaited,
            events: Vec::new(),
            run_writes: HashMap::new(),
            job_writes: HashMap::new(),
            pending_jobs: std::collections::HashSet::new(),
            retry,
        })
    }

    /// Writes the row changes and events gathered so far.
    pub(super) async fn flush(&mut self, conn: &mut AnyConnection) -> Result<()> {
        // The steps' events are written with the ends': a job that started and ended in
        // this batch has its events of it in one row ([`event_rows`]).
        let mut events = std::mem::take(&mut self.steps.events);
        self.steps.write(&mut *conn).await?;
        let now = self.now.0;
        for (values, ids) in std::mem::take(&mut self.run_writes) {
            update_runs(
                &mut *conn,
                (
                    "state = $1, exit_code = $2, error = $3, finished_at = $4, \
                     started_at = COALESCE(started_at, $5), result = $6",
                    6,
                ),
                &|q| {
                    q.bind(values.state.as_str())
                        .bind(values.exit_code)
                        .bind(values.error.clone())
                        .bind(now)
                        .bind(now)
                        .bind(values.result.clone())
                },
                &ids,
                values.state,
                self.steps.ahead.as_mut(),
            )
            .await?;
        }
        self.pending_jobs.clear();
        for (values, ids) in std::mem::take(&mut self.job_writes) {
            update_jobs(
                &mut *conn,
                (
                    "state = $1, updated_at = $2, finished_at = $3, exit_code = $4, \
                     error = $5, result = $6, not_before = COALESCE($7, not_before)",
                    7,
                ),
                &|q| {
                    q.bind(values.to.as_str())
                        .bind(now)
                        .bind(values.finished.then_some(now))
                        .bind(values.exit_code)
                        .bind(values.error.clone())
                        .bind(values.result.clone())
                        .bind(values.not_before)
                },
                &ids,
                values.to,
                self.steps.ahead.as_mut(),
            )
            .await?;
        }
        events.append(&mut self.events);
        insert_events(&mut *conn, &events).await
    }

    /// Records one attempt's end (see `Store::finish_run`). Every refusal is found before
    /// anything is written, so a refused report leaves no trace and needs no savepoint; the
    /// outer error is the database's and fails the batch.
    pub(super) async fn finish(
        &mut self,
        conn: &mut AnyConnection,
        req: FinishRequest,
    ) -> Result<Result<Finished>> {
        let now = self.now;
        let Some(mut run) = self.runs.get(&req.run_id).cloned() else {
            return Ok(Err(StoreError::NotFound {
                kind: "run",
                id: req.run_id.to_string(),
            }));
        };
        if req.worker_id.is_some_and(|w| w != run.worker_id) {
            return Ok(Err(StoreError::NotYourRun { run_id: run.id }));
        }
        let Some(mut job) = self.jobs.get(&run.job_id).cloned() else {
            return Ok(Err(StoreError::NotFound {
                kind: "job",
                id: run.job_id.to_string(),
            }));
        };
        if run.state.is_terminal() {
            return Ok(Ok(Finished {
                job,
                run,
                changed: false,
            }));
        }
        let end = req.end;
        // Decide: only the job's current attempt moves the job; a stale run just ends.
        let mut moves = Vec::new();
        let mut not_before = None;
        let mut to = job.state;
        if job.current_run == Some(run.id) && !job.state.is_terminal() {
            // A result whose start was never recorded still passes through RUNNING, so
            // that the event history stays a walk of the transition table.
            if to == JobState::Assigned && end.outcome != drover_core::RunOutcome::Failed {
                let next = match to.apply(JobEvent::Start) {
                    Ok(next) => next,
                    Err(e) => return Ok(Err(e.into())),
                };
                moves.push(EventKind::for_transition(
                    to,
                    JobEvent::Start,
                    next,
                    Some(run.id),
                    None,
                    None,
                ));
                to = next;
            }
            let retrying =
                end.outcome.is_retryable() && retry::should_retry(run.attempt, job.max_attempts);
            let (event, kind) = if retrying {
                let base = job
                    .spec
                    .backoff_base_ms
                    .map(Duration::from_millis)
                    .unwrap_or(self.retry.default_backoff_base);
                let at = now.plus(retry::backoff_delay(base, run.attempt, self.retry.jitter));
                not_before = Some(at);
                let kind = EventKind::JobRetryScheduled {
                    run_id: run.id,
                    next_attempt: run.attempt + 1,
                    not_before: at,
                    error: end.error.clone(),
                };
                (JobEvent::Retry, Some(kind))
            } else {
                (end.outcome.final_event(), None)
            };
            let next = match to.apply(event) {
                Ok(next) => next,
                Err(e) => return Ok(Err(e.into())),
            };
            moves.push(kind.unwrap_or_else(|| {
                EventKind::for_transition(
                    to,
                    event,
                    next,
                    Some(run.id),
                    end.exit_code,
                    end.error.clone(),
                )
            }));
            to = next;
        }
        // Write.
        let result = end
            .result
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(corrupt)?;
        run.state = end.outcome.run_state();
        run.exit_code = end.exit_code;
        run.error = end.error.clone();
        run.finished_at = Some(now);
        run.started_at = run.started_at.or(Some(now));
        run.result = end.result.clone();
        let values = RunEndValues {
            state: run.state,
            exit_code: end.exit_code.map(i64::from),
            error: end.error.clone(),
            result: result.clone(),
        };
        self.run_writes.entry(values).or_default().push(run.id);
        self.steps.forget_run(run.id);
        if !moves.is_empty() {
            self.steps.forget_job(job.id);
            if !self.pending_jobs.insert(job.id) {
                // The same job moving twice in a batch: the first move is written first.
                self.flush(&mut *conn).await?;
                self.pending_jobs.insert(job.id);
            }
            job.state = to;
            job.status_code = to.status_code();
            job.updated_at = now;
            job.finished_at = to.is_terminal().then_some(now);
            job.exit_code = end.exit_code;
            job.error = end.error.clone();
            job.result = end.result.clone();
            job.not_before = not_before.unwrap_or(job.not_before);
            let values = JobEndValues {
                to,
                finished: to.is_terminal(),
                exit_code: end.exit_code.map(i64::from),
                error: end.error.clone(),
                result,
                not_before: not_before.map(|t| t.0),
            };
            self.job_writes.entry(values).or_default().push(job.id);
            let events = moves
                .into_iter()
                .map(|kind| NewEvent::job(now, job.id, kind));
            self.events.extend(events);
        }
        // The payload is built only for a cluster that has webhooks: most batches have none.
        if !self.hooks.is_empty() {
            let will_retry = job.state == JobState::Queued;
            let (event, key, payload) =
                run_event(&job, Some(&run), run.state.as_str(), will_retry, now);
            enqueue_for(&mut *conn, &self.hooks, event, &key, &payload, now).await?;
        }
        if job.state.is_terminal()
            && job.current_run == Some(run.id)
            && (job.group_id.is_some() || self.awaited.contains(&job.id))
        {
            // Dependents and groups are settled with everything so far written, in order;
            // what that changes is read again from the store from here on.
            self.flush(&mut *conn).await?;
            // Settling reads and writes other jobs: the rows read ahead are checked first.
            self.steps.check_read_ahead(&mut *conn).await?;
            settle_final(&mut *conn, &job, now).await?;
            let job_ids: Vec<JobId> = self.jobs.keys().copied().collect();
            self.jobs = load_jobs(&mut *conn, &job_ids).await?;
            job = self.jobs.get(&job.id).cloned().unwrap_or(job);
        }
        self.runs.insert(run.id, run.clone());
        self.jobs.insert(job.id, job.clone());
        Ok(Ok(Finished {
            job,
            run,
            changed: true,
        }))
    }
}

/// The write transactions of dispatch and reports, and what they read ahead of them.
impl SqlStore {
    /// The body of [`Store::assign_jobs`], with the jobs read ahead (SQLite) or read here.
    pub(super) async fn assign_in(
        &self,
        plan: &[(JobId, WorkerId)],
        lease_until: Timestamp,
        ahead: Option<HashMap<JobId, JobRecord>>,
    ) -> Result<Vec<Assignment>> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let _timer = WriteTimer::start("assign");
        let guarded = ahead.is_some();
        let mut jobs = match ahead {
            Some(jobs) => jobs,
            None => {
                let ids: Vec<JobId> = plan.iter().map(|(j, _)| *j).collect();
                load_jobs(&mut tx, &ids).await?
            }
        };
        let mut made = Vec::with_capacity(plan.len());
        let mut events = Vec::with_capacity(plan.len());
        for &(job_id, worker_id) in plan {
            // Gone, or no longer QUEUED: someone else took or cancelled it.
            let Some(job) = jobs
                .get_mut(&job_id)
                .filter(|j| j.state == JobState::Queued)
            else {
                continue;
            };
            let to = job.state.apply(JobEvent::Assign)?;
            let run = RunRecord {
                id: RunId::new(),
                job_id,
                attempt: job.attempts + 1,
                retry_of: job.current_run,
                worker_id,
                state: RunState::Assigned,
                exit_code: None,
                error: None,
                assigned_at: now,
                started_at: None,
                finished_at: None,
                lease_expires_at: lease_until,
                result: None,
            };
            let kind = EventKind::JobAssigned {
                run_id: run.id,
                worker_id,
                attempt: run.attempt,
            };
            events.push(NewEvent::job(now, job_id, kind));
            job.attempts = run.attempt;
            job.current_run = Some(run.id);
            job.state = to;
            job.status_code = to.status_code();
            job.updated_at = now;
            made.push(Assignment {
                run,
                job: job.clone(),
            });
        }
        const RUN_COLS_NEW: usize = 8;
        for chunk in made.chunks(ROWS_PER_STATEMENT) {
            let sql = binds_for(
                &tx,
                format!(
                    "INSERT INTO runs (id, job_id, attempt, retry_of, worker_id, state, assigned_at, \
                 lease_expires_at) VALUES {}",
                    row_tuples(chunk.len(), RUN_COLS_NEW)
                ),
            );
            let mut query = sqlx::query(&sql);
            for Assignment { run, .. } in chunk {
                query = query
                    .bind(run.id.to_string())
                    .bind(run.job_id.to_string())
                    .bind(i64::from(run.attempt))
                    .bind(run.retry_of.map(|r| r.to_string()))
                    .bind(run.worker_id.to_string())
                    .bind(run.state.as_str())
                    .bind(run.assigned_at.0)
                    .bind(run.lease_expires_at.0);
            }
            query.execute(&mut *tx).await?;
            // Each job points at the run just made for its next attempt, matched by id: the
            // jobs were read, and on PostgreSQL locked, in this transaction, or, read ahead
            // (SQLite), each must still be QUEUED on the run it was read with (its last,
            // the new run's `retry_of`; SQLite's `IS` matches a first attempt's none).
            let (cols, guard) = if guarded {
                (
                    3,
                    " AND jobs.state = 'QUEUED' AND jobs.current_run IS v.column3",
                )
            } else {
                (2, "")
            };
            let sql = binds_for(
                &tx,
                format!(
                    "UPDATE jobs SET attempts = attempts + 1, current_run = v.column2, state = $1, \
                 updated_at = $2 FROM (VALUES {}) AS v WHERE jobs.id = v.column1{guard}",
                    row_tuples_from(3, chunk.len(), cols)
                ),
            );
            let mut query = sqlx::query(&sql)
                .bind(JobState::Assigned.as_str())
                .bind(now.0);
            for Assignment { run, .. } in chunk {
                query = query.bind(run.job_id.to_string()).bind(run.id.to_string());
                if guarded {
                    query = query.bind(run.retry_of.map(|r| r.to_string()));
                }
            }
            let changed = query.execute(&mut *tx).await?.rows_affected();
            if guarded && changed != chunk.len() as u64 {
                return Err(StoreError::ReadAheadStale);
            }
        }
        insert_events(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(made)
    }

    /// One try of [`Store::report_runs`], in one transaction, from the runs and jobs read
    /// ahead in `loaded` (the rest are read here).
    pub(super) async fn report_in(
        &self,
        mut loaded: Loaded,
        steps: Vec<StepRequest>,
        ends: Vec<FinishRequest>,
        retry: RetrySettings,
    ) -> Result<RunReportAnswers> {
        let mut tx = self.writer.begin().await?;
        let _timer = WriteTimer::start("report");
        let now = Timestamp::now();
        let (stepped, writes) = advance_in(&mut tx, steps, &mut loaded, now).await?;
        let ended = finish_in(&mut tx, ends, retry, loaded, writes).await?;
        tx.commit().await?;
        Ok((stepped, ended))
    }

    /// Jobs as a reader sees them, for [`SqlStore::assign_in`].
    pub(super) async fn jobs_read_ahead(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobRecord>> {
        load_jobs(&mut *self.reader.acquire().await?, ids).await
    }

    /// Runs and their jobs as a reader sees them, to write in a transaction that expects
    /// them so ([`ReadAhead`]).
    pub(super) async fn runs_read_ahead(&self, ids: &[RunId]) -> Result<Loaded> {
        let mut loaded = Loaded::default();
        loaded.read(&mut *self.reader.acquire().await?, ids).await?;
        loaded.ahead = Some(ReadAhead::of(&loaded.runs, &loaded.jobs));
        Ok(loaded)
    }
}
