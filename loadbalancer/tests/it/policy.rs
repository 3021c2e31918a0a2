//! Traffic policy through the load balancer: rate limits per client and for
//! the replica, with the client told apart by its address (through a trusted
//! proxy's `X-Forwarded-For`) or by a header; session affinity by consistent
//! hashing (a cookie, a header, the client's address); and the per-backend
//! concurrency limit with its queue.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use loadbalancer::balancer::HashOn;
use loadbalancer::config::{
    Algorithm, Cidr, ClientKey, ConcurrencyConfig, PerClientConfig, RateLimitConfig, TrustedProxies,
};

use crate::support::process::{Process, TempConfig, ready};
use crate::support::{self, InFlight, TestLb, Upstream, metric};

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

/// `GET path` with `headers`, collected.
async fn get_with(lb_url: String, headers: &[(&str, &str)]) -> support::Reply {
    let request = headers
        .iter()
        .fold(Request::get(lb_url), |request, (name, value)| {
            request.header(*name, *value)
        })
        .body(Full::<Bytes>::default())
        .expect("a valid request");
    support::send(&support::client(), request).await
}

/// The pods that answered `n` requests to `url` with `headers`, tallied.
async fn pods(
    url: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut answered = Vec::new();
    for _ in 0..n {
        let reply = get_with(url.to_owned(), headers).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        answered.push(reply.pod_name());
    }
    support::tally(answered)
}

/// Three upstreams, `backend-1` to `backend-3`.
async fn three_upstreams() -> Vec<Upstream> {
    let mut upstreams = Vec::new();
    for name in ["backend-1", "backend-2", "backend-3"] {
        upstreams.push(Upstream::start(name).await);
    }
    upstreams
}

/// Through the real binary, as the issue asks: a session stays on one
/// backend, moves to exactly one other when that backend dies, and stays
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cookie_sticks_to_one_backend_and_moves_once_when_it_dies() {
    let mut upstreams = three_upstreams().await;
    let list: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    let config = TempConfig::new(&format!(
        r#"{{"port": 0, "adminPort": 0, "bindAddress": "127.0.0.1",
            "backendServiceName": "backend-service", "backendPort": 8080,
            "logFormat": "json", "drainSeconds": 1, "discovery": "static",
            "staticBackends": [{}], "algorithm": "consistent_hash",
            "hashOn": {{"cookie": "session"}}}}"#,
        list.join(", ")
    ));
    let mut process = Process::spawn(&["--config", config.path_str()]);
    let lines = process.stdout_lines();
    let proxy = ready(&lines).await.proxy;
    let url = format!("http://{proxy}/");
    let cookie = [("cookie", "theme=dark; session=cart-4711")];

    let before = pods(&url, &cookie, 100).await;
    assert_eq!(before.len(), 1, "one cookie, one backend: {before:?}");
    let home = before.keys().next().expect("one pod").clone();

    let dead = upstreams
        .iter_mut()
        .find(|u| u.pod_name == home)
        .expect("the home backend is one of ours");
    dead.stop().await;
    let after = pods(&url, &cookie, 100).await;
    assert_eq!(
        after.len(),
        1,
        "the session moves to one backend: {after:?}"
    );
    assert!(!after.contains_key(&home), "{after:?}");

    // Other sessions are spread, not all piled where this one went.
    let mut spread = Vec::new();
    for user in 0..30 {
        let cookie = format!("session=user-{user}");
        let reply = get_with(url.clone(), &[("cookie", &cookie)]).await;
        spread.push(reply.pod_name());
    }
    assert_eq!(
        support::tally(spread).len(),
        2,
        "two live backends share them"
    );
    process.terminate();
    assert!(process.exited().await.success());
}

#[tokio::test]
async fn a_missing_cookie_is_set_with_its_ttl_and_routes_the_session_from_the_start() {
    let upstreams = three_upstreams().await;
    let addrs = upstreams.iter().map(|u| u.addr).collect();
    let lb = TestLb::start_configured(addrs, |config| {
        config.balancing.algorithm = Algorithm::ConsistentHash;
        config.balancing.hash_on = Some(HashOn {
            cookie: Some("lb-session".to_owned()),
            ttl_seconds: Some(600),
            ..HashOn::default()
        });
    })
    .await;

    let first = get_with(lb.url("/"), &[]).await;
    let set_cookie = first.headers["set-cookie"].to_str().expect("ASCII");
    let (pair, attributes) = set_cookie.split_once("; ").expect("attributes follow");
    assert_eq!(attributes, "Path=/; HttpOnly; Max-Age=600");
    let value = pair.strip_prefix("lb-session=").expect("our cookie");
    assert_eq!(value.len(), 32, "128 random bits in hex: {value}");
    // The cookie it was given routes the rest of the session where its first
    // request went, and is not set again.
    let cookie = format!("lb-session={value}");
    let rest = pods(&lb.url("/"), &[("cookie", &cookie)], 20).await;
    assert_eq!(rest.keys().collect::<Vec<_>>(), [&first.pod_name()]);
    let again = get_with(lb.url("/"), &[("cookie", &cookie)]).await;
    assert!(!again.headers.contains_key("set-cookie"));
    // Two new clients get two different cookies.
    let second = get_with(lb.url("/"), &[]).await;
    assert_ne!(second.headers["set-cookie"], first.headers["set-cookie"]);
}

