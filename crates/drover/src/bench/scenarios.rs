//! The scenarios: throughput, latency, logs, backlog.

use super::*;

pub(super) fn database_name(setup: &Setup) -> String {
    match (&setup.target, &setup.database_url) {
        (Some(t), _) => format!("target {t}"),
        _ if on_own_sqlite(setup) => "SQLite".into(),
        _ => "PostgreSQL".into(),
    }
}

/// True when the bench's own control plane runs on SQLite (one writer connection).
pub(super) fn on_own_sqlite(setup: &Setup) -> bool {
    setup.target.is_none()
        && !setup
            .database_url
            .as_deref()
            .is_some_and(|db| db.starts_with("postgres"))
}

pub(super) async fn throughput(
    jobs: usize,
    executor: crate::serve::Executor,
    setup: &Setup,
) -> anyhow::Result<Figures> {
    let fleet = fleet(setup, executor).await?;
    let before = finished_count(&fleet.client).await?;
    let spec = JobSpec {
        command: Some("true".into()),
        max_attempts: Some(1),
        ..Default::default()
    };
    let writes_before = write_totals(&fleet.client).await?;
    let cpu_before = CpuReading::take(&fleet);
    let started = Instant::now();
    submit_all(&fleet.client, &spec, jobs, setup).await?;
    let submitted = started.elapsed();
    wait_finished(&fleet.client, before, jobs as u64).await?;
    let total = started.elapsed();
    let cpu_after = CpuReading::take(&fleet);
    let writes_after = write_totals(&fleet.client).await?;
    let mut figures = vec![
        ("jobs".into(), jobs.to_string()),
        (
            "executor".into(),
            if executor == crate::serve::Executor::Noop {
                "noop"
            } else {
                "process"
            }
            .to_string(),
        ),
        (
            "workers × slots".into(),
            format!("{} × {}", setup.workers, setup.slots(executor)),
        ),
        ("jobs per submit request".into(), setup.batch.to_string()),
        (
            "submit rate".into(),
            format!("{:.0} jobs/s", jobs as f64 / submitted.as_secs_f64()),
        ),
        (
            "first submit → last completion".into(),
            format!("{:.2} s", total.as_secs_f64()),
        ),
        (
            "throughput".into(),
            format!("{:.0} jobs/s", jobs as f64 / total.as_secs_f64()),
        ),
    ];
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        figures.extend(after.figures(before, jobs));
    }
    let one_writer = on_own_sqlite(setup);
    figures.extend(write_figures(
        &writes_before,
        &writes_after,
        jobs,
        total,
        one_writer,
    ));
    usage_figures(&fleet, &mut figures);
    Ok(Figures {
        scenario: "throughput".into(),
        database: database_name(setup),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}

pub(super) async fn latency(jobs: usize, setup: &Setup) -> anyhow::Result<Figures> {
    let mut one = setup.clone();
    one.workers = 1;
    let fleet = fleet(&one, crate::serve::Executor::Process).await?;
    let spec = JobSpec {
        command: Some("true".into()),
        max_attempts: Some(1),
        ..Default::default()
    };
    let mut figures = vec![("jobs".into(), jobs.to_string())];
    figures.extend(probe(&fleet.client, &spec, jobs, "").await?);
    usage_figures(&fleet, &mut figures);
    Ok(Figures {
        scenario: "latency".into(),
        database: database_name(setup),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}

pub(super) async fn logs(lines: usize, setup: &Setup) -> anyhow::Result<Figures> {
    let mut one = setup.clone();
    one.workers = 1;
    let fleet = fleet(&one, crate::serve::Executor::Process).await?;
    let spec = JobSpec {
        command: Some(format!("seq 1 {lines}")),
        max_attempts: Some(1),
        ..Default::default()
    };
    let job = fleet.client.submit_job(&spec).await?;
    let id = job.id.to_string();
    let mut follow = Box::pin(fleet.client.follow_logs(&id, None).await?);
    let mut delays = Vec::with_capacity(lines);
    let mut received = 0usize;
    while let Some(ev) = follow.next().await {
        match ev? {
            FollowEvent::Entry(e) => {
                received += 1;
                delays.push(Timestamp::now().since(e.timestamp));
            }
            FollowEvent::End(_) => break,
        }
    }
    let view = fleet.client.get_job(&id).await?;
    let run = view.runs.first().context("the job never ran")?;
    let stored = run.log.as_ref().map(|l| l.entry_count).unwrap_or(0);
    let took = match (run.run.started_at, run.run.finished_at) {
        (Some(s), Some(f)) => f.since(s),
        _ => Duration::ZERO,
    };
    delays.sort();
    let mut figures = vec![
        ("lines printed".into(), lines.to_string()),
        ("lines stored".into(), stored.to_string()),
        ("lines followed".into(), received.to_string()),
        (
            "job run time".into(),
            format!("{:.2} s", took.as_secs_f64()),
        ),
        (
            "stored rate".into(),
            format!(
                "{:.0} lines/s",
                stored as f64 / took.as_secs_f64().max(1e-9)
            ),
        ),
        (
            "follower delay".into(),
            format!(
                "p50 {} · p99 {} · max {}",
                ms(percentile(&delays, 0.5)),
                ms(percentile(&delays, 0.99)),
                ms(delays.last().copied().unwrap_or_default())
            ),
        ),
    ];
    usage_figures(&fleet, &mut figures);
    Ok(Figures {
        scenario: "logs".into(),
        database: database_name(setup),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}

pub(super) async fn backlog(queued: usize, jobs: usize, setup: &Setup) -> anyhow::Result<Figures> {
    let mut one = setup.clone();
    one.workers = 1;
    let fleet = fleet(&one, crate::serve::Executor::Process).await?;
    let probe_spec = JobSpec {
        command: Some("true".into()),
        max_attempts: Some(1),
        priority: 1,
        ..Default::default()
    };
    let mut figures = vec![
        ("queued".into(), queued.to_string()),
        ("probes".into(), jobs.to_string()),
    ];
    figures.extend(probe(&fleet.client, &probe_spec, jobs, "empty queue: ").await?);
    // Jobs no worker takes (a label none has), so the queue stays deep.
    let mut stuck = JobSpec {
        command: Some("true".into()),
        ..Default::default()
    };
    stuck.labels.insert("bench".into(), "backlog".into());
    let started = Instant::now();
    submit_all(&fleet.client, &stuck, queued, setup).await?;
    let took = started.elapsed();
    figures.push((
        "submit rate while filling".into(),
        format!("{:.0} jobs/s", queued as f64 / took.as_secs_f64()),
    ));
    figures.extend(probe(&fleet.client, &probe_spec, jobs, "deep queue: ").await?);
    usage_figures(&fleet, &mut figures);
    Ok(Figures {
        scenario: "backlog".into(),
        database: database_name(setup),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}
