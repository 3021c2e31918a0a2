//! Configuration: read at start-up and on every reload, before anything uses it.
//!
//! The file is JSON with camelCase keys, as in the Go guide, mounted from a
//! ConfigMap at [`DEFAULT_PATH`] (overridable with `--config` or `CONFIG_PATH`).
//! The guide's keys (`port`, `backendServiceName`, `backendPort`) are required;
//! every other key is optional, with the default documented once, on its field.
//!
//! Config sits above the parts it configures: each part owns the type of its own
//! settings (the balancer its [`BalancerConfig`], retries their [`RetriesConfig`],
//! ...), and this module only groups them into [`Config`] and converts where a
//! part wants durations rather than the file's milliseconds. The file is flat, so
//! the sections are read in two steps: the JSON object is parsed once, each
//! section takes its keys from it, and a key that no section took is unknown.
//! A typo must never be silently ignored, so unknown keys are rejected, and every
//! error names the file, the field and the reason.
//!
//! [`Config::changes`] is the one place that says which sections apply while
//! serving and which only at the next start; live reload follows it.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
pub use service_kit::logging::{LogFormat, LogLevel};

pub use crate::balancer::{Algorithm, BalancerConfig};
pub use crate::client_ip::{Cidr, TrustedProxies};
pub use crate::concurrency::ConcurrencyConfig;
pub use crate::discovery::{
    AddrError, DiscoveryConfig, DiscoveryMode, parse_backend_addr, parse_backend_list,
};
pub use crate::health::HealthCheckConfig;
pub use crate::outlier::OutlierConfig;
pub use crate::proxy::ProxyConfig;
use crate::proxy::Resilience;
use crate::proxy::{Policy, PolicyStatus};
pub use crate::ratelimit::{ClientKey, LimitConfig, PerClientConfig, RateLimitConfig, RateLimiter};
pub use crate::retry::RetriesConfig;
use crate::server::{Http2Limits, ServerLimits};
pub use crate::tls::{CertPair, TlsConfig};
pub use crate::topology::TopologyConfig;

/// Where the ConfigMap is mounted inside the pod.
pub const DEFAULT_PATH: &str = "/etc/config/config.json";

/// The load balancer's settings, validated, in sections. Each section is a group
/// of keys that is applied as one (see [`Config::changes`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// `port`, `adminPort`, `bindAddress`: baked into the listening sockets.
    #[serde(flatten)]
    pub listen: Listen,
    /// `backendServiceName`, `backendPort`, `discovery`, `staticBackends`.
    #[serde(flatten)]
    pub discovery: DiscoveryConfig,
    /// `connectTimeoutMs`, `requestTimeoutMs`: the upstream timeouts.
    #[serde(flatten)]
    pub proxy: ProxyConfig,
    /// `logLevel`, `logFormat`.
    #[serde(flatten)]
    pub logging: Logging,
    /// Client-side limits and shutdown timing.
    #[serde(flatten)]
    pub limits: Limits,
    /// `healthCheck`: active health checks.
    #[serde(flatten)]
    pub health: HealthChecks,
    /// `outlier`, `retries`: what the proxy does about failing backends.
    #[serde(flatten)]
    pub resilience: ResilienceConfig,
    /// `algorithm`, `weights`.
    #[serde(flatten)]
    pub balancing: BalancerConfig,
    /// `tls`: HTTPS beside plain HTTP, when present.
    #[serde(flatten)]
    pub tls: TlsSection,
    /// `rateLimit`, `trustedProxies`: what each client may do.
    #[serde(flatten)]
    pub policy: PolicyConfig,
    /// `maxRequestsPerBackend`, `queueTimeoutMs`: what each backend may take.
    #[serde(flatten)]
    pub concurrency: ConcurrencyConfig,
    /// `zone`, `topologyAware`: this replica's zone, for topology-aware routing.
    #[serde(flatten)]
    pub topology: TopologyConfig,
}

/// The per-client policies: rate limits, and whose `X-Forwarded-For` to
/// believe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PolicyConfig {
    /// See [`RateLimitConfig`]; absent: no limit.
    pub rate_limit: Option<RateLimitConfig>,
    /// Address blocks (`10.0.0.0/8`) of proxies in front of this one whose
    /// `X-Forwarded-For` names the client. Default: none.
    pub trusted_proxies: TrustedProxies,
}

impl PolicyConfig {
    /// The traffic policy these settings and `concurrency` describe, for
    /// every worker's proxy to share; `balancing` is shown beside it on the
    /// status page.
    pub fn build(
        &self,
        concurrency: &ConcurrencyConfig,
        balancing: &BalancerConfig,
    ) -> Option<std::sync::Arc<Policy>> {
        Some(std::sync::Arc::new(Policy {
            limiter: self.rate_limit.as_ref().and_then(RateLimiter::new),
            trusted: self.trusted_proxies.clone(),
            concurrency: concurrency.limit(),
            status: PolicyStatus {
                algorithm: balancing.algorithm,
                hash_on: balancing.hash_on.clone(),
                rate_limit: self.rate_limit.clone(),
                trusted_proxies: self.trusted_proxies.clone(),
                max_requests_per_backend: concurrency.max_requests_per_backend,
                queue_timeout_ms: concurrency.queue_timeout_ms,
                queue_length: 0,
            },
        }))
    }
}

