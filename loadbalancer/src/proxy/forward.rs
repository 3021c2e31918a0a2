//! Forwarding: one request's way to an answer. A backend is picked with room
//! under the concurrency limit (waiting in the queue if every one is full),
//! outlier detection admits it, the exchange goes out over HTTP/1.1 or
//! HTTP/2 as the backend speaks, and a failure worth a retry is tried again on
//! another backend while [`retry`](crate::retry) allows it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, future};
use http::{HeaderValue, Response, StatusCode};
use hyper::body::Incoming;
use service_kit::BoxError;
use tracing::info;

use super::headers;
use super::idle::{BodyIdle, IdleTimeout};
use super::{
    Call, Forwarded, Proxy, ProxyError, ProxySettings, Route, Tuning, Upstream, UpstreamBody,
};
use crate::backend_state::{BackendState, OwnedInFlight};
use crate::backends::BackendProtocol;
use crate::balancer::{self, AffinityOutcome, NoBackend, PickContext};
use crate::outlier::{Admission, Outcome};
use crate::retry::RetryReason;
use crate::retry::body::{AttemptBody, RetryBody};
use crate::upstream::{ExchangeError, UpstreamError, UpstreamHead};

impl Proxy {
    /// Sends the request to a backend, and to others while a failure is worth a
    /// retry (see [`crate::retry`]) and the policy allows one more.
    /// `started` is when the request arrived; it also dates its deposit into the
    /// retry budget, which saves a clock reading.
    pub(super) async fn forward(
        &self,
        head: &UpstreamHead,
        body: Incoming,
        call: Call,
        route: Route,
        request_id: &HeaderValue,
        started: Instant,
    ) -> Forwarded {
        let shared = &*self.shared;
        let body = RetryBody::new(IdleTimeout::new(
            body,
            self.tuning().settings.body_idle_timeout,
        ));
        shared.retry.start_request_at(started);

        // The backends tried so far, skipped by the next pick.
        let mut tried = Vec::new();
        let mut next_body = body.attempt();
        let mut last = Err(ProxyError::NoBackend);
        let mut only_connect_failures = true;
        while let Some(attempt_body) = next_body.take() {
            // Read once per attempt: a reload in between applies to the next one.
            let tuning = self.tuning();
            // One clock reading (after any wait in the queue) serves the pick,
            // outlier admission and the attempt's latency. The request is
            // counted at the backend from the pick until the response body
            // ends; a failed attempt's guard drops when its result is replaced.
            let (chosen, in_flight, attempt_started) =
                match self.choose_with_room(&tuning, &tried, route).await {
                    Ok(found) => found,
                    // An empty list: `last` is still `NoBackend` on a first
                    // attempt, and for a retry (racing discovery emptying the
                    // list, or every backend full) the previous attempt's
                    // answer is the best there is.
                    Err(Unchosen::NoBackend) => break,
                    Err(Unchosen::Shed(waited)) => {
                        last = Err(ProxyError::Shed { waited });
                        break;
                    }
                };
            let Chosen {
                backend,
                state,
                admission,
                affinity,
            } = chosen;
            // Counted once per request, by its first attempt's pick.
            if let (Some(outcome), true) = (affinity, tried.is_empty()) {
                shared.metrics.record_affinity(outcome);
            }
            tried.push(backend);
            shared.metrics.record_locality(state.proximity());
            let (result, finished) = self
                .attempt(
                    &tuning,
                    Attempt {
                        backend,
                        state: in_flight.state(),
                        admission,
                        call,
                        started,
                    },
                    head,
                    attempt_body,
                )
                .await;
            in_flight.state().record(
                finished.saturating_duration_since(attempt_started),
                attempt_failed(&result),
            );
            only_connect_failures &= matches!(result, Err(ProxyError::Connect { .. }));
            let reason = retry_reason(&result);
            let made = attempt_count(&tried);
            if reason.is_some_and(|r| r.allows(head.method()))
                && body.is_replayable()
                && shared.retry.should_retry(made)
            {
                next_body = body.attempt();
                if let Some(reason) = reason.filter(|_| next_body.is_some()) {
                    info!(
                        backend = %backend, reason = reason.as_str(), attempt = made,
                        request_id = request_id.to_str().unwrap_or_default(),
                        "retrying on another backend"
                    );
                    shared.metrics.record_retry();
                }
            }
            last = result.map(|response| Upstream {
                backend,
                in_flight,
                response,
            });
        }
        if only_connect_failures && self.none_left_to_try(&tried) {
            last = last.map_err(ProxyError::into_unreachable);
        }
        Forwarded {
            attempts: attempt_count(&tried),
            result: last,
        }
    }

