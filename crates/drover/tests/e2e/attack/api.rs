//! The API as an attacker calls it (see the module above).

use crate::drover;
use drover_client::Client;
use drover_core::records::ReservationState;
use drover_core::{Isolation, JobSpec, JobState};
use drover_server::{Access, route_table};
use drover_testkit::{
    ADMIN_PASSWORD, ServerOptions, ServerProc, TestDir, WorkerProc, drover_client, eventually,
};
use std::collections::BTreeMap;

use super::isolation::probe_spec;
use super::plain_user;

/// A raw call: (status, body).
async fn call(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = reqwest::Client::new().request(method.clone(), format!("{url}{path}"));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    match body {
        Some(body) => {
            request = request
                .header("content-type", "application/json")
                .body(body)
        }
        None if method == reqwest::Method::POST => {
            request = request.json(&serde_json::json!({}));
        }
        None => {}
    }
    let r = request.send().await.expect("request");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// Every form of an id that names the same thing, as an attacker would write it.
fn id_forms(id: &str) -> Vec<(String, &'static str)> {
    let percent_dashes = id.replace('-', "%2D");
    let percent_all: String = id.bytes().map(|b| format!("%{b:02X}")).collect();
    vec![
        (id.to_string(), "raw"),
        (percent_dashes, "dashes percent-encoded"),
        (percent_all, "every byte percent-encoded"),
        (id.to_uppercase(), "upper case"),
        (id.replace('-', ""), "without dashes"),
        (format!("urn:uuid:{id}"), "as a URN"),
        (format!("{id}/"), "with a trailing slash"),
    ]
}

/// Bob, a plain user, calls every owned route on the admin's things with every form of
/// their ids: nothing answers, nothing leaks, nothing changes.
#[tokio::test]
async fn a_user_reaches_nothing_of_another_user_by_any_form_of_its_id() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let admin = server.client();
    let _worker = server
        .worker(dir.path(), "w", None, &["--resources", "gpu=1"])
        .await;
    WorkerProc::wait_connected(&admin, 1).await;
    let secret_job = JobSpec {
        command: Some("echo the-admins-secret-output".into()),
        max_attempts: Some(1),
        ..Default::default()
    };
    let job = admin.submit_job(&secret_job).await.expect("submit");
    let view = admin
        .wait_job(&job.id.to_string(), |_| {})
        .await
        .expect("wait");
    let run_id = view.runs[0].run.id.to_string();
    let group = admin
        .create_group("g", std::slice::from_ref(&secret_job))
        .await
        .expect("group")
        .group
        .id
        .to_string();
    let reservation = admin
        .reserve("gpu", 1, None, std::time::Duration::from_secs(60), true)
        .await
        .expect("reserve")
        .id
        .to_string();
    let bob = plain_user(&admin, &server.url, "bob").await;
    let bob_token = bob.token().expect("token").to_string();
    let events_before = admin
        .job_events(&job.id.to_string())
        .await
        .expect("events")
        .len();

    let owned: [(&str, String); 4] = [
        ("/v1/jobs/{id}", job.id.to_string()),
        ("/v1/runs/{id}", run_id.clone()),
        ("/v1/groups/{id}", group.clone()),
        ("/v1/reservations/{id}", reservation.clone()),
    ];
    let mut tried = 0;
    for route in route_table() {
        let Some((prefix, id)) = owned.iter().find(|(p, _)| route.path.starts_with(p)) else {
            continue;
        };
        assert_eq!(route.access, Access::User, "{}", route.path);
        for (form, how) in id_forms(id) {
            let path = route
                .path
                .replace(prefix, &prefix.replace("{id}", &form))
                .replace("//", "/");
            let (status, body) =
                call(&server.url, route.method, &path, Some(&bob_token), None).await;
            let what = format!("{} {path} ({how})", route.method);
            assert!(
                matches!(status, 400 | 403 | 404 | 405),
                "{what} answered {status}: {body}"
            );
            assert!(
                !body.contains("the-admins-secret-output") && !body.contains("\"spec\""),
                "{what} leaked: {body}"
            );
            if matches!(
                how,
                "raw" | "dashes percent-encoded" | "every byte percent-encoded" | "upper case"
            ) {
                assert_eq!(status, 403, "{what}: {body}");
            }
            tried += 1;
        }
    }
    assert!(tried >= 9 * 7, "every owned route in every form: {tried}");
    // Nor may bob's jobs use the admin's reservation (they would jump the queue and take
    // what it holds).
    let into_reservation =
        format!(r#"{{"command": "true", "isolation": "sandbox", "reservation": "{reservation}"}}"#);
    let (status, body) = call(
        &server.url,
        "POST",
        "/v1/jobs",
        Some(&bob_token),
        Some(into_reservation.into_bytes()),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("\"reservation\"") && body.contains("another user"),
        "{body}"
    );
    // Nor may bob's jobs depend on the admin's: waiting on a job tells its outcome, and
    // the answer is the one for a job that does not exist.
    let on_admins_job = format!(
        r#"{{"command": "true", "isolation": "sandbox", "depends_on": ["{}"]}}"#,
        job.id
    );
    let (status, body) = call(
        &server.url,
        "POST",
        "/v1/jobs",
        Some(&bob_token),
        Some(on_admins_job.into_bytes()),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("\"depends_on\"") && body.contains("does not exist"),
        "{body}"
    );
    // Nothing changed: the job, its events, the group and the reservation.
    let after = admin.get_job(&job.id.to_string()).await.expect("job");
    assert_eq!(after.job.state, JobState::Succeeded);
    assert_eq!(after.runs.len(), 1, "no retry by bob");
    assert_eq!(
        admin
            .job_events(&job.id.to_string())
            .await
            .expect("events")
            .len(),
        events_before
    );
    let reservation_after = admin
        .call(
            reqwest::Method::GET,
            &["v1", "reservations", reservation.as_str()],
            None,
        )
        .await
        .expect("reservation");
    assert_eq!(reservation_after["state"], "ACTIVE", "{reservation_after}");
    // The admin still reaches them in every form that parses.
    let (status, body) = call(
        &server.url,
        "GET",
        &format!("/v1/jobs/{}/logs", job.id.to_string().replace('-', "%2D")),
        Some(&server.token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("the-admins-secret-output"));
}

/// Anonymous callers with huge names, malformed bodies and garbage: refused before
/// anything is kept, so neither memory nor the database grows by what they send.
#[tokio::test]
async fn anonymous_oversized_input_is_refused_before_anything_is_kept() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let admin = server.client();
    let db_size = || {
        ["drover.db", "drover.db-wal"]
            .iter()
            .map(|f| {
                std::fs::metadata(server.data_dir.join(f))
                    .map(|m| m.len())
                    .unwrap_or(0)
            })
            .sum::<u64>()
    };
    let before = db_size();
    let huge = "u".repeat(1 << 20);
    for _ in 0..40 {
        let body = serde_json::to_vec(&serde_json::json!({"username": huge, "password": "x"}))
            .expect("json");
        let (status, _) = call(&server.url, "POST", "/v1/auth/login", None, Some(body)).await;
        assert!(matches!(status, 401 | 429), "{status}");
        let body = serde_json::to_vec(&serde_json::json!({"username": "admin", "password": huge}))
            .expect("json");
        let (status, body) = call(&server.url, "POST", "/v1/auth/login", None, Some(body)).await;
        assert!(matches!(status, 400 | 429), "{status} {body}");
    }
    let audit = admin.audit(1000).await.expect("audit");
    for row in &audit {
        let size = serde_json::to_string(row).expect("json").len();
        assert!(size < 2048, "an audit row of {size} bytes: {row:?}");
    }
    if !drover_testkit::on_postgres() {
        let grown = db_size().saturating_sub(before);
        assert!(grown < 4 << 20, "the database grew by {grown} bytes");
    }
    // Trailing garbage, control characters and too many labels are refused, naming the field.
    let token = Some(server.token.as_str());
    for (body, field) in [
        (r#"{"command": "true"} trailing"#.to_string(), "body"),
        (r#"{"command": "true"}{"command": "true"}"#.to_string(), "body"),
        (
            r#"{"command": "true", "env": {"A\nB": "x"}}"#.to_string(),
            "env.A\\nB",
        ),
        (
            r#"{"command": "true", "labels": {"zone": "a\u0000b"}}"#.to_string(),
            "labels.zone",
        ),
        (
            serde_json::json!({
                "command": "true",
                "labels": (0..5000).map(|i| (format!("k{i}"), "v".to_string())).collect::<BTreeMap<_, _>>(),
            })
            .to_string(),
            "labels",
        ),
        (
            r#"{"command": "true", "isolation": "container", "image": "--volume=/:/host"}"#
                .to_string(),
            "image",
        ),
        (
            r#"{"command": "true", "working_dir": "relative"}"#.to_string(),
            "working_dir",
        ),
    ] {
        let (status, answer) = call(&server.url, "POST", "/v1/jobs", token, Some(body.into_bytes())).await;
        assert_eq!(status, 400, "{answer}");
        let answer: serde_json::Value = serde_json::from_str(&answer).expect("json error");
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
    assert!(admin.list_jobs(None, 10).await.expect("jobs").is_empty());
}

/// A login from a given local address (the loopback range is all this machine's).
async fn login_from(
    url: &str,
    from: [u8; 4],
    user: &str,
    password: &str,
) -> (u16, std::time::Duration) {
    let client = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(from))
        .build()
        .expect("client");
    let started = std::time::Instant::now();
    let r = client
        .post(format!("{url}/v1/auth/login"))
        .json(&serde_json::json!({"username": user, "password": password}))
        .send()
        .await
        .expect("login request");
    (r.status().as_u16(), started.elapsed())
}

/// Mallory fails the admin's password over and over from one address: that address is
/// refused, and the admin, from another, still signs in.
#[tokio::test]
async fn failing_the_admins_password_elsewhere_does_not_lock_the_admin_out() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let url = server.url.clone();
    let mut refused_at = None;
    for i in 0..12 {
        let (status, _) = login_from(&url, [127, 0, 0, 2], "admin", "guess").await;
        assert!(matches!(status, 401 | 429), "{status}");
        if status == 429 && refused_at.is_none() {
            refused_at = Some(i);
        }
    }
    assert_eq!(
        refused_at,
        Some(5),
        "the guessing address is refused after five failures"
    );
    let (status, _) = login_from(&url, [127, 0, 0, 3], "admin", ADMIN_PASSWORD).await;
    assert_eq!(status, 200, "the admin signs in from elsewhere");
    // The guessing address stays refused, right password or not.
    let (status, _) = login_from(&url, [127, 0, 0, 2], "admin", ADMIN_PASSWORD).await;
    assert_eq!(status, 429);
}

/// Whether a user exists must not show in how long a failed login takes: an unknown name
/// is verified against a hash as a known one is. Compared as a ratio of medians, each
/// login from an address of its own (the limiter counts per address).
#[tokio::test]
async fn login_time_does_not_tell_whether_a_user_exists() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..4u8 {
        let (status, t) = login_from(&server.url, [127, 0, 1, i], "admin", "wrong-password").await;
        assert_eq!(status, 401);
        known.push(t);
        let (status, t) =
            login_from(&server.url, [127, 0, 2, i], "nobody-here", "wrong-password").await;
        assert_eq!(status, 401);
        unknown.push(t);
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[2].as_secs_f64(), unknown[2].as_secs_f64());
    assert!(
        u > k * 0.3,
        "an unknown user answers in {u:.4} s, a known one in {k:.4} s: the difference tells"
    );
}

/// Many refreshes racing with one refresh token through the API: one rotation at most, and
/// no access token from it survives the reuse. On PostgreSQL too (scripts/test).
#[tokio::test]
async fn racing_refreshes_rotate_a_refresh_token_once() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let anonymous = Client::new(&server.url).expect("client");
    let tokens = anonymous
        .login("admin", ADMIN_PASSWORD)
        .await
        .expect("login");
    let answers = futures::future::join_all((0..10).map(|_| {
        let body = serde_json::to_vec(&serde_json::json!({"refresh_token": tokens.refresh_token}))
            .expect("json");
        call(&server.url, "POST", "/v1/auth/refresh", None, Some(body))
    }))
    .await;
    let won: Vec<&String> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
        .collect();
    assert!(won.len() <= 1, "{answers:?}");
    for body in won {
        let pair: serde_json::Value = serde_json::from_str(body).expect("json");
        let access = pair["access_token"].as_str().expect("access token");
        let (status, _) = call(&server.url, "GET", "/v1/auth/whoami", Some(access), None).await;
        assert_eq!(status, 401, "an access token of a reused login still works");
    }
}

