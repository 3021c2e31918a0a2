//! Upstream authorities (`10.0.0.7:8080`) built once per backend, not once per
//! request.
//!
//! A forwarded request that arrived without a `Host` header (HTTP/1.0) gets its
//! backend's authority as `Host`, as hyper-util's client used to add. Formatting a
//! `SocketAddr` and parsing the text back into an [`Authority`] costs an
//! allocation, the formatting machinery and a parse; an `Authority` holds its
//! text in a refcounted `Bytes`, so building it once per backend and cloning it
//! afterwards is a refcount bump.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use http::uri::{Authority, InvalidUri};

/// Past this many backends the cache starts over, so addresses that discovery
/// dropped long ago (pods come and go with new IPs) cannot pile up forever.
const MAX_CACHED: usize = 1024;

/// A cache of backend authorities.
#[derive(Debug, Default)]
pub(crate) struct Authorities {
    /// A plain mutex: it is held for a hash lookup, never across an `.await`,
    /// and each proxy worker has its own cache, so it is not contended.
    cache: Mutex<HashMap<SocketAddr, Authority>>,
}

impl Authorities {
    /// The authority of `backend`, built on first use.
    pub(crate) fn get(&self, backend: SocketAddr) -> Result<Authority, InvalidUri> {
        // A panic elsewhere while the lock was held cannot leave a wrong entry:
        // inserts and clears are whole operations.
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(authority) = cache.get(&backend) {
            return Ok(authority.clone());
        }
        let authority = Authority::from_maybe_shared(Bytes::from(backend.to_string()))?;
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(backend, authority.clone());
        Ok(authority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_are_the_address_text_and_built_once() {
        let authorities = Authorities::default();
        let v4: SocketAddr = "10.0.0.7:8080".parse().expect("valid");
        let v6: SocketAddr = "[fd00::7]:8080".parse().expect("valid");
        let first = authorities.get(v4).expect("an address is an authority");
        assert_eq!(first, "10.0.0.7:8080");
        assert_eq!(authorities.get(v6).expect("valid"), "[fd00::7]:8080");
        // The second lookup hands out the cached text, not a new copy.
        let second = authorities.get(v4).expect("valid");
        assert_eq!(first.as_str().as_ptr(), second.as_str().as_ptr());
    }

    #[test]
    fn the_cache_starts_over_instead_of_growing_without_bound() {
        let authorities = Authorities::default();
        for port in 0..3 * MAX_CACHED {
            let port = u16::try_from(port).expect("small");
            authorities
                .get(SocketAddr::from(([10, 0, 0, 1], port)))
                .expect("valid");
            let len = authorities.cache.lock().expect("not poisoned").len();
            assert!(len <= MAX_CACHED, "{len} cached");
        }
    }
}
