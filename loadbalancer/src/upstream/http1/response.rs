//! The response side of an exchange: the head, read and parsed off the
//! connection, and the body, decoded by its framing as the client takes it.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Version};
use hyper::body::Frame;
use service_kit::headers::list_items;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::chunked::{ChunkedDecoder, Decoded};
use super::{ExchangeError, Exchanged, RequestWriter, content_length, plain_length};

/// Header fields accepted in a response head, as in hyper.
const MAX_HEADERS: usize = 100;

/// The largest response head accepted. Far above what backends send (a few
/// hundred bytes, a few KiB with cookies), and it bounds what a broken backend
/// can make the proxy buffer.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The first read of a response: enough for the head and a small body in one
/// system call.
const FIRST_READ: usize = 8 * 1024;

/// The largest body read. Reads grow from [`FIRST_READ`] while each one fills
/// its buffer, so a large download moves in large pieces (fewer system calls
/// and frames) and a small answer never reserves more than it needs.
const MAX_READ: usize = 256 * 1024;

/// A parsed final response head.
pub(super) struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// What its fields say of the framing, noted as they were parsed.
    fields: FramingFields,
}

/// Which of the fields that decide a response's framing and reuse a head
/// has, noted in the pass that parses it, so that deciding needs no lookups
/// in the common case: a `Content-Length` of plain digits, nothing else.
#[derive(Debug, Default)]
struct FramingFields {
    transfer_encoding: bool,
    connection: bool,
    /// How many `Content-Length` fields.
    lengths: usize,
    /// The first one's value, if it is a plain number (see [`plain_length`]).
    length: Option<u64>,
}

impl FramingFields {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == CONTENT_LENGTH {
            self.lengths += 1;
            if self.lengths == 1 {
                self.length = plain_length(value.as_bytes());
            }
        } else if name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if name == CONNECTION {
            self.connection = true;
        }
    }
}

/// Reads until a final (non-interim) response head is complete, and leaves
/// what follows it in `buf`. The buffer is allocated only once the backend's
/// answer is readable: waiting for a slow backend costs no buffer. A `101` is
/// final for a request that asked to switch protocols (`upgrade`), and an error
/// for any other.
pub(super) async fn read_head(
    stream: &TcpStream,
    buf: &mut BytesMut,
    upgrade: bool,
) -> Result<Head, ExchangeError> {
    let mut received_any = false;
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf)? {
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    if upgrade {
                        return Ok(head);
                    }
                    return Err(ExchangeError::Invalid("101 without an upgrade request"));
                }
                if head.status.is_informational() {
                    continue;
                }
                return Ok(head);
            }
            if buf.len() >= MAX_HEAD_BYTES {
                return Err(ExchangeError::HeadTooLarge);
            }
        }
        match read_some(stream, buf, FIRST_READ).await {
            Ok(0) if received_any => return Err(ExchangeError::Invalid("the head was cut off")),
            Ok(0) => {
                return Err(ExchangeError::NoResponse(
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Ok(_) => received_any = true,
            Err(error) if received_any => return Err(ExchangeError::Io(error)),
            Err(error) => return Err(ExchangeError::NoResponse(error)),
        }
    }
}

/// Waits until `stream` is readable, then reads what is there into `buf`
/// ([`try_read_into`]).
async fn read_some(stream: &TcpStream, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
    poll_fn(|cx| poll_read_into(stream, cx, buf, want)).await
}

/// Polls `stream` for readability, then reads what is there into `buf`
/// ([`try_read_into`]); a stale readiness mark is waited out.
fn poll_read_into(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    want: usize,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        match try_read_into(stream, buf, want) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

/// One non-blocking read into `buf`, after making room for at least `want`
/// more bytes; `Ok(0)` is the end of the stream.
///
/// A read that returns less than the room it had has emptied the socket, yet
/// the runtime still marks the socket readable: it learns otherwise only from
/// a read that would block. So the next read, or the pool's check of an idle
/// connection, would spend a system call to find nothing. The mark is cleared
/// here instead, in the same step as the read, before the runtime can have
/// seen anything newer. Data or a close that arrives later marks the socket
/// again; a close that has already arrived stays marked (the runtime never
/// clears "closed").
fn try_read_into(stream: &TcpStream, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
    let room = buf.capacity() - buf.len();
    let read = stream.try_read_buf(buf)?;
    if read > 0 && read < room {
        let nothing_more = || Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock));
        // `WouldBlock` is the answer asked for: it clears the mark.
        let _ = stream.try_io(Interest::READABLE, nothing_more);
    }
    Ok(read)
}

