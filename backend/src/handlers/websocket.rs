//! `GET /ws`: a WebSocket echo, to show a long-lived, two-way connection passing
//! through the load balancer. The first message is the identity JSON that `GET /`
//! answers with, so a client sees which pod it reached; after that every text and
//! binary message comes back unchanged.
//!
//! The handshake (RFC 6455 section 4.2) is an ordinary request: `accept` checks
//! it and builds the `101 Switching Protocols` answer, or the 4xx that says what
//! is wrong. hyper writes the 101 and then hands the socket out through
//! `hyper::upgrade::on` (the shared listener serves connections with upgrades);
//! `spawn` has a task waiting for it, which speaks WebSocket over it with
//! tungstenite, the frame codec most of the Rust ecosystem uses (axum and warp
//! build on it too).
//!
//! Once upgraded, the socket has left the listener: its idle and header-read
//! timeouts, its `maxConnections` slot and its shutdown wait no longer apply, so a
//! quiet session is never cut for being idle. What bounds a session instead:
//!
//! * the peer: a Close frame is answered with a Close frame (tungstenite does
//!   that), and the session ends; so does a socket the peer closes;
//! * a peer that has gone: every [`PING_INTERVAL`] the server sends a Ping. A
//!   session from which nothing at all (a Pong, a message) arrived in the
//!   interval after a Ping, or whose peer does not take one frame within two
//!   intervals, is dropped without a Close frame, since nobody is reading. A quiet
//!   peer that answers pings (every WebSocket library and browser does) stays
//!   connected for as long as it likes, and a vanished one is dropped within two
//!   intervals. The pings also keep a proxy's idle timer from closing a quiet
//!   tunnel;
//! * shutdown: when the listener closes (after the shutdown delay), every session
//!   gets a Close frame with code 1001 (going away) and has until the shutdown
//!   timeout to answer it; then its socket is closed. While the backend drains,
//!   `/ws` refuses new sessions with 503, as a long-lived connection should not
//!   start on a pod that is leaving.
//!
//! Messages may be up to [`MAX_MESSAGE_BYTES`]; a larger one ends the session
//! with Close code 1009 (message too big).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::header::{
    CONNECTION, HeaderMap, HeaderName, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};

use super::{Body, error};
use crate::metrics::Metrics;

/// How often the server pings a session; see the module docs for what an
/// unanswered ping does. Well below the idle timeouts proxies use (the load
/// balancer's default is 60 s), so the pings also keep a quiet tunnel open.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

/// The largest message (and frame) a session accepts: tungstenite's default frame
/// limit, applied to whole messages too, so a session holds at most one such
/// message at a time in each direction.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The one WebSocket version there is (RFC 6455 section 4.1).
const VERSION: &str = "13";

/// The open sessions of one app, and the signal that closes them at shutdown.
#[derive(Debug)]
pub(crate) struct Sessions {
    /// `None` while serving; at shutdown, the deadline by which every session has
    /// closed its socket, its closing handshake answered or not. Every session
    /// holds a receiver from the moment its 101 is built until its socket is
    /// closed, so the receiver count is the number of sessions open or opening.
    closing: watch::Sender<Option<Instant>>,
}

impl Sessions {
    pub(crate) fn new() -> Self {
        Self {
            closing: watch::Sender::new(None),
        }
    }

    /// Sessions open now, or answered with a 101 and about to open.
    pub(crate) fn open(&self) -> usize {
        self.closing.receiver_count()
    }

    /// Sends every session, and any that opens from now on, a Close frame (1001,
    /// going away), and returns once all have ended: answered, or cut when
    /// `timeout` has passed.
    pub(crate) async fn close_all(&self, timeout: Duration) {
        let now = Instant::now();
        // Only an absurd timeout overflows; a year is as good as forever here.
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        let open = self.open();
        self.closing.send_replace(Some(deadline));
        if open == 0 {
            return;
        }
        info!(
            sessions = open,
            "closing WebSocket sessions (1001, going away)"
        );
        if tokio::time::timeout_at(deadline, self.closing.closed())
            .await
            .is_err()
        {
            warn!(
                sessions = self.open(),
                timeout_ms = timeout.as_millis(),
                "shutdown timeout reached, closing WebSocket sessions that did not answer the close"
            );
            // Every wait in a session ends at the deadline too (see `run`), so
            // this is the moment it takes them to drop their sockets.
            self.closing.closed().await;
        }
    }
}

