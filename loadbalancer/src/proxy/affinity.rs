//! Affinity keys: what in a request the consistent-hash balancer routes by
//! (`hashOn`), read from the request and hashed before the pick.
//!
//! A header's value, a cookie's value, or the client's address (the peer, or
//! what a trusted proxy says in `X-Forwarded-For`, as the rate limits read it).
//! With `hashOn.cookie` and `ttlSeconds`, a request without the cookie is given
//! a new one: a random value, hashed for this request's pick already, and sent
//! back in `Set-Cookie`, so the client's first request lands where the rest of
//! its session will.

use std::net::IpAddr;

use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue};

use crate::balancer::{Affinity, key_hash};

/// A request's affinity key.
#[derive(Debug)]
pub(super) struct Key {
    /// Its hash, for the pick; `None` when the request has no key.
    pub(super) hash: Option<u64>,
    /// A cookie the load balancer assigned, for the response's `Set-Cookie`.
    pub(super) set_cookie: Option<HeaderValue>,
}

impl Key {
    /// A request without a key.
    pub(super) const NONE: Key = Key {
        hash: None,
        set_cookie: None,
    };

    /// The key of a request with `headers`, from `client` (its address, asked
    /// only for `sourceIp`); `new_cookie` makes the value of an assigned
    /// cookie.
    pub(super) fn of(
        affinity: &Affinity,
        headers: &HeaderMap,
        client: impl FnOnce() -> IpAddr,
        new_cookie: impl FnOnce() -> HeaderValue,
    ) -> Key {
        let hashed = |bytes: &[u8]| Key {
            hash: Some(key_hash(bytes)),
            set_cookie: None,
        };
        match affinity {
            Affinity::Header(name) => match headers.get(name) {
                Some(value) if !value.is_empty() => hashed(value.as_bytes()),
                _ => Key::NONE,
            },
            Affinity::SourceIp => match client() {
                IpAddr::V4(ip) => hashed(&ip.octets()),
                IpAddr::V6(ip) => hashed(&ip.octets()),
            },
            Affinity::Cookie { name, ttl_seconds } => {
                if let Some(value) = cookie(headers, name) {
                    return hashed(value);
                }
                let Some(ttl) = ttl_seconds else {
                    return Key::NONE;
                };
                let value = new_cookie();
                let set_cookie = format!(
                    "{name}={}; Path=/; HttpOnly; Max-Age={ttl}",
                    value.to_str().unwrap_or_default()
                );
                Key {
                    hash: Some(key_hash(value.as_bytes())),
                    set_cookie: HeaderValue::from_str(&set_cookie).ok(),
                }
            }
        }
    }

    /// Adds the assigned cookie, if there is one, to a response's `headers`.
    pub(super) fn set_on(self, headers: &mut HeaderMap) {
        if let Some(cookie) = self.set_cookie {
            headers.append(SET_COOKIE, cookie);
        }
    }
}

/// The value of the cookie `name` among the request's `Cookie` fields (one
/// or several, `a=1; b=2`, RFC 6265 section 5.4); the first if it repeats.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|field| field.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let (key, value) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
            (key == name.as_bytes()).then(|| &value[1..])
        })
        .filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use http::HeaderName;

    use super::*;
    use crate::proxy::headers::tests::headers;

    fn of(affinity: &Affinity, headers: &HeaderMap) -> Key {
        Key::of(
            affinity,
            headers,
            || IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            || HeaderValue::from_static("fresh"),
        )
    }

    #[test]
    fn a_cookie_is_found_among_others_and_hashed_by_its_value() {
        let affinity = Affinity::Cookie {
            name: "lb".to_owned(),
            ttl_seconds: None,
        };
        let request = headers(&[("cookie", "theme=dark; lb=abc"), ("cookie", "x=1")]);
        let key = of(&affinity, &request);
        assert_eq!(key.hash, Some(key_hash(b"abc")));
        assert!(key.set_cookie.is_none());
        // A prefix of the name is another cookie.
        let other = headers(&[("cookie", "lbx=abc")]);
        assert!(of(&affinity, &other).hash.is_none());
    }

    #[test]
    fn a_missing_cookie_is_assigned_only_with_a_ttl() {
        let assigned = Affinity::Cookie {
            name: "lb".to_owned(),
            ttl_seconds: Some(600),
        };
        let key = of(&assigned, &HeaderMap::new());
        assert_eq!(key.hash, Some(key_hash(b"fresh")));
        assert_eq!(
            key.set_cookie.expect("assigned"),
            "lb=fresh; Path=/; HttpOnly; Max-Age=600"
        );
    }

    #[test]
    fn headers_and_addresses_are_keys_and_an_empty_header_is_none() {
        let header = Affinity::Header(HeaderName::from_static("x-user"));
        let key = of(&header, &headers(&[("x-user", "ada")]));
        assert_eq!(key.hash, Some(key_hash(b"ada")));
        assert!(of(&header, &headers(&[("x-user", "")])).hash.is_none());
        let source = of(&Affinity::SourceIp, &HeaderMap::new());
        assert_eq!(source.hash, Some(key_hash(&[192, 0, 2, 7])));
    }
}
