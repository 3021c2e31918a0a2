//! A WebSocket load generator for the backend's `/ws` echo, straight to a backend
//! or through a proxy: what `scripts/bench.sh` runs in its `websocket` scenario,
//! since wrk speaks only HTTP.
//!
//! It opens `--connections` WebSockets (each one's first message, the identity of
//! the pod it reached, is read and set aside), then on each of them, in a closed
//! loop for `--duration` seconds, sends one binary message of `--size` bytes and
//! waits for its echo. Each round trip's time goes into a histogram. At the end
//! every connection is closed with a Close frame and one line is printed:
//!
//! ```text
//! messages=123456 seconds=5.00 rate=24691.2 p50_us=1020 p99_us=2950 p999_us=4410 max_us=9870 bytes=7900000 errors=0
//! ```
//!
//! `messages` counts completed round trips; `seconds` runs from the moment every
//! connection is open to the last echo; `bytes` is payload sent plus payload
//! received. Errors (a failed connect or handshake, a wrong or missing echo, a
//! broken connection, a close that is not answered) are counted, not fatal: the
//! connection is dropped and opened again while time remains. The first few are
//! described on stderr.
//!
//! ```sh
//! cargo run --release -p backend --example wsload -- \
//!     --url ws://127.0.0.1:8080/ws --connections 64 --duration 5 --size 32
//! ```

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for a connection to open (TCP and handshake), for an echo, and for
/// the answer to a Close frame: wrk's `--timeout` in `scripts/bench.sh`.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Pause before a connection that failed is opened again, so a target that
/// refuses connections is not hammered in a tight loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

/// How many errors are described on stderr; the rest are only counted.
const ERRORS_DESCRIBED: u64 = 10;

#[derive(Debug, Parser)]
#[command(about = "WebSocket echo load: messages per second and round-trip percentiles")]
struct Args {
    /// The echo endpoint, `ws://HOST:PORT/ws`.
    #[arg(long)]
    url: String,
    /// WebSocket connections, each with one message in flight at a time.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of load, counted from the moment every connection is open.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Bytes in each binary message.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Threads of the runtime that drives the connections.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.url.starts_with("ws://") {
        eprintln!(
            "wsload: --url must be ws://HOST:PORT/PATH, got {}",
            args.url
        );
        return ExitCode::FAILURE;
    }
    let Some(duration) = Duration::try_from_secs_f64(args.duration)
        .ok()
        .filter(|duration| !duration.is_zero())
    else {
        eprintln!("wsload: --duration must be a number of seconds above zero");
        return ExitCode::FAILURE;
    };
    if args.connections == 0 || args.threads == 0 {
        eprintln!("wsload: --connections and --threads must be above zero");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wsload: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(run(args, duration));
    println!("{report}");
    ExitCode::SUCCESS
}

/// What one connection's task (or all of them, merged) measured.
#[derive(Debug, Default)]
struct Tally {
    round_trips: Histogram,
    bytes: u64,
    errors: u64,
    /// When the last echo arrived, if any did.
    last_echo: Option<Instant>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.round_trips.merge(&other.round_trips);
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.last_echo = self.last_echo.max(other.last_echo);
    }

    /// Counts an error, and describes it if it is one of the first few.
    fn error(&mut self, what: std::fmt::Arguments<'_>) {
        static DESCRIBED: AtomicU64 = AtomicU64::new(0);
        self.errors += 1;
        if DESCRIBED.fetch_add(1, Ordering::Relaxed) < ERRORS_DESCRIBED {
            eprintln!("wsload: {what}");
        }
    }
}

async fn run(args: Args, duration: Duration) -> String {
    let url = args.url.as_str();
    // Every connection opens before the clock starts, so the rate measures
    // messages, not handshakes.
    let opened = futures::future::join_all((0..args.connections).map(|_| open(url))).await;
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(opened.len());
    for (index, ws) in opened.into_iter().enumerate() {
        let mut tally = Tally::default();
        let ws = ws
            .map_err(|error| tally.error(format_args!("connection {index}: {error}")))
            .ok();
        let url = args.url.clone();
        tasks.push(tokio::spawn(connection(
            index, url, ws, args.size, deadline, tally,
        )));
    }
    let mut total = Tally::default();
    for task in tasks {
        match task.await {
            Ok(tally) => total.merge(tally),
            Err(error) => total.error(format_args!("a connection's task failed: {error}")),
        }
    }
    let seconds = total
        .last_echo
        .map_or(duration, |last| last - started)
        .as_secs_f64();
    let histogram = &total.round_trips;
    let messages = histogram.count();
    format!(
        "messages={messages} seconds={seconds:.2} rate={:.1} p50_us={} p99_us={} p999_us={} \
         max_us={} bytes={} errors={}",
        messages as f64 / seconds,
        histogram.percentile(50.0),
        histogram.percentile(99.0),
        histogram.percentile(99.9),
        histogram.max,
        total.bytes,
        total.errors,
    )
}

/// Opens one WebSocket and reads the server's first message, the identity text.
async fn open(url: &str) -> Result<Ws, String> {
    let opening = async {
        // Nagle off: each message is one small write that should leave at once.
        let (mut ws, _) = connect_async_with_config(url, None, true)
            .await
            .map_err(|error| format!("opening {url}: {error}"))?;
        match next_data(&mut ws).await? {
            Message::Text(_) => Ok(ws),
            other => Err(format!("expected the identity text first, got {other:?}")),
        }
    };
    tokio::time::timeout(TIMEOUT, opening)
        .await
        .unwrap_or_else(|_| Err(format!("opening {url}: no greeting within {TIMEOUT:?}")))
}

