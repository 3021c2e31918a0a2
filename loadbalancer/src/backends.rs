//! The shared list of backend addresses: discovery writes it, the balancer reads it.
//!
//! This is the one piece of state that the two halves of the load balancer share.
//! Discovery (a single task) builds a complete new list off to the side and swaps it
//! in with one write, so a reader never sees half an update. Request handlers (many
//! tasks) take the read lock only long enough to pick an address and copy it out.
//!
//! The lock is a `std::sync::RwLock`, not tokio's: it is held for nanoseconds and
//! never across an `.await`, which is exactly the case where a blocking lock is the
//! right (and faster) choice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// A cheaply clonable handle to the current backend addresses.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    /// The addresses requests may go to, sorted and without duplicates.
    addrs: Arc<RwLock<Vec<SocketAddr>>>,
    /// Set once discovery has delivered its first complete list, so `/readyz` can
    /// keep the load balancer out of rotation until it knows where to send traffic.
    synced: Arc<AtomicBool>,
}

impl Backends {
    /// A list that starts with `addrs` (sorted and de-duplicated) and is not yet synced.
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        let backends = Self::default();
        backends.replace(addrs);
        backends
    }

    /// Publishes a complete new list in one write. Returns whether it differed from
    /// the old one, so callers can log changes and stay quiet otherwise.
    pub fn replace(&self, mut addrs: Vec<SocketAddr>) -> bool {
        addrs.sort_unstable();
        addrs.dedup();
        let mut current = self.write_lock();
        if *current == addrs {
            return false;
        }
        *current = addrs;
        true
    }

    /// A copy of the current list, for logging, admin pages and tests.
    pub fn snapshot(&self) -> Vec<SocketAddr> {
        self.read_lock().clone()
    }

    /// Runs `f` on the current list under the read lock, without copying it.
    ///
    /// `f` is a plain closure, not a future, so the guard cannot be held across an
    /// `.await` by construction.
    pub fn with<R>(&self, f: impl FnOnce(&[SocketAddr]) -> R) -> R {
        f(&self.read_lock())
    }

    /// Records that discovery has delivered a complete list at least once.
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// Whether discovery has delivered a complete list at least once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Vec<SocketAddr>> {
        // A poisoned lock means a writer panicked mid-update; the list it guards is
        // still a valid Vec (replace() swaps it whole), so keep serving it.
        self.addrs
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Vec<SocketAddr>> {
        self.addrs
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
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
    fn clones_share_one_list_and_one_sync_flag() {
        let writer = Backends::default();
        let reader = writer.clone();
        assert!(!reader.is_synced());
        writer.replace(vec![addr("[::1]:8080")]);
        writer.mark_synced();
        assert_eq!(reader.snapshot(), vec![addr("[::1]:8080")]);
        assert!(reader.is_synced());
    }
}
