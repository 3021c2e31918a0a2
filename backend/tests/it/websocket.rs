//! `GET /ws`, the WebSocket echo, through a real server on `127.0.0.1:0` and a
//! real WebSocket client (tokio-tungstenite): the identity message first, text and
//! binary echo up to the size limit, the refusals of requests that are no
//! handshake, what keeps a quiet session open and what ends a silent one, the
//! Close frame at shutdown, and the session metrics.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use backend::handlers::App;
use backend::handlers::websocket::MAX_MESSAGE_BYTES;
use backend::server::{DEFAULT_LIMITS, ServerLimits};
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{Method, StatusCode};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::metrics::sample;
use crate::support::{Conn, PATIENCE, TestServer, eventually, test_identity};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn url(addr: SocketAddr) -> String {
    format!("ws://{addr}/ws")
}

/// Opens a session on `addr` and checks the handshake's answer.
async fn connect(addr: SocketAddr) -> Client {
    let (ws, response) = tokio::time::timeout(PATIENCE, connect_async(url(addr)))
        .await
        .expect("the handshake does not hang")
        .expect("the handshake succeeds");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// The next message, whatever it is; `None` once the session has ended.
async fn next(ws: &mut Client) -> Option<Result<Message, WsError>> {
    tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("a message or the end arrives")
}

/// The next text, binary or close message, skipping pings and pongs.
async fn next_data(ws: &mut Client) -> Message {
    loop {
        match next(ws).await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(message)) => return message,
            other => panic!("the session ended early: {other:?}"),
        }
    }
}

/// Opens a session and reads its first message, the identity JSON.
async fn connect_greeted(addr: SocketAddr) -> (Client, serde_json::Value) {
    let mut ws = connect(addr).await;
    let Message::Text(text) = next_data(&mut ws).await else {
        panic!("the first message is not text");
    };
    let identity = serde_json::from_str(&text).expect("the first message is JSON");
    (ws, identity)
}

/// Sends `message` and checks it comes back unchanged.
async fn assert_echoes(ws: &mut Client, message: Message) {
    ws.send(message.clone()).await.expect("the message is sent");
    assert!(next_data(ws).await == message, "the echo differs");
}

/// Reads until the session ends and returns the Close frame's code, if one came.
async fn close_code(ws: &mut Client) -> Option<CloseCode> {
    let mut code = None;
    while let Some(Ok(message)) = next(ws).await {
        if let Message::Close(frame) = message {
            code = frame.map(|frame| frame.code);
        }
    }
    code
}

/// The current metrics text of `server`.
async fn metrics(server: &TestServer) -> String {
    let reply = Conn::open(server.addr).await.get("/metrics").await;
    String::from_utf8(reply.body.to_vec()).expect("metrics are UTF-8")
}

