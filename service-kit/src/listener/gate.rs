//! A future that is polled only when it has asked to be.
//!
//! A connection's task waits on hyper's connection and, beside it, on the
//! connection's watchers: its clocks (idle, header read, the quiet spell before
//! parking) and the listener's stop. A `select!` polls every branch each time
//! the task wakes, and the task wakes for the connection's sockets, twice per
//! request, when the watchers have nothing to say: each of their polls costs a
//! timer registration or a lock, a tenth of the listener's work per request.
//! [`Gated`] gives its future a waker of its own and polls it only after that
//! waker fired (and once at the start, so that it can register).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// Polls `inner` only when it was woken since its last poll.
pub(super) struct Gated<F> {
    inner: F,
    signal: Arc<Signal>,
    /// A waker for `signal`, made once rather than at every poll.
    waker: Waker,
}

/// What `inner`'s waker does: note that it was woken, and wake the task.
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> Gated<F> {
    pub(super) fn new(inner: F) -> Self {
        let signal = Arc::new(Signal {
            // Polled the first time, to register its wakers.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            inner,
            waker: Waker::from(Arc::clone(&signal)),
            signal,
        }
    }
}

impl<F: Future + Unpin> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake in between sets the
        // flag, which is seen now, or wakes the task, which polls again.
        this.signal.task.register(cx.waker());
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// Counts its polls; ready once `notify` has been notified.
    struct Counted<'a> {
        polls: &'a AtomicUsize,
        notified: Pin<Box<tokio::sync::futures::Notified<'a>>>,
    }

    impl Future for Counted<'_> {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.notified.as_mut().poll(cx)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_inner_future_is_polled_only_after_its_waker_fired() {
        let notify = tokio::sync::Notify::new();
        let polls = AtomicUsize::new(0);
        let gated = Gated::new(Counted {
            polls: &polls,
            notified: Box::pin(notify.notified()),
        });
        tokio::pin!(gated);
        // The task wakes ten times for something else (a ticking clock here,
        // a socket in the listener); the gated future is polled once, at
        // the start.
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for _ in 0..10 {
            tokio::select! {
                () = gated.as_mut() => panic!("not notified yet"),
                _ = tick.tick() => {}
            }
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        // Its own wake-up gets it polled, and it finishes.
        notify.notify_one();
        gated.await;
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