/// Checks that `request` is a WebSocket handshake and answers it: with `101
/// Switching Protocols`, or with the error that says what is wrong.
///
/// * Not a handshake at all (not a `GET` over HTTP/1.1 with `Connection: upgrade`
///   and `Upgrade: websocket`): `426 Upgrade Required` with `Upgrade: websocket`,
///   as RFC 9110 section 15.5.22 asks.
/// * A version other than 13: 426 with `Sec-WebSocket-Version: 13`, as RFC 6455
///   section 4.4 asks.
/// * A `Sec-WebSocket-Key` that is not the base64 of 16 bytes: `400`.
pub(super) fn accept<B>(request: &Request<B>) -> Response<Body> {
    let headers = request.headers();
    let is_handshake = request.method() == Method::GET
        && request.version() == Version::HTTP_11
        && has_token(headers, CONNECTION, "upgrade")
        && has_token(headers, UPGRADE, "websocket");
    if !is_handshake {
        return upgrade_required(
            "this endpoint speaks WebSocket: send a GET with `Connection: upgrade` and \
             `Upgrade: websocket` over HTTP/1.1",
        );
    }
    if !is_only(headers, SEC_WEBSOCKET_VERSION, VERSION) {
        let mut response = upgrade_required("unsupported WebSocket version: only 13 is spoken");
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static(VERSION));
        return response;
    }
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) if is_valid_key(key.as_bytes()) => key,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key must be one header: the base64 of 16 bytes",
            );
        }
    };
    // Base64 is always a valid header value; the fallback keeps this panic-free.
    let Ok(accept) = HeaderValue::try_from(derive_accept_key(key.as_bytes())) else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot build Sec-WebSocket-Accept",
        );
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// A 426 with `reason` as the JSON error, naming the protocol to upgrade to.
fn upgrade_required(reason: &str) -> Response<Body> {
    let mut response = error(StatusCode::UPGRADE_REQUIRED, reason);
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    // `Upgrade` is hop-by-hop, so `Connection` must name it (RFC 9110 section 7.8).
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    response
}

/// Whether the comma-separated header `name` lists `token` (case-insensitive), on
/// any of its lines.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether header `name` occurs exactly once, with exactly `value`.
fn is_only(headers: &HeaderMap, name: HeaderName, value: &str) -> bool {
    let mut values = headers.get_all(name).iter();
    matches!((values.next(), values.next()), (Some(v), None) if v.as_bytes().trim_ascii() == value.as_bytes())
}

/// Whether `key` is what RFC 6455 section 4.1 asks for: 16 bytes in base64, which
/// is always 22 characters of the base64 alphabet followed by `==`.
fn is_valid_key(key: &[u8]) -> bool {
    let key = key.trim_ascii();
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// What a session needs besides its socket.
#[derive(Debug)]
pub(super) struct Session {
    /// The first message: the identity JSON.
    pub(super) greeting: String,
    /// Ping period, [`PING_INTERVAL`] unless the app was given another.
    pub(super) ping_interval: Duration,
    /// Counted as open from the upgrade until the socket closes.
    pub(super) metrics: Arc<Metrics>,
    /// The `x-request-id` of the handshake, so the session's log line can be
    /// joined with the access log (`-` when there was none).
    pub(super) request_id: String,
}

/// Runs the session of `request`, whose handshake [`accept`] has answered with
/// 101, on a task of its own: hyper hands the socket over only after the 101 has
/// been written, so the handler cannot wait for it.
pub(super) fn spawn<B>(request: &mut Request<B>, sessions: &Sessions, session: Session) {
    let upgrade = hyper::upgrade::on(request);
    let closing = sessions.closing.subscribe();
    tokio::spawn(run(upgrade, closing, session));
}

/// Why a session ended, for its log line.
#[derive(Debug)]
enum End {
    /// The peer closed: a Close frame or the socket.
    PeerClosed,
    /// Nothing arrived for a whole interval after a ping.
    Silent,
    /// One frame could not be handed over within two ping intervals.
    Stalled,
    /// The backend shut down and the peer answered the Close frame.
    Shutdown,
    /// The backend shut down and the peer did not answer within the timeout.
    ShutdownTimeout,
    /// The socket failed or the peer broke the protocol.
    Failed(WsError),
}

impl End {
    fn reason(&self) -> &'static str {
        match self {
            Self::PeerClosed => "peer closed",
            Self::Silent => "peer stopped answering pings",
            Self::Stalled => "peer stopped reading",
            Self::Shutdown => "shutdown",
            Self::ShutdownTimeout => "shutdown, close not answered",
            Self::Failed(_) => "error",
        }
    }
}

