//! Rate limits: how many requests one client, and all clients together, may send
//! to this replica, with the generic cell rate algorithm (GCRA).
//!
//! GCRA keeps one instant per limited thing, its *theoretical arrival time*
//! (TAT): when the next request would be due if requests came exactly at the
//! allowed rate. A request at `now` conforms if it is not more than the burst's
//! worth of intervals early (`TAT - now <= (burst - 1) × interval`), and then
//! moves the TAT one interval on. It is a token bucket without a refill loop:
//! no timer, one subtraction per request, and a client idle for long enough has
//! a TAT in the past, which is the same as having no entry at all. That last
//! property bounds the memory: entries whose TAT has passed can be dropped
//! whenever the table is full ([`MAX_CLIENTS`]).
//!
//! Limits are per replica: with N replicas behind a Service, a client may get up
//! to N times the limit, spread as the Service spreads its connections.
//!
//! Why not the `governor` crate, the ecosystem's usual choice: its keyed
//! limiter keeps a state per key in a map that grows with every new key until
//! the caller prunes it (`retain_recent`) on a timer of its own, so a flood of
//! distinct keys between two prunes is unbounded; here the bound is kept at
//! each insert. And GCRA itself is the few lines of [`Gcra`], which a reader
//! of this project should see rather than take on trust.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http::header::HeaderName;
use serde::{Deserialize, Serialize};

/// Clients tracked at most: about 100 bytes each, so the table stays under
/// 10 MiB whatever the number of clients. When it is full, clients whose TAT
/// has passed are forgotten (they are indistinguishable from new ones); if
/// none has, a new client goes untracked, held only by the global limit.
pub const MAX_CLIENTS: usize = 100_000;

/// The `rateLimit` block: either part optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    /// A limit for each client, told apart by `key`.
    #[serde(default)]
    pub per_client: Option<PerClientConfig>,
    /// One limit for every request this replica serves.
    #[serde(default)]
    pub global: Option<LimitConfig>,
}

/// Requests per second, and how many may come at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitConfig {
    /// The sustained rate, at least 1.
    pub requests_per_second: u32,
    /// Requests allowed at once, at least 1.
    pub burst: u32,
}

/// The per-client limit and what tells clients apart.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerClientConfig {
    /// The sustained rate, at least 1.
    pub requests_per_second: u32,
    /// Requests allowed at once, at least 1.
    pub burst: u32,
    /// `"sourceIp"` (the default) or `{"header": NAME}`.
    #[serde(default)]
    pub key: ClientKey,
}

/// What tells one client from another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ClientKey {
    /// The client's address: the connection's peer, or the address a trusted
    /// proxy says it forwarded for (`trustedProxies`).
    #[default]
    SourceIp,
    /// The value of this request header (an API key, say); requests without
    /// it share one limit.
    #[serde(untagged)]
    Header {
        /// The header's name.
        header: String,
    },
}

impl RateLimitConfig {
    /// Checks the values; the error names the key and the reason.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(client) = &self.per_client {
            at_least_one([
                (
                    "rateLimit.perClient.requestsPerSecond",
                    client.requests_per_second,
                ),
                ("rateLimit.perClient.burst", client.burst),
            ])?;
            if let ClientKey::Header { header } = &client.key
                && HeaderName::try_from(header.as_str()).is_err()
            {
                return Err((
                    "rateLimit.perClient.key",
                    format!("{header:?} is not a header name"),
                ));
            }
        }
        if let Some(global) = &self.global {
            at_least_one([
                (
                    "rateLimit.global.requestsPerSecond",
                    global.requests_per_second,
                ),
                ("rateLimit.global.burst", global.burst),
            ])?;
        }
        Ok(())
    }
}

/// The first of these keys whose value is 0, as an error.
fn at_least_one(values: [(&'static str, u32); 2]) -> Result<(), (&'static str, String)> {
    match values.into_iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err((key, "must be at least 1".to_owned())),
        None => Ok(()),
    }
}

/// One GCRA limit: the interval between requests at the allowed rate, and how
/// far ahead of it a burst may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gcra {
    interval: Duration,
    /// `(burst - 1) × interval`.
    tolerance: Duration,
    /// For the headers.
    rate: u32,
    burst: u32,
}

impl Gcra {
    fn new(requests_per_second: u32, burst: u32) -> Self {
        let interval = Duration::from_secs(1) / requests_per_second.max(1);
        Self {
            interval,
            tolerance: interval * burst.saturating_sub(1),
            rate: requests_per_second,
            burst: burst.max(1),
        }
    }

