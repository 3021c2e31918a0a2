//! The `loadbalancer` binary as a child process: a temporary config file, the
//! process itself (killed on drop), its log lines, and the addresses it reports.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::PATIENCE;

/// A config file in a fresh temporary directory, removed on drop.
pub(crate) struct TempConfig {
    dir: PathBuf,
    pub(crate) path: PathBuf,
}

impl TempConfig {
    pub(crate) fn new(json: &str) -> Self {
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

    /// Ports 0: the process picks free ports and reports them when listening. A
    /// one-second drain keeps SIGTERM tests short.
    pub(crate) fn local() -> Self {
        Self::new(
            r#"{"port": 0, "adminPort": 0, "backendServiceName": "backend-service",
                "backendPort": 8080, "logFormat": "json", "drainSeconds": 1}"#,
        )
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The binary, killed if a test fails before it exits.
pub(crate) struct Process(pub(crate) Child);

impl Process {
    pub(crate) fn spawn(args: &[&str]) -> Self {
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
    pub(crate) fn wait(&mut self) -> ExitStatus {
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

    pub(crate) fn stderr(&mut self) -> String {
        let mut text = String::new();
        let stderr = self.0.stderr.take().expect("stderr is piped");
        for line in BufReader::new(stderr).lines() {
            text.push_str(&line.expect("stderr is UTF-8"));
            text.push('\n');
        }
        text
    }

    /// Streams stdout lines into a channel, from a thread that reads to the end
    /// even when nobody listens any more, so the pipe never fills up.
    pub(crate) fn stdout_lines(&mut self) -> mpsc::Receiver<String> {
        let stdout = self.0.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        rx
    }

    /// Waits for the JSON "listening" log line and returns the proxy and admin
    /// addresses it reports, on loopback.
    pub(crate) async fn listening(&mut self) -> (SocketAddr, SocketAddr) {
        let lines = self.stdout_lines();
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = lines.recv_timeout(left).expect("a 'listening' log line");
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["message"] == "listening" {
                    let port = |field: &str| {
                        let addr: SocketAddr = event[field]
                            .as_str()
                            .expect("address field")
                            .parse()
                            .expect("socket address");
                        SocketAddr::from(([127, 0, 0, 1], addr.port()))
                    };
                    return (port("proxy"), port("admin"));
                }
            }
        })
        .await
        .expect("log reader does not panic")
    }

    /// Sends SIGTERM, as Kubernetes does to a pod it stops.
    pub(crate) fn terminate(&self) {
        let kill = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(kill.success(), "kill -TERM failed");
    }

    /// Waits, off the async runtime, for the process to exit.
    pub(crate) async fn exited(mut self) -> ExitStatus {
        tokio::task::spawn_blocking(move || self.wait())
            .await
            .expect("waiter does not panic")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
