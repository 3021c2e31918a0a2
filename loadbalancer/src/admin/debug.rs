//! `/debug/backends`: a JSON snapshot of every backend's runtime state and of
//! discovery, for people (`curl | jq`) and for the `/status` page, which polls it.
//!
//! Everything is read from the shared state at request time: the list and the
//! [`BackendState`] beside each address, and the discovery status that `Backends`
//! carries. Times are wall-clock RFC 3339 strings; monotonic `Instant`s (ejection
//! deadlines) are converted on the way out.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::backend_state::BackendState;
use crate::backends::Backends;
use crate::backends::SourceKind;
use crate::proxy::PolicyStatus;
use crate::tls::CertInfo;
use crate::topology::{Proximity, TopologyStatus};
use crate::upstream::Http2Stats;

/// The whole document.
#[derive(Debug, Serialize)]
pub(super) struct Snapshot {
    /// In list order (sorted by address), so the status page's rows never jump.
    backends: Vec<BackendView>,
    discovery: DiscoveryView,
    /// Topology-aware routing: this replica's zone and node, what the Service
    /// asks for, which set is in use (`node`, `zone` or `all`) and why.
    topology: TopologyStatus,
    /// The HTTPS listener's certificates in force; absent without `tls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    certificates: Option<Vec<CertInfo>>,
    /// Open HTTP/2 connections to backends, and streams in flight on them,
    /// summed over the proxy's workers; empty when no backend speaks h2c.
    http2: Vec<Http2View>,
    /// The traffic policies in force (algorithm and `hashOn`, rate limits,
    /// concurrency limit) and the queue's length; absent without a proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<PolicyStatus>,
}

#[derive(Debug, Serialize)]
struct Http2View {
    /// Where the connections go (a backend's gRPC port, for `grpcPort`).
    address: SocketAddr,
    connections: usize,
    streams: usize,
}

#[derive(Debug, Serialize)]
struct BackendView {
    address: SocketAddr,
    /// The active health checks' verdict.
    healthy: bool,
    /// Whether outlier detection has ejected it right now.
    ejected: bool,
    /// When the current ejection ends, if `ejected`.
    ejected_until: Option<String>,
    /// Whether the balancer may pick it: healthy and not ejected.
    available: bool,
    /// Requests in flight, open tunnels included.
    in_flight: u64,
    /// Tunnels (WebSockets) open to it right now.
    tunnels: u64,
    requests: u64,
    failures: u64,
    last_latency_ms: Option<f64>,
    /// Its EndpointSlice's `zone`, if discovery read one.
    zone: Option<String>,
    /// Its EndpointSlice's `nodeName`, if discovery read one.
    node: Option<String>,
    /// How close that is to this replica: `same_node`, `same_zone`, `other`.
    locality: Proximity,
}

#[derive(Debug, Serialize)]
struct DiscoveryView {
    /// `static` or `kubernetes`; `null` if discovery has not started.
    source: Option<SourceKind>,
    /// Whether a first complete list has arrived (what `/readyz` waits for).
    synced: bool,
    /// Published lists that changed the backend set.
    updates: u64,
    last_sync: Option<String>,
    last_error: Option<ErrorView>,
}

#[derive(Debug, Serialize)]
struct ErrorView {
    at: String,
    message: String,
}

impl Snapshot {
    /// Reads the current state of `backends` and its discovery.
    pub(super) fn of(
        backends: &Backends,
        certificates: Option<Vec<CertInfo>>,
        http2: Vec<(SocketAddr, Http2Stats)>,
        policy: Option<PolicyStatus>,
    ) -> Self {
        let (now, wall_now) = (Instant::now(), SystemTime::now());
        let status = backends.discovery_status();
        Self {
            backends: backends
                .states()
                .iter()
                .map(|(address, state)| BackendView::of(*address, state, now, wall_now))
                .collect(),
            discovery: DiscoveryView {
                source: status.source(),
                synced: backends.is_synced(),
                updates: status.updates(),
                last_sync: status.last_sync().map(rfc3339),
                last_error: status.last_error().map(|error| ErrorView {
                    at: rfc3339(error.at),
                    message: error.message,
                }),
            },
            topology: backends.topology(),
            certificates,
            http2: http2
                .into_iter()
                .map(|(address, stats)| Http2View {
                    address,
                    connections: stats.connections,
                    streams: stats.streams,
                })
                .collect(),
            policy,
        }
    }
}

impl BackendView {
    fn of(address: SocketAddr, state: &BackendState, now: Instant, wall_now: SystemTime) -> Self {
        let ejected_until = state.ejected_until(now);
        let place = state.place();
        let place = place.as_deref();
        Self {
            address,
            healthy: state.is_healthy(),
            ejected: ejected_until.is_some(),
            ejected_until: ejected_until.map(|until| rfc3339(wall_now + (until - now))),
            available: state.is_available(now),
            in_flight: state.in_flight(),
            tunnels: state.tunnels(),
            requests: state.requests(),
            failures: state.failures(),
            last_latency_ms: state
                .last_latency()
                .map(|latency| latency.as_secs_f64() * 1000.0),
            zone: place.and_then(|p| p.zone.clone()),
            node: place.and_then(|p| p.node.clone()),
            locality: state.proximity(),
        }
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_ejected_backend_shows_until_when_and_is_not_available() {
        let addr: SocketAddr = "10.0.0.1:80".parse().expect("valid");
        let backends = Backends::new(vec![addr]);
        backends
            .state(addr)
            .eject_until(Instant::now() + Duration::from_secs(60));
        let json = serde_json::to_value(Snapshot::of(&backends, None, Vec::new(), None))
            .expect("serializes");
        let backend = &json["backends"][0];
        assert_eq!(backend["address"], "10.0.0.1:80");
        assert_eq!(backend["ejected"], true);
        assert_eq!(backend["available"], false);
        assert!(backend["ejected_until"].is_string(), "{backend}");
        assert_eq!(json["discovery"]["source"], serde_json::Value::Null);
        assert_eq!(backend["locality"], "other");
        assert_eq!(json["topology"]["in_use"], "all");
    }

    #[test]
    fn discovery_shows_its_source_and_last_error() {
        let backends = Backends::default();
        let status = backends.discovery_status();
        status.set_source(SourceKind::Kubernetes);
        status.record_error(&std::io::Error::other("connection refused"));
        let json = serde_json::to_value(Snapshot::of(&backends, None, Vec::new(), None))
            .expect("serializes");
        let discovery = &json["discovery"];
        assert_eq!(discovery["source"], "kubernetes");
        assert_eq!(discovery["synced"], false);
        assert_eq!(discovery["last_sync"], serde_json::Value::Null);
        assert_eq!(discovery["last_error"]["message"], "connection refused");
        assert!(discovery["last_error"]["at"].is_string());
        assert_eq!(json["backends"], serde_json::json!([]));
    }
}
