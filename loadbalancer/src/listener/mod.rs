//! Listener: the hardened accept loop that both servers share, the load balancer's
//! (proxy and admin) and the backend's, so that both answer bad input and floods
//! alike. The backend crate compiles this same file (`#[path]` in its `lib.rs`):
//! the workspace deliberately has just the two crates, and one copy of the rules
//! beats two that drift. Nothing here may name either crate's other modules.
//!
//! The shape follows mini-redis's listener and hyper's graceful_shutdown example.
//! One task is spawned per connection, so a slow client never holds up the others.
//! Each connection task races hyper's connection future against the shutdown
//! signal; when the signal wins, `graceful_shutdown()` lets the request in progress
//! finish and closes the connection instead of dropping it mid-response (an idle
//! keep-alive connection closes at once). The tasks live in a `JoinSet`, so
//! [`serve_connections`] can wait for the last one and, if they outlast the
//! shutdown timeout, close the rest by force.
//!
//! Around that skeleton sit the limits a server facing the network needs
//! ([`ServerLimits`]):
//!
//! * a listen backlog of [`LISTEN_BACKLOG`] ([`listening_socket`]), not the 128
//!   that the standard library and tokio ask for: a proxy opening a few hundred
//!   connections at once would overflow 128, and each dropped SYN costs its
//!   client a one-second retransmit;
//! * at most `maxConnections` open connections: a semaphore permit is taken
//!   *before* `accept`, as in mini-redis, so at the cap new connections wait in the
//!   kernel's listen backlog (and are refused by the kernel once that is full)
//!   instead of costing memory and file descriptors here;
//! * failed `accept`s (EMFILE: out of file descriptors) are retried with a growing
//!   pause rather than ending the server;
//! * `maxHeaderBytes`: hyper answers a larger request head with 431 and closes;
//!   a malformed request line or header gets hyper's automatic 400;
//! * idle and header-read timeouts, kept by the [`watchdog`];
//! * request framing that could smuggle a request through is refused with 400
//!   ([`framing_error`] lists what hyper already refuses and what is left to us);
//! * while the server drains, every response carries `Connection: close`, so
//!   clients finish their current request here and reconnect, most likely to a
//!   replica that is not going away.

mod watchdog;

use std::error::Error as StdError;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryFutureExt;
use futures::future;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::{Service, service_fn};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use watchdog::{Activity, Expired, TrackedBody, TrackedIo};

/// Connections the kernel queues on a listening socket, accepted or not yet,
/// before it drops new ones. It caps this at `net.core.somaxconn` (4096 by
/// default since Linux 5.4).
pub(crate) const LISTEN_BACKLOG: i32 = 1024;

/// A non-blocking listening socket on `addr` with a backlog of
/// [`LISTEN_BACKLOG`]; with `share_port`, other sockets may listen on the same
/// port and the kernel spreads new connections across them (the load
/// balancer's per-core workers).
pub(crate) fn listening_socket(addr: SocketAddr, share_port: bool) -> io::Result<StdTcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR lets a restarted process bind while old connections linger
    // in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if share_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Listens on `addr` with a backlog of 1,024 pending connections, not the 128
/// of `tokio::net::TcpListener::bind`: a load balancer opening a few hundred
/// connections at once would overflow 128, and each dropped SYN costs a
/// one-second retransmit. Call it inside the runtime.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(listening_socket(addr, false)?)
}

/// First and longest pause after a failed `accept`. Retrying at once would spin;
/// giving up would turn a transient shortage into an outage.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What one listener allows its clients. The defaults are the config defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// A request head must be complete this long after its first byte arrived
    /// (`headerReadTimeoutMs`): cuts off clients that trickle headers (slowloris).
    pub header_read_timeout: Duration,
    /// A connection with no request in progress and nothing arriving is closed
    /// after this long (`idleTimeoutMs`); a fresh connection counts as idle.
    pub idle_timeout: Duration,
    /// Open client connections at most (`maxConnections`); bounds memory and
    /// file descriptors under a flood.
    pub max_connections: usize,
    /// Largest request head, request line included (`maxHeaderBytes`); larger
    /// heads get 431.
    pub max_header_bytes: usize,
    /// After the listener has stopped, how long open requests may take before
    /// their connections are closed by force (`shutdownTimeoutSeconds`).
    pub shutdown_timeout: Duration,
}

