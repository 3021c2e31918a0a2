//! Consistent-hash affinity: requests that carry the same key (a header, a
//! cookie, the client's address: `hashOn`) go to the same backend, for as long
//! as that backend is in the list and available.
//!
//! The mapping is a [`Maglev`] table over the whole list (see its module for
//! why Maglev and its balance and disruption figures). The table depends only
//! on the list, so it is built once per change of the list, when a pick first
//! sees a new [`PickContext::list_generation`], and shared by every pick after
//! it; a lookup is one index into it. The proxy reads the key from the
//! request ([`HashOn`] says where) and hands its hash in the [`PickContext`].
//!
//! Up to [`BUILD_INLINE_UP_TO`] backends the pick that sees the change builds
//! the new table itself (a few milliseconds at most). A longer list's table
//! takes longer (about 45 ms at 10,000 backends, and a big Service's slices
//! change many times a second), and a pick runs under the backend list's read
//! lock, so there the new table is built on a thread of its own while the
//! picks go on with the previous one. A key whose backend left the list finds
//! it not eligible and walks its probe sequence as below, until the new table
//! is in place.
//!
//! A key whose backend is not eligible (unhealthy, ejected, at its concurrency
//! limit, or tried already by this request's retry) walks its own probe
//! sequence to the next eligible backend: the same one for every request with
//! that key, so a session that loses its backend moves once, to one other, and
//! stays there; when its backend is back, so is the session. A request without
//! a key takes its turn in a plain round-robin.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use http::HeaderName;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::maglev::{Lookup, Maglev};
use super::{Balancer, NoBackend, RoundRobin};

/// `hashOn`: what in a request makes its hash key. Exactly one of `header`,
/// `cookie` and `sourceIp`; `ttlSeconds` only with `cookie`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashOn {
    /// The value of this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The value of this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// With `cookie`: a request without the cookie is given one, a random
    /// value the load balancer sets (`Path=/; HttpOnly; Max-Age=` this), and
    /// is routed by it already. Without it, such requests go round-robin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// The client's address: the connection's peer, or what a proxy in
    /// `trustedProxies` says in `X-Forwarded-For`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_ip: bool,
}

/// The longest cookie lifetime accepted: a year, the order of what browsers
/// keep at most anyway.
pub const MAX_COOKIE_TTL_SECONDS: u64 = 31_536_000;

impl HashOn {
    /// What this asks for, checked: the error names the key and the reason.
    pub fn affinity(&self) -> Result<Affinity, (&'static str, String)> {
        let fail = |key, reason: &str| Err((key, reason.to_owned()));
        let given = [self.header.is_some(), self.cookie.is_some(), self.source_ip];
        if given.iter().filter(|&&given| given).count() != 1 {
            return fail(
                "hashOn",
                "must name exactly one of `header`, `cookie` and `sourceIp`",
            );
        }
        if self.ttl_seconds.is_some() && self.cookie.is_none() {
            return fail("hashOn.ttlSeconds", "applies only with `cookie`");
        }
        if let Some(header) = &self.header {
            return HeaderName::try_from(header.as_str())
                .map(Affinity::Header)
                .map_err(|_| ("hashOn.header", format!("{header:?} is not a header name")));
        }
        if let Some(name) = &self.cookie {
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token {
                return Err((
                    "hashOn.cookie",
                    format!("{name:?} is not a cookie name (RFC 6265: a token)"),
                ));
            }
            if let Some(ttl) = self.ttl_seconds
                && !(1..=MAX_COOKIE_TTL_SECONDS).contains(&ttl)
            {
                return Err((
                    "hashOn.ttlSeconds",
                    format!("must be between 1 and {MAX_COOKIE_TTL_SECONDS}"),
                ));
            }
            return Ok(Affinity::Cookie {
                name: name.clone(),
                ttl_seconds: self.ttl_seconds,
            });
        }
        Ok(Affinity::SourceIp)
    }
}

/// Where a request's hash key comes from: [`HashOn`], checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affinity {
    Header(HeaderName),
    Cookie {
        name: String,
        /// Set when absent, for this long; `None`: never set.
        ttl_seconds: Option<u64>,
    },
    SourceIp,
}

/// How a pick treated the request's key, for the affinity metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffinityOutcome {
    /// Routed to the key's own backend.
    Hit,
    /// The request had no key: round-robin.
    Miss,
    /// The key's own backend was not eligible: the next one of its sequence.
    Fallback,
}

