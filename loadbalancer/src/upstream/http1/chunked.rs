//! The decoder for `Transfer-Encoding: chunked` response bodies (RFC 9112
//! section 7.1), used by the proxy's own HTTP/1.1 exchange with a backend once
//! the response head has been parsed.
//!
//! The exchange reads from the backend into one `BytesMut` and hands it to
//! [`ChunkedDecoder::decode`], which takes what it can off the front: body bytes
//! come back as [`Decoded::Data`], split off the buffer without a copy, as soon
//! as any of a chunk has arrived, so a large chunk streams to the client read by
//! read instead of being held whole. The decoder keeps no buffer of its own; it
//! is a small state machine over the caller's buffer. After the last (`0`)
//! chunk it returns the trailer fields, if the backend sent any, as a
//! [`Decoded::Trailers`], then [`Decoded::End`]; whatever is left in the buffer
//! then belongs to the next response on the keep-alive connection.
//!
//! It accepts what hyper's own chunked decoder (`proto::h1::decode` in hyper 1.x)
//! accepts: hex sizes in either case, whitespace after the
//! size, extensions that are skipped unread. It rejects what hyper rejects: a
//! missing or non-hex size, a size beyond `u64`, a bare LF where CRLF is due,
//! data not followed by CRLF, malformed trailer fields. Everything a backend can
//! make arbitrarily long has a cap (size line, extensions, trailer section), so
//! a broken or hostile backend costs bounded memory and work and gets an error,
//! never a buffer that grows for as long as it keeps sending.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Bytes allowed in a size line before its extensions: the hex digits and the
/// whitespace after them. A `u64` needs at most 16 digits; the rest is room for
/// leading zeros and padding. Hyper has no such cap (it accepts leading zeros
/// and whitespace without end); we add one so a size line that never ends is
/// an error rather than a read loop that never ends.
const MAX_SIZE_LINE: usize = 64;

/// Bytes of chunk extensions allowed in one body, counted over all its chunks:
/// hyper's `CHUNKED_EXTENSIONS_LIMIT` (decode.rs line 20), applied the same way
/// (every byte after a `;` counts, the error comes when the count reaches the
/// limit, `read_extension`, lines 444-453). Counting per body rather than per
/// line stops a backend that sends a million one-byte chunks each with a long
/// extension.
const EXTENSIONS_LIMIT: u64 = 16 * 1024;

/// Bytes allowed in the trailer section, from its first field through the empty
/// line that ends it: hyper's `TRAILER_LIMIT` (decode.rs line 25), which is also
/// its default for `h1_max_header_size`. The section is parsed only once it is
/// complete, so this is what bounds the caller's buffer while it waits.
const TRAILER_LIMIT: usize = 16 * 1024;

/// Trailer fields allowed: hyper's `DEFAULT_MAX_HEADERS` (role.rs line 31), the
/// count `read_trailer_lf` enforces (decode.rs lines 565-570).
const MAX_TRAILER_FIELDS: usize = 100;

/// Decodes one chunked body from the front of the caller's buffer.
///
/// Make one per response. After an error the decoder is spent (every later call
/// fails) and the connection must be closed: its framing is lost. If the
/// connection ends while `decode` still asks for more, the body was truncated.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    /// Where in the chunked framing the next byte of the buffer belongs.
    state: State,
    /// The size being read while on a size line, then the bytes of the current
    /// chunk still to come while on its data.
    size: u64,
    /// Bytes of the current size line before its extensions, so a size line of
    /// endless zeros or whitespace hits [`MAX_SIZE_LINE`].
    size_line_len: usize,
    /// Extension bytes seen in this body so far, for [`EXTENSIONS_LIMIT`].
    extension_bytes: u64,
}

/// The chunked framing, one state per place a byte can be; the names follow
/// hyper's `ChunkedState` (decode.rs lines 70-84) where the two agree.
#[derive(Debug)]
enum State {
    /// The first hex digit of a size line.
    Start,
    /// More hex digits, or what may follow them.
    Size,
    /// Whitespace after the size: no more digits may come.
    SizeLws,
    /// Skipping an extension, up to the CR that ends the size line.
    Extension,
    /// The LF after the size line's CR.
    SizeLf,
    /// Chunk data, `size` bytes of it still to come.
    Data,
    /// The CR after the chunk data.
    DataCr,
    /// The LF after the chunk data.
    DataLf,
    /// After the last chunk: the trailer section, read in place and consumed
    /// whole once its empty line has arrived, because httparse parses a
    /// complete section.
    Trailers(TrailerScan),
    /// Trailers were returned; `End` comes next.
    TrailersReturned,
    /// `End` was returned.
    Done,
    /// An error was returned.
    Failed,
}

