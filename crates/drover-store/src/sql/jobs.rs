//! Jobs and groups: inserting (with dependencies, reservations and idempotency keys),
//! reading, cancelling, and settling what a final job means for its group and dependants.

use super::*;

pub(super) async fn load_jobs(
    conn: &mut AnyConnection,
    ids: &[JobId],
) -> Result<HashMap<JobId, JobRecord>> {
    let sql = format!("SELECT {} FROM jobs", jobs_json(engine_of(conn)));
    load_by_ids(conn, &sql, ids, job_from_row, |j| j.id).await
}

pub(super) async fn load_job(conn: &mut AnyConnection, id: JobId) -> Result<JobRecord> {
    let lock = for_update(conn);
    let sql = format!(
        "SELECT {} FROM jobs WHERE id = $1{lock}",
        jobs_json(engine_of(conn))
    );
    load_one(conn, &sql, "job", id, job_from_row).await
}

pub(super) async fn load_group(conn: &mut AnyConnection, id: GroupId) -> Result<GroupView> {
    let row =
        sqlx::query("SELECT id, name, state, created_at, finished_at FROM groups WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "group",
                id: id.to_string(),
            })?;
    let state: String = row.try_get("state")?;
    let group = GroupRecord {
        id: parse(&row, "id")?,
        name: row.try_get("name")?,
        state: GroupState::parse(&state).ok_or_else(|| corrupt(format!("group state {state}")))?,
        created_at: ts(&row, "created_at")?,
        finished_at: ts_opt(&row, "finished_at")?,
    };
    let rows = sqlx::query(&format!(
        "SELECT {} FROM jobs WHERE group_id = $1 ORDER BY group_position",
        jobs_json(engine_of(conn))
    ))
    .bind(id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    let jobs = rows.iter().map(job_from_row).collect::<Result<_>>()?;
    Ok(GroupView { group, jobs })
}

/// Inserts a validated job (in the caller's transaction), with its dependencies. A job whose
/// dependency already failed for good is skipped at once.
pub(super) async fn insert_job(
    conn: &mut AnyConnection,
    spec: &JobSpec,
    group: Option<(GroupId, u32)>,
    extra_dependency: Option<JobId>,
    owner: Option<&str>,
    now: Timestamp,
) -> Result<JobRecord> {
    let mut deps: Vec<JobId> = spec.depends_on.clone();
    deps.extend(extra_dependency);
    deps.sort();
    deps.dedup();
    let mut waiting_on: i64 = 0;
    let mut failed_dependency = None;
    for dep in &deps {
        let row = sqlx::query("SELECT state, owner FROM jobs WHERE id = $1")
            .bind(dep.to_string())
            .fetch_optional(&mut *conn)
            .await?;
        let (state, dep_owner) = match &row {
            Some(row) => (
                Some(row.try_get::<String, _>("state")?),
                row.try_get::<Option<String>, _>("owner")?,
            ),
            None => (None, None),
        };
        // Another user's job is as good as absent: waiting on it would tell its outcome.
        let foreign = matches!((owner, dep_owner.as_deref()), (Some(me), Some(them)) if me != them);
        let state: JobState = state
            .filter(|_| !foreign)
            .ok_or_else(|| StoreError::Invalid {
                field: "depends_on",
                message: format!("job {dep} does not exist"),
            })?
            .parse()
            .map_err(corrupt)?;
        match state {
            JobState::Succeeded => {}
            s if s.is_terminal() => failed_dependency = Some((*dep, s)),
            _ => waiting_on += 1,
        }
    }
    if let Some(reservation) = spec.reservation {
        let row = sqlx::query("SELECT state, owner FROM reservations WHERE id = $1")
            .bind(reservation.to_string())
            .fetch_optional(&mut *conn)
            .await?;
        let (state, held_by) = match &row {
            Some(row) => (
                Some(row.try_get::<String, _>("state")?),
                row.try_get::<Option<String>, _>("owner")?,
            ),
            None => (None, None),
        };
        // A reservation's jobs jump the queue and use what it holds: only its owner's.
        if let (Some(held_by), Some(owner)) = (held_by.as_deref(), owner)
            && held_by != owner
        {
            return Err(StoreError::Invalid {
                field: "reservation",
                message: format!("reservation {reservation} belongs to another user"),
            });
        }
        match state.as_deref() {
            // A pending reservation's jobs wait with it and start when it is active.
            Some("ACTIVE" | "PENDING") => {}
            Some(other) => {
                return Err(StoreError::Invalid {
                    field: "reservation",
                    message: format!("reservation {reservation} is {other}"),
                });
            }
            None => {
                return Err(StoreError::Invalid {
                    field: "reservation",
                    message: format!("reservation {reservation} does not exist"),
                });
            }
        }
    }
    let job = new_job(spec.clone(), group, waiting_on as u32, owner, now);
    let id = job.id;
    insert_jobs(&mut *conn, std::slice::from_ref(&job)).await?;
    for dep in &deps {
        sqlx::query("INSERT INTO job_deps (job_id, depends_on) VALUES ($1, $2)")
            .bind(id.to_string())
            .bind(dep.to_string())
            .execute(&mut *conn)
            .await?;
    }
    let kind = EventKind::JobCreated {
        name: spec.name.clone(),
    };
    insert_event(&mut *conn, now, Some(id), None, &kind).await?;
    if let Some((dep, state)) = failed_dependency {
        skip_job(&mut *conn, &job, dep, state, now).await?;
        return load_job(conn, id).await;
    }
    Ok(job)
}

