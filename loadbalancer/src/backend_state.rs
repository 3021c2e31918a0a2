//! Per-backend runtime state: how each backend is doing, and whether it may take traffic.
//!
//! [`Backends`](crate::backends::Backends) says *which* addresses exist; this module
//! says *how each one is doing*. One [`BackendState`] lives beside each address in the
//! shared list, created when discovery first publishes the address and dropped when
//! discovery removes it, so nothing leaks as pods come and go.
//!
//! Everything here is an atomic: the proxy updates counters on every request from
//! many tasks at once, health checks and outlier detection flip the availability
//! flags, and the admin endpoints read it all, with no lock and no `.await` anywhere.
//! Each writer owns its own fields (the proxy the counters, active health checks
//! `healthy`, outlier detection `ejected_until`), so no update ever overwrites
//! another's.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::concurrency::Queue;
use crate::metrics::BackendMetrics;
use crate::topology::{Place, Proximity};

/// What the load balancer knows about one backend right now.
#[derive(Debug)]
pub struct BackendState {
    /// The time base for `ejected_until_ms`; an `Instant` cannot live in an atomic,
    /// an offset from it can.
    epoch: Instant,
    /// Requests sent to this backend whose response has not yet finished. The
    /// least-request balancer compares it; the status page shows it.
    in_flight: AtomicU64,
    /// Of those, the tunnels (upgraded connections, WebSockets) open now.
    tunnels: AtomicU64,
    /// Requests this backend was picked for, whatever their outcome.
    requests: AtomicU64,
    /// Requests that failed at this backend (connect error, reset, timeout, 5xx).
    failures: AtomicU64,
    /// Latency of the most recent response head, in microseconds.
    last_latency_micros: AtomicU64,
    /// The active health checks' verdict. Starts `true`: discovery only publishes
    /// endpoints Kubernetes already reports ready, so a new pod takes traffic at once
    /// instead of waiting for a probe interval.
    healthy: AtomicBool,
    /// Outlier detection's verdict: ejected until this many milliseconds after
    /// `epoch`; 0 means not ejected.
    ejected_until_ms: AtomicU64,
    /// Outlier detection's counters (failures in a row, ejections so far), kept
    /// here so they live and die with the endpoint.
    outlier: OutlierState,
    /// This backend's metric handles, resolved on its first answered request so
    /// that recording later ones needs no label lookup (see
    /// [`Metrics::record_backend_request`](crate::metrics::Metrics::record_backend_request)).
    metrics: OnceLock<BackendMetrics>,
    /// Where the backend runs (its EndpointSlice's `zone` and `nodeName`),
    /// written by discovery, read by the admin endpoints. A mutex: it holds
    /// strings, and nothing on the request path reads it.
    place: Mutex<Option<Arc<Place>>>,
    /// `place`'s proximity, as a [`Proximity`] index: the proxy counts every
    /// request by it, so it is an atomic rather than behind the mutex.
    proximity: AtomicU8,
}

/// The per-backend counters behind outlier detection's ejection decisions; one
/// lives in each [`BackendState`]. Only [`crate::outlier`] writes them.
#[derive(Debug, Default)]
pub struct OutlierState {
    /// Failures since the last success (or since the last ejection).
    pub(crate) consecutive_failures: AtomicU32,
    /// Ejections since the last success. Non-zero means the circuit is open or
    /// half-open; it is also the exponent of the next ejection's length.
    pub(crate) ejections: AtomicU32,
}

impl OutlierState {
    /// Ejections since the backend last succeeded (0: the circuit is closed).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }
}

/// Counts a request as in flight for as long as it lives.
#[derive(Debug)]
pub struct InFlight<'a>(&'a BackendState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// [`InFlight`] for a request whose response body outlives the code that picked
/// the backend: the proxy moves it into the streamed body, so the request counts as
/// in flight until the last byte has gone to the client, not just the head.
#[derive(Debug)]
pub struct OwnedInFlight {
    state: Arc<BackendState>,
    /// For a request that took one of a limited number of slots: the queue
    /// told when the slot is free again. `None` without a limit.
    queue: Option<Arc<Queue>>,
}

impl OwnedInFlight {
    /// The state this request is counted in, e.g. to `record` its outcome.
    pub fn state(&self) -> &BackendState {
        &self.state
    }

    /// The request became a tunnel (its backend switched protocols): it stays
    /// in flight, and counts as an open tunnel, until the tunnel closes.
    pub fn into_tunnel(self) -> OpenTunnel {
        self.state.tunnels.fetch_add(1, Ordering::Relaxed);
        OpenTunnel(self)
    }
}

