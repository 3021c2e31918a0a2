//! The proxy's upstream HTTP/1.1 client, pinned down at the wire: what the proxy
//! makes of the bytes a backend sends (framings, interim responses, broken or
//! oversized heads, connections closed early) and which bytes it sends the
//! backend, and when it reuses a backend connection or opens a new one.
//!
//! The same cases pass with hyper's client connection in place of the
//! proxy's own exchange (`upstream/http1/`), except two that hyper's client
//! gets wrong: it closes a connection whose response ended in trailers, and it
//! passes on a `Content-Length` sent next to a chunked body. Every backend here is a
//! [`ScriptedBackend`], which writes raw bytes and records the raw bytes it
//! received, connection by connection.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use loadbalancer::proxy::ProxySettings;

use crate::support;
use crate::support::raw::RawConn;
use crate::support::scripted::{Answer, ScriptedBackend};
use crate::support::{PATIENCE, Reply, TestLb, get, metric, send};

/// A load balancer whose only backend is `backend`, with retries off: every
/// client request is exactly one upstream request.
async fn lb_over(backend: &ScriptedBackend) -> TestLb {
    TestLb::start_with(vec![backend.addr], TestLb::SETTINGS).await
}

/// `method url` with `body` on a fresh client.
async fn request(method: Method, url: &str, body: &'static [u8]) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from_static(body)))
        .expect("valid request");
    send(&support::client(), req).await
}

/// Sends `req` and reads the whole response, or says where it broke: the head
/// never came, or the body broke off. Panics only if nothing ends within
/// [`PATIENCE`]: a hang is the one outcome no test accepts.
async fn try_send(req: Request<Full<Bytes>>) -> Result<Reply, String> {
    let exchange = async {
        let response = support::client()
            .request(req)
            .await
            .map_err(|error| format!("no response: {error:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|error| format!("{}, then the body broke: {error:?}", parts.status))?;
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.to_bytes(),
        })
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("the exchange ends, one way or another, within PATIENCE")
}

/// The next `GET /` gets a 200 with `body`, the backend's next scripted answer:
/// whatever came before left the proxy's upstream connections in order.
async fn assert_next_get_answers(lb: &TestLb, body: &'static [u8]) {
    let next = get(&lb.url("/")).await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(next.body, Bytes::from_static(body));
}

/// The proxy's own JSON answer for a backend that did not answer properly.
fn assert_bad_gateway(reply: &Reply) {
    reply.assert_proxy_error(StatusCode::BAD_GATEWAY, "the backend failed to answer");
}

/// A chunked response whose chunks carry extensions and whose body ends in a
/// trailer section.
const CHUNKED_WITH_TRAILERS: &str = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
    trailer: x-checksum\r\n\r\n\
    5;ext=1\r\nhello\r\n7;name=\"quoted\"\r\n, world\r\n0\r\nx-checksum: 42\r\n\r\n";

#[tokio::test]
async fn a_chunked_response_with_extensions_and_trailers_arrives_exact() {
    let backend = ScriptedBackend::start([
        Answer::keep_open(CHUNKED_WITH_TRAILERS),
        Answer::keep_open(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
             3;ext=1;other=\"a;b\"\r\none\r\n0;last\r\n\r\n",
        ),
        Answer::ok("third"),
    ])
    .await;
    let lb = lb_over(&backend).await;

    let reply = get(&lb.url("/chunked")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Bytes::from_static(b"hello, world"));
    assert!(
        !reply.headers.contains_key("x-checksum"),
        "trailers are not turned into header fields: {:?}",
        reply.headers
    );
    let extensions_only = get(&lb.url("/chunked")).await;
    assert_eq!(extensions_only.body, Bytes::from_static(b"one"));
    assert_eq!(
        get(&lb.url("/next")).await.body,
        Bytes::from_static(b"third")
    );
    // Each chunked response, with trailers or without, left its connection
    // for the next request.
    assert_eq!(backend.requests_per_connection(), [3]);
    lb.stop().await;
}

#[tokio::test]
async fn a_close_delimited_response_arrives_whole_and_the_next_request_opens_a_new_connection() {
    let body = "read until the backend closes";
    let backend = ScriptedBackend::start([
        Answer::then_close(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n{body}"
        )),
        Answer::ok("second"),
    ])
    .await;
    let lb = lb_over(&backend).await;

    let reply = get(&lb.url("/")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Bytes::from(body));
    assert_eq!(reply.headers["content-type"], "text/plain");
    assert_next_get_answers(&lb, b"second").await;
    assert_eq!(backend.requests_per_connection(), [1, 1]);
    lb.stop().await;
}

