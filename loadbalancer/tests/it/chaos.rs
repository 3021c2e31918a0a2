//! Chaos tests: backends crash, hang, fail and get replaced while real clients
//! send real traffic through the load balancer, all on loopback. Each test is
//! bounded in requests and in time, prints what its clients saw (sent, succeeded,
//! failed, and how many attempts the load balancer retried), and asserts what
//! the clients must never notice.
//!
//! Run with `--nocapture` to see the figures.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use loadbalancer::backends::{Backends, BackendsWriter};
use loadbalancer::discovery::KubernetesSource;
use loadbalancer::discovery::kubernetes::watch_endpoint_slices;
use loadbalancer::health::{HealthCheckSettings, HealthChecker};
use loadbalancer::outlier::OutlierSettings;
use loadbalancer::proxy::{ProxySettings, Resilience};
use loadbalancer::retry::RetrySettings;

use crate::support;
use crate::support::fake_apiserver::EndpointState::{self, Ready, Terminating};
use crate::support::fake_apiserver::{FakeApiServer, slice};
use crate::support::faults::{BlackHole, RealBackend, bind_same_port};
use crate::support::load::Load;
use crate::support::upstream::Fault;
use crate::support::{TestLb, get, send, start_backends, tally, wait_for};

/// Outlier detection as the tests use it: three failures in a row eject, and the
/// ejection outlasts every test, so no half-open trial muddies the counts.
const CONSECUTIVE_FAILURES: u32 = 3;

fn resilience() -> Resilience {
    Resilience {
        retries: Some(RetrySettings::default()),
        outlier: Some(OutlierSettings {
            consecutive_failures: CONSECUTIVE_FAILURES,
            base_ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(60),
        }),
    }
}

fn is_ejected(backends: &Backends, addr: SocketAddr) -> bool {
    backends.state(addr).outlier().ejections() > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_under_load_fails_no_client_request() {
    let mut upstreams = start_backends(3).await;
    let addrs = upstreams.iter().map(|u| u.addr).collect();
    let lb = TestLb::start_resilient(addrs, TestLb::SETTINGS, resilience()).await;
    let started = Instant::now();
    let load = Load::start(lb.url("/"), 16, 3_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.wait_for_more(100).await;

    // Abrupt: the listener and every open connection go at once, mid-request
    // for some of them.
    let killed = upstreams[1].addr;
    upstreams[1].stop().await;
    load.wait_for_more(300).await;
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let report = load.stop().await;
    report.print("kill-one-of-three", lb.proxy.retries());

    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.succeeded, report.sent);
    assert!(
        lb.proxy.retries() > 0,
        "the killed backend's requests were retried"
    );
    assert!(is_ejected(&lb.backends, killed));
    lb.stop().await;
}

/// Bound asserted: at most `CLIENTS + 2` requests time out. Timeouts are not
/// retried, so every request stuck on the silent backend fails. Until the third
/// of them times out (which ejects it), each client can be stuck there once; the
/// `+ 2` covers clients whose stuck request timed out first and who landed there
/// again before the ejection. After it, nothing reaches the silent backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_costs_only_a_few_timeouts() {
    const CLIENTS: usize = 4;
    let upstreams = start_backends(2).await;
    let silent = BlackHole::start().await;
    let addrs = vec![upstreams[0].addr, silent.addr, upstreams[1].addr];
    let settings = ProxySettings {
        request_timeout: Duration::from_millis(1500),
        ..TestLb::SETTINGS
    };
    let lb = TestLb::start_resilient(addrs, settings, resilience()).await;
    let load = Load::start(lb.url("/"), CLIENTS, 3_000);
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.wait_for_more(100).await;
    let report = load.stop().await;
    report.print("never-answers", lb.proxy.retries());

    let timeouts = report.statuses.get(&504).copied().unwrap_or(0);
    assert!(
        timeouts >= 1,
        "some request met the silent backend: {report:?}"
    );
    assert!(timeouts <= CLIENTS + 2, "{report:?}");
    assert_eq!(
        report.failed, timeouts,
        "every other request succeeded: {report:?}"
    );
    assert!(is_ejected(&lb.backends, silent.addr));
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_503_is_retried_around_and_ejected() {
    let upstreams = start_backends(3).await;
    upstreams[2].set_fault(Fault::Unavailable);
    let addrs = upstreams.iter().map(|u| u.addr).collect();
    let lb = TestLb::start_resilient(addrs, TestLb::SETTINGS, resilience()).await;
    let load = Load::start(lb.url("/"), 4, 100);
    // All of them: the clients stop at 4 x 100, and some may have completed
    // before this line, so "400 more" could never come.
    load.wait_for_total(400).await;
    let report = load.stop().await;
    report.print("answers-503", lb.proxy.retries());

    assert_eq!(report.sent, 400);
    assert_eq!(report.failed, 0, "{report:?}");
    // Each 503 the backend gave before its ejection was retried elsewhere.
    assert!(lb.proxy.retries() >= u64::from(CONSECUTIVE_FAILURES));
    assert!(is_ejected(&lb.backends, upstreams[2].addr));
    lb.stop().await;
}

/// Bound asserted: 20 requests take less than one connect timeout (10 s) in
/// all, so none of them waited for one. Refused connections fail at once, and
/// once every backend is ejected the balancer still tries them all (never
/// nothing), which fails just as fast.
#[tokio::test]
async fn with_every_backend_down_requests_fail_fast_with_503() {
    let mut upstreams = start_backends(3).await;
    let addrs = upstreams.iter().map(|u| u.addr).collect();
    for upstream in &mut upstreams {
        upstream.stop().await;
    }
    let settings = ProxySettings {
        connect_timeout: Duration::from_secs(10),
        ..TestLb::SETTINGS
    };
    let lb = TestLb::start_resilient(addrs, settings, resilience()).await;
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let reply = get(&lb.url("/")).await;
        assert_eq!(reply.json()["message"], "no backend could be reached");
        statuses.push(reply.status.as_u16().to_string());
    }
    let elapsed = started.elapsed();
    println!(
        "chaos all-down: sent=20 succeeded=0 failed=20 retried={} statuses={:?} elapsed_ms={}",
        lb.proxy.retries(),
        tally(statuses.clone()),
        elapsed.as_millis()
    );
    assert!(statuses.iter().all(|s| s == "503"), "{statuses:?}");
    assert!(elapsed < settings.connect_timeout, "{elapsed:?}");
    lb.stop().await;
}

