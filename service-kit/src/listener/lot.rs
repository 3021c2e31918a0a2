//! The lot: where the accept loop keeps idle HTTP/1.1 connections between
//! requests, without a task, a timer or a buffer of their own, until their
//! next request begins or their idle time runs out.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::AsyncRead;
use tokio::time::{Instant, Sleep};

use super::watch::{report_end, report_expired};
use super::watchdog::{Expired, TrackedIo};

/// An idle HTTP/1.1 connection, taken from hyper between requests (see
/// `Watch::serve_http1`): the socket and what was read ahead, nothing else.
/// Its next request starts a new task with a new hyper connection and a
/// service freshly made for its peer. nginx keeps keep-alive connections the
/// same way, which is what lets thousands of idle clients cost little.
pub(super) struct Parked<I> {
    pub(super) io: TrackedIo<I>,
    pub(super) peer: SocketAddr,
    /// When it was parked, to tell a busy client from one that leaves time
    /// between its requests (see `QUICK_RETURN`).
    pub(super) since: Instant,
}

/// How late the lot may close a connection whose idle time has run out: one
/// look ([`Lot::sweep`]) closes every connection due by then, so that a steady
/// trickle of expiring connections costs a look every this often, not one each.
const SWEEP_SLACK: Duration = Duration::from_millis(100);

/// The parked connections of one accept loop.
///
/// Each waits in a `FuturesUnordered`, which polls only those whose socket has
/// become readable: a few hundred bytes each, where a task would take a
/// 128-byte-aligned cell for the largest state a connection can be in. Their
/// idle times are kept by one timer for all, which wakes the lot when the
/// earliest runs out.
pub(super) struct Lot<I> {
    waiting: FuturesUnordered<Waiting<I>>,
    sweep: Pin<Box<Sleep>>,
    /// When the sweep timer is set for, if it is.
    next_sweep: Option<Instant>,
}

impl<I: AsyncRead + Unpin> Lot<I> {
    pub(super) fn new() -> Self {
        Self {
            waiting: FuturesUnordered::new(),
            sweep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            next_sweep: None,
        }
    }

    /// Keeps `parked` until its next request begins, or until `deadline`,
    /// when it is closed as `expiring` says.
    pub(super) fn park(&mut self, parked: Parked<I>, deadline: Instant, expiring: Expired) {
        self.waiting.push(Waiting {
            parked: Some(parked),
            deadline,
            expiring,
            expired: false,
            waker: None,
        });
        if self.next_sweep.is_none_or(|at| deadline < at) {
            self.set_sweep(deadline);
        }
    }

    /// Resolves to the next connection whose request has begun; it is the
    /// caller's to serve. Pending while there is none. Cancel-safe: nothing is
    /// taken from the lot until this resolves.
    pub(super) async fn next_request(&mut self) -> Parked<I> {
        loop {
            tokio::select! {
                // Matched here, not in the branch's pattern: a pattern that
                // fails would leave the lot unwatched until the timer fires.
                woken = self.waiting.next(), if !self.waiting.is_empty() => {
                    // `None` is a connection that closed: dropped already.
                    if let Some(Some(parked)) = woken {
                        return parked;
                    }
                }
                () = self.sweep.as_mut(), if self.next_sweep.is_some() => self.sweep(),
                else => std::future::pending().await,
            }
        }
    }

    /// Marks every connection whose idle time has run out, to be closed when
    /// next polled (which the mark brings about), and sets the timer for the
    /// earliest of the rest. A look at every parked connection: at most one
    /// per [`SWEEP_SLACK`].
    fn sweep(&mut self) {
        let now = Instant::now();
        let mut earliest = None::<Instant>;
        for waiting in self.waiting.iter_mut() {
            if waiting.deadline <= now {
                waiting.expire();
            } else if earliest.is_none_or(|at| waiting.deadline < at) {
                earliest = Some(waiting.deadline);
            }
        }
        self.next_sweep = None;
        if let Some(at) = earliest {
            self.set_sweep(at.max(now + SWEEP_SLACK));
        }
    }

