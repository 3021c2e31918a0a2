//! The built `backend` binary: start-up errors print one line and exit non-zero, and
//! SIGTERM during a slow request lets it finish before the process exits 0.

use http::{Method, StatusCode};

use crate::support::{BackendProcess, Conn, TempDir, run_binary};

/// Checks the failure shape a person sees in `kubectl logs`: a non-zero exit and
/// exactly one line on stderr that contains each of `expected`.
fn assert_one_line_failure((code, stderr): (Option<i32>, String), expected: &[&str]) {
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    for fragment in expected {
        assert!(stderr.contains(fragment), "{stderr:?} lacks {fragment:?}");
    }
}

#[test]
fn a_missing_config_file_is_one_line_and_exit_1() {
    let dir = TempDir::new("binary-missing");
    let path = dir.path().join("nope.json");
    let result = run_binary(|c| {
        c.arg("--config").arg(&path);
    });
    assert_one_line_failure(result, &[&format!("{} does not exist", path.display())]);
}

#[test]
fn an_invalid_config_file_is_one_line_and_exit_1() {
    let dir = TempDir::new("binary-invalid");
    let path = dir.write("config.json", "{\"port\": 8080,\n\"serviceName\": }");
    let result = run_binary(|c| {
        c.arg("--config").arg(&path);
    });
    assert_one_line_failure(
        result,
        &[
            &path.display().to_string(),
            "not valid JSON",
            "line 2, column 16",
        ],
    );
}

#[test]
fn config_path_comes_from_the_environment_too() {
    let dir = TempDir::new("binary-env");
    let path = dir.path().join("from-env.json");
    let result = run_binary(|c| {
        c.env("CONFIG_PATH", &path);
    });
    assert_one_line_failure(result, &["from-env.json does not exist"]);
}

#[tokio::test]
async fn sigterm_lets_a_slow_request_finish_and_exits_0() {
    let mut backend = BackendProcess::start().await;
    let mut slow = Conn::open(backend.addr).await;
    let slow_work = tokio::spawn(async move { slow.get("/work?sleep_ms=1000").await });
    // Only a request the server has started answering is drained; wait for its log line.
    backend
        .log_line("the slow request started", |line| {
            line["message"] == "request started" && line["path"] == "/work"
        })
        .await;

    backend.terminate();
    let reply = slow_work
        .await
        .expect("the slow request task does not panic");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["podName"], BackendProcess::POD_NAME);
    let status = backend.exited().await;
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test]
async fn each_request_is_logged_with_method_path_status_pod_and_id() {
    let mut backend = BackendProcess::start().await;
    let reply = Conn::open(backend.addr)
        .await
        .send(
            Method::GET,
            "/work?status=503",
            &[("x-request-id", "trace-me-7")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);

    let line = backend
        .log_line("the access log line", |line| line["message"] == "request")
        .await;
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/work");
    assert_eq!(line["status"], 503);
    assert_eq!(line["pod"], BackendProcess::POD_NAME);
    assert_eq!(line["request_id"], "trace-me-7");
    assert!(line["latency_ms"].as_f64().is_some(), "{line}");
}
