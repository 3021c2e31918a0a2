//! A request body that can be sent again: the part already sent is kept, up to
//! [`REPLAY_LIMIT`], so that a retry sends it again and then goes on with the rest.
//!
//! The proxy streams request bodies (flat memory, however large). A retry needs
//! what an earlier attempt already sent, though: an HTTP/2 backend that refuses
//! a stream (`REFUSED_STREAM`) has taken the start of the body, or all of a small
//! one (a gRPC call's message), before it says so. So each attempt that streams
//! the body records the frames it passes on, as `Bytes` (a reference count, not
//! a copy), while they add up to at most [`REPLAY_LIMIT`]; past that the record
//! is dropped and the request can no longer be retried, like Envoy's retry
//! buffer. A body never polled (a connect failure) costs nothing to replay.
//!
//! The body itself waits in a shared slot, and each attempt gets an
//! [`AttemptBody`]: on its first poll it replays the record, then takes the
//! rest of the body from the slot. An attempt that is dropped hands the rest
//! back, so the next can continue it; one that asks before the previous attempt
//! has let go (its connection task may drop it a moment later) waits for it.
//! The request timeout, which also bounds the connect, drops an attempt's
//! future and everything in it, and that too hands the body back.
//!
//! A request without a body (most GETs) is trivially replayable: every attempt
//! gets an empty body. Each attempt has a generation number, so a stale attempt
//! polled late can never steal the body from a newer one.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use service_kit::BoxError;

/// The most of a request body kept for a retry. A gRPC call's message, a form or
/// a JSON document fits; an upload does not, and is not retried once under way.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// The client's request body, kept for as many attempts as it allows.
#[derive(Debug)]
pub struct RetryBody<B> {
    kind: Kind<B>,
}

#[derive(Debug)]
enum Kind<B> {
    /// No body at all: every attempt sends nothing.
    Empty,
    /// A body streamed by one attempt at a time.
    Streaming {
        slot: Arc<Mutex<Slot<B>>>,
        /// The body's own size hint and end flag, reported before it is taken
        /// (hyper reads them to choose Content-Length or chunked framing).
        size_hint: SizeHint,
        end_stream: bool,
    },
}

#[derive(Debug)]
struct Slot<B> {
    /// The attempt allowed to stream the body; older attempts find it is not
    /// theirs.
    generation: u64,
    /// The unsent rest of the body, while no attempt holds it.
    body: Option<B>,
    /// What has been sent so far, in order, for the next attempt to replay;
    /// `None` once it grew past [`REPLAY_LIMIT`].
    sent: Option<Vec<Sent>>,
    /// The data bytes in `sent`.
    sent_bytes: usize,
    /// The body has ended: `sent` is all of it.
    ended: bool,
    /// An attempt waiting for the body to be handed back.
    waiting: Option<Waker>,
}

/// One recorded frame.
#[derive(Debug, Clone)]
enum Sent {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Sent {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Sent::Data(data) => Frame::data(data.clone()),
            Sent::Trailers(trailers) => Frame::trailers(trailers.clone()),
        }
    }
}

