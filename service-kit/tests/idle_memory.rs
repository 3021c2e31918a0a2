//! What an idle keep-alive connection costs the server in heap memory, counted
//! through the allocator: a parked connection (see the listener's
//! `serve_http1` and its lot) holds no read or write buffer and no task, so its
//! whole cost is a few hundred bytes of bookkeeping.
//!
//! A test binary of its own, because the counting allocator is process-wide.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use service_kit::listener::{self, ConnectionCap, Lifecycle, Plain, ServerLimits};

// dhat counts every allocation of the process (our `unsafe_code = "forbid"`
// rules out writing the counting allocator here).
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

/// The heap in use, in bytes.
fn live_bytes() -> isize {
    isize::try_from(dhat::HeapStats::get().curr_bytes).expect("fits")
}

/// A server that never stops.
#[derive(Clone)]
struct Forever;

impl Lifecycle for Forever {
    fn stopped(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    fn draining(&self) -> bool {
        false
    }
}

/// Connections held idle at once.
const CONNECTIONS: usize = 200;

/// The most heap one idle connection may hold: an eighth of one of hyper's
/// 8 KiB buffers. It covers the connection's place in the listener's lot of
/// parked connections, its socket's registration with the runtime and its
/// watchdog state with its place under the cap; not a task of its own, whose
/// cell alone (768 bytes) would go over.
const MOST_BYTES_PER_IDLE_CONNECTION: isize = 1024;

/// Sends `requests` `GET /`s one after the other on a new blocking connection
/// (no heap of the client's in the count), reading each whole answer.
fn requests(addr: SocketAddr, requests: usize) -> TcpStream {
    let mut client = TcpStream::connect(addr).expect("connected");
    for _ in 0..requests {
        one_request(&mut client);
    }
    client
}

/// A `POST /` with a small body.
const UPLOAD: &[u8] = b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello";
/// An HTTP/1.0 `GET /` that asks for the connection to stay open.
const HTTP10_KEEP_ALIVE: &[u8] = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";

/// Sends `request` on a new connection and reads the whole answer.
fn exchanged(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut client = TcpStream::connect(addr).expect("connected");
    exchange(&mut client, request);
    client
}

fn one_request(client: &mut TcpStream) {
    exchange(client, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
}

/// Sends `request` and reads the whole answer, which must be a 200 in the
/// request's HTTP version.
fn exchange(client: &mut TcpStream, request: &[u8]) {
    // The request line ends with the version, `HTTP/1.x`.
    let request_line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let version = &request_line[request_line.len().saturating_sub(b"HTTP/1.x".len())..];
    client.write_all(request).expect("request sent");
    let mut answer = [0u8; 1024];
    let mut read = 0;
    while !answer[..read].ends_with(b"idle") {
        let count = client.read(&mut answer[read..]).expect("answer read");
        assert!(count > 0, "connection closed before the whole answer");
        read += count;
    }
    assert!(
        answer.starts_with(version) && answer[version.len()..].starts_with(b" 200"),
        "{:?}",
        &answer[..read]
    );
}

/// Waits until the heap in use has stopped shrinking (the server's tasks have
/// parked their connections), and returns it.
fn settled_live_bytes() -> isize {
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut last = live_bytes();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = live_bytes();
        if now >= last || Instant::now() > give_up {
            return now;
        }
        last = now;
    }
}

#[test]
fn an_idle_keep_alive_connection_holds_no_buffers() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let listener = runtime
        .block_on(async { listener::bind(SocketAddr::from(([127, 0, 0, 1], 0))) })
        .expect("bound");
    let addr = listener.local_addr().expect("an address");
    let make_service = |_peer| {
        // Reads the request's body, as a proxy does, then answers.
        service_fn(|request: Request<Incoming>| async {
            let _body = request.into_body().collect().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"idle"))))
        })
    };
    let limits = ServerLimits::DEFAULT;
    runtime.spawn(listener::serve_connections(
        listener,
        Plain,
        make_service,
        Forever,
        limits,
        ConnectionCap::new(limits.max_connections),
    ));

    // One connection first, so that whatever the server sets up once (the
    // runtime's slabs, hyper's date cache) is not charged to the others.
    let _warm = requests(addr, 1);

    // Clients that sent one request and went quiet: parked at once.
    let before = settled_live_bytes();
    let quiet: Vec<TcpStream> = (0..CONNECTIONS).map(|_| requests(addr, 1)).collect();
    let after = settled_live_bytes();
    assert_idle_connections_are_lean("quiet", after - before);

    // Busy clients, each request on the heels of the last: their connections
    // stay with hyper while busy, and are parked after a second of quiet.
    let before = after;
    let busy: Vec<TcpStream> = (0..CONNECTIONS).map(|_| requests(addr, 3)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let after = settled_live_bytes();
    assert_idle_connections_are_lean("busy, then quiet", after - before);

    // Clients that sent a body: parked after the same quiet spell.
    let before = after;
    let uploads: Vec<TcpStream> = (0..CONNECTIONS).map(|_| exchanged(addr, UPLOAD)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let after = settled_live_bytes();
    assert_idle_connections_are_lean("after an upload", after - before);

    // HTTP/1.0 clients that asked to keep the connection: parked like the
    // first ones.
    let before = after;
    let http10: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| exchanged(addr, HTTP10_KEEP_ALIVE))
        .collect();
    let after = settled_live_bytes();
    assert_idle_connections_are_lean("HTTP/1.0 keep-alive", after - before);
    drop((quiet, busy, uploads, http10));
}

fn assert_idle_connections_are_lean(clients: &str, heap: isize) {
    let per_connection = heap / CONNECTIONS as isize;
    println!("{CONNECTIONS} idle connections ({clients}) hold {per_connection} bytes of heap each");
    assert!(
        per_connection <= MOST_BYTES_PER_IDLE_CONNECTION,
        "an idle connection ({clients}) holds {per_connection} bytes, more than {MOST_BYTES_PER_IDLE_CONNECTION}"
    );
}
