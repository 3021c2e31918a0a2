//! Header hygiene for the proxy: what is removed and what is added on the way
//! through.
//!
//! Hop-by-hop headers describe one TCP connection (RFC 9110 section 7.6.1), so a
//! proxy must not forward them in either direction: the client's connection to us
//! and our pooled connection to the backend are different connections with their
//! own framing and keep-alive. `Connection` may also name further headers that are
//! hop-by-hop for this message only; those go too.
//!
//! Two of them carry a wish that the proxy passes on in its own words, so they
//! are read before they go ([`Hops`]): `TE: trailers` says the client accepts
//! trailer fields, which the backend needs to know before it sends any; and
//! `Connection: upgrade` with `Upgrade` asks to switch protocols (a WebSocket),
//! which the backend must see to agree. `Trailer`, which names the trailer
//! fields to come, is end to end and passes through.
//!
//! An HTTP/2 client's request goes on to the backends as HTTP/1.1, which needs
//! two things of it: a `Host`, which [`use_target_authority`] takes from the
//! request's `:authority`, and its cookies in one `Cookie` field
//! ([`join_cookies`]).
//!
//! Header names are constants, so nothing is allocated to look them up per request.

use std::net::{IpAddr, Ipv4Addr};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http::header::{
    CONNECTION, COOKIE, Entry, HOST, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE,
};
use service_kit::headers::list_items;

use super::Scheme;

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

const HOPS: usize = 7;

/// The hop-by-hop headers that are always removed. (`Connection` itself is
/// removed separately, after the names it lists have been read.)
const HOP_BY_HOP: [HeaderName; HOPS] = [
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
];
/// Where `TE` is in [`HOP_BY_HOP`].
const TE_INDEX: usize = 4;

const TRAILERS: HeaderValue = HeaderValue::from_static("trailers");
const UPGRADE_TOKEN: HeaderValue = HeaderValue::from_static("upgrade");

/// What the removed hop-by-hop headers asked for that the proxy passes on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Hops {
    /// `TE` listed `trailers`: the sender accepts trailer fields.
    pub(crate) trailers: bool,
    /// `Connection` listed `upgrade`, and this is the `Upgrade` header's value:
    /// the protocols the sender wants to switch to (or, in a `101`, switched to).
    pub(crate) upgrade: Option<HeaderValue>,
}

impl Hops {
    /// Writes `Connection: upgrade` and the `Upgrade` protocols back into
    /// `headers`, if an upgrade was asked for (or agreed to).
    pub(crate) fn restore_upgrade(&self, headers: &mut HeaderMap) {
        if let Some(protocols) = &self.upgrade {
            headers.insert(CONNECTION, UPGRADE_TOKEN);
            headers.insert(UPGRADE, protocols.clone());
        }
    }

    /// Writes `TE: trailers` back into `headers` if it was there.
    pub(crate) fn restore_trailers(&self, headers: &mut HeaderMap) {
        if self.trailers {
            headers.insert(TE, TRAILERS);
        }
    }

    /// Whether the upgrade asked for is to cleartext HTTP/2 (`h2c`), which
    /// speaks to this hop only and is never passed on (RFC 9113 section 3.1
    /// removed it; a backend that took it would speak HTTP/2 to a proxy that
    /// expects HTTP/1.1).
    pub(crate) fn upgrade_is_h2c(&self) -> bool {
        self.upgrade.as_ref().is_some_and(|protocols| {
            protocols
                .as_bytes()
                .split(|&b| b == b',')
                .any(|protocol| protocol.trim_ascii().eq_ignore_ascii_case(b"h2c"))
        })
    }
}

const PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
const PROTO_HTTPS: HeaderValue = HeaderValue::from_static("https");

