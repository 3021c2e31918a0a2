//! A configurable test upstream: a small hyper server on 127.0.0.1:0 whose routes
//! exercise each thing the proxy must carry through.
//!
//! | route                  | answer                                                    |
//! |------------------------|-----------------------------------------------------------|
//! | `/slow?ms=N`           | waits N ms, then answers like `/`                         |
//! | `/hold`                | waits until [`Upstream::release_held`], then like `/`     |
//! | `/echo-headers`        | the request headers as JSON `{name: [values..]}`          |
//! | `/echo-body`           | streams the request body back as it arrives               |
//! | `/chunked?bytes=N`     | N bytes of [`pattern`], chunked, with no Content-Length   |
//! | `/hop-headers`         | `/` plus hop-by-hop response headers and `x-end-to-end`   |
//! | anything else          | `{"podName": <name>, "path": <path>}`                     |
//!
//! It counts the requests it has received, so a test can wait until a request is
//! known to be in flight, counts the connections it accepted and those still open
//! (the connection pool tests), records each one's method and path (the smuggling tests
//! check that no hidden second request ever arrives), and it can be stopped
//! abruptly (every connection torn down, the port closed) to play a crashed backend. [`Upstream::set_fault`] makes
//! it play a sick one (503 to everything, a failing `/healthz`, or slow answers).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

type Body = BoxBody<Bytes, hyper::Error>;

const CHUNK: usize = 64 * 1024;

/// A failure the upstream can be told to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Fault {
    /// Answers normally.
    None,
    /// Answers every request with a 503.
    Unavailable,
    /// Answers `/healthz` with a 503 and everything else normally: what an
    /// active health check sees of a backend whose dependency broke.
    FailHealthz,
    /// Answers every request normally, [`SLOW_FAULT_DELAY`] late: a backend on
    /// an overloaded node, for the load-aware balancing tests.
    Slow,
}

/// How late a [`Fault::Slow`] upstream answers.
pub(crate) const SLOW_FAULT_DELAY: Duration = Duration::from_millis(100);

/// A running test upstream.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    pub(crate) pod_name: String,
    /// Number of requests received so far (counted when the head arrives).
    received: watch::Receiver<usize>,
    /// `METHOD path` of every request received, in arrival order.
    log: Arc<Mutex<Vec<String>>>,
    /// The [`Fault`] being played, as its `u8`; read on every request.
    fault: Arc<AtomicU8>,
    /// Connections accepted and still open.
    connections: Arc<Connections>,
    /// Set to `true` to let every `/hold` request (and later ones) answer.
    release: watch::Sender<bool>,
    /// The accept loop; it owns every connection task, so aborting it tears all down.
    task: JoinHandle<()>,
}

