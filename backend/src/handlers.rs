//! Routing: turns one HTTP request into one response. This is the backend's whole
//! application; `server` feeds it requests and writes its answers back.
//!
//! | route                                | answer                                        |
//! |--------------------------------------|-----------------------------------------------|
//! | `GET /`                              | 200, identity JSON with a timestamp           |
//! | `GET /healthz`                       | 200 while the process is alive                |
//! | `GET /readyz`                        | 200, or 503 once shutdown has begun           |
//! | `GET /work?cpu_ms=&sleep_ms=&status=` | burns CPU, sleeps, then answers `status` with the identity JSON |
//! | `GET /metrics`                       | 200, request counts and durations (OpenMetrics text) |
//! | `GET /work?bytes=N`                  | the same, but the body is `N` bytes of filler (`application/octet-stream`) |
//! | `GET /ws` (WebSocket handshake)      | 101, then a WebSocket session: the identity JSON, then every message echoed ([`websocket`]) |
//!
//! `bytes` exists for benchmarks of streaming throughput through a proxy: the filler is
//! one buffer allocated on first use and shared by every response, so the backend
//! spends no time building large bodies.
//!
//! Unknown paths get a 404 and other methods a 405, both as JSON, so that a client
//! behind the load balancer can always parse what comes back. `HEAD` is accepted
//! wherever `GET` is (hyper leaves the body out). Nothing here panics on anything a
//! client sends: bad input becomes a 400 with a reason. `/ws` without a valid
//! handshake gets a 426 (or a 400 for a bad key), and a handshake once shutdown
//! has begun gets a 503.

pub mod websocket;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::identity::Identity;
use crate::metrics::Metrics;

/// The body type of every response: small JSON documents, built whole.
pub type Body = Full<Bytes>;

/// Upper bound for `/work?cpu_ms=`: enough to load a core, short enough that a typo
/// cannot pin one for an hour.
pub const MAX_CPU_MS: u64 = 10_000;
/// Upper bound for `/work?sleep_ms=`: longer than any sane proxy timeout, so timeouts
/// can be provoked, but bounded.
pub const MAX_SLEEP_MS: u64 = 60_000;
/// Upper bound for `/work?bytes=`: several times the 1 MiB bodies the benchmark uses,
/// and the size of the filler buffer a backend keeps once a request asked for bytes.
pub const MAX_BYTES: u64 = 8 * 1024 * 1024;

/// The application state shared by every connection. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct App {
    /// Reported in identity answers; fixed for the life of the process.
    identity: Arc<Identity>,
    /// Cleared once shutdown begins, so `/readyz` tells Kubernetes (and the load
    /// balancer) to stop sending new work before the port closes.
    ready: Arc<AtomicBool>,
    /// Requests being answered right now, so shutdown can report what it waits for
    /// (and tests can tell that a request has really reached the server).
    in_flight: Arc<AtomicUsize>,
    /// How long `server::serve` keeps accepting after shutdown begins; see
    /// [`App::with_shutdown_delay`].
    shutdown_delay: Duration,
    /// How long every `/` and `/work` answer waits before it starts; see
    /// [`App::with_response_delay`].
    response_delay: Duration,
    /// Every answered request is counted here (by `server`) and served on `/metrics`.
    metrics: Arc<Metrics>,
    /// The open `/ws` sessions, which shutdown closes.
    websockets: Arc<websocket::Sessions>,
    /// How often `/ws` sessions are pinged; see [`App::with_ping_interval`].
    ping_interval: Duration,
}

