//! Wire: what a client's bytes show before hyper parses them. Which protocol
//! the connection speaks, and for HTTP/2, where each frame begins, which
//! frames begin a request (for the watchdog's clocks), and whether the client
//! floods the connection with frames that make work but carry no request.
//!
//! **Which protocol.** An HTTP/2 client with prior knowledge (h2c, or h2 after
//! TLS ALPN) opens with a fixed 24-byte preface, `PRI * HTTP/2.0␍␊␍␊SM␍␊␍␊`
//! (RFC 9113 section 3.4). No HTTP/1.x request begins with it, so the first
//! bytes, compared as they arrive, tell the two apart: the first byte that
//! differs makes the connection HTTP/1.1, a whole preface makes it HTTP/2.
//! TLS connections are told apart the same way, whatever ALPN agreed on: a
//! client that negotiated `h2` sends the preface, and one that offered no ALPN
//! at all is still served.
//!
//! **HTTP/2 frames.** After the preface every frame starts with a 9-byte header
//! (length, type, flags, stream), so following the frames costs a few
//! instructions per frame, payloads skipped unread. Only `HEADERS` begins a
//! request head: `PING`s (our keep-alive's answers among them), `SETTINGS` and
//! `WINDOW_UPDATE`s arriving on a quiet connection leave it idle.
//!
//! **Floods.** The `h2` crate (0.4.x) bounds most abuse by itself: rapid reset
//! (CVE-2023-44487) through its cap on streams reset before they were accepted
//! (`max_pending_accept_reset_streams`), CONTINUATION floods through its count
//! of CONTINUATION frames and bytes per header block (checked against
//! `max_header_list_size`), streams it must reset for the client's errors
//! (`max_local_error_reset_streams`), and empty or tiny `DATA` frames through a
//! per-connection budget; each answered with GOAWAY (`ENHANCE_YOUR_CALM`). Its
//! memory is bounded for `SETTINGS` and `PING` too: it acknowledges one before
//! it reads the next, so a client that does not read its acknowledgements
//! stalls its own connection. But a client that does read them may send
//! `SETTINGS`, `PING`, `WINDOW_UPDATE`, `PRIORITY`, unknown frame types, or
//! `RST_STREAM` for streams already accepted (the slow form of rapid reset,
//! where every `HEADERS` reaches the service), at any rate for as long as it
//! likes, and each one costs a decode, often a write, and for `SETTINGS` a walk
//! over the open streams. So such *control frames* are paid for here from a
//! budget ([`Budget`]): a connection starts with [`CONTROL_FRAME_BURST`] and
//! earns more with time ([`CONTROL_FRAMES_PER_SECOND`]), with each response it
//! is given ([`CONTROL_FRAMES_PER_RESPONSE`], for the cancel or window update a
//! request may bring) and with the bytes sent to it (one per
//! [`BYTES_PER_CONTROL_FRAME`], for the window updates a download brings). A
//! client that runs the budget dry is flooding: its connection is closed, and
//! the others go on being served. A real client never comes near it: it sends a
//! handful of control frames per connection and per request.

use tokio::time::Instant;

use super::watchdog::Activity;

/// What every HTTP/2 connection of a client with prior knowledge begins with.
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Control frames a connection may send before it has earned any.
pub const CONTROL_FRAME_BURST: f64 = 1_000.0;
/// Control frames a connection earns per second (up to the burst).
pub const CONTROL_FRAMES_PER_SECOND: f64 = 100.0;
/// Control frames a connection earns with each response it is given.
pub const CONTROL_FRAMES_PER_RESPONSE: f64 = 4.0;
/// Bytes written to a connection that earn it one control frame.
pub const BYTES_PER_CONTROL_FRAME: f64 = 1024.0;

/// The length of a frame header (RFC 9113 section 4.1).
const FRAME_HEADER_LEN: usize = 9;
/// The frame types that begin or continue a request; see [`Frames::frame`].
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
/// The `END_STREAM` flag of `DATA` and `HEADERS`.
const END_STREAM: u8 = 0x1;

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

/// A client sent control frames faster than it earned them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flood;

/// What the bytes read so far show.
#[derive(Debug)]
pub(crate) enum Wire {
    /// The first bytes, which so far match this much of the preface.
    Sniffing {
        matched: usize,
    },
    Http1,
    /// Boxed: most connections are HTTP/1.1, and each byte here is a byte of
    /// every idle connection.
    Http2(Box<Frames>),
}

impl Wire {
    pub(crate) fn new() -> Self {
        Self::Sniffing { matched: 0 }
    }

    /// The connection's protocol, once the first bytes have told it.
    pub(crate) fn protocol(&self) -> Option<Protocol> {
        match self {
            Self::Sniffing { .. } => None,
            Self::Http1 => Some(Protocol::Http1),
            Self::Http2(_) => Some(Protocol::Http2),
        }
    }

