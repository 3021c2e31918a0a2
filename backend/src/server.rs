//! The accept loop: takes TCP connections, speaks HTTP/1.1 on them with hyper, hands
//! each request to [`App::handle`], and shuts down gracefully.
//!
//! Every connection gets its own task, so a slow request (a `/work?sleep_ms=` for
//! example) never holds up another connection. Shutdown happens in three steps,
//! which is what Kubernetes expects from a pod that is being terminated:
//!
//! 1. the `shutdown` future completes (SIGTERM or Ctrl-C in the binary): readiness
//!    turns false at once, so `/readyz` answers 503;
//! 2. for the app's shutdown delay the server keeps accepting and answering, marking
//!    responses `Connection: close`, while endpoint watchers drop the pod;
//! 3. the listener closes, every connection is asked to finish its current request
//!    and close (idle keep-alive connections, and ones that have not sent a request
//!    yet, close at once), every WebSocket session is sent a Close frame (1001,
//!    going away), and `serve` returns once the last connection and session have
//!    ended, or once `shutdownTimeoutSeconds` has passed and the rest have been
//!    closed by force.
//!
//! The accept loop, its limits (connection cap, header and idle timeouts, header
//! size, request framing) and the stop itself are [`service_kit::listener`], which
//! the load balancer runs too, so both servers treat bad input and floods the same
//! way. This module supplies the service and the signal.
//!
//! One access-log line is written per request, with the `x-request-id` the load
//! balancer sends, so a request can be followed across both programs' logs; the
//! same outcome and latency are counted in the app's metrics.

use std::convert::Infallible;
use std::io;
use std::time::{Duration, Instant};

use http::header::HeaderName;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use service_kit::listener::{self, Lifecycle};
pub use service_kit::listener::{ServerLimits, bind};

use crate::handlers::{self, App, Body};

/// The header that carries a request's id across the load balancer and the backend.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The backend's default limits: the shared defaults, except that idle client
/// connections are kept for 120 s. The backend's main client is the load
/// balancer's connection pool, which drops idle connections after at most 80 s; closing
/// them here first would race with a request the pool is just sending.
pub const DEFAULT_LIMITS: ServerLimits = ServerLimits {
    idle_timeout: Duration::from_secs(120),
    ..ServerLimits::DEFAULT
};

/// Serves `app` on `listener` under [`DEFAULT_LIMITS`] until `shutdown` completes,
/// then shuts down gracefully (see the module docs) and returns.
///
/// The caller binds the listener, so tests and the load balancer's tests can bind
/// `127.0.0.1:0` and read the port back:
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// use backend::{handlers::App, identity::Identity, server};
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr()?;
/// let identity = Identity {
///     pod_name: "backend-0".into(),
///     pod_ip: addr.ip().to_string(),
///     service_name: "backend".into(),
/// };
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let server = tokio::spawn(server::serve(listener, App::new(identity), async {
///     let _ = stopped.await;
/// }));
/// // ... send requests to `addr` ...
/// let _ = stop.send(());
/// server.await.expect("server task panicked")?;
/// # Ok(())
/// # }
/// ```
///
/// Failed `accept`s are retried, never returned; the error is only for a listener
/// without a local address.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, app, shutdown, DEFAULT_LIMITS).await
}

/// [`serve`] with the given limits.
pub async fn serve_with(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
    limits: ServerLimits,
) -> io::Result<()> {
    info!(addr = %listener.local_addr()?, pod = %app.identity().pod_name, "listening");

    let (stop, stopped) = watch::channel(false);
    let lifecycle = Stage {
        app: app.clone(),
        stopped,
    };
    let make_service = |_peer| {
        let app = app.clone();
        service_fn(move |request| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(respond(&app, request).await) }
        })
    };
    let cap = listener::ConnectionCap::new(limits.max_connections);
    let serving = listener::serve_connections(
        listener,
        listener::Plain,
        make_service,
        lifecycle,
        limits,
        cap,
    );
    let stopping = async {
        shutdown.await;
        app.begin_shutdown();
        info!(delay = ?app.shutdown_delay(), "shutdown begun, readiness is now 503");
        tokio::time::sleep(app.shutdown_delay()).await;
        info!(
            in_flight = app.in_flight(),
            websocket_sessions = app.websocket_sessions(),
            "closing the listener"
        );
        stop.send_replace(true);
        // Upgraded sockets have left the listener, so its shutdown does not reach
        // them; they get the same time to finish as its connections.
        app.close_websockets(limits.shutdown_timeout).await;
    };
    // Both halves run on this task: `serving` returns only after `stopping` has
    // told it to, and once every connection is done.
    tokio::join!(serving, stopping);
    info!("all connections closed");
    Ok(())
}

/// Where a backend is in its shutdown, for the shared accept loop.
#[derive(Debug, Clone)]
struct Stage {
    /// Not ready means shutdown has begun: responses close their connection.
    app: App,
    /// Turns true when the delay is over and the listener must close.
    stopped: watch::Receiver<bool>,
}

impl Lifecycle for Stage {
    fn stopped(&self) -> impl Future<Output = ()> + Send {
        let mut stopped = self.stopped.clone();
        async move {
            // An error means the sender is gone, which only happens once `serve`
            // is over: stopped either way.
            let _ = stopped.wait_for(|&stopped| stopped).await;
        }
    }

    fn draining(&self) -> bool {
        !self.app.is_ready()
    }
}

/// Answers one request through the app, echoes its request id and logs it.
async fn respond(app: &App, request: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let request_id = request.headers().get(REQUEST_ID).cloned();
    let id = request_id
        .as_ref()
        .and_then(|id| id.to_str().ok())
        .unwrap_or("-");
    debug!(%method, %path, request_id = %id, "request started");

    let mut response = app.handle(request).await;

    if let Some(id) = &request_id {
        response.headers_mut().insert(REQUEST_ID, id.clone());
    }
    // Once readiness is off, the listener adds `Connection: close`: a keep-alive
    // client (the load balancer's pool) would otherwise keep reusing this
    // connection until the port closes under it.
    let latency = start.elapsed();
    app.metrics()
        .record(handlers::route_label(&path), response.status(), latency);
    info!(
        %method,
        %path,
        status = response.status().as_u16(),
        // Whole microseconds, shown as milliseconds: enough precision, no float noise.
        latency_ms = latency.as_micros() as f64 / 1000.0,
        pod = %app.identity().pod_name,
        request_id = %id,
        "request"
    );
    response
}
