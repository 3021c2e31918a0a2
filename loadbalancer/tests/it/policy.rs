//! Traffic policy through the load balancer: rate limits per client and for
//! the replica, with the client told apart by its address (through a trusted
//! proxy's `X-Forwarded-For`) or by a header.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use loadbalancer::config::{Cidr, ClientKey, PerClientConfig, RateLimitConfig, TrustedProxies};

use crate::support::{self, TestLb, Upstream, metric};

/// A `GET /` that a trusted proxy forwarded for `client`.
async fn get_for(lb: &TestLb, client: &str) -> support::Reply {
    let request = Request::get(lb.url("/"))
        .header("x-forwarded-for", client)
        .body(Full::<Bytes>::default())
        .expect("a valid request");
    support::send(&support::client(), request).await
}

/// A load balancer allowing each client `burst` requests at once and one a
/// second, believing `X-Forwarded-For` from loopback.
async fn limited_lb(upstream: &Upstream, burst: u32, key: ClientKey) -> TestLb {
    TestLb::start_configured(vec![upstream.addr], move |config| {
        config.policy.rate_limit = Some(RateLimitConfig {
            per_client: Some(PerClientConfig {
                requests_per_second: 1,
                burst,
                key,
            }),
            global: None,
        });
        let loopback: Cidr = "127.0.0.0/8".parse().expect("a valid block");
        config.policy.trusted_proxies = TrustedProxies::new(vec![loopback]);
    })
    .await
}

#[tokio::test]
async fn a_client_over_its_burst_gets_429_while_another_is_served() {
    let upstream = Upstream::start("backend-1").await;
    let lb = limited_lb(&upstream, 3, ClientKey::SourceIp).await;

    for _ in 0..3 {
        assert_eq!(get_for(&lb, "203.0.113.1").await.status, StatusCode::OK);
    }
    let refused = get_for(&lb, "203.0.113.1").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let headers = &refused.headers;
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["ratelimit-policy"], r#""client";q=1;w=1;burst=3"#);
    assert_eq!(headers["ratelimit"], r#""client";r=0;t=1"#);
    assert_eq!(refused.json()["status"], 429);
    assert!(headers.contains_key("x-request-id"));

    // Another client, through the same proxy, has its own limit.
    assert_eq!(get_for(&lb, "203.0.113.2").await.status, StatusCode::OK);
    // A client cannot pick its own address: what it wrote left of the
    // proxy's entry is not believed.
    let spoofed = get_for(&lb, "198.51.100.9, 203.0.113.1").await;
    assert_eq!(spoofed.status, StatusCode::TOO_MANY_REQUESTS);

    let counted = metric(
        lb.admin_addr,
        r#"loadbalancer_rate_limited_total{limit="client",key="sourceIp"}"#,
    )
    .await;
    assert_eq!(counted, 2.0);
}

#[tokio::test]
async fn a_header_key_limits_each_key_and_grpc_hears_resource_exhausted() {
    let upstream = Upstream::start("backend-1").await;
    let key = ClientKey::Header {
        header: "x-api-key".to_owned(),
    };
    let lb = limited_lb(&upstream, 1, key).await;
    let call = |api_key: &'static str| {
        Request::post(lb.url("/identity.v1.Identity/Get"))
            .header("x-api-key", api_key)
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .expect("a valid request")
    };
    let client = support::client();
    // The first call of a key goes through (the test upstream answers it, not
    // as gRPC, which does not matter here); the second is refused in gRPC's words.
    support::send(&client, call("alpha")).await;
    let refused = support::send(&client, call("alpha")).await;
    assert_eq!(refused.status, StatusCode::OK, "gRPC errors are HTTP 200");
    assert_eq!(refused.headers["grpc-status"], "8", "RESOURCE_EXHAUSTED");
    assert_eq!(refused.headers["retry-after"], "1");
    // Another key is not held back by the first.
    let other = support::send(&client, call("beta")).await;
    assert!(
        !other.headers.contains_key("grpc-status"),
        "{:?}",
        other.headers
    );
}
