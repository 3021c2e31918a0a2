//! Chaos tests of bad input and limits on both servers
//! (the load balancer and the real backend, which share one listener), smuggling
//! attempts against a backend that records every request, and SIGTERM to the
//! load balancer binary under load. Loopback only; every wait is bounded.
//!
//! Each test prints its figures: requests (or cases) sent, succeeded, failed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use loadbalancer::server::ServerLimits;

use crate::support;
use crate::support::faults::{RealBackend, start_real_backend};
use crate::support::process::{Listening, Process, TempConfig, listening};
use crate::support::raw::RawConn;
use crate::support::{PATIENCE, TestLb, Upstream, get, start_backend, wait_for, wait_for_readyz};

const GOOD: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";

/// A limit no test reaches, for the timeouts a test is not about.
const NEVER: Duration = Duration::from_secs(3600);

/// The two servers under test. Both must behave the same.
#[derive(Debug)]
enum Target {
    // Boxed: the load balancer's handle is several times the backend's.
    Lb(Box<TestLb>, Upstream),
    Backend(RealBackend),
}

impl Target {
    async fn both(limits: ServerLimits) -> [Self; 2] {
        let upstream = start_backend("upstream-1").await;
        let lb = TestLb::start_with_limits(vec![upstream.addr], limits).await;
        [
            Target::Lb(Box::new(lb), upstream),
            Target::Backend(start_real_backend("backend-1", limits).await),
        ]
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Target::Lb(lb, _) => lb.addr,
            Target::Backend(backend) => backend.addr,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Target::Lb(..) => "loadbalancer",
            Target::Backend(_) => "backend",
        }
    }
}

fn limits(change: impl FnOnce(&mut ServerLimits)) -> ServerLimits {
    let mut limits = ServerLimits::DEFAULT;
    change(&mut limits);
    limits
}

/// Limits without the idle and header-read timeouts, for tests of what a
/// connection does between requests.
fn untimed() -> ServerLimits {
    limits(|l| {
        l.header_read_timeout = NEVER;
        l.idle_timeout = NEVER;
    })
}

/// Long enough for a connection that has had its answer to be parked.
const QUIET_SPELL: Duration = Duration::from_millis(50);

/// A well-formed request on a fresh connection gets a 200 with a pod name.
async fn assert_still_serves(addr: SocketAddr) {
    let mut conn = RawConn::connect(addr).await;
    conn.send(GOOD).await;
    let response = conn.response().await.expect("a good request is answered");
    assert_eq!(response.status, 200, "{response:?}");
    assert!(response.json()["podName"].is_string(), "{response:?}");
}

/// Sends `request` on a fresh connection and returns the status it gets; the
/// connection must then be closed by the server.
async fn status_then_close(addr: SocketAddr, request: &[u8]) -> u16 {
    let mut conn = RawConn::connect(addr).await;
    conn.send(request).await;
    let response = conn
        .response()
        .await
        .expect("the server answers before closing");
    let rest = conn.closed().await;
    assert!(rest.is_empty(), "more after the answer: {rest:?}");
    response.status
}

