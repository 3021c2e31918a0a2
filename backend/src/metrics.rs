//! Metrics: the backend's own view of the requests it answered, served on
//! `GET /metrics` in Prometheus's OpenMetrics text format.
//!
//! `server` records every request once, after the answer is built, with the same
//! latency it logs. Set beside the load balancer's per-backend counters, these show
//! what each replica actually received. The `path` label is the route (`/`, `/work`,
//! ...), never the raw path, so a client probing random URLs cannot create new time
//! series: everything unknown is `other`.
//!
//! A WebSocket handshake on `/ws` is one request (code 101); the session that
//! follows is counted on its own: how many are open now and how many have opened.
//!
//! gRPC calls on the `grpcPort` listener ([`crate::grpc`]) are counted apart,
//! once each when it ends, by method and gRPC status: a status travels in the
//! trailers, so the HTTP code of a gRPC response (nearly always 200) says nothing.

use std::time::Duration;

use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds of the duration buckets, in seconds: from sub-millisecond identity
/// answers to the longest `/work?sleep_ms=` (60 s).
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 60.0,
];

/// The backend's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Every metric below, under the `backend` prefix.
    registry: Registry,
    /// `backend_requests_total{path,code}`.
    requests: Family<RequestLabels, Counter>,
    /// `backend_request_duration_seconds{path}`.
    duration: Family<PathLabels, Histogram>,
    /// `backend_websocket_sessions_total`: sessions opened since start-up.
    websocket_sessions: Counter,
    /// `backend_websocket_sessions_open`: sessions open now.
    websocket_open: Gauge,
    /// `backend_grpc_requests_total{method,code}`.
    grpc_requests: Family<GrpcLabels, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    path: &'static str,
    code: u16,
}

/// `method` is one of the service's own (`Get`, `Watch`, ...) and `code` a
/// status name (`OK`, `CANCELLED`, ...): both sets are small and fixed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GrpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PathLabels {
    path: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers the request counter, the duration histogram, the WebSocket
    /// session counter and gauge, and the gRPC call counter.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("backend");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and status code",
            requests.clone(),
        );
        let duration =
            Family::<PathLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> _);
        registry.register_with_unit(
            "request_duration",
            "Time to answer a request, by route",
            Unit::Seconds,
            duration.clone(),
        );
        let websocket_sessions = Counter::default();
        registry.register(
            "websocket_sessions",
            "WebSocket sessions opened on /ws",
            websocket_sessions.clone(),
        );
        let websocket_open = Gauge::default();
        registry.register(
            "websocket_sessions_open",
            "WebSocket sessions open now",
            websocket_open.clone(),
        );
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "gRPC calls answered on the gRPC port, by method and status",
            grpc_requests.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            websocket_sessions,
            websocket_open,
            grpc_requests,
        }
    }

    /// Records one answered request on route `path` (a bounded label, see the
    /// module docs).
    pub fn record(&self, path: &'static str, status: StatusCode, latency: Duration) {
        let labels = RequestLabels {
            path,
            code: status.as_u16(),
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&PathLabels { path })
            .observe(latency.as_secs_f64());
    }

    /// Records one gRPC call of `method` that ended with status `code` (its name,
    /// `OK` or `INVALID_ARGUMENT`, see [`crate::grpc::code_name`]).
    pub fn record_grpc(&self, method: &'static str, code: &'static str) {
        self.grpc_requests
            .get_or_create(&GrpcLabels { method, code })
            .inc();
    }

    /// Counts one WebSocket session as opened, and as open until the returned guard
    /// is dropped.
    pub fn websocket_opened(&self) -> WebSocketOpen {
        self.websocket_sessions.inc();
        self.websocket_open.inc();
        WebSocketOpen(self.websocket_open.clone())
    }

    /// Every metric in the OpenMetrics text format (see
    /// [`service_kit::metrics::CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        service_kit::metrics::encode(&self.registry)
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Keeps `backend_websocket_sessions_open` raised while it lives.
#[derive(Debug)]
pub struct WebSocketOpen(Gauge);

impl Drop for WebSocketOpen {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_route_and_code() {
        let metrics = Metrics::new();
        metrics.record("/", StatusCode::OK, Duration::from_millis(1));
        metrics.record("/", StatusCode::OK, Duration::from_millis(1));
        metrics.record("/work", StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO);
        let text = metrics.encode();
        for line in [
            r#"backend_requests_total{path="/",code="200"} 2"#,
            r#"backend_requests_total{path="/work",code="500"} 1"#,
            r#"backend_request_duration_seconds_count{path="/"} 2"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }

    #[test]
    fn grpc_calls_are_counted_by_method_and_status() {
        let metrics = Metrics::new();
        metrics.record_grpc("Get", "OK");
        metrics.record_grpc("Get", "OK");
        metrics.record_grpc("Watch", "INVALID_ARGUMENT");
        let text = metrics.encode();
        for line in [
            r#"backend_grpc_requests_total{method="Get",code="OK"} 2"#,
            r#"backend_grpc_requests_total{method="Watch",code="INVALID_ARGUMENT"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }

    #[test]
    fn websocket_sessions_are_counted_and_open_until_the_guard_drops() {
        let metrics = Metrics::new();
        let first = metrics.websocket_opened();
        let second = metrics.websocket_opened();
        drop(first);
        let text = metrics.encode();
        for line in [
            "backend_websocket_sessions_total 2",
            "backend_websocket_sessions_open 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        drop(second);
        assert!(
            metrics
                .encode()
                .lines()
                .any(|l| l == "backend_websocket_sessions_open 0")
        );
    }
}
