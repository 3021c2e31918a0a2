//! The streamed response body, wrapped so that a request is logged, counted and
//! judged when its last byte has been handed to the client, not when the
//! response head is ready.
//!
//! The proxy returns as soon as the backend's head arrives; hyper then pulls the
//! body frame by frame. A `200` head says little about how the response ends:
//! the backend may cut the body short, break its chunked framing, or stall
//! (see [`IdleTimeout`]). So the request's [`Completion`] rides inside the body
//! and is settled once, at the end: the access log line, the request metrics and
//! outlier detection all hear the final outcome, and a body that failed counts
//! as a failure (502, or 504 for a stall) rather than as its head's status. The
//! in-flight guards (the global gauge and the backend's own count, which the
//! least-request balancer compares) are released at the same moment.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use service_kit::BoxError;
use tracing::{info, warn};

use hyper::body::Incoming;

use super::grpc;
use super::idle::{BodyIdle, IdleTimeout};
use super::{ErrorChain, Shared};
use crate::backend_state::OwnedInFlight;
use crate::metrics::{ClientProtocol, RequestInFlight};
use crate::outlier::{Admission, Outcome};
use crate::retry::body::AttemptBody;
use crate::upstream::{Http2Body, PooledBody, Upgraded, UpstreamHead};

/// A backend's response body, whichever protocol brought it. An enum rather
/// than a boxed body: no allocation per response.
#[derive(Debug)]
pub(super) enum UpstreamBody {
    /// Read from an HTTP/1.1 connection lent by the pool, which it carries
    /// back at its end.
    Http1(Box<PooledBody<AttemptBody<IdleTimeout<Incoming>>>>),
    /// A stream of a multiplexed HTTP/2 connection.
    Http2(Http2Body),
}

impl UpstreamBody {
    /// The connection of a `101` response, for a tunnel. HTTP/2 has no `101`.
    pub(super) fn into_upgraded(self) -> Option<Upgraded> {
        match self {
            Self::Http1(body) => (*body).into_upgraded(),
            Self::Http2(_) => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Both variants are `Unpin`.
        match self.get_mut() {
            Self::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http1(body) => body.is_end_stream(),
            Self::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Http1(body) => body.size_hint(),
            Self::Http2(body) => body.size_hint(),
        }
    }
}

/// A backend's response body, with what settles its request when it ends.
#[derive(Debug)]
pub struct InFlightBody {
    /// The backend's body, streamed through untouched (and failed when it
    /// stalls); it returns its connection to the pool at its end.
    inner: IdleTimeout<UpstreamBody>,
    /// Taken when the body ends, fails, or is dropped unfinished. Boxed, so
    /// that the response it rides in is small to move on its way to hyper.
    completion: Option<Box<Completion>>,
}

/// Everything needed to log, count and judge a proxied request once its body
/// has ended.
#[derive(Debug)]
pub(super) struct Completion {
    pub(super) shared: Arc<Shared>,
    /// The request as sent, for the method and path in the log line.
    pub(super) head: UpstreamHead,
    pub(super) backend: SocketAddr,
    /// The status of the backend's response head.
    pub(super) status: StatusCode,
    /// From the request's arrival until the response head was ready.
    pub(super) latency: Duration,
    /// When the request arrived.
    pub(super) started: Instant,
    pub(super) attempts: u32,
    pub(super) request_id: HeaderValue,
    /// The backend's in-flight count, held until the end.
    pub(super) in_flight: OwnedInFlight,
    /// The process's in-flight gauge, held until the end.
    pub(super) request_in_flight: RequestInFlight,
    /// What the client spoke.
    pub(super) protocol: ClientProtocol,
    /// For a gRPC call, its status: from the response head (a trailers-only
    /// answer) or, once they pass, the trailers. `None` for other requests.
    pub(super) grpc_status: Option<u16>,
    /// Whether the request was a gRPC call.
    pub(super) grpc: bool,
}

/// How a response body ended.
#[derive(Debug)]
enum End {
    /// Read to its end.
    Complete,
    /// The backend's side failed: cut short or malformed, or it stalled.
    Failed { stalled: bool, reason: String },
    /// The client went away first: nothing to hold against the backend.
    Abandoned,
}

impl InFlightBody {
    pub(super) fn new(inner: IdleTimeout<UpstreamBody>, completion: Completion) -> Self {
        let mut body = Self {
            inner,
            completion: Some(Box::new(completion)),
        };
        // HEAD, 204, 304, `Content-Length: 0`: hyper may never poll the body.
        if body.inner.is_end_stream() {
            body.settle(End::Complete);
        }
        body
    }

    fn settle(&mut self, end: End) {
        if let Some(completion) = self.completion.take() {
            completion.settle(end);
        }
    }
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Both fields are `Unpin`, so the wrapper is too and needs no pin projection.
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.settle(End::Complete),
            Poll::Ready(Some(Err(error))) => this.settle(End::Failed {
                stalled: error.is::<BodyIdle>(),
                reason: ErrorChain(&**error).to_string(),
            }),
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                if let (Some(completion), Some(trailers)) =
                    (&mut this.completion, frame.trailers_ref())
                    && completion.grpc
                {
                    completion.grpc_status = grpc::status(trailers).or(completion.grpc_status);
                }
                if this.inner.is_end_stream() {
                    this.settle(End::Complete);
                }
            }
            // Settled with the last frame, before hyper writes it: whoever reads
            // the whole response then finds the request already counted.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                this.settle(End::Complete);
            }
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for InFlightBody {
    fn drop(&mut self) {
        let end = if self.inner.is_end_stream() {
            End::Complete
        } else {
            End::Abandoned
        };
        self.settle(end);
    }
}

impl Completion {
    /// Writes the access log line, records the metrics and tells outlier
    /// detection, all by how the body ended.
    fn settle(self, end: End) {
        let Completion {
            shared,
            head,
            backend,
            status,
            latency,
            started,
            attempts,
            request_id,
            in_flight,
            request_in_flight,
            protocol,
            grpc_status,
            grpc: _,
        } = self;
        let latency_ms = latency.as_secs_f64() * 1000.0;
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        let id = request_id.to_str().unwrap_or_default();
        let state = in_flight.state();
        let status = match end {
            End::Complete | End::Abandoned => {
                info!(
                    target: "loadbalancer::access",
                    method = %head.method(), path = head.path(), backend = %backend,
                    status = status.as_u16(), latency_ms, duration_ms, attempts,
                    request_id = id, complete = !matches!(end, End::Abandoned),
                    protocol = protocol.as_str(), grpc_status, "request"
                );
                status
            }
            End::Failed { stalled, reason } => {
                // The head's status was sent, but the client got a broken
                // response: it counts as the gateway failure it is.
                let failed = if stalled {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                warn!(
                    target: "loadbalancer::access",
                    method = %head.method(), path = head.path(), backend = %backend,
                    status = failed.as_u16(), head_status = status.as_u16(), latency_ms,
                    duration_ms, attempts, request_id = id, error = %reason,
                    protocol = protocol.as_str(), grpc_status, "response body failed"
                );
                state.record_failure();
                if let Some(outlier) = shared.tuning().outlier {
                    let (normal, failure) = (Admission::Normal, Outcome::Failure);
                    shared.report(&outlier, backend, state, normal, failure, Instant::now());
                }
                failed
            }
        };
        shared.metrics.record_backend_request(
            backend,
            state.metrics(),
            head.method(),
            status,
            latency,
        );
        shared.metrics.record_protocol(protocol, grpc_status);
        drop((in_flight, request_in_flight));
    }
}
