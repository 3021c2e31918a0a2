//! Shared helpers for the integration tests: real servers on 127.0.0.1:0, a client
//! to talk to them, a fake Kubernetes API server, and a way to wait for "eventually"
//! conditions. The suite is one test program (`tests/it/main.rs`), so this module
//! is compiled once and every area's module uses it as `crate::support`.
//!
//! * [`upstream`]: a configurable test backend (slow, echoing, chunked, ...).
//! * [`chromium`]: a headless browser for the status page.
//! * [`configmap`]: a config file mounted like a ConfigMap, updated by symlink swap.
//! * [`dockerfile`]: the Dockerfile build-context checker, shared with the backend.
//! * [`fake_apiserver`]: a fake Kubernetes API server for discovery tests.
//! * [`process`]: the `loadbalancer` binary as a child process.
//! * [`raw`]: a raw TCP client, for requests no HTTP library would send.
//! * [`h2frames`]: HTTP/2 frames by hand (floods, resets, endless header
//!   blocks), and hyper's HTTP/2 client for the well-behaved side.
//! * [`load`]: a bounded load generator that tallies what came back (chaos tests).
//! * [`faults`]: backends that fail in other ways (one that never answers), and
//!   the real `backend` crate's server in-process, on a chosen address.
//! * [`scripted`]: a raw backend that answers with scripted bytes and records the
//!   bytes it received, per connection (the upstream wire tests).
//! * [`wait_for`]: poll a condition with a generous deadline instead of sleeping.

pub(crate) mod chromium;
pub(crate) mod configmap;
/// The Dockerfile build-context checker: the backend's tests' own module, compiled
/// in here too so both Dockerfiles are held to the same rules (one file).
#[path = "../../../../backend/tests/it/support/dockerfile.rs"]
pub(crate) mod dockerfile;
pub(crate) mod fake_apiserver;
pub(crate) mod faults;
pub(crate) mod h2frames;
pub(crate) mod load;
pub(crate) mod process;
pub(crate) mod raw;
pub(crate) mod scripted;
pub(crate) mod tls;
pub(crate) mod upstream;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use loadbalancer::app::{App, Options};
use loadbalancer::backends::{Backends, BackendsWriter};
use loadbalancer::balancer::{Balancer, RoundRobin};
use loadbalancer::config::{Config, DiscoveryConfig, DiscoveryMode, Limits, Listen, ProxyConfig};
use loadbalancer::discovery::{self, Source};
use loadbalancer::proxy::{Proxy, ProxySettings, Resilience};
use loadbalancer::server::ServerLimits;
use loadbalancer::shutdown::Shutdown;
use tokio::task::JoinHandle;

pub(crate) use upstream::Upstream;

