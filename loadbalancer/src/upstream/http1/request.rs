//! The request side of an exchange: the head as the backend gets it, and the
//! body streamed after it, framed by length or in chunks.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::buf::Chain;
use bytes::{Buf, Bytes};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, HOST, HeaderName, HeaderValue, TE};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Method, Request, Uri, Version};
use hyper::body::Body;
use service_kit::BoxError;
use tokio::net::TcpStream;

use super::{ExchangeError, content_length};

/// A request head encoded for the backends once, when the request arrives.
///
/// Every attempt writes the same bytes, and the client's parsed head can be
/// dropped at once. That matters for memory: hyper's header values and URI
/// are slices of its connection's read buffer, so while they live, hyper
/// must take a second buffer for the connection's next read, and a request
/// waiting on a slow backend would hold both (8 KiB more per connection).
#[derive(Debug, Clone)]
pub(crate) struct UpstreamHead {
    /// The request line and header fields, without the empty line that ends
    /// the head (a `Host` for the backend may still come).
    bytes: Bytes,
    /// Where the path (without the query) lies in `bytes`, for the access log.
    path: Range<usize>,
    method: Method,
    framing: RequestFraming,
    /// The client sent no `Host` (HTTP/1.0 allows that): each attempt names
    /// its backend instead, as hyper-util's client did.
    needs_host: bool,
    /// The request asks to switch protocols (`Connection: upgrade`), so a
    /// `101` is a possible answer rather than a broken one.
    upgrade: bool,
    /// Which of the caller's own fields had sensitive values.
    own: OwnFieldMarks,
}

/// Where the fields of [`UpstreamHead::new`]'s `own` begin in its bytes, and
/// which of them had values marked sensitive: the bytes cannot carry the mark,
/// and [`UpstreamHead::to_http2`] puts it back. HPACK never indexes a
/// sensitive value; the request id is one, new on every request, which would
/// otherwise take a place in the backend connection's table and push out
/// fields that do repeat.
#[derive(Debug, Clone, Copy)]
struct OwnFieldMarks {
    /// The byte offset of the first own field.
    start: usize,
    /// Bit `i` is set when `own[i]` is sensitive, for the first eight (the
    /// proxy sets four). The lines after the own fields (the framing `new`
    /// adds) find no bit left.
    sensitive: u8,
}

