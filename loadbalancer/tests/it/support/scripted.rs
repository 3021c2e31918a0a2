//! A scripted raw backend, for the wire-level tests of the proxy's upstream
//! client: it answers with exactly the bytes a test gives it (framings, interim
//! responses, broken heads no HTTP library would write) and records exactly the
//! bytes the proxy sent it, connection by connection.
//!
//! Requests take the script's answers in order, whichever connection they arrive
//! on. Each answer says what happens next: the connection stays open for the
//! next request, or the backend closes it (at once, or after a lingering close
//! that reads what the peer still sends). A request that arrives when the
//! script is used up gets no answer; its connection is closed, which the proxy
//! reports as a 502, so an unplanned request fails the test that sent it.
//!
//! The backend reads just enough HTTP/1.1 to find where a request ends: the
//! head, then a `Content-Length` or chunked body.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::PATIENCE;
use super::raw::find;

/// One scripted answer: raw bytes, and what the backend does around them.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    bytes: Vec<u8>,
    /// What becomes of the connection once `bytes` are written.
    then: Then,
    /// Answer as soon as the head has arrived, without reading the body.
    before_body: bool,
}

/// What the backend does with a connection after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Waits for the next request.
    KeepOpen,
    /// Closes at once. Bytes the peer sent that were never read make the
    /// kernel reset the connection rather than close it, and a reset may cost
    /// the peer the answer it has not read yet.
    Close,
    /// Shuts down its sending side, then reads and discards whatever the peer
    /// still sends until the peer closes: the "lingering close" of nginx and
    /// Apache, which lets an early answer reach the peer whole.
    Linger,
}

impl Answer {
    /// `bytes`, then the connection stays open for the next request.
    pub(crate) fn keep_open(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            bytes: bytes.into(),
            then: Then::KeepOpen,
            before_body: false,
        }
    }

    /// `bytes`, then the backend closes the connection.
    pub(crate) fn then_close(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            then: Then::Close,
            ..Self::keep_open(bytes)
        }
    }

    /// `bytes` as soon as the request head has arrived, the body left unread,
    /// then the backend closes the connection at once: a server refusing an
    /// upload early, and resetting the connection under the rest of it.
    pub(crate) fn before_body_then_close(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            before_body: true,
            ..Self::then_close(bytes)
        }
    }

    /// Like [`Answer::before_body_then_close`], with a lingering close: the rest
    /// of the body is read and discarded, not reset.
    pub(crate) fn before_body_then_linger(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            then: Then::Linger,
            ..Self::before_body_then_close(bytes)
        }
    }

    /// A keep-alive `200 OK` with `body` and its `Content-Length`.
    pub(crate) fn ok(body: &str) -> Self {
        Self::keep_open(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ))
    }
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    /// The request line and header lines, with the blank line ending them.
    pub(crate) head: String,
    /// Every byte of the request, head and framed body, as sent.
    pub(crate) raw: Vec<u8>,
    /// The body's content with its framing (chunk sizes, trailers) taken off;
    /// empty when the body was left unread.
    pub(crate) body: Vec<u8>,
}

impl Received {
    /// `METHOD target VERSION`.
    pub(crate) fn request_line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or_default()
    }

    /// Every value of header `name` (any case), in order.
    pub(crate) fn header_values(&self, name: &str) -> Vec<&str> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect()
    }

    /// The first value of header `name` (any case).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).first().copied()
    }
}

/// A running scripted backend on 127.0.0.1.
#[derive(Debug)]
pub(crate) struct ScriptedBackend {
    pub(crate) addr: SocketAddr,
    /// Per accepted connection, in accept order, the requests read on it.
    connections: Arc<Mutex<Vec<Vec<Received>>>>,
    /// The accept loop; it owns every connection task, so aborting it tears all down.
    task: JoinHandle<()>,
}

