//! Proxy workers: one single-threaded runtime per core sharing one port, through
//! real connections to real backends on 127.0.0.1.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;

use loadbalancer::backends::Backends;
use loadbalancer::balancer::RoundRobin;
use loadbalancer::metrics::Metrics;
use loadbalancer::proxy::Proxy;
use loadbalancer::server::ServerLimits;
use loadbalancer::shutdown::Shutdown;
use loadbalancer::workers::Workers;
use tokio::net::TcpStream;

use crate::support::{PATIENCE, TestLb, get, start_backends, tally};

const TWO: NonZeroUsize = NonZeroUsize::new(2).expect("2 is not 0");

/// Each test's own metrics; the workers share whatever they are given.
fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(Backends::default().gauges()))
}

fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Bound asserted: exact. Requests are sequential and every worker's proxy
/// draws from the one shared balancer, so 30 requests over 3 backends give each
/// exactly 10, whichever worker the kernel hands each connection to.
#[tokio::test]
async fn workers_share_one_port_and_one_rotation_then_stop() {
    let upstreams = start_backends(3).await;
    let backends = Backends::new(upstreams.iter().map(|u| u.addr).collect());
    let balancer = Arc::new(RoundRobin::new());
    let shutdown = Shutdown::new();
    let workers = Workers::start(
        TWO,
        loopback_any_port(),
        || {
            Proxy::new(
                backends.clone(),
                Arc::clone(&balancer),
                TestLb::SETTINGS,
                metrics(),
            )
        },
        ServerLimits::DEFAULT,
        &shutdown,
    )
    .await
    .expect("workers bind a free loopback port");
    let addr = workers.local_addr();
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
    // A listener without SO_REUSEPORT owns its port outright.
    let taken = std::net::TcpListener::bind(loopback_any_port()).expect("bind loopback");
    let addr = taken.local_addr().expect("bound socket has an address");
    let shutdown = Shutdown::new();
    let started = Workers::start(
        TWO,
        addr,
        || {
            Proxy::new(
                Backends::default(),
                RoundRobin::new(),
                TestLb::SETTINGS,
                metrics(),
            )
        },
        ServerLimits::DEFAULT,
        &shutdown,
    )
    .await;
    let error = started.expect_err("the port is in use");
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
}
