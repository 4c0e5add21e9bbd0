//! A job's and a run's states, the events that move them, and the one table of legal moves
//! ([`TRANSITIONS`], applied by [`JobState::apply`]).

use crate::validation::ValidationError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! string_enum {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        // Written out: utoipa's derive does not see a rename made by a macro.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, ValidationError> {
                let upper = s.to_ascii_uppercase();
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == upper)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                        ValidationError::new(
                            "state",
                            format!("unknown state {s:?}; one of {}", names.join(", ")),
                        )
                    })
            }
        }
    };
}

string_enum!(JobState {
    Queued => "QUEUED",
    Assigned => "ASSIGNED",
    Running => "RUNNING",
    Succeeded => "SUCCEEDED",
    Failed => "FAILED",
    TimedOut => "TIMED_OUT",
    Cancelled => "CANCELLED",
    Skipped => "SKIPPED",
});

string_enum!(RunState {
    Assigned => "ASSIGNED",
    Running => "RUNNING",
    Succeeded => "SUCCEEDED",
    Failed => "FAILED",
    TimedOut => "TIMED_OUT",
    Cancelled => "CANCELLED",
});

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::TimedOut | Self::Cancelled | Self::Skipped
        )
    }

    /// A short numeric status for scripts: 0 succeeded, 1 failed, 2 timed out, 3 cancelled,
    /// 4 skipped, and 10+ for the states that are not final yet.
    pub fn status_code(self) -> i32 {
        match self {
            Self::Succeeded => 0,
            Self::Failed => 1,
            Self::TimedOut => 2,
            Self::Cancelled => 3,
            Self::Skipped => 4,
            Self::Queued => 10,
            Self::Assigned => 11,
            Self::Running => 12,
        }
    }

    /// The single place where a job's state changes: returns the next state, or refuses.
    pub fn apply(self, event: JobEvent) -> Result<JobState, TransitionError> {
        TRANSITIONS
            .iter()
            .find(|(from, on, _)| *from == self && *on == event)
            .map(|(_, _, to)| *to)
            .ok_or(TransitionError { from: self, event })
    }
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Assigned | Self::Running)
    }
}

/// What happens to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum JobEvent {
    /// The scheduler gave the job to a worker (a new run, with a lease).
    Assign,
    /// The worker took the assignment.
    Accept,
    /// The worker started the process.
    Start,
    Succeed,
    Fail,
    TimeOut,
    Cancel,
    /// An attempt failed and the retry policy grants another: back to the queue.
    Retry,
    /// A group member whose predecessor failed for good never runs.
    Skip,
    /// A user retries a finished attempt by hand: a new attempt in the same chain.
    Resubmit,
}

impl JobEvent {
    pub const ALL: &'static [JobEvent] = &[
        Self::Assign,
        Self::Accept,
        Self::Start,
        Self::Succeed,
        Self::Fail,
        Self::TimeOut,
        Self::Cancel,
        Self::Retry,
        Self::Skip,
        Self::Resubmit,
    ];
}

use JobEvent as E;
use JobState as S;

/// Every legal move. Anything not listed is refused by [`JobState::apply`].
pub const TRANSITIONS: &[(JobState, JobEvent, JobState)] = &[
    (S::Queued, E::Assign, S::Assigned),
    (S::Queued, E::Cancel, S::Cancelled),
    (S::Queued, E::Skip, S::Skipped),
    (S::Assigned, E::Accept, S::Assigned),
    (S::Assigned, E::Start, S::Running),
    // A worker lost before it started the process, or a spawn that failed.
    (S::Assigned, E::Fail, S::Failed),
    (S::Assigned, E::Retry, S::Queued),
    (S::Assigned, E::Cancel, S::Cancelled),
    (S::Running, E::Succeed, S::Succeeded),
    (S::Running, E::Fail, S::Failed),
    (S::Running, E::TimeOut, S::TimedOut),
    (S::Running, E::Retry, S::Queued),
    (S::Running, E::Cancel, S::Cancelled),
    (S::Failed, E::Resubmit, S::Queued),
    (S::TimedOut, E::Resubmit, S::Queued),
    (S::Cancelled, E::Resubmit, S::Queued),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a job that is {from} cannot take {event:?}")]
pub struct TransitionError {
    pub from: JobState,
    pub event: JobEvent,
}

/// How one attempt ended, as the worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum RunOutcome {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl RunOutcome {
    pub fn run_state(self) -> RunState {
        match self {
            Self::Succeeded => RunState::Succeeded,
            Self::Failed => RunState::Failed,
            Self::TimedOut => RunState::TimedOut,
            Self::Cancelled => RunState::Cancelled,
        }
    }

    /// The job event when no retry is granted.
    pub fn final_event(self) -> JobEvent {
        match self {
            Self::Succeeded => JobEvent::Succeed,
            Self::Failed => JobEvent::Fail,
            Self::TimedOut => JobEvent::TimeOut,
            Self::Cancelled => JobEvent::Cancel,
        }
    }

    /// Failures and timeouts count as failed attempts and may be retried.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Failed | Self::TimedOut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobEvent as E;
    use JobState as S;

    /// Walks every (state, event) pair: exactly the table's entries are accepted.
    #[test]
    fn every_pair_outside_the_table_is_refused() {
        let mut accepted = 0;
        for &state in JobState::ALL {
            for &event in JobEvent::ALL {
                let expected = TRANSITIONS
                    .iter()
                    .find(|(f, e, _)| *f == state && *e == event)
                    .map(|(_, _, t)| *t);
                match (state.apply(event), expected) {
                    (Ok(to), Some(want)) => {
                        assert_eq!(to, want);
                        accepted += 1;
                    }
                    (Err(e), None) => assert_eq!(e, TransitionError { from: state, event }),
                    (got, want) => panic!("{state} on {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        assert_eq!(accepted, TRANSITIONS.len());
    }

    #[test]
    fn terminal_states_accept_only_a_manual_retry() {
        for &state in JobState::ALL.iter().filter(|s| s.is_terminal()) {
            for &event in JobEvent::ALL {
                let resubmittable =
                    event == E::Resubmit && matches!(state, S::Failed | S::TimedOut | S::Cancelled);
                assert_eq!(
                    state.apply(event).is_ok(),
                    resubmittable,
                    "{state} on {event:?}"
                );
            }
        }
    }

    proptest::proptest! {
        /// Any sequence of events, applied where legal, only ever visits states the table
        /// reaches, and a success is final.
        #[test]
        fn random_walks_stay_in_the_table(events in proptest::collection::vec(0usize..10, 0..64)) {
            let mut state = S::Queued;
            for i in events {
                let event = JobEvent::ALL[i % JobEvent::ALL.len()];
                if let Ok(next) = state.apply(event) {
                    proptest::prop_assert!(TRANSITIONS.contains(&(state, event, next)));
                    proptest::prop_assert!(state != S::Succeeded && state != S::Skipped);
                    state = next;
                }
            }
        }
    }

    #[test]
    fn the_happy_path_walks_to_succeeded() {
        let end = [E::Assign, E::Accept, E::Start, E::Succeed]
            .into_iter()
            .try_fold(S::Queued, |s, e| s.apply(e));
        assert_eq!(end, Ok(S::Succeeded));
    }

    #[test]
    fn states_parse_case_insensitively() {
        assert_eq!("timed_out".parse::<JobState>(), Ok(JobState::TimedOut));
        assert_eq!("bogus".parse::<JobState>().unwrap_err().field, "state");
    }
}
