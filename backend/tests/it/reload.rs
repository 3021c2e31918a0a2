//! Live log level, end to end: the binary runs with its config mounted like a
//! ConfigMap, the file is rewritten the way the kubelet does it (new directory,
//! `..data` symlink swap), and its access-log lines stop and start again as
//! `logLevel` goes from `info` to `warn` and back.

use http::{Method, StatusCode};

use crate::support::configmap::ConfigMapDir;
use crate::support::{BackendProcess, Conn, free_port};

/// Sends `GET /` tagged with `id` and checks it was answered; the access line for
/// it, if the level lets it through, is written before the answer goes out.
async fn request(backend: &BackendProcess, id: &str) {
    let reply = Conn::open(backend.addr)
        .await
        .send(Method::GET, "/", &[("x-request-id", id)])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

fn access_line(line: &serde_json::Value, id: &str) -> bool {
    line["message"] == "request" && line["request_id"] == id
}

#[tokio::test]
async fn a_configmap_swap_changes_the_log_level_and_an_invalid_file_changes_nothing() {
    let port = free_port();
    let mut mount = ConfigMapDir::new(&BackendProcess::config(port, "info", ""));
    let mut backend = BackendProcess::start_with(&mount.path(), port, None).await;
    request(&backend, "loud-1").await;
    backend
        .log_line("the access line at info", |l| access_line(l, "loud-1"))
        .await;

    // To `warn`, with a restart-only change: its warning is the sign the reload
    // applied, since `config reloaded` itself is an info line.
    let limited = r#", "maxConnections": 500"#;
    mount.update(&BackendProcess::config(port, "warn", limited));
    let warning = backend
        .log_line("the restart warning", |l| {
            l["message"] == "config changes that take effect only after a restart"
        })
        .await;
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["fields"], r#"["maxConnections"]"#, "{warning}");
    request(&backend, "quiet-1").await;

    // Invalid: one error line with the reason, and the level stays `warn`.
    mount.update(&BackendProcess::config(
        port,
        "debug",
        r#", "maxConnections": 0"#,
    ));
    let rejected = backend
        .log_line("the rejection (or an access line)", |l| {
            l["message"] == "config reload failed; keeping the current config"
                || l["message"] == "request"
        })
        .await;
    assert_eq!(rejected["level"], "ERROR", "{rejected}");
    let reason = rejected["error"].as_str().expect("an error field");
    assert!(reason.contains("maxConnections"), "{rejected}");
    request(&backend, "quiet-2").await;

    // Back to `info`: the reload's own line is the first line after the quiet
    // requests, so neither of them was logged; then access lines come back.
    mount.update(&BackendProcess::config(port, "info", limited));
    let first = backend
        .log_line("'config reloaded' or an access line", |l| {
            l["message"] == "config reloaded" || l["message"] == "request"
        })
        .await;
    assert_eq!(first["message"], "config reloaded", "{first}");
    assert_eq!(first["log_level"], "info", "{first}");
    request(&backend, "loud-2").await;
    backend
        .log_line("the access line at info again", |l| {
            access_line(l, "loud-2")
        })
        .await;
}
