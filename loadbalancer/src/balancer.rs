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
//! over requests in flight), [`WeightedRoundRobin`] (nginx's smooth weighted
//! round-robin) and [`ConsistentHash`] (Maglev, for session affinity);
//! [`BalancerConfig::build`] builds the configured one. An algorithm picks among the
//! *eligible* members of the list; [`pick_for_attempt`] decides which those are:
//! the backends that active health checks and outlier detection consider available,
//! minus those a retry already tried. If no backend is available, it picks among
//! all of them: health state is a hint, and acting on it must never turn a
//! degraded service into a dead one. (Envoy's "panic threshold" does the same when
//! too few hosts are healthy; here the threshold is zero healthy hosts.)
//! A concurrency limit (`maxRequestsPerBackend`, in the [`PickContext`]) is not
//! a hint: a backend at its limit is never eligible, in any tier, and when every
//! backend is at its limit the pick fails and the proxy queues the request.
//!
//! What a pick knows about the request itself travels in a [`PickContext`]:
//! the hash of its affinity key, which only [`ConsistentHash`] reads (the other
//! algorithms take [`Balancer::pick_keyed`]'s default, which ignores it).
//!
//! **Cost of a pick.** Up to [`SCAN_LIMIT`] backends (a handful is the common
//! case) a pick scans the list, which is what makes each algorithm exact over
//! whichever backends are eligible. Beyond it a scan would cost a lookup per
//! backend per request (at 10,000 backends, a tenth of a millisecond), so picks
//! *sample* instead: round-robin takes its ticket's backend and, if that one is
//! not eligible, random ones ([`PROBES`] at most); least-request draws its two
//! candidates at random; weighted round-robin draws at random with each backend
//! kept in proportion to its weight (see [`WeightedRoundRobin`]). Each draw
//! succeeds with the share of backends that are eligible, so a pick costs O(1)
//! lookups (each a binary search, O(log n)) as long as a fair share is.
//!
//! When the draws all miss, few backends are eligible or none (many unhealthy,
//! the panic case): one pass over the list finds the eligible ones, and the
//! picks of the next [`PASS_REUSE`] take turns among what it found instead of
//! each making the same pass. So a pass costs O(n) at most a hundred times a
//! second, whatever the request rate; a backend that comes back in between is
//! found by the draws or by the next pass.

mod consistent_hash;
mod least_request;
mod maglev;
mod weighted;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use consistent_hash::{
    Affinity, AffinityOutcome, ConsistentHash, HashOn, MAX_COOKIE_TTL_SECONDS, PickContext,
};
pub use least_request::LeastRequest;
pub(crate) use least_request::random_below;
pub use maglev::key_hash;
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

    /// Like [`Balancer::pick_among`], for a request `context` describes (its
    /// affinity key). Only algorithms that route by the key override it.
    fn pick_keyed(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
        in_flight: &dyn Fn(SocketAddr) -> u64,
        _context: &PickContext,
    ) -> Result<SocketAddr, NoBackend> {
        self.pick_among(backends, eligible, in_flight)
    }

    /// Where the proxy finds the key [`Balancer::pick_keyed`] routes by;
    /// `None` for algorithms that ignore keys.
    fn affinity(&self) -> Option<&Affinity> {
        None
    }

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

    fn pick_keyed(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
        in_flight: &dyn Fn(SocketAddr) -> u64,
        context: &PickContext,
    ) -> Result<SocketAddr, NoBackend> {
        (**self).pick_keyed(backends, eligible, in_flight, context)
    }

    fn affinity(&self) -> Option<&Affinity> {
        (**self).affinity()
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
    /// Maglev consistent hashing on `hashOn`: session affinity.
    ConsistentHash,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastRequest => "least_request",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::ConsistentHash => "consistent_hash",
        })
    }
}

/// The balancing keys of the config file: which algorithm, the weights the
/// weighted one uses and the key the consistent-hash one hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BalancerConfig {
    /// How the next backend is chosen. Default `round_robin`.
    pub algorithm: Algorithm,
    /// Weights for `weighted_round_robin`, keyed by `IP:port` or by IP (every
    /// port of that host); each at least 1. Unlisted backends weigh 1. Default empty.
    pub weights: Weights,
    /// For `consistent_hash` (and required by it): what in a request is
    /// hashed. Default: none.
    pub hash_on: Option<HashOn>,
}

