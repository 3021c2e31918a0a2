//! Upgraded connections through the proxy, at the byte level: a request with
//! `Connection: upgrade` reaches the backend with both headers, a `101` turns
//! the two connections into a tunnel that copies bytes both ways, and the
//! tunnel closes when both sides have, when it is idle for
//! `tunnelIdleTimeoutMs`, or when the load balancer stops. The backend here
//! agrees to any protocol and echoes, so the tests need no WebSocket library;
//! the WebSocket tests run the real backend's `/ws`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use loadbalancer::proxy::ProxySettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::raw::RawConn;
use crate::support::scripted::{Answer, ScriptedBackend};
use crate::support::{TestLb, get, metric, wait_for};

/// What the echo backend sends right after its `101`, before anything is asked.
const GREETING: &[u8] = b"hello from the backend\n";

/// A backend that agrees to every upgrade: it answers `101` naming the
/// protocol asked for, sends [`GREETING`] in the same write, then echoes
/// every byte until the client ends its stream. It records each request head.
#[derive(Debug)]
struct UpgradeEcho {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl UpgradeEcho {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound address");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&heads);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, Arc::clone(&recorded)));
            }
        });
        Self { addr, heads }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("not poisoned").clone()
    }
}

async fn serve(mut stream: TcpStream, heads: Arc<Mutex<Vec<String>>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    heads.lock().expect("not poisoned").push(head.clone());
    let protocol = head
        .lines()
        .find_map(|line| line.strip_prefix("upgrade: "))
        .map(str::to_owned);
    let Some(protocol) = protocol else {
        let _ = stream
            .write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    let mut answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {protocol}\r\n\r\n"
    )
    .into_bytes();
    answer.extend_from_slice(GREETING);
    if stream.write_all(&answer).await.is_err() {
        return;
    }
    let (mut reader, mut writer) = stream.split();
    let _ = tokio::io::copy(&mut reader, &mut writer).await;
    let _ = writer.shutdown().await;
}

const UPGRADE_REQUEST: &[u8] =
    b"GET /chat HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n";

/// Opens a tunnel to the echo backend through `lb`, past its greeting.
async fn open_tunnel(lb: &TestLb) -> RawConn {
    let mut client = RawConn::connect(lb.addr).await;
    client.send(UPGRADE_REQUEST).await;
    let switched = client.response().await.expect("an answer");
    assert_eq!(switched.status, 101, "{switched:?}");
    assert_eq!(switched.header("upgrade"), Some("echo"));
    assert_eq!(switched.header("connection"), Some("upgrade"));
    assert_eq!(client.read_exact(GREETING.len()).await, GREETING);
    client
}

fn tunnel_settings(idle: Duration) -> ProxySettings {
    ProxySettings {
        tunnel_idle_timeout: idle,
        ..TestLb::SETTINGS
    }
}

#[tokio::test]
async fn an_upgrade_becomes_a_tunnel_that_carries_bytes_both_ways_until_both_sides_close() {
    let backend = UpgradeEcho::start().await;
    let lb = TestLb::start_with(vec![backend.addr], TestLb::SETTINGS).await;
    let mut client = open_tunnel(&lb).await;

    let head = &backend.heads()[0];
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(head.contains("\r\nupgrade: echo\r\n"), "{head}");
    assert_eq!(
        metric(lb.admin_addr, "loadbalancer_tunnels_open").await,
        1.0
    );
    assert_eq!(lb.backends.state(backend.addr).tunnels(), 1);
    assert_eq!(
        lb.backends.state(backend.addr).in_flight(),
        1,
        "a tunnel holds its slot"
    );
    let status = get(&lb.admin_url("/debug/backends")).await.json();
    assert_eq!(status["backends"][0]["tunnels"], 1, "{status}");

    for message in [&b"ping"[..], &[7u8; 100_000][..]] {
        client.send(message).await;
        assert_eq!(client.read_exact(message.len()).await, message);
    }
    // The client ends its stream; the backend's echo ends in turn.
    client.shutdown_write().await;
    assert!(client.closed().await.is_empty());
    wait_for(
        "the tunnel to close",
        || lb.backends.state(backend.addr).tunnels(),
        |&n| n == 0,
    )
    .await;
    assert_eq!(lb.backends.state(backend.addr).in_flight(), 0);
    assert_eq!(
        metric(lb.admin_addr, "loadbalancer_tunnels_open").await,
        0.0
    );
    let up = metric(
        lb.admin_addr,
        r#"loadbalancer_tunnel_bytes_total{direction="upstream"}"#,
    )
    .await;
    let down = metric(
        lb.admin_addr,
        r#"loadbalancer_tunnel_bytes_total{direction="downstream"}"#,
    )
    .await;
    assert_eq!(up, 100_004.0);
    assert_eq!(down, (100_004 + GREETING.len()) as f64);
    assert_eq!(
        metric(lb.admin_addr, "loadbalancer_tunnel_duration_seconds_count").await,
        1.0
    );
    lb.stop().await;
}

#[tokio::test]
async fn a_quiet_tunnel_is_closed_at_the_tunnel_idle_timeout() {
    let backend = UpgradeEcho::start().await;
    let lb = TestLb::start_with(
        vec![backend.addr],
        tunnel_settings(Duration::from_millis(300)),
    )
    .await;
    let mut client = open_tunnel(&lb).await;
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        client.send(b"x").await;
        assert_eq!(client.read_exact(1).await, b"x");
    }
    // ...and silence closes it.
    assert!(client.closed().await.is_empty());
    lb.stop().await;
}

#[tokio::test]
async fn stopping_the_load_balancer_closes_its_tunnels() {
    let backend = UpgradeEcho::start().await;
    let lb = TestLb::start_with(vec![backend.addr], TestLb::SETTINGS).await;
    let mut client = open_tunnel(&lb).await;
    let stopping = tokio::spawn(lb.stop());
    assert!(client.closed().await.is_empty(), "the tunnel is closed");
    stopping.await.expect("the load balancer stops");
}

#[tokio::test]
async fn an_upgrade_to_h2c_is_not_passed_on() {
    let backend = UpgradeEcho::start().await;
    let lb = TestLb::start_with(vec![backend.addr], TestLb::SETTINGS).await;
    let mut client = RawConn::connect(lb.addr).await;
    client
        .send(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
        .await;
    let reply = client.response().await.expect("an answer");
    assert_eq!(reply.status, 426, "the backend saw no upgrade: {reply:?}");
    let head = &backend.heads()[0];
    assert!(!head.contains("upgrade"), "{head}");
    assert!(!head.contains("http2-settings"), "{head}");
    lb.stop().await;
}

#[tokio::test]
async fn a_101_the_client_did_not_ask_for_answers_502() {
    let backend = ScriptedBackend::start([Answer::keep_open(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )])
    .await;
    let lb = TestLb::start_with(vec![backend.addr], TestLb::SETTINGS).await;
    get(&lb.url("/"))
        .await
        .assert_proxy_error(StatusCode::BAD_GATEWAY, "the backend failed to answer");
    lb.stop().await;
}
