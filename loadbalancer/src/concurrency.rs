//! Concurrency limits: at most `maxRequestsPerBackend` requests in flight at
//! each backend (Envoy's `max_requests` circuit breaker), and a short wait for
//! requests that find every backend at its limit.
//!
//! A slow backend holds its requests longer, so without a limit it collects
//! more and more of them: the ones that would have been quick elsewhere wait
//! behind it. With a limit, the balancer skips a backend that is full (see
//! [`PickContext::max_in_flight`](crate::balancer::PickContext)), and the
//! backend takes a request only by winning a slot
//! ([`BackendState::start_limited_request`](crate::backend_state::BackendState::start_limited_request)),
//! so the limit holds exactly even when two picks race.
//!
//! When every backend is full, the request waits in the [`Queue`] for at most
//! `queueTimeoutMs`, and is answered 503 after that (it is *shed*). Waiting
//! costs nothing while it lasts: no polling, the request's task sleeps until a
//! limited request somewhere finishes ([`Queue::release`] wakes every waiter,
//! and each one picks again) or its time is up. The queue has no length limit
//! of its own: each waiting request holds a client connection, so the server's
//! `maxConnections` bounds it, and `queueTimeoutMs` bounds how long any one
//! waits. Waiters are woken together rather than in arrival order; the few
//! that lose the race for the freed slot go back to sleep.

use std::sync::atomic::{AtomicUsize, Ordering, fence};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// The `maxRequestsPerBackend` and `queueTimeoutMs` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConcurrencyConfig {
    /// Requests in flight at one backend, at most (at least 1). Default: no
    /// limit.
    pub max_requests_per_backend: Option<u64>,
    /// How long a request waits when every backend is at its limit, before it
    /// is answered 503. Default 1000; 0 answers at once.
    pub queue_timeout_ms: u64,
}

/// The longest `queueTimeoutMs`: a minute, past which a client has long given
/// up.
pub const MAX_QUEUE_TIMEOUT_MS: u64 = 60_000;

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        Self {
            max_requests_per_backend: None,
            queue_timeout_ms: 1000,
        }
    }
}

impl ConcurrencyConfig {
    /// Checks the values; the error names the key and the reason.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_requests_per_backend == Some(0) {
            return Err((
                "maxRequestsPerBackend",
                "must be at least 1 (leave it out for no limit)".to_owned(),
            ));
        }
        if self.queue_timeout_ms > MAX_QUEUE_TIMEOUT_MS {
            return Err((
                "queueTimeoutMs",
                format!("must be between 0 and {MAX_QUEUE_TIMEOUT_MS}"),
            ));
        }
        Ok(())
    }

    /// The limit in force; `None` without `maxRequestsPerBackend`.
    pub fn limit(&self) -> Option<ConcurrencyLimit> {
        Some(ConcurrencyLimit {
            max_requests_per_backend: self.max_requests_per_backend?,
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
        })
    }
}

/// A concurrency limit in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyLimit {
    /// Requests in flight at one backend, at most.
    pub max_requests_per_backend: u64,
    /// How long a request may wait for a backend with room.
    pub queue_timeout: Duration,
}

/// The requests waiting for a backend with room, and the signal that one may
/// have some now. One per backend list, shared by every worker (a request
/// finishing on one worker's thread frees a slot for all of them) and kept
/// across reloads.
#[derive(Debug, Default)]
pub struct Queue {
    /// Woken each time a request counted against a limit finishes.
    released: Notify,
    /// Requests waiting now: [`Queue::release`] wakes no one while it is 0,
    /// which keeps the notification off the common path.
    waiting: AtomicUsize,
}

impl Queue {
    /// A slot was freed: wakes every waiting request, to pick again.
    ///
    /// The fence pairs with the one in [`Queue::wake_up_call`]: either this
    /// sees the waiter counted, or the waiter's next pick sees the slot free
    /// (the two sides of a store-buffering race, each a store then a load).
    pub fn release(&self) {
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.released.notify_waiters();
        }
    }

    /// Counts a request as waiting until the guard is dropped.
    pub fn join(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(self)
    }

    /// A future that completes at the next [`Queue::release`] after this
    /// call. Taken *before* a waiting request picks again, so a slot freed
    /// between the pick and the wait still wakes it.
    pub fn wake_up_call(&self) -> Notified<'_> {
        let notified = self.released.notified();
        fence(Ordering::SeqCst);
        notified
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether no request is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request counted in the [`Queue`], until dropped.
#[derive(Debug)]
pub struct Waiting<'a>(&'a Queue);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn zero_and_out_of_range_values_are_rejected_naming_the_key() {
        let zero = ConcurrencyConfig {
            max_requests_per_backend: Some(0),
            ..ConcurrencyConfig::default()
        };
        assert_eq!(
            zero.validate().map_err(|e| e.0),
            Err("maxRequestsPerBackend")
        );
        let long = ConcurrencyConfig {
            max_requests_per_backend: Some(2),
            queue_timeout_ms: MAX_QUEUE_TIMEOUT_MS + 1,
        };
        assert_eq!(long.validate().map_err(|e| e.0), Err("queueTimeoutMs"));
        assert_eq!(ConcurrencyConfig::default().limit(), None);
    }

    #[tokio::test]
    async fn a_release_wakes_a_waiter_that_asked_before_it() {
        let queue = Arc::new(Queue::default());
        let waiting = queue.join();
        let woken = queue.wake_up_call();
        queue.release();
        tokio::time::timeout(Duration::from_secs(10), woken)
            .await
            .expect("woken by the release");
        assert_eq!(queue.len(), 1);
        drop(waiting);
        assert!(queue.is_empty());
    }
}
