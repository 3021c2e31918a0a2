//! The upstream connection pool, seen from a real upstream: which connections
//! the proxy opens, reuses and closes.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use loadbalancer::proxy::ProxySettings;
use loadbalancer::upstream::{IDLE_TIMEOUT, MAX_IDLE_PER_BACKEND};

use crate::support;
use crate::support::faults::CloseAfterAnswer;
use crate::support::{InFlight, PATIENCE, TestLb, Upstream, get, wait_for};

/// An idle connection must be closed by the pool before the backend closes it,
/// or a request sent just then meets a closing socket (the keep-alive race).
#[test]
fn the_pool_lets_idle_connections_go_before_the_backend_does() {
    // The reaper looks every third of the timeout: a connection may stay that
    // much longer.
    let longest_pooled = IDLE_TIMEOUT + IDLE_TIMEOUT / 3;
    let backend_keeps = backend::server::DEFAULT_LIMITS.idle_timeout;
    assert!(
        longest_pooled < backend_keeps,
        "pooled for up to {longest_pooled:?}, the backend closes after {backend_keeps:?}"
    );
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let upstream = Upstream::start("backend-1").await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;
    for path in [
        "/",
        "/slow?ms=1",
        "/chunked?bytes=100000",
        "/",
        "/echo-headers",
    ] {
        let reply = get(&lb.url(path)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
    }
    assert_eq!(
        upstream.accepted(),
        1,
        "every request went on one connection"
    );
    lb.stop().await;
}

/// A body the client stops reading leaves unread bytes on the upstream
/// connection; the next response read from it would be garbage, so it must be
/// closed, never pooled.
#[tokio::test]
async fn a_response_body_dropped_early_closes_its_connection() {
    let upstream = Upstream::start("backend-1").await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;

    // More than every socket buffer on the way can hold, so the proxy is still
    // streaming when the client goes away.
    let big = lb.url(&format!("/chunked?bytes={}", 32 * 1024 * 1024));
    let client = support::client();
    let response = tokio::time::timeout(
        PATIENCE,
        client.request(Request::get(big).body(Full::default()).expect("valid")),
    )
    .await
    .expect("the head arrives within PATIENCE")
    .expect("the load balancer answers");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("a first frame arrives within PATIENCE");
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    drop((body, client));

    // Pooled, it would stay open; closed, the upstream sees it go.
    wait_for(
        "the half-read upstream connection to close",
        || upstream.open_connections(),
        |&open| open == 0,
    )
    .await;
    for _ in 0..3 {
        let reply = get(&lb.url("/")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(
        upstream.accepted(),
        2,
        "one connection for the dropped body, one reused by the rest"
    );
    lb.stop().await;
}

/// The keep-alive race at its sharpest: the backend closes every connection
/// right after answering, without saying so, so each request finds its pooled
/// connection closed or closing. With retries off, only the pool stands between
/// that and a 502.
#[tokio::test]
async fn a_backend_closing_kept_alive_connections_causes_no_client_errors() {
    let backend = CloseAfterAnswer::start().await;
    let lb = TestLb::start_with(vec![backend.addr], TestLb::SETTINGS).await;
    let client = support::client();
    for i in 0..30 {
        let req = Request::get(lb.url("/"))
            .body(Full::default())
            .expect("valid");
        let reply = support::send(&client, req).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "request {i}: {:?}",
            reply.body
        );
        assert_eq!(
            reply.body,
            Bytes::from_static(CloseAfterAnswer::BODY.as_bytes())
        );
    }
    assert_eq!(
        backend.accepted(),
        30,
        "each request had a connection of its own"
    );
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_per_backend_are_capped() {
    let upstream = Upstream::start("backend-1").await;
    // The held requests wait for all of them to arrive: no 504 meanwhile.
    let settings = ProxySettings {
        request_timeout: 4 * PATIENCE,
        ..TestLb::SETTINGS
    };
    let lb = TestLb::start_with(vec![upstream.addr], settings).await;

    // Each held request occupies an upstream connection of its own.
    let n = MAX_IDLE_PER_BACKEND + 8;
    let held: Vec<_> = (0..n).map(|_| InFlight::start(lb.url("/hold"))).collect();
    upstream.wait_for_requests(n).await;
    assert_eq!(upstream.accepted(), n);
    upstream.release_held();
    for request in held {
        assert_eq!(request.finish().await.status, StatusCode::OK);
    }

    // All n came back to the pool; the ones past the cap were closed.
    wait_for(
        "the pool to close the connections past its cap",
        || upstream.open_connections(),
        |&open| open == MAX_IDLE_PER_BACKEND,
    )
    .await;
    // The kept ones serve the next requests.
    for _ in 0..3 {
        assert_eq!(get(&lb.url("/")).await.status, StatusCode::OK);
    }
    assert_eq!(upstream.accepted(), n, "no new connection was needed");
    lb.stop().await;
}
