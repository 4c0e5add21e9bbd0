//! The end-to-end suites, one module per area, in one test binary: each test starts the
//! real `drover` binary (drover-testkit) on its own directory and free ports. One area:
//! `cargo nextest run --test e2e -E 'test(/^scheduler::/)'`. Tests are named by the seed
//! scenario they run (`e2e_direct_02_…`), else by the behaviour they prove.

mod attack;
mod auth;
mod bad_input;
mod bench;
mod faults;
mod inference;
mod isolation;
mod jobs;
mod openapi;
mod providers;
mod replicas;
mod scheduler;
mod webhooks;

use drover_testkit::Drover;

/// The binary under test.
pub fn drover() -> Drover {
    Drover::new(env!("CARGO_BIN_EXE_drover"))
}