/// What one pick knows besides the list; see [`Balancer::pick_keyed`].
#[derive(Debug, Default)]
pub struct PickContext {
    /// The hash of the request's key ([`super::key_hash`]); `None` without one.
    pub key: Option<u64>,
    /// Changes whenever the list changes, so that what an algorithm built from
    /// the list (a hash table) can be kept until then.
    pub list_generation: u64,
    /// A backend with this many requests in flight is not eligible
    /// (`maxRequestsPerBackend`); `None`: no limit.
    pub max_in_flight: Option<u64>,
    /// Written by an algorithm that routes by the key: how it went.
    pub outcome: Cell<Option<AffinityOutcome>>,
}

impl PickContext {
    /// Whether `backend` may take one more request, `in_flight` telling how
    /// many it has; without a limit it is not asked.
    pub fn has_room(&self, backend: SocketAddr, in_flight: &dyn Fn(SocketAddr) -> u64) -> bool {
        self.max_in_flight
            .is_none_or(|max| in_flight(backend) < max)
    }
}

/// Lists up to this long get their new table from the pick that sees the
/// change (about 3 ms at 1,000 backends); longer ones from a thread of their
/// own (see the module docs).
const BUILD_INLINE_UP_TO: usize = 1_000;

/// Maglev consistent hashing over the list, round-robin for requests without
/// a key (see the module docs).
#[derive(Debug)]
pub struct ConsistentHash {
    /// Where the proxy finds each request's key.
    affinity: Affinity,
    /// The table in use, shared with the thread that builds the next one.
    tables: Arc<Tables>,
    /// For requests without a key, and keys that found no eligible backend.
    round_robin: RoundRobin,
}

/// The table in use and whether its successor is being built.
#[derive(Debug, Default)]
struct Tables {
    /// The table of a list seen, and that list's generation. A read lock per
    /// pick, held only to clone the `Arc`; the write lock to put a new table
    /// in place.
    current: RwLock<Option<Arc<Table>>>,
    /// A thread is building the next table: one at a time, and a list that
    /// changes meanwhile gets its own once this one is in place.
    building: AtomicBool,
}

impl Tables {
    fn current(&self) -> Option<Arc<Table>> {
        // A poisoned lock holds a whole table or none (a swap is one store).
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `table` in place unless a newer one is there already.
    fn install(&self, table: Arc<Table>) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current
            .as_ref()
            .is_none_or(|kept| kept.generation <= table.generation)
        {
            *current = Some(table);
        }
    }
}

/// A Maglev table and the list generation it was built for.
#[derive(Debug)]
struct Table {
    generation: u64,
    maglev: Maglev,
}

impl ConsistentHash {
    /// Consistent hashing on what `affinity` names.
    pub fn new(affinity: Affinity) -> Self {
        Self {
            affinity,
            tables: Arc::default(),
            round_robin: RoundRobin::new(),
        }
    }

    /// The table for `backends`: the one kept if it is of this generation of
    /// the list (and this length: a caller with no generations, such as a
    /// test, passes 0 throughout); else a new one, built now for a short
    /// list or when there is no table yet, and otherwise the one kept while
    /// a thread builds the new one.
    fn table(&self, backends: &[SocketAddr], generation: u64) -> Arc<Table> {
        let kept = self.tables.current();
        match kept {
            Some(kept)
                if kept.generation == generation
                    && kept.maglev.backends().len() == backends.len() =>
            {
                kept
            }
            Some(kept) if backends.len() > BUILD_INLINE_UP_TO => {
                self.build_aside(backends, generation);
                kept
            }
            _ => {
                let table = Arc::new(Table {
                    generation,
                    maglev: Maglev::new(backends),
                });
                self.tables.install(Arc::clone(&table));
                table
            }
        }
    }

    /// Starts building the table of `backends` on a thread of its own,
    /// unless one is being built already.
    fn build_aside(&self, backends: &[SocketAddr], generation: u64) {
        if self.tables.building.swap(true, Ordering::AcqRel) {
            return;
        }
        let (tables, backends) = (Arc::clone(&self.tables), backends.to_vec());
        let spawned = std::thread::Builder::new()
            .name("maglev-build".to_owned())
            .spawn(move || {
                let maglev = Maglev::new(&backends);
                tables.install(Arc::new(Table { generation, maglev }));
                tables.building.store(false, Ordering::Release);
            });
        if let Err(error) = spawned {
            // The picks keep the table they have; the next one tries again.
            warn!(%error, "cannot start a thread to build the consistent-hash table");
            self.tables.building.store(false, Ordering::Release);
        }
    }
}

