//! HTTP/2 from clients, on the ports HTTP/1.1 uses: cleartext with prior
//! knowledge (h2c) and h2 by ALPN over TLS, proxied to HTTP/1.1 backends; the
//! limits it shares with HTTP/1.1 and its own (the stream cap, the header list
//! size); and the floods a server must survive, each sent by hand
//! ([`crate::support::h2frames`]) while a second client on its own connection
//! goes on being served. Every flood is a bounded number of frames, and every
//! wait has a deadline; nothing here depends on how fast the machine is.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame as BodyFrame;
use loadbalancer::server::ServerLimits;
use service_kit::listener::CONTROL_FRAME_BURST;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::support::faults::start_real_backend;
use crate::support::h2frames::{
    self, ACK, CANCEL, CONTINUATION, ENHANCE_YOUR_CALM, FloodEnd, GOAWAY, H2Conn, HEADERS,
    MAX_CONCURRENT_STREAMS, NO_ERROR, REFUSED_STREAM, RST_STREAM, SETTINGS, assert_served, flood,
    frame, get_block, h2_client, h2_get, h2_handshake, h2_send, spawn_gets,
};
use crate::support::tls::{TestCert, TlsClient, https, secret_mount};
use crate::support::{PATIENCE, TestLb, get, start_backend};

/// Many requests at once on one connection, each answered by the backend:
/// the streams are multiplexed, not queued behind one another.
#[tokio::test]
async fn many_concurrent_streams_on_one_connection_are_all_answered_by_the_backend() {
    let backend = start_real_backend("backend-h2", ServerLimits::DEFAULT).await;
    let lb = TestLb::start_with(vec![backend.addr], TestLb::SETTINGS).await;
    let client = h2_client(lb.addr).await;
    let requests = spawn_gets(&client, &lb.url("/"), 50);
    for reply in futures::future::join_all(requests).await {
        let reply = reply.expect("no panic");
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.pod_name(), "backend-h2");
    }
    lb.stop().await;
}