impl BalancerConfig {
    /// Checks `hashOn`, which `consistent_hash` requires (and the other
    /// algorithms ignore, so that switching the algorithm back and forth is a
    /// one-key change); the error names the key and the reason.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        match (self.algorithm, &self.hash_on) {
            (_, Some(hash_on)) => hash_on.affinity().map(|_| ()),
            (Algorithm::ConsistentHash, None) => Err((
                "hashOn",
                "is required by `consistent_hash`: {\"header\": NAME}, {\"cookie\": NAME} \
                 or {\"sourceIp\": true}"
                    .to_owned(),
            )),
            (_, None) => Ok(()),
        }
    }

    /// The balancer this asks for, ready to share between worker threads.
    pub fn build(&self) -> Arc<dyn Balancer> {
        match self.algorithm {
            Algorithm::RoundRobin => Arc::new(RoundRobin::new()),
            Algorithm::LeastRequest => Arc::new(LeastRequest::new()),
            Algorithm::WeightedRoundRobin => {
                Arc::new(WeightedRoundRobin::new(self.weights.clone()))
            }
            Algorithm::ConsistentHash => match self.hash_on.as_ref().map(HashOn::affinity) {
                Some(Ok(affinity)) => Arc::new(ConsistentHash::new(affinity)),
                // `validate` rejects a config without a valid `hashOn`; a
                // config built in code without one gets the keyless fallback.
                _ => Arc::new(RoundRobin::new()),
            },
        }
    }
}

/// Picks the backend for one attempt of a request: an available one that this
/// request has not tried yet; failing that, any untried one (no backend is
/// available: use them all rather than fail); failing that, any one at all (every
/// backend was tried already, or there is only one). In every tier, a backend
/// at the `context`'s concurrency limit is left out: when all are at it, the
/// answer is `NoBackend`.
///
/// Each tier that has no candidate costs a scan but no round-robin turn, so the
/// rotation stays exact over whichever set is in use.
pub fn pick_for_attempt(
    balancer: &dyn Balancer,
    backends: &[SocketAddr],
    available: &dyn Fn(SocketAddr) -> bool,
    in_flight: &dyn Fn(SocketAddr) -> u64,
    tried: &[SocketAddr],
    context: &PickContext,
) -> Result<SocketAddr, NoBackend> {
    let room = |addr: SocketAddr| context.has_room(addr, in_flight);
    let untried = |addr: SocketAddr| !tried.contains(&addr) && room(addr);
    let pick = |eligible: &dyn Fn(SocketAddr) -> bool| {
        balancer.pick_keyed(backends, eligible, in_flight, context)
    };
    pick(&first_choice(available, in_flight, tried, context))
        .or_else(|NoBackend| pick(&untried))
        .or_else(|NoBackend| pick(&room))
}

/// The backends an attempt's first choice is made among, in the whole list
/// or in a preferred set: available, not tried yet by this request, and with
/// room under the concurrency limit.
fn first_choice<'a>(
    available: &'a dyn Fn(SocketAddr) -> bool,
    in_flight: &'a dyn Fn(SocketAddr) -> u64,
    tried: &'a [SocketAddr],
    context: &'a PickContext,
) -> impl Fn(SocketAddr) -> bool + 'a {
    move |addr| !tried.contains(&addr) && available(addr) && context.has_room(addr, in_flight)
}

/// [`pick_for_attempt`] with topology: first among the `near` sets, nearest
/// first (the backends hinted for this replica's Node, then for its zone; see
/// [`Backends::pick_with_state`](crate::backends::Backends::pick_with_state)),
/// an available one this request has not tried; only when a set has none,
/// the next, and after the last the whole list as [`pick_for_attempt`] does.
///
/// So health and outlier state apply within the preferred set, and a set
/// whose backends are all down, tried or full widens rather than fails. Each
/// set is handed to the algorithm as a list of its own, so round-robin is
/// exact over it and a long list's random draws land in it.
///
/// A request with a hash key (`consistent_hash`) skips the sets: its backend
/// is the key's over the whole list, the same from every replica whatever its
/// zone, which is what affinity promises (Envoy, too, leaves its hash
/// balancers out of zone-aware routing).
pub fn pick_nearest_for_attempt(
    balancer: &dyn Balancer,
    near: &[&[SocketAddr]],
    backends: &[SocketAddr],
    available: &dyn Fn(SocketAddr) -> bool,
    in_flight: &dyn Fn(SocketAddr) -> u64,
    tried: &[SocketAddr],
    context: &PickContext,
) -> Result<SocketAddr, NoBackend> {
    let eligible = first_choice(available, in_flight, tried, context);
    let nearest = match context.key {
        Some(_) => None,
        None => near
            .iter()
            .find_map(|set| balancer.pick_among(set, &eligible, in_flight).ok()),
    };
    nearest.map_or_else(
        || pick_for_attempt(balancer, backends, available, in_flight, tried, context),
        Ok,
    )
}

