//! The request side of an exchange: the head as the backend gets it, and the
//! body streamed after it, framed by length or in chunks.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::buf::Chain;
use bytes::{Buf, Bytes};
use http::header::{CONTENT_LENGTH, EXPECT, HOST};
use http::request::Parts;
use hyper::body::Body;
use tokio::net::TcpStream;

use super::{ExchangeError, content_length};
use crate::listener::BoxError;

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy)]
pub(super) enum RequestFraming {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunks, ended by an empty one.
    Chunked,
}

impl RequestFraming {
    /// The framing for a request with these headers and body. The client's
    /// own framing header `Transfer-Encoding` is hop-by-hop and already gone;
    /// its `Content-Length` is kept, and hyper's server made sure the body
    /// matches it.
    pub(super) fn of<B: Body>(request: &Parts, body: Option<&B>) -> Self {
        let Some(body) = body.filter(|body| !body.is_end_stream()) else {
            return RequestFraming::None;
        };
        match content_length(&request.headers) {
            Some(length) => RequestFraming::Length(length),
            None => body
                .size_hint()
                .exact()
                .map_or(RequestFraming::Chunked, RequestFraming::Length),
        }
    }
}

/// The request line and headers, ready to write. The target is the origin
/// form, `/path?query`, whatever form the client used (absolute form through a
/// forward proxy, say).
pub(super) fn encode_head(
    request: &Parts,
    backend: SocketAddr,
    framing: RequestFraming,
) -> Vec<u8> {
    let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
    let headers = &request.headers;
    let estimate = 64 + path.len() + headers.len() * 48;
    let mut head = Vec::with_capacity(estimate);
    head.extend_from_slice(request.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == EXPECT {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        RequestFraming::Length(length) if !headers.contains_key(CONTENT_LENGTH) => {
            head.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
        }
        _ => {}
    }
    // HTTP/1.0 clients may send no `Host`; the backend then gets its own
    // address, as hyper-util's client did.
    if !headers.contains_key(HOST) {
        head.extend_from_slice(format!("host: {backend}\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Writes a request: its head, then its body as the client sends it, framed
/// as [`RequestFraming`] says. Polled by the exchange until the response head
/// arrives, and after that by the response body.
#[derive(Debug)]
pub(crate) struct RequestWriter<B> {
    /// Bytes taken from the body (or the head) and not yet written: a chunk
    /// is its size line, its data and a CRLF, written with one system call.
    pending: Option<Piece>,
    /// The client's body; `None` once it has ended (or for a bodiless request).
    body: Option<B>,
    framing: RequestFraming,
    /// Body bytes taken so far, checked against the `Content-Length`.
    taken: u64,
}

impl<B> RequestWriter<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(head: Vec<u8>, body: Option<B>, framing: RequestFraming) -> Self {
        Self {
            pending: Some(piece(Bytes::new(), Bytes::from(head), b"")),
            body,
            framing,
            taken: 0,
        }
    }

    /// Writes what it can; ready when the whole request is written.
    pub(crate) fn poll_write(
        &mut self,
        stream: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ExchangeError>> {
        loop {
            if let Some(pending) = &mut self.pending {
                while pending.has_remaining() {
                    ready!(stream.poll_write_ready(cx))?;
                    let mut slices = [IoSlice::new(&[]); 3];
                    let count = pending.chunks_vectored(&mut slices);
                    match stream.try_write_vectored(&slices[..count]) {
                        Ok(0) => {
                            return Poll::Ready(Err(
                                io::Error::from(io::ErrorKind::WriteZero).into()
                            ));
                        }
                        Ok(written) => pending.advance(written),
                        // Readiness was stale; wait for the next.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e.into())),
                    }
                }
                self.pending = None;
            }
            let Some(body) = &mut self.body else {
                return Poll::Ready(Ok(()));
            };
            self.pending = match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => Some(self.frame_data(data)?),
                    // Trailers are dropped: a length-framed body cannot carry
                    // them, and backends rarely read them.
                    _ => None,
                },
                Some(Err(error)) => {
                    return Poll::Ready(Err(ExchangeError::RequestBody(error.into())));
                }
                None => {
                    self.body = None;
                    self.finish()?
                }
            };
        }
    }

    /// `data` framed for the wire.
    fn frame_data(&mut self, data: Bytes) -> Result<Piece, ExchangeError> {
        self.taken += data.len() as u64;
        match self.framing {
            RequestFraming::Length(length) if self.taken > length => {
                Err(body_mismatch("longer than its Content-Length"))
            }
            RequestFraming::Chunked => {
                let size = Bytes::from(format!("{:x}\r\n", data.len()));
                Ok(piece(size, data, b"\r\n"))
            }
            _ => Ok(piece(Bytes::new(), data, b"")),
        }
    }

    /// What ends the body on the wire, once the client's body has ended.
    fn finish(&self) -> Result<Option<Piece>, ExchangeError> {
        match self.framing {
            RequestFraming::Length(length) if self.taken < length => {
                Err(body_mismatch("shorter than its Content-Length"))
            }
            RequestFraming::Chunked => Ok(Some(piece(Bytes::new(), Bytes::new(), b"0\r\n\r\n"))),
            _ => Ok(None),
        }
    }
}

/// A piece of the request on the wire: a prefix (a chunk's size line), data,
/// and a suffix (the chunk's CRLF), gathered into one write.
type Piece = Chain<Chain<Bytes, Bytes>, &'static [u8]>;

fn piece(prefix: Bytes, data: Bytes, suffix: &'static [u8]) -> Piece {
    prefix.chain(data).chain(suffix)
}

fn body_mismatch(what: &str) -> ExchangeError {
    ExchangeError::RequestBody(format!("the request body is {what}").into())
}
