//! The operator endpoints on the admin port: `/debug/backends` follows each
//! backend's health, ejection and counts as they change, and `/status` is one
//! self-contained page. (The page's rendering is tested in a browser in
//! `status_page.rs`.)

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;

use crate::support::{Reply, TestLb, get, start_backends, wait_for};

async fn debug_backends(lb: &TestLb) -> Value {
    let reply: Reply = get(&lb.admin_url("/debug/backends")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.headers["cache-control"], "no-store");
    reply.json()
}

/// The entry for the `index`th backend (list order is sorted by address).
fn backend(snapshot: &Value, index: usize) -> &Value {
    &snapshot["backends"][index]
}

#[tokio::test]
async fn debug_backends_reflects_a_backend_turning_unhealthy_and_back() {
    let upstreams = start_backends(2).await;
    let lb = TestLb::start(&upstreams).await;
    for _ in 0..4 {
        assert_eq!(get(&lb.url("/")).await.status, StatusCode::OK);
    }
    wait_for(
        "no request in flight",
        || {
            lb.backends
                .states()
                .iter()
                .map(|(_, s)| s.in_flight())
                .sum::<u64>()
        },
        |n| *n == 0,
    )
    .await;

    let snapshot = debug_backends(&lb).await;
    let listed = snapshot["backends"].as_array().expect("a list of backends");
    assert_eq!(listed.len(), 2);
    let addrs = lb.backends.snapshot();
    for (entry, addr) in listed.iter().zip(&addrs) {
        assert_eq!(entry["address"], addr.to_string(), "in list order");
        assert_eq!(entry["healthy"], true);
        assert_eq!(entry["ejected"], false);
        assert_eq!(entry["ejected_until"], Value::Null);
        assert_eq!(entry["available"], true);
        assert_eq!(entry["requests"], 2);
        assert_eq!(entry["failures"], 0);
        assert_eq!(entry["in_flight"], 0);
        assert!(entry["last_latency_ms"].as_f64().expect("a latency") > 0.0);
    }
    let discovery = &snapshot["discovery"];
    assert_eq!(discovery["source"], "static");
    assert_eq!(discovery["synced"], true);
    assert_eq!(discovery["updates"], 1);
    let last_sync = discovery["last_sync"].as_str().expect("a last sync time");
    humantime::parse_rfc3339(last_sync).expect("RFC 3339");
    assert_eq!(discovery["last_error"], Value::Null);

    // Active health checks will flip this flag once the resilience work lands;
    // until then the test flips it in-process, exactly as they will.
    let first = lb.backends.state(addrs[0]);
    first.set_healthy(false);
    let snapshot = debug_backends(&lb).await;
    assert_eq!(backend(&snapshot, 0)["healthy"], false);
    assert_eq!(backend(&snapshot, 0)["available"], false);
    assert_eq!(backend(&snapshot, 1)["healthy"], true);

    first.set_healthy(true);
    let snapshot = debug_backends(&lb).await;
    assert_eq!(backend(&snapshot, 0)["healthy"], true);
    assert_eq!(backend(&snapshot, 0)["available"], true);

    // Outlier detection's ejection, likewise driven in-process for now.
    first.eject_until(Instant::now() + Duration::from_secs(60));
    let snapshot = debug_backends(&lb).await;
    assert_eq!(backend(&snapshot, 0)["ejected"], true);
    assert_eq!(backend(&snapshot, 0)["available"], false);
    let until = backend(&snapshot, 0)["ejected_until"]
        .as_str()
        .expect("an ejection end time");
    let until = humantime::parse_rfc3339(until).expect("RFC 3339");
    assert!(until > std::time::SystemTime::now() + Duration::from_secs(30));
    first.clear_ejection();
    let snapshot = debug_backends(&lb).await;
    assert_eq!(backend(&snapshot, 0)["ejected"], false);
    assert_eq!(backend(&snapshot, 0)["available"], true);

    // Counts move with traffic.
    for _ in 0..2 {
        get(&lb.url("/")).await;
    }
    let snapshot = debug_backends(&lb).await;
    assert_eq!(backend(&snapshot, 0)["requests"], 3);
    assert_eq!(backend(&snapshot, 1)["requests"], 3);
    lb.stop().await;
}

#[tokio::test]
async fn debug_backends_is_an_empty_list_with_no_backends() {
    let lb = TestLb::start(&[]).await;
    let snapshot = debug_backends(&lb).await;
    assert_eq!(snapshot["backends"], serde_json::json!([]));
    assert_eq!(snapshot["discovery"]["synced"], true);
    lb.stop().await;
}

#[tokio::test]
async fn status_page_is_one_self_contained_html_document() {
    let lb = TestLb::start(&[]).await;
    let reply = get(&lb.admin_url("/status")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "text/html; charset=utf-8");
    let page = std::str::from_utf8(&reply.body).expect("UTF-8");
    assert!(page.starts_with("<!doctype html>"));
    assert!(
        page.contains(r#"fetch("/debug/backends""#),
        "it polls the JSON"
    );
    // Nothing is loaded from elsewhere: it must work offline and through a port-forward.
    for external in ["<link", "src=", "@import", "http://", "https://"] {
        assert!(!page.contains(external), "{external:?} in the status page");
    }
    lb.stop().await;
}