/// Lists up to this long are scanned at each pick, which keeps every algorithm
/// exact; longer ones are sampled (see the module docs).
pub const SCAN_LIMIT: usize = 64;

/// Random draws a pick from a long list makes for an eligible backend before it
/// falls back to one pass over the list: with half the backends out, all of
/// them miss once in 65,536 picks.
pub const PROBES: usize = 16;

/// Round-robin: each pick takes the next ticket from an atomic counter and uses
/// the ticket modulo the number of eligible backends in the current list.
///
/// Every ticket is handed out exactly once, even under contention, so `k × N`
/// picks over `N` eligible backends give each exactly `k`, from any number of
/// threads. Taking the modulo of the *current* count means a list that shrank
/// between two picks can never be indexed out of bounds. Finding the ticket's
/// backend is two scans of the list (count, then find), with no allocation.
///
/// Above [`SCAN_LIMIT`] backends the ticket is taken modulo the whole list, so
/// the rotation stays exact while every backend is eligible, and the turn of
/// one that is not goes to a random eligible one (not to its neighbour in the
/// list, which would double that neighbour's share, or a hundredfold when a whole
/// node's pods, adjacent in the sorted list, are out).
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// The next ticket. `fetch_add` wraps around at `usize::MAX`; the rotation
    /// then restarts at index 0, a single skipped turn every 2^64 requests.
    next: AtomicUsize,
    /// What the last pass over a long list found (see the module docs).
    pass: Mutex<Option<Pass>>,
}

/// How long the eligible backends one pass over a long list found stand in for
/// another pass: a pass at most a hundred times a second.
pub const PASS_REUSE: Duration = Duration::from_millis(10);

/// The eligible backends of a long list, as one pass found them.
#[derive(Debug)]
struct Pass {
    at: Instant,
    /// Which list it was made over, by address and length: a pick over the
    /// preferred set of a topology and one over the whole list each find
    /// their own, rather than read places of one in the other.
    list: (usize, usize),
    /// Their places in the list. Checked again at each pick: a list that
    /// changed since only makes a place name another backend, eligible or not.
    found: Vec<usize>,
}

impl RoundRobin {
    /// A round-robin balancer whose first pick is the first backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// A pick from a long list whose draws all missed: in turn among the
    /// eligible backends a recent pass found, else from a new pass. `None`
    /// when the pass found none, or none of what it found is eligible now
    /// (this request tried them, or they went down since: the next pass will
    /// tell).
    pub(crate) fn after_a_pass(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
    ) -> Option<SocketAddr> {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        self.after_a_pass_at(ticket, backends, eligible)
    }

    /// [`RoundRobin::after_a_pass`] with the pick's own `ticket`, so that the
    /// turns among what the pass found follow the round-robin ones.
    fn after_a_pass_at(
        &self,
        ticket: usize,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
    ) -> Option<SocketAddr> {
        let now = Instant::now();
        let list = (backends.as_ptr() as usize, backends.len());
        // A poisoned lock holds a whole pass or none: keep using it.
        let mut pass = self.pass.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(recent) = pass
            .as_ref()
            .filter(|p| p.list == list && now.saturating_duration_since(p.at) < PASS_REUSE)
        {
            let found = &recent.found;
            return (0..found.len().min(PROBES))
                .filter_map(|k| backends.get(found[(ticket + k) % found.len()]).copied())
                .find(|&addr| eligible(addr));
        }
        let found: Vec<usize> = (0..backends.len())
            .filter(|&i| eligible(backends[i]))
            .collect();
        let pick = found.get(ticket % found.len().max(1)).map(|&i| backends[i]);
        *pass = Some(Pass {
            at: now,
            list,
            found,
        });
        pick
    }
}

