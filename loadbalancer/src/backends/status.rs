//! Discovery's own health: where the backend list comes from, how often it changed,
//! when it was last confirmed and what went wrong last.
//!
//! The list itself says nothing about how fresh it is: while the Kubernetes API
//! server is unreachable, discovery keeps serving the last known backends, which is
//! right for traffic but must be visible to an operator. [`Backends`] carries one
//! [`DiscoveryStatus`] and stamps it whenever discovery publishes a list or marks it
//! synced, so discovery needs no extra plumbing; the watch loop adds only the one
//! call that records an error. `/debug/backends` and the discovery metrics read it
//! at request time.
//!
//! [`Backends`]: super::Backends

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Which kind of source fills the list ([`crate::discovery::Source`] has one of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Static,
    Kubernetes,
}

/// The most recent discovery failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryError {
    /// When it happened, so an operator can compare it with the last sync.
    pub at: SystemTime,
    /// The error and its causes, on one line.
    pub message: String,
}

/// What discovery has done lately. Shared by every clone of a `Backends`.
#[derive(Debug, Default)]
pub struct DiscoveryStatus {
    /// Set once, when discovery starts; unset in tests that fill the list by hand.
    source: OnceLock<SourceKind>,
    /// Published lists that differed from the previous one: how often the backend
    /// set changed, for `loadbalancer_discovery_updates_total`.
    updates: AtomicU64,
    /// Wall-clock time (microseconds since the Unix epoch) of the last list the
    /// source delivered, changed or not; 0 means never. A stale value while the
    /// watch keeps failing is what tells an operator the list may be out of date.
    last_sync_unix_micros: AtomicU64,
    /// The last watch error. A mutex, not an atomic: it is a string, written only on
    /// failures and read only by the admin endpoints.
    last_error: Mutex<Option<DiscoveryError>>,
}

impl DiscoveryStatus {
    /// Records the kind of source; only the first call counts, since a process has
    /// one discovery task for its lifetime.
    pub fn set_source(&self, source: SourceKind) {
        let _ = self.source.set(source);
    }

    /// The kind of source, once discovery has started.
    pub fn source(&self) -> Option<SourceKind> {
        self.source.get().copied()
    }

    /// Records that the source delivered a list; `changed` says whether it differed
    /// from the one before.
    pub(crate) fn record_sync(&self, changed: bool) {
        if changed {
            self.updates.fetch_add(1, Ordering::Relaxed);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
            });
        self.last_sync_unix_micros.store(now, Ordering::Relaxed);
    }

    /// Records a failed watch or list call (the watcher retries on its own).
    pub fn record_error(&self, error: &(dyn std::error::Error + 'static)) {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        let error = DiscoveryError {
            at: SystemTime::now(),
            message,
        };
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error);
    }

    /// How many published lists changed the backend set.
    pub fn updates(&self) -> u64 {
        self.updates.load(Ordering::Relaxed)
    }

    /// When the source last delivered a list, if it ever has.
    pub fn last_sync(&self) -> Option<SystemTime> {
        match self.last_sync_unix_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(UNIX_EPOCH + Duration::from_micros(micros)),
        }
    }

    /// The most recent error, if any; it stays after later successes, with its time.
    pub fn last_error(&self) -> Option<DiscoveryError> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_status_has_no_source_sync_or_error() {
        let status = DiscoveryStatus::default();
        assert_eq!(status.source(), None);
        assert_eq!(status.updates(), 0);
        assert_eq!(status.last_sync(), None);
        assert_eq!(status.last_error(), None);
    }

    #[test]
    fn only_changed_lists_count_as_updates_but_every_list_is_a_sync() {
        let status = DiscoveryStatus::default();
        let before = SystemTime::now() - Duration::from_secs(1);
        status.record_sync(true);
        status.record_sync(false);
        assert_eq!(status.updates(), 1);
        assert!(status.last_sync().expect("synced") >= before);
    }

    #[test]
    fn the_first_source_wins() {
        let status = DiscoveryStatus::default();
        status.set_source(SourceKind::Kubernetes);
        status.set_source(SourceKind::Static);
        assert_eq!(status.source(), Some(SourceKind::Kubernetes));
    }

    #[test]
    fn an_error_is_kept_with_its_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("watch failed")]
        struct Outer(#[source] std::io::Error);
        let status = DiscoveryStatus::default();
        status.record_error(&Outer(std::io::Error::other("connection refused")));
        let error = status.last_error().expect("recorded");
        assert_eq!(error.message, "watch failed: connection refused");
    }
}
