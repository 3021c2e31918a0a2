//! The upstream connection pool: keep-alive HTTP/1.1 connections to the
//! backends, one small pool per proxy worker.
//!
//! Why not hyper-util's legacy `Client`, which the proxy used before: it is built
//! for a shared, multi-threaded, multi-protocol client, and a proxy worker paid
//! for all of it on every request. Its checkout took a mutex and a hash lookup
//! and made a `oneshot` and a `want` channel pair, and for HTTP/1 it *spawned a
//! task per request* whose only job was to put the connection back once the
//! response body had ended. Here a worker owns its pool (one current-thread
//! runtime per core, see [`workers`](crate::workers)), so the lock is never
//! contended, and the connection goes back from inside the response body itself,
//! in the poll that sees its end ([`PooledBody`]), with no task and no channel.
//! Measured against the legacy client (`bench/results.md`): 1.03x the requests/s
//! and 5 % less CPU per request on small requests. Memory per connection barely
//! moved: the connection's buffers and dispatch channel are hyper's, in both.
//!
//! The shape:
//!
//! * per backend address, a stack of idle [`SendRequest`]s: last in, first out,
//!   so the busy few connections stay warm and the rest age out; at most
//!   [`MAX_IDLE_PER_BACKEND`] are kept, extra ones are closed on return;
//! * a connection goes back only when its response body was read to the end.
//!   A body dropped early (the client went away) would leave unread bytes on the
//!   connection, and the next response read from it would be garbage, so the
//!   connection is closed instead;
//! * connections idle for [`IDLE_TIMEOUT`] (and those the backend closed) are
//!   dropped by a reaper task, one per pool, ticking every third of it;
//! * a request that meets the keep-alive race (the backend closed an idle
//!   connection just as we picked it, and hyper hands the unsent request back) is
//!   sent once more on a fresh connection, as hyper-util's
//!   `retry_canceled_requests` did. When the close arrives only after hyper has
//!   written the request, the request is gone and the exchange fails; the proxy
//!   treats that as a reset, which its retry policy repeats for idempotent
//!   methods (a test plays this race deterministically).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::listener::BoxError;

/// Idle connections kept per backend (in each worker's pool). Enough for the
/// concurrency one worker sees per backend under load, small enough that an
/// idle pool after a burst stays a few MiB.
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

