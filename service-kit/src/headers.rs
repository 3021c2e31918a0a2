//! Headers: reading comma-separated header lists and message framing, per RFC
//! 9110 (section 5.6.1, lists) and RFC 9112 (section 6, message body length).
//!
//! Both directions of HTTP/1.1 need these rules: the [`listener`](crate::listener)
//! refuses a client request whose framing it cannot honour, and the load
//! balancer's upstream client reads `Connection` and `Transfer-Encoding` from
//! the backends' responses. The rules are the same for both, and neither side
//! should reach into the other for them, so they live here.

use http::HeaderMap;
use http::header::{HeaderName, TRANSFER_ENCODING};

/// Why a request's framing is refused, if it is.
///
/// hyper (1.x, `proto/h1/role.rs`) already answers 400 for an invalid or
/// conflicting `Content-Length`, a `Transfer-Encoding` whose last coding is not
/// `chunked` (an unknown coding included), and `Transfer-Encoding` in HTTP/1.0.
/// When `Transfer-Encoding: chunked` and `Content-Length` arrive together it does
/// what RFC 9112 section 6.3 asks: it frames the body by chunked alone, drops
/// `Content-Length`, and closes the connection after the response, so bytes after
/// the chunked body are never read as a second request. What is left for us is a
/// coding before `chunked` (`gzip, chunked`, or `chunked` twice): we do not decode
/// transfer codings, and `Transfer-Encoding` is hop-by-hop, so a proxy would hand
/// the backend a body in a coding it was never told about.
pub fn framing_error(headers: &HeaderMap) -> Option<&'static str> {
    let mut codings = list_items(headers, TRANSFER_ENCODING);
    match (codings.next(), codings.next()) {
        (None, _) => None,
        (Some(coding), None) if coding.eq_ignore_ascii_case(b"chunked") => None,
        _ => Some("unsupported transfer coding: only a single \"chunked\" is accepted"),
    }
}

/// The items of a comma-separated header field, over all its lines, with the
/// whitespace around them trimmed and empty ones skipped, as RFC 9110 section
/// 5.6.1 asks of a recipient. Bytes, not `str`: a stray non-ASCII byte in one
/// item does not hide the others.
pub fn list_items(headers: &HeaderMap, name: HeaderName) -> impl DoubleEndedIterator<Item = &[u8]> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use http::header::CONNECTION;

    use super::*;

    fn headers(te: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in te {
            headers.append(
                TRANSFER_ENCODING,
                HeaderValue::from_str(value).expect("valid"),
            );
        }
        headers
    }

    #[test]
    fn plain_chunked_and_no_coding_are_accepted() {
        assert_eq!(framing_error(&headers(&[])), None);
        assert_eq!(framing_error(&headers(&["chunked"])), None);
        assert_eq!(framing_error(&headers(&[" Chunked "])), None);
    }

    #[test]
    fn any_other_coding_list_is_refused() {
        for te in [
            &["gzip, chunked"][..],
            &["chunked, chunked"],
            &["gzip", "chunked"],
            &["chunked", "chunked"],
        ] {
            assert!(framing_error(&headers(te)).is_some(), "{te:?} accepted");
        }
    }

    #[test]
    fn list_items_span_lines_trim_whitespace_and_skip_empty_items() {
        let mut headers = headers(&["gzip ,, ", "\tchunked,x"]);
        headers.append(
            TRANSFER_ENCODING,
            HeaderValue::from_bytes(b"caf\xe9, br").expect("obs-text is a valid value"),
        );
        let items: Vec<&[u8]> = list_items(&headers, TRANSFER_ENCODING).collect();
        let expected: [&[u8]; 5] = [b"gzip", b"chunked", b"x", b"caf\xe9", b"br"];
        assert_eq!(items, expected);
        assert_eq!(
            list_items(&headers, TRANSFER_ENCODING).next_back(),
            Some(&b"br"[..])
        );
        assert_eq!(list_items(&headers, CONNECTION).next(), None);
    }
}
