//! The built binaries as child processes, for tests that run them the way an
//! operator or a pod does: a config file on disk, flags and environment, the exit
//! status and stderr, JSON log lines, and the addresses the load balancer reports
//! in its `listening` log line. The `loadbalancer` binary comes from Cargo
//! (`CARGO_BIN_EXE_`); the demo backend's is built on demand ([`backend_binary`]).
//!
//! Every wait is bounded by [`PATIENCE`], and a process still running when its
//! [`Process`] is dropped is killed, so a failing test leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use http::StatusCode;

use super::{PATIENCE, wait_for_readyz};

/// A config file in a fresh temporary directory, removed on drop.
#[derive(Debug)]
pub(crate) struct TempConfig {
    dir: PathBuf,
    pub(crate) path: PathBuf,
}

impl TempConfig {
    pub(crate) fn new(json: &str) -> Self {
        let dir = temp_dir();
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

/// A fresh, empty directory under the system's temporary one.
pub(crate) fn temp_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "loadbalancer-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A loopback port that was free a moment ago, for configs that need a fixed
/// one (the kernel does not hand the same port out again right away).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|probe| probe.local_addr())
        .expect("a free loopback port")
        .port()
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
        Self::start(
            Path::new(env!("CARGO_BIN_EXE_loadbalancer")),
            args,
            configure,
        )
    }

    /// The demo backend's binary with `config`, calling itself `pod_name` (what the
    /// Downward API's `POD_NAME` does in a pod).
    pub(crate) fn spawn_backend(config: &TempConfig, pod_name: &str) -> Self {
        Self::start(
            backend_binary(),
            &["--config", config.path_str()],
            |command| {
                command.env("POD_NAME", pod_name);
            },
        )
    }

    fn start(program: &Path, args: &[&str], configure: impl FnOnce(&mut Command)) -> Self {
        let mut command = Command::new(program);
        command
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("CONFIG_PATH")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        configure(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("start {}: {error}", program.display()));
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
    let event = json_line(lines, "'listening'", |e| e["message"] == "listening").await;
    let loopback = |field: &str| {
        let addr: SocketAddr = event[field]
            .as_str()
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("the listening line has a `{field}` address: {event}"));
        SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
    };
    Listening {
        proxy: loopback("proxy"),
        admin: loopback("admin"),
    }
}

/// [`listening`], then waits for `/readyz` to answer 200. Discovery runs after the
/// listeners are up, so a request sent on "listening" alone can find no backend
/// yet (a 503); Kubernetes, too, sends nothing before readiness.
pub(crate) async fn ready(lines: &mpsc::Receiver<String>) -> Listening {
    let listening = listening(lines).await;
    wait_for_readyz(listening.admin, StatusCode::OK).await;
    listening
}

/// Waits (for up to [`PATIENCE`]) for a line among `lines` that parses as a JSON
/// object for which `wanted` holds, skipping the others, and returns it.
pub(crate) async fn json_line(
    lines: &mpsc::Receiver<String>,
    what: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut event = serde_json::Value::Null;
    line(lines, what, |line| {
        serde_json::from_str::<serde_json::Value>(line).is_ok_and(|parsed| {
            let found = wanted(&parsed);
            if found {
                event = parsed;
            }
            found
        })
    })
    .await;
    event
}

/// Waits for the first line of stdout for which `wanted` is true, whatever
/// its format, skipping the lines before it.
pub(crate) async fn line(
    lines: &mpsc::Receiver<String>,
    what: &str,
    mut wanted: impl FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match lines.try_recv() {
            Ok(line) if wanted(&line) => return line,
            Ok(_) => {}
            Err(mpsc::TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "no log line {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(mpsc::TryRecvError::Disconnected) => {
                panic!("stdout closed before the log line {what}")
            }
        }
    }
}

/// The demo backend's binary, built (or found up to date) with cargo in this
/// workspace's target directory.
///
/// Cargo only provides `CARGO_BIN_EXE_<name>` for the tested crate's own binaries.
/// `cargo test --workspace` has built the backend already, so this is a quick
/// no-op there; running only the load balancer's tests builds it once. Building
/// rather than just looking for the file makes sure a stale binary is never used.
/// The build names every workspace target, as `cargo test --workspace` does, so
/// dependencies resolve to the same features and nothing is compiled twice (a
/// plain `-p backend` build would rebuild tokio and hyper without the test
/// features, taking most of a minute).
pub(crate) fn backend_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .args(["build", "--quiet", "--workspace", "--all-targets"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // Cargo sets these for the test process; build scripts (ring's) that watch
        // them would see a change and rebuild half the dependency tree.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|prefix| key.starts_with(prefix))
            {
                command.env_remove(key.as_ref());
            }
        }
        let status = command.status().expect("run cargo build");
        assert!(status.success(), "cargo build failed: {status}");
        let path = Path::new(env!("CARGO_BIN_EXE_loadbalancer")).with_file_name("backend");
        assert!(path.exists(), "{} not found after building", path.display());
        path
    })
}
