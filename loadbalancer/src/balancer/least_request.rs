//! Least-request balancing: the power of two random choices.
//!
//! Each pick draws two distinct eligible backends at random and sends the
//! request to the one with fewer requests in flight (Envoy's and Linkerd's
//! default). A slow backend holds its requests longer, so its in-flight count
//! stays higher and it loses most draws: it gets fewer requests without anyone
//! measuring its latency. Two random choices rather than "the least loaded of
//! all" because many load balancers (or many threads of one) reading the same
//! counters would otherwise all pile onto the same momentarily idle backend;
//! the random pair spreads them while still avoiding the busiest backend almost
//! always (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing").

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;

use super::{Balancer, NoBackend, RoundRobin, SCAN_LIMIT, draw};

/// Power-of-two-choices over requests in flight. Stateless apart from the
/// per-thread random generator, so concurrent picks never contend.
#[derive(Debug, Default)]
pub struct LeastRequest {
    /// Picks when there is nothing to draw from (fewer than two eligible
    /// backends, or from a long list when its draws miss), with the same
    /// empty-list and race handling as round-robin.
    fallback: RoundRobin,
}

impl LeastRequest {
    /// A least-request balancer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Balancer for LeastRequest {
    fn pick_among(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
        in_flight: &dyn Fn(SocketAddr) -> u64,
    ) -> Result<SocketAddr, NoBackend> {
        if backends.len() > SCAN_LIMIT {
            // Two random eligible backends, drawn rather than counted (see the
            // balancer's module docs). The second is drawn without the first,
            // so that with one eligible backend left the draw does not spend
            // its probes on finding it again.
            let Some(a) = draw(backends, eligible) else {
                return self
                    .fallback
                    .after_a_pass(backends, eligible)
                    .ok_or(NoBackend);
            };
            let Some(b) = draw(backends, &|addr| addr != a && eligible(addr)) else {
                return Ok(a);
            };
            return Ok(less_loaded(a, b, in_flight));
        }
        let count = backends.iter().filter(|&&addr| eligible(addr)).count();
        if count < 2 {
            // Nothing to compare: zero or one candidate.
            return self.fallback.pick_among(backends, eligible, in_flight);
        }
        // Two distinct indices into the eligible members: draw the second from
        // the remaining count - 1 and step over the first.
        let first = random_below(count);
        let mut second = random_below(count - 1);
        if second >= first {
            second += 1;
        }
        let nth = |n| backends.iter().copied().filter(|&a| eligible(a)).nth(n);
        // Eligibility is read from atomics that may flip between scans; then
        // fall back to plain round-robin over whatever is eligible now.
        let (Some(a), Some(b)) = (nth(first), nth(second)) else {
            return self.fallback.pick_among(backends, eligible, in_flight);
        };
        Ok(less_loaded(a, b, in_flight))
    }
}

/// Whichever of `a` and `b` has fewer requests in flight; a coin decides a tie.
fn less_loaded(a: SocketAddr, b: SocketAddr, in_flight: &dyn Fn(SocketAddr) -> u64) -> SocketAddr {
    match in_flight(a).cmp(&in_flight(b)) {
        std::cmp::Ordering::Less => a,
        std::cmp::Ordering::Greater => b,
        std::cmp::Ordering::Equal => {
            if random_below(2) == 0 {
                a
            } else {
                b
            }
        }
    }
}

thread_local! {
    /// xorshift64* state, one per thread so picks never share a cache line.
    /// Seeded from std's per-process random hasher keys (no crate needed): the
    /// numbers only need to be unpredictable enough not to synchronise threads,
    /// not to be cryptographically strong.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0x9e37_79b9_7f4a_7c15);
    // xorshift has one forbidden state: all zeros.
    hasher.finish() | 1
}

/// A uniform-enough random number in `0..n` (`n > 0`), from a generator of
/// this thread's own. The modulo bias is below
/// n / 2^64, far under anything a balancer could notice.
pub(crate) fn random_below(n: usize) -> usize {
    let x = RNG.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    });
    // usize is at most 64 bits on every target we build for.
    (x % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::tests::{addrs, assert_spread, count};

    #[test]
    fn the_most_loaded_backend_is_never_picked_while_others_are_lighter() {
        let backends = addrs(3);
        let busy = backends[1];
        let load = |addr: SocketAddr| if addr == busy { 10 } else { 0 };
        let balancer = LeastRequest::new();
        for _ in 0..1_000 {
            let pick = balancer
                .pick_among(&backends, &|_| true, &load)
                .expect("list is not empty");
            // Any pair it draws contains at least one idle backend.
            assert_ne!(pick, busy);
        }
    }

    #[test]
    fn the_least_loaded_backend_wins_every_draw_it_is_in() {
        let backends = addrs(4);
        let idle = backends[3];
        let load = |addr: SocketAddr| if addr == idle { 0 } else { 5 };
        let balancer = LeastRequest::new();
        let idle_picks = (0..4_000)
            .filter(|_| balancer.pick_among(&backends, &|_| true, &load) == Ok(idle))
            .count();
        // It is in a pair with probability 2/4 = 1/2, so ~2 000 of 4 000 picks;
        // the bounds are ±25 %, many standard deviations (~32) wide.
        assert!((1_500..=2_500).contains(&idle_picks), "{idle_picks}");
    }

    #[test]
    fn equal_loads_spread_picks_over_every_backend() {
        let backends = addrs(3);
        let balancer = LeastRequest::new();
        let counts = count((0..3_000).map(|_| {
            balancer
                .pick_among(&backends, &|_| true, &|_| 0)
                .expect("list is not empty")
        }));
        // ~1 000 each; a stuck generator would give one backend all of them.
        assert_spread(&counts, 3, 700..=1_300);
    }

    #[test]
    fn ineligible_backends_are_never_picked_however_idle() {
        let backends = addrs(4);
        let down = backends[0];
        let load = |addr: SocketAddr| if addr == down { 0 } else { 3 };
        let balancer = LeastRequest::new();
        for _ in 0..500 {
            let pick = balancer.pick_among(&backends, &|a| a != down, &load);
            assert!(matches!(pick, Ok(a) if a != down), "{pick:?}");
        }
    }

    #[test]
    fn one_or_no_eligible_backend_needs_no_draw() {
        let backends = addrs(3);
        let only = backends[2];
        let balancer = LeastRequest::new();
        assert_eq!(
            balancer.pick_among(&backends, &|a| a == only, &|_| 0),
            Ok(only)
        );
        assert_eq!(
            balancer.pick_among(&backends, &|_| false, &|_| 0),
            Err(NoBackend)
        );
        assert_eq!(balancer.pick(&[]), Err(NoBackend));
    }

    #[test]
    fn random_numbers_stay_below_their_bound() {
        for n in 1..50 {
            for _ in 0..100 {
                assert!(random_below(n) < n);
            }
        }
    }
}