/// How long a checked-out connection may take to become ready for its next
/// request. It went back to the pool in the poll that saw its body end, which
/// may be just before its connection task noticed; the task needs one turn of
/// the runtime, not milliseconds. Past this, a fresh connection is opened.
const READY_WAIT: Duration = Duration::from_millis(100);

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
    Exchange(#[source] hyper::Error),
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

/// One worker's pool of keep-alive connections to the backends.
pub(crate) struct UpstreamPool<B> {
    inner: Arc<Inner<B>>,
}

struct Inner<B> {
    /// Idle senders by backend, newest last. A plain mutex: it is held for a
    /// push or a pop, never across an `.await`, and each worker has its own pool.
    idle: Mutex<HashMap<SocketAddr, Vec<Idle<B>>>>,
    /// Connection settings, cloned into every handshake.
    http: http1::Builder,
    /// The reaper's clock: bumped every tick, stamped on every returned
    /// connection, so a return costs an atomic load rather than a clock reading.
    tick: AtomicU64,
    /// Whether the reaper task runs; it is started by the first connect, from
    /// inside the worker's runtime.
    reaper_started: AtomicBool,
}

struct Idle<B> {
    sender: SendRequest<B>,
    /// [`Inner::tick`] when it went idle.
    since: u64,
}

impl<B> UpstreamPool<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// An empty pool whose connections use `http`'s settings.
    pub(crate) fn new(http: http1::Builder) -> Self {
        Self {
            inner: Arc::new(Inner {
                idle: Mutex::new(HashMap::new()),
                http,
                tick: AtomicU64::new(0),
                reaper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) to `backend` on an idle
    /// connection, or on a new one opened within `connect_timeout`, and returns
    /// the response head. The connection rides in the response body and goes
    /// back to the pool when that body has been read to its end.
    pub(crate) async fn send(
        &self,
        backend: SocketAddr,
        connect_timeout: Duration,
        req: Request<B>,
    ) -> Result<Response<PooledBody<B>>, UpstreamError> {
        let mut req = req;
        if let Some(mut sender) = self.checkout(backend).await {
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(self.lease(backend, sender, response)),
                Err(mut error) => match error.take_message() {
                    // The keep-alive race: the connection closed before the
                    // request was written, and hyper handed it back untouched.
                    Some(unsent) => {
                        debug!(backend = %backend, error = %error.error(), "idle connection was closed, sending on a new one");
                        req = unsent;
                    }
                    None => return Err(UpstreamError::Exchange(error.into_error())),
                },
            }
        }
        let mut sender = self.connect(backend, connect_timeout).await?;
        let response = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Exchange)?;
        Ok(self.lease(backend, sender, response))
    }

    /// The newest idle connection to `backend` that is still open, ready for a
    /// request.
    async fn checkout(&self, backend: SocketAddr) -> Option<SendRequest<B>> {
        let mut sender = {
            let mut idle = lock(&self.inner.idle);
            let stack = idle.get_mut(&backend)?;
            loop {
                let candidate = stack.pop()?.sender;
                if !candidate.is_closed() {
                    break candidate;
                }
            }
        };
        if !sender.is_ready() {
            match tokio::time::timeout(READY_WAIT, sender.ready()).await {
                Ok(Ok(())) => {}
                // Closed meanwhile, or stuck: a fresh connection it is.
                Ok(Err(_)) | Err(_) => return None,
            }
        }
        Some(sender)
    }

    /// Opens a connection to `backend` and starts its connection task on the
    /// current runtime.
    async fn connect(
        &self,
        backend: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<SendRequest<B>, UpstreamError> {
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(backend))
            .await
            .map_err(|_elapsed| UpstreamError::ConnectTimeout(connect_timeout))?
            .map_err(UpstreamError::Connect)?;
        // Requests are small writes; Nagle's algorithm would hold them back
        // waiting for ACKs.
        stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
        // The HTTP/1 handshake does no I/O: it only sets up the state machine.
        let (sender, connection) = self
            .inner
            .http
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Exchange)?;
        // The connection task reads and writes the socket; the sender hands it
        // requests. It ends when the sender is dropped and the connection idle,
        // or when the socket closes.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(backend = %backend, %error, "upstream connection ended with an error");
            }
        });
        self.start_reaper();
        Ok(sender)
    }

    /// Wraps the response body so that it returns `sender` at its end; a
    /// response with no body at all returns it at once.
    fn lease(
        &self,
        backend: SocketAddr,
        sender: SendRequest<B>,
        response: Response<Incoming>,
    ) -> Response<PooledBody<B>> {
        let lease = Lease {
            pool: Arc::clone(&self.inner),
            backend,
            sender,
        };
        response.map(|body| {
            let lease = if body.is_end_stream() {
                // HEAD, 204, 304, `Content-Length: 0`: hyper may never poll it.
                lease.give_back();
                None
            } else {
                Some(lease)
            };
            PooledBody { inner: body, lease }
        })
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

impl<B> fmt::Debug for UpstreamPool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idle = lock(&self.inner.idle);
        f.debug_struct("UpstreamPool")
            .field("backends", &idle.len())
            .field("idle", &idle.values().map(Vec::len).sum::<usize>())
            .finish()
    }
}

/// Closes the pool's connections idle for longer than [`IDLE_TIMEOUT`], and
/// those the backend closed, until the pool is gone. Holds only a weak
/// reference, so it never keeps a pool alive.
async fn reap<B>(pool: Weak<Inner<B>>) {
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
                now - entry.since <= u64::from(TICKS_PER_TIMEOUT) && !entry.sender.is_closed()
            });
            // Backends that left the list take their entry with them.
            !stack.is_empty()
        });
    }
}

/// A connection lent out with its response: goes back to the pool when
/// [`give_back`](Lease::give_back) is called, and is closed when dropped.
struct Lease<B> {
    pool: Arc<Inner<B>>,
    backend: SocketAddr,
    sender: SendRequest<B>,
}

impl<B> Lease<B> {
    fn give_back(self) {
        let since = self.pool.tick.load(Ordering::Relaxed);
        let mut idle = lock(&self.pool.idle);
        let stack = idle.entry(self.backend).or_default();
        if stack.len() < MAX_IDLE_PER_BACKEND {
            stack.push(Idle {
                sender: self.sender,
                since,
            });
        }
        // Past the cap the sender is dropped here, which ends its connection.
    }
}

/// A backend's response body that returns its connection to the pool in the
/// poll that sees its end.
pub(crate) struct PooledBody<B> {
    /// The backend's body, streamed through untouched.
    inner: Incoming,
    /// The connection it arrives on; `None` once given back or given up.
    lease: Option<Lease<B>>,
}

