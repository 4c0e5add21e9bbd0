//! The scheduling policy: a pure function from a snapshot of waiting jobs, free workers and
//! active reservations to assignments. The control plane feeds it and carries out what it
//! decides.

use crate::ids::{JobId, ReservationId, WorkerId};
use crate::job::Isolation;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Candidate {
    pub job_id: JobId,
    pub priority: i32,
    /// Labels the worker must carry.
    pub labels: BTreeMap<String, String>,
    /// Named resources the job holds while it runs.
    pub resources: BTreeMap<String, u32>,
    /// The active reservation the job was submitted into, if any.
    pub reservation: Option<ReservationId>,
    pub isolation: Isolation,
    /// The provider whose workers alone may run the job.
    pub provider: Option<String>,
    /// The model an inference job needs its worker to serve.
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeWorker {
    pub worker_id: WorkerId,
    pub free_slots: u32,
    pub labels: BTreeMap<String, String>,
    /// Capacity of each named resource not used by running jobs (reservations not yet
    /// subtracted: [`assign`] does that).
    pub free_resources: BTreeMap<String, u32>,
    /// Isolation modes the worker offers (`process`, `sandbox`, `container`).
    pub isolation_modes: Vec<String>,
    /// The provider that started the worker; `None` for a worker that joined by hand.
    pub provider: Option<String>,
    /// Models the worker serves.
    pub models: Vec<String>,
}

/// A live reservation: `amount` of `resource` on one worker, held for the jobs submitted
/// into it. A pending one waits for the resource to free; it already keeps queued jobs
/// from taking what frees, but its own jobs wait until it is active.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub reservation_id: ReservationId,
    pub worker_id: WorkerId,
    pub resource: String,
    pub amount: u32,
    /// How much of it the reservation's running jobs use now.
    pub in_use: u32,
    pub pending: bool,
}

impl Hold {
    fn unused(&self) -> u32 {
        self.amount.saturating_sub(self.in_use)
    }
}

/// Which pending reservations become active now, in the order they were made (`holds` is
/// in creation order): one is admitted when what its worker has free of the resource
/// (`free`: capacity less what running jobs use; `None` for a worker this control plane
/// does not hold, left alone) less what active reservations hold unused covers its amount.
/// A reservation never jumps an earlier pending one on the same resource. The admitted are
/// marked active in `holds` and returned.
pub fn admit_reservations(
    holds: &mut [Hold],
    free: impl Fn(WorkerId, &str) -> Option<u32>,
) -> Vec<ReservationId> {
    let mut admitted = Vec::new();
    let mut blocked: Vec<(WorkerId, String)> = Vec::new();
    for i in 0..holds.len() {
        let (worker, resource, amount) = {
            let h = &holds[i];
            if !h.pending {
                continue;
            }
            (h.worker_id, h.resource.clone(), h.amount)
        };
        if blocked.iter().any(|(w, r)| *w == worker && *r == resource) {
            continue;
        }
        let Some(free) = free(worker, &resource) else {
            continue;
        };
        let held: u32 = holds
            .iter()
            .filter(|h| !h.pending && h.worker_id == worker && h.resource == resource)
            .map(Hold::unused)
            .sum();
        if free.saturating_sub(held) >= amount {
            holds[i].pending = false;
            admitted.push(holds[i].reservation_id);
        } else {
            blocked.push((worker, resource));
        }
    }
    admitted
}

impl FreeWorker {
    fn fits(&self, job: &Candidate, skip: Option<&str>) -> bool {
        self.free_slots > 0
            && (job.provider.is_none() || job.provider == self.provider)
            && job.model.as_ref().is_none_or(|m| self.models.contains(m))
            && (job.isolation == Isolation::Process
                || self
                    .isolation_modes
                    .iter()
                    .any(|m| m == job.isolation.as_str()))
            && job
                .labels
                .iter()
                .all(|(k, v)| self.labels.get(k) == Some(v))
            && job
                .resources
                .iter()
                .filter(|(name, _)| Some(name.as_str()) != skip)
                .all(|(name, &need)| self.free_resources.get(name).copied().unwrap_or(0) >= need)
    }

    fn take(&mut self, job: &Candidate, skip: Option<&str>) {
        self.free_slots -= 1;
        for (name, need) in &job.resources {
            if Some(name.as_str()) != skip
                && let Some(free) = self.free_resources.get_mut(name)
            {
                *free -= need;
            }
        }
    }
}

