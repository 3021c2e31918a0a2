//! Maglev hashing (Google's Maglev paper, NSDI 2016): a lookup table that maps
//! a key to a backend so that every backend gets an almost equal share of the
//! keys, and a change of backends moves few keys.
//!
//! Each backend has its own preference order over the table's `M` slots (a
//! permutation from two hashes of its address: an offset and a step, `M` prime
//! so every step visits every slot). The backends take turns claiming their
//! next preferred free slot until the table is full, so each holds `M / n`
//! slots, give or take one. A key goes to the backend of slot `hash(key) % M`.
//! When a backend leaves, the others keep most of their slots, because each
//! still walks its own order; the slots it held go to the others, about evenly.
//!
//! Chosen over a ring with virtual nodes for its balance: with `M` at least
//! 100 × n, shares differ by about 1 %, where a ring needs hundreds of virtual
//! nodes per backend for that, and a lookup is one index, not a binary search.
//! The price is the build, O(M) per change of the list (about a millisecond for
//! a few backends, tens at 10,000), paid once per change by the first pick
//! that sees it ([`ConsistentHash`](super::ConsistentHash) keeps the table).
//! Measured by the tests, as counts: 100,000 keys over 10 backends give each
//! between 9,874 and 10,086 (within 1.3 % of even; the bound is 10 %);
//! removing one backend moves 10,276 keys, 10.3 % (ideal: its own 10,062;
//! the bound is 15 %); adding it back restores every key.
//!
//! Hashes are FNV-1a, fixed (not seeded per process), so every replica of the
//! load balancer maps a key to the same backend.

use std::net::SocketAddr;

/// A Maglev lookup table over a list of backends.
#[derive(Debug, Clone)]
pub(super) struct Maglev {
    /// The backends, in the order `table` indexes them.
    backends: Vec<SocketAddr>,
    /// For each slot, the index of its backend in `backends`.
    table: Vec<u32>,
}

/// How many slots per backend, at least: the balance is within about 1 / this.
const SLOTS_PER_BACKEND: usize = 100;

/// The smallest table, so that a list of a few backends is balanced finely too.
const MIN_TABLE: usize = 65_537;

/// How many other keys a lookup tries when the key's backend is not eligible.
const FALLBACK_TRIES: u64 = 64;