    /// Admits a request at `now` against `tat` (updated when admitted), or
    /// says how long until one would be.
    fn admit(&self, tat: &mut Instant, now: Instant) -> Result<(), Duration> {
        let due = (*tat).max(now);
        let ahead = due - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        *tat = due + self.interval;
        Ok(())
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// The client's own, the client told apart by its address or, with
    /// `by_header`, by a header.
    PerClient { by_header: bool },
    /// The replica's.
    Global,
}

impl Limit {
    /// How headers, logs and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::PerClient { .. } => "client",
            Limit::Global => "global",
        }
    }

    /// What tells the clients of this limit apart, as metrics name it.
    pub fn key_kind(self) -> &'static str {
        match self {
            Limit::PerClient { by_header: false } => "sourceIp",
            Limit::PerClient { by_header: true } => "header",
            Limit::Global => "none",
        }
    }
}

/// A refused request: which limit, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub limit: Limit,
    /// Until a request would be admitted.
    pub retry_after: Duration,
    /// The limit's rate per second and burst, for `RateLimit-Policy`.
    pub requests_per_second: u32,
    pub burst: u32,
}

/// Who a client is, as the per-client limit tells them apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Client {
    Ip(IpAddr),
    Header(Bytes),
    /// A request without the key header.
    Anonymous,
}

/// The limits in force, shared by every worker of the process.
#[derive(Debug)]
pub struct RateLimiter {
    per_client: Option<(Gcra, KeyRule)>,
    global: Option<(Gcra, Mutex<Instant>)>,
    /// Each client's TAT, in shards so that workers rarely wait on each other.
    clients: Vec<Mutex<HashMap<Client, Instant>>>,
}

#[derive(Debug)]
enum KeyRule {
    SourceIp,
    Header(HeaderName),
}

/// Shards of the client table.
const SHARDS: usize = 16;