    /// Picks the backend for the next attempt, with room for it under the
    /// concurrency limit, and counts the request there. When every backend
    /// is full, a first attempt waits in the queue (see
    /// [`crate::concurrency`]) for at most the limit's `queue_timeout`; a
    /// retry does not wait, it has an answer already. Returns the clock
    /// reading the pick used.
    async fn choose_with_room(
        &self,
        tuning: &Tuning,
        tried: &[SocketAddr],
        route: Route,
    ) -> Result<(Chosen, OwnedInFlight, Instant), Unchosen> {
        let shared = &*self.shared;
        let Some(limit) = route.limit else {
            let now = Instant::now();
            let chosen = self.choose(tuning, tried, route, now)?;
            let in_flight = Arc::clone(&chosen.state).start_owned_request();
            return Ok((chosen, in_flight, now));
        };
        let queue = shared.backends.queue();
        let mut waiting = None;
        loop {
            // Asked for before the pick, so that a slot freed after the pick
            // still wakes this request.
            let woken = queue.wake_up_call();
            let now = Instant::now();
            match self.choose(tuning, tried, route, now) {
                Ok(chosen) => {
                    let max = limit.max_requests_per_backend;
                    match Arc::clone(&chosen.state).start_limited_request(max, queue) {
                        Some(in_flight) => return Ok((chosen, in_flight, now)),
                        // Another request took the last slot since the pick:
                        // pick again, among what is left.
                        None => continue,
                    }
                }
                Err(NoBackend) if shared.backends.with(<[_]>::is_empty) => {
                    return Err(Unchosen::NoBackend);
                }
                Err(NoBackend) => {}
            }
            let deadline = match &waiting {
                _ if !tried.is_empty() => return Err(Unchosen::NoBackend),
                Some((_, deadline)) => *deadline,
                None => {
                    // Counted first, then one more pick: a slot freed before
                    // the count woke no one.
                    waiting = Some((queue.join(), now + limit.queue_timeout));
                    shared.metrics.record_queued();
                    continue;
                }
            };
            let deadline = tokio::time::Instant::from_std(deadline);
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                shared.metrics.record_shed();
                return Err(Unchosen::Shed(limit.queue_timeout));
            }
        }
    }

    /// Picks the backend for the next attempt at `now` and has outlier
    /// detection admit it.
    fn choose(
        &self,
        tuning: &Tuning,
        tried: &[SocketAddr],
        route: Route,
        now: Instant,
    ) -> Result<Chosen, NoBackend> {
        let shared = &*self.shared;
        let outcome = std::cell::Cell::new(None);
        // The read locks are held only inside this closure: the pick copies an
        // address and its state out, and the guards are gone before any `.await`.
        let pick = |skip: &[SocketAddr]| {
            // A poisoned lock still holds a whole balancer (a swap is one store).
            let current = shared.balancer.read().unwrap_or_else(|p| p.into_inner());
            shared
                .backends
                .pick_with_state(now, |near, list, available, in_flight| {
                    let context = PickContext {
                        key: route.key,
                        // Read under the list's lock: the generation of `list`.
                        list_generation: shared.backends.generation(),
                        max_in_flight: route.limit.map(|limit| limit.max_requests_per_backend),
                        outcome: std::cell::Cell::new(None),
                    };
                    let pick = balancer::pick_nearest_for_attempt(
                        &**current, near, list, available, in_flight, skip, &context,
                    );
                    outcome.set(context.outcome.get());
                    pick
                })
        };
        let chosen = self.admit_chosen(tuning, tried, now, pick)?;
        Ok(Chosen {
            affinity: outcome.get(),
            ..chosen
        })
    }

    /// Has outlier detection admit the backend `pick` chose (skipping what
    /// `tried` lists), or, when another request just made it a half-open
    /// trial, the next one.
    fn admit_chosen(
        &self,
        tuning: &Tuning,
        tried: &[SocketAddr],
        now: Instant,
        pick: impl Fn(&[SocketAddr]) -> Result<(SocketAddr, Arc<BackendState>), NoBackend>,
    ) -> Result<Chosen, NoBackend> {
        let (backend, state) = pick(tried)?;
        let Some(outlier) = &tuning.outlier else {
            return Ok(Chosen {
                backend,
                state,
                admission: None,
                affinity: None,
            });
        };
        if let Some(admission) = outlier.admit(&state, now) {
            return Ok(Chosen {
                backend,
                state,
                admission: Some(admission),
                affinity: None,
            });
        }
        // Another request just became this backend's half-open trial; choose
        // again without it (a rare race, so the allocation does not matter).
        let skip: Vec<SocketAddr> = tried.iter().copied().chain([backend]).collect();
        let (backend, state) = pick(&skip)?;
        let admission = outlier.admit(&state, now).unwrap_or(Admission::Normal);
        Ok(Chosen {
            backend,
            state,
            admission: Some(admission),
            affinity: None,
        })
    }

    /// Whether every backend was tried or is out of rotation: the service as a
    /// whole is down, not one backend.
    fn none_left_to_try(&self, tried: &[SocketAddr]) -> bool {
        self.shared
            .backends
            .with_availability(Instant::now(), |list, available| {
                list.iter()
                    .all(|addr| tried.contains(addr) || !available(*addr))
            })
    }

    /// One attempt at the chosen backend: sends the request, waits for the
    /// response head, and tells outlier detection how it went. Returns the
    /// result and when it came (the one clock reading after the exchange).
    async fn attempt(
        &self,
        tuning: &Tuning,
        attempt: Attempt<'_>,
        head: &UpstreamHead,
        body: AttemptBody<IdleTimeout<Incoming>>,
    ) -> (Result<Response<UpstreamBody>, ProxyError>, Instant) {
        let shared = &*self.shared;
        let Attempt {
            backend,
            state,
            admission,
            call,
            started,
        } = attempt;
        let ProxySettings {
            connect_timeout,
            request_timeout,
            body_idle_timeout,
            ..
        } = tuning.settings;
        // A gRPC call's own deadline, when it is the sooner one.
        let timeout = match call.deadline {
            Some(deadline) => request_timeout.min(deadline.saturating_sub(started.elapsed())),
            None => request_timeout,
        };
        let (addr, protocol) =
            tuning
                .routing
                .resolve(call.target, backend, shared.backends.protocols());
        let exchange = self.exchange(protocol, addr, connect_timeout, head, body);
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(mut response)) => {
                let hops = headers::remove_hop_by_hop(response.headers_mut());
                // A `101` names the protocol switched to; the client must hear it.
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    hops.restore_upgrade(response.headers_mut());
                }
                Ok(response)
            }
            Ok(Err(Failure::Connect(error))) => Err(ProxyError::Connect { backend, error }),
            Ok(Err(Failure::Refused(error))) => Err(ProxyError::Refused { backend, error }),
            Ok(Err(Failure::Exchange(error))) if request_body_stalled(&*error) => {
                Err(ProxyError::RequestBodyIdle {
                    backend,
                    timeout: body_idle_timeout,
                })
            }
            Ok(Err(Failure::Exchange(error))) => Err(ProxyError::Upstream { backend, error }),
            Err(_elapsed) => Err(ProxyError::Timeout { backend, timeout }),
        };
        let finished = Instant::now();
        if let (Some(outlier), Some(admission)) = (&tuning.outlier, admission) {
            let outcome = if attempt_failed(&result) {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            shared.report(outlier, backend, state, admission, outcome, finished);
        }
        (result, finished)
    }

    /// Sends one request to `addr` in `protocol`, and returns the response
    /// head.
    ///
    /// A plain function returning one of two futures, not an `async fn`: an
    /// `async fn` would keep its arguments (the body among them) in a slot of
    /// its own beside the inner future they move into, and every request's
    /// future, which hyper moves and keeps while the request is in flight,
    /// would carry the copy.
    fn exchange<'a>(
        &'a self,
        protocol: BackendProtocol,
        addr: SocketAddr,
        connect_timeout: Duration,
        head: &'a UpstreamHead,
        body: AttemptBody<IdleTimeout<Incoming>>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, Failure>> + 'a {
        let shared = &*self.shared;
        match protocol {
            // HTTP/2 cannot carry an upgrade (a WebSocket): such a request goes
            // over HTTP/1.1, the only way it can succeed at all.
            BackendProtocol::H2c if !head.asks_upgrade() => {
                let request = head.to_http2(addr).map(|request| request.map(|()| body));
                // Boxed: the HTTP/2 exchange's future is large, and inline it
                // would grow every request's future, HTTP/1.1 ones too.
                future::Either::Left(Box::pin(async move {
                    let request = request.map_err(|error| Failure::Exchange(error.into()))?;
                    match shared.http2.send(addr, connect_timeout, request).await {
                        Ok(response) => Ok(response.map(UpstreamBody::Http2)),
                        Err(error) if error.is_connect() => Err(Failure::Connect(error.into())),
                        Err(error) if error.was_not_processed() => {
                            Err(Failure::Refused(error.into()))
                        }
                        Err(error) => Err(Failure::Exchange(error.into())),
                    }
                }))
            }
            BackendProtocol::Http1 | BackendProtocol::H2c => {
                future::Either::Right(shared.pool.send(addr, connect_timeout, head, body).map(
                    |result| match result {
                        Ok(response) => Ok(response.map(UpstreamBody::Http1)),
                        Err(error) if error.is_connect() => Err(Failure::Connect(error.into())),
                        Err(error) => Err(Failure::Exchange(error.into())),
                    },
                ))
            }
        }
    }
}

