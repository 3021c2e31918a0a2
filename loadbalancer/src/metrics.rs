//! Metrics: what the load balancer counts, in Prometheus's OpenMetrics text format.
//!
//! One [`Metrics`] is built in `main`, shared as an `Arc` by the proxy (which
//! records every request), the resilience layer (retries, ejections) and the admin
//! listener (which serves `/metrics`). Names follow Prometheus conventions: a
//! `loadbalancer_` prefix, base units (seconds), `_total` on counters.
//!
//! Two kinds of numbers live here:
//!
//! * counted as things happen, on the request path: requests, their duration,
//!   requests in flight, retries, ejections. Label sets are plain `Copy` values (an
//!   address, a method enum, a status code), so the request path never allocates a
//!   label string; the text is only produced when Prometheus scrapes. A request a
//!   backend answered does not even look its series up: each backend keeps its
//!   handles ([`BackendMetrics`], beside its
//!   [`BackendState`](crate::backend_state::BackendState)), resolved on first use.
//! * read at scrape time from state that exists anyway: the backend list's
//!   gauges (backends by state, discovery updates and last sync) are a collector
//!   that the list provides and [`Metrics::new`] registers, so this module needs
//!   to know nothing of the list. Nothing has to keep a gauge in step with that
//!   state, so nothing can drift.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::balancer::AffinityOutcome;
use crate::ratelimit::Limit;
use crate::topology::Proximity;

/// Upper bounds of the request duration buckets, in seconds: from half a
/// millisecond (a loopback hop) to the 30 s default request timeout, roughly
/// ×2.5 apart, so both a fast cluster and a struggling backend land in useful buckets.
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// The load balancer's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Tells this instance's cached [`BackendMetrics`] from another's (tests run
    /// several load balancers in one process, and could share a backend list).
    id: u64,
    /// Everything below, registered under the `loadbalancer` prefix, plus the
    /// scrape-time collector and the build info.
    registry: Registry,
    /// `loadbalancer_requests_total{backend,method,code}`.
    requests: Family<RequestLabels, Counter>,
    /// `loadbalancer_request_duration_seconds{backend}`: until the response head.
    request_duration: Family<BackendLabels, Histogram>,
    /// `loadbalancer_requests_in_flight`: from arrival until the response body ends.
    in_flight: Gauge,
    /// `loadbalancer_retries_total`: extra attempts made for client requests.
    retries: Counter,
    /// `loadbalancer_ejections_total{backend}`: outlier detection ejections.
    ejections: Family<BackendLabels, Counter>,
    /// `loadbalancer_config_reloads_total{result}`: config file changes seen.
    config_reloads: Family<ReloadLabels, Counter>,
    /// `loadbalancer_tunnels_open`: upgraded connections (WebSockets) open now.
    tunnels_open: Gauge,
    /// `loadbalancer_tunnel_bytes_total{direction}`: bytes copied through
    /// tunnels, `upstream` (client to backend) and `downstream`.
    tunnel_bytes: Family<DirectionLabels, Counter>,
    /// `loadbalancer_tunnel_duration_seconds`: how long closed tunnels were open.
    tunnel_duration: Histogram,
    /// `loadbalancer_tls_handshakes_total{result,version}`.
    tls_handshakes: Family<HandshakeLabels, Counter>,
    /// `loadbalancer_tls_handshake_failures_total{reason}`.
    tls_handshake_failures: Family<FailureLabels, Counter>,
    /// `loadbalancer_tls_certificate_expiry_timestamp_seconds{file}`.
    certificate_expiry: Family<CertificateLabels, Gauge>,
    /// `loadbalancer_tls_certificate_reloads_total{result}`.
    certificate_reloads: Family<ReloadLabels, Counter>,
    /// `loadbalancer_requests_by_protocol_total{protocol,grpc_status}`.
    by_protocol: Family<ProtocolLabels, Counter>,
    /// The series of requests that are not gRPC calls, by [`ClientProtocol`],
    /// resolved once: most requests count here without a family lookup.
    plain_by_protocol: [Counter; 2],
    /// `loadbalancer_rate_limited_total{limit}`.
    rate_limited: Family<LimitLabels, Counter>,
    /// `loadbalancer_requests_by_locality_total{locality}`, one series per
    /// [`Proximity`], resolved once so that counting needs no family lookup.
    by_locality: [Counter; 3],
    /// `loadbalancer_affinity_total{result}`: requests routed by their
    /// affinity key (`hit`), without one (`miss`), or to the next backend of
    /// the key's sequence (`fallback`), indexed by [`AffinityOutcome`] so the
    /// request path needs no family lookup.
    affinity: [Counter; 3],
    /// `loadbalancer_requests_queued_total`: requests that waited for a
    /// backend under `maxRequestsPerBackend`.
    queued: Counter,
    /// `loadbalancer_requests_shed_total`: queued requests answered 503 after
    /// `queueTimeoutMs`.
    shed: Counter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LocalityLabels {
    locality: Proximity,
}

