//! Listener: the hardened accept loop that every server in the workspace runs,
//! the load balancer's (proxy and admin) and the backend's, so that both answer
//! bad input and floods alike. A server supplies a service per connection and a
//! [`Lifecycle`] (when to stop accepting, whether to close connections after their
//! response); [`serve_connections`] does the rest.
//!
//! The shape follows mini-redis's listener and hyper's graceful_shutdown example.
//! One task is spawned per connection being served, so a slow client never
//! holds up the others. Each connection task races hyper's connection future
//! against the shutdown signal (the `watch` submodule); when the signal wins,
//! `graceful_shutdown()` lets the request in progress finish and closes the
//! connection instead of dropping it mid-response (an idle keep-alive
//! connection closes at once), and a request that outlasts the shutdown
//! timeout is cut. Each task holds a sender of the channel that hands parked
//! sockets back to the accept loop, so [`serve_connections`] knows the last
//! connection has ended when the channel closes. (A `JoinSet` would tell the
//! same, at a lock, an allocation and a wake-up of the accept loop per
//! connection: about 1,200 instructions, a tenth of what a new connection
//! costs beyond its request.)
//!
//! Every connection speaks HTTP/1.1 or HTTP/2, on the same port: the first bytes
//! tell them apart (HTTP/2 with prior knowledge opens with a fixed preface; see
//! the `wire` submodule), and hyper's `http1` or `http2` server takes the
//! connection from there, the bytes already read included. That serves h2c
//! (cleartext, prior knowledge) and h2 over TLS (a client that negotiated `h2`
//! by ALPN sends the same preface). HTTP/1.1's `Upgrade: h2c` is not offered:
//! RFC 9113 dropped it. Under HTTP/2 each request (stream) is served by a task
//! of its own, spawned on the connection's runtime.
//!
//! An idle HTTP/1.1 connection is *parked*: hyper's connection, which holds
//! 16 KiB of buffers for as long as it lives, is taken apart between requests,
//! the connection's task ends, and the socket waits for the next request in the
//! accept loop's *lot*, holding no buffer (`Parked`); the next request's first
//! bytes start a new task and a new hyper connection on the same socket. A
//! client that left time between its requests is parked as soon as its answer
//! has left, a busy one after a second of quiet (see `Watch::serve_http1`). An
//! idle client then costs its place in the lot, its socket's registration with
//! the runtime and a few counters: about 650 bytes of heap, where hyper alone
//! kept 16 KiB.
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
//!   instead of costing memory and file descriptors here. An HTTP/2 connection
//!   takes one slot, whatever the number of its streams. Workers that accept
//!   from one socket share the cap and take turns (the `cap` submodule);
//! * failed `accept`s (EMFILE: out of file descriptors) are retried with a growing
//!   pause rather than ending the server;
//! * `maxHeaderBytes`: hyper answers a larger HTTP/1.1 request head with 431 and
//!   closes; a malformed request line or header gets hyper's automatic 400. For
//!   HTTP/2 it is the header list size announced in `SETTINGS`: a larger list
//!   gets 431 and its stream is reset, and a header block that keeps coming in
//!   CONTINUATION frames closes the connection (h2 counts them);
//! * idle and header-read timeouts, kept by the `watchdog` submodule, for both
//!   protocols: an HTTP/2 connection with no stream open is idle, and is sent
//!   GOAWAY when it has been idle too long;
//! * request framing that could smuggle a request through is refused with 400
//!   ([`framing_error`] lists what hyper already refuses and what is left to us);
//!   HTTP/2 frames every message itself, and has no `Transfer-Encoding`;
//! * HTTP/2's own limits ([`Http2Limits`]): concurrent streams per connection,
//!   flow-control windows, frame size, a bounded send buffer per stream,
//!   keep-alive `PING`s that drop dead peers, and h2's guards against rapid
//!   reset, CONTINUATION floods and streams reset for errors, each closing the
//!   connection with GOAWAY;
//! * a budget of HTTP/2 control frames per connection (`SETTINGS`, `PING`,
//!   `RST_STREAM`, `WINDOW_UPDATE`, `PRIORITY`, ...), earned with time,
//!   responses and bytes sent ([`CONTROL_FRAME_BURST`] and its neighbours): h2
//!   answers such frames at any rate, so a client that runs the budget dry is
//!   flooding, and its connection is closed (the `wire` submodule says which
//!   floods h2 stops by itself and which it does not);
//! * while the server drains, every HTTP/1.1 response carries `Connection:
//!   close`, so clients finish their current request here and reconnect, most
//!   likely to a replica that is not going away; an HTTP/2 connection is sent
//!   GOAWAY at its first response instead (the header is forbidden there), and
//!   its open streams finish.
//!
//! Before HTTP, a connection may need a [`Handshake`]: none for plain HTTP
//! ([`Plain`]), or TLS (the load balancer's). It runs in the connection's own
//! task, holding the connection's slot, and within `headerReadTimeoutMs`, so a
//! client that opens a connection and sends nothing (or half a ClientHello) is
//! closed on time as one that trickles a request head is.