impl Upstream {
    /// Starts an upstream that calls itself `pod_name`.
    pub(crate) async fn start(pod_name: &str) -> Self {
        Self::start_on(pod_name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts an upstream that calls itself `pod_name`, listening on `addr`
    /// (an IPv6 backend on `[::1]:0`, say).
    pub(crate) async fn start_on(pod_name: &str, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound socket has an address");
        let (count_tx, received) = watch::channel(0usize);
        let log = Arc::new(Mutex::new(Vec::new()));
        let task_log = Arc::clone(&log);
        let name = pod_name.to_owned();
        let fault = Arc::new(AtomicU8::new(Fault::None as u8));
        let fault_reader = Arc::clone(&fault);
        let connections = Arc::new(Connections::default());
        let counts = Arc::clone(&connections);
        let (release, released) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                let (name, count_tx) = (name.clone(), count_tx.clone());
                let fault = Arc::clone(&fault_reader);
                let log = Arc::clone(&task_log);
                let released = released.clone();
                let counts = Arc::clone(&counts);
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                counts.open.fetch_add(1, Ordering::SeqCst);
                connections.spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        log.lock()
                            .expect("log lock is never poisoned")
                            .push(format!("{} {}", req.method(), req.uri().path()));
                        count_tx.send_modify(|n| *n += 1);
                        let fault = fault.load(Ordering::Relaxed);
                        respond(name.clone(), req, fault, released.clone())
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            pod_name: pod_name.to_owned(),
            received,
            log,
            fault,
            connections,
            release,
            task,
        }
    }

    /// Connections accepted so far.
    pub(crate) fn accepted(&self) -> usize {
        self.connections.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now (accepted and not yet closed by either side).
    pub(crate) fn open_connections(&self) -> usize {
        self.connections.open.load(Ordering::SeqCst)
    }

    /// Lets every `/hold` request answer, now and from now on.
    pub(crate) fn release_held(&self) {
        self.release.send_replace(true);
    }

    /// `METHOD path` of every request received so far, in arrival order.
    pub(crate) fn requests(&self) -> Vec<String> {
        self.log.lock().expect("log lock is never poisoned").clone()
    }

    /// Plays `fault` from the next request on.
    pub(crate) fn set_fault(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::Relaxed);
    }

    /// Requests received so far.
    pub(crate) fn received(&self) -> usize {
        *self.received.borrow()
    }

    /// Stops abruptly: open connections are dropped and the port refuses
    /// connections from now on.
    pub(crate) async fn stop(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// Waits until at least `n` requests have arrived.
    pub(crate) async fn wait_for_requests(&self, n: usize) {
        let mut received = self.received.clone();
        tokio::time::timeout(Duration::from_secs(30), received.wait_for(|&got| got >= n))
            .await
            .expect("requests reach the upstream within 30 s")
            .expect("upstream is running");
    }
}

/// What [`Upstream`] counts of its connections.
#[derive(Debug, Default)]
struct Connections {
    accepted: AtomicUsize,
    open: AtomicUsize,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The deterministic content of `/chunked`: byte `i` is `i mod 251` (a prime, so
/// the pattern does not line up with chunk boundaries).
pub(crate) fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

async fn respond(
    name: String,
    req: Request<Incoming>,
    fault: u8,
    mut released: watch::Receiver<bool>,
) -> Result<Response<Body>, Infallible> {
    let unavailable = fault == Fault::Unavailable as u8
        || (fault == Fault::FailHealthz as u8 && req.uri().path() == "/healthz");
    if unavailable {
        let mut response = json_response(&json!({ "podName": name, "status": 503 }));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(response);
    }
    if fault == Fault::Slow as u8 {
        tokio::time::sleep(SLOW_FAULT_DELAY).await;
    }
    let query_number = |key: &str| -> u64 {
        req.uri()
            .query()
            .and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let identity = || json!({ "podName": name, "path": req.uri().path() });
    let response = match req.uri().path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_number("ms"))).await;
            json_response(&identity())
        }
        "/hold" => {
            // An error means the upstream is being torn down; answer anyway.
            let _ = released.wait_for(|&released| released).await;
            json_response(&identity())
        }
        "/echo-headers" => {
            let mut headers = serde_json::Map::new();
            for name in req.headers().keys() {
                let values = req
                    .headers()
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect::<Vec<_>>();
                headers.insert(name.to_string(), json!(values));
            }
            json_response(&serde_json::Value::Object(headers))
        }
        "/echo-body" => Response::new(req.into_body().boxed()),
        "/chunked" => {
            let data = Bytes::from(pattern(usize::try_from(query_number("bytes")).unwrap_or(0)));
            let chunks = (0..data.len()).step_by(CHUNK).map(move |start| {
                Ok::<_, hyper::Error>(Frame::data(
                    data.slice(start..(start + CHUNK).min(data.len())),
                ))
            });
            Response::new(BodyExt::boxed(StreamBody::new(futures::stream::iter(
                chunks,
            ))))
        }
        "/hop-headers" => {
            let mut response = json_response(&identity());
            let headers = response.headers_mut();
            for (name, value) in [
                ("connection", "x-hop-response"),
                ("x-hop-response", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-authenticate", "Basic realm=\"test\""),
                ("trailer", "x-checksum"),
                ("x-end-to-end", "kept"),
            ] {
                headers.insert(name, HeaderValue::from_static(value));
            }
            response
        }
        _ => json_response(&identity()),
    };
    Ok(response)
}

fn json_response(value: &serde_json::Value) -> Response<Body> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}
