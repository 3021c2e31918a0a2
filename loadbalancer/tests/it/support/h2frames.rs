//! HTTP/2 by hand, for what no HTTP/2 library would send: floods of control
//! frames, streams reset as soon as they open, header blocks that never end.
//! A frame is its 9-byte header (length, type, flags, stream) and a payload
//! (RFC 9113 section 4.1); a request head is a few HPACK fields that need no
//! table (RFC 7541): indexed `:method GET` and `:scheme http`, and literals
//! without indexing for `:path` and `:authority`, so no decoder state is kept.
//!
//! [`H2Conn`] is one connection after the preface: it sends bytes as given and
//! reads frames, acknowledging the server's `PING`s so that a graceful close
//! (GOAWAY, then a `PING` it waits for) can complete. [`flood`] sends a bounded
//! flood while reading what comes back, and reports how the connection ended.
//! The other side of each test is a real client: [`h2_client`], hyper's own.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper::body::Body;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::PATIENCE;
use crate::support::Reply;

/// What every HTTP/2 connection with prior knowledge begins with.
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
pub(crate) const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const CONTINUATION: u8 = 0x9;

/// `END_STREAM` on `HEADERS` and `DATA`; `ACK` on `SETTINGS` and `PING`.
pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;

/// `SETTINGS_MAX_CONCURRENT_STREAMS`.
pub(crate) const MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// Error codes (RFC 9113 section 7).
pub(crate) const NO_ERROR: u32 = 0x0;
pub(crate) const REFUSED_STREAM: u32 = 0x7;
pub(crate) const CANCEL: u32 = 0x8;
pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame, encoded.
pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .expect("a test frame is small")
        .to_be_bytes();
    let mut bytes = vec![length[1], length[2], length[3], kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// A `SETTINGS` frame with these parameters.
pub(crate) fn settings(parameters: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = parameters
        .iter()
        .flat_map(|(id, value)| [&id.to_be_bytes()[..], &value.to_be_bytes()].concat())
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

pub(crate) fn ping(payload: [u8; 8]) -> Vec<u8> {
    frame(PING, 0, 0, &payload)
}

pub(crate) fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// The header block of `GET path` for `authority`.
pub(crate) fn get_block(path: &str, authority: &str) -> Vec<u8> {
    // Static table: 2 is `:method GET`, 6 `:scheme http`; 4 names `:path`
    // and 1 `:authority`.
    let mut block = vec![0x82, 0x86];
    literal(&mut block, 4, path.as_bytes());
    literal(&mut block, 1, authority.as_bytes());
    block
}

/// A header field with the name at static `index` and `value`, literal and
/// not indexed, its length an HPACK integer with a 7-bit prefix.
pub(crate) fn literal(block: &mut Vec<u8>, index: u8, value: &[u8]) {
    block.push(index);
    let mut length = value.len();
    if length < 127 {
        block.push(length as u8);
    } else {
        block.push(127);
        length -= 127;
        while length >= 128 {
            block.push((length % 128) as u8 | 0x80);
            length /= 128;
        }
        block.push(length as u8);
    }
    block.extend_from_slice(value);
}

/// `GET path` as one `HEADERS` frame that ends the stream.
pub(crate) fn get(stream: u32, path: &str, authority: &str) -> Vec<u8> {
    frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        stream,
        &get_block(path, authority),
    )
}

/// One frame as read.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
    pub(crate) payload: Vec<u8>,
}

impl Frame {
    /// The error code of a `GOAWAY` or `RST_STREAM`.
    pub(crate) fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        let code: [u8; 4] = self.payload[at..at + 4]
            .try_into()
            .expect("a GOAWAY or RST_STREAM carries an error code");
        u32::from_be_bytes(code)
    }

    /// The parameters of a `SETTINGS` frame.
    pub(crate) fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|p| {
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                )
            })
            .collect()
    }
}

/// Frames in a buffer of bytes read, taken off its front once whole.
#[derive(Debug, Default)]
struct FrameReader {
    buffered: Vec<u8>,
}

impl FrameReader {
    fn next(&mut self) -> Option<Frame> {
        let header = self.buffered.get(..9)?;
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        if self.buffered.len() < 9 + length {
            return None;
        }
        let frame = Frame {
            kind: header[3],
            flags: header[4],
            stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff,
            payload: self.buffered[9..9 + length].to_vec(),
        };
        self.buffered.drain(..9 + length);
        Some(frame)
    }
}

/// A raw HTTP/2 client connection, past its preface and first `SETTINGS`.
#[derive(Debug)]
pub(crate) struct H2Conn {
    stream: TcpStream,
    reader: FrameReader,
}

impl H2Conn {
    /// Connects and sends the preface and an empty `SETTINGS`.
    pub(crate) async fn connect(addr: SocketAddr) -> Self {
        let stream = connect(addr).await;
        let mut conn = Self {
            stream,
            reader: FrameReader::default(),
        };
        conn.send(&[PREFACE, &settings(&[])].concat()).await;
        conn
    }

    /// Sends `bytes`; false if the server has closed the connection.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// The next frame, or `None` once the server has closed the connection.
    /// The server's `PING`s are acknowledged on the way. Panics if neither
    /// comes within [`PATIENCE`].
    pub(crate) async fn next_frame(&mut self) -> Option<Frame> {
        tokio::time::timeout(PATIENCE, self.read_frame())
            .await
            .expect("a frame or a close within PATIENCE")
    }