mod cap;
mod gate;
mod lot;
mod watch;
mod watchdog;
mod wire;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdTcpListener};
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future;
use futures::{FutureExt, TryFutureExt};
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::{HttpService, Service, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use cap::Slot;
pub use cap::{ConnectionCap, SPREAD_SLACK, SPREAD_WAIT};
use lot::{Lot, Parked};
use watch::{QUICK_RETURN, Watch, waiting_deadline};
use watchdog::{Activity, Parking, TrackedBody, TrackedIo};
use wire::Protocol;
pub use wire::{
    BYTES_PER_CONTROL_FRAME, CONTROL_FRAME_BURST, CONTROL_FRAMES_PER_RESPONSE,
    CONTROL_FRAMES_PER_SECOND,
};

use crate::BoxError;
use crate::headers::{framing_error, list_items};

/// Connections the kernel queues on a listening socket, accepted or not yet,
/// before it drops new ones. It caps this at `net.core.somaxconn` (4096 by
/// default since Linux 5.4).
pub const LISTEN_BACKLOG: i32 = 1024;

/// A non-blocking listening socket on `addr` with a backlog of
/// [`LISTEN_BACKLOG`]. Several runtimes can accept from it through clones of it
/// (`try_clone`): they share its one backlog (the load balancer's per-core
/// workers).
///
/// `[::]` means every IPv4 and IPv6 address: the socket is dual-stack
/// (`IPV6_V6ONLY` off, whatever the host's `net.ipv6.bindv6only` says), so an
/// IPv4 client arrives as `::ffff:a.b.c.d` (the accept loop turns that back
/// into `a.b.c.d`). On a host without IPv6 (the module not loaded, or disabled
/// at boot) the same port is bound on `0.0.0.0` instead, with a warning.
pub fn listening_socket(addr: SocketAddr) -> io::Result<StdTcpListener> {
    if addr.ip() != IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        return socket_on(addr);
    }
    match socket_on(addr) {
        Ok(socket) => Ok(socket),
        // A port in use or a missing permission would fail on IPv4 too, and
        // the IPv6 error names the real problem.
        Err(error)
            if !matches!(
                error.kind(),
                io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
            ) =>
        {
            let ipv4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            warn!(%error, %addr, fallback = %ipv4, "IPv6 unavailable, listening on IPv4 only");
            socket_on(ipv4)
        }
        Err(error) => Err(error),
    }
}

/// [`listening_socket`] on exactly `addr`.
fn socket_on(addr: SocketAddr) -> io::Result<StdTcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
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
    /// What HTTP/2 connections get besides; `max_header_bytes` bounds their
    /// header lists too.
    pub http2: Http2Limits,
}

