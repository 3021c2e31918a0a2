//! The built `backend` binary: start-up errors print one line and exit non-zero,
//! SIGTERM during a slow request lets it finish before the process exits 0, and
//! `grpcPort` starts a gRPC listener beside the HTTP one, on the same metrics
//! and the same shutdown.

use backend::grpc::proto::GetRequest;
use backend::grpc::proto::identity_client::IdentityClient;
use http::{Method, StatusCode};
use tokio::net::TcpStream;

use crate::support::{BackendProcess, Conn, PATIENCE, TempDir, free_port, get, run_binary};

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

#[tokio::test]
async fn grpc_port_serves_grpc_beside_http_until_sigterm() {
    let port = free_port();
    // Two free ports in a row may be the same one, which the config refuses.
    let grpc_port = std::iter::repeat_with(free_port)
        .find(|&p| p != port)
        .expect("the kernel has more than one free port");
    let dir = TempDir::new("binary-grpc");
    let extra = format!(r#", "grpcPort": {grpc_port}"#);
    let config = dir.write("config.json", &BackendProcess::config(port, "info", &extra));
    let mut backend = BackendProcess::start_with(&config, port, Some(dir)).await;

    let connecting = IdentityClient::connect(format!("http://127.0.0.1:{grpc_port}"));
    let mut client = tokio::time::timeout(PATIENCE, connecting)
        .await
        .expect("connecting does not hang")
        .expect("the gRPC port is open once the HTTP port is");
    let mut request = tonic::Request::new(GetRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "grpc-7".parse().expect("valid metadata"));
    let reply = client.get(request).await.expect("Get answers").into_inner();
    assert_eq!(reply.pod_name, BackendProcess::POD_NAME);
    assert_eq!(reply.service_name, "backend-process");

    let line = backend
        .log_line("the gRPC call's log line", |line| {
            line["message"] == "gRPC call"
        })
        .await;
    assert_eq!(line["method"], "Get");
    assert_eq!(line["code"], "OK");
    assert_eq!(line["request_id"], "grpc-7");
    let metrics = get(backend.addr, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    let counted = r#"backend_grpc_requests_total{method="Get",code="OK"} 1"#;
    assert!(
        text.lines().any(|l| l == counted),
        "{counted} missing in\n{text}"
    );

    backend.terminate();
    let status = backend.exited().await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        TcpStream::connect(("127.0.0.1", grpc_port)).await.is_err(),
        "the gRPC port is closed once the process has exited"
    );
}
