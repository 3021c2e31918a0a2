//! The bodies of a request over HTTP/2: the client's, sent up its stream as
//! it arrives and no faster than the backend's flow-control window allows,
//! and the backend's response body, read off the stream as the client takes
//! it while the stream keeps its place on the connection.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::FutureExt;
use h2::{Reason, RecvStream, SendStream};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use service_kit::BoxError;

use super::StreamSlot;
use crate::upstream::pool::lock;

/// Where a request body's failure is kept, so that a failed upload is told
/// from a failed backend: `h2` only sees the stream reset that follows it.
pub(super) type UploadFailure = Arc<Mutex<Option<BoxError>>>;

/// Sends a request body that did not end with the head. A body already
/// arrived whole goes out at once, from the request's own task; one still
/// arriving is copied by a task of its own ([`copy_body`]).
pub(super) fn send_body<B>(mut body: B, mut stream: SendStream<Bytes>) -> UploadFailure
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let failure = UploadFailure::default();
    // Polled without a waker that matters: if the body is not ready, the
    // copying task polls it again with its own.
    let first = match body.frame().now_or_never() {
        Some(Some(Ok(frame))) if body.is_end_stream() => {
            send_last(&mut stream, frame);
            return failure;
        }
        Some(None) => {
            let _ = stream.send_data(Bytes::new(), true);
            return failure;
        }
        Some(Some(Err(error))) => {
            fail_upload(&failure, &mut stream, error.into());
            return failure;
        }
        Some(Some(Ok(frame))) => Some(frame),
        None => None,
    };
    tokio::spawn(copy_body(body, stream, first, Arc::clone(&failure)));
    failure
}

/// The client's body failed: keeps its error for the request to report, and
/// resets the stream so that the backend stops waiting for the rest.
fn fail_upload(failure: &UploadFailure, stream: &mut SendStream<Bytes>, error: BoxError) {
    *lock(failure) = Some(error);
    stream.send_reset(Reason::CANCEL);
}

/// Sends the body's last frame, ending the stream.
fn send_last(stream: &mut SendStream<Bytes>, frame: Frame<Bytes>) {
    // A send fails only when the stream is already reset, which the
    // response future reports.
    let _ = match frame.into_data() {
        Ok(data) => stream.send_data(data, true),
        Err(frame) => match frame.into_trailers() {
            Ok(trailers) => stream.send_trailers(trailers),
            Err(_unknown) => stream.send_data(Bytes::new(), true),
        },
    };
}

/// Copies a request body into its stream as the body arrives, starting
/// with `first` if the body's first frame was read already, and reading
/// the client no faster than the backend takes it (flow control). Stops when
/// the body ends or fails, or when the backend resets the stream: an
/// answer that came early needs no more of the body.
async fn copy_body<B>(
    mut body: B,
    mut stream: SendStream<Bytes>,
    mut next: Option<Frame<Bytes>>,
    failure: UploadFailure,
) where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    loop {
        if !room_to_send(&mut stream).await {
            return;
        }
        let frame = match next.take() {
            Some(frame) => frame,
            None => match poll_fn(|cx| poll_frame_unless_reset(&mut body, &mut stream, cx)).await {
                None => {
                    let _ = stream.send_data(Bytes::new(), true);
                    return;
                }
                Some(Err(error)) => {
                    fail_upload(&failure, &mut stream, error);
                    return;
                }
                Some(Ok(frame)) => frame,
            },
        };
        if body.is_end_stream() || !frame.is_data() {
            send_last(&mut stream, frame);
            return;
        }
        if let Ok(data) = frame.into_data()
            && stream.send_data(data, false).is_err()
        {
            return;
        }
    }
}

/// Waits until the backend's flow-control window lets more of the body go
/// out; false if the stream can take no more (it was reset, or ended).
async fn room_to_send(stream: &mut SendStream<Bytes>) -> bool {
    stream.reserve_capacity(1);
    while stream.capacity() == 0 {
        match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return false,
        }
    }
    true
}

/// The body's next frame, or `None` once it ends or the backend reset the
/// stream.
fn poll_frame_unless_reset<B>(
    body: &mut B,
    stream: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if stream.poll_reset(cx).is_ready() {
        return Poll::Ready(None);
    }
    Pin::new(body)
        .poll_frame(cx)
        .map(|frame| frame.map(|frame| frame.map_err(Into::into)))
}

/// A backend's response body over HTTP/2, holding the request's place on its
/// connection until the body ends (or is dropped).
#[derive(Debug)]
pub(crate) struct Http2Body {
    body: RecvStream,
    /// The data is done; trailers (if any) come next.
    data_done: bool,
    /// `None` once the body has ended.
    slot: Option<StreamSlot>,
}

impl Http2Body {
    pub(super) fn new(body: RecvStream, slot: StreamSlot) -> Self {
        // A response with no body (`HEAD`, `204`) ends with its head.
        let slot = Some(slot).filter(|_| !body.is_end_stream());
        Self {
            body,
            data_done: false,
            slot,
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.body.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read, so the backend may send as much again: the
                    // window opens as the client takes the data.
                    let _ = self.body.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(stopped_early(error)),
                None => self.data_done = true,
            }
        }
        Poll::Ready(match ready!(self.body.poll_trailers(cx)) {
            Ok(trailers) => trailers.map(|trailers| Ok(Frame::trailers(trailers))),
            Err(error) => stopped_early(error),
        })
    }
}

/// A stream reset with `NO_ERROR` once the response is complete only tells
/// the client to stop sending (RFC 9113 section 8.1): the body ends there.
/// Any other error fails it.
fn stopped_early(error: h2::Error) -> Option<Result<Frame<Bytes>, h2::Error>> {
    (error.reason() != Some(Reason::NO_ERROR)).then_some(Err(error))
}

impl Body for Http2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        let polled = this.poll_next(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || this.body.is_end_stream() {
            this.slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}
