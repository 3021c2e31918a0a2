//! Proxy: forwards one client request to the backend the balancer picked.
//!
//! The skeleton is hyper's gateway example: take the request, send it to the
//! backend, return what comes back. hyper serves the client; toward the
//! backends the proxy speaks HTTP/1.1 itself ([`upstream`](crate::upstream)),
//! because a proxy holds one upstream connection per request in flight and
//! hyper's client connection costs about 35 KiB each. Around that sit the things
//! a production proxy adds:
//!
//! * a pool of keep-alive connections to the backends
//!   ([`UpstreamPool`]), one per proxy worker (TCP_NODELAY on, connect timeout
//!   bounded);
//! * bodies stream in both directions: the client's `Incoming` body is written
//!   to the backend as it arrives, and the backend's body is read as the client
//!   takes it, so memory stays flat whatever the size; a body that stalls for
//!   `bodyIdleTimeoutMs` either way fails ([`idle`]);
//! * header hygiene ([`headers`]) and a request id ([`request_id`]);
//! * a typed [`ProxyError`] per failure, answered as JSON 503/502/504 (405 for
//!   `CONNECT`, 408 for a stalled upload);
//! * resilience ([`Resilience`]): the balancer skips unavailable backends, every
//!   attempt's outcome feeds [`outlier`](crate::outlier) detection, and a failed
//!   attempt is repeated on another backend when [`retry`](crate::retry) allows it
//!   (the attempts, from the pick to the exchange, are in [`forward`]);
//! * traffic policy ([`Policy`]): rate limits, the request's affinity key for
//!   consistent hashing ([`affinity`]), and the per-backend concurrency limit,
//!   under which a request that finds every backend full waits in the
//!   [`concurrency`](crate::concurrency) queue, or is shed with a 503;
//! * one access log line per request, with the number of attempts it took, and
//!   the same outcome recorded once in the [`Metrics`]; every attempt is also
//!   counted in its backend's [`BackendState`];
//! * upgrades (WebSockets): a `101` turns both connections into a [`tunnel`].
//!
//! The latency is taken when the response *head* is ready; the body then streams
//! on without the proxy in the way, carrying the request's completion ([`body`]),
//! which writes the access line, records the metrics and tells outlier detection
//! how the body ended, at its last byte.

mod affinity;
mod body;
mod error;
mod forward;
mod grpc;
mod headers;
mod idle;
mod request_id;
mod tunnel;

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::backend_state::{BackendState, OwnedInFlight};
use crate::backends::{BackendProtocol, Backends, LearnedProtocols};
use crate::balancer::{Algorithm, Balancer, HashOn};
use crate::client_ip::TrustedProxies;
use crate::concurrency::ConcurrencyLimit;
use crate::discovery::DiscoveryConfig;
use crate::metrics::{ClientProtocol, Metrics};
use crate::outlier::{Admission, Outcome, OutlierDetector, OutlierSettings};
use crate::ratelimit::{RateLimitConfig, RateLimiter, Refusal};
use crate::response;
use crate::retry::{RetryPolicy, RetrySettings};
use crate::upstream::{
    DEFAULT_CONNECTIONS_PER_BACKEND, Http2Pool, Http2Stats, UpstreamHead, UpstreamPool,
};
pub use body::InFlightBody;
use body::{Completion, UpstreamBody};
use error::ErrorChain;
pub use error::ProxyError;
/// The `grpc-status` of a gRPC answer's head or trailers, for the health
/// checks' gRPC probe too.
pub(crate) use grpc::status as grpc_status;
use headers::{OwnFields, X_REQUEST_ID};
pub use idle::BodyIdle;
use idle::IdleTimeout;
use request_id::RequestIds;
use tunnel::{Tunnel, Tunnels};

/// The body of a proxied response: the backend's body streamed through, or a
/// small JSON error the proxy wrote itself. An enum, not a boxed trait object,
/// so no allocation per response.
pub type ProxyBody = Either<InFlightBody, Full<Bytes>>;

