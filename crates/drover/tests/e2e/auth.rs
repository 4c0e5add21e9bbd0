//! Who may do what (seed 000's login, tokens, roles, node credentials). The route table of
//! the server is walked: a new endpoint that forgets its access level fails here.

use crate::drover;
use drover_client::Client;
use drover_core::{JobSpec, JobState};
use drover_server::{Access, route_table};
use drover_testkit::{
    ADMIN_PASSWORD, ServerOptions, ServerProc, TestDir, WorkerProc, drover_client, eventually,
};
use reqwest::Method;

fn echo(command: &str) -> JobSpec {
    JobSpec {
        command: Some(command.into()),
        max_attempts: Some(1),
        ..Default::default()
    }
}

/// A raw call: (status, body), with or without a bearer token.
async fn call(url: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = reqwest::Client::new().request(method.clone(), format!("{url}{path}"));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if method == Method::POST {
        request = request.json(&serde_json::json!({}));
    }
    let r = request.send().await.expect("request");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test]
async fn seed000_login_register_run_refresh_logout() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    // Login as admin.
    let anonymous = Client::new(&server.url).unwrap();
    let tokens = anonymous.login("admin", ADMIN_PASSWORD).await.unwrap();
    assert_eq!(tokens.token_type, "Bearer");
    assert_eq!(tokens.expires_in, 15 * 60, "access tokens are short-lived");
    let admin = anonymous.clone().with_token(tokens.access_token.clone());
    assert_eq!(admin.whoami().await.unwrap().name, "admin");
    // Node registration with a one-time token the admin minted.
    let join = admin
        .create_node_token(std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let _worker = WorkerProc::start(
        &drover(),
        &server.url,
        dir.path(),
        "node-a",
        Some(&join.token),
        &[],
    );
    WorkerProc::wait_connected(&admin, 1).await;
    // Create a job; it is dispatched and completes with "hello" in its output.
    let job = admin.submit_job(&echo("echo hello")).await.unwrap();
    let view = admin.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded);
    let logs = admin.job_logs(&job.id.to_string(), None).await.unwrap();
    assert!(logs.iter().any(|e| e.text.contains("hello")), "{logs:?}");
    // Token refresh: a new pair; the old refresh token stops working.
    let refreshed = anonymous.refresh(&tokens.refresh_token).await.unwrap();
    assert_ne!(refreshed.access_token, tokens.access_token);
    let admin = anonymous.clone().with_token(refreshed.access_token.clone());
    admin.whoami().await.unwrap();
    // Logout: the old access and refresh tokens are refused.
    admin.logout().await.unwrap();
    let after = admin.whoami().await.unwrap_err();
    assert!(
        matches!(after, drover_client::ClientError::Api { status: 401, .. }),
        "{after:?}"
    );
    let again = anonymous
        .refresh(&refreshed.refresh_token)
        .await
        .unwrap_err();
    assert!(
        matches!(again, drover_client::ClientError::Api { status: 401, .. }),
        "{again:?}"
    );
    // The audit trail has the logins and the logout.
    let audit = server.client().audit(100).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert!(
        actions.contains(&"login") && actions.contains(&"logout"),
        "{actions:?}"
    );
}

#[tokio::test]
async fn a_reused_refresh_token_revokes_the_whole_login() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let anonymous = Client::new(&server.url).unwrap();
    let first = anonymous.login("admin", ADMIN_PASSWORD).await.unwrap();
    let second = anonymous.refresh(&first.refresh_token).await.unwrap();
    // A thief replays the first refresh token: refused, and the live login dies with it.
    assert!(anonymous.refresh(&first.refresh_token).await.is_err());
    let victim = anonymous.clone().with_token(second.access_token);
    assert!(victim.whoami().await.is_err(), "the chain is revoked");
    assert!(anonymous.refresh(&second.refresh_token).await.is_err());
}