/// The limits of HTTP/2 connections: what each client is told in its
/// `SETTINGS`, and what the `h2` crate enforces on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Limits {
    /// Streams (requests) a client may have open at once on one connection
    /// (`http2MaxConcurrentStreams`); more are refused with `REFUSED_STREAM`,
    /// which a client may retry. Each open stream holds a request's memory and
    /// may hold a backend connection, so this, times `max_connections`, is the
    /// most requests the server holds at once.
    pub max_concurrent_streams: u32,
    /// The flow-control window of each request body, in bytes
    /// (`http2InitialStreamWindowBytes`): how much of one upload a client may
    /// send ahead of our reading it.
    pub initial_stream_window: u32,
    /// The flow-control window of the whole connection
    /// (`http2InitialConnectionWindowBytes`): how much of all its uploads a
    /// client may send ahead, so the most request bytes one connection can
    /// make us buffer.
    pub initial_connection_window: u32,
    /// Largest frame payload a client may send (16,384 to 16,777,215).
    pub max_frame_size: u32,
    /// Streams the client reset before they were served that may wait at once
    /// to be cleaned up; one more is a rapid-reset attack (CVE-2023-44487), and
    /// the connection is closed with GOAWAY `ENHANCE_YOUR_CALM`.
    pub max_pending_accept_reset_streams: usize,
    /// Streams we may reset for the client's protocol errors over the
    /// connection's life before it is closed with GOAWAY (the attack that makes
    /// the server do the resetting, "MadeYouReset", CVE-2025-8671).
    pub max_local_error_reset_streams: usize,
    /// Response bytes one stream may queue for a client that reads slowly.
    pub max_send_buffer: usize,
    /// A connection that has sent nothing for this long is sent a `PING`...
    pub keep_alive_interval: Duration,
    /// ...and closed if the answer takes longer than this: a dead peer does
    /// not keep its streams, or its slot, for ever.
    pub keep_alive_timeout: Duration,
}

impl Http2Limits {
    /// The documented defaults.
    ///
    /// * 100 streams: RFC 9113 (section 6.5.2) asks for no fewer, so as not to
    ///   limit a client's parallelism; more would let one client hold more of
    ///   the backends' capacity than a hundred HTTP/1.1 connections would.
    /// * Windows of 1 MiB per stream and 2 MiB per connection: the protocol's
    ///   64 KiB allows one window per round trip, 6.5 MB/s at 10 ms; 1 MiB
    ///   fills a gigabit link at 8 ms, and two such uploads can run at once.
    /// * Frames of 16 KiB, the protocol's default, which every client handles.
    /// * 20 pending resets: h2's own default, which no client that cancels
    ///   requests in the ordinary way comes near.
    /// * 1,024 resets for errors: hyper's default.
    /// * 128 KiB per stream queued: eight frames in flight, enough to keep a
    ///   download streaming; with 100 streams, 12.5 MiB for a client that stops
    ///   reading, until its keep-alive fails.
    /// * A `PING` after 20 s of silence, answered within 20 s.
    pub const DEFAULT: Self = Self {
        max_concurrent_streams: 100,
        initial_stream_window: 1024 * 1024,
        initial_connection_window: 2 * 1024 * 1024,
        max_frame_size: 16 * 1024,
        max_pending_accept_reset_streams: 20,
        max_local_error_reset_streams: 1024,
        max_send_buffer: 128 * 1024,
        keep_alive_interval: Duration::from_secs(20),
        keep_alive_timeout: Duration::from_secs(20),
    };

    /// The accepted range of `http2MaxConcurrentStreams`.
    pub const MAX_CONCURRENT_STREAMS: RangeInclusive<u32> = 1..=10_000;
    /// The accepted range of `http2InitialStreamWindowBytes` and
    /// `http2InitialConnectionWindowBytes`: from the protocol's default window
    /// up to its largest (RFC 9113 section 6.9.1).
    pub const WINDOW_BYTES: RangeInclusive<u32> = 65_535..=2_147_483_647;
}

impl Default for Http2Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
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
        http2: Http2Limits::DEFAULT,
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

