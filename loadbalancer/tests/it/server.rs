//! The server around the proxy: admin probes, HTTP/1.1 keep-alive and graceful
//! shutdown, in-process on 127.0.0.1:0.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use loadbalancer::backends::BackendsWriter;
use loadbalancer::discovery::{self, Source};
use tokio::net::TcpStream;

use crate::support::{InFlight, PATIENCE, TestLb, get, start_backends};

#[tokio::test]
async fn healthz_is_ok_and_readyz_waits_for_the_first_discovery_sync() {
    let upstreams = start_backends(2).await;
    let writer = BackendsWriter::new();
    let lb = TestLb::start_unsynced(writer.reader(), TestLb::SETTINGS).await;

    let health = get(&lb.admin_url("/healthz")).await;
    assert_eq!(health.status, StatusCode::OK);
    let not_ready = get(&lb.admin_url("/readyz")).await;
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(not_ready.json()["reason"], "discovery has not synced yet");

    let addrs = upstreams.iter().map(|u| u.addr).collect();
    discovery::run(
        Source::Static(addrs),
        &writer,
        loadbalancer::discovery::Cluster::default(),
    )
    .await
    .expect("static discovery cannot fail");
    let ready = get(&lb.admin_url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["backends"], 2);
    assert_eq!(
        get(&lb.admin_url("/nope")).await.status,
        StatusCode::NOT_FOUND
    );
    lb.stop().await;
}

#[tokio::test]
async fn draining_turns_readiness_false_while_requests_are_still_served() {
    let upstreams = start_backends(1).await;
    let lb = TestLb::start(&upstreams).await;
    assert_eq!(get(&lb.admin_url("/readyz")).await.status, StatusCode::OK);

    lb.shutdown.begin_draining();
    let readyz = get(&lb.admin_url("/readyz")).await;
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(readyz.json()["reason"], "shutting down");
    assert_eq!(get(&lb.url("/")).await.pod_name(), "backend-1");
    lb.stop().await;
}

#[tokio::test]
async fn stop_lets_an_in_flight_request_finish_then_refuses_connections() {
    let upstreams = start_backends(1).await;
    let lb = TestLb::start(&upstreams).await;
    let addr = lb.addr;
    let in_flight = InFlight::start(lb.url("/slow?ms=1500"));
    upstreams[0].wait_for_requests(1).await;

    // Returns only when every connection has finished, the slow one included.
    lb.stop().await;
    let reply = in_flight.finish().await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.pod_name(), "backend-1");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still accepts after shutdown"
    );
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let upstreams = start_backends(2).await;
    let lb = TestLb::start(&upstreams).await;
    let stream = TcpStream::connect(lb.addr)
        .await
        .expect("connect to the proxy");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    let mut names = Vec::new();
    for _ in 0..4 {
        let req = Request::get("/")
            .header("host", lb.addr.to_string())
            .body(Full::<Bytes>::default())
            .expect("valid request");
        let response = tokio::time::timeout(PATIENCE, sender.send_request(req))
            .await
            .expect("answer within PATIENCE")
            .expect("the same connection serves the next request");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        names.push(json["podName"].as_str().expect("podName").to_owned());
    }
    // Round-robin alternates between the two, whichever comes first.
    assert_ne!(names[0], names[1]);
    assert_eq!(names[2..], names[..2]);
    lb.stop().await;
}
