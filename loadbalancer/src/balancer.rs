//! Balancer: picks which backend serves the next request.
//!
//! The proxy calls [`Balancer::pick`] inside [`Backends::with`](crate::backends::Backends::with),
//! so it sees the list under the read lock and copies one address out; the lock
//! is released before the request is sent. A pick therefore never waits, never
//! holds a lock across an `.await`, and works on whatever list is current at that
//! instant, which may be shorter or longer than the one the previous pick saw.
//!
//! Algorithms sit behind one small trait, so the proxy never knows which one it
//! uses: [`RoundRobin`] (here), [`LeastRequest`] (power of two random choices
//! over requests in flight) and [`WeightedRoundRobin`] (nginx's smooth weighted
//! round-robin); [`BalancerConfig::build`] builds the configured one. An algorithm picks among the
//! *eligible* members of the list; [`pick_for_attempt`] decides which those are:
//! the backends that active health checks and outlier detection consider available,
//! minus those a retry already tried. If no backend is available, it picks among
//! all of them: health state is a hint, and acting on it must never turn a
//! degraded service into a dead one. (Envoy's "panic threshold" does the same when
//! too few hosts are healthy; here the threshold is zero healthy hosts.)

mod least_request;
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the consistent_hash algorithm comes with hashOn (issue #22)"
    )
)]
mod maglev;
mod weighted;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use least_request::LeastRequest;
pub use weighted::{WeightError, WeightedRoundRobin, Weights};

use serde::{Deserialize, Serialize};

/// The list was empty: no backend can take the request (the proxy answers 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no backend is ready")]
pub struct NoBackend;

/// A load-balancing algorithm.
pub trait Balancer: Send + Sync + fmt::Debug {
    /// Picks one of the `backends` for which `eligible` is true; `Err(NoBackend)`
    /// if there is none. `in_flight` tells how many requests each backend is
    /// serving right now, for the algorithms that weigh load.
    fn pick_among(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
        in_flight: &dyn Fn(SocketAddr) -> u64,
    ) -> Result<SocketAddr, NoBackend>;

    /// Picks one of `backends` for the next request, as if all were idle.
    fn pick(&self, backends: &[SocketAddr]) -> Result<SocketAddr, NoBackend> {
        self.pick_among(backends, &|_| true, &|_| 0)
    }
}

/// A shared balancer is still one balancer: the proxies of all worker threads draw
/// from the same `Arc` (the one [`BalancerConfig::build`] returns), so the rotation stays
/// exact across them.
impl<B: Balancer + ?Sized> Balancer for Arc<B> {
    fn pick_among(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
        in_flight: &dyn Fn(SocketAddr) -> u64,
    ) -> Result<SocketAddr, NoBackend> {
        (**self).pick_among(backends, eligible, in_flight)
    }
}

/// `algorithm`: how the balancer chooses among the available backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Each backend in turn.
    #[default]
    RoundRobin,
    /// The less busy of two random backends (requests in flight).
    LeastRequest,
    /// Smooth weighted round-robin over `weights`.
    WeightedRoundRobin,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastRequest => "least_request",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
        })
    }
}

/// The balancing keys of the config file: which algorithm, and the weights the
/// weighted one uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BalancerConfig {
    /// How the next backend is chosen. Default `round_robin`.
    pub algorithm: Algorithm,
    /// Weights for `weighted_round_robin`, keyed by `IP:port` or by IP (every
    /// port of that host); each at least 1. Unlisted backends weigh 1. Default empty.
    pub weights: Weights,
}

impl BalancerConfig {
    /// The balancer this asks for, ready to share between worker threads.
    pub fn build(&self) -> Arc<dyn Balancer> {
        match self.algorithm {
            Algorithm::RoundRobin => Arc::new(RoundRobin::new()),
            Algorithm::LeastRequest => Arc::new(LeastRequest::new()),
            Algorithm::WeightedRoundRobin => {
                Arc::new(WeightedRoundRobin::new(self.weights.clone()))
            }
        }
    }
}

/// Picks the backend for one attempt of a request: an available one that this
/// request has not tried yet; failing that, any untried one (no backend is
/// available: use them all rather than fail); failing that, any one at all (every
/// backend was tried already, or there is only one).
///
/// Each tier that has no candidate costs a scan but no round-robin turn, so the
/// rotation stays exact over whichever set is in use.
pub fn pick_for_attempt(
    balancer: &dyn Balancer,
    backends: &[SocketAddr],
    available: &dyn Fn(SocketAddr) -> bool,
    in_flight: &dyn Fn(SocketAddr) -> u64,
    tried: &[SocketAddr],
) -> Result<SocketAddr, NoBackend> {
    let untried = |addr: SocketAddr| !tried.contains(&addr);
    balancer
        .pick_among(
            backends,
            &|addr| untried(addr) && available(addr),
            in_flight,
        )
        .or_else(|NoBackend| balancer.pick_among(backends, &untried, in_flight))
        .or_else(|NoBackend| balancer.pick_among(backends, &|_| true, in_flight))
}

/// Round-robin: each pick takes the next ticket from an atomic counter and uses
/// the ticket modulo the number of eligible backends in the current list.
///
/// Every ticket is handed out exactly once, even under contention, so `k × N`
/// picks over `N` eligible backends give each exactly `k`, from any number of
/// threads. Taking the modulo of the *current* count means a list that shrank
/// between two picks can never be indexed out of bounds. Finding the ticket's
/// backend is two scans of the list (count, then find), with no allocation.
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// The next ticket. `fetch_add` wraps around at `usize::MAX`; the rotation
    /// then restarts at index 0, a single skipped turn every 2^64 requests.
    next: AtomicUsize,
}

