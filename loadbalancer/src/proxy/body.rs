//! The streamed response body, wrapped so that a request stops counting as in
//! flight when its last byte has been handed to the client, not when the response
//! head is ready.
//!
//! The proxy returns as soon as the backend's head arrives; hyper then pulls the
//! body frame by frame. The in-flight guards (the global gauge and the backend's
//! own count, which the least-request balancer compares) ride inside the body and
//! are dropped at the end of the stream, on a body error, or when hyper drops the
//! body because the client went away, whichever comes first.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::UpstreamBody;
use crate::backend_state::OwnedInFlight;
use crate::metrics::RequestInFlight;
use crate::upstream::ExchangeError;

/// A backend's response body with the guards that count its request in flight.
#[derive(Debug)]
pub struct InFlightBody {
    /// The backend's body, streamed through untouched; it returns its
    /// connection to the pool at its end.
    inner: UpstreamBody,
    /// Dropped (set to `None`) when the stream ends; dropping the body drops them too.
    guards: Option<(RequestInFlight, OwnedInFlight)>,
}

impl InFlightBody {
    pub(crate) fn new(
        inner: UpstreamBody,
        request: RequestInFlight,
        backend: OwnedInFlight,
    ) -> Self {
        Self {
            inner,
            guards: Some((request, backend)),
        }
    }
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        // Both fields are `Unpin`, so the wrapper is too and needs no pin projection.
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            this.guards = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
