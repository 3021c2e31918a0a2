//! Weighted round-robin: nginx's "smooth" algorithm, for canaries and for
//! backends of unequal size.
//!
//! Every backend has a configured weight (`weights` in the config, by `IP:port`
//! or by IP, default 1) and a running `current` score. Each pick adds every
//! eligible backend's weight to its score, takes the backend with the highest
//! score, and subtracts the total weight from the winner. Over one cycle of
//! `total` picks each backend is chosen exactly `weight` times, and the picks
//! are interleaved: weights 5, 1, 1 give `a a b a c a a`, never a burst of five
//! (nginx commit 52327e0627f4, "smooth weighted round-robin").
//!
//! The scores are state shared by all requests, so they sit behind a mutex held
//! only for the few additions of one pick, never across an `.await`. They are
//! rebuilt (scores back to zero) whenever the backend list differs from the one
//! they were built for.
//!
//! That is O(n) per pick, and so is noticing that the list changed. Above
//! [`SCAN_LIMIT`] backends picks therefore sample instead, with no state: with no
//! weights configured, every backend weighs 1 and the pick is [`RoundRobin`]'s;
//! otherwise a backend is drawn at random and kept with probability
//! `weight / heaviest weight` (rejection sampling), else drawn again. Each
//! backend's share is then its weight over the total, as in the smooth
//! algorithm, in expectation rather than exactly per cycle, and a pick costs
//! `heaviest / mean weight` draws on average whatever the list's length: five
//! for a canary weighted 5 among thousands of 1s. Draws stop after
//! [`PROBES`] times the heaviest weight (at most 1,024); then the pick
//! is round-robin's after a pass (see the balancer's module docs), weights
//! aside.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Balancer, NoBackend, PROBES, RoundRobin, SCAN_LIMIT, random_below};

/// Configured weights: an exact `IP:port` entry wins over an IP entry, which
/// wins over the default of 1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Weights {
    /// Weights keyed by one backend address.
    by_addr: BTreeMap<SocketAddr, u32>,
    /// Weights for every port of one host (a node or pod IP).
    by_ip: BTreeMap<IpAddr, u32>,
}

/// A `weights` entry that cannot be used; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    #[error("key {0:?} is not an IP or IP:port")]
    Key(String),
    #[error("weight of {0:?} must be at least 1")]
    Zero(String),
}

impl Weights {
    /// Parses `{"10.0.0.1:8080": 5, "10.0.0.2": 2}`.
    pub fn from_map<'a>(
        entries: impl IntoIterator<Item = (&'a str, u32)>,
    ) -> Result<Self, WeightError> {
        let mut weights = Self::default();
        for (key, weight) in entries {
            if weight == 0 {
                return Err(WeightError::Zero(key.to_owned()));
            }
            let key = key.trim();
            if let Ok(addr) = key.parse::<SocketAddr>() {
                weights.by_addr.insert(addr, weight);
            } else if let Ok(ip) = key.parse::<IpAddr>() {
                weights.by_ip.insert(ip, weight);
            } else {
                return Err(WeightError::Key(key.to_owned()));
            }
        }
        Ok(weights)
    }

    /// The heaviest configured weight, or 1 with none configured.
    pub fn heaviest(&self) -> u32 {
        self.by_addr
            .values()
            .chain(self.by_ip.values())
            .copied()
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// Whether any weight is configured (else every backend weighs 1).
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty() && self.by_ip.is_empty()
    }

    /// The weight of `addr`.
    pub fn of(&self, addr: SocketAddr) -> u32 {
        self.by_addr
            .get(&addr)
            .or_else(|| self.by_ip.get(&addr.ip()))
            .copied()
            .unwrap_or(1)
    }
}

impl<'de> Deserialize<'de> for Weights {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, u32>::deserialize(de)?;
        Self::from_map(map.iter().map(|(k, &v)| (k.as_str(), v))).map_err(serde::de::Error::custom)
    }
}

/// Written back as the file spells it, so a reload can tell which keys changed.
impl Serialize for Weights {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let by_addr = self.by_addr.iter().map(|(addr, &w)| (addr.to_string(), w));
        let by_ip = self.by_ip.iter().map(|(ip, &w)| (ip.to_string(), w));
        ser.collect_map(by_addr.chain(by_ip))
    }
}

/// Draws a sampled pick makes at most, however heavy the heaviest weight.
const MAX_DRAWS: usize = 1024;

/// Smooth weighted round-robin over the current list.
#[derive(Debug, Default)]
pub struct WeightedRoundRobin {
    /// Where each weight comes from; fixed for the balancer's life (a reload
    /// builds a new balancer).
    weights: Weights,
    /// `weights.heaviest()`, for the sampled picks.
    heaviest: u32,
    /// The running scores, for the list they were built for.
    state: Mutex<Scores>,
    /// Long lists with no weights configured, where every backend weighs 1,
    /// and those whose draws miss.
    unweighted: RoundRobin,
}

/// The per-backend scores of the smooth algorithm.
#[derive(Debug, Default)]
struct Scores {
    /// The list these scores belong to, to notice when discovery changed it.
    backends: Vec<SocketAddr>,
    /// Each backend's weight, looked up once per list rather than per pick.
    weights: Vec<i64>,
    /// nginx's `current_weight`, per backend, same order as `backends`.
    current: Vec<i64>,
}

impl WeightedRoundRobin {
    /// A balancer using `weights`.
    pub fn new(weights: Weights) -> Self {
        Self {
            heaviest: weights.heaviest(),
            weights,
            state: Mutex::default(),
            unweighted: RoundRobin::new(),
        }
    }

