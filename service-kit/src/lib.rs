//! What the two servers of this workspace share: the load balancer and the demo
//! backend both depend on this crate, so what both need is written, compiled and
//! tested once.
//!
//! [`listener`] is the hardened accept loop, HTTP/1.1 and HTTP/2 on one port:
//! connection cap, idle and header-read timeouts, header size, request framing,
//! HTTP/2's stream and flood limits, and the graceful stop. Each binary plugs
//! its own service and its own shutdown signal into it (the load balancer in
//! `loadbalancer::server`, the backend in `backend::server`).
//!
//! [`headers`] reads comma-separated header lists and checks message framing, the
//! rules the accept loop applies to requests and the load balancer's upstream
//! client applies to responses.
//!
//! [`logging`] installs the `tracing` subscriber both binaries log through, text
//! or JSON on stdout, with a [`logging::LogHandle`] that changes level and format
//! while the process runs.
//!
//! [`config_watch`] tells a config reloader when the mounted config file has
//! changed ([`config_watch::ConfigFile`]), through the symlink swaps of a
//! Kubernetes ConfigMap volume.
//!
//! [`metrics`] writes a `prometheus-client` registry out as OpenMetrics text and
//! answers `GET /metrics` with it.
//!
//! Nothing here knows either binary: the kit is a library of parts, and each part
//! takes what it needs as arguments.

pub mod config_watch;
pub mod headers;
pub mod listener;
pub mod logging;
pub mod metrics;

/// Errors a service or a body may end with: anything hyper can log.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