impl App {
    /// A ready application answering as `identity`, with no shutdown delay.
    pub fn new(identity: Identity) -> Self {
        Self {
            identity: Arc::new(identity),
            ready: Arc::new(AtomicBool::new(true)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            shutdown_delay: Duration::ZERO,
            response_delay: Duration::ZERO,
            metrics: Arc::new(Metrics::new()),
            websockets: Arc::new(websocket::Sessions::new()),
            ping_interval: websocket::PING_INTERVAL,
        }
    }

    /// Keeps the server accepting (and `/readyz` answering 503) for `delay` after the
    /// shutdown signal, before the listener closes. In Kubernetes this covers the time
    /// endpoint watchers need to drop the pod; without it, a request routed here in
    /// that window finds a closed port.
    pub fn with_shutdown_delay(mut self, delay: Duration) -> Self {
        self.shutdown_delay = delay;
        self
    }

    /// Makes every `/` and `/work` answer wait `delay` first: a slow pod, for
    /// watching a load-aware balancer send it less traffic. Probes stay fast, so
    /// the pod still looks healthy, as a slow-but-alive pod does.
    pub fn with_response_delay(mut self, delay: Duration) -> Self {
        self.response_delay = delay;
        self
    }

    /// Pings every `/ws` session this often instead of every
    /// [`websocket::PING_INTERVAL`]; a session that answers nothing for an interval
    /// after a ping is dropped (see [`websocket`]). At least 1 ms.
    pub fn with_ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The identity this application answers with.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether `/readyz` currently answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Marks the application as shutting down: `/readyz` answers 503 from now on.
    /// `server::serve` calls this when its shutdown future completes; tests can call
    /// it directly to simulate a backend leaving rotation.
    pub fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::Release);
    }

    /// How many requests are being answered at this moment.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The metrics this application serves on `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The delay set by [`App::with_shutdown_delay`].
    pub fn shutdown_delay(&self) -> Duration {
        self.shutdown_delay
    }

    /// WebSocket sessions open at this moment (or answered with a 101 and about to
    /// open).
    pub fn websocket_sessions(&self) -> usize {
        self.websockets.open()
    }

    /// Closes every WebSocket session with a Close frame (1001, going away), and
    /// any that opens from now on, then waits until all have ended, for at most
    /// `timeout`. `server::serve` calls this when its listener closes: upgraded
    /// sockets have left the listener, so its shutdown does not reach them.
    pub async fn close_websockets(&self, timeout: Duration) {
        self.websockets.close_all(timeout).await;
    }

    /// Answers one request. The request body is never read: no route takes one.
    /// A `/ws` handshake is answered with a 101 and its session runs on a task of
    /// its own, once hyper hands the connection over (see [`websocket`]).
    pub async fn handle<B>(&self, mut request: Request<B>) -> Response<Body> {
        let _in_flight = InFlight::enter(&self.in_flight);
        let route = Route::of(request.uri().path());
        let Some(route) = route else {
            return error(StatusCode::NOT_FOUND, "no such path");
        };
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        if matches!(route, Route::Identity | Route::Work) && !self.response_delay.is_zero() {
            tokio::time::sleep(self.response_delay).await;
        }
        match route {
            Route::Identity => self.identity_response(StatusCode::OK),
            Route::Healthz => json(StatusCode::OK, &Status { status: "ok" }),
            Route::Readyz if self.is_ready() => json(StatusCode::OK, &Status { status: "ready" }),
            Route::Readyz => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &Status {
                    status: "shutting down",
                },
            ),
            Route::Work => match Work::from_query(request.uri().query()) {
                Ok(work) => self.work(work).await,
                Err(reason) => error(StatusCode::BAD_REQUEST, &reason),
            },
            Route::Metrics => service_kit::metrics::response(self.metrics.encode()),
            Route::WebSocket => self.websocket(&mut request),
        }
    }

    fn websocket<B>(&self, request: &mut Request<B>) -> Response<Body> {
        let switching = websocket::accept(request);
        if switching.status() != StatusCode::SWITCHING_PROTOCOLS {
            return switching;
        }
        // A long-lived session should not start on a pod that is leaving. (While
        // draining, the listener also marks every answer `Connection: close`,
        // which would turn a 101 into a failed handshake.)
        if !self.is_ready() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting down: no new WebSocket sessions",
            );
        }
        // The header the load balancer sets (`server::REQUEST_ID`, which this
        // layer does not import).
        const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
        let request_id = request
            .headers()
            .get(REQUEST_ID)
            .and_then(|id| id.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let session = websocket::Session {
            greeting: json_text(&self.identity_answer()),
            ping_interval: self.ping_interval,
            metrics: Arc::clone(&self.metrics),
            request_id,
        };
        websocket::spawn(request, &self.websockets, session);
        switching
    }

    async fn work(&self, work: Work) -> Response<Body> {
        if !work.cpu.is_zero() {
            // Burning CPU on an async worker thread would stall every other connection
            // that thread serves; spawn_blocking moves it to a thread meant for that.
            let burned = tokio::task::spawn_blocking(move || burn_cpu(work.cpu)).await;
            if burned.is_err() {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "cpu work failed");
            }
        }
        tokio::time::sleep(work.sleep).await;
        match work.bytes {
            Some(len) => filler_response(work.status, len),
            None => self.identity_response(work.status),
        }
    }

    fn identity_response(&self, status: StatusCode) -> Response<Body> {
        json(status, &self.identity_answer())
    }

    /// The identity with the time of asking: the body of `/` and `/work`, and the
    /// first message of a `/ws` session.
    fn identity_answer(&self) -> IdentityAnswer<'_> {
        let timestamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        IdentityAnswer {
            identity: &self.identity,
            timestamp,
        }
    }
}

/// Counts one request as in flight from creation until drop, so the count stays right
/// even when a client disconnects and hyper drops the request's future half-way.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The paths the backend serves.
#[derive(Debug, Clone, Copy)]
enum Route {
    Identity,
    Healthz,
    Readyz,
    Work,
    Metrics,
    WebSocket,
}

impl Route {
    const ALL: [(&'static str, Route); 6] = [
        ("/", Self::Identity),
        ("/healthz", Self::Healthz),
        ("/readyz", Self::Readyz),
        ("/work", Self::Work),
        ("/metrics", Self::Metrics),
        ("/ws", Self::WebSocket),
    ];

    fn of(path: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(known, _)| *known == path)
            .map(|(_, route)| *route)
    }
}

/// The route `path` belongs to, as a metric label: the path itself for the routes
/// above, `other` for anything else, so label values stay a small fixed set.
pub fn route_label(path: &str) -> &'static str {
    Route::ALL
        .iter()
        .find(|(known, _)| *known == path)
        .map_or("other", |(known, _)| known)
}

