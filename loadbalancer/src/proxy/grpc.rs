//! gRPC: what the proxy does differently for a gRPC call.
//!
//! A gRPC call is an HTTP/2 POST with `content-type: application/grpc` (or
//! `application/grpc+proto`, ...), and its status travels in the
//! `grpc-status` trailer, not in the HTTP status, which is 200 whenever the
//! server answered at all. Most of the proxy treats it as any request: it is
//! balanced per call (so the calls of one long-lived client connection spread
//! over every backend), streamed both ways, and its trailers pass through. Three
//! things differ, and live here:
//!
//! * **Errors the proxy produces** are gRPC-shaped ([`error_response`]): HTTP
//!   200 with `grpc-status` and `grpc-message` and no body (a "trailers-only"
//!   response), since a gRPC client reads the status from there and would turn
//!   a JSON 503 into a vague `UNKNOWN` or `INTERNAL`.
//! * **`grpc-timeout`** is the call's deadline ([`timeout`]): the proxy waits
//!   no longer than that for the backend's answer, when it is shorter than
//!   `requestTimeoutMs`.
//! * **Retries** happen only where the call was provably not processed
//!   (connect failures, `REFUSED_STREAM`, streams above a GOAWAY's last stream
//!   id). That needs no rule of its own here: a call is a POST, and the retry
//!   policy already retries a POST only for those reasons.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, TRAILER};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;

// Header names as `HeaderName`s, not strings: a lookup by a string parses and
// checks the name first (about 360 instructions a lookup, by callgrind), and a
// call makes three (its deadline, and its status in the head and trailers).

/// The `grpc-status` header and trailer.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// The `grpc-message` header and trailer: the status's description,
/// percent-encoded.
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// The call's deadline, as the client sent it.
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The status codes the proxy itself answers with (the gRPC spec's
/// `statuscodes.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Code {
    /// The deadline passed before the backend answered.
    DeadlineExceeded = 4,
    /// A rate limit refused the call.
    ResourceExhausted = 8,
    /// The proxy cannot serve this kind of request at all.
    Unimplemented = 12,
    /// No backend could take the call; a client may try again later.
    Unavailable = 14,
}

/// Whether a request with these headers is a gRPC call.
pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// The deadline a `grpc-timeout` header asks for: an integer of at most eight
/// digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`). A value that does not
/// parse is ignored, as the spec leaves it to the server.
pub(super) fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// A trailers-only gRPC answer: HTTP 200, `grpc-status: code`, and `message`
/// percent-encoded in `grpc-message`.
pub(super) fn error_response(code: Code, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, HeaderValue::from(code as u16));
    if let Ok(message) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert(GRPC_MESSAGE, message);
    }
    response
}

/// The trailer fields a gRPC server sends, as an HTTP/1.1 `Trailer` header
/// names them.
const GRPC_TRAILERS: HeaderValue =
    HeaderValue::from_static("grpc-status, grpc-message, grpc-status-details-bin");

/// Readies a gRPC response for an HTTP/1.1 client: hyper writes only the
/// trailer fields that the response's `Trailer` header announces (as RFC 9110
/// section 6.6.2 asks of a sender), and an HTTP/2 backend announces none,
/// since HTTP/2 needs no announcement.
pub(super) fn announce_trailers(headers: &mut HeaderMap) {
    if is_grpc(headers) && !headers.contains_key(TRAILER) {
        headers.insert(TRAILER, GRPC_TRAILERS);
    }
}

/// The status a gRPC response head or trailer carries, if any.
pub(crate) fn status(headers: &HeaderMap) -> Option<u16> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::headers::tests::headers;

    #[test]
    fn grpc_calls_are_told_by_their_content_type() {
        assert!(is_grpc(&headers(&[("content-type", "application/grpc")])));
        assert!(is_grpc(&headers(&[(
            "content-type",
            "application/grpc+proto"
        )])));
        assert!(!is_grpc(&headers(&[("content-type", "application/json")])));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn grpc_timeout_units_are_read_and_bad_values_ignored() {
        let of = |value: &'static str| timeout(&headers(&[("grpc-timeout", value)]));
        assert_eq!(of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(of("1S"), Some(Duration::from_secs(1)));
        assert_eq!(of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(of("10u"), Some(Duration::from_micros(10)));
        assert_eq!(of("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "100", "123456789S", "1s", "-1S", "1.5S"] {
            assert_eq!(of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_error_is_a_trailers_only_response() {
        let response = error_response(Code::Unavailable, "no backend: 100% down");
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(status(headers), Some(14));
        assert_eq!(headers["grpc-message"], "no backend: 100%25 down");
    }
}