    /// The next frame of type `kind`, the others skipped.
    pub(crate) async fn next_of(&mut self, kind: u8) -> Option<Frame> {
        loop {
            let frame = self.next_frame().await?;
            if frame.kind == kind {
                return Some(frame);
            }
        }
    }

    async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.reader.next() {
                if frame.kind == PING && frame.flags & ACK == 0 {
                    let payload = frame.payload.clone();
                    self.send(&frame_ping_ack(&payload)).await;
                }
                return Some(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.reader.buffered.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn frame_ping_ack(payload: &[u8]) -> Vec<u8> {
    frame(PING, ACK, 0, payload)
}

/// How a flooding connection ended.
#[derive(Debug)]
pub(crate) struct FloodEnd {
    /// Every frame the server sent before it closed the connection.
    pub(crate) frames: Vec<Frame>,
}

impl FloodEnd {
    /// The error codes of the `GOAWAY`s the server sent.
    pub(crate) fn goaways(&self) -> Vec<u32> {
        self.frames
            .iter()
            .filter(|frame| frame.kind == GOAWAY)
            .map(Frame::error_code)
            .collect()
    }

    /// The last stream the server's first `GOAWAY` says it processed.
    pub(crate) fn goaway_last_stream(&self) -> Option<u32> {
        let goaway = self.frames.iter().find(|frame| frame.kind == GOAWAY)?;
        let id: [u8; 4] = goaway.payload.get(..4)?.try_into().ok()?;
        Some(u32::from_be_bytes(id) & 0x7fff_ffff)
    }
}

/// Opens a connection to `addr`, sends `opening`, then `batches` (each one
/// write) while reading what the server sends, and returns once the server has
/// closed the connection. Panics if it has not within [`PATIENCE`] after the
/// last batch: a flood that is not stopped is the failure these tests look for.
pub(crate) async fn flood(
    addr: SocketAddr,
    opening: &[u8],
    batches: impl Iterator<Item = Vec<u8>>,
) -> FloodEnd {
    let mut conn = H2Conn::connect(addr).await;
    conn.send(opening).await;
    let (mut read, mut write) = conn.stream.into_split();
    // Read all along, so the server is never held up writing its answers
    // (PONGs, SETTINGS acknowledgements) to a client that does not read.
    let reader = tokio::spawn(async move {
        let mut frames = FrameReader::default();
        let mut seen = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return seen,
                Ok(n) => {
                    frames.buffered.extend_from_slice(&chunk[..n]);
                    seen.extend(std::iter::from_fn(|| frames.next()));
                }
            }
        }
    });
    // The kernel may take every batch even after the server has closed, so
    // the writes tell nothing; the close is what the reader sees.
    for batch in batches {
        if write.write_all(&batch).await.is_err() {
            break;
        }
    }
    // The write half stays open until the server has closed: a client that
    // closed its side would be closed for that instead.
    let frames = tokio::time::timeout(PATIENCE, reader)
        .await
        .expect("the server closes a flooding connection")
        .expect("the reader does not panic");
    drop(write);
    FloodEnd { frames }
}

/// A hyper HTTP/2 client connection to `addr`, prior knowledge (h2c).
pub(crate) async fn h2_client<B>(addr: SocketAddr) -> SendRequest<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    h2_handshake(connect(addr).await).await
}

async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(PATIENCE, TcpStream::connect(addr))
        .await
        .expect("connect within PATIENCE")
        .expect("the server's port is open")
}

/// The HTTP/2 handshake over `io`, its connection driven on a task of its own.
pub(crate) async fn h2_handshake<B, I>(io: I) -> SendRequest<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("the HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

/// `GET url` on `client`, the whole response collected within [`PATIENCE`].
pub(crate) async fn h2_get(client: &mut SendRequest<Full<Bytes>>, url: &str) -> Reply {
    let request = Request::get(url)
        .body(Full::default())
        .expect("a valid request");
    h2_send(client, request).await
}

/// Sends `request` on `client` and collects the response within [`PATIENCE`].
pub(crate) async fn h2_send<B>(client: &mut SendRequest<B>, request: Request<B>) -> Reply
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let exchange = async {
        client
            .ready()
            .await
            .expect("the connection takes a request");
        let response = client
            .send_request(request)
            .await
            .expect("the server answers");
        Reply::read(response).await
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("exchange completes within PATIENCE")
}

/// `GET url` `count` times at once on `client`'s one connection, each on a
/// task of its own.
pub(crate) fn spawn_gets(
    client: &SendRequest<Full<Bytes>>,
    url: &str,
    count: usize,
) -> Vec<tokio::task::JoinHandle<Reply>> {
    (0..count)
        .map(|_| {
            let (mut client, url) = (client.clone(), url.to_owned());
            tokio::spawn(async move { h2_get(&mut client, &url).await })
        })
        .collect()
}

/// Sends `GET url` `count` times on one new HTTP/2 connection to `addr`, one
/// after the other, and checks each is answered 200: a client that is not
/// flooding, served while another is.
pub(crate) async fn assert_served(addr: SocketAddr, url: &str, count: usize) {
    let mut client = h2_client(addr).await;
    for _ in 0..count {
        let reply = h2_get(&mut client, url).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        // A small pause, so that the requests spread over the flood.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