#[tokio::test]
async fn the_identity_arrives_first_then_text_and_binary_echo() {
    let server = TestServer::start_default().await;
    let (mut ws, identity) = connect_greeted(server.addr).await;

    let mut keys: Vec<&str> = identity
        .as_object()
        .expect("the identity is a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["podIP", "podName", "serviceName", "timestamp"]);
    let expected = test_identity();
    assert_eq!(identity["podName"], json!(expected.pod_name));
    assert_eq!(identity["podIP"], json!(expected.pod_ip));
    assert_eq!(identity["serviceName"], json!(expected.service_name));

    assert_echoes(&mut ws, Message::text("hello, pod")).await;
    assert_echoes(&mut ws, Message::text("")).await;
    assert_echoes(&mut ws, Message::text("ünïcödé ✓")).await;
    assert_echoes(&mut ws, Message::binary(vec![0_u8, 1, 2, 0xff])).await;
    assert_echoes(&mut ws, Message::binary(Vec::new())).await;

    // A ping is answered with a pong carrying the same payload.
    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .expect("the ping is sent");
    let pong = next(&mut ws).await.expect("a pong").expect("no error");
    assert_eq!(pong, Message::Pong(Bytes::from_static(b"are you there")));

    // Our Close frame is answered with one, and the session ends.
    ws.close(None).await.expect("the close is sent");
    while let Some(message) = next(&mut ws).await {
        let message = message.expect("the session ends cleanly");
        assert!(message.is_close(), "after our close: {message:?}");
    }
}

#[tokio::test]
async fn messages_up_to_the_limit_echo_intact_and_a_larger_one_ends_the_session() {
    let server = TestServer::start_default().await;
    let (mut ws, _) = connect_greeted(server.addr).await;
    // Every byte value, at every offset modulo 251, so a lost or moved byte shows.
    let pattern = |len: usize| -> Vec<u8> { (0..len).map(|i| (i % 251) as u8).collect() };
    for len in [1024 * 1024, MAX_MESSAGE_BYTES] {
        let message = Message::binary(pattern(len));
        ws.send(message.clone()).await.expect("the message is sent");
        match next_data(&mut ws).await {
            Message::Binary(echo) => {
                assert_eq!(echo.len(), len);
                assert!(
                    Message::Binary(echo) == message,
                    "{len} bytes came back changed"
                );
            }
            other => panic!("{len} bytes: not a binary echo: {other:?}"),
        }
    }

    // One byte more is refused: no echo, and the session ends, with a 1009 Close
    // frame if it arrives before the server drops the socket.
    let _ = ws
        .send(Message::binary(pattern(MAX_MESSAGE_BYTES + 1)))
        .await;
    loop {
        match next(&mut ws).await {
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|frame| frame.code);
                assert_eq!(code, Some(CloseCode::Size));
            }
            Some(Ok(Message::Binary(_) | Message::Text(_))) => {
                panic!("an oversized message echoed")
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    eventually("the session has ended", || {
        server.app.websocket_sessions() == 0
    })
    .await;
}

#[tokio::test]
async fn a_request_that_is_no_handshake_gets_a_4xx_json_answer() {
    let server = TestServer::start_default().await;
    let mut conn = Conn::open(server.addr).await;

    let plain = conn.get("/ws").await;
    assert_eq!(plain.status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(plain.header("upgrade"), Some("websocket"));
    assert_eq!(plain.header("content-type"), Some("application/json"));
    assert!(plain.json()["error"].is_string());

    let handshake = |version: &'static str, key: &'static str| {
        [
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", version),
            ("sec-websocket-key", key),
        ]
    };
    let old_version = Conn::open(server.addr)
        .await
        .send(
            Method::GET,
            "/ws",
            &handshake("8", "dGhlIHNhbXBsZSBub25jZQ=="),
        )
        .await;
    assert_eq!(old_version.status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(old_version.header("sec-websocket-version"), Some("13"));
    assert!(old_version.json()["error"].is_string());

    let bad_key = Conn::open(server.addr)
        .await
        .send(Method::GET, "/ws", &handshake("13", "not-a-key"))
        .await;
    assert_eq!(bad_key.status, StatusCode::BAD_REQUEST);
    assert!(bad_key.json()["error"].is_string());

    let post = conn.send(Method::POST, "/ws", &[]).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(server.app.websocket_sessions(), 0);
}

/// The upgraded socket has left the listener's watchdog: neither the idle
/// timeout nor the header-read timeout (here far shorter than the quiet spells)
/// closes it, and a message arriving after a pause is no request head to time.
#[tokio::test]
async fn a_quiet_session_outlives_the_idle_and_header_read_timeouts() {
    let short = Duration::from_millis(200);
    let limits = ServerLimits {
        idle_timeout: short,
        header_read_timeout: short,
        ..DEFAULT_LIMITS
    };
    let server = TestServer::start_with(App::new(test_identity()), limits).await;
    let (mut ws, _) = connect_greeted(server.addr).await;
    for round in 0..3 {
        tokio::time::sleep(short * 5).await;
        assert_echoes(&mut ws, Message::text(format!("after a pause, {round}"))).await;
    }
    assert_eq!(server.app.websocket_sessions(), 1);
}

/// A peer that keeps reading answers the server's pings (the client library does
/// it), so a session with no messages at all stays open over many intervals.
#[tokio::test]
async fn a_quiet_peer_that_answers_pings_stays_connected() {
    // Long enough that a pong is never late on a loaded machine, short enough that
    // ten intervals pass in a few seconds.
    let interval = Duration::from_millis(300);
    let app = App::new(test_identity()).with_ping_interval(interval);
    let server = TestServer::start(app).await;
    let (mut ws, _) = connect_greeted(server.addr).await;

    let until = tokio::time::Instant::now() + interval * 10;
    let mut pings = 0;
    while let Ok(message) = tokio::time::timeout_at(until, ws.next()).await {
        match message {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("only pings while quiet, got {other:?}"),
        }
    }
    assert!(pings >= 2, "{pings} pings in ten intervals");
    assert_echoes(&mut ws, Message::text("still here")).await;
}

/// A peer that reads nothing answers no ping: the session is dropped after the
/// interval that follows an unanswered ping, not before.
#[tokio::test]
async fn a_peer_that_answers_no_ping_is_dropped_after_two_intervals() {
    let interval = Duration::from_millis(200);
    let app = App::new(test_identity()).with_ping_interval(interval);
    let server = TestServer::start(app).await;
    let (mut ws, _) = connect_greeted(server.addr).await;
    let started = Instant::now();
    eventually("the silent session is dropped", || {
        server.app.websocket_sessions() == 0
    })
    .await;
    assert!(
        started.elapsed() >= interval * 3 / 2,
        "dropped after {:?}",
        started.elapsed()
    );
    // What the server sent before giving up: pings, and no Close frame (nobody
    // was reading); then the end of the stream.
    assert_eq!(close_code(&mut ws).await, None);
}

/// Shutdown in steps: during the delay sessions go on and new ones are refused,
/// then every session gets a 1001 Close frame and `serve` returns once it is
/// answered.
#[tokio::test]
async fn shutdown_closes_open_sessions_with_1001_after_the_delay() {
    let delay = Duration::from_millis(500);
    let app = App::new(test_identity()).with_shutdown_delay(delay);
    let mut server = TestServer::start(app).await;
    let (mut ws, _) = connect_greeted(server.addr).await;

    let shutdown_began = Instant::now();
    server.begin_shutdown();
    let app = server.app.clone();
    eventually("readiness turns false", || !app.is_ready()).await;
    assert_echoes(&mut ws, Message::text("still served while draining")).await;
    match connect_async(url(server.addr)).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        other => panic!("a new session while draining: {other:?}"),
    }

    // Reading on answers the Close frame (the client library does it).
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Away));
    assert!(
        shutdown_began.elapsed() >= delay,
        "closed {:?} after the signal",
        shutdown_began.elapsed()
    );
    server.stopped().await.expect("serve returns Ok");
    assert_eq!(app.websocket_sessions(), 0);
}

/// A peer that never answers the Close frame holds shutdown up for the shutdown
/// timeout, then its socket is closed and `serve` returns.
#[tokio::test]
async fn shutdown_cuts_a_session_that_does_not_answer_the_close_at_the_timeout() {
    let timeout = Duration::from_millis(500);
    let limits = ServerLimits {
        shutdown_timeout: timeout,
        ..DEFAULT_LIMITS
    };
    let mut server = TestServer::start_with(App::new(test_identity()), limits).await;
    let (mut ws, _) = connect_greeted(server.addr).await;
    let app = server.app.clone();

    let started = Instant::now();
    server.begin_shutdown();
    server.stopped().await.expect("serve returns Ok");
    assert!(
        started.elapsed() >= timeout,
        "serve returned after {:?}",
        started.elapsed()
    );
    assert_eq!(app.websocket_sessions(), 0);
    // The Close frame was sent all the same; then the socket closed.
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Away));
}

#[tokio::test]
async fn metrics_count_open_and_opened_sessions() {
    let server = TestServer::start_default().await;
    let (mut first, _) = connect_greeted(server.addr).await;
    let (_second, _) = connect_greeted(server.addr).await;
    assert_eq!(
        Conn::open(server.addr).await.get("/ws").await.status,
        StatusCode::UPGRADE_REQUIRED
    );

    let text = metrics(&server).await;
    for (series, value) in [
        ("backend_websocket_sessions_open", 2.0),
        ("backend_websocket_sessions_total", 2.0),
        (r#"backend_requests_total{path="/ws",code="101"}"#, 2.0),
        (r#"backend_requests_total{path="/ws",code="426"}"#, 1.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }

    first.close(None).await.expect("the close is sent");
    close_code(&mut first).await;
    eventually("one session is left", || {
        server.app.websocket_sessions() == 1
    })
    .await;
    let text = metrics(&server).await;
    assert_eq!(sample(&text, "backend_websocket_sessions_open"), Some(1.0));
    assert_eq!(sample(&text, "backend_websocket_sessions_total"), Some(2.0));
}
