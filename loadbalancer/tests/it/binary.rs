//! The `loadbalancer` binary as an operator runs it: flags, exit codes, the
//! error line on stderr, and SIGTERM handling.

use std::process::ExitStatus;

use http::StatusCode;

use crate::support::process::{Process, TempConfig, ready, run_to_exit};
use crate::support::{InFlight, start_backend};

fn assert_one_line_failure(status: ExitStatus, stderr: &str, needles: &[&str]) {
    assert!(!status.success(), "exit status {status}");
    assert_eq!(stderr.lines().count(), 1, "stderr: {stderr:?}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing in {stderr:?}");
    }
}

#[test]
fn bad_backends_flag_exits_nonzero_with_one_clear_line() {
    let config = TempConfig::local();
    let path = config.path.to_str().expect("UTF-8 temp path");
    let (status, stderr) = run_to_exit(&[
        "--config",
        path,
        "--backends",
        "127.0.0.1:8081,not-an-address",
    ]);
    assert_one_line_failure(
        status,
        &stderr,
        &["--backends", "\"not-an-address\"", "IP:port"],
    );
}

#[test]
fn bad_config_file_exits_nonzero_with_one_clear_line() {
    let config = TempConfig::new(
        r#"{"port": 0, "backendServiceName": "b", "backendPort": 80, "colour": "blue"}"#,
    );
    let path = config.path.to_str().expect("UTF-8 temp path");
    let (status, stderr) = run_to_exit(&["--config", path]);
    assert_one_line_failure(status, &stderr, &[path, "colour"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_request_lets_it_finish_and_exits_0() {
    let upstream = start_backend("backend-1").await;
    let config = TempConfig::local();
    let backends = upstream.addr.to_string();
    let mut process = Process::spawn(&[
        "--config",
        config.path.to_str().expect("UTF-8 temp path"),
        "--backends",
        &backends,
    ]);
    let lines = process.stdout_lines();
    let proxy = ready(&lines).await.proxy;

    let in_flight = InFlight::start(format!("http://{proxy}/slow?ms=1500"));
    upstream.wait_for_requests(1).await;

    process.terminate();

    let reply = in_flight.finish().await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.pod_name(), "backend-1");
    let status = process.exited().await;
    assert!(status.success(), "exit status {status}");
}