/// What [`guarded`] makes of a connection's service, as hyper's servers take
/// it; named, like [`ConnectionService`], to write its bounds once.
pub(crate) trait GuardedService:
    HttpService<
        Incoming,
        Error: Into<BoxError> + Send + 'static,
        ResBody: ResponseBody,
        Future: Send + 'static,
    > + Send
    + Unpin
    + 'static
{
}

impl<G> GuardedService for G where
    G: HttpService<
            Incoming,
            Error: Into<BoxError> + Send + 'static,
            ResBody: ResponseBody,
            Future: Send + 'static,
        > + Send
        + Unpin
        + 'static
{
}

/// A service the accept loop can serve: it answers each request of a connection
/// with a `Response<B>`, and it and its futures may move between tasks (and
/// out of a parked connection's hyper server, hence `Unpin`). Implemented for
/// every such service; it exists to name the bounds once instead of in every
/// function on the way from `serve` to hyper.
pub trait ConnectionService<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Error: Into<BoxError> + Send + 'static,
        Future: Send + 'static,
    > + Send
    + Unpin
    + 'static
{
}

impl<S, B> ConnectionService<B> for S
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + Unpin + 'static,
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
pub trait Lifecycle: Clone + Send + Sync + Unpin + 'static {
    /// Resolves once the listener must stop accepting (at once if it already
    /// must).
    fn stopped(&self) -> impl Future<Output = ()> + Send;
    /// Whether shutdown has begun, so responses should close their connection.
    fn draining(&self) -> bool;
}

/// Accepts connections on `listener` and serves each with the service that
/// `make_service` builds for its peer address (built again each time a parked
/// connection has a new request). Returns once `lifecycle` has
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
    if let Err(error) = skip_nagle_on_accepted(&listener) {
        warn!(%error, "cannot set TCP_NODELAY; responses may wait for Nagle's algorithm");
    }
    let http = Arc::new(Builders::new(&limits));
    // Parked sockets coming back from their connections' tasks.
    let (hand_back, mut handed_back) = mpsc::unbounded_channel();
    // Idle HTTP/1.1 connections, waiting for their next request without a
    // task of their own.
    let mut lot = Lot::new();
    let acceptor = Acceptor {
        listener,
        cap,
        backoff: ACCEPT_BACKOFF_START,
        at_cap: false,
    };
    let mut accepting = Box::pin(acceptor.accept());
    // One wait for the stop, for the listener's life: a wait is a place in
    // the shutdown's list of waiters, which every connection shares.
    let mut stopped = std::pin::pin!(lifecycle.stopped());

    loop {
        tokio::select! {
            () = &mut stopped => break,
            (acceptor, accepted) = &mut accepting => {
                let Some((stream, peer, slot)) = accepted else { break };
                accepting.set(acceptor.accept());
                let activity = Activity::new(slot);
                let service = guarded(make_service(peer), Arc::clone(&activity), lifecycle.clone());
                let serving = serve_connection(
                    Arc::clone(&http),
                    handshake.clone(),
                    stream,
                    peer,
                    activity,
                    service,
                    lifecycle.clone(),
                );
                tokio::spawn(handing_back(serving, hand_back.clone()));
            }
            Some(parked) = handed_back.recv() => {
                let (deadline, expiring) = waiting_deadline(parked.io.activity(), &http.limits);
                lot.park(parked, deadline, expiring);
            }
            Parked { io, peer, since } = lot.next_request() => {
                let activity = Arc::clone(io.activity());
                let service = guarded(make_service(peer), Arc::clone(&activity), lifecycle.clone());
                let parking = if since.elapsed() < QUICK_RETURN {
                    Parking::WhenQuiet
                } else {
                    Parking::AtOnce
                };
                let serving = serve_http(
                    Arc::clone(&http),
                    io,
                    peer,
                    activity,
                    service,
                    lifecycle.clone(),
                    parking,
                );
                tokio::spawn(handing_back(serving, hand_back.clone()));
            }
        }
    }
    // Closing the listener makes the kernel refuse new connections from here
    // on; idle connections have nothing in flight, and close at once.
    drop(accepting);
    drop(lot);
    // The accept loop's own sender goes; every other one is a connection's.
    let open = hand_back.strong_count() - 1;
    drop(hand_back);
    if open > 0 {
        info!(
            connections = open,
            "listener closed, finishing in-flight requests"
        );
    }
    // Each connection ends by itself: its request finishes, or it is cut at
    // the shutdown timeout (see `Watch::drive`). A connection parked
    // meanwhile is dropped here, which closes it.
    while handed_back.recv().await.is_some() {}
}