/// Removes hop-by-hop headers: `Connection` and every header it names, the fixed
/// list above, and any other `Proxy-*` header. Returns what they asked for that
/// the proxy passes on ([`Hops`]).
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) -> Hops {
    // Which of them the message has, in one pass over its few names,
    // comparing constants: most carry none, and the rest one or two
    // (`Connection: close`), so only those are looked up and removed.
    let mut fixed = [false; HOPS];
    let (mut connection, mut proxy) = (false, false);
    // Bound once: each use of the constant array builds a copy and drops it.
    let hop_by_hop = HOP_BY_HOP;
    for name in headers.keys() {
        if name == CONNECTION {
            connection = true;
        } else if let Some(index) = hop_by_hop.iter().position(|hop| hop == name) {
            fixed[index] = true;
        } else if is_proxy_header(name) {
            proxy = true;
        }
    }
    if !connection && !proxy && !fixed.contains(&true) {
        return Hops::default();
    }
    let trailers = fixed[TE_INDEX]
        && list_items(headers, TE).any(|coding| coding.eq_ignore_ascii_case(TRAILERS.as_bytes()));
    // The names must be read out before the headers they name can be removed
    // from the same map. The options that name no header of their own
    // (`close`) or one of the fixed list are skipped, so collecting allocates
    // only when `Connection` names something else, which clients rarely
    // send. An invalid name matches no header, so it is simply skipped. The
    // same pass notes an `upgrade` option.
    let mut upgrade_asked = false;
    let mut named: Vec<HeaderName> = Vec::new();
    if connection {
        for option in list_items(headers, CONNECTION) {
            upgrade_asked |= option.eq_ignore_ascii_case(UPGRADE_TOKEN.as_bytes());
            if option.eq_ignore_ascii_case(b"close")
                || hop_by_hop
                    .iter()
                    .any(|hop| option.eq_ignore_ascii_case(hop.as_str().as_bytes()))
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(option) {
                named.push(name);
            }
        }
        headers.remove(CONNECTION);
    }
    let upgrade = upgrade_asked
        .then(|| headers.get(UPGRADE).cloned())
        .flatten();
    for name in named {
        headers.remove(name);
    }
    for (name, _) in hop_by_hop.iter().zip(fixed).filter(|&(_, present)| present) {
        headers.remove(name);
    }
    if proxy {
        let proxy_headers: Vec<HeaderName> = headers
            .keys()
            .filter(|n| is_proxy_header(n))
            .cloned()
            .collect();
        for name in proxy_headers {
            headers.remove(name);
        }
    }
    Hops { trailers, upgrade }
}

fn is_proxy_header(name: &HeaderName) -> bool {
    // Header names are stored lower-case.
    name.as_str().starts_with("proxy-")
}

/// The header fields the proxy sets on every request it sends on, in place
/// of any the client sent by the same names: the request id, and what tells
/// the backend who the client is. `X-Forwarded-For` is the client's chain
/// (the hops before us) with the client's IP appended; `X-Forwarded-Proto`
/// the scheme it used; `X-Forwarded-Host` its `Host`, which itself passes
/// through untouched. They go straight into the encoded head
/// (`UpstreamHead::new`), not into the request's map.
#[derive(Debug)]
pub(crate) struct OwnFields {
    fields: [(HeaderName, HeaderValue); 4],
    /// How many of `fields` are set: `X-Forwarded-Host`, the last, only
    /// when the request has a `Host`.
    len: usize,
}

impl OwnFields {
    pub(crate) fn new(
        headers: &HeaderMap,
        request_id: &HeaderValue,
        client_ip: &HeaderValue,
        scheme: Scheme,
    ) -> Self {
        let proto = match scheme {
            Scheme::Http => PROTO_HTTP,
            Scheme::Https => PROTO_HTTPS,
        };
        let host = headers.get(HOST);
        Self {
            fields: [
                (X_REQUEST_ID, request_id.clone()),
                (X_FORWARDED_FOR, forwarded_for(headers, client_ip)),
                (X_FORWARDED_PROTO, proto),
                (X_FORWARDED_HOST, host.cloned().unwrap_or(PROTO_HTTP)),
            ],
            len: if host.is_some() { 4 } else { 3 },
        }
    }

    pub(crate) fn as_slice(&self) -> &[(HeaderName, HeaderValue)] {
        &self.fields[..self.len]
    }
}

/// The `X-Forwarded-For` to send on: the client's IP after the chain the
/// request already has. Several X-Forwarded-For lines are one comma-separated
/// list (RFC 9110 section 5.3), folded into a single value.
fn forwarded_for(headers: &HeaderMap, client_ip: &HeaderValue) -> HeaderValue {
    let mut chain = headers.get_all(X_FORWARDED_FOR).iter().peekable();
    if chain.peek().is_none() {
        return client_ip.clone();
    }
    let mut joined = BytesMut::new();
    for value in chain {
        joined.put_slice(value.as_bytes());
        joined.put_slice(b", ");
    }
    joined.put_slice(client_ip.as_bytes());
    // Header values joined by a comma and a space make a valid value.
    HeaderValue::from_maybe_shared(joined.freeze()).unwrap_or_else(|_| client_ip.clone())
}

/// Gives a request in absolute form (`GET http://example.com/x`) the `Host` of
/// its target: RFC 9112 section 3.2.2 has a proxy ignore the `Host` it received
/// then, and the backend gets the origin form, in which `Host` is all it has.
pub(crate) fn use_target_authority(request: &mut http::request::Parts) {
    let Some(authority) = request.uri.authority() else {
        return;
    };
    // The host and port only, as the client wrote them: an authority's
    // `user:password@` is never a `Host`. (Put together again with `format!`
    // instead, they cost every HTTP/2 request a thousand instructions.)
    let authority = authority.as_str();
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.is_empty() {
        return;
    }
    if let Ok(host) = HeaderValue::from_str(host) {
        request.headers.insert(HOST, host);
    }
}