/// Timeouts for the upstream side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxySettings {
    /// Bound on opening a TCP connection to a backend (`connectTimeoutMs`).
    pub connect_timeout: Duration,
    /// Bound on the upstream exchange, from sending the request until the
    /// response head arrives (`requestTimeoutMs`); past it the client gets 504.
    pub request_timeout: Duration,
    /// Bound on the wait for the next piece of a body streaming through, either
    /// way (`bodyIdleTimeoutMs`); past it both connections are closed.
    pub body_idle_timeout: Duration,
    /// A tunnel (an upgraded connection, a WebSocket) with nothing moving either
    /// way for this long is closed (`tunnelIdleTimeoutMs`).
    pub tunnel_idle_timeout: Duration,
}

/// The upstream timeouts as the config file spells them, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyConfig {
    /// How long to wait for a TCP connection to a backend. Default 1000.
    pub connect_timeout_ms: u64,
    /// How long a backend may take to answer, from sending the request until the
    /// response headers arrive; past it the client gets a 504. Default 30000.
    pub request_timeout_ms: u64,
    /// How long a body streaming through (the backend's response, or the
    /// client's upload) may go without its next piece; past it both connections
    /// are closed and the request counts as failed. Default 60000.
    pub body_idle_timeout_ms: u64,
    /// How long a tunnel (a WebSocket, or another upgraded connection) may
    /// carry nothing either way before it is closed. Default 3600000: an hour,
    /// since a quiet WebSocket is normal (a chat with no messages).
    pub tunnel_idle_timeout_ms: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1000,
            request_timeout_ms: 30_000,
            body_idle_timeout_ms: 60_000,
            tunnel_idle_timeout_ms: 3_600_000,
        }
    }
}

impl ProxyConfig {
    /// Checks the values; the error names the key and the reason.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let fail = |field, reason: &str| Err((field, reason.to_owned()));
        if self.connect_timeout_ms == 0 {
            return fail("connectTimeoutMs", "must be greater than 0");
        }
        if self.request_timeout_ms == 0 {
            return fail("requestTimeoutMs", "must be greater than 0");
        }
        if self.body_idle_timeout_ms == 0 {
            return fail("bodyIdleTimeoutMs", "must be greater than 0");
        }
        if self.tunnel_idle_timeout_ms == 0 {
            return fail("tunnelIdleTimeoutMs", "must be greater than 0");
        }
        Ok(())
    }
}

impl From<&ProxyConfig> for ProxySettings {
    fn from(config: &ProxyConfig) -> Self {
        Self {
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            body_idle_timeout: Duration::from_millis(config.body_idle_timeout_ms),
            tunnel_idle_timeout: Duration::from_millis(config.tunnel_idle_timeout_ms),
        }
    }
}

/// What the proxy does about failing backends. The default is none of it: every
/// request is tried once and no backend is ever ejected (the plain proxy that the
/// data-path tests describe); `main` turns both on from the config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resilience {
    /// Retries on another backend; `None` tries each request once.
    pub retries: Option<RetrySettings>,
    /// Passive health checks; `None` never ejects a backend.
    pub outlier: Option<OutlierSettings>,
}

impl Resilience {
    /// The retry limits in force: with retries off, one attempt per request.
    fn retry_settings(&self) -> RetrySettings {
        self.retries.unwrap_or(RetrySettings::OFF)
    }
}

/// Which port of the backend pods a listener's requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The addresses discovery found (`backendPort`).
    BackendPort,
    /// The same pods at `backendGrpcPort`: the listener on `grpcPort`.
    GrpcPort,
}

/// Where requests go and what they speak there: the config's part (reloaded
/// live), which the proxy combines with what discovery learned
/// ([`LearnedProtocols`]) for each attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Routing {
    /// `backendProtocol`: what `backendPort` speaks, whatever the Service says.
    pub backend_protocol: Option<BackendProtocol>,
    /// `backendGrpcPort`: where the requests of the gRPC listener go.
    pub backend_grpc_port: Option<u16>,
}

impl From<&DiscoveryConfig> for Routing {
    fn from(config: &DiscoveryConfig) -> Self {
        Self {
            backend_protocol: config.backend_protocol,
            backend_grpc_port: config.backend_grpc_port,
        }
    }
}

