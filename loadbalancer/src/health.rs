//! Active health checks: one background task that probes every backend.
//!
//! Kubernetes already keeps pods that fail their readiness probe out of the
//! EndpointSlice, but only as fast as the kubelet probes and the update reaches
//! us, and only for failures the kubelet can see from the node. This task asks
//! each backend itself, from where the load balancer stands: every `intervalMs` it
//! sends `GET <path>` to each current backend with a `timeoutMs` bound. After
//! `unhealthyThreshold` failed probes in a row it marks the backend unhealthy in its
//! [`BackendState`], and the balancer skips it; after `healthyThreshold` successes
//! in a row it marks it healthy again.
//!
//! New endpoints start healthy ([`BackendState::new`]): discovery only publishes
//! endpoints that Kubernetes reports ready, so waiting for probes before using
//! them would only slow down scale-ups and rolling updates.
//!
//! With `grpcService` set, a probe is the standard gRPC health check instead
//! (`grpc.health.v1.Health/Check` over HTTP/2, [`grpc::probe`]): it passes when
//! the call succeeds with `SERVING`, so a gRPC server that reports itself
//! `NOT_SERVING` (draining, say) leaves the rotation like one that fails.
//!
//! The task reads the current list at the start of every round, so it never probes
//! an endpoint that discovery removed, and its per-backend streaks are pruned to
//! that list. Probes of one round run concurrently (at most
//! [`MAX_CONCURRENT_PROBES`] at a time) over the proxy's own HTTP/1.1 client, but
//! with a connection pool of their own, so a slow backend delays only its own
//! verdict and probes never queue behind (or hold) the proxy's pooled
//! connections. Nothing here is on the request path: the proxy only reads the
//! `healthy` flag this task sets.

mod grpc;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::uri::PathAndQuery;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backend_state::BackendState;
use crate::backends::{BackendProtocol, Backends};
use crate::balancer::random_below;
use crate::upstream::{Http2Pool, UpstreamError, UpstreamHead, UpstreamPool};

/// Probes in flight at once, whatever the number of backends: enough for
/// hundreds of endpoints per interval, few enough not to look like a flood.
pub const MAX_CONCURRENT_PROBES: usize = 32;

/// What to probe and when to change a verdict (config block `healthCheck`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSettings {
    /// Path (and query) of the probe request.
    pub path: PathAndQuery,
    /// Time between the starts of two rounds.
    pub interval: Duration,
    /// Bound on one probe, connect included.
    pub timeout: Duration,
    /// Failed probes in a row that mark a backend unhealthy.
    pub unhealthy_threshold: u32,
    /// Successful probes in a row that mark it healthy again.
    pub healthy_threshold: u32,
    /// Probe with the gRPC health check of this service (`""`: the server as
    /// a whole) instead of `GET <path>`.
    pub grpc_service: Option<String>,
    /// What the backends speak, when the config says (`backendProtocol`);
    /// otherwise what their Service says. `GET <path>` goes over HTTP/2 to
    /// backends that speak h2c.
    pub backend_protocol: Option<BackendProtocol>,
}

impl HealthCheckSettings {
    /// These settings, probing backends that the config says speak `protocol`.
    pub fn speaking(self, protocol: Option<BackendProtocol>) -> Self {
        Self {
            backend_protocol: protocol,
            ..self
        }
    }
}

/// `healthCheck`: every backend is probed with `GET <path>` every `intervalMs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// The path probed; any 2xx answer is a success. Default `/healthz`, the
    /// backend's liveness endpoint.
    pub path: String,
    /// Time between probe rounds. Default 5000.
    pub interval_ms: u64,
    /// How long one probe may take before it counts as failed. Default 1000.
    pub timeout_ms: u64,
    /// Failed probes in a row that take a backend out of rotation. Default 3.
    pub unhealthy_threshold: u32,
    /// Successful probes in a row that put it back. Default 2.
    pub healthy_threshold: u32,
    /// Set, for gRPC backends: probe with `grpc.health.v1.Health/Check` for
    /// this service name (`""` asks about the server as a whole) over HTTP/2,
    /// instead of `GET <path>`. Default: unset.
    pub grpc_service: Option<String>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: "/healthz".to_owned(),
            interval_ms: 5000,
            timeout_ms: 1000,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            grpc_service: None,
        }
    }
}

