//! Tunnels: what a request becomes once its backend has switched protocols.
//!
//! A WebSocket starts as an HTTP/1.1 request with `Connection: upgrade` and
//! `Upgrade: websocket`; a backend that agrees answers `101 Switching
//! Protocols`, and from then on both connections speak the new protocol, which
//! the proxy neither knows nor needs to. It copies bytes both ways, as they
//! come, until both sides have closed (each side's end of stream is passed on
//! as a half-close, so a WebSocket's closing handshake completes), or one side
//! breaks, or nothing has moved for `tunnelIdleTimeoutMs`.
//!
//! The backend's connection never goes back to the pool. A tunnel keeps its
//! backend's in-flight slot while it is open, so least-request balancing sees
//! it, and is counted in the metrics (open tunnels, bytes each way, lifetime)
//! and on the status page. [`Tunnels`] knows every tunnel of one proxy, so the
//! worker can close them when it stops: after the drain, once the listener
//! has finished its last HTTP request (or given up on it at the shutdown
//! timeout).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::backend_state::OpenTunnel;
use crate::metrics::{Direction, Metrics};
use crate::upstream::Upgraded;

/// Bytes read per copy: the pieces of a WebSocket stream are mostly small.
const COPY_BUFFER: usize = 16 * 1024;

/// Every tunnel of one proxy, so that they can be closed together.
#[derive(Debug)]
pub(crate) struct Tunnels {
    /// Set to `true` to close every tunnel. Each tunnel holds a receiver, so the
    /// sender also learns when the last one has gone.
    closing: watch::Sender<bool>,
}

impl Tunnels {
    pub(crate) fn new() -> Self {
        Self {
            closing: watch::Sender::new(false),
        }
    }

    /// Runs `tunnel` on a task of its own.
    pub(crate) fn spawn(&self, tunnel: Tunnel) {
        let closing = self.closing.subscribe();
        tokio::spawn(tunnel.run(closing));
    }

    /// Closes every tunnel, and returns once all are gone.
    pub(crate) async fn close_all(&self) {
        self.closing.send_replace(true);
        self.closing.closed().await;
    }
}

/// One tunnel's two ends and what it reports to.
#[derive(Debug)]
pub(crate) struct Tunnel {
    /// The client's connection, handed over by hyper once our `101` is sent.
    pub(crate) client: OnUpgrade,
    /// The backend's connection, with what it sent right after its `101`.
    pub(crate) backend: Upgraded,
    pub(crate) backend_addr: SocketAddr,
    pub(crate) request_id: HeaderValue,
    /// Nothing moving either way for this long closes the tunnel.
    pub(crate) idle_timeout: Duration,
    /// The backend's in-flight slot and open-tunnel count, held until the end.
    pub(crate) slot: OpenTunnel,
    pub(crate) metrics: Arc<Metrics>,
}

/// Why a tunnel closed, for the log.
#[derive(Debug, Clone, Copy)]
enum Closed {
    /// Both sides ended their streams.
    Ended,
    /// One side's connection broke.
    Broken,
    /// Nothing moved for the idle timeout.
    Idle,
    /// The proxy is stopping.
    Shutdown,
}

impl Tunnel {
    async fn run(self, mut closing: watch::Receiver<bool>) {
        let Tunnel {
            client,
            backend,
            backend_addr,
            request_id,
            idle_timeout,
            slot,
            metrics,
        } = self;
        let id = request_id.to_str().unwrap_or_default();
        let client = match client.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(error) => {
                debug!(backend = %backend_addr, request_id = id, %error, "client connection was not handed over");
                return;
            }
        };
        let _open = metrics.tunnel_opened();
        let started = Instant::now();
        let traffic = Traffic::new(started);
        let (client_read, mut client_write) = tokio::io::split(client);
        let (backend_read, backend_write) = backend.stream.into_split();
        let read_ahead = backend.read_ahead;
        let copying = async {
            let upstream = pump(client_read, backend_write, &traffic.upstream, &traffic);
            let downstream = async {
                forward_read_ahead(&mut client_write, &read_ahead, &traffic).await?;
                pump(backend_read, client_write, &traffic.downstream, &traffic).await
            };
            tokio::try_join!(upstream, downstream)
        };
        let closed = tokio::select! {
            copied = copying => match copied {
                Ok(_) => Closed::Ended,
                Err(_) => Closed::Broken,
            },
            () = traffic.idle_for(idle_timeout) => Closed::Idle,
            _ = closing.wait_for(|closing| *closing) => Closed::Shutdown,
        };
        let open_for = started.elapsed();
        let (up, down) = (traffic.upstream.load(), traffic.downstream.load());
        metrics.record_tunnel_bytes(Direction::Upstream, up);
        metrics.record_tunnel_bytes(Direction::Downstream, down);
        metrics.record_tunnel_closed(open_for);
        info!(
            target: "loadbalancer::access",
            backend = %backend_addr, request_id = id, bytes_up = up, bytes_down = down,
            duration_ms = open_for.as_secs_f64() * 1000.0, reason = ?closed, "tunnel closed"
        );
        // Both connections close as their halves drop here; the slot goes last.
        drop(slot);
    }
}

/// What moved through a tunnel, and when it last moved.
#[derive(Debug)]
struct Traffic {
    started: Instant,
    upstream: Counter,
    downstream: Counter,
    /// Milliseconds after `started` when bytes last moved either way.
    last_moved_ms: AtomicU64,
}

/// A byte count shared by one direction's copy loop and the final report.
#[derive(Debug, Default)]
struct Counter(AtomicU64);

impl Counter {
    fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn load(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Traffic {
    fn new(started: Instant) -> Self {
        Self {
            started,
            upstream: Counter::default(),
            downstream: Counter::default(),
            last_moved_ms: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_moved_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last =
                self.started + Duration::from_millis(self.last_moved_ms.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Sends the client what the backend sent right after its `101`.
async fn forward_read_ahead(
    client: &mut (impl AsyncWrite + Unpin),
    read_ahead: &Bytes,
    traffic: &Traffic,
) -> std::io::Result<()> {
    if !read_ahead.is_empty() {
        client.write_all(read_ahead).await?;
        traffic.downstream.add(read_ahead.len());
        traffic.moved();
    }
    Ok(())
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s stream too (a
/// half-close: the other direction goes on).
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    counter: &Counter,
    traffic: &Traffic,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let read = from.read(&mut buf).await?;
        if read == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..read]).await?;
        counter.add(read);
        traffic.moved();
    }
}
