//! The load balancer's HTTP/2 client toward the backends that speak it:
//! cleartext HTTP/2 with prior knowledge (`h2c`), one pool per proxy worker.
//! Backends that speak HTTP/1.1 keep the [`pool`](super::pool).
//!
//! Why multiplexed connections: an HTTP/2 backend serves many requests at
//! once on one connection, each a stream, so a handful of connections carry
//! what HTTP/1.1 needs one connection per request in flight for, and gRPC,
//! which needs HTTP/2 end to end (trailers, bodies streaming both ways at
//! once), can pass through.
//!
//! Why the `h2` crate itself rather than hyper's client on top of it: hyper
//! hands each request to the connection's task through a channel and runs
//! two more tasks per request, one that waits for the response and one that
//! copies the request body, so every call crossed four tasks. Here the
//! request's own task opens the stream, sends a body that has already
//! arrived whole (a unary gRPC call's one message, a small form) together
//! with the head, and waits for the response itself; the connection's task
//! is the only other one. A body still arriving gets a task that copies it
//! (see [`body`]), since it must keep flowing while the response streams
//! back. (The HTTP/1.1 client is the proxy's own for the same reason.)
//!
//! The shape:
//!
//! * per backend, at most `connections_per_backend` connections, opened on
//!   demand, never ahead. A request goes on the open connection with the
//!   fewest streams in flight that has room under the server's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`; when none has room, another
//!   connection is opened if the backend has fewer than its share, and
//!   otherwise the request waits inside `h2`, on the least loaded one, for a
//!   stream to end;
//! * one connect at a time per backend: it runs in a task of its own, and
//!   every request that needs a connection meanwhile waits for that one and
//!   goes on it. So a burst to a backend with no connection opens one, not
//!   one per request, and a backend that is down fails the whole burst after
//!   one connect timeout, each request with [`Http2Error::Connect`];
//! * a connection leaves the pool as soon as it is known to take no more
//!   streams: when it breaks or the backend closes it, when it has had no
//!   stream for [`IDLE_TIMEOUT`], and after a GOAWAY, once a request has
//!   found the connection refusing new streams. The next request opens a
//!   new one. The streams a GOAWAY let through (at or below its last stream
//!   id) finish on the old connection, which closes after them;
//! * a stream counts against its connection from the moment a request takes
//!   it until the response body ends or is dropped ([`Http2Body`]).
//!
//! What went wrong decides what the proxy may do next ([`Http2Error`]):
//!
//! * a request whose connection already refused new streams (a GOAWAY or a
//!   break raced it) is sent again here on another connection, a few times
//!   at most, since nothing of it went out;
//! * a request the backend refused with `REFUSED_STREAM`, or whose stream is
//!   above a GOAWAY's last stream id, was not processed: RFC 9113 sections
//!   8.7 and 6.8 guarantee the backend did nothing with it. Its body is gone
//!   into the stream, so it is not sent again here, but the proxy may retry
//!   it on another backend whatever its method
//!   ([`Http2Error::was_not_processed`]);
//! * a request whose body failed on the client's side (it went away, or its
//!   upload stalled) is the client's doing, not the backend's
//!   ([`Http2Error::RequestBody`]);
//! * anything else once the request went out may have been processed
//!   ([`Http2Error::Other`]), like a broken HTTP/1.1 exchange.
//!
//! The connection settings are sized for throughput, and tuned for what sits
//! behind the proxy (gRPC servers among them); see the constants below.

mod body;

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::Shared;
use h2::client::{self, SendRequest};
use h2::{Ping, PingPong, Reason};
use http::{Request, Response};
use hyper::body::Body;
use service_kit::BoxError;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::debug;

use super::ByBackend;
use super::http1::MAX_HEAD_BYTES;
use super::pool::{IDLE_TIMEOUT, lock};
pub(crate) use body::Http2Body;
use body::send_body;

/// Connections per backend (in each worker's pool) when the config does not
/// say. Two rather than one, so that a connection that goes away or fills up
/// to the server's stream limit has a sibling to take the load while the
/// next one opens; few, because each carries many streams.
pub const DEFAULT_CONNECTIONS_PER_BACKEND: usize = 2;

/// How much of one response the backend may send ahead of the client
/// reading it (the stream's flow-control window). The spec's 64 KiB caps a
/// stream at 64 KiB per round trip; 1 MiB lets one stream fill a fast link
/// even a few milliseconds away, and bounds what a client that reads slowly
/// makes the proxy hold for it.
const STREAM_WINDOW: u32 = 1024 * 1024;

/// How much of all its responses together a connection may have in flight
/// (the connection's window): also the most a connection's unread response
/// data can hold in memory. Four streams' worth, so that one or two clients
/// that stop reading (their streams' windows full of unread data) do not
/// stall every other stream on the connection.
const CONNECTION_WINDOW: u32 = 4 * STREAM_WINDOW;

/// Streams a new connection may open before the server's SETTINGS say how
/// many it allows: the spec's recommended minimum, as hyper and browsers
/// assume.
const INITIAL_MAX_STREAMS: usize = 100;

/// How much of the request bodies a connection buffers for the backend
/// before a body copy waits for it to read: hyper's figure.
const MAX_SEND_BUFFER: usize = 400 * 1024;