impl ServerLimits {
    /// The documented defaults. Drain 5 s + shutdown timeout 20 s fit inside
    /// Kubernetes' `terminationGracePeriodSeconds` of 30.
    pub const DEFAULT: Self = Self {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 10_000,
        max_header_bytes: 16 * 1024,
        shutdown_timeout: Duration::from_secs(20),
    };
}

impl ServerLimits {
    /// The accepted range of `shutdownTimeoutSeconds`, in both programs'
    /// configs. These ranges' upper bounds catch unit mix-ups (seconds written
    /// into a milliseconds key) as much as absurd values.
    pub const SHUTDOWN_TIMEOUT_SECONDS: RangeInclusive<u64> = 1..=3600;
    /// The accepted range of `headerReadTimeoutMs` and `idleTimeoutMs`: up to an hour.
    pub const TIMEOUT_MS: RangeInclusive<u64> = 1..=3_600_000;
    /// The accepted range of `maxConnections`.
    pub const MAX_CONNECTIONS: RangeInclusive<usize> = 1..=1_000_000;
    /// The accepted range of `maxHeaderBytes`.
    pub const MAX_HEADER_BYTES: RangeInclusive<usize> = 1024..=1024 * 1024;
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Errors a service or a body may end with: anything hyper can log.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// A service the accept loop can serve: it answers each request of a connection
/// with a `Response<B>`, and its futures may move between tasks. Implemented for
/// every such service; it exists to name the bounds once instead of in every
/// function on the way from `serve` to hyper.
#[allow(
    unreachable_pub,
    reason = "the load balancer re-exports it; the backend, which compiles this file too, does not"
)]
pub trait ConnectionService<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Error: Into<BoxError> + Send + 'static,
        Future: Send + 'static,
    >
{
}

impl<S, B> ConnectionService<B> for S
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
}

/// A response body the accept loop can write: bytes, streamed, with errors
/// hyper can log. Implemented for every such body, like [`ConnectionService`].
#[allow(
    unreachable_pub,
    reason = "the load balancer re-exports it; the backend, which compiles this file too, does not"
)]
pub trait ResponseBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

impl<B> ResponseBody for B
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
}

/// Where the owning server is in its shutdown, as the accept loop needs to know.
pub(crate) trait Lifecycle: Clone + Send + Sync + 'static {
    /// Resolves once the listener must stop accepting (at once if it already
    /// must).
    fn stopped(&self) -> impl Future<Output = ()> + Send;
    /// Whether shutdown has begun, so responses should close their connection.
    fn draining(&self) -> bool;
}

/// Accepts connections on `listener` and serves each with the service that
/// `make_service` builds for its peer address. Returns once `lifecycle` has
/// stopped the listener and every connection has finished its last request, or
/// been closed by force after `limits.shutdown_timeout`.
pub(crate) async fn serve_connections<M, S, B, L>(
    listener: TcpListener,
    make_service: M,
    lifecycle: L,
    limits: ServerLimits,
) where
    M: Fn(SocketAddr) -> S,
    S: ConnectionService<B> + Send + 'static,
    B: ResponseBody,
    L: Lifecycle,
{
    let mut http = http1::Builder::new();
    http.keep_alive(true)
        .max_header_size(limits.max_header_bytes)
        // hyper's own timer would also count the wait between keep-alive
        // requests as header time; the watchdog keeps both clocks instead.
        .header_read_timeout(None);
    let http = Arc::new(http);
    // One permit per open connection; the task serving it holds the permit.
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_START;
    let mut at_cap = false;

    loop {
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                at_cap = false;
                permit
            }
            Err(_) => {
                if !at_cap {
                    at_cap = true;
                    warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached; new connections wait in the listen backlog"
                    );
                }
                tokio::select! {
                    permit = Arc::clone(&permits).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        // Only a closed semaphore fails, and this one is never closed.
                        Err(_) => break,
                    },
                    () = lifecycle.stopped() => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = lifecycle.stopped() => break,
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
                    () = lifecycle.stopped() => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let service = make_service(peer);
        let (http, lifecycle) = (Arc::clone(&http), lifecycle.clone());
        connections.spawn(async move {
            serve_connection(&http, stream, peer, service, &lifecycle, &limits).await;
            // Frees the slot for the next connection waiting in the backlog.
            drop(permit);
        });
        // Reap finished tasks as we go, so the set only holds open connections.
        while connections.try_join_next().is_some() {}
    }

    // Closing the listener makes the kernel refuse new connections from here on.
    drop(listener);
    if !connections.is_empty() {
        info!(
            connections = connections.len(),
            "listener closed, finishing in-flight requests"
        );
    }
    let finished = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(
            cut = connections.len(),
            timeout_ms = limits.shutdown_timeout.as_millis(),
            "shutdown timeout reached, closing connections with requests in flight"
        );
        // Aborting a task drops its connection, which closes the socket.
        connections.shutdown().await;
    }
}