impl UpstreamHead {
    /// Encodes the head of a request with these (already filtered) header
    /// fields and this body, and the fields of `own` in place of any the
    /// request has by the same names: what the caller sets on every request
    /// goes straight into the bytes, rather than into the request's map,
    /// which would grow for the one reading that encodes it. The target
    /// becomes the origin form, `/path?query`, whatever form the client used
    /// (absolute form through a forward proxy, say).
    pub(crate) fn new<B: Body>(
        request: &Parts,
        body: &B,
        own: &[(HeaderName, HeaderValue)],
    ) -> Self {
        let framing = RequestFraming::of(request, body);
        let target = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let headers = &request.headers;
        let method = request.method.as_str();
        let mut head = Vec::with_capacity(32 + target.len() + (headers.len() + own.len()) * 48);
        head.extend_from_slice(method.as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        let path_start = method.len() + 1;
        let path = path_start..path_start + request.uri.path().len().min(target.len());
        // What the fields say about the head, noted in the same pass.
        let (mut has_length, mut has_host, mut upgrade) = (false, false, false);
        for (name, value) in headers {
            // The proxy's own server answered the expectation, and the body
            // follows the head at once.
            if name == EXPECT || own.iter().any(|(own, _)| own == name) {
                continue;
            }
            has_length |= name == CONTENT_LENGTH;
            has_host |= name == HOST;
            upgrade |= name == CONNECTION && value.as_bytes().eq_ignore_ascii_case(b"upgrade");
            put_field(&mut head, name, value);
        }
        let mut marks = OwnFieldMarks {
            start: head.len(),
            sensitive: 0,
        };
        for (i, (name, value)) in own.iter().enumerate() {
            if value.is_sensitive() && i < 8 {
                marks.sensitive |= 1 << i;
            }
            put_field(&mut head, name, value);
        }
        match framing {
            RequestFraming::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            RequestFraming::Length(length) if !has_length => {
                head.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
            }
            _ => {}
        }
        Self {
            bytes: Bytes::from(head),
            path,
            method: request.method.clone(),
            framing,
            needs_host: !has_host,
            upgrade,
            own: marks,
        }
    }

    pub(crate) fn method(&self) -> &Method {
        &self.method
    }

    /// The request's path, without the query.
    pub(crate) fn path(&self) -> &str {
        std::str::from_utf8(&self.bytes[self.path.clone()]).unwrap_or_default()
    }

    /// Whether the request asks to switch protocols.
    pub(crate) fn asks_upgrade(&self) -> bool {
        self.upgrade
    }

    /// Whether a body follows the head.
    pub(crate) fn has_body(&self) -> bool {
        !matches!(self.framing, RequestFraming::None)
    }

    /// The head as an HTTP/2 request to `backend` (cleartext, `h2c`), for the
    /// HTTP/2 client (`upstream::http2`); its body is the caller's to attach.
    ///
    /// Read back from the encoded bytes rather than kept from the client's
    /// parsed head, so that the HTTP/1.1 path, which never calls this, keeps
    /// paying nothing for it (see the type's doc for why the parsed head goes).
    /// The values are slices of those bytes, not copies. The target becomes an
    /// absolute URI, `http://{authority}{target}`, whose authority is the
    /// `Host` (or, for a client that sent none, the backend), and `Host` itself
    /// goes: HTTP/2 carries it as `:authority`. So do the fields that only
    /// describe an HTTP/1.1 connection, which RFC 9113 section 8.2.2 forbids:
    /// the `Transfer-Encoding` this head framed its body with, and the
    /// `Connection` and `Upgrade` of a protocol switch, which HTTP/2 cannot
    /// carry (such a request must go over HTTP/1.1; see [`asks_upgrade`]).
    /// `TE: trailers` stays, as gRPC needs it, and so does `Content-Length`.
    /// The own fields that `new` got with sensitive values are sensitive again.
    ///
    /// Fails only when the client's `Host` is not a valid authority (or its
    /// target not a valid path), which no HTTP/2 request can carry.
    ///
    /// [`asks_upgrade`]: Self::asks_upgrade
    pub(crate) fn to_http2(&self, backend: SocketAddr) -> Result<Request<()>, http::Error> {
        let head = &self.bytes;
        let mut lines = Lines { head, at: 0 };
        // The request line is `METHOD SP target SP HTTP/1.1`, as `new` wrote it.
        let request_line = lines.next().unwrap_or_default();
        let target = request_line.start + self.method.as_str().len() + 1
            ..request_line.end - " HTTP/1.1".len();
        let mut authority = None;
        let mut headers = HeaderMap::with_capacity(16);
        // The marks of the own fields still to come, the next one lowest.
        let mut own_marks = self.own.sensitive;
        for line in lines {
            let own_field = line.start >= self.own.start;
            let sensitive = own_field && own_marks & 1 == 1;
            if own_field {
                own_marks >>= 1;
            }
            // A field line is `name: value`, as `new` wrote it; a name never
            // holds a colon.
            let colon = line.start
                + head[line.clone()]
                    .iter()
                    .position(|&b| b == b':')
                    .unwrap_or(line.len());
            let name = HeaderName::from_bytes(&head[line.start..colon])?;
            let value = head.slice((colon + 2).min(line.end)..line.end);
            if name == HOST {
                authority.get_or_insert(value);
            } else if !is_connection_specific(&name, &value) {
                let mut value = HeaderValue::from_maybe_shared(value)?;
                value.set_sensitive(sensitive);
                headers.append(name, value);
            }
        }
        let authority = match authority {
            Some(host) => Authority::from_maybe_shared(host)?,
            None => Authority::try_from(backend.to_string())?,
        };
        let uri = Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(authority)
            .path_and_query(PathAndQuery::from_maybe_shared(head.slice(target))?)
            .build()?;
        let mut request = Request::new(());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_2;
        *request.headers_mut() = headers;
        Ok(request)
    }

    /// The head as written to `backend`.
    fn for_backend(&self, backend: SocketAddr) -> Piece {
        let host = if self.needs_host {
            Bytes::from(format!("host: {backend}\r\n"))
        } else {
            Bytes::new()
        };
        piece(self.bytes.clone(), host, b"\r\n")
    }
}

/// The lines of an encoded head, each without its CRLF, as ranges of it.
struct Lines<'a> {
    head: &'a [u8],
    /// Where the next line starts.
    at: usize,
}

impl Iterator for Lines<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let rest = self.head.get(self.at..).filter(|rest| !rest.is_empty())?;
        let start = self.at;
        let length = rest
            .windows(2)
            .position(|pair| pair == b"\r\n")
            .unwrap_or(rest.len());
        self.at = start + length + 2;
        Some(start..start + length)
    }
}

