//! Watch: what a connection's task keeps an eye on while hyper serves it, and
//! how it acts on it. [`Watch::drive`] runs hyper's connection to its end
//! against the listener's stop, a response's request to wind down, and the
//! watchdog's clocks; it parks an idle HTTP/1.1 connection, sends an idle
//! HTTP/2 one GOAWAY, and cuts a request that outlasts the shutdown timeout.
//! [`Watch::serve_http1`] takes hyper's HTTP/1.1 connection apart once it
//! may be parked, and [`Watch::protocol`] reads a new connection's first bytes
//! under the same clocks as a request head.

use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use futures::FutureExt;
use futures::future::{self, FusedFuture};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::gate::Gated;
use super::watchdog::{Activity, Expired, Lapse, Parking, TrackedIo};
use super::wire::Protocol;
use super::{CONTROL_FRAME_BURST, CONTROL_FRAMES_PER_SECOND, ResponseBody, ServerLimits};
use crate::BoxError;

/// When a connection waiting for bytes is to close, and why: at the end of
/// its idle time between requests, of its header-read time within a head.
pub(super) fn waiting_deadline(
    activity: &Activity,
    limits: &ServerLimits,
) -> (tokio::time::Instant, Expired) {
    // A connection waiting for bytes is never busy; were it, the wait would
    // count as idle from now.
    activity
        .deadline(limits.idle_timeout, limits.header_read_timeout)
        .unwrap_or_else(|| {
            (
                tokio::time::Instant::now() + limits.idle_timeout,
                Expired::Idle,
            )
        })
}

/// What a connection's task keeps an eye on while hyper serves it.
pub(super) struct Watch<'a> {
    activity: &'a Activity,
    peer: &'a SocketAddr,
    /// Resolves once the listener stops (and stays pending after).
    stopped: Pin<&'a mut (dyn FusedFuture<Output = ()> + Send)>,
    limits: &'a ServerLimits,
}

impl<'a> Watch<'a> {
    /// Watches a connection from `peer`, whose state is `activity`, for
    /// `stopped` (resolves once the listener stops, and stays pending after)
    /// and the clocks of `limits`.
    pub(super) fn new(
        activity: &'a Activity,
        peer: &'a SocketAddr,
        stopped: Pin<&'a mut (dyn FusedFuture<Output = ()> + Send)>,
        limits: &'a ServerLimits,
    ) -> Self {
        Self {
            activity,
            peer,
            stopped,
            limits,
        }
    }
}

/// A request that arrives this soon after a connection was parked marks its
/// client as busy ([`Parking::WhenQuiet`]).
pub(super) const QUICK_RETURN: Duration = Duration::from_millis(100);

/// How long a busy client's connection stays with hyper, quiet, before it is
/// parked after all.
const PARK_WHEN_QUIET_FOR: Duration = Duration::from_secs(1);

/// How hyper's side of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Served {
    /// The connection is closed, or handed over by an upgrade.
    Closed,
    /// An idle HTTP/1.1 connection was taken apart, its socket still open.
    Parked,
}