impl HealthCheckConfig {
    /// Checks the values; the error names the key and the reason.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let fail = |field, reason: &str| Err((field, reason.to_owned()));
        if !self.path.starts_with('/') || self.path.parse::<http::uri::PathAndQuery>().is_err() {
            return fail("healthCheck.path", "must be a path starting with /");
        }
        if self.interval_ms == 0 {
            return fail("healthCheck.intervalMs", "must be greater than 0");
        }
        if self.timeout_ms == 0 {
            return fail("healthCheck.timeoutMs", "must be greater than 0");
        }
        if self.unhealthy_threshold == 0 {
            return fail("healthCheck.unhealthyThreshold", "must be at least 1");
        }
        if self.healthy_threshold == 0 {
            return fail("healthCheck.healthyThreshold", "must be at least 1");
        }
        Ok(())
    }
}

impl From<&HealthCheckConfig> for HealthCheckSettings {
    fn from(config: &HealthCheckConfig) -> Self {
        Self {
            // Config validation already parsed it; `/` is a safe stand-in anyway.
            path: config
                .path
                .parse()
                .unwrap_or_else(|_| PathAndQuery::from_static("/")),
            interval: Duration::from_millis(config.interval_ms),
            timeout: Duration::from_millis(config.timeout_ms),
            unhealthy_threshold: config.unhealthy_threshold,
            healthy_threshold: config.healthy_threshold,
            grpc_service: config.grpc_service.clone(),
            backend_protocol: None,
        }
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The backend answered, but not with a 2xx.
    #[error("answered {0}")]
    Status(StatusCode),
    /// No connection, or the connection broke.
    #[error("request failed: {0}")]
    Request(#[from] UpstreamError),
    /// No complete answer within the timeout.
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The gRPC health check failed, or said the server is not serving.
    #[error("gRPC health check: {0}")]
    Grpc(String),
    /// The HTTP/2 exchange failed.
    #[error("HTTP/2 request failed: {0}")]
    Http2(String),
}

/// The health-check task's state.
#[derive(Debug)]
pub struct HealthChecker {
    /// The list to probe (read each round) and where verdicts go.
    backends: Backends,
    settings: HealthCheckSettings,
    /// What sends the probes, shared with the round's probe futures so that
    /// results can be applied while the round goes on.
    prober: Arc<Prober>,
    /// Consecutive results per backend, pruned to the current list every round.
    streaks: HashMap<SocketAddr, Streak>,
}

/// What a probe needs.
#[derive(Debug)]
struct Prober {
    /// Where the backend port's protocol, as the EndpointSlices say, is read.
    backends: Backends,
    settings: HealthCheckSettings,
    /// The probe request, encoded once.
    request: UpstreamHead,
    /// Probes' own connections: never the proxy's pool (see the module docs).
    pool: UpstreamPool,
    /// The same for gRPC health checks, over HTTP/2.
    http2: Http2Pool,
}

/// A backend's current run of probe results.
#[derive(Debug)]
struct Streak {
    /// The state these results belong to. An address that was removed and added
    /// again gets a new state, and its old streak must not carry over.
    state: Arc<BackendState>,
    /// Successes in a row (0 after a failure).
    successes: u32,
    /// Failures in a row (0 after a success).
    failures: u32,
}

impl HealthChecker {
    /// A checker over `backends`.
    pub fn new(backends: Backends, settings: HealthCheckSettings) -> Self {
        // No `Host`: each probe names the backend it goes to. A path and a
        // header name that are constants make a valid request; the default
        // (`GET /`) is a stand-in that cannot be needed.
        let (request, body) = Request::get(settings.path.as_str())
            .header(http::header::USER_AGENT, "loadbalancer-health-check")
            .body(Empty::<Bytes>::new())
            .unwrap_or_default()
            .into_parts();
        Self {
            prober: Arc::new(Prober {
                backends: backends.clone(),
                settings: settings.clone(),
                request: UpstreamHead::new(&request, &body, &[]),
                pool: UpstreamPool::new(),
                http2: Http2Pool::new(1),
            }),
            backends,
            settings,
            streaks: HashMap::new(),
        }
    }

    /// Probes every backend each interval, spread over it, forever; spawn it on
    /// its own task.
    pub async fn run(mut self) {
        info!(
            path = %self.settings.path, interval_ms = self.settings.interval.as_millis(),
            timeout_ms = self.settings.timeout.as_millis(), "active health checks started"
        );
        let interval = self.settings.interval;
        // The first round begins one interval after start, not at once: every
        // backend starts healthy, so an early probe could only confirm that.
        let mut start = Instant::now() + interval;
        loop {
            tokio::time::sleep_until(start).await;
            self.spread_round(start).await;
            // A round that overran (slow backends holding the concurrency
            // bound) delays the next one instead of being followed by a burst.
            start = (start + interval).max(Instant::now());
        }
    }

    /// One round over the interval from `start`: each current backend is probed
    /// at a random point of its own slot (see the module docs).
    async fn spread_round(&mut self, start: Instant) {
        let current = self.backends.states();
        let slots = current.len();
        let interval = self.settings.interval;
        self.probe_each(current, |slot| {
            let jitter = random_below(1 << 20) as f64 / f64::from(1 << 20);
            on_tick(start, slot_time(start, interval, slot, slots, jitter))
        })
        .await;
    }

    /// Probes each current backend once, all at once (as many at a time as
    /// [`MAX_CONCURRENT_PROBES`] allows), and applies the verdicts: a round
    /// without the slots [`HealthChecker::run`] spreads its rounds over.
    pub async fn round(&mut self) {
        let current = self.backends.states();
        let now = Instant::now();
        self.probe_each(current, |_| now).await;
    }

    /// Probes each of `current` (the list, as [`Backends::states`] gives it) at
    /// the time `at` gives for its place in it, applying each result as it comes.
    async fn probe_each(
        &mut self,
        current: Vec<(SocketAddr, Arc<BackendState>)>,
        at: impl Fn(usize) -> Instant,
    ) {
        // `current` is in list order, which is sorted.
        self.streaks
            .retain(|addr, _| current.binary_search_by_key(addr, |(a, _)| *a).is_ok());
        let prober = Arc::clone(&self.prober);
        let mut results = futures::stream::iter(current.into_iter().enumerate())
            .map(|(slot, (addr, state))| {
                let (when, prober) = (at(slot), Arc::clone(&prober));
                async move {
                    tokio::time::sleep_until(when).await;
                    // Removed (or removed and added again) since the round
                    // began: a verdict on it would be thrown away.
                    if !prober.backends.is_current(addr, &state) {
                        return None;
                    }
                    let result = prober.probe(addr).await;
                    Some((addr, state, result))
                }
            })
            .buffer_unordered(MAX_CONCURRENT_PROBES);
        while let Some(outcome) = results.next().await {
            if let Some((addr, state, result)) = outcome {
                self.apply(addr, state, result);
            }
        }
    }

    /// Counts one probe result and flips the verdict at a threshold.
    fn apply(
        &mut self,
        addr: SocketAddr,
        state: Arc<BackendState>,
        result: Result<(), ProbeError>,
    ) {
        let streak = self
            .streaks
            .entry(addr)
            .and_modify(|streak| {
                if !Arc::ptr_eq(&streak.state, &state) {
                    *streak = Streak::new(Arc::clone(&state));
                }
            })
            .or_insert_with(|| Streak::new(Arc::clone(&state)));
        match result {
            Ok(()) => {
                streak.successes = streak.successes.saturating_add(1);
                streak.failures = 0;
                if !state.is_healthy() && streak.successes >= self.settings.healthy_threshold {
                    state.set_healthy(true);
                    info!(backend = %addr, successes = streak.successes, "backend healthy again");
                }
            }
            Err(error) => {
                streak.failures = streak.failures.saturating_add(1);
                streak.successes = 0;
                if state.is_healthy() && streak.failures >= self.settings.unhealthy_threshold {
                    state.set_healthy(false);
                    warn!(
                        backend = %addr, failures = streak.failures, error = %error,
                        "backend unhealthy, skipped until its health checks pass"
                    );
                } else {
                    debug!(backend = %addr, failures = streak.failures, error = %error, "health check failed");
                }
            }
        }
    }
}

impl Streak {
    fn new(state: Arc<BackendState>) -> Self {
        Self {
            state,
            successes: 0,
            failures: 0,
        }
    }
}

impl Prober {
    /// `GET <path>` on `addr` (or the gRPC health check); the body is read to
    /// the end so the connection can be reused for the next probe.
    async fn probe(&self, addr: SocketAddr) -> Result<(), ProbeError> {
        let settings = &self.settings;
        let timeout = settings.timeout;
        let over_http2 = settings
            .backend_protocol
            .or(self.backends.protocols().backend_port)
            == Some(BackendProtocol::H2c);
        let exchange = async {
            if let Some(service) = &settings.grpc_service {
                return grpc::probe(&self.http2, addr, service, timeout).await;
            }
            if over_http2 {
                return grpc::get(&self.http2, addr, &settings.path, timeout).await;
            }
            let response = self
                .pool
                .send(addr, timeout, &self.request, Empty::<Bytes>::new())
                .await?;
            judge_status(response).await
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(ProbeError::Timeout(timeout)))
    }
}

/// Probes due within one tick of a round go out together, at its start: one
/// wake-up of the task for them all rather than one each (at 10,000 endpoints
/// every 5 s, a wake-up of its own cost a probe as much again as the refused
/// connection itself), and still a hundred small groups a second, not a burst.
const PROBE_TICK: Duration = Duration::from_millis(10);

/// The start of the tick of the round from `start` that `due` falls in.
fn on_tick(start: Instant, due: Instant) -> Instant {
    let ticks = due.saturating_duration_since(start).as_nanos() / PROBE_TICK.as_nanos();
    start + PROBE_TICK * u32::try_from(ticks).unwrap_or(u32::MAX)
}

/// When the probe of `slot` (of `slots`) goes out in a round of `interval` from
/// `start`: `jitter` (from 0 up to 1) of the way through its slot.
fn slot_time(
    start: Instant,
    interval: Duration,
    slot: usize,
    slots: usize,
    jitter: f64,
) -> Instant {
    start + interval.mul_f64((slot as f64 + jitter) / slots as f64)
}

/// The verdict on an HTTP answer: any 2xx passes. The body is read to the
/// end, so the connection (or stream) is done with; a body that breaks off
/// does not change the verdict, the status is the answer.
async fn judge_status<B: hyper::body::Body>(response: http::Response<B>) -> Result<(), ProbeError> {
    let status = response.status();
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}

/// The active health checker's task, which a reload restarts with new settings.
/// Dropping it stops the checker, so it ends with whoever owns it.
#[derive(Debug)]
pub struct HealthTask {
    /// The list the checker probes, handed to each new checker.
    backends: Backends,
    /// The running checker.
    task: JoinHandle<()>,
}

impl HealthTask {
    /// Starts a checker over `backends`.
    pub fn spawn(backends: Backends, settings: HealthCheckSettings) -> Self {
        let task = tokio::spawn(HealthChecker::new(backends.clone(), settings).run());
        Self { backends, task }
    }

    /// Replaces the checker with one using `settings`. Its first round comes one
    /// interval later; until then the verdicts in force stay.
    pub fn restart(&mut self, settings: HealthCheckSettings) {
        self.task.abort();
        self.task = tokio::spawn(HealthChecker::new(self.backends.clone(), settings).run());
    }
}

impl Drop for HealthTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::BackendsWriter;

    fn settings() -> HealthCheckSettings {
        HealthCheckSettings {
            path: PathAndQuery::from_static("/healthz"),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 3,
            grpc_service: None,
            backend_protocol: None,
        }
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().expect("literal address parses")
    }

    fn fail() -> Result<(), ProbeError> {
        Err(ProbeError::Status(StatusCode::SERVICE_UNAVAILABLE))
    }

    #[tokio::test]
    async fn thresholds_decide_when_the_verdict_flips() {
        let backends = Backends::new(vec![addr()]);
        let state = backends.state(addr());
        let mut checker = HealthChecker::new(backends, settings());
        checker.apply(addr(), Arc::clone(&state), fail());
        assert!(state.is_healthy(), "one failure is below the threshold");
        checker.apply(addr(), Arc::clone(&state), fail());
        assert!(!state.is_healthy());
        for _ in 0..2 {
            checker.apply(addr(), Arc::clone(&state), Ok(()));
            assert!(!state.is_healthy(), "two successes are below the threshold");
        }
        checker.apply(addr(), Arc::clone(&state), Ok(()));
        assert!(state.is_healthy());
    }

    #[tokio::test]
    async fn a_success_breaks_a_run_of_failures() {
        let backends = Backends::new(vec![addr()]);
        let state = backends.state(addr());
        let mut checker = HealthChecker::new(backends, settings());
        for result in [fail(), Ok(()), fail()] {
            checker.apply(addr(), Arc::clone(&state), result);
        }
        assert!(state.is_healthy());
    }

    /// A checker over a list of one backend that has failed one probe, and the
    /// list's writer.
    fn one_failure_in() -> (BackendsWriter, Backends, HealthChecker) {
        let list = BackendsWriter::new();
        list.replace(vec![addr()]);
        let backends = list.reader();
        let mut checker = HealthChecker::new(backends.clone(), settings());
        checker.apply(addr(), backends.state(addr()), fail());
        (list, backends, checker)
    }

    #[tokio::test]
    async fn a_re_added_address_starts_a_new_streak() {
        let (list, backends, mut checker) = one_failure_in();
        list.replace(Vec::new());
        list.replace(vec![addr()]);
        let fresh = backends.state(addr());
        checker.apply(addr(), Arc::clone(&fresh), fail());
        assert!(fresh.is_healthy(), "the old state's failure does not count");
    }

    /// Bound asserted: exact. Each backend's probe falls in its own slot of
    /// the interval, so 10,000 probes every 5 s leave one per half millisecond
    /// rather than all at once.
    #[test]
    fn a_rounds_probes_are_spread_over_its_interval_one_per_slot() {
        let (start, interval, slots) = (Instant::now(), Duration::from_secs(5), 10_000);
        let slot = interval / 10_000;
        for i in 0..slots {
            // Off the slot's edges, where float rounding could go either way.
            let jitter = (random_below(1_000) as f64 + 0.5) / 1_000.0;
            let at = slot_time(start, interval, i, slots, jitter) - start;
            let own = slot * u32::try_from(i).expect("fits");
            assert!(own <= at && at < own + slot, "probe {i} at {at:?}");
        }
        assert_eq!(slot_time(start, interval, 0, slots, 0.0), start);
        let late = start + PROBE_TICK * 3 + PROBE_TICK / 2;
        assert_eq!(on_tick(start, late), start + PROBE_TICK * 3);
        assert!(slot_time(start, interval, slots - 1, slots, 0.999_999) < start + interval);
    }

    #[tokio::test]
    async fn a_round_probes_nothing_and_forgets_streaks_when_the_list_is_empty() {
        let (list, _, mut checker) = one_failure_in();
        list.replace(Vec::new());
        checker.round().await;
        assert!(checker.streaks.is_empty());
    }
}
