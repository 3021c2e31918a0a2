//! A raw TCP client, for requests that no HTTP library would send: malformed
//! request lines, conflicting framing, heads that trickle in or never end. It
//! reads answers by hand, just enough HTTP/1.1 to tell a status, the headers and a
//! `Content-Length` body apart, and it tells "the server closed the connection"
//! apart from "nothing has arrived yet".

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::PATIENCE;

/// One answer, read off the wire.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub(crate) status: u16,
    /// Header lines, names lower-cased.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl RawResponse {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("response body is JSON")
    }
}

/// A client connection that sends exactly the bytes it is given.
#[derive(Debug)]
pub(crate) struct RawConn {
    stream: TcpStream,
    /// Bytes read but not yet consumed as part of a response.
    buffered: Vec<u8>,
    /// The server closed (or reset) the connection.
    eof: bool,
}

impl RawConn {
    pub(crate) async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(PATIENCE, TcpStream::connect(addr))
            .await
            .expect("connect within PATIENCE")
            .expect("the server's port is open");
        Self {
            stream,
            buffered: Vec::new(),
            eof: false,
        }
    }

    /// Connects to `addr`, sends `bytes`, and returns everything the server
    /// sent until it closed the connection.
    pub(crate) async fn send_until_closed(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
        let mut client = Self::connect(addr).await;
        client.send(bytes).await;
        client.closed().await
    }

    /// Sends `bytes`. A server that has already answered and closed may refuse
    /// the rest, which is fine: the answer is what the tests look at.
    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads one response, or `None` if the server closed the connection first.
    /// Panics if neither happens within [`PATIENCE`].
    pub(crate) async fn response(&mut self) -> Option<RawResponse> {
        tokio::time::timeout(PATIENCE, self.read_response())
            .await
            .expect("a response or a close within PATIENCE")
    }

    /// Reads one response if one arrives within `wait`. For asserting that a
    /// server has *not* answered yet: a slow machine can only make this pass
    /// more often, never fail a correct server.
    pub(crate) async fn response_within(&mut self, wait: Duration) -> Option<Option<RawResponse>> {
        tokio::time::timeout(wait, self.read_response()).await.ok()
    }

    /// Waits until the server closes the connection, and returns whatever it
    /// sent before closing (unread earlier responses included).
    pub(crate) async fn closed(&mut self) -> Vec<u8> {
        tokio::time::timeout(PATIENCE, async { while self.fill().await {} })
            .await
            .expect("the server closes the connection within PATIENCE");
        std::mem::take(&mut self.buffered)
    }

    /// Reads exactly `n` more bytes past any response read so far: what a
    /// tunnel carries after its `101`. Panics if they do not come within
    /// [`PATIENCE`].
    pub(crate) async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        tokio::time::timeout(PATIENCE, async {
            while self.buffered.len() < n {
                assert!(
                    self.fill().await,
                    "the connection closed after {:?}",
                    self.buffered
                );
            }
        })
        .await
        .expect("the bytes arrive within PATIENCE");
        self.buffered.drain(..n).collect()
    }

    /// Closes the sending side, as a client ending its stream does.
    pub(crate) async fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    async fn read_response(&mut self) -> Option<RawResponse> {
        let head_end = loop {
            if let Some(at) = find(&self.buffered, b"\r\n\r\n") {
                break at;
            }
            if !self.fill().await {
                assert!(
                    self.buffered.is_empty(),
                    "connection closed inside a response head: {:?}",
                    String::from_utf8_lossy(&self.buffered)
                );
                return None;
            }
        };
        let head = String::from_utf8(self.buffered[..head_end].to_vec()).expect("ASCII head");
        self.buffered.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("a status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        assert!(
            response.header("transfer-encoding").is_none(),
            "the raw client reads Content-Length bodies only"
        );
        let length: usize = response
            .header("content-length")
            .map_or(0, |v| v.parse().expect("numeric Content-Length"));
        while self.buffered.len() < length {
            assert!(self.fill().await, "connection closed inside a body");
        }
        response.body = self.buffered.drain(..length).collect();
        Some(response)
    }

    /// Reads more bytes; false once the server has closed (or reset) the
    /// connection.
    async fn fill(&mut self) -> bool {
        if self.eof {
            return false;
        }
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                self.eof = true;
                false
            }
            Ok(n) => {
                self.buffered.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }
}

/// Where `needle` first occurs in `haystack`.
pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