impl EncodeLabelValue for Proximity {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AffinityLabels {
    result: &'static str,
}

/// The `result` label of each [`AffinityOutcome`], in the order of
/// [`Metrics`]'s `affinity` counters.
const AFFINITY_RESULTS: [(AffinityOutcome, &str); 3] = [
    (AffinityOutcome::Hit, "hit"),
    (AffinityOutcome::Miss, "miss"),
    (AffinityOutcome::Fallback, "fallback"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabels {
    limit: LimitLabel,
    key: KeyKindLabel,
}

/// What told the clients of a limit apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct KeyKindLabel(Limit);

impl EncodeLabelValue for KeyKindLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(self.0.key_kind())
    }
}

/// Which rate limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct LimitLabel(Limit);

impl EncodeLabelValue for LimitLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(self.0.as_str())
    }
}

/// What the client spoke to the load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientProtocol {
    Http1 = 0,
    Http2 = 1,
}

impl ClientProtocol {
    /// The protocol of a request of `version`.
    pub fn of(version: http::Version) -> Self {
        if version == http::Version::HTTP_2 {
            Self::Http2
        } else {
            Self::Http1
        }
    }

    /// How logs and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "h2",
        }
    }
}

impl EncodeLabelValue for ClientProtocol {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(self.as_str())
    }
}

/// A gRPC status code (0 to 16), `none` for a request that is not a gRPC
/// call, or `other` for a code outside the spec (a backend must not be able
/// to mint series).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GrpcStatusLabel(Option<u16>);

impl EncodeLabelValue for GrpcStatusLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        match self.0 {
            None => encoder.write_str("none"),
            Some(code @ 0..=16) => write!(encoder, "{code}"),
            Some(_) => encoder.write_str("other"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: ClientProtocol,
    grpc_status: GrpcStatusLabel,
}

/// The protocol version a TLS handshake settled on, or `none` for a failed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsVersion {
    Tls12,
    Tls13,
    None,
}

impl TlsVersion {
    /// The version rustls reports for an established connection.
    pub fn of(version: Option<rustls::ProtocolVersion>) -> Self {
        match version {
            Some(rustls::ProtocolVersion::TLSv1_3) => Self::Tls13,
            Some(rustls::ProtocolVersion::TLSv1_2) => Self::Tls12,
            _ => Self::None,
        }
    }
}

impl EncodeLabelValue for TlsVersion {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(match self {
            TlsVersion::Tls12 => "TLSv1.2",
            TlsVersion::Tls13 => "TLSv1.3",
            TlsVersion::None => "none",
        })
    }
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// Not done within the header-read timeout (nothing sent, or half a hello).
    Timeout,
    /// What arrived is not TLS (plain HTTP on the HTTPS port, garbage).
    NotTls,
    /// The client offers no protocol version or cipher suite we accept
    /// (TLS 1.1 and older, say).
    Incompatible,
    /// The client aborted with an alert (it did not trust our certificate, say).
    ClientAlert,
    /// The connection closed or broke during the handshake.
    Closed,
    /// Anything else.
    Other,
}

impl HandshakeFailure {
    /// Classifies the error a failed `accept` returned.
    pub fn of(error: &std::io::Error) -> Self {
        let Some(tls) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return Self::Closed;
        };
        match tls {
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                Self::NotTls
            }
            rustls::Error::PeerIncompatible(_) => Self::Incompatible,
            rustls::Error::AlertReceived(_) => Self::ClientAlert,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::ClientAlert => "client_alert",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Other => "other",
        }
    }
}

impl EncodeLabelValue for HandshakeFailure {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandshakeLabels {
    result: HandshakeResult,
    version: TlsVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum HandshakeResult {
    Success,
    Failure,
}

impl EncodeLabelValue for HandshakeResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(match self {
            HandshakeResult::Success => "success",
            HandshakeResult::Failure => "failure",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    reason: HandshakeFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CertificateLabels {
    file: String,
}

/// Which way bytes went through a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client to the backend.
    Upstream,
    /// From the backend to the client.
    Downstream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(match self {
            Direction::Upstream => "upstream",
            Direction::Downstream => "downstream",
        })
    }
}

/// How a config reload ended, the `result` label of
/// `loadbalancer_config_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReloadResult {
    /// The new config is in force.
    Success,
    /// The new file was rejected; the previous config stays in force.
    Failure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

impl EncodeLabelValue for ReloadResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(match self {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        })
    }
}