    fn set_sweep(&mut self, at: Instant) {
        self.sweep.as_mut().reset(at);
        self.next_sweep = Some(at);
    }
}

/// One connection in the lot: resolves to it once its next request begins
/// (its first bytes read ahead), to `None` once it is to close: the client
/// closed it, or the lot found its idle time run out.
struct Waiting<I> {
    /// Taken when it resolves.
    parked: Option<Parked<I>>,
    deadline: Instant,
    expiring: Expired,
    expired: bool,
    /// Whom to wake when it expires: the lot's entry for it.
    waker: Option<Waker>,
}

impl<I> Waiting<I> {
    fn expire(&mut self) {
        self.expired = true;
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

impl<I: AsyncRead + Unpin> Future for Waiting<I> {
    type Output = Option<Parked<I>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(parked) = &mut this.parked else {
            return Poll::Ready(None);
        };
        // Bytes that arrived are served, even at the deadline.
        match parked.io.poll_read_ahead(cx) {
            Poll::Ready(Ok(true)) => Poll::Ready(this.parked.take()),
            Poll::Ready(Ok(false)) => Poll::Ready(None),
            Poll::Ready(Err(error)) => {
                report_end(parked.io.activity(), parked.peer, &error);
                Poll::Ready(None)
            }
            Poll::Pending if this.expired => {
                report_expired(this.expiring, parked.peer);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    this.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::listener::Slot;
    use crate::listener::watchdog::Activity;

    const IDLE: Duration = Duration::from_secs(5);

    /// A connection parked now with `IDLE` to go, and its client's end.
    fn park(lot: &mut Lot<DuplexStream>, port: u16) -> DuplexStream {
        let (client, server) = tokio::io::duplex(1024);
        let parked = Parked {
            io: TrackedIo::new(server, Activity::new(Slot::unlimited())),
            peer: SocketAddr::from(([127, 0, 0, 1], port)),
            since: Instant::now(),
        };
        lot.park(parked, Instant::now() + IDLE, Expired::Idle);
        client
    }

    /// How long from now until the server closes `client`'s connection.
    async fn closed_after(client: &mut DuplexStream) -> Duration {
        let start = Instant::now();
        let mut byte = [0u8; 1];
        assert_eq!(client.read(&mut byte).await.expect("read"), 0, "closed");
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn each_connection_closes_once_its_idle_time_runs_out_and_one_that_asks_is_served_at_once()
     {
        let start = Instant::now();
        let mut lot = Lot::new();
        let mut first = park(&mut lot, 1);
        let hangs_up = park(&mut lot, 4);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut asks = park(&mut lot, 2);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut last = park(&mut lot, 3);

        // The lot runs (as the accept loop would run it) while the clients wait.
        let lot = tokio::spawn(async move {
            let served = lot.next_request().await;
            let served_after = start.elapsed();
            // Kept running, to close the others on time.
            tokio::select! {
                _ = lot.next_request() => panic!("only one connection asked"),
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            (served, served_after)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A connection that closes leaves the others watched.
        drop(hangs_up);
        tokio::time::sleep(Duration::from_millis(500)).await;
        asks.write_all(b"GET / HTTP/1.1\r\n").await.expect("sent");

        // Parked at 0 s, 1 s and 2 s with 5 s each; now is 3 s.
        let first_closes = closed_after(&mut first).await;
        assert!(
            first_closes >= Duration::from_secs(2)
                && first_closes <= Duration::from_secs(2) + SWEEP_SLACK,
            "{first_closes:?}"
        );
        let last_closes = closed_after(&mut last).await;
        assert!(
            last_closes >= Duration::from_secs(2)
                && last_closes <= Duration::from_secs(2) + SWEEP_SLACK,
            "{last_closes:?}"
        );
        let (served, served_after) = lot.await.expect("lot ran");
        assert_eq!(served.peer.port(), 2);
        assert_eq!(served_after, Duration::from_secs(3), "handed back at once");
        assert!(served.io.has_unread(), "the request's first bytes are kept");
    }
}
