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
//!    yet, close at once), and `serve` returns once the last one has.
//!
//! One access-log line is written per request, with the `x-request-id` the load
//! balancer sends, so a request can be followed across both programs' logs; the
//! same outcome and latency are counted in the app's metrics.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::header::{CONNECTION, HeaderName, HeaderValue};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::handlers::{self, App, Body};

/// The header that carries a request's id across the load balancer and the backend.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How long `accept` errors (such as running out of file descriptors) are retried,
/// with a doubling pause, before `serve` gives up and returns the error.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(64);

/// Serves `app` on `listener` until `shutdown` completes, then shuts down gracefully
/// (see the module docs) and returns.
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
/// Returns an error only if accepting keeps failing for longer than the backoff allows.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    info!(addr = %listener.local_addr()?, pod = %app.identity().pod_name, "listening");

    let mut http = http1::Builder::new();
    // The timer enables hyper's header read timeout (30 s by default), which stops a
    // client that opens a connection and never finishes its request from holding it.
    http.timer(TokioTimer::new());
    // Each connection registers here; `shutdown()` tells them all to finish and
    // waits until the last one has dropped its watcher.
    let connections = GracefulShutdown::new();

    let mut stop_accepting = std::pin::pin!(async {
        shutdown.await;
        app.begin_shutdown();
        info!(delay = ?app.shutdown_delay(), "shutdown begun, readiness is now 503");
        tokio::time::sleep(app.shutdown_delay()).await;
    });

    loop {
        let (stream, peer) = tokio::select! {
            accepted = accept(&listener) => accepted?,
            () = &mut stop_accepting => break,
        };
        let app = app.clone();
        let service = service_fn(move |request| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(respond(&app, request).await) }
        });
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        // A task per connection: the accept loop goes straight back to accepting,
        // and a slow client only ever slows itself down.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }

    // Closing the listener first makes new connection attempts fail fast instead of
    // waiting in the kernel's backlog for an accept that will never come.
    drop(listener);
    info!(
        connections = connections.count(),
        in_flight = app.in_flight(),
        "listener closed, finishing in-flight requests"
    );
    connections.shutdown().await;
    info!("all connections closed");
    Ok(())
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
    if !app.is_ready() {
        // A keep-alive client (the load balancer's connection pool) would otherwise
        // keep reusing this connection until the port closes under it.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
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

/// Accepts one connection, retrying failures with a doubling pause.
///
/// Most accept errors are temporary (a connection reset before it was accepted, a
/// full file descriptor table that frees up); exiting on the first one would turn a
/// brief overload into a crash loop.
async fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listener.accept().await {
            Ok(accepted) => return Ok(accepted),
            Err(error) if backoff > MAX_ACCEPT_BACKOFF => return Err(error),
            Err(error) => {
                warn!(%error, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
}