impl Balancer for RoundRobin {
    fn pick_among(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
        _in_flight: &dyn Fn(SocketAddr) -> u64,
    ) -> Result<SocketAddr, NoBackend> {
        if backends.len() > SCAN_LIMIT {
            // Relaxed is enough: the counter orders nothing but itself, and each
            // fetch_add still returns a distinct ticket.
            let ticket = self.next.fetch_add(1, Ordering::Relaxed);
            return backends
                .get(ticket % backends.len())
                .copied()
                .filter(|&addr| eligible(addr))
                .or_else(|| draw(backends, eligible))
                .or_else(|| self.after_a_pass_at(ticket, backends, eligible))
                .ok_or(NoBackend);
        }
        // One scan notes which backends are eligible, a bit each (the list is
        // at most `SCAN_LIMIT` long); the ticket then takes its turn among them.
        let mut eligible_set = 0u64;
        for (index, &addr) in backends.iter().enumerate() {
            if eligible(addr) {
                eligible_set |= 1 << index;
            }
        }
        let count = eligible_set.count_ones() as usize;
        if count == 0 {
            return Err(NoBackend);
        }
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        let mut left = eligible_set;
        for _ in 0..ticket % count {
            // Drops the lowest eligible backend.
            left &= left - 1;
        }
        backends
            .get(left.trailing_zeros() as usize)
            .copied()
            .ok_or(NoBackend)
    }
}

// The round-robin scan keeps one bit per backend in a `u64`.
const _: () = assert!(SCAN_LIMIT <= 64);