/// The `tls` block; without it, the load balancer speaks plain HTTP only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsSection {
    /// See [`TlsConfig`]; every key has a default, so `"tls": {}` turns TLS on
    /// with the Secret's usual paths.
    pub tls: Option<TlsConfig>,
}

/// Where the two listeners bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listen {
    /// Port the proxy listens on for client traffic. `0` picks a free port, which
    /// the startup log line reports (tests use this to avoid port clashes).
    pub port: u16,
    /// Port of the admin listener (`/healthz`, `/readyz`, `/metrics`), kept apart
    /// from client traffic so that probes are never queued behind it. Default 9090.
    #[serde(default = "default_admin_port")]
    pub admin_port: u16,
    /// The address both listeners bind: `::` by default, every IPv4 and IPv6
    /// address (one dual-stack socket per port; IPv4 only, `0.0.0.0`, where the
    /// host has no IPv6), `0.0.0.0` for IPv4 only, `127.0.0.1` to keep a
    /// laptop's load balancer to itself.
    #[serde(default = "default_bind_address")]
    pub bind_address: IpAddr,
    /// A second proxy port for gRPC clients (HTTP/2 or HTTP/1.1, like `port`),
    /// whose requests go to the same backend pods on `backendGrpcPort`. Default:
    /// none.
    #[serde(default)]
    pub grpc_port: Option<u16>,
}

fn default_admin_port() -> u16 {
    9090
}

fn default_bind_address() -> IpAddr {
    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
}

/// How the logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Logging {
    /// Least severe log level written; `RUST_LOG` overrides it. Default `info`.
    pub log_level: LogLevel,
    /// `text` for people, `json` for log pipelines. Default `text`.
    pub log_format: LogFormat,
}

/// Client-side limits and shutdown timing (see [`ServerLimits`] and
/// `docs/operations.md`, "Limits, bad input and shutdown"). The defaults
/// fit a `terminationGracePeriodSeconds` of 30: drain 5 + shutdown timeout 20
/// leaves 5 s before Kubernetes kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Limits {
    /// After SIGTERM, how long to keep serving with `/readyz` at 503, so that
    /// endpoint removal reaches every client before the port closes. Default 5,
    /// at most [`MAX_DRAIN_SECONDS`].
    pub drain_seconds: u64,
    /// After the drain, how long requests in flight may take before their
    /// connections are closed by force. Default 20.
    pub shutdown_timeout_seconds: u64,
    /// A request head must be complete this long after its first byte (cuts off
    /// slowloris clients). Default 10000.
    pub header_read_timeout_ms: u64,
    /// A client connection with no request in progress is closed after this long.
    /// Default 60000.
    pub idle_timeout_ms: u64,
    /// Open client connections at most; more wait in the listen backlog.
    /// Default 10000.
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; larger ones get
    /// 431. For HTTP/2, the largest header list. Default 16384.
    pub max_header_bytes: usize,
    /// Requests (streams) one HTTP/2 client connection may have open at once;
    /// more are refused, for the client to retry. Default 100.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of each request body: how much of an upload
    /// a client may send ahead of the proxy reading it. Default 1 MiB.
    pub http2_initial_stream_window_bytes: u32,
    /// HTTP/2 flow-control window of a whole client connection, so the most
    /// request bytes one connection can have buffered. Default 2 MiB.
    pub http2_initial_connection_window_bytes: u32,
}

/// Longest `drainSeconds`: an hour, like the shutdown timeout's bound.
pub const MAX_DRAIN_SECONDS: u64 = 3600;

impl Default for Limits {
    fn default() -> Self {
        let limits = ServerLimits::DEFAULT;
        Self {
            drain_seconds: 5,
            shutdown_timeout_seconds: limits.shutdown_timeout.as_secs(),
            header_read_timeout_ms: duration_ms(limits.header_read_timeout),
            idle_timeout_ms: duration_ms(limits.idle_timeout),
            max_connections: limits.max_connections,
            max_header_bytes: limits.max_header_bytes,
            http2_max_concurrent_streams: limits.http2.max_concurrent_streams,
            http2_initial_stream_window_bytes: limits.http2.initial_stream_window,
            http2_initial_connection_window_bytes: limits.http2.initial_connection_window,
        }
    }
}

impl Limits {
    /// The limits' rules, with the ranges both programs accept (see
    /// [`ServerLimits::TIMEOUT_MS`] and its neighbours).
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.drain_seconds > MAX_DRAIN_SECONDS {
            return Err((
                "drainSeconds",
                format!("must be at most {MAX_DRAIN_SECONDS}"),
            ));
        }
        let error = [
            (
                "shutdownTimeoutSeconds",
                outside(
                    self.shutdown_timeout_seconds,
                    ServerLimits::SHUTDOWN_TIMEOUT_SECONDS,
                ),
            ),
            (
                "headerReadTimeoutMs",
                outside(self.header_read_timeout_ms, ServerLimits::TIMEOUT_MS),
            ),
            (
                "idleTimeoutMs",
                outside(self.idle_timeout_ms, ServerLimits::TIMEOUT_MS),
            ),
            (
                "maxConnections",
                outside(self.max_connections, ServerLimits::MAX_CONNECTIONS),
            ),
            (
                "maxHeaderBytes",
                outside(self.max_header_bytes, ServerLimits::MAX_HEADER_BYTES),
            ),
            (
                "http2MaxConcurrentStreams",
                outside(
                    self.http2_max_concurrent_streams,
                    Http2Limits::MAX_CONCURRENT_STREAMS,
                ),
            ),
            (
                "http2InitialStreamWindowBytes",
                outside(
                    self.http2_initial_stream_window_bytes,
                    Http2Limits::WINDOW_BYTES,
                ),
            ),
            (
                "http2InitialConnectionWindowBytes",
                outside(
                    self.http2_initial_connection_window_bytes,
                    Http2Limits::WINDOW_BYTES,
                ),
            ),
        ]
        .into_iter()
        .find_map(|(field, reason)| Some((field, reason?)));
        error.map_or(Ok(()), Err)
    }

    /// [`Limits::drain_seconds`] as a `Duration`.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }
}