/// One session, from the upgrade to the closed socket. Every wait here ends by
/// the shutdown deadline at the latest, which `Sessions::close_all` relies on.
async fn run(upgrade: OnUpgrade, mut closing: watch::Receiver<Option<Instant>>, session: Session) {
    let upgraded = tokio::select! {
        upgraded = upgrade => upgraded,
        () = past_deadline(&mut closing) => return,
    };
    let upgraded = match upgraded {
        Ok(upgraded) => upgraded,
        Err(error) => {
            debug!(%error, request_id = %session.request_id, "WebSocket upgrade did not happen");
            return;
        }
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let mut ws =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let _open = session.metrics.websocket_opened();
    let started = Instant::now();
    let mut echoed: u64 = 0;
    // When the close signal wins, the echo future is dropped, possibly half-way
    // through sending a message; tungstenite has that frame whole in its buffer,
    // so the Close frame follows it rather than cutting it.
    let end = tokio::select! {
        end = echo(&mut ws, session.greeting, session.ping_interval, &mut echoed) => end,
        deadline = close_requested(&mut closing) => {
            let goodbye = async {
                let frame = CloseFrame {
                    code: CloseCode::Away,
                    reason: "server shutting down".into(),
                };
                if ws.close(Some(frame)).await.is_ok() {
                    // Whatever still arrives is dropped; the stream ends with the
                    // peer's Close frame.
                    while let Some(Ok(_)) = ws.next().await {}
                }
            };
            match tokio::time::timeout_at(deadline, goodbye).await {
                Ok(()) => End::Shutdown,
                Err(_) => End::ShutdownTimeout,
            }
        }
    };
    if let End::Failed(error) = &end {
        // Tell the peer why, when the protocol has a code for it; a broken socket
        // gets nothing.
        let code = match error {
            WsError::Capacity(_) => Some((CloseCode::Size, "message too big")),
            WsError::Protocol(_) => Some((CloseCode::Protocol, "protocol error")),
            WsError::Utf8(_) => Some((CloseCode::Invalid, "text is not UTF-8")),
            _ => None,
        };
        if let Some((code, reason)) = code {
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let close = tokio::time::timeout(session.ping_interval, ws.close(Some(frame)));
            tokio::select! {
                _ = close => {}
                () = past_deadline(&mut closing) => {}
            }
        }
        debug!(%error, request_id = %session.request_id, "WebSocket session failed");
    }
    info!(
        reason = end.reason(),
        messages = echoed,
        duration_ms = started.elapsed().as_millis() as u64,
        request_id = %session.request_id,
        "WebSocket session ended"
    );
}

/// Completes with the deadline once shutdown asks the sessions to close; never,
/// if the app (and its sender) is gone without asking.
async fn close_requested(closing: &mut watch::Receiver<Option<Instant>>) -> Instant {
    // The value is copied out at once: the guard `wait_for` returns holds a lock.
    let deadline = closing
        .wait_for(Option::is_some)
        .await
        .map(|deadline| *deadline);
    match deadline {
        Ok(deadline) => deadline.unwrap_or_else(Instant::now),
        Err(_) => std::future::pending().await,
    }
}

/// Completes once shutdown has asked the sessions to close and its deadline has
/// passed.
async fn past_deadline(closing: &mut watch::Receiver<Option<Instant>>) {
    let deadline = close_requested(closing).await;
    tokio::time::sleep_until(deadline).await;
}

/// The session proper: the greeting, then echo and pings until it ends.
async fn echo(
    ws: &mut WebSocketStream<TokioIo<Upgraded>>,
    greeting: String,
    ping_interval: Duration,
    echoed: &mut u64,
) -> End {
    let stall = ping_interval.saturating_mul(2);
    if let Err(end) = send(ws, Message::text(greeting), stall).await {
        return end;
    }
    let mut pings = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // A ping has been sent and nothing has arrived since.
    let mut unanswered = false;
    loop {
        tokio::select! {
            message = ws.next() => match message {
                None => return End::PeerClosed,
                Some(Err(error)) => return End::Failed(error),
                Some(Ok(message)) => {
                    unanswered = false;
                    if message.is_text() || message.is_binary() {
                        if let Err(end) = send(ws, message, stall).await {
                            return end;
                        }
                        *echoed += 1;
                    }
                    // Otherwise a Ping (tungstenite has queued the Pong), a Pong,
                    // or a Close (tungstenite has queued the answer, and the
                    // stream ends next).
                }
            },
            _ = pings.tick() => {
                if unanswered {
                    return End::Silent;
                }
                if let Err(end) = send(ws, Message::Ping(Bytes::new()), stall).await {
                    return end;
                }
                unanswered = true;
            }
        }
    }
}

/// Sends one message, allowing `stall` for the peer to take it.
async fn send(
    ws: &mut WebSocketStream<TokioIo<Upgraded>>,
    message: Message,
    stall: Duration,
) -> Result<(), End> {
    match tokio::time::timeout(stall, ws.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => Err(End::PeerClosed),
        Ok(Err(error)) => Err(End::Failed(error)),
        Err(_) => Err(End::Stalled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(headers: &[(&str, &str)]) -> Request<()> {
        let mut request = Request::get("/ws");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("valid test request")
    }

    const VALID: [(&str, &str); 4] = [
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "WebSocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn a_valid_handshake_gets_the_rfc_accept_key() {
        let response = accept(&handshake(&VALID));
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        // The example of RFC 6455 section 1.3.
        assert_eq!(
            response.headers()[SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(response.headers()[UPGRADE], "websocket");
        assert_eq!(response.headers()[CONNECTION], "upgrade");
    }

    #[test]
    fn a_plain_request_gets_426_naming_websocket() {
        let response = accept(&handshake(&[]));
        assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(response.headers()[UPGRADE], "websocket");
        let without_connection = handshake(&VALID[1..]);
        let response = accept(&without_connection);
        assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
    }

    #[test]
    fn another_version_gets_426_naming_13() {
        for version in [None, Some("8"), Some("13, 8")] {
            let mut headers = vec![VALID[0], VALID[1], VALID[3]];
            headers.extend(version.map(|v| ("sec-websocket-version", v)));
            let response = accept(&handshake(&headers));
            assert_eq!(
                response.status(),
                StatusCode::UPGRADE_REQUIRED,
                "{version:?}"
            );
            assert_eq!(response.headers()[SEC_WEBSOCKET_VERSION], "13");
        }
    }

    #[test]
    fn a_bad_key_gets_400() {
        for key in [
            None,
            Some("short=="),
            Some("dGhlIHNhbXBsZSBub25jZQ"),
            Some("dGhlIHNhbXBsZSBub25j?Q=="),
            Some("dGhlIHNhbXBsZSBub25jZQ=x"),
        ] {
            let mut headers = VALID[..3].to_vec();
            headers.extend(key.map(|k| ("sec-websocket-key", k)));
            let response = accept(&handshake(&headers));
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{key:?}");
        }
        let mut twice = VALID.to_vec();
        twice.push(VALID[3]);
        let response = accept(&handshake(&twice));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
}