/// A POST body streams to the backend and its echo streams back while the
/// client is still sending: each piece comes back before the next is sent.
/// Then a body larger than the connection's window goes through whole.
#[tokio::test]
async fn request_and_response_bodies_stream_both_ways() {
    let upstream = start_backend("echo").await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;
    let mut client = h2_client(lb.addr).await;

    let (pieces, receiver) = mpsc::channel::<Bytes>(1);
    let body = StreamBody::new(
        futures::stream::unfold(receiver, |mut receiver| async move {
            let piece = receiver.recv().await?;
            Some((Ok::<_, Infallible>(BodyFrame::data(piece)), receiver))
        })
        .boxed(),
    );
    let request = Request::post(lb.url("/echo-body"))
        .body(body)
        .expect("a valid request");
    client
        .ready()
        .await
        .expect("the connection takes a request");
    let response = tokio::time::timeout(PATIENCE, async {
        // The head comes before the body is done only if both directions stream.
        pieces
            .send(Bytes::from_static(b"first "))
            .await
            .expect("the body is read");
        client.send_request(request).await
    })
    .await
    .expect("the response head arrives while the body is still open")
    .expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    let mut echo = response.into_body();
    let mut echoed = Vec::new();
    for piece in [&b"first "[..], b"second ", b"third"] {
        if piece != b"first " {
            pieces
                .send(Bytes::copy_from_slice(piece))
                .await
                .expect("the body is read");
        }
        while echoed.len() < piece.len() {
            let frame = tokio::time::timeout(PATIENCE, echo.frame())
                .await
                .expect("the echo of a piece arrives before the next is sent")
                .expect("the body goes on")
                .expect("no error");
            if let Ok(data) = frame.into_data() {
                echoed.extend_from_slice(&data);
            }
        }
        assert_eq!(echoed, piece);
        echoed.clear();
    }
    drop(pieces);
    let rest = tokio::time::timeout(PATIENCE, echo.collect())
        .await
        .expect("the body ends with the request's")
        .expect("no error");
    assert!(rest.to_bytes().is_empty());

    // Three times the connection window: flow control moves it through.
    let big = crate::support::upstream::pattern(6 * 1024 * 1024);
    let reply = h2_send(
        &mut h2_client(lb.addr).await,
        Request::post(lb.url("/echo-body"))
            .body(Full::new(Bytes::from(big.clone())))
            .expect("a valid request"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body == big, "the echo is the body sent");
    lb.stop().await;
}

/// Over TLS, a client that offers ALPN `h2` gets HTTP/2 and is served; one
/// that offers `http/1.1` alone still gets HTTP/1.1.
#[tokio::test]
async fn h2_is_negotiated_by_alpn_over_tls_and_http1_clients_still_get_http1() {
    let upstream = start_backend("backend-tls").await;
    let cert = TestCert::for_names(&["localhost"]);
    let mount = secret_mount(&cert);
    let (app, tls_addr) = https(&upstream, &mount, "").await;

    let tls = TlsClient::offering_h2(&[&cert])
        .connect(tls_addr, "localhost")
        .await
        .expect("a TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut client = h2_handshake(tls).await;
    let reply = h2_get(
        &mut client,
        &format!("https://localhost:{}/echo-headers", tls_addr.port()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let seen = reply.json();
    assert_eq!(seen["x-forwarded-proto"], serde_json::json!(["https"]));
    assert_eq!(
        seen["host"],
        serde_json::json!([format!("localhost:{}", tls_addr.port())]),
        "the :authority is the backend's Host"
    );

    let http1 = TlsClient::trusting(&[&cert])
        .get(tls_addr, "localhost", "/")
        .await
        .expect("an HTTPS exchange");
    assert_eq!(http1.status, StatusCode::OK);
    assert_eq!(http1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    app.stop(Duration::ZERO).await;
}

/// The stream cap is announced in the server's first SETTINGS, and a stream
/// over it is refused (REFUSED_STREAM, which a client may retry) while the
/// ones under it are served.
#[tokio::test]
async fn the_stream_cap_is_announced_and_a_stream_over_it_is_refused() {
    let upstream = start_backend("held").await;
    let mut limits = ServerLimits::DEFAULT;
    limits.http2.max_concurrent_streams = 2;
    let lb = TestLb::start_with_limits(vec![upstream.addr], limits).await;
    let authority = lb.addr.to_string();

    let mut conn = H2Conn::connect(lb.addr).await;
    let settings = conn.next_of(SETTINGS).await.expect("the server's SETTINGS");
    assert!(
        settings.settings().contains(&(MAX_CONCURRENT_STREAMS, 2)),
        "{:?}",
        settings.settings()
    );
    conn.send(&frame(SETTINGS, ACK, 0, &[])).await;
    for stream in [1, 3, 5] {
        conn.send(&h2frames::get(stream, "/hold", &authority)).await;
    }
    let refused = conn.next_of(RST_STREAM).await.expect("a refused stream");
    assert_eq!((refused.stream, refused.error_code()), (5, REFUSED_STREAM));

    upstream.wait_for_requests(2).await;
    upstream.release_held();
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let headers = conn
            .next_of(HEADERS)
            .await
            .expect("the held streams' answers");
        // `:status 200` is entry 8 of HPACK's static table.
        assert_eq!(headers.payload.first(), Some(&0x88), "{headers:?}");
        answered.push(headers.stream);
    }
    answered.sort_unstable();
    assert_eq!(answered, [1, 3]);
    // Closed here: shutdown would wait for it to answer its GOAWAY's PING.
    drop(conn);
    lb.stop().await;
}

/// A header list over `maxHeaderBytes` gets 431 on its stream, and the
/// connection goes on serving.
#[tokio::test]
async fn a_header_list_over_max_header_bytes_gets_431_and_the_connection_goes_on() {
    let upstream = start_backend("backend-1").await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;
    let mut client = h2_client(lb.addr).await;
    let too_big = "x".repeat(ServerLimits::DEFAULT.max_header_bytes + 1024);
    let request = Request::get(lb.url("/"))
        .header("x-big", too_big)
        .body(Full::default())
        .expect("a valid request");
    let reply = h2_send(&mut client, request).await;
    assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(
        h2_get(&mut client, &lb.url("/")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        upstream.received(),
        1,
        "only the second request was proxied"
    );
    lb.stop().await;
}

/// A header block that never ends (HEADERS without END_HEADERS, then
/// CONTINUATION after CONTINUATION) closes its connection with GOAWAY.
#[tokio::test]
async fn a_continuation_flood_closes_that_connection_while_another_client_is_served() {
    let ended = flood_beside_a_served_client(|authority| {
        let opening = frame(HEADERS, 0, 1, &get_block("/", authority));
        // Each CONTINUATION one more small field (a literal with a new name,
        // `x-flood: 1`), none ending the block.
        let field = [&[0x00, 0x07][..], b"x-flood", &[0x01], b"1"].concat();
        let continuation = frame(CONTINUATION, 0, 1, &field);
        (opening, continuation.repeat(100))
    })
    .await;
    assert_eq!(ended.goaways(), [ENHANCE_YOUR_CALM], "{ended:?}");
    assert!(
        !ended.frames.iter().any(|f| f.kind == HEADERS),
        "never answered"
    );
}

/// Rapid reset (CVE-2023-44487): streams opened and reset at once, thousands
/// of times, close that connection with GOAWAY while a second client on
/// another connection keeps getting 200s.
#[tokio::test]
async fn a_rapid_reset_flood_closes_that_connection_while_another_client_is_served() {
    let mut stream = 1;
    let ended = flood_beside_a_served_client(|authority| {
        let batch = (0..100)
            .flat_map(|_| {
                let pair = [
                    h2frames::get(stream, "/", authority),
                    h2frames::rst_stream(stream, CANCEL),
                ];
                stream += 2;
                pair.concat()
            })
            .collect();
        (Vec::new(), batch)
    })
    .await;
    assert_eq!(ended.goaways(), [ENHANCE_YOUR_CALM], "{ended:?}");
    // The GOAWAY names the last stream served: the flood was stopped early.
    let last = ended.goaway_last_stream().expect("a GOAWAY");
    assert!(last < 2 * 10_000, "{ended:?}");
}

/// SETTINGS frames, each acknowledged, sent without end: the connection is
/// closed, the other client served.
#[tokio::test]
async fn a_settings_flood_closes_that_connection_while_another_client_is_served() {
    let settings = h2frames::settings(&[(MAX_CONCURRENT_STREAMS, 100)]);
    let ended = flood_beside_a_served_client(|_| (Vec::new(), settings.repeat(100))).await;
    assert_closed_for_flooding(&ended);
}

/// PING frames, each answered, sent without end: the connection is closed,
/// the other client served.
#[tokio::test]
async fn a_ping_flood_closes_that_connection_while_another_client_is_served() {
    let ping = h2frames::ping(*b"floodme!");
    let ended = flood_beside_a_served_client(|_| (Vec::new(), ping.repeat(100))).await;
    assert_closed_for_flooding(&ended);
}

/// How many batches a flood has at most: with 100 frames (or pairs) in each,
/// ten times the control-frame budget.
const BATCHES: usize = 100;

/// Starts a load balancer, floods one connection with what `flood_of` makes
/// for the load balancer's authority (frames to open with, then one batch,
/// sent [`BATCHES`] times with stream ids moving on if it makes them anew)
/// while a second client on another connection is served, checks that new
/// clients are served after, and returns how the flood ended.
async fn flood_beside_a_served_client(
    mut flood_of: impl FnMut(&str) -> (Vec<u8>, Vec<u8>),
) -> FloodEnd {
    let upstream = start_backend("backend-1").await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;
    let authority = lb.addr.to_string();
    let (opening, first) = flood_of(&authority);
    let rest = (1..BATCHES).map(|_| flood_of(&authority).1);
    let batches: Vec<Vec<u8>> = std::iter::once(first).chain(rest).collect();
    let url = lb.url("/");
    let (ended, ()) = tokio::join!(
        flood(lb.addr, &opening, batches.into_iter()),
        assert_served(lb.addr, &url, 20),
    );
    let mut client = h2_client(lb.addr).await;
    assert_eq!(h2_get(&mut client, &url).await.status, StatusCode::OK);
    assert_eq!(get(&url).await.status, StatusCode::OK, "HTTP/1.1 too");
    lb.stop().await;
    ended
}

/// The server closed the connection (`flood` waits for that) having
/// answered no more frames than the control-frame budget allows.
fn assert_closed_for_flooding(ended: &FloodEnd) {
    let answers = ended.frames.iter().filter(|f| f.flags & ACK != 0).count();
    // Within the budget, and at most one batch read past it.
    let most = CONTROL_FRAME_BURST as usize + 100;
    assert!(
        answers <= most,
        "{answers} frames answered, more than {most}"
    );
    // A close for flooding sends no GOAWAY; any other would say why.
    assert!(
        ended
            .goaways()
            .iter()
            .all(|&code| code == ENHANCE_YOUR_CALM),
        "{ended:?}"
    );
}

/// An hour: a limit the test must not run into.
const NEVER: Duration = Duration::from_secs(3600);

/// The idle timeout counts for HTTP/2 as for HTTP/1.1: a connection with no
/// stream open is sent GOAWAY and closed, and the PINGs it keeps sending
/// (control frames, no request) do not keep it open.
#[tokio::test]
async fn an_http2_connection_without_streams_is_sent_goaway_at_the_idle_timeout() {
    let upstream = start_backend("backend-1").await;
    let mut limits = ServerLimits::DEFAULT;
    limits.idle_timeout = Duration::from_millis(300);
    limits.header_read_timeout = NEVER;
    let lb = TestLb::start_with_limits(vec![upstream.addr], limits).await;

    let mut conn = H2Conn::connect(lb.addr).await;
    conn.send(&h2frames::get(1, "/", &lb.addr.to_string()))
        .await;
    let answer = conn.next_of(HEADERS).await.expect("the request's answer");
    assert_eq!(answer.stream, 1);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let goaway = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no GOAWAY while only PINGs arrive"
        );
        // A PING every 50 ms, each answered and none a request.
        tokio::time::sleep(Duration::from_millis(50)).await;
        conn.send(&h2frames::ping(*b"still up")).await;
        match conn.next_frame().await {
            Some(frame) if frame.kind == GOAWAY => break frame,
            Some(_) => {}
            None => panic!("closed without a GOAWAY"),
        }
    };
    assert_eq!(goaway.error_code(), NO_ERROR);
    while conn.next_frame().await.is_some() {}
    lb.stop().await;
}

/// A request head that never ends (HEADERS without END_HEADERS, and nothing
/// after) is cut off at the header-read timeout, as a trickling HTTP/1.1 head
/// is; so is a preface that stops halfway.
#[tokio::test]
async fn an_unfinished_http2_head_or_preface_is_cut_at_the_header_read_timeout() {
    let upstream = start_backend("backend-1").await;
    let mut limits = ServerLimits::DEFAULT;
    limits.idle_timeout = NEVER;
    limits.header_read_timeout = Duration::from_millis(300);
    let lb = TestLb::start_with_limits(vec![upstream.addr], limits).await;

    let mut conn = H2Conn::connect(lb.addr).await;
    let block = get_block("/", &lb.addr.to_string());
    conn.send(&frame(HEADERS, 0, 1, &block)).await;
    while let Some(frame) = conn.next_frame().await {
        assert_ne!(frame.kind, HEADERS, "no answer to an unfinished head");
    }

    let half =
        crate::support::raw::RawConn::send_until_closed(lb.addr, &h2frames::PREFACE[..10]).await;
    assert!(half.is_empty(), "{half:?}");
    assert_eq!(upstream.received(), 0);
    lb.stop().await;
}

/// While the load balancer drains, an HTTP/2 connection is sent GOAWAY at its
/// next response (where HTTP/1.1 gets `Connection: close`); that response is
/// whole, and a new connection is still served until the listener closes.
#[tokio::test]
async fn while_draining_an_http2_connection_is_sent_goaway_after_its_next_response() {
    let upstream = start_backend("backend-1").await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;
    let authority = lb.addr.to_string();
    let mut conn = H2Conn::connect(lb.addr).await;
    conn.send(&h2frames::get(1, "/", &authority)).await;
    assert_eq!(conn.next_of(HEADERS).await.expect("answered").stream, 1);

    lb.shutdown.begin_draining();
    conn.send(&h2frames::get(3, "/", &authority)).await;
    let mut seen = Vec::new();
    while let Some(frame) = conn.next_frame().await {
        seen.push((frame.kind, frame.stream));
    }
    assert!(seen.contains(&(HEADERS, 3)), "{seen:?}");
    assert!(seen.contains(&(GOAWAY, 0)), "{seen:?}");

    let mut client = h2_client(lb.addr).await;
    assert_eq!(
        h2_get(&mut client, &lb.url("/")).await.status,
        StatusCode::OK
    );
    lb.stop().await;
}

/// An HTTP/2 connection takes one slot under `maxConnections`, whatever the
/// number of its streams.
#[tokio::test]
async fn an_http2_connection_takes_one_slot_for_all_its_streams() {
    let upstream = start_backend("held").await;
    let mut limits = ServerLimits::DEFAULT;
    limits.max_connections = 1;
    let lb = TestLb::start_with_limits(vec![upstream.addr], limits).await;
    let client = h2_client(lb.addr).await;
    let requests = spawn_gets(&client, &lb.url("/hold"), 10);
    upstream.wait_for_requests(10).await;
    upstream.release_held();
    for reply in futures::future::join_all(requests).await {
        assert_eq!(reply.expect("no panic").status, StatusCode::OK);
    }
    drop(client);
    lb.stop().await;
}

/// Shutdown: the HTTP/2 client is sent GOAWAY, its request in flight still
/// completes, and new connections are refused.
#[tokio::test]
async fn shutdown_sends_goaway_lets_the_request_in_flight_finish_and_refuses_new_connections() {
    let upstream = start_backend("held").await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;
    let addr = lb.addr;
    let mut conn = H2Conn::connect(addr).await;
    conn.send(&h2frames::get(1, "/hold", &addr.to_string()))
        .await;
    upstream.wait_for_requests(1).await;

    let stopping = tokio::spawn(lb.stop());
    let goaway = conn
        .next_of(GOAWAY)
        .await
        .expect("a GOAWAY before the close");
    assert_eq!(goaway.error_code(), NO_ERROR);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener still takes connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    upstream.release_held();
    let answer = conn
        .next_of(HEADERS)
        .await
        .expect("the held request's answer");
    assert_eq!(answer.stream, 1);
    assert_eq!(answer.payload.first(), Some(&0x88), ":status 200");
    while conn.next_frame().await.is_some() {}
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("the load balancer stops once the request is done")
        .expect("no panic");
}

/// Shutdown: a stream that outlasts the shutdown timeout is cut, as an
/// HTTP/1.1 request is, and serving returns without it.
#[tokio::test]
async fn a_stream_outlasting_the_shutdown_timeout_is_cut_and_serving_returns() {
    let upstream = start_backend("held").await;
    let mut limits = ServerLimits::DEFAULT;
    // Whole seconds: the config carries `shutdownTimeoutSeconds`.
    limits.shutdown_timeout = Duration::from_secs(1);
    let lb = TestLb::start_with_limits(vec![upstream.addr], limits).await;
    let mut conn = H2Conn::connect(lb.addr).await;
    conn.send(&h2frames::get(1, "/hold", &lb.addr.to_string()))
        .await;
    upstream.wait_for_requests(1).await;

    lb.shutdown.begin_draining();
    lb.shutdown.stop();
    // Returns within PATIENCE although the held request is never released.
    lb.stopped().await;
    let mut seen = Vec::new();
    while let Some(frame) = conn.next_frame().await {
        seen.push((frame.kind, frame.stream));
    }
    assert!(seen.contains(&(GOAWAY, 0)), "{seen:?}");
    assert!(
        !seen.contains(&(HEADERS, 1)),
        "the held stream was answered: {seen:?}"
    );
    upstream.release_held();
}