impl RateLimiter {
    /// The limiter `config` describes, or `None` when it limits nothing.
    pub fn new(config: &RateLimitConfig) -> Option<Self> {
        if config.per_client.is_none() && config.global.is_none() {
            return None;
        }
        let per_client = config.per_client.as_ref().map(|client| {
            let rule = match &client.key {
                ClientKey::SourceIp => KeyRule::SourceIp,
                ClientKey::Header { header } => {
                    HeaderName::try_from(header.as_str()).map_or(KeyRule::SourceIp, KeyRule::Header)
                }
            };
            (Gcra::new(client.requests_per_second, client.burst), rule)
        });
        let now = Instant::now();
        let global = config.global.map(|global| {
            (
                Gcra::new(global.requests_per_second, global.burst),
                Mutex::new(now),
            )
        });
        Some(Self {
            per_client,
            global,
            clients: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// Admits or refuses a request from `client_ip` with `headers` at `now`.
    /// The client's own limit is checked first, so a client over its limit
    /// does not use up the global one.
    pub fn check(
        &self,
        client_ip: IpAddr,
        headers: &HeaderMap,
        now: Instant,
    ) -> Result<(), Refusal> {
        if let Some((gcra, rule)) = &self.per_client {
            let client = match rule {
                KeyRule::SourceIp => Client::Ip(client_ip),
                KeyRule::Header(name) => headers.get(name).map_or(Client::Anonymous, |value| {
                    Client::Header(Bytes::copy_from_slice(value.as_bytes()))
                }),
            };
            self.check_client(gcra, client, now)?;
        }
        if let Some((gcra, tat)) = &self.global {
            gcra.admit(&mut lock(tat), now)
                .map_err(|retry_after| refusal(Limit::Global, gcra, retry_after))?;
        }
        Ok(())
    }

    fn check_client(&self, gcra: &Gcra, client: Client, now: Instant) -> Result<(), Refusal> {
        let shard = &self.clients[shard_of(&client)];
        let mut table = lock(shard);
        if !table.contains_key(&client) && table.len() >= MAX_CLIENTS / SHARDS {
            // Forget the clients that have been quiet long enough to be
            // new again; if none has, this one goes untracked.
            table.retain(|_, tat| *tat > now);
            if table.len() >= MAX_CLIENTS / SHARDS {
                return Ok(());
            }
        }
        let by_header = !matches!(client, Client::Ip(_));
        let tat = table.entry(client).or_insert(now);
        gcra.admit(tat, now)
            .map_err(|retry_after| refusal(Limit::PerClient { by_header }, gcra, retry_after))
    }

    /// Clients tracked now.
    pub fn tracked_clients(&self) -> usize {
        self.clients.iter().map(|shard| lock(shard).len()).sum()
    }
}

fn refusal(limit: Limit, gcra: &Gcra, retry_after: Duration) -> Refusal {
    Refusal {
        limit,
        retry_after,
        requests_per_second: gcra.rate,
        burst: gcra.burst,
    }
}

fn shard_of(client: &Client) -> usize {
    // One hash for the process: every worker must find a client in the same shard.
    static STATE: OnceLock<RandomState> = OnceLock::new();
    let hash = STATE.get_or_init(RandomState::new).hash_one(client);
    usize::try_from(hash % SHARDS as u64).unwrap_or(0)
}

// A poisoned lock holds whole instants and a whole map: keep using them.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_client: Option<(u32, u32)>, global: Option<(u32, u32)>) -> RateLimiter {
        let config = RateLimitConfig {
            per_client: per_client.map(|(requests_per_second, burst)| PerClientConfig {
                requests_per_second,
                burst,
                key: ClientKey::SourceIp,
            }),
            global: global.map(|(requests_per_second, burst)| LimitConfig {
                requests_per_second,
                burst,
            }),
        };
        RateLimiter::new(&config).expect("something is limited")
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_and_other_clients_are_apart() {
        let limiter = limiter(Some((10, 3)), None);
        let (start, none) = (Instant::now(), HeaderMap::new());
        for _ in 0..3 {
            assert!(limiter.check(ip(1), &none, start).is_ok());
        }
        let refused = limiter
            .check(ip(1), &none, start)
            .expect_err("over the burst");
        assert_eq!(refused.limit, Limit::PerClient { by_header: false });
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        // Another client has its own burst.
        assert!(limiter.check(ip(2), &none, start).is_ok());
        // One interval later, one more request conforms, and only one.
        let later = start + Duration::from_millis(100);
        assert!(limiter.check(ip(1), &none, later).is_ok());
        assert!(limiter.check(ip(1), &none, later).is_err());
    }

    #[test]
    fn the_global_limit_holds_every_client() {
        let limiter = limiter(None, Some((1, 2)));
        let (now, none) = (Instant::now(), HeaderMap::new());
        assert!(limiter.check(ip(1), &none, now).is_ok());
        assert!(limiter.check(ip(2), &none, now).is_ok());
        let refused = limiter
            .check(ip(3), &none, now)
            .expect_err("the replica's limit");
        assert_eq!(refused.limit, Limit::Global);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
    }

    #[test]
    fn a_header_key_tells_clients_apart_and_its_absence_is_one_client() {
        let config = RateLimitConfig {
            per_client: Some(PerClientConfig {
                requests_per_second: 1,
                burst: 1,
                key: ClientKey::Header {
                    header: "x-api-key".to_owned(),
                },
            }),
            global: None,
        };
        let limiter = RateLimiter::new(&config).expect("limited");
        let now = Instant::now();
        let key = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-api-key", http::HeaderValue::from_static(value));
            headers
        };
        assert!(limiter.check(ip(1), &key("a"), now).is_ok());
        assert!(limiter.check(ip(1), &key("b"), now).is_ok(), "another key");
        assert!(
            limiter.check(ip(2), &key("a"), now).is_err(),
            "the same key elsewhere"
        );
        assert!(limiter.check(ip(1), &HeaderMap::new(), now).is_ok());
        assert!(
            limiter.check(ip(2), &HeaderMap::new(), now).is_err(),
            "no key: one client"
        );
    }

    #[test]
    fn memory_stays_bounded_however_many_clients_come() {
        let limiter = limiter(Some((1, 1)), None);
        let (now, none) = (Instant::now(), HeaderMap::new());
        for client in 0..(MAX_CLIENTS as u32 + 20_000) {
            let _ = limiter.check(IpAddr::from(client.to_be_bytes()), &none, now);
        }
        assert!(limiter.tracked_clients() <= MAX_CLIENTS);
        // A second later every one of them is idle again: the next arrival in a
        // full shard clears the shard and is tracked.
        let later = now + Duration::from_secs(2);
        let _ = limiter.check(ip(250), &none, later);
        assert!(limiter.tracked_clients() < MAX_CLIENTS);
    }

    #[test]
    fn config_values_are_checked() {
        let bad = RateLimitConfig {
            per_client: None,
            global: Some(LimitConfig {
                requests_per_second: 0,
                burst: 1,
            }),
        };
        assert_eq!(
            bad.validate().map_err(|(key, _)| key),
            Err("rateLimit.global.requestsPerSecond")
        );
        let parsed: RateLimitConfig = serde_json::from_str(
            r#"{"perClient": {"requestsPerSecond": 5, "burst": 10, "key": {"header": "X-Api-Key"}}}"#,
        )
        .expect("parses");
        assert_eq!(
            parsed.per_client.map(|c| c.key),
            Some(ClientKey::Header {
                header: "X-Api-Key".to_owned()
            })
        );
        let parsed: RateLimitConfig = serde_json::from_str(
            r#"{"perClient": {"requestsPerSecond": 5, "burst": 10, "key": "sourceIp"}}"#,
        )
        .expect("parses");
        assert_eq!(parsed.per_client.map(|c| c.key), Some(ClientKey::SourceIp));
    }
}
