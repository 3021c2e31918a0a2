//! The gRPC side of the backend: the same pod identity as `GET /`, served over
//! h2c (cleartext HTTP/2) on a port of its own (`grpcPort`), so a load balancer's
//! per-request balancing of gRPC calls can be watched and tested.
//!
//! One listener serves three services:
//!
//! | service | methods |
//! |---|---|
//! | `identity.v1.Identity` ([`proto`], from `proto/identity.proto`) | `Get` (unary), `Watch` (server streaming), `Collect` (client streaming), `Echo` (bidirectional) |
//! | `grpc.health.v1.Health` | `Check` and `Watch`: `SERVING`, `NOT_SERVING` once shutdown begins |
//! | `grpc.reflection.v1.ServerReflection` | the descriptors of both services above, for tools like `grpcurl` |
//!
//! Shutdown mirrors the HTTP server's ([`crate::server`]) on the same [`App`]:
//! when the `shutdown` future completes, health turns `NOT_SERVING` for every
//! service (and `/readyz` 503) at once, so a health-checking load balancer takes
//! the pod out of rotation; calls keep being served for the app's shutdown delay;
//! then the listener closes and every connection gets an HTTP/2 GOAWAY, calls in
//! flight finish, and [`serve`] returns once the last connection has closed, or
//! after the shutdown timeout, leaving what is left to the end of the process.
//!
//! The listener is tonic's, not [`service_kit::listener`]'s, which speaks
//! HTTP/1.1: the connection cap, header and idle timeouts of `ServerLimits` do not
//! apply here, only its shutdown timeout. Every call is counted in the app's
//! metrics by method and status ([`Metrics::record_grpc`]) and logged, one line
//! when it ends, like an HTTP request.
//!
//! [`Metrics::record_grpc`]: crate::metrics::Metrics::record_grpc

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, BoxStream, Stream, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tonic::metadata::KeyAndValueRef;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::handlers::{App, MAX_SLEEP_MS};
use crate::server::{DEFAULT_LIMITS, REQUEST_ID};

use proto::identity_server::{self, IdentityServer};
use proto::{
    CollectReply, CollectRequest, EchoReply, EchoRequest, GetRequest, IdentityReply, WatchRequest,
};

/// The messages, client and server generated from `proto/identity.proto` (package
/// `identity.v1`) by the build script. Clients use
/// [`identity_client::IdentityClient`](proto::identity_client::IdentityClient).
pub mod proto {
    // Generated code: its items are documented from the .proto comments where
    // those exist, and it is not ours to restyle.
    #![allow(missing_docs, clippy::all, clippy::pedantic)]

    tonic::include_proto!("identity.v1");

    /// The encoded `FileDescriptorSet` of `identity.proto`, which reflection serves.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/identity_descriptor.bin"));
}

/// The most replies one `Watch` call may ask for.
pub const MAX_WATCH_COUNT: u32 = 10_000;

