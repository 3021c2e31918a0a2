//! Metrics output: a `prometheus-client` registry as the OpenMetrics text that
//! Prometheus scrapes, and the `GET /metrics` answer that carries it.
//!
//! What is counted differs between the binaries (each has its own `Metrics` with
//! its own registry); how it is written out does not, so both encode and answer
//! through here and a scraper sees the same format and `Content-Type` from both.

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderValue};
use http_body_util::Full;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`encode`]'s output: OpenMetrics 1.0 text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric in `registry`, in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail, and label values are well-formed; an
    // error here would be a bug in an encoder, not something a scrape can cause,
    // and no reason to panic.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(%error, "cannot encode metrics");
    }
    text
}

/// The answer to `GET /metrics`: 200 with `text` (from [`encode`]) as
/// [`CONTENT_TYPE`].
pub fn response(text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn a_registry_is_answered_as_openmetrics_text() {
        let mut registry = Registry::with_prefix("kit");
        let counter = Counter::<u64>::default();
        registry.register("things", "Things counted", counter.clone());
        counter.inc();
        let text = encode(&registry);
        assert!(text.lines().any(|l| l == "kit_things_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");

        let response = response(text);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
    }
}