/// Two POSTs, one per backend (round-robin over two), each echoing `payload`.
async fn post_twice(lb: &TestLb) -> Vec<(StatusCode, Bytes)> {
    let client = support::client();
    let mut replies = Vec::new();
    for _ in 0..2 {
        let req = Request::post(lb.url("/echo-body"))
            .body(Full::new(Bytes::from_static(b"payload")))
            .expect("valid request");
        let reply = send(&client, req).await;
        replies.push((reply.status, reply.body));
    }
    replies
}

#[tokio::test]
async fn a_post_whose_connection_failed_is_retried_with_its_body() {
    let mut upstreams = start_backends(2).await;
    upstreams[0].stop().await;
    let addrs = upstreams.iter().map(|u| u.addr).collect();
    let lb = TestLb::start_resilient(addrs, TestLb::SETTINGS, resilience()).await;
    let replies = post_twice(&lb).await;
    println!(
        "chaos post-connect-failure: replies={replies:?} retried={}",
        lb.proxy.retries()
    );
    for (status, body) in replies {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            Bytes::from_static(b"payload"),
            "the body arrives whole"
        );
    }
    assert!(
        lb.proxy.retries() >= 1,
        "the dead backend's turn was retried"
    );
    lb.stop().await;
}

#[tokio::test]
async fn a_post_answered_503_is_not_retried() {
    let upstreams = start_backends(2).await;
    upstreams[0].set_fault(Fault::Unavailable);
    let addrs = upstreams.iter().map(|u| u.addr).collect();
    let lb = TestLb::start_resilient(addrs, TestLb::SETTINGS, resilience()).await;
    let mut statuses: Vec<_> = post_twice(&lb).await.into_iter().map(|(s, _)| s).collect();
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE]);
    assert_eq!(
        lb.proxy.retries(),
        0,
        "a POST may have had effects: never repeated"
    );
    lb.stop().await;
}

fn fast_health_checks() -> HealthCheckSettings {
    HealthCheckSettings {
        path: "/healthz".parse().expect("valid path"),
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(2),
        unhealthy_threshold: 2,
        healthy_threshold: 2,
        grpc_service: None,
        backend_protocol: None,
    }
}

#[tokio::test]
async fn a_backend_failing_its_health_checks_is_skipped_until_it_recovers() {
    let upstreams = start_backends(3).await;
    let sick = &upstreams[1];
    let lb = TestLb::start(&upstreams).await;
    let checks = tokio::spawn(HealthChecker::new(lb.backends.clone(), fast_health_checks()).run());
    let state = lb.backends.state(sick.addr);

    sick.set_fault(Fault::FailHealthz);
    wait_for(
        "the sick backend to be marked unhealthy",
        || state.is_healthy(),
        |h| !h,
    )
    .await;
    let mut names = Vec::new();
    for _ in 0..30 {
        names.push(get(&lb.url("/")).await.pod_name());
    }
    let skipping = tally(names);

    sick.set_fault(Fault::None);
    wait_for(
        "the backend to be healthy again",
        || state.is_healthy(),
        |h| *h,
    )
    .await;
    let mut names = Vec::new();
    for _ in 0..30 {
        names.push(get(&lb.url("/")).await.pod_name());
    }
    let restored = tally(names);
    println!("chaos health-checks: while unhealthy {skipping:?}, after recovery {restored:?}");

    let expected = |pairs: &[(&str, usize)]| {
        pairs
            .iter()
            .map(|&(name, n)| (name.to_owned(), n))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(skipping, expected(&[("backend-1", 15), ("backend-3", 15)]));
    assert_eq!(
        restored,
        expected(&[("backend-1", 10), ("backend-2", 10), ("backend-3", 10)])
    );
    checks.abort();
    lb.stop().await;
}

#[tokio::test]
async fn health_checks_stop_probing_a_removed_backend() {
    let upstreams = start_backends(2).await;
    let lb = TestLb::start(&upstreams).await;
    let checks = tokio::spawn(HealthChecker::new(lb.backends.clone(), fast_health_checks()).run());
    let (kept, removed) = (&upstreams[0], &upstreams[1]);
    removed.wait_for_requests(2).await;

    lb.writer().replace(vec![kept.addr]);
    // A round may have been under way when the list changed; two more rounds
    // after it started with the new list.
    let rounds_from = kept.received();
    kept.wait_for_requests(rounds_from + 2).await;
    let probes_of_removed = removed.received();
    kept.wait_for_requests(kept.received() + 5).await;

    assert_eq!(removed.received(), probes_of_removed);
    checks.abort();
    lb.stop().await;
}

/// The Service's one EndpointSlice as the rolling-update test changes it, and
/// the wait for discovery to publish each change.
struct Slice<'a> {
    server: &'a FakeApiServer,
    backends: &'a Backends,
    port: u16,
    /// `(IP, condition)` per endpoint, in slice order.
    endpoints: Vec<(String, EndpointState)>,
}