/// How often a connection with streams open PINGs the backend to learn
/// whether it is still there. Five minutes is the shortest interval gRPC
/// servers accept by default (grpc-go's `MinTime`, grpc-java's
/// `permitKeepAliveTime`); they answer more frequent pings with a GOAWAY
/// (`too_many_pings`) that would kill long-lived streams. Requests and
/// bodies that stall have their own, shorter timeouts in the proxy; the ping
/// is for a stream that is quiet on purpose (a watch).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(300);

/// How long the PING's answer may take before the connection is taken for
/// dead and closed, failing its streams.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest response head (its fields, as HTTP/2 counts them) taken from
/// a backend: the HTTP/1.1 client's bound rather than h2's 16 KiB, so that
/// an answer does not pass over one protocol and fail over the other.
const MAX_RESPONSE_HEAD: u32 = MAX_HEAD_BYTES as u32;

/// Reaper ticks per [`IDLE_TIMEOUT`]: a connection with no stream for more
/// than this many ticks is closed, so it was idle between 60 and 80 s.
const TICKS_PER_IDLE_TIMEOUT: u32 = 3;

/// How many connections one request tries before it gives up, when each
/// turns out to refuse new streams.
const MAX_SENDS: usize = 3;

/// Why an HTTP/2 request failed. The proxy tells "nothing was sent"
/// ([`is_connect`](Self::is_connect)) and "sent, but not processed"
/// ([`was_not_processed`](Self::was_not_processed)) from everything else.
#[derive(Debug, thiserror::Error)]
pub enum Http2Error {
    /// No connection to the backend could be opened.
    #[error("cannot open an HTTP/2 connection")]
    Connect(#[source] Http2ConnectError),
    /// The backend did not process the request: it refused the stream
    /// (`REFUSED_STREAM`), its GOAWAY left the stream out, or every
    /// connection tried refused new streams.
    #[error("the backend did not process the request")]
    NotProcessed(#[source] h2::Error),
    /// The exchange failed after the request went out: a reset, a broken
    /// connection, a response that is not HTTP/2.
    #[error("the HTTP/2 exchange failed")]
    Other(#[source] h2::Error),
    /// The client's request body failed (the client went away mid-upload, or
    /// its upload stalled), so the request was reset: not the backend's doing.
    /// The body's own error, as [`ExchangeError::RequestBody`] holds it.
    ///
    /// [`ExchangeError::RequestBody`]: super::ExchangeError::RequestBody
    #[error("the request body failed")]
    RequestBody(#[source] BoxError),
}

impl Http2Error {
    /// Whether the failure happened before anything was sent.
    pub fn is_connect(&self) -> bool {
        matches!(self, Http2Error::Connect(_))
    }

    /// Whether the backend is known not to have processed the request, so
    /// that sending it to another backend is safe whatever its method (as it
    /// is when [`is_connect`](Self::is_connect)).
    pub fn was_not_processed(&self) -> bool {
        matches!(self, Http2Error::NotProcessed(_))
    }

    /// Sorts the error of a stream that was opened: see the module doc.
    fn of_exchange(error: h2::Error) -> Self {
        // h2 fails the streams above a received GOAWAY's last stream id with
        // that GOAWAY (remote); the streams below it finish, or fail with the
        // connection's own error when it closes.
        let refused = error.is_remote()
            && (error.is_go_away() || error.reason() == Some(Reason::REFUSED_STREAM));
        if refused {
            Http2Error::NotProcessed(error)
        } else {
            Http2Error::Other(error)
        }
    }

    /// Sorts the error of a stream that could not be opened: the connection
    /// had gone away or broken, so nothing went out; anything else (a head
    /// that HTTP/2 cannot carry) would fail on every backend alike.
    fn of_opening(error: h2::Error) -> Self {
        if error.is_go_away() || error.is_io() {
            Http2Error::NotProcessed(error)
        } else {
            Http2Error::Other(error)
        }
    }
}

/// Why a connection could not be opened. Cloneable, because every request
/// waiting for the same connect gets its outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Http2ConnectError {
    /// The TCP connection could not be opened (refused, unreachable).
    #[error("tcp connect error")]
    Tcp(#[source] Arc<io::Error>),
    /// The connection was not open, and the HTTP/2 preface sent, within the
    /// connect timeout.
    #[error("connect timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The HTTP/2 connection preface could not be sent.
    #[error("the HTTP/2 handshake failed")]
    Handshake(#[source] Arc<h2::Error>),
    /// The task opening the connection ended without an answer: the runtime
    /// is shutting down (or the task panicked).
    #[error("the connection attempt was abandoned")]
    Abandoned,
}

/// One backend's share of a pool, for the status page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Http2Stats {
    /// Open connections.
    pub connections: usize,
    /// Requests on them until their response bodies end, including those
    /// waiting for a stream.
    pub streams: usize,
}

/// Multiplexed HTTP/2 connections to the backends, one pool per proxy
/// worker. Clones share the pool.
#[derive(Clone)]
pub(crate) struct Http2Pool {
    inner: Arc<Inner>,
}

struct Inner {
    /// The connections by backend. A plain mutex: it is held to pick a
    /// connection or to add or drop one, never across an `.await`, and each
    /// worker has its own pool.
    backends: Mutex<ByBackend<Backend>>,
    connections_per_backend: usize,
    /// The connection settings, the same for every connection.
    settings: client::Builder,
    /// How long a connection may carry no stream before it is closed.
    idle_timeout: Duration,
    /// Whether the reaper task runs; started by the first connect, from
    /// inside the worker's runtime.
    reaper_started: AtomicBool,
}

#[derive(Default)]
struct Backend {
    /// Open connections (and, briefly, ones that just closed).
    connections: Vec<Multiplexed>,
    /// The connect under way, if any, which every request that needs a new
    /// connection waits for.
    opening: Option<Opening>,
}

/// A connect's outcome, shared by everyone waiting for it.
type Opening = Shared<oneshot::Receiver<Result<Opened, Http2ConnectError>>>;

/// Where a connection's requests go: `h2`'s handle, cheap to clone.
type Sender = SendRequest<Bytes>;

/// A connection just opened, as handed to the requests that waited for it.
#[derive(Clone)]
struct Opened {
    sender: Sender,
    load: Arc<Load>,
}

/// One open connection in the pool.
struct Multiplexed {
    /// Where requests go; once the pool's sender and the requests' short-lived
    /// clones are dropped, `h2` closes the connection after its last stream.
    sender: Sender,
    load: Arc<Load>,
    /// Reaper ticks in a row that found the connection with no stream.
    idle_ticks: u32,
}

impl Multiplexed {
    /// One reaper tick: whether the connection still takes streams and has
    /// carried one within the idle timeout.
    fn keep_after_tick(&mut self) -> bool {
        let used = self.load.used.swap(false, Ordering::Relaxed);
        if used || self.load.streams() > 0 {
            self.idle_ticks = 0;
        } else {
            self.idle_ticks += 1;
        }
        !self.load.is_closed() && self.idle_ticks <= TICKS_PER_IDLE_TIMEOUT
    }
}

/// What a connection's requests and the pool share about it. The pool counts
/// streams itself because `h2` opens a stream beyond the server's limit
/// anyway: it just waits on the connection for another to end.
#[derive(Debug)]
struct Load {
    /// Requests on the connection, counted by their [`StreamSlot`]s.
    streams: AtomicUsize,
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS` as last seen
    /// ([`INITIAL_MAX_STREAMS`] until the server's SETTINGS arrive).
    max_streams: AtomicUsize,
    /// A request took a stream since the reaper last looked.
    used: AtomicBool,
    /// The connection takes no new stream: it ended, or a request found it
    /// refusing streams (after a GOAWAY).
    closed: AtomicBool,
}

impl Load {
    fn new() -> Self {
        Self {
            streams: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(INITIAL_MAX_STREAMS),
            used: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// Whether another stream fits under the server's limit.
    fn has_room(&self) -> bool {
        self.streams() < self.max_streams.load(Ordering::Relaxed)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    fn take_stream(self: &Arc<Self>) -> StreamSlot {
        self.streams.fetch_add(1, Ordering::Relaxed);
        self.used.store(true, Ordering::Relaxed);
        StreamSlot(Arc::clone(self))
    }
}

/// A request's place on its connection: counted in the connection's load
/// until dropped.
#[derive(Debug)]
struct StreamSlot(Arc<Load>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `h2`'s side of a connection, which its task drives.
type Connection = client::Connection<TcpStream, Bytes>;

/// Where a request goes next.
enum Choice {
    /// On this connection, now.
    Send(Sender, StreamSlot),
    /// On the connection being opened, once it is.
    Wait(Opening),
}

impl Http2Pool {
    /// An empty pool that opens at most `connections_per_backend` (at least
    /// one) connections to each backend.
    pub(crate) fn new(connections_per_backend: usize) -> Self {
        Self::with_idle_timeout(connections_per_backend, IDLE_TIMEOUT)
    }

    fn with_idle_timeout(connections_per_backend: usize, idle_timeout: Duration) -> Self {
        let mut settings = client::Builder::new();
        settings
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .initial_max_send_streams(INITIAL_MAX_STREAMS)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_header_list_size(MAX_RESPONSE_HEAD)
            .enable_push(false);
        Self {
            inner: Arc::new(Inner {
                backends: Mutex::new(ByBackend::default()),
                connections_per_backend: connections_per_backend.max(1),
                settings,
                idle_timeout,
                reaper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` to `backend` on an open connection with room, or on a
    /// new one (opened within `connect_timeout`), and returns the response
    /// head; the body streams after it. The request's URI is absolute
    /// (`http://authority/path`, the authority going out as `:authority`) and
    /// it has no connection-specific fields
    /// ([`UpstreamHead::to_http2`](super::UpstreamHead::to_http2) builds one).
    pub(crate) async fn send<B>(
        &self,
        backend: SocketAddr,
        connect_timeout: Duration,
        request: Request<B>,
    ) -> Result<Response<Http2Body>, Http2Error>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let (head, body) = request.into_parts();
        let (mut sender, slot) = self.ready_stream_to(backend, connect_timeout).await?;
        let end_of_stream = body.is_end_stream();
        let (response, stream) = sender
            .send_request(Request::from_parts(head, ()), end_of_stream)
            .map_err(Http2Error::of_opening)?;
        // Done with once the stream is open: only the pool's own sender
        // should keep a connection taking requests, so that one the pool let
        // go of winds down with its last stream.
        drop(sender);
        let upload = if end_of_stream {
            None
        } else {
            Some(send_body(body, stream))
        };
        match response.await {
            Ok(response) => Ok(response.map(|body| Http2Body::new(body, slot))),
            Err(error) => Err(match upload.and_then(|upload| lock(&upload).take()) {
                Some(cause) => Http2Error::RequestBody(cause),
                None => Http2Error::of_exchange(error),
            }),
        }
    }

    /// A connection to `backend` ready to open one more stream, and the
    /// stream's place there. A connection that refuses new streams leaves
    /// the pool, and the next one is tried.
    async fn ready_stream_to(
        &self,
        backend: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<(Sender, StreamSlot), Http2Error> {
        let mut sends = 1;
        loop {
            let (sender, slot) = self.stream_to(backend, connect_timeout).await?;
            match sender.ready().await {
                Ok(sender) => return Ok((sender, slot)),
                Err(error) => {
                    slot.0.close();
                    if sends >= MAX_SENDS {
                        return Err(Http2Error::NotProcessed(error));
                    }
                    debug!(backend = %backend, %error, "connection refuses new streams, trying another");
                    sends += 1;
                }
            }
        }
    }

    /// A connection to `backend` for one more request, and its place there.
    async fn stream_to(
        &self,
        backend: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<(Sender, StreamSlot), Http2Error> {
        let opening = match self.choose(backend, connect_timeout) {
            Choice::Send(sender, slot) => return Ok((sender, slot)),
            Choice::Wait(opening) => opening,
        };
        // Everyone who waited goes on the new connection, room or not: it has
        // the most, and h2 holds back what the server's limit does not let through.
        match opening.await {
            Ok(Ok(opened)) => Ok((opened.sender, opened.load.take_stream())),
            Ok(Err(error)) => Err(Http2Error::Connect(error)),
            Err(_abandoned) => Err(Http2Error::Connect(Http2ConnectError::Abandoned)),
        }
    }

    /// Picks the connection for a request to `backend`, or starts opening
    /// one: see the module doc for the order.
    fn choose(&self, backend: SocketAddr, connect_timeout: Duration) -> Choice {
        let mut backends = lock(&self.inner.backends);
        let entry = backends.entry(backend).or_default();
        entry.connections.retain(|c| !c.load.is_closed());
        let with_room = entry
            .connections
            .iter()
            .filter(|c| c.load.has_room())
            .min_by_key(|c| c.load.streams());
        if let Some(connection) = with_room {
            return Choice::Send(connection.sender.clone(), connection.load.take_stream());
        }
        // A connect clears its slot before it answers, so a slot with an
        // answer is one whose task died without clearing it (a panic).
        entry.opening.take_if(|opening| opening.peek().is_some());
        if let Some(opening) = &entry.opening {
            return Choice::Wait(opening.clone());
        }
        if entry.connections.len() >= self.inner.connections_per_backend {
            let least_loaded = entry.connections.iter().min_by_key(|c| c.load.streams());
            if let Some(connection) = least_loaded {
                return Choice::Send(connection.sender.clone(), connection.load.take_stream());
            }
        }
        let opening = self.open(backend, connect_timeout);
        entry.opening = Some(opening.clone());
        Choice::Wait(opening)
    }

    /// Starts opening a connection to `backend` in a task of its own, which
    /// then drives it: the connect finishes even if the request that asked
    /// for it goes away, for the others waiting.
    fn open(&self, backend: SocketAddr, connect_timeout: Duration) -> Opening {
        let (opened, opening) = oneshot::channel();
        tokio::spawn(run_connection(
            Arc::downgrade(&self.inner),
            self.inner.settings.clone(),
            backend,
            connect_timeout,
            opened,
        ));
        self.start_reaper();
        opening.shared()
    }

    fn start_reaper(&self) {
        if self.inner.reaper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        tokio::spawn(reap(Arc::downgrade(&self.inner)));
    }

    /// Open connections and streams in flight per backend, for the status page.
    pub(crate) fn stats(&self) -> Vec<(SocketAddr, Http2Stats)> {
        let backends = lock(&self.inner.backends);
        backends
            .iter()
            .map(|(&backend, entry)| {
                let open = entry.connections.iter().filter(|c| !c.load.is_closed());
                let stats = open.fold(Http2Stats::default(), |stats, c| Http2Stats {
                    connections: stats.connections + 1,
                    streams: stats.streams + c.load.streams(),
                });
                (backend, stats)
            })
            .collect()
    }
}

impl fmt::Debug for Http2Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backends = lock(&self.inner.backends);
        f.debug_struct("Http2Pool")
            .field("backends", &backends.len())
            .field(
                "connections",
                &backends
                    .values()
                    .map(|b| b.connections.len())
                    .sum::<usize>(),
            )
            .finish()
    }
}

/// A connection's life: opens it, tells the requests waiting for it, puts
/// it in the pool, drives it until it ends, and takes it out again.
async fn run_connection(
    pool: Weak<Inner>,
    settings: client::Builder,
    backend: SocketAddr,
    connect_timeout: Duration,
    opened: oneshot::Sender<Result<Opened, Http2ConnectError>>,
) {
    let (sender, connection) = match connect(&settings, backend, connect_timeout).await {
        Ok(connected) => connected,
        Err(error) => {
            debug!(backend = %backend, %error, "HTTP/2 connect failed");
            if let Some(pool) = pool.upgrade()
                && let Some(entry) = lock(&pool.backends).get_mut(&backend)
            {
                entry.opening = None;
            }
            let _ = opened.send(Err(error));
            return;
        }
    };
    let load = Arc::new(Load::new());
    if let Some(pool) = pool.upgrade()
        // A backend dropped from the pool meanwhile gets no connection in it:
        // the requests that waited use this one, and it closes after them.
        && let Some(entry) = lock(&pool.backends).get_mut(&backend)
    {
        entry.opening = None;
        entry.connections.push(Multiplexed {
            sender: sender.clone(),
            load: Arc::clone(&load),
            idle_ticks: 0,
        });
    }
    let _ = opened.send(Ok(Opened {
        sender,
        load: Arc::clone(&load),
    }));
    debug!(backend = %backend, "HTTP/2 connection opened");
    drive(connection, &load, backend).await;
    load.close();
    if let Some(pool) = pool.upgrade()
        && let Some(entry) = lock(&pool.backends).get_mut(&backend)
    {
        entry.connections.retain(|c| !Arc::ptr_eq(&c.load, &load));
    }
}

/// A TCP connection to `backend` with TCP_NODELAY, and the HTTP/2
/// handshake on it, within `connect_timeout`.
async fn connect(
    settings: &client::Builder,
    backend: SocketAddr,
    connect_timeout: Duration,
) -> Result<(Sender, Connection), Http2ConnectError> {
    let tcp_error = |error| Http2ConnectError::Tcp(Arc::new(error));
    let connecting = async {
        let stream = TcpStream::connect(backend).await.map_err(tcp_error)?;
        // Small frames (headers, window updates, pings) must not wait for
        // ACKs of earlier ones under Nagle's algorithm.
        stream.set_nodelay(true).map_err(tcp_error)?;
        settings
            .handshake(stream)
            .await
            .map_err(|error| Http2ConnectError::Handshake(Arc::new(error)))
    };
    tokio::time::timeout(connect_timeout, connecting)
        .await
        .map_err(|_elapsed| Http2ConnectError::Timeout(connect_timeout))?
}

/// Drives a connection (reads and writes its frames for every stream) until
/// it ends: when the connection closes or breaks, after a GOAWAY once its
/// last stream is done, when no sender is left and no stream, or when the
/// backend does not answer a keep-alive PING. Meanwhile keeps the server's
/// stream limit current in `load`.
async fn drive(mut connection: Connection, load: &Load, backend: SocketAddr) {
    let pings = connection.ping_pong();
    let mut connection = pin!(connection);
    let running = poll_fn(|cx| {
        let polled = connection.as_mut().poll(cx);
        load.max_streams
            .store(connection.max_concurrent_send_streams(), Ordering::Relaxed);
        polled
    });
    let silent = async {
        match pings {
            Some(pings) => keep_alive(pings, load).await,
            // Taken only once, and only here.
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = running => match ended {
            Ok(()) => debug!(backend = %backend, "HTTP/2 connection closed"),
            Err(error) => debug!(backend = %backend, %error, "HTTP/2 connection failed"),
        },
        () = silent => debug!(backend = %backend, "no answer to a keep-alive PING, closing the HTTP/2 connection"),
    }
}

/// PINGs the backend every [`KEEP_ALIVE_INTERVAL`] while the connection
/// has streams; returns when an answer does not come within
/// [`KEEP_ALIVE_TIMEOUT`]. An idle connection is not pinged: the reaper is
/// about to close it, and gRPC servers count such pings as abuse.
async fn keep_alive(mut pings: PingPong, load: &Load) {
    let mut ticks = tokio::time::interval(KEEP_ALIVE_INTERVAL);
    // The first tick completes at once; the first PING waits a whole interval.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        if load.streams() == 0 {
            continue;
        }
        let answered = tokio::time::timeout(KEEP_ALIVE_TIMEOUT, pings.ping(Ping::opaque())).await;
        if !matches!(answered, Ok(Ok(_pong))) {
            return;
        }
    }
}

/// Closes the pool's connections that carried no stream for the idle
/// timeout, until the pool is gone. Holds only a weak reference, so it never
/// keeps a pool alive.
async fn reap(pool: Weak<Inner>) {
    let Some(idle_timeout) = pool.upgrade().map(|pool| pool.idle_timeout) else {
        return;
    };
    let mut ticks = tokio::time::interval(idle_timeout / TICKS_PER_IDLE_TIMEOUT);
    // The first tick completes at once; start counting from the next.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        lock(&pool.backends).retain(|_, entry| {
            entry.connections.retain_mut(Multiplexed::keep_after_tick);
            // Backends with nothing open or opening take their entry with them.
            !entry.connections.is_empty() || entry.opening.is_some()
        });
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use futures::future::{BoxFuture, join_all};
    use http::{HeaderMap, HeaderValue, StatusCode};
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use hyper::body::{Frame, Incoming};
    use hyper::server::conn::http2 as server;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    use super::*;

