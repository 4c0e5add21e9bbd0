//! Smoke tests of `drover bench`: each scenario with tiny sizes, so that the command itself
//! cannot rot. They check that figures come out, never how large they are.

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("bench")
        .args(args)
        .args(["--output", "json"])
        .env_remove("DROVER_SERVER")
        .output()
        .expect("run drover bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON figures")
}

fn figure<'a>(v: &'a serde_json::Value, name: &str) -> &'a str {
    v["figures"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == name))
        .and_then(|f| f["value"].as_str())
        .unwrap_or_else(|| panic!("no figure {name:?} in {v}"))
}

#[test]
fn bench_throughput_noop_and_process_smoke() {
    let v = bench(&["throughput", "--jobs", "30", "--workers", "1"]);
    assert_eq!(v["scenario"], "throughput");
    assert!(figure(&v, "throughput").ends_with("jobs/s"));
    assert!(figure(&v, "control plane peak memory").ends_with("MiB"));
    assert_eq!(
        figure(
            &v,
            "CPU per job: control plane · workers · bench client · rest of the machine"
        )
        .matches(" µs")
        .count(),
        4
    );
    assert!(figure(&v, "machine busy during the run").ends_with(" cores"));
    assert_write_times(&v);
    assert!(figure(&v, "the one SQLite writer busy during the run").ends_with(" %"));
    let v = bench(&[
        "throughput",
        "--jobs",
        "10",
        "--executor",
        "process",
        "--workers",
        "1",
        "--batch",
        "1",
    ]);
    assert_eq!(figure(&v, "executor"), "process");
    assert_eq!(figure(&v, "jobs per submit request"), "1");
}

/// The store's transaction timings reach the bench through /metrics: the jobs were
/// submitted, assigned and reported, so the three cannot all be 0 µs.
fn assert_write_times(v: &serde_json::Value) {
    let open: Vec<u64> = figure(
        v,
        "write transactions open per job: submit · assign · report",
    )
    .split(" · ")
    .map(|t| t.trim_end_matches(" µs").parse().expect("µs figure"))
    .collect();
    assert_eq!(open.len(), 3, "{open:?}");
    assert!(open.iter().sum::<u64>() > 0, "{open:?}");
    // The jobs were submitted, assigned and reported in transactions of each kind (a
    // dash, not a number, if none reached the bench).
    let per_transaction: Vec<f64> =
        figure(v, "jobs per write transaction: submit · assign · report")
            .split(" · ")
            .map(|n| n.parse().expect("jobs per transaction"))
            .collect();
    assert_eq!(per_transaction.len(), 3, "{per_transaction:?}");
    assert!(
        per_transaction.iter().all(|&n| n > 0.0),
        "{per_transaction:?}"
    );
}

#[tokio::test]
async fn bench_throughput_on_postgres_smoke() {
    let Some(url) = drover_testkit::postgres_database().await else {
        return;
    };
    let v = tokio::task::spawn_blocking(move || {
        bench(&[
            "throughput",
            "--jobs",
            "30",
            "--workers",
            "1",
            "--database-url",
            &url,
        ])
    })
    .await
    .expect("bench");
    assert_eq!(v["database"], "PostgreSQL");
    assert!(figure(&v, "throughput").ends_with("jobs/s"));
    assert_write_times(&v);
    let at_once: f64 = figure(&v, "write transactions open at once, on average")
        .parse()
        .expect("a number");
    assert!(at_once >= 0.0);
}

#[test]
fn bench_latency_smoke() {
    let v = bench(&["latency", "--jobs", "5"]);
    assert!(figure(&v, "submit → RUNNING").starts_with("p50 "));
}

#[test]
fn bench_logs_smoke() {
    let v = bench(&["logs", "--lines", "500"]);
    assert_eq!(figure(&v, "lines stored"), "500");
    assert_eq!(figure(&v, "lines followed"), "500");
}

#[test]
fn bench_backlog_smoke() {
    let v = bench(&["backlog", "--queued", "100", "--jobs", "3"]);
    assert!(figure(&v, "submit rate while filling").ends_with("jobs/s"));
    assert!(figure(&v, "deep queue: submit → RUNNING").starts_with("p50 "));
}

#[test]
fn bench_workers_smoke() {
    let v = bench(&[
        "workers",
        "--simulated",
        "10",
        "--idle",
        "1s",
        "--jobs",
        "3",
    ]);
    assert_eq!(figure(&v, "simulated workers"), "10");
    assert!(figure(&v, "control plane CPU while idle (1 s)").ends_with("of one core"));
}

/// `bench split` on the real model (DROVER_TEST_MODEL; under CI=true it must be there).
#[test]
fn bench_split_smoke() {
    let Some(model) =
        std::env::var_os("DROVER_TEST_MODEL").filter(|p| std::path::Path::new(p).is_file())
    else {
        assert!(std::env::var("CI").is_err(), "DROVER_TEST_MODEL is not set");
        return;
    };
    let model = model.to_string_lossy().into_owned();
    let v = bench(&["split", "--model", &model, "--tokens", "4", "--rounds", "1"]);
    assert_eq!(v["scenario"], "split");
    assert!(figure(&v, "stages: decode (median)").ends_with("tokens/s"));
    assert_eq!(figure(&v, "same text"), "true");
    assert_eq!(
        figure(&v, "hidden states per token and hop (f32)"),
        "2304 bytes"
    );
}