/// Several workers registering at once with one one-time token: one node joins.
#[tokio::test]
async fn a_join_token_used_by_racing_workers_registers_one_node() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let token = server.token().await;
    let workers: Vec<WorkerProc> = (0..6)
        .map(|i| {
            WorkerProc::start(
                &drover(),
                &server.url,
                dir.path(),
                &format!("racer-{i}"),
                Some(&token),
                &[],
            )
        })
        .collect();
    WorkerProc::wait_connected(&server.client(), 1).await;
    // Every loser has given up by the time it exits or says so in its log.
    eventually("the other workers to be refused", || async {
        let refused = workers
            .iter()
            .filter(|w| w.proc.log_text().contains("already used"))
            .count();
        (refused == 5).then_some(())
    })
    .await;
    let nodes = server.client().list_nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
}

/// Secrets given through the environment are not printed by `--help`.
#[tokio::test]
async fn help_does_not_print_secret_values_from_the_environment() {
    for command in [
        vec!["server", "--help"],
        vec!["migrate", "--help"],
        vec!["worker", "--help"],
        vec!["up", "--help"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(&command)
            .env(
                "DROVER_DATABASE_URL",
                "postgres://drover:canary-pw-77@db/drover",
            )
            .env("DROVER_ADMIN_PASSWORD", "canary-admin-77")
            .env("DROVER_TOKEN", "canary-join-77")
            .env("DROVER_API_TOKEN", "canary-api-77")
            .env("DROVER_OPENAI_API_KEY", "canary-openai-77")
            .output()
            .expect("drover --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{command:?}");
        assert!(
            !text.contains("canary"),
            "{command:?} printed a secret:\n{text}"
        );
    }
}

/// The database URL can come from a file, so that its password is in no process list.
#[tokio::test]
async fn the_database_url_can_come_from_a_file() {
    let dir = TestDir::new();
    let data = dir.path().join("data");
    let url_file = dir.path().join("db-url");
    std::fs::write(
        &url_file,
        format!("sqlite://{}/from-file.db\n", dir.path().display()),
    )
    .expect("write");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--database-url-file")
        .arg(&url_file)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("server");
    eventually("the database named in the file to be made", || async {
        dir.path().join("from-file.db").exists().then_some(())
    })
    .await;
    drop(out);
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["server", "--database-url-file", "/nonexistent/db-url"])
        .output()
        .expect("server");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--database-url-file"));
}

