//! One HTTP/1.1 exchange with a backend: write the request, read the response
//! head, and decode the response body as it streams, on a connection the
//! [`pool`](super::pool) lends.
//!
//! Why not hyper's client connection: hyper gives
//! every connection a task of its own, a dispatch channel, and read and write
//! buffers that live as long as the connection, about 35 KiB per upstream
//! connection before a byte is sent (the massif breakdown is in
//! `docs/performance.md`). A proxy holding 1,000 slow requests holds 1,000 such
//! connections. Here an exchange runs inside the request's own task, a
//! connection in the pool is just its socket, and the read buffer is allocated
//! only when the backend's answer is there to read, so a request waiting on a
//! slow backend costs the socket and the request's future, nothing more.
//!
//! The parsing is httparse's, the parser inside hyper; the rules are RFC 9112's,
//! as hyper applies them to responses:
//!
//! * the request goes out in origin form, always as HTTP/1.1, framed by its
//!   `Content-Length` when it has one (or its body knows its size) and chunked
//!   otherwise; `Expect` is not passed on, because the proxy's own server
//!   already answered it and sends the body at once;
//! * interim responses (`100`, `103`, ...) are skipped; a `101` is refused, since
//!   the proxy forwards no `Upgrade`;
//! * a response to `HEAD`, and a `204` or `304`, has no body; otherwise
//!   `Transfer-Encoding: chunked` wins over `Content-Length` (which is then
//!   dropped, the body being re-framed for the client), differing
//!   `Content-Length`s are an error, and with neither the body runs until the
//!   backend closes;
//! * the connection is kept for another request only when both sides finished
//!   their message cleanly and the backend did not ask to close it.

mod chunked;
mod request;
mod response;

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, Method, Response};
use hyper::body::Body;
use service_kit::BoxError;
use tokio::net::TcpStream;

pub use chunked::ChunkedError;
pub(crate) use request::{RequestWriter, UpstreamHead};
pub(super) use response::MAX_HEAD_BYTES;
pub(crate) use response::{BodyReader, Step};
use response::{finish_head, read_head};

/// Why an exchange failed. Each case says what the backend did.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection closed or broke before a byte of the response arrived.
    /// On a reused connection this is the keep-alive race; the pool sends a
    /// request again after it when that is safe.
    #[error("the connection closed before the response began")]
    NoResponse(#[source] io::Error),
    /// The connection broke after the response began.
    #[error("the connection broke")]
    Io(#[from] io::Error),
    /// What came back is not an HTTP/1 response head.
    #[error("invalid response head")]
    Parse(#[from] httparse::Error),
    /// The response head did not end within [`MAX_HEAD_BYTES`].
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// A well-formed head that breaks HTTP's rules.
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    /// The backend closed before the body's announced end.
    #[error("the connection closed before the response body ended")]
    IncompleteBody,
    /// The chunked framing of the body is broken.
    #[error("invalid chunked response body")]
    Chunked(#[from] ChunkedError),
    /// The client's request body failed (the client went away mid-upload), or
    /// did not match its `Content-Length`.
    #[error("the request body failed")]
    RequestBody(#[source] BoxError),
}

/// A response head, with what is needed to read its body.
#[derive(Debug)]
pub(crate) struct Exchanged<B> {
    /// Status, version and headers; the body is read with `reader`.
    pub(crate) response: Response<()>,
    pub(crate) reader: BodyReader,
    /// The rest of the request, when the backend answered before taking all
    /// of it: it goes on streaming while the response does (an echo, a
    /// transcoder), and the connection is reused only if it finishes. Boxed:
    /// it is rare, and the response body it rides in is moved several times
    /// on its way to the client.
    pub(crate) unsent: Option<Box<RequestWriter<B>>>,
    /// Whether the connection can carry another request once both messages
    /// have ended.
    pub(crate) reusable: bool,
}

/// Sends the request (`head`, then `body`, which is `None` for a bodiless
/// request) on `stream` and reads the response head. The body is streamed out
/// while the answer is awaited, so a backend that answers before it has read
/// the whole body is heard at once: a `413` that closes the connection reaches
/// the client, and a body that a backend echoes as it reads keeps flowing
/// ([`Exchanged::unsent`]).
pub(crate) async fn exchange<B>(
    stream: &TcpStream,
    backend: SocketAddr,
    head: &UpstreamHead,
    body: Option<B>,
) -> Result<Exchanged<B>, ExchangeError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut writer = Some(RequestWriter::new(head, backend, body));
    let mut write_error = None;
    let is_head_request = *head.method() == Method::HEAD;
    let mut buf = BytesMut::new();
    let response = {
        let mut receiving = pin!(read_head(stream, &mut buf, head.asks_upgrade()));
        poll_fn(|cx| {
            if let Some(sending) = &mut writer {
                match sending.poll_write(stream, cx) {
                    Poll::Ready(Ok(())) => writer = None,
                    Poll::Ready(Err(error @ ExchangeError::RequestBody(_))) => {
                        return Poll::Ready(Err(error));
                    }
                    // A backend may answer (a `413`, say) and close before
                    // taking the whole body: then its answer is what the
                    // client should get, so the response is still awaited.
                    Poll::Ready(Err(error)) => {
                        write_error = Some(error);
                        writer = None;
                    }
                    Poll::Pending => {}
                }
            }
            receiving.as_mut().poll(cx)
        })
        .await
    };
    match (response, write_error) {
        // A failed write leaves no writer, and the connection not reusable.
        (Ok(response), write_error) => {
            let request_intact = write_error.is_none();
            finish_head(
                response,
                buf,
                is_head_request,
                writer.map(Box::new),
                request_intact,
            )
        }
        // Not a byte of an answer, and the request could not be written: the
        // keep-alive race when the backend reset the connection, named by the
        // write's failure, which says more than the read's.
        (Err(ExchangeError::NoResponse(_)), Some(ExchangeError::Io(write_error))) => {
            Err(ExchangeError::NoResponse(write_error))
        }
        (Err(_), Some(write_error)) => Err(write_error),
        (Err(read_error), None) => Err(read_error),
    }
}

/// A length written as plain decimal digits, and nothing else: no sign (which
/// `u64::from_str` would take), no space, not empty.
fn plain_length(item: &[u8]) -> Option<u64> {
    if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
        return None;
    }
    item.iter().try_fold(0u64, |length, digit| {
        length.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// The one `Content-Length` of `headers`: every value (and every item of a
/// comma-separated value) must be the same plain decimal number.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for item in value.to_str().ok()?.split(',') {
            let parsed = plain_length(item.trim().as_bytes())?;
            if length.is_some_and(|known| known != parsed) {
                return None;
            }
            length = Some(parsed);
        }
    }
    length
}
