//! The real demo backend (the `backend` crate), served in-process on 127.0.0.1:0.
//!
//! Tests that need the backend's own behaviour (`/work?status=500` for failures on
//! purpose, its `/metrics`) use this rather than the scripted [`super::Upstream`].

use std::net::SocketAddr;

use backend::handlers::App;
use backend::identity::Identity;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running backend; shut down when dropped.
#[derive(Debug)]
pub(crate) struct BackendServer {
    pub(crate) addr: SocketAddr,
    /// Sending on (or dropping) this starts the backend's graceful shutdown.
    _stop: oneshot::Sender<()>,
    /// The serving task, aborted on drop in case shutdown is slow.
    task: JoinHandle<std::io::Result<()>>,
}

impl BackendServer {
    /// Starts a backend that calls itself `pod_name`.
    pub(crate) async fn start(pod_name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound socket has an address");
        let identity = Identity {
            pod_name: pod_name.to_owned(),
            pod_ip: addr.ip().to_string(),
            service_name: "backend-service".to_owned(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(backend::server::serve(
            listener,
            App::new(identity),
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            _stop: stop,
            task,
        }
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
