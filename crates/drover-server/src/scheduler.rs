//! The dispatcher hands queued jobs to connected workers; the lease sweeper fails the
//! attempts of workers that stopped heartbeating. Decisions come from
//! `drover_core::schedule`; this file only feeds it and carries them out.

use crate::AppState;
use crate::sessions::Held;
use drover_core::Timestamp;
use drover_core::schedule::{self, Candidate, Hold};
use drover_proto::v1;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Largest queue page.
const CANDIDATES_PER_PASS: u32 = 512;
/// Pages past the head a pass reads when the head holds nothing any free worker can run.
const DEEP_PAGES_PER_PASS: usize = 8;

/// Where the search past the head of the queue goes on from, pass after pass: a deep queue
/// of jobs no worker can run is walked a few pages per pass, so a pass stays cheap and a
/// runnable job behind them is still found. The walk runs at most every
/// [`DEEP_WALK_EVERY`]: passes come at the rate of submissions and run ends, and a job
/// arriving at the head must not wait behind a walk of the stuck ones every time.
#[derive(Default)]
struct DeepCursor {
    after: Option<(i32, drover_core::JobId)>,
    last_walk: Option<std::time::Instant>,
}
const DEEP_WALK_EVERY: Duration = Duration::from_millis(100);
/// Wakes even when nothing notifies, for jobs whose retry backoff has passed.
const IDLE_TICK: Duration = Duration::from_millis(250);

pub async fn dispatch_loop(state: Arc<AppState>) {
    let mut cursor = DeepCursor::default();
    loop {
        match dispatch_pass(&state, &mut cursor).await {
            Ok(assigned) if assigned > 0 => continue,
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "dispatch pass failed"),
        }
        let _ = tokio::time::timeout(IDLE_TICK, state.dispatch.notified()).await;
    }
}