impl<B> Slot<B> {
    /// Keeps a copy of `frame` for a retry, while the record stays under the limit.
    fn record(&mut self, frame: &Frame<Bytes>) {
        let Some(sent) = &mut self.sent else { return };
        if let Some(data) = frame.data_ref() {
            self.sent_bytes += data.len();
            if self.sent_bytes > REPLAY_LIMIT {
                self.sent = None;
                return;
            }
            sent.push(Sent::Data(data.clone()));
        } else if let Some(trailers) = frame.trailers_ref() {
            sent.push(Sent::Trailers(trailers.clone()));
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> RetryBody<B> {
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
                    sent: Some(Vec::new()),
                    sent_bytes: 0,
                    ended: false,
                    waiting: None,
                })),
            }
        };
        Self { kind }
    }

    /// Whether another attempt can still send this body: it is empty, or what
    /// has been sent of it is still kept.
    pub fn is_replayable(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Streaming { slot, .. } => lock(slot).sent.is_some(),
        }
    }

    /// The body for the next attempt, or `None` if too much of it was sent
    /// to send again.
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
                guard.sent.as_ref()?;
                guard.generation += 1;
                Some(AttemptBody {
                    state: State::Streaming {
                        slot: Arc::clone(slot),
                        generation: guard.generation,
                        size_hint: *size_hint,
                        end_stream: *end_stream,
                        replayed: 0,
                        body: None,
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
    Streaming {
        slot: Arc<Mutex<Slot<B>>>,
        generation: u64,
        /// The whole body's size hint and end flag, for before the first poll.
        size_hint: SizeHint,
        end_stream: bool,
        /// Recorded frames this attempt has sent (replayed or streamed).
        replayed: usize,
        /// The rest of the body, once taken from the slot.
        body: Option<B>,
    },
}

/// A stale attempt was polled after a newer one was made.
#[derive(Debug, thiserror::Error)]
#[error("the request body belongs to a later attempt")]
struct Superseded;

impl<B> Body for AttemptBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let State::Streaming {
            slot,
            generation,
            replayed,
            body,
            ..
        } = &mut self.get_mut().state
        else {
            return Poll::Ready(None);
        };
        if body.is_none() {
            let mut guard = lock(slot);
            if guard.generation != *generation {
                return Poll::Ready(Some(Err(Superseded.into())));
            }
            // What an earlier attempt sent goes first.
            if let Some(frame) = guard.sent.as_ref().and_then(|sent| sent.get(*replayed)) {
                *replayed += 1;
                return Poll::Ready(Some(Ok(frame.frame())));
            }
            if guard.ended {
                return Poll::Ready(None);
            }
            match guard.body.take() {
                Some(rest) => *body = Some(rest),
                None => {
                    // The previous attempt has not let go of it yet.
                    guard.waiting = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
        let Some(rest) = body else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(rest).poll_frame(cx));
        let mut guard = lock(slot);
        match &frame {
            Some(Ok(frame)) => {
                guard.record(frame);
                *replayed += 1;
            }
            None => guard.ended = true,
            // A client whose upload broke is not sent again.
            Some(Err(_)) => guard.sent = None,
        }
        Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Empty => true,
            State::Streaming {
                end_stream,
                replayed: 0,
                body: None,
                ..
            } => *end_stream,
            State::Streaming {
                body: Some(rest), ..
            } => rest.is_end_stream(),
            State::Streaming { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Empty => SizeHint::with_exact(0),
            // Read before the first frame, to choose the framing: the whole body's.
            State::Streaming {
                size_hint,
                replayed: 0,
                body: None,
                ..
            } => *size_hint,
            State::Streaming { .. } => SizeHint::default(),
        }
    }
}

impl<B> Drop for AttemptBody<B> {
    fn drop(&mut self) {
        // Hands the rest back for the next attempt, and wakes it if it waits.
        if let State::Streaming {
            slot,
            body: body @ Some(_),
            ..
        } = &mut self.state
        {
            let mut guard = lock(slot);
            guard.body = body.take();
            if let Some(waker) = guard.waiting.take() {
                waker.wake();
            }
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
    }

    #[tokio::test]
    async fn a_sent_body_is_replayed_by_the_next_attempt() {
        let body = RetryBody::new(Full::new(Bytes::from_static(b"payload")));
        let first = body.attempt().expect("not sent yet");
        let sent = first.collect().await.expect("body streams").to_bytes();
        assert_eq!(sent, Bytes::from_static(b"payload"));
        // A refused stream: the whole body went out, and goes out again.
        assert!(body.is_replayable());
        let second = body.attempt().expect("kept for a retry");
        let again = second.collect().await.expect("replayed").to_bytes();
        assert_eq!(again, Bytes::from_static(b"payload"));
    }

    /// A body of `chunks` data frames, streamed one by one.
    fn chunked(chunks: Vec<Bytes>) -> impl Body<Data = Bytes, Error: Into<BoxError>> + Unpin {
        let frames: Vec<Result<_, std::convert::Infallible>> = chunks
            .into_iter()
            .map(|chunk| Ok(Frame::data(chunk)))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn an_attempt_cut_off_mid_body_hands_the_rest_to_the_next() {
        let body = RetryBody::new(chunked(vec![
            Bytes::from_static(b"one,"),
            Bytes::from_static(b"two,"),
            Bytes::from_static(b"three"),
        ]));
        let mut first = body.attempt().expect("not sent yet");
        let frame = first.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"one,")));
        drop(first); // refused after the first frame
        let second = body.attempt().expect("kept for a retry");
        let sent = second
            .collect()
            .await
            .expect("replayed, then the rest")
            .to_bytes();
        assert_eq!(sent, Bytes::from_static(b"one,two,three"));
    }

    #[tokio::test]
    async fn a_body_larger_than_the_replay_limit_is_sent_once() {
        let big = Bytes::from(vec![0u8; REPLAY_LIMIT + 1]);
        let body = RetryBody::new(Full::new(big));
        let first = body.attempt().expect("not sent yet");
        first.collect().await.expect("body streams");
        assert!(!body.is_replayable());
        assert!(body.attempt().is_none());
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