async fn serve_connection<S, B, L>(
    http: &http1::Builder,
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    lifecycle: &L,
    limits: &ServerLimits,
) where
    S: ConnectionService<B>,
    B: ResponseBody,
    L: Lifecycle,
{
    // Responses are written in one go; don't let Nagle delay the last segment.
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%error, "cannot set TCP_NODELAY");
    }
    let activity = Activity::new();
    let io = TokioIo::new(TrackedIo::new(stream, Arc::clone(&activity)));
    let service = guarded(service, Arc::clone(&activity), lifecycle.clone());
    // With upgrades, a service that answers 101 Switching Protocols (the backend's
    // `/ws`) takes the socket over through `hyper::upgrade::on`. This future then
    // ends, and with it the watchdog's timeouts, the connection's slot and the
    // shutdown's wait: the upgraded socket is the service's to bound and to close.
    let connection = http.serve_connection(io, service).with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = lifecycle.stopped(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            expired = activity.expired(limits.idle_timeout, limits.header_read_timeout) => {
                // Nothing is in flight in either case, so dropping the connection
                // (closing the socket) loses no response.
                match expired {
                    Expired::Idle => debug!(%peer, "closing idle connection"),
                    Expired::HeaderRead => info!(%peer, "request head too slow, closing connection"),
                }
                return;
            }
        }
    };
    // Clients hanging up, malformed requests and the like are routine for a server.
    if let Err(error) = result {
        debug!(%peer, %error, "connection ended with an error");
    }
}

/// Wraps a connection's service with what every request gets, whatever the
/// service: the framing check, request tracking for the watchdog, and
/// `Connection: close` once shutdown has begun.
fn guarded<S, B, L>(
    service: S,
    activity: Arc<Activity>,
    lifecycle: L,
) -> impl Service<
    Request<Incoming>,
    Response = Response<TrackedBody<Either<B, Full<Bytes>>>>,
    Error = S::Error,
    Future = impl Future + Send + 'static,
