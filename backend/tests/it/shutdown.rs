//! Graceful shutdown of an in-process server: readiness turns 503 at once, requests
//! already in flight still complete, and `serve` returns once they have.

use std::time::Duration;

use backend::handlers::App;
use http::StatusCode;
use tokio::net::TcpStream;

use crate::support::{Conn, TestServer, eventually, get, test_identity};

#[tokio::test]
async fn readiness_turns_503_while_in_flight_work_completes_then_serve_returns() {
    let mut server = TestServer::start_default().await;
    let app = server.app.clone();
    let mut slow = Conn::open(server.addr).await;
    let slow_work = tokio::spawn(async move { slow.get("/work?sleep_ms=1000").await });
    // Only a request the server has started answering counts as in flight; one still
    // in a socket buffer would be refused, not drained.
    eventually("the slow request is being answered", || {
        app.in_flight() == 1
    })
    .await;

    // Step one of shutdown, on its own, so a fresh connection can observe it.
    app.begin_shutdown();
    let ready = get(server.addr, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json()["status"], "shutting down");
    assert_eq!(ready.header("connection"), Some("close"));

    // Step two: stop accepting and drain.
    server.begin_shutdown();
    let slow_reply = slow_work
        .await
        .expect("the slow request task does not panic");
    assert_eq!(slow_reply.status, StatusCode::OK);
    assert_eq!(slow_reply.json()["podName"], test_identity().pod_name);

    let addr = server.addr;
    server.stopped().await.expect("serve returns Ok");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed after serve returns"
    );
}

#[tokio::test]
async fn the_shutdown_signal_turns_readiness_503_during_the_delay_while_serving_continues() {
    // A delay far longer than the test, so nothing here races against it; the server
    // task is dropped with the runtime at the end.
    let app = App::new(test_identity()).with_shutdown_delay(Duration::from_secs(600));
    let mut server = TestServer::start(app).await;
    server.begin_shutdown();
    let app = server.app.clone();
    eventually("readiness turns false", || !app.is_ready()).await;

    let ready = get(server.addr, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let root = get(server.addr, "/").await;
    assert_eq!(root.status, StatusCode::OK);
    assert_eq!(root.header("connection"), Some("close"));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_does_not_hold_up_shutdown() {
    let mut server = TestServer::start_default().await;
    let mut idle = Conn::open(server.addr).await;
    assert_eq!(idle.get("/").await.status, StatusCode::OK);
    server.begin_shutdown();
    server.stopped().await.expect("serve returns Ok");
}