/// A process job has the worker's rights (root under `drover up` as root, or the admin's
/// own account): plain users are kept to the isolating modes on every submission path
/// unless the control plane lets them have `process` (`--user-isolation`). Inference jobs,
/// which run in the node's model, are not affected.
#[tokio::test]
async fn plain_users_get_process_jobs_only_where_the_control_plane_allows_them() {
    use drover_proto::v1::job_service_client::JobServiceClient;
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let bob = plain_user(&server.client(), &server.url, "bob").await;
    let bob_token = bob.token().expect("token").to_string();
    let plain = r#"{"command": "id"}"#;
    for (path, body, names) in [
        ("/v1/jobs", plain.to_string(), "isolation"),
        (
            "/v1/jobs/batch",
            format!(r#"{{"jobs": [{plain}]}}"#),
            "jobs[0].isolation",
        ),
        (
            "/v1/groups",
            format!(r#"{{"jobs": [{plain}]}}"#),
            "jobs[0].isolation",
        ),
    ] {
        let (status, answer) = call(
            &server.url,
            "POST",
            path,
            Some(&bob_token),
            Some(body.into_bytes()),
        )
        .await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(
            answer.contains(names) && answer.contains("--user-isolation"),
            "{answer}"
        );
    }
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {bob_token}").parse().expect("header");
    let mut jobs =
        JobServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
    let refused = jobs
        .submit_job(drover_proto::v1::SubmitJobRequest {
            spec: Some(drover_proto::v1::JobSpec {
                command: Some("id".into()),
                ..Default::default()
            }),
        })
        .await
        .expect_err("a process job over gRPC");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // A sandboxed job is a user's to run; the admin runs anything.
    let sandboxed = JobSpec {
        command: Some("true".into()),
        isolation: Isolation::Sandbox,
        ..Default::default()
    };
    bob.submit_job(&sandboxed).await.expect("a sandboxed job");
    server
        .client()
        .submit_job(&probe_spec("true", Isolation::Process))
        .await
        .expect("the admin's process job");
    let bob_id = bob.whoami().await.expect("whoami").id;
    let jobs_of_bob: Vec<_> = server
        .client()
        .list_jobs(None, 10)
        .await
        .expect("jobs")
        .into_iter()
        .filter(|j| j.owner.as_deref() == Some(bob_id.as_str()))
        .collect();
    assert_eq!(
        jobs_of_bob.len(),
        1,
        "only the sandboxed one: {jobs_of_bob:?}"
    );
    // Where the control plane allows it, bob runs process jobs.
    let open = ServerProc::start_named(
        &drover(),
        dir.path(),
        "open",
        ServerOptions {
            extra: ["--user-isolation", "process,sandbox,container"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        },
    )
    .await;
    let bob = plain_user(&open.client(), &open.url, "bob").await;
    bob.submit_job(&probe_spec("true", Isolation::Process))
        .await
        .expect("allowed here");
    let bad = drover()
        .cli(&open.url, &["server", "--user-isolation", "vm"])
        .await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("--user-isolation"), "{bad:?}");
}

/// The (status, field, message) of a refusal.
fn refusal(e: drover_client::ClientError) -> (u16, Option<String>, String) {
    match e {
        drover_client::ClientError::Api {
            status,
            field,
            message,
            ..
        } => (status, field, message),
        other => panic!("not a refusal: {other}"),
    }
}

/// Mallory, a plain user, tries to keep a shared resource from everyone: a reservation
/// longer than users may hold, then more reservations than users may hold (a pending one
/// keeps what frees from queued jobs too). Each is refused with what to change; what she
/// holds stays bounded, others can still queue for the resource, and the limits are the
/// control plane's settings (here `--max-reservations-per-user 2 --max-reservation-ttl 10m`).
#[tokio::test]
async fn a_user_cannot_keep_a_shared_resource_from_everyone() {
    let dir = TestDir::new();
    let options = ServerOptions {
        extra: vec![
            "--max-reservations-per-user".into(),
            "2".into(),
            "--max-reservation-ttl".into(),
            "10m".into(),
        ],
        ..Default::default()
    };
    let server = ServerProc::start(&drover(), dir.path(), options).await;
    let admin = server.client();
    let _worker = server
        .worker(dir.path(), "w", None, &["--resources", "gpu=1"])
        .await;
    WorkerProc::wait_connected(&admin, 1).await;
    let mallory = plain_user(&admin, &server.url, "mallory").await;
    let alice = plain_user(&admin, &server.url, "alice").await;
    let minutes = |m: u64| std::time::Duration::from_secs(60 * m);

    // Longer than a user may hold: refused, naming the field and the setting.
    let too_long = mallory
        .reserve("gpu", 1, None, minutes(11), true)
        .await
        .expect_err("an 11-minute reservation is over the 10-minute limit");
    let (status, field, message) = refusal(too_long);
    assert_eq!(
        (status, field.as_deref()),
        (400, Some("ttl_ms")),
        "{message}"
    );
    assert!(message.contains("--max-reservation-ttl"), "{message}");

    // Two live reservations (one active, one queued behind it), not a third.
    let first = mallory
        .reserve("gpu", 1, None, minutes(10), true)
        .await
        .expect("a reservation within the limits");
    assert_eq!(first.state, ReservationState::Active);
    let second = mallory
        .reserve("gpu", 1, None, minutes(10), true)
        .await
        .expect("a second reservation, queued");
    assert_eq!(second.state, ReservationState::Pending);
    let third = mallory
        .reserve("gpu", 1, None, minutes(10), true)
        .await
        .expect_err("a third live reservation is over the limit");
    let (status, _, message) = refusal(third);
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("release one"), "{message}");

    // Her limit is hers: another user still queues for the resource.
    let alices = alice
        .reserve("gpu", 1, None, minutes(5), true)
        .await
        .expect("another user's reservation");
    assert_eq!(alices.state, ReservationState::Pending);

    // Released, a reservation stops counting: her queued one takes the resource, and she
    // may ask again.
    mallory
        .release_reservation(&first.id.to_string())
        .await
        .expect("release");
    let second_id = second.id.to_string();
    eventually("mallory's queued reservation becomes active", || async {
        mallory
            .get_reservation(&second_id)
            .await
            .ok()
            .filter(|r| r.state == ReservationState::Active)
    })
    .await;
    mallory
        .reserve("gpu", 1, None, minutes(10), true)
        .await
        .expect("one released, she may hold two again");

    // Admins are not limited by the user settings.
    admin
        .reserve("gpu", 1, None, minutes(120), true)
        .await
        .expect("an admin's two-hour reservation");
}

/// The gRPC job service checks ownership as the HTTP API does (`auth::check_owner`): Bob,
/// a plain user, cannot read or cancel the admin's job through GetJob or CancelJob in any
/// form of its id, and ListJobs shows him only his own; the job is untouched.
#[tokio::test]
async fn a_user_reaches_nothing_of_another_user_over_grpc() {
    use drover_proto::v1::job_service_client::JobServiceClient;
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let admin = server.client();
    // No worker: the admin's job stays queued, so a cancel would show.
    let secret = admin
        .submit_job(&JobSpec {
            command: Some("echo the-admins-secret".into()),
            name: "the-admins-job".into(),
            ..Default::default()
        })
        .await
        .expect("submit");
    let id = secret.id.to_string();
    let bob = plain_user(&admin, &server.url, "bob").await;
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", bob.token().expect("token"))
            .parse()
            .expect("header");
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut jobs =
        JobServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
    for (form, what) in id_forms(&id) {
        let got = jobs
            .get_job(drover_proto::v1::GetJobRequest { id: form.clone() })
            .await
            .expect_err(what);
        let cancel = jobs
            .cancel_job(drover_proto::v1::CancelJobRequest { id: form.clone() })
            .await
            .expect_err(what);
        for refused in [got, cancel] {
            assert!(
                matches!(
                    refused.code(),
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
                ),
                "{what}: {refused:?}"
            );
            assert!(
                !refused.message().contains("the-admins"),
                "{what}: {refused:?}"
            );
        }
    }
    let listed = jobs
        .list_jobs(drover_proto::v1::ListJobsRequest::default())
        .await
        .expect("bob lists his jobs")
        .into_inner();
    assert!(listed.jobs.iter().all(|j| j.id != id), "{listed:?}");
    let after = admin.get_job(&id).await.expect("the admin's job");
    assert_eq!(after.job.state, JobState::Queued, "untouched: {after:?}");
}