/// A connection's task: `serving`, then its socket handed back to the accept
/// loop if it was parked. The sender lives as long as the task, so the
/// channel closes when the last connection has ended.
///
/// Boxed: spawning moves the future into its task in several steps, and a
/// connection's is large; a box moves as a pointer.
fn handing_back<I>(
    serving: impl Future<Output = Option<Parked<I>>>,
    hand_back: mpsc::UnboundedSender<Parked<I>>,
) -> Pin<Box<impl Future<Output = ()>>> {
    Box::pin(serving.map(move |parked| {
        if let Some(parked) = parked {
            // Refused only once the listener has stopped: the socket closes.
            let _ = hand_back.send(parked);
        }
    }))
}

/// The listening socket and what accepting from it needs to remember.
struct Acceptor {
    listener: TcpListener,
    cap: ConnectionCap,
    /// The pause before retrying after the next failed `accept`.
    backoff: Duration,
    /// The cap was reached, and said so in the log.
    at_cap: bool,
}

impl Acceptor {
    /// Waits for the next connection and takes a slot under the cap for it
    /// first. Takes the acceptor and gives it back, so that the accept loop
    /// can keep this future while it attends to its connections (and drop
    /// it, listener and all, when the server stops).
    async fn accept(mut self) -> (Self, Option<(TcpStream, SocketAddr, Slot)>) {
        let accepted = self.next().await;
        (self, accepted)
    }

    /// `None` if the cap's semaphore was closed, which never happens.
    async fn next(&mut self) -> Option<(TcpStream, SocketAddr, Slot)> {
        let cap = &self.cap;
        loop {
            cap.turn().await;
            let permit = match cap.try_reserve() {
                Some(permit) => {
                    self.at_cap = false;
                    permit
                }
                None => {
                    if !self.at_cap {
                        self.at_cap = true;
                        warn!(
                            max_connections = cap.max(),
                            "connection limit reached; new connections wait in the listen backlog"
                        );
                    }
                    cap.reserve().await?
                }
            };
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = ACCEPT_BACKOFF_START;
                    // An IPv4 client of a dual-stack socket arrives as
                    // `::ffff:a.b.c.d`; logs, `X-Forwarded-For` and whatever
                    // else names the client should say `a.b.c.d`, as on an
                    // IPv4 socket.
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    return Some((stream, peer, cap.admit(permit)));
                }
                Err(error) => {
                    warn!(%error, retry_in_ms = self.backoff.as_millis(), "accept failed");
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }
}

/// Turns Nagle's algorithm off for every connection `listener` accepts from
/// now on: responses are written in one go, and Nagle would hold back their
/// last segment. Set once on the listening socket, whose TCP options an
/// accepted socket inherits (Stevens, *UNIX Network Programming* 7.4), it
/// saves each new connection a `setsockopt` call of its own.
pub fn skip_nagle_on_accepted(listener: &TcpListener) -> io::Result<()> {
    SockRef::from(listener).set_tcp_nodelay(true)
}

/// hyper's servers for the two protocols and the limits they are held to, set
/// up once per listener and shared by its connections.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    limits: ServerLimits,
}

