//! SQLite's checkpointer wakes for writes only. A test binary of its own: the checkpoint
//! count is a process-wide metric, and no other store may take checkpoints beside this one.

use drover_store::prelude::*;
use drover_store::{Migrations, SqlStore, Submission};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::time::{Duration, Instant};

fn checkpoints(metrics: &PrometheusHandle) -> u64 {
    metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("drover_store_checkpoints_total "))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Polls until the count has not moved for `still` (a checkpoint follows each write at
/// most 250 ms later): the count then, or a failure after `deadline`.
async fn settled(metrics: &PrometheusHandle, still: Duration, deadline: Duration) -> u64 {
    let given_up = Instant::now() + deadline;
    let (mut count, mut since) = (checkpoints(metrics), Instant::now());
    while since.elapsed() < still {
        assert!(
            Instant::now() < given_up,
            "the checkpointer never rests: {count} checkpoints and counting with nothing written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = checkpoints(metrics);
        if now != count {
            (count, since) = (now, Instant::now());
        }
    }
    count
}

async fn write_a_job(store: &SqlStore) {
    let job = Submission {
        spec: drover_core::JobSpec {
            command: Some("true".into()),
            ..Default::default()
        },
        owner: None,
    };
    let created = store.create_jobs(vec![job]).await.unwrap();
    assert!(created.iter().all(|c| c.is_ok()));
}

#[tokio::test]
async fn an_idle_store_takes_no_checkpoint_and_a_write_wakes_it() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("drover.db").display());
    let store = SqlStore::open(&url, Migrations::Apply).await.unwrap();
    write_a_job(&store).await;

    // Idle: the count comes to rest (a checkpointer on a timer would tick four times a
    // second) and stays there.
    let rested = settled(&metrics, Duration::from_secs(1), Duration::from_secs(20)).await;
    assert!(rested >= 1, "the writes so far were never checkpointed");
    let idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            checkpoints(&metrics),
            rested,
            "a checkpoint with nothing written"
        );
    }

    // A write wakes it again.
    write_a_job(&store).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while checkpoints(&metrics) == rested {
        assert!(Instant::now() < deadline, "a write was never checkpointed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