/// Who one attempt goes to, and what it carries besides the request.
struct Attempt<'a> {
    /// The backend chosen, as the list names it.
    backend: SocketAddr,
    /// Its state, which outlier detection reads and updates.
    state: &'a BackendState,
    /// How outlier detection admitted it; `None` when it is off.
    admission: Option<Admission>,
    call: Call,
    /// When the request arrived, which a gRPC deadline counts from.
    started: Instant,
}

/// Why an exchange with a backend failed, by what it means for a retry.
enum Failure {
    /// No connection: nothing was sent.
    Connect(BoxError),
    /// Refused by an HTTP/2 backend before it processed anything.
    Refused(BoxError),
    /// Anything after the request may have been processed.
    Exchange(BoxError),
}

/// Why no backend was chosen for an attempt.
enum Unchosen {
    /// The list is empty, or a retry found every backend full.
    NoBackend,
    /// Every backend stayed full for this long, the limit's `queue_timeout`.
    Shed(Duration),
}

impl From<NoBackend> for Unchosen {
    fn from(_: NoBackend) -> Self {
        Unchosen::NoBackend
    }
}

/// The backend for one attempt, with what outlier detection needs to hear back.
struct Chosen {
    backend: SocketAddr,
    /// The backend's state, looked up once with the pick: the attempt counts
    /// itself in it and outlier detection reads and updates it.
    state: Arc<BackendState>,
    /// How outlier detection admitted the backend; `None` when it is off.
    admission: Option<Admission>,
    /// How the request's affinity key fared in the pick; `None` when the
    /// algorithm does not route by keys.
    affinity: Option<AffinityOutcome>,
}

