//! The shared list of backend addresses: discovery writes it, the balancer reads it.
//!
//! This is the one piece of state that the two halves of the load balancer share.
//! It has one writer, by type: discovery holds the [`BackendsWriter`], which is not
//! `Clone`, and everything else (the balancer, health checks, metrics, the admin
//! endpoints) holds a [`Backends`], which can read and cannot write.
//! kube-runtime's `reflector::store()` hands out its `Writer` and `Store` the same
//! way. Discovery builds a complete new list off to the side and swaps it in with
//! one write, so a reader never sees half an update. Request handlers (many tasks)
//! take the read lock only long enough to pick an address and copy it out.
//!
//! The lock is a `std::sync::RwLock`, not tokio's: it is held for nanoseconds and
//! never across an `.await`, which is exactly the case where a blocking lock is the
//! right (and faster) choice.
//!
//! Beside the list sits one [`BackendState`] per address (counters, health,
//! ejection). `replace` keeps the two in step: states for new addresses exist
//! before the list that names them is published, and states of removed addresses
//! are dropped after.
//!
//! Every list discovery publishes also stamps the [`DiscoveryStatus`] carried here,
//! so the admin endpoints and metrics can tell how fresh the list is without
//! discovery having to report to them separately.

mod protocol;
mod status;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Instant, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use crate::backend_state::BackendState;
pub use protocol::{BackendProtocol, LearnedProtocols};
pub use status::{DiscoveryError, DiscoveryStatus, SourceKind};

/// The one handle that changes the list; see the module docs. Dropping it leaves
/// the list as it was.
#[derive(Debug, Default)]
pub struct BackendsWriter {
    /// The list it writes, shared with every reader.
    list: Backends,
}

impl BackendsWriter {
    /// An empty list that is not yet synced, and the handle that fills it.
    pub fn new() -> Self {
        Self::default()
    }

    /// A read handle on the list this writes.
    pub fn reader(&self) -> Backends {
        self.list.clone()
    }

    /// Publishes a complete new list in one write. Returns whether it differed from
    /// the old one, so callers can log changes and stay quiet otherwise.
    pub fn replace(&self, addrs: Vec<SocketAddr>) -> bool {
        self.list.replace(addrs)
    }

    /// Publishes what the EndpointSlices say the backend ports speak.
    pub fn set_protocols(&self, protocols: LearnedProtocols) {
        *write(&self.list.protocols) = protocols;
    }

    /// Records that discovery has delivered a complete list at least once.
    pub fn mark_synced(&self) {
        self.list.discovery.record_sync(false);
        self.list.synced.store(true, Ordering::Release);
    }

    /// Whether a complete list has been delivered at least once.
    pub fn is_synced(&self) -> bool {
        self.list.is_synced()
    }

    /// The current list.
    pub fn snapshot(&self) -> Vec<SocketAddr> {
        self.list.snapshot()
    }

    /// Where discovery records its source and its errors.
    pub fn discovery_status(&self) -> &DiscoveryStatus {
        &self.list.discovery
    }
}

/// A cheaply clonable read handle on the current backend addresses.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    /// The addresses requests may go to, sorted and without duplicates.
    addrs: Arc<RwLock<Vec<SocketAddr>>>,
    /// Set once discovery has delivered its first complete list, so `/readyz` can
    /// keep the load balancer out of rotation until it knows where to send traffic.
    synced: Arc<AtomicBool>,
    /// The runtime state of each address in `addrs`, shared with the proxy (counters),
    /// health checks and the admin endpoints. Sorted by address: the balancer looks
    /// a state up for every candidate of every pick, and a binary search over a
    /// handful of entries costs a few comparisons where a `HashMap` would SipHash
    /// the whole address each time.
    states: Arc<RwLock<StateTable>>,
    /// How discovery is doing: stamped by `replace` and `mark_synced`, read by the
    /// admin endpoints and metrics.
    discovery: Arc<DiscoveryStatus>,
    /// What the backend ports speak, as the EndpointSlices say.
    protocols: Arc<RwLock<LearnedProtocols>>,
}

