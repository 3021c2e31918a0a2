//! Request ids: one id follows a request through the load balancer's log line,
//! the backend's log line and the response, so the three can be joined.
//!
//! A client or an outer proxy may already have set `X-Request-Id`; that id is kept.
//! Otherwise a new one is made: 128 bits in hex, from a per-process counter run
//! through SipHash keyed with the process's random `RandomState` keys. Ids are
//! distinct within a process (distinct counter values, a keyed PRF) and across
//! replicas (each process draws its own keys), without a random-number crate and
//! without a syscall per request.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;

/// Longest incoming id we keep; anything longer is replaced, so a client cannot
/// make us copy an arbitrarily large header into every log line.
const MAX_INCOMING_LEN: usize = 128;

/// Generates request ids.
#[derive(Debug, Default)]
pub(crate) struct RequestIds {
    /// Random per-process keys; they make ids unpredictable and unique across
    /// replicas.
    keys: RandomState,
    /// Makes ids unique within the process.
    counter: AtomicU64,
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
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let high = self.keys.hash_one((n, 0u8));
        let low = self.keys.hash_one((n, 1u8));
        let mut hex = [0u8; 32];
        for (i, byte) in hex.iter_mut().enumerate() {
            let word = if i < 16 { high } else { low };
            let nibble = (word >> (60 - 4 * (i % 16))) & 0xf;
            *byte = b"0123456789abcdef"[nibble as usize];
        }
        // Hex digits are always valid header bytes; the fallback is unreachable
        // but keeps the request path free of panics.
        HeaderValue::from_bytes(&hex).unwrap_or(HeaderValue::from_static("0"))
    }
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
