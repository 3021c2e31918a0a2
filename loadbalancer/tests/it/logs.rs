//! Structured logs, as `kubectl logs` shows them: both binaries run as processes
//! with `"logFormat": "json"`, and one request is followed from the load balancer's
//! access line to the backend's by its request id.

use http::StatusCode;
use serde_json::Value;

use crate::support::get;
use crate::support::process::{Process, TempConfig, free_port, json_line, ready};

/// The fields every access line carries at the top level (the event's fields are
/// flattened, so a log pipeline can filter on them directly).
const ACCESS_FIELDS: [&str; 7] = [
    "timestamp",
    "level",
    "message",
    "request_id",
    "method",
    "path",
    "status",
];

fn assert_access_line(line: &Value, request_id: &str, who: &str) {
    for field in ACCESS_FIELDS.iter().chain(&["latency_ms"]) {
        assert!(line.get(field).is_some(), "{who}: no {field:?} in {line}");
    }
    assert_eq!(line["request_id"], request_id, "{who}: {line}");
    assert_eq!(line["method"], "GET", "{who}: {line}");
    assert_eq!(line["path"], "/work", "{who}: {line}");
    assert_eq!(line["status"], 200, "{who}: {line}");
    assert_eq!(line["level"], "INFO", "{who}: {line}");
    assert!(line["latency_ms"].as_f64().is_some(), "{who}: {line}");
    let timestamp = line["timestamp"].as_str().expect("timestamp is a string");
    humantime::parse_rfc3339(timestamp).expect("timestamp is RFC 3339");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_id_joins_the_json_lines_of_both_programs() {
    // The backend's config needs a fixed port (0 is refused, as a Service needs a
    // known one): take a free one from the kernel.
    let port = free_port();
    let backend_config = TempConfig::new(&format!(
        r#"{{"port": {port}, "serviceName": "backend-service", "logFormat": "json"}}"#
    ));
    let mut backend = Process::spawn_backend(&backend_config, "backend-logs-0");
    let backend_lines = backend.stdout_lines();
    json_line(&backend_lines, "'listening' from the backend", |e| {
        e["message"] == "listening"
    })
    .await;

    let config = TempConfig::local();
    let backends = format!("127.0.0.1:{port}");
    let mut lb = Process::spawn(&["--config", config.path_str(), "--backends", &backends]);
    let lb_lines = lb.stdout_lines();
    let listening = ready(&lb_lines).await;

    let reply = get(&format!("http://{}/work?sleep_ms=1", listening.proxy)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let request_id = reply.headers["x-request-id"]
        .to_str()
        .expect("an ASCII request id")
        .to_owned();

    let wanted = |e: &Value| e["request_id"] == request_id.as_str() && e["message"] == "request";
    let lb_line = json_line(&lb_lines, "for the request from the load balancer", wanted).await;
    let backend_line = json_line(&backend_lines, "for the request from the backend", wanted).await;

    assert_access_line(&lb_line, &request_id, "load balancer");
    assert_eq!(lb_line["backend"], backends, "{lb_line}");
    assert_access_line(&backend_line, &request_id, "backend");
    assert_eq!(backend_line["pod"], "backend-logs-0", "{backend_line}");
}
