//! Backends for the chaos tests beyond what [`super::Upstream`] plays:
//!
//! * [`BlackHole`]: accepts connections and never answers (a hung process, or a
//!   pod whose network is gone), the case only timeouts and ejection can handle;
//! * [`CloseAfterAnswer`]: answers one request per connection as if it kept the
//!   connection alive, then closes it: a keep-alive idle timeout at its shortest,
//!   the race every connection pool must survive;
//! * [`RealBackend`]: the real `backend` crate served in-process on a chosen
//!   address, with its graceful shutdown, for the rolling-update test. Every
//!   endpoint of a Service shares one port, so [`bind_same_port`] binds one port
//!   on several loopback addresses (127.0.0.2, 127.0.0.3, ...: all of 127/8 is
//!   loopback on Linux).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use backend::handlers::App;
use backend::identity::Identity;
use backend::server::ServerLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::PATIENCE;

/// A server that accepts connections, reads nothing and answers nothing.
#[derive(Debug)]
pub(crate) struct BlackHole {
    pub(crate) addr: SocketAddr,
    /// Owns the listener and every accepted socket; aborting it closes them all.
    task: JoinHandle<()>,
}

impl BlackHole {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound socket has an address");
        let task = tokio::spawn(async move {
            // Held, never read: the peer's request sits in our receive buffer.
            let mut held: Vec<TcpStream> = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Self { addr, task }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server that answers each connection's first request with a keep-alive
/// `200` and then closes the connection, without `Connection: close`.
#[derive(Debug)]
pub(crate) struct CloseAfterAnswer {
    pub(crate) addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl CloseAfterAnswer {
    /// The answer's body.
    pub(crate) const BODY: &'static str = r#"{"podName":"closer"}"#;

    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound socket has an address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    // The proxy's requests here are bodiless GETs: the head is all.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                        Self::BODY.len(),
                        Self::BODY
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    // Dropping the stream closes it: the "idle timeout".
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CloseAfterAnswer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port whose connections never complete: a listener that never accepts, with
/// its accept queue filled by connections of its own. Linux then drops further
/// SYNs, so a connect hangs until the connector gives up, which is how a backend
/// behind a dead network path looks (on loopback nothing else does that).
#[derive(Debug)]
pub(crate) struct Unconnectable {
    pub(crate) addr: SocketAddr,
    /// Kept open: the listener, and the connections that fill its queue.
    _listener: std::net::TcpListener,
    _fillers: Vec<std::net::TcpStream>,
}

impl Unconnectable {
    pub(crate) fn start() -> Self {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("create a socket");
        socket
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .expect("bind a loopback port");
        socket.listen(0).expect("listen");
        let listener = std::net::TcpListener::from(socket);
        let addr = listener.local_addr().expect("bound socket has an address");
        // However the kernel rounds the backlog, connect until one hangs.
        let mut fillers = Vec::new();
        while let Ok(filler) =
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200))
        {
            fillers.push(filler);
            assert!(fillers.len() < 64, "the accept queue never fills");
        }
        Self {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

/// Binds one port on `127.0.0.<host>` for each of `hosts`; returns the port and
/// the listeners in the same order. Retries with another port if one of the
/// addresses already has it taken.
pub(crate) async fn bind_same_port(hosts: &[u8]) -> (u16, Vec<TcpListener>) {
    for _ in 0..20 {
        let first = TcpListener::bind((Ipv4Addr::new(127, 0, 0, hosts[0]), 0))
            .await
            .expect("bind a loopback port");
        let port = first
            .local_addr()
            .expect("bound socket has an address")
            .port();
        let mut listeners = vec![first];
        for &host in &hosts[1..] {
            match TcpListener::bind((Ipv4Addr::new(127, 0, 0, host), port)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => break,
            }
        }
        if listeners.len() == hosts.len() {
            return (port, listeners);
        }
    }
    panic!("no port was free on all of 127.0.0.{hosts:?}");
}

/// The real backend, serving on a listener the test bound. Dropping it stops it
/// abruptly (a crashed pod); [`RealBackend::stop`] stops it gracefully.
#[derive(Debug)]
pub(crate) struct RealBackend {
    pub(crate) addr: SocketAddr,
    /// The running app, to turn readiness off as the kubelet would see it.
    pub(crate) app: App,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
}

impl RealBackend {
    /// Serves `backend::handlers::App` as `pod_name` on `listener`.
    pub(crate) fn start(listener: TcpListener, pod_name: &str) -> Self {
        Self::start_with_limits(listener, pod_name, ServerLimits::DEFAULT)
    }

    /// Like [`RealBackend::start`], with the backend's connection `limits`.
    pub(crate) fn start_with_limits(
        listener: TcpListener,
        pod_name: &str,
        limits: ServerLimits,
    ) -> Self {
        let addr = listener.local_addr().expect("bound socket has an address");
        let app = App::new(Identity {
            pod_name: pod_name.to_owned(),
            pod_ip: addr.ip().to_string(),
            service_name: "web".to_owned(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let server = tokio::spawn(backend::server::serve_with(
            listener,
            app.clone(),
            shutdown,
            limits,
        ));
        Self {
            addr,
            app,
            stop: Some(stop),
            server,
        }
    }

    /// Shuts down as on SIGTERM: readiness off, listener closed, in-flight
    /// requests finished; returns once the server has.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.server)
            .await
            .expect("backend stops within PATIENCE")
            .expect("backend task does not panic")
            .expect("backend serves without error");
    }
}

impl Drop for RealBackend {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Starts the real backend on a free loopback port, answering as `pod_name`, with
/// the same connection limits as a load balancer listener.
pub(crate) async fn start_real_backend(pod_name: &str, limits: ServerLimits) -> RealBackend {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    RealBackend::start_with_limits(listener, pod_name, limits)
}