/// How far the trailer section has been checked in the caller's buffer, so a
/// section arriving a byte at a time is scanned once, not once per byte.
#[derive(Debug, Default)]
struct TrailerScan {
    /// Offset of the line being read: everything before it is complete
    /// CRLF-terminated fields.
    line_start: usize,
    /// Offset up to which the current line has been searched for its LF.
    searched: usize,
    /// Complete fields so far, for [`MAX_TRAILER_FIELDS`] and to size the
    /// parser's field array.
    fields: usize,
}

/// One step of a chunked body.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// Body bytes, split off the front of the caller's buffer without copying
    /// (`BytesMut::split_to(n).freeze()`).
    Data(Bytes),
    /// The trailer section (only when the body had trailer fields), returned
    /// once, right before `End`.
    Trailers(HeaderMap),
    /// The last chunk and the trailer section have been consumed; the bytes
    /// left in the buffer (if any) belong to the next response.
    End,
    /// The buffer holds no complete next piece; read more into it and call again.
    NeedMore,
}

/// Why a chunked body cannot be decoded. Every case means the backend broke
/// the framing, so the connection cannot be reused.
#[derive(Debug, thiserror::Error)]
pub enum ChunkedError {
    #[error("invalid chunk size line: expected a hex digit, found '{}'", .0.escape_ascii())]
    MissingSize(u8),
    #[error("invalid chunk size line: unexpected '{}' after the size", .0.escape_ascii())]
    InvalidSizeLine(u8),
    #[error("invalid chunk size: does not fit in 64 bits")]
    SizeOverflow,
    #[error("chunk size line longer than {MAX_SIZE_LINE} bytes before its extensions")]
    SizeLineTooLong,
    #[error("chunk extensions reached {EXTENSIONS_LIMIT} bytes in one body")]
    ExtensionsTooLarge,
    #[error("chunk size line does not end with CRLF")]
    SizeLineEnding,
    #[error("chunk data is not followed by CRLF")]
    MissingDataCrlf,
    #[error("trailer line does not end with CRLF")]
    TrailerLineEnding,
    #[error("trailer section reached {TRAILER_LIMIT} bytes")]
    TrailersTooLarge,
    #[error("more than {MAX_TRAILER_FIELDS} trailer fields")]
    TooManyTrailers,
    #[error("invalid trailer section: {0}")]
    InvalidTrailers(#[source] httparse::Error),
    #[error("invalid trailer field: {0}")]
    InvalidTrailerField(#[from] http::Error),
    #[error("chunked body already failed to decode")]
    AfterError,
}

impl ChunkedDecoder {
    pub(crate) fn new() -> Self {
        ChunkedDecoder {
            state: State::Start,
            size: 0,
            size_line_len: 0,
            extension_bytes: 0,
        }
    }

    /// Consumes what it can from the front of `buf`.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkedError> {
        let decoded = self.decode_inner(buf);
        if decoded.is_err() {
            self.state = State::Failed;
        }
        decoded
    }

    /// Whether the terminating chunk and trailers have been consumed.
    ///
    /// True as soon as the trailer section is off the buffer, so also between
    /// `Trailers` and `End`: the connection is then at a message boundary.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state, State::TrailersReturned | State::Done)
    }