impl Builders {
    fn new(limits: &ServerLimits) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .keep_alive(true)
            .max_header_size(limits.max_header_bytes)
            // hyper's own timer would also count the wait between keep-alive
            // requests as header time; the watchdog keeps both clocks instead.
            .header_read_timeout(None);
        let h2 = &limits.http2;
        // Each stream's request runs as a task of its own, on the runtime
        // serving the connection (a proxy worker's own thread).
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_concurrent_streams)
            .initial_stream_window_size(h2.initial_stream_window)
            .initial_connection_window_size(h2.initial_connection_window)
            .max_frame_size(h2.max_frame_size)
            // The header list is the request head: the same limit, which also
            // bounds the CONTINUATION frames of one head.
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(h2.max_local_error_reset_streams)
            .max_send_buf_size(h2.max_send_buffer)
            .keep_alive_interval(h2.keep_alive_interval)
            .keep_alive_timeout(h2.keep_alive_timeout);
        Self {
            http1,
            http2,
            limits: *limits,
        }
    }
}

/// Serves one connection from `peer`, whichever protocol it speaks, until it
/// closes: the connection's task. First the handshake, then HTTP
/// ([`serve_http`]), as two stages that share their place in the task: the
/// handshake's state (a TLS handshake's is large) is gone once HTTP begins.
fn serve_connection<H, G, L>(
    http: Arc<Builders>,
    handshake: H,
    stream: TcpStream,
    peer: SocketAddr,
    activity: Arc<Activity>,
    service: G,
    lifecycle: L,
) -> impl Future<Output = Option<Parked<H::Io>>> + Send + 'static
where
    H: Handshake,
    G: GuardedService,
    L: Lifecycle,
{
    let limit = http.limits.header_read_timeout;
    let handshaken = async move { handshake.handshake(stream, peer, limit).await };
    handshaken.then(move |stream| match stream {
        Some(stream) => {
            let io = TrackedIo::new(stream, Arc::clone(&activity));
            future::Either::Left(serve_http(
                http,
                io,
                peer,
                activity,
                service,
                lifecycle,
                Parking::AtOnce,
            ))
        }
        None => future::Either::Right(future::ready(None)),
    })
}

/// Serves HTTP on `io`, whichever protocol it speaks, until the connection
/// closes.
///
/// Written as a block rather than an `async fn`, whose arguments rustc keeps
/// twice in the future (as arguments and as locals), and with the HTTP/1.1
/// loop inline rather than in a future of its own, which would keep the socket
/// twice too: this future is most of the connection's task, whose cell is as
/// large as its largest state.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn serve_http<I, G, L>(
    http: Arc<Builders>,
    mut io: TrackedIo<I>,
    peer: SocketAddr,
    activity: Arc<Activity>,
    mut service: G,
    lifecycle: L,
    parking: Parking,
) -> impl Future<Output = Option<Parked<I>>> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    G: GuardedService,
    L: Lifecycle,
{
    async move {
        // One wait for the listener to stop, for the connection's whole life:
        // registering a new one for each request would take the shutdown's
        // lock twice per request.
        let stopped = std::pin::pin!(lifecycle.stopped().fuse());
        let mut watch = Watch::new(&activity, &peer, stopped, &http.limits);
        let protocol = watch.protocol(&mut io).await?;
        match protocol {
            // Served until idle, then parked (see `Watch::serve_http1`): the
            // task ends, giving the socket back to the accept loop. Boxed,
            // hyper's connection and its watch, so that the task is not as
            // large.
            Protocol::Http1 => loop {
                let serving = Box::pin(watch.serve_http1(&http.http1, io, service, parking));
                (io, service) = serving.await?;
                // Pipelined: the next request is here already.
                if io.has_unread() {
                    continue;
                }
                return Some(Parked {
                    io,
                    peer,
                    since: tokio::time::Instant::now(),
                });
            },
            // Boxed, so that an HTTP/1.1 connection's task is not as large.
            Protocol::Http2 => {
                Box::pin(async {
                    let connection =
                        std::pin::pin!(http.http2.serve_connection(TokioIo::new(io), service));
                    watch
                        .drive(
                            connection,
                            http2::Connection::graceful_shutdown,
                            Parking::Never,
                        )
                        .await;
                })
                .await;
                None
            }
        }
    }
}