#[tokio::test]
async fn header_and_source_ip_keys_stick_and_keyless_requests_rotate() {
    let upstreams = three_upstreams().await;
    let addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    let by_header = TestLb::start_configured(addrs.clone(), |config| {
        config.balancing.algorithm = Algorithm::ConsistentHash;
        config.balancing.hash_on = Some(HashOn {
            header: Some("x-user".to_owned()),
            ..HashOn::default()
        });
    })
    .await;
    for user in ["ada", "grace", "edsger"] {
        let landed = pods(&by_header.url("/"), &[("x-user", user)], 20).await;
        assert_eq!(landed.len(), 1, "{user}: {landed:?}");
    }
    // No key: round-robin, each backend in turn.
    let keyless = pods(&by_header.url("/"), &[], 30).await;
    assert_eq!(keyless.values().collect::<Vec<_>>(), [&10, &10, &10]);
    let hits = r#"loadbalancer_affinity_total{result="hit"}"#;
    let misses = r#"loadbalancer_affinity_total{result="miss"}"#;
    assert_eq!(metric(by_header.admin_addr, hits).await, 60.0);
    assert_eq!(metric(by_header.admin_addr, misses).await, 30.0);

    let by_address = TestLb::start_configured(addrs, |config| {
        config.balancing.algorithm = Algorithm::ConsistentHash;
        config.balancing.hash_on = Some(HashOn {
            source_ip: true,
            ..HashOn::default()
        });
        let loopback: Cidr = "127.0.0.0/8".parse().expect("a valid block");
        config.policy.trusted_proxies = TrustedProxies::new(vec![loopback]);
    })
    .await;
    // Through a trusted proxy, the forwarded-for client is the key. The
    // backends' ports differ from run to run, and with them the table, so
    // sixteen clients: all on one backend by chance is a chance in 14
    // million (three clients or four would be one in 9 or 27).
    let mut clients = Vec::new();
    for host in 1..=16 {
        let client = format!("203.0.113.{host}");
        let landed = pods(&by_address.url("/"), &[("x-forwarded-for", &client)], 10).await;
        assert_eq!(landed.len(), 1, "{client}: {landed:?}");
        clients.extend(landed.into_keys());
    }
    assert!(support::tally(clients).len() > 1, "clients spread");
}

/// With `maxRequestsPerBackend: 2`: the key's backend takes two, the third
/// goes to the next backend, and with every backend full a request waits
/// `queueTimeoutMs` and is shed, or proceeds when a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_passes_requests_on_and_when_all_are_full_they_queue() {
    let (slow, other) = (
        Upstream::start("slow").await,
        Upstream::start("other").await,
    );
    let lb = TestLb::start_configured(vec![slow.addr, other.addr], |config| {
        config.balancing.algorithm = Algorithm::ConsistentHash;
        config.balancing.hash_on = Some(HashOn {
            header: Some("x-user".to_owned()),
            ..HashOn::default()
        });
        config.concurrency = ConcurrencyConfig {
            max_requests_per_backend: Some(2),
            queue_timeout_ms: 300,
        };
    })
    .await;
    // A user whose key lands on `slow`.
    let mut user = 0;
    let user = loop {
        let name = format!("user-{user}");
        if get_with(lb.url("/"), &[("x-user", &name)]).await.pod_name() == "slow" {
            break name;
        }
        user += 1;
    };
    let keyed = |path: &str| {
        Request::get(lb.url(path))
            .header("x-user", &user)
            .body(Full::<Bytes>::default())
            .expect("a valid request")
    };
    let (at_slow, at_other) = (slow.received(), other.received());

    let held_at_slow = [
        InFlight::send(keyed("/hold")),
        InFlight::send(keyed("/hold")),
    ];
    slow.wait_for_requests(at_slow + 2).await;
    // `slow` is full: the third goes to the next backend of the key's sequence.
    let third = InFlight::send(keyed("/hold"));
    other.wait_for_requests(at_other + 1).await;
    let fourth = InFlight::send(keyed("/hold"));
    other.wait_for_requests(at_other + 2).await;
    assert_eq!(slow.received(), at_slow + 2, "never more than two at once");

    // Both full: the fifth waits 300 ms and is shed.
    let started = std::time::Instant::now();
    let shed = get_with(lb.url("/"), &[("x-user", &user)]).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    shed.assert_proxy_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "every backend is at its concurrency limit; waited 300 ms",
    );
    // The sixth waits, and goes as soon as `slow` lets its two finish.
    let sixth = InFlight::send(keyed("/"));
    support::wait_for_metric(lb.admin_addr, "loadbalancer_requests_queued_total", |n| {
        n >= 2.0
    })
    .await;
    slow.release_held();
    let served = sixth.finish().await;
    assert_eq!(served.status, StatusCode::OK);
    for held in held_at_slow {
        assert_eq!(held.finish().await.status, StatusCode::OK);
    }
    other.release_held();
    for held in [third, fourth] {
        assert_eq!(held.finish().await.pod_name(), "other");
    }
    let admin = lb.admin_addr;
    assert_eq!(metric(admin, "loadbalancer_requests_shed_total").await, 1.0);
    assert_eq!(metric(admin, "loadbalancer_queue_length").await, 0.0);
    let fallback = r#"loadbalancer_affinity_total{result="fallback"}"#;
    assert!(metric(admin, fallback).await >= 2.0);
}