impl From<&Limits> for ServerLimits {
    fn from(limits: &Limits) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(limits.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
            max_connections: limits.max_connections,
            max_header_bytes: limits.max_header_bytes,
            shutdown_timeout: Duration::from_secs(limits.shutdown_timeout_seconds),
            http2: Http2Limits {
                max_concurrent_streams: limits.http2_max_concurrent_streams,
                initial_stream_window: limits.http2_initial_stream_window_bytes,
                initial_connection_window: limits.http2_initial_connection_window_bytes,
                ..Http2Limits::DEFAULT
            },
        }
    }
}

/// The `healthCheck` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HealthChecks {
    /// Active health checks; see [`HealthCheckConfig`]. Every key has a default.
    pub health_check: HealthCheckConfig,
}

/// The `outlier` and `retries` blocks, which the proxy applies together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct ResilienceConfig {
    /// Passive health checks (outlier ejection); see [`OutlierConfig`].
    pub outlier: OutlierConfig,
    /// Retries on another backend; see [`RetriesConfig`].
    pub retries: RetriesConfig,
}

impl From<&ResilienceConfig> for Resilience {
    fn from(config: &ResilienceConfig) -> Self {
        Self {
            retries: Some((&config.retries).into()),
            outlier: Some((&config.outlier).into()),
        }
    }
}

/// Why the config could not be used. Each variant's message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {reason}", path.display())]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("config file {} is not valid JSON: {reason}", path.display())]
    Syntax {
        path: PathBuf,
        reason: serde_json::Error,
    },
    /// A key is unknown, missing, of the wrong type or has a bad value.
    #[error("config file {}: {field}: {reason}", path.display())]
    Field {
        path: PathBuf,
        /// The offending key, or `(top level)` for unknown and missing keys,
        /// whose reason names the key itself.
        field: String,
        reason: String,
    },
}

/// When a change to a section of the file takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// Reload applies it while serving.
    Live,
    /// It is baked into sockets or server settings at start-up: a change is
    /// named in a warning and takes effect at the next start.
    AtRestart,
}

/// The keys whose values differ between two configs, by when they take effect.
/// Nested blocks (`healthCheck`, `outlier`, `retries`) and maps (`weights`) are
/// named by their top-level key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys that reload applies while serving.
    pub live: Vec<String>,
    /// Keys that take effect only after a restart.
    pub at_restart: Vec<String>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.at_restart.is_empty()
    }

    /// Adds the keys of one section whose values differ.
    fn compare<T: Serialize>(&mut self, applies: Applies, old: &T, new: &T) {
        let (old, new) = (to_object(old), to_object(new));
        let changed = old
            .iter()
            .filter(|(key, value)| new.get(*key) != Some(*value))
            .map(|(key, _)| key.clone());
        match applies {
            Applies::Live => self.live.extend(changed),
            Applies::AtRestart => self.at_restart.extend(changed),
        }
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
            path: path.to_owned(),
            reason,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let field_error = |field: &str, reason: String| ConfigError::Field {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let object: Map<String, Value> = serde_json::from_str(text).map_err(|reason| {
            if reason.is_data() {
                field_error(TOP_LEVEL, reason.to_string())
            } else {
                ConfigError::Syntax {
                    path: path.to_owned(),
                    reason,
                }
            }
        })?;
        let file = Value::Object(object);
        let config = Config {
            listen: section(&file, path)?,
            discovery: section(&file, path)?,
            proxy: section(&file, path)?,
            logging: section(&file, path)?,
            limits: section(&file, path)?,
            health: section(&file, path)?,
            resilience: section(&file, path)?,
            balancing: section(&file, path)?,
            tls: section(&file, path)?,
            policy: section(&file, path)?,
            concurrency: section(&file, path)?,
            topology: section(&file, path)?,
        };
        // Every section wrote back all of its keys: what is left over is unknown.
        let known = to_object(&config);
        if let Value::Object(given) = &file
            && let Some(unknown) = given.keys().find(|key| !known.contains_key(*key))
        {
            let expected: Vec<String> = known.keys().map(|key| format!("`{key}`")).collect();
            return Err(field_error(
                TOP_LEVEL,
                format!(
                    "unknown field `{unknown}`, expected one of {}",
                    expected.join(", ")
                ),
            ));
        }
        config
            .validate()
            .map_err(|(field, reason)| field_error(field, reason))?;
        Ok(config.with_defaults_across_sections())
    }

    /// Fills in the defaults that one section takes from another: the backends'
    /// gRPC port is `grpcPort` unless `backendGrpcPort` says otherwise.
    fn with_defaults_across_sections(mut self) -> Self {
        if self.discovery.backend_grpc_port.is_none() {
            self.discovery.backend_grpc_port = self.listen.grpc_port;
        }
        self
    }

    /// Switches to static discovery over `addrs`: what the `--backends` flag does.
    pub fn with_static_backends(mut self, addrs: Vec<std::net::SocketAddr>) -> Self {
        self.discovery.discovery = DiscoveryMode::Static;
        self.discovery.static_backends = addrs;
        self
    }

    /// The keys that differ in `new`, by when they take effect: the one place
    /// that says, for every section, whether a change applies live.
    pub fn changes(&self, new: &Config) -> Changes {
        // Destructured, so that a new section does not compile until it is
        // given its place here.
        let Config {
            listen,
            discovery,
            proxy,
            logging,
            limits,
            health,
            resilience,
            balancing,
            tls,
            policy,
            concurrency,
            topology,
        } = self;
        let mut changes = Changes::default();
        changes.compare(Applies::AtRestart, listen, &new.listen);
        changes.compare(Applies::Live, discovery, &new.discovery);
        changes.compare(Applies::Live, proxy, &new.proxy);
        changes.compare(Applies::Live, logging, &new.logging);
        changes.compare(Applies::AtRestart, limits, &new.limits);
        changes.compare(Applies::Live, health, &new.health);
        changes.compare(Applies::Live, resilience, &new.resilience);
        changes.compare(Applies::Live, balancing, &new.balancing);
        // The HTTPS port is bound at start-up; rotated certificate files are
        // followed by the TLS listener itself, without a reload.
        changes.compare(Applies::AtRestart, tls, &new.tls);
        // A changed policy starts with fresh limits: a short grace, not a lockout.
        changes.compare(Applies::Live, policy, &new.policy);
        // Requests already waiting keep the limit they started with.
        changes.compare(Applies::Live, concurrency, &new.concurrency);
        // The reloader learns the zone again, from the new key or the Node.
        changes.compare(Applies::Live, topology, &new.topology);
        changes
    }

    /// Checks the rules that types alone cannot express.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        self.discovery.validate()?;
        self.proxy.validate()?;
        self.limits.validate()?;
        self.health.health_check.validate()?;
        self.resilience.outlier.validate()?;
        self.resilience.retries.validate()?;
        if let Some(rate_limit) = &self.policy.rate_limit {
            rate_limit.validate()?;
        }
        self.concurrency.validate()?;
        self.balancing.validate()?;
        Ok(())
    }
}