impl Metrics {
    /// Registers every metric, and `scrape_time`, which computes the metrics read
    /// from shared state at each scrape (the backend list's
    /// [`BackendGauges`](crate::backends::BackendGauges)).
    pub fn new(scrape_time: impl Collector) -> Self {
        let mut registry = Registry::with_prefix("loadbalancer");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by backend (\"none\" when the load balancer answered \
             itself), method and status code",
            requests.clone(),
        );
        let request_duration = Family::<BackendLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> _,
        );
        registry.register_with_unit(
            "request_duration",
            "Time from receiving a request until the response head was ready, by backend",
            Unit::Seconds,
            request_duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests received whose response has not finished streaming",
            in_flight.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "retries",
            "Extra attempts sent to another backend after a failed one",
            retries.clone(),
        );
        let ejections = Family::<BackendLabels, Counter>::default();
        registry.register(
            "ejections",
            "Times outlier detection ejected a backend",
            ejections.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Changes of the config file applied (success) or rejected (failure)",
            config_reloads.clone(),
        );
        let tunnels_open = Gauge::default();
        registry.register(
            "tunnels_open",
            "Upgraded connections (WebSockets) open now",
            tunnels_open.clone(),
        );
        let tunnel_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tunnel_bytes",
            "Bytes copied through tunnels: upstream (client to backend) and downstream",
            tunnel_bytes.clone(),
        );
        let tunnel_duration = Histogram::new(TUNNEL_BUCKETS);
        registry.register_with_unit(
            "tunnel_duration",
            "How long closed tunnels were open",
            Unit::Seconds,
            tunnel_duration.clone(),
        );
        let tls_handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes, by result and the protocol version agreed",
            tls_handshakes.clone(),
        );
        let tls_handshake_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes, by reason",
            tls_handshake_failures.clone(),
        );
        let certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        registry.register_with_unit(
            "tls_certificate_expiry_timestamp",
            "Unix time when each certificate in force expires, by file",
            Unit::Seconds,
            certificate_expiry.clone(),
        );
        let certificate_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "tls_certificate_reloads",
            "Changed certificate files loaded (success) or rejected (failure)",
            certificate_reloads.clone(),
        );
        let by_protocol = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "requests_by_protocol",
            "Requests answered, by the protocol the client spoke (http1, h2) and, for \
             gRPC calls, their grpc-status (\"none\" for other requests)",
            by_protocol.clone(),
        );
        let plain_by_protocol = [ClientProtocol::Http1, ClientProtocol::Http2].map(|protocol| {
            by_protocol.get_or_create_owned(&ProtocolLabels {
                protocol,
                grpc_status: GrpcStatusLabel(None),
            })
        });
        let rate_limited = Family::<LimitLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429 by a rate limit, by the limit (client, global) and \
             what tells clients apart (sourceIp, header; none for global)",
            rate_limited.clone(),
        );
        let by_locality = Family::<LocalityLabels, Counter>::default();
        registry.register(
            "requests_by_locality",
            "Attempts sent to a backend, by where it runs: on this replica's node \
             (same_node), in its zone (same_zone), elsewhere or not known (other)",
            by_locality.clone(),
        );
        let by_locality = Proximity::ALL
            .map(|locality| by_locality.get_or_create_owned(&LocalityLabels { locality }));
        let affinity_family = Family::<AffinityLabels, Counter>::default();
        registry.register(
            "affinity",
            "Requests of the consistent_hash algorithm, by how their hashOn key routed them: \
             hit (to the key's backend), miss (no key: round-robin), fallback (the key's \
             backend was unavailable or full: the next of its sequence)",
            affinity_family.clone(),
        );
        let affinity = AFFINITY_RESULTS
            .map(|(_, result)| affinity_family.get_or_create_owned(&AffinityLabels { result }));
        let queued = Counter::default();
        registry.register(
            "requests_queued",
            "Requests that found every backend at maxRequestsPerBackend and waited",
            queued.clone(),
        );
        let shed = Counter::default();
        registry.register(
            "requests_shed",
            "Queued requests answered 503 because no backend had room within queueTimeoutMs",
            shed.clone(),
        );
        registry.register(
            "build",
            "The running version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(scrape_time));
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            requests,
            request_duration,
            in_flight,
            retries,
            ejections,
            config_reloads,
            tunnels_open,
            tunnel_bytes,
            tunnel_duration,
            tls_handshakes,
            tls_handshake_failures,
            certificate_expiry,
            certificate_reloads,
            by_protocol,
            plain_by_protocol,
            rate_limited,
            by_locality,
            affinity,
            queued,
            shed,
        }
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn request_started(&self) -> RequestInFlight {
        self.in_flight.inc();
        RequestInFlight(self.in_flight.clone())
    }

    /// Records one answered request. `backend` is `None` when no backend was
    /// involved (no backend ready, a target that cannot be forwarded).
    pub fn record_request(
        &self,
        backend: Option<SocketAddr>,
        method: &Method,
        status: StatusCode,
        latency: Duration,
    ) {
        let backend = BackendLabel(backend);
        let labels = RequestLabels {
            backend,
            method: MethodLabel::from(method),
            code: status.as_u16(),
        };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&BackendLabels { backend })
            .observe(latency.as_secs_f64());
    }

    /// Records one request that `backend` answered, like
    /// [`record_request`](Self::record_request), through the handles cached in
    /// `cache` (the backend's own, see [`BackendState`](crate::backend_state::BackendState)):
    /// no label-set hashing and no family lock per request once they are resolved.
    pub fn record_backend_request(
        &self,
        backend: SocketAddr,
        cache: &OnceLock<BackendMetrics>,
        method: &Method,
        status: StatusCode,
        latency: Duration,
    ) {
        let handles = cache.get_or_init(|| BackendMetrics {
            owner: self.id,
            duration: self.request_duration.get_or_create_owned(&BackendLabels {
                backend: BackendLabel(Some(backend)),
            }),
            ok: Default::default(),
        });
        if handles.owner != self.id {
            return self.record_request(Some(backend), method, status, latency);
        }
        let method = MethodLabel::from(method);
        let labels = RequestLabels {
            backend: BackendLabel(Some(backend)),
            method,
            code: status.as_u16(),
        };
        if status == StatusCode::OK {
            handles.ok[method as usize]
                .get_or_init(|| self.requests.get_or_create_owned(&labels))
                .inc();
        } else {
            self.requests.get_or_create(&labels).inc();
        }
        handles.duration.observe(latency.as_secs_f64());
    }

    /// Counts one answered request by the protocol the client spoke and, for
    /// a gRPC call (`grpc_status` is `Some`), its status.
    pub fn record_protocol(&self, protocol: ClientProtocol, grpc_status: Option<u16>) {
        match grpc_status {
            None => self.plain_by_protocol[protocol as usize].inc(),
            Some(code) => self
                .by_protocol
                .get_or_create(&ProtocolLabels {
                    protocol,
                    grpc_status: GrpcStatusLabel(Some(code)),
                })
                .inc(),
        };
    }

    /// Counts one request refused by the `limit` rate limit.
    pub fn record_rate_limited(&self, limit: Limit) {
        self.rate_limited
            .get_or_create(&LimitLabels {
                limit: LimitLabel(limit),
                key: KeyKindLabel(limit),
            })
            .inc();
    }

    /// Counts one attempt sent to a backend that runs at `locality`.
    pub fn record_locality(&self, locality: Proximity) {
        self.by_locality[locality as usize].inc();
    }

    /// Counts how one request's affinity key routed it.
    pub fn record_affinity(&self, outcome: AffinityOutcome) {
        let index = AFFINITY_RESULTS
            .iter()
            .position(|(listed, _)| *listed == outcome)
            .unwrap_or(0);
        self.affinity[index].inc();
    }

    /// Counts one request that waited for a backend with room.
    pub fn record_queued(&self) {
        self.queued.inc();
    }

    /// Counts one request shed after waiting `queueTimeoutMs`.
    pub fn record_shed(&self) {
        self.shed.inc();
    }

    /// Counts one retry: a request sent again to another backend.
    pub fn record_retry(&self) {
        self.retries.inc();
    }

    /// Counts one ejection of `backend` by outlier detection.
    pub fn record_ejection(&self, backend: SocketAddr) {
        let labels = BackendLabels {
            backend: BackendLabel(Some(backend)),
        };
        self.ejections.get_or_create(&labels).inc();
    }

    /// Counts one config reload that ended with `result`.
    pub fn record_config_reload(&self, result: ReloadResult) {
        self.config_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// Every metric in the OpenMetrics text format (see
    /// [`service_kit::metrics::CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        service_kit::metrics::encode(&self.registry)
    }
}

