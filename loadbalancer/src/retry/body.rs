//! A request body that can be sent again as long as nothing of it was sent.
//!
//! The proxy streams request bodies (no buffering, flat memory), and the upstream
//! pool consumes the request it is given, even when it fails to connect. An
//! attempt can also end with no error at all to carry the body back: the request
//! timeout, which also bounds the connect, drops the attempt's future and
//! everything in it. (A timeout is not retried today, but nothing here relies on
//! that.) So the body is never handed over itself: it waits in a shared slot, and
//! each attempt gets an [`AttemptBody`] that takes it out of the slot on its
//! first poll. The exchange polls the body only after it has a connection and
//! has written the head, so after a connect failure the body is still in the
//! slot and the next attempt can take it. Once an attempt has taken it, the
//! bytes are on their way and the request can no longer be retried.
//!
//! A request without a body (most GETs) is trivially replayable: every attempt
//! gets an empty body. Each attempt has a generation number, so a stale attempt
//! polled late can never steal the body from a newer one. With hyper's client a
//! connection task could do that; our exchange drops an attempt's body with the
//! attempt, and the check stays as a guard.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};
use service_kit::BoxError;

/// The client's request body, kept for as many attempts as it allows.
#[derive(Debug)]
pub struct RetryBody<B> {
    kind: Kind<B>,
}

#[derive(Debug)]
enum Kind<B> {
    /// No body at all: every attempt sends nothing.
    Empty,
    /// A body that at most one attempt will stream.
    Streaming {
        /// Where the body waits until an attempt polls it.
        slot: Arc<Mutex<Slot<B>>>,
        /// The body's own size hint and end flag, reported before it is taken
        /// (hyper reads them to choose Content-Length or chunked framing).
        size_hint: SizeHint,
        end_stream: bool,
    },
}

#[derive(Debug)]
struct Slot<B> {
    /// The attempt allowed to take `body`; older attempts find it is not theirs.
    generation: u64,
    body: Option<B>,
}

impl<B: Body + Unpin> RetryBody<B> {
    /// Keeps `body` for the attempts to come.
    pub fn new(body: B) -> Self {
        let kind = if body.is_end_stream() {
            Kind::Empty
        } else {
            Kind::Streaming {
                size_hint: body.size_hint(),
                end_stream: false,
                slot: Arc::new(Mutex::new(Slot {
                    generation: 0,
                    body: Some(body),
                })),
            }
        };
        Self { kind }
    }

    /// Whether another attempt can still send this body: it is empty, or no
    /// attempt has started sending it.
    pub fn is_replayable(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Streaming { slot, .. } => lock(slot).body.is_some(),
        }
    }

    /// The body for the next attempt, or `None` if an earlier attempt already
    /// started sending it.
    pub fn attempt(&self) -> Option<AttemptBody<B>> {
        match &self.kind {
            Kind::Empty => Some(AttemptBody {
                state: State::Empty,
            }),
            Kind::Streaming {
                slot,
                size_hint,
                end_stream,
            } => {
                let mut guard = lock(slot);
                guard.body.as_ref()?;
                guard.generation += 1;
                Some(AttemptBody {
                    state: State::Waiting {
                        slot: Arc::clone(slot),
                        generation: guard.generation,
                        size_hint: *size_hint,
                        end_stream: *end_stream,
                    },
                })
            }
        }
    }
}

/// The body one attempt sends.
#[derive(Debug)]
pub struct AttemptBody<B> {
    state: State<B>,
}

#[derive(Debug)]
enum State<B> {
    Empty,
    /// Not polled yet: the body is still in the slot.
    Waiting {
        slot: Arc<Mutex<Slot<B>>>,
        generation: u64,
        size_hint: SizeHint,
        end_stream: bool,
    },
    /// Taken: this attempt streams it.
    Taken(B),
}

/// A stale attempt was polled after a newer one was made.
#[derive(Debug, thiserror::Error)]
#[error("the request body belongs to a later attempt")]
struct Superseded;

impl<B> Body for AttemptBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let State::Waiting {
            slot, generation, ..
        } = &this.state
        {
            let mut guard = lock(slot);
            let body = (guard.generation == *generation)
                .then(|| guard.body.take())
                .flatten();
            drop(guard);
            if let Some(body) = body {
                this.state = State::Taken(body);
            }
        }
        match &mut this.state {
            State::Empty => Poll::Ready(None),
            State::Taken(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            // Still waiting after the take above: the body went to a newer attempt.
            State::Waiting { .. } => Poll::Ready(Some(Err(Superseded.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Empty => true,
            State::Waiting { end_stream, .. } => *end_stream,
            State::Taken(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Empty => SizeHint::with_exact(0),
            State::Waiting { size_hint, .. } => *size_hint,
            State::Taken(body) => body.size_hint(),
        }
    }
}

// A poisoned lock means a panic while swapping an Option; the Option is still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};

    use super::*;

    #[tokio::test]
    async fn an_empty_body_can_be_sent_any_number_of_times() {
        let body = RetryBody::new(Empty::<Bytes>::new());
        for _ in 0..3 {
            let attempt = body.attempt().expect("an empty body is always replayable");
            assert!(attempt.is_end_stream());
            assert!(
                attempt
                    .collect()
                    .await
                    .expect("empty")
                    .to_bytes()
                    .is_empty()
            );
        }
    }

    #[tokio::test]
    async fn an_unpolled_body_goes_to_the_next_attempt_whole() {
        let body = RetryBody::new(Full::new(Bytes::from_static(b"payload")));
        let first = body.attempt().expect("not sent yet");
        assert_eq!(first.size_hint().exact(), Some(7));
        drop(first); // a connect failure: the client dropped it unpolled
        let second = body.attempt().expect("still not sent");
        let sent = second.collect().await.expect("body streams").to_bytes();
        assert_eq!(sent, Bytes::from_static(b"payload"));
        assert!(body.attempt().is_none(), "a sent body cannot be sent again");
    }

    #[tokio::test]
    async fn a_stale_attempt_cannot_take_the_body_from_a_newer_one() {
        let body = RetryBody::new(Full::new(Bytes::from_static(b"payload")));
        let stale = body.attempt().expect("not sent yet");
        let current = body.attempt().expect("not sent yet");
        assert!(stale.collect().await.is_err());
        let sent = current.collect().await.expect("body streams").to_bytes();
        assert_eq!(sent, Bytes::from_static(b"payload"));
    }
}
