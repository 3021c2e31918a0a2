//! Dual-stack: the default `bindAddress` (`::`) serves IPv4 and IPv6 clients on
//! one socket per port, IPv4 clients are named as IPv4 (not `::ffff:a.b.c.d`),
//! an IPv6 client's address is forwarded as written, and IPv6 backends are
//! proxied like any other. Every test needs the loopback `::1`; a machine
//! without it skips them with a message.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::support::{self, TestLb, Upstream, get};

/// Whether this machine has `::1`; says so when it has not.
fn ipv6_loopback() -> bool {
    match std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) {
        Ok(_) => true,
        Err(error) => {
            eprintln!("skipped: this machine cannot bind [::1] ({error})");
            false
        }
    }
}

/// A load balancer over `upstreams` with the default `bindAddress`.
async fn dual_stack_lb(upstreams: &[Upstream]) -> TestLb {
    let addrs = upstreams.iter().map(|u| u.addr).collect();
    TestLb::start_configured(addrs, |config| {
        config.listen.bind_address = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    })
    .await
}

/// `http://<ip>:<port><path>`, brackets and all.
fn url(ip: IpAddr, port: u16, path: &str) -> String {
    format!("http://{}{path}", SocketAddr::new(ip, port))
}

#[tokio::test]
async fn one_listener_answers_on_ipv4_and_ipv6_loopback() {
    if !ipv6_loopback() {
        return;
    }
    let upstreams = support::start_backends(1).await;
    let lb = dual_stack_lb(&upstreams).await;
    assert_eq!(lb.addr.ip(), IpAddr::V6(Ipv6Addr::UNSPECIFIED), "{lb:?}");
    for ip in [
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        let reply = get(&url(ip, lb.addr.port(), "/")).await;
        assert_eq!(reply.pod_name(), "backend-1", "proxy on {ip}");
        let ready = get(&url(ip, lb.admin_addr.port(), "/healthz")).await;
        assert!(ready.status.is_success(), "admin on {ip}: {ready:?}");
    }
    lb.stop().await;
}

#[tokio::test]
async fn clients_are_forwarded_in_their_own_family() {
    if !ipv6_loopback() {
        return;
    }
    let upstreams = support::start_backends(1).await;
    let lb = dual_stack_lb(&upstreams).await;
    let port = lb.addr.port();
    // An IPv4 client of the dual-stack socket is `::ffff:127.0.0.1` to the
    // kernel; the backend is told `127.0.0.1`.
    for (ip, forwarded) in [
        (IpAddr::from([127, 0, 0, 1]), "127.0.0.1"),
        (IpAddr::V6(Ipv6Addr::LOCALHOST), "::1"),
    ] {
        let seen = get(&url(ip, port, "/echo-headers")).await.json();
        assert_eq!(
            seen["x-forwarded-for"],
            serde_json::json!([forwarded]),
            "client on {ip}: {seen}"
        );
    }
    lb.stop().await;
}

#[tokio::test]
async fn an_ipv6_backend_is_proxied_and_labelled_with_brackets() {
    if !ipv6_loopback() {
        return;
    }
    let upstream = Upstream::start_on("backend-v6", (Ipv6Addr::LOCALHOST, 0).into()).await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;
    assert_eq!(get(&lb.url("/")).await.pod_name(), "backend-v6");
    let series = format!(
        r#"loadbalancer_requests_total{{backend="[::1]:{}",method="GET",code="200"}}"#,
        upstream.addr.port()
    );
    support::wait_for_metric(lb.admin_addr, &series, |count| count == 1.0).await;
    lb.stop().await;
}
