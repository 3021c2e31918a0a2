//! Proxy: forwards one client request to the backend the balancer picked.
//!
//! The skeleton is hyper's gateway example: take the request, point its URI at
//! the backend, hand it to a client, return what comes back. Around it sit the
//! things a production proxy adds:
//!
//! * a pooled `hyper_util` client shared by every request, so connections to the
//!   backends are kept alive and reused (TCP_NODELAY on, connect timeout bounded);
//! * bodies stream in both directions: the client's `Incoming` body is the
//!   upstream request body, and the backend's `Incoming` body is the client's
//!   response body, so memory stays flat whatever the size;
//! * header hygiene ([`headers`]) and a request id ([`request_id`]);
//! * a typed [`ProxyError`] per failure, answered as JSON 503/502/504;
//! * one access log line per request.
//!
//! The access line and the latency are taken when the response *head* is ready;
//! the body then streams on without the proxy in the way.

mod authority;
mod headers;
mod request_id;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::json;
use tracing::{info, warn};

use crate::backends::Backends;
use crate::balancer::{Balancer, NoBackend};
use crate::response;
use authority::Authorities;
use headers::X_REQUEST_ID;
use request_id::RequestIds;

/// The body of a proxied response: the backend's body streamed through, or a
/// small JSON error the proxy wrote itself. An enum, not a boxed trait object,
/// so no allocation per response.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// How long idle pooled connections to a backend are kept open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Timeouts for the upstream side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxySettings {
    /// Bound on opening a TCP connection to a backend (`connectTimeoutMs`).
    pub connect_timeout: Duration,
    /// Bound on the upstream exchange, from sending the request until the
    /// response head arrives (`requestTimeoutMs`); past it the client gets 504.
    pub request_timeout: Duration,
}

impl From<&crate::config::Config> for ProxySettings {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            connect_timeout: config.connect_timeout(),
            request_timeout: config.request_timeout(),
        }
    }
}

/// Why a request could not be proxied. Each case maps to one status code.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The backend list is empty: 503.
    #[error("no backend is ready")]
    NoBackend,
    /// The TCP connection to the backend failed (refused, unreachable, connect
    /// timeout): 502. Nothing was sent, so retrying elsewhere is always safe.
    #[error("cannot connect to backend {backend}: {}", ErrorChain(error))]
    Connect {
        backend: SocketAddr,
        error: hyper_util::client::legacy::Error,
    },
    /// The connection broke or the backend answered something that is not HTTP: 502.
    #[error("backend {backend} failed: {}", ErrorChain(error))]
    Upstream {
        backend: SocketAddr,
        error: hyper_util::client::legacy::Error,
    },
    /// No response head within `requestTimeoutMs`: 504.
    #[error("backend {backend} did not answer within {} ms", timeout.as_millis())]
    Timeout {
        backend: SocketAddr,
        timeout: Duration,
    },
    /// The request target cannot be sent on to a backend (e.g. `CONNECT`'s
    /// authority form): 400.
    #[error("request target cannot be forwarded: {0}")]
    BadTarget(#[from] http::Error),
}

impl From<NoBackend> for ProxyError {
    fn from(_: NoBackend) -> Self {
        ProxyError::NoBackend
    }
}

impl ProxyError {
    /// The status code the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadTarget(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The backend involved, if one had been picked.
    pub fn backend(&self) -> Option<SocketAddr> {
        match self {
            ProxyError::Connect { backend, .. }
            | ProxyError::Upstream { backend, .. }
            | ProxyError::Timeout { backend, .. } => Some(*backend),
            ProxyError::NoBackend | ProxyError::BadTarget(_) => None,
        }
    }

    /// What the client is told. Backend addresses and internal error chains stay
    /// in our log, not in the response.
    fn public_message(&self) -> String {
        match self {
            ProxyError::NoBackend => "no backend is ready".to_owned(),
            ProxyError::Connect { .. } => "the backend could not be reached".to_owned(),
            ProxyError::Upstream { .. } => "the backend failed to answer".to_owned(),
            ProxyError::Timeout { timeout, .. } => {
                format!(
                    "the backend did not answer within {} ms",
                    timeout.as_millis()
                )
            }
            ProxyError::BadTarget(_) => "the request target cannot be forwarded".to_owned(),
        }
    }

    fn to_response(&self, request_id: &HeaderValue) -> Response<Full<Bytes>> {
        let status = self.status();
        response::json(
            status,
            &json!({
                "status": status.as_u16(),
                "error": status.canonical_reason(),
                "message": self.public_message(),
                "requestId": request_id.to_str().unwrap_or_default(),
            }),
        )
    }
}

/// What the proxy knows about the client connection a request arrived on.
/// Built once per connection and shared by every request on it.
#[derive(Debug, Clone)]
pub struct ClientConn {
    /// The client's IP, ready to append to `X-Forwarded-For`.
    ip: HeaderValue,
}

impl ClientConn {
    /// Describes a connection from `peer`.
    pub fn new(peer: SocketAddr) -> Self {
        Self {
            ip: headers::ip_header_value(peer.ip()),
        }
    }
}

