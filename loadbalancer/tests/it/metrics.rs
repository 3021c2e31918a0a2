//! `/metrics` on the admin port, after a known set of requests through real demo
//! backends: some answered 200, some failing on purpose (the backend's
//! `/work?status=500`, a 405 for `POST`), and one 503 the load balancer answers itself
//! when no backend is left. Every counter and histogram count must be exact.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use loadbalancer::server::ServerLimits;

use crate::support::faults::start_real_backend;
use crate::support::{Reply, TestLb, client, get, metric_sample, send, wait_for};

/// Scrapes `/metrics` and checks the content type.
async fn scrape(lb: &TestLb) -> String {
    let reply = get(&lb.admin_url("/metrics")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = String::from_utf8(reply.body.to_vec()).expect("metrics are UTF-8");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    text
}

fn assert_samples(text: &str, expected: &[(String, f64)]) {
    for (series, value) in expected {
        assert_eq!(
            metric_sample(text, series),
            Some(*value),
            "{series} in\n{text}"
        );
    }
}

/// Waits until no response body is still streaming: the in-flight guards drop when
/// hyper has finished with a body, which may be just after the client has read it.
async fn wait_until_idle(lb: &TestLb) {
    wait_for(
        "no request in flight",
        || {
            let states = lb.backends.states();
            states.iter().map(|(_, s)| s.in_flight()).sum::<u64>()
        },
        |n| *n == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_request_by_backend_method_and_code() {
    let servers = [
        start_real_backend("backend-a", ServerLimits::DEFAULT).await,
        start_real_backend("backend-b", ServerLimits::DEFAULT).await,
    ];
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let lb = TestLb::start_with(addrs.clone(), TestLb::SETTINGS).await;
    let client = client();
    let send_to = |method: &str, path: &str| {
        let req = Request::builder()
            .method(method)
            .uri(lb.url(path))
            .body(Full::<Bytes>::default())
            .expect("valid request");
        send(&client, req)
    };

    // Round-robin over two backends: every pair of requests gives each one of them.
    let mut replies: Vec<Reply> = Vec::new();
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/"),
        ("GET", "/"),
        ("GET", "/"),
        ("GET", "/work?status=500"),
        ("GET", "/work?status=500"),
        ("POST", "/"),
        ("POST", "/"),
    ] {
        replies.push(send_to(method, path).await);
    }
    let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 500, 500, 405, 405]);
    wait_until_idle(&lb).await;

    let text = scrape(&lb).await;
    let mut expected = Vec::new();
    for addr in &addrs {
        for (method, code, count) in [("GET", 200, 2.0), ("GET", 500, 1.0), ("POST", 405, 1.0)] {
            expected.push((
                format!(
                    r#"loadbalancer_requests_total{{backend="{addr}",method="{method}",code="{code}"}}"#
                ),
                count,
            ));
        }
        expected.push((
            format!(r#"loadbalancer_request_duration_seconds_count{{backend="{addr}"}}"#),
            4.0,
        ));
        expected.push((
            format!(
                r#"loadbalancer_request_duration_seconds_bucket{{le="+Inf",backend="{addr}"}}"#
            ),
            4.0,
        ));
    }
    expected.extend([
        ("loadbalancer_requests_in_flight".to_owned(), 0.0),
        (r#"loadbalancer_backends{state="known"}"#.to_owned(), 2.0),
        (r#"loadbalancer_backends{state="ready"}"#.to_owned(), 2.0),
        (r#"loadbalancer_backends{state="ejected"}"#.to_owned(), 0.0),
        ("loadbalancer_retries_total".to_owned(), 0.0),
        ("loadbalancer_discovery_updates_total".to_owned(), 1.0),
        (
            r#"loadbalancer_build_info{version="0.1.0"}"#.to_owned(),
            1.0,
        ),
    ]);
    assert_samples(&text, &expected);
    let last_sync = metric_sample(&text, "loadbalancer_discovery_last_sync_timestamp_seconds")
        .expect("last sync is exposed");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs_f64();
    assert!(
        last_sync > 0.0 && last_sync <= now,
        "{last_sync} vs now {now}"
    );

    // The same requests, seen from each backend: 500s and 405s count as failures
    // in the per-backend state only when they are 5xx.
    for (addr, state) in lb.backends.states() {
        assert_eq!((state.requests(), state.failures()), (4, 1), "{addr}");
    }
    // And each backend's own /metrics agrees with the load balancer's view.
    for server in &servers {
        let own = get(&format!("http://{}/metrics", server.addr)).await;
        let own = String::from_utf8(own.body.to_vec()).expect("UTF-8");
        assert_samples(
            &own,
            &[
                (
                    r#"backend_requests_total{path="/",code="200"}"#.to_owned(),
                    2.0,
                ),
                (
                    r#"backend_requests_total{path="/work",code="500"}"#.to_owned(),
                    1.0,
                ),
                (
                    r#"backend_requests_total{path="/",code="405"}"#.to_owned(),
                    1.0,
                ),
            ],
        );
    }

    // With no backend left, the load balancer answers 503 itself: backend="none".
    lb.writer().replace(Vec::new());
    assert_eq!(
        send_to("GET", "/").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let text = scrape(&lb).await;
    assert_samples(
        &text,
        &[
            (
                r#"loadbalancer_requests_total{backend="none",method="GET",code="503"}"#.to_owned(),
                1.0,
            ),
            (
                r#"loadbalancer_request_duration_seconds_count{backend="none"}"#.to_owned(),
                1.0,
            ),
            (r#"loadbalancer_backends{state="known"}"#.to_owned(), 0.0),
            ("loadbalancer_discovery_updates_total".to_owned(), 2.0),
            ("loadbalancer_requests_in_flight".to_owned(), 0.0),
        ],
    );
    // Earlier series are kept: counters never go back.
    let first = &addrs[0];
    assert_eq!(
        metric_sample(
            &text,
            &format!(r#"loadbalancer_requests_total{{backend="{first}",method="GET",code="200"}}"#)
        ),
        Some(2.0)
    );
    lb.stop().await;
}
