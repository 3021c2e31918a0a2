//! The upstream connection pool: keep-alive HTTP/1.1 connections to the
//! backends, one small pool per proxy worker.
//!
//! A pooled connection is just its socket: the exchange on it
//! ([`http1`]) runs in the request's own task, and the buffer it
//! reads into lives only as long as one response. So 1,000 idle connections
//! cost 1,000 sockets, and 1,000 requests waiting on a slow backend cost their
//! sockets and their futures (`docs/performance.md` compares the figures with
//! hyper's client connections).
//!
//! The shape:
//!
//! * per backend address, a stack of idle connections: last in, first out, so
//!   the busy few stay warm and the rest age out; at most
//!   [`MAX_IDLE_PER_BACKEND`] are kept, extra ones are closed on return;
//! * a connection goes back only when its response body was read to the end
//!   and both sides ended their messages cleanly. A body dropped early (the
//!   client went away) leaves unread bytes on the connection, so it is closed;
//! * connections idle for [`IDLE_TIMEOUT`] (and those the backend closed) are
//!   dropped by a reaper task, one per pool, ticking every third of it; a
//!   checkout also skips connections the backend has closed meanwhile;
//! * a request that meets the keep-alive race (the backend closed an idle
//!   connection just as the request went out on it, and not a byte of an answer
//!   came back) is sent once more on a fresh connection when that is safe: a
//!   safe method (`GET`, `HEAD`, `OPTIONS`, `TRACE`) and no body, as Go's
//!   `Transport` does. Anything else fails, and the proxy's retry policy decides.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use hyper::body::{Body, Frame, SizeHint};
use service_kit::BoxError;
use tokio::net::TcpStream;
use tracing::debug;

use super::ByBackend;
use super::http1::{self, BodyReader, ExchangeError, Exchanged, RequestWriter, Step, UpstreamHead};

/// Idle connections kept per backend (in each worker's pool). Enough for the
/// concurrency one worker sees per backend under load, small enough that an
/// idle pool after a burst stays a few hundred sockets.
pub const MAX_IDLE_PER_BACKEND: usize = 128;

/// How long an idle connection is kept (at least; at most a third longer, 80 s).
/// The pool must close an idle connection before the backend does, or a request
/// sent just as the backend closes it is lost in the keep-alive race; our backend
/// keeps idle connections for 120 s (`idleTimeoutMs`), most servers for 60 s or
/// more. Short enough, too, that the connections opened for a burst are let go
/// within about a minute after it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Reaper ticks per [`IDLE_TIMEOUT`]: a connection idle for more than this many
/// ticks is closed, so it lived idle between 60 and 80 s.
const TICKS_PER_TIMEOUT: u32 = 3;

/// Why an upstream exchange failed: the proxy tells "nothing was sent"
/// ([`UpstreamError::is_connect`]) from everything else.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection could not be opened (refused, unreachable).
    #[error("tcp connect error")]
    Connect(#[source] io::Error),
    /// The TCP connection was not open within the connect timeout.
    #[error("tcp connect timed out after {} ms", .0.as_millis())]
    ConnectTimeout(Duration),
    /// The connection broke, or the backend answered something that is not HTTP.
    #[error("upstream request failed")]
    Exchange(#[source] ExchangeError),
}

impl UpstreamError {
    /// Whether the failure happened before anything was sent.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_)
        )
    }
}

/// One worker's pool of keep-alive connections to the backends. Clones share
/// the pool.
#[derive(Clone)]
pub(crate) struct UpstreamPool {
    inner: Arc<Inner>,
}

struct Inner {
    /// Idle connections by backend, newest last. A plain mutex: it is held for
    /// a push or a pop, never across an `.await`, and each worker has its own pool.
    idle: Mutex<ByBackend<Vec<Idle>>>,
    /// The reaper's clock: bumped every tick, stamped on every returned
    /// connection, so a return costs an atomic load rather than a clock reading.
    tick: AtomicU64,
    /// Whether the reaper task runs; it is started by the first connect, from
    /// inside the worker's runtime.
    reaper_started: AtomicBool,
}

