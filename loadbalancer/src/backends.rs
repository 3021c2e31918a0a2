//! The shared list of backend addresses: discovery writes it, the balancer reads it.
//!
//! This is the one piece of state that the two halves of the load balancer share.
//! It has one writer, by type: discovery holds the [`BackendsWriter`], which is not
//! `Clone`, and everything else (the balancer, health checks, metrics, the admin
//! endpoints) holds a [`Backends`], which can read and cannot write.
//! kube-runtime's `reflector::store()` hands out its `Writer` and `Store` the same
//! way. Each change is made under one write lock, so a reader never sees half an
//! update. Request handlers (many tasks) take the read lock only long enough to
//! pick an address and copy it out.
//!
//! The lock is a `std::sync::RwLock`, not tokio's: it is held for nanoseconds and
//! never across an `.await`, which is exactly the case where a blocking lock is the
//! right (and faster) choice.
//!
//! Beside each address sits its [`BackendState`] (counters, health, ejection), in
//! the same table under the same lock: `addrs[i]` is described by `states[i]`.
//! A change costs work in proportion to what changed, not to the list:
//! [`BackendsWriter::change`] inserts and removes the given addresses (a binary
//! search and a move of the tail each, microseconds at 10,000 backends), creates
//! states for the added ones, drops those of the removed ones, and leaves every
//! other state alone, in-flight counts, outlier history and health verdicts
//! included. [`BackendsWriter::replace`] publishes a whole new list (a static
//! source, a re-list) with one merge of old and new, keeping the states of the
//! addresses in both.
//!
//! Every list discovery publishes also stamps the [`DiscoveryStatus`] carried here,
//! so the admin endpoints and metrics can tell how fresh the list is without
//! discovery having to report to them separately.

mod protocol;
mod status;

use std::cell::Cell;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Instant, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use crate::backend_state::BackendState;
use crate::concurrency::Queue;
use crate::topology::{Place, TopologyStatus};
pub use protocol::{BackendProtocol, LearnedProtocols};
pub use status::{DiscoveryError, DiscoveryStatus, SourceKind};

