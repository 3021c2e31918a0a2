//! Server: accepts client connections and serves HTTP/1.1 on them until shutdown.
//!
//! The shape follows mini-redis's listener and hyper's graceful_shutdown example.
//! One task is spawned per connection, so a slow client or backend never holds up
//! the others. Each connection task races hyper's connection future against the
//! shutdown signal; when the signal wins, `graceful_shutdown()` lets the request in
//! progress finish and closes the connection instead of dropping it mid-response.
//! Every task holds a clone of an `mpsc::Sender`; when the last one is dropped the
//! receiver sees the channel close, which is how [`serve`] knows that all
//! in-flight requests are done.
//!
//! The same loop serves the proxy and the admin endpoints; only the service differs.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::proxy::{ClientConn, Proxy};
use crate::shutdown::Shutdown;

/// A client that has not sent a complete request head by then is disconnected,
/// so idle or trickling sockets cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// First and longest pause after a failed `accept` (e.g. EMFILE: out of file
/// descriptors). Retrying at once would spin; giving up would turn a transient
/// shortage into an outage.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves the reverse proxy on `listener` until shutdown; see [`serve`].
pub async fn serve_proxy(listener: TcpListener, proxy: Proxy, shutdown: Shutdown) {
    let make_service = move |peer: SocketAddr| {
        let proxy = proxy.clone();
        let client = ClientConn::new(peer);
        service_fn(move |req| {
            // The future must own what it uses: it outlives this closure call.
            let (proxy, client) = (proxy.clone(), client.clone());
            async move { Ok::<_, Infallible>(proxy.handle(req, &client).await) }
        })
    };
    serve(listener, make_service, shutdown).await;
}

/// Accepts connections on `listener` and serves each with the service that
/// `make_service` builds for its peer address. Returns once shutdown has stopped
/// the listener and every connection has finished its last request.
pub async fn serve<M, S, B>(listener: TcpListener, make_service: M, shutdown: Shutdown)
where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut http = http1::Builder::new();
    http.keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let http = Arc::new(http);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut backoff = ACCEPT_BACKOFF_START;

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.stopped() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_START;
                accepted
            }
            Err(error) => {
                warn!(%error, retry_in_ms = backoff.as_millis(), "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.stopped() => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let service = make_service(peer);
        let (http, shutdown, done) = (Arc::clone(&http), shutdown.clone(), done_tx.clone());
        tokio::spawn(async move {
            serve_connection(&http, stream, service, &shutdown).await;
            // Dropping the sender tells `serve` that this connection is done.
            drop(done);
        });
    }

    // Closing the listener makes the kernel refuse new connections from here on.
    drop(listener);
    drop(done_tx);
    // `recv` returns `None` once every connection task has dropped its sender.
    let _ = done_rx.recv().await;
}

async fn serve_connection<S, B>(
    http: &http1::Builder,
    stream: TcpStream,
    service: S,
    shutdown: &Shutdown,
) where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    // Responses are written in one go; don't let Nagle delay the last segment.
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%error, "cannot set TCP_NODELAY");
    }
    let connection = http.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.stopped() => {
            // Finish the request in progress (if any), then close; an idle
            // keep-alive connection closes at once.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    // Clients hanging up, header timeouts and the like are routine for a server.
    if let Err(error) = result {
        debug!(%error, "connection ended with an error");
    }
}