/// How errors name a problem with the file as a whole (an unknown or missing key).
const TOP_LEVEL: &str = "(top level)";

/// Reads one section from the whole file, which holds other sections' keys too.
/// The error names the offending key by its path, or [`TOP_LEVEL`].
fn section<T: DeserializeOwned>(file: &Value, path: &Path) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(file).map_err(|error| {
        let field = error.path().to_string();
        ConfigError::Field {
            path: path.to_owned(),
            field: if field == "." {
                TOP_LEVEL.to_owned()
            } else {
                field
            },
            reason: error.into_inner().to_string(),
        }
    })
}

/// A section written back as a JSON object: its keys, as the file spells them.
fn to_object<T: Serialize>(section: &T) -> Map<String, Value> {
    match serde_json::to_value(section) {
        Ok(Value::Object(object)) => object,
        // Every section is a struct of plain values, which serializes to an object.
        _ => Map::new(),
    }
}

/// Why `value` is not accepted, if it is outside `range`.
fn outside<T: PartialOrd + fmt::Display>(value: T, range: RangeInclusive<T>) -> Option<String> {
    (!range.contains(&value))
        .then(|| format!("must be between {} and {}", range.start(), range.end()))
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::balancer::Weights;
    use crate::discovery::{KubernetesSource, Source};

    const GUIDE_KEYS: &str =
        r#""port": 8080, "backendServiceName": "backend-service", "backendPort": 8080"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/test/config.json"))
    }

    fn with_guide_keys(extra: &str) -> String {
        if extra.is_empty() {
            format!("{{{GUIDE_KEYS}}}")
        } else {
            format!("{{{GUIDE_KEYS}, {extra}}}")
        }
    }

    /// Asserts that parsing fails and the message names the file and every needle.
    fn assert_error_mentions(text: &str, needles: &[&str]) {
        let message = parse(text)
            .expect_err("config must be rejected")
            .to_string();
        assert!(message.contains("/test/config.json"), "{message}");
        for needle in needles {
            assert!(
                message.contains(needle),
                "{needle:?} missing in {message:?}"
            );
        }
    }

    #[test]
    fn guide_keys_alone_get_documented_defaults() {
        let config = parse(&with_guide_keys("")).expect("guide config parses");
        assert_eq!(config.listen.port, 8080);
        assert_eq!(config.discovery.backend_service_name, "backend-service");
        assert_eq!(config.discovery.backend_port, 8080);
        assert_eq!(config.listen.admin_port, 9090);
        assert_eq!(config.discovery.discovery, DiscoveryMode::Kubernetes);
        assert!(config.discovery.static_backends.is_empty());
        assert_eq!(
            Duration::from_millis(config.proxy.connect_timeout_ms),
            Duration::from_millis(1000)
        );
        assert_eq!(
            Duration::from_millis(config.proxy.request_timeout_ms),
            Duration::from_millis(30_000)
        );
        assert_eq!(config.logging.log_level, LogLevel::Info);
        assert_eq!(config.logging.log_format, LogFormat::Text);
        assert_eq!(config.limits.drain(), Duration::from_secs(5));
        assert_eq!(ServerLimits::from(&config.limits), ServerLimits::DEFAULT);
    }

    #[test]
    fn algorithm_defaults_to_round_robin_and_reads_weights() {
        let config = parse(&with_guide_keys("")).expect("guide config parses");
        assert_eq!(config.balancing.algorithm, Algorithm::RoundRobin);
        assert_eq!(config.balancing.weights, Weights::default());
        let config = parse(&with_guide_keys(
            r#""algorithm": "weighted_round_robin", "weights": {"10.0.0.1:80": 5, "10.0.0.2": 2}"#,
        ))
        .expect("weighted config parses");
        assert_eq!(config.balancing.algorithm, Algorithm::WeightedRoundRobin);
        let at = |s: &str| s.parse::<SocketAddr>().expect("valid address");
        assert_eq!(config.balancing.weights.of(at("10.0.0.1:80")), 5);
        assert_eq!(config.balancing.weights.of(at("10.0.0.2:9000")), 2);
        assert_eq!(config.balancing.weights.of(at("10.0.0.3:80")), 1);
        let config = parse(&with_guide_keys(r#""algorithm": "least_request""#))
            .expect("least_request parses");
        assert_eq!(config.balancing.algorithm, Algorithm::LeastRequest);
    }

    #[test]
    fn bad_algorithm_and_weights_are_rejected_naming_the_key() {
        assert_error_mentions(
            &with_guide_keys(r#""algorithm": "random""#),
            &["algorithm", "random"],
        );
        assert_error_mentions(
            &with_guide_keys(r#""weights": {"backend-1:80": 2}"#),
            &["weights", "backend-1:80", "not an IP"],
        );
        assert_error_mentions(
            &with_guide_keys(r#""weights": {"10.0.0.1": 0}"#),
            &["weights", "10.0.0.1", "at least 1"],
        );
        assert_error_mentions(
            &with_guide_keys(r#""weights": {"10.0.0.1": -3}"#),
            &["weights"],
        );
    }

    #[test]
    fn default_drain_and_shutdown_timeout_fit_a_30_second_grace_period() {
        let config = parse(&with_guide_keys("")).expect("guide config parses");
        let limits = ServerLimits::from(&config.limits);
        assert!(config.limits.drain() + limits.shutdown_timeout < Duration::from_secs(30));
    }

    #[test]
    fn limits_keys_are_read() {
        let config = parse(&with_guide_keys(
            r#""drainSeconds": 0, "shutdownTimeoutSeconds": 3, "headerReadTimeoutMs": 500,
               "idleTimeoutMs": 700, "maxConnections": 2, "maxHeaderBytes": 8192,
               "http2MaxConcurrentStreams": 7, "http2InitialStreamWindowBytes": 70000,
               "http2InitialConnectionWindowBytes": 80000"#,
        ))
        .expect("limits parse");
        assert_eq!(config.limits.drain(), Duration::ZERO);
        assert_eq!(
            ServerLimits::from(&config.limits),
            ServerLimits {
                header_read_timeout: Duration::from_millis(500),
                idle_timeout: Duration::from_millis(700),
                max_connections: 2,
                max_header_bytes: 8192,
                shutdown_timeout: Duration::from_secs(3),
                http2: Http2Limits {
                    max_concurrent_streams: 7,
                    initial_stream_window: 70_000,
                    initial_connection_window: 80_000,
                    ..Http2Limits::DEFAULT
                },
            }
        );
    }

    #[test]
    fn out_of_range_limits_name_the_field() {
        for (extra, field) in [
            (r#""drainSeconds": 3601"#, "drainSeconds"),
            (r#""shutdownTimeoutSeconds": 0"#, "shutdownTimeoutSeconds"),
            (r#""headerReadTimeoutMs": 0"#, "headerReadTimeoutMs"),
            (r#""idleTimeoutMs": 0"#, "idleTimeoutMs"),
            (r#""maxConnections": 0"#, "maxConnections"),
            (r#""maxHeaderBytes": 100"#, "maxHeaderBytes"),
            (
                r#""http2MaxConcurrentStreams": 0"#,
                "http2MaxConcurrentStreams",
            ),
            (
                r#""http2InitialStreamWindowBytes": 65534"#,
                "http2InitialStreamWindowBytes",
            ),
            (
                r#""http2InitialConnectionWindowBytes": 2147483648"#,
                "http2InitialConnectionWindowBytes",
            ),
        ] {
            assert_error_mentions(&with_guide_keys(extra), &[field]);
        }
        assert_error_mentions(
            &with_guide_keys(r#""maxConnections": -1"#),
            &["maxConnections", "invalid value"],
        );
    }

    #[test]
    fn every_optional_key_is_read() {
        let config = parse(&with_guide_keys(
            r#""adminPort": 9191, "discovery": "static",
               "staticBackends": ["127.0.0.1:8081", "[::1]:8082"],
               "connectTimeoutMs": 250, "requestTimeoutMs": 5000,
               "logLevel": "debug", "logFormat": "json""#,
        ))
        .expect("full config parses");
        assert_eq!(config.listen.admin_port, 9191);
        assert_eq!(config.discovery.discovery, DiscoveryMode::Static);
        assert_eq!(
            config.discovery.static_backends,
            vec![
                "127.0.0.1:8081".parse().expect("valid"),
                "[::1]:8082".parse().expect("valid")
            ]
        );
        assert_eq!(config.proxy.connect_timeout_ms, 250);
        assert_eq!(config.proxy.request_timeout_ms, 5000);
        assert_eq!(config.logging.log_level, LogLevel::Debug);
        assert_eq!(config.logging.log_format, LogFormat::Json);
    }

    #[test]
    fn shipped_local_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.json");
        let config = Config::load(&path).expect("loadbalancer/config.json is valid");
        assert_eq!(config.discovery.discovery, DiscoveryMode::Static);
    }

    #[test]
    fn unknown_key_is_named() {
        assert_error_mentions(&with_guide_keys(r#""adminPrt": 1"#), &["adminPrt"]);
    }

    #[test]
    fn missing_guide_key_is_named() {
        assert_error_mentions(
            r#"{"port": 8080, "backendPort": 80}"#,
            &["backendServiceName"],
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        assert_error_mentions(
            r#"{"port": "http", "backendServiceName": "b", "backendPort": 80}"#,
            &["port", "invalid type"],
        );
    }

    #[test]
    fn out_of_range_port_names_the_field() {
        assert_error_mentions(
            r#"{"port": 8080, "backendServiceName": "b", "backendPort": 70000}"#,
            &["backendPort", "70000"],
        );
    }

    #[test]
    fn bad_static_backend_names_the_field_and_the_address() {
        assert_error_mentions(
            &with_guide_keys(
                r#""discovery": "static", "staticBackends": ["127.0.0.1:8081", "backend-2"]"#,
            ),
            &["staticBackends", "\"backend-2\"", "IP:port"],
        );
    }

    #[test]
    fn unknown_enum_values_are_named() {
        assert_error_mentions(
            &with_guide_keys(r#""discovery": "dns""#),
            &["discovery", "dns"],
        );
        assert_error_mentions(
            &with_guide_keys(r#""logLevel": "loud""#),
            &["logLevel", "loud"],
        );
        assert_error_mentions(
            &with_guide_keys(r#""logFormat": "xml""#),
            &["logFormat", "xml"],
        );
    }

    #[test]
    fn semantic_rules_name_the_field() {
        let cases = [
            (
                r#"{"port": 1, "backendServiceName": " ", "backendPort": 80}"#.to_owned(),
                "backendServiceName",
            ),
            (
                r#"{"port": 1, "backendServiceName": "b", "backendPort": 0}"#.to_owned(),
                "backendPort",
            ),
            (
                with_guide_keys(r#""connectTimeoutMs": 0"#),
                "connectTimeoutMs",
            ),
            (
                with_guide_keys(r#""requestTimeoutMs": 0"#),
                "requestTimeoutMs",
            ),
            (
                with_guide_keys(r#""discovery": "static""#),
                "staticBackends",
            ),
            (
                with_guide_keys(r#""algorithm": "consistent_hash""#),
                "hashOn",
            ),
            (
                with_guide_keys(
                    r#""algorithm": "consistent_hash", "hashOn": {"header": "x", "cookie": "y"}"#,
                ),
                "exactly one of",
            ),
            (
                with_guide_keys(r#""hashOn": {"header": "x", "ttlSeconds": 5}"#),
                "hashOn.ttlSeconds",
            ),
            (
                with_guide_keys(r#""maxRequestsPerBackend": 0"#),
                "maxRequestsPerBackend",
            ),
            (
                with_guide_keys(r#""maxRequestsPerBackend": 2, "queueTimeoutMs": 60001"#),
                "queueTimeoutMs",
            ),
        ];
        for (text, field) in cases {
            assert_error_mentions(&text, &[field]);
        }
    }

    #[test]
    fn resilience_blocks_default_when_absent() {
        let config = parse(&with_guide_keys("")).expect("guide config parses");
        assert_eq!(config.health.health_check, HealthCheckConfig::default());
        assert_eq!(config.health.health_check.path, "/healthz");
        assert_eq!(config.health.health_check.interval_ms, 5000);
        assert_eq!(config.resilience.outlier.consecutive_failures, 5);
        assert_eq!(config.resilience.retries, RetriesConfig::default());
        assert_eq!(config.resilience.retries.attempts, 3);
        assert_eq!(config.resilience.retries.budget_percent, 20);
    }

    #[test]
    fn resilience_keys_are_read_and_missing_ones_default() {
        let config = parse(&with_guide_keys(
            r#""healthCheck": {"path": "/readyz", "intervalMs": 100, "timeoutMs": 50,
                               "unhealthyThreshold": 1, "healthyThreshold": 4},
               "outlier": {"consecutiveFailures": 2, "baseEjectionMs": 10},
               "retries": {"attempts": 1}"#,
        ))
        .expect("resilience config parses");
        assert_eq!(
            config.health.health_check,
            HealthCheckConfig {
                path: "/readyz".to_owned(),
                interval_ms: 100,
                timeout_ms: 50,
                unhealthy_threshold: 1,
                healthy_threshold: 4,
                grpc_service: None,
            }
        );
        assert_eq!(
            config.resilience.outlier,
            OutlierConfig {
                consecutive_failures: 2,
                base_ejection_ms: 10,
                max_ejection_ms: 60_000,
            }
        );
        assert_eq!(config.resilience.retries.attempts, 1);
        assert_eq!(config.resilience.retries.budget_percent, 20);
    }

    #[test]
    fn bad_resilience_values_name_the_nested_field() {
        let cases = [
            (r#""healthCheck": {"path": "healthz"}"#, "healthCheck.path"),
            (
                r#""healthCheck": {"intervalMs": 0}"#,
                "healthCheck.intervalMs",
            ),
            (
                r#""healthCheck": {"timeoutMs": 0}"#,
                "healthCheck.timeoutMs",
            ),
            (
                r#""healthCheck": {"unhealthyThreshold": 0}"#,
                "healthCheck.unhealthyThreshold",
            ),
            (
                r#""healthCheck": {"healthyThreshold": 0}"#,
                "healthCheck.healthyThreshold",
            ),
            (
                r#""outlier": {"consecutiveFailures": 0}"#,
                "outlier.consecutiveFailures",
            ),
            (
                r#""outlier": {"baseEjectionMs": 0}"#,
                "outlier.baseEjectionMs",
            ),
            (
                r#""outlier": {"baseEjectionMs": 5000, "maxEjectionMs": 10}"#,
                "outlier.maxEjectionMs",
            ),
            (r#""retries": {"attempts": 0}"#, "retries.attempts"),
            (r#""retries": {"attempts": 11}"#, "retries.attempts"),
            (
                r#""retries": {"budgetPercent": 101}"#,
                "retries.budgetPercent",
            ),
            // Unknown and mistyped nested keys are named by their path.
            (r#""retries": {"attempt": 2}"#, "attempt"),
            (
                r#""outlier": {"maxEjectionMs": "1s"}"#,
                "outlier.maxEjectionMs",
            ),
        ];
        for (extra, field) in cases {
            assert_error_mentions(&with_guide_keys(extra), &[field]);
        }
    }

    #[test]
    fn invalid_json_is_a_syntax_error_with_a_position() {
        let error = parse(r#"{"port": 8080,"#).expect_err("truncated JSON is rejected");
        assert!(matches!(error, ConfigError::Syntax { .. }), "{error:?}");
        assert!(error.to_string().contains("line 1"), "{error}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let path = Path::new("/nonexistent/loadbalancer/config.json");
        let error = Config::load(path).expect_err("missing file is an error");
        assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
        assert!(error.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn backends_flag_switches_to_static_discovery() {
        let addrs = parse_backend_list("127.0.0.1:8081, 127.0.0.1:8082,").expect("valid list");
        let config = parse(&with_guide_keys(""))
            .expect("guide config parses")
            .with_static_backends(addrs.clone());
        assert_eq!(config.discovery.source(None), Source::Static(addrs));
    }

    #[test]
    fn kubernetes_source_carries_service_port_and_namespace() {
        let config = parse(&with_guide_keys("")).expect("guide config parses");
        assert_eq!(
            config.discovery.source(Some("demo".to_owned())),
            Source::Kubernetes(KubernetesSource {
                namespace: Some("demo".to_owned()),
                service_name: "backend-service".to_owned(),
                port: 8080,
                grpc_port: None,
            })
        );
    }

    #[test]
    fn backend_list_errors_name_the_bad_entry() {
        assert_eq!(parse_backend_list(" , "), Err(AddrError::Empty));
        assert_eq!(
            parse_backend_list("127.0.0.1:8081,localhost:8082"),
            Err(AddrError::Invalid("localhost:8082".to_owned()))
        );
        assert_eq!(
            parse_backend_list("127.0.0.1"),
            Err(AddrError::Invalid("127.0.0.1".to_owned()))
        );
    }

    /// A file with every key, and one where every value differs from it.
    const FULL: &str = r#"{
        "port": 8080, "adminPort": 9090, "bindAddress": "0.0.0.0", "grpcPort": 9000,
        "backendServiceName": "web", "backendPort": 80, "backendProtocol": "http1",
        "backendGrpcPort": 9000,
        "discovery": "static", "staticBackends": ["127.0.0.1:8081"],
        "connectTimeoutMs": 1000, "requestTimeoutMs": 30000, "bodyIdleTimeoutMs": 60000,
        "tunnelIdleTimeoutMs": 3600000,
        "logLevel": "info", "logFormat": "text",
        "drainSeconds": 5, "shutdownTimeoutSeconds": 20, "headerReadTimeoutMs": 10000,
        "idleTimeoutMs": 60000, "maxConnections": 10000, "maxHeaderBytes": 16384,
        "http2MaxConcurrentStreams": 100, "http2InitialStreamWindowBytes": 1048576,
        "http2InitialConnectionWindowBytes": 2097152,
        "healthCheck": {"path": "/healthz", "intervalMs": 5000, "timeoutMs": 1000,
                        "unhealthyThreshold": 3, "healthyThreshold": 2, "grpcService": ""},
        "outlier": {"consecutiveFailures": 5, "baseEjectionMs": 5000, "maxEjectionMs": 60000},
        "retries": {"attempts": 3, "budgetPercent": 20},
        "algorithm": "round_robin", "weights": {},
        "hashOn": {"cookie": "lb", "ttlSeconds": 3600},
        "tls": {"port": 8443, "certFile": "/etc/tls/tls.crt", "keyFile": "/etc/tls/tls.key",
                "certificates": [], "redirectHttp": false},
        "rateLimit": {"perClient": {"requestsPerSecond": 10, "burst": 20, "key": "sourceIp"},
                      "global": {"requestsPerSecond": 1000, "burst": 2000}},
        "trustedProxies": ["10.0.0.0/8"],
        "maxRequestsPerBackend": 8, "queueTimeoutMs": 1000,
        "zone": "zone-a", "topologyAware": true
    }"#;
    const OTHER: &str = r#"{
        "port": 8081, "adminPort": 9091, "bindAddress": "127.0.0.1", "grpcPort": 9001,
        "backendServiceName": "api", "backendPort": 81, "backendProtocol": "h2c",
        "backendGrpcPort": 9002,
        "discovery": "kubernetes", "staticBackends": ["127.0.0.1:8082"],
        "connectTimeoutMs": 1001, "requestTimeoutMs": 30001, "bodyIdleTimeoutMs": 60001,
        "tunnelIdleTimeoutMs": 3600001,
        "logLevel": "debug", "logFormat": "json",
        "drainSeconds": 6, "shutdownTimeoutSeconds": 21, "headerReadTimeoutMs": 10001,
        "idleTimeoutMs": 60001, "maxConnections": 10001, "maxHeaderBytes": 16385,
        "http2MaxConcurrentStreams": 101, "http2InitialStreamWindowBytes": 1048577,
        "http2InitialConnectionWindowBytes": 2097153,
        "healthCheck": {"path": "/readyz", "intervalMs": 5001, "timeoutMs": 1001,
                        "unhealthyThreshold": 4, "healthyThreshold": 3,
                        "grpcService": "identity.v1.Identity"},
        "outlier": {"consecutiveFailures": 6, "baseEjectionMs": 5001, "maxEjectionMs": 60001},
        "retries": {"attempts": 4, "budgetPercent": 21},
        "algorithm": "least_request", "weights": {"127.0.0.1": 2},
        "hashOn": {"cookie": "lb2", "ttlSeconds": 3601},
        "tls": {"port": 9443, "certFile": "/tls/a.crt", "keyFile": "/tls/a.key",
                "certificates": [{"certFile": "/tls/b.crt", "keyFile": "/tls/b.key"}],
                "redirectHttp": true},
        "rateLimit": {"perClient": {"requestsPerSecond": 11, "burst": 21,
                                    "key": {"header": "X-Api-Key"}},
                      "global": {"requestsPerSecond": 1001, "burst": 2001}},
        "trustedProxies": ["192.168.0.0/16"],
        "maxRequestsPerBackend": 9, "queueTimeoutMs": 1001,
        "zone": "zone-b", "topologyAware": false
    }"#;

    /// Every key path of a JSON object, nested blocks as `block.key`.
    fn key_paths(value: &Value) -> Vec<Vec<String>> {
        let Value::Object(object) = value else {
            return Vec::new();
        };
        let mut paths = Vec::new();
        for (key, value) in object {
            match value {
                Value::Object(inner) if !inner.is_empty() && key != "weights" => {
                    for mut path in key_paths(value) {
                        path.insert(0, key.clone());
                        paths.push(path);
                    }
                }
                _ => paths.push(vec![key.clone()]),
            }
        }
        paths
    }

    fn pointer(path: &[String]) -> String {
        path.iter().map(|key| format!("/{key}")).collect()
    }

    #[test]
    fn the_full_test_file_holds_every_key_the_code_knows() {
        let full: Value = serde_json::from_str(FULL).expect("FULL is JSON");
        let written =
            serde_json::to_value(parse(FULL).expect("FULL is valid")).expect("serializes");
        let mut expected = key_paths(&written);
        let mut given = key_paths(&full);
        expected.sort();
        given.sort();
        assert_eq!(given, expected, "FULL and OTHER must name every key");
    }

    #[test]
    fn every_key_is_either_applied_live_or_named_for_a_restart() {
        let base = parse(FULL).expect("FULL is valid");
        let full: Value = serde_json::from_str(FULL).expect("FULL is JSON");
        let other: Value = serde_json::from_str(OTHER).expect("OTHER is JSON");
        for path in key_paths(&full) {
            let key = pointer(&path);
            let mut changed = full.clone();
            *changed.pointer_mut(&key).expect("FULL has the key") = other
                .pointer(&key)
                .expect("OTHER has every key of FULL")
                .clone();
            let new = parse(&changed.to_string())
                .unwrap_or_else(|error| panic!("changing {key} gives a valid file: {error}"));
            let changes = base.changes(&new);
            let top = &path[0];
            let live = changes.live.contains(top);
            let at_restart = changes.at_restart.contains(top);
            assert!(
                live != at_restart,
                "{key}: a change must be applied live or named for a restart, once: {changes:?}"
            );
        }
    }

    #[test]
    fn the_listeners_and_limits_need_a_restart_and_the_rest_applies_live() {
        let base = parse(FULL).expect("FULL is valid");
        let other = parse(OTHER).expect("OTHER is valid");
        let changes = base.changes(&other);
        assert_eq!(
            changes.at_restart,
            [
                "adminPort",
                "bindAddress",
                "grpcPort",
                "port",
                "drainSeconds",
                "headerReadTimeoutMs",
                "http2InitialConnectionWindowBytes",
                "http2InitialStreamWindowBytes",
                "http2MaxConcurrentStreams",
                "idleTimeoutMs",
                "maxConnections",
                "maxHeaderBytes",
                "shutdownTimeoutSeconds",
                "tls"
            ]
        );
        assert!(
            changes.live.contains(&"healthCheck".to_owned()),
            "{changes:?}"
        );
        assert_eq!(base.changes(&base), Changes::default());
    }
}
