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
//! * **reading a head**: a request head has begun while idle: for HTTP/1.1 any
//!   byte, for HTTP/2 the preface or a `HEADERS` frame (its `PING`s and
//!   `SETTINGS` leave a quiet connection idle; see `wire`). It must be complete
//!   within `headerReadTimeoutMs`.
//! * **busy**: hyper has handed a request to the service and the response body has
//!   not been dropped yet. No limit here: the service bounds its own work (the
//!   load balancer's `requestTimeoutMs` bounds the wait for a backend), and a
//!   streaming body may legitimately take long. HTTP/2 runs many requests at
//!   once on one connection: it stays busy until the last of them has ended.
//!
//! [`TrackedIo`] sees every byte read and hands it to the connection's `wire`
//! to read, the service wrapper in `listener` marks requests in and out through
//! [`Activity::request_started`] and the [`TrackedBody`] guard, and
//! [`Activity::lapsed`] is a future that resolves when the current state has
//! outlived its limit, or the connection has been quiet long enough to be
//! parked ([`Activity::deadline`] when only one state can apply).
//!
//! [`TrackedIo`] also reads bytes before hyper does ([`TrackedIo::next_bytes`]),
//! and hands them to hyper afterwards: the first bytes, to tell the protocol,
//! and on a parked connection (one that hyper has let go of between requests,
//! see `listener`) the first bytes of the next request. It keeps track of
//! whether everything written has been flushed, and while a connection is
//! being parked it keeps hyper's closing `shutdown` from the socket.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Slot;
use super::wire::{Protocol, Wire};

/// When an idle HTTP/1.1 connection is parked: its buffers let go, its
/// socket waiting for the next request (see `listener`). The later of two
/// answers is the lesser one (`min`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Parking {
    /// Never: HTTP/2, which hyper serves as a whole, or a connection that is
    /// to close.
    Never,
    /// Once it has been quiet for a while.
    WhenQuiet,
    /// As soon as it is idle.
    AtOnce,
}

/// Which limit a connection has outlived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// Nothing happened for `idleTimeoutMs` between requests.
    Idle,
    /// A request head began but was not complete within `headerReadTimeoutMs`.
    HeaderRead,
}

impl Expired {
    /// This limit's length, of the idle and header-read timeouts.
    fn limit(self, idle: Duration, header_read: Duration) -> Duration {
        match self {
            Self::Idle => idle,
            Self::HeaderRead => header_read,
        }
    }
}

/// What a connection's clocks found ([`Activity::lapsed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lapse {
    /// The connection has been idle for the quiet spell after which it may
    /// be parked.
    Quiet,
    /// A limit ran out.
    Expired(Expired),
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
    /// Changing the state wakes nobody: [`Activity::lapsed`] reads it when its
    /// timer fires (see there why that is on time).
    state: Mutex<State>,
    /// Responses given so far, which earn an HTTP/2 client control frames.
    answered: AtomicU64,
    /// The client flooded the connection with control frames (see `wire`).
    flooded: AtomicBool,
    /// A response asked to end an HTTP/2 connection gracefully (GOAWAY), as
    /// `Connection: close` ends an HTTP/1.1 one.
    wind_down: Notify,
    /// How soon the last HTTP/1.1 exchange lets the connection be parked
    /// once idle (a [`Parking`]; see [`RequestGuard::parks`]).
    exchange_parks: AtomicU8,
    /// Bytes have been written to the socket and not yet flushed.
    unflushed: AtomicBool,
    /// The connection is being taken apart to be parked: hyper's closing
    /// `shutdown` must not reach the socket.
    parking: AtomicBool,
    /// The connection's place under the cap. The socket holds its activity,
    /// and so do the requests in flight, so the place is freed once the socket
    /// has closed and the last request has ended, whoever owns the socket by
    /// then (the proxy's tunnel, after an upgrade).
    _slot: Slot,
}