#[tokio::test]
async fn interim_100_and_103_responses_are_skipped_and_the_final_200_arrives() {
    let backend = ScriptedBackend::start([
        Answer::keep_open(
            "HTTP/1.1 100 Continue\r\n\r\n\
             HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\nx-final: yes\r\ncontent-length: 5\r\n\r\nfinal",
        ),
        Answer::ok("second"),
    ])
    .await;
    let lb = lb_over(&backend).await;

    let reply = get(&lb.url("/")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Bytes::from_static(b"final"));
    assert_eq!(reply.headers["x-final"], "yes");
    assert!(
        !reply.headers.contains_key("link"),
        "the 103's headers stay with the 103: {:?}",
        reply.headers
    );
    assert_eq!(get(&lb.url("/")).await.body, Bytes::from_static(b"second"));
    assert_eq!(backend.requests_per_connection(), [2]);
    lb.stop().await;
}

#[tokio::test]
async fn a_head_response_has_no_body_whatever_its_content_length_and_keeps_its_connection() {
    let backend = ScriptedBackend::start([
        Answer::keep_open("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
        Answer::ok("hello"),
    ])
    .await;
    let lb = lb_over(&backend).await;

    let head = request(Method::HEAD, &lb.url("/"), b"").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty(), "{head:?}");
    assert_eq!(
        head.headers["content-length"], "5",
        "a HEAD answer keeps the length a GET would have"
    );
    // Had the proxy waited for 5 body bytes, this GET's answer would have been
    // taken for them.
    assert_next_get_answers(&lb, b"hello").await;
    assert_eq!(backend.requests_per_connection(), [2]);
    let received = backend.requests();
    assert_eq!(received[0].request_line(), "HEAD / HTTP/1.1");
    lb.stop().await;
}

#[tokio::test]
async fn bodiless_204_and_304_responses_keep_their_connection() {
    let backend = ScriptedBackend::start([
        Answer::keep_open("HTTP/1.1 204 No Content\r\n\r\n"),
        Answer::keep_open("HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n"),
        Answer::ok("after"),
    ])
    .await;
    let lb = lb_over(&backend).await;

    let no_content = get(&lb.url("/")).await;
    assert_eq!(no_content.status, StatusCode::NO_CONTENT);
    assert!(no_content.body.is_empty());
    let not_modified = get(&lb.url("/")).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.headers["etag"], "\"v1\"");
    assert_eq!(get(&lb.url("/")).await.body, Bytes::from_static(b"after"));
    assert_eq!(backend.requests_per_connection(), [3]);
    lb.stop().await;
}

#[tokio::test]
async fn garbage_instead_of_a_response_answers_the_proxys_json_502() {
    let backend = ScriptedBackend::start([Answer::keep_open("HELLO\r\n\r\n")]).await;
    let lb = lb_over(&backend).await;
    assert_bad_gateway(&get(&lb.url("/")).await);
    lb.stop().await;
}

#[tokio::test]
async fn two_different_content_lengths_in_a_response_answer_502() {
    let backend = ScriptedBackend::start([Answer::keep_open(
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    )])
    .await;
    let lb = lb_over(&backend).await;
    assert_bad_gateway(&get(&lb.url("/")).await);
    lb.stop().await;
}

/// A head of `n` fields `x-field-<i>: value-<i>` and an empty body.
fn head_with_fields(n: usize) -> String {
    let fields: String = (0..n)
        .map(|i| format!("x-field-{i}: value-{i}\r\n"))
        .collect();
    format!("HTTP/1.1 200 OK\r\n{fields}content-length: 0\r\n\r\n")
}

