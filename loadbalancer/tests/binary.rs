//! The `loadbalancer` binary as an operator runs it: flags, exit codes, the
//! error line on stderr, and SIGTERM handling.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::{InFlight, PATIENCE, get, start_backend};

/// A config file in a fresh temporary directory, removed on drop.
struct TempConfig {
    dir: PathBuf,
    path: PathBuf,
}

impl TempConfig {
    fn new(json: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "loadbalancer-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let path = dir.join("config.json");
        std::fs::write(&path, json).expect("write temp config");
        Self { dir, path }
    }

    /// Ports 0: the process picks free ports and reports them when listening.
    fn local() -> Self {
        Self::new(
            r#"{"port": 0, "adminPort": 0, "backendServiceName": "backend-service",
                "backendPort": 8080, "logFormat": "json"}"#,
        )
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The binary, killed if a test fails before it exits.
struct Process(Child);

impl Process {
    fn spawn(args: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_loadbalancer"))
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("CONFIG_PATH")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the loadbalancer binary");
        Self(child)
    }

    /// Polls for exit for up to [`PATIENCE`].
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.0.try_wait().expect("query child status") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within PATIENCE"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        let stderr = self.0.stderr.take().expect("stderr is piped");
        for line in BufReader::new(stderr).lines() {
            text.push_str(&line.expect("stderr is UTF-8"));
            text.push('\n');
        }
        text
    }

    /// Streams stdout lines into a channel, from a thread, so the pipe never fills.
    fn stdout_lines(&mut self) -> mpsc::Receiver<String> {
        let stdout = self.0.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the binary to completion and returns its status and stderr.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let mut process = Process::spawn(args);
    let status = process.wait();
    (status, process.stderr())
}

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
    let (port, admin_port) = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines.recv_timeout(left).expect("a 'listening' log line");
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["message"] == "listening" {
                let proxy = event["proxy"].as_str().expect("proxy address field");
                let admin = event["admin"].as_str().expect("admin address field");
                let port = |addr: &str| {
                    let addr: std::net::SocketAddr = addr.parse().expect("socket address");
                    addr.port()
                };
                return (port(proxy), port(admin));
            }
        }
    })
    .await
    .expect("log reader does not panic");
    // Discovery publishes the backends just after the servers start listening;
    // until then the proxy answers 503, so wait for readiness as Kubernetes does.
    let readyz = format!("http://127.0.0.1:{admin_port}/readyz");
    let deadline = Instant::now() + PATIENCE;
    while get(&readyz).await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "not ready within PATIENCE");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let in_flight = InFlight::start(format!("http://127.0.0.1:{port}/slow?ms=1500"));
    upstream.wait_for_requests(1).await;

    let pid = process.0.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(kill.success());

    let reply = in_flight.finish().await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.pod_name(), "backend-1");
    let status = tokio::task::spawn_blocking(move || process.wait())
        .await
        .expect("waiter does not panic");
    assert!(status.success(), "exit status {status}");
}
