//! Header hygiene for the proxy: what is removed and what is added on the way
//! through.
//!
//! Hop-by-hop headers describe one TCP connection (RFC 9110 section 7.6.1), so a
//! proxy must not forward them in either direction: the client's connection to us
//! and our pooled connection to the backend are different connections with their
//! own framing and keep-alive. `Connection` may also name further headers that are
//! hop-by-hop for this message only; those go too.
//!
//! Header names are constants, so nothing is allocated to look them up per request.

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http::header::{
    CONNECTION, Entry, HOST, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use service_kit::headers::list_items;

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers that are always removed. (`Connection` itself is
/// removed separately, after the names it lists have been read.)
const HOP_BY_HOP: [HeaderName; 8] = [
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// We terminate plain HTTP; TLS, if any, ends in front of us.
const PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");

/// Removes hop-by-hop headers: `Connection` and every header it names, the fixed
/// list above, and any other `Proxy-*` header.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // The names must be read out before the headers they name can be removed
    // from the same map. Collecting allocates only when `Connection` names
    // something, which HTTP/1.1 clients rarely send. An invalid name matches
    // no header, so it is simply skipped.
    let named: Vec<HeaderName> = list_items(headers, CONNECTION)
        .filter_map(|name| HeaderName::from_bytes(name).ok())
        .collect();
    headers.remove(CONNECTION);
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if headers.keys().any(is_proxy_header) {
        let proxy_headers: Vec<HeaderName> = headers
            .keys()
            .filter(|n| is_proxy_header(n))
            .cloned()
            .collect();
        for name in proxy_headers {
            headers.remove(name);
        }
    }
}

fn is_proxy_header(name: &HeaderName) -> bool {
    // Header names are stored lower-case.
    name.as_str().starts_with("proxy-")
}

/// Tells the backend who the client is: appends the client's IP to
/// `X-Forwarded-For` (keeping the hops before us), and sets `X-Forwarded-Proto`
/// and `X-Forwarded-Host`. `Host` itself passes through untouched.
pub(crate) fn add_forwarding(headers: &mut HeaderMap, client_ip: &HeaderValue) {
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Vacant(entry) => {
            entry.insert(client_ip.clone());
        }
        Entry::Occupied(mut entry) => {
            // Several X-Forwarded-For lines are one comma-separated list
            // (RFC 9110 section 5.3); fold them into a single value.
            let mut joined = BytesMut::new();
            for value in entry.iter() {
                joined.put_slice(value.as_bytes());
                joined.put_slice(b", ");
            }
            joined.put_slice(client_ip.as_bytes());
            if let Ok(value) = HeaderValue::from_maybe_shared(joined.freeze()) {
                entry.insert(value);
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, PROTO_HTTP);
    if let Some(host) = headers.get(HOST).cloned() {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// The client's IP as a header value, built once per connection and shared by
/// every request on it.
pub(crate) fn ip_header_value(ip: std::net::IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(ip.to_string()))
        // An IP address's text form is ASCII digits, dots, colons and hex.
        .unwrap_or(HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        map
    }

    #[test]
    fn removes_fixed_hop_by_hop_and_connection_named_headers() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Custom-Hop"),
            ("connection", "x-second-hop"),
            ("keep-alive", "timeout=5"),
            ("x-custom-hop", "1"),
            ("x-second-hop", "1"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-x-anything", "1"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-end-to-end", "kept"),
            ("host", "example.test"),
        ]);
        remove_hop_by_hop(&mut map);
        let mut left: Vec<_> = map.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "x-end-to-end"]);
    }

    #[test]
    fn forwarding_headers_extend_an_existing_chain() {
        let mut map = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.2"),
            ("host", "example.test"),
        ]);
        add_forwarding(&mut map, &ip_header_value([127, 0, 0, 1].into()));
        assert_eq!(
            map["x-forwarded-for"],
            "203.0.113.7, 198.51.100.2, 127.0.0.1"
        );
        assert_eq!(map.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(map["x-forwarded-host"], "example.test");
        assert_eq!(map["host"], "example.test");
    }

    #[test]
    fn forwarding_headers_start_a_chain() {
        let mut map = HeaderMap::new();
        add_forwarding(&mut map, &ip_header_value("::1".parse().expect("valid IP")));
        assert_eq!(map["x-forwarded-for"], "::1");
        assert!(!map.contains_key("x-forwarded-host"));
    }
}