#[tokio::test]
async fn a_response_head_with_a_thousand_fields_answers_502_and_one_with_sixty_passes_whole() {
    let backend = ScriptedBackend::start([
        Answer::keep_open(head_with_fields(1000)),
        Answer::keep_open(head_with_fields(60)),
    ])
    .await;
    let lb = lb_over(&backend).await;

    assert_bad_gateway(&get(&lb.url("/")).await);
    let reply = get(&lb.url("/")).await;
    assert_eq!(reply.status, StatusCode::OK);
    for i in 0..60 {
        assert_eq!(
            reply.headers[format!("x-field-{i}").as_str()],
            format!("value-{i}"),
            "{:?}",
            reply.headers
        );
    }
    lb.stop().await;
}

#[tokio::test]
async fn a_backend_closing_mid_body_cuts_the_clients_response_short_and_the_next_request_succeeds()
{
    let backend = ScriptedBackend::start([
        Answer::then_close(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{}",
            "x".repeat(50)
        )),
        Answer::ok("whole"),
    ])
    .await;
    let lb = lb_over(&backend).await;

    let req = Request::get(lb.url("/"))
        .body(Full::default())
        .expect("valid request");
    match try_send(req).await {
        Ok(reply) => assert!(
            reply.body.len() < 100,
            "{} with a complete-looking body of {} bytes",
            reply.status,
            reply.body.len()
        ),
        // The head, or the body, broke off: the client knows it is incomplete.
        Err(error) => eprintln!("cut short as expected: {error}"),
    }
    assert_next_get_answers(&lb, b"whole").await;
    assert_eq!(backend.requests_per_connection(), [1, 1]);
    lb.stop().await;
}

#[tokio::test]
async fn connection_close_and_http_1_0_responses_end_their_connection_and_http_1_1_keeps_it() {
    // The backend itself keeps every connection open: only the proxy's reading
    // of the response decides whether a connection is used again.
    let backend = ScriptedBackend::start([
        Answer::keep_open("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nfirst"),
        Answer::ok("second"),
        Answer::ok("third"),
        Answer::keep_open("HTTP/1.0 200 OK\r\ncontent-length: 6\r\n\r\nfourth"),
        Answer::ok("fifth"),
    ])
    .await;
    let lb = lb_over(&backend).await;

    for expected in ["first", "second", "third", "fourth", "fifth"] {
        let reply = get(&lb.url("/")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, Bytes::from(expected));
    }
    assert_eq!(
        backend.requests_per_connection(),
        [1, 3, 1],
        "closed after `connection: close`, kept after HTTP/1.1, closed after HTTP/1.0"
    );
    lb.stop().await;
}

#[tokio::test]
async fn a_bodiless_get_arrives_without_framing_headers_and_in_origin_form() {
    let backend = ScriptedBackend::start([Answer::ok("one"), Answer::ok("two")]).await;
    let lb = lb_over(&backend).await;

    assert_eq!(
        get(&lb.url("/a?b=1")).await.body,
        Bytes::from_static(b"one")
    );
    // Absolute form, as a client talking to a forward proxy sends it.
    let mut conn = RawConn::connect(lb.addr).await;
    conn.send(b"GET http://shop.example.test/a?b=1 HTTP/1.1\r\nHost: shop.example.test\r\n\r\n")
        .await;
    let response = conn.response().await.expect("the proxy answers");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, b"two");

    let received = backend.requests();
    assert_eq!(received.len(), 2);
    for request in &received {
        assert_eq!(request.request_line(), "GET /a?b=1 HTTP/1.1");
        assert_eq!(request.header("content-length"), None, "{}", request.head);
        assert_eq!(
            request.header("transfer-encoding"),
            None,
            "{}",
            request.head
        );
        assert!(request.body.is_empty());
    }
    assert_eq!(
        received[1].header_values("host"),
        ["shop.example.test"],
        "{}",
        received[1].head
    );
    lb.stop().await;
}

