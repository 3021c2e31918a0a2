//! Live config reload, end to end: the binary runs with its config mounted like
//! a ConfigMap, the file is rewritten the way the kubelet does it (new directory,
//! symlink swap) while clients keep sending requests, and the test asserts on
//! what comes back, what the logs say and what the metrics count. In Kubernetes
//! mode the API server is the fake one, and a new `backendServiceName` moves the
//! traffic to the other Service's pods.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

use crate::support;
use crate::support::configmap::ConfigMapDir;
use crate::support::fake_apiserver::EndpointState::Ready;
use crate::support::fake_apiserver::{FakeApiServer, slice};
use crate::support::faults::{RealBackend, Unconnectable, bind_same_port};
use crate::support::load::Load;
use crate::support::process::{Process, free_port, json_line, line};
use crate::support::{
    Upstream, get, metric, start_backend, start_backends, tally, wait_for, wait_for_metric,
    wait_for_readyz,
};

const SUCCESSES: &str = r#"loadbalancer_config_reloads_total{result="success"}"#;
const FAILURES: &str = r#"loadbalancer_config_reloads_total{result="failure"}"#;

/// Fixed ports (a reload must not move them), static discovery over `backends`,
/// JSON logs at `log_level`, and `extra` keys.
fn config(ports: (u16, u16), log_level: &str, backends: &[&Upstream], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    format!(
        r#"{{"port": {}, "adminPort": {}, "backendServiceName": "backend-service",
            "backendPort": 8080, "logFormat": "json", "drainSeconds": 1,
            "logLevel": "{log_level}", "discovery": "static",
            "staticBackends": [{}] {extra}}}"#,
        ports.0,
        ports.1,
        list.join(", ")
    )
}

/// The load balancer binary over `mount`, once `/readyz` answers 200.
async fn start(mount: &ConfigMapDir, ports: (u16, u16)) -> (Process, SocketAddr, SocketAddr) {
    start_with(mount, ports, |_| {}).await
}

/// [`start`], with the child's command set up by `configure` first.
async fn start_with(
    mount: &ConfigMapDir,
    ports: (u16, u16),
    configure: impl FnOnce(&mut std::process::Command),
) -> (Process, SocketAddr, SocketAddr) {
    let lb = Process::spawn_with(&["--config", &mount.path_string()], configure);
    let proxy = SocketAddr::from(([127, 0, 0, 1], ports.0));
    let admin = SocketAddr::from(([127, 0, 0, 1], ports.1));
    // At `warn` there is no `listening` line to wait for: wait for the port.
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{admin} never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_readyz(admin, StatusCode::OK).await;
    (lb, proxy, admin)
}

/// Waits until `admin` has counted `n` reloads in `series`.
async fn wait_for_reloads(admin: SocketAddr, series: &str, n: f64) {
    wait_for_metric(admin, series, |count| count >= n).await;
}

