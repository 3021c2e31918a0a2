//! Listener: the hardened accept loop that every server in the workspace runs,
//! the load balancer's (proxy and admin) and the backend's, so that both answer
//! bad input and floods alike. A server supplies a service per connection and a
//! [`Lifecycle`] (when to stop accepting, whether to close connections after their
//! response); [`serve_connections`] does the rest.
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
//! * idle and header-read timeouts, kept by the `watchdog` submodule;
//! * request framing that could smuggle a request through is refused with 400
//!   ([`framing_error`] lists what hyper already refuses and what is left to us);
//! * while the server drains, every response carries `Connection: close`, so
//!   clients finish their current request here and reconnect, most likely to a
//!   replica that is not going away.
//!
//! Before HTTP, a connection may need a [`Handshake`]: none for plain HTTP
//! ([`Plain`]), or TLS (the load balancer's). It runs in the connection's own
//! task, holding the connection's slot, and within `headerReadTimeoutMs`, so a
//! client that opens a connection and sends nothing (or half a ClientHello) is
//! closed on time as one that trickles a request head is.

mod watchdog;

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::TryFutureExt;
use futures::future;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::{Service, service_fn};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use watchdog::{Activity, Expired, TrackedBody, TrackedIo};

use crate::BoxError;
use crate::headers::framing_error;

/// Connections the kernel queues on a listening socket, accepted or not yet,
/// before it drops new ones. It caps this at `net.core.somaxconn` (4096 by
/// default since Linux 5.4).
pub const LISTEN_BACKLOG: i32 = 1024;

/// A non-blocking listening socket on `addr` with a backlog of
/// [`LISTEN_BACKLOG`]. Several runtimes can accept from it through clones of it
/// (`try_clone`): they share its one backlog (the load balancer's per-core
/// workers).
pub fn listening_socket(addr: SocketAddr) -> io::Result<StdTcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR lets a restarted process bind while old connections linger
    // in TIME_WAIT.
    socket.set_reuse_address(true)?;
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
    TcpListener::from_std(listening_socket(addr)?)
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

/// The connection cap (`maxConnections`) of every listener that shares it: one
/// slot per open connection, taken before `accept`, so at the cap new
/// connections wait in the listen backlog. Clones share the slots: the proxy's
/// workers, accepting from one socket, share one cap, which is what the config
/// promises for the process. A connection keeps its slot for as long as its
/// socket is open, after an upgrade (a WebSocket) too.
///
/// Workers that accept from one socket also share it fairly ([`Self::shared`]):
/// whichever worker wakes first could otherwise take a whole burst of new
/// connections, and long-lived ones (WebSockets, keep-alive clients) would stay
/// unevenly spread for their whole life, one core busy while another idles.
#[derive(Debug, Clone)]
pub struct ConnectionCap {
    slots: Arc<Semaphore>,
    max: usize,
    /// This worker's place among the workers sharing the sockets; `None` for a
    /// listener of its own.
    spread: Option<Spread>,
}

impl ConnectionCap {
    /// A cap of `max` open connections.
    pub fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            spread: None,
        }
    }

    /// One cap of `max` for `workers` workers that accept from the same
    /// sockets, a handle for each. Besides sharing the slots, a worker that
    /// holds more open connections than the least busy one (plus
    /// [`SPREAD_SLACK`]) lets the others accept first, for at most
    /// [`SPREAD_WAIT`], so a burst is spread evenly and a busy worker never
    /// holds up an accept for long.
    pub fn shared(max: usize, workers: usize) -> Vec<Self> {
        let cap = Self::new(max);
        let open: Arc<[AtomicUsize]> = (0..workers).map(|_| AtomicUsize::new(0)).collect();
        let changed = Arc::new(Notify::new());
        (0..workers)
            .map(|worker| Self {
                spread: Some(Spread {
                    open: Arc::clone(&open),
                    worker,
                    changed: Arc::clone(&changed),
                }),
                ..cap.clone()
            })
            .collect()
    }

    /// Turns a slot into a connection's place, counted for its worker.
    fn admit(&self, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            _permit: permit,
            _open: self.spread.clone().map(Spread::opened),
        }
    }
}