impl Routing {
    /// The address and protocol of one attempt at `backend` (an address from
    /// the list) for a request that arrived for `target`.
    fn resolve(
        &self,
        target: Target,
        backend: SocketAddr,
        learned: LearnedProtocols,
    ) -> (SocketAddr, BackendProtocol) {
        match (target, self.backend_grpc_port) {
            (Target::GrpcPort, Some(port)) => (
                SocketAddr::new(backend.ip(), port),
                // gRPC needs HTTP/2; only the Service can say otherwise.
                learned.grpc_port.unwrap_or(BackendProtocol::H2c),
            ),
            _ => (
                backend,
                self.backend_protocol
                    .or(learned.backend_port)
                    .unwrap_or_default(),
            ),
        }
    }
}

/// What the proxy knows about the client connection a request arrived on.
/// Built once per connection and shared by every request on it.
#[derive(Debug, Clone)]
pub struct ClientConn {
    /// The connection's peer, as the per-client policies start from.
    peer: std::net::IpAddr,
    /// The client's IP, ready to append to `X-Forwarded-For`.
    ip: HeaderValue,
    /// How the client reached us, for `X-Forwarded-Proto`.
    scheme: Scheme,
    /// On a plain-HTTP listener with `tls.redirectHttp`: the HTTPS port every
    /// request is redirected to instead of being proxied.
    https_redirect: Option<u16>,
    /// Which backend port its requests go to.
    target: Target,
}

/// The scheme a client used to reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl ClientConn {
    /// Describes a connection from `peer` that arrived over `scheme`, and
    /// whose requests are redirected to HTTPS on `https_redirect` if that is set.
    pub fn new(peer: SocketAddr, scheme: Scheme, https_redirect: Option<u16>) -> Self {
        Self {
            peer: peer.ip(),
            ip: headers::ip_header_value(peer.ip()),
            scheme,
            https_redirect,
            target: Target::BackendPort,
        }
    }

    /// The same connection, with its requests sent to `target`.
    pub fn with_target(self, target: Target) -> Self {
        Self { target, ..self }
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
    /// Chooses among `backends`; boxed so the algorithm is chosen from the
    /// config, and behind a lock so a config reload can swap it. Read-locked
    /// only for the pick itself, never across an `.await`; the write lock is
    /// taken once per reload.
    balancer: RwLock<Box<dyn Balancer>>,
    /// Keep-alive connections to the backends, by address.
    pool: UpstreamPool,
    /// Multiplexed connections to the backends that speak HTTP/2.
    http2: Http2Pool,
    /// The timeouts and the outlier detector in force. Behind a lock so a
    /// config reload can replace them ([`Proxy::reconfigure`]); each attempt
    /// copies them out once and never holds the guard across an `.await`.
    /// The connect timeout is passed to every connect rather than built into
    /// a connector for the same reason.
    tuning: RwLock<Tuning>,
    /// Source of ids for requests that arrive without one.
    request_ids: RequestIds,
    /// The attempt bound and the retry budget shared by all requests.
    retry: RetryPolicy,
    /// Where every request's outcome is counted, shared with the admin listener.
    metrics: Arc<Metrics>,
    /// The tunnels of upgraded requests (WebSockets), closed when the proxy stops.
    tunnels: Tunnels,
    /// The traffic policy in force, shared by every worker's proxy (the rate
    /// limits' state is the process's), and replaced whole by a reload; `None`
    /// for none at all. Read-locked once per request, never across an `.await`.
    policy: RwLock<Option<Arc<Policy>>>,
}

/// The traffic policy: rate limits, whose `X-Forwarded-For` to believe, and
/// the concurrency limit.
#[derive(Debug)]
pub struct Policy {
    /// The rate limits, with their state; `None` without `rateLimit`.
    pub limiter: Option<RateLimiter>,
    /// `trustedProxies`, for the rate limits and the `sourceIp` affinity key.
    pub trusted: TrustedProxies,
    /// `maxRequestsPerBackend` and `queueTimeoutMs`; `None` without a limit.
    pub concurrency: Option<ConcurrencyLimit>,
    /// What the status page shows of it.
    pub status: PolicyStatus,
}