#[tokio::test]
async fn request_bodies_arrive_with_their_exact_bytes_by_length_or_chunked() {
    let backend = ScriptedBackend::start([Answer::ok("one"), Answer::ok("two")]).await;
    let lb = lb_over(&backend).await;

    let reply = request(Method::POST, &lb.url("/sized"), b"hello world").await;
    assert_eq!(reply.body, Bytes::from_static(b"one"));
    let mut conn = RawConn::connect(lb.addr).await;
    conn.send(
        b"POST /chunked HTTP/1.1\r\nHost: test\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n",
    )
    .await;
    let response = conn.response().await.expect("the proxy answers");
    assert_eq!(response.body, b"two");

    let received = backend.requests();
    let sized = &received[0];
    assert_eq!(sized.request_line(), "POST /sized HTTP/1.1");
    assert_eq!(sized.header_values("content-length"), ["11"]);
    assert_eq!(sized.header("transfer-encoding"), None);
    assert_eq!(sized.body, b"hello world");
    assert!(
        sized.raw.ends_with(b"\r\n\r\nhello world"),
        "{:?}",
        sized.raw
    );

    let chunked = &received[1];
    assert_eq!(chunked.request_line(), "POST /chunked HTTP/1.1");
    let framing = (
        chunked.header_values("transfer-encoding"),
        chunked.header_values("content-length"),
    );
    assert!(
        matches!(framing.0.as_slice(), ["chunked"]) && framing.1.is_empty()
            || framing.0.is_empty() && matches!(framing.1.as_slice(), ["11"]),
        "one framing, chunked or sized: {}",
        chunked.head
    );
    assert_eq!(chunked.body, b"hello world");
    lb.stop().await;
}

#[tokio::test]
async fn hop_by_hop_request_headers_stay_behind_and_host_passes_through() {
    let backend = ScriptedBackend::start([Answer::ok("ok")]).await;
    let lb = lb_over(&backend).await;

    let req = Request::get(lb.url("/"))
        .header("host", "shop.example.test")
        .header("connection", "x-foo")
        .header("x-foo", "hop")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("x-end-to-end", "kept")
        .body(Full::default())
        .expect("valid request");
    assert_eq!(send(&support::client(), req).await.status, StatusCode::OK);

    let received = &backend.requests()[0];
    for hop in ["x-foo", "keep-alive"] {
        assert_eq!(received.header(hop), None, "{hop}: {}", received.head);
    }
    // `TE` is hop-by-hop, but its `trailers` is what lets the backend send
    // trailer fields; the proxy passes that much on.
    assert_eq!(received.header("te"), Some("trailers"));
    assert!(
        received
            .header_values("connection")
            .iter()
            .all(|value| !value.to_ascii_lowercase().contains("x-foo")),
        "{}",
        received.head
    );
    assert_eq!(received.header_values("host"), ["shop.example.test"]);
    assert_eq!(received.header("x-end-to-end"), Some("kept"));
    lb.stop().await;
}

/// A `413` sent after the head of a 4 MiB upload, with `Connection: close`,
/// the rest of the upload left unread.
const TOO_LARGE: &str =
    "HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 8\r\n\r\ntoo big!";

/// POSTs 4 MiB through a proxy to a backend that refuses it with `refusal`;
/// checks that the backend serves the next request, on a new connection, and
/// returns what the client got for the upload.
async fn refused_upload(refusal: Answer) -> Reply {
    let backend = ScriptedBackend::start([refusal, Answer::ok("after")]).await;
    let lb = lb_over(&backend).await;

    let upload = Bytes::from(vec![b'u'; 4 * 1024 * 1024]);
    let req = Request::post(lb.url("/upload"))
        .body(Full::new(upload))
        .expect("valid request");
    let reply = try_send(req).await.expect("the proxy answers the client");
    assert_next_get_answers(&lb, b"after").await;
    assert_eq!(backend.requests_per_connection(), [1, 1]);
    lb.stop().await;
    reply
}