impl Balancer for ConsistentHash {
    /// Without a key: round-robin.
    fn pick_among(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
        in_flight: &dyn Fn(SocketAddr) -> u64,
    ) -> Result<SocketAddr, NoBackend> {
        self.round_robin.pick_among(backends, eligible, in_flight)
    }

    fn pick_keyed(
        &self,
        backends: &[SocketAddr],
        eligible: &dyn Fn(SocketAddr) -> bool,
        in_flight: &dyn Fn(SocketAddr) -> u64,
        context: &PickContext,
    ) -> Result<SocketAddr, NoBackend> {
        let Some(key) = context.key else {
            context.outcome.set(Some(AffinityOutcome::Miss));
            return self.pick_among(backends, eligible, in_flight);
        };
        let table = self.table(backends, context.list_generation);
        match table.maglev.lookup(key, eligible) {
            Some(Lookup { backend, home }) => {
                context.outcome.set(Some(if home {
                    AffinityOutcome::Hit
                } else {
                    AffinityOutcome::Fallback
                }));
                Ok(backend)
            }
            // Its whole probe sequence missed (few backends eligible): any
            // eligible one rather than none.
            None => {
                let pick = self.pick_among(backends, eligible, in_flight)?;
                context.outcome.set(Some(AffinityOutcome::Fallback));
                Ok(pick)
            }
        }
    }