/// Whether a field describes an HTTP/1.1 connection, and so may not travel
/// in an HTTP/2 request (RFC 9113 section 8.2.2): `TE` is allowed only as
/// `trailers`.
fn is_connection_specific(name: &HeaderName, value: &[u8]) -> bool {
    if name == TE {
        return !value.eq_ignore_ascii_case(b"trailers");
    }
    // Names are stored lower-case.
    matches!(
        name.as_str(),
        "connection" | "transfer-encoding" | "upgrade" | "keep-alive" | "proxy-connection"
    )
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy)]
enum RequestFraming {
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
    fn of<B: Body>(request: &Parts, body: &B) -> Self {
        if body.is_end_stream() {
            return RequestFraming::None;
        }
        match content_length(&request.headers) {
            Some(length) => RequestFraming::Length(length),
            None => body
                .size_hint()
                .exact()
                .map_or(RequestFraming::Chunked, RequestFraming::Length),
        }
    }
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
    /// Writes `head` to `backend`, then `body` (`None` for a bodiless request).
    pub(super) fn new(head: &UpstreamHead, backend: SocketAddr, body: Option<B>) -> Self {
        Self {
            pending: Some(head.for_backend(backend)),
            body,
            framing: head.framing,
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

/// Appends `name: value` and its line end to an encoded head.
fn put_field(head: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    head.extend_from_slice(name.as_str().as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value.as_bytes());
    head.extend_from_slice(b"\r\n");
}

fn piece(prefix: Bytes, data: Bytes, suffix: &'static [u8]) -> Piece {
    prefix.chain(data).chain(suffix)
}

fn body_mismatch(what: &str) -> ExchangeError {
    ExchangeError::RequestBody(format!("the request body is {what}").into())
}

#[cfg(test)]
mod tests {
    use http::header::UPGRADE;
    use http_body_util::{Empty, Full, StreamBody};

    use super::*;

    fn head_of<B: Body>(request: Request<B>) -> UpstreamHead {
        let (parts, body) = request.into_parts();
        UpstreamHead::new(&parts, &body, &[])
    }

    fn written(head: &UpstreamHead, backend: &str) -> String {
        let mut piece = head.for_backend(backend.parse().expect("an address"));
        String::from_utf8(piece.copy_to_bytes(piece.remaining()).to_vec()).expect("ASCII")
    }

    #[test]
    fn the_target_goes_out_in_origin_form_and_the_log_gets_its_path() {
        let head = head_of(
            Request::get("http://example.test/a/b?x=1")
                .header(HOST, "example.test")
                .body(Empty::<Bytes>::new())
                .expect("valid request"),
        );
        assert_eq!(
            written(&head, "10.0.0.1:8080"),
            "GET /a/b?x=1 HTTP/1.1\r\nhost: example.test\r\n\r\n"
        );
        assert_eq!(head.path(), "/a/b");
        assert!(!head.has_body());
    }

    #[test]
    fn the_callers_own_fields_replace_the_requests_by_the_same_names() {
        let (parts, body) = Request::post("/")
            .header(HOST, "example.test")
            .header("x-mine", "from the client")
            .header("x-mine", "twice")
            .header("content-length", "2")
            .header("x-kept", "1")
            .body(Full::new(Bytes::from_static(b"hi")))
            .expect("valid request")
            .into_parts();
        let own = [(
            HeaderName::from_static("x-mine"),
            HeaderValue::from_static("ours"),
        )];
        let head = UpstreamHead::new(&parts, &body, &own);
        assert_eq!(
            written(&head, "10.0.0.1:8080"),
            "POST / HTTP/1.1\r\nhost: example.test\r\ncontent-length: 2\r\nx-kept: 1\r\n\
             x-mine: ours\r\n\r\n"
        );
    }

    #[test]
    fn a_request_without_host_names_each_backend_it_goes_to() {
        let head = head_of(
            Request::get("/")
                .body(Empty::<Bytes>::new())
                .expect("valid request"),
        );
        assert_eq!(
            written(&head, "10.0.0.1:8080"),
            "GET / HTTP/1.1\r\nhost: 10.0.0.1:8080\r\n\r\n"
        );
        assert_eq!(
            written(&head, "10.0.0.2:8080"),
            "GET / HTTP/1.1\r\nhost: 10.0.0.2:8080\r\n\r\n"
        );
    }

    /// The fields of an HTTP/2 request head as `name: value` lines, in order.
    fn fields(request: &Request<()>) -> Vec<String> {
        request
            .headers()
            .iter()
            .map(|(name, value)| format!("{name}: {}", value.to_str().expect("ASCII")))
            .collect()
    }

    #[test]
    fn the_http2_head_has_an_absolute_uri_and_no_connection_fields() {
        let frames = futures::stream::iter([Ok::<_, std::convert::Infallible>(
            hyper::body::Frame::data(Bytes::from_static(b"x")),
        )]);
        // What the proxy leaves of a gRPC call through an upgrade-asking
        // client: `TE: trailers` restored, `Connection: upgrade` kept.
        let head = head_of(
            Request::post("/pkg.Service/Call?x=1")
                .header(HOST, "api.example.test:8080")
                .header(TE, "trailers")
                .header(CONNECTION, "upgrade")
                .header(UPGRADE, "websocket")
                .header("content-type", "application/grpc")
                .header("x-forwarded-for", "10.1.2.3")
                .body(StreamBody::new(frames))
                .expect("valid request"),
        );
        let request = head
            .to_http2("10.0.0.1:50051".parse().expect("an address"))
            .expect("a valid HTTP/2 head");
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.version(), Version::HTTP_2);
        assert_eq!(
            request.uri(),
            "http://api.example.test:8080/pkg.Service/Call?x=1"
        );
        // `Host` became the authority; `Connection`, `Upgrade` and the
        // chunked framing this head added for HTTP/1.1 are gone.
        assert_eq!(
            fields(&request),
            [
                "te: trailers",
                "content-type: application/grpc",
                "x-forwarded-for: 10.1.2.3",
            ]
        );
    }

    #[test]
    fn own_fields_with_sensitive_values_are_sensitive_again_in_the_http2_head() {
        let (parts, body) = Request::post("/pkg.Service/Call")
            .header(HOST, "api.example.test")
            .header("x-request-id", "from-the-client")
            .header("user-agent", "test")
            .body(Full::new(Bytes::from_static(b"hello")))
            .expect("valid request")
            .into_parts();
        let mut request_id = HeaderValue::from_static("0123abcd");
        request_id.set_sensitive(true);
        let own = [
            (
                HeaderName::from_static("x-forwarded-proto"),
                HeaderValue::from_static("http"),
            ),
            (HeaderName::from_static("x-request-id"), request_id),
        ];
        let request = UpstreamHead::new(&parts, &body, &own)
            .to_http2("10.0.0.1:50051".parse().expect("an address"))
            .expect("a valid HTTP/2 head");
        // The client's own id gave way to the proxy's; `content-length`,
        // written after the own fields, is not one of them.
        let marks: Vec<_> = request
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str(), value.is_sensitive()))
            .collect();
        assert_eq!(
            marks,
            [
                ("user-agent", false),
                ("x-forwarded-proto", false),
                ("x-request-id", true),
                ("content-length", false),
            ]
        );
    }

