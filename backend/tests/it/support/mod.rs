//! Helpers shared by the backend's integration tests: a backend started in-process
//! on `127.0.0.1:0`, the built binary started as a child process, a small HTTP/1.1
//! client that opens real connections, and temporary directories. The suite is one
//! test program (`tests/it/main.rs`), so this module is compiled once and every
//! area's module uses it as `crate::support`.
//!
//! Every wait here is an "eventually" with a generous limit ([`PATIENCE`]): machines
//! running these tests are shared and slow at times, and a limit only turns a hang
//! into a failure, it never decides a result.

use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backend::handlers::App;
use backend::identity::Identity;
use backend::server::{DEFAULT_LIMITS, ServerLimits};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any "eventually" condition may take before the test fails.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// The identity test servers answer with; the IP is deliberately not a real address
/// of the machine, so a test can tell it apart from a fallback.
pub(crate) fn test_identity() -> Identity {
    Identity {
        pod_name: "backend-test-0".to_owned(),
        pod_ip: "10.9.8.7".to_owned(),
        service_name: "backend-test".to_owned(),
    }
}

/// A backend running in this process, served by the real `server::serve` (or
/// `grpc::serve`).
#[derive(Debug)]
pub(crate) struct TestServer {
    /// Where the server listens (`127.0.0.1` and a port the kernel chose).
    pub(crate) addr: SocketAddr,
    /// A clone of the served app, so tests can watch its readiness.
    pub(crate) app: App,
    /// Sending on (or dropping) this starts the server's shutdown.
    stop: Option<oneshot::Sender<()>>,
    /// The task running `serve`; it finishes when `serve` returns.
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    /// Starts `app` on a fresh `127.0.0.1:0` listener.
    pub(crate) async fn start(app: App) -> Self {
        Self::start_with(app, DEFAULT_LIMITS).await
    }

    /// Starts `app` under `limits` (`server::serve_with`) on a fresh
    /// `127.0.0.1:0` listener.
    pub(crate) async fn start_with(app: App, limits: ServerLimits) -> Self {
        Self::spawn(app, |listener, app, shutdown| {
            backend::server::serve_with(listener, app, shutdown, limits)
        })
        .await
    }

    /// Starts `app`'s gRPC services (`grpc::serve`) on a fresh `127.0.0.1:0`
    /// listener; [`TestServer::url`] is what a client connects to.
    pub(crate) async fn start_grpc(app: App) -> Self {
        Self::spawn(app, backend::grpc::serve).await
    }

    /// [`TestServer::start_grpc`] whose calls get `shutdown_timeout` to finish
    /// once the drain has begun (`grpc::serve_with`).
    pub(crate) async fn start_grpc_with(app: App, shutdown_timeout: Duration) -> Self {
        Self::spawn(app, |listener, app, shutdown| {
            backend::grpc::serve_with(listener, app, shutdown, shutdown_timeout)
        })
        .await
    }

    /// Runs `serve` with `app` on a fresh `127.0.0.1:0` listener and a shutdown
    /// future that [`TestServer::begin_shutdown`] completes.
    async fn spawn<F>(app: App, serve: impl FnOnce(TcpListener, App, Stop) -> F) -> Self
    where
        F: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("binding 127.0.0.1:0 always works");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = Box::pin(async {
            // A dropped sender also means "stop", so a failing test never leaks a server.
            let _ = stopped.await;
        });
        let task = tokio::spawn(serve(listener, app.clone(), shutdown));
        Self {
            addr,
            app,
            stop: Some(stop),
            task,
        }
    }

    /// Starts the default test app.
    pub(crate) async fn start_default() -> Self {
        Self::start(App::new(test_identity())).await
    }

    /// The server's address as a gRPC client's URL (h2c: `http://`).
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Completes the shutdown future given to `serve`.
    pub(crate) fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits (with [`PATIENCE`]) for `serve` to return, and returns its result.
    pub(crate) async fn stopped(self) -> std::io::Result<()> {
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("serve returns after shutdown")
            .expect("the serve task does not panic")
    }
}

/// The shutdown future a [`TestServer`] hands its server: one type whichever
/// server it runs.
type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A response, read whole.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    /// The body parsed as JSON; panics with the body if it is not JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// A header's value as text, if present.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One client HTTP/1.1 connection; several requests may be sent on it in turn.
#[derive(Debug)]
pub(crate) struct Conn {
    sender: SendRequest<Empty<Bytes>>,
}

impl Conn {
    /// Opens a TCP connection to `addr` and starts HTTP/1.1 on it.
    pub(crate) async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(PATIENCE, TcpStream::connect(addr))
            .await
            .expect("connecting does not hang")
            .expect("the server accepts connections");
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("an HTTP/1 handshake needs no I/O");
        // The connection object does the actual reading and writing; it runs until
        // the server or the client closes the connection.
        tokio::spawn(connection);
        Self { sender }
    }

    /// Sends a request with the given extra headers and reads the whole response.
    pub(crate) async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "backend.test");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Empty::new())
            .expect("test requests are well formed");
        let exchange = async {
            let response = self
                .sender
                .send_request(request)
                .await
                .expect("the server answers");
            let (parts, body) = response.into_parts();
            let body = body.collect().await.expect("the body arrives").to_bytes();
            Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        };
        tokio::time::timeout(PATIENCE, exchange)
            .await
            .unwrap_or_else(|_| panic!("no answer to {path} within {PATIENCE:?}"))
    }

    /// `GET path` on this connection.
    pub(crate) async fn get(&mut self, path: &str) -> Reply {
        self.send(Method::GET, path, &[]).await
    }
}

