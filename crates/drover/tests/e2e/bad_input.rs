//! Bad input gets a clear error naming the field, and changes nothing (product spec §5).

use crate::drover;
use drover_testkit::{ServerOptions, ServerProc, TestDir};

async fn post_raw(url: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/jobs"))
        .bearer_auth(drover_testkit::token_for(url).expect("token"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

#[tokio::test]
async fn bad_job_submissions_name_their_field_and_store_nothing() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let long_name = "n".repeat(257);
    let big_value = "v".repeat(1 << 20);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty command", br#"{"command": ""}"#.to_vec(), "command"),
        (
            "blank command",
            br#"{"command": "   "}"#.to_vec(),
            "command",
        ),
        ("no command", br#"{"name": "x"}"#.to_vec(), "command"),
        (
            "command and program",
            br#"{"command": "ls", "program": "ls"}"#.to_vec(),
            "command",
        ),
        (
            "zero timeout",
            br#"{"command": "true", "timeout_ms": 0}"#.to_vec(),
            "timeout_ms",
        ),
        (
            "negative timeout",
            br#"{"command": "true", "timeout_ms": -5}"#.to_vec(),
            "timeout_ms",
        ),
        (
            "env name with =",
            br#"{"command": "true", "env": {"A=B": "x"}}"#.to_vec(),
            "env.A=B",
        ),
        (
            "env name with NUL",
            br#"{"command": "true", "env": {"A\u0000": "x"}}"#.to_vec(),
            // Escaped: a field name never carries a control character back.
            "env.A\\0",
        ),
        (
            "1 MB env value",
            format!(r#"{{"command": "true", "env": {{"BIG": "{big_value}"}}}}"#).into_bytes(),
            "env.BIG",
        ),
        (
            "name over 256 bytes",
            format!(r#"{{"command": "true", "name": "{long_name}"}}"#).into_bytes(),
            "name",
        ),
        (
            "invalid UTF-8 in name",
            [
                &br#"{"command": "true", "name": "ab"#[..],
                &[0xff, 0xfe],
                &br#""}"#[..],
            ]
            .concat(),
            "name",
        ),
        (
            "unknown field",
            br#"{"command": "true", "timout_ms": 5}"#.to_vec(),
            "timout_ms",
        ),
        (
            "wrong type",
            br#"{"command": "true", "priority": "high"}"#.to_vec(),
            "priority",
        ),
        ("not JSON", b"command=true".to_vec(), "body"),
        ("empty body", Vec::new(), "body"),
    ];
    for (what, body, field) in cases {
        let (status, answer) = post_raw(&server.url, body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        let error = &answer["error"];
        assert_eq!(error["code"], "invalid_argument", "{what}: {answer}");
        let got = error["field"].as_str().unwrap_or_default();
        assert!(
            got.starts_with(field),
            "{what}: field {got:?}, want {field:?}: {answer}"
        );
        assert!(!error["message"].as_str().unwrap_or_default().is_empty());
    }
    let jobs = server.client().list_jobs(None, 100).await.unwrap();
    assert!(jobs.is_empty(), "bad input stored a job: {jobs:?}");
}

#[tokio::test]
async fn malformed_and_unknown_ids_are_told_apart() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let d = drover();
    let malformed = d.cli(&server.url, &["job", "get", "not-a-job-id"]).await;
    assert_eq!(malformed.code, 2, "{malformed:?}");
    assert!(malformed.stderr.contains("id"), "{malformed:?}");
    let unknown = d
        .cli(
            &server.url,
            &["job", "get", "01a20000-0000-7000-8000-000000000000"],
        )
        .await;
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(unknown.stderr.contains("not found"), "{unknown:?}");
    let get = |path: String| {
        reqwest::Client::new()
            .get(path)
            .bearer_auth(server.token.clone())
            .send()
    };
    let r = get(format!("{}/v1/jobs/..%2F..%2Fetc", server.url))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = get(format!("{}/v1/jobs?state=bogus", server.url))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["field"], "state");
}

#[tokio::test]
async fn the_cli_refuses_bad_flags_before_sending_anything() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let d = drover();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["job", "run", "--command", "true", "--timeout", "-5"],
            "--timeout",
        ),
        (
            vec!["job", "run", "--command", "true", "--timeout", "0"],
            "--timeout",
        ),
        (
            vec!["job", "run", "--command", "true", "--timeout", "soon"],
            "--timeout",
        ),
        (
            vec!["job", "run", "--command", "true", "--env", "oops"],
            "--env",
        ),
        (vec!["job", "run"], "--command"),
        (vec!["job", "run", "--command", "", "--wait"], "command"),
        (vec!["job", "run", "--args", "-c true"], "--args"),
        (
            vec!["reserve", "--resource", "gpu", "--ttl", "abc"],
            "--ttl",
        ),
    ];
    // Files: a bad line of `job submit` names its line and field; a group file its field.
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let jobs = file(
        "jobs.jsonl",
        "{\"command\": \"true\"}\n{\"command\": \"true\", \"priority\": \"high\"}\n",
    );
    let group = file(
        "group.yaml",
        "jobs:\n  - command: 'true'\n  - command: 'true'\n    priority: high\n",
    );
    let broken = file("broken.yaml", "jobs: [command: true\n");
    let unknown = file("unknown.yaml", "- command: 'true'\n  timout_ms: 5\n");
    let files: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["job", "submit", &jobs],
            "line 2: priority: invalid type",
        ),
        (
            vec!["group", "run", &group],
            "jobs[1].priority: invalid type",
        ),
        (vec!["group", "run", &broken], "not YAML or JSON"),
        (
            vec!["group", "run", &unknown],
            "[0].timout_ms: unknown field",
        ),
    ];
    for (args, needle) in cases.into_iter().chain(files) {
        let out = d.cli(&server.url, &args).await;
        assert_eq!(out.code, 2, "bad input exits 2: {args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {out:?}");
    }
    assert!(
        server
            .client()
            .list_jobs(None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    let d = drover();
    let out = d.cli("http://127.0.0.1:9", &["job", "list"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("cannot reach drover at"), "{out:?}");
}