/// Pause after a failed `accept` (EMFILE: out of file descriptors) before the
/// next one. tonic's loop retries at once, which would spin a core until a
/// descriptor frees up.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serves the gRPC services for `app` on `listener` until `shutdown` completes,
/// then drains (see the module docs) within the default shutdown timeout.
///
/// Like [`crate::server::serve`], the caller binds the listener, so tests bind
/// `127.0.0.1:0` and read the port back. Completing `shutdown` is also how a
/// test makes the server drain while it goes on calling: with no shutdown delay
/// on `app`, GOAWAY goes out at once. An HTTP server given the same `app` is the
/// same pod: one metrics registry, one readiness.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use backend::grpc::{self, proto::GetRequest, proto::identity_client::IdentityClient};
/// use backend::{handlers::App, identity::Identity};
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr()?;
/// let identity = Identity {
///     pod_name: "backend-0".into(),
///     pod_ip: addr.ip().to_string(),
///     service_name: "backend".into(),
/// };
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let server = tokio::spawn(grpc::serve(listener, App::new(identity), async {
///     let _ = stopped.await;
/// }));
/// let mut client = IdentityClient::connect(format!("http://{addr}")).await?;
/// let reply = client.get(GetRequest {}).await?.into_inner();
/// assert_eq!(reply.pod_name, "backend-0");
/// let _ = stop.send(());
/// server.await??;
/// # Ok(())
/// # }
/// ```
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, app, shutdown, DEFAULT_LIMITS.shutdown_timeout).await
}

/// [`serve`], giving calls in flight `shutdown_timeout` to finish once GOAWAY
/// has gone out (`shutdownTimeoutSeconds`).
///
/// The error is for a listener without a local address, or reflection's own
/// descriptors failing to load; failed `accept`s are retried, never returned.
pub async fn serve_with(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
    shutdown_timeout: Duration,
) -> io::Result<()> {
    info!(addr = %listener.local_addr()?, pod = %app.identity().pod_name, "gRPC listening");
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(io::Error::other)?;

    let (goaway, gone_away) = oneshot::channel();
    let draining = {
        let app = app.clone();
        async move {
            shutdown.await;
            app.begin_shutdown();
            set_health(&health, ServingStatus::NotServing).await;
            info!(delay = ?app.shutdown_delay(), "gRPC shutdown begun, health is now NOT_SERVING");
            tokio::time::sleep(app.shutdown_delay()).await;
            info!("gRPC listener closing, GOAWAY to every connection");
            let _ = goaway.send(());
        }
    };
    let serving = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(IdentityServer::new(IdentityService { app }))
        .serve_with_incoming_shutdown(incoming(listener), draining);
    // tonic waits for every connection without a limit; a stream that never ends
    // (an `Echo` the client keeps open) must not hold the pod past its grace period.
    let deadline = async {
        match gone_away.await {
            Ok(()) => tokio::time::sleep(shutdown_timeout).await,
            // The sender lives in `serving`, so it only drops once `serving` is done.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = serving => {
            served.map_err(io::Error::other)?;
            info!("gRPC connections all closed");
        }
        () = deadline => warn!(
            timeout = ?shutdown_timeout,
            "gRPC calls still in flight after the shutdown timeout; left to the end of the process"
        ),
    }
    Ok(())
}

/// Sets the overall status (`""`) and `identity.v1.Identity`'s: a checker may ask
/// for either.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <IdentityServer<IdentityService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Connections as `listener` accepts them, with Nagle's algorithm off: gRPC
/// messages are small and one waiting for a delayed ACK would cost 40 ms.
fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<TcpStream>> {
    // Only latency is at stake; the connections work either way.
    if let Err(error) = service_kit::listener::skip_nagle_on_accepted(&listener) {
        warn!(%error, "cannot set TCP_NODELAY on the gRPC listener");
    }
    stream::unfold(listener, |listener| async move {
        let accepted = match listener.accept().await {
            Ok((stream, _peer)) => Ok(stream),
            Err(error) => {
                warn!(%error, retry_in_ms = ACCEPT_PAUSE.as_millis(), "gRPC accept failed");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                Err(error)
            }
        };
        Some((accepted, listener))
    })
}

/// `identity.v1.Identity`, answering as the app's pod.
#[derive(Debug)]
struct IdentityService {
    app: App,
}

#[tonic::async_trait]
impl identity_server::Identity for IdentityService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<IdentityReply>, Status> {
        let call = Call::start(&self.app, "Get", &request);
        call.end(Ok(Response::new(self.reply(&request))))
    }

    type WatchStream = BoxStream<'static, Result<IdentityReply, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let call = Call::start(&self.app, "Watch", &request);
        let WatchRequest { count, interval_ms } = *request.get_ref();
        if !(1..=MAX_WATCH_COUNT).contains(&count) {
            return call.end(Err(Status::invalid_argument(format!(
                "count must be between 1 and {MAX_WATCH_COUNT}, not {count}"
            ))));
        }
        if u64::from(interval_ms) > MAX_SLEEP_MS {
            return call.end(Err(Status::invalid_argument(format!(
                "interval_ms must be between 0 and {MAX_SLEEP_MS}, not {interval_ms}"
            ))));
        }
        let interval = Duration::from_millis(interval_ms.into());
        let first = self.reply(&request);
        // Each reply is the first one with a new timestamp: the metadata is the
        // call's, read once.
        let replies = stream::unfold((call, 0), move |(mut call, sent)| {
            let mut reply = first.clone();
            async move {
                if sent == count {
                    call.finish(Code::Ok);
                    return None;
                }
                if sent > 0 {
                    tokio::time::sleep(interval).await;
                    reply.timestamp = now();
                }
                Some((Ok(reply), (call, sent + 1)))
            }
        });
        Ok(Response::new(replies.boxed()))
    }

    async fn collect(
        &self,
        request: Request<Streaming<CollectRequest>>,
    ) -> Result<Response<CollectReply>, Status> {
        let call = Call::start(&self.app, "Collect", &request);
        let identity = self.reply(&request);
        let mut inbound = request.into_inner();
        let (mut messages, mut bytes) = (0u32, 0u64);
        loop {
            match inbound.message().await {
                Ok(Some(message)) => {
                    messages = messages.saturating_add(1);
                    bytes = bytes.saturating_add(message.payload.len() as u64);
                }
                Ok(None) => break,
                Err(status) => return call.end(Err(status)),
            }
        }
        call.end(Ok(Response::new(CollectReply {
            messages,
            bytes,
            identity: Some(identity),
        })))
    }

    type EchoStream = BoxStream<'static, Result<EchoReply, Status>>;

    async fn echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::EchoStream>, Status> {
        let call = Call::start(&self.app, "Echo", &request);
        let pod_name = self.app.identity().pod_name.clone();
        let inbound = request.into_inner();
        // `None` once the inbound side has failed: the error is sent, then the end.
        let replies = stream::unfold(Some((inbound, call)), move |state| {
            let pod_name = pod_name.clone();
            async move {
                let (mut inbound, mut call) = state?;
                match inbound.message().await {
                    Ok(Some(message)) => {
                        let reply = EchoReply {
                            payload: message.payload,
                            pod_name,
                        };
                        Some((Ok(reply), Some((inbound, call))))
                    }
                    Ok(None) => {
                        call.finish(Code::Ok);
                        None
                    }
                    Err(status) => {
                        call.finish(status.code());
                        Some((Err(status), None))
                    }
                }
            }
        });
        Ok(Response::new(replies.boxed()))
    }
}