impl Backends {
    /// A list fixed at `addrs` (sorted and de-duplicated), not synced, with no
    /// writer: for tests of the parts that read it.
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        let writer = BackendsWriter::new();
        writer.replace(addrs);
        writer.reader()
    }

    /// See [`BackendsWriter::replace`]; only the writer calls it.
    fn replace(&self, mut addrs: Vec<SocketAddr>) -> bool {
        addrs.sort_unstable();
        addrs.dedup();
        let changed = *read(&self.addrs) != addrs;
        self.discovery.record_sync(changed);
        if !changed {
            return false;
        }
        // Only discovery writes, from one task, so nothing can slip in between these
        // steps; the order only matters to readers: a published address always has
        // its state already.
        {
            let mut states = write(&self.states);
            for addr in &addrs {
                states.get_or_insert(*addr);
            }
        }
        *write(&self.addrs) = addrs;
        let addrs = read(&self.addrs);
        write(&self.states).retain(|addr| addrs.binary_search(addr).is_ok());
        true
    }

    /// The runtime state of `addr`. An address that was just removed from the list
    /// (a request racing a discovery update) gets a fresh state, which the next
    /// `replace` drops again, so the caller never has to handle a missing one.
    pub fn state(&self, addr: SocketAddr) -> Arc<BackendState> {
        if let Some(state) = read(&self.states).get(addr) {
            return Arc::clone(state);
        }
        Arc::clone(write(&self.states).get_or_insert(addr))
    }

    /// Every current address with its state, in list order: for health checks and
    /// the admin endpoints.
    pub fn states(&self) -> Vec<(SocketAddr, Arc<BackendState>)> {
        let addrs = self.snapshot();
        addrs
            .into_iter()
            .map(|addr| (addr, self.state(addr)))
            .collect()
    }

    /// A copy of the current list, for logging, admin pages and tests.
    pub fn snapshot(&self) -> Vec<SocketAddr> {
        read(&self.addrs).clone()
    }

    /// Runs `f` on the current list under the read lock, without copying it.
    ///
    /// `f` is a plain closure, not a future, so the guard cannot be held across an
    /// `.await` by construction.
    pub fn with<R>(&self, f: impl FnOnce(&[SocketAddr]) -> R) -> R {
        f(&read(&self.addrs))
    }

    /// Like [`Backends::with`], and `f` also gets whether each address is
    /// available at `now` ([`BackendState::is_available`]): what the balancer
    /// needs to skip unhealthy and ejected backends without copying anything.
    ///
    /// Lock order is list, then states; nothing takes the list while holding the
    /// states, so the two cannot deadlock.
    pub fn with_availability<R>(
        &self,
        now: Instant,
        f: impl FnOnce(&[SocketAddr], &dyn Fn(SocketAddr) -> bool) -> R,
    ) -> R {
        self.with_load_states(now, |addrs, available, _, _| f(addrs, available))
    }

    /// Like [`Backends::with_availability`], for a pick: `f` also gets each
    /// address's requests in flight ([`BackendState::in_flight`]), what
    /// load-aware balancing needs, with no copy and no allocation. `f` chooses an
    /// address, and it comes back with its state, found under the same locks. The
    /// proxy needs that state for outlier admission and the in-flight count of
    /// the attempt, and this saves it taking the locks again for it.
    pub fn pick_with_state<E>(
        &self,
        now: Instant,
        f: impl FnOnce(
            &[SocketAddr],
            &dyn Fn(SocketAddr) -> bool,
            &dyn Fn(SocketAddr) -> u64,
        ) -> Result<SocketAddr, E>,
    ) -> Result<(SocketAddr, Arc<BackendState>), E> {
        let (addr, state) = self.with_load_states(now, |addrs, available, in_flight, states| {
            f(addrs, available, in_flight).map(|addr| (addr, states.get(addr).cloned()))
        })?;
        // No state yet: `replace` is adding the address right now (or a racing
        // update just removed it); `state` handles both, off the read locks.
        Ok((addr, state.unwrap_or_else(|| self.state(addr))))
    }

    /// Takes the list and state locks (in that order) and runs `f` with the
    /// availability and in-flight lookups that [`Backends::pick_with_state`]
    /// promises, and the state table.
    fn with_load_states<R>(
        &self,
        now: Instant,
        f: impl FnOnce(
            &[SocketAddr],
            &dyn Fn(SocketAddr) -> bool,
            &dyn Fn(SocketAddr) -> u64,
            &StateTable,
        ) -> R,
    ) -> R {
        let addrs = read(&self.addrs);
        let states = read(&self.states);
        // An address without a state is one `replace` is adding right now: new
        // endpoints are available, and idle.
        let available = |addr| states.get(addr).is_none_or(|s| s.is_available(now));
        let in_flight = |addr| states.get(addr).map_or(0, |s| s.in_flight());
        f(&addrs, &available, &in_flight, &states)
    }

    /// Whether discovery has delivered a complete list at least once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// What discovery has done lately (source, updates, last sync, last error).
    pub fn discovery_status(&self) -> &DiscoveryStatus {
        &self.discovery
    }

    /// What the EndpointSlices say the backend ports speak.
    pub fn protocols(&self) -> LearnedProtocols {
        *read(&self.protocols)
    }
}

