//! The store conformance suite on the SQLite engine.

mod conformance;

use drover_store::{Migrations, SqlStore};

async fn open(path: &std::path::Path) -> SqlStore {
    SqlStore::open(&format!("sqlite://{}", path.display()), Migrations::Apply)
        .await
        .unwrap()
}

/// A store on a fresh SQLite file; the directory lives as long as the guard.
async fn fresh() -> Option<(SqlStore, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("drover.db")).await;
    Some((store, dir))
}

conformance_suite!(fresh());

#[tokio::test]
async fn reopening_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    let id = {
        let store = open(&path).await;
        let spec = drover_core::JobSpec {
            command: Some("true".into()),
            ..Default::default()
        };
        drover_store::Store::create_job(&store, spec)
            .await
            .unwrap()
            .0
            .id
    };
    let store = open(&path).await;
    let job = drover_store::Store::get_job(&store, id).await.unwrap();
    assert_eq!(job.state, drover_core::JobState::Queued);
}