/// A tunnel to a backend, counted in its requests in flight (so least-request
/// balancing sees it) and in its open tunnels, until dropped.
#[derive(Debug)]
pub struct OpenTunnel(OwnedInFlight);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.state.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for OwnedInFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(queue) = &self.queue {
            queue.release();
        }
    }
}

impl Default for BackendState {
    fn default() -> Self {
        Self::new()
    }
}

impl BackendState {
    /// A backend with no history: healthy, not ejected, all counters zero.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicU64::new(0),
            tunnels: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_latency_micros: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            outlier: OutlierState::default(),
            metrics: OnceLock::new(),
            place: Mutex::new(None),
            proximity: AtomicU8::new(Proximity::Other as u8),
        }
    }

    /// Counts a new request; it stays in flight until the returned guard is dropped,
    /// so an early return or a client hanging up can never leave the count too high.
    pub fn start_request(&self) -> InFlight<'_> {
        self.enter();
        InFlight(self)
    }

    /// Like [`start_request`](Self::start_request), with a guard that owns the state.
    pub fn start_owned_request(self: Arc<Self>) -> OwnedInFlight {
        self.enter();
        OwnedInFlight {
            state: self,
            queue: None,
        }
    }

    /// Like [`start_owned_request`](Self::start_owned_request), if fewer than
    /// `max` requests are in flight here; `None` if `max` are. The check and
    /// the count are one atomic step, so racing requests never take more than
    /// `max` slots between them. `queue` hears when the slot is free again.
    pub fn start_limited_request(
        self: Arc<Self>,
        max: u64,
        queue: &Arc<Queue>,
    ) -> Option<OwnedInFlight> {
        self.in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(OwnedInFlight {
            state: self,
            queue: Some(Arc::clone(queue)),
        })
    }

    fn enter(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how a request ended: its latency, and whether it failed.
    pub fn record(&self, latency: Duration, failed: bool) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.last_latency_micros.store(micros, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a failure found after the response head was recorded (its body
    /// broke off or stalled).
    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Tunnels open to this backend right now.
    pub fn tunnels(&self) -> u64 {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// Requests in flight right now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests this backend was picked for.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests that failed at this backend.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The latency of the most recent response, if there was one.
    pub fn last_latency(&self) -> Option<Duration> {
        match self.last_latency_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    /// The active health checks' verdict.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the active health checks' verdict; returns the previous one.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed)
    }

    /// Ejects the backend until `until` (outlier detection).
    pub fn eject_until(&self, until: Instant) {
        self.ejected_until_ms
            .store(self.ejection_ms(until), Ordering::Relaxed);
    }

    /// Ejects the backend until `until` unless it is ejected at `now`, or another
    /// caller got there first; returns whether this call did. Outlier detection
    /// uses it so that of several failures racing past the threshold exactly one
    /// ejects: the ejection is claimed by the same write that publishes it.
    pub fn eject_unless_ejected(&self, now: Instant, until: Instant) -> bool {
        self.replace_unless_ejected(now, until, true)
    }

    /// Extends an ejection that has run out at `now` until `until`, unless another
    /// caller did so first; returns whether this call did. Outlier detection uses
    /// it to let exactly one trial request through when an ejection ends.
    pub fn extend_expired_ejection(&self, now: Instant, until: Instant) -> bool {
        self.replace_unless_ejected(now, until, false)
    }

    /// Sets the ejection to end at `until` if none is in force at `now` (and, if
    /// not `from_none`, one has been), with one compare-and-swap, so that of
    /// racing callers one wins.
    fn replace_unless_ejected(&self, now: Instant, until: Instant, from_none: bool) -> bool {
        let current = self.ejected_until_ms.load(Ordering::Relaxed);
        let in_force = current != 0 && self.epoch + Duration::from_millis(current) > now;
        if in_force || (current == 0 && !from_none) {
            return false;
        }
        self.ejected_until_ms
            .compare_exchange(
                current,
                self.ejection_ms(until),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// `until` as stored in `ejected_until_ms`.
    fn ejection_ms(&self, until: Instant) -> u64 {
        let ms = until.saturating_duration_since(self.epoch).as_millis();
        // Never store 0, which means "not ejected".
        u64::try_from(ms).unwrap_or(u64::MAX).max(1)
    }

    /// Lifts an ejection early (a successful trial request).
    pub fn clear_ejection(&self) {
        self.ejected_until_ms.store(0, Ordering::Relaxed);
    }

    /// When the current ejection ends, if the backend is ejected at `now`.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        match self.ejected_until_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms)).filter(|until| *until > now),
        }
    }

    /// The cache for this backend's metric handles, for
    /// [`Metrics::record_backend_request`](crate::metrics::Metrics::record_backend_request).
    pub fn metrics(&self) -> &OnceLock<BackendMetrics> {
        &self.metrics
    }

    /// Outlier detection's counters for this backend.
    pub fn outlier(&self) -> &OutlierState {
        &self.outlier
    }

    /// Records where the backend runs (discovery).
    pub fn set_place(&self, place: Arc<Place>) {
        self.proximity
            .store(place.proximity as u8, Ordering::Relaxed);
        *self.place.lock().unwrap_or_else(|p| p.into_inner()) = Some(place);
    }

    /// Where the backend runs, if discovery said.
    pub fn place(&self) -> Option<Arc<Place>> {
        self.place.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How close the backend runs to this replica.
    pub fn proximity(&self) -> Proximity {
        Proximity::ALL
            .get(usize::from(self.proximity.load(Ordering::Relaxed)))
            .copied()
            .unwrap_or_default()
    }

    /// Whether the balancer may pick this backend at `now`: healthy and not ejected.
    pub fn is_available(&self, now: Instant) -> bool {
        self.is_healthy() && self.ejected_until(now).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_backend_is_available_with_zero_counters() {
        let state = BackendState::new();
        assert!(state.is_available(Instant::now()));
        assert_eq!(
            (state.requests(), state.failures(), state.in_flight()),
            (0, 0, 0)
        );
        assert_eq!(state.last_latency(), None);
    }

    #[test]
    fn in_flight_counts_until_the_guard_drops() {
        let state = BackendState::new();
        let first = state.start_request();
        let second = state.start_request();
        assert_eq!(state.in_flight(), 2);
        drop(first);
        assert_eq!(state.in_flight(), 1);
        drop(second);
        assert_eq!((state.in_flight(), state.requests()), (0, 2));
    }

    #[test]
    fn an_owned_guard_counts_like_a_borrowed_one() {
        let state = Arc::new(BackendState::new());
        let guard = Arc::clone(&state).start_owned_request();
        assert_eq!((state.in_flight(), guard.state().requests()), (1, 1));
        drop(guard);
        assert_eq!(state.in_flight(), 0);
    }

    #[test]
    fn a_limited_request_takes_a_slot_only_below_the_limit() {
        let state = Arc::new(BackendState::new());
        let queue = Arc::new(Queue::default());
        let first = Arc::clone(&state).start_limited_request(2, &queue);
        let second = Arc::clone(&state).start_limited_request(2, &queue);
        assert!(first.is_some() && second.is_some());
        assert!(
            Arc::clone(&state)
                .start_limited_request(2, &queue)
                .is_none()
        );
        assert_eq!((state.in_flight(), state.requests()), (2, 2));
        drop(first);
        assert!(
            Arc::clone(&state)
                .start_limited_request(2, &queue)
                .is_some()
        );
    }

    #[test]
    fn record_counts_failures_and_keeps_the_last_latency() {
        let state = BackendState::new();
        state.record(Duration::from_millis(3), false);
        state.record(Duration::from_millis(7), true);
        assert_eq!(state.failures(), 1);
        assert_eq!(state.last_latency(), Some(Duration::from_millis(7)));
    }

    #[test]
    fn an_unhealthy_backend_is_not_available() {
        let state = BackendState::new();
        assert!(state.set_healthy(false));
        assert!(!state.is_available(Instant::now()));
    }

    #[test]
    fn an_ejection_lasts_until_its_deadline() {
        let state = BackendState::new();
        let now = Instant::now();
        state.eject_until(now + Duration::from_secs(10));
        assert!(!state.is_available(now));
        assert!(state.is_available(now + Duration::from_secs(11)));
        state.clear_ejection();
        assert_eq!(state.ejected_until(now), None);
    }

    #[test]
    fn a_place_sets_the_proximity_the_proxy_counts_by() {
        let state = BackendState::new();
        assert_eq!((state.proximity(), state.place()), (Proximity::Other, None));
        let place = Arc::new(Place {
            zone: Some("zone-a".to_owned()),
            node: None,
            proximity: Proximity::SameZone,
        });
        state.set_place(Arc::clone(&place));
        assert_eq!(state.proximity(), Proximity::SameZone);
        assert_eq!(state.place(), Some(place));
    }

    #[test]
    fn only_one_caller_extends_an_expired_ejection() {
        let state = BackendState::new();
        let now = Instant::now();
        let later = now + Duration::from_secs(2);
        assert!(!state.extend_expired_ejection(now, later), "never ejected");
        state.eject_until(now + Duration::from_secs(1));
        assert!(
            !state.extend_expired_ejection(now, later),
            "not expired yet"
        );
        let expired = now + Duration::from_millis(1500);
        assert!(state.extend_expired_ejection(expired, later + Duration::from_secs(1)));
        assert!(
            !state.extend_expired_ejection(expired, later),
            "already taken"
        );
        assert!(!state.is_available(later));
    }
}
