//! Request ids: one id follows a request through the load balancer's log line,
//! the backend's log line and the response, so the three can be joined.
//!
//! A client or an outer proxy may already have set `X-Request-Id`; that id is kept.
//! Otherwise a new one is made: 128 bits in hex, from a per-process counter. The
//! high half is the counter run through SipHash keyed with the process's random
//! `RandomState` keys, so it is unpredictable and differs across replicas (each
//! process draws its own keys); the low half is the counter, offset by a random
//! amount and run through a bijective mixer, so no two ids of one process are
//! the same. No random-number crate, no syscall per request, and one SipHash
//! rather than two.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;

/// Longest incoming id we keep; anything longer is replaced, so a client cannot
/// make us copy an arbitrarily large header into every log line.
const MAX_INCOMING_LEN: usize = 128;

/// Generates request ids.
#[derive(Debug)]
pub(crate) struct RequestIds {
    /// Random per-process keys; they make ids unpredictable and unique across
    /// replicas.
    keys: RandomState,
    /// Added to the counter for the low half, so that it starts somewhere
    /// different in every process too.
    offset: u64,
    /// Makes ids unique within the process.
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let keys = RandomState::new();
        Self {
            offset: keys.hash_one("offset"),
            keys,
            counter: AtomicU64::new(0),
        }
    }
}

impl RequestIds {
    /// The id to use for a request that arrived with `incoming` (if any).
    /// A kept id is copied, not shared: hyper's header values are slices of
    /// its connection's read buffer, which the id would otherwise pin for as
    /// long as the request lives.
    pub(crate) fn keep_or_generate(&self, incoming: Option<&HeaderValue>) -> HeaderValue {
        let mut id = match incoming {
            Some(id) if !id.is_empty() && id.len() <= MAX_INCOMING_LEN => {
                HeaderValue::from_bytes(id.as_bytes()).unwrap_or_else(|_| self.generate())
            }
            _ => self.generate(),
        };
        // One value per request: HPACK would add each to an HTTP/2
        // connection's table (and evict an older entry) for a value never
        // sent again. A sensitive value goes out as a literal that is never
        // indexed; HTTP/1.1 ignores the flag.
        id.set_sensitive(true);
        id
    }

    /// A fresh 32-hex-digit id.
    pub(crate) fn generate(&self) -> HeaderValue {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let high = self.keys.hash_one(n);
        let low = mix(n.wrapping_add(self.offset));
        let id = (u128::from(high) << 64) | u128::from(low);
        let mut hex = [0u8; 32];
        for (digits, byte) in hex.chunks_exact_mut(2).zip(id.to_be_bytes()) {
            digits[0] = DIGITS[usize::from(byte >> 4)];
            digits[1] = DIGITS[usize::from(byte & 0xf)];
        }
        // Hex digits are always valid header bytes; the fallback is unreachable
        // but keeps the request path free of panics.
        HeaderValue::from_bytes(&hex).unwrap_or(HeaderValue::from_static("0"))
    }
}

/// splitmix64's finalizer: a bijection of `u64` (each step, a shift folded
/// in by xor or a multiplication by an odd number, can be undone) that
/// spreads every bit of its input over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn generated_ids_are_32_hex_digits_and_distinct() {
        let ids = RequestIds::default();
        let generated: HashSet<_> = (0..10_000).map(|_| ids.generate()).collect();
        assert_eq!(generated.len(), 10_000);
        for id in &generated {
            let text = id.to_str().expect("ASCII");
            assert_eq!(text.len(), 32);
            assert!(text.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
        }
    }

    #[test]
    fn two_processes_worth_of_generators_do_not_collide() {
        // Separate generators stand in for separate replicas: same counters,
        // different keys.
        let (a, b) = (RequestIds::default(), RequestIds::default());
        let first: HashSet<_> = (0..1_000).map(|_| a.generate()).collect();
        assert!((0..1_000).all(|_| !first.contains(&b.generate())));
    }

    #[test]
    fn incoming_id_is_kept_unless_empty_or_oversized() {
        let ids = RequestIds::default();
        let given = HeaderValue::from_static("abc-123");
        assert_eq!(ids.keep_or_generate(Some(&given)), given);
        let empty = HeaderValue::from_static("");
        assert_eq!(ids.keep_or_generate(Some(&empty)).len(), 32);
        let long = HeaderValue::from_str(&"x".repeat(500)).expect("ASCII");
        assert_eq!(ids.keep_or_generate(Some(&long)).len(), 32);
        assert_eq!(ids.keep_or_generate(None).len(), 32);
    }
}
