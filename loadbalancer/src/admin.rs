//! Admin endpoints, on their own port (`adminPort`) so probes never queue behind
//! client traffic and are never reached through the proxied port.
//!
//! `/healthz` (liveness) answers 200 while the process can serve HTTP at all.
//! `/readyz` (readiness) answers 200 only once discovery has delivered a first
//! complete backend list and shutdown has not begun: that is when Kubernetes may
//! send traffic here.
//!
//! The rest is for operators: `/metrics` for Prometheus (OpenMetrics text),
//! `/debug/backends` (JSON, see [`debug`]) for people and scripts, and `/status`,
//! a self-contained HTML page embedded in the binary that polls `/debug/backends`
//! and draws each backend's share of the traffic and the traffic policies in
//! force, so it works offline and through `kubectl port-forward`.

mod debug;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use serde_json::json;
use tokio::net::TcpListener;

use crate::backends::Backends;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::response;
use crate::server;
use crate::shutdown::{Phase, Shutdown};
use crate::tls::Tls;

/// What the admin endpoints report on.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Readiness depends on discovery having synced this list.
    backends: Backends,
    /// Readiness turns false as soon as shutdown begins.
    shutdown: Shutdown,
    /// What `/metrics` serves; the proxy records into the same instance.
    metrics: Arc<Metrics>,
    /// The HTTPS listener's certificates, shown by `/debug/backends` and the
    /// status page; `None` without `tls`.
    tls: Option<Tls>,
    /// The workers' proxies, whose HTTP/2 connections to backends are shown.
    proxies: Vec<Proxy>,
}

/// The status page: HTML with inline CSS and JavaScript, no external assets.
const STATUS_PAGE: &str = include_str!("admin/status.html");

impl Admin {
    /// Admin endpoints over the shared backend list, shutdown state and metrics.
    pub fn new(backends: Backends, shutdown: Shutdown, metrics: Arc<Metrics>) -> Self {
        Self {
            backends,
            shutdown,
            metrics,
            tls: None,
            proxies: Vec::new(),
        }
    }

    /// Shows the HTTP/2 connections of these proxies to the backends.
    pub fn with_proxies(mut self, proxies: Vec<Proxy>) -> Self {
        self.proxies = proxies;
        self
    }

    /// Shows the certificates of `tls`, when there is one.
    pub fn with_tls(mut self, tls: Option<Tls>) -> Self {
        self.tls = tls;
        self
    }

    /// Routes one admin request.
    pub fn respond<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return response::json(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({ "error": "only GET and HEAD are allowed" }),
            );
        }
        match path {
            "/healthz" => response::json(StatusCode::OK, &json!({ "status": "ok" })),
            "/readyz" => self.readiness(),
            "/metrics" => service_kit::metrics::response(self.metrics.encode()),
            "/debug/backends" => self.debug_backends(),
            "/status" => response::typed(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE),
            _ => response::json(
                StatusCode::NOT_FOUND,
                &json!({ "error": "not found", "path": path }),
            ),
        }
    }

    fn debug_backends(&self) -> Response<Full<Bytes>> {
        let certificates = self.tls.as_ref().map(Tls::certificates);
        let http2 = Proxy::http2_stats(&self.proxies);
        let policy = self.proxies.first().map(Proxy::policy_status);
        let snapshot = debug::Snapshot::of(&self.backends, certificates, http2, policy);
        match serde_json::to_vec(&snapshot) {
            Ok(body) => {
                let mut response = response::typed(StatusCode::OK, "application/json", body);
                // The status page polls this; a cached copy would freeze it.
                response.headers_mut().insert(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_static("no-store"),
                );
                response
            }
            // Only string-keyed structs are serialized, which cannot fail; answer
            // rather than panic all the same.
            Err(error) => response::json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({ "error": error.to_string() }),
            ),
        }
    }

    fn readiness(&self) -> Response<Full<Bytes>> {
        let not_ready = if self.shutdown.phase() != Phase::Serving {
            Some("shutting down")
        } else if !self.backends.is_synced() {
            Some("discovery has not synced yet")
        } else {
            None
        };
        match not_ready {
            Some(reason) => response::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "ready": false, "reason": reason }),
            ),
            None => response::json(
                StatusCode::OK,
                &json!({ "ready": true, "backends": self.backends.with(<[_]>::len) }),
            ),
        }
    }
}

/// Serves the admin endpoints on `listener` until shutdown stops it.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: Shutdown) {
    let make_service = move |_peer| {
        let admin = admin.clone();
        service_fn(move |req| std::future::ready(Ok::<_, Infallible>(admin.respond(&req))))
    };
    server::serve(listener, make_service, shutdown).await;
}