impl Watch<'_> {
    /// Serves HTTP/1.1 on `io` until the connection closes (`None`), or until
    /// it is idle and parked: then the socket and the service are given back.
    ///
    /// hyper keeps a read and a write buffer (8 KiB or more each) for as long
    /// as its connection lives, idle or not. So once the last response has
    /// left and nothing more has arrived, hyper's connection is taken apart,
    /// and the socket waits for the next request holding no buffer at all
    /// ([`Parked`](super::lot::Parked)); its first bytes start a new hyper
    /// connection on the same socket.
    ///
    /// A new hyper connection per request would cost a busy client about a
    /// tenth more CPU per request (measured: fresh buffers, timers and
    /// state). So `parking` says when: at once for a client that left time
    /// between its requests, and after [`PARK_WHEN_QUIET_FOR`] of quiet for
    /// one whose request followed the last answer within [`QUICK_RETURN`]. The
    /// exchange may allow less (an upload is parked after the quiet spell too,
    /// a connection that is to close never; see `RequestGuard::parks`).
    ///
    /// With upgrades, a `101` answer hands the connection over (to the proxy's
    /// tunnel, or the backend's WebSocket session) through
    /// `hyper::upgrade::on`. This future then ends, and with it the watchdog's
    /// timeouts and the shutdown's wait: the upgraded socket is the service's
    /// to bound and to close. It keeps its slot under the cap, which lives in
    /// the socket.
    pub(super) async fn serve_http1<I, S>(
        &mut self,
        builder: &http1::Builder,
        io: TrackedIo<I>,
        service: S,
        parking: Parking,
    ) -> Option<(TrackedIo<I>, S)>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: HttpService<Incoming, Error: Into<BoxError>, ResBody: ResponseBody>,
    {
        let mut connection = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let graceful_shutdown = http1::UpgradeableConnection::graceful_shutdown;
        if self
            .drive(Pin::new(&mut connection), graceful_shutdown, parking)
            .await
            == Served::Closed
        {
            return None;
        }
        // An upgraded connection has no parts left to take.
        let parts = connection.into_parts()?;
        self.activity.set_parking(false);
        let mut io = parts.io.into_inner();
        // Whatever hyper had read of a next request (nothing, as a rule) is
        // handed to the next connection; its buffer is freed here.
        io.unread(&parts.read_buf);
        Some((io, parts.service))
    }

    /// Reads the first bytes until they tell HTTP/2 from HTTP/1.1 (see
    /// `wire`), under the same clocks as a request head; `None` if the
    /// connection is to close first. A connection that has sent nothing when
    /// the listener stops has asked for nothing and closes at once.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep its arguments twice"
    )]
    pub(super) fn protocol<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut TrackedIo<I>,
    ) -> impl Future<Output = Option<Protocol>> {
        async move {
            loop {
                if let Some(protocol) = io.protocol() {
                    return Some(protocol);
                }
                if !self.next_bytes(io).await {
                    return None;
                }
            }
        }
    }

    /// Waits until the client sends more, and reads it ahead; `false` if the
    /// connection is to close instead: the client closed it, the listener
    /// stopped, or the watchdog's clock for the connection's state ran out.
    /// Before any byte has come that is the idle timeout, within a head the
    /// header-read timeout: one timer, set for whichever applies, where a
    /// connection being served needs [`Activity::lapsed`]'s three clocks.
    /// (Between requests a connection waits in the lot instead.)
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep its arguments twice"
    )]
    fn next_bytes<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut TrackedIo<I>,
    ) -> impl Future<Output = bool> {
        async move {
            let (deadline, expiring) = waiting_deadline(self.activity, self.limits);
            let next = tokio::select! {
                next = io.next_bytes() => next,
                () = self.stopped.as_mut() => return false,
                () = tokio::time::sleep_until(deadline) => {
                    report_expired(expiring, *self.peer);
                    return false;
                }
            };
            next.unwrap_or_else(|error| {
                report_end(self.activity, *self.peer, &error);
                false
            })
        }
    }

    /// Runs hyper's `connection` to its end, stopping it gracefully
    /// (`graceful_shutdown`: the request in progress finishes, and an HTTP/2
    /// client is sent GOAWAY) when the listener stops or a response asks, and
    /// closing it when the watchdog says it has been idle or slow too long. An
    /// HTTP/1.1 connection is also stopped, and reported [`Served::Parked`],
    /// as soon as it may be parked (see [`Activity::may_park`]).
    pub(super) async fn drive<C>(
        &mut self,
        mut connection: Pin<&mut C>,
        graceful_shutdown: fn(Pin<&mut C>),
        parking: Parking,
    ) -> Served
    where
        C: Future<Output = hyper::Result<()>>,
    {
        let Self {
            activity,
            peer,
            ref mut stopped,
            limits,
        } = *self;
        let http2 = parking == Parking::Never;
        let mut stopping = false;
        let mut park_failed = false;
        // Once an idle HTTP/2 connection has been sent GOAWAY, when to stop
        // waiting for the client to close it.
        let mut goaway_deadline = None;
        // Once the listener has stopped, when the request in flight is cut.
        let mut cut_at = None;
        let result = loop {
            // How soon the client's pattern lets the connection be parked
            // (the exchange may allow less; see `Activity::may_park`): at
            // once, the moment hyper is idle, or after a quiet spell.
            let client_parks = if stopping || park_failed {
                Parking::Never
            } else {
                parking
            };
            let serving = future::poll_fn(|cx| {
                let poll = connection.as_mut().poll(cx);
                if poll.is_pending()
                    && client_parks == Parking::AtOnce
                    && activity.may_park() == Parking::AtOnce
                {
                    let poll = park(
                        activity,
                        connection.as_mut(),
                        graceful_shutdown,
                        |connection| connection.poll(cx),
                    );
                    if poll.is_pending() {
                        park_failed = true;
                    }
                    return poll;
                }
                poll
            });
            // The watchers, polled only when one of them was woken (see
            // `gate`), not at every wake-up of the connection's sockets. They
            // are dropped, and their borrows end, before what woke them is
            // acted on.
            let watched = {
                let watchers = pin!(async {
                    let quiet = (client_parks != Parking::Never).then_some(PARK_WHEN_QUIET_FOR);
                    tokio::select! {
                        () = stopped.as_mut(), if cut_at.is_none() => Watched::Stop,
                        // HTTP/2's `Connection: close` (see `guarded`).
                        () = activity.wind_down_asked(), if !stopping => Watched::WindDown,
                        lapse = activity.lapsed(limits.idle_timeout, limits.header_read_timeout, quiet),
                            if goaway_deadline.is_none() => match lapse {
                                Lapse::Quiet => Watched::Quiet,
                                Lapse::Expired(expired) => Watched::Expired(expired),
                            },
                        () = async {
                            match goaway_deadline.into_iter().chain(cut_at).min() {
                                Some(deadline) => tokio::time::sleep_until(deadline).await,
                                None => future::pending().await,
                            }
                        } => Watched::GaveUp,
                    }
                });
                tokio::select! {
                    biased;
                    result = serving => break result,
                    watched = Gated::new(watchers) => watched,
                }
            };
            match watched {
                Watched::Quiet => {
                    if activity.may_park() != Parking::Never {
                        let ended = park(
                            activity,
                            connection.as_mut(),
                            graceful_shutdown,
                            |connection| {
                                connection.now_or_never().map_or(Poll::Pending, Poll::Ready)
                            },
                        );
                        if let Poll::Ready(result) = ended {
                            break result;
                        }
                    }
                    park_failed = true;
                }
                Watched::Stop => {
                    cut_at = Some(tokio::time::Instant::now() + limits.shutdown_timeout);
                    if !stopping {
                        stopping = true;
                        graceful_shutdown(connection.as_mut());
                    }
                }
                Watched::WindDown => {
                    stopping = true;
                    graceful_shutdown(connection.as_mut());
                }
                Watched::Expired(expired) => {
                    // An idle HTTP/2 connection is sent GOAWAY, so that a
                    // request the client is just sending is known to be
                    // unserved and safe to retry elsewhere, then closed within
                    // one header-read time.
                    if http2 && expired == Expired::Idle {
                        debug!(%peer, "idle HTTP/2 connection, sending GOAWAY");
                        stopping = true;
                        graceful_shutdown(connection.as_mut());
                        goaway_deadline =
                            Some(tokio::time::Instant::now() + limits.header_read_timeout);
                        continue;
                    }
                    // Nothing is in flight in either case, so dropping the
                    // connection (closing the socket) loses no response.
                    report_expired(expired, *peer);
                    return Served::Closed;
                }
                Watched::GaveUp => {
                    if cut_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
                        warn!(
                            %peer,
                            timeout_ms = limits.shutdown_timeout.as_millis(),
                            "shutdown timeout reached, closing a connection with a request in flight"
                        );
                    } else {
                        debug!(%peer, "idle HTTP/2 connection did not close after GOAWAY, closing it");
                    }
                    return Served::Closed;
                }
            }
        };
        // Parked only if the `parking` flag is still set: a park that failed
        // (see `park`) took it back.
        match result {
            Ok(()) if activity.parking() => Served::Parked,
            Ok(()) => Served::Closed,
            Err(error) => {
                report_end(activity, *peer, &error);
                Served::Closed
            }
        }
    }
}

