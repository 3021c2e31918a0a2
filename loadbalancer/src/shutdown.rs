//! Graceful shutdown: one signal, seen by every listener and every connection.
//!
//! Stopping a load balancer well is a sequence, not an event. When SIGTERM or
//! Ctrl-C arrives, readiness turns false first (so Kubernetes stops sending new
//! traffic here) while requests are still served for `drainSeconds`, because
//! endpoint removal takes a while to reach every kube-proxy and client; then the
//! listeners stop accepting, each open connection finishes the request it is
//! serving and closes (by force after `shutdownTimeoutSeconds`), and only then
//! does the process exit. [`Shutdown::drain_then_stop`] runs that sequence.
//! [`Shutdown`] carries that sequence as a [`Phase`] in a `tokio::sync::watch`
//! channel: the admin endpoint reads the current phase for `/readyz`, the accept
//! loops and connection tasks wait for [`Phase::Stopping`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::info;

/// Where the process is in its shutdown sequence. Phases only move forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Normal operation.
    Serving,
    /// Readiness is false, but requests are still accepted and served, so that
    /// clients that have not yet seen the endpoint removal are not refused.
    Draining,
    /// Listeners stop accepting; open connections finish their request and close.
    Stopping,
}

/// A clonable handle on the shutdown phase, shared by `main`, the servers and admin.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// A watch channel rather than a broadcast: late subscribers (a connection
    /// accepted a moment before the signal) still see the current phase, and
    /// nobody can miss a message.
    phase: watch::Sender<Phase>,
    /// Woken once, when the phase becomes [`Phase::Stopping`]. Every accept
    /// loop and every connection being served waits on it (a parked one waits
    /// in its accept loop's lot), and a `Notify` waiter is a third of the size
    /// of a watch receiver's wait, room every connection's task keeps.
    stopping: Arc<Notify>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A handle in [`Phase::Serving`].
    pub fn new() -> Self {
        Self {
            phase: watch::Sender::new(Phase::Serving),
            stopping: Arc::new(Notify::new()),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Turns readiness false while traffic is still served.
    pub fn begin_draining(&self) {
        self.advance_to(Phase::Draining);
    }

    /// Tells every listener to stop accepting and every connection to close once
    /// its current request is answered.
    pub fn stop(&self) {
        self.advance_to(Phase::Stopping);
    }

    /// The whole sequence after a shutdown signal: readiness off at once, keep
    /// serving for `drain` (responses now carry `Connection: close`, so clients
    /// reconnect, most likely elsewhere), then stop. The servers then finish what
    /// is in flight; await them after this returns.
    pub async fn drain_then_stop(&self, drain: Duration) {
        self.begin_draining();
        info!(
            drain_ms = drain.as_millis(),
            "shutdown begun: readiness off, draining"
        );
        tokio::time::sleep(drain).await;
        info!("drain over: closing listeners, finishing in-flight requests");
        self.stop();
    }

    /// Resolves once [`Shutdown::stop`] has been called (at once if it already was).
    pub async fn stopped(&self) {
        let notified = self.stopping.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the phase is read, so a stop in between is not missed.
        notified.as_mut().enable();
        if self.phase() != Phase::Stopping {
            notified.await;
        }
    }

    fn advance_to(&self, next: Phase) {
        let moved = self.phase.send_if_modified(|phase| {
            let moved = next > *phase;
            if moved {
                *phase = next;
            }
            moved
        });
        if moved && next == Phase::Stopping {
            self.stopping.notify_waiters();
        }
    }
}

/// The process signals that start a shutdown: SIGTERM (how Kubernetes stops a
/// pod) and Ctrl-C (SIGINT, how a person stops a local run).
///
/// Handlers are installed by [`Signals::install`], before the listeners announce
/// themselves, so a signal that arrives right after start-up is caught rather
/// than killing the process with the default action.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Resolves when one of the signals arrives.
    pub async fn recv(&mut self) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => {}
                _ = self.interrupt.recv() => {}
            }
            Ok(())
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let shutdown = Shutdown::new();
        assert_eq!(shutdown.phase(), Phase::Serving);
        shutdown.stop();
        shutdown.begin_draining();
        assert_eq!(shutdown.phase(), Phase::Stopping);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_then_stop_is_draining_for_the_whole_drain_then_stopping() {
        let shutdown = Shutdown::new();
        let drain = Duration::from_secs(5);
        let sequence = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.drain_then_stop(drain).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(shutdown.phase(), Phase::Draining);
        tokio::time::sleep(drain - Duration::from_millis(1)).await;
        assert_eq!(shutdown.phase(), Phase::Draining);
        sequence.await.expect("sequence finishes");
        assert_eq!(shutdown.phase(), Phase::Stopping);
    }

    #[tokio::test]
    async fn stopped_resolves_for_waiters_subscribed_before_and_after_stop() {
        let shutdown = Shutdown::new();
        let early = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.stopped().await }
        });
        shutdown.begin_draining();
        shutdown.stop();
        early.await.expect("early waiter finishes");
        // A waiter that subscribes after the fact must not hang.
        shutdown.stopped().await;
    }
}