/// The list's metrics, computed from its state at each scrape: backends by state,
/// and discovery's updates and last sync. Registered by
/// [`Metrics::new`](crate::metrics::Metrics::new).
#[derive(Debug)]
pub struct BackendGauges {
    /// The list and per-backend states, and discovery's status beside them.
    backends: Backends,
}

impl Backends {
    /// The collector of this list's gauges.
    pub fn gauges(&self) -> BackendGauges {
        BackendGauges {
            backends: self.clone(),
        }
    }
}

impl Collector for BackendGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let now = Instant::now();
        let (mut known, mut ready, mut ejected) = (0i64, 0i64, 0i64);
        for (_, state) in self.backends.states() {
            known += 1;
            ready += i64::from(state.is_available(now));
            ejected += i64::from(state.ejected_until(now).is_some());
        }
        let mut family = encoder.encode_descriptor(
            "backends",
            "Backends by state: known (discovered), ready (healthy and not ejected, \
             so the balancer may pick them), ejected (by outlier detection).",
            None,
            MetricType::Gauge,
        )?;
        for (state, count) in [("known", known), ("ready", ready), ("ejected", ejected)] {
            ConstGauge::new(count).encode(family.encode_family(&[("state", state)])?)?;
        }

        let discovery = self.backends.discovery_status();
        ConstCounter::new(discovery.updates()).encode(encoder.encode_descriptor(
            "discovery_updates",
            "Backend lists published by discovery that differed from the previous one.",
            None,
            MetricType::Counter,
        )?)?;
        let last_sync = discovery.last_sync().map_or(0.0, |at| {
            at.duration_since(UNIX_EPOCH)
                .map_or(0.0, |since| since.as_secs_f64())
        });
        ConstGauge::new(last_sync).encode(encoder.encode_descriptor(
            "discovery_last_sync_timestamp",
            "Unix time when discovery last delivered a backend list (0: never).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)
    }
}

/// Each address's state, sorted by address (see the `states` field of [`Backends`]).
#[derive(Debug, Default)]
struct StateTable(Vec<(SocketAddr, Arc<BackendState>)>);

impl StateTable {
    fn get(&self, addr: SocketAddr) -> Option<&Arc<BackendState>> {
        let index = self.0.binary_search_by_key(&addr, |(a, _)| *a).ok()?;
        self.0.get(index).map(|(_, state)| state)
    }

    fn get_or_insert(&mut self, addr: SocketAddr) -> &Arc<BackendState> {
        let index = match self.0.binary_search_by_key(&addr, |(a, _)| *a) {
            Ok(index) => index,
            Err(index) => {
                self.0.insert(index, (addr, Arc::default()));
                index
            }
        };
        &self.0[index].1
    }

    fn retain(&mut self, keep: impl Fn(&SocketAddr) -> bool) {
        self.0.retain(|(addr, _)| keep(addr));
    }
}