impl IdentityService {
    /// The identity, as `GET /` answers it, with what `request` carried.
    fn reply<T>(&self, request: &Request<T>) -> IdentityReply {
        let identity = self.app.identity();
        let mut metadata = HashMap::<String, String>::new();
        for entry in request.metadata().iter() {
            let KeyAndValueRef::Ascii(key, value) = entry else {
                continue;
            };
            let Ok(value) = value.to_str() else {
                continue;
            };
            // A key sent more than once reads as HTTP folds it, in order.
            metadata
                .entry(key.as_str().to_owned())
                .and_modify(|seen| {
                    seen.push_str(", ");
                    seen.push_str(value);
                })
                .or_insert_with(|| value.to_owned());
        }
        IdentityReply {
            pod_name: identity.pod_name.clone(),
            pod_ip: identity.pod_ip.clone(),
            service_name: identity.service_name.clone(),
            timestamp: now(),
            request_id: request_id(request).unwrap_or_default().to_owned(),
            metadata,
        }
    }
}

/// The time, as the JSON answers write it.
fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn request_id<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get(REQUEST_ID.as_str())
        .and_then(|id| id.to_str().ok())
}

/// One call, counted and logged when it is dropped: with the status set by
/// [`Call::end`] or by its stream, or as `CANCELLED` when it is dropped before
/// that, which is what a client that went away mid-call leaves behind.
struct Call {
    app: App,
    method: &'static str,
    request_id: String,
    start: Instant,
    outcome: Code,
}

impl Call {
    fn start<T>(app: &App, method: &'static str, request: &Request<T>) -> Self {
        Self {
            app: app.clone(),
            method,
            request_id: request_id(request).unwrap_or("-").to_owned(),
            start: Instant::now(),
            outcome: Code::Cancelled,
        }
    }

    /// Ends the call with `result`'s status.
    fn end<T>(mut self, result: Result<T, Status>) -> Result<T, Status> {
        self.finish(result.as_ref().map_or_else(Status::code, |_| Code::Ok));
        result
    }

    /// Sets the status the call is counted with when it is dropped: for a
    /// stream, which ends after its call has returned.
    fn finish(&mut self, code: Code) {
        self.outcome = code;
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let code = code_name(self.outcome);
        self.app.metrics().record_grpc(self.method, code);
        info!(
            method = self.method,
            code,
            // Whole microseconds, shown as milliseconds, as the HTTP access log.
            latency_ms = self.start.elapsed().as_micros() as f64 / 1000.0,
            pod = %self.app.identity().pod_name,
            request_id = %self.request_id,
            "gRPC call"
        );
    }
}

/// A status code's name as the gRPC specification spells it (`OK`,
/// `INVALID_ARGUMENT`): tonic's `Display` gives a sentence instead.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
