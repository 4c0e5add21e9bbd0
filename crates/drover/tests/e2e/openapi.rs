//! The OpenAPI document, checked by tools nobody here wrote: `openapi-spec-validator`
//! (PyPI) says it is a valid OpenAPI 3.1 document, and schemathesis (PyPI) fuzzes the live
//! API from it: no 5xx, every status, content type and response body as documented.
//! scripts/test installs both in a virtualenv under target/ and names it by
//! DROVER_TEST_PYTHON_VENV; under CI=true a missing one fails these tests.

use crate::drover;
use drover_testkit::{ServerOptions, ServerProc, TestDir};
use std::path::PathBuf;
use std::process::Command;

/// The virtualenv's `bin` directory with both tools, or `None` (skipped) off CI.
fn python_tools() -> Option<PathBuf> {
    let bin = std::env::var_os("DROVER_TEST_PYTHON_VENV")
        .map(|venv| PathBuf::from(venv).join("bin"))
        .filter(|bin| {
            bin.join("schemathesis").is_file() && bin.join("openapi-spec-validator").is_file()
        });
    if bin.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "DROVER_TEST_PYTHON_VENV is not set: scripts/test installs schemathesis and \
             openapi-spec-validator there"
        );
        eprintln!("skipped: DROVER_TEST_PYTHON_VENV is not set");
    }
    bin
}

fn run(command: &mut Command) -> (bool, String) {
    let out = command.output().expect("the tool starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn the_openapi_document_is_valid_and_the_api_fuzzes_clean_against_it() {
    let Some(bin) = python_tools() else { return };
    let dir = TestDir::new();
    let server = ServerProc::start(&drover(), dir.path(), ServerOptions::default()).await;
    let client = server.client();
    // Objects for the routes that take an id (no worker: nothing fuzzed ever runs).
    let job = client
        .submit_job(&drover_core::JobSpec {
            command: Some("true".into()),
            ..Default::default()
        })
        .await
        .expect("job");
    let group = client
        .create_group(
            "g",
            &[drover_core::JobSpec {
                command: Some("true".into()),
                ..Default::default()
            }],
        )
        .await
        .expect("group");

    let document = reqwest::get(format!("{}/v1/openapi.json", server.url))
        .await
        .expect("GET /v1/openapi.json");
    assert_eq!(document.status().as_u16(), 200);
    let document = document.text().await.expect("body");
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, &document).unwrap();
    let (valid, report) = run(Command::new(bin.join("openapi-spec-validator")).arg(&path));
    assert!(valid, "openapi-spec-validator: {report}");

    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[operations]]
include-path-regex = "^/v1/jobs/\\{{id\\}}"
parameters = {{ id = "{job}" }}

[[operations]]
include-path-regex = "^/v1/groups/\\{{id\\}}"
parameters = {{ id = "{group}" }}
"#,
            job = job.id,
            group = group.group.id
        ),
    )
    .unwrap();
    let (clean, report) = run(Command::new(bin.join("schemathesis"))
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("{}/v1/openapi.json", server.url)])
        .args(["-H", &format!("Authorization: Bearer {}", server.token)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_schema_conformance,response_headers_conformance",
        ])
        // Signing out would leave the rest of the run without a token.
        .args(["--exclude-path", "/v1/auth/logout"])
        .args(["--max-examples", "25", "--seed", "20261207"])
        .args(["--request-timeout", "10"]));
    assert!(clean, "schemathesis found failures:\n{report}");
    // And the server took it all without falling over.
    let health = reqwest::get(format!("{}/healthz", server.url))
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
}
