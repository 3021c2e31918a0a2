//! The gRPC services against a server in-process on `127.0.0.1:0`, through the
//! tonic client the backend exports: every method of `identity.v1.Identity`,
//! health while serving and once shutdown begins, reflection, the drain, and the
//! calls counted in the metrics.

use std::time::Duration;

use backend::grpc::proto::identity_client::IdentityClient;
use backend::grpc::proto::{
    CollectRequest, EchoReply, EchoRequest, GetRequest, IdentityReply, WatchRequest,
};
use backend::handlers::App;
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::support::{PATIENCE, TestServer, eventually, test_identity};

/// One connection to `server`, opened now.
async fn channel(server: &TestServer) -> Channel {
    let endpoint = Channel::from_shared(server.url()).expect("a test server's URL is valid");
    tokio::time::timeout(PATIENCE, endpoint.connect())
        .await
        .expect("connecting does not hang")
        .expect("the gRPC server accepts connections")
}

async fn client(server: &TestServer) -> IdentityClient<Channel> {
    IdentityClient::new(channel(server).await)
}

/// The overall health status (`""`) and `identity.v1.Identity`'s, as `Check`
/// answers them.
async fn health(channel: &Channel) -> [ServingStatus; 2] {
    let mut health = HealthClient::new(channel.clone());
    let mut statuses = [ServingStatus::Unknown; 2];
    for (status, service) in statuses.iter_mut().zip(["", "identity.v1.Identity"]) {
        let reply = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("Check answers")
            .into_inner();
        *status = reply.status();
    }
    statuses
}

fn assert_is_test_pod(reply: &IdentityReply) {
    let identity = test_identity();
    assert_eq!(reply.pod_name, identity.pod_name);
    assert_eq!(reply.pod_ip, identity.pod_ip);
    assert_eq!(reply.service_name, identity.service_name);
    assert!(
        humantime::parse_rfc3339(&reply.timestamp).is_ok(),
        "timestamp {:?} is RFC 3339",
        reply.timestamp
    );
}

/// Starts a `Watch` for `count` replies `interval_ms` apart.
async fn watch(
    client: &mut IdentityClient<Channel>,
    count: u32,
    interval_ms: u32,
) -> Streaming<IdentityReply> {
    client
        .watch(WatchRequest { count, interval_ms })
        .await
        .expect("Watch starts")
        .into_inner()
}

/// Reads `replies` to their end, which must be OK, checking that each names the
/// test pod; returns how many there were.
async fn read_to_end(replies: &mut Streaming<IdentityReply>) -> usize {
    let mut received = 0;
    while let Some(reply) = replies.message().await.expect("the stream ends with OK") {
        assert_is_test_pod(&reply);
        received += 1;
    }
    received
}

/// An `Echo` call whose requests the test sends one at a time.
struct EchoCall {
    outbound: futures::channel::mpsc::Sender<EchoRequest>,
    replies: Streaming<EchoReply>,
}

impl EchoCall {
    async fn start(client: &mut IdentityClient<Channel>) -> Self {
        let (outbound, requests) = futures::channel::mpsc::channel(1);
        let replies = client
            .echo(requests)
            .await
            .expect("Echo starts")
            .into_inner();
        Self { outbound, replies }
    }

    /// Sends `payload` and waits for its echo, with the call left open.
    async fn round_trip(&mut self, payload: &[u8]) -> EchoReply {
        let request = EchoRequest {
            payload: payload.to_vec(),
        };
        self.outbound
            .send(request)
            .await
            .expect("the request stream is open");
        tokio::time::timeout(PATIENCE, self.replies.message())
            .await
            .expect("the echo arrives while the call stays open")
            .expect("Echo answers")
            .expect("the stream is not over")
    }
}

#[tokio::test]
async fn get_answers_the_identity_and_what_the_call_carried() {
    let server = TestServer::start_grpc(App::new(test_identity())).await;
    let mut client = client(&server).await;
    let mut request = Request::new(GetRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "req-42".parse().expect("valid metadata"));
    request
        .metadata_mut()
        .insert("x-demo", "hello".parse().expect("valid metadata"));
    request.metadata_mut().insert_bin(
        "x-blob-bin",
        tonic::metadata::MetadataValue::from_bytes(b"\x00\x01"),
    );
    let reply = client.get(request).await.expect("Get answers").into_inner();
    assert_is_test_pod(&reply);
    assert_eq!(reply.request_id, "req-42");
    assert_eq!(
        reply.metadata.get("x-demo").map(String::as_str),
        Some("hello")
    );
    assert_eq!(
        reply.metadata.get("te").map(String::as_str),
        Some("trailers")
    );
    assert!(
        !reply.metadata.contains_key("x-blob-bin"),
        "{:?}",
        reply.metadata
    );

    let reply = client
        .get(GetRequest {})
        .await
        .expect("Get answers")
        .into_inner();
    assert_eq!(reply.request_id, "", "no x-request-id was sent");
}

#[tokio::test]
async fn watch_streams_count_replies_then_ends_ok() {
    let server = TestServer::start_grpc(App::new(test_identity())).await;
    let mut client = client(&server).await;
    let mut replies = watch(&mut client, 3, 10).await;
    assert_eq!(read_to_end(&mut replies).await, 3);
}

