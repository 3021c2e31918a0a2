//! A body that fails when its next piece is too long in coming
//! (`bodyIdleTimeoutMs`).
//!
//! `requestTimeoutMs` bounds the wait for a response head; once the body
//! streams, nothing else would notice a backend that stops sending halfway (or
//! a client that stops uploading), and both connections would stay open until
//! the stalled side closes, which may be never. Each body the proxy streams in
//! either direction is wrapped in an [`IdleTimeout`]: the clock runs only while
//! the body is asked for its next frame and has none, so a client that reads
//! slowly (and so stops asking) never trips it. When it fires the body fails
//! with [`BodyIdle`]; the proxy then drops both connections.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use service_kit::BoxError;
use tokio::time::{Instant, Sleep};

/// The body waited longer than its limit for its next piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no body data for {} ms", .0.as_millis())]
pub struct BodyIdle(pub Duration);

/// `B`, failing with [`BodyIdle`] when a frame is `limit` late.
#[derive(Debug)]
pub(crate) struct IdleTimeout<B> {
    inner: B,
    /// How long one wait for a frame may take.
    limit: Duration,
    /// Armed while a wait is under way; boxed so the body stays `Unpin`, and
    /// made on the first wait only, then reset for the later ones.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the last poll found nothing: the timer then runs from the
    /// deadline set when the wait began, not from each new poll.
    waiting: bool,
}

impl<B> IdleTimeout<B> {
    pub(crate) fn new(inner: B, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            waiting: false,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if !this.waiting {
            this.waiting = true;
            let deadline = Instant::now() + this.limit;
            match &mut this.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        if let Some(timer) = &mut this.timer {
            ready!(timer.as_mut().poll(cx));
        }
        Poll::Ready(Some(Err(BodyIdle(this.limit).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    use super::*;

    /// A body fed by hand through a channel.
    #[derive(Debug)]
    struct ReceiverBody(mpsc::Receiver<Bytes>);

    impl Body for ReceiverBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.get_mut()
                .0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
        }
    }

    const LIMIT: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_coming_is_untouched() {
        let (tx, rx) = mpsc::channel(1);
        let mut body = IdleTimeout::new(ReceiverBody(rx), LIMIT);
        for _ in 0..3 {
            tokio::spawn({
                let tx = tx.clone();
                async move {
                    tokio::time::sleep(LIMIT - Duration::from_secs(1)).await;
                    let _ = tx.send(Bytes::from_static(b"x")).await;
                }
            });
            let frame = body.frame().await.expect("a frame").expect("not an error");
            assert_eq!(frame.into_data().expect("data"), Bytes::from_static(b"x"));
        }
        drop(tx);
        assert!(body.frame().await.is_none(), "the end passes through");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_at_the_limit() {
        let (_tx, rx) = mpsc::channel::<Bytes>(1);
        let mut body = IdleTimeout::new(ReceiverBody(rx), LIMIT);
        let started = Instant::now();
        let error = body
            .frame()
            .await
            .expect("an error, not the end")
            .expect_err("the wait times out");
        assert_eq!(started.elapsed(), LIMIT);
        assert_eq!(error.downcast_ref::<BodyIdle>(), Some(&BodyIdle(LIMIT)));
    }

    #[tokio::test(start_paused = true)]
    async fn time_between_polls_does_not_count() {
        // A client that reads slowly stops polling; only the wait counts.
        let body = StreamBody::new(futures::stream::iter([Ok::<_, std::convert::Infallible>(
            Frame::data(Bytes::from_static(b"x")),
        )]));
        let mut body = IdleTimeout::new(body, LIMIT);
        tokio::time::sleep(LIMIT * 2).await;
        assert!(body.frame().await.expect("a frame").is_ok());
    }
}