/// Tunnel lifetimes: from a short exchange to the hour a quiet WebSocket may last.
const TUNNEL_BUCKETS: [f64; 8] = [0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0];

impl Metrics {
    /// Counts a tunnel as open until the returned guard is dropped.
    pub fn tunnel_opened(&self) -> TunnelOpen {
        self.tunnels_open.inc();
        TunnelOpen(self.tunnels_open.clone())
    }

    /// Records `bytes` copied through a tunnel in `direction`.
    pub fn record_tunnel_bytes(&self, direction: Direction, bytes: u64) {
        self.tunnel_bytes
            .get_or_create(&DirectionLabels { direction })
            .inc_by(bytes);
    }

    /// Records a closed tunnel's lifetime.
    pub fn record_tunnel_closed(&self, open_for: Duration) {
        self.tunnel_duration.observe(open_for.as_secs_f64());
    }
}

impl Metrics {
    /// Counts one TLS handshake: agreed on `version`, or failed for `failure`.
    pub fn record_handshake(&self, version: TlsVersion, failure: Option<HandshakeFailure>) {
        let result = match failure {
            None => HandshakeResult::Success,
            Some(reason) => {
                self.tls_handshake_failures
                    .get_or_create(&FailureLabels { reason })
                    .inc();
                HandshakeResult::Failure
            }
        };
        self.tls_handshakes
            .get_or_create(&HandshakeLabels { result, version })
            .inc();
    }