/// Generous bound for anything a test waits on; the machine is shared and slow
/// at times, and no assertion depends on how fast things are.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `probe` until `done` accepts its value and returns that value; panics with
/// the last value seen after [`PATIENCE`].
pub(crate) async fn wait_for<T: Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    mut done: impl FnMut(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = probe();
        if done(&value) {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("gave up after {PATIENCE:?} waiting for {what}; last value: {value:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts one backend that answers `GET /` with `{"podName": pod_name}`.
///
/// The distribution tests reach backends only through this function, so moving
/// them to the real `backend` crate is a change to this one line.
pub(crate) async fn start_backend(pod_name: &str) -> Upstream {
    Upstream::start(pod_name).await
}

/// Starts `n` backends named `backend-1` .. `backend-n`.
pub(crate) async fn start_backends(n: usize) -> Vec<Upstream> {
    let mut backends = Vec::with_capacity(n);
    for i in 1..=n {
        backends.push(start_backend(&format!("backend-{i}")).await);
    }
    backends
}

/// The load balancer's [`App`], in-process on 127.0.0.1 with one proxy worker,
/// over a list the test writes (filled by static discovery, as `--backends`
/// would). Health checks are off, and so are retries and ejection unless a test
/// asks for them, so that a test sees the plain proxy it describes.
#[derive(Debug)]
pub(crate) struct TestLb {
    pub(crate) addr: SocketAddr,
    pub(crate) admin_addr: SocketAddr,
    /// The gRPC port, with `grpcPort`.
    pub(crate) grpc_addr: Option<SocketAddr>,
    pub(crate) backends: Backends,
    /// The list's writer, for tests that change the list under load.
    pub(crate) writer: Option<BackendsWriter>,
    pub(crate) shutdown: Shutdown,
    /// A handle on the proxy being served, for its counters.
    pub(crate) proxy: Proxy,
    app: App,
}

impl TestLb {
    /// Settings used unless a test needs others: timeouts far above anything a
    /// healthy loopback exchange takes.
    pub(crate) const SETTINGS: ProxySettings = ProxySettings {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(20),
        body_idle_timeout: Duration::from_secs(60),
        tunnel_idle_timeout: Duration::from_secs(3600),
    };

    /// A load balancer over `upstreams`.
    pub(crate) async fn start(upstreams: &[Upstream]) -> Self {
        let addrs = upstreams.iter().map(|u| u.addr).collect();
        Self::start_with(addrs, Self::SETTINGS).await
    }

    /// A load balancer over `upstreams` that chooses with `balancer`.
    pub(crate) async fn start_balanced(
        upstreams: &[Upstream],
        balancer: impl Balancer + 'static,
    ) -> Self {
        let addrs = upstreams.iter().map(|u| u.addr).collect();
        let writer = static_backends(addrs).await;
        Self::launch(
            writer.reader(),
            Some(writer),
            Arc::new(balancer),
            Self::SETTINGS,
            Resilience::default(),
            ServerLimits::DEFAULT,
        )
        .await
    }

    /// A load balancer over `addrs` with `settings`.
    pub(crate) async fn start_with(addrs: Vec<SocketAddr>, settings: ProxySettings) -> Self {
        Self::start_resilient(addrs, settings, Resilience::default()).await
    }

    /// A load balancer over `addrs` that retries and ejects as `resilience` says.
    pub(crate) async fn start_resilient(
        addrs: Vec<SocketAddr>,
        settings: ProxySettings,
        resilience: Resilience,
    ) -> Self {
        let writer = static_backends(addrs).await;
        Self::launch(
            writer.reader(),
            Some(writer),
            Arc::new(RoundRobin::new()),
            settings,
            resilience,
            ServerLimits::DEFAULT,
        )
        .await
    }

    /// A load balancer over `addrs` with the test config changed by
    /// `configure` (say, `backendProtocol` or `grpcPort`), balancing,
    /// retrying and ejecting as that config says.
    pub(crate) async fn start_configured(
        addrs: Vec<SocketAddr>,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        let writer = static_backends(addrs).await;
        let mut config = test_config(Self::SETTINGS, ServerLimits::DEFAULT);
        configure(&mut config);
        // As the binary would run it: with the config's algorithm, retries
        // and ejection.
        let resilience = Resilience::from(&config.resilience);
        let balancer = config.balancing.build();
        Self::launch_config(writer.reader(), Some(writer), balancer, resilience, config).await
    }

    /// A load balancer over `addrs` whose proxy listener has `limits`.
    pub(crate) async fn start_with_limits(addrs: Vec<SocketAddr>, limits: ServerLimits) -> Self {
        let writer = static_backends(addrs).await;
        Self::launch(
            writer.reader(),
            Some(writer),
            Arc::new(RoundRobin::new()),
            Self::SETTINGS,
            Resilience::default(),
            limits,
        )
        .await
    }

    /// A load balancer over a list that the test fills (or not) through its
    /// own writer.
    pub(crate) async fn start_unsynced(backends: Backends, settings: ProxySettings) -> Self {
        Self::start_unsynced_with(backends, settings, Resilience::default()).await
    }

    /// Like [`TestLb::start_unsynced`], with `resilience`.
    pub(crate) async fn start_unsynced_with(
        backends: Backends,
        settings: ProxySettings,
        resilience: Resilience,
    ) -> Self {
        Self::launch(
            backends,
            None,
            Arc::new(RoundRobin::new()),
            settings,
            resilience,
            ServerLimits::DEFAULT,
        )
        .await
    }

    async fn launch(
        backends: Backends,
        writer: Option<BackendsWriter>,
        balancer: Arc<dyn Balancer>,
        settings: ProxySettings,
        resilience: Resilience,
        limits: ServerLimits,
    ) -> Self {
        let config = test_config(settings, limits);
        Self::launch_config(backends, writer, balancer, resilience, config).await
    }

    async fn launch_config(
        backends: Backends,
        writer: Option<BackendsWriter>,
        balancer: Arc<dyn Balancer>,
        resilience: Resilience,
        config: Config,
    ) -> Self {
        let options = Options {
            workers: std::num::NonZeroUsize::MIN,
            backends: Some(backends.clone()),
            balancer: Some(balancer),
            resilience: Some(resilience),
            health_checks: false,
            ..Options::default()
        };
        let app = App::start(config, options)
            .await
            .expect("the load balancer starts");
        Self {
            addr: app.proxy_addr(),
            admin_addr: app.admin_addr(),
            grpc_addr: app.grpc_addr(),
            backends,
            writer,
            shutdown: app.shutdown().clone(),
            proxy: app.proxies()[0].clone(),
            app,
        }
    }

    /// `http://<grpc port>`, with `grpcPort` set.
    pub(crate) fn grpc_url(&self) -> String {
        let addr = self.grpc_addr.expect("this load balancer has a grpcPort");
        format!("http://{addr}")
    }

    /// `http://<proxy>/<path>`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://<admin>/<path>`.
    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// The list's writer (every constructor but the unsynced ones has one).
    pub(crate) fn writer(&self) -> &BackendsWriter {
        self.writer
            .as_ref()
            .expect("this load balancer's list is written by the test")
    }

    /// Begins shutdown and waits until both servers have finished.
    pub(crate) async fn stop(self) {
        tokio::time::timeout(PATIENCE, self.app.stop(Duration::ZERO))
            .await
            .expect("servers stop within PATIENCE");
    }

    /// Waits until both servers have finished, after `shutdown.stop()`.
    pub(crate) async fn stopped(self) {
        tokio::time::timeout(PATIENCE, self.app.stopped())
            .await
            .expect("servers stop within PATIENCE");
    }
}

/// The config a [`TestLb`] runs with: ports picked by the system, the given
/// upstream timeouts and client-side limits, and defaults for the rest.
fn test_config(settings: ProxySettings, limits: ServerLimits) -> Config {
    let millis = |d: Duration| u64::try_from(d.as_millis()).expect("test durations fit");
    Config {
        listen: Listen {
            port: 0,
            admin_port: 0,
            bind_address: std::net::Ipv4Addr::LOCALHOST.into(),
            grpc_port: None,
        },
        discovery: DiscoveryConfig {
            backend_service_name: "test".to_owned(),
            backend_port: 80,
            discovery: DiscoveryMode::Static,
            static_backends: Vec::new(),
            backend_protocol: None,
            backend_grpc_port: None,
        },
        proxy: ProxyConfig {
            connect_timeout_ms: millis(settings.connect_timeout),
            request_timeout_ms: millis(settings.request_timeout),
            body_idle_timeout_ms: millis(settings.body_idle_timeout),
            tunnel_idle_timeout_ms: millis(settings.tunnel_idle_timeout),
        },
        limits: Limits {
            drain_seconds: 0,
            shutdown_timeout_seconds: limits.shutdown_timeout.as_secs(),
            header_read_timeout_ms: millis(limits.header_read_timeout),
            idle_timeout_ms: millis(limits.idle_timeout),
            max_connections: limits.max_connections,
            max_header_bytes: limits.max_header_bytes,
            http2_max_concurrent_streams: limits.http2.max_concurrent_streams,
            http2_initial_stream_window_bytes: limits.http2.initial_stream_window,
            http2_initial_connection_window_bytes: limits.http2.initial_connection_window,
        },
        logging: Default::default(),
        health: Default::default(),
        resilience: Default::default(),
        balancing: Default::default(),
        tls: Default::default(),
        policy: Default::default(),
        concurrency: Default::default(),
        topology: Default::default(),
    }
}

/// A backend list filled by static discovery, as `--backends` would.
async fn static_backends(addrs: Vec<SocketAddr>) -> BackendsWriter {
    let backends = BackendsWriter::new();
    discovery::run(
        Source::Static(addrs),
        &backends,
        loadbalancer::discovery::Cluster::default(),
    )
    .await
    .expect("static discovery cannot fail");
    backends
}

/// Polls the admin `/readyz` until it answers `status`, as a kubelet would.
pub(crate) async fn wait_for_readyz(admin: SocketAddr, status: StatusCode) -> Reply {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let reply = get(&format!("http://{admin}/readyz")).await;
        if reply.status == status {
            return reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz still {} after PATIENCE",
            reply.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A complete response, body collected.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    /// `response` with its body read whole.
    pub(crate) async fn read(response: http::Response<hyper::body::Incoming>) -> Self {
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .expect("the body arrives whole")
            .to_bytes();
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("response body is JSON")
    }

    /// Checks that this is the proxy's own JSON error: `status`, with the
    /// status, `message` and the response's request id in the body.
    pub(crate) fn assert_proxy_error(&self, status: StatusCode, message: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.headers["content-type"], "application/json");
        let body = self.json();
        assert_eq!(body["status"], status.as_u16());
        assert_eq!(body["message"], message);
        assert_eq!(
            body["requestId"],
            self.headers["x-request-id"].to_str().expect("ASCII")
        );
    }

    /// The `podName` of a backend's answer.
    pub(crate) fn pod_name(&self) -> String {
        self.json()["podName"]
            .as_str()
            .expect("answer has a podName")
            .to_owned()
    }
}

/// A pooled keep-alive client, like the ones real clients use.
pub(crate) fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `req` and collects the whole response, within [`PATIENCE`].
pub(crate) async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply {
    let exchange = async {
        let response = client
            .request(req)
            .await
            .expect("the load balancer answers");
        Reply::read(response).await
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("exchange completes within PATIENCE")
}

/// `GET url` with a fresh client.
pub(crate) async fn get(url: &str) -> Reply {
    let req = Request::get(url)
        .body(Full::default())
        .expect("valid request");
    send(&client(), req).await
}

/// A `GET` running in the background, e.g. a slow request that shutdown must
/// let finish.
#[derive(Debug)]
pub(crate) struct InFlight(JoinHandle<Reply>);

impl InFlight {
    /// Starts `GET url` on its own task.
    pub(crate) fn start(url: String) -> Self {
        Self(tokio::spawn(async move { get(&url).await }))
    }

    /// Starts sending `request` on its own task.
    pub(crate) fn send(request: Request<Full<Bytes>>) -> Self {
        Self(tokio::spawn(async move { send(&client(), request).await }))
    }

    /// Waits for the response, within [`PATIENCE`].
    pub(crate) async fn finish(self) -> Reply {
        tokio::time::timeout(PATIENCE, self.0)
            .await
            .expect("in-flight request completes within PATIENCE")
            .expect("request task does not panic")
    }
}

/// How many times each string occurs.
pub(crate) fn tally(items: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    counts
}

/// The value of the sample `series` (metric name and labels exactly as exposed,
/// e.g. `loadbalancer_requests_in_flight` or `x_total{code="200"}`) in an
/// OpenMetrics text, if present.
pub(crate) fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The value of `series` on the `/metrics` of the admin listener at `admin`; 0
/// while the series has not appeared.
pub(crate) async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = get(&format!("http://{admin}/metrics")).await.body;
    metric_sample(&String::from_utf8_lossy(&text), series).unwrap_or(0.0)
}

/// Polls `series` on `admin` until `done` accepts its value, and returns it;
/// panics with the last value after [`PATIENCE`].
pub(crate) async fn wait_for_metric(
    admin: SocketAddr,
    series: &str,
    done: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = metric(admin, series).await;
        if done(value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} still {value} after PATIENCE"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