impl RoundRobin {
    /// A round-robin balancer whose first pick is the first backend.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Balancer for RoundRobin {
    fn pick_among(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
        _in_flight: &dyn Fn(SocketAddr) -> u64,
    ) -> Result<SocketAddr, NoBackend> {
        let count = backends.iter().filter(|&&addr| eligible(addr)).count();
        if count == 0 {
            return Err(NoBackend);
        }
        // Relaxed is enough: the counter orders nothing but itself, and each
        // fetch_add still returns a distinct ticket.
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        backends
            .iter()
            .copied()
            .filter(|&addr| eligible(addr))
            .nth(ticket % count)
            // Eligibility is read from atomics that may flip between the two
            // scans; then any member of the list is an acceptable answer.
            .or_else(|| backends.get(ticket % backends.len()).copied())
            .ok_or(NoBackend)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// `n` distinct addresses, sorted as discovery would publish them; shared
    /// with the algorithms' own tests.
    pub(super) fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i)))
            .collect()
    }

    /// Every backend idle: round-robin ignores load anyway.
    fn idle(_: SocketAddr) -> u64 {
        0
    }

    fn count(picks: impl IntoIterator<Item = SocketAddr>) -> HashMap<SocketAddr, usize> {
        let mut counts = HashMap::new();
        for addr in picks {
            *counts.entry(addr).or_default() += 1;
        }
        counts
    }

    #[test]
    fn k_times_n_sequential_picks_give_each_backend_exactly_k() {
        for n in 1..=5 {
            let backends = addrs(n);
            let balancer = RoundRobin::new();
            let k = 7;
            let picks = (0..k * usize::from(n))
                .map(|_| balancer.pick(&backends).expect("list is not empty"));
            let counts = count(picks);
            assert_eq!(counts.len(), usize::from(n));
            assert!(counts.values().all(|&c| c == k), "{counts:?}");
        }
    }

    #[test]
    fn picks_rotate_in_list_order() {
        let backends = addrs(3);
        let balancer = RoundRobin::new();
        let picks: Vec<_> = (0..6)
            .map(|_| balancer.pick(&backends).expect("list is not empty"))
            .collect();
        let expected: Vec<_> = backends.iter().chain(&backends).copied().collect();
        assert_eq!(picks, expected);
    }

    #[test]
    fn empty_list_is_an_error_not_a_panic() {
        let balancer = RoundRobin::new();
        assert_eq!(balancer.pick(&[]), Err(NoBackend));
        // An empty list does not consume a turn.
        let backends = addrs(2);
        assert_eq!(balancer.pick(&backends), Ok(backends[0]));
    }

    /// Bound asserted: exact. With backend 1 of 4 ineligible, 30 picks give
    /// the other three 10 each, as if the list had only them.
    #[test]
    fn round_robin_is_exact_over_the_eligible_backends() {
        let backends = addrs(4);
        let skipped = backends[1];
        let balancer = RoundRobin::new();
        let picks = (0..30).map(|_| {
            balancer
                .pick_among(&backends, &|addr| addr != skipped, &|_| 0)
                .expect("three are eligible")
        });
        let counts = count(picks);
        assert_eq!(counts.get(&skipped), None);
        assert!(counts.values().all(|&c| c == 10), "{counts:?}");
    }

    #[test]
    fn unavailable_backends_are_skipped_while_any_is_available() {
        let backends = addrs(3);
        let balancer = RoundRobin::new();
        let available = |addr: SocketAddr| addr == backends[2];
        for _ in 0..5 {
            let pick = pick_for_attempt(&balancer, &backends, &available, &idle, &[]);
            assert_eq!(pick, Ok(backends[2]));
        }
    }

    #[test]
    fn with_none_available_all_are_used() {
        let backends = addrs(3);
        let balancer = RoundRobin::new();
        let picks = (0..6).map(|_| {
            pick_for_attempt(&balancer, &backends, &|_| false, &idle, &[])
                .expect("panic mode picks")
        });
        assert!(count(picks).values().all(|&c| c == 2));
    }

    #[test]
    fn a_retry_avoids_the_backends_it_already_tried() {
        let backends = addrs(3);
        let balancer = RoundRobin::new();
        for _ in 0..6 {
            let pick = pick_for_attempt(&balancer, &backends, &|_| true, &idle, &backends[..2]);
            assert_eq!(pick, Ok(backends[2]));
        }
        // An untried but unavailable backend beats an available tried one.
        let pick = pick_for_attempt(
            &balancer,
            &backends,
            &|addr| addr != backends[2],
            &idle,
            &backends[..2],
        );
        assert_eq!(pick, Ok(backends[2]));
        // Everything tried: any backend rather than none.
        let only = &backends[..1];
        assert_eq!(
            pick_for_attempt(&balancer, only, &|_| true, &idle, only),
            Ok(backends[0])
        );
        assert_eq!(
            pick_for_attempt(&balancer, &[], &|_| true, &idle, &[]),
            Err(NoBackend)
        );
    }

    #[test]
    fn shrinking_list_is_never_indexed_out_of_bounds() {
        let balancer = RoundRobin::new();
        let five = addrs(5);
        for _ in 0..4 {
            balancer.pick(&five).expect("list is not empty");
        }
        // The next ticket is 4, past the end of a two-element list.
        let two = &five[..2];
        let pick = balancer.pick(two).expect("list is not empty");
        assert!(two.contains(&pick));
    }
}