impl Activity {
    /// A fresh connection in `slot`: idle from now.
    pub(crate) fn new(slot: Slot) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::Idle {
                since: Instant::now(),
            }),
            answered: AtomicU64::new(0),
            flooded: AtomicBool::new(false),
            wind_down: Notify::new(),
            exchange_parks: AtomicU8::new(Parking::Never as u8),
            unflushed: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            _slot: slot,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-written (it
        // is one small `Copy` value), so a poisoned lock is still good to use.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request head has begun, if the connection was idle.
    pub(crate) fn head_begun(&self) {
        let mut state = self.state();
        if let State::Idle { .. } = *state {
            *state = State::ReadingHead {
                since: Instant::now(),
            };
        }
    }

    /// The HTTP/2 preface is complete: the connection is idle until its first
    /// request begins.
    pub(crate) fn preface_received(&self) {
        let mut state = self.state();
        if let State::ReadingHead { .. } = *state {
            *state = State::Idle {
                since: Instant::now(),
            };
        }
    }

    /// How many responses the connection has been given.
    pub(crate) fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Marks the connection as closed for flooding, for its task to report.
    pub(crate) fn flood(&self) {
        self.flooded.store(true, Ordering::Relaxed);
    }

    pub(crate) fn flooded(&self) -> bool {
        self.flooded.load(Ordering::Relaxed)
    }

    /// Resolves once a response has asked for the connection to wind down.
    pub(crate) async fn wind_down_asked(&self) {
        self.wind_down.notified().await;
    }

    /// How soon an HTTP/1.1 connection may give hyper's buffers back and
    /// wait for its next request without them, as things stand: never unless
    /// it is idle (its last response is written and nothing of a next request
    /// has arrived) and everything written has been flushed; then as its last
    /// exchange allows (see [`RequestGuard::parks`]).
    pub(crate) fn may_park(&self) -> Parking {
        let idle = matches!(*self.state(), State::Idle { .. });
        if !idle || self.unflushed.load(Ordering::Relaxed) {
            return Parking::Never;
        }
        match self.exchange_parks.load(Ordering::Relaxed) {
            parks if parks == Parking::AtOnce as u8 => Parking::AtOnce,
            parks if parks == Parking::WhenQuiet as u8 => Parking::WhenQuiet,
            _ => Parking::Never,
        }
    }

    /// The connection is about to be taken apart for parking, or has been put
    /// back together (`false`).
    pub(crate) fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::Relaxed);
    }

    pub(crate) fn parking(&self) -> bool {
        self.parking.load(Ordering::Relaxed)
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
    /// `header_read` reading one request head ([`Lapse::Expired`]), or, with
    /// `quiet` given, once it has been idle for `quiet` ([`Lapse::Quiet`]: it
    /// may park). Never resolves while busy. One timer serves all three
    /// clocks: a connection that serves one request and closes arms it once.
    ///
    /// The state changes three times per request. Waking this future on every
    /// change (it runs in the connection's task, so every wake-up re-polls the
    /// whole connection) is work the request does not need, so it is never
    /// woken: it sleeps until the current state's nearest deadline, but never
    /// longer than the shortest of the three durations, then looks again. That
    /// is still on time: a head that begins at `t` must end by
    /// `t + header_read`, and the last look before `t` was at most
    /// `header_read` earlier, so the next look comes before that deadline and
    /// arms the timer for exactly it; the same holds for an idle spell and
    /// `idle` or `quiet`. (Sleeping through a head's whole deadline instead
    /// would miss the idle spell after a quick request by up to
    /// `header_read`: a look that happens to fall while the first head
    /// arrives, as it does when the connection's task starts the watch just
    /// after reading the first bytes.)
    ///
    /// A block rather than an `async fn` (which keeps its arguments twice):
    /// every connection being served waits on this, and its size is part of
    /// the connection's task.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep its arguments twice"
    )]
    pub(crate) fn lapsed(
        &self,
        idle: Duration,
        header_read: Duration,
        quiet: Option<Duration>,
    ) -> impl Future<Output = Lapse> + '_ {
        async move {
            let timer = tokio::time::sleep(Duration::ZERO);
            tokio::pin!(timer);
            loop {
                let next_look = match self.next_look(idle, header_read, quiet) {
                    Ok(next_look) => next_look,
                    Err(lapse) => return lapse,
                };
                // One timer, moved rather than made anew.
                timer.as_mut().reset(next_look);
                timer.as_mut().await;
            }
        }
    }

    /// When the connection's current spell began, and which limit bounds it:
    /// an idle spell the idle timeout, a head the header-read timeout; `None`
    /// while busy, which has no limit here.
    fn spell(&self) -> Option<(Instant, Expired)> {
        match *self.state() {
            State::Idle { since } => Some((since, Expired::Idle)),
            State::ReadingHead { since } => Some((since, Expired::HeaderRead)),
            State::Busy { .. } => None,
        }
    }

    /// When the connection's current spell runs out of time, and which limit
    /// that is: `idle` after an idle spell began, `header_read` after a head
    /// began; `None` while busy.
    pub(crate) fn deadline(
        &self,
        idle: Duration,
        header_read: Duration,
    ) -> Option<(Instant, Expired)> {
        self.spell()
            .map(|(since, spell)| (since + spell.limit(idle, header_read), spell))
    }

    /// When [`Self::lapsed`] should look again, or what has lapsed. A limit
    /// that ran out comes first: such a connection is closed, not parked.
    fn next_look(
        &self,
        idle: Duration,
        header_read: Duration,
        quiet: Option<Duration>,
    ) -> Result<Instant, Lapse> {
        let now = Instant::now();
        let spell = self.spell();
        let mut next_look = now + idle.min(header_read);
        if let Some((since, spell)) = spell {
            let deadline = since + spell.limit(idle, header_read);
            if deadline <= now {
                return Err(Lapse::Expired(spell));
            }
            next_look = next_look.min(deadline);
        }
        if let Some(quiet) = quiet {
            let quiet_from = match spell {
                Some((since, Expired::Idle)) => since + quiet,
                Some((_, Expired::HeaderRead)) | None => now + quiet,
            };
            if quiet_from <= now {
                return Err(Lapse::Quiet);
            }
            next_look = next_look.min(quiet_from);
        }
        Ok(next_look)
    }
}