/// Attempts made so far; bounded by `retries.attempts` (at most 10).
fn attempt_count(tried: &[SocketAddr]) -> u32 {
    u32::try_from(tried.len()).unwrap_or(u32::MAX)
}

/// Whether an attempt counts against its backend: it failed to answer, or
/// answered with a server error. A client that stopped uploading is not the
/// backend's failure.
fn attempt_failed(result: &Result<Response<UpstreamBody>, ProxyError>) -> bool {
    match result {
        Ok(response) => response.status().is_server_error(),
        Err(ProxyError::RequestBodyIdle { .. }) => false,
        Err(_) => true,
    }
}

/// Whether the exchange failed because the client's upload stalled: the
/// HTTP/1.1 client says so in its error, the HTTP/2 client among its error's
/// sources.
fn request_body_stalled(error: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(UpstreamError::Exchange(ExchangeError::RequestBody(cause))) =
        error.downcast_ref::<UpstreamError>()
    {
        return cause.is::<BodyIdle>();
    }
    std::iter::successors(Some(error), |error| error.source()).any(|error| error.is::<BodyIdle>())
}

/// Why an attempt's result may be worth a retry, before looking at the method.
fn retry_reason(result: &Result<Response<UpstreamBody>, ProxyError>) -> Option<RetryReason> {
    match result {
        Ok(response) => RetryReason::from_status(response.status()),
        Err(ProxyError::Connect { .. }) => Some(RetryReason::Connect),
        Err(ProxyError::Upstream { .. }) => Some(RetryReason::Reset),
        Err(ProxyError::Refused { .. }) => Some(RetryReason::Refused),
        Err(_) => None,
    }
}
