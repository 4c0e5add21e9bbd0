//! Measurements: probes, percentiles, counts read from /metrics, and the figures printed.

use super::*;

#[derive(Serialize)]
pub(super) struct Figures {
    pub(super) scenario: String,
    pub(super) database: String,
    pub(super) figures: Vec<Figure>,
}

#[derive(Serialize)]
pub(super) struct Figure {
    pub(super) name: String,
    pub(super) value: String,
}

/// Runs `jobs` copies of `spec` one at a time; figures for submit → RUNNING, submit → final
/// (the server's clock) and the client's round trip, each name prefixed by `label`.
pub(super) async fn probe(
    client: &Client,
    spec: &JobSpec,
    jobs: usize,
    label: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let (mut to_running, mut to_final, mut seen) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..jobs {
        let t0 = Instant::now();
        let job = client.submit_job(spec).await?;
        let view = client.wait_job(&job.id.to_string(), |_| {}).await?;
        seen.push(t0.elapsed());
        if let Some(run) = view.runs.first() {
            if let Some(started) = run.run.started_at {
                to_running.push(started.since(view.job.created_at));
            }
            if let Some(finished) = run.run.finished_at {
                to_final.push(finished.since(view.job.created_at));
            }
        }
    }
    let mut figures = Vec::new();
    for (name, list) in [
        ("submit → RUNNING", &mut to_running),
        ("submit → final", &mut to_final),
        ("client round trip (submit, wait)", &mut seen),
    ] {
        list.sort();
        figures.push((
            format!("{label}{name}"),
            format!(
                "p50 {} · p90 {} · p99 {} · max {}",
                ms(percentile(list, 0.5)),
                ms(percentile(list, 0.9)),
                ms(percentile(list, 0.99)),
                ms(list.last().copied().unwrap_or_default())
            ),
        ));
    }
    Ok(figures)
}

pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(super) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Submits `n` copies of `spec`, `setup.batch` per request, with `setup.concurrency`
/// requests in flight; returns the ids.
pub(super) async fn submit_all(
    client: &Client,
    spec: &JobSpec,
    n: usize,
    setup: &Setup,
) -> anyhow::Result<Vec<String>> {
    let per_request = usize::from(setup.batch);
    let requests = n.div_ceil(per_request);
    let spec = Arc::new(spec.clone());
    let answers: Vec<anyhow::Result<Vec<String>>> = futures::stream::iter(0..requests)
        .map(|r| {
            let (client, spec) = (client.clone(), spec.clone());
            let count = per_request.min(n - r * per_request);
            async move {
                if count == 1 {
                    return Ok(vec![client.submit_job(&spec).await?.id.to_string()]);
                }
                let specs = vec![(*spec).clone(); count];
                client
                    .submit_jobs(&specs)
                    .await?
                    .into_iter()
                    .map(|result| match result {
                        BatchResult::Submitted { job, .. } => Ok(job.id.to_string()),
                        BatchResult::Refused { error } => {
                            bail!("a job of the batch was refused: {}", error.message)
                        }
                    })
                    .collect()
            }
        })
        .buffer_unordered(setup.concurrency.max(1))
        .collect()
        .await;
    let mut ids = Vec::with_capacity(n);
    for answer in answers {
        ids.extend(answer?);
    }
    Ok(ids)
}