/// Parses a complete head off the front of `buf`, or returns `None` when it is
/// not all there yet. Header values are slices of the head's bytes, not copies,
/// as in hyper.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ExchangeError> {
    // Where each header's name and value lie in `buf`, recorded so that the
    // bytes can be split off and frozen once httparse's borrow has ended.
    // Zeroed in one sweep; httparse's own array is left uninitialised, as in
    // hyper: together they would be 6 KiB written for every response.
    let mut places = [const { (0..0, 0..0) }; MAX_HEADERS];
    let (length, code, minor, count) = {
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parser = httparse::ParserConfig::default();
        let httparse::Status::Complete(length) =
            parser.parse_response_with_uninit_headers(&mut response, buf, &mut fields)?
        else {
            return Ok(None);
        };
        let start = buf.as_ptr() as usize;
        let count = response.headers.len();
        for (place, field) in places.iter_mut().zip(response.headers.iter()) {
            let name = field.name.as_ptr() as usize - start;
            let value = field.value.as_ptr() as usize - start;
            *place = (
                name..name + field.name.len(),
                value..value + field.value.len(),
            );
        }
        (length, response.code, response.version, count)
    };
    let bytes = buf.split_to(length).freeze();
    let status = code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(ExchangeError::Invalid("bad status code"))?;
    let version = match minor {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // One more: the proxy adds the request id.
    let mut headers = HeaderMap::with_capacity(count + 1);
    let mut fields = FramingFields::default();
    for (name, value) in &places[..count] {
        let name = HeaderName::from_bytes(&bytes[name.clone()])
            .map_err(|_| ExchangeError::Invalid("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(value.clone()))
            .map_err(|_| ExchangeError::Invalid("bad header value"))?;
        fields.note(&name, &value);
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        fields,
    }))
}

/// Decides the body's framing and whether the connection can be reused, and
/// builds the response.
pub(super) fn finish_head<B>(
    head: Head,
    buf: BytesMut,
    is_head_request: bool,
    unsent: Option<Box<RequestWriter<B>>>,
    request_intact: bool,
) -> Result<Exchanged<B>, ExchangeError> {
    let Head {
        status,
        version,
        mut headers,
        fields,
    } = head;
    let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
        // What follows is the new protocol's, not a body: the connection is
        // handed over whole (see `PooledBody::into_upgraded`).
        Framing::Upgraded
    } else if is_head_request
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if fields.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(ExchangeError::Invalid("Transfer-Encoding in HTTP/1.0"));
        }
        // Only `chunked` is decoded. Any other coding (`gzip, chunked`, or
        // `chunked, gzip` read to the close) would reach the client as bytes
        // with no label once the hop-by-hop `Transfer-Encoding` is removed, so
        // such an answer is refused, as the request side refuses the same.
        if !is_single_chunked(&headers) {
            return Err(ExchangeError::Invalid(
                "unsupported transfer coding: only a single \"chunked\" is accepted",
            ));
        }
        // The client gets the decoded body, framed anew by our server; a
        // length the backend sent alongside would be a lie.
        headers.remove(CONTENT_LENGTH);
        Framing::Chunked(ChunkedDecoder::new())
    } else if fields.lengths > 0 {
        // One length of plain digits, as noted; anything else (a list,
        // several fields) by the general rule.
        let length = fields
            .length
            .filter(|_| fields.lengths == 1)
            .or_else(|| content_length(&headers))
            .ok_or(ExchangeError::Invalid("bad or conflicting Content-Length"))?;
        Framing::Length(length)
    } else {
        Framing::UntilClose
    };
    let keep_alive = match version {
        Version::HTTP_10 => fields.connection && has_connection_option(&headers, "keep-alive"),
        _ => !(fields.connection && has_connection_option(&headers, "close")),
    };
    let reusable = keep_alive && request_intact && !matches!(framing, Framing::UntilClose);
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Exchanged {
        response,
        reader: BodyReader {
            framing,
            buf,
            next_read: FIRST_READ,
        },
        unsent,
        reusable,
    })
}

