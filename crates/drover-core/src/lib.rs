//! drover's domain model. Pure: no I/O, no async, no database. Every state change of a job
//! goes through [`state::JobState::apply`], whose table is the single list of legal moves.

pub mod access;
pub mod event;
pub mod ids;
pub mod job;
pub mod records;
pub mod reservation;
pub mod retry;
pub mod schedule;
pub mod state;
pub mod time;
pub mod validation;
pub mod webhook;
pub mod worker;

pub use event::EventKind;
pub use ids::{GroupId, IdError, JobId, ReservationId, RunId, WebhookId, WorkerId};
pub use job::{ChatTurn, InferenceSpec, Isolation, JobKind, JobSpec};
pub use state::{JobEvent, JobState, RunOutcome, RunState, TransitionError};
pub use time::Timestamp;
pub use validation::ValidationError;
pub use worker::{Capabilities, NodeConfig, WorkerState};