/// One round: snapshot, decide, assign. Returns how many jobs were assigned.
async fn dispatch_pass(
    state: &AppState,
    cursor: &mut DeepCursor,
) -> Result<usize, drover_store::StoreError> {
    // Two missed heartbeats and a worker gets no new work until it is heard from again.
    let silence = state.config.heartbeat_interval() * 2 + Duration::from_millis(500);
    let now = Timestamp::now();
    // A reservation waiting for its resource is granted as soon as the resource frees,
    // before queued jobs look at it, whether or not anything queued needs it.
    if state
        .reservations_waiting
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        let _plan = state.resource_plan.lock().await;
        read_holds(state, now).await?;
    }
    let free = state.sessions.free_workers(silence);
    if free.is_empty() {
        return Ok(0);
    }
    // Read about as many jobs as there are free slots: reading (and parsing) a whole deep
    // queue to fill a few slots is where a dispatcher's time goes.
    let free_slots: usize = free.iter().map(|w| w.free_slots as usize).sum();
    let page_size = (free_slots as u32 * 2).clamp(16, CANDIDATES_PER_PASS);
    let first = state.store.ready_jobs(now, None, page_size).await?;
    if first.is_empty() {
        return Ok(0);
    }
    // Reservations only change the plan for jobs that need resources or name one: a pass
    // over plain jobs does not read them (a read fewer on the way from submit to RUNNING).
    // Whoever reads reservations decides who gets a named resource: that pass holds the
    // resource plan until its assignments are counted in the sessions.
    let mut plan_lock = None;
    let mut holds: Option<Vec<Hold>> = None;
    if needs_holds(&first) {
        plan_lock = Some(state.resource_plan.lock().await);
        holds = Some(read_holds(state, now).await?);
    }
    let to_candidates = |page: Vec<drover_store::ReadyJob>| -> Vec<Candidate> {
        page.into_iter()
            .map(|r| Candidate {
                job_id: r.id,
                priority: r.priority,
                labels: r.labels,
                resources: r.resources,
                reservation: r.reservation,
                isolation: r.isolation,
                provider: r.provider,
                model: r.model,
            })
            .collect()
    };
    let plan_for = |c: Vec<Candidate>, holds: &Option<Vec<Hold>>| {
        schedule::assign(c, free.clone(), holds.clone().unwrap_or_default())
    };
    // The head of the queue first; if nothing there fits a free worker (labels, resources,
    // isolation), a few pages further on, from where the last pass stopped.
    let head_end = first.last().map(|r| (r.priority, r.id));
    let head_is_all = first.len() < page_size as usize;
    let mut plan = plan_for(to_candidates(first), &holds);
    let walk_due = cursor
        .last_walk
        .is_none_or(|at| at.elapsed() >= DEEP_WALK_EVERY);
    if plan.is_empty() && !head_is_all && walk_due {
        cursor.last_walk = Some(std::time::Instant::now());
        let mut after = cursor.after.or(head_end);
        for _ in 0..DEEP_PAGES_PER_PASS {
            let page = state.store.ready_jobs(now, after, page_size).await?;
            let end_of_queue = page.len() < page_size as usize;
            let page_start = after;
            after = page.last().map(|r| (r.priority, r.id));
            if holds.is_none() && needs_holds(&page) {
                plan_lock = Some(state.resource_plan.lock().await);
                holds = Some(read_holds(state, now).await?);
            }
            plan = plan_for(to_candidates(page), &holds);
            if !plan.is_empty() {
                // Start there again next time: the page may hold more that fits.
                after = page_start;
                break;
            }
            if end_of_queue {
                after = None;
                break;
            }
        }
        cursor.after = after;
    }
    let holds = holds.unwrap_or_default();
    // The whole plan in one transaction.
    let made = state.store.assign_jobs(&plan, state.lease_until()).await?;
    let assigned = made.len();
    for a in made {
        let (job_id, worker_id) = (a.job.id, a.run.worker_id);
        let span = tracing::info_span!("job", job_id = %job_id, run_id = %a.run.id);
        span.in_scope(
            || tracing::info!(worker_id = %worker_id, attempt = a.run.attempt, "assigned"),
        );
        state.notify_job(job_id, a.job.state);
        let hold = a
            .job
            .spec
            .reservation
            .and_then(|r| holds.iter().find(|h| h.reservation_id == r));
        let mut resources = a.job.spec.resources.clone();
        if let Some(h) = hold {
            // A job in a reservation uses one unit of what it holds unless it says more:
            // counted here too, so that what is free on the worker stays true.
            resources.entry(h.resource.clone()).or_insert(1);
        }
        let held = Held {
            resources,
            reservation: hold.map(|h| h.reservation_id),
        };
        let msg = v1::server_message::Body::Assignment(v1::Assignment {
            run_id: a.run.id.to_string(),
            job_id: job_id.to_string(),
            attempt: a.run.attempt,
            spec: Some((&a.job.spec).into()),
        });
        if !state.sessions.assign(worker_id, a.run.id, held, msg) {
            tracing::warn!(%worker_id, run_id = %a.run.id, "worker left before its assignment was sent; its lease will run out");
        }
    }
    drop(plan_lock);
    Ok(assigned)
}

fn needs_holds(page: &[drover_store::ReadyJob]) -> bool {
    page.iter()
        .any(|r| !r.resources.is_empty() || r.reservation.is_some())
}

/// What each live reservation holds and how much of it its jobs use now; pending ones
/// whose resource is free on a worker of this replica are made active first. The caller
/// holds `state.resource_plan`.
pub(crate) async fn read_holds(
    state: &AppState,
    now: Timestamp,
) -> Result<Vec<Hold>, drover_store::StoreError> {
    let live = state.store.live_reservations(now).await?;
    holds_of(state, live, now).await
}

/// [`read_holds`] from live reservations read already.
pub(crate) async fn holds_of(
    state: &AppState,
    live: Vec<drover_core::records::ReservationRecord>,
    now: Timestamp,
) -> Result<Vec<Hold>, drover_store::StoreError> {
    let mut holds: Vec<Hold> = live
        .into_iter()
        .map(|r| Hold {
            in_use: state.sessions.reservation_usage(r.id, &r.resource),
            pending: r.state == drover_core::records::ReservationState::Pending,
            reservation_id: r.id,
            worker_id: r.worker_id,
            resource: r.resource,
            amount: r.amount,
        })
        .collect();
    let admitted = schedule::admit_reservations(&mut holds, |w, resource| {
        state.sessions.free_resource(w, resource)
    });
    for id in admitted {
        if state.store.activate_reservation(id, now).await? {
            tracing::info!(reservation = %id, "reservation active: its resource is free");
        } else {
            // Released or expired meanwhile: it holds nothing.
            holds.retain(|h| h.reservation_id != id);
        }
    }
    let waiting = holds.iter().any(|h| {
        h.pending
            && state
                .sessions
                .free_resource(h.worker_id, &h.resource)
                .is_some()
    });
    state
        .reservations_waiting
        .store(waiting, std::sync::atomic::Ordering::Relaxed);
    Ok(holds)
}