/// Joins the `Cookie` fields of a request into one, as RFC 9113 section 8.2.3
/// requires of an HTTP/2 request going on over HTTP/1.1: HTTP/2 clients send
/// each cookie as a field of its own (so that HPACK indexes them one by one),
/// but an HTTP/1.1 server expects one `Cookie` line (RFC 6265 section 5.4).
/// Allocates only when there is more than one.
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    // Counted first: `entry` makes room for an insertion, and a full map (an
    // HTTP/2 request's is made to measure) would grow for nothing.
    if headers.get_all(COOKIE).iter().nth(1).is_none() {
        return;
    }
    let Entry::Occupied(mut entry) = headers.entry(COOKIE) else {
        return;
    };
    let mut joined = BytesMut::new();
    for (index, crumb) in entry.iter().enumerate() {
        if index > 0 {
            joined.put_slice(b"; ");
        }
        joined.put_slice(crumb.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(joined.freeze()) {
        entry.insert(value);
    }
}

/// Where a plain-HTTP request is redirected with `tls.redirectHttp`: the same
/// host (without its port), path and query, over HTTPS on `port` (left out when
/// it is 443). `None` when the request named no host.
pub(crate) fn https_location(request: &http::request::Parts, port: u16) -> Option<HeaderValue> {
    let host = match request.uri.host() {
        Some(host) => host.to_owned(),
        None => {
            let header = request.headers.get(HOST)?.to_str().ok()?;
            let authority: http::uri::Authority = header.parse().ok()?;
            authority.host().to_owned()
        }
    };
    let target = request.uri.path_and_query().map_or("/", |p| p.as_str());
    let location = match port {
        443 => format!("https://{host}{target}"),
        port => format!("https://{host}:{port}{target}"),
    };
    HeaderValue::from_str(&location).ok()
}

/// The client's IP as a header value, built once per connection and shared by
/// every request on it.
pub(crate) fn ip_header_value(ip: IpAddr) -> HeaderValue {
    let text = match ip {
        IpAddr::V4(ip) => ipv4_text(ip),
        IpAddr::V6(ip) => Bytes::from(ip.to_string()),
    };
    HeaderValue::from_maybe_shared(text)
        // An IP address's text form is ASCII digits, dots, colons and hex.
        .unwrap_or(HeaderValue::from_static("unknown"))
}

/// `ip` in dotted-decimal form, as `Display` writes it, but without `fmt`:
/// formatting four numbers through `fmt` cost 1,500 instructions, a tenth of
/// what the proxy spends on a new connection beyond its request.
fn ipv4_text(ip: Ipv4Addr) -> Bytes {
    let mut text = BytesMut::with_capacity("255.255.255.255".len());
    for (index, octet) in ip.octets().into_iter().enumerate() {
        if index > 0 {
            text.put_u8(b'.');
        }
        if octet >= 100 {
            text.put_u8(b'0' + octet / 100);
        }
        if octet >= 10 {
            text.put_u8(b'0' + octet / 10 % 10);
        }
        text.put_u8(b'0' + octet % 10);
    }
    text.freeze()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A header map of `pairs`, in order, repeated names appended: for the
    /// tests of every module that reads request headers.
    pub(in crate::proxy) fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
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
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-end-to-end", "kept"),
            ("host", "example.test"),
        ]);
        let hops = remove_hop_by_hop(&mut map);
        let mut left: Vec<_> = map.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "trailer", "x-end-to-end"]);
        assert_eq!(hops, Hops::default(), "no trailers asked, and no upgrade");
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_whole() {
        let pairs = [
            ("host", "example.test"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.2"),
            ("trailer", "x-checksum"),
            ("x-proxy-tag", "not a Proxy-* header"),
        ];
        let mut map = headers(&pairs);
        assert_eq!(remove_hop_by_hop(&mut map), Hops::default());
        assert_eq!(map, headers(&pairs));
        // Any one of them is enough to go through the whole list.
        for hop in ["connection", "keep-alive", "te", "proxy-anything"] {
            let mut map = headers(&[("host", "example.test"), (hop, "x")]);
            remove_hop_by_hop(&mut map);
            assert_eq!(map, headers(&[("host", "example.test")]), "{hop}");
        }
    }

    #[test]
    fn te_trailers_and_an_upgrade_are_passed_on_in_the_proxys_words() {
        let mut map = headers(&[
            ("connection", "Upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("te", "gzip, Trailers"),
        ]);
        let hops = remove_hop_by_hop(&mut map);
        assert!(map.is_empty(), "{map:?}");
        assert!(hops.trailers);
        assert!(!hops.upgrade_is_h2c());
        hops.restore_trailers(&mut map);
        hops.restore_upgrade(&mut map);
        assert_eq!(map["te"], "trailers");
        assert_eq!(map["connection"], "upgrade");
        assert_eq!(map["upgrade"], "websocket");
    }

    #[test]
    fn an_upgrade_header_without_connection_upgrade_is_no_upgrade() {
        let mut map = headers(&[("upgrade", "websocket")]);
        assert_eq!(remove_hop_by_hop(&mut map).upgrade, None);
        let mut map = headers(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]);
        assert!(remove_hop_by_hop(&mut map).upgrade_is_h2c());
    }

    /// The fields of `own` as text, in order.
    fn fields(own: &OwnFields) -> Vec<(&str, &str)> {
        own.as_slice()
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().expect("ASCII")))
            .collect()
    }

    #[test]
    fn forwarding_headers_extend_an_existing_chain() {
        let map = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.2"),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "from-the-client"),
            ("host", "example.test"),
        ]);
        let own = OwnFields::new(
            &map,
            &HeaderValue::from_static("ours"),
            &ip_header_value([127, 0, 0, 1].into()),
            Scheme::Http,
        );
        assert_eq!(
            fields(&own),
            [
                ("x-request-id", "ours"),
                ("x-forwarded-for", "203.0.113.7, 198.51.100.2, 127.0.0.1"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "example.test"),
            ]
        );
    }

    #[test]
    fn an_absolute_form_target_sets_the_host() {
        let request = http::Request::get("http://user:secret@example.com:8080/x?y")
            .header("host", "other.test")
            .body(())
            .expect("valid request");
        let (mut parts, ()) = request.into_parts();
        use_target_authority(&mut parts);
        assert_eq!(parts.headers["host"], "example.com:8080");
        for (target, host) in [
            ("http://example.com/x", "example.com"),
            ("http://[2001:db8::1]:8443/", "[2001:db8::1]:8443"),
            ("http://a@b@example.com:81/", "example.com:81"),
        ] {
            let (mut parts, ()) = http::Request::get(target)
                .body(())
                .expect("valid request")
                .into_parts();
            use_target_authority(&mut parts);
            assert_eq!(parts.headers["host"], host, "{target}");
        }
        let request = http::Request::get("/x")
            .header("host", "kept.test")
            .body(());
        let (mut parts, ()) = request.expect("valid request").into_parts();
        use_target_authority(&mut parts);
        assert_eq!(parts.headers["host"], "kept.test");
    }

    #[test]
    fn cookie_crumbs_are_joined_into_one_field() {
        let mut map = headers(&[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")]);
        join_cookies(&mut map);
        assert_eq!(map.get_all("cookie").iter().count(), 1);
        assert_eq!(map["cookie"], "a=1; b=2; c=3");
        let mut map = headers(&[("cookie", "a=1; b=2")]);
        join_cookies(&mut map);
        assert_eq!(map["cookie"], "a=1; b=2");
        let mut map = HeaderMap::new();
        join_cookies(&mut map);
        assert!(map.is_empty());
    }

    #[test]
    fn forwarding_headers_start_a_chain() {
        let own = OwnFields::new(
            &HeaderMap::new(),
            &HeaderValue::from_static("ours"),
            &ip_header_value("::1".parse().expect("valid IP")),
            Scheme::Https,
        );
        assert_eq!(
            fields(&own),
            [
                ("x-request-id", "ours"),
                ("x-forwarded-for", "::1"),
                ("x-forwarded-proto", "https"),
            ],
            "no Host, so no X-Forwarded-Host"
        );
    }

    #[test]
    fn an_ip_header_value_is_the_addresss_display_form() {
        // Every octet value in every position, so each digit count and each
        // place of the dots is covered.
        for octet in 0..=u8::MAX {
            for ip in [
                Ipv4Addr::new(octet, 0, 9, 10),
                Ipv4Addr::new(99, octet, 100, 255),
                Ipv4Addr::new(1, 20, octet, 0),
                Ipv4Addr::new(255, 0, 7, octet),
            ] {
                assert_eq!(ip_header_value(ip.into()), ip.to_string().as_str());
            }
        }
        let ip: IpAddr = "2001:db8::1".parse().expect("valid IP");
        assert_eq!(ip_header_value(ip), "2001:db8::1");
    }
}