/// How many more open connections than the least busy worker a worker may hold
/// and still accept at once.
pub const SPREAD_SLACK: usize = 1;

/// The longest a worker over its share waits for another to accept.
pub const SPREAD_WAIT: Duration = Duration::from_millis(2);

/// The open connections of each worker sharing the sockets.
#[derive(Debug, Clone)]
struct Spread {
    open: Arc<[AtomicUsize]>,
    worker: usize,
    /// Woken whenever a count changes.
    changed: Arc<Notify>,
}

impl Spread {
    /// Returns once this worker may accept: it is within its share, or has
    /// waited [`SPREAD_WAIT`].
    async fn turn(&self) {
        let deadline = tokio::time::Instant::now() + SPREAD_WAIT;
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the counts are read, so no change is missed.
            notified.as_mut().enable();
            let count = |worker: &AtomicUsize| worker.load(Ordering::Relaxed);
            let mine = count(&self.open[self.worker]);
            let least = self.open.iter().map(count).min().unwrap_or(0);
            if mine <= least + SPREAD_SLACK {
                return;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    fn opened(self) -> Opened {
        self.open[self.worker].fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        Opened(self)
    }
}

/// A connection counted for its worker until its socket closes.
#[derive(Debug)]
struct Opened(Spread);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.open[self.0.worker].fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_waiters();
    }
}

/// A connection's place under the cap, held by its socket.
#[derive(Debug)]
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    _open: Option<Opened>,
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

/// A service the accept loop can serve: it answers each request of a connection
/// with a `Response<B>`, and its futures may move between tasks. Implemented for
/// every such service; it exists to name the bounds once instead of in every
/// function on the way from `serve` to hyper.
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

/// What a new connection goes through before HTTP: nothing ([`Plain`]), or a
/// TLS handshake. [`serve_connections`] runs it in the connection's own task.
pub trait Handshake: Clone + Send + Sync + 'static {
    /// The connection once the handshake is done, which HTTP is spoken over.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Turns a freshly accepted `stream` from `peer` into [`Self::Io`], within
    /// `limit` (the header-read timeout): a handshake that takes longer must fail.
    /// A failure closes the connection; the implementation reports it.
    fn handshake(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        limit: Duration,
    ) -> impl Future<Output = Option<Self::Io>> + Send;
}

/// Plain HTTP: no handshake.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;

    fn handshake(
        &self,
        stream: TcpStream,
        _: SocketAddr,
        _: Duration,
    ) -> impl Future<Output = Option<TcpStream>> + Send {
        future::ready(Some(stream))
    }
}

/// A response body the accept loop can write: bytes, streamed, with errors
/// hyper can log. Implemented for every such body, like [`ConnectionService`].
pub trait ResponseBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

impl<B> ResponseBody for B
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
}

