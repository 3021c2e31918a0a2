//! The built binaries as child processes: the load balancer (`CARGO_BIN_EXE_`) and
//! the demo backend (built on demand, see [`backend_binary`]), with temporary config
//! files and their JSON log lines read from stdout.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use http::StatusCode;

use super::{PATIENCE, get};

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

    /// Ports 0: the process picks free ports and reports them when listening.
    pub(crate) fn local() -> Self {
        Self::new(
            r#"{"port": 0, "adminPort": 0, "backendServiceName": "backend-service",
                "backendPort": 8080, "logFormat": "json"}"#,
        )
    }

    /// The path as a command-line argument.
    pub(crate) fn arg(&self) -> &str {
        self.path.to_str().expect("UTF-8 temp path")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process, killed if a test fails before it exits.
pub(crate) struct Process(pub(crate) Child);

impl Process {
    /// The load balancer binary with `args`.
    pub(crate) fn spawn(args: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_loadbalancer"));
        command.args(args).env_remove("CONFIG_PATH");
        Self::start(command)
    }

    /// `command` with stdout and stderr piped and no `RUST_LOG` from the test's
    /// environment, so the config file alone decides the log level.
    pub(crate) fn start(mut command: Command) -> Self {
        let child = command
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the binary");
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

    /// Streams stdout lines into a channel, from a thread, so the pipe never fills.
    pub(crate) fn stdout_lines(&mut self) -> mpsc::Receiver<String> {
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

/// Blocks (up to [`PATIENCE`]) until a line of `lines` parses as a JSON object for
/// which `wanted` holds, skipping the others, and returns it. Blocking: call it
/// from `spawn_blocking` in async tests.
pub(crate) fn json_line(
    lines: &mpsc::Receiver<String>,
    what: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|error| panic!("no log line {what} ({error})"));
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
            && wanted(&event)
        {
            return event;
        }
    }
}

/// Where a load balancer process listens, from its JSON `listening` log line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Listening {
    pub(crate) proxy: SocketAddr,
    pub(crate) admin: SocketAddr,
}

impl Listening {
    /// Waits for the `listening` line, then for `/readyz` to answer 200: discovery
    /// runs after the listeners are up, so a request sent on "listening" alone can
    /// find no backend yet, just as Kubernetes would not send it before readiness.
    pub(crate) async fn ready(lines: mpsc::Receiver<String>) -> (Self, mpsc::Receiver<String>) {
        let (event, lines) = tokio::task::spawn_blocking(move || {
            let event = json_line(&lines, "'listening'", |e| e["message"] == "listening");
            (event, lines)
        })
        .await
        .expect("log reader does not panic");
        let port = |field: &str| {
            let addr: SocketAddr = event[field]
                .as_str()
                .and_then(|addr| addr.parse().ok())
                .unwrap_or_else(|| panic!("{field} address in {event}"));
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        };
        let listening = Self {
            proxy: port("proxy"),
            admin: port("admin"),
        };
        let deadline = Instant::now() + PATIENCE;
        while get(&format!("http://{}/readyz", listening.admin))
            .await
            .status
            != StatusCode::OK
        {
            assert!(Instant::now() < deadline, "not ready within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (listening, lines)
    }
}

/// The demo backend's binary, built (or found up to date) with cargo in this
/// workspace's target directory.
///
/// Cargo only provides `CARGO_BIN_EXE_<name>` for the tested crate's own binaries.
/// `cargo test --workspace` has built the backend already, so this is a quick
/// no-op there; running only the load balancer's tests builds it once. Building
/// rather than just looking for the file makes sure a stale binary is never used.
pub(crate) fn backend_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "backend", "--bin", "backend"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p backend");
        assert!(status.success(), "cargo build -p backend failed: {status}");
        let path = Path::new(env!("CARGO_BIN_EXE_loadbalancer")).with_file_name("backend");
        assert!(path.exists(), "{} not found after building", path.display());
        path
    })
}
