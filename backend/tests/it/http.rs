//! The backend's HTTP API, through a real server on `127.0.0.1:0` and real
//! requests: the identity answer, health and readiness, `/work`, and the JSON errors.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpStream;

use crate::support::{Conn, PATIENCE, TestServer, get, test_identity};

#[tokio::test]
async fn root_answers_with_the_identity_as_json() {
    let server = TestServer::start_default().await;
    let before = SystemTime::now();
    let reply = get(server.addr, "/").await;
    let after = SystemTime::now();

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    let fields = body.as_object().expect("the body is a JSON object");
    let mut keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["podIP", "podName", "serviceName", "timestamp"]);

    let identity = test_identity();
    assert_eq!(body["podName"], json!(identity.pod_name));
    assert_eq!(body["podIP"], json!(identity.pod_ip));
    assert_eq!(body["serviceName"], json!(identity.service_name));

    let timestamp = body["timestamp"].as_str().expect("timestamp is a string");
    assert!(timestamp.ends_with('Z'), "not UTC: {timestamp}");
    let at = humantime::parse_rfc3339(timestamp).expect("timestamp is RFC 3339");
    // The timestamp is truncated to milliseconds, hence the allowance below `before`.
    assert!(
        at + Duration::from_millis(1) >= before && at <= after,
        "{timestamp} is not the time of the request"
    );
}

/// The backend serves HTTP/2 on the same port, through the shared accept loop:
/// a client with prior knowledge (h2c) gets the identity as any other.
#[tokio::test]
async fn an_http2_client_with_prior_knowledge_gets_the_identity() {
    let server = TestServer::start_default().await;
    let exchange = async {
        let tcp = TcpStream::connect(server.addr).await.expect("connected");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("the HTTP/2 handshake");
        tokio::spawn(connection);
        let request = Request::get(format!("http://{}/", server.addr))
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let response = sender.send_request(request).await.expect("answered");
        let version = response.version();
        let status = response.status();
        let body = response.into_body().collect().await.expect("the body");
        (version, status, body.to_bytes())
    };
    let (version, status, body) = tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("answered within PATIENCE");
    assert_eq!((version, status), (Version::HTTP_2, StatusCode::OK));
    let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(body["podName"], json!(test_identity().pod_name));
}

#[tokio::test]
async fn head_is_answered_like_get_without_a_body() {
    let server = TestServer::start_default().await;
    let reply = Conn::open(server.addr)
        .await
        .send(Method::HEAD, "/", &[])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.is_empty());
}