/// Where the owning server is in its shutdown, as the accept loop needs to know.
pub trait Lifecycle: Clone + Send + Sync + 'static {
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
pub async fn serve_connections<M, S, B, L, H>(
    listener: TcpListener,
    handshake: H,
    make_service: M,
    lifecycle: L,
    limits: ServerLimits,
    cap: ConnectionCap,
) where
    M: Fn(SocketAddr) -> S,
    S: ConnectionService<B> + Send + 'static,
    B: ResponseBody,
    L: Lifecycle,
    H: Handshake,
{
    let mut http = http1::Builder::new();
    http.keep_alive(true)
        .max_header_size(limits.max_header_bytes)
        // hyper's own timer would also count the wait between keep-alive
        // requests as header time; the watchdog keeps both clocks instead.
        .header_read_timeout(None);
    let http = Arc::new(http);
    let mut connections = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_START;
    let mut at_cap = false;

    loop {
        if let Some(spread) = &cap.spread {
            tokio::select! {
                () = spread.turn() => {}
                () = lifecycle.stopped() => break,
            }
        }
        let permit = match Arc::clone(&cap.slots).try_acquire_owned() {
            Ok(permit) => {
                at_cap = false;
                permit
            }
            Err(_) => {
                if !at_cap {
                    at_cap = true;
                    warn!(
                        max_connections = cap.max,
                        "connection limit reached; new connections wait in the listen backlog"
                    );
                }
                tokio::select! {
                    permit = Arc::clone(&cap.slots).acquire_owned() => match permit {
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
        let slot = cap.admit(permit);
        let service = make_service(peer);
        let (http, lifecycle, handshake) =
            (Arc::clone(&http), lifecycle.clone(), handshake.clone());
        connections.spawn(async move {
            // Responses are written in one go; don't let Nagle delay the last segment.
            if let Err(error) = stream.set_nodelay(true) {
                debug!(%error, "cannot set TCP_NODELAY");
            }
            let Some(io) = handshake
                .handshake(stream, peer, limits.header_read_timeout)
                .await
            else {
                return;
            };
            serve_connection(&http, io, slot, peer, service, &lifecycle, &limits).await;
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

async fn serve_connection<S, B, L, I>(
    http: &http1::Builder,
    stream: I,
    slot: Slot,
    peer: SocketAddr,
    service: S,
    lifecycle: &L,
    limits: &ServerLimits,
) where
    S: ConnectionService<B>,
    B: ResponseBody,
    L: Lifecycle,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    // The socket holds its cap slot: the slot is freed for the next connection
    // waiting in the backlog when the socket closes, whoever owns it by then.
    let io = TokioIo::new(TrackedIo::new(stream, Arc::clone(&activity), slot));
    let service = guarded(service, Arc::clone(&activity), lifecycle.clone());
    // With upgrades, a `101` answer hands the connection over (to the proxy's
    // tunnel, or the backend's WebSocket session) through `hyper::upgrade::on`.
    // This future then ends, and with it the watchdog's timeouts and the
    // shutdown's wait: the upgraded socket is the service's to bound and to
    // close. It keeps its slot under the cap, which lives in the socket.
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
            // A `101` hands the connection over; `Connection: close` would
            // undo the upgrade it confirms.
            if lifecycle.draining() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response.map(|body| TrackedBody::new(body, request))
        })
    })
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

    /// A connection's place on `cap`'s worker, as the accept loop takes it.
    fn connect(cap: &ConnectionCap) -> Slot {
        let permit = Arc::clone(&cap.slots)
            .try_acquire_owned()
            .expect("a free slot");
        cap.admit(permit)
    }

    async fn turn(cap: &ConnectionCap) {
        cap.spread.as_ref().expect("a shared cap").turn().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_over_its_share_lets_the_others_accept_first() {
        let caps = ConnectionCap::shared(100, 2);
        let (first, second) = (&caps[0], &caps[1]);
        let mut open = vec![connect(first), connect(first)];
        // Two ahead of the other worker: it waits, but never longer than
        // SPREAD_WAIT.
        let started = tokio::time::Instant::now();
        turn(first).await;
        assert_eq!(started.elapsed(), SPREAD_WAIT);
        // The other worker takes its turn at once; then both are even.
        let started = tokio::time::Instant::now();
        turn(second).await;
        open.push(connect(second));
        turn(first).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        // A connection that closes frees its worker's share too.
        open.truncate(1);
        turn(first).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_worker_accepts_as_soon_as_another_catches_up() {
        let caps = ConnectionCap::shared(100, 2);
        let _open = [connect(&caps[0]), connect(&caps[0])];
        let started = tokio::time::Instant::now();
        let waiting = turn(&caps[0]);
        let catching_up = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            connect(&caps[1])
        };
        let ((), _caught_up) = tokio::join!(waiting, catching_up);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(1),
            "before SPREAD_WAIT"
        );
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
