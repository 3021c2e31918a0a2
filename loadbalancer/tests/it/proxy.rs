//! End to end through the proxy: real upstream servers and a real load balancer
//! on 127.0.0.1:0, real HTTP requests, assertions on what comes back.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use loadbalancer::proxy::ProxySettings;

use crate::support;
use crate::support::raw::RawConn;
use crate::support::{TestLb, get, send, start_backends, tally};

fn expected(counts: &[(&str, usize)]) -> BTreeMap<String, usize> {
    counts
        .iter()
        .map(|&(name, n)| (name.to_owned(), n))
        .collect()
}

#[tokio::test]
async fn thirty_sequential_requests_give_ten_per_backend() {
    let upstreams = start_backends(3).await;
    let lb = TestLb::start(&upstreams).await;
    let client = support::client();
    let mut names = Vec::new();
    for _ in 0..30 {
        let reply = send(
            &client,
            Request::get(lb.url("/"))
                .body(Full::default())
                .expect("valid"),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        names.push(reply.pod_name());
    }
    assert_eq!(
        tally(names),
        expected(&[("backend-1", 10), ("backend-2", 10), ("backend-3", 10)])
    );
    lb.stop().await;
}

/// Bound asserted: each backend gets 66 or 67 of 200. Round-robin hands out one
/// ticket per request, so the spread is exact up to the remainder of 200 / 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_all_succeed_and_spread_evenly() {
    let upstreams = start_backends(3).await;
    let lb = TestLb::start(&upstreams).await;
    let client = support::client();
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let (client, url) = (client.clone(), lb.url("/"));
            tokio::spawn(async move {
                send(
                    &client,
                    Request::get(url).body(Full::default()).expect("valid"),
                )
                .await
            })
        })
        .collect();
    let mut names = Vec::new();
    for request in requests {
        let reply = request.await.expect("request task does not panic");
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        names.push(reply.pod_name());
    }
    let counts = tally(names);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 66 || n == 67), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 200);
    lb.stop().await;
}

#[tokio::test]
async fn a_stopped_backends_turn_answers_502_while_the_others_succeed() {
    let mut upstreams = start_backends(3).await;
    let lb = TestLb::start(&upstreams).await;
    // Warm the pool first, so the stopped backend also leaves stale pooled
    // connections behind, as a crashed pod would.
    for _ in 0..3 {
        assert_eq!(get(&lb.url("/")).await.status, StatusCode::OK);
    }
    upstreams[1].stop().await;

    let mut outcomes = Vec::new();
    for _ in 0..30 {
        let reply = get(&lb.url("/")).await;
        outcomes.push(match reply.status {
            StatusCode::OK => reply.pod_name(),
            StatusCode::BAD_GATEWAY => {
                assert_eq!(reply.json()["status"], 502);
                "502".to_owned()
            }
            other => panic!("unexpected status {other}"),
        });
    }
    assert_eq!(
        tally(outcomes),
        expected(&[("502", 10), ("backend-1", 10), ("backend-3", 10)])
    );
    lb.stop().await;
}

#[tokio::test]
async fn empty_backend_list_answers_503_json() {
    let lb = TestLb::start(&[]).await;
    let reply = get(&lb.url("/anything")).await;
    reply.assert_proxy_error(StatusCode::SERVICE_UNAVAILABLE, "no backend is ready");
    lb.stop().await;
}

