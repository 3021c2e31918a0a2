//! Why a request could not be proxied ([`ProxyError`]), and the answer each
//! failure gets: JSON with the status, the reason and the request id, or for a
//! gRPC call a gRPC status; a 405 lists the methods served, and a 429 says when
//! to come back.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::ALLOW;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use service_kit::BoxError;

use super::grpc;
use crate::balancer::NoBackend;
use crate::ratelimit::Refusal;
use crate::response;

/// Every method but `CONNECT`, for the `Allow` header of its 405.
const ALLOWED_METHODS: HeaderValue =
    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE");

/// Why a request could not be proxied. Each case maps to one status code.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The backend list is empty: 503.
    #[error("no backend is ready")]
    NoBackend,
    /// The TCP connection to the backend failed (refused, unreachable, connect
    /// timeout): 502. Nothing was sent, so retrying elsewhere is always safe.
    #[error("cannot connect to backend {backend}: {}", ErrorChain(&**error))]
    Connect {
        backend: SocketAddr,
        error: BoxError,
    },
    /// The connection broke or the backend answered something that is not HTTP: 502.
    #[error("backend {backend} failed: {}", ErrorChain(&**error))]
    Upstream {
        backend: SocketAddr,
        error: BoxError,
    },
    /// An HTTP/2 backend refused the request before processing it
    /// (`REFUSED_STREAM`, or a stream above its GOAWAY's last stream id): 503.
    /// Nothing was processed, so retrying elsewhere is always safe.
    #[error("backend {backend} refused the request unprocessed: {}", ErrorChain(&**error))]
    Refused {
        backend: SocketAddr,
        error: BoxError,
    },
    /// Every attempt failed to connect and no backend is left to try: the
    /// service is down as a whole, 503.
    #[error(
        "no backend could be reached; the last, {backend}: {}",
        ErrorChain(&**error)
    )]
    Unreachable {
        backend: SocketAddr,
        error: BoxError,
    },
    /// No response head within `requestTimeoutMs`: 504.
    #[error("backend {backend} did not answer within {} ms", timeout.as_millis())]
    Timeout {
        backend: SocketAddr,
        timeout: Duration,
    },
    /// The client's upload stopped for `bodyIdleTimeoutMs`: 408, and not held
    /// against the backend.
    #[error("the request body sent to {backend} stalled for {} ms", timeout.as_millis())]
    RequestBodyIdle {
        backend: SocketAddr,
        timeout: Duration,
    },
    /// `CONNECT` asks for a tunnel to a host of the client's choosing, which is
    /// a forward proxy's job, not a reverse proxy's: 405.
    #[error("CONNECT is not supported")]
    ConnectMethod,
    /// Over a rate limit (`rateLimit`): 429, with when to come back.
    #[error("over the {} rate limit", .0.limit.as_str())]
    RateLimited(Refusal),
    /// Every backend stayed at its concurrency limit (`maxRequestsPerBackend`)
    /// for as long as the request could wait (`queueTimeoutMs`): 503.
    #[error("every backend stayed at its concurrency limit for {} ms", waited.as_millis())]
    Shed { waited: Duration },
}

impl From<NoBackend> for ProxyError {
    fn from(_: NoBackend) -> Self {
        ProxyError::NoBackend
    }
}

impl ProxyError {
    /// The status code the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoBackend
            | ProxyError::Unreachable { .. }
            | ProxyError::Refused { .. }
            | ProxyError::Shed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ConnectMethod => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::RequestBodyIdle { .. } => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The backend involved, if one had been picked.
    pub fn backend(&self) -> Option<SocketAddr> {
        match self {
            ProxyError::Connect { backend, .. }
            | ProxyError::Refused { backend, .. }
            | ProxyError::Unreachable { backend, .. }
            | ProxyError::Upstream { backend, .. }
            | ProxyError::Timeout { backend, .. }
            | ProxyError::RequestBodyIdle { backend, .. } => Some(*backend),
            ProxyError::NoBackend
            | ProxyError::ConnectMethod
            | ProxyError::RateLimited(_)
            | ProxyError::Shed { .. } => None,
        }
    }

    /// A connect failure becomes [`ProxyError::Unreachable`]; others stay.
    pub(super) fn into_unreachable(self) -> Self {
        match self {
            ProxyError::Connect { backend, error } => ProxyError::Unreachable { backend, error },
            other => other,
        }
    }