    /// Follows `bytes`, the next ones read from the client, and tells
    /// `activity` when a request head begins.
    pub(crate) fn read(&mut self, bytes: &[u8], activity: &Activity) -> Result<(), Flood> {
        match self {
            Self::Sniffing { matched } => {
                let expected = &PREFACE[*matched..];
                let common = expected.len().min(bytes.len());
                if bytes[..common] != expected[..common] {
                    *self = Self::Http1;
                    activity.head_begun();
                    return Ok(());
                }
                *matched += common;
                if *matched < PREFACE.len() {
                    // The preface is the connection's head: a client that
                    // trickles it gets the header-read timeout.
                    activity.head_begun();
                    return Ok(());
                }
                activity.preface_received();
                let mut frames = Box::new(Frames::new());
                let read = frames.read(&bytes[common..], activity);
                *self = Self::Http2(frames);
                read
            }
            Self::Http1 => {
                activity.head_begun();
                Ok(())
            }
            Self::Http2(frames) => frames.read(bytes, activity),
        }
    }

    /// Counts `bytes` written to the client towards its control frames.
    pub(crate) fn wrote(&mut self, bytes: usize) {
        if let Self::Http2(frames) = self {
            frames.budget.earn(bytes as f64 / BYTES_PER_CONTROL_FRAME);
        }
    }
}

/// Where the frames of an HTTP/2 connection begin, read as the bytes go by.
#[derive(Debug)]
pub(crate) struct Frames {
    /// The frame header being read, and how much of it has arrived.
    header: [u8; FRAME_HEADER_LEN],
    filled: usize,
    /// Payload bytes of the current frame still to go by.
    payload_left: usize,
    budget: Budget,
}

impl Frames {
    fn new() -> Self {
        Self {
            header: [0; FRAME_HEADER_LEN],
            filled: 0,
            payload_left: 0,
            budget: Budget::new(),
        }
    }

    fn read(&mut self, mut bytes: &[u8], activity: &Activity) -> Result<(), Flood> {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skipped = self.payload_left.min(bytes.len());
                self.payload_left -= skipped;
                bytes = &bytes[skipped..];
                continue;
            }
            let taken = (FRAME_HEADER_LEN - self.filled).min(bytes.len());
            self.header[self.filled..self.filled + taken].copy_from_slice(&bytes[..taken]);
            self.filled += taken;
            bytes = &bytes[taken..];
            if self.filled == FRAME_HEADER_LEN {
                self.filled = 0;
                let [l0, l1, l2, kind, flags, ..] = self.header;
                let length = u32::from_be_bytes([0, l0, l1, l2]) as usize;
                self.payload_left = length;
                self.frame(kind, flags, length, activity)?;
            }
        }
        Ok(())
    }

    /// One frame header has arrived.
    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        length: usize,
        activity: &Activity,
    ) -> Result<(), Flood> {
        match kind {
            HEADERS => activity.head_begun(),
            // A header block's rest, bounded by h2 itself; and a frame only a
            // server may send, which h2 answers with GOAWAY.
            CONTINUATION | PUSH_PROMISE => {}
            DATA if length > 0 || flags & END_STREAM != 0 => {}
            // Everything else carries neither a request nor body bytes:
            // SETTINGS, PING, RST_STREAM, WINDOW_UPDATE, PRIORITY, GOAWAY,
            // empty non-final DATA, and types h2 ignores.
            _ => self.budget.spend(activity.answered())?,
        }
        Ok(())
    }
}

/// A connection's allowance of control frames: a token bucket of
/// [`CONTROL_FRAME_BURST`], filled by time, by responses and by bytes written.
#[derive(Debug)]
struct Budget {
    frames: f64,
    /// When time was last turned into frames.
    earned_at: Instant,
    /// The connection's responses already turned into frames.
    answered: u64,
}

impl Budget {
    fn new() -> Self {
        Self {
            frames: CONTROL_FRAME_BURST,
            earned_at: Instant::now(),
            answered: 0,
        }
    }

    fn earn(&mut self, frames: f64) {
        self.frames = (self.frames + frames).min(CONTROL_FRAME_BURST);
    }