/// Marks its request finished when dropped.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    /// The service has given its response.
    pub(crate) fn answered(&self) {
        self.0.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Says how soon the exchange lets an HTTP/1.1 connection be parked once
    /// idle: never unless the connection stays open (a keep-alive request,
    /// answered without `Connection: close` and without switching protocols);
    /// at once after a request without a body; after a quiet spell after an
    /// upload. Whether a body was read to its end is hyper's to know: if not,
    /// hyper closes the connection by itself once the answer has left, or,
    /// while more of the body is on its way, it is not idle and a park fails
    /// (see `listener`). A quiet spell first lets the rest of a body that is
    /// still coming arrive (which makes the connection busy again), rather
    /// than end a connection that would have stayed open.
    pub(crate) fn parks(&self, parking: Parking) {
        self.0
            .exchange_parks
            .store(parking as u8, Ordering::Relaxed);
    }

    /// Asks the connection to end gracefully once its requests are done. A
    /// stored permit, so the ask is not lost if the connection's task is not
    /// waiting yet.
    pub(crate) fn wind_down(&self) {
        self.0.wind_down.notify_one();
    }
}

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

/// A socket that reports every read to its connection's [`Activity`], through
/// the connection's [`Wire`].
#[derive(Debug)]
pub(crate) struct TrackedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    wire: Wire,
    /// The bytes read ahead ([`TrackedIo::next_bytes`]), handed out before
    /// any others.
    sniffed: Sniffed,
}

/// The bytes read to tell the protocol, until hyper has taken them; then
/// freed, so that a connection holds none of them once served.
#[derive(Debug, Default)]
struct Sniffed {
    bytes: Vec<u8>,
    /// `bytes[handed..]` are still to be handed out.
    handed: usize,
}

/// How much the first read of a connection may take. A whole request head
/// usually fits, so hyper finds it all in the bytes handed over and need not
/// read the socket again: one `read` per short-lived connection instead of two
/// (the first of which took only a preface's length, 24 bytes). Read into the
/// stack and kept on the heap only as long as the bytes read, until handed over.
const SNIFF_READ: usize = 4096;

impl<T> TrackedIo<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            wire: Wire::new(),
            sniffed: Sniffed::default(),
        }
    }
}

