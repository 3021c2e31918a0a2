//! Proxy workers: one single-threaded runtime per core, accepting from one
//! listening socket, each with its own upstream connection pool.
//!
//! A request crosses several tasks: the client connection's task, the pooled
//! upstream connection's task, and back. On tokio's work-stealing runtime those
//! tasks may sit on different threads, so every hand-off is a cross-thread
//! wake-up (a futex call and cache lines bouncing between cores). Here each
//! worker is an OS thread running a current-thread runtime, the way nginx runs
//! one process per core: a connection accepted by a worker is served, proxied and
//! answered on that thread, and all its wake-ups are local.
//!
//! The workers share one listening socket: each registers a clone of it with
//! its own runtime, and whichever worker is free accepts the next connection
//! from the one backlog. They share one connection cap too, taken before
//! `accept`; with a socket per worker (`SO_REUSEPORT`) the kernel would queue a
//! connection at a worker of its choosing, which could hold the only free slot
//! while another worker's queue waits. A worker holding more open connections
//! than the others lets them accept first (briefly), so connections spread
//! evenly even when they arrive in one burst and stay for long. Everything else a worker needs is cheap
//! to share or to have per worker: the backend list (`Backends`, shared), the
//! shutdown signal (shared), and a [`Proxy`] (one per worker, so each has its
//! own pool of keep-alive upstream connections).

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::num::NonZeroUsize;
use std::thread;

use service_kit::listener::listening_socket;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::proxy::Proxy;
use crate::server::{self, ConnectionCap, Entry, ServerLimits};
use crate::shutdown::Shutdown;

/// Running proxy workers; see the module docs.
#[derive(Debug)]
pub struct Workers {
    /// The addresses every worker listens on (the real ports when 0 was asked
    /// for), with their entries, in the order given.
    addrs: Vec<SocketAddr>,
    entries: Vec<Entry>,
    /// One receiver per worker, completed when the worker's server has returned
    /// (after shutdown, once its last connection has finished).
    done: Vec<oneshot::Receiver<()>>,
}

impl Workers {
    /// Starts `count` worker threads that accept from every one of `sockets`
    /// (made by [`listen`]), each entered as its [`Entry`] says, each serving the
    /// proxy that `make_proxy` builds for it under `limits` until `shutdown` stops
    /// it. `limits.max_connections` caps the process: the workers share one
    /// [`ConnectionCap`], so any worker may take a connection while the process
    /// is under it, and they take turns fairly, so that a burst of long-lived
    /// connections does not all land on one worker.
    ///
    /// Everything that can fail fails here, before the first worker serves,
    /// and is returned.
    pub async fn start(
        count: NonZeroUsize,
        sockets: Vec<(StdTcpListener, Entry)>,
        mut make_proxy: impl FnMut() -> Proxy,
        limits: ServerLimits,
        shutdown: &Shutdown,
    ) -> io::Result<Self> {
        let mut caps = ConnectionCap::shared(limits.max_connections, count.get()).into_iter();
        let addrs = sockets
            .iter()
            .map(|(socket, _)| socket.local_addr())
            .collect::<io::Result<Vec<_>>>()?;
        let entries = sockets.iter().map(|(_, entry)| entry.clone()).collect();

        let mut started = Vec::with_capacity(count.get());
        let mut done = Vec::with_capacity(count.get());
        for index in 0..count.get() {
            // Each worker accepts from its own clone of every socket.
            let listeners = sockets
                .iter()
                .map(|(socket, entry)| Ok((socket.try_clone()?, entry.clone())))
                .collect::<io::Result<Vec<_>>>()?;
            let cap = caps
                .next()
                .expect("ConnectionCap::shared made one handle per worker");
            let (proxy, shutdown) = (make_proxy(), shutdown.clone());
            let (started_tx, started_rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            thread::Builder::new()
                .name(format!("proxy-worker-{index}"))
                .spawn(move || {
                    // The runtime is built on the worker's own thread and dropped
                    // there: a runtime must not be dropped inside another one.
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = started_tx.send(Err(error));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        // Registers the sockets with this runtime's reactor.
                        let registered = listeners
                            .into_iter()
                            .map(|(socket, entry)| Ok((TcpListener::from_std(socket)?, entry)))
                            .collect::<io::Result<Vec<_>>>();
                        let listeners = match registered {
                            Ok(listeners) => listeners,
                            Err(error) => {
                                let _ = started_tx.send(Err(error));
                                return;
                            }
                        };
                        let _ = started_tx.send(Ok(()));
                        let serving = listeners.into_iter().map(|(listener, entry)| {
                            let (proxy, shutdown, cap) =
                                (proxy.clone(), shutdown.clone(), cap.clone());
                            server::serve_proxy(listener, entry, proxy, shutdown, limits, cap)
                        });
                        futures::future::join_all(serving).await;
                        // The listeners have finished their last request; the
                        // tunnels (WebSockets) they handed over go now.
                        proxy.close_tunnels().await;
                    });
                    // The receiver is gone only if the caller stopped waiting.
                    let _ = done_tx.send(());
                })?;
            started.push(started_rx);
            done.push(done_rx);
        }
        for worker in started {
            worker
                .await
                .map_err(|_| io::Error::other("a proxy worker died while starting"))??;
        }
        Ok(Self {
            addrs,
            entries,
            done,
        })
    }

    /// The addresses the workers listen on, in the order the ports were given.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Each address the workers listen on, with how clients enter there.
    pub fn entries(&self) -> impl Iterator<Item = (SocketAddr, &Entry)> {
        self.addrs.iter().copied().zip(&self.entries)
    }

    /// Resolves once every worker has finished, i.e. after shutdown has stopped
    /// them and their last connections have closed.
    pub async fn finished(self) {
        for worker in self.done {
            // An error means the worker thread ended without reporting, which
            // only a panic does; either way, that worker is finished.
            let _ = worker.await;
        }
    }
}

/// A listening socket on `addr` for [`Workers::start`] (port 0 picks a free
/// port). Binding is separate from starting so that a caller can learn the
/// ports first, and so that a port in use or a missing permission, which an
/// operator can fix, fails before anything starts.
pub fn listen(addr: SocketAddr) -> io::Result<StdTcpListener> {
    listening_socket(addr)
}

/// The number of workers that fits this machine: one per core the process may
/// use (`available_parallelism` honours CPU affinity and cgroup quotas, so a pod
/// limited to 2 CPUs gets 2 workers on a 64-core node).
pub fn default_count() -> NonZeroUsize {
    thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}