    fn affinity(&self) -> Option<&Affinity> {
        Some(&self.affinity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::tests::{addrs, assert_spread, count};
    use crate::balancer::{key_hash, pick_for_attempt, pick_nearest_for_attempt};

    fn keyed(key: &str, generation: u64) -> PickContext {
        PickContext {
            key: Some(key_hash(key.as_bytes())),
            list_generation: generation,
            ..PickContext::default()
        }
    }

    fn balancer() -> ConsistentHash {
        ConsistentHash::new(Affinity::SourceIp)
    }

    /// A keyed pick with every backend available and idle, as
    /// [`Balancer::pick`] is for a pick without a key.
    fn pick_idle(
        balancer: &ConsistentHash,
        backends: &[SocketAddr],
        context: &PickContext,
    ) -> Result<SocketAddr, NoBackend> {
        balancer.pick_keyed(backends, &|_| true, &|_| 0, context)
    }

    /// Bound asserted: exact, and the new table within 60 s (it takes
    /// milliseconds). Past `BUILD_INLINE_UP_TO` backends a change of the list
    /// does not wait for its table: picks go on with the old one, never to
    /// the backend that left, until the new one is in place.
    #[test]
    fn a_long_list_keeps_its_table_while_the_next_is_built_aside() {
        let mut backends = addrs(1_500);
        let balancer = balancer();
        assert_eq!(balancer.table(&backends, 1).generation, 1, "built at once");
        let gone = backends.remove(7);
        assert_eq!(
            balancer.table(&backends, 2).generation,
            1,
            "the old one serves"
        );
        let listed = |addr: SocketAddr| backends.binary_search(&addr).is_ok();
        for user in 0..2_000 {
            let context = keyed(&format!("user-{user}"), 2);
            let pick = balancer.pick_keyed(&backends, &listed, &|_| 0, &context);
            assert_ne!(pick, Ok(gone), "user-{user}");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while balancer.table(&backends, 2).generation != 2 {
            assert!(std::time::Instant::now() < deadline, "no new table");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let table = balancer.table(&backends, 2);
        assert_eq!(table.maglev.backends(), &backends[..]);
    }

    #[test]
    fn one_key_always_lands_on_one_backend() {
        let backends = addrs(5);
        let balancer = balancer();
        let context = keyed("user-7", 1);
        let first = pick_idle(&balancer, &backends, &context).expect("a backend");
        for _ in 0..100 {
            let pick = pick_idle(&balancer, &backends, &context);
            assert_eq!(pick, Ok(first));
        }
        assert_eq!(context.outcome.get(), Some(AffinityOutcome::Hit));
    }

    /// Bound asserted: exact. Every key keeps its backend whether or not a
    /// topology set is preferred, and keyless requests stay in the set.
    #[test]
    fn a_key_routes_over_the_whole_list_whatever_the_nearest_set() {
        let backends = addrs(6);
        let zone = [backends[0]];
        let balancer = balancer();
        for user in 0..200 {
            let context = keyed(&format!("user-{user}"), 1);
            let without_topology =
                pick_for_attempt(&balancer, &backends, &|_| true, &|_| 0, &[], &context);
            let with_topology = pick_nearest_for_attempt(
                &balancer,
                &[&zone],
                &backends,
                &|_| true,
                &|_| 0,
                &[],
                &context,
            );
            assert_eq!(with_topology, without_topology, "user-{user}");
        }
        let keyless = PickContext::default();
        for _ in 0..10 {
            let pick = pick_nearest_for_attempt(
                &balancer,
                &[&zone],
                &backends,
                &|_| true,
                &|_| 0,
                &[],
                &keyless,
            );
            assert_eq!(pick, Ok(zone[0]));
        }
    }

    #[test]
    fn keys_spread_over_every_backend() {
        let backends = addrs(4);
        let balancer = balancer();
        let counts = count((0..4_000).map(|user| {
            let context = keyed(&format!("user-{user}"), 1);
            pick_idle(&balancer, &backends, &context).expect("a backend")
        }));
        // About 1,000 each; Maglev keeps shares within a few percent.
        assert_spread(&counts, 4, 850..=1_150);
    }

    #[test]
    fn requests_without_a_key_go_round_robin() {
        let backends = addrs(3);
        let balancer = balancer();
        let context = PickContext::default();
        let picks: Vec<_> = (0..6)
            .map(|_| pick_idle(&balancer, &backends, &context).expect("a backend"))
            .collect();
        let expected: Vec<_> = backends.iter().chain(&backends).copied().collect();
        assert_eq!(picks, expected);
        assert_eq!(context.outcome.get(), Some(AffinityOutcome::Miss));
    }

    #[test]
    fn an_unavailable_backend_sends_its_key_to_one_other_and_back() {
        let backends = addrs(5);
        let balancer = balancer();
        let context = keyed("cart-1", 1);
        let home = pick_idle(&balancer, &backends, &context).expect("a backend");
        let down = |addr: SocketAddr| addr != home;
        let moved = pick_for_attempt(&balancer, &backends, &down, &|_| 0, &[], &context);
        assert_ne!(moved, Ok(home));
        assert_eq!(context.outcome.get(), Some(AffinityOutcome::Fallback));
        for _ in 0..20 {
            let pick = pick_for_attempt(&balancer, &backends, &down, &|_| 0, &[], &context);
            assert_eq!(pick, moved);
        }
        // A retry that tried the fallback too goes on to a third, consistently.
        let tried = [moved.expect("a backend")];
        let third = pick_for_attempt(&balancer, &backends, &down, &|_| 0, &tried, &context);
        assert!(third.is_ok_and(|addr| addr != home && Ok(addr) != moved));
        // Back up: home again.
        let pick = pick_for_attempt(&balancer, &backends, &|_| true, &|_| 0, &[], &context);
        assert_eq!(pick, Ok(home));
    }

    #[test]
    fn the_table_is_built_once_per_list_generation() {
        let balancer = balancer();
        let five = addrs(5);
        let first = balancer.table(&five, 1);
        assert!(Arc::ptr_eq(&first, &balancer.table(&five, 1)));
        // Same length, new generation: a new list, a new table.
        let other: Vec<SocketAddr> = addrs(6)[1..].to_vec();
        let second = balancer.table(&other, 2);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.maglev.backends(), &other[..]);
    }

    #[test]
    fn hash_on_takes_exactly_one_source() {
        let header = HashOn {
            header: Some("x-user".to_owned()),
            ..HashOn::default()
        };
        assert!(matches!(header.affinity(), Ok(Affinity::Header(_))));
        let none = HashOn::default();
        assert_eq!(none.affinity().map_err(|e| e.0), Err("hashOn"));
        let both = HashOn {
            cookie: Some("lb".to_owned()),
            ..header.clone()
        };
        assert_eq!(both.affinity().map_err(|e| e.0), Err("hashOn"));
        let ttl_alone = HashOn {
            ttl_seconds: Some(60),
            ..header
        };
        assert_eq!(
            ttl_alone.affinity().map_err(|e| e.0),
            Err("hashOn.ttlSeconds")
        );
        let bad_cookie = HashOn {
            cookie: Some("a b".to_owned()),
            ..HashOn::default()
        };
        assert_eq!(bad_cookie.affinity().map_err(|e| e.0), Err("hashOn.cookie"));
    }
}