    /// The request body the tests send: any body, boxed.
    type TestBody = UnsyncBoxBody<Bytes, BoxError>;

    /// Long enough for a connect on loopback, however loaded the machine.
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    fn empty() -> TestBody {
        Empty::new().map_err(BoxError::from).boxed_unsync()
    }

    fn get(backend: SocketAddr) -> Request<TestBody> {
        Request::get(format!("http://{backend}/"))
            .body(empty())
            .expect("a valid request")
    }

    fn post(backend: SocketAddr, body: TestBody) -> Request<TestBody> {
        Request::post(format!("http://{backend}/upload"))
            .body(body)
            .expect("a valid request")
    }

    /// A listener on a free port of 127.0.0.1, and its address.
    async fn listen() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port on loopback");
        let addr = listener.local_addr().expect("a bound address");
        (listener, addr)
    }

    /// What a test backend answers each request with.
    type Handler =
        Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, Response<TestBody>> + Send + Sync>;

    /// How a test backend serves its connections.
    #[derive(Debug, Clone, Copy, Default)]
    struct ServerSettings {
        /// Its `SETTINGS_MAX_CONCURRENT_STREAMS`.
        max_concurrent_streams: Option<u32>,
        /// Each connection shuts down gracefully (GOAWAY) once it has taken
        /// this many requests.
        goaway_after: Option<usize>,
    }

    /// An HTTP/2 backend (hyper's server) on 127.0.0.1.
    struct TestBackend {
        addr: SocketAddr,
        /// Connections accepted so far.
        accepted: Arc<AtomicUsize>,
        /// Connections that ended so far.
        closed: Arc<AtomicUsize>,
    }

    impl TestBackend {
        async fn start(settings: ServerSettings, handler: Handler) -> Self {
            let (listener, addr) = listen().await;
            let accepted = Arc::new(AtomicUsize::new(0));
            let closed = Arc::new(AtomicUsize::new(0));
            let (counted, ended) = (Arc::clone(&accepted), Arc::clone(&closed));
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    counted.fetch_add(1, Ordering::Relaxed);
                    let (handler, ended) = (Arc::clone(&handler), Arc::clone(&ended));
                    tokio::spawn(async move {
                        serve_connection(stream, settings, handler).await;
                        ended.fetch_add(1, Ordering::Relaxed);
                    });
                }
            });
            Self {
                addr,
                accepted,
                closed,
            }
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::Relaxed)
        }

        fn closed(&self) -> usize {
            self.closed.load(Ordering::Relaxed)
        }
    }

    async fn serve_connection(stream: TcpStream, settings: ServerSettings, handler: Handler) {
        let taken = Arc::new(AtomicUsize::new(0));
        let go_away = Arc::new(Notify::new());
        let goaway_after = settings.goaway_after;
        let service = {
            let go_away = Arc::clone(&go_away);
            service_fn(move |request| {
                let count = taken.fetch_add(1, Ordering::Relaxed) + 1;
                if goaway_after == Some(count) {
                    go_away.notify_one();
                }
                let responding = handler(request);
                async move { Ok::<_, Infallible>(responding.await) }
            })
        };
        let mut builder = server::Builder::new(TokioExecutor::new());
        builder.max_concurrent_streams(settings.max_concurrent_streams);
        let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
        tokio::select! {
            _ = connection.as_mut() => {}
            () = go_away.notified() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }

    /// Answers `200 ok` after `delay`.
    fn ok_after(delay: Duration) -> Handler {
        Arc::new(move |_request| {
            async move {
                tokio::time::sleep(delay).await;
                let body = Full::new(Bytes::from_static(b"ok"))
                    .map_err(BoxError::from)
                    .boxed_unsync();
                Response::new(body)
            }
            .boxed()
        })
    }

    /// Reads the whole request body, then answers `200`.
    fn read_then_ok() -> Handler {
        Arc::new(|request| {
            async move {
                let _ = request.into_body().collect().await;
                Response::new(empty())
            }
            .boxed()
        })
    }

    /// Sends the request body back as it arrives, then `grpc-status: 0` in
    /// trailers.
    fn echo_with_trailers() -> Handler {
        Arc::new(|request| {
            async move {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let body = request
                    .into_body()
                    .map_err(BoxError::from)
                    .with_trailers(async move { Some(Ok(trailers)) })
                    .boxed_unsync();
                Response::new(body)
            }
            .boxed()
        })
    }

    /// Waits for `condition` to hold, checking every 10 ms, for 5 s at most.
    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        let waiting = async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .is_err()
        {
            panic!("{what}: still not after 5 s");
        }
    }

    async fn expect_ok(result: Result<Response<Http2Body>, Http2Error>) -> Bytes {
        let response = result.expect("the request succeeds");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await;
        body.expect("the body arrives whole").to_bytes()
    }

    #[tokio::test]
    async fn concurrent_requests_share_at_most_n_connections() {
        let settings = ServerSettings {
            max_concurrent_streams: Some(4),
            ..ServerSettings::default()
        };
        let backend = TestBackend::start(settings, ok_after(Duration::from_millis(20))).await;
        let addr = backend.addr;
        let pool = Http2Pool::new(2);
        let burst = || join_all((0..10).map(|_| pool.send(addr, CONNECT_TIMEOUT, get(addr))));

        // Before any connection exists, a burst waits for one connect.
        for result in burst().await {
            assert_eq!(expect_ok(result).await, "ok");
        }
        assert_eq!(backend.accepted(), 1, "the burst shared one connect");

        // Once the server's limit of 4 streams is known, a burst that
        // overflows it gets a second connection, and no third.
        expect_ok(pool.send(addr, CONNECT_TIMEOUT, get(addr)).await).await;
        for result in burst().await {
            expect_ok(result).await;
        }
        assert_eq!(backend.accepted(), 2);
        assert_eq!(
            pool.stats(),
            [(
                addr,
                Http2Stats {
                    connections: 2,
                    streams: 0
                }
            )]
        );
    }

    #[tokio::test]
    async fn a_stream_counts_until_its_response_body_ends() {
        let backend = TestBackend::start(ServerSettings::default(), ok_after(Duration::ZERO)).await;
        let addr = backend.addr;
        let pool = Http2Pool::new(2);
        let response = pool
            .send(addr, CONNECT_TIMEOUT, get(addr))
            .await
            .expect("the request succeeds");
        let streams = || pool.stats().first().map(|(_, stats)| stats.streams);
        assert_eq!(streams(), Some(1));
        response
            .into_body()
            .collect()
            .await
            .expect("the body arrives whole");
        assert_eq!(streams(), Some(0));
    }

    #[tokio::test]
    async fn a_goaway_mid_load_moves_later_requests_to_a_new_connection() {
        let settings = ServerSettings {
            goaway_after: Some(10),
            ..ServerSettings::default()
        };
        let backend = TestBackend::start(settings, ok_after(Duration::from_millis(20))).await;
        let addr = backend.addr;
        let pool = Http2Pool::new(2);
        // Requests keep arriving, a few milliseconds apart, while each
        // connection goes away after its tenth with others in flight.
        let requests = (0..50u64).map(|i| {
            let pool = pool.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(i * 3)).await;
                pool.send(addr, CONNECT_TIMEOUT, get(addr)).await
            }
        });
        for result in join_all(requests).await {
            assert_eq!(expect_ok(result).await, "ok");
        }
        assert!(
            backend.accepted() >= 3,
            "each GOAWAY was followed by a new connection, {} in all",
            backend.accepted()
        );
    }

    /// A backend speaking h2's server API, which resets every stream it
    /// receives with `reason`.
    async fn resetting_backend(reason: h2::Reason) -> SocketAddr {
        let (listener, addr) = listen().await;
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut connection) = h2::server::handshake(stream).await else {
                return;
            };
            while let Some(Ok((_request, mut respond))) = connection.accept().await {
                respond.send_reset(reason);
            }
        });
        addr
    }

    fn small_body() -> TestBody {
        Full::new(Bytes::from_static(b"payment"))
            .map_err(BoxError::from)
            .boxed_unsync()
    }

    #[tokio::test]
    async fn a_refused_stream_was_not_processed() {
        let addr = resetting_backend(h2::Reason::REFUSED_STREAM).await;
        let pool = Http2Pool::new(2);
        let error = pool
            .send(addr, CONNECT_TIMEOUT, post(addr, small_body()))
            .await
            .expect_err("the backend refuses the stream");
        assert!(error.was_not_processed(), "{error:?}");
        assert!(!error.is_connect());
    }

    #[tokio::test]
    async fn a_stream_reset_for_another_reason_may_have_been_processed() {
        let addr = resetting_backend(h2::Reason::INTERNAL_ERROR).await;
        let pool = Http2Pool::new(2);
        let error = pool
            .send(addr, CONNECT_TIMEOUT, post(addr, small_body()))
            .await
            .expect_err("the backend resets the stream");
        assert!(matches!(error, Http2Error::Other(_)), "{error:?}");
        assert!(!error.was_not_processed());
    }

    /// A backend that answers every connection with its SETTINGS and a
    /// GOAWAY whose last stream id, 0, leaves every request out: at once, or
    /// once the first request's HEADERS have arrived. Written frame by frame,
    /// since h2's server cannot send a last stream id below one it received.
    async fn going_away(after_first_request: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let (listener, addr) = listen().await;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    if read_preface(&mut stream, after_first_request)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let settings = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
                    // GOAWAY: last stream id 0, NO_ERROR.
                    let goaway = [0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    let _ = stream
                        .write_all(&[&settings[..], &goaway[..]].concat())
                        .await;
                    // Held open until the client closes it.
                    let _ = stream.read_to_end(&mut Vec::new()).await;
                });
            }
        });
        (addr, accepted)
    }

    /// Reads the client's connection preface and, if `through_headers`, its
    /// frames up to the first HEADERS.
    async fn read_preface(stream: &mut TcpStream, through_headers: bool) -> io::Result<()> {
        const HEADERS: u8 = 0x1;
        let mut preface = [0u8; 24];
        stream.read_exact(&mut preface).await?;
        if !through_headers {
            return Ok(());
        }
        loop {
            // A frame header: 24-bit length, type, flags, stream id.
            let mut header = [0u8; 9];
            stream.read_exact(&mut header).await?;
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]);
            let mut payload = vec![0u8; length as usize];
            stream.read_exact(&mut payload).await?;
            if header[3] == HEADERS {
                return Ok(());
            }
        }
    }

    #[tokio::test]
    async fn a_stream_above_the_goaway_last_stream_id_was_not_processed() {
        let (addr, _) = going_away(true).await;
        let pool = Http2Pool::new(2);
        let error = pool
            .send(addr, CONNECT_TIMEOUT, post(addr, small_body()))
            .await
            .expect_err("the backend goes away before the stream");
        assert!(error.was_not_processed(), "{error:?}");
    }

    #[tokio::test]
    async fn a_backend_that_always_goes_away_gets_a_request_a_few_times_then_not_processed() {
        let (addr, accepted) = going_away(false).await;
        let pool = Http2Pool::new(2);
        // Whether hyper sees the GOAWAY before the request goes out (and
        // hands it back for another connection) or after (the stream is
        // above the last stream id), it was never processed.
        let error = pool
            .send(addr, CONNECT_TIMEOUT, post(addr, small_body()))
            .await
            .expect_err("every connection goes away");
        assert!(error.was_not_processed(), "{error:?}");
        let connections = accepted.load(Ordering::Relaxed);
        assert!(
            (1..=MAX_SENDS).contains(&connections),
            "{connections} connections"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_fails_every_waiting_request_as_connect() {
        let (listener, addr) = listen().await;
        drop(listener);
        let pool = Http2Pool::new(2);
        let burst = (0..5).map(|_| pool.send(addr, CONNECT_TIMEOUT, get(addr)));
        for result in join_all(burst).await {
            let error = result.expect_err("nothing listens there");
            assert!(error.is_connect(), "{error:?}");
            assert!(matches!(
                error,
                Http2Error::Connect(Http2ConnectError::Tcp(_))
            ));
        }
        assert!(pool.stats().iter().all(|(_, stats)| stats.connections == 0));
    }

    #[tokio::test]
    async fn an_upload_that_fails_is_told_from_a_failing_backend() {
        let backend = TestBackend::start(ServerSettings::default(), read_then_ok()).await;
        let addr = backend.addr;
        let pool = Http2Pool::new(2);
        let frames = futures::stream::iter([
            Ok(Frame::data(Bytes::from_static(b"first part"))),
            Err(BoxError::from("the client went away")),
        ]);
        let error = pool
            .send(
                addr,
                CONNECT_TIMEOUT,
                post(addr, StreamBody::new(frames).boxed_unsync()),
            )
            .await
            .expect_err("the upload fails before the backend answers");
        let Http2Error::RequestBody(cause) = &error else {
            panic!("not a request body failure: {error:?}");
        };
        assert_eq!(cause.to_string(), "the client went away");
        assert!(!error.is_connect() && !error.was_not_processed());
    }

    /// The bytes of a body of `size` bytes, numbered so that a reordered or
    /// lost chunk shows.
    fn pattern(size: usize) -> Vec<u8> {
        (0..size).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn bodies_stream_both_ways_and_response_trailers_arrive() {
        const CHUNK: usize = 64 * 1024;
        // Past both flow-control windows, so they must keep opening.
        const SIZE: usize = 8 * 1024 * 1024;
        let backend = TestBackend::start(ServerSettings::default(), echo_with_trailers()).await;
        let addr = backend.addr;
        let pool = Http2Pool::new(2);
        let sent = Bytes::from(pattern(SIZE));
        let (upload, chunks) = tokio::sync::mpsc::channel::<Bytes>(4);
        let frames = futures::stream::unfold(chunks, |mut chunks| async move {
            let chunk = chunks.recv().await?;
            Some((Ok::<_, BoxError>(Frame::data(chunk)), chunks))
        });
        let body = StreamBody::new(frames).boxed_unsync();
        let sending = pool.send(addr, CONNECT_TIMEOUT, post(addr, body));
        upload
            .send(sent.slice(..CHUNK))
            .await
            .expect("the first chunk goes out");
        let response = sending.await.expect("the echo answers");
        let mut echoed = response.into_body();

        // The first chunk comes back while the upload is still open: neither
        // side waits for a whole body.
        let mut received = Vec::with_capacity(SIZE);
        while received.len() < CHUNK {
            let frame = echoed.frame().await.expect("a frame").expect("no error");
            received.extend_from_slice(&frame.into_data().expect("data"));
        }

        let uploading = async {
            for start in (CHUNK..SIZE).step_by(CHUNK) {
                upload
                    .send(sent.slice(start..start + CHUNK))
                    .await
                    .expect("the chunk goes out");
            }
            // Dropping the sender ends the request body.
            drop(upload);
        };
        let downloading = async {
            let mut trailers = None;
            while let Some(frame) = echoed.frame().await {
                let frame = frame.expect("the body streams");
                match frame.into_data() {
                    Ok(data) => received.extend_from_slice(&data),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                }
            }
            trailers
        };
        let ((), trailers) = tokio::join!(uploading, downloading);
        assert!(received == sent, "the echo came back whole and in order");
        let trailers = trailers.expect("trailers after the body");
        assert_eq!(trailers["grpc-status"], "0");
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let backend = TestBackend::start(ServerSettings::default(), ok_after(Duration::ZERO)).await;
        let addr = backend.addr;
        let pool = Http2Pool::with_idle_timeout(2, Duration::from_millis(300));
        expect_ok(pool.send(addr, CONNECT_TIMEOUT, get(addr)).await).await;
        assert_eq!(pool.stats().len(), 1);
        // Closed after four idle ticks of 100 ms.
        eventually("the pool closes the idle connection", || {
            pool.stats().is_empty()
        })
        .await;
        eventually("the backend sees it close", || backend.closed() == 1).await;
        // The next request opens a new one.
        expect_ok(pool.send(addr, CONNECT_TIMEOUT, get(addr)).await).await;
        assert_eq!(backend.accepted(), 2);
    }
}