    /// A pick from a long list: see the module docs.
    fn sample(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
    ) -> Result<SocketAddr, NoBackend> {
        if self.weights.is_empty() {
            return self.unweighted.pick_among(backends, eligible, &|_| 0);
        }
        let heaviest = usize::try_from(self.heaviest).unwrap_or(usize::MAX);
        let draws = PROBES.saturating_mul(heaviest).min(MAX_DRAWS);
        (0..draws)
            .filter_map(|_| backends.get(random_below(backends.len())).copied())
            .find(|&addr| {
                let weight = usize::try_from(self.weights.of(addr)).unwrap_or(usize::MAX);
                random_below(heaviest) < weight && eligible(addr)
            })
            .or_else(|| self.unweighted.after_a_pass(backends, eligible))
            .ok_or(NoBackend)
    }

    fn scores(&self) -> MutexGuard<'_, Scores> {
        // A panic mid-pick leaves scores that are merely unbalanced, never
        // invalid: keep using them.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Balancer for WeightedRoundRobin {
    fn pick_among(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
        _in_flight: &dyn Fn(SocketAddr) -> u64,
    ) -> Result<SocketAddr, NoBackend> {
        if backends.len() > SCAN_LIMIT {
            return self.sample(backends, eligible);
        }
        let mut scores = self.scores();
        if scores.backends != backends {
            // Discovery changed the list: start a fresh cycle. This allocates,
            // but only once per list change, not per pick.
            scores.backends = backends.to_vec();
            scores.weights = backends
                .iter()
                .map(|&addr| i64::from(self.weights.of(addr)))
                .collect();
            scores.current = vec![0; backends.len()];
        }
        let Scores {
            backends,
            weights,
            current,
        } = &mut *scores;
        // Ineligible backends neither gain score nor count in the total, as in
        // nginx, so the eligible ones keep their exact ratios among themselves.
        let mut total = 0;
        let mut best: Option<usize> = None;
        for (i, &addr) in backends.iter().enumerate() {
            if !eligible(addr) {
                continue;
            }
            current[i] += weights[i];
            total += weights[i];
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best.ok_or(NoBackend)?;
        current[best] -= total;
        Ok(backends[best])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::tests::addrs;

    fn five_one_one(backends: &[SocketAddr]) -> WeightedRoundRobin {
        let key = backends[0].to_string();
        WeightedRoundRobin::new(Weights::from_map([(key.as_str(), 5)]).expect("valid weights"))
    }

    #[test]
    fn weights_five_one_one_follow_the_nginx_sequence() {
        let backends = addrs(3);
        let balancer = five_one_one(&backends);
        let [a, b, c] = [backends[0], backends[1], backends[2]];
        let picks: Vec<_> = (0..14)
            .map(|_| balancer.pick(&backends).expect("list is not empty"))
            .collect();
        let cycle = [a, a, b, a, c, a, a];
        assert_eq!(picks, [cycle, cycle].concat());
    }

    #[test]
    fn each_cycle_gives_each_backend_exactly_its_weight() {
        let backends = addrs(4);
        let weights = Weights::from_map([
            (backends[0].to_string().as_str(), 3),
            (backends[1].to_string().as_str(), 7),
            ("10.0.0.1", 2),
        ])
        .expect("valid weights");
        let balancer = WeightedRoundRobin::new(weights);
        // Weights 3, 7, 2, 2: a cycle is 14 picks.
        let mut counts = [0; 4];
        for _ in 0..14 * 5 {
            let pick = balancer.pick(&backends).expect("list is not empty");
            let i = backends.iter().position(|&a| a == pick).expect("a member");
            counts[i] += 1;
        }
        assert_eq!(counts, [15, 35, 10, 10]);
    }

    #[test]
    fn ineligible_backends_are_skipped_and_the_rest_keep_their_ratio() {
        let backends = addrs(3);
        let balancer = five_one_one(&backends);
        let down = backends[1];
        let mut counts = [0; 3];
        for _ in 0..60 {
            let pick = balancer
                .pick_among(&backends, &|a| a != down, &|_| 0)
                .expect("two are eligible");
            counts[backends.iter().position(|&a| a == pick).expect("a member")] += 1;
        }
        assert_eq!(counts, [50, 0, 10]);
    }

    #[test]
    fn a_changed_list_restarts_the_cycle_over_the_new_members() {
        let backends = addrs(3);
        let balancer = five_one_one(&backends);
        balancer.pick(&backends).expect("list is not empty");
        let shorter = &backends[1..];
        let picks: Vec<_> = (0..4)
            .map(|_| balancer.pick(shorter).expect("list is not empty"))
            .collect();
        assert_eq!(picks, [shorter[0], shorter[1], shorter[0], shorter[1]]);
        assert_eq!(balancer.pick(&[]), Err(NoBackend));
    }

    #[test]
    fn an_address_weight_beats_an_ip_weight_which_beats_the_default() {
        let weights = Weights::from_map([("10.0.0.1:80", 4), ("10.0.0.1", 2)]).expect("valid");
        let at = |s: &str| s.parse::<SocketAddr>().expect("valid");
        assert_eq!(weights.of(at("10.0.0.1:80")), 4);
        assert_eq!(weights.of(at("10.0.0.1:81")), 2);
        assert_eq!(weights.of(at("10.0.0.2:80")), 1);
    }

    #[test]
    fn bad_weights_are_rejected_naming_the_key() {
        assert_eq!(
            Weights::from_map([("backend-1:80", 2)]),
            Err(WeightError::Key("backend-1:80".to_owned()))
        );
        assert_eq!(
            Weights::from_map([("10.0.0.1", 0)]),
            Err(WeightError::Zero("10.0.0.1".to_owned()))
        );
    }
}
