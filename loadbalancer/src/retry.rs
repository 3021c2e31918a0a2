//! Retries: which failed attempts the proxy may repeat on another backend, and
//! how many.
//!
//! The proxy asks [`RetryPolicy::should_retry`] after every failed attempt. Three
//! things must all allow it:
//!
//! * **the failure and the method** ([`RetryReason`]): a connect failure means
//!   nothing reached the backend, and a stream that an HTTP/2 backend refused
//!   was never processed, so any request may go elsewhere. A reset before
//!   the response, or a 502/503 answer, means the backend may have seen (and acted
//!   on) the request, so only idempotent methods (RFC 9110 section 9.2.2: GET,
//!   HEAD, OPTIONS, PUT, DELETE; TRACE too) are repeated. Timeouts are not retried:
//!   the client has already waited the full timeout once.
//! * **the body** ([`body::RetryBody`]): what was sent of it must still be kept
//!   (up to 64 KiB) to send again.
//! * **the attempt bound and the budget** ([`RetryBudget`]): at most `attempts`
//!   tries per request, and retries at most `budgetPercent` of recent requests.
//!   Without a budget, a backend failure storm would multiply the load on the
//!   survivors by `attempts` just when they can least take it.

pub mod body;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// Retry limits (config block `retries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    /// Attempts per request, the first included; 1 turns retries off.
    pub attempts: u32,
    /// Retries allowed as a percentage of the requests in the budget window.
    pub budget_percent: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            attempts: 3,
            budget_percent: 20,
        }
    }
}

impl RetrySettings {
    /// One attempt per request: retries off.
    pub const OFF: Self = Self {
        attempts: 1,
        budget_percent: 0,
    };
}

/// `retries` in the config file: failed attempts repeated on another backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetriesConfig {
    /// Attempts per request, the first included; 1 turns retries off. Default 3,
    /// at most [`MAX_ATTEMPTS`].
    pub attempts: u32,
    /// Retries allowed as a percentage of the requests of the last 10 s (plus 3
    /// per second whatever the traffic), 0 to 100. Default 20.
    pub budget_percent: u32,
}

/// Upper bound for `retries.attempts`: more would only multiply load.
pub const MAX_ATTEMPTS: u32 = 10;

impl Default for RetriesConfig {
    fn default() -> Self {
        let RetrySettings {
            attempts,
            budget_percent,
        } = RetrySettings::default();
        Self {
            attempts,
            budget_percent,
        }
    }
}

impl RetriesConfig {
    /// Checks the ranges; the error names the key and the reason.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=MAX_ATTEMPTS).contains(&self.attempts) {
            return Err((
                "retries.attempts",
                format!("must be between 1 and {MAX_ATTEMPTS}"),
            ));
        }
        if self.budget_percent > 100 {
            return Err((
                "retries.budgetPercent",
                "must be between 0 and 100".to_owned(),
            ));
        }
        Ok(())
    }
}

impl From<&RetriesConfig> for RetrySettings {
    fn from(config: &RetriesConfig) -> Self {
        Self {
            attempts: config.attempts,
            budget_percent: config.budget_percent,
        }
    }
}

/// Why an attempt may be worth repeating elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// The connection could not be opened: nothing was sent.
    Connect,
    /// The connection broke (or the answer was not HTTP) before a response head.
    Reset,
    /// An HTTP/2 backend refused the request before processing it
    /// (`REFUSED_STREAM`, or above its GOAWAY's last stream id).
    Refused,
    /// The backend answered 502 or 503.
    Status(StatusCode),
}

impl RetryReason {
    /// Whether a request with `method` may be retried after this failure.
    pub fn allows(self, method: &Method) -> bool {
        match self {
            // Nothing was processed, so even a POST is safe to send again.
            RetryReason::Connect | RetryReason::Refused => true,
            RetryReason::Reset | RetryReason::Status(_) => is_idempotent(method),
        }
    }

    /// A response status worth retrying for, if `status` is one.
    pub fn from_status(status: StatusCode) -> Option<Self> {
        matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
        )
        .then_some(RetryReason::Status(status))
    }

    /// A short name for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect",
            RetryReason::Reset => "reset",
            RetryReason::Refused => "refused",
            RetryReason::Status(StatusCode::BAD_GATEWAY) => "status 502",
            RetryReason::Status(_) => "status 503",
        }
    }
}