/// What one `/work` request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Work {
    cpu: Duration,
    sleep: Duration,
    status: StatusCode,
    /// Answer with this many filler bytes instead of the identity JSON.
    bytes: Option<usize>,
}

impl Work {
    /// Parses `cpu_ms`, `sleep_ms` and `status`; all optional, anything else rejected
    /// so that a misspelt parameter does not silently do nothing.
    fn from_query(query: Option<&str>) -> Result<Self, String> {
        let mut work = Self {
            cpu: Duration::ZERO,
            sleep: Duration::ZERO,
            status: StatusCode::OK,
            bytes: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "cpu_ms" => work.cpu = Duration::from_millis(bounded(key, value, 0, MAX_CPU_MS)?),
                "sleep_ms" => {
                    work.sleep = Duration::from_millis(bounded(key, value, 0, MAX_SLEEP_MS)?);
                }
                "status" => {
                    let code = bounded(key, value, 200, 599)?;
                    work.status = u16::try_from(code)
                        .ok()
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .ok_or_else(|| format!("status: {code} is not a status code"))?;
                }
                "bytes" => {
                    let len = bounded(key, value, 0, MAX_BYTES)?;
                    // MAX_BYTES fits in usize on every target Rust supports.
                    work.bytes = Some(usize::try_from(len).unwrap_or(usize::MAX));
                }
                _ => {
                    return Err(format!(
                        "unknown parameter `{key}` (expected cpu_ms, sleep_ms, status, bytes)"
                    ));
                }
            }
        }
        Ok(work)
    }
}

/// Parses a whole number and checks it lies in `min..=max`.
fn bounded(key: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = value
        .parse()
        .map_err(|_| format!("{key}: `{value}` is not a whole number"))?;
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{key}: {n} is outside {min}..={max}"))
    }
}

/// Keeps one core busy for `duration` of wall-clock time.
fn burn_cpu(duration: Duration) {
    let start = Instant::now();
    let mut x: u64 = 1;
    while start.elapsed() < duration {
        for _ in 0..10_000 {
            // black_box stops the optimizer from deleting a loop whose result is unused.
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

/// A `status` response whose body is `len` bytes of `.`: a slice of one shared
/// buffer, so neither allocation nor copying grows with the number of requests.
fn filler_response(status: StatusCode, len: usize) -> Response<Body> {
    static FILLER: OnceLock<Bytes> = OnceLock::new();
    let filler = FILLER.get_or_init(|| Bytes::from(vec![b'.'; MAX_BYTES as usize]));
    let mut response = Response::new(Full::new(filler.slice(..len.min(filler.len()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

#[derive(Serialize)]
struct IdentityAnswer<'a> {
    #[serde(flatten)]
    identity: &'a Identity,
    timestamp: String,
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
}

#[derive(Serialize)]
struct ErrorAnswer<'a> {
    error: &'a str,
}

fn error(status: StatusCode, reason: &str) -> Response<Body> {
    json(status, &ErrorAnswer { error: reason })
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(json_text(body))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn json_text(body: &impl Serialize) -> String {
    // Our answer types have string keys and no maps, so serializing cannot fail; the
    // fallback keeps the request path panic-free all the same.
    serde_json::to_string(body).unwrap_or_else(|_| r#"{"error":"internal"}"#.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_without_parameters_does_nothing_and_answers_200() {
        let work = Work::from_query(None).expect("no query is valid");
        assert_eq!(work.cpu, Duration::ZERO);
        assert_eq!(work.sleep, Duration::ZERO);
        assert_eq!(work.status, StatusCode::OK);
        assert_eq!(work.bytes, None);
    }

    #[test]
    fn work_accepts_the_bounds_themselves() {
        let work = Work::from_query(Some("cpu_ms=10000&sleep_ms=60000&status=599"))
            .expect("the limits are inclusive");
        assert_eq!(work.cpu, Duration::from_millis(MAX_CPU_MS));
        assert_eq!(work.sleep, Duration::from_millis(MAX_SLEEP_MS));
        assert_eq!(work.status.as_u16(), 599);
    }

    #[test]
    fn route_labels_are_the_known_paths_or_other() {
        assert_eq!(route_label("/work"), "/work");
        assert_eq!(route_label("/"), "/");
        assert_eq!(route_label("/ws"), "/ws");
        assert_eq!(route_label("/wp-admin.php"), "other");
    }

    #[test]
    fn work_bytes_is_bounded() {
        let work = Work::from_query(Some("bytes=8388608")).expect("the limit is inclusive");
        assert_eq!(work.bytes, Some(8 * 1024 * 1024));
        let err = Work::from_query(Some("bytes=8388609")).expect_err("past the limit");
        assert!(
            err.contains("bytes: 8388609 is outside 0..=8388608"),
            "{err}"
        );
    }

    #[test]
    fn work_rejects_unknown_parameters() {
        let err = Work::from_query(Some("sleep=5")).expect_err("sleep is not a parameter");
        assert!(err.contains("unknown parameter `sleep`"), "{err}");
    }
}
