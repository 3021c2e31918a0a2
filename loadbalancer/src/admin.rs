//! Admin endpoints, on their own port (`adminPort`) so probes never queue behind
//! client traffic and are never reached through the proxied port.
//!
//! `/healthz` (liveness) answers 200 while the process can serve HTTP at all.
//! `/readyz` (readiness) answers 200 only once discovery has delivered a first
//! complete backend list and shutdown has not begun: that is when Kubernetes may
//! send traffic here. Further endpoints (metrics, a status page) are routed in
//! [`Admin::respond`].

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use serde_json::json;
use tokio::net::TcpListener;

use crate::backends::Backends;
use crate::response;
use crate::server;
use crate::shutdown::{Phase, Shutdown};

/// What the admin endpoints report on.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Readiness depends on discovery having synced this list.
    backends: Backends,
    /// Readiness turns false as soon as shutdown begins.
    shutdown: Shutdown,
}

impl Admin {
    /// Admin endpoints over the shared backend list and shutdown state.
    pub fn new(backends: Backends, shutdown: Shutdown) -> Self {
        Self { backends, shutdown }
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
            _ => response::json(
                StatusCode::NOT_FOUND,
                &json!({ "error": "not found", "path": path }),
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