/// Methods whose repetition has the same effect as one request (RFC 9110 9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The attempt bound and the budget, shared by every request.
#[derive(Debug)]
pub struct RetryPolicy {
    /// See [`RetrySettings::attempts`]; atomic so a config reload can change it.
    attempts: AtomicU32,
    /// Shared by all requests: the budget is global, not per request.
    budget: RetryBudget,
    /// Retries granted since start, for tests and the status page.
    retries: AtomicU64,
}

impl RetryPolicy {
    /// A policy with `settings`.
    pub fn new(settings: RetrySettings) -> Self {
        Self {
            attempts: AtomicU32::new(settings.attempts.max(1)),
            budget: RetryBudget::new(settings.budget_percent, Instant::now()),
            retries: AtomicU64::new(0),
        }
    }

    /// Applies new limits from the next request on. The budget's window keeps
    /// its counts: a reload does not hand out a fresh allowance of retries.
    pub fn reconfigure(&self, settings: RetrySettings) {
        self.attempts
            .store(settings.attempts.max(1), Ordering::Relaxed);
        self.budget.set_percent(settings.budget_percent);
    }

    /// Whether retries are on at all (the proxy then keeps what it needs to
    /// rebuild a request).
    pub fn enabled(&self) -> bool {
        self.attempts.load(Ordering::Relaxed) > 1
    }

    /// Counts a new client request into the budget.
    pub fn start_request(&self) {
        self.start_request_at(Instant::now());
    }

    /// Like [`start_request`](Self::start_request), for a request that arrived
    /// at `now`: the proxy has read the clock already.
    pub fn start_request_at(&self, now: Instant) {
        if self.enabled() {
            self.budget.deposit(now);
        }
    }