/// The policies in force, as the status page shows them (the config's
/// spelling); the queue's length is read when it is shown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    pub algorithm: Algorithm,
    pub hash_on: Option<HashOn>,
    pub rate_limit: Option<RateLimitConfig>,
    pub trusted_proxies: TrustedProxies,
    pub max_requests_per_backend: Option<u64>,
    pub queue_timeout_ms: u64,
    /// Requests waiting for a backend with room, now.
    pub queue_length: usize,
}

/// What the policy decided about a request when it arrived.
#[derive(Debug)]
struct Admitted {
    /// The rate limit that refused it, if one did.
    refused: Option<Refusal>,
    /// Its affinity key.
    key: affinity::Key,
    /// The concurrency limit it is held to.
    limit: Option<ConcurrencyLimit>,
}

/// What the pick of each attempt takes from [`Admitted`].
#[derive(Debug, Clone, Copy)]
struct Route {
    /// The affinity key's hash.
    key: Option<u64>,
    limit: Option<ConcurrencyLimit>,
}

impl Shared {
    /// The settings in force, copied out of their lock.
    fn tuning(&self) -> Tuning {
        // A poisoned lock still holds a whole `Tuning` (a swap is one store).
        *self.tuning.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells outlier detection how a request to `backend` went, and counts the
    /// ejection it may cause.
    fn report(
        &self,
        outlier: &OutlierDetector,
        backend: SocketAddr,
        state: &BackendState,
        admission: Admission,
        outcome: Outcome,
        now: Instant,
    ) {
        if outlier
            .report(backend, state, admission, outcome, now)
            .is_some()
        {
            self.metrics.record_ejection(backend);
        }
    }
}

/// What a config reload can change in a running proxy, copied out per attempt.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    /// The upstream timeouts.
    settings: ProxySettings,
    /// Ejects backends whose attempts keep failing; `None` when turned off.
    outlier: Option<OutlierDetector>,
    /// Where requests go and what they speak there.
    routing: Routing,
}

impl Tuning {
    fn new(settings: ProxySettings, outlier: Option<OutlierSettings>, routing: Routing) -> Self {
        // A trial attempt ends within a connect and a request timeout.
        let trial_bound = settings.connect_timeout + settings.request_timeout;
        Self {
            settings,
            outlier: outlier.map(|outlier| OutlierDetector::new(outlier, trial_bound)),
            routing,
        }
    }
}

/// What the proxy learned of a request when it arrived, besides its head.
#[derive(Debug, Clone, Copy)]
struct Call {
    /// Which backend port the listener sends it to.
    target: Target,
    /// What the client spoke.
    protocol: ClientProtocol,
    /// Whether it is a gRPC call (see [`grpc`]).
    grpc: bool,
    /// A gRPC call's own deadline (`grpc-timeout`), from its arrival.
    deadline: Option<Duration>,
}

impl Call {
    /// The `grpc-status` in `headers` of this call's answer; `None` when the
    /// request is not a gRPC call.
    fn grpc_status(&self, headers: &http::HeaderMap) -> Option<u16> {
        self.grpc.then(|| grpc::status(headers)).flatten()
    }
}

/// How forwarding ended: the last attempt's result and how many attempts it took.
struct Forwarded {
    attempts: u32,
    result: Result<Upstream, ProxyError>,
}

/// A backend's response head, and the guard counting the request in flight there.
struct Upstream {
    backend: SocketAddr,
    in_flight: OwnedInFlight,
    response: Response<UpstreamBody>,
}

impl Proxy {
    /// A proxy over `backends`, choosing with `balancer`; each request is tried
    /// once and no backend is ever ejected.
    pub fn new(
        backends: Backends,
        balancer: impl Balancer + 'static,
        settings: ProxySettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::with_resilience(backends, balancer, settings, Resilience::default(), metrics)
    }