#[tokio::test]
async fn password_guessing_is_slowed_and_audited() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let anonymous = Client::new(&server.url).unwrap();
    for _ in 0..5 {
        let e = anonymous.login("admin", "guess").await.unwrap_err();
        assert!(
            matches!(e, drover_client::ClientError::Api { status: 401, .. }),
            "{e:?}"
        );
    }
    // Even the right password waits now.
    let e = anonymous.login("admin", ADMIN_PASSWORD).await.unwrap_err();
    assert!(
        matches!(e, drover_client::ClientError::Api { status: 429, .. }),
        "{e:?}"
    );
    let audit = server.client().audit(100).await.unwrap();
    let refused = audit
        .iter()
        .filter(|a| a.action == "login" && a.outcome == "refused")
        .count();
    assert_eq!(refused, 6, "{audit:?}");
}

/// Every route of the table, called without a token, with a bogus, an expired and a revoked
/// one, a user's token on admin routes and on another user's job, group, run and
/// reservation: refused with 401/403, and nothing changes.
#[tokio::test]
async fn every_route_refuses_callers_without_the_right_token() {
    let dir = TestDir::new();
    let options = ServerOptions {
        // Bob runs a plain job of his own below (plain users get isolating modes only
        // unless the control plane says otherwise).
        extra: [
            "--access-token-ttl",
            "1s",
            "--user-isolation",
            "process,sandbox",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    let server = ServerProc::start(&drover(), dir.path(), options).await;
    let admin = server.client();
    let _worker = server
        .worker(dir.path(), "w", None, &["--resources", "gpu=1"])
        .await;
    WorkerProc::wait_connected(&admin, 1).await;
    // Things that belong to the admin.
    let job = admin.submit_job(&echo("echo mine")).await.unwrap();
    let view = admin.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    let run_id = view.runs[0].run.id.to_string();
    let group = admin
        .create_group("g", &[echo("true")])
        .await
        .unwrap()
        .group
        .id
        .to_string();
    let reservation = admin
        .reserve("gpu", 1, None, std::time::Duration::from_secs(60), true)
        .await
        .unwrap()
        .id
        .to_string();
    let node = admin.list_nodes().await.unwrap()[0].worker.id.to_string();
    // A plain user, and tokens that must not work.
    admin
        .create_user("bob", "bob-password", "user")
        .await
        .unwrap();
    let anonymous = Client::new(&server.url).unwrap();
    let bob = anonymous
        .login("bob", "bob-password")
        .await
        .unwrap()
        .access_token;
    let bob_api = anonymous
        .clone()
        .with_token(bob.clone())
        .create_api_token("bob-ci", std::time::Duration::from_secs(3600))
        .await
        .unwrap();
    let bob_token_id = bob_api["id"].as_str().unwrap().to_string();
    let bob_api = bob_api["token"].as_str().unwrap().to_string();
    let revoked = anonymous
        .login("bob", "bob-password")
        .await
        .unwrap()
        .access_token;
    anonymous
        .clone()
        .with_token(revoked.clone())
        .logout()
        .await
        .unwrap();
    let expired = anonymous
        .login("bob", "bob-password")
        .await
        .unwrap()
        .access_token;
    eventually("the access token to expire", || async {
        anonymous
            .clone()
            .with_token(expired.clone())
            .whoami()
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let before_jobs = admin.list_jobs(None, 1000).await.unwrap();
    let before_events = admin.job_events(&job.id.to_string()).await.unwrap().len();

    let table = route_table();
    assert!(
        table.len() > 25,
        "the table lists every route: {}",
        table.len()
    );
    let mut checked = 0;
    for route in &table {
        let path = route
            .path
            .replace("/v1/jobs/{id}", &format!("/v1/jobs/{}", job.id))
            .replace("/v1/runs/{id}", &format!("/v1/runs/{run_id}"))
            .replace("/v1/groups/{id}", &format!("/v1/groups/{group}"))
            .replace(
                "/v1/reservations/{id}",
                &format!("/v1/reservations/{reservation}"),
            )
            .replace("/v1/nodes/{id}", &format!("/v1/nodes/{node}"))
            .replace("/v1/tokens/{id}", &format!("/v1/tokens/{bob_token_id}"));
        let what = format!("{} {}", route.method, route.path);
        if route.access == Access::Public {
            continue;
        }
        for (token, label) in [
            (None, "no token"),
            (Some("drover_at_bogus"), "a bogus token"),
            (Some(expired.as_str()), "an expired token"),
            (Some(revoked.as_str()), "a revoked token"),
        ] {
            let (status, body) = call(&server.url, route.method, &path, token).await;
            assert_eq!(status, 401, "{what} with {label}: {body}");
        }
        let owned = [
            "/v1/jobs/{id}",
            "/v1/runs/{id}",
            "/v1/groups/{id}",
            "/v1/reservations/{id}",
        ]
        .iter()
        .any(|p| route.path.starts_with(p));
        if route.access == Access::Admin || owned {
            for token in [&bob_api] {
                let (status, body) = call(&server.url, route.method, &path, Some(token)).await;
                assert_eq!(status, 403, "{what} as a user: {body}");
            }
        }
        checked += 1;
    }
    assert!(checked > 20);
    // Nothing changed.
    assert_eq!(
        admin.list_jobs(None, 1000).await.unwrap().len(),
        before_jobs.len()
    );
    assert_eq!(
        admin.job_events(&job.id.to_string()).await.unwrap().len(),
        before_events
    );
    assert_eq!(
        admin.get_job(&job.id.to_string()).await.unwrap().job.state,
        JobState::Succeeded
    );
    // A user sees only their own jobs.
    let bob_client = anonymous.clone().with_token(bob_api.clone());
    let own = bob_client.submit_job(&echo("echo bob")).await.unwrap();
    let listed = bob_client.list_jobs(None, 100).await.unwrap();
    assert_eq!(
        listed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![own.id],
        "bob sees only his job"
    );
    assert!(admin.list_jobs(None, 100).await.unwrap().len() > listed.len());
    // Refusals are audited.
    let audit = admin.audit(1000).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.outcome == "refused" && a.actor.as_deref() == Some("bob")),
        "{audit:?}"
    );
}

#[tokio::test]
async fn api_tokens_work_until_revoked_and_show_their_last_use() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let d = drover();
    let created = d
        .cli(
            &server.url,
            &[
                "token",
                "create",
                "--name",
                "ci",
                "--expires",
                "30d",
                "-o",
                "json",
            ],
        )
        .await;
    assert_eq!(created.code, 0, "{created:?}");
    let created: serde_json::Value = serde_json::from_str(&created.stdout).unwrap();
    let secret = created["token"].as_str().unwrap().to_string();
    let ci = Client::new(&server.url).unwrap().with_token(secret.clone());
    ci.submit_job(&echo("true")).await.unwrap();
    let listed = server.client().list_api_tokens().await.unwrap();
    let mine = listed.iter().find(|t| t.name == "ci").expect("listed");
    assert!(mine.last_used_at.is_some(), "{mine:?}");
    let out = d
        .cli(
            &server.url,
            &["token", "revoke", created["id"].as_str().unwrap()],
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(ci.list_jobs(None, 10).await.is_err(), "revoked");
}

#[tokio::test]
async fn the_cli_speaks_for_the_user_drover_login_stored() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let config = dir.path().join("cli-config");
    let run = |args: Vec<&str>, stdin: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_drover"));
        c.args(&args)
            .env("DROVER_SERVER", &server.url)
            .env("XDG_CONFIG_HOME", &config)
            .env_remove("DROVER_API_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    };
    let refused = run(vec!["job", "list"], None);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Authorization"));
    let login = run(
        vec!["login", "--username", "admin", "--password-stdin"],
        Some(&format!("{ADMIN_PASSWORD}\n")),
    );
    assert!(login.status.success(), "{login:?}");
    let listed = run(vec!["job", "list"], None);
    assert!(listed.status.success(), "{listed:?}");
    let logout = run(vec!["logout"], None);
    assert!(logout.status.success(), "{logout:?}");
    let after = run(vec!["job", "list"], None);
    assert_eq!(after.status.code(), Some(1), "{after:?}");
}

#[tokio::test]
async fn drover_up_signs_the_local_user_in() {
    let dir = TestDir::new();
    let up = drover_testkit::UpProc::start(&drover(), dir.path(), &[]).await;
    // The CLI with the config dir `drover up` wrote to, and no token of its own.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["job", "run", "--command", "echo up", "--wait"])
        .env("DROVER_SERVER", &up.url)
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env_remove("DROVER_API_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn a_revoked_node_loses_its_stream_and_its_runs_fail_over() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let admin = server.client();
    let mut a = server
        .worker(dir.path(), "a", None, &["--slots", "1"])
        .await;
    WorkerProc::wait_connected(&admin, 1).await;
    let job = admin
        .submit_job(&JobSpec {
            // The first attempt outlives the revocation; the retry ends at once.
            command: Some(r#"[ "$DROVER_ATTEMPT" = 1 ] && sleep 30; echo done"#.into()),
            max_attempts: Some(2),
            backoff_base_ms: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = job.id.to_string();
    let node_a = eventually("the job to start on a", || async {
        let v = admin.get_job(&id).await.ok()?;
        (v.job.state == JobState::Running).then(|| v.runs[0].run.worker_id)
    })
    .await;
    let out = drover()
        .cli(&server.url, &["node", "revoke", &node_a.to_string()])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    // Its credential stops working: the worker cannot come back.
    let _b = server.worker(dir.path(), "b", None, &[]).await;
    let view = admin.wait_job(&id, |_| {}).await.unwrap();
    assert_eq!(view.runs.len(), 2, "failed over: {view:?}");
    assert_eq!(view.runs[0].run.error.as_deref(), Some("node revoked"));
    assert_ne!(view.runs[1].run.worker_id, node_a);
    let status = a.proc.wait_exit().await;
    assert!(!status.success(), "the revoked worker stops: {status:?}");
    let audit = admin.audit(100).await.unwrap();
    assert!(audit.iter().any(|r| r.action == "node.revoke"));
}

/// Seed 000's config fetch and ack: a connected node gets a new version without restart and
/// acknowledges it; a version it cannot apply is reported failed with the reason and the
/// previous one stays in force; a node that connects later gets the newest at once.
#[tokio::test]
async fn seed000_node_configuration_is_applied_and_acknowledged() {
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let admin = server.client();
    let _a = server
        .worker(dir.path(), "a", None, &["--labels", "pool=gpu"])
        .await;
    WorkerProc::wait_connected(&admin, 1).await;
    let node = admin.list_nodes().await.unwrap()[0].worker.id.to_string();
    let node_view = |admin: Client, node: String| async move { admin.get_node(&node).await.ok() };

    // v1 for the nodes labelled pool=gpu: a label added, isolation narrowed.
    let set = drover()
        .cli(
            &server.url,
            &[
                "node",
                "config",
                "set",
                "--selector",
                "pool=gpu",
                "--labels",
                "zone=a",
                "--isolation",
                "process",
                "--heartbeat",
                "500ms",
                "-o",
                "json",
            ],
        )
        .await;
    assert_eq!(set.code, 0, "{set:?}");
    let v1 = serde_json::from_str::<serde_json::Value>(&set.stdout).unwrap()["version"]
        .as_u64()
        .unwrap();
    let applied = eventually("the node to apply v1", || async {
        let n = node_view(admin.clone(), node.clone()).await?;
        (n.worker.applied_config_version == Some(v1)).then_some(n)
    })
    .await;
    assert_eq!(applied.desired_config_version, Some(v1));
    assert_eq!(
        applied.worker.config_ack.as_ref().unwrap().status,
        "applied"
    );
    assert_eq!(
        applied
            .worker
            .capabilities
            .labels
            .get("zone")
            .map(String::as_str),
        Some("a")
    );
    // Scheduling follows the applied configuration at once.
    let job = admin
        .submit_job(&JobSpec {
            labels: [("zone".to_string(), "a".to_string())].into(),
            ..echo("echo configured")
        })
        .await
        .unwrap();
    let view = admin.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded);

    // v2 asks for an isolation mode the node does not have: failed, v1 stays.
    let bad = drover_core::NodeConfig {
        isolation_modes: Some(vec!["process".into(), "firecracker".into()]),
        ..Default::default()
    };
    let v2 = admin
        .put_node_config(Some(&node), &Default::default(), &bad)
        .await
        .unwrap()
        .version;
    let failed = eventually("the node to refuse v2", || async {
        let n = node_view(admin.clone(), node.clone()).await?;
        let ack = n.worker.config_ack.clone()?;
        (ack.config_version == v2).then_some(n)
    })
    .await;
    let ack = failed.worker.config_ack.clone().unwrap();
    assert_eq!(ack.status, "failed");
    assert!(
        ack.error.as_deref().unwrap_or("").contains("firecracker"),
        "{ack:?}"
    );
    assert_eq!(
        failed.worker.applied_config_version,
        Some(v1),
        "v1 stays in force"
    );
    assert_eq!(failed.desired_config_version, Some(v2));
    let events = admin.node_events(&node).await.unwrap();
    let acks = events
        .iter()
        .filter(|e| e.kind.type_name() == "WorkerConfigAcked")
        .count();
    assert_eq!(acks, 2, "{events:?}");

    // A node that connects later gets the newest configuration that concerns it.
    let _b = server
        .worker(dir.path(), "b", None, &["--labels", "pool=gpu"])
        .await;
    eventually("the new node to apply v1", || async {
        let nodes = admin.list_nodes().await.ok()?;
        let b = nodes.iter().find(|n| n.worker.name == "b")?;
        (b.worker.applied_config_version == Some(v1)).then_some(())
    })
    .await;
}

/// A certificate authority and a server certificate for 127.0.0.1, made for the test.
fn test_certificates(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test]
async fn tls_on_the_listener_and_a_worker_that_checks_the_certificate() {
    let dir = TestDir::new();
    let (ca, cert, key) = test_certificates(dir.path());
    let options = ServerOptions {
        extra: vec![
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ],
        ca_cert: Some(ca.clone()),
        ..Default::default()
    };
    let server = ServerProc::start(&drover(), dir.path(), options).await;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let admin = server.client();
    // The worker dials https:// and checks the server's certificate against the CA.
    let ca_arg = ca.display().to_string();
    let _worker = server
        .worker(dir.path(), "w", None, &["--ca-cert", &ca_arg])
        .await;
    WorkerProc::wait_connected(&admin, 1).await;
    let job = admin.submit_job(&echo("echo over tls")).await.unwrap();
    let view = admin.wait_job(&job.id.to_string(), |_| {}).await.unwrap();
    assert_eq!(view.job.state, JobState::Succeeded);
    // Plain HTTP gets no answer from a TLS port.
    let plain = server.url.replace("https://", "http://");
    assert!(
        reqwest::get(format!("{plain}/healthz")).await.is_err(),
        "plain HTTP must not be served"
    );
    // A client that does not trust the CA refuses the server.
    let untrusting = drover().cli(&server.url, &["job", "list"]).await;
    assert_eq!(untrusting.code, 1, "{untrusting:?}");
    let trusting = drover()
        .cli(&server.url, &["job", "list", "--ca-cert", &ca_arg])
        .await;
    assert_eq!(trusting.code, 0, "{trusting:?}");
}