    /// Counts a change of the certificate files, loaded or rejected.
    pub fn record_certificate_reload(&self, result: ReloadResult) {
        self.certificate_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// Publishes when the certificate read from `file` expires.
    pub fn record_certificate_expiry(&self, file: &str, not_after_unix: i64) {
        self.certificate_expiry
            .get_or_create(&CertificateLabels {
                file: file.to_owned(),
            })
            .set(not_after_unix);
    }
}

/// An open tunnel, counted in `loadbalancer_tunnels_open` while it lives.
#[derive(Debug)]
pub struct TunnelOpen(Gauge);

impl Drop for TunnelOpen {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// One backend's request metric handles, resolved on its first answered request
/// and kept beside its state, so that later requests skip the label-set hashing
/// and the family's lock.
#[derive(Debug)]
pub struct BackendMetrics {
    /// The [`Metrics`] these handles belong to (its `id`).
    owner: u64,
    /// `request_duration_seconds{backend}`.
    duration: Histogram,
    /// `requests_total{backend,method,code="200"}` by [`MethodLabel`], the
    /// series nearly every request lands in; created on first use, so a method
    /// never seen gets no empty series. Other codes go through the family.
    ok: [OnceLock<Counter>; METHOD_LABELS],
}

/// How many [`MethodLabel`]s there are.
const METHOD_LABELS: usize = 10;

/// Keeps `loadbalancer_requests_in_flight` raised while it lives.
#[derive(Debug)]
pub struct RequestInFlight(Gauge);

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    backend: BackendLabel,
    method: MethodLabel,
    code: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendLabels {
    backend: BackendLabel,
}

/// A backend address, or `none` for answers the load balancer wrote itself.
/// Formatted only at scrape time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct BackendLabel(Option<SocketAddr>);

impl EncodeLabelValue for BackendLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(encoder, "{addr}"),
            None => encoder.write_str("none"),
        }
    }
}

/// The request method, with anything non-standard folded into `other`: a client
/// must not be able to mint new time series by inventing methods.
/// Its discriminant indexes [`BackendMetrics`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum MethodLabel {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Connect,
    Trace,
    Other,
}

impl From<&Method> for MethodLabel {
    fn from(method: &Method) -> Self {
        const KNOWN: [(Method, MethodLabel); 9] = [
            (Method::GET, MethodLabel::Get),
            (Method::HEAD, MethodLabel::Head),
            (Method::POST, MethodLabel::Post),
            (Method::PUT, MethodLabel::Put),
            (Method::DELETE, MethodLabel::Delete),
            (Method::PATCH, MethodLabel::Patch),
            (Method::OPTIONS, MethodLabel::Options),
            (Method::CONNECT, MethodLabel::Connect),
            (Method::TRACE, MethodLabel::Trace),
        ];
        KNOWN
            .iter()
            .find(|(known, _)| known == method)
            .map_or(MethodLabel::Other, |(_, label)| *label)
    }
}

