//! Outlier detection: passive health checks, a circuit breaker per backend.
//!
//! Active health checks ([`crate::health`]) ask a backend how it is every few
//! seconds; this module watches what real traffic says, which is faster. After
//! every attempt the proxy reports its outcome here. A run of `consecutiveFailures`
//! failures in a row (connect error, reset, timeout, 5xx) *ejects* the backend: the
//! balancer skips it until the ejection ends.
//!
//! The ejection time is `baseEjectionMs` doubled for each ejection since the
//! backend last succeeded, capped at `maxEjectionMs`, so a backend that is down
//! for good is tried rarely while one that hiccuped once is back soon. When an
//! ejection runs out the circuit is *half-open*: the proxy asks
//! [`OutlierDetector::admit`] before each attempt, and exactly one request, the
//! trial, is let through while the backend stays out of rotation (its ejection is
//! extended by the trial's own time bound, so a trial that hangs holds up no other
//! request). The trial decides: a success closes the circuit (counters reset), a
//! failure ejects the backend again, for twice as long. A trial that never reports
//! (its client hung up) simply lets the next one through when its bound runs out.
//!
//! Outcomes of ordinary requests that arrive while the backend is ejected
//! (requests already on their way when it was ejected, or sent while every
//! backend is out and the balancer uses them all) are ignored: they say nothing
//! new, and counting them would stretch the next ejection for no reason.
//!
//! Availability is published through [`BackendState::eject_until`], so the
//! balancer and the admin pages see it; the counters that lead there live in an
//! [`OutlierState`](crate::backend_state::OutlierState) inside the same [`BackendState`], so they appear and vanish
//! with the endpoint and need no map or pruning of their own. All of it is
//! atomics: reports come from many request tasks at once.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::backend_state::BackendState;

/// When to eject a backend and for how long (config block `outlier`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Failures in a row that eject a backend whose circuit is closed.
    pub consecutive_failures: u32,
    /// Length of a first ejection.
    pub base_ejection: Duration,
    /// Longest ejection, however often the backend failed.
    pub max_ejection: Duration,
}

impl Default for OutlierSettings {
    /// The config file's defaults, converted.
    fn default() -> Self {
        Self::from(&OutlierConfig::default())
    }
}

/// `outlier` in the config file: ejects a backend whose requests keep failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failures in a row (connect error, reset, timeout, 5xx) that eject a
    /// backend. Default 5.
    pub consecutive_failures: u32,
    /// First ejection time; it doubles with each ejection until the backend
    /// succeeds again. Default 5000.
    pub base_ejection_ms: u64,
    /// Cap on the ejection time. Default 60000.
    pub max_ejection_ms: u64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 5000,
            max_ejection_ms: 60_000,
        }
    }
}

impl OutlierConfig {
    /// Checks the ranges; the error names the key and the reason.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let fail = |field, reason: &str| Err((field, reason.to_owned()));
        if self.consecutive_failures == 0 {
            return fail("outlier.consecutiveFailures", "must be at least 1");
        }
        if self.base_ejection_ms == 0 {
            return fail("outlier.baseEjectionMs", "must be greater than 0");
        }
        if self.max_ejection_ms < self.base_ejection_ms {
            return fail(
                "outlier.maxEjectionMs",
                "must be at least outlier.baseEjectionMs",
            );
        }
        Ok(())
    }
}

impl From<&OutlierConfig> for OutlierSettings {
    fn from(config: &OutlierConfig) -> Self {
        Self {
            consecutive_failures: config.consecutive_failures,
            base_ejection: Duration::from_millis(config.base_ejection_ms),
            max_ejection: Duration::from_millis(config.max_ejection_ms),
        }
    }
}

/// What kind of attempt the detector let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// An ordinary request.
    Normal,
    /// The one request that decides a half-open circuit.
    Trial,
}

/// How one attempt at a backend ended, as far as its health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// Connect error, reset, timeout, or a 5xx response.
    Failure,
}

/// Applies [`OutlierSettings`] to the outcomes the proxy reports.
#[derive(Debug, Clone, Copy)]
pub struct OutlierDetector {
    settings: OutlierSettings,
    /// The longest a trial request can take (the proxy's connect plus request
    /// timeouts): how long the backend stays out of rotation while it runs.
    trial_bound: Duration,
}

impl OutlierDetector {
    /// A detector with `settings` for a proxy whose attempts end within
    /// `trial_bound`.
    pub fn new(settings: OutlierSettings, trial_bound: Duration) -> Self {
        Self {
            settings,
            trial_bound,
        }
    }