/// A response of a service that [`guarded`] wraps: the service's own, or the
/// 400 for refused framing.
type GuardedResponse<B> = Response<TrackedBody<Either<B, Full<Bytes>>>>;

/// Wraps a connection's service with what every request gets, whatever the
/// service: the framing check, request tracking for the watchdog, and, once
/// shutdown has begun, `Connection: close` (HTTP/1.1) or GOAWAY (HTTP/2).
fn guarded<S, B, L>(
    service: S,
    activity: Arc<Activity>,
    lifecycle: L,
) -> impl Service<
    Request<Incoming>,
    Response = GuardedResponse<B>,
    Error = S::Error,
    Future = impl Future<Output = Result<GuardedResponse<B>, S::Error>> + Send + 'static,
>
where
    S: ConnectionService<B>,
    B: ResponseBody,
    L: Lifecycle,
{
    service_fn(move |req: Request<Incoming>| {
        let request = activity.request_started();
        let lifecycle = lifecycle.clone();
        let http1 = req.version() < Version::HTTP_2;
        let keep_alive = asks_to_stay_open(&req);
        let upload = !req.body().is_end_stream();
        // Combinators, not an `async` block: a block would keep the inner
        // future twice, once as the value it captured and once as the future
        // it awaits (rustc gives the two separate slots), and hyper keeps this
        // future for every connection with a request in flight.
        //
        // HTTP/2 has no `Transfer-Encoding` (h2 refuses it as malformed), so
        // the framing check passes its requests by.
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
            request.answered();
            // HTTP/2 forbids `Connection`; its connection is sent GOAWAY
            // instead, which lets its other streams finish. A `101` hands an
            // HTTP/1.1 connection over; `Connection: close` would undo the
            // upgrade it confirms.
            if lifecycle.draining() {
                if !http1 {
                    request.wind_down();
                } else if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
            }
            if http1 {
                let stays_open = keep_alive
                    && response.status() != StatusCode::SWITCHING_PROTOCOLS
                    && !asks_to_close(response.headers());
                request.parks(match (stays_open, upload) {
                    (false, _) => Parking::Never,
                    (true, true) => Parking::WhenQuiet,
                    (true, false) => Parking::AtOnce,
                });
            }
            response.map(|body| TrackedBody::new(body, request))
        })
    })
}

/// Whether an HTTP/1.x request leaves its connection open for the next one:
/// in HTTP/1.1 unless it says `Connection: close`, in HTTP/1.0 only if it says
/// `Connection: keep-alive` (RFC 9112 section 9.3), as hyper reads it too.
fn asks_to_stay_open<B>(request: &Request<B>) -> bool {
    match request.version() {
        Version::HTTP_11 => !asks_to_close(request.headers()),
        Version::HTTP_10 => names_option(request.headers(), b"keep-alive"),
        _ => false,
    }
}

/// Whether a message's `Connection` header closes the connection after it.
fn asks_to_close(headers: &http::HeaderMap) -> bool {
    names_option(headers, b"close")
}

/// Whether a message's `Connection` header names `option`.
fn names_option(headers: &http::HeaderMap, option: &[u8]) -> bool {
    list_items(headers, CONNECTION).any(|item| item.eq_ignore_ascii_case(option))
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

    /// What lets the accept loop skip a `setsockopt` per connection: a
    /// socket accepted from a listener with `TCP_NODELAY` has it too, and one
    /// accepted before has not.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound socket has an address");
        let accept_one = async || {
            let _client = TcpStream::connect(addr).await.expect("connected");
            let (accepted, _) = listener.accept().await.expect("accepted");
            accepted.nodelay().expect("read TCP_NODELAY")
        };
        assert!(!accept_one().await, "off by default");
        skip_nagle_on_accepted(&listener).expect("set on the listener");
        assert!(accept_one().await, "inherited from the listener");
    }
}