/// `GET path` on a new connection.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> Reply {
    Conn::open(addr).await.get(path).await
}

/// Waits until `condition` holds, checking every 20 ms for up to [`PATIENCE`].
pub(crate) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "not true within {PATIENCE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A directory under the system temp dir, removed when dropped.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a new, empty directory whose name contains `label`.
    pub(crate) fn new(label: &str) -> Self {
        Self {
            path: fresh_dir(label),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory and returns the file's path.
    pub(crate) fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents).expect("the temp dir is writable");
        path
    }
}

/// Creates a new, empty directory whose name contains `label`; the caller removes it.
fn fresh_dir(label: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "backend-test-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).expect("the temp dir is writable");
    path
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The built `backend` binary running as a child process; killed if still running
/// when dropped, so a failing test leaves nothing behind.
#[derive(Debug)]
pub(crate) struct BackendProcess {
    child: Child,
    /// Where it listens (it binds all interfaces; tests only use loopback).
    pub(crate) addr: SocketAddr,
    /// Its stdout log lines, parsed from JSON, as a reader thread receives them.
    logs: mpsc::Receiver<serde_json::Value>,
    /// Holds the config file for as long as the process runs, when the process
    /// owns it (the caller holds it otherwise).
    _dir: Option<TempDir>,
}

impl BackendProcess {
    /// The pod name the process is given through `POD_NAME`.
    pub(crate) const POD_NAME: &str = "backend-process-0";

    /// Starts the binary with a config for a free port, JSON logs at debug level, and
    /// waits until it accepts connections.
    pub(crate) async fn start() -> Self {
        let port = free_port();
        let dir = TempDir::new("process");
        let config = dir.write("config.json", &Self::config(port, "debug", ""));
        Self::start_with(&config, port, Some(dir)).await
    }

    /// A config for `port` with JSON logs at `level`, plus the `extra` keys
    /// (each starting with a comma).
    pub(crate) fn config(port: u16, level: &str, extra: &str) -> String {
        format!(
            r#"{{"port": {port}, "serviceName": "backend-process",
                "logLevel": "{level}", "logFormat": "json" {extra}}}"#
        )
    }

    /// Starts the binary with the config file at `config`, which names `port`, and
    /// waits until it accepts connections.
    pub(crate) async fn start_with(config: &Path, port: u16, dir: Option<TempDir>) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_backend"))
            .arg("--config")
            .arg(config)
            .env("POD_NAME", Self::POD_NAME)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("the backend binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (lines, logs) = mpsc::channel();
        // A plain thread: reading a pipe blocks, and it ends by itself at EOF.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let parsed = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
                if lines.send(parsed).is_err() {
                    break;
                }
            }
        });
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut process = Self {
            child,
            addr,
            logs,
            _dir: dir,
        };
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(addr).await.is_err() {
            assert!(
                process.child.try_wait().expect("waitpid works").is_none(),
                "the backend exited before listening"
            );
            assert!(Instant::now() < deadline, "backend not listening on {addr}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        process
    }

    /// Waits (with [`PATIENCE`]) for a log line for which `wanted` holds, skipping
    /// the lines before it, and returns it.
    pub(crate) async fn log_line(
        &mut self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.logs.try_recv() {
                Ok(line) if wanted(&line) => return line,
                Ok(_) => {}
                Err(mpsc::TryRecvError::Empty) => {
                    assert!(Instant::now() < deadline, "no log line: {what}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(mpsc::TryRecvError::Disconnected) => panic!("stdout closed before: {what}"),
            }
        }
    }

    /// Sends SIGTERM, as Kubernetes does to a pod it stops.
    pub(crate) fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits (with [`PATIENCE`]) for the process to exit and returns its status.
    pub(crate) async fn exited(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid works") {
                return status;
            }
            assert!(Instant::now() < deadline, "backend did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on right now: bind port 0, read the port, let it go.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0 always works")
        .port()
}

/// Runs the built binary to completion, after `configure` has added arguments or
/// environment, and returns its exit code and stderr.
pub(crate) fn run_binary(configure: impl FnOnce(&mut Command)) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_backend"));
    command.env_remove("CONFIG_PATH").stdin(Stdio::null());
    configure(&mut command);
    let output = command.output().expect("the backend binary runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A config file mounted like a ConfigMap volume (`..data` symlink swaps), for the
/// reload test: the load balancer tests' own module, compiled in here too so both
/// crates meet the same kubelet behaviour.
#[path = "../../../../loadbalancer/tests/it/support/configmap.rs"]
pub(crate) mod configmap;
pub(crate) mod dockerfile;

/// What [`configmap`] uses from its home crate's `process` module.
mod process {
    /// A new directory the [`super::configmap::ConfigMapDir`] owns and removes.
    pub(crate) fn temp_dir() -> std::path::PathBuf {
        super::fresh_dir("configmap")
    }
}