    /// Asks whether an attempt may go to a backend the balancer picked. `None`
    /// means another request is already the half-open trial: pick another
    /// backend. An ejected backend is admitted as [`Admission::Normal`]: the
    /// balancer only picks one when no backend is available at all.
    pub fn admit(&self, state: &BackendState, now: Instant) -> Option<Admission> {
        let half_open = state.outlier().ejections() > 0 && state.ejected_until(now).is_none();
        if !half_open {
            return Some(Admission::Normal);
        }
        state
            .extend_expired_ejection(now, now + self.trial_bound)
            .then_some(Admission::Trial)
    }

    /// Takes the outcome of one attempt at `backend` into account. Returns the
    /// end of a new ejection if this outcome caused one.
    pub fn report(
        &self,
        backend: SocketAddr,
        state: &BackendState,
        admission: Admission,
        outcome: Outcome,
        now: Instant,
    ) -> Option<Instant> {
        let counters = state.outlier();
        match (admission, outcome) {
            (Admission::Trial, Outcome::Success) => {
                counters.consecutive_failures.store(0, Ordering::Relaxed);
                counters.ejections.store(0, Ordering::Relaxed);
                state.clear_ejection();
                info!(backend = %backend, "trial request succeeded, backend restored");
                None
            }
            (Admission::Trial, Outcome::Failure) => {
                // The one trial: nothing races it, the ejection it extended ends.
                let until = self.next_ejection_end(state, now);
                state.eject_until(until);
                Some(self.ejected(backend, state, now, until))
            }
            (Admission::Normal, _) if state.ejected_until(now).is_some() => None,
            (Admission::Normal, Outcome::Success) => {
                counters.consecutive_failures.store(0, Ordering::Relaxed);
                None
            }
            (Admission::Normal, Outcome::Failure) => {
                let failures = counters
                    .consecutive_failures
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                // `>=`, so a threshold that a reload lowered below the count
                // already reached still ejects. Of several failures racing past
                // it, only the one whose count is still current goes on (by
                // resetting the count).
                let claimed = failures >= self.settings.consecutive_failures.max(1)
                    && counters
                        .consecutive_failures
                        .compare_exchange(failures, 0, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok();
                if !claimed {
                    return None;
                }
                // Failures counted after another one claimed an ejection, but
                // before that ejection was in force, can claim again: the
                // ejection itself is taken with a compare-and-swap, so exactly
                // one of them ejects.
                let until = self.next_ejection_end(state, now);
                state
                    .eject_unless_ejected(now, until)
                    .then(|| self.ejected(backend, state, now, until))
            }
        }
    }

    /// When an ejection starting at `now` would end: the next backoff in the
    /// backend's series.
    fn next_ejection_end(&self, state: &BackendState, now: Instant) -> Instant {
        now + self.ejection_time(state.outlier().ejections())
    }

    /// Counts an ejection until `until` that this call has put in force.
    fn ejected(
        &self,
        backend: SocketAddr,
        state: &BackendState,
        now: Instant,
        until: Instant,
    ) -> Instant {
        let counters = state.outlier();
        counters.consecutive_failures.store(0, Ordering::Relaxed);
        let ejections = counters.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        warn!(
            backend = %backend, ejections, ejected_ms = (until - now).as_millis(),
            "backend ejected"
        );
        until
    }

    /// `base × 2^previous`, capped at the maximum.
    fn ejection_time(&self, previous: u32) -> Duration {
        let factor = 1u32.checked_shl(previous).unwrap_or(u32::MAX);
        self.settings
            .base_ejection
            .saturating_mul(factor)
            .min(self.settings.max_ejection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKEND: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);
    const TRIAL_BOUND: Duration = Duration::from_millis(100);

    fn detector() -> OutlierDetector {
        OutlierDetector::new(
            OutlierSettings {
                consecutive_failures: 3,
                base_ejection: Duration::from_secs(1),
                max_ejection: Duration::from_secs(3),
            },
            TRIAL_BOUND,
        )
    }

    /// One ordinary attempt with `outcome`.
    fn report(
        detector: &OutlierDetector,
        state: &BackendState,
        outcome: Outcome,
        now: Instant,
    ) -> Option<Instant> {
        let admission = detector.admit(state, now).expect("no trial is running");
        detector.report(BACKEND, state, admission, outcome, now)
    }

    fn fail_n(
        detector: &OutlierDetector,
        state: &BackendState,
        n: usize,
        now: Instant,
    ) -> Vec<Option<Instant>> {
        (0..n)
            .map(|_| report(detector, state, Outcome::Failure, now))
            .collect()
    }

    #[test]
    fn consecutive_failures_eject_at_the_threshold() {
        let (detector, state, now) = (detector(), BackendState::new(), Instant::now());
        let results = fail_n(&detector, &state, 3, now);
        assert_eq!(results[..2], [None, None]);
        assert_eq!(results[2], Some(now + Duration::from_secs(1)));
        assert!(!state.is_available(now));
        assert!(state.is_available(now + Duration::from_secs(1)));
    }

    #[test]
    fn a_threshold_lowered_below_the_run_so_far_ejects_at_the_next_failure() {
        let (state, now) = (BackendState::new(), Instant::now());
        let lenient = OutlierDetector::new(
            OutlierSettings {
                consecutive_failures: 100,
                ..OutlierSettings::default()
            },
            TRIAL_BOUND,
        );
        assert_eq!(fail_n(&lenient, &state, 5, now), [None; 5]);
        // What a config reload does: a new detector over the same counters.
        let strict = detector();
        assert!(report(&strict, &state, Outcome::Failure, now).is_some());
        assert_eq!(state.outlier().ejections(), 1);
    }

    #[test]
    fn racing_failures_past_the_threshold_eject_once() {
        let (detector, state, now) = (detector(), BackendState::new(), Instant::now());
        let ejections = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| fail_n(&detector, &state, 100, now)))
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("no panic"))
                .filter(Option::is_some)
                .count()
        });
        // The first ejection makes every later report one "during an ejection".
        assert_eq!(ejections, 1);
        assert_eq!(state.outlier().ejections(), 1);
    }

    #[test]
    fn a_success_resets_the_run_of_failures() {
        let (detector, state, now) = (detector(), BackendState::new(), Instant::now());
        fail_n(&detector, &state, 2, now);
        report(&detector, &state, Outcome::Success, now);
        assert_eq!(fail_n(&detector, &state, 2, now), [None, None]);
        assert!(state.is_available(now));
    }

    #[test]
    fn outcomes_during_an_ejection_are_ignored() {
        let (detector, state, now) = (detector(), BackendState::new(), Instant::now());
        fail_n(&detector, &state, 3, now);
        let later = now + Duration::from_millis(500);
        assert_eq!(fail_n(&detector, &state, 10, later), [None; 10]);
        report(&detector, &state, Outcome::Success, later);
        // Still ejected, and for no longer than the first ejection.
        assert!(!state.is_available(later));
        assert!(state.is_available(now + Duration::from_millis(1001)));
        assert_eq!(state.outlier().ejections(), 1);
    }

    #[test]
    fn only_one_trial_runs_when_an_ejection_ends() {
        let (detector, state, now) = (detector(), BackendState::new(), Instant::now());
        fail_n(&detector, &state, 3, now);
        let expired = now + Duration::from_secs(2);
        assert_eq!(detector.admit(&state, expired), Some(Admission::Trial));
        assert!(
            !state.is_available(expired),
            "the trial keeps it out of rotation"
        );
        // Picked anyway (every backend is out): an ordinary request, not a trial.
        assert_eq!(detector.admit(&state, expired), Some(Admission::Normal));
        // A trial that never reports: the next one goes through after its bound.
        let abandoned = expired + TRIAL_BOUND + Duration::from_millis(1);
        assert_eq!(detector.admit(&state, abandoned), Some(Admission::Trial));
    }

    #[test]
    fn a_failed_trial_ejects_again_for_twice_as_long_up_to_the_cap() {
        let (detector, state) = (detector(), BackendState::new());
        let mut now = Instant::now();
        fail_n(&detector, &state, 3, now);
        for expected in [2, 3, 3] {
            now += Duration::from_secs(5);
            assert_eq!(detector.admit(&state, now), Some(Admission::Trial));
            let until = detector.report(BACKEND, &state, Admission::Trial, Outcome::Failure, now);
            assert_eq!(until, Some(now + Duration::from_secs(expected)));
        }
    }

    #[test]
    fn a_successful_trial_closes_the_circuit() {
        let (detector, state, now) = (detector(), BackendState::new(), Instant::now());
        fail_n(&detector, &state, 3, now);
        let expired = now + Duration::from_secs(2);
        assert_eq!(detector.admit(&state, expired), Some(Admission::Trial));
        detector.report(BACKEND, &state, Admission::Trial, Outcome::Success, expired);
        assert_eq!(state.outlier().ejections(), 0);
        assert!(state.is_available(expired));
        // Closed again: it takes the full run of failures to eject, for the base time.
        assert_eq!(fail_n(&detector, &state, 2, expired), [None, None]);
        let until = report(&detector, &state, Outcome::Failure, expired);
        assert_eq!(until, Some(expired + Duration::from_secs(1)));
    }
}