    /// What the client is told. Backend addresses and internal error chains stay
    /// in our log, not in the response.
    fn public_message(&self) -> String {
        match self {
            ProxyError::NoBackend => "no backend is ready".to_owned(),
            ProxyError::Connect { .. } => "the backend could not be reached".to_owned(),
            ProxyError::Unreachable { .. } => "no backend could be reached".to_owned(),
            ProxyError::Upstream { .. } => "the backend failed to answer".to_owned(),
            ProxyError::Refused { .. } => "the backend refused the request".to_owned(),
            ProxyError::Timeout { timeout, .. } => {
                format!(
                    "the backend did not answer within {} ms",
                    timeout.as_millis()
                )
            }
            ProxyError::ConnectMethod => {
                "CONNECT is not supported: this is a reverse proxy".to_owned()
            }
            ProxyError::RequestBodyIdle { timeout, .. } => {
                format!("the request body stalled for {} ms", timeout.as_millis())
            }
            ProxyError::RateLimited(refusal) => format!(
                "too many requests ({} limit); retry after {} s",
                refusal.limit.as_str(),
                retry_after_seconds(refusal)
            ),
            ProxyError::Shed { waited } => format!(
                "every backend is at its concurrency limit; waited {} ms",
                waited.as_millis()
            ),
        }
    }

    /// The status a gRPC client is told, for a gRPC call.
    fn grpc_code(&self) -> grpc::Code {
        match self {
            ProxyError::Timeout { .. } | ProxyError::RequestBodyIdle { .. } => {
                grpc::Code::DeadlineExceeded
            }
            ProxyError::ConnectMethod => grpc::Code::Unimplemented,
            ProxyError::RateLimited(_) => grpc::Code::ResourceExhausted,
            ProxyError::NoBackend
            | ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Refused { .. }
            | ProxyError::Unreachable { .. }
            | ProxyError::Shed { .. } => grpc::Code::Unavailable,
        }
    }

    /// The answer the client gets: gRPC-shaped for a gRPC call, JSON otherwise.
    pub(super) fn to_response(
        &self,
        request_id: &HeaderValue,
        grpc: bool,
    ) -> Response<Full<Bytes>> {
        let mut response = if grpc {
            grpc::error_response(self.grpc_code(), &self.public_message())
        } else {
            self.json_response(request_id)
        };
        if let ProxyError::RateLimited(refusal) = self {
            rate_limit_headers(response.headers_mut(), refusal);
        }
        response
    }

    fn json_response(&self, request_id: &HeaderValue) -> Response<Full<Bytes>> {
        let status = self.status();
        let mut response = response::json(
            status,
            &json!({
                "status": status.as_u16(),
                "error": status.canonical_reason(),
                "message": self.public_message(),
                "requestId": request_id.to_str().unwrap_or_default(),
            }),
        );
        if let ProxyError::ConnectMethod = self {
            // RFC 9110 section 15.5.6: a 405 lists the methods that are served.
            response.headers_mut().insert(ALLOW, ALLOWED_METHODS);
        }
        response
    }
}

/// Whole seconds until a refused client may try again, rounded up (a
/// `Retry-After` of 0 would invite an immediate retry).
fn retry_after_seconds(refusal: &Refusal) -> u64 {
    let retry_after = refusal.retry_after;
    retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)
}

/// `Retry-After` and the IETF `RateLimit-Policy` and `RateLimit` fields
/// (draft-ietf-httpapi-ratelimit-headers): the limit's quota per one-second
/// window, none of it left, and when more is.
fn rate_limit_headers(headers: &mut http::HeaderMap, refusal: &Refusal) {
    let seconds = retry_after_seconds(refusal);
    let name = refusal.limit.as_str();
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    let policy = format!(
        "\"{name}\";q={};w=1;burst={}",
        refusal.requests_per_second, refusal.burst
    );
    let state = format!("\"{name}\";r=0;t={seconds}");
    for (field, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(http::HeaderName::from_static(field), value);
        }
    }
}

/// Displays an error with its sources, `outer: inner: root`, because hyper's
/// top-level messages ("client error (Connect)") hide the useful part.
pub(super) struct ErrorChain<'a>(pub(super) &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_their_status_codes() {
        let backend: SocketAddr = "127.0.0.1:1".parse().expect("valid");
        assert_eq!(
            ProxyError::NoBackend.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let timeout = ProxyError::Timeout {
            backend,
            timeout: Duration::from_millis(5),
        };
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(timeout.backend(), Some(backend));
    }
}