/// Above this many addresses changed at once, [`BackendsWriter::change`] merges
/// the whole list once instead of moving its tail for each address: at 10,000
/// backends one move of the tail costs about what a merge costs per 8 addresses.
const MERGE_ABOVE: usize = 8;

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

    /// Adds `added` to the list and takes `removed` out of it, in one write, at a
    /// cost in proportion to the two (see the module docs). Addresses already in
    /// the list (added) or not in it (removed) are left as they are. Returns
    /// whether the list changed.
    pub fn change(&self, added: &[SocketAddr], removed: &[SocketAddr]) -> bool {
        self.list.change(added, removed)
    }

    /// Publishes which backends the routing prefers and where each runs, in
    /// one write, after the [`change`](Self::change) or
    /// [`replace`](Self::replace) that listed them. The preferred sets change
    /// by delta as the list does, so a slice's change still costs in
    /// proportion to the slice.
    pub fn set_topology(&self, update: TopologyUpdate) {
        self.list.set_topology(update);
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
    /// The addresses requests may go to and the runtime state of each, shared
    /// with the proxy (counters), health checks and the admin endpoints.
    table: Arc<RwLock<Table>>,
    /// Set once discovery has delivered its first complete list, so `/readyz` can
    /// keep the load balancer out of rotation until it knows where to send traffic.
    synced: Arc<AtomicBool>,
    /// How discovery is doing: stamped by `replace`, `change` and `mark_synced`,
    /// read by the admin endpoints and metrics.
    discovery: Arc<DiscoveryStatus>,
    /// What the backend ports speak, as the EndpointSlices say.
    protocols: Arc<RwLock<LearnedProtocols>>,
    /// Incremented, under the write lock, by every change of the list: what
    /// an algorithm that builds something from the list (a hash table) keys
    /// it on, so it builds once per change rather than once per pick.
    generation: Arc<AtomicU64>,
    /// The requests waiting for a backend of this list to have room under a
    /// concurrency limit; shared by every worker's proxy.
    queue: Arc<Queue>,
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
        let changed = {
            let mut table = write(&self.table);
            let changed = table.addrs != addrs && {
                table.rebuild(addrs);
                true
            };
            self.count_change(changed);
            changed
        };
        self.discovery.record_sync(changed);
        changed
    }

    /// Moves to the next generation if the list `changed`; called with the
    /// write lock held, so a reader sees a generation and its list together.
    fn count_change(&self, changed: bool) {
        if changed {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// See [`BackendsWriter::change`]; only the writer calls it.
    fn change(&self, added: &[SocketAddr], removed: &[SocketAddr]) -> bool {
        let changed = {
            let mut table = write(&self.table);
            let changed = table.change(added, removed);
            self.count_change(changed);
            changed
        };
        self.discovery.record_sync(changed);
        changed
    }

    /// See [`BackendsWriter::set_topology`]; only the writer calls it.
    fn set_topology(&self, update: TopologyUpdate) {
        let mut table = write(&self.table);
        let TopologyUpdate {
            for_node,
            for_zone,
            prefer_node,
            prefer_zone,
            places,
            status,
        } = update;
        let near = &mut table.near;
        for_node.apply(&mut near.for_node);
        for_zone.apply(&mut near.for_zone);
        (near.prefer_node, near.prefer_zone) = (prefer_node, prefer_zone);
        let hint = Cell::new(0);
        for (addr, place) in places {
            if let Some(state) = table.get(addr, &hint) {
                state.set_place(place);
            }
        }
        table.topology = status;
    }

    /// Which version of the list is current; see the `generation` field. Read
    /// inside [`Backends::pick_with_state`]'s closure, it names the list the
    /// closure sees.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The requests waiting for room under a concurrency limit.
    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    /// The runtime state of `addr`. An address that is not in the list (a request
    /// racing a discovery update that removed it) gets a fresh state of its own,
    /// kept nowhere, so the caller never has to handle a missing one.
    pub fn state(&self, addr: SocketAddr) -> Arc<BackendState> {
        read(&self.table)
            .get(addr, &Cell::new(0))
            .cloned()
            .unwrap_or_default()
    }

    /// Every current address with its state, in list order: for health checks and
    /// the admin endpoints.
    pub fn states(&self) -> Vec<(SocketAddr, Arc<BackendState>)> {
        let table = read(&self.table);
        table
            .addrs
            .iter()
            .copied()
            .zip(table.states.iter().cloned())
            .collect()
    }

    /// Whether `addr` is in the list with `state` as its state right now, i.e. it
    /// has not been removed (and perhaps added again, with a new state) since
    /// `state` was read.
    pub fn is_current(&self, addr: SocketAddr, state: &Arc<BackendState>) -> bool {
        read(&self.table)
            .get(addr, &Cell::new(0))
            .is_some_and(|current| Arc::ptr_eq(current, state))
    }

    /// A copy of the current list, for logging, admin pages and tests.
    pub fn snapshot(&self) -> Vec<SocketAddr> {
        read(&self.table).addrs.clone()
    }

    /// Runs `f` on the current list under the read lock, without copying it.
    ///
    /// `f` is a plain closure, not a future, so the guard cannot be held across an
    /// `.await` by construction.
    pub fn with<R>(&self, f: impl FnOnce(&[SocketAddr]) -> R) -> R {
        f(&read(&self.table).addrs)
    }

    /// Like [`Backends::with`], and `f` also gets whether each address is
    /// available at `now` ([`BackendState::is_available`]): what the balancer
    /// needs to skip unhealthy and ejected backends without copying anything.
    pub fn with_availability<R>(
        &self,
        now: Instant,
        f: impl FnOnce(&[SocketAddr], &dyn Fn(SocketAddr) -> bool) -> R,
    ) -> R {
        self.with_load_states(now, |_, addrs, available, _, _| f(addrs, available))
    }

    /// Like [`Backends::with_availability`], for a pick: `f` also gets the
    /// preferred backends, nearest first (see [`TopologyUpdate`]; none while
    /// topology is off), and each address's requests in flight
    /// ([`BackendState::in_flight`]), what load-aware balancing needs, with no
    /// copy and no allocation. `f` chooses an
    /// address, and it comes back with its state, found under the same lock. The
    /// proxy needs that state for outlier admission and the in-flight count of
    /// the attempt, and this saves it taking the lock again for it.
    pub fn pick_with_state<E>(
        &self,
        now: Instant,
        f: impl FnOnce(
            &[&[SocketAddr]],
            &[SocketAddr],
            &dyn Fn(SocketAddr) -> bool,
            &dyn Fn(SocketAddr) -> u64,
        ) -> Result<SocketAddr, E>,
    ) -> Result<(SocketAddr, Arc<BackendState>), E> {
        let (addr, state) =
            self.with_load_states(now, |near, addrs, available, in_flight, state| {
                f(near, addrs, available, in_flight).map(|addr| (addr, state(addr)))
            })?;
        // Only a balancer that answered with an address from outside the list
        // can get here without a state; it gets a fresh one, as from `state`.
        Ok((addr, state.unwrap_or_default()))
    }

    /// Takes the read lock and runs `f` with the availability and in-flight
    /// lookups that [`Backends::pick_with_state`] promises, and a lookup of the
    /// state itself.
    ///
    /// Each lookup is a binary search over the list, except that it first tries
    /// where the previous one landed and the place after it: a scan over the list
    /// in order (a round-robin count, a pick among a few backends) then costs one
    /// comparison per address, and the state of the address just chosen is found
    /// at once.
    fn with_load_states<R>(
        &self,
        now: Instant,
        f: impl FnOnce(
            &[&[SocketAddr]],
            &[SocketAddr],
            &dyn Fn(SocketAddr) -> bool,
            &dyn Fn(SocketAddr) -> u64,
            &dyn Fn(SocketAddr) -> Option<Arc<BackendState>>,
        ) -> R,
    ) -> R {
        let table = read(&self.table);
        let hint = Cell::new(0);
        let available = |addr| table.get(addr, &hint).is_none_or(|s| s.is_available(now));
        let in_flight = |addr| table.get(addr, &hint).map_or(0, |s| s.in_flight());
        let state = |addr| table.get(addr, &hint).cloned();
        let (tiers, preferred) = table.near.tiers();
        f(
            &tiers[..preferred],
            &table.addrs,
            &available,
            &in_flight,
            &state,
        )
    }

    /// The topology the routing follows now, for the admin endpoints.
    pub fn topology(&self) -> TopologyStatus {
        read(&self.table).topology.clone()
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
        let waiting = i64::try_from(self.backends.queue().len()).unwrap_or(i64::MAX);
        ConstGauge::new(waiting).encode(encoder.encode_descriptor(
            "queue_length",
            "Requests waiting now for a backend below maxRequestsPerBackend.",
            None,
            MetricType::Gauge,
        )?)?;

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

/// The list and the state of each address (see the `table` field of [`Backends`]).
#[derive(Debug, Default)]
struct Table {
    /// The addresses requests may go to, sorted and without duplicates.
    addrs: Vec<SocketAddr>,
    /// `states[i]` is the state of `addrs[i]`. Two vectors rather than one of
    /// pairs: the balancer and every lookup search `addrs`, and packed tight they
    /// take half the cache lines.
    states: Vec<Arc<BackendState>>,
    /// The backends the routing prefers, kept sorted as `addrs` is.
    near: Near,
    /// Why `near` prefers what it does, for the admin endpoints.
    topology: TopologyStatus,
}

/// The preferred subsets of the list: the backends whose EndpointSlice hints
/// name this replica's Node, and those that name its zone. Discovery keeps
/// both current whether or not they are in use, so that switching topology on
/// or off (an endpoint losing its hint, the Service changing) costs nothing
/// but the two flags.
#[derive(Debug, Default)]
struct Near {
    /// Hinted for this replica's Node, sorted.
    for_node: Vec<SocketAddr>,
    /// Hinted for this replica's zone, sorted.
    for_zone: Vec<SocketAddr>,
    /// Whether picks try `for_node` first.
    prefer_node: bool,
    /// Whether picks try `for_zone` first (after `for_node`, if that is tried).
    prefer_zone: bool,
}

impl Near {
    /// The sets a pick tries before the whole list, nearest first: the first
    /// `n` of the array. An array, so that a pick allocates nothing.
    fn tiers(&self) -> ([&[SocketAddr]; 2], usize) {
        let mut tiers: [&[SocketAddr]; 2] = [&[], &[]];
        let mut n = 0;
        for (prefer, set) in [
            (self.prefer_node, &self.for_node),
            (self.prefer_zone, &self.for_zone),
        ] {
            if prefer {
                tiers[n] = set;
                n += 1;
            }
        }
        (tiers, n)
    }
}

/// How one of the preferred sets changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetChange {
    /// These addresses join the set, those leave it.
    Delta {
        added: Vec<SocketAddr>,
        removed: Vec<SocketAddr>,
    },
    /// The set is now this one (any order).
    Whole(Vec<SocketAddr>),
}

impl Default for SetChange {
    fn default() -> Self {
        SetChange::Delta {
            added: Vec::new(),
            removed: Vec::new(),
        }
    }
}

impl SetChange {
    /// Applies the change to `set` (sorted, without duplicates).
    fn apply(self, set: &mut Vec<SocketAddr>) {
        match self {
            SetChange::Whole(mut addrs) => {
                addrs.sort_unstable();
                addrs.dedup();
                *set = addrs;
            }
            SetChange::Delta { added, removed } if added.len() + removed.len() > MERGE_ABOVE => {
                *set = merged(set, &added, &removed);
            }
            // A few addresses: a binary search and a move of the tail each,
            // as for the list itself.
            SetChange::Delta { added, removed } => {
                for addr in removed {
                    if let Ok(index) = set.binary_search(&addr) {
                        set.remove(index);
                    }
                }
                for addr in added {
                    if let Err(index) = set.binary_search(&addr) {
                        set.insert(index, addr);
                    }
                }
            }
        }
    }
}

/// What discovery publishes about topology with each change of the list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyUpdate {
    /// The backends hinted for this replica's Node.
    pub for_node: SetChange,
    /// The backends hinted for this replica's zone.
    pub for_zone: SetChange,
    /// Whether picks prefer those hinted for the Node.
    pub prefer_node: bool,
    /// Whether picks prefer those hinted for the zone.
    pub prefer_zone: bool,
    /// Where these backends run (those of the slice that changed, or all).
    pub places: Vec<(SocketAddr, Arc<Place>)>,
    /// What is in use and why.
    pub status: TopologyStatus,
}

/// `list` (sorted, without duplicates) less `removed`, plus `added`: one pass
/// and one sort, whatever the size of the change.
fn merged(list: &[SocketAddr], added: &[SocketAddr], removed: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut removed = removed.to_vec();
    removed.sort_unstable();
    let mut addrs: Vec<SocketAddr> = list
        .iter()
        .filter(|addr| removed.binary_search(addr).is_err())
        .chain(added)
        .copied()
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

impl Table {
    /// The state of `addr`, looked up as [`Backends::with_load_states`] describes;
    /// `hint` is where the previous lookup landed.
    fn get(&self, addr: SocketAddr, hint: &Cell<usize>) -> Option<&Arc<BackendState>> {
        let guess = hint.get();
        let index = if self.addrs.get(guess) == Some(&addr) {
            guess
        } else if self.addrs.get(guess + 1) == Some(&addr) {
            guess + 1
        } else {
            self.addrs.binary_search(&addr).ok()?
        };
        hint.set(index);
        self.states.get(index)
    }

    /// Adds `added` and takes `removed` out, as [`Backends::change`]
    /// describes; whether the list changed.
    fn change(&mut self, added: &[SocketAddr], removed: &[SocketAddr]) -> bool {
        if added.len() + removed.len() > MERGE_ABOVE {
            let addrs = merged(&self.addrs, added, removed);
            self.addrs != addrs && {
                self.rebuild(addrs);
                true
            }
        } else {
            // Removals first, as in the merge: an address in both lists ends
            // up listed.
            let removed = removed.iter().filter(|addr| self.remove(**addr)).count();
            let added = added.iter().filter(|addr| self.insert(**addr)).count();
            removed + added > 0
        }
    }

    /// Adds `addr` with a fresh state; false if it is listed already.
    fn insert(&mut self, addr: SocketAddr) -> bool {
        let Err(index) = self.addrs.binary_search(&addr) else {
            return false;
        };
        self.addrs.insert(index, addr);
        self.states.insert(index, Arc::default());
        true
    }

    /// Removes `addr` and drops its state; false if it is not listed.
    fn remove(&mut self, addr: SocketAddr) -> bool {
        let Ok(index) = self.addrs.binary_search(&addr) else {
            return false;
        };
        self.addrs.remove(index);
        self.states.remove(index);
        true
    }

    /// Makes `addrs` (sorted, without duplicates) the list, in one merge of the
    /// old list and the new: addresses in both keep their states, new ones get
    /// fresh states.
    fn rebuild(&mut self, addrs: Vec<SocketAddr>) {
        let mut old = std::mem::take(&mut self.addrs)
            .into_iter()
            .zip(std::mem::take(&mut self.states))
            .peekable();
        self.states = addrs
            .iter()
            .map(|addr| {
                while old.next_if(|(listed, _)| listed < addr).is_some() {}
                old.next_if(|(listed, _)| listed == addr)
                    .map(|(_, state)| state)
                    .unwrap_or_default()
            })
            .collect();
        self.addrs = addrs;
    }
}

// A poisoned lock means a writer panicked mid-update; what it guards is still valid
// (an address and its state are inserted or removed together, a rebuilt list is
// swapped in whole), so keep serving it.
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
    fn the_generation_moves_with_every_change_and_only_then() {
        let writer = BackendsWriter::new();
        let reader = writer.reader();
        let start = reader.generation();
        writer.replace(vec![addr("10.0.0.1:80")]);
        assert_eq!(reader.generation(), start + 1);
        writer.replace(vec![addr("10.0.0.1:80")]);
        writer.change(&[addr("10.0.0.1:80")], &[addr("10.0.0.9:80")]);
        assert_eq!(reader.generation(), start + 1, "no change, same generation");
        writer.change(&[addr("10.0.0.2:80")], &[]);
        assert_eq!(reader.generation(), start + 2);
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

    fn numbered(first: [u8; 4], n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from((first, 8000 + i)))
            .collect()
    }

    /// The incremental update: a change inserts and removes the addresses it
    /// names and leaves every other state as it was (the same object, with its
    /// requests in flight), one address at a time and as one merge alike.
    #[test]
    fn a_change_touches_only_the_addresses_it_names() {
        for n in [1, MERGE_ABOVE + 1, 40] {
            let list = BackendsWriter::new();
            let all = numbered([10, 0, 0, 1], 100);
            list.replace(all.clone());
            let backends = list.reader();
            let before = backends.states();
            let in_flight: Vec<_> = before.iter().map(|(_, s)| s.start_request()).collect();
            let removed = &all[10..10 + n];
            let added = numbered([10, 0, 0, 2], u16::try_from(n).expect("small"));

            assert!(list.change(&added, removed), "{n}");
            let after = backends.states();
            let listed: Vec<SocketAddr> = after.iter().map(|(a, _)| *a).collect();
            let mut expected: Vec<SocketAddr> = all
                .iter()
                .filter(|a| !removed.contains(a))
                .chain(&added)
                .copied()
                .collect();
            expected.sort_unstable();
            assert_eq!(listed, expected, "{n}");
            for (addr, state) in &after {
                match before.iter().find(|(a, _)| a == addr) {
                    Some((_, old)) => {
                        assert!(Arc::ptr_eq(old, state), "{addr} lost its state");
                        assert_eq!(state.in_flight(), 1);
                    }
                    None => assert_eq!((state.requests(), state.in_flight()), (0, 0)),
                }
            }
            // Already applied: nothing left to change.
            assert!(!list.change(&added, removed), "{n}");
            drop(in_flight);
        }
    }

    #[test]
    fn an_address_both_removed_and_added_stays_listed() {
        let list = BackendsWriter::new();
        list.replace(vec![addr("10.0.0.1:80")]);
        list.change(&[addr("10.0.0.1:80")], &[addr("10.0.0.1:80")]);
        assert_eq!(list.snapshot(), vec![addr("10.0.0.1:80")]);
    }

    /// Lookups start where the previous one landed; whatever the order of the
    /// questions, the answers are each address's own.
    #[test]
    fn availability_is_each_addresss_own_in_any_order_of_asking() {
        let all = numbered([10, 0, 0, 1], 200);
        let backends = Backends::new(all.clone());
        for addr in all.iter().step_by(3) {
            backends.state(*addr).set_healthy(false);
        }
        let expected = |i: usize| !i.is_multiple_of(3);
        let now = Instant::now();
        backends.with_availability(now, |list, available| {
            let orders: [Vec<usize>; 3] = [
                (0..200).collect(),
                (0..200).rev().collect(),
                (0..200).map(|i| i * 7 % 200).collect(),
            ];
            for order in orders {
                for i in order {
                    assert_eq!(available(list[i]), expected(i), "{}", list[i]);
                }
            }
            assert!(
                available(addr("10.9.9.9:1")),
                "an unlisted address is no state"
            );
        });
        let (addr, state) = backends
            .pick_with_state(now, |_, list, _, _| Ok::<_, ()>(list[42]))
            .expect("picked");
        assert!(Arc::ptr_eq(&state, &backends.state(addr)));
    }

    #[test]
    fn a_state_read_before_a_change_is_current_until_its_address_goes() {
        let list = BackendsWriter::new();
        list.replace(vec![addr("10.0.0.1:80")]);
        let backends = list.reader();
        let state = backends.state(addr("10.0.0.1:80"));
        assert!(backends.is_current(addr("10.0.0.1:80"), &state));
        list.change(&[], &[addr("10.0.0.1:80")]);
        assert!(!backends.is_current(addr("10.0.0.1:80"), &state));
        list.change(&[addr("10.0.0.1:80")], &[]);
        assert!(
            !backends.is_current(addr("10.0.0.1:80"), &state),
            "added again, it has a new state"
        );
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