/// What woke a connection's watchers in [`Watch::drive`].
enum Watched {
    /// The connection has been idle for [`PARK_WHEN_QUIET_FOR`].
    Quiet,
    /// The listener stops: the connection winds down, and what is in flight
    /// gets the shutdown timeout.
    Stop,
    /// A response asked the connection to wind down.
    WindDown,
    /// A clock of the watchdog ran out.
    Expired(Expired),
    /// An idle HTTP/2 connection sent GOAWAY did not close in time, or a
    /// request outlasted the shutdown timeout.
    GaveUp,
}

/// Asks an idle hyper `connection` to end, so that its socket can be parked,
/// and polls it once more (`poll_once`), returning what that gave. With
/// the activity's `parking` flag set meanwhile, hyper's closing `shutdown`
/// leaves the socket open. If hyper was not idle after all (it still had a
/// request body to read), the flag is taken back: hyper closes the connection
/// once done, as it would for `Connection: close`.
fn park<C: Future>(
    activity: &Activity,
    mut connection: Pin<&mut C>,
    graceful_shutdown: fn(Pin<&mut C>),
    poll_once: impl FnOnce(Pin<&mut C>) -> Poll<C::Output>,
) -> Poll<C::Output> {
    activity.set_parking(true);
    graceful_shutdown(connection.as_mut());
    let polled = poll_once(connection);
    if polled.is_pending() {
        activity.set_parking(false);
    }
    polled
}

pub(super) fn report_expired(expired: Expired, peer: SocketAddr) {
    match expired {
        Expired::Idle => debug!(%peer, "closing idle connection"),
        Expired::HeaderRead => info!(%peer, "request head too slow, closing connection"),
    }
}

/// Reports how a connection ended with `error`.
pub(super) fn report_end(activity: &Activity, peer: SocketAddr, error: &dyn std::error::Error) {
    if activity.flooded() {
        info!(
            %peer,
            burst = CONTROL_FRAME_BURST,
            per_second = CONTROL_FRAMES_PER_SECOND,
            "HTTP/2 control frame flood, connection closed"
        );
    } else {
        // Clients hanging up, malformed requests and the like are routine
        // for a server.
        debug!(%peer, %error, "connection ended with an error");
    }
}
