//! Proxy workers: one single-threaded runtime per core sharing one port, through
//! real connections to real backends on 127.0.0.1.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use loadbalancer::backends::Backends;
use loadbalancer::balancer::RoundRobin;
use loadbalancer::metrics::Metrics;
use loadbalancer::proxy::Proxy;
use loadbalancer::server::{Entry, ServerLimits};
use loadbalancer::shutdown::Shutdown;
use loadbalancer::workers::{self, Workers};
use tokio::net::TcpStream;

use crate::support::raw::RawConn;
use crate::support::{PATIENCE, TestLb, get, start_backends, tally};

const TWO: NonZeroUsize = NonZeroUsize::new(2).expect("2 is not 0");

/// Each test's own metrics; the workers share whatever they are given.
fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(Backends::default().gauges()))
}

fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Two workers on `addr`, proxying over `backends` with one round-robin they
/// share, under `limits`.
async fn two_workers(
    addr: SocketAddr,
    backends: &Backends,
    limits: ServerLimits,
    shutdown: &Shutdown,
) -> std::io::Result<Workers> {
    let balancer = Arc::new(RoundRobin::new());
    let make_proxy = || {
        Proxy::new(
            backends.clone(),
            Arc::clone(&balancer),
            TestLb::SETTINGS,
            metrics(),
        )
    };
    let socket = workers::listen(addr)?;
    Workers::start(
        TWO,
        vec![(socket, Entry::Http)],
        make_proxy,
        limits,
        shutdown,
    )
    .await
}

/// Bound asserted: exact. Requests are sequential and every worker's proxy
/// draws from the one shared balancer, so 30 requests over 3 backends give each
/// exactly 10, whichever worker the kernel hands each connection to.
#[tokio::test]
async fn workers_share_one_port_and_one_rotation_then_stop() {
    let upstreams = start_backends(3).await;
    let backends = Backends::new(upstreams.iter().map(|u| u.addr).collect());
    let shutdown = Shutdown::new();
    let workers = two_workers(
        loopback_any_port(),
        &backends,
        ServerLimits::DEFAULT,
        &shutdown,
    )
    .await
    .expect("workers bind a free loopback port");
    let addr = workers.local_addrs()[0];
    assert_ne!(addr.port(), 0, "the real port is reported");

    // `get` opens a fresh connection each time, so connections land on both
    // workers' sockets.
    let mut names = Vec::new();
    for _ in 0..30 {
        names.push(get(&format!("http://{addr}/")).await.pod_name());
    }
    let counts = tally(names);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");

    shutdown.stop();
    tokio::time::timeout(PATIENCE, workers.finished())
        .await
        .expect("workers finish within PATIENCE after stop");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the port is closed once the workers have finished"
    );
}

#[tokio::test]
async fn a_port_held_by_another_listener_is_an_error_at_start() {
    // A listener owns its port outright.
    let taken = std::net::TcpListener::bind(loopback_any_port()).expect("bind loopback");
    let addr = taken.local_addr().expect("bound socket has an address");
    let shutdown = Shutdown::new();
    let started = two_workers(addr, &Backends::default(), ServerLimits::DEFAULT, &shutdown).await;
    let error = started.expect_err("the port is in use");
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
}

/// Opens a connection to `addr`, has it answered once, and keeps it open.
async fn answered_connection(addr: SocketAddr) -> RawConn {
    let mut client = RawConn::connect(addr).await;
    client.send(GET).await;
    let reply = client.response().await.expect("an answer");
    assert_eq!(reply.status, 200, "{reply:?}");
    client
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";

/// The cap is the process's, whichever worker a connection lands on: with two
/// workers and `maxConnections: 2`, a second client is served at once while a
/// first connection stays open, and a third waits until one of them closes.
#[tokio::test]
async fn the_workers_share_one_connection_cap() {
    let upstreams = start_backends(1).await;
    let backends = Backends::new(vec![upstreams[0].addr]);
    let shutdown = Shutdown::new();
    let limits = ServerLimits {
        max_connections: 2,
        ..ServerLimits::DEFAULT
    };
    let workers = two_workers(loopback_any_port(), &backends, limits, &shutdown)
        .await
        .expect("workers bind a free loopback port");
    let addr = workers.local_addrs()[0];

    let first = answered_connection(addr).await;
    let second = answered_connection(addr).await;
    let mut third = RawConn::connect(addr).await;
    third.send(GET).await;
    assert!(
        third
            .response_within(Duration::from_millis(500))
            .await
            .is_none(),
        "a third connection waits in the backlog while two are open"
    );
    drop(first);
    let reply = third
        .response()
        .await
        .expect("answered once a slot is free");
    assert_eq!(reply.status, 200, "{reply:?}");

    drop((second, third));
    shutdown.stop();
    tokio::time::timeout(PATIENCE, workers.finished())
        .await
        .expect("workers finish within PATIENCE after stop");
}
