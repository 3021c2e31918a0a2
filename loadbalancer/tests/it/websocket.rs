//! WebSockets through the real binary to the real backend's `/ws` echo: the
//! identity greeting, text and binary frames, a 1 MiB message, a quiet session
//! kept for 30 s, `tunnelIdleTimeoutMs` closing a quiet tunnel, SIGTERM closing
//! tunnels after the drain, and the tunnel metrics. The client is
//! tokio-tungstenite, as an application would use.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use loadbalancer::server::ServerLimits;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::faults::{RealBackend, start_real_backend};
use crate::support::process::{Process, TempConfig, ready};
use crate::support::{PATIENCE, metric, wait_for_metric};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Three real backends and the load balancer binary over them, with `extra`
/// config keys.
struct Setup {
    _backends: Vec<RealBackend>,
    _config: TempConfig,
    process: Process,
    proxy: SocketAddr,
    admin: SocketAddr,
}

async fn start(extra: &str) -> Setup {
    let mut backends = Vec::new();
    for i in 1..=3 {
        backends.push(start_real_backend(&format!("backend-{i}"), ServerLimits::DEFAULT).await);
    }
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let config = TempConfig::new(&format!(
        r#"{{"port": 0, "adminPort": 0, "backendServiceName": "backend-service",
            "backendPort": 8080, "logFormat": "json", "discovery": "static",
            "staticBackends": [{}] {extra}}}"#,
        list.join(", ")
    ));
    let mut process = Process::spawn(&["--config", config.path_str()]);
    let lines = process.stdout_lines();
    let listening = ready(&lines).await;
    Setup {
        _backends: backends,
        _config: config,
        process,
        proxy: listening.proxy,
        admin: listening.admin,
    }
}

/// Opens a WebSocket through the load balancer and returns it with the pod
/// named in its greeting.
async fn connect(proxy: SocketAddr) -> (Client, String) {
    let (mut client, response) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::connect_async(format!("ws://{proxy}/ws")),
    )
    .await
    .expect("the handshake ends within PATIENCE")
    .expect("the handshake succeeds through the load balancer");
    assert_eq!(response.status(), 101);
    let greeting = next(&mut client).await;
    let identity: serde_json::Value =
        serde_json::from_str(greeting.to_text().expect("a text greeting")).expect("JSON");
    let pod = identity["podName"].as_str().expect("a podName").to_owned();
    (client, pod)
}

/// The next data message; the backend's pings (every 30 s) are answered by the
/// library and skipped here.
async fn next(client: &mut Client) -> Message {
    loop {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("a message within PATIENCE")
            .expect("the session is open")
            .expect("a valid frame");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

async fn echoes(client: &mut Client, message: Message) {
    client.send(message.clone()).await.expect("send");
    assert_eq!(next(client).await, message);
}

/// Waits for the session to end, with a close frame or a dropped connection.
async fn ended(client: &mut Client) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match client.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the session ends within PATIENCE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_echo_every_frame_and_are_balanced_per_session() {
    let setup = start("").await;
    let mut pods = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let (client, pod) = connect(setup.proxy).await;
        pods.push(pod);
        sessions.push(client);
    }
    pods.sort();
    assert_eq!(
        pods,
        ["backend-1", "backend-2", "backend-3"],
        "one session per pod"
    );
    assert_eq!(metric(setup.admin, "loadbalancer_tunnels_open").await, 3.0);

    let client = &mut sessions[0];
    echoes(client, Message::text("hello through the proxy")).await;
    echoes(client, Message::binary(vec![1u8, 2, 3, 0, 255])).await;
    let mebibyte: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    echoes(client, Message::binary(mebibyte)).await;

    for mut client in sessions {
        client.close(None).await.expect("close");
        ended(&mut client).await;
    }
    wait_for_metric(setup.admin, "loadbalancer_tunnels_open", |open| open == 0.0).await;
    let up = metric(
        setup.admin,
        r#"loadbalancer_tunnel_bytes_total{direction="upstream"}"#,
    )
    .await;
    assert!(up > 1024.0 * 1024.0, "the 1 MiB message was counted: {up}");
    assert_eq!(
        metric(setup.admin, "loadbalancer_tunnel_duration_seconds_count").await,
        3.0
    );
    setup.process.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_websocket_stays_open_for_30_seconds() {
    let setup = start("").await;
    let (mut client, _) = connect(setup.proxy).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    echoes(&mut client, Message::text("still here")).await;
    setup.process.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_idle_timeout_closes_a_quiet_websocket() {
    let setup = start(r#", "tunnelIdleTimeoutMs": 500"#).await;
    let (mut client, _) = connect(setup.proxy).await;
    echoes(&mut client, Message::text("busy")).await;
    ended(&mut client).await;
    setup.process.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_websockets_through_the_drain_then_closes_them_and_exits_0() {
    let setup = start(r#", "drainSeconds": 1, "shutdownTimeoutSeconds": 2"#).await;
    let (mut client, _) = connect(setup.proxy).await;
    setup.process.terminate();
    // The drain keeps serving: the session goes on.
    echoes(&mut client, Message::text("during the drain")).await;
    ended(&mut client).await;
    let status = setup.process.exited().await;
    assert!(status.success(), "exit status {status}");
}
