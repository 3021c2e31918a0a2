//! Watchdog: the idle timeout and the header-read timeout of one client
//! connection, which hyper cannot tell apart on its own.
//!
//! hyper's `header_read_timeout` starts whenever it waits for a request head,
//! including the wait between two requests on a keep-alive connection, so it is
//! at once an idle timeout and a slowloris guard, and the two cannot have different
//! values. A useful server wants them different (Envoy, Go and nginx all do): a
//! pooled client may keep a quiet connection for a minute, but once a request has
//! begun, its head must arrive within seconds. So hyper's timer is switched off and
//! this module keeps the time instead, in three states:
//!
//! * **idle**: no request in progress and nothing received since the last one
//!   ended (or since the connection opened). Ends after `idleTimeoutMs`.
//! * **reading a head**: a byte has arrived while idle, so a request head has
//!   begun. It must be complete within `headerReadTimeoutMs`.
//! * **busy**: hyper has handed a request to the service and the response body has
//!   not been dropped yet. No limit here: the service bounds its own work (the
//!   load balancer's `requestTimeoutMs` bounds the wait for a backend), and a
//!   streaming body may legitimately take long.
//!
//! [`TrackedIo`] sees every byte read, the service wrapper in `listener` marks
//! requests in and out through [`Activity::request_started`] and the
//! [`TrackedBody`] guard, and [`Activity::expired`] is a future that resolves when
//! the current state has outlived its limit.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::Slot;

/// Which limit a connection has outlived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// Nothing happened for `idleTimeoutMs` between requests.
    Idle,
    /// A request head began but was not complete within `headerReadTimeoutMs`.
    HeaderRead,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Idle { since: Instant },
    ReadingHead { since: Instant },
    Busy { requests: usize },
}

/// What one connection is doing, shared by its IO, its service and its task.
#[derive(Debug)]
pub(crate) struct Activity {
    /// A plain mutex: it is held for a few instructions and never across `.await`.
    /// Changing the state wakes nobody: [`Activity::expired`] reads it when its
    /// timer fires (see there why that is on time).
    state: Mutex<State>,
}

impl Activity {
    /// A fresh connection: idle from now.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::Idle {
                since: Instant::now(),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-written (it
        // is one small `Copy` value), so a poisoned lock is still good to use.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes arrived: if the connection was idle, a request head has begun.
    fn bytes_read(&self) {
        let mut state = self.state();
        if let State::Idle { .. } = *state {
            *state = State::ReadingHead {
                since: Instant::now(),
            };
        }
    }

    /// hyper has parsed a request head and called the service. The returned guard
    /// marks the request finished when it is dropped, which [`TrackedBody`] does
    /// once hyper has written (or abandoned) the response body.
    pub(crate) fn request_started(self: &Arc<Self>) -> RequestGuard {
        let mut state = self.state();
        *state = match *state {
            State::Busy { requests } => State::Busy {
                requests: requests + 1,
            },
            State::Idle { .. } | State::ReadingHead { .. } => State::Busy { requests: 1 },
        };
        RequestGuard(Arc::clone(self))
    }

    fn request_finished(&self) {
        let mut state = self.state();
        *state = match *state {
            State::Busy { requests } if requests > 1 => State::Busy {
                requests: requests - 1,
            },
            _ => State::Idle {
                since: Instant::now(),
            },
        };
    }

    /// Resolves once the connection has stayed idle for `idle`, or has spent
    /// `header_read` reading one request head. Never resolves while busy.
    ///
    /// The state changes three times per request. Waking this future on every
    /// change (it runs in the connection's task, so every wake-up re-polls the
    /// whole connection) is work the request does not need, so it is never
    /// woken: it sleeps until the current state's deadline, but never longer
    /// than `min(idle, header_read)`, then looks again. That is still on
    /// time: a head that begins at `t` must end by `t + header_read`, and the
    /// last look before `t` was at most `header_read` earlier, so the next look
    /// comes before that deadline and arms the timer for exactly it; the same
    /// holds for an idle spell and `idle`. (Sleeping through a head's whole
    /// deadline instead would miss the idle spell after a quick request by up
    /// to `header_read`: a look that happens to fall while the first head
    /// arrives, as it does when the connection's task starts the watch just
    /// after reading the first bytes.)
    pub(crate) async fn expired(&self, idle: Duration, header_read: Duration) -> Expired {
        let look_every = idle.min(header_read);
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        loop {
            let now = Instant::now();
            let next_look = match *self.state() {
                State::Idle { since } if since + idle <= now => return Expired::Idle,
                State::Idle { since } => (since + idle).min(now + look_every),
                State::ReadingHead { since } if since + header_read <= now => {
                    return Expired::HeaderRead;
                }
                State::ReadingHead { since } => (since + header_read).min(now + look_every),
                State::Busy { .. } => now + look_every,
            };
            // One timer, moved rather than made anew.
            timer.as_mut().reset(next_look);
            timer.as_mut().await;
        }
    }
}

/// Marks its request finished when dropped.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A response body that carries its request's [`RequestGuard`]: hyper drops the
/// body when it has written the last frame, or when the client went away, and
/// either way the request is over.
#[derive(Debug)]
pub(crate) struct TrackedBody<B> {
    inner: B,
    _request: RequestGuard,
}

impl<B> TrackedBody<B> {
    pub(crate) fn new(inner: B, request: RequestGuard) -> Self {
        Self {
            inner,
            _request: request,
        }
    }
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    // Passed through so hyper still sees exact lengths (and writes
    // `Content-Length` instead of chunking).
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A socket that reports every read to its connection's [`Activity`].
#[derive(Debug)]
pub(crate) struct TrackedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    /// The connection's slot under the cap, held as long as the socket is open.
    _slot: Slot,
}

impl<T> TrackedIo<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>, slot: Slot) -> Self {
        Self {
            inner,
            activity,
            _slot: slot,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        // Zero new bytes on `Ready(Ok)` is end of stream, not activity.
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);
    const HEADER: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_expires_as_idle() {
        let activity = Activity::new();
        assert_eq!(activity.expired(IDLE, HEADER).await, Expired::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_head_gets_the_header_timeout_not_the_idle_one() {
        let activity = Activity::new();
        activity.bytes_read();
        let started = Instant::now();
        assert_eq!(activity.expired(IDLE, HEADER).await, Expired::HeaderRead);
        assert_eq!(started.elapsed(), HEADER);
    }

    /// A look during a head does not sleep through the idle spell after it.
    #[tokio::test(start_paused = true)]
    async fn a_quick_request_seen_mid_head_still_expires_as_idle_on_time() {
        let idle = Duration::from_millis(300);
        let activity = Activity::new();
        activity.bytes_read();
        let expired = activity.expired(idle, Duration::from_secs(3600));
        tokio::pin!(expired);
        let looked = futures::FutureExt::now_or_never(expired.as_mut());
        assert_eq!(looked, None, "looked at the head and slept");
        drop(activity.request_started());
        let ended = Instant::now();
        assert_eq!(expired.await, Expired::Idle);
        assert!(ended.elapsed() <= idle * 2, "{:?}", ended.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_never_expires_and_goes_idle_when_the_body_drops() {
        let activity = Activity::new();
        let guard = activity.request_started();
        let waiting = tokio::time::timeout(IDLE * 10, activity.expired(IDLE, HEADER)).await;
        assert!(waiting.is_err(), "a busy connection expired: {waiting:?}");
        drop(guard);
        let ended = Instant::now();
        assert_eq!(activity.expired(IDLE, HEADER).await, Expired::Idle);
        assert_eq!(ended.elapsed(), IDLE);
    }
}
