//! The scheduling policy: a pure function from a snapshot of waiting jobs and free workers
//! to assignments. The control plane feeds it and carries out what it decides.

use crate::ids::{JobId, WorkerId};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub job_id: JobId,
    pub priority: i32,
    /// Labels the worker must carry.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeWorker {
    pub worker_id: WorkerId,
    pub free_slots: u32,
    pub labels: BTreeMap<String, String>,
}

impl FreeWorker {
    fn fits(&self, job: &Candidate) -> bool {
        self.free_slots > 0
            && job
                .labels
                .iter()
                .all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Highest priority first, oldest first within a priority (ids are time-ordered); each job
/// goes to the fitting worker with the most free slots, so load spreads. A job that fits no
/// worker waits and does not block the jobs after it.
pub fn assign(mut jobs: Vec<Candidate>, mut workers: Vec<FreeWorker>) -> Vec<(JobId, WorkerId)> {
    jobs.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.job_id.cmp(&b.job_id)));
    let mut out = Vec::new();
    for job in &jobs {
        let best = workers.iter_mut().filter(|w| w.fits(job)).max_by(|a, b| {
            a.free_slots
                .cmp(&b.free_slots)
                .then(b.worker_id.cmp(&a.worker_id))
        });
        if let Some(w) = best {
            w.free_slots -= 1;
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
            labels: BTreeMap::new(),
        }
    }

    fn worker(slots: u32) -> FreeWorker {
        FreeWorker {
            worker_id: WorkerId::new(),
            free_slots: slots,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn priority_then_fifo() {
        let (a, b, c) = (job(0), job(5), job(0));
        let w = worker(3);
        let got: Vec<JobId> = assign(vec![c.clone(), a.clone(), b.clone()], vec![w])
            .into_iter()
            .map(|(j, _)| j)
            .collect();
        assert_eq!(got, vec![b.job_id, a.job_id, c.job_id]);
    }

    #[test]
    fn labels_must_match_and_do_not_block_others() {
        let mut gpu = job(10);
        gpu.labels.insert("gpu".into(), "yes".into());
        let plain = job(0);
        let w = worker(1);
        let got = assign(vec![gpu, plain.clone()], vec![w.clone()]);
        assert_eq!(got, vec![(plain.job_id, w.worker_id)]);
    }

    proptest! {
        /// Capacity is never exceeded, and whenever a job is left waiting while a
        /// fitting slot stayed free, that never happens (no label constraints here).
        #[test]
        fn capacity_is_respected(prios in prop::collection::vec(-3i32..3, 0..40),
                                 slots in prop::collection::vec(0u32..4, 1..5)) {
            let jobs: Vec<Candidate> = prios.iter().map(|&p| job(p)).collect();
            let workers: Vec<FreeWorker> = slots.iter().map(|&s| worker(s)).collect();
            let total: u32 = slots.iter().sum();
            let got = assign(jobs.clone(), workers.clone());
            prop_assert_eq!(got.len(), jobs.len().min(total as usize));
            for w in &workers {
                let n = got.iter().filter(|(_, id)| *id == w.worker_id).count() as u32;
                prop_assert!(n <= w.free_slots);
            }
            // Every assigned job has priority >= every unassigned one.
            let assigned: Vec<&Candidate> = jobs.iter().filter(|j| got.iter().any(|(id, _)| *id == j.job_id)).collect();
            let waiting: Vec<&Candidate> = jobs.iter().filter(|j| !got.iter().any(|(id, _)| *id == j.job_id)).collect();
            for a in &assigned { for w in &waiting { prop_assert!(a.priority >= w.priority); } }
        }
    }
}
