//! End to end in Kubernetes mode, with nothing faked but the API server: the real
//! `loadbalancer` binary finds its backends through the fake API server's
//! EndpointSlices (reached with a generated kubeconfig, as `kubectl` would be) and
//! proxies to three real backend servers. As the endpoints change, the pods that
//! answer change with them.
//!
//! Like pods in a cluster, the backends share one port and differ by IP: 127.0.0.1,
//! 127.0.0.2 and 127.0.0.3 (all loopback on Linux), because an EndpointSlice lists
//! addresses and the load balancer connects to each on the one `backendPort`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::Full;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::support::fake_apiserver::EndpointState::{self, NotReady, Ready};
use crate::support::fake_apiserver::{FakeApiServer, slice};
use crate::support::faults::{RealBackend, bind_same_port};
use crate::support::process::{Process, TempConfig, listening};
use crate::support::{PATIENCE, client, get, send};

const SERVICE: &str = "backend-service";
const SLICE: &str = "backend-service-x7k2p";

/// The backends' IPs; backend `i` (1-based) is `backend-i` at `IPS[i - 1]`.
const IPS: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];

/// The Service's one EndpointSlice with backend `i` in state `state`, for each pair.
fn endpoints(port: u16, backends: &[(usize, EndpointState)]) -> EndpointSlice {
    let listed: Vec<(&str, EndpointState)> = backends
        .iter()
        .map(|&(i, state)| (IPS[i - 1], state))
        .collect();
    slice(SLICE, SERVICE, &listed, port)
}

/// Sends rounds of requests until one round is answered by exactly the pods in
/// `expected`, and returns how long that took. Every request must succeed: all three
/// backends stay up, so a change of endpoints must never cost a client request.
async fn wait_for_pods(proxy: SocketAddr, expected: &[&str]) -> Duration {
    let expected: BTreeSet<String> = expected.iter().map(|&pod| pod.to_owned()).collect();
    // Round-robin reaches each of n backends in any n consecutive requests; twice
    // that leaves room for whatever else advances the shared counter (retries).
    let round = 2 * IPS.len();
    let client = client();
    let started = Instant::now();
    loop {
        let mut seen = BTreeSet::new();
        for _ in 0..round {
            let request = Request::get(format!("http://{proxy}/"))
                .body(Full::default())
                .expect("a valid request");
            let reply = send(&client, request).await;
            assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
            seen.insert(reply.pod_name());
        }
        if seen == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "pods answering are still {seen:?}, want {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_follow_the_endpoints_from_one_to_three_to_two_backends() {
    let (port, listeners) = bind_same_port(&[1, 2, 3]).await;
    // Kept until the end of the test: dropping a backend stops it.
    let _pods: Vec<RealBackend> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, listener)| RealBackend::start(listener, &format!("backend-{}", i + 1)))
        .collect();
    let server = FakeApiServer::start().await;
    server.apply(endpoints(port, &[(1, Ready)]));

    let config = TempConfig::new(&format!(
        r#"{{"port": 0, "adminPort": 0, "backendServiceName": "{SERVICE}",
            "backendPort": {port}, "discovery": "kubernetes", "logFormat": "json"}}"#
    ));
    let mut process = Process::spawn_with(&["--config", config.path_str()], |command| {
        server.configure_pod(command);
    });
    let lines = process.stdout_lines();
    let lb = listening(&lines).await;

    // Ready only once the first list has arrived.
    let readyz = format!("http://{}/readyz", lb.admin);
    let deadline = Instant::now() + PATIENCE;
    while get(&readyz).await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "/readyz never answered 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = wait_for_pods(lb.proxy, &["backend-1"]).await;
    println!("1 backend: answered by exactly backend-1 after {took:?}");

    server.apply(endpoints(port, &[(1, Ready), (2, Ready), (3, Ready)]));
    let took = wait_for_pods(lb.proxy, &["backend-1", "backend-2", "backend-3"]).await;
    println!("1 -> 3 backends: followed after {took:?}");

    // backend-2 fails its readiness probe: it still answers, so any request the load
    // balancer sent it would show.
    server.apply(endpoints(port, &[(1, Ready), (2, NotReady), (3, Ready)]));
    let took = wait_for_pods(lb.proxy, &["backend-1", "backend-3"]).await;
    println!("3 -> 2 backends: followed after {took:?}");

    let watches = server
        .requests()
        .into_iter()
        .filter(|r| r.is_watch())
        .count();
    assert!(watches >= 1, "the load balancer watched rather than polled");
}