>
where
    S: ConnectionService<B>,
    B: ResponseBody,
    L: Lifecycle,
{
    service_fn(move |req: Request<Incoming>| {
        let request = activity.request_started();
        let lifecycle = lifecycle.clone();
        // Combinators, not an `async` block: a block would keep the inner
        // future twice, once as the value it captured and once as the future
        // it awaits (rustc gives the two separate slots), and hyper keeps this
        // future for every connection with a request in flight.
        let answer = match framing_error(req.headers()) {
            Some(reason) => {
                debug!(reason, "refused request framing");
                future::Either::Right(future::ready(Ok(bad_request(reason).map(Either::Right))))
            }
            None => future::Either::Left(
                service
                    .call(req)
                    .map_ok(|response| response.map(Either::Left)),
            ),
        };
        answer.map_ok(move |mut response| {
            if lifecycle.draining() {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response.map(|body| TrackedBody::new(body, request))
        })
    })
}

/// Why a request's framing is refused, if it is.
///
/// hyper (1.x, `proto/h1/role.rs`) already answers 400 for an invalid or
/// conflicting `Content-Length`, a `Transfer-Encoding` whose last coding is not
/// `chunked` (an unknown coding included), and `Transfer-Encoding` in HTTP/1.0.
/// When `Transfer-Encoding: chunked` and `Content-Length` arrive together it does
/// what RFC 9112 section 6.3 asks: it frames the body by chunked alone, drops
/// `Content-Length`, and closes the connection after the response, so bytes after
/// the chunked body are never read as a second request. What is left for us is a
/// coding before `chunked` (`gzip, chunked`, or `chunked` twice): we do not decode
/// transfer codings, and `Transfer-Encoding` is hop-by-hop, so a proxy would hand
/// the backend a body in a coding it was never told about.
pub(crate) fn framing_error(headers: &HeaderMap) -> Option<&'static str> {
    let mut codings = list_items(headers, TRANSFER_ENCODING);
    match (codings.next(), codings.next()) {
        (None, _) => None,
        (Some(coding), None) if coding.eq_ignore_ascii_case(b"chunked") => None,
        _ => Some("unsupported transfer coding: only a single \"chunked\" is accepted"),
    }
}

/// The items of a comma-separated header field, over all its lines, with the
/// whitespace around them trimmed and empty ones skipped, as RFC 9110 section
/// 5.6.1 asks of a recipient. Bytes, not `str`: a stray non-ASCII byte in one
/// item does not hide the others.
pub(crate) fn list_items(
    headers: &HeaderMap,
    name: HeaderName,
) -> impl DoubleEndedIterator<Item = &[u8]> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// The 400 for refused framing. The body was not read, so the connection cannot
/// carry another request: `Connection: close`.
fn bad_request(reason: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": "bad request", "message": reason });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(te: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in te {
            headers.append(
                TRANSFER_ENCODING,
                HeaderValue::from_str(value).expect("valid"),
            );
        }
        headers
    }

    #[test]
    fn plain_chunked_and_no_coding_are_accepted() {
        assert_eq!(framing_error(&headers(&[])), None);
        assert_eq!(framing_error(&headers(&["chunked"])), None);
        assert_eq!(framing_error(&headers(&[" Chunked "])), None);
    }

    #[test]
    fn any_other_coding_list_is_refused() {
        for te in [
            &["gzip, chunked"][..],
            &["chunked, chunked"],
            &["gzip", "chunked"],
            &["chunked", "chunked"],
        ] {
            assert!(framing_error(&headers(te)).is_some(), "{te:?} accepted");
        }
    }

    #[test]
    fn list_items_span_lines_trim_whitespace_and_skip_empty_items() {
        let mut headers = headers(&["gzip ,, ", "\tchunked,x"]);
        headers.append(
            TRANSFER_ENCODING,
            HeaderValue::from_bytes(b"caf\xe9, br").expect("obs-text is a valid value"),
        );
        let items: Vec<&[u8]> = list_items(&headers, TRANSFER_ENCODING).collect();
        let expected: [&[u8]; 5] = [b"gzip", b"chunked", b"x", b"caf\xe9", b"br"];
        assert_eq!(items, expected);
        assert_eq!(
            list_items(&headers, TRANSFER_ENCODING).next_back(),
            Some(&b"br"[..])
        );
        assert_eq!(list_items(&headers, CONNECTION).next(), None);
    }

    /// More connections than tokio's own `bind` would queue (128), none of
    /// them accepted yet: with the larger backlog every handshake completes.
    /// With a full queue the kernel drops the SYN, the connect never
    /// completes, and the test fails on its timeout.
    #[tokio::test]
    async fn a_burst_of_unaccepted_connections_fits_in_the_backlog() {
        const BURST: usize = 200;
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let listener = bind(addr).expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound socket has an address");
        let mut clients = Vec::with_capacity(BURST);
        for _ in 0..BURST {
            let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr));
            let client = connect
                .await
                .expect("the handshake completes while nobody accepts")
                .expect("connected");
            clients.push(client);
        }
        for _ in 0..BURST {
            listener.accept().await.expect("each one is accepted");
        }
    }
}