/// The reverse proxy. Cheap to clone: every clone shares one client, one
/// balancer and one backend list.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The list discovery keeps current; read once per request.
    backends: Backends,
    /// Chooses among `backends`; boxed so algorithms can be swapped at start-up.
    balancer: Box<dyn Balancer>,
    /// One pooled client for all backends: keep-alive connections are per
    /// backend address inside it.
    client: Client<HttpConnector, Incoming>,
    /// See [`ProxySettings::request_timeout`].
    request_timeout: Duration,
    /// Source of ids for requests that arrive without one.
    request_ids: RequestIds,
    /// Each backend's `host:port`, built once rather than per request.
    authorities: Authorities,
}

impl Proxy {
    /// A proxy over `backends`, choosing with `balancer`.
    pub fn new(
        backends: Backends,
        balancer: impl Balancer + 'static,
        settings: ProxySettings,
    ) -> Self {
        let mut connector = HttpConnector::new();
        // Requests and responses are small writes; Nagle's algorithm would hold
        // them back waiting for ACKs.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            shared: Arc::new(Shared {
                backends,
                balancer: Box::new(balancer),
                client,
                request_timeout: settings.request_timeout,
                request_ids: RequestIds::default(),
                authorities: Authorities::default(),
            }),
        }
    }

    /// Proxies one request and always produces a response: failures become
    /// JSON errors. Writes the access log line.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        client: &ClientConn,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_id = self
            .shared
            .request_ids
            .keep_or_generate(req.headers().get(X_REQUEST_ID));
        req.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        // Kept for the log line: cloning a method or a URI is a refcount bump.
        let method = req.method().clone();
        let uri = req.uri().clone();

        let outcome = self.forward(req, client).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let id = request_id.to_str().unwrap_or_default();
        let mut response = match outcome {
            Ok((backend, response)) => {
                info!(
                    target: "loadbalancer::access",
                    method = %method, path = uri.path(), backend = %backend,
                    status = response.status().as_u16(), latency_ms, request_id = id,
                    "request"
                );
                response.map(Either::Left)
            }
            Err(error) => {
                warn!(
                    target: "loadbalancer::access",
                    method = %method, path = uri.path(), backend = %MaybeAddr(error.backend()),
                    status = error.status().as_u16(), latency_ms, request_id = id,
                    error = %error, "request failed"
                );
                error.to_response(&request_id).map(Either::Right)
            }
        };
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        response
    }

    /// Picks a backend and exchanges the request with it.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        client: &ClientConn,
    ) -> Result<(SocketAddr, Response<Incoming>), ProxyError> {
        let shared = &*self.shared;
        // The read lock is held only inside this closure: the pick copies an
        // address out, and the guard is gone before the first `.await` below.
        let backend = shared.backends.with(|list| shared.balancer.pick(list))?;

        headers::remove_hop_by_hop(req.headers_mut());
        headers::add_forwarding(req.headers_mut(), &client.ip);
        let authority = shared.authorities.get(backend).map_err(http::Error::from)?;
        *req.uri_mut() = upstream_uri(authority, req.uri())?;

        let exchange = shared.client.request(req);
        let mut response = match tokio::time::timeout(shared.request_timeout, exchange).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) if error.is_connect() => {
                return Err(ProxyError::Connect { backend, error });
            }
            Ok(Err(error)) => return Err(ProxyError::Upstream { backend, error }),
            Err(_elapsed) => {
                return Err(ProxyError::Timeout {
                    backend,
                    timeout: shared.request_timeout,
                });
            }
        };
        headers::remove_hop_by_hop(response.headers_mut());
        Ok((backend, response))
    }
}

/// `http://<backend><path?query>`: the absolute form the pooled client needs to
/// know where to connect; it sends only the path and query on the wire.
fn upstream_uri(authority: Authority, original: &Uri) -> Result<Uri, http::Error> {
    let path_and_query = original
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
}

/// Displays an error with its sources, `outer: inner: root`, because hyper's
/// top-level messages ("client error (Connect)") hide the useful part.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

/// An optional backend address for the log line: `-` when none was picked.
struct MaybeAddr(Option<SocketAddr>);

impl fmt::Display for MaybeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uri_keeps_path_and_query() {
        let backend = Authority::from_static("[::1]:8081");
        let uri =
            upstream_uri(backend.clone(), &"/a/b?x=1&y=2".parse().expect("valid")).expect("valid");
        assert_eq!(uri, "http://[::1]:8081/a/b?x=1&y=2");
        let uri =
            upstream_uri(backend, &"example.test:443".parse().expect("valid")).expect("valid");
        assert_eq!(uri, "http://[::1]:8081/");
    }

    #[test]
    fn errors_map_to_their_status_codes() {
        let backend: SocketAddr = "127.0.0.1:1".parse().expect("valid");
        assert_eq!(
            ProxyError::NoBackend.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let timeout = ProxyError::Timeout {
            backend,
            timeout: Duration::from_millis(5),
        };
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(timeout.backend(), Some(backend));
    }
}