// A poisoned lock means a writer panicked mid-update; what it guards is still valid
// (lists are swapped whole, states are inserted or removed whole), so keep serving it.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address parses")
    }

    #[test]
    fn new_list_is_sorted_and_deduplicated() {
        let backends = Backends::new(vec![
            addr("10.0.0.2:80"),
            addr("10.0.0.1:80"),
            addr("10.0.0.2:80"),
        ]);
        assert_eq!(
            backends.snapshot(),
            vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")]
        );
    }

    #[test]
    fn replace_reports_whether_the_list_changed() {
        let backends = Backends::new(vec![addr("10.0.0.1:80")]);
        assert!(!backends.replace(vec![addr("10.0.0.1:80")]));
        assert!(backends.replace(vec![addr("10.0.0.1:80"), addr("10.0.0.3:80")]));
        assert!(backends.replace(Vec::new()));
        assert!(backends.snapshot().is_empty());
    }

    #[test]
    fn readers_share_the_writers_list_and_sync_flag() {
        let writer = BackendsWriter::new();
        let reader = writer.reader().clone();
        assert!(!reader.is_synced());
        writer.replace(vec![addr("[::1]:8080")]);
        writer.mark_synced();
        assert_eq!(reader.snapshot(), vec![addr("[::1]:8080")]);
        assert!(reader.is_synced());
    }

    #[test]
    fn states_follow_the_list_and_survive_unchanged_addresses() {
        let backends = Backends::new(vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")]);
        let kept = backends.state(addr("10.0.0.1:80"));
        kept.start_request();
        backends.replace(vec![addr("10.0.0.1:80"), addr("10.0.0.3:80")]);
        let states = backends.states();
        let listed: Vec<SocketAddr> = states.iter().map(|(addr, _)| *addr).collect();
        assert_eq!(listed, vec![addr("10.0.0.1:80"), addr("10.0.0.3:80")]);
        assert!(
            Arc::ptr_eq(&states[0].1, &kept),
            "a kept address keeps its state"
        );
        assert_eq!(states[1].1.requests(), 0);
    }

    #[test]
    fn a_removed_address_loses_its_state() {
        let backends = Backends::new(vec![addr("10.0.0.1:80")]);
        backends.state(addr("10.0.0.1:80")).start_request();
        backends.replace(Vec::new());
        backends.replace(vec![addr("10.0.0.1:80")]);
        assert_eq!(backends.state(addr("10.0.0.1:80")).requests(), 0);
    }

    #[test]
    fn backend_gauges_are_read_from_the_states_at_scrape_time() {
        let backends = Backends::new(vec![
            addr("10.0.0.1:80"),
            addr("10.0.0.2:80"),
            addr("10.0.0.3:80"),
        ]);
        let metrics = crate::metrics::Metrics::new(backends.gauges());
        backends.state(addr("10.0.0.1:80")).set_healthy(false);
        backends
            .state(addr("10.0.0.2:80"))
            .eject_until(Instant::now() + std::time::Duration::from_secs(60));
        let text = metrics.encode();
        for line in [
            r#"loadbalancer_backends{state="known"} 3"#,
            r#"loadbalancer_backends{state="ready"} 1"#,
            r#"loadbalancer_backends{state="ejected"} 1"#,
            "loadbalancer_discovery_updates_total 1",
            r#"loadbalancer_build_info{version="0.1.0"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }

    /// The balancer picks under the list's read lock; these check that it
    /// stays exact and never sees a torn list while discovery writes.
    mod picks {
        use std::collections::HashMap;
        use std::sync::Arc;

        use super::*;
        use crate::balancer::{Balancer, RoundRobin};

        fn addrs(n: u16) -> Vec<SocketAddr> {
            (0..n)
                .map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i)))
                .collect()
        }

        fn count(picks: impl IntoIterator<Item = SocketAddr>) -> HashMap<SocketAddr, usize> {
            let mut counts = HashMap::new();
            for addr in picks {
                *counts.entry(addr).or_default() += 1;
            }
            counts
        }

        /// Bound asserted: exact. Each `fetch_add` hands out a distinct ticket, so
        /// 8 threads × 3 000 picks over 3 backends give each exactly 8 000, however
        /// the threads interleave.
        #[test]
        fn concurrent_picks_stay_exactly_balanced() {
            let backends = Backends::new(addrs(3));
            let balancer = Arc::new(RoundRobin::new());
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let (backends, balancer) = (backends.clone(), Arc::clone(&balancer));
                    std::thread::spawn(move || {
                        (0..3_000)
                            .map(|_| {
                                backends
                                    .with(|list| balancer.pick(list))
                                    .expect("list is not empty")
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let picks = threads
                .into_iter()
                .flat_map(|t| t.join().expect("picking thread does not panic"));
            let counts = count(picks);
            assert_eq!(counts.len(), 3);
            assert!(counts.values().all(|&c| c == 8_000), "{counts:?}");
        }

        #[test]
        fn list_shrinking_and_growing_while_picking_only_yields_current_members() {
            let universe = addrs(6);
            let list = BackendsWriter::new();
            list.replace(universe.clone());
            let backends = list.reader();
            let balancer = Arc::new(RoundRobin::new());
            let writer = {
                let universe = universe.clone();
                std::thread::spawn(move || {
                    for round in 0..2_000 {
                        // Lengths cycle 6, 5, .., 0, so pickers also meet the empty list.
                        let len = universe.len() - round % (universe.len() + 1);
                        list.replace(universe[..len].to_vec());
                    }
                })
            };
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    let (backends, balancer) = (backends.clone(), Arc::clone(&balancer));
                    std::thread::spawn(move || {
                        (0..20_000)
                            .map(|_| {
                                backends.with(|list| {
                                    balancer.pick(list).map(|addr| (addr, list.contains(&addr)))
                                })
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            writer.join().expect("writer does not panic");
            for reader in readers {
                // An empty list at the moment of the pick gives Err(NoBackend);
                // every successful pick must come from the list it saw.
                let picks = reader.join().expect("picker does not panic");
                for (addr, in_list) in picks.into_iter().flatten() {
                    assert!(in_list, "{addr} not in the list it was picked from");
                }
            }
        }
    }
}
