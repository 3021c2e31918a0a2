//! Probes over HTTP/2: the standard gRPC health check,
//! `grpc.health.v1.Health/Check`, and `GET <path>` for backends that speak h2c.
//!
//! The messages are tiny and fixed, so they are written and read by hand here
//! rather than pulling a protobuf code generator into the load balancer:
//! `HealthCheckRequest { string service = 1; }` and
//! `HealthCheckResponse { ServingStatus status = 1; }`, where `SERVING` is 1.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, TE};
use http::uri::PathAndQuery;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

use super::{ProbeError, judge_status};
use crate::proxy::grpc_status;
use crate::upstream::Http2Pool;

/// The method every gRPC server with health checking serves.
const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// How probes introduce themselves.
const USER_AGENT: &str = "loadbalancer-health-check";

/// `ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// Asks `addr` over HTTP/2 whether `service` is serving.
pub(super) async fn probe(
    pool: &Http2Pool,
    addr: SocketAddr,
    service: &str,
    connect_timeout: Duration,
) -> Result<(), ProbeError> {
    let request = Request::post(format!("http://{addr}{CHECK_PATH}"))
        .header(CONTENT_TYPE, "application/grpc")
        .header(TE, "trailers")
        .header(http::header::USER_AGENT, USER_AGENT)
        .body(Full::new(request_message(service)))
        .map_err(|error| ProbeError::Http2(format!("cannot build the request: {error}")))?;
    let response = pool
        .send(addr, connect_timeout, request)
        .await
        .map_err(|error| ProbeError::Http2(error.to_string()))?;
    if response.status() != StatusCode::OK {
        return Err(ProbeError::Status(response.status()));
    }
    let head_status = grpc_status(response.headers());
    let collected = response
        .into_body()
        .collect()
        .await
        .map_err(|error| ProbeError::Http2(format!("the answer broke off: {error}")))?;
    // A trailers-only answer carries the status in the head.
    let status = collected.trailers().and_then(grpc_status).or(head_status);
    match status {
        Some(0) => {}
        Some(code) => return Err(ProbeError::Grpc(format!("grpc-status {code}"))),
        None => return Err(ProbeError::Grpc("no grpc-status".to_owned())),
    }
    match serving_status(&collected.to_bytes()) {
        Some(SERVING) => Ok(()),
        Some(other) => Err(ProbeError::Grpc(format!(
            "serving status {other}, not SERVING"
        ))),
        None => Err(ProbeError::Grpc(
            "no serving status in the answer".to_owned(),
        )),
    }
}

/// `GET <path>` over HTTP/2: any 2xx passes.
pub(super) async fn get(
    pool: &Http2Pool,
    addr: SocketAddr,
    path: &PathAndQuery,
    connect_timeout: Duration,
) -> Result<(), ProbeError> {
    let request = Request::get(format!("http://{addr}{path}"))
        .header(http::header::USER_AGENT, USER_AGENT)
        .body(Full::default())
        .map_err(|error| ProbeError::Http2(format!("cannot build the request: {error}")))?;
    let response = pool
        .send(addr, connect_timeout, request)
        .await
        .map_err(|error| ProbeError::Http2(error.to_string()))?;
    judge_status(response).await
}

/// A `HealthCheckRequest` for `service`, in its gRPC frame: a flag byte (not
/// compressed), the message length, the message.
fn request_message(service: &str) -> Bytes {
    let mut message = BytesMut::new();
    if !service.is_empty() {
        // Field 1, wire type 2 (length-delimited).
        message.put_u8(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.put_slice(service.as_bytes());
    }
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    frame.put_slice(&message);
    frame.freeze()
}

/// The `status` field of the `HealthCheckResponse` in one gRPC frame; an
/// absent field is the default, `UNKNOWN` (0).
fn serving_status(frame: &[u8]) -> Option<u64> {
    let (&[compressed, l0, l1, l2, l3], message) = frame.split_first_chunk::<5>()?;
    let length = usize::try_from(u32::from_be_bytes([l0, l1, l2, l3])).ok()?;
    if compressed != 0 || message.len() != length {
        return None;
    }
    let mut rest = message;
    let mut status = 0;
    while let Some((&key, tail)) = rest.split_first() {
        let (value, tail) = read_varint(tail)?;
        match key {
            // Field 1, varint: the status.
            0x08 => status = value,
            // Another varint field: skipped, as protobuf readers do.
            key if key & 0x07 == 0 => {}
            _ => return None,
        }
        rest = tail;
    }
    Some(status)
}

fn put_varint(buf: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

fn read_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (index, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Some((value, &bytes[index + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_a_framed_health_check_request() {
        assert_eq!(&request_message("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &request_message("identity.v1.Identity")[..7],
            &[0, 0, 0, 0, 22, 0x0a, 20]
        );
    }

    #[test]
    fn the_serving_status_is_read_from_the_answer() {
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(SERVING));
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        // An empty message: every field at its default, UNKNOWN.
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Some(0));
        // Truncated, compressed, or not protobuf: no answer.
        for broken in [
            &[0, 0, 0, 0, 3, 0x08, 1][..],
            &[1, 0, 0, 0, 2, 0x08, 1],
            &[0, 0],
        ] {
            assert_eq!(serving_status(broken), None, "{broken:?}");
        }
    }
}