#[tokio::test]
async fn watch_out_of_range_is_invalid_argument_naming_the_field() {
    let server = TestServer::start_grpc(App::new(test_identity())).await;
    let mut client = client(&server).await;
    for (request, field) in [
        (
            WatchRequest {
                count: 0,
                interval_ms: 0,
            },
            "count",
        ),
        (
            WatchRequest {
                count: 10_001,
                interval_ms: 0,
            },
            "count",
        ),
        (
            WatchRequest {
                count: 1,
                interval_ms: 60_001,
            },
            "interval_ms",
        ),
    ] {
        let status = client
            .watch(request)
            .await
            .expect_err("out of range is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }
}

#[tokio::test]
async fn collect_counts_the_messages_and_bytes_it_read() {
    let server = TestServer::start_grpc(App::new(test_identity())).await;
    let mut client = client(&server).await;
    let sizes = [0, 1, 10, 100, 100_000];
    let messages = futures::stream::iter(sizes.map(|len| CollectRequest {
        payload: vec![b'x'; len],
    }));
    let reply = client
        .collect(messages)
        .await
        .expect("Collect answers")
        .into_inner();
    assert_eq!(reply.messages, 5);
    assert_eq!(reply.bytes, 100_111);
    assert_is_test_pod(&reply.identity.expect("the reply names the pod"));

    let reply = client
        .collect(futures::stream::empty())
        .await
        .expect("Collect answers an empty stream")
        .into_inner();
    assert_eq!((reply.messages, reply.bytes), (0, 0));
}

#[tokio::test]
async fn echo_answers_each_message_before_the_next_is_sent() {
    let server = TestServer::start_grpc(App::new(test_identity())).await;
    let mut client = client(&server).await;
    let mut echo = EchoCall::start(&mut client).await;
    for text in ["one", "two", "three"] {
        let reply = echo.round_trip(text.as_bytes()).await;
        assert_eq!(reply.payload, text.as_bytes());
        assert_eq!(reply.pod_name, test_identity().pod_name);
    }
    drop(echo.outbound);
    assert!(
        echo.replies
            .message()
            .await
            .expect("the stream ends with OK")
            .is_none(),
        "no reply without a request"
    );
}

#[tokio::test]
async fn health_says_serving_then_not_serving_once_shutdown_begins() {
    // A delay far longer than the test: health must change at the signal, not at
    // the GOAWAY. The server task is dropped with the runtime at the end.
    let app = App::new(test_identity()).with_shutdown_delay(Duration::from_secs(600));
    let mut server = TestServer::start_grpc(app).await;
    let channel = channel(&server).await;
    assert_eq!(health(&channel).await, [ServingStatus::Serving; 2]);
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await
        .expect_err("an unknown service has no status");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    server.begin_shutdown();
    let app = server.app.clone();
    eventually("readiness turns false", || !app.is_ready()).await;
    assert_eq!(health(&channel).await, [ServingStatus::NotServing; 2]);
    // During the delay the pod still answers: only health changed.
    let reply = IdentityClient::new(channel)
        .get(GetRequest {})
        .await
        .expect("Get still answers during the delay")
        .into_inner();
    assert_is_test_pod(&reply);
}

#[tokio::test]
async fn a_call_in_flight_finishes_after_goaway_and_serve_then_returns() {
    let mut server = TestServer::start_grpc(App::new(test_identity())).await;
    let mut client = client(&server).await;
    let mut replies = watch(&mut client, 3, 300).await;
    // The first reply proves the call is being answered, not waiting somewhere.
    assert!(replies.message().await.expect("Watch answers").is_some());

    server.begin_shutdown();
    assert_eq!(
        read_to_end(&mut replies).await,
        2,
        "the call in flight got every reply"
    );

    let addr = server.addr;
    server.stopped().await.expect("serve returns Ok");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed after serve returns"
    );
    let status = client
        .get(GetRequest {})
        .await
        .expect_err("after GOAWAY and the close there is nobody to answer");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_stream_the_client_keeps_open_does_not_hold_serve_past_the_shutdown_timeout() {
    let timeout = Duration::from_millis(300);
    let mut server = TestServer::start_grpc_with(App::new(test_identity()), timeout).await;
    let mut client = client(&server).await;
    // The call is kept, never closed: it stays open as long as the client wants.
    let mut echo = EchoCall::start(&mut client).await;
    echo.round_trip(b"still here").await;

    server.begin_shutdown();
    let started = std::time::Instant::now();
    server.stopped().await.expect("serve returns Ok");
    assert!(
        started.elapsed() >= timeout,
        "serve returned after {:?}, before the open call's time was up",
        started.elapsed()
    );
    drop(echo);
}

#[tokio::test]
async fn reflection_lists_the_identity_and_health_services() {
    let server = TestServer::start_grpc(App::new(test_identity())).await;
    let mut reflection = ServerReflectionClient::new(channel(&server).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection answers")
        .into_inner();
    let reply = replies
        .next()
        .await
        .expect("one reply per request")
        .expect("the reply is not an error");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("not a service list: {reply:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for name in ["identity.v1.Identity", "grpc.health.v1.Health"] {
        assert!(names.contains(&name), "{name} missing in {names:?}");
    }
}

#[tokio::test]
async fn calls_are_counted_by_method_and_status() {
    let server = TestServer::start_grpc(App::new(test_identity())).await;
    let mut client = client(&server).await;
    for _ in 0..2 {
        client.get(GetRequest {}).await.expect("Get answers");
    }
    let refused = client
        .watch(WatchRequest {
            count: 0,
            interval_ms: 0,
        })
        .await;
    assert!(refused.is_err());
    // A call is counted when it is dropped on the server, just after its answer.
    let app = server.app.clone();
    let counted = |line: &str| app.metrics().encode().lines().any(|l| l == line);
    for line in [
        r#"backend_grpc_requests_total{method="Get",code="OK"} 2"#,
        r#"backend_grpc_requests_total{method="Watch",code="INVALID_ARGUMENT"} 1"#,
    ] {
        eventually(line, || counted(line)).await;
    }
}