impl<B> PooledBody<B> {
    /// Returns the connection to the pool if this frame ended the body, and
    /// closes it if the body broke.
    fn after(&mut self, frame: &Poll<Option<Result<Frame<Bytes>, hyper::Error>>>) {
        let ended = match frame {
            Poll::Ready(None) => true,
            // hyper's server stops polling a body that says it has ended after
            // its last frame (a `Content-Length` body), so the end is checked
            // after every frame, not only at `None`.
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            // A broken body leaves the connection broken: close it.
            Poll::Ready(Some(Err(_))) => {
                self.lease = None;
                false
            }
            Poll::Pending => false,
        };
        if let Some(lease) = self.lease.take_if(|_| ended) {
            lease.give_back();
        }
    }
}

impl<B> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // `Incoming` and the lease are `Unpin`, so `self` derefs mutably.
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        self.after(&frame);
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for PooledBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBody")
            .field("inner", &self.inner)
            .field("leased", &self.lease.is_some())
            .finish()
    }
}

// A poisoned lock means a panic during a push or a pop; the map is still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::StatusCode;
    use http::header::HOST;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::server::conn::http1 as server;
    use hyper::service::service_fn;
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

    async fn send(
        pool: &UpstreamPool<Empty<Bytes>>,
        addr: SocketAddr,
        path: &str,
    ) -> Response<PooledBody<Empty<Bytes>>> {
        let req = Request::get(path)
            .header(HOST, "test")
            .body(Empty::new())
            .expect("valid request");
        pool.send(addr, Duration::from_secs(5), req)
            .await
            .expect("the server answers")
    }

    #[tokio::test]
    async fn a_bodiless_response_gives_its_connection_back_at_once() {
        let (pool, addr) = (UpstreamPool::new(http1::Builder::new()), server().await);
        let response = send(&pool, addr, "/empty").await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(pool.idle_count(addr), 1, "back before the body is polled");
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_gives_its_connection_back() {
        let (pool, addr) = (UpstreamPool::new(http1::Builder::new()), server().await);
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

    /// Plays a backend that answers each request with `answers[i]` on
    /// connection `i`, on a thread of its own so that it runs while the test's
    /// single-threaded runtime does not. The first connection is closed when
    /// `close_first` fires, as a backend's idle timeout would.
    fn scripted_backend(
        answers: [&'static str; 2],
        close_first: std::sync::mpsc::Receiver<()>,
    ) -> SocketAddr {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound socket has an address");
        std::thread::spawn(move || {
            for (index, body) in answers.into_iter().enumerate() {
                let (mut stream, _) = listener.accept().expect("accept");
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(answer.as_bytes()).expect("answer");
                if index == 0 {
                    let _ = close_first.recv();
                }
            }
        });
        addr
    }

    async fn body_of(response: Response<PooledBody<Empty<Bytes>>>) -> Bytes {
        response.collect().await.expect("body arrives").to_bytes()
    }

    /// The keep-alive race, made deterministic: the backend closes the pooled
    /// connection, and the pool takes it out before its connection task has seen
    /// the close (the task only runs when this test yields). hyper then writes
    /// the request and finds the connection closed: the request is gone, so the
    /// pool reports a failed exchange, not a connect error (the proxy retries it
    /// only where repeating is safe: an idempotent method, another attempt), and
    /// the next request goes on a new connection.
    #[tokio::test]
    async fn a_connection_the_backend_just_closed_fails_its_request_and_is_not_reused() {
        let (close_first, closed) = std::sync::mpsc::channel();
        let addr = scripted_backend(["first", "second"], closed);
        let pool = UpstreamPool::new(http1::Builder::new());
        assert_eq!(body_of(send(&pool, addr, "/").await).await, "first");
        assert_eq!(pool.idle_count(addr), 1);

        close_first.send(()).expect("the backend is waiting");
        // Blocks the runtime on purpose, so the connection task cannot notice
        // the close before the next checkout; the FIN arrives meanwhile.
        std::thread::sleep(Duration::from_millis(100));
        let req = Request::get("/")
            .header(HOST, "test")
            .body(Empty::new())
            .expect("valid request");
        let error = pool
            .send(addr, Duration::from_secs(5), req)
            .await
            .expect_err("the connection was closed under the request");
        assert!(
            matches!(&error, UpstreamError::Exchange(e) if e.is_incomplete_message()),
            "{error:?}"
        );
        assert_eq!(pool.idle_count(addr), 0);
        assert_eq!(body_of(send(&pool, addr, "/").await).await, "second");
    }

    #[tokio::test]
    async fn a_body_dropped_unread_does_not_give_its_connection_back() {
        let (pool, addr) = (UpstreamPool::new(http1::Builder::new()), server().await);
        drop(send(&pool, addr, "/").await);
        assert_eq!(pool.idle_count(addr), 0);
    }
}