/// Stores one job, or finds the job its idempotency key already made (`false`).
pub(super) async fn create_one(
    conn: &mut AnyConnection,
    spec: &JobSpec,
    owner: Option<&str>,
    now: Timestamp,
) -> Result<(JobRecord, bool)> {
    if let Some(key) = &spec.idempotency_key {
        let existing: Option<String> =
            sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(id) = existing {
            let job = load_job(conn, id.parse().map_err(corrupt)?).await?;
            return Ok((job, false));
        }
    }
    Ok((insert_job(conn, spec, None, None, owner, now).await?, true))
}

/// A job as stored by [`insert_jobs`], before anything happened to it.
pub(super) fn new_job(
    spec: JobSpec,
    group: Option<(GroupId, u32)>,
    waiting_on: u32,
    owner: Option<&str>,
    now: Timestamp,
) -> JobRecord {
    JobRecord {
        id: JobId::new(),
        name: spec.name.clone(),
        state: JobState::Queued,
        status_code: JobState::Queued.status_code(),
        priority: spec.priority,
        attempts: 0,
        max_attempts: spec.max_attempts(),
        exit_code: None,
        error: None,
        not_before: now,
        current_run: None,
        group_id: group.map(|(g, _)| g),
        group_position: group.map(|(_, p)| p),
        waiting_on,
        created_at: now,
        updated_at: now,
        finished_at: None,
        spec,
        result: None,
        owner: owner.map(str::to_string),
    }
}