    #[test]
    fn the_http2_head_keeps_content_length_and_names_the_backend_without_host() {
        let head = head_of(
            Request::put("/items/7")
                .header(CONTENT_LENGTH, "5")
                .header(TE, "gzip")
                .body(Full::new(Bytes::from_static(b"hello")))
                .expect("valid request"),
        );
        let request = head
            .to_http2("10.0.0.2:8080".parse().expect("an address"))
            .expect("a valid HTTP/2 head");
        assert_eq!(request.uri(), "http://10.0.0.2:8080/items/7");
        // `TE` other than `trailers` is forbidden in HTTP/2.
        assert_eq!(fields(&request), ["content-length: 5"]);
    }

    #[test]
    fn a_host_that_is_no_authority_cannot_go_over_http2() {
        let head = head_of(
            Request::get("/")
                .header(HOST, "not a host")
                .body(Empty::<Bytes>::new())
                .expect("valid request"),
        );
        assert!(
            head.to_http2("10.0.0.1:80".parse().expect("an address"))
                .is_err()
        );
    }

    #[test]
    fn a_body_is_framed_by_its_length_or_chunked_and_expect_stays_behind() {
        let head = head_of(
            Request::post("/upload")
                .header(HOST, "h")
                .header(EXPECT, "100-continue")
                .body(Full::new(Bytes::from_static(b"hello")))
                .expect("valid request"),
        );
        assert_eq!(
            written(&head, "10.0.0.1:1"),
            "POST /upload HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\n"
        );

        // A body of unknown length, with no Content-Length from the client.
        let frames = futures::stream::iter([Ok::<_, std::convert::Infallible>(
            hyper::body::Frame::data(Bytes::from_static(b"x")),
        )]);
        let head = head_of(
            Request::post("/stream")
                .header(HOST, "h")
                .body(StreamBody::new(frames))
                .expect("valid request"),
        );
        assert_eq!(
            written(&head, "10.0.0.1:1"),
            "POST /stream HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert!(head.has_body());
    }
}
