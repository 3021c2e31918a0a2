//! The `loadbalancer` binary as a child process, for tests that run it the way an
//! operator or a pod does: a config file on disk, flags and environment, the exit
//! status and stderr, and the addresses it reports in its `listening` log line.
//!
//! Every wait is bounded by [`PATIENCE`], and a process still running when its
//! [`Process`] is dropped is killed, so a failing test leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::PATIENCE;

/// A config file in a fresh temporary directory, removed on drop.
#[derive(Debug)]
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

    /// The path as a flag value.
    pub(crate) fn path_str(&self) -> &str {
        self.path.to_str().expect("UTF-8 temp path")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The binary, killed if a test fails before it exits.
#[derive(Debug)]
pub(crate) struct Process(pub(crate) Child);

impl Process {
    /// Starts the binary with `args` and a clean environment for its own settings.
    pub(crate) fn spawn(args: &[&str]) -> Self {
        Self::spawn_with(args, |_| {})
    }

    /// Like [`Process::spawn`], after `configure` has added environment.
    pub(crate) fn spawn_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_loadbalancer"));
        command
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("CONFIG_PATH")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        configure(&mut command);
        Self(command.spawn().expect("start the loadbalancer binary"))
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

/// Runs the binary to completion and returns its status and stderr.
pub(crate) fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let mut process = Process::spawn(args);
    let status = process.wait();
    (status, process.stderr())
}

/// Where a started load balancer listens, on loopback.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Listening {
    pub(crate) proxy: SocketAddr,
    pub(crate) admin: SocketAddr,
}

/// Waits (for up to [`PATIENCE`]) for the JSON `listening` log line among `lines`,
/// skipping the lines before it, and returns the ports it reports on 127.0.0.1 (the
/// process binds all interfaces; tests only use loopback).
pub(crate) async fn listening(lines: &mpsc::Receiver<String>) -> Listening {
    let deadline = Instant::now() + PATIENCE;
    let loopback = |event: &serde_json::Value, field: &str| {
        let addr: SocketAddr = event[field]
            .as_str()
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("the listening line has a `{field}` address: {event}"));
        SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
    };
    loop {
        match lines.try_recv() {
            Ok(line) => {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["message"] == "listening" {
                    return Listening {
                        proxy: loopback(&event, "proxy"),
                        admin: loopback(&event, "admin"),
                    };
                }
            }
            Err(mpsc::TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "no 'listening' log line");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(mpsc::TryRecvError::Disconnected) => {
                panic!("stdout closed before the 'listening' log line")
            }
        }
    }
}