    /// A proxy that also retries and ejects failing backends as `resilience` says.
    pub fn with_resilience(
        backends: Backends,
        balancer: impl Balancer + 'static,
        settings: ProxySettings,
        resilience: Resilience,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                backends,
                balancer: RwLock::new(Box::new(balancer)),
                pool: UpstreamPool::new(),
                http2: Http2Pool::new(DEFAULT_CONNECTIONS_PER_BACKEND),
                tuning: RwLock::new(Tuning::new(
                    settings,
                    resilience.outlier,
                    Routing::default(),
                )),
                request_ids: RequestIds::default(),
                retry: RetryPolicy::new(resilience.retry_settings()),
                metrics,
                tunnels: Tunnels::new(),
                policy: RwLock::new(None),
            }),
        }
    }

    /// Proxies one request and always produces a response: failures become
    /// JSON errors. Writes the access log line.
    ///
    /// The request is turned into its encoded head (see `UpstreamHead` for why
    /// hyper's parsed one goes at once) and its body here, before the future
    /// exists. Every connection holds this future while its request waits, and
    /// an `async fn` would keep a slot for each argument, the parsed request
    /// and the client included, for as long as it runs.
    pub fn handle(
        &self,
        req: Request<Incoming>,
        client: &ClientConn,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + use<> {
        let started = Instant::now();
        let request_in_flight = self.shared.metrics.request_started();
        let (mut parts, body) = req.into_parts();
        let request_id = self
            .shared
            .request_ids
            .keep_or_generate(parts.headers.get(X_REQUEST_ID));
        let grpc = grpc::is_grpc(&parts.headers);
        let call = Call {
            target: client.target,
            protocol: ClientProtocol::of(parts.version),
            grpc,
            deadline: grpc.then(|| grpc::timeout(&parts.headers)).flatten(),
        };
        let hops = headers::remove_hop_by_hop(&mut parts.headers);
        hops.restore_trailers(&mut parts.headers);
        // An upgrade (a WebSocket) is passed on only if the client's connection
        // can be handed over once the backend agrees; never one to `h2c`.
        let client_upgrade = match parts.extensions.remove::<OnUpgrade>() {
            Some(upgrade) if hops.upgrade.is_some() && !hops.upgrade_is_h2c() => {
                hops.restore_upgrade(&mut parts.headers);
                Some(upgrade)
            }
            _ => None,
        };
        let Admitted {
            refused,
            key,
            limit,
        } = self.admit(client, &parts.headers);
        let route = Route {
            key: key.hash,
            limit,
        };
        headers::use_target_authority(&mut parts);
        headers::join_cookies(&mut parts.headers);
        let redirect = client
            .https_redirect
            .map(|port| headers::https_location(&parts, port));
        let own = OwnFields::new(&parts.headers, &request_id, &client.ip, client.scheme);
        let head = UpstreamHead::new(&parts, &body, own.as_slice());
        let proxy = self.clone();
        async move {
            if let Some(location) = redirect {
                return proxy.redirect(&head, location, &request_id, started);
            }
            let Forwarded { attempts, result } = if let Some(refusal) = refused {
                proxy.shared.metrics.record_rate_limited(refusal.limit);
                Forwarded {
                    attempts: 0,
                    result: Err(ProxyError::RateLimited(refusal)),
                }
            } else if head.method() == Method::CONNECT {
                Forwarded {
                    attempts: 0,
                    result: Err(ProxyError::ConnectMethod),
                }
            } else {
                // Boxed: hyper keeps this future for the connection's life and
                // moves it several times per request, while the exchange's
                // state, most of its size, is needed only while one is in flight.
                Box::pin(proxy.forward(&head, body, call, route, &request_id, started)).await
            };
            // One clock reading serves the log line and the histogram.
            let latency = started.elapsed();
            let latency_ms = latency.as_secs_f64() * 1000.0;
            let id = request_id.to_str().unwrap_or_default();
            let metrics = &proxy.shared.metrics;
            let mut response = match result {
                Ok(Upstream {
                    backend,
                    in_flight,
                    response,
                }) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    info!(
                        target: "loadbalancer::access",
                        method = %head.method(), path = head.path(), backend = %backend,
                        status = 101, latency_ms, attempts, request_id = id,
                        protocol = call.protocol.as_str(), "request"
                    );
                    metrics.record_backend_request(
                        backend,
                        in_flight.state().metrics(),
                        head.method(),
                        StatusCode::SWITCHING_PROTOCOLS,
                        latency,
                    );
                    let (parts, body) = response.into_parts();
                    // `read_head` takes a `101` only for a request that asked
                    // for it, and only such a request kept the client's side.
                    if let (Some(client), Some(upgraded)) = (client_upgrade, body.into_upgraded()) {
                        proxy.shared.tunnels.spawn(Tunnel {
                            client,
                            backend: upgraded,
                            backend_addr: backend,
                            request_id: request_id.clone(),
                            idle_timeout: proxy.tuning().settings.tunnel_idle_timeout,
                            slot: in_flight.into_tunnel(),
                            metrics: Arc::clone(metrics),
                        });
                    }
                    Response::from_parts(parts, Either::Right(Full::default()))
                }
                Ok(Upstream {
                    backend,
                    in_flight,
                    mut response,
                }) => {
                    if call.grpc && call.protocol == ClientProtocol::Http1 {
                        grpc::announce_trailers(response.headers_mut());
                    }
                    // Logged and counted when the body ends, by its outcome.
                    let grpc_status = call.grpc_status(response.headers());
                    let completion = Completion {
                        shared: Arc::clone(&proxy.shared),
                        head,
                        backend,
                        status: response.status(),
                        latency,
                        started,
                        attempts,
                        request_id: request_id.clone(),
                        in_flight,
                        request_in_flight,
                        protocol: call.protocol,
                        grpc_status,
                        grpc: call.grpc,
                    };
                    let body_idle_timeout = proxy.tuning().settings.body_idle_timeout;
                    key.set_on(response.headers_mut());
                    response.map(|body| {
                        Either::Left(InFlightBody::new(
                            IdleTimeout::new(body, body_idle_timeout),
                            completion,
                        ))
                    })
                }
                Err(error) => {
                    let response = error.to_response(&request_id, call.grpc);
                    let grpc_status = call.grpc_status(response.headers());
                    warn!(
                        target: "loadbalancer::access",
                        method = %head.method(), path = head.path(), backend = %MaybeAddr(error.backend()),
                        status = error.status().as_u16(), latency_ms, attempts,
                        request_id = id, error = %error, protocol = call.protocol.as_str(),
                        grpc_status, "request failed"
                    );
                    metrics.record_request(error.backend(), head.method(), error.status(), latency);
                    metrics.record_protocol(call.protocol, grpc_status);
                    response.map(Either::Right)
                }
            };
            response.headers_mut().insert(X_REQUEST_ID, request_id);
            response
        }
    }

    /// What the policy in force says about this request, from `client` with
    /// these headers: whether a rate limit refuses it, its affinity key, and
    /// the concurrency limit.
    fn admit(&self, client: &ClientConn, headers: &http::HeaderMap) -> Admitted {
        let shared = &*self.shared;
        let policy = shared.policy.read().unwrap_or_else(|p| p.into_inner());
        let policy = policy.as_deref();
        let trusted = policy.map(|policy| &policy.trusted);
        let client_ip = || trusted.map_or(client.peer, |t| t.client(client.peer, headers));
        let refused = policy
            .and_then(|policy| policy.limiter.as_ref())
            .and_then(|limiter| limiter.check(client_ip(), headers, Instant::now()).err());
        let key = {
            let balancer = shared.balancer.read().unwrap_or_else(|p| p.into_inner());
            match balancer.affinity() {
                Some(affinity) => affinity::Key::of(affinity, headers, client_ip, || {
                    shared.request_ids.generate()
                }),
                None => affinity::Key::NONE,
            }
        };
        Admitted {
            refused,
            key,
            limit: policy.and_then(|policy| policy.concurrency),
        }
    }

    /// Answers a plain-HTTP request with `tls.redirectHttp` on: 308 to `location`
    /// (the same URL over HTTPS), which keeps the method and body on the retry,
    /// or 400 when the request named no host to redirect to.
    fn redirect(
        &self,
        head: &UpstreamHead,
        location: Option<HeaderValue>,
        request_id: &HeaderValue,
        started: Instant,
    ) -> Response<ProxyBody> {
        let status = match location {
            Some(_) => StatusCode::PERMANENT_REDIRECT,
            None => StatusCode::BAD_REQUEST,
        };
        let id = request_id.to_str().unwrap_or_default();
        let message = match location {
            Some(_) => "this service is served over HTTPS",
            None => "no Host to redirect to HTTPS",
        };
        let mut response = response::json(
            status,
            &json!({
                "status": status.as_u16(),
                "error": status.canonical_reason(),
                "message": message,
                "requestId": id,
            }),
        );
        let latency = started.elapsed();
        info!(
            target: "loadbalancer::access",
            method = %head.method(), path = head.path(), backend = "-",
            status = status.as_u16(), latency_ms = latency.as_secs_f64() * 1000.0,
            attempts = 0, request_id = id, "request"
        );
        self.shared
            .metrics
            .record_request(None, head.method(), status, latency);
        let headers = response.headers_mut();
        if let Some(location) = location {
            headers.insert(http::header::LOCATION, location);
        }
        headers.insert(X_REQUEST_ID, request_id.clone());
        response.map(Either::Right)
    }

    /// The settings in force, copied out of their lock.
    fn tuning(&self) -> Tuning {
        self.shared.tuning()
    }

    /// Chooses with `balancer` from the next pick on: what a config reload
    /// does when `algorithm` or `weights` change. Requests in flight keep the
    /// backend they already have.
    pub fn set_balancer(&self, balancer: impl Balancer + 'static) {
        let mut current = self
            .shared
            .balancer
            .write()
            .unwrap_or_else(|p| p.into_inner());
        *current = Box::new(balancer);
    }

    /// Applies new upstream timeouts, retry limits and outlier settings from
    /// the next attempt on: what a config reload does when they change. Attempts
    /// under way finish with the settings they started with; the retry budget's
    /// window and each backend's outlier counters and ejections carry over.
    pub fn reconfigure(&self, settings: ProxySettings, resilience: Resilience) {
        let shared = &*self.shared;
        shared.retry.reconfigure(resilience.retry_settings());
        let mut tuning = shared.tuning.write().unwrap_or_else(|p| p.into_inner());
        *tuning = Tuning::new(settings, resilience.outlier, tuning.routing);
    }

    /// Applies the traffic policy (`rateLimit`, `trustedProxies`,
    /// `maxRequestsPerBackend`, `queueTimeoutMs`) from the next request on;
    /// `None` lifts it. Every worker's proxy gets the same `Arc`, so the
    /// limits count the process's requests.
    pub fn set_policy(&self, policy: Option<Arc<Policy>>) {
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// The policies in force, for the status page.
    pub fn policy_status(&self) -> PolicyStatus {
        let shared = &*self.shared;
        let policy = shared.policy.read().unwrap_or_else(|p| p.into_inner());
        PolicyStatus {
            queue_length: shared.backends.queue().len(),
            ..policy
                .as_ref()
                .map(|p| p.status.clone())
                .unwrap_or_default()
        }
    }

    /// Applies `backendProtocol` and `backendGrpcPort` from the next attempt
    /// on: at start, and when a reload changes them.
    pub fn set_routing(&self, routing: Routing) {
        let mut tuning = self
            .shared
            .tuning
            .write()
            .unwrap_or_else(|p| p.into_inner());
        tuning.routing = routing;
    }

    /// Closes every tunnel (WebSocket) this proxy holds open, and returns once
    /// they are gone: what a worker does when it stops, after its listener has
    /// finished.
    pub async fn close_tunnels(&self) {
        self.shared.tunnels.close_all().await;
    }

    /// The HTTP/2 connections of all `proxies` (one per worker) to each
    /// backend, summed: what the status page shows.
    pub fn http2_stats(proxies: &[Proxy]) -> Vec<(SocketAddr, Http2Stats)> {
        let mut sums = std::collections::BTreeMap::<SocketAddr, Http2Stats>::new();
        for (addr, stats) in proxies.iter().flat_map(|proxy| proxy.shared.http2.stats()) {
            let sum = sums.entry(addr).or_default();
            sum.connections += stats.connections;
            sum.streams += stats.streams;
        }
        sums.into_iter().collect()
    }

    /// Retries granted since start (see [`RetryPolicy::retries`]).
    pub fn retries(&self) -> u64 {
        self.shared.retry.retries()
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