    /// Pays for one control frame, `answered` responses given so far.
    fn spend(&mut self, answered: u64) -> Result<(), Flood> {
        let now = Instant::now();
        let seconds = now.duration_since(self.earned_at).as_secs_f64();
        let responses = answered.saturating_sub(self.answered) as f64;
        self.earned_at = now;
        self.answered = answered;
        self.earn(seconds * CONTROL_FRAMES_PER_SECOND + responses * CONTROL_FRAMES_PER_RESPONSE);
        if self.frames < 1.0 {
            return Err(Flood);
        }
        self.frames -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::listener::Slot;
    use crate::listener::watchdog::{Expired, Lapse};

    /// A frame header, and `payload` zero bytes after it.
    fn frame(kind: u8, flags: u8, payload: usize) -> Vec<u8> {
        let length = u32::try_from(payload).expect("small").to_be_bytes();
        let mut bytes = vec![length[1], length[2], length[3], kind, flags, 0, 0, 0, 1];
        bytes.resize(FRAME_HEADER_LEN + payload, 0);
        bytes
    }

    const PING: u8 = 0x6;
    const SETTINGS: u8 = 0x4;

    fn http2() -> (Wire, std::sync::Arc<Activity>) {
        let activity = Activity::new(Slot::unlimited());
        let mut wire = Wire::new();
        wire.read(PREFACE, &activity)
            .expect("the preface is no flood");
        assert_eq!(wire.protocol(), Some(Protocol::Http2));
        (wire, activity)
    }

    #[test]
    fn the_first_differing_byte_makes_http1_and_a_whole_preface_http2() {
        let activity = Activity::new(Slot::unlimited());
        let mut wire = Wire::new();
        wire.read(b"PRI * HTTP/2", &activity).expect("no flood");
        assert_eq!(
            wire.protocol(),
            None,
            "a preface in pieces is still a preface"
        );
        wire.read(b".0\r\n\r\nSM\r\n\r\n", &activity)
            .expect("no flood");
        assert_eq!(wire.protocol(), Some(Protocol::Http2));

        for request in [&b"POST / HTTP/1.1\r\n"[..], b"PRI * HTTP/1.1\r\n", b"G"] {
            let mut wire = Wire::new();
            wire.read(request, &activity).expect("no flood");
            assert_eq!(wire.protocol(), Some(Protocol::Http1), "{request:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn frames_split_anywhere_are_followed() {
        let (mut wire, activity) = http2();
        // A big DATA frame whose payload holds what would look like PINGs,
        // then one real PING, all fed one byte at a time.
        let mut bytes = frame(DATA, 0, 100);
        bytes[FRAME_HEADER_LEN..].copy_from_slice(&frame(PING, 0, 91));
        bytes.extend(frame(PING, 0, 8));
        for byte in &bytes {
            wire.read(std::slice::from_ref(byte), &activity)
                .expect("no flood");
        }
        let Wire::Http2(frames) = &wire else {
            panic!("still HTTP/2");
        };
        assert_eq!(frames.budget.frames, CONTROL_FRAME_BURST - 1.0);
        assert_eq!((frames.filled, frames.payload_left), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_control_frame_flood_runs_the_budget_dry_and_requests_do_not() {
        let (mut wire, activity) = http2();
        let headers = frame(HEADERS, 0x4, 3);
        let body = frame(DATA, END_STREAM, 10);
        let empty_end = frame(DATA, END_STREAM, 0);
        for _ in 0..10_000 {
            for bytes in [&headers, &body, &empty_end] {
                wire.read(bytes, &activity).expect("requests are no flood");
            }
        }
        let ping = frame(PING, 0, 8);
        let allowed = CONTROL_FRAME_BURST as usize;
        for _ in 0..allowed {
            wire.read(&ping, &activity).expect("within the burst");
        }
        assert_eq!(wire.read(&ping, &activity), Err(Flood));
    }

    #[tokio::test(start_paused = true)]
    async fn time_responses_and_bytes_written_earn_control_frames() {
        let (mut wire, activity) = http2();
        // Frames without a payload: one refused leaves the next one's header
        // where the scanner expects it.
        let settings = frame(SETTINGS, 0, 0);
        let empty = frame(DATA, 0, 0);
        for _ in 0..CONTROL_FRAME_BURST as usize {
            wire.read(&settings, &activity).expect("within the burst");
        }
        assert_eq!(
            wire.read(&empty, &activity),
            Err(Flood),
            "empty DATA counts"
        );

        tokio::time::advance(Duration::from_millis(100)).await;
        for _ in 0..10 {
            wire.read(&settings, &activity).expect("earned with time");
        }
        assert_eq!(wire.read(&settings, &activity), Err(Flood));

        let request = activity.request_started();
        request.answered();
        drop(request);
        for _ in 0..CONTROL_FRAMES_PER_RESPONSE as usize {
            wire.read(&settings, &activity)
                .expect("earned by a response");
        }
        assert_eq!(wire.read(&settings, &activity), Err(Flood));

        wire.wrote(2 * 1024);
        for _ in 0..2 {
            wire.read(&settings, &activity)
                .expect("earned by bytes written");
        }
        assert_eq!(wire.read(&settings, &activity), Err(Flood));
    }

    #[tokio::test(start_paused = true)]
    async fn only_headers_begin_a_head_on_a_quiet_http2_connection() {
        let idle = Duration::from_secs(60);
        let header_read = Duration::from_secs(10);
        let (mut wire, activity) = http2();
        wire.read(&frame(SETTINGS, 0, 6), &activity)
            .expect("no flood");
        wire.read(&frame(PING, 0, 8), &activity).expect("no flood");
        let started = Instant::now();
        assert_eq!(
            activity.lapsed(idle, header_read, None).await,
            Lapse::Expired(Expired::Idle)
        );
        assert_eq!(started.elapsed(), idle);

        let (mut wire, activity) = http2();
        // A header block that never ends.
        wire.read(&frame(HEADERS, 0, 3), &activity)
            .expect("no flood");
        let started = Instant::now();
        assert_eq!(
            activity.lapsed(idle, header_read, None).await,
            Lapse::Expired(Expired::HeaderRead)
        );
        assert_eq!(started.elapsed(), header_read);
    }
}