impl Slice<'_> {
    /// Publishes the endpoints and waits until the load balancer's list holds
    /// exactly the ready ones (what discovery uses while any endpoint is ready).
    async fn publish(&self) {
        let endpoints: Vec<(&str, EndpointState)> = self
            .endpoints
            .iter()
            .map(|(ip, state)| (ip.as_str(), *state))
            .collect();
        self.server
            .apply(slice("web-1", SERVICE, &endpoints, self.port));
        let mut ready: Vec<SocketAddr> = endpoints
            .iter()
            .filter(|(_, state)| *state == Ready)
            .map(|(ip, _)| SocketAddr::new(ip.parse().expect("test IP parses"), self.port))
            .collect();
        ready.sort();
        wait_for(
            &format!("backends {ready:?}"),
            || self.backends.snapshot(),
            |now| *now == ready,
        )
        .await;
    }
}

const SERVICE: &str = "web";

/// A rolling update as Kubernetes runs one, driven through the fake API server
/// and the real discovery watch: for each old pod, a new one starts and turns
/// ready, the old one turns terminating (readiness off), leaves the slice, and
/// its process stops (gracefully, as on SIGTERM). Clients see nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_replacement_through_discovery_fails_no_client_request() {
    // 127.0.0.2-4 are the old pods, 127.0.0.5-7 their replacements.
    let hosts = [2, 3, 4, 5, 6, 7];
    let (port, listeners) = bind_same_port(&hosts).await;
    let mut pods: Vec<RealBackend> = listeners
        .into_iter()
        .zip(hosts)
        .map(|(listener, host)| RealBackend::start(listener, &format!("pod-{host}")))
        .collect();
    let replacements = pods.split_off(3);

    let server = FakeApiServer::start().await;
    let writer = BackendsWriter::new();
    let backends = writer.reader();
    let mut slice = Slice {
        server: &server,
        backends: &backends,
        port,
        endpoints: pods
            .iter()
            .map(|pod| (pod.addr.ip().to_string(), Ready))
            .collect(),
    };
    let source = KubernetesSource {
        namespace: None,
        service_name: SERVICE.to_owned(),
        port,
        grpc_port: None,
    };
    let client = server.client().await;
    let discovery = tokio::spawn(async move {
        watch_endpoint_slices(
            client,
            &source,
            &writer,
            tokio::sync::watch::channel(None).1,
        )
        .await
    });
    let lb = TestLb::start_unsynced_with(backends.clone(), TestLb::SETTINGS, resilience()).await;
    slice.publish().await;

    let load = Load::start(lb.url("/"), 8, 5_000);
    load.wait_for_more(100).await;
    for new in replacements {
        let old = pods.remove(0);
        let old_ip = old.addr.ip().to_string();
        // The new pod (serving since the start, as a pod that passed its
        // readiness probe) joins the slice ready.
        slice.endpoints.push((new.addr.ip().to_string(), Ready));
        pods.push(new);
        slice.publish().await;
        load.wait_for_more(100).await;

        // The old pod is terminating: readiness off, still serving.
        old.app.begin_shutdown();
        for endpoint in slice.endpoints.iter_mut().filter(|(ip, _)| *ip == old_ip) {
            endpoint.1 = Terminating;
        }
        slice.publish().await;
        load.wait_for_more(100).await;

        // It leaves the slice, then its process stops.
        slice.endpoints.retain(|(ip, _)| *ip != old_ip);
        slice.publish().await;
        old.stop().await;
        load.wait_for_more(100).await;
    }
    let report = load.stop().await;
    report.print("rolling-update", lb.proxy.retries());

    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.succeeded, report.sent);
    discovery.abort();
    lb.stop().await;
    for pod in pods {
        pod.stop().await;
    }
}