struct Idle {
    stream: TcpStream,
    /// [`Inner::tick`] when it went idle.
    since: u64,
}

impl UpstreamPool {
    /// An empty pool.
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                idle: Mutex::new(ByBackend::default()),
                tick: AtomicU64::new(0),
                reaper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Sends the request (`head`, then `body`) to `backend` on an idle
    /// connection, or on a new one opened within `connect_timeout`, and
    /// returns the response head. The connection rides in the response body
    /// and goes back to the pool when that body has been read to its end.
    pub(crate) async fn send<B>(
        &self,
        backend: SocketAddr,
        connect_timeout: Duration,
        head: &UpstreamHead,
        body: B,
    ) -> Result<Response<Box<PooledBody<B>>>, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let mut body = Some(body).filter(|_| head.has_body());
        if let Some(stream) = self.checkout(backend) {
            // A bodiless request can be sent twice; one with a body cannot, as
            // its bytes are gone once sent.
            let resendable = head.method().is_safe() && !head.has_body();
            match http1::exchange(&stream, backend, head, body.take()).await {
                Ok(exchanged) => return Ok(self.lease(backend, stream, exchanged)),
                // The keep-alive race, on a request safe to send again.
                Err(ExchangeError::NoResponse(error)) if resendable => {
                    debug!(backend = %backend, %error, "idle connection was closed, sending on a new one");
                }
                Err(error) => return Err(UpstreamError::Exchange(error)),
            }
        }
        let stream = self.connect(backend, connect_timeout).await?;
        let exchanged = http1::exchange(&stream, backend, head, body)
            .await
            .map_err(UpstreamError::Exchange)?;
        Ok(self.lease(backend, stream, exchanged))
    }

    /// The newest idle connection to `backend` that is still open.
    fn checkout(&self, backend: SocketAddr) -> Option<TcpStream> {
        let mut idle = lock(&self.inner.idle);
        let stack = idle.get_mut(&backend)?;
        while let Some(candidate) = stack.pop() {
            if is_open(&candidate.stream) {
                return Some(candidate.stream);
            }
        }
        None
    }

    /// Opens a connection to `backend`.
    async fn connect(
        &self,
        backend: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<TcpStream, UpstreamError> {
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(backend))
            .await
            .map_err(|_elapsed| UpstreamError::ConnectTimeout(connect_timeout))?
            .map_err(UpstreamError::Connect)?;
        // Requests are small writes; Nagle's algorithm would hold them back
        // waiting for ACKs.
        stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
        self.start_reaper();
        Ok(stream)
    }

    /// Puts `stream` in the response body, which gives it back at its end; a
    /// response with no body at all gives it back at once. The body is boxed:
    /// it holds the connection and the reader, and the response it rides in is
    /// moved a dozen times on its way to the client.
    fn lease<B>(
        &self,
        backend: SocketAddr,
        stream: TcpStream,
        exchanged: Exchanged<B>,
    ) -> Response<Box<PooledBody<B>>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let Exchanged {
            response,
            reader,
            unsent,
            reusable,
        } = exchanged;
        let lease = Lease {
            pool: Arc::clone(&self.inner),
            backend,
            stream,
            reusable,
        };
        let mut body = Box::new(PooledBody {
            reader,
            unsent,
            lease: Some(lease),
        });
        // HEAD, 204, 304, `Content-Length: 0`: hyper may never poll the body.
        // A `101` keeps its connection for `into_upgraded`.
        if !body.reader.is_upgraded() {
            body.end_if_done();
        }
        response.map(|()| body)
    }

    fn start_reaper(&self) {
        if self.inner.reaper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(reap(pool));
    }

    /// Idle connections to `backend` (for tests).
    #[cfg(test)]
    fn idle_count(&self, backend: SocketAddr) -> usize {
        lock(&self.inner.idle).get(&backend).map_or(0, Vec::len)
    }
}