/// A backend that refuses an upload early and then lingers (reads and discards
/// the rest until the proxy closes), as nginx does: its answer reaches the
/// client whole.
#[tokio::test]
async fn an_early_413_from_a_lingering_backend_reaches_the_client_during_a_large_upload() {
    let reply = refused_upload(Answer::before_body_then_linger(TOO_LARGE)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{reply:?}");
    assert_eq!(reply.body, Bytes::from_static(b"too big!"));
}

/// The same refusal from a backend that closes at once: the unread upload makes
/// its kernel reset the connection, and the reset may overtake the `413`, so
/// the client gets either that `413` or the proxy's 502 (hyper's client fails
/// the write of the body first and gives the 502 every time).
/// Either way the client gets a prompt, whole answer, and the backend stays
/// usable.
#[tokio::test]
async fn an_early_413_with_an_abrupt_close_during_a_large_upload_ends_in_413_or_502() {
    let reply = refused_upload(Answer::before_body_then_close(TOO_LARGE)).await;
    if reply.status == StatusCode::PAYLOAD_TOO_LARGE {
        assert_eq!(reply.body, Bytes::from_static(b"too big!"));
    } else {
        assert_bad_gateway(&reply);
    }
}

#[tokio::test]
async fn chunked_framing_wins_over_a_content_length_in_the_same_response() {
    let backend = ScriptedBackend::start([
        Answer::keep_open(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        ),
        Answer::ok("second"),
    ])
    .await;
    let lb = lb_over(&backend).await;

    let reply = get(&lb.url("/")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Bytes::from_static(b"hello world"));
    assert_ne!(
        reply.headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"3"[..]),
        "the overridden length is not passed on"
    );
    assert_eq!(get(&lb.url("/")).await.body, Bytes::from_static(b"second"));
    lb.stop().await;
}

