//! Backends for the chaos tests beyond what [`super::Upstream`] plays:
//!
//! * [`BlackHole`]: accepts connections and never answers (a hung process, or a
//!   pod whose network is gone), the case only timeouts and ejection can handle;
//! * [`RealBackend`]: the real `backend` crate served in-process on a chosen
//!   address, with its graceful shutdown, for the rolling-update test. Every
//!   endpoint of a Service shares one port, so [`bind_same_port`] binds one port
//!   on several loopback addresses (127.0.0.2, 127.0.0.3, ...: all of 127/8 is
//!   loopback on Linux).

use std::net::{Ipv4Addr, SocketAddr};

use backend::handlers::App;
use backend::identity::Identity;
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

/// The real backend, serving on a listener the test bound.
#[derive(Debug)]
pub(crate) struct RealBackend {
    pub(crate) addr: SocketAddr,
    /// The running app, to turn readiness off as the kubelet would see it.
    pub(crate) app: App,
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
}

impl RealBackend {
    /// Serves `backend::handlers::App` as `pod_name` on `listener`.
    pub(crate) fn start(listener: TcpListener, pod_name: &str) -> Self {
        let addr = listener.local_addr().expect("bound socket has an address");
        let app = App::new(Identity {
            pod_name: pod_name.to_owned(),
            pod_ip: addr.ip().to_string(),
            service_name: "web".to_owned(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(backend::server::serve(listener, app.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            app,
            stop,
            server,
        }
    }

    /// Shuts down as on SIGTERM: readiness off, listener closed, in-flight
    /// requests finished; returns once the server has.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(PATIENCE, self.server)
            .await
            .expect("backend stops within PATIENCE")
            .expect("backend task does not panic")
            .expect("backend serves without error");
    }
}