    fn decode_inner(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkedError> {
        // Each turn either returns or consumes a byte, so the loop ends; one
        // call consumes at most a chunk's trailing CRLF and the next size line
        // before it has something to return.
        loop {
            match &mut self.state {
                State::Data => return Ok(self.data(buf)),
                State::Trailers(scan) => {
                    let Some(section_len) = scan.advance(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let fields = scan.fields;
                    let section = buf.split_to(section_len);
                    if fields == 0 {
                        self.state = State::Done;
                        return Ok(Decoded::End);
                    }
                    let trailers = parse_trailers(&section, fields)?;
                    self.state = State::TrailersReturned;
                    return Ok(Decoded::Trailers(trailers));
                }
                State::TrailersReturned | State::Done => {
                    self.state = State::Done;
                    return Ok(Decoded::End);
                }
                State::Failed => return Err(ChunkedError::AfterError),
                _ => {
                    let Some(&byte) = buf.first() else {
                        return Ok(Decoded::NeedMore);
                    };
                    buf.advance(1);
                    self.state = self.framing_byte(byte)?;
                }
            }
        }
    }

    /// Hands out as much of the current chunk as the buffer holds.
    fn data(&mut self, buf: &mut BytesMut) -> Decoded {
        if buf.is_empty() {
            return Decoded::NeedMore;
        }
        // A chunk may be larger than memory (or than usize on 32 bits); only
        // what is already buffered is taken.
        let n = usize::try_from(self.size).map_or(buf.len(), |rem| rem.min(buf.len()));
        self.size -= n as u64;
        if self.size == 0 {
            self.state = State::DataCr;
        }
        Decoded::Data(buf.split_to(n).freeze())
    }

    /// The state after one byte of a size line or of a chunk's closing CRLF.
    fn framing_byte(&mut self, byte: u8) -> Result<State, ChunkedError> {
        match self.state {
            State::Start => {
                let digit = hex_digit(byte).ok_or(ChunkedError::MissingSize(byte))?;
                self.size = u64::from(digit);
                self.size_line_len = 1;
                Ok(State::Size)
            }
            State::Size => {
                self.count_size_line_byte()?;
                if let Some(digit) = hex_digit(byte) {
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|size| size.checked_add(u64::from(digit)))
                        .ok_or(ChunkedError::SizeOverflow)?;
                    return Ok(State::Size);
                }
                self.after_size(byte)
            }
            State::SizeLws => {
                self.count_size_line_byte()?;
                // Like hyper's `read_size_lws` (lines 415-423): whitespace may
                // follow the size ("BWS" before an extension), digits may not.
                self.after_size(byte)
            }
            State::Extension => match byte {
                b'\r' => Ok(State::SizeLf),
                // Extensions run to the CR and are never read, so a bare LF
                // inside one is refused rather than skipped: a peer that ends
                // lines with LF alone would otherwise see a different body
                // (hyper, lines 435-443).
                b'\n' => Err(ChunkedError::SizeLineEnding),
                _ => {
                    self.extension_bytes += 1;
                    if self.extension_bytes >= EXTENSIONS_LIMIT {
                        return Err(ChunkedError::ExtensionsTooLarge);
                    }
                    Ok(State::Extension)
                }
            },
            // CRLF exactly, like hyper's `read_size_lf` (lines 463-476): RFC
            // 9112 section 2.2 lets a recipient accept a bare LF, but two
            // parsers of one stream that disagree on line ends disagree on where
            // the body ends, which is how request smuggling starts.
            State::SizeLf => match byte {
                b'\n' if self.size == 0 => Ok(State::Trailers(TrailerScan::default())),
                b'\n' => Ok(State::Data),
                _ => Err(ChunkedError::SizeLineEnding),
            },
            State::DataCr => match byte {
                b'\r' => Ok(State::DataLf),
                _ => Err(ChunkedError::MissingDataCrlf),
            },
            State::DataLf => match byte {
                b'\n' => Ok(State::Start),
                _ => Err(ChunkedError::MissingDataCrlf),
            },
            // The other states never read a single byte; `decode_inner`
            // handles them before calling here.
            State::Data
            | State::Trailers(_)
            | State::TrailersReturned
            | State::Done
            | State::Failed => Err(ChunkedError::AfterError),
        }
    }

    /// What may follow the size's digits (hyper's `read_size`, lines 398-400).
    fn after_size(&self, byte: u8) -> Result<State, ChunkedError> {
        match byte {
            b' ' | b'\t' => Ok(State::SizeLws),
            b';' => Ok(State::Extension),
            b'\r' => Ok(State::SizeLf),
            b'\n' => Err(ChunkedError::SizeLineEnding),
            _ => Err(ChunkedError::InvalidSizeLine(byte)),
        }
    }

    fn count_size_line_byte(&mut self) -> Result<(), ChunkedError> {
        self.size_line_len += 1;
        if self.size_line_len > MAX_SIZE_LINE {
            return Err(ChunkedError::SizeLineTooLong);
        }
        Ok(())
    }
}

impl TrailerScan {
    /// Checks the lines that have arrived since the last call. Returns the
    /// length of the whole section once its empty line is in `buf`.
    ///
    /// Each line must end in CRLF. Hyper requires the same of the line ends it
    /// looks for (`read_trailer_lf`, `read_end_lf`); a bare LF inside a field
    /// it would pass on to httparse, which then fails on the field count, so
    /// refusing it here refuses the same inputs, with a clearer error.
    fn advance(&mut self, buf: &[u8]) -> Result<Option<usize>, ChunkedError> {
        // The caller only appends between calls; if the buffer shrank anyway,
        // rescan it rather than index past its end.
        if self.searched > buf.len() {
            *self = TrailerScan::default();
        }
        loop {
            let unsearched = buf.get(self.searched..).unwrap_or_default();
            let Some(lf) = unsearched.iter().position(|&b| b == b'\n') else {
                self.searched = buf.len();
                if buf.len() >= TRAILER_LIMIT {
                    return Err(ChunkedError::TrailersTooLarge);
                }
                return Ok(None);
            };
            let lf = self.searched + lf;
            let line_end = lf + 1;
            if line_end >= TRAILER_LIMIT {
                return Err(ChunkedError::TrailersTooLarge);
            }
            if lf == self.line_start || buf.get(lf - 1) != Some(&b'\r') {
                return Err(ChunkedError::TrailerLineEnding);
            }
            if lf - 1 == self.line_start {
                return Ok(Some(line_end));
            }
            self.fields += 1;
            if self.fields > MAX_TRAILER_FIELDS {
                return Err(ChunkedError::TooManyTrailers);
            }
            self.line_start = line_end;
            self.searched = line_end;
        }
    }
}

/// Parses a complete trailer section (ending in its empty line) with the
/// parser hyper uses for heads and trailers (hyper's `decode_trailers`, lines
/// 642-681), keeping repeated fields as repeated entries.
fn parse_trailers(section: &[u8], fields: usize) -> Result<HeaderMap, ChunkedError> {
    let mut parsed = vec![httparse::EMPTY_HEADER; fields];
    match httparse::parse_headers(section, &mut parsed) {
        Ok(httparse::Status::Complete((len, parsed))) if len == section.len() => {
            let mut trailers = HeaderMap::with_capacity(parsed.len());
            for field in parsed {
                let name =
                    HeaderName::from_bytes(field.name.as_bytes()).map_err(http::Error::from)?;
                let value = HeaderValue::from_bytes(field.value).map_err(http::Error::from)?;
                trailers.append(name, value);
            }
            Ok(trailers)
        }
        // The section was cut at its first empty line, so httparse either
        // reads all of it or fails on a field; anything else is still an
        // invalid section, not a reason to panic.
        Ok(_) => Err(ChunkedError::InvalidTrailers(httparse::Error::Token)),
        Err(e) => Err(ChunkedError::InvalidTrailers(e)),
    }
}

fn hex_digit(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a decoder made of an input fed in pieces.
    #[derive(Debug)]
    struct Collected {
        body: Vec<u8>,
        data_items: usize,
        trailers: Option<HeaderMap>,
        /// Whether `End` came before the pieces ran out.
        ended: bool,
        /// What followed `End`: the buffer's rest and any pieces not yet fed.
        rest: BytesMut,
    }

    /// Feeds `pieces` one at a time into a buffer, calling `decode` until it
    /// asks for more, and collects every item. Checks the contract on the way:
    /// no empty `Data`, `Trailers` at most once and only right before `End`.
    fn feed<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Result<Collected, ChunkedError> {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::new();
        let mut pieces = pieces.into_iter();
        let mut collected = Collected {
            body: Vec::new(),
            data_items: 0,
            trailers: None,
            ended: false,
            rest: BytesMut::new(),
        };
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => {
                    assert!(!data.is_empty(), "Data must never be empty");
                    assert!(collected.trailers.is_none(), "Data after Trailers");
                    collected.body.extend_from_slice(&data);
                    collected.data_items += 1;
                }
                Decoded::Trailers(trailers) => {
                    assert!(collected.trailers.is_none(), "Trailers returned twice");
                    assert!(decoder.is_done(), "trailers consumed means done");
                    collected.trailers = Some(trailers);
                }
                Decoded::End => {
                    assert!(decoder.is_done(), "End means done");
                    collected.ended = true;
                    break;
                }
                Decoded::NeedMore => {
                    assert!(!decoder.is_done(), "NeedMore after the end");
                    match pieces.next() {
                        Some(piece) => buf.extend_from_slice(piece),
                        None => break,
                    }
                }
            }
        }
        // What the decoder left plus what it was never given: the bytes after
        // the body, whatever the split.
        for piece in pieces {
            buf.extend_from_slice(piece);
        }
        collected.rest = buf;
        Ok(collected)
    }

    fn feed_whole(input: &[u8]) -> Result<Collected, ChunkedError> {
        feed([input])
    }

    /// A body with every feature: sizes in both cases, extensions (plain,
    /// quoted, after whitespace), a chunk spanning lines, and trailers.
    const FULL_BODY: &[u8] = b"5;name=value\r\nhello\r\n\
        A \t;q=\"a;b\\\"c\"\r\n, chunked \r\n\
        b\r\nworld\r\nand \r\n\
        0;last\r\n\
        Checksum: abc123\r\nX-Trailer: one\r\nx-trailer: two\r\n\r\n\
        NEXT";

    const FULL_BODY_DECODED: &[u8] = b"hello, chunked world\r\nand ";

    fn assert_full_body(collected: &Collected) {
        assert!(collected.ended, "End was returned");
        assert_eq!(collected.body, FULL_BODY_DECODED);
        let trailers = collected.trailers.as_ref().expect("body has trailers");
        assert_eq!(trailers.len(), 3);
        assert_eq!(trailers["checksum"], "abc123");
        let repeated: Vec<_> = trailers.get_all("x-trailer").iter().collect();
        assert_eq!(repeated, ["one", "two"]);
        assert_eq!(&collected.rest[..], b"NEXT");
    }

    #[test]
    fn multi_chunk_body_with_extensions_and_trailers_decodes() {
        let collected = feed_whole(FULL_BODY).expect("valid body");
        assert_full_body(&collected);
        assert_eq!(
            collected.data_items, 3,
            "one Data per chunk when all is buffered"
        );
    }

    #[test]
    fn one_byte_at_a_time_decodes_the_same() {
        let collected = feed(FULL_BODY.chunks(1)).expect("valid body");
        assert_full_body(&collected);
    }

    #[test]
    fn every_split_point_decodes_the_same() {
        for at in 0..=FULL_BODY.len() {
            let (head, tail) = FULL_BODY.split_at(at);
            let collected = feed([head, tail]).unwrap_or_else(|e| panic!("split at {at}: {e}"));
            assert_full_body(&collected);
        }
    }

    #[test]
    fn end_leaves_the_next_response_in_the_buffer() {
        let collected =
            feed_whole(b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n").expect("valid body");
        assert!(collected.ended);
        assert_eq!(collected.body, b"abc");
        assert!(
            collected.trailers.is_none(),
            "no trailer fields, no Trailers"
        );
        assert_eq!(&collected.rest[..], b"HTTP/1.1 200 OK\r\n");
    }

    #[test]
    fn data_is_returned_before_the_chunk_is_complete() {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"a\r\nhello"[..]);
        let Decoded::Data(first) = decoder.decode(&mut buf).expect("valid") else {
            panic!("the buffered half of the chunk should come back at once");
        };
        assert_eq!(&first[..], b"hello");
        assert!(matches!(decoder.decode(&mut buf), Ok(Decoded::NeedMore)));

        buf.extend_from_slice(b"world\r\n0\r\n\r\n");
        let Decoded::Data(second) = decoder.decode(&mut buf).expect("valid") else {
            panic!("the rest of the chunk");
        };
        assert_eq!(&second[..], b"world");
        assert!(matches!(decoder.decode(&mut buf), Ok(Decoded::End)));
        assert!(decoder.is_done());
        assert!(buf.is_empty());
    }

    #[test]
    fn a_large_chunk_streams_in_as_many_pieces_as_reads() {
        let mut input = b"100000\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 1 << 20));
        input.extend_from_slice(b"\r\n0\r\n\r\n");
        let collected = feed(input.chunks(64 * 1024)).expect("valid body");
        assert!(collected.ended);
        assert_eq!(collected.body.len(), 1 << 20);
        assert!(
            collected.data_items >= 16,
            "got {} pieces",
            collected.data_items
        );
    }

    #[test]
    fn data_is_split_from_the_callers_buffer_without_copying() {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"4\r\ndata\r\n"[..]);
        let data_at = buf[3..].as_ptr();
        let Decoded::Data(data) = decoder.decode(&mut buf).expect("valid") else {
            panic!("expected data");
        };
        assert_eq!(data.as_ptr(), data_at);
    }

    #[test]
    fn size_is_hex_in_either_case_and_may_be_the_largest_u64() {
        assert_eq!(
            feed_whole(b"A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n")
                .expect("valid")
                .body
                .len(),
            20
        );
        let collected = feed_whole(b"FfFfFfFfFfFfFfFf\r\nabc").expect("u64::MAX is a valid size");
        assert_eq!(collected.body, b"abc");
        assert!(!collected.ended);
    }

    #[test]
    fn trailers_without_fields_are_not_returned() {
        let collected = feed_whole(b"0\r\n\r\n").expect("valid");
        assert!(collected.ended);
        assert!(collected.trailers.is_none());
        assert!(collected.body.is_empty());
    }

    #[test]
    fn end_is_repeated_after_the_body_without_consuming() {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"0\r\n\r\nrest"[..]);
        assert!(matches!(decoder.decode(&mut buf), Ok(Decoded::End)));
        assert!(matches!(decoder.decode(&mut buf), Ok(Decoded::End)));
        assert_eq!(&buf[..], b"rest");
    }

    /// Decodes `input` whole and returns its error.
    fn error_of(input: &[u8]) -> ChunkedError {
        match feed_whole(input) {
            Ok(collected) => panic!("{input:?} decoded: {collected:?}"),
            Err(e) => e,
        }
    }

    /// Asserts that each input fails with an error matching the pattern.
    macro_rules! assert_rejected {
        ($expected:pat, [$($input:expr),+ $(,)?]) => {
            for input in [$(&$input[..]),+] {
                let e = error_of(input);
                assert!(
                    matches!(e, $expected),
                    "{:?}: got {e:?}, expected {}",
                    input.escape_ascii().to_string(),
                    stringify!($expected)
                );
            }
        };
    }

    #[test]
    fn empty_or_non_hex_size_is_rejected() {
        assert_rejected!(ChunkedError::MissingSize(b'\r'), [b"\r\n"]);
        assert_rejected!(ChunkedError::MissingSize(b';'), [b";ext\r\n"]);
        assert_rejected!(ChunkedError::MissingSize(b'g'), [b"g\r\n"]);
        assert_rejected!(ChunkedError::MissingSize(b' '), [b" 1\r\n"]);
        assert_rejected!(ChunkedError::MissingSize(b'-'), [b"-1\r\n"]);
        assert_rejected!(ChunkedError::InvalidSizeLine(b'g'), [b"1g\r\n"]);
        assert_rejected!(ChunkedError::InvalidSizeLine(b'x'), [b"0x1\r\n"]);
    }

    #[test]
    fn digits_after_whitespace_are_rejected() {
        assert_rejected!(ChunkedError::InvalidSizeLine(b'2'), [b"1 2\r\n"]);
    }

    #[test]
    fn size_beyond_u64_is_rejected() {
        assert_rejected!(ChunkedError::SizeOverflow, [b"10000000000000000\r\n"]);
    }

    #[test]
    fn size_line_must_end_with_crlf() {
        assert_rejected!(
            ChunkedError::SizeLineEnding,
            [b"1\na\r\n", b"1 \n", b"1\rX", b"1;ext\nmore\r\n"]
        );
    }

    #[test]
    fn data_must_be_followed_by_crlf() {
        assert_rejected!(
            ChunkedError::MissingDataCrlf,
            [
                b"1\r\naX",
                b"1\r\na\n0\r\n\r\n",
                b"1\r\na\rX",
                b"1\r\nab\r\n"
            ]
        );
    }

    #[test]
    fn trailer_lines_must_end_with_crlf() {
        assert_rejected!(
            ChunkedError::TrailerLineEnding,
            [b"0\r\nA: b\nC: d\r\n\r\n", b"0\r\n\n", b"0\r\nA: b\r\n\n"]
        );
    }

    #[test]
    fn malformed_trailer_field_is_rejected() {
        assert_rejected!(
            ChunkedError::InvalidTrailers(_),
            [
                b"0\r\nno colon here\r\n\r\n",
                b"0\r\nA : b\r\n\r\n",
                b"0\r\nA: b\rc\r\n\r\n",
                // Folded lines (obs-fold) are refused, as by hyper's default parser.
                b"0\r\nA: b\r\n c\r\n\r\n",
            ]
        );
    }

    fn trailer_section(fields: usize) -> Vec<u8> {
        let mut input = b"0\r\n".to_vec();
        for i in 0..fields {
            input.extend_from_slice(format!("f{i}: v\r\n").as_bytes());
        }
        input.extend_from_slice(b"\r\n");
        input
    }

    #[test]
    fn up_to_100_trailer_fields_are_accepted_and_101_are_not() {
        let collected = feed_whole(&trailer_section(MAX_TRAILER_FIELDS)).expect("at the cap");
        assert_eq!(
            collected.trailers.expect("trailers").len(),
            MAX_TRAILER_FIELDS
        );
        assert!(matches!(
            error_of(&trailer_section(MAX_TRAILER_FIELDS + 1)),
            ChunkedError::TooManyTrailers
        ));
    }

    #[test]
    fn a_complete_but_oversized_trailer_section_is_rejected() {
        let mut input = b"0\r\nBig: ".to_vec();
        input.extend(std::iter::repeat_n(b'v', TRAILER_LIMIT));
        input.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(error_of(&input), ChunkedError::TrailersTooLarge));
    }

    #[test]
    fn extensions_are_capped_over_the_whole_body() {
        // Each line's extension is small; together they pass the cap.
        let ext = "e".repeat(1000);
        let mut input = Vec::new();
        for _ in 0..(EXTENSIONS_LIMIT as usize / 1000 + 1) {
            input.extend_from_slice(format!("1;{ext}\r\nx\r\n").as_bytes());
        }
        assert!(matches!(error_of(&input), ChunkedError::ExtensionsTooLarge));
    }

    #[test]
    fn every_call_after_an_error_fails() {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"zz\r\n0\r\n\r\n"[..]);
        assert!(decoder.decode(&mut buf).is_err());
        let mut fresh = BytesMut::from(&b"0\r\n\r\n"[..]);
        assert!(matches!(
            decoder.decode(&mut fresh),
            Err(ChunkedError::AfterError)
        ));
        assert!(!decoder.is_done());
    }

    /// Feeds `prefix` and then `filler` without end, in 1 KiB reads, and
    /// returns the error with the most bytes the buffer ever held. Panics if
    /// 1 MiB goes in without an error.
    fn endless(prefix: &[u8], filler: u8) -> (ChunkedError, usize) {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(prefix);
        let read = [filler; 1024];
        let mut fed = prefix.len();
        let mut most_buffered = buf.len();
        while fed < 1 << 20 {
            match decoder.decode(&mut buf) {
                Err(e) => return (e, most_buffered),
                Ok(Decoded::NeedMore) => {
                    buf.extend_from_slice(&read);
                    fed += read.len();
                    most_buffered = most_buffered.max(buf.len());
                }
                Ok(Decoded::Data(_)) => {}
                Ok(other) => panic!("endless input produced {other:?}"),
            }
        }
        panic!("1 MiB of endless input and no error");
    }

    #[test]
    fn endless_garbage_errors_without_unbounded_buffering() {
        let (e, held) = endless(b"", b'0');
        assert!(matches!(e, ChunkedError::SizeLineTooLong), "{e}");
        assert!(held <= 2 * 1024, "buffer held {held} bytes");

        let (e, held) = endless(b"1", b' ');
        assert!(matches!(e, ChunkedError::SizeLineTooLong), "{e}");
        assert!(held <= 2 * 1024, "buffer held {held} bytes");

        let (e, held) = endless(b"1;", b'x');
        assert!(matches!(e, ChunkedError::ExtensionsTooLarge), "{e}");
        assert!(held <= 2 * 1024, "buffer held {held} bytes");

        let (e, held) = endless(b"0\r\nA: ", b'x');
        assert!(matches!(e, ChunkedError::TrailersTooLarge), "{e}");
        assert!(held <= TRAILER_LIMIT + 1024, "buffer held {held} bytes");

        let (e, _) = endless(b"", b'G');
        assert!(matches!(e, ChunkedError::MissingSize(b'G')), "{e}");
    }

    #[test]
    fn errors_have_readable_messages() {
        assert_eq!(
            error_of(b"1\nx").to_string(),
            "chunk size line does not end with CRLF"
        );
        assert_eq!(
            error_of(b"\n").to_string(),
            "invalid chunk size line: expected a hex digit, found '\\n'"
        );
    }
}