impl fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idle = lock(&self.inner.idle);
        f.debug_struct("UpstreamPool")
            .field("backends", &idle.len())
            .field("idle", &idle.values().map(Vec::len).sum::<usize>())
            .finish()
    }
}

/// Whether an idle connection is still open and quiet. Reads the readiness the
/// runtime already has, so a quiet connection costs no system call (the read
/// that emptied its socket cleared the mark; see `http1::response`). One
/// marked readable is closed by the backend, or holds bytes no request asked
/// for, or (a stale mark) neither, which one non-blocking read tells. Like
/// hyper's client connections, it sees a close once the runtime has seen it;
/// a close in flight is the keep-alive race, which [`UpstreamPool::send`]
/// handles.
fn is_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut byte = [0u8; 1];
            matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

/// Closes the pool's connections idle for longer than [`IDLE_TIMEOUT`], and
/// those the backend closed, until the pool is gone. Holds only a weak
/// reference, so it never keeps a pool alive.
async fn reap(pool: Weak<Inner>) {
    let mut ticks = tokio::time::interval(IDLE_TIMEOUT / TICKS_PER_TIMEOUT);
    // The first tick completes at once; start counting from the next.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = pool.tick.fetch_add(1, Ordering::Relaxed) + 1;
        let mut idle = lock(&pool.idle);
        idle.retain(|_, stack| {
            stack.retain(|entry| {
                now - entry.since <= u64::from(TICKS_PER_TIMEOUT) && is_open(&entry.stream)
            });
            // Backends that left the list take their entry with them.
            !stack.is_empty()
        });
    }
}

/// A connection lent out with its response: goes back to the pool when
/// [`give_back`](Lease::give_back) is called, and is closed when dropped.
struct Lease {
    pool: Arc<Inner>,
    backend: SocketAddr,
    stream: TcpStream,
    /// Whether the exchange left the connection fit for another request.
    reusable: bool,
}

impl Lease {
    fn give_back(self) {
        let since = self.pool.tick.load(Ordering::Relaxed);
        let mut idle = lock(&self.pool.idle);
        let stack = idle.entry(self.backend).or_default();
        if stack.len() < MAX_IDLE_PER_BACKEND {
            stack.push(Idle {
                stream: self.stream,
                since,
            });
        }
        // Past the cap the stream is dropped here, which closes it.
    }
}

/// A backend's response body, read off its connection as the client takes it;
/// returns the connection to the pool in the poll that sees its end.
pub(crate) struct PooledBody<B> {
    reader: BodyReader,
    /// The rest of a request the backend answered before taking all of it,
    /// written as the response streams.
    unsent: Option<Box<RequestWriter<B>>>,
    /// The connection the body arrives on; `None` once the body has ended
    /// (given back, or closed).
    lease: Option<Lease>,
}

/// A backend connection that switched protocols (`101`), handed over whole.
#[derive(Debug)]
pub struct Upgraded {
    /// The connection, never to return to the pool.
    pub stream: TcpStream,
    /// What the backend sent right after its `101`, already read: the first
    /// bytes of the new protocol.
    pub read_ahead: Bytes,
}

impl<B> PooledBody<B> {
    /// The connection of a `101` response, for a tunnel; `None` for any other
    /// response.
    pub(crate) fn into_upgraded(self) -> Option<Upgraded> {
        if !self.reader.is_upgraded() {
            return None;
        }
        let PooledBody { reader, lease, .. } = self;
        Some(Upgraded {
            stream: lease?.stream,
            read_ahead: reader.into_read_ahead(),
        })
    }
}