/// Jobs of an active reservation first (they start at once, in submission order), then
/// highest priority, then oldest (ids are time-ordered). A reservation's unused amount is
/// kept from everyone else, so queued jobs needing that resource wait while it is held.
/// Each job goes to the fitting worker with the most free slots; a job that fits nowhere
/// waits and does not block the jobs after it. Physical capacity is never exceeded.
pub fn assign(
    mut jobs: Vec<Candidate>,
    mut workers: Vec<FreeWorker>,
    mut holds: Vec<Hold>,
) -> Vec<(JobId, WorkerId)> {
    // What reservations hold but do not use is not free for anyone outside them.
    for hold in &holds {
        if let Some(w) = workers.iter_mut().find(|w| w.worker_id == hold.worker_id)
            && let Some(free) = w.free_resources.get_mut(&hold.resource)
        {
            *free = free.saturating_sub(hold.unused());
        }
    }
    jobs.sort_by(|a, b| {
        let held = |c: &Candidate| {
            holds
                .iter()
                .any(|h| !h.pending && Some(h.reservation_id) == c.reservation)
        };
        held(b)
            .cmp(&held(a))
            .then(b.priority.cmp(&a.priority))
            .then(a.job_id.cmp(&b.job_id))
    });
    let mut out = Vec::new();
    for job in &jobs {
        if let Some(hold) = holds
            .iter_mut()
            .find(|h| Some(h.reservation_id) == job.reservation)
        {
            let need = job.resources.get(&hold.resource).copied().unwrap_or(1);
            let resource = hold.resource.clone();
            if let Some(w) = workers.iter_mut().find(|w| w.worker_id == hold.worker_id)
                && !hold.pending
                && hold.unused() >= need
                && w.fits(job, Some(&resource))
            {
                w.take(job, Some(&resource));
                hold.in_use += need;
                out.push((job.job_id, w.worker_id));
            }
            continue;
        }
        let best = workers
            .iter_mut()
            .filter(|w| w.fits(job, None))
            .max_by(|a, b| {
                a.free_slots
                    .cmp(&b.free_slots)
                    .then(b.worker_id.cmp(&a.worker_id))
            });
        if let Some(w) = best {
            w.take(job, None);
            out.push((job.job_id, w.worker_id));
        }
        if workers.iter().all(|w| w.free_slots == 0) {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job(priority: i32) -> Candidate {
        Candidate {
            job_id: JobId::new(),
            priority,
            ..Default::default()
        }
    }

    fn needing(resource: &str, amount: u32) -> Candidate {
        let mut j = job(0);
        j.resources.insert(resource.into(), amount);
        j
    }

    fn worker(slots: u32) -> FreeWorker {
        FreeWorker {
            worker_id: WorkerId::new(),
            free_slots: slots,
            labels: BTreeMap::new(),
            free_resources: BTreeMap::new(),
            isolation_modes: vec!["process".into()],
            provider: None,
            models: Vec::new(),
        }
    }

    fn with_resource(mut w: FreeWorker, name: &str, amount: u32) -> FreeWorker {
        w.free_resources.insert(name.into(), amount);
        w
    }

    fn ids(plan: &[(JobId, WorkerId)]) -> Vec<JobId> {
        plan.iter().map(|(j, _)| *j).collect()
    }

    #[test]
    fn a_job_for_a_provider_runs_only_on_that_providers_workers() {
        let mut docker_job = job(0);
        docker_job.provider = Some("docker".into());
        let plain = worker(4);
        let mut local = worker(4);
        local.provider = Some("local".into());
        let got = assign(vec![docker_job.clone()], vec![plain, local], vec![]);
        assert!(got.is_empty(), "no docker worker is free: {got:?}");
        let mut docker = worker(1);
        docker.provider = Some("docker".into());
        let got = assign(
            vec![docker_job.clone(), job(0)],
            vec![docker.clone()],
            vec![],
        );
        assert_eq!(got, vec![(docker_job.job_id, docker.worker_id)]);
    }

    #[test]
    fn priority_then_fifo() {
        let (a, b, c) = (job(0), job(5), job(0));
        let got = assign(
            vec![c.clone(), a.clone(), b.clone()],
            vec![worker(3)],
            vec![],
        );
        assert_eq!(ids(&got), vec![b.job_id, a.job_id, c.job_id]);
    }

    #[test]
    fn labels_must_match_and_do_not_block_others() {
        let mut gpu = job(10);
        gpu.labels.insert("gpu".into(), "yes".into());
        let plain = job(0);
        let w = worker(1);
        let got = assign(vec![gpu, plain.clone()], vec![w.clone()], vec![]);
        assert_eq!(got, vec![(plain.job_id, w.worker_id)]);
    }

    #[test]
    fn isolation_goes_only_where_it_is_offered() {
        let mut sandboxed = job(0);
        sandboxed.isolation = Isolation::Sandbox;
        let plain = worker(2);
        let mut bwrap = worker(2);
        bwrap.isolation_modes.push("sandbox".into());
        let got = assign(vec![sandboxed.clone()], vec![plain.clone()], vec![]);
        assert!(got.is_empty());
        let got = assign(vec![sandboxed.clone()], vec![plain, bwrap.clone()], vec![]);
        assert_eq!(got, vec![(sandboxed.job_id, bwrap.worker_id)]);
    }

    #[test]
    fn an_exclusive_resource_runs_one_job_at_a_time() {
        let (a, b, plain) = (needing("ollama", 1), needing("ollama", 1), job(0));
        let w = with_resource(worker(4), "ollama", 1);
        let got = assign(vec![a.clone(), b, plain.clone()], vec![w], vec![]);
        assert_eq!(ids(&got), vec![a.job_id, plain.job_id]);
    }

    #[test]
    fn a_reservation_pauses_others_and_runs_its_own_first() {
        let w = with_resource(worker(4), "ollama", 1);
        let hold = Hold {
            reservation_id: ReservationId::new(),
            worker_id: w.worker_id,
            resource: "ollama".into(),
            amount: 1,
            in_use: 0,
            pending: false,
        };
        let queued = needing("ollama", 1);
        let mut direct = job(-5);
        direct.reservation = Some(hold.reservation_id);
        let mut second = job(-5);
        second.reservation = Some(hold.reservation_id);
        let got = assign(
            vec![queued.clone(), direct.clone(), second],
            vec![w.clone()],
            vec![hold.clone()],
        );
        assert_eq!(ids(&got), vec![direct.job_id], "one at a time, in order");
        // Without the reservation, the queued job takes the resource.
        let got = assign(vec![queued.clone()], vec![w], vec![]);
        assert_eq!(ids(&got), vec![queued.job_id]);
    }

    fn pending_hold(worker_id: WorkerId, amount: u32) -> Hold {
        Hold {
            reservation_id: ReservationId::new(),
            worker_id,
            resource: "ollama".into(),
            amount,
            in_use: 0,
            pending: true,
        }
    }

    #[test]
    fn a_pending_reservation_keeps_what_frees_from_the_queue_and_its_jobs_wait() {
        // The resource is busy (free 0): the reservation waits, its job too, and the
        // queued job cannot take the resource when it frees.
        let busy = with_resource(worker(4), "ollama", 0);
        let mut holds = vec![pending_hold(busy.worker_id, 1)];
        assert!(admit_reservations(&mut holds, |_, _| Some(0)).is_empty());
        let mut direct = job(0);
        direct.reservation = Some(holds[0].reservation_id);
        let got = assign(vec![direct.clone()], vec![busy.clone()], holds.clone());
        assert!(got.is_empty(), "a pending reservation's job waits");
        // It frees: admission comes first, so the reservation's job gets it, not the queue.
        let freed = with_resource(busy, "ollama", 1);
        assert_eq!(
            admit_reservations(&mut holds, |_, _| Some(1)),
            vec![holds[0].reservation_id]
        );
        let queued = needing("ollama", 1);
        let got = assign(vec![queued, direct.clone()], vec![freed], holds);
        assert_eq!(ids(&got), vec![direct.job_id]);
    }

    #[test]
    fn reservations_are_admitted_in_order_within_capacity() {
        let w = WorkerId::new();
        let mut holds = vec![pending_hold(w, 1), pending_hold(w, 2), pending_hold(w, 1)];
        // Two free: the first fits; the second (2) does not, and the third may not jump it.
        let admitted = admit_reservations(&mut holds, |_, _| Some(2));
        assert_eq!(admitted, vec![holds[0].reservation_id]);
        // Again with the first active and unused: one left, still not enough for the second.
        assert!(admit_reservations(&mut holds, |_, _| Some(2)).is_empty());
        // A worker this control plane does not hold is left alone.
        let mut elsewhere = vec![pending_hold(WorkerId::new(), 1)];
        assert!(admit_reservations(&mut elsewhere, |_, _| None).is_empty());
        assert!(elsewhere[0].pending);
    }

    proptest! {
        /// Slots and resource capacities are never exceeded, and every assigned job has a
        /// priority at least that of every job left waiting (no resources involved there).
        #[test]
        fn capacity_is_respected(prios in prop::collection::vec(-3i32..3, 0..40),
                                 slots in prop::collection::vec(0u32..4, 1..5),
                                 needs in prop::collection::vec(0u32..3, 0..40),
                                 capacity in 0u32..3) {
            let jobs: Vec<Candidate> = prios.iter().enumerate().map(|(i, &p)| {
                let mut j = job(p);
                if let Some(&n) = needs.get(i).filter(|&&n| n > 0) {
                    j.resources.insert("r".into(), n);
                }
                j
            }).collect();
            let workers: Vec<FreeWorker> = slots.iter().map(|&s| with_resource(worker(s), "r", capacity)).collect();
            let got = assign(jobs.clone(), workers.clone(), vec![]);
            for w in &workers {
                let mine: Vec<&Candidate> = got.iter().filter(|(_, id)| *id == w.worker_id)
                    .filter_map(|(j, _)| jobs.iter().find(|c| c.job_id == *j)).collect();
                prop_assert!(mine.len() as u32 <= w.free_slots);
                let used: u32 = mine.iter().map(|c| c.resources.get("r").copied().unwrap_or(0)).sum();
                prop_assert!(used <= capacity);
            }
            let plain_waiting = jobs.iter().filter(|j| j.resources.is_empty())
                .filter(|j| !got.iter().any(|(id, _)| *id == j.job_id));
            let total: u32 = slots.iter().sum();
            if (got.len() as u32) < total {
                // A slot stayed free, so no plain job may be left waiting.
                prop_assert_eq!(plain_waiting.count(), 0);
            }
        }
    }
}