impl ScriptedBackend {
    /// Starts a backend that answers requests with `script`, in order.
    pub(crate) async fn start(script: impl IntoIterator<Item = Answer>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound socket has an address");
        let script = Arc::new(Mutex::new(script.into_iter().collect::<VecDeque<_>>()));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while tasks.try_join_next().is_some() {}
                // Registered before anything is read, so a test that has its
                // answer also sees the connection counted.
                let index = {
                    let mut log = lock(&log);
                    log.push(Vec::new());
                    log.len() - 1
                };
                tasks.spawn(serve(stream, Arc::clone(&script), Arc::clone(&log), index));
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    /// How many requests arrived on each connection, in accept order.
    pub(crate) fn requests_per_connection(&self) -> Vec<usize> {
        lock(&self.connections).iter().map(Vec::len).collect()
    }

    /// Every request received so far, in arrival order per connection,
    /// connections in accept order.
    pub(crate) fn requests(&self) -> Vec<Received> {
        lock(&self.connections).concat()
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads requests off one connection and answers each from the script.
async fn serve(
    mut stream: TcpStream,
    script: Arc<Mutex<VecDeque<Answer>>>,
    log: Arc<Mutex<Vec<Vec<Received>>>>,
    index: usize,
) {
    let mut buffered = Vec::new();
    loop {
        let head_len = loop {
            if let Some(at) = find(&buffered, b"\r\n\r\n") {
                break at + 4;
            }
            if !fill(&mut stream, &mut buffered).await {
                return;
            }
        };
        let Some(answer) = lock(&script).pop_front() else {
            return;
        };
        let head = String::from_utf8_lossy(&buffered[..head_len]).into_owned();
        let (body_len, body) = if answer.before_body {
            (0, Vec::new())
        } else {
            let framing = Framing::of(&head);
            loop {
                if let Some(end) = framing.body_end(&buffered[head_len..]) {
                    break end;
                }
                if !fill(&mut stream, &mut buffered).await {
                    return;
                }
            }
        };
        let raw = buffered.drain(..head_len + body_len).collect();
        lock(&log)[index].push(Received { head, raw, body });
        if stream.write_all(&answer.bytes).await.is_err() {
            return;
        }
        match answer.then {
            Then::KeepOpen => {}
            // Dropping the stream closes it.
            Then::Close => return,
            Then::Linger => {
                let _ = stream.shutdown().await;
                // Bounded, so a peer that never closes cannot keep the task.
                let _ = tokio::time::timeout(PATIENCE, async {
                    while fill(&mut stream, &mut buffered).await {
                        buffered.clear();
                    }
                })
                .await;
                return;
            }
        }
    }
}

/// Reads more bytes into `buffered`; false once the peer has closed.
async fn fill(stream: &mut TcpStream, buffered: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buffered.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// How a request's body is delimited (RFC 9112 section 6.3, for requests).
#[derive(Debug)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
}

impl Framing {
    fn of(head: &str) -> Self {
        let mut framing = Framing::Empty;
        for (name, value) in head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
        {
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().ends_with("chunked")
            {
                // Chunked wins over any Content-Length.
                return Framing::Chunked;
            }
            if name.eq_ignore_ascii_case("content-length") {
                framing = Framing::Length(value.parse().expect("numeric Content-Length"));
            }
        }
        framing
    }

    /// Where the body that starts `bytes` ends, and its content; `None` while
    /// it has not all arrived.
    fn body_end(&self, bytes: &[u8]) -> Option<(usize, Vec<u8>)> {
        match *self {
            Framing::Empty => Some((0, Vec::new())),
            Framing::Length(len) => bytes.get(..len).map(|body| (len, body.to_vec())),
            Framing::Chunked => chunked_end(bytes),
        }
    }
}

/// Decodes a chunked body: chunks (`size[;ext]` CRLF, data, CRLF) up to the
/// zero-size one, then trailer lines up to a blank line.
fn chunked_end(bytes: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let line_end = at + find(&bytes[at..], b"\r\n")?;
        let line = std::str::from_utf8(&bytes[at..line_end]).expect("ASCII chunk size line");
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).expect("hexadecimal chunk size");
        at = line_end + 2;
        if size == 0 {
            loop {
                let end = at + find(&bytes[at..], b"\r\n")?;
                let blank = end == at;
                at = end + 2;
                if blank {
                    return Some((at, body));
                }
            }
        }
        body.extend_from_slice(bytes.get(at..at + size)?);
        bytes.get(at + size..at + size + 2)?;
        at += size + 2;
    }
}

// A poisoned lock means a test's backend task panicked; its log is still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