/// A random eligible backend, found in at most [`PROBES`] draws.
pub(crate) fn draw(
    backends: &[SocketAddr],
    eligible: &dyn Fn(SocketAddr) -> bool,
) -> Option<SocketAddr> {
    if backends.is_empty() {
        return None;
    }
    (0..PROBES)
        .filter_map(|_| backends.get(random_below(backends.len())).copied())
        .find(|&addr| eligible(addr))
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

    /// A request without a key, and no concurrency limit.
    fn none() -> PickContext {
        PickContext::default()
    }

    pub(super) fn count(picks: impl IntoIterator<Item = SocketAddr>) -> HashMap<SocketAddr, usize> {
        let mut counts = HashMap::new();
        for addr in picks {
            *counts.entry(addr).or_default() += 1;
        }
        counts
    }

    /// Asserts that the picks `counts` went to exactly `backends` backends,
    /// each picked a number of times within `each`.
    pub(super) fn assert_spread(
        counts: &HashMap<SocketAddr, usize>,
        backends: usize,
        each: std::ops::RangeInclusive<usize>,
    ) {
        assert_eq!(counts.len(), backends, "{counts:?}");
        assert!(counts.values().all(|c| each.contains(c)), "{counts:?}");
    }

    #[test]
    fn k_times_n_sequential_picks_give_each_backend_exactly_k() {
        for n in 1..=5 {
            let backends = addrs(n);
            let balancer = RoundRobin::new();
            let k = 7;
            let picks = (0..k * usize::from(n))
                .map(|_| balancer.pick(&backends).expect("list is not empty"));
            assert_spread(&count(picks), usize::from(n), k..=k);
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
            let pick = pick_for_attempt(&balancer, &backends, &available, &idle, &[], &none());
            assert_eq!(pick, Ok(backends[2]));
        }
    }

    #[test]
    fn with_none_available_all_are_used() {
        let backends = addrs(3);
        let balancer = RoundRobin::new();
        let picks = (0..6).map(|_| {
            pick_for_attempt(&balancer, &backends, &|_| false, &idle, &[], &none())
                .expect("panic mode picks")
        });
        assert!(count(picks).values().all(|&c| c == 2));
    }

    #[test]
    fn a_retry_avoids_the_backends_it_already_tried() {
        let backends = addrs(3);
        let balancer = RoundRobin::new();
        for _ in 0..6 {
            let pick = pick_for_attempt(
                &balancer,
                &backends,
                &|_| true,
                &idle,
                &backends[..2],
                &none(),
            );
            assert_eq!(pick, Ok(backends[2]));
        }
        // An untried but unavailable backend beats an available tried one.
        let pick = pick_for_attempt(
            &balancer,
            &backends,
            &|addr| addr != backends[2],
            &idle,
            &backends[..2],
            &none(),
        );
        assert_eq!(pick, Ok(backends[2]));
        // Everything tried: any backend rather than none.
        let only = &backends[..1];
        assert_eq!(
            pick_for_attempt(&balancer, only, &|_| true, &idle, only, &none()),
            Ok(backends[0])
        );
        assert_eq!(
            pick_for_attempt(&balancer, &[], &|_| true, &idle, &[], &none()),
            Err(NoBackend)
        );
    }

    /// Bound asserted: exact. The zone's two backends take every pick in
    /// turn while they are up; one down, the other takes them all; both down,
    /// the whole list does.
    #[test]
    fn the_nearest_set_takes_the_picks_and_widens_when_it_is_down() {
        let backends = addrs(5);
        let zone = [backends[1], backends[3]];
        let balancer = RoundRobin::new();
        let pick = |available: &dyn Fn(SocketAddr) -> bool| {
            pick_nearest_for_attempt(
                &balancer,
                &[&zone],
                &backends,
                available,
                &idle,
                &[],
                &none(),
            )
            .expect("some backend")
        };
        let picks = count((0..10).map(|_| pick(&|_| true)));
        assert_eq!(picks, HashMap::from([(zone[0], 5), (zone[1], 5)]));
        assert!((0..4).all(|_| pick(&|addr| addr != zone[0]) == zone[1]));
        let widened = count((0..9).map(|_| pick(&|addr| !zone.contains(&addr))));
        assert_eq!(widened.len(), 3, "{widened:?}");
        assert!(widened.keys().all(|addr| !zone.contains(addr)));
    }

    #[test]
    fn the_node_set_comes_before_the_zone_set_and_a_retry_moves_outward() {
        let backends = addrs(4);
        let (node, zone) = ([backends[2]], [backends[1], backends[2]]);
        let balancer = RoundRobin::new();
        let pick = |tried: &[SocketAddr]| {
            pick_nearest_for_attempt(
                &balancer,
                &[&node, &zone],
                &backends,
                &|_| true,
                &idle,
                tried,
                &none(),
            )
        };
        assert_eq!(pick(&[]), Ok(backends[2]));
        assert_eq!(pick(&[backends[2]]), Ok(backends[1]));
        let outside = pick(&[backends[1], backends[2]]).expect("picks");
        assert!([backends[0], backends[3]].contains(&outside), "{outside}");
        // No set at all: the plain pick.
        assert_eq!(
            pick_nearest_for_attempt(
                &balancer,
                &[],
                &backends[..1],
                &|_| true,
                &idle,
                &[],
                &none()
            ),
            Ok(backends[0])
        );
    }

    #[test]
    fn a_backend_at_its_concurrency_limit_is_skipped_even_in_panic_mode() {
        let backends = addrs(3);
        let balancer = RoundRobin::new();
        let limited = PickContext {
            max_in_flight: Some(2),
            ..PickContext::default()
        };
        let full = backends[0];
        let load = |addr: SocketAddr| if addr == full { 2 } else { 1 };
        let healthy: [&dyn Fn(SocketAddr) -> bool; 2] = [&|_| true, &|_| false];
        for available in healthy {
            for _ in 0..6 {
                let pick = pick_for_attempt(&balancer, &backends, available, &load, &[], &limited);
                assert!(pick.is_ok_and(|addr| addr != full), "{pick:?}");
            }
        }
        // Every one at the limit: no backend, however unhealthy the rest.
        let pick = pick_for_attempt(&balancer, &backends, &|_| false, &|_| 2, &[], &limited);
        assert_eq!(pick, Err(NoBackend));
        // Without a limit the same load is no obstacle.
        let pick = pick_for_attempt(&balancer, &backends, &|_| true, &|_| 2, &[], &none());
        assert!(pick.is_ok());
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

    /// Picks from 10,000 backends, counted in lookups (calls of `eligible` and
    /// `in_flight`, each a binary search in the proxy's list) rather than
    /// timed: see the module docs for the algorithms' costs, and the `scale`
    /// benchmark for the times.
    mod at_scale {
        use std::cell::Cell;
        use std::net::{Ipv4Addr, SocketAddr};

        use super::{assert_spread, count};
        use crate::balancer::{
            Balancer, LeastRequest, NoBackend, PASS_REUSE, PROBES, RoundRobin, WeightedRoundRobin,
            Weights,
        };

        const N: usize = 10_000;

        fn addrs(n: usize) -> Vec<SocketAddr> {
            let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
            (0..n)
                .map(|i| {
                    let i = u32::try_from(i).expect("fits");
                    SocketAddr::from((Ipv4Addr::from(base + i), 8080))
                })
                .collect()
        }

        /// `picks` picks by `balancer`; the average lookups per pick.
        fn lookups_per_pick(
            balancer: &dyn Balancer,
            backends: &[SocketAddr],
            eligible: impl Fn(SocketAddr) -> bool,
            picks: usize,
        ) -> f64 {
            let lookups = Cell::new(0usize);
            let eligible = |addr| {
                lookups.set(lookups.get() + 1);
                eligible(addr)
            };
            let in_flight = |_| {
                lookups.set(lookups.get() + 1);
                0
            };
            for _ in 0..picks {
                let pick = balancer
                    .pick_among(backends, &eligible, &in_flight)
                    .expect("some are eligible");
                assert!(eligible(pick), "{pick} is not eligible");
                lookups.set(lookups.get() - 1);
            }
            lookups.get() as f64 / picks as f64
        }

        fn algorithms() -> Vec<(&'static str, Box<dyn Balancer>)> {
            let canary = Weights::from_map([("10.0.0.7:8080", 5)]).expect("valid");
            vec![
                ("round_robin", Box::new(RoundRobin::new())),
                ("least_request", Box::new(LeastRequest::new())),
                (
                    "weighted_round_robin",
                    Box::new(WeightedRoundRobin::new(Weights::default())),
                ),
                (
                    "weighted_round_robin (a canary weighs 5)",
                    Box::new(WeightedRoundRobin::new(canary)),
                ),
            ]
        }

        /// Bound asserted: with every backend eligible, round-robin and
        /// unweighted weighted round-robin look up exactly the one backend they
        /// pick; least-request its two candidates (eligibility and load of
        /// each); the weighted draw only the backend it keeps.
        #[test]
        fn a_pick_among_10_000_backends_costs_a_constant_number_of_lookups() {
            let backends = addrs(N);
            for ((name, balancer), expected) in algorithms().iter().zip([1.0, 4.0, 1.0, 1.0]) {
                let cost = lookups_per_pick(&**balancer, &backends, |_| true, 10_000);
                assert_eq!(cost, expected, "{name}");
            }
        }

        /// Bound asserted: with one backend in ten out (spread over the list,
        /// or a run of 1,000 adjacent ones, a node's pods), a pick still costs
        /// a few lookups on average: each draw hits an eligible backend nine
        /// times in ten.
        #[test]
        fn ineligible_backends_cost_a_few_more_lookups_not_a_scan() {
            let backends = addrs(N);
            // Which backends are out, by their place in the list.
            type Out = fn(usize) -> bool;
            let outs: [(&str, Out); 2] = [
                ("every tenth", |i| i % 10 == 5),
                ("a run of 1,000", |i| (2_000..3_000).contains(&i)),
            ];
            let place = |a: SocketAddr| backends.binary_search(&a).expect("listed");
            for (out_name, out) in &outs {
                for (name, balancer) in algorithms() {
                    let cost = lookups_per_pick(&*balancer, &backends, |a| !out(place(a)), 10_000);
                    assert!(
                        cost < 6.0,
                        "{name}, {out_name} out: {cost} lookups per pick"
                    );
                }
            }
        }

        /// Bound asserted: exact, as over a short list. While every backend
        /// is eligible, round-robin over 10,000 still gives each one its turn.
        #[test]
        fn round_robin_over_10_000_is_exact_while_all_are_eligible() {
            let backends = addrs(N);
            let balancer = RoundRobin::new();
            let picks = (0..2 * N).map(|_| balancer.pick(&backends).expect("not empty"));
            assert_spread(&count(picks), N, 2..=2);
        }

        /// Bound asserted: exact. Picks that alternate between two long lists
        /// (a topology's preferred set and the whole list), each with one
        /// eligible backend that the draws rarely find, always find it: each
        /// list's pass is its own.
        #[test]
        fn passes_over_two_lists_do_not_mix() {
            let whole = addrs(N);
            let zone: Vec<SocketAddr> = whole.iter().step_by(10).copied().collect();
            let (in_zone, elsewhere) = (zone[7], whole[N - 3]);
            let balancer = RoundRobin::new();
            for _ in 0..50 {
                let near = balancer.pick_among(&zone, &|addr| addr == in_zone, &|_| 0);
                assert_eq!(near, Ok(in_zone));
                let far = balancer.pick_among(&whole, &|addr| addr == elsewhere, &|_| 0);
                assert_eq!(far, Ok(elsewhere));
            }
        }

        /// Bound asserted: the degraded case, no backend eligible, costs the
        /// draws (the weighted ones look up only the draws their weight keeps,
        /// a fifth of at most 80 here) and one pass over the list, and finds
        /// nothing; the picks after it, for the next 10 ms, only the draws.
        #[test]
        fn with_nothing_eligible_a_pass_serves_the_picks_of_the_next_10_ms() {
            let backends = addrs(N);
            for (name, balancer) in algorithms() {
                let lookups = Cell::new(0usize);
                let none = |_| {
                    lookups.set(lookups.get() + 1);
                    false
                };
                let started = std::time::Instant::now();
                assert_eq!(
                    balancer.pick_among(&backends, &none, &|_| 0),
                    Err(NoBackend)
                );
                assert!(
                    lookups.get() <= N + 1 + 5 * PROBES,
                    "{name}: {}",
                    lookups.get()
                );
                lookups.set(0);
                let mut picks = 0;
                while started.elapsed() < PASS_REUSE / 2 || picks == 0 {
                    assert_eq!(
                        balancer.pick_among(&backends, &none, &|_| 0),
                        Err(NoBackend)
                    );
                    picks += 1;
                }
                if started.elapsed() < PASS_REUSE {
                    let per_pick = lookups.get() / picks;
                    assert!(per_pick <= 1 + 5 * PROBES, "{name}: {per_pick}");
                }
            }
        }

        /// Bound asserted: 10 ± 5 picks each of 50. With five backends of
        /// 10,000 available, the draws miss (all but about one pick in 125,
        /// which goes to one of the five at random), and the picks take turns
        /// among the five a pass found.
        #[test]
        fn a_few_eligible_among_10_000_take_turns() {
            let backends = addrs(N);
            let up: Vec<SocketAddr> = [17, 2_000, 2_001, 7_777, 9_999]
                .iter()
                .map(|&i| backends[i])
                .collect();
            let balancer = RoundRobin::new();
            let picks = (0..50).map(|_| {
                balancer
                    .pick_among(&backends, &|a| up.contains(&a), &|_| 0)
                    .expect("five are eligible")
            });
            assert_spread(&count(picks), 5, 5..=15);
        }

        /// Bound asserted: ±20 % around 5 / 1,004 of the picks, more than six
        /// standard deviations (~22 picks) wide.
        #[test]
        fn a_weight_holds_among_a_thousand_backends() {
            let backends = addrs(1_000);
            let weights = Weights::from_map([("10.0.0.7:8080", 5)]).expect("valid");
            let balancer = WeightedRoundRobin::new(weights);
            let canary = backends[7];
            let picks = 100_000;
            let canary_picks = (0..picks)
                .filter(|_| balancer.pick(&backends) == Ok(canary))
                .count();
            let expected = picks as f64 * 5.0 / 1_004.0;
            assert!(
                (canary_picks as f64 - expected).abs() < expected * 0.2,
                "{canary_picks}, expected about {expected:.0}"
            );
        }

        #[test]
        fn least_request_at_scale_never_picks_the_busiest_while_others_are_idle() {
            let backends = addrs(N);
            let busy = backends[4_321];
            let balancer = LeastRequest::new();
            let load = |a: SocketAddr| u64::from(a == busy);
            for _ in 0..10_000 {
                let pick = balancer.pick_among(&backends, &|_| true, &load);
                assert_ne!(pick, Ok(busy));
            }
        }
    }
}