impl<B> PooledBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Ends the body if its last byte has been handed out: hyper's server
    /// stops polling a body whose size says it has ended, so this is checked
    /// after every frame, not only when a poll finds nothing more.
    fn end_if_done(&mut self) {
        if self.reader.is_end()
            && let Ok(Step::End { clean }) = self.reader.step()
        {
            self.end(clean);
        }
    }

    /// Gives the connection back if it is clean and reusable, and the request
    /// was written whole; closes it otherwise.
    fn end(&mut self, clean: bool) {
        if let Some(lease) = self.lease.take()
            && clean
            && lease.reusable
            && self.unsent.is_none()
        {
            lease.give_back();
        }
    }

    fn fail(&mut self, error: ExchangeError) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        // A broken body leaves the connection broken: close it.
        self.lease = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl<B> Body for PooledBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // Every field is `Unpin`, so `self` derefs mutably.
        let this = self.get_mut();
        loop {
            let Some(lease) = &mut this.lease else {
                return Poll::Ready(None);
            };
            poll_unsent(&mut this.unsent, lease, cx);
            match this.reader.step() {
                Ok(Step::Frame(frame)) => {
                    this.end_if_done();
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::End { clean }) => {
                    this.end(clean);
                    return Poll::Ready(None);
                }
                Ok(Step::Read) => match ready!(this.reader.poll_read(&lease.stream, cx)) {
                    Ok(true) => {}
                    // A body that runs until the backend closes has ended.
                    Ok(false) => {
                        this.end(false);
                        return Poll::Ready(None);
                    }
                    Err(error) => return this.fail(error),
                },
                Err(error) => return this.fail(error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.lease.is_none() || self.reader.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        match self.reader.remaining() {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

/// Writes more of a request the backend answered early. A write that fails
/// (the backend stopped reading and closed) does not fail the response, which
/// may still arrive whole; the connection is just not reused.
fn poll_unsent<B>(
    unsent: &mut Option<Box<RequestWriter<B>>>,
    lease: &mut Lease,
    cx: &mut Context<'_>,
) where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let Some(writer) = unsent else { return };
    match writer.poll_write(&lease.stream, cx) {
        Poll::Ready(Ok(())) => *unsent = None,
        Poll::Ready(Err(error)) => {
            debug!(backend = %lease.backend, %error, "the rest of the request could not be sent");
            *unsent = None;
            lease.reusable = false;
        }
        Poll::Pending => {}
    }
}

impl<B> fmt::Debug for PooledBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBody")
            .field("reader", &self.reader)
            .field("leased", &self.lease.is_some())
            .finish()
    }
}

// A poisoned lock means a panic during a push or a pop; the map is still whole.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::StatusCode;
    use http::header::HOST;
    use http::{Method, Request};
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Incoming;
    use hyper::server::conn::http1 as server;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    /// A keep-alive server: `/empty` answers 204, anything else `hello`.
    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound socket has an address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let mut response = Response::new(Full::new(Bytes::from_static(b"hello")));
                    if req.uri().path() == "/empty" {
                        *response.body_mut() = Full::default();
                        *response.status_mut() = StatusCode::NO_CONTENT;
                    }
                    Ok::<_, Infallible>(response)
                });
                tokio::spawn(
                    server::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    async fn try_send(
        pool: &UpstreamPool,
        addr: SocketAddr,
        method: Method,
        path: &str,
    ) -> Result<Response<Box<PooledBody<Empty<Bytes>>>>, UpstreamError> {
        let (parts, body) = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "test")
            .body(Empty::<Bytes>::new())
            .expect("valid request")
            .into_parts();
        let head = UpstreamHead::new(&parts, &body, &[]);
        pool.send(addr, Duration::from_secs(5), &head, body).await
    }

    async fn send(
        pool: &UpstreamPool,
        addr: SocketAddr,
        path: &str,
    ) -> Response<Box<PooledBody<Empty<Bytes>>>> {
        try_send(pool, addr, Method::GET, path)
            .await
            .expect("the server answers")
    }

    #[tokio::test]
    async fn a_bodiless_response_gives_its_connection_back_at_once() {
        let (pool, addr) = (UpstreamPool::new(), server().await);
        let response = send(&pool, addr, "/empty").await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(pool.idle_count(addr), 1, "back before the body is polled");
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_gives_its_connection_back() {
        let (pool, addr) = (UpstreamPool::new(), server().await);
        let response = send(&pool, addr, "/").await;
        assert_eq!(
            pool.idle_count(addr),
            0,
            "lent out while the body is unread"
        );
        let body = response.collect().await.expect("body arrives").to_bytes();
        assert_eq!(body, Bytes::from_static(b"hello"));
        assert_eq!(pool.idle_count(addr), 1);
        // ... and the next request takes it rather than a new one.
        let _response = send(&pool, addr, "/").await;
        assert_eq!(pool.idle_count(addr), 0);
    }

    /// Plays a backend that answers the first request on its first
    /// connection with `first`, then reads the next request on that connection
    /// and closes it unanswered, as a backend whose idle timeout fired just as
    /// the request went out; the next connection's request gets `second`.
    fn racing_backend(first: &'static str, second: &'static str) -> SocketAddr {
        use std::io::{Read, Write};
        fn read_head(stream: &mut std::net::TcpStream) {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
        }
        fn answer(stream: &mut std::net::TcpStream, body: &str) {
            read_head(stream);
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).expect("answer");
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound socket has an address");
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            answer(&mut stream, first);
            read_head(&mut stream);
            drop(stream);
            let (mut stream, _) = listener.accept().expect("accept");
            answer(&mut stream, second);
            // Keeps the second connection open until the test is done.
            read_head(&mut stream);
        });
        addr
    }

    async fn body_of(response: Response<Box<PooledBody<Empty<Bytes>>>>) -> Bytes {
        response.collect().await.expect("body arrives").to_bytes()
    }

    /// The keep-alive race: the request goes out on a pooled connection that
    /// the backend closes without a byte of an answer.
    async fn race_an_idle_close(
        method: Method,
    ) -> (Result<Bytes, UpstreamError>, UpstreamPool, SocketAddr) {
        let addr = racing_backend("first", "second");
        let pool = UpstreamPool::new();
        assert_eq!(body_of(send(&pool, addr, "/").await).await, "first");
        assert_eq!(pool.idle_count(addr), 1);
        let result = match try_send(&pool, addr, method, "/").await {
            Ok(response) => Ok(body_of(response).await),
            Err(error) => Err(error),
        };
        (result, pool, addr)
    }

    #[tokio::test]
    async fn a_safe_request_that_meets_the_keep_alive_race_goes_again_on_a_new_connection() {
        let (result, pool, addr) = race_an_idle_close(Method::GET).await;
        assert_eq!(result.expect("sent again"), "second");
        assert_eq!(pool.idle_count(addr), 1, "the new connection is pooled");
    }

    /// A `POST` may have been acted on before the connection closed: it is not
    /// sent again here; the proxy's retry policy decides.
    #[tokio::test]
    async fn an_unsafe_request_that_meets_the_keep_alive_race_fails() {
        let (result, pool, addr) = race_an_idle_close(Method::POST).await;
        let error = result.expect_err("the connection was closed under the request");
        assert!(
            matches!(
                &error,
                UpstreamError::Exchange(ExchangeError::NoResponse(_))
            ),
            "{error:?}"
        );
        assert_eq!(pool.idle_count(addr), 0);
        assert_eq!(body_of(send(&pool, addr, "/").await).await, "second");
    }

    #[tokio::test]
    async fn a_body_dropped_unread_does_not_give_its_connection_back() {
        let (pool, addr) = (UpstreamPool::new(), server().await);
        drop(send(&pool, addr, "/").await);
        assert_eq!(pool.idle_count(addr), 0);
    }
}