    /// Whether attempt number `made + 1` may happen: under the attempt bound and
    /// within the budget (which this spends if it says yes).
    pub fn should_retry(&self, made: u32) -> bool {
        let granted =
            made < self.attempts.load(Ordering::Relaxed) && self.budget.withdraw(Instant::now());
        if granted {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
        granted
    }

    /// Retries granted since start.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

/// Retries at most `percent`% of the requests seen in the last
/// [`RetryBudget::WINDOW`], plus [`RetryBudget::MIN_RETRIES`] per window so that a
/// quiet load balancer can still retry its occasional failure.
///
/// The window is a ring of one-second buckets that age out as time passes. It
/// sits behind a `std` mutex held for a handful of instructions and never across
/// an `.await`; with one deposit per request and one withdrawal per retry that is
/// far below the cost of the request itself.
#[derive(Debug)]
pub struct RetryBudget {
    /// Allowed retries as a percentage of requests in the window; atomic so a
    /// config reload can change it.
    percent: AtomicU64,
    /// When the bucket ring started; bucket `i` covers second `i` since then.
    epoch: Instant,
    /// The ring.
    buckets: Mutex<Buckets>,
}

/// Requests and retries per second for the last [`BUCKETS`] seconds.
#[derive(Debug, Default)]
struct Buckets {
    /// The second (since `epoch`) that `slots[second % BUCKETS]` last counted.
    current: u64,
    /// `(requests, retries)` per second.
    slots: [(u64, u64); BUCKETS],
}

const BUCKETS: usize = 10;

impl RetryBudget {
    /// How far back the budget looks.
    pub const WINDOW: Duration = Duration::from_secs(BUCKETS as u64);
    /// Retries always allowed per window, whatever the traffic (3 per second).
    pub const MIN_RETRIES: u64 = 30;

    /// A budget of `percent`% that starts empty at `now`.
    pub fn new(percent: u32, now: Instant) -> Self {
        Self {
            percent: AtomicU64::new(Self::clamp(percent)),
            epoch: now,
            buckets: Mutex::new(Buckets::default()),
        }
    }

    /// Allows `percent`% from now on, counting the window's traffic so far.
    pub fn set_percent(&self, percent: u32) {
        self.percent.store(Self::clamp(percent), Ordering::Relaxed);
    }

    fn clamp(percent: u32) -> u64 {
        u64::from(percent.min(100))
    }

    /// Counts one request.
    pub fn deposit(&self, now: Instant) {
        self.with_buckets(now, |buckets, slot| buckets.slots[slot].0 += 1);
    }

    /// Spends one retry if the window allows it; returns whether it did.
    pub fn withdraw(&self, now: Instant) -> bool {
        self.with_buckets(now, |buckets, slot| {
            let (requests, retries) = buckets
                .slots
                .iter()
                .fold((0, 0), |(q, r), (bq, br)| (q + bq, r + br));
            let percent = self.percent.load(Ordering::Relaxed);
            let allowed = Self::MIN_RETRIES + requests * percent / 100;
            let ok = retries < allowed;
            if ok {
                buckets.slots[slot].1 += 1;
            }
            ok
        })
    }

    /// Ages the ring to `now` and runs `f` with the current slot's index.
    fn with_buckets<R>(&self, now: Instant, f: impl FnOnce(&mut Buckets, usize) -> R) -> R {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        // A poisoned lock only means a panic mid-count; the counts are still numbers.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Clear every second that passed since the last call (all of them if a
        // whole window passed), so old traffic stops counting.
        let stale = second.saturating_sub(buckets.current).min(BUCKETS as u64);
        for s in 1..=stale {
            let index = slot_of(buckets.current + s);
            buckets.slots[index] = (0, 0);
        }
        buckets.current = buckets.current.max(second);
        f(&mut buckets, slot_of(second))
    }
}

fn slot_of(second: u64) -> usize {
    // The modulo is below BUCKETS, so the cast cannot truncate.
    (second % BUCKETS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend_all(budget: &RetryBudget, now: Instant) -> u64 {
        let mut spent = 0;
        while budget.withdraw(now) {
            spent += 1;
            assert!(spent < 1_000_000, "budget never runs out");
        }
        spent
    }

    #[test]
    fn a_quiet_budget_still_allows_the_floor() {
        let now = Instant::now();
        let budget = RetryBudget::new(20, now);
        assert_eq!(spend_all(&budget, now), RetryBudget::MIN_RETRIES);
    }

    #[test]
    fn retries_are_limited_to_the_percentage_of_requests() {
        let now = Instant::now();
        let budget = RetryBudget::new(20, now);
        for _ in 0..1_000 {
            budget.deposit(now);
        }
        assert_eq!(spend_all(&budget, now), RetryBudget::MIN_RETRIES + 200);
    }

    #[test]
    fn old_traffic_and_old_retries_age_out_of_the_window() {
        let start = Instant::now();
        let budget = RetryBudget::new(50, start);
        for _ in 0..100 {
            budget.deposit(start);
        }
        assert_eq!(spend_all(&budget, start), RetryBudget::MIN_RETRIES + 50);
        // Half a window later the same second's counts still apply.
        assert!(!budget.withdraw(start + Duration::from_secs(5)));
        // A whole window later only the floor is left.
        let later = start + RetryBudget::WINDOW + Duration::from_secs(1);
        assert_eq!(spend_all(&budget, later), RetryBudget::MIN_RETRIES);
    }

    #[test]
    fn the_attempt_bound_counts_the_first_attempt() {
        let policy = RetryPolicy::new(RetrySettings {
            attempts: 3,
            budget_percent: 20,
        });
        assert!(policy.should_retry(1));
        assert!(policy.should_retry(2));
        assert!(!policy.should_retry(3));
        assert!(!RetryPolicy::new(RetrySettings::OFF).should_retry(1));
    }

    #[test]
    fn reconfiguring_changes_the_bound_and_keeps_the_window() {
        let policy = RetryPolicy::new(RetrySettings::OFF);
        policy.start_request();
        assert!(!policy.should_retry(1));
        policy.reconfigure(RetrySettings {
            attempts: 2,
            budget_percent: 100,
        });
        assert!(policy.enabled());
        assert!(policy.should_retry(1));
        assert!(!policy.should_retry(2));
        policy.reconfigure(RetrySettings::OFF);
        assert!(!policy.should_retry(1));
    }

    #[test]
    fn a_new_percentage_applies_to_the_traffic_already_counted() {
        let now = Instant::now();
        let budget = RetryBudget::new(0, now);
        for _ in 0..100 {
            budget.deposit(now);
        }
        budget.set_percent(10);
        assert_eq!(spend_all(&budget, now), RetryBudget::MIN_RETRIES + 10);
    }

    #[test]
    fn connect_failures_allow_any_method_the_rest_only_idempotent_ones() {
        assert!(RetryReason::Connect.allows(&Method::POST));
        assert!(!RetryReason::Reset.allows(&Method::POST));
        assert!(!RetryReason::Reset.allows(&Method::PATCH));
        let unavailable = RetryReason::from_status(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            unavailable,
            Some(RetryReason::Status(StatusCode::SERVICE_UNAVAILABLE))
        );
        for method in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(RetryReason::Reset.allows(&method), "{method}");
        }
        assert_eq!(
            RetryReason::from_status(StatusCode::INTERNAL_SERVER_ERROR),
            None
        );
        assert_eq!(RetryReason::from_status(StatusCode::GATEWAY_TIMEOUT), None);
    }
}