/// One connection's closed loop until `deadline`, then its closing handshake.
/// A connection that fails is opened again while time remains.
async fn connection(
    index: usize,
    url: String,
    mut ws: Option<Ws>,
    size: usize,
    deadline: Instant,
    mut tally: Tally,
) -> Tally {
    let mut sequence: u64 = 0;
    while Instant::now() < deadline {
        let Some(open_ws) = ws.as_mut() else {
            tokio::time::sleep(RECONNECT_PAUSE).await;
            match open(&url).await {
                Ok(opened) => ws = Some(opened),
                Err(error) => tally.error(format_args!("connection {index}: {error}")),
            }
            continue;
        };
        sequence += 1;
        let payload = payload(size, sequence);
        let sent = Instant::now();
        match tokio::time::timeout(TIMEOUT, round_trip(open_ws, payload)).await {
            Ok(Ok(())) => {
                let now = Instant::now();
                tally.round_trips.record(micros(now - sent));
                tally.bytes += 2 * size as u64;
                tally.last_echo = Some(now);
            }
            Ok(Err(error)) => {
                tally.error(format_args!("connection {index}: {error}"));
                ws = None;
            }
            Err(_) => {
                tally.error(format_args!(
                    "connection {index}: no echo within {TIMEOUT:?}"
                ));
                ws = None;
            }
        }
    }
    if let Some(mut ws) = ws {
        match tokio::time::timeout(TIMEOUT, close(&mut ws)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tally.error(format_args!("connection {index}: closing: {error}")),
            Err(_) => tally.error(format_args!(
                "connection {index}: close not answered within {TIMEOUT:?}"
            )),
        }
    }
    tally
}

/// A message of `size` bytes that starts with `sequence`, so that an echo of an
/// earlier message (or of another connection's) does not pass for this one's.
fn payload(size: usize, sequence: u64) -> Bytes {
    let mut bytes = vec![b'x'; size];
    let stamp = sequence.to_le_bytes();
    let stamped = size.min(stamp.len());
    bytes[..stamped].copy_from_slice(&stamp[..stamped]);
    Bytes::from(bytes)
}

/// Sends `payload` and waits for the same bytes to come back.
async fn round_trip(ws: &mut Ws, payload: Bytes) -> Result<(), String> {
    ws.send(Message::Binary(payload.clone()))
        .await
        .map_err(|error| format!("sending: {error}"))?;
    match next_data(ws).await? {
        Message::Binary(echo) if echo == payload => Ok(()),
        Message::Binary(echo) => Err(format!(
            "wrong echo: {} bytes, expected {}",
            echo.len(),
            payload.len()
        )),
        other => Err(format!("expected a binary echo, got {other:?}")),
    }
}

/// The next text, binary or close message; pings (tungstenite queues the pong)
/// and pongs are skipped.
async fn next_data(ws: &mut Ws) -> Result<Message, String> {
    loop {
        match ws.next().await {
            None => return Err("the server closed the connection".to_owned()),
            Some(Err(error)) => return Err(format!("receiving: {error}")),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(message)) => return Ok(message),
        }
    }
}

/// Sends a Close frame and reads until the server has answered it and the
/// connection has ended.
async fn close(ws: &mut Ws) -> Result<(), WsError> {
    ws.close(None).await?;
    loop {
        match ws.next().await {
            None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Ok(()),
            Some(Err(error)) => return Err(error),
            Some(Ok(_)) => {}
        }
    }
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

/// Round-trip times in microseconds, in buckets whose width is under 1 % of
/// their value: exact below 256 µs, then 128 buckets per power of two. Memory is
/// fixed (at most 7,424 counters) however many samples are recorded.
#[derive(Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    max: u64,
}

/// Buckets per power of two above the exact range, and the exact range's end.
const SUB_BUCKETS: u64 = 128;
const EXACT_BELOW: u64 = 2 * SUB_BUCKETS;

impl Histogram {
    fn record(&mut self, micros: u64) {
        let index = Self::index(micros);
        if index >= self.counts.len() {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] += 1;
        self.max = self.max.max(micros);
    }

    fn merge(&mut self, other: &Histogram) {
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.max = self.max.max(other.max);
    }

    fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The value at or below which `percent` of the samples lie: the highest
    /// value of the bucket holding that sample, or 0 without samples.
    fn percentile(&self, percent: f64) -> u64 {
        let count = self.count();
        if count == 0 {
            return 0;
        }
        let rank = ((percent / 100.0 * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (index, bucket) in self.counts.iter().enumerate() {
            seen += bucket;
            if seen >= rank {
                return Self::highest(index).min(self.max);
            }
        }
        self.max
    }

    /// Values below `EXACT_BELOW` have a bucket each. A value with its highest
    /// bit at `bit` (8 or more) keeps its top 8 bits: the bucket is its octave's
    /// offset plus those bits, which run from `SUB_BUCKETS` to `2 * SUB_BUCKETS - 1`.
    fn index(value: u64) -> usize {
        if value < EXACT_BELOW {
            return value as usize;
        }
        let bit = u64::from(63 - value.leading_zeros());
        let shift = bit - 7;
        ((bit - 7) * SUB_BUCKETS + (value >> shift)) as usize
    }

    /// The highest value that falls into bucket `index`.
    fn highest(index: usize) -> u64 {
        let index = index as u64;
        if index < EXACT_BELOW {
            return index;
        }
        let shift = index / SUB_BUCKETS - 1;
        let top = index % SUB_BUCKETS + SUB_BUCKETS;
        // Wraps only for the last bucket of all, whose highest value is u64::MAX.
        ((top + 1) << shift).wrapping_sub(1)
    }
}