#[tokio::test]
async fn backend_slower_than_the_request_timeout_answers_504() {
    let upstreams = start_backends(1).await;
    let settings = ProxySettings {
        request_timeout: Duration::from_millis(200),
        ..TestLb::SETTINGS
    };
    let lb = TestLb::start_with(vec![upstreams[0].addr], settings).await;
    // The backend waits 5 s; only the timeout, not a fast answer, can end this early.
    let reply = get(&lb.url("/slow?ms=5000")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["status"], 504);
    // The backend itself is fine: a fast request still succeeds.
    assert_eq!(get(&lb.url("/")).await.pod_name(), "backend-1");
    lb.stop().await;
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_stripped_and_forwarding_headers_set() {
    let upstreams = start_backends(1).await;
    let lb = TestLb::start(&upstreams).await;
    let req = Request::get(lb.url("/echo-headers"))
        .header("host", "shop.example.test")
        .header("connection", "keep-alive, x-hop-request")
        .header("x-hop-request", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("upgrade", "h2c")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-end-to-end", "kept")
        .body(Full::default())
        .expect("valid request");
    let seen = send(&support::client(), req).await.json();
    for hop in [
        "connection",
        "x-hop-request",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(seen.get(hop).is_none(), "{hop} reached the backend: {seen}");
    }
    // `TE: trailers` is passed on in the proxy's own words, and `Trailer` is
    // end to end (RFC 9110 section 6.6.2).
    assert_eq!(seen["te"], serde_json::json!(["trailers"]));
    assert_eq!(seen["trailer"], serde_json::json!(["x-checksum"]));
    assert_eq!(seen["x-end-to-end"], serde_json::json!(["kept"]));
    assert_eq!(seen["host"], serde_json::json!(["shop.example.test"]));
    assert_eq!(
        seen["x-forwarded-for"],
        serde_json::json!(["203.0.113.7, 127.0.0.1"])
    );
    assert_eq!(seen["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(
        seen["x-forwarded-host"],
        serde_json::json!(["shop.example.test"])
    );
    lb.stop().await;
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_stripped() {
    let upstreams = start_backends(1).await;
    let lb = TestLb::start(&upstreams).await;
    let reply = get(&lb.url("/hop-headers")).await;
    assert_eq!(reply.status, StatusCode::OK);
    for hop in ["x-hop-response", "keep-alive", "proxy-authenticate"] {
        assert!(!reply.headers.contains_key(hop), "{hop} reached the client");
    }
    // `Trailer` is end to end: it names the trailer fields a client may get.
    assert!(reply.headers.contains_key("trailer"), "{:?}", reply.headers);
    // Whatever `Connection` the client sees is our own, not the backend's.
    assert!(
        reply
            .headers
            .get_all("connection")
            .iter()
            .all(|v| v != "x-hop-response"),
        "{:?}",
        reply.headers
    );
    assert_eq!(reply.headers["x-end-to-end"], "kept");
    assert_eq!(reply.pod_name(), "backend-1");
    lb.stop().await;
}

#[tokio::test]
async fn five_mib_request_body_passes_through_intact() {
    let upstreams = start_backends(1).await;
    let lb = TestLb::start(&upstreams).await;
    let body = Bytes::from(support::upstream::pattern(5 * 1024 * 1024 + 7));
    let req = Request::post(lb.url("/echo-body"))
        .body(Full::new(body.clone()))
        .expect("valid request");
    let reply = send(&support::client(), req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body == body, "echoed body differs from the one sent");
    lb.stop().await;
}

#[tokio::test]
async fn chunked_multi_mib_response_passes_through_intact_and_chunked() {
    let upstreams = start_backends(1).await;
    let lb = TestLb::start(&upstreams).await;
    let len = 3 * 1024 * 1024 + 11;
    let reply = get(&lb.url(&format!("/chunked?bytes={len}"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    // Still chunked on our side: the proxy streamed it instead of buffering it
    // and sending a Content-Length.
    assert_eq!(reply.headers["transfer-encoding"], "chunked");
    assert!(!reply.headers.contains_key("content-length"));
    assert_eq!(reply.body.len(), len);
    assert!(
        reply.body == support::upstream::pattern(len),
        "body differs"
    );
    lb.stop().await;
}

#[tokio::test]
async fn incoming_request_id_is_forwarded_and_echoed() {
    let upstreams = start_backends(1).await;
    let lb = TestLb::start(&upstreams).await;
    let req = Request::get(lb.url("/echo-headers"))
        .header("x-request-id", "client-chosen-42")
        .body(Full::default())
        .expect("valid request");
    let reply = send(&support::client(), req).await;
    assert_eq!(reply.headers["x-request-id"], "client-chosen-42");
    assert_eq!(
        reply.json()["x-request-id"],
        serde_json::json!(["client-chosen-42"])
    );
    lb.stop().await;
}

#[tokio::test]
async fn missing_request_id_is_generated_forwarded_and_returned() {
    let upstreams = start_backends(1).await;
    let lb = TestLb::start(&upstreams).await;
    let first = get(&lb.url("/echo-headers")).await;
    let second = get(&lb.url("/echo-headers")).await;
    let id = first.headers["x-request-id"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_eq!(first.json()["x-request-id"], serde_json::json!([id]));
    assert_ne!(
        second.headers["x-request-id"],
        first.headers["x-request-id"]
    );
    lb.stop().await;
}

#[tokio::test]
async fn method_path_and_query_reach_the_backend() {
    let upstreams = start_backends(1).await;
    let lb = TestLb::start(&upstreams).await;
    let reply = get(&lb.url("/some/path?x=1&y=two")).await;
    assert_eq!(reply.json()["path"], "/some/path");
    let req = Request::delete(lb.url("/echo-body"))
        .body(Full::new(Bytes::from_static(b"payload")))
        .expect("valid request");
    let reply = send(&support::client(), req).await;
    assert_eq!(reply.body, Bytes::from_static(b"payload"));
    lb.stop().await;
}

/// HTTP/1.0 allows a request without `Host`; HTTP/1.1 backends expect one, so
/// the proxy sends the backend's own address, as hyper-util's client did.
#[tokio::test]
async fn a_request_without_host_reaches_the_backend_with_its_address_as_host() {
    let upstreams = start_backends(1).await;
    let lb = TestLb::start(&upstreams).await;
    let mut conn = RawConn::connect(lb.addr).await;
    conn.send(b"GET /echo-headers HTTP/1.0\r\n\r\n").await;
    let response = conn.response().await.expect("the proxy answers");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.json()["host"],
        serde_json::json!([upstreams[0].addr.to_string()])
    );
    lb.stop().await;
}

/// A "backend" that accepts connections and answers each with `reply` (or
/// nothing), then closes: a crashed or broken server.
async fn broken_backend(reply: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound socket has an address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            let _ = stream.write_all(reply).await;
        }
    });
    addr
}

#[tokio::test]
async fn garbage_or_a_closed_connection_from_the_backend_answers_502() {
    for reply in [&b"this is not HTTP\r\n\r\n"[..], b""] {
        let backend = broken_backend(reply).await;
        let lb = TestLb::start_with(vec![backend], TestLb::SETTINGS).await;
        let answer = get(&lb.url("/")).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "reply {reply:?}");
        assert_eq!(answer.json()["message"], "the backend failed to answer");
        lb.stop().await;
    }
}
