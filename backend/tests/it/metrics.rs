//! `GET /metrics` on the backend's main port: after a known set of requests, the
//! counters and histogram counts are exactly what was sent.

use http::StatusCode;

use crate::support::{Conn, TestServer};

/// The value of the sample `series` (name and labels exactly as exposed).
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_each_request_by_route_and_code() {
    let server = TestServer::start_default().await;
    let mut conn = Conn::open(server.addr).await;
    for _ in 0..3 {
        assert_eq!(conn.get("/").await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        let reply = conn.get("/work?status=500").await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(
        conn.get("/no/such/path").await.status,
        StatusCode::NOT_FOUND
    );

    let reply = conn.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = std::str::from_utf8(&reply.body).expect("metrics are UTF-8");
    let expected = [
        (r#"backend_requests_total{path="/",code="200"}"#, 3.0),
        (r#"backend_requests_total{path="/work",code="500"}"#, 2.0),
        (r#"backend_requests_total{path="other",code="404"}"#, 1.0),
        (r#"backend_request_duration_seconds_count{path="/"}"#, 3.0),
        (
            r#"backend_request_duration_seconds_count{path="/work"}"#,
            2.0,
        ),
        (
            r#"backend_request_duration_seconds_bucket{le="+Inf",path="/work"}"#,
            2.0,
        ),
    ];
    for (series, value) in expected {
        assert_eq!(sample(text, series), Some(value), "{series} in\n{text}");
    }
    // The scrape itself is counted once it has been answered, not before.
    assert_eq!(
        sample(
            text,
            r#"backend_requests_total{path="/metrics",code="200"}"#
        ),
        None
    );
    let again = conn.get("/metrics").await;
    let text = std::str::from_utf8(&again.body).expect("metrics are UTF-8");
    assert_eq!(
        sample(
            text,
            r#"backend_requests_total{path="/metrics",code="200"}"#
        ),
        Some(1.0)
    );
}