/// `podName`s of `n` sequential requests through `proxy`.
async fn sequential_pods(proxy: SocketAddr, n: usize) -> Vec<String> {
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        names.push(get(&format!("http://{proxy}/")).await.pod_name());
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_swap_under_load_changes_level_algorithm_and_backends_without_a_failed_request()
{
    let upstreams = start_backends(3).await;
    let [a, b, c] = [&upstreams[0], &upstreams[1], &upstreams[2]];
    let ports = (free_port(), free_port());
    // At `warn`, the access lines (`info`) are not written.
    let mut mount = ConfigMapDir::new(&config(ports, "warn", &[a, b], ""));
    let (mut lb, proxy, admin) = start(&mount, ports).await;
    let lines = lb.stdout_lines();

    let load = Load::start(format!("http://{proxy}/"), 4, 2_000);
    load.wait_for_more(50).await;
    let heavy = format!(
        r#", "algorithm": "weighted_round_robin", "weights": {{"{}": 5}}"#,
        c.addr
    );
    let updated = std::time::Instant::now();
    mount.update(&config(ports, "info", &[a, b, c], &heavy));

    // The new static list: the added backend starts receiving requests.
    // (Client traffic, `GET /`, not a health probe.)
    wait_for(
        "the added backend to receive traffic",
        || c.requests().contains(&"GET /".to_owned()),
        |&proxied| proxied,
    )
    .await;
    // Reported, not asserted: the machine is shared (expected: under a second).
    println!("new backend live {:?} after the swap", updated.elapsed());
    // The new level: the first info line is the reload's own, and access lines
    // follow it; none was written under `warn` before.
    let first = json_line(&lines, "'config reloaded' or an access line", |e| {
        e["message"] == "config reloaded" || e["message"] == "request"
    })
    .await;
    assert_eq!(first["message"], "config reloaded", "{first}");
    json_line(&lines, "an access line at the new level", |e| {
        e["message"] == "request"
    })
    .await;
    load.wait_for_more(100).await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.succeeded > 150, "{report:?}");

    // The new algorithm: 5:1:1 over any 70 sequential picks (ten whole cycles).
    let counts = tally(sequential_pods(proxy, 70).await);
    let of = |u: &Upstream| counts.get(&u.pod_name).copied().unwrap_or(0);
    assert_eq!((of(a), of(b), of(c)), (10, 10, 50), "{counts:?}");
    assert_eq!(metric(admin, SUCCESSES).await, 1.0);
    assert_eq!(metric(admin, FAILURES).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_rejected_with_its_reason_and_the_old_one_stays_in_force() {
    let upstreams = start_backends(2).await;
    let [a, b] = [&upstreams[0], &upstreams[1]];
    let ports = (free_port(), free_port());
    let mut mount = ConfigMapDir::new(&config(ports, "info", &[a], ""));
    let (mut lb, proxy, admin) = start(&mount, ports).await;
    let lines = lb.stdout_lines();

    // Valid JSON, one bad value: nothing of it may apply, not even the list.
    mount.update(&config(ports, "info", &[b], r#", "algorithm": "random""#));
    let rejected = json_line(&lines, "the rejection", |e| {
        e["message"] == "config reload failed; keeping the current config"
    })
    .await;
    let reason = rejected["error"]
        .as_str()
        .expect("the line has an error field");
    assert!(
        reason.contains("algorithm") && reason.contains("random"),
        "{rejected}"
    );
    assert_eq!(rejected["level"], "ERROR", "{rejected}");
    wait_for_reloads(admin, FAILURES, 1.0).await;
    let pods = sequential_pods(proxy, 10).await;
    assert!(pods.iter().all(|p| *p == a.pod_name), "{pods:?}");

    // The watcher keeps going: a fixed file applies.
    mount.update(&config(ports, "info", &[b], ""));
    wait_for_reloads(admin, SUCCESSES, 1.0).await;
    let pods = sequential_pods(proxy, 10).await;
    assert!(pods.iter().all(|p| *p == b.pod_name), "{pods:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_service_name_moves_traffic_to_that_service_without_a_failed_request() {
    // Two Services, one pod each, on one port as in a cluster (pods differ by IP).
    let (port, listeners) = bind_same_port(&[1, 2]).await;
    let _pods: Vec<RealBackend> = listeners
        .into_iter()
        .zip(["old-pod", "new-pod"])
        .map(|(listener, pod)| RealBackend::start(listener, pod))
        .collect();
    let server = FakeApiServer::start().await;
    server.apply(slice(
        "old-svc-a1b2c",
        "old-svc",
        &[("127.0.0.1", Ready)],
        port,
    ));
    server.apply(slice(
        "new-svc-d3e4f",
        "new-svc",
        &[("127.0.0.2", Ready)],
        port,
    ));
    let ports = (free_port(), free_port());
    let watching = |service: &str| {
        format!(
            r#"{{"port": {}, "adminPort": {}, "backendServiceName": "{service}",
                "backendPort": {port}, "discovery": "kubernetes", "logFormat": "json",
                "drainSeconds": 1}}"#,
            ports.0, ports.1
        )
    };
    let mut mount = ConfigMapDir::new(&watching("old-svc"));
    let (mut lb, proxy, admin) = start_with(&mount, ports, |c| server.configure_pod(c)).await;
    // Read, so a full stdout pipe never blocks the process's logging.
    let _lines = lb.stdout_lines();
    let pods = sequential_pods(proxy, 4).await;
    assert!(pods.iter().all(|p| p == "old-pod"), "{pods:?}");

    let load = Load::start(format!("http://{proxy}/"), 4, 2_000);
    load.wait_for_more(50).await;
    mount.update(&watching("new-svc"));
    // The old Service's pod serves until the new watch has its first list; then
    // only the new Service's pod answers.
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        let pods = sequential_pods(proxy, 4).await;
        if pods.iter().all(|p| p == "new-pod") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still answered by {pods:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load.wait_for_more(50).await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(metric(admin, SUCCESSES).await, 1.0);
    let watched: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_watch())
        .filter_map(|r| r.param("labelSelector").map(str::to_owned))
        .collect();
    assert!(
        watched.iter().any(|s| s.ends_with("=new-svc")),
        "the new Service was watched: {watched:?}"
    );
}

/// Status codes of `n` sequential `GET path`s through `proxy`, sorted.
async fn statuses(proxy: SocketAddr, path: &str, n: usize) -> Vec<u16> {
    let mut codes = Vec::with_capacity(n);
    for _ in 0..n {
        codes.push(get(&format!("http://{proxy}{path}")).await.status.as_u16());
    }
    codes.sort_unstable();
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_retries_outlier_and_log_format_change_without_a_restart() {
    let a = start_backend("pod-a").await;
    // Stopped at once: every attempt at its port is a connect failure.
    let mut dead = start_backend("dead").await;
    dead.stop().await;
    let ports = (free_port(), free_port());
    // Health checks far apart, so only the settings under test move traffic.
    let quiet_checks = r#", "healthCheck": {"intervalMs": 600000}"#;
    let before = format!(
        r#"{quiet_checks}, "requestTimeoutMs": 10000, "retries": {{"attempts": 1}},
            "outlier": {{"consecutiveFailures": 1000}}"#
    );
    let mut mount = ConfigMapDir::new(&config(ports, "info", &[&a, &dead], &before));
    let (mut lb, proxy, admin) = start(&mount, ports).await;
    let lines = lb.stdout_lines();

    // Round-robin over both, no retries, no ejection, a long timeout: the live
    // backend answers a 600 ms request, and each request of the dead one's turn
    // fails with a 502.
    assert_eq!(statuses(proxy, "/slow?ms=600", 2).await, [200, 502]);

    let after = format!(
        r#"{quiet_checks}, "requestTimeoutMs": 300, "retries": {{"attempts": 2,
            "budgetPercent": 100}}, "outlier": {{"consecutiveFailures": 1,
            "baseEjectionMs": 60000, "maxEjectionMs": 60000}}"#
    );
    mount.update(&config(ports, "info", &[&a, &dead], &after));
    let reloaded = json_line(&lines, "'config reloaded'", |e| {
        e["message"] == "config reloaded"
    })
    .await;
    let applied = reloaded["applied"].as_str().unwrap_or_default();
    for field in ["requestTimeoutMs", "retries", "outlier"] {
        assert!(applied.contains(field), "{reloaded}");
    }
    // Retries: a connect failure goes on to the live backend, and the dead one is
    // ejected after its first failure (not its thousandth).
    assert_eq!(statuses(proxy, "/", 10).await, [200; 10]);
    let ejections = format!(r#"loadbalancer_ejections_total{{backend="{}"}}"#, dead.addr);
    assert_eq!(metric(admin, &ejections).await, 1.0);
    // The new timeout: the same 600 ms request now ends in a 504.
    let timed_out = get(&format!("http://{proxy}/slow?ms=600")).await;
    assert_eq!(timed_out.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        String::from_utf8_lossy(&timed_out.body).contains("300 ms"),
        "{timed_out:?}"
    );

    // The log format: from JSON to text lines, from the reload's own line on.
    mount.update(&config(ports, "info", &[&a, &dead], &after).replace(r#""json""#, r#""text""#));
    let text = line(&lines, "a text 'config reloaded' line", |line| {
        line.contains("config reloaded")
    })
    .await;
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "{text}"
    );
    assert!(text.contains(r#"applied=["logFormat"]"#), "{text}");
    assert_eq!(metric(admin, SUCCESSES).await, 2.0);
    assert_eq!(metric(admin, FAILURES).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connect_timeout_applies_to_the_next_connect() {
    // Its connects hang: only the connect timeout or the request timeout ends them.
    let unconnectable = Unconnectable::start();
    let ports = (free_port(), free_port());
    let config = |connect_timeout_ms: u64| {
        format!(
            r#"{{"port": {}, "adminPort": {}, "backendServiceName": "backend-service",
                "backendPort": 8080, "logFormat": "json", "drainSeconds": 1,
                "discovery": "static", "staticBackends": ["{}"],
                "healthCheck": {{"intervalMs": 600000}}, "retries": {{"attempts": 1}},
                "connectTimeoutMs": {connect_timeout_ms}, "requestTimeoutMs": 1000}}"#,
            ports.0, ports.1, unconnectable.addr
        )
    };
    let mut mount = ConfigMapDir::new(&config(10_000));
    let (mut lb, proxy, admin) = start(&mount, ports).await;
    let _lines = lb.stdout_lines();

    // The request timeout runs out first: 504.
    let before = get(&format!("http://{proxy}/")).await;
    assert_eq!(before.status, StatusCode::GATEWAY_TIMEOUT, "{before:?}");

    mount.update(&config(100));
    wait_for_reloads(admin, SUCCESSES, 1.0).await;
    // Now the connect gives up first, and with the only backend unreachable the
    // service as a whole is: 503.
    let after = get(&format!("http://{proxy}/")).await;
    assert_eq!(after.status, StatusCode::SERVICE_UNAVAILABLE, "{after:?}");
    assert_eq!(after.json()["message"], "no backend could be reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_and_the_concurrency_limit_apply_live() {
    let upstreams = start_backends(2).await;
    let backends: Vec<&Upstream> = upstreams.iter().collect();
    let ports = (free_port(), free_port());
    let mut mount = ConfigMapDir::new(&config(ports, "info", &backends, ""));
    let (_lb, proxy, admin) = start(&mount, ports).await;
    // The pods that answer ten requests of one user.
    let one_user = || async {
        let mut pods = Vec::new();
        for _ in 0..10 {
            let request = http::Request::get(format!("http://{proxy}/"))
                .header("x-user", "ada")
                .body(http_body_util::Full::<bytes::Bytes>::default())
                .expect("a valid request");
            pods.push(support::send(&support::client(), request).await.pod_name());
        }
        tally(pods)
    };
    assert_eq!(one_user().await.len(), 2, "round-robin spreads one user");

    mount.update(&config(
        ports,
        "info",
        &backends,
        r#", "algorithm": "consistent_hash", "hashOn": {"header": "x-user"},
            "maxRequestsPerBackend": 3, "queueTimeoutMs": 250"#,
    ));
    wait_for_reloads(admin, SUCCESSES, 1.0).await;
    assert_eq!(one_user().await.len(), 1, "the user sticks to one backend");
    let policy = get(&format!("http://{admin}/debug/backends")).await.json()["policy"].clone();
    assert_eq!(policy["algorithm"], "consistent_hash");
    assert_eq!(policy["hashOn"]["header"], "x-user");
    assert_eq!(policy["maxRequestsPerBackend"], 3);
    assert_eq!(policy["queueTimeoutMs"], 250);
    assert_eq!(policy["queueLength"], 0);
}
