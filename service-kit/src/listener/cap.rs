//! The connection cap (`maxConnections`): a slot per open connection, taken
//! before `accept`, and the fair share of new connections among the workers
//! that accept from one socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

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

    /// The most connections open at once.
    pub(super) fn max(&self) -> usize {
        self.max
    }

    /// Returns once this worker may accept (see [`Self::shared`]); at once for
    /// a listener of its own.
    pub(super) async fn turn(&self) {
        if let Some(spread) = &self.spread {
            spread.turn().await;
        }
    }

    /// A free slot, if there is one now.
    pub(super) fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }

    /// The next slot to come free; `None` only if the cap were closed, which
    /// it never is.
    pub(super) async fn reserve(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).acquire_owned().await.ok()
    }

    /// Turns a slot into a connection's place, counted for its worker.
    pub(super) fn admit(&self, permit: OwnedSemaphorePermit) -> Slot {
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

#[cfg(test)]
impl Slot {
    /// A place under a cap of its own, for tests of one connection.
    pub(crate) fn unlimited() -> Self {
        let cap = ConnectionCap::new(1);
        let permit = Arc::clone(&cap.slots)
            .try_acquire_owned()
            .expect("a free slot");
        cap.admit(permit)
    }
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
}