impl<T> TrackedIo<T> {
    /// The connection's activity, which the socket keeps.
    pub(crate) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl<T: AsyncRead + Unpin> TrackedIo<T> {
    /// The connection's protocol, once its first bytes have told it.
    pub(crate) fn protocol(&self) -> Option<Protocol> {
        self.wire.protocol()
    }

    /// Waits, holding no buffer, until the client sends more; `false` if it
    /// closed the connection instead. The bytes are read again by whoever
    /// reads next. A parked connection waits the same way, in the lot.
    pub(crate) async fn next_bytes(&mut self) -> io::Result<bool> {
        std::future::poll_fn(|cx| self.poll_read_ahead(cx)).await
    }

    /// Reads once into the stack, and keeps what was read (if anything) to be
    /// handed out before the socket is read again; `false` if the client
    /// closed the connection instead.
    pub(crate) fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut space = [MaybeUninit::<u8>::uninit(); SNIFF_READ];
        let mut buf = ReadBuf::uninit(&mut space);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf))?;
        let bytes = buf.filled();
        if bytes.is_empty() {
            return Poll::Ready(Ok(false));
        }
        self.sniffed.bytes.extend_from_slice(bytes);
        // The wire reads past the preface, into the first frames, if the
        // read went that far.
        if self.wire.read(bytes, &self.activity).is_err() {
            return Poll::Ready(Err(self.flooded()));
        }
        Poll::Ready(Ok(true))
    }

    /// Puts back `bytes` that were read but not used (what hyper had read of a
    /// next request when its connection was taken apart), to be handed out
    /// first.
    pub(crate) fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let sniffed = &mut self.sniffed;
        let mut unread = Vec::with_capacity(bytes.len() + sniffed.bytes.len() - sniffed.handed);
        unread.extend_from_slice(bytes);
        unread.extend_from_slice(&sniffed.bytes[sniffed.handed..]);
        *sniffed = Sniffed {
            bytes: unread,
            handed: 0,
        };
    }

    /// Whether bytes read ahead are waiting to be handed out.
    pub(crate) fn has_unread(&self) -> bool {
        self.sniffed.handed < self.sniffed.bytes.len()
    }

    fn flooded(&self) -> io::Error {
        self.activity.flood();
        io::Error::new(io::ErrorKind::InvalidData, "HTTP/2 control frame flood")
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let sniffed = &mut this.sniffed;
        if sniffed.handed < sniffed.bytes.len() {
            let count = (sniffed.bytes.len() - sniffed.handed).min(buf.remaining());
            buf.put_slice(&sniffed.bytes[sniffed.handed..sniffed.handed + count]);
            sniffed.handed += count;
            if sniffed.handed == sniffed.bytes.len() {
                *sniffed = Sniffed::default();
            }
            return Poll::Ready(Ok(()));
        }
        if this.activity.flooded() {
            return Poll::Ready(Err(this.flooded()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        // Zero new bytes on `Ready(Ok)` is end of stream, not activity.
        let bytes = &buf.filled()[before..];
        if !bytes.is_empty() && this.wire.read(bytes, &this.activity).is_err() {
            return Poll::Ready(Err(this.flooded()));
        }
        Poll::Ready(Ok(()))
    }
}

impl<T> TrackedIo<T> {
    fn wrote(&mut self, bytes: usize) {
        self.wire.wrote(bytes);
        if bytes > 0 {
            self.activity.unflushed.store(true, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.wrote(written);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.wrote(written);
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    // hyper flushes the socket only once its own buffer is empty, so a
    // successful flush means that all of the response has left.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.activity.unflushed.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.parking() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const IDLE: Duration = Duration::from_secs(60);
    const HEADER: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_expires_as_idle() {
        let activity = Activity::new(Slot::unlimited());
        assert_eq!(
            activity.lapsed(IDLE, HEADER, None).await,
            Lapse::Expired(Expired::Idle)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_head_gets_the_header_timeout_not_the_idle_one() {
        let activity = Activity::new(Slot::unlimited());
        activity.head_begun();
        let started = Instant::now();
        assert_eq!(
            activity.lapsed(IDLE, HEADER, None).await,
            Lapse::Expired(Expired::HeaderRead)
        );
        assert_eq!(started.elapsed(), HEADER);
    }

    /// A look during a head does not sleep through the idle spell after it.
    #[tokio::test(start_paused = true)]
    async fn a_quick_request_seen_mid_head_still_expires_as_idle_on_time() {
        let idle = Duration::from_millis(300);
        let activity = Activity::new(Slot::unlimited());
        activity.head_begun();
        let expired = activity.lapsed(idle, Duration::from_secs(3600), None);
        tokio::pin!(expired);
        let looked = futures::FutureExt::now_or_never(expired.as_mut());
        assert_eq!(looked, None, "looked at the head and slept");
        drop(activity.request_started());
        let ended = Instant::now();
        assert_eq!(expired.await, Lapse::Expired(Expired::Idle));
        assert!(ended.elapsed() <= idle * 2, "{:?}", ended.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_never_expires_and_goes_idle_when_the_body_drops() {
        let activity = Activity::new(Slot::unlimited());
        let guard = activity.request_started();
        let waiting = tokio::time::timeout(IDLE * 10, activity.lapsed(IDLE, HEADER, None)).await;
        assert!(waiting.is_err(), "a busy connection expired: {waiting:?}");
        drop(guard);
        let ended = Instant::now();
        assert_eq!(
            activity.lapsed(IDLE, HEADER, None).await,
            Lapse::Expired(Expired::Idle)
        );
        assert_eq!(ended.elapsed(), IDLE);
    }

    /// The quiet spell before parking runs on the same timer as the limits:
    /// it counts from the start of the idle spell, never while busy.
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_quiet_after_the_quiet_spell_of_idleness() {
        const QUIET: Duration = Duration::from_secs(1);
        let activity = Activity::new(Slot::unlimited());
        let started = Instant::now();
        assert_eq!(
            activity.lapsed(IDLE, HEADER, Some(QUIET)).await,
            Lapse::Quiet
        );
        assert_eq!(started.elapsed(), QUIET);

        let guard = activity.request_started();
        let waiting =
            tokio::time::timeout(QUIET * 10, activity.lapsed(IDLE, HEADER, Some(QUIET))).await;
        assert!(waiting.is_err(), "a busy connection was quiet: {waiting:?}");
        drop(guard);
        let ended = Instant::now();
        assert_eq!(
            activity.lapsed(IDLE, HEADER, Some(QUIET)).await,
            Lapse::Quiet
        );
        assert_eq!(ended.elapsed(), QUIET);
    }

    /// A limit that runs out first closes the connection: it is not parked.
    #[tokio::test(start_paused = true)]
    async fn a_limit_shorter_than_the_quiet_spell_comes_first() {
        let idle = Duration::from_millis(500);
        let activity = Activity::new(Slot::unlimited());
        assert_eq!(
            activity
                .lapsed(idle, HEADER, Some(Duration::from_secs(1)))
                .await,
            Lapse::Expired(Expired::Idle)
        );
        activity.head_begun();
        let started = Instant::now();
        assert_eq!(
            activity
                .lapsed(IDLE, HEADER, Some(Duration::from_secs(20)))
                .await,
            Lapse::Expired(Expired::HeaderRead)
        );
        assert_eq!(started.elapsed(), HEADER);
    }

    /// A connection over an in-memory pipe, and the client's end of it.
    fn tracked() -> (TrackedIo<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (client, server) = tokio::io::duplex(1024);
        (
            TrackedIo::new(server, Activity::new(Slot::unlimited())),
            client,
        )
    }

    /// Reads ahead until the protocol is known, as the listener does.
    async fn told_protocol(
        io: &mut TrackedIo<tokio::io::DuplexStream>,
    ) -> io::Result<Option<Protocol>> {
        while io.protocol().is_none() {
            if !io.next_bytes().await? {
                return Ok(None);
            }
        }
        Ok(io.protocol())
    }

    #[tokio::test]
    async fn the_bytes_that_told_the_protocol_are_read_again() {
        for (sent, protocol) in [
            (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], Protocol::Http1),
            (
                &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0"[..],
                Protocol::Http2,
            ),
        ] {
            let (mut io, mut client) = tracked();
            // In two writes, the first shorter than the preface.
            client.write_all(&sent[..5]).await.expect("written");
            let told = tokio::spawn(async move {
                let protocol = told_protocol(&mut io).await;
                (io, protocol)
            });
            tokio::task::yield_now().await;
            client.write_all(&sent[5..]).await.expect("written");
            drop(client);
            let (mut io, told) = told.await.expect("no panic");
            assert_eq!(told.expect("no error"), Some(protocol));
            let mut read = Vec::new();
            io.read_to_end(&mut read).await.expect("read");
            assert_eq!(read, sent);
        }
    }

    #[tokio::test]
    async fn a_client_that_closes_at_once_tells_no_protocol() {
        let (mut io, client) = tracked();
        drop(client);
        assert_eq!(told_protocol(&mut io).await.expect("no error"), None);
    }
}
