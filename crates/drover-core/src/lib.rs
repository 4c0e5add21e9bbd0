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
pub mod webhook;
pub mod worker;

pub use event::EventKind;
pub use ids::{GroupId, IdError, JobId, ReservationId, RunId, WebhookId, WorkerId};
pub use job::{
    ChatTurn, InferenceSpec, Isolation, JobEvent, JobKind, JobSpec, JobState, RunOutcome, RunState,
    TransitionError, ValidationError,
};
pub use time::Timestamp;
pub use worker::{Capabilities, NodeConfig, WorkerState};