#[tokio::test]
async fn malformed_oversized_and_ambiguous_requests_get_their_status_and_serving_goes_on() {
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let cases: [(&str, &[u8], u16); 8] = [
        ("malformed request line", b"BAD REQUEST LINE\r\n\r\n", 400),
        (
            "invalid header name",
            b"GET / HTTP/1.1\r\nHost: test\r\nBad Header: 1\r\n\r\n",
            400,
        ),
        ("head over maxHeaderBytes", big_header.as_bytes(), 431),
        (
            "two different Content-Lengths",
            b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            400,
        ),
        (
            "unknown transfer coding",
            b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: sideways\r\n\r\n",
            400,
        ),
        (
            "a coding before chunked",
            b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "chunked twice",
            b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
    ];
    for target in Target::both(ServerLimits::DEFAULT).await {
        let (mut sent, mut as_expected) = (0, 0);
        for (case, request, expected) in &cases {
            sent += 1;
            let status = status_then_close(target.addr(), request).await;
            assert_eq!(status, *expected, "{}: {case}", target.name());
            as_expected += 1;
            assert_still_serves(target.addr()).await;
        }
        println!(
            "{}: bad-input cases sent={sent} answered-as-expected={as_expected} failed={}",
            target.name(),
            sent - as_expected
        );
        if let Target::Lb(_, upstream) = &target {
            // Only the good requests in between ever reached the backend.
            assert_eq!(upstream.requests(), vec!["GET /"; cases.len()]);
        }
    }
}

#[tokio::test]
async fn content_length_beside_chunked_is_dropped_and_the_connection_closes() {
    let upstream = start_backend("upstream-1").await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;
    let mut conn = RawConn::connect(lb.addr).await;
    conn.send(
        b"POST /echo-headers HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let response = conn.response().await.expect("the request is answered");
    assert_eq!(response.status, 200);
    let seen = response.json();
    assert!(
        seen.get("content-length").is_none(),
        "Content-Length reached the backend: {seen}"
    );
    // RFC 9112 section 6.3: the connection must close after such a request.
    assert!(conn.closed().await.is_empty());
    assert_still_serves(lb.addr).await;
    lb.stop().await;
}

#[tokio::test]
async fn no_smuggled_request_ever_reaches_the_backend() {
    let upstream = start_backend("upstream-1").await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;
    let hidden = |n: u8| format!("GET /smuggled-{n} HTTP/1.1\r\nHost: test\r\n\r\n");
    let attempts: Vec<(&str, String, u16)> = vec![
        (
            // A front end that trusted Content-Length would pass the hidden
            // request on as body; one that trusts chunked ends the body early.
            "CL.TE",
            format!(
                "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{}",
                5 + hidden(1).len(),
                hidden(1)
            ),
            200,
        ),
        (
            "TE.CL",
            format!(
                "POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\
                 Content-Length: 3\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                hidden(2).len(),
                hidden(2)
            ),
            200,
        ),
        (
            "obfuscated TE",
            format!(
                "POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\
                 Transfer-Encoding: cow\r\nContent-Length: {}\r\n\r\n{}",
                hidden(3).len(),
                hidden(3)
            ),
            400,
        ),
        (
            "two Content-Lengths",
            format!(
                "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\
                 Content-Length: {}\r\n\r\n{}",
                hidden(4).len(),
                hidden(4)
            ),
            400,
        ),
    ];
    for (attempt, request, expected) in &attempts {
        let status = status_then_close(lb.addr, request.as_bytes()).await;
        assert_eq!(status, *expected, "{attempt}");
    }
    // A request after every attempt: had anything been smuggled onto the pooled
    // upstream connections, it would have arrived before this one.
    assert_eq!(get(&lb.url("/after")).await.status, StatusCode::OK);
    let received = upstream.requests();
    let smuggled: Vec<_> = received.iter().filter(|r| r.contains("smuggled")).collect();
    println!(
        "smuggling: attempts sent={} backend received={received:?} smuggled={}",
        attempts.len(),
        smuggled.len()
    );
    assert!(smuggled.is_empty(), "smuggled through: {smuggled:?}");
    assert_eq!(received, ["POST /", "POST /", "GET /after"]);
    lb.stop().await;
}

#[tokio::test]
async fn a_trickling_request_head_is_cut_off_at_the_header_read_timeout() {
    let limits = limits(|l| {
        l.header_read_timeout = Duration::from_millis(300);
        l.idle_timeout = NEVER;
    });
    for target in Target::both(limits).await {
        let mut conn = RawConn::connect(target.addr()).await;
        conn.send(b"GET / HTTP/1.1\r\nHost: test\r\n").await;
        // The idle timeout is an hour away: only the header timeout can close it.
        let answer = conn.closed().await;
        assert!(answer.is_empty(), "{}: {answer:?}", target.name());
        println!("{}: slow head sent=1 cut=1", target.name());
        assert_still_serves(target.addr()).await;
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let limits = limits(|l| {
        l.header_read_timeout = NEVER;
        l.idle_timeout = Duration::from_millis(300);
    });
    for target in Target::both(limits).await {
        let mut conn = RawConn::connect(target.addr()).await;
        conn.send(GOOD).await;
        assert_eq!(conn.response().await.expect("answered").status, 200);
        assert!(conn.closed().await.is_empty(), "{}", target.name());
        assert_still_serves(target.addr()).await;
    }
}

#[tokio::test]
async fn the_header_timeout_does_not_cut_a_keep_alive_connection_between_requests() {
    let limits = limits(|l| {
        l.header_read_timeout = Duration::from_millis(100);
        l.idle_timeout = NEVER;
    });
    for target in Target::both(limits).await {
        let mut conn = RawConn::connect(target.addr()).await;
        conn.send(GOOD).await;
        assert_eq!(conn.response().await.expect("answered").status, 200);
        // Idle for several header timeouts; hyper's own timer would close here.
        tokio::time::sleep(Duration::from_millis(600)).await;
        conn.send(GOOD).await;
        let second = conn.response().await;
        assert_eq!(
            second.map(|r| r.status),
            Some(200),
            "{}: closed while idle",
            target.name()
        );
    }
}

/// Between requests an idle connection is parked: hyper's connection, with
/// its buffers, is taken apart, and the socket waits for the next request.
/// Whatever arrives, in whatever pieces, is still served as before.
#[tokio::test]
async fn a_parked_connection_serves_pipelined_trickled_and_upload_requests_alike() {
    for target in Target::both(untimed()).await {
        let name = target.name();
        let mut conn = RawConn::connect(target.addr()).await;
        // Two requests in one write: the second arrives with the first.
        conn.send(&[GOOD, GOOD].concat()).await;
        for _ in 0..2 {
            assert_eq!(
                conn.response().await.expect("answered").status,
                200,
                "{name}"
            );
        }
        // A head that begins while the connection is parked and ends later.
        tokio::time::sleep(QUIET_SPELL).await;
        conn.send(&GOOD[..5]).await;
        tokio::time::sleep(QUIET_SPELL).await;
        conn.send(&GOOD[5..]).await;
        assert_eq!(
            conn.response().await.expect("answered").status,
            200,
            "{name}"
        );
        // A request with a body (whatever its answer), then a quiet spell.
        conn.send(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello")
            .await;
        assert!(
            conn.response().await.is_some(),
            "{name}: the upload is answered"
        );
        tokio::time::sleep(QUIET_SPELL).await;
        conn.send(GOOD).await;
        assert_eq!(
            conn.response().await.expect("answered").status,
            200,
            "{name}"
        );
    }
}

/// HTTP/1.0 closes after each exchange unless the client asks for
/// `Connection: keep-alive`; a connection kept open that way is parked when
/// idle like an HTTP/1.1 one (the allocator test in `service-kit` counts what
/// it holds), and the next request is served on it. One that did not ask is
/// closed after its answer.
#[tokio::test]
async fn an_http10_keep_alive_connection_is_served_again_after_a_quiet_spell() {
    const KEEP_ALIVE: &[u8] = b"GET / HTTP/1.0\r\nHost: test\r\nConnection: keep-alive\r\n\r\n";
    for target in Target::both(untimed()).await {
        let name = target.name();
        let mut conn = RawConn::connect(target.addr()).await;
        for _ in 0..2 {
            conn.send(KEEP_ALIVE).await;
            let answer = conn.response().await.expect("answered");
            assert_eq!(answer.status, 200, "{name}");
            assert_eq!(answer.header("connection"), Some("keep-alive"), "{name}");
            // Parked in the quiet spell; the next request wakes it.
            tokio::time::sleep(QUIET_SPELL).await;
        }

        let mut conn = RawConn::connect(target.addr()).await;
        conn.send(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").await;
        assert_eq!(
            conn.response().await.expect("answered").status,
            200,
            "{name}"
        );
        assert!(
            conn.closed().await.is_empty(),
            "{name}: a plain HTTP/1.0 exchange closes its connection"
        );
    }
}

/// Parked connections are watched together: one whose client hangs up leaves
/// the others' next requests served at once.
#[tokio::test]
async fn a_parked_connection_is_served_at_once_after_another_hung_up() {
    for target in Target::both(untimed()).await {
        let name = target.name();
        let mut stays = RawConn::connect(target.addr()).await;
        let mut leaves = RawConn::connect(target.addr()).await;
        for conn in [&mut stays, &mut leaves] {
            conn.send(GOOD).await;
            assert_eq!(
                conn.response().await.expect("answered").status,
                200,
                "{name}"
            );
        }
        // Both parked; then one hangs up, and the server sees it.
        tokio::time::sleep(QUIET_SPELL).await;
        drop(leaves);
        tokio::time::sleep(QUIET_SPELL).await;
        stays.send(GOOD).await;
        let answer = stays
            .response_within(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{name}: no answer within 5 s"));
        assert_eq!(answer.expect("answered").status, 200, "{name}");
    }
}

/// A parked connection keeps both clocks: a head that begins while parked
/// and then stalls is cut at the header-read timeout.
#[tokio::test]
async fn a_head_begun_on_a_parked_connection_gets_the_header_timeout() {
    let limits = limits(|l| {
        l.header_read_timeout = Duration::from_millis(200);
        l.idle_timeout = NEVER;
    });
    for target in Target::both(limits).await {
        let mut conn = RawConn::connect(target.addr()).await;
        conn.send(GOOD).await;
        assert_eq!(conn.response().await.expect("answered").status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        conn.send(&GOOD[..5]).await;
        assert!(conn.closed().await.is_empty(), "{}", target.name());
        assert_still_serves(target.addr()).await;
    }
}

#[tokio::test]
async fn at_max_connections_the_next_connection_waits_until_one_closes() {
    let limits = limits(|l| l.max_connections = 2);
    for target in Target::both(limits).await {
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut conn = RawConn::connect(target.addr()).await;
            conn.send(GOOD).await;
            assert_eq!(conn.response().await.expect("answered").status, 200);
            open.push(conn);
        }
        // The kernel completes the handshake (backlog), but nobody accepts it.
        let mut waiting = RawConn::connect(target.addr()).await;
        waiting.send(GOOD).await;
        let early = waiting.response_within(Duration::from_millis(500)).await;
        assert!(
            early.is_none(),
            "{}: third connection served: {early:?}",
            target.name()
        );
        drop(open.pop());
        let late = waiting.response().await.expect("served once a slot frees");
        assert_eq!(late.status, 200);
        println!(
            "{}: cap=2 connections opened=3 served-at-once=2 served-after-a-close=1",
            target.name()
        );
        drop((open, waiting));
        assert_still_serves(target.addr()).await;
    }
}

#[tokio::test]
async fn draining_answers_with_connection_close() {
    let upstream = start_backend("upstream-1").await;
    let lb = TestLb::start(std::slice::from_ref(&upstream)).await;
    lb.shutdown.begin_draining();
    let mut conn = RawConn::connect(lb.addr).await;
    conn.send(GOOD).await;
    let response = conn.response().await.expect("served while draining");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(conn.closed().await.is_empty());
    lb.stop().await;
}

#[tokio::test]
async fn requests_outlasting_the_shutdown_timeout_are_cut_and_serving_returns() {
    let upstream = start_backend("upstream-1").await;
    // Whole seconds: the config carries `shutdownTimeoutSeconds`, and a
    // fraction would be cut to 0 s.
    let limits = limits(|l| l.shutdown_timeout = Duration::from_secs(1));
    let lb = TestLb::start_with_limits(vec![upstream.addr], limits).await;
    let mut conn = RawConn::connect(lb.addr).await;
    conn.send(b"GET /slow?ms=15000 HTTP/1.1\r\nHost: test\r\n\r\n")
        .await;
    upstream.wait_for_requests(1).await;

    lb.shutdown.begin_draining();
    lb.shutdown.stop();
    // Returns within PATIENCE although the request would take 15 s.
    lb.stopped().await;
    assert!(
        conn.response().await.is_none(),
        "the slow request was not cut"
    );
}

/// Figures of a load run.
#[derive(Debug, Default)]
struct Tally {
    sent: AtomicUsize,
    succeeded: AtomicUsize,
    /// Refused at connect: never accepted (only possible once the port closed).
    refused: AtomicUsize,
    failed: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_every_accepted_request_and_exits_0() {
    const CLIENTS: usize = 8;
    let names = ["backend-1", "backend-2", "backend-3"];
    let mut backends = Vec::new();
    for name in names {
        backends.push(start_real_backend(name, ServerLimits::DEFAULT).await);
    }
    let list = backends
        .iter()
        .map(|b| b.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let config = TempConfig::new(
        r#"{"port": 0, "adminPort": 0, "backendServiceName": "backend-service",
            "backendPort": 8080, "logFormat": "json", "drainSeconds": 2}"#,
    );
    let mut process = Process::spawn(&[
        "--config",
        config.path.to_str().expect("UTF-8 temp path"),
        "--backends",
        &list,
    ]);
    let lines = process.stdout_lines();
    let Listening { proxy, admin } = listening(&lines).await;
    wait_for_readyz(admin, StatusCode::OK).await;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let known: BTreeSet<&str> = names.into_iter().collect();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
        let url = format!("http://{proxy}/work?sleep_ms=50");
        let known = known.clone();
        clients.push(tokio::spawn(async move {
            let client = support::client();
            // Bounded: the test stops the clients; the cap only guards a hang.
            for _ in 0..10_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                tally.sent.fetch_add(1, Ordering::SeqCst);
                let req = Request::get(&url)
                    .body(Full::<Bytes>::default())
                    .expect("valid request");
                let exchange = async {
                    let response = client.request(req).await?;
                    let status = response.status();
                    let body = response.into_body().collect().await?.to_bytes();
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
                };
                match tokio::time::timeout(PATIENCE, exchange).await {
                    Ok(Ok((status, body))) => {
                        let json: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        let pod = json["podName"].as_str().unwrap_or_default();
                        if status == StatusCode::OK && known.contains(pod) {
                            tally.succeeded.fetch_add(1, Ordering::SeqCst);
                        } else {
                            eprintln!("bad answer {status}: {json}");
                            tally.failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(Err(error))
                        if error
                            .downcast_ref::<hyper_util::client::legacy::Error>()
                            .is_some_and(hyper_util::client::legacy::Error::is_connect) =>
                    {
                        tally.refused.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Err(error)) => {
                        eprintln!("request failed: {error:?}");
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => {
                        eprintln!("request hung for {PATIENCE:?}");
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }

    wait_for(
        "load to be under way",
        || tally.succeeded.load(Ordering::SeqCst),
        |&n| n >= 200,
    )
    .await;
    let done_at_sigterm =
        tally.succeeded.load(Ordering::SeqCst) + tally.failed.load(Ordering::SeqCst);
    process.terminate();

    // Readiness turns false first, while the proxy still serves (drain).
    let readyz = wait_for_readyz(admin, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(readyz.json()["reason"], "shutting down");
    // Kubernetes would now have removed the endpoint: clients stop sending new
    // requests, the ones in flight must still complete.
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.expect("client task does not panic");
    }
    let status = process.exited().await;

    let (sent, succeeded, refused, failed) = (
        tally.sent.load(Ordering::SeqCst),
        tally.succeeded.load(Ordering::SeqCst),
        tally.refused.load(Ordering::SeqCst),
        tally.failed.load(Ordering::SeqCst),
    );
    println!(
        "sigterm under load: clients={CLIENTS} sent={sent} succeeded={succeeded} \
         failed={failed} refused-at-connect={refused} completed-after-sigterm={}",
        succeeded + failed - done_at_sigterm
    );
    assert!(status.success(), "exit status {status}");
    assert_eq!(failed, 0, "accepted requests failed");
    assert_eq!(sent, succeeded + refused + failed);
    assert!(
        succeeded > done_at_sigterm,
        "no request finished after SIGTERM"
    );
}