#[tokio::test]
async fn healthz_and_readyz_answer_200_while_running() {
    let server = TestServer::start_default().await;
    let health = get(server.addr, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json(), json!({"status": "ok"}));
    let ready = get(server.addr, "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json(), json!({"status": "ready"}));
}

#[tokio::test]
async fn unknown_paths_answer_404_json() {
    let server = TestServer::start_default().await;
    for path in ["/nope", "/healthz/", "/work/extra", "//"] {
        let reply = get(server.addr, path).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert!(reply.json()["error"].is_string(), "{path}");
    }
}

#[tokio::test]
async fn wrong_methods_answer_405_json_with_allow() {
    let server = TestServer::start_default().await;
    let mut conn = Conn::open(server.addr).await;
    for (method, path) in [
        (Method::POST, "/"),
        (Method::DELETE, "/work"),
        (Method::PUT, "/readyz"),
    ] {
        let reply = conn.send(method.clone(), path, &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(reply.header("allow"), Some("GET, HEAD"));
        assert_eq!(reply.json(), json!({"error": "method not allowed"}));
    }
}

#[tokio::test]
async fn work_answers_with_the_requested_status_and_the_identity() {
    let server = TestServer::start_default().await;
    for status in [200_u16, 201, 404, 418, 500, 503, 599] {
        let reply = get(server.addr, &format!("/work?status={status}")).await;
        assert_eq!(reply.status.as_u16(), status);
        assert_eq!(reply.json()["podName"], json!(test_identity().pod_name));
    }
    assert_eq!(get(server.addr, "/work").await.status, StatusCode::OK);
}

#[tokio::test]
async fn work_sleeps_and_burns_at_least_as_long_as_asked() {
    let server = TestServer::start_default().await;
    // Lower bounds only: a slow machine makes these take longer, never shorter.
    for (query, at_least) in [("sleep_ms=200", 200), ("cpu_ms=150", 150)] {
        let start = Instant::now();
        let reply = get(server.addr, &format!("/work?{query}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{query}");
        assert!(
            start.elapsed() >= Duration::from_millis(at_least),
            "{query} returned after {:?}",
            start.elapsed()
        );
    }
}

#[tokio::test]
async fn a_response_delay_slows_answers_but_not_probes() {
    let delay = Duration::from_millis(300);
    let app = backend::handlers::App::new(test_identity()).with_response_delay(delay);
    let server = TestServer::start(app).await;
    // Lower bounds only for the delayed routes; the probe must come back without
    // the delay, which a loaded machine cannot make happen by accident.
    for path in ["/", "/work"] {
        let start = Instant::now();
        assert_eq!(
            get(server.addr, path).await.status,
            StatusCode::OK,
            "{path}"
        );
        assert!(
            start.elapsed() >= delay,
            "{path} answered after {:?}",
            start.elapsed()
        );
    }
    let probe = tokio::time::timeout(delay, get(server.addr, "/healthz"))
        .await
        .expect("/healthz does not wait for the response delay");
    assert_eq!(probe.status, StatusCode::OK);
}

#[tokio::test]
async fn work_bytes_answers_with_exactly_that_many_filler_bytes() {
    let server = TestServer::start_default().await;
    let mut conn = Conn::open(server.addr).await;
    // Over one keep-alive connection: each body must end exactly where it should.
    for len in [1_048_576_usize, 0, 1, 65_537] {
        let reply = conn
            .send(Method::GET, &format!("/work?bytes={len}&status=201"), &[])
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "bytes={len}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/octet-stream")
        );
        assert_eq!(reply.body.len(), len);
        assert!(reply.body.iter().all(|&b| b == b'.'), "bytes={len}");
    }
    let too_many = get(server.addr, "/work?bytes=8388609").await;
    assert_eq!(too_many.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn work_rejects_out_of_range_and_malformed_values_with_400_json() {
    let server = TestServer::start_default().await;
    let cases = [
        ("cpu_ms=10001", "cpu_ms"),
        ("sleep_ms=60001", "sleep_ms"),
        ("status=199", "status"),
        ("status=600", "status"),
        ("status=99999999999999999999", "status"),
        ("cpu_ms=abc", "cpu_ms"),
        ("sleep_ms=-1", "sleep_ms"),
        ("status=5.5", "status"),
        ("cpu_ms=", "cpu_ms"),
        ("sleep=10", "sleep"),
        ("status=200&cpu_ms=1e3", "cpu_ms"),
    ];
    for (query, names) in cases {
        let reply = get(server.addr, &format!("/work?{query}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let error = reply.json()["error"]
            .as_str()
            .expect("the error is a string")
            .to_owned();
        assert!(error.contains(names), "{query}: {error}");
    }
}

#[tokio::test]
async fn the_request_id_is_echoed() {
    let server = TestServer::start_default().await;
    let reply = Conn::open(server.addr)
        .await
        .send(Method::GET, "/", &[("x-request-id", "req-42")])
        .await;
    assert_eq!(reply.header("x-request-id"), Some("req-42"));
    assert_eq!(get(server.addr, "/").await.header("x-request-id"), None);
}

#[tokio::test]
async fn one_connection_serves_many_requests() {
    let server = TestServer::start_default().await;
    let mut conn = Conn::open(server.addr).await;
    for path in ["/", "/healthz", "/work?status=500", "/nope", "/"] {
        let reply = conn.get(path).await;
        assert!(reply.status.as_u16() >= 200, "{path}");
        assert_eq!(reply.header("connection"), None, "{path} closed keep-alive");
    }
}