fn is_single_chunked(headers: &HeaderMap) -> bool {
    let mut codings = list_items(headers, TRANSFER_ENCODING);
    codings
        .next()
        .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

fn has_connection_option(headers: &HeaderMap, option: &str) -> bool {
    list_items(headers, CONNECTION).any(|item| item.eq_ignore_ascii_case(option.as_bytes()))
}

/// How the response body ends.
#[derive(Debug)]
enum Framing {
    /// After this many more bytes (zero: no body at all).
    Length(u64),
    /// At the empty chunk and the trailers after it.
    Chunked(ChunkedDecoder),
    /// When the backend closes the connection.
    UntilClose,
    /// No body: after a `101` the connection speaks another protocol, and
    /// whatever was read past the head belongs to it.
    Upgraded,
}

/// Decodes a response body from the bytes of its connection. It owns the
/// read buffer (what followed the head, then what each read brings) and hands
/// out frames that are slices of it, never copies.
#[derive(Debug)]
pub(crate) struct BodyReader {
    framing: Framing,
    buf: BytesMut,
    /// The room made for the next read: doubles while reads fill it.
    next_read: usize,
}

/// One step of reading a body.
#[derive(Debug)]
pub(crate) enum Step {
    /// A frame for the client.
    Frame(Frame<Bytes>),
    /// The body has ended. `clean` says nothing was read past its end: bytes
    /// after a response are a broken backend's, and the connection is not
    /// reused (a close that comes later, the pool's checkout notices).
    End { clean: bool },
    /// More bytes are needed from the connection.
    Read,
}

impl BodyReader {
    /// Whether the body is known to have ended, without reading.
    pub(crate) fn is_end(&self) -> bool {
        match &self.framing {
            Framing::Length(remaining) => *remaining == 0,
            Framing::Chunked(decoder) => decoder.is_done(),
            Framing::UntilClose => false,
            Framing::Upgraded => true,
        }
    }

    /// Whether the response switched protocols (a `101`).
    pub(crate) fn is_upgraded(&self) -> bool {
        matches!(self.framing, Framing::Upgraded)
    }

    /// The bytes read past the head, which belong to the new protocol after a
    /// `101`.
    pub(crate) fn into_read_ahead(self) -> Bytes {
        self.buf.freeze()
    }

    /// The body's exact remaining size, when its framing says it.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(remaining) => Some(remaining),
            _ => None,
        }
    }

    /// Takes the next frame from what has been read, if there is one.
    pub(crate) fn step(&mut self) -> Result<Step, ExchangeError> {
        let clean_end = |buf: &BytesMut| Step::End {
            clean: buf.is_empty(),
        };
        match &mut self.framing {
            Framing::Length(0) => Ok(clean_end(&self.buf)),
            // Never a reusable end: the connection is the new protocol's.
            Framing::Upgraded => Ok(Step::End { clean: false }),
            Framing::Length(remaining) => {
                if self.buf.is_empty() {
                    return Ok(Step::Read);
                }
                let take =
                    usize::try_from(*remaining).map_or(self.buf.len(), |r| r.min(self.buf.len()));
                *remaining -= take as u64;
                Ok(Step::Frame(Frame::data(self.buf.split_to(take).freeze())))
            }
            Framing::Chunked(decoder) => Ok(match decoder.decode(&mut self.buf)? {
                Decoded::Data(data) => Step::Frame(Frame::data(data)),
                Decoded::Trailers(trailers) => Step::Frame(Frame::trailers(trailers)),
                Decoded::End => clean_end(&self.buf),
                Decoded::NeedMore => Step::Read,
            }),
            Framing::UntilClose if self.buf.is_empty() => Ok(Step::Read),
            Framing::UntilClose => Ok(Step::Frame(Frame::data(self.buf.split().freeze()))),
        }
    }

    /// Reads more of the body from `stream`. Returns `Ok(false)` when the
    /// backend has closed: the end of an `UntilClose` body, an error for others.
    pub(crate) fn poll_read(
        &mut self,
        stream: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<bool, ExchangeError>> {
        let want = match self.framing {
            // Never reserve more than the rest of a sized body.
            Framing::Length(remaining) => {
                usize::try_from(remaining).map_or(self.next_read, |r| r.min(self.next_read))
            }
            _ => self.next_read,
        };
        Poll::Ready(
            match ready!(poll_read_into(stream, cx, &mut self.buf, want)) {
                Ok(0) => match self.framing {
                    Framing::UntilClose => Ok(false),
                    _ => Err(ExchangeError::IncompleteBody),
                },
                Ok(read) => {
                    if read >= want && self.next_read < MAX_READ {
                        self.next_read *= 2;
                    }
                    Ok(true)
                }
                Err(e) => Err(ExchangeError::Io(e)),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::Empty;

    use super::*;

    /// The framing and reuse of a response with this head.
    fn framing_of(head: &str) -> Result<(Framing, bool), ExchangeError> {
        let mut buf = BytesMut::from(format!("{head}\r\n").as_str());
        let head = parse_head(&mut buf)?.expect("a complete head");
        let exchanged = finish_head::<Empty<Bytes>>(head, buf, false, None, true)?;
        Ok((exchanged.reader.framing, exchanged.reusable))
    }

    fn length_of(head: &str) -> Option<u64> {
        match framing_of(head) {
            Ok((Framing::Length(length), _)) => Some(length),
            _ => None,
        }
    }

    #[test]
    fn content_length_is_one_plain_number_however_it_is_written() {
        assert_eq!(
            length_of("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"),
            Some(5)
        );
        assert_eq!(
            length_of("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n"),
            Some(5)
        );
        assert_eq!(
            length_of("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n"),
            Some(5)
        );
        assert_eq!(
            length_of("HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n"),
            Some(u64::MAX)
        );
        for bad in [
            "5\r\nContent-Length: 6",
            "5, 6",
            "+5",
            "-1",
            "",
            "5 5",
            "0x5",
            "18446744073709551616",
        ] {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n");
            assert!(
                matches!(framing_of(&head), Err(ExchangeError::Invalid(_))),
                "{bad:?} was taken"
            );
        }
    }

    #[test]
    fn the_connection_is_reused_as_the_version_and_connection_say() {
        let reusable = |head: &str| framing_of(head).expect("a valid head").1;
        assert!(reusable("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"));
        assert!(!reusable(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n"
        ));
        assert!(!reusable("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n"));
        assert!(reusable(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n"
        ));
        // Read until the close: never reused.
        assert!(!reusable("HTTP/1.1 200 OK\r\n"));
        assert!(matches!(
            framing_of("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n"),
            Ok((Framing::Chunked(_), true))
        ));
    }
}