/// Writes new jobs (see [`new_job`]), many rows per statement.
pub(super) async fn insert_jobs(conn: &mut AnyConnection, jobs: &[JobRecord]) -> Result<()> {
    const COLS: usize = 15;
    for chunk in jobs.chunks(ROWS_PER_STATEMENT) {
        let sql = binds_for(
            &*conn,
            format!(
                "INSERT INTO jobs (id, name, spec, state, priority, max_attempts, not_before, \
             idempotency_key, group_id, group_position, waiting_on, reservation_id, created_at, \
             updated_at, owner) VALUES {}",
                row_tuples(chunk.len(), COLS)
            ),
        );
        let mut query = sqlx::query(&sql);
        for job in chunk {
            query = query
                .bind(job.id.to_string())
                .bind(&job.name)
                .bind(serde_json::to_string(&job.spec).map_err(corrupt)?)
                .bind(job.state.as_str())
                .bind(i64::from(job.priority))
                .bind(i64::from(job.max_attempts))
                .bind(job.not_before.0)
                .bind(&job.spec.idempotency_key)
                .bind(job.group_id.map(|g| g.to_string()))
                .bind(job.group_position.map(i64::from))
                .bind(i64::from(job.waiting_on))
                .bind(job.spec.reservation.map(|r| r.to_string()))
                .bind(job.created_at.0)
                .bind(job.updated_at.0)
                .bind(&job.owner);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

pub(super) async fn skip_job(
    conn: &mut AnyConnection,
    job: &JobRecord,
    dependency: JobId,
    dependency_state: JobState,
    now: Timestamp,
) -> Result<()> {
    let error = format!("skipped: dependency {dependency} ended {dependency_state}");
    let kind = EventKind::JobStatusChanged {
        from: job.state,
        to: JobState::Skipped,
        run_id: None,
        exit_code: None,
        error: Some(error.clone()),
    };
    transition(&mut *conn, job, JobEvent::Skip, None, Some(kind), now).await?;
    sqlx::query("UPDATE jobs SET error = $1 WHERE id = $2")
        .bind(&error)
        .bind(job.id.to_string())
        .execute(&mut *conn)
        .await?;
    let job = load_job(&mut *conn, job.id).await?;
    let (event, key, payload) = run_event(&job, None, "SKIPPED", false, now);
    enqueue_webhooks(&mut *conn, event, &key, &payload, now).await?;
    Ok(())
}

/// After a job became final: releases or skips the jobs waiting on it (transitively) and
/// settles the groups involved, all in the caller's transaction.
pub(super) async fn settle_final(
    conn: &mut AnyConnection,
    job: &JobRecord,
    now: Timestamp,
) -> Result<()> {
    let mut work = vec![(job.id, job.state, job.group_id)];
    let mut groups: Vec<GroupId> = Vec::new();
    while let Some((id, state, group)) = work.pop() {
        groups.extend(group);
        let dependents: Vec<String> =
            sqlx::query_scalar("SELECT job_id FROM job_deps WHERE depends_on = $1")
                .bind(id.to_string())
                .fetch_all(&mut *conn)
                .await?;
        for dependent in dependents {
            let dependent: JobId = dependent.parse().map_err(corrupt)?;
            if state == JobState::Succeeded {
                sqlx::query(
                    "UPDATE jobs SET waiting_on = waiting_on - 1 WHERE id = $1 AND waiting_on > 0",
                )
                .bind(dependent.to_string())
                .execute(&mut *conn)
                .await?;
                continue;
            }
            let d = load_job(&mut *conn, dependent).await?;
            if d.state == JobState::Queued {
                skip_job(&mut *conn, &d, id, state, now).await?;
                work.push((d.id, JobState::Skipped, d.group_id));
            }
        }
    }
    groups.sort();
    groups.dedup();
    for group in groups {
        settle_group(&mut *conn, group, now).await?;
    }
    Ok(())
}

/// Decides a group's final state once every member is final (in the same transaction as
/// the last member's change).
pub(super) async fn settle_group(
    conn: &mut AnyConnection,
    id: GroupId,
    now: Timestamp,
) -> Result<()> {
    let view = load_group(&mut *conn, id).await?;
    if view.group.state != GroupState::Running || view.jobs.iter().any(|j| !j.state.is_terminal()) {
        return Ok(());
    }
    let state = if view.jobs.iter().all(|j| j.state == JobState::Succeeded) {
        GroupState::Completed
    } else if view.jobs.iter().any(|j| j.state == JobState::Cancelled) {
        GroupState::Cancelled
    } else {
        GroupState::Partial
    };
    sqlx::query("UPDATE groups SET state = $1, finished_at = $2 WHERE id = $3")
        .bind(state.as_str())
        .bind(now.0)
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
    let kind = EventKind::GroupFinished {
        group_id: id,
        state: state.as_str().to_string(),
    };
    insert_event(conn, now, None, None, &kind).await
}

#[async_trait]
impl JobStore for SqlStore {
    async fn create_jobs(&self, batch: Vec<Submission>) -> Result<Vec<Result<(JobRecord, bool)>>> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let _timer = WriteTimer::start("submit");
        // Plain jobs (no key, dependency or reservation to look up) are written together
        // at the end; the others each in a savepoint, so that one refusal stays its own.
        let mut answers: Vec<Option<Result<(JobRecord, bool)>>> = Vec::with_capacity(batch.len());
        let mut plain = Vec::new();
        for Submission { spec, owner } in batch {
            if spec.idempotency_key.is_none()
                && spec.depends_on.is_empty()
                && spec.reservation.is_none()
            {
                plain.push(new_job(spec, None, 0, owner.as_deref(), now));
                answers.push(None);
                continue;
            }
            let mut one = sqlx::Connection::begin(&mut *tx).await?;
            let answer = create_one(&mut one, &spec, owner.as_deref(), now).await;
            if answer.is_ok() {
                one.commit().await?;
            } else {
                one.rollback().await?;
            }
            answers.push(Some(answer));
        }
        insert_jobs(&mut tx, &plain).await?;
        let events: Vec<NewEvent> = plain
            .iter()
            .map(|j| {
                NewEvent::job(
                    now,
                    j.id,
                    EventKind::JobCreated {
                        name: j.name.clone(),
                    },
                )
            })
            .collect();
        insert_events(&mut tx, &events).await?;
        tx.commit().await?;
        let mut plain = plain.into_iter();
        Ok(answers
            .into_iter()
            .map(|a| match a {
                Some(answer) => answer,
                None => plain
                    .next()
                    .map(|job| (job, true))
                    .ok_or_else(|| corrupt("a batch answer without its job")),
            })
            .collect())
    }

    async fn create_group_for(
        &self,
        name: &str,
        specs: Vec<JobSpec>,
        owner: Option<&str>,
    ) -> Result<GroupView> {
        let now = Timestamp::now();
        let id = GroupId::new();
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO groups (id, name, state, created_at, owner) \
             VALUES ($1, $2, 'RUNNING', $3, $4)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(now.0)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        let mut previous = None;
        for (position, spec) in specs.iter().enumerate() {
            let job = insert_job(
                &mut tx,
                spec,
                Some((id, position as u32)),
                previous,
                owner,
                now,
            )
            .await?;
            previous = Some(job.id);
        }
        settle_group(&mut tx, id, now).await?;
        let view = load_group(&mut tx, id).await?;
        tx.commit().await?;
        Ok(view)
    }

    async fn get_group(&self, id: GroupId) -> Result<GroupView> {
        let mut conn = self.reader.acquire().await?;
        load_group(&mut conn, id).await
    }

    async fn resubmit_run(&self, run_id: RunId) -> Result<JobRecord> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let run = load_run(&mut tx, run_id).await?;
        let job = load_job(&mut tx, run.job_id).await?;
        if job.current_run != Some(run_id) {
            return Err(StoreError::Conflict(format!(
                "run {run_id} is not the latest attempt of job {}; retry {} instead",
                job.id,
                job.current_run.map(|r| r.to_string()).unwrap_or_default()
            )));
        }
        if !matches!(
            job.state,
            JobState::Failed | JobState::TimedOut | JobState::Cancelled
        ) {
            return Err(StoreError::Conflict(format!(
                "job {} is {}; only a failed, timed out or cancelled job can be retried",
                job.id, job.state
            )));
        }
        let kind = EventKind::JobResubmitted {
            from: job.state,
            run_id,
            next_attempt: job.attempts + 1,
        };
        transition(
            &mut tx,
            &job,
            JobEvent::Resubmit,
            Some(run_id),
            Some(kind),
            now,
        )
        .await?;
        sqlx::query(
            "UPDATE jobs SET not_before = $1, max_attempts = CASE WHEN max_attempts > attempts THEN max_attempts ELSE attempts + 1 END              WHERE id = $2",
        )
        .bind(now.0)
        .bind(job.id.to_string())
        .execute(&mut *tx)
        .await?;
        if let Some(group) = job.group_id {
            sqlx::query("UPDATE groups SET state = 'RUNNING', finished_at = NULL WHERE id = $1")
                .bind(group.to_string())
                .execute(&mut *tx)
                .await?;
        }
        let job = load_job(&mut tx, job.id).await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn get_job(&self, id: JobId) -> Result<JobRecord> {
        let mut conn = self.reader.acquire().await?;
        load_job(&mut conn, id).await
    }

    async fn list_jobs_of(
        &self,
        state: Option<JobState>,
        owner: Option<&str>,
        limit: u32,
    ) -> Result<Vec<JobRecord>> {
        // The state is written into the statement (one of a fixed set of names): a bound
        // one could not be planned on `jobs_unsuccessful`, whose condition names states.
        let in_state = state
            .map(|s| format!("state = '{}'", s.as_str()))
            .unwrap_or_else(|| "TRUE".into());
        let rows = sqlx::query(&format!(
            "SELECT {} FROM jobs WHERE {in_state} \
             AND ($1 IS NULL OR owner = $1) ORDER BY id DESC LIMIT $2",
            jobs_json(self.engine)
        ))
        .bind(owner)
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn job_runs(&self, id: JobId) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM runs WHERE job_id = $1 ORDER BY attempt",
            runs_json(self.engine)
        ))
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn job_events(&self, id: JobId) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT seq, at, job_id, worker_id, data FROM events WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?;
        events_from_rows(&rows)
    }

    async fn get_run(&self, id: RunId) -> Result<RunRecord> {
        let mut conn = self.reader.acquire().await?;
        load_run(&mut conn, id).await
    }

    async fn cancel_job(&self, id: JobId, reason: &str) -> Result<Cancelled> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let job = load_job(&mut tx, id).await?;
        if job.state.is_terminal() {
            return Err(StoreError::Conflict(format!(
                "job {id} is already {}; only a queued, assigned or running job can be cancelled",
                job.state
            )));
        }
        let mut run = None;
        if let Some(run_id) = job.current_run {
            let live = load_run(&mut tx, run_id).await?;
            if !live.state.is_terminal() {
                sqlx::query(
                    "UPDATE runs SET state = 'CANCELLED', error = $1, finished_at = $2 WHERE id = $3",
                )
                .bind(reason)
                .bind(now.0)
                .bind(run_id.to_string())
                .execute(&mut *tx)
                .await?;
                run = Some(load_run(&mut tx, run_id).await?);
            }
        }
        let kind = EventKind::JobCancelled {
            from: job.state,
            reason: reason.to_string(),
        };
        transition(&mut tx, &job, JobEvent::Cancel, None, Some(kind), now).await?;
        sqlx::query("UPDATE jobs SET error = $1 WHERE id = $2")
            .bind(reason)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let job = load_job(&mut tx, id).await?;
        let (event, key, payload) = run_event(&job, run.as_ref(), "CANCELLED", false, now);
        enqueue_webhooks(&mut tx, event, &key, &payload, now).await?;
        settle_final(&mut tx, &job, now).await?;
        let job = load_job(&mut tx, id).await?;
        tx.commit().await?;
        Ok(Cancelled { job, run })
    }
}