impl Maglev {
    /// The table for `backends` (an empty list gives an empty table).
    pub(super) fn new(backends: &[SocketAddr]) -> Self {
        let backends = backends.to_vec();
        if backends.is_empty() {
            return Self {
                backends,
                table: Vec::new(),
            };
        }
        let size = next_prime((backends.len() * SLOTS_PER_BACKEND).max(MIN_TABLE));
        let size_u64 = size as u64;
        // Each backend's permutation: slot j is (offset + j × skip) mod size.
        let orders: Vec<(u64, u64)> = backends
            .iter()
            .map(|backend| {
                let name = backend.to_string();
                let offset = fnv1a(name.as_bytes(), 0) % size_u64;
                let skip = fnv1a(name.as_bytes(), 1) % (size_u64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; backends.len()];
        let mut table = vec![u32::MAX; size];
        let mut filled = 0;
        'fill: loop {
            for (index, &(offset, skip)) in orders.iter().enumerate() {
                // This backend's next preferred slot that is still free.
                let slot = loop {
                    let slot = ((offset + next[index] * skip) % size_u64) as usize;
                    next[index] += 1;
                    if table[slot] == u32::MAX {
                        break slot;
                    }
                };
                table[slot] = u32::try_from(index).unwrap_or(u32::MAX);
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Self { backends, table }
    }

    /// The backend for `key` (a [`key_hash`]), or, if that one is not
    /// `eligible` (unhealthy, ejected, at its concurrency limit, tried
    /// already), the first eligible backend of the same key hashed again with
    /// a counter: the key's own probe sequence, the same for every request
    /// with that key, so its requests stay together on the fallback too, while
    /// the keys of one lost backend spread over all the others. `None` for an
    /// empty table, or when no try found an eligible backend.
    pub(super) fn lookup(&self, key: u64, eligible: impl Fn(SocketAddr) -> bool) -> Option<Lookup> {
        let size = self.table.len() as u64;
        if size == 0 {
            return None;
        }
        (0..FALLBACK_TRIES).find_map(|round| {
            let hash = if round == 0 {
                key
            } else {
                fnv1a(&key.to_le_bytes(), round)
            };
            // The table is full and indexes `backends`; `get` keeps a broken
            // invariant from becoming a panic on the request path.
            let index = *self.table.get((hash % size) as usize)?;
            let backend = *self.backends.get(index as usize)?;
            eligible(backend).then_some(Lookup {
                backend,
                home: round == 0,
            })
        })
    }

    /// The backends the table was built from, in its order.
    pub(super) fn backends(&self) -> &[SocketAddr] {
        &self.backends
    }
}

/// Where a lookup sent a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lookup {
    pub(super) backend: SocketAddr,
    /// Whether it is the key's own backend (`false`: a fallback, its own was
    /// not eligible).
    pub(super) home: bool,
}

/// The 64-bit hash of a request's key (a header value, a cookie, an address)
/// that [`Maglev::lookup`] takes: fixed, so every replica agrees.
pub fn key_hash(bytes: &[u8]) -> u64 {
    fnv1a(bytes, 0)
}

/// FNV-1a, 64 bits, over `bytes` and then `seed`'s bytes: small, fast on short
/// keys, and the same in every process.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .chain(&seed.to_le_bytes())
        .fold(OFFSET, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

/// The smallest prime at or above `n`.
fn next_prime(n: usize) -> usize {
    let is_prime = |candidate: usize| {
        candidate >= 2
            && (2..)
                .take_while(|divisor| divisor * divisor <= candidate)
                .all(|divisor| !candidate.is_multiple_of(divisor))
    };
    (n..).find(|&candidate| is_prime(candidate)).unwrap_or(n)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn backends(count: u8) -> Vec<SocketAddr> {
        (1..=count)
            .map(|host| SocketAddr::from(([10, 0, 0, host], 8080)))
            .collect()
    }

    /// Where each of `keys` goes.
    fn assign(table: &Maglev, keys: u32) -> Vec<SocketAddr> {
        (0..keys)
            .map(|key| {
                table
                    .lookup(key_hash(format!("client-{key}").as_bytes()), |_| true)
                    .expect("a non-empty table")
                    .backend
            })
            .collect()
    }

    const KEYS: u32 = 100_000;

    #[test]
    fn every_backend_gets_within_ten_percent_of_an_even_share() {
        let table = Maglev::new(&backends(10));
        let mut shares: HashMap<SocketAddr, u32> = HashMap::new();
        for backend in assign(&table, KEYS) {
            *shares.entry(backend).or_default() += 1;
        }
        assert_eq!(shares.len(), 10);
        let even = KEYS / 10;
        let (least, most) = (shares.values().min(), shares.values().max());
        eprintln!("shares of {KEYS} keys over 10 backends: least {least:?}, most {most:?}");
        for (backend, share) in shares {
            assert!(
                share.abs_diff(even) <= even / 10,
                "{backend}: {share} keys, even is {even}"
            );
        }
    }

    #[test]
    fn removing_a_backend_moves_few_keys_and_adding_it_back_restores_them() {
        let all = backends(10);
        let before = assign(&Maglev::new(&all), KEYS);
        let removed = all[3];
        let without: Vec<_> = all.iter().copied().filter(|b| *b != removed).collect();
        let after = assign(&Maglev::new(&without), KEYS);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // The removed backend's keys (about a tenth) must move; ideally nothing else.
        assert!(
            moved <= KEYS as usize * 15 / 100,
            "{moved} of {KEYS} keys moved"
        );
        let orphaned = before.iter().filter(|b| **b == removed).count();
        eprintln!(
            "one of 10 backends removed: {moved} of {KEYS} keys moved, {orphaned} were its own"
        );
        assert!(moved >= orphaned);
        // Back as it was: every key returns to its first backend.
        assert_eq!(assign(&Maglev::new(&all), KEYS), before);
    }

    #[test]
    fn a_key_whose_backend_is_unavailable_goes_to_one_other_consistently() {
        let all = backends(5);
        let table = Maglev::new(&all);
        let key = key_hash(b"session-42");
        let first = table.lookup(key, |_| true).expect("a backend");
        assert!(first.home);
        let fallback = table
            .lookup(key, |backend| backend != first.backend)
            .expect("another backend");
        assert_ne!(fallback.backend, first.backend);
        assert!(!fallback.home);
        for _ in 0..10 {
            assert_eq!(
                table.lookup(key, |backend| backend != first.backend),
                Some(fallback)
            );
        }
        assert_eq!(Maglev::new(&[]).lookup(key, |_| true), None);
    }

    #[test]
    fn the_table_is_prime_sized_and_full() {
        assert_eq!(next_prime(65_536), 65_537);
        let table = Maglev::new(&backends(3));
        assert_eq!(table.table.len(), 65_537);
        assert!(table.table.iter().all(|&index| index < 3));
    }
}
