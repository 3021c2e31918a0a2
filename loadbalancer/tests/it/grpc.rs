//! gRPC through the load balancer, with tonic clients and the backend crate's
//! own gRPC service in-process: calls balanced one by one over the calls of a
//! single client connection, streaming both ways, trailers, gRPC-shaped errors,
//! backends that drain (GOAWAY) or refuse streams, the `grpcPort` listener, and
//! the gRPC health check.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backend::grpc::proto::identity_client::IdentityClient;
use backend::grpc::proto::{CollectRequest, EchoRequest, GetRequest, WatchRequest};
use backend::handlers::App;
use backend::identity::Identity;
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use loadbalancer::backends::{BackendProtocol, Backends};
use loadbalancer::health::{HealthCheckSettings, HealthChecker};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::support::faults::bind_same_port;
use crate::support::{PATIENCE, TestLb, metric, tally};

/// The backend crate's gRPC server, in-process.
struct GrpcBackend {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

impl GrpcBackend {
    async fn start(pod_name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, pod_name)
    }

    fn start_on(listener: TcpListener, pod_name: &str) -> Self {
        let addr = listener.local_addr().expect("bound");
        let app = App::new(Identity {
            pod_name: pod_name.to_owned(),
            pod_ip: addr.ip().to_string(),
            service_name: "backend".to_owned(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(backend::grpc::serve(listener, app, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Starts draining: GOAWAY to every connection, calls in flight finish.
    fn drain(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn grpc_backends(count: usize) -> Vec<GrpcBackend> {
    let mut backends = Vec::with_capacity(count);
    for index in 1..=count {
        backends.push(GrpcBackend::start(&format!("backend-{index}")).await);
    }
    backends
}

/// A load balancer whose backends speak h2c (`backendProtocol`), as a
/// gRPC-only Service would be configured, with the config's retries.
async fn grpc_lb(backends: &[GrpcBackend]) -> TestLb {
    let addrs = backends.iter().map(|b| b.addr).collect();
    TestLb::start_configured(addrs, |config| {
        config.discovery.backend_protocol = Some(BackendProtocol::H2c);
    })
    .await
}

/// A tonic client on ONE HTTP/2 connection to `url`.
async fn client(url: &str) -> IdentityClient<Channel> {
    let channel = Endpoint::from_shared(url.to_owned())
        .expect("a valid URL")
        .connect()
        .await
        .expect("the client connects");
    IdentityClient::new(channel)
}

#[tokio::test]
async fn thirty_calls_on_one_connection_are_spread_ten_ten_ten() {
    let backends = grpc_backends(3).await;
    let lb = grpc_lb(&backends).await;
    let mut client = client(&lb.url("")).await;

    let mut pods = Vec::new();
    for _ in 0..30 {
        let reply = client.get(GetRequest {}).await.expect("the call succeeds");
        pods.push(reply.into_inner().pod_name);
    }
    let spread = tally(pods);
    assert_eq!(
        spread,
        BTreeMap::from([
            ("backend-1".to_owned(), 10),
            ("backend-2".to_owned(), 10),
            ("backend-3".to_owned(), 10),
        ])
    );
    // Counted by protocol and gRPC status, with the request id the proxy set.
    let calls = metric(
        lb.admin_addr,
        r#"loadbalancer_requests_by_protocol_total{protocol="h2",grpc_status="0"}"#,
    )
    .await;
    assert_eq!(calls, 30.0);
}

#[tokio::test]
async fn streams_pass_through_both_ways() {
    let backends = grpc_backends(1).await;
    let lb = grpc_lb(&backends).await;
    let mut client = client(&lb.url("")).await;

    // Server streaming: every reply arrives, from the one backend.
    let replies: Vec<_> = client
        .watch(WatchRequest {
            count: 5,
            interval_ms: 10,
        })
        .await
        .expect("the call starts")
        .into_inner()
        .collect()
        .await;
    assert_eq!(replies.len(), 5);
    for reply in replies {
        let reply = reply.expect("each reply arrives");
        assert_eq!(reply.pod_name, "backend-1");
        assert!(!reply.request_id.is_empty(), "the proxy sets x-request-id");
    }

    // Client streaming: twenty 1 KiB messages, counted by the backend.
    let messages = futures::stream::iter((0..20).map(|_| CollectRequest {
        payload: vec![7; 1024],
    }));
    let collected = client
        .collect(messages)
        .await
        .expect("the call succeeds")
        .into_inner();
    assert_eq!((collected.messages, collected.bytes), (20, 20 * 1024));

    // Both ways at once: each message is echoed while the next is unsent.
    let (send, requests) = tokio::sync::mpsc::channel(1);
    let mut echoes = client
        .echo(tokio_stream_of(requests))
        .await
        .expect("the call starts")
        .into_inner();
    for index in 0..3u8 {
        send.send(EchoRequest {
            payload: vec![index; 16],
        })
        .await
        .expect("the request stream is open");
        let echo = tokio::time::timeout(PATIENCE, echoes.next())
            .await
            .expect("the echo arrives before the next message is sent")
            .expect("the stream is open")
            .expect("the echo is a message");
        assert_eq!(echo.payload, vec![index; 16]);
    }
    drop(send);
    assert!(echoes.next().await.is_none(), "the call ends cleanly");
}

/// The receiving end of a channel as a stream of requests.
fn tokio_stream_of<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

#[tokio::test]
async fn a_backend_error_reaches_the_client_with_its_status_and_message() {
    let backends = grpc_backends(1).await;
    let lb = grpc_lb(&backends).await;
    let mut client = client(&lb.url("")).await;
    // `count` 0 is refused by the backend itself, in its trailers.
    let status = client
        .watch(WatchRequest {
            count: 0,
            interval_ms: 0,
        })
        .await
        .expect_err("the backend refuses the call");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("count"), "{status:?}");
}

#[tokio::test]
async fn no_backend_is_a_grpc_unavailable() {
    let lb = TestLb::start_configured(Vec::new(), |config| {
        config.discovery.backend_protocol = Some(BackendProtocol::H2c);
    })
    .await;
    let mut client = client(&lb.url("")).await;
    let status: Status = client
        .get(GetRequest {})
        .await
        .expect_err("nothing to call");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "no backend is ready");
}

#[tokio::test]
async fn grpc_timeout_is_the_deadline_and_its_end_a_deadline_exceeded() {
    // A backend that accepts and never says a word: the HTTP/2 handshake
    // itself never completes.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("bound");
    let lb = TestLb::start_configured(vec![silent_addr], |config| {
        config.discovery.backend_protocol = Some(BackendProtocol::H2c);
    })
    .await;
    // A raw HTTP/2 client, so the answer is the proxy's, not a client-side
    // timeout.
    let request = Request::post(lb.url("/identity.v1.Identity/Get"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .expect("a valid request");
    let response = h2c_request(lb.addr, request).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "gRPC errors are HTTP 200"
    );
    let headers = response.headers();
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(
        headers["grpc-status"], "4",
        "DEADLINE_EXCEEDED: {headers:?}"
    );
    let message = headers["grpc-message"].to_str().expect("ASCII");
    assert!(message.contains("did not answer within"), "{message}");
    drop(silent);
}

/// Sends one request over a fresh h2c connection to `addr` and returns the
/// response head (the body is left unread).
async fn h2c_request(
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
) -> http::Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("an answer within PATIENCE")
        .expect("a response")
}

#[tokio::test]
async fn a_backend_draining_mid_load_costs_no_call() {
    let mut backends = grpc_backends(3).await;
    let lb = grpc_lb(&backends).await;
    let client = client(&lb.url("")).await;
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (mut client, done, failures) =
                (client.clone(), Arc::clone(&done), Arc::clone(&failures));
            tokio::spawn(async move {
                for _ in 0..60 {
                    match client.get(GetRequest {}).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            eprintln!("call failed: {status:?}");
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    crate::support::wait_for(
        "calls under way",
        || done.load(Ordering::Relaxed),
        |n| *n >= 40,
    )
    .await;
    backends[0].drain();
    for caller in callers {
        caller.await.expect("the caller finishes");
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert_eq!(done.load(Ordering::Relaxed), 240);
}

/// An HTTP/2 server that refuses every stream with `REFUSED_STREAM`, as a
/// backend at its stream limit or shutting down does.
async fn refusing_backend() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound");
    let refused = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&refused);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    counter.fetch_add(1, Ordering::Relaxed);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, refused, task)
}

#[tokio::test]
async fn a_refused_stream_is_retried_on_another_backend() {
    let good = GrpcBackend::start("backend-1").await;
    let (refusing, refused, _task) = refusing_backend().await;
    let lb = TestLb::start_configured(vec![good.addr, refusing], |config| {
        config.discovery.backend_protocol = Some(BackendProtocol::H2c);
    })
    .await;
    let mut client = client(&lb.url("")).await;
    for _ in 0..10 {
        // A POST, never idempotent: retried only because it was refused
        // unprocessed.
        let reply = client
            .get(GetRequest {})
            .await
            .expect("every call succeeds");
        assert_eq!(reply.into_inner().pod_name, "backend-1");
    }
    assert!(
        refused.load(Ordering::Relaxed) >= 1,
        "the refusing backend was tried"
    );
    assert!(metric(lb.admin_addr, "loadbalancer_retries_total").await >= 1.0);
}

#[tokio::test]
async fn the_grpc_port_sends_calls_to_the_pods_grpc_port() {
    // Two pods, as two loopback addresses, with their gRPC servers on one
    // port; the list names their HTTP port (here, one nobody listens on).
    let (grpc_port, listeners) = bind_same_port(&[2, 3]).await;
    let backends: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(index, listener)| GrpcBackend::start_on(listener, &format!("backend-{}", index + 1)))
        .collect();
    let pods = backends
        .iter()
        .map(|b| SocketAddr::new(b.addr.ip(), 1))
        .collect();
    let lb = TestLb::start_configured(pods, |config| {
        config.listen.grpc_port = Some(0);
        config.discovery.backend_grpc_port = Some(grpc_port);
    })
    .await;
    let mut client = client(&lb.grpc_url()).await;
    let mut pods = Vec::new();
    for _ in 0..4 {
        let reply = client.get(GetRequest {}).await.expect("the call succeeds");
        pods.push(reply.into_inner().pod_name);
    }
    assert_eq!(
        tally(pods),
        BTreeMap::from([("backend-1".to_owned(), 2), ("backend-2".to_owned(), 2)])
    );
}

#[tokio::test]
async fn an_http1_client_reaches_an_h2c_backend() {
    let backends = grpc_backends(1).await;
    let lb = grpc_lb(&backends).await;
    // A plain HTTP/1.1 POST of a gRPC frame: the answer comes from the h2c
    // backend (the unary call), through the proxy's HTTP/2 client.
    let request = Request::post(lb.url("/identity.v1.Identity/Get"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .expect("a valid request");
    let response = crate::support::client()
        .request(request)
        .await
        .expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response
        .into_body()
        .collect()
        .await
        .expect("the body arrives");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = collected.to_bytes();
    assert!(body.len() > 5, "one reply message: {body:?}");
    assert!(
        body.windows(9).any(|w| w == b"backend-1"),
        "the identity reply: {body:?}"
    );
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
}

#[tokio::test]
async fn the_grpc_health_check_passes_for_a_serving_server_only() {
    let backend = GrpcBackend::start("backend-1").await;
    let settings = |service: &str| HealthCheckSettings {
        path: "/healthz".parse().expect("valid path"),
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        unhealthy_threshold: 1,
        healthy_threshold: 1,
        grpc_service: Some(service.to_owned()),
        backend_protocol: None,
    };
    let backends = Backends::new(vec![backend.addr]);
    let state = backends.state(backend.addr);

    // The server as a whole, and the identity service, are SERVING.
    for service in ["", "identity.v1.Identity"] {
        HealthChecker::new(backends.clone(), settings(service))
            .round()
            .await;
        assert!(state.is_healthy(), "{service:?} is serving");
    }
    // A service the server does not have is NOT_FOUND: the check fails.
    HealthChecker::new(backends.clone(), settings("no.such.Service"))
        .round()
        .await;
    assert!(!state.is_healthy());
    // And passes again for one it serves.
    HealthChecker::new(backends.clone(), settings(""))
        .round()
        .await;
    assert!(state.is_healthy());
}