impl EncodeLabelValue for MethodLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(match self {
            MethodLabel::Get => "GET",
            MethodLabel::Head => "HEAD",
            MethodLabel::Post => "POST",
            MethodLabel::Put => "PUT",
            MethodLabel::Delete => "DELETE",
            MethodLabel::Patch => "PATCH",
            MethodLabel::Options => "OPTIONS",
            MethodLabel::Connect => "CONNECT",
            MethodLabel::Trace => "TRACE",
            MethodLabel::Other => "other",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address parses")
    }

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    /// A scrape-time collector with nothing to add.
    #[derive(Debug)]
    struct NoGauges;

    impl Collector for NoGauges {
        fn encode(&self, _: prometheus_client::encoding::DescriptorEncoder) -> fmt::Result {
            Ok(())
        }
    }

    #[test]
    fn requests_are_counted_by_backend_method_and_code() {
        let metrics = Metrics::new(NoGauges);
        let backend = Some(addr("10.0.0.1:8080"));
        let latency = Duration::from_millis(3);
        metrics.record_request(backend, &Method::GET, StatusCode::OK, latency);
        metrics.record_request(backend, &Method::GET, StatusCode::OK, latency);
        metrics.record_request(
            None,
            &Method::POST,
            StatusCode::SERVICE_UNAVAILABLE,
            latency,
        );
        let text = metrics.encode();
        assert!(has_line(
            &text,
            r#"loadbalancer_requests_total{backend="10.0.0.1:8080",method="GET",code="200"} 2"#
        ));
        assert!(has_line(
            &text,
            r#"loadbalancer_requests_total{backend="none",method="POST",code="503"} 1"#
        ));
        assert!(has_line(
            &text,
            r#"loadbalancer_request_duration_seconds_bucket{le="0.005",backend="10.0.0.1:8080"} 2"#
        ));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn cached_backend_handles_count_in_the_same_series() {
        let metrics = Metrics::new(NoGauges);
        let other = Metrics::new(NoGauges);
        let backend = addr("10.0.0.1:8080");
        let cache = OnceLock::new();
        let latency = Duration::from_millis(3);
        metrics.record_request(Some(backend), &Method::GET, StatusCode::OK, latency);
        for status in [StatusCode::OK, StatusCode::OK, StatusCode::NOT_FOUND] {
            metrics.record_backend_request(backend, &cache, &Method::GET, status, latency);
        }
        // Handles cached by one `Metrics` are not used by another.
        other.record_backend_request(backend, &cache, &Method::POST, StatusCode::OK, latency);
        let text = metrics.encode();
        for line in [
            r#"loadbalancer_requests_total{backend="10.0.0.1:8080",method="GET",code="200"} 3"#,
            r#"loadbalancer_requests_total{backend="10.0.0.1:8080",method="GET",code="404"} 1"#,
            r#"loadbalancer_request_duration_seconds_count{backend="10.0.0.1:8080"} 4"#,
        ] {
            assert!(has_line(&text, line), "{line:?} missing in\n{text}");
        }
        assert!(!text.contains("POST"), "{text}");
        assert!(has_line(
            &other.encode(),
            r#"loadbalancer_requests_total{backend="10.0.0.1:8080",method="POST",code="200"} 1"#
        ));
    }

    #[test]
    fn invented_methods_share_one_label() {
        let custom = Method::from_bytes(b"BREW").expect("a valid token");
        assert_eq!(MethodLabel::from(&custom), MethodLabel::Other);
        assert_eq!(MethodLabel::from(&Method::DELETE), MethodLabel::Delete);
    }

    #[test]
    fn in_flight_follows_the_guard() {
        let metrics = Metrics::new(NoGauges);
        let guard = metrics.request_started();
        assert!(has_line(
            &metrics.encode(),
            "loadbalancer_requests_in_flight 1"
        ));
        drop(guard);
        assert!(has_line(
            &metrics.encode(),
            "loadbalancer_requests_in_flight 0"
        ));
    }

    #[test]
    fn retries_and_ejections_are_counted() {
        let metrics = Metrics::new(NoGauges);
        metrics.record_retry();
        metrics.record_retry();
        metrics.record_ejection(addr("10.0.0.2:80"));
        let text = metrics.encode();
        assert!(has_line(&text, "loadbalancer_retries_total 2"), "{text}");
        assert!(has_line(
            &text,
            r#"loadbalancer_ejections_total{backend="10.0.0.2:80"} 1"#
        ));
    }
}