/// Sends `request` on a raw connection and returns everything the proxy sent
/// back until it closed; `request` should say `Connection: close`.
async fn raw_exchange(lb: &TestLb, request: &str) -> String {
    let answer = RawConn::send_until_closed(lb.addr, request.as_bytes()).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn trailers_reach_a_client_that_accepts_them_and_not_one_that_does_not() {
    let backend = ScriptedBackend::start([
        Answer::keep_open(CHUNKED_WITH_TRAILERS),
        Answer::keep_open(CHUNKED_WITH_TRAILERS),
    ])
    .await;
    let lb = lb_over(&backend).await;

    let accepted = raw_exchange(
        &lb,
        "GET / HTTP/1.1\r\nHost: test\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        accepted.contains("\r\ntrailer: x-checksum\r\n"),
        "{accepted}"
    );
    assert!(
        accepted.ends_with("\r\n0\r\nx-checksum: 42\r\n\r\n"),
        "the trailer field ends the chunked body: {accepted}"
    );
    assert_eq!(backend.requests()[0].header("te"), Some("trailers"));

    let declined = raw_exchange(
        &lb,
        "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        declined.ends_with("\r\n0\r\n\r\n"),
        "no trailer section: {declined}"
    );
    assert_eq!(backend.requests()[1].header("te"), None);
    lb.stop().await;
}

#[tokio::test]
async fn a_transfer_coding_other_than_a_single_chunked_answers_502_and_drops_the_connection() {
    for coding in ["gzip, chunked", "chunked, gzip", "chunked, chunked", "gzip"] {
        let answer = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: {coding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let backend = ScriptedBackend::start([Answer::keep_open(answer), Answer::ok("next")]).await;
        let lb = lb_over(&backend).await;
        assert_bad_gateway(&get(&lb.url("/")).await);
        assert_next_get_answers(&lb, b"next").await;
        assert_eq!(
            backend.requests_per_connection(),
            [1, 1],
            "{coding}: the refused answer's connection is not reused"
        );
        lb.stop().await;
    }
}

#[tokio::test]
async fn connect_is_refused_with_405_and_the_methods_that_are_served() {
    let backend = ScriptedBackend::start([Answer::ok("never")]).await;
    let lb = lb_over(&backend).await;
    let mut client = RawConn::connect(lb.addr).await;
    client
        .send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await;
    let reply = client.response().await.expect("an answer to CONNECT");
    assert_eq!(reply.status, 405, "{reply:?}");
    assert_eq!(
        reply.header("allow"),
        Some("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE")
    );
    assert_eq!(
        reply.json()["message"],
        "CONNECT is not supported: this is a reverse proxy"
    );
    assert!(backend.requests().is_empty(), "nothing reached the backend");
    lb.stop().await;
}

#[tokio::test]
async fn an_absolute_form_request_reaches_the_backend_with_the_targets_host() {
    let backend = ScriptedBackend::start([Answer::ok("ok")]).await;
    let lb = lb_over(&backend).await;
    let mut client = RawConn::connect(lb.addr).await;
    client
        .send(b"GET http://shop.example.test:8080/cart?x=1 HTTP/1.1\r\nHost: wrong.test\r\n\r\n")
        .await;
    let reply = client.response().await.expect("an answer");
    assert_eq!(reply.status, 200, "{reply:?}");
    let received = &backend.requests()[0];
    assert_eq!(received.request_line(), "GET /cart?x=1 HTTP/1.1");
    assert_eq!(received.header_values("host"), ["shop.example.test:8080"]);
    assert_eq!(
        received.header("x-forwarded-host"),
        Some("shop.example.test:8080")
    );
    lb.stop().await;
}

/// How many requests to `backend` ended with `code`, by the metrics.
async fn counted(lb: &TestLb, backend: std::net::SocketAddr, code: u16) -> f64 {
    let series =
        format!(r#"loadbalancer_requests_total{{backend="{backend}",method="GET",code="{code}"}}"#);
    metric(lb.admin_addr, &series).await
}

#[tokio::test]
async fn a_body_that_stalls_is_closed_at_the_body_idle_timeout_and_counted_as_a_504() {
    let backend = ScriptedBackend::start([
        Answer::keep_open("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst part"),
        Answer::ok("next"),
    ])
    .await;
    let settings = ProxySettings {
        body_idle_timeout: Duration::from_millis(300),
        ..TestLb::SETTINGS
    };
    let lb = TestLb::start_with(vec![backend.addr], settings).await;

    let req = Request::get(lb.url("/"))
        .body(Full::default())
        .expect("valid request");
    let outcome = try_send(req).await;
    let error = outcome.expect_err("the stalled body breaks off instead of hanging");
    assert!(error.starts_with("200 OK, then the body broke"), "{error}");
    assert_eq!(counted(&lb, backend.addr, 504).await, 1.0);
    assert_eq!(lb.backends.state(backend.addr).failures(), 1);
    // The stalled connection was closed, not put back in the pool.
    assert_next_get_answers(&lb, b"next").await;
    assert_eq!(backend.requests_per_connection(), [1, 1]);
    lb.stop().await;
}

#[tokio::test]
async fn a_cut_or_malformed_chunked_body_counts_as_a_502_not_as_its_200() {
    for broken in [
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    ] {
        let backend = ScriptedBackend::start([Answer::then_close(broken)]).await;
        let lb = lb_over(&backend).await;
        let req = Request::get(lb.url("/"))
            .body(Full::default())
            .expect("valid request");
        assert!(
            try_send(req).await.is_err(),
            "the client sees the body break"
        );
        assert_eq!(counted(&lb, backend.addr, 502).await, 1.0, "{broken:?}");
        assert_eq!(lb.backends.state(backend.addr).failures(), 1);
        lb.stop().await;
    }
}

#[tokio::test]
async fn an_upload_that_stalls_gets_408_at_the_body_idle_timeout_and_spares_the_backend() {
    let backend = ScriptedBackend::start([Answer::ok("never sent")]).await;
    let settings = ProxySettings {
        body_idle_timeout: Duration::from_millis(300),
        ..TestLb::SETTINGS
    };
    let lb = TestLb::start_with(vec![backend.addr], settings).await;
    let mut client = RawConn::connect(lb.addr).await;
    client
        .send(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nonly ten b")
        .await;
    let reply = client.response().await.expect("an answer, not a hang");
    assert_eq!(reply.status, 408, "{reply:?}");
    assert_eq!(
        reply.json()["message"],
        "the request body stalled for 300 ms"
    );
    assert_eq!(
        lb.backends.state(backend.addr).failures(),
        0,
        "not the backend's fault"
    );
    lb.stop().await;
}

/// hyper's server cannot send an interim response, so 1xx from a backend stay
/// behind (see docs/operations.md); a backend that sends nothing but them
/// still meets the request timeout.
#[tokio::test]
async fn a_backend_sending_only_interim_responses_ends_in_504_at_the_request_timeout() {
    let hints = "HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n".repeat(200);
    let backend = ScriptedBackend::start([Answer::keep_open(hints)]).await;
    let settings = ProxySettings {
        request_timeout: Duration::from_millis(300),
        ..TestLb::SETTINGS
    };
    let lb = TestLb::start_with(vec![backend.addr], settings).await;
    get(&lb.url("/")).await.assert_proxy_error(
        StatusCode::GATEWAY_TIMEOUT,
        "the backend did not answer within 300 ms",
    );
    lb.stop().await;
}
