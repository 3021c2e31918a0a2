//! Server: accepts client connections and serves HTTP/1.1 and HTTP/2 on them
//! until shutdown.
//!
//! The accept loop itself, with its limits (connection cap, header and idle
//! timeouts, header size, framing checks, HTTP/2's streams, windows and flood
//! guards) and its graceful stop, lives in [`service_kit::listener`], which the
//! backend runs too. This module plugs the load balancer into it: the proxy and
//! admin services, and [`Shutdown`] as the signal. While shutdown drains,
//! HTTP/1.1 responses carry `Connection: close` and HTTP/2 connections are sent
//! GOAWAY; once it stops, the listener closes and open requests finish (by force
//! after `shutdownTimeoutSeconds`).
//!
//! Both protocols arrive on the same ports. A connection whose first bytes are
//! HTTP/2's preface is served as HTTP/2: cleartext with prior knowledge (h2c) on
//! the plain port, and on the TLS port after ALPN agreed on `h2` (see
//! [`crate::tls`]); anything else is HTTP/1.1. An HTTP/2 request reaches the
//! proxy as any other, with its `:authority` as the target's authority, and goes
//! on to the backends as HTTP/1.1 (see `proxy::headers`).
//!
//! The same loop serves the proxy and the admin endpoints; only the service differs.

use std::convert::Infallible;
use std::net::SocketAddr;

use futures::FutureExt;
use hyper::service::service_fn;
use service_kit::listener::{self, Lifecycle, Plain};
use tokio::net::TcpListener;

use crate::proxy::{ClientConn, Proxy, Scheme, Target};
use crate::shutdown::{Phase, Shutdown};
use crate::tls::Tls;
pub use service_kit::listener::{
    ConnectionCap, ConnectionService, Http2Limits, ResponseBody, ServerLimits, bind,
};

impl Lifecycle for Shutdown {
    fn stopped(&self) -> impl Future<Output = ()> + Send {
        Shutdown::stopped(self)
    }

    fn draining(&self) -> bool {
        self.phase() != Phase::Serving
    }
}

/// How clients come in on one of the proxy's ports.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Plain HTTP, proxied.
    Http,
    /// Plain HTTP, every request redirected to HTTPS on this port
    /// (`tls.redirectHttp`).
    RedirectToHttps(u16),
    /// HTTPS: a TLS handshake, then HTTP, proxied.
    Https(Tls),
    /// Plain HTTP (gRPC clients, `grpcPort`), proxied to the backends' gRPC
    /// port.
    Grpc,
}

/// Serves the reverse proxy on `listener`, entered as `entry` says, until
/// shutdown; see [`serve_with`].
pub async fn serve_proxy(
    listener: TcpListener,
    entry: Entry,
    proxy: Proxy,
    shutdown: Shutdown,
    limits: ServerLimits,
    cap: ConnectionCap,
) {
    let (scheme, https_redirect, target) = match &entry {
        Entry::Http => (Scheme::Http, None, Target::BackendPort),
        Entry::RedirectToHttps(port) => (Scheme::Http, Some(*port), Target::BackendPort),
        Entry::Https(_) => (Scheme::Https, None, Target::BackendPort),
        Entry::Grpc => (Scheme::Http, None, Target::GrpcPort),
    };
    let make_service = move |peer: SocketAddr| {
        let proxy = proxy.clone();
        let client = ClientConn::new(peer, scheme, https_redirect).with_target(target);
        service_fn(move |req| proxy.handle(req, &client).map(Ok::<_, Infallible>))
    };
    match entry {
        Entry::Https(tls) => {
            listener::serve_connections(listener, tls, make_service, shutdown, limits, cap).await;
        }
        Entry::Http | Entry::RedirectToHttps(_) | Entry::Grpc => {
            listener::serve_connections(listener, Plain, make_service, shutdown, limits, cap).await;
        }
    }
}

/// [`serve_with`] under the default [`ServerLimits`].
pub async fn serve<M, S, B>(listener: TcpListener, make_service: M, shutdown: Shutdown)
where
    M: Fn(SocketAddr) -> S,
    S: ConnectionService<B> + Send + 'static,
    B: ResponseBody,
{
    serve_with(listener, make_service, shutdown, ServerLimits::DEFAULT).await;
}

/// Accepts connections on `listener` and serves each with the service that
/// `make_service` builds for its peer address. Returns once shutdown has stopped
/// the listener and every connection has finished its last request, or been
/// closed by force after `limits.shutdown_timeout`.
pub async fn serve_with<M, S, B>(
    listener: TcpListener,
    make_service: M,
    shutdown: Shutdown,
    limits: ServerLimits,
) where
    M: Fn(SocketAddr) -> S,
    S: ConnectionService<B> + Send + 'static,
    B: ResponseBody,
{
    let cap = ConnectionCap::new(limits.max_connections);
    listener::serve_connections(listener, Plain, make_service, shutdown, limits, cap).await;
}