/// Waits until `n` more jobs than `before` finished, reading the server's counter.
pub(super) async fn wait_finished(client: &Client, before: u64, n: u64) -> anyhow::Result<()> {
    let bar = output::spinner("waiting for the jobs to finish");
    loop {
        let done = finished_count(client).await?.saturating_sub(before);
        if let Some(bar) = &bar {
            bar.set_message(format!("{done}/{n} jobs finished"));
        }
        if done >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

/// The samples of the metric `name` in /metrics' text: each one's labels (`{…}`, or empty)
/// and value.
pub(super) fn metric_samples<'a>(
    text: &'a str,
    name: &'a str,
) -> impl Iterator<Item = (&'a str, f64)> {
    text.lines().filter_map(move |line| {
        let (labels, value) = line.strip_prefix(name)?.rsplit_once(' ')?;
        (labels.is_empty() || labels.starts_with('{')).then_some(())?;
        Some((labels, value.parse().ok()?))
    })
}

/// `drover_jobs_finished_total` summed over states, from /metrics.
pub(super) async fn finished_count(client: &Client) -> anyhow::Result<u64> {
    let text = client.metrics().await?;
    Ok(metric_samples(&text, "drover_jobs_finished_total")
        .map(|(_, value)| value)
        .sum::<f64>() as u64)
}

/// The control plane's hot write transactions so far, by kind: how many, and the seconds
/// they were open (`drover_store_write_seconds_{count,sum}{kind="…"}` from /metrics).
#[derive(Default)]
pub(super) struct WriteTotals {
    pub(super) transactions: HashMap<String, f64>,
    pub(super) seconds: HashMap<String, f64>,
}

pub(super) async fn write_totals(client: &Client) -> anyhow::Result<WriteTotals> {
    let text = client.metrics().await?;
    let by_kind = |name| {
        metric_samples(&text, name)
            .filter_map(|(labels, value)| {
                let kind = labels.strip_prefix("{kind=\"")?.split_once('"')?.0;
                Some((kind.to_string(), value))
            })
            .collect()
    };
    Ok(WriteTotals {
        transactions: by_kind("drover_store_write_seconds_count"),
        seconds: by_kind("drover_store_write_seconds_sum"),
    })
}

/// How the write transactions of a run went, by kind: jobs per transaction (the batches
/// the writer saw), how long they were open per job, and how many were open at once on
/// average over `wall`: on SQLite, where one connection writes, that is how busy the
/// writer was (near 100 % it is the serial stage that bounds the run); on PostgreSQL, how
/// many of the pool's connections writes kept busy.
pub(super) fn write_figures(
    before: &WriteTotals,
    after: &WriteTotals,
    jobs: usize,
    wall: Duration,
    one_writer: bool,
) -> Vec<(String, String)> {
    const KINDS: [&str; 3] = ["submit", "assign", "report"];
    let grown = |of: fn(&WriteTotals) -> &HashMap<String, f64>| {
        KINDS.map(|kind| {
            of(after).get(kind).copied().unwrap_or(0.0)
                - of(before).get(kind).copied().unwrap_or(0.0)
        })
    };
    let transactions = grown(|t| &t.transactions);
    let seconds = grown(|t| &t.seconds);
    // A dash where the control plane wrote no such transaction (its metrics not reached).
    let per_transaction = transactions.map(|n| {
        if n >= 1.0 {
            format!("{:.1}", jobs as f64 / n)
        } else {
            "–".into()
        }
    });
    let per_job = seconds.map(|s| per_job_us(s, jobs));
    let mut figures = vec![
        (
            "jobs per write transaction: submit · assign · report".into(),
            per_transaction.join(" · "),
        ),
        (
            "write transactions open per job: submit · assign · report".into(),
            format!(
                "{:.0} µs · {:.0} µs · {:.0} µs",
                per_job[0], per_job[1], per_job[2]
            ),
        ),
    ];
    let open_at_once = seconds.iter().sum::<f64>() / wall.as_secs_f64().max(f64::MIN_POSITIVE);
    figures.push(if one_writer {
        (
            "the one SQLite writer busy during the run".into(),
            format!("{:.0} %", open_at_once * 100.0),
        )
    } else {
        (
            "write transactions open at once, on average".into(),
            format!("{open_at_once:.1}"),
        )
    });
    figures
}

/// Microseconds per job of `seconds` spent over a run of `jobs`.
pub(super) fn per_job_us(seconds: f64, jobs: usize) -> f64 {
    seconds / jobs.max(1) as f64 * 1e6
}

pub(super) fn usage_figures(fleet: &Fleet, figures: &mut Vec<(String, String)>) {
    let (peak, cpu) = process_usage(fleet.server_pid);
    if let Some(peak) = peak {
        figures.push(("control plane peak memory".into(), format!("{peak:.1} MiB")));
    }
    if let Some(cpu) = cpu {
        figures.push(("control plane CPU time".into(), format!("{cpu:.2} s")));
    }
}