/// How an attempt was lost by its worker.
pub(crate) enum AttemptLost {
    /// The worker did not renew its lease.
    LeaseLapsed,
    /// The worker reconnected without the attempt: it restarted.
    CameBackWithout,
}

/// The one wording of a lost attempt's error. `recovered`: the attempt was live when this
/// control plane started, so the restart is what lost it, whatever the worker did then.
pub(crate) fn lost_attempt_error(
    worker: drover_core::WorkerId,
    recovered: bool,
    how: AttemptLost,
) -> String {
    let what = match how {
        AttemptLost::LeaseLapsed => "did not come back within the lease",
        AttemptLost::CameBackWithout => "came back without this attempt",
    };
    if recovered {
        format!(
            "recovery: the control plane restarted while this attempt ran; worker {worker} {what}"
        )
    } else {
        let what = match how {
            AttemptLost::LeaseLapsed => "did not renew its lease",
            AttemptLost::CameBackWithout => "came back without this attempt (it restarted)",
        };
        format!("worker lost: worker {worker} {what}")
    }
}

/// Fails the attempts whose lease ran out: their worker stopped heartbeating.
pub async fn lease_sweeper(state: Arc<AppState>) {
    let every = (state.config.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        tokio::time::sleep(every).await;
        // One replica sweeps; if it dies, another takes over within a few periods.
        if !state.hold_duty("lease-sweeper", every * 4).await {
            continue;
        }
        // Back from an outage of the store: no lease could be renewed while it lasted, and
        // workers could not report what ended. They get one more lease, as after a restart.
        if state
            .store_outage
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            match state
                .store
                .renew_all_leases(Timestamp::now().plus(state.config.lease))
                .await
            {
                Ok(n) => {
                    tracing::warn!(
                        runs = n,
                        "the store is back: every live lease gets one more lease"
                    );
                    continue;
                }
                Err(e) => {
                    state.note_store_error(&e);
                    continue;
                }
            }
        }
        let expired = match state.store.expired_runs(Timestamp::now()).await {
            Ok(runs) => runs,
            Err(e) => {
                state.note_store_error(&e);
                tracing::error!(error = %e, "cannot read expired leases");
                continue;
            }
        };
        for run in expired {
            let span = tracing::info_span!("job", job_id = %run.job_id, run_id = %run.id);
            async {
                let error = lost_attempt_error(
                    run.worker_id,
                    state.take_recovered(run.id),
                    AttemptLost::LeaseLapsed,
                );
                match crate::jobs::fail_lost_run(&state, run.id, error).await {
                    Ok(f) => {
                        tracing::warn!(worker_id = %run.worker_id, job_state = %f.job.state, "lease expired");
                        // A worker still connected (here or elsewhere) but frozen must not
                        // carry on with it.
                        state
                            .tell_everywhere(drover_store::Wakeup::Forget {
                                worker_id: run.worker_id,
                                run_id: run.id,
                            })
                            .await;
                    }
                    Err(e) => tracing::error!(error = %e, "cannot fail an expired run"),
                }
            }
            .instrument(span)
            .await;
        }
    }
}

/// Renews, in one write per round, the leases of every worker heard from since the last
/// round (heartbeats only mark a worker heard).
pub async fn lease_renewer(state: Arc<AppState>) {
    let every = state.config.heartbeat_interval();
    loop {
        tokio::time::sleep(every).await;
        // A little overlap so that no heartbeat falls between two rounds.
        let heard = state.sessions.heard_within(every + every / 2);
        if let Err(e) = state.store.renew_leases(&heard, state.lease_until()).await {
            state.note_store_error(&e);
            tracing::error!(error = %e, workers = heard.len(), "cannot renew leases");
        }
    }
}
