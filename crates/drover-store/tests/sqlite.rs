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

/// The same checks with every assignment and report batch read ahead of its write
/// transaction (by default only batches of 16 jobs or more are, which these seldom make).
mod reading_ahead {
    use super::conformance;

    async fn fresh() -> Option<(drover_store::SqlStore, tempfile::TempDir)> {
        let (store, dir) = super::fresh().await?;
        Some((store.read_ahead_from(1), dir))
    }

    crate::conformance_suite!(fresh());
}

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
        drover_store::JobStore::create_job(&store, spec)
            .await
            .unwrap()
            .0
            .id
    };
    let store = open(&path).await;
    let job = drover_store::JobStore::get_job(&store, id).await.unwrap();
    assert_eq!(job.state, drover_core::JobState::Queued);
}

#[tokio::test]
async fn a_database_newer_than_the_binary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    drop(open(&path).await);
    let url = format!("sqlite://{}", path.display());
    // Pretend a newer drover applied migration 9999.
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, installed_on, success, \
             checksum, execution_time) VALUES (9999, 'future', CURRENT_TIMESTAMP, 1, x'00', 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let err = SqlStore::open(&url, Migrations::Apply)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("newer than this drover"), "{err}");
    let err = SqlStore::open(&url, Migrations::Check)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("newer than this drover"), "{err}");
}

#[tokio::test]
async fn bad_database_urls_are_clear_errors() {
    let err = SqlStore::open("mysql://x", Migrations::Apply)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().starts_with("database_url:"), "{err}");
    let err = SqlStore::open("postgres://drover:secret@127.0.0.1:9/x", Migrations::Apply)
        .await
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(text.starts_with("cannot open the database"), "{text}");
    assert!(
        !text.contains("secret"),
        "the password must not be shown: {text}"
    );
}

/// What the writer commits reaches the database file itself (not only the WAL) while the
/// store is open, long before the writer's own checkpoint would copy it: the WAL is
/// copied beside the writer.
#[tokio::test]
async fn commits_reach_the_database_file_beside_the_writer() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    let store = open(&path).await;
    let batch = (0..200)
        .map(|i| drover_store::Submission {
            spec: drover_core::JobSpec {
                command: Some(format!("echo {i}")),
                ..Default::default()
            },
            owner: None,
        })
        .collect();
    let created = drover_store::JobStore::create_jobs(&store, batch)
        .await
        .unwrap();
    assert!(created.iter().all(|c| c.is_ok()));
    // The database file alone, without its WAL, copied until it holds the jobs.
    let copy = dir.path().join("file-alone.db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", copy.display()));
        }
        std::fs::copy(&path, &copy).unwrap();
        let url = format!("sqlite://{}?mode=rwc", copy.display());
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        // A copy taken mid-checkpoint may not read yet: it is taken again.
        let jobs: Option<i64> = sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&mut conn)
            .await
            .ok();
        conn.close().await.unwrap();
        if jobs == Some(200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database file holds {jobs:?} jobs of 200: nothing copies the WAL into it"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
