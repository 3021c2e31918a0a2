//! Configuration: read once at start-up, before anything serves traffic.
//!
//! The file is JSON with camelCase keys, as in the Go guide, mounted from a
//! ConfigMap at [`DEFAULT_PATH`] (overridable with `--config` or `CONFIG_PATH`).
//! The guide's keys (`port`, `backendServiceName`, `backendPort`) are required;
//! every other key is optional and its default is documented on its field. A typo
//! must never be silently ignored, so unknown keys are rejected, and every error
//! names the file, the field and the reason.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::balancer::Weights;
use crate::discovery::{KubernetesSource, Source};
use crate::server::ServerLimits;

// `logLevel` and `logFormat` take the values the shared logging set-up defines.
pub use service_kit::logging::{LogFormat, LogLevel};

/// Where the ConfigMap is mounted inside the pod.
pub const DEFAULT_PATH: &str = "/etc/config/config.json";

/// The load balancer's settings, validated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Port the proxy listens on for client traffic. `0` picks a free port, which
    /// the startup log line reports (tests use this to avoid port clashes).
    pub port: u16,
    /// Name of the Kubernetes Service whose ready endpoints receive the traffic.
    pub backend_service_name: String,
    /// Port on the backend pods that requests are sent to.
    pub backend_port: u16,
    /// Port of the admin listener (`/healthz`, `/readyz`), kept apart from client
    /// traffic so that probes are never queued behind it. Default 9090.
    #[serde(default = "default_admin_port")]
    pub admin_port: u16,
    /// Where backend addresses come from. Default `kubernetes`.
    #[serde(default)]
    pub discovery: DiscoveryMode,
    /// The backends for `static` discovery, as `IP:port` strings. Default empty;
    /// required when `discovery` is `static`.
    #[serde(default, deserialize_with = "deserialize_addrs")]
    pub static_backends: Vec<SocketAddr>,
    /// How long to wait for a TCP connection to a backend. Default 1000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long a backend may take to answer, from sending the request until the
    /// response headers arrive; past it the client gets a 504. Default 30000.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Least severe log level written; `RUST_LOG` overrides it. Default `info`.
    #[serde(default)]
    pub log_level: LogLevel,
    /// `text` for people, `json` for log pipelines. Default `text`.
    #[serde(default)]
    pub log_format: LogFormat,

    // Client-side limits and shutdown (see `server::ServerLimits` and the README's
    // "Limits and shutdown"). The defaults fit a `terminationGracePeriodSeconds`
    // of 30: drain 5 + shutdown timeout 20 leaves 5 s before Kubernetes kills.
    /// After SIGTERM, how long to keep serving with `/readyz` at 503, so that
    /// endpoint removal reaches every client before the port closes. Default 5.
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: u64,
    /// After the drain, how long requests in flight may take before their
    /// connections are closed by force. Default 20.
    #[serde(default = "default_shutdown_timeout_seconds")]
    pub shutdown_timeout_seconds: u64,
    /// A request head must be complete this long after its first byte (cuts off
    /// slowloris clients). Default 10000.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A client connection with no request in progress is closed after this long.
    /// Default 60000.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Open client connections at most; more wait in the listen backlog.
    /// Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; larger ones get
    /// 431. Default 16384.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Active health checks; see [`HealthCheckConfig`]. Every key has a default.
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    /// Passive health checks (outlier ejection); see [`OutlierConfig`].
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Retries on another backend; see [`RetriesConfig`].
    #[serde(default)]
    pub retries: RetriesConfig,

    // Balancing (issue 10; see `balancer` and the README's "Choosing an algorithm").
    /// How the next backend is chosen. Default `round_robin`.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Weights for `weighted_round_robin`, keyed by `IP:port` or by IP (every
    /// port of that host); each at least 1. Unlisted backends weigh 1. Default empty.
    #[serde(default)]
    pub weights: Weights,
}

/// `algorithm`: how the balancer chooses among the available backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Each backend in turn.
    #[default]
    RoundRobin,
    /// The less busy of two random backends (requests in flight).
    LeastRequest,
    /// Smooth weighted round-robin over `weights`.
    WeightedRoundRobin,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastRequest => "least_request",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
        })
    }
}

// ---- Resilience: health checks, outlier ejection, retries (issue 7) ----

/// `healthCheck`: every backend is probed with `GET <path>` every `intervalMs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// The path probed; any 2xx answer is a success. Default `/healthz`, the
    /// backend's liveness endpoint.
    pub path: String,
    /// Time between probe rounds. Default 5000.
    pub interval_ms: u64,
    /// How long one probe may take before it counts as failed. Default 1000.
    pub timeout_ms: u64,
    /// Failed probes in a row that take a backend out of rotation. Default 3.
    pub unhealthy_threshold: u32,
    /// Successful probes in a row that put it back. Default 2.
    pub healthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: "/healthz".to_owned(),
            interval_ms: 5000,
            timeout_ms: 1000,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
        }
    }
}

/// `outlier`: ejects a backend whose requests keep failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failures in a row (connect error, reset, timeout, 5xx) that eject a
    /// backend. Default 5.
    pub consecutive_failures: u32,
    /// First ejection time; it doubles with each ejection until the backend
    /// succeeds again. Default 5000.
    pub base_ejection_ms: u64,
    /// Cap on the ejection time. Default 60000.
    pub max_ejection_ms: u64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 5000,
            max_ejection_ms: 60_000,
        }
    }
}

/// `retries`: failed attempts repeated on another backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetriesConfig {
    /// Attempts per request, the first included; 1 turns retries off. Default 3,
    /// at most 10.
    pub attempts: u32,
    /// Retries allowed as a percentage of the requests of the last 10 s (plus 3
    /// per second whatever the traffic), 0 to 100. Default 20.
    pub budget_percent: u32,
}

impl Default for RetriesConfig {
    fn default() -> Self {
        Self {
            attempts: 3,
            budget_percent: 20,
        }
    }
}

/// Upper bound for `retries.attempts`: more would only multiply load.
const MAX_ATTEMPTS: u32 = 10;

impl HealthCheckConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let fail = |field, reason: &str| Err((field, reason.to_owned()));
        if !self.path.starts_with('/') || self.path.parse::<http::uri::PathAndQuery>().is_err() {
            return fail("healthCheck.path", "must be a path starting with /");
        }
        if self.interval_ms == 0 {
            return fail("healthCheck.intervalMs", "must be greater than 0");
        }
        if self.timeout_ms == 0 {
            return fail("healthCheck.timeoutMs", "must be greater than 0");
        }
        if self.unhealthy_threshold == 0 {
            return fail("healthCheck.unhealthyThreshold", "must be at least 1");
        }
        if self.healthy_threshold == 0 {
            return fail("healthCheck.healthyThreshold", "must be at least 1");
        }
        Ok(())
    }
}

impl OutlierConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let fail = |field, reason: &str| Err((field, reason.to_owned()));
        if self.consecutive_failures == 0 {
            return fail("outlier.consecutiveFailures", "must be at least 1");
        }
        if self.base_ejection_ms == 0 {
            return fail("outlier.baseEjectionMs", "must be greater than 0");
        }
        if self.max_ejection_ms < self.base_ejection_ms {
            return fail(
                "outlier.maxEjectionMs",
                "must be at least outlier.baseEjectionMs",
            );
        }
        Ok(())
    }
}

impl RetriesConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=MAX_ATTEMPTS).contains(&self.attempts) {
            return Err((
                "retries.attempts",
                format!("must be between 1 and {MAX_ATTEMPTS}"),
            ));
        }
        if self.budget_percent > 100 {
            return Err((
                "retries.budgetPercent",
                "must be between 0 and 100".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Where backend addresses come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// Watch the EndpointSlices of `backendServiceName`.
    #[default]
    Kubernetes,
    /// Use `staticBackends` (or the `--backends` flag): local runs and tests.
    Static,
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

/// A backend address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("no backend addresses given")]
    Empty,
    #[error("{0:?} is not a backend address (expected IP:port, e.g. 127.0.0.1:8081)")]
    Invalid(String),
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
        let mut json = serde_json::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(&mut json).map_err(|error| {
            let field = error.path().to_string();
            let reason = error.into_inner();
            if reason.is_data() {
                ConfigError::Field {
                    path: path.to_owned(),
                    field: if field == "." {
                        "(top level)".to_owned()
                    } else {
                        field
                    },
                    reason: reason.to_string(),
                }
            } else {
                ConfigError::Syntax {
                    path: path.to_owned(),
                    reason,
                }
            }
        })?;
        config
            .validate()
            .map_err(|(field, reason)| ConfigError::Field {
                path: path.to_owned(),
                field: field.to_owned(),
                reason,
            })?;
        Ok(config)
    }

    /// Switches to static discovery over `addrs`: what the `--backends` flag does.
    pub fn with_static_backends(mut self, addrs: Vec<SocketAddr>) -> Self {
        self.discovery = DiscoveryMode::Static;
        self.static_backends = addrs;
        self
    }

    /// What discovery should watch. `namespace` is the pod's own (the Downward
    /// API's `NAMESPACE`), if known.
    pub fn discovery_source(&self, namespace: Option<String>) -> Source {
        match self.discovery {
            DiscoveryMode::Static => Source::Static(self.static_backends.clone()),
            DiscoveryMode::Kubernetes => Source::Kubernetes(KubernetesSource {
                namespace,
                service_name: self.backend_service_name.clone(),
                port: self.backend_port,
            }),
        }
    }

    /// [`Config::connect_timeout_ms`] as a `Duration`.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// [`Config::request_timeout_ms`] as a `Duration`.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// [`Config::drain_seconds`] as a `Duration`.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }

    /// Checks the rules that types alone cannot express.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let fail = |field, reason: &str| Err((field, reason.to_owned()));
        if self.backend_service_name.trim().is_empty() {
            return fail("backendServiceName", "must not be empty");
        }
        if self.backend_port == 0 {
            return fail("backendPort", "must be between 1 and 65535");
        }
        if self.connect_timeout_ms == 0 {
            return fail("connectTimeoutMs", "must be greater than 0");
        }
        if self.request_timeout_ms == 0 {
            return fail("requestTimeoutMs", "must be greater than 0");
        }
        if let Some(error) = self.limits_error() {
            return Err(error);
        }
        if self.discovery == DiscoveryMode::Static && self.static_backends.is_empty() {
            return fail(
                "staticBackends",
                "must list at least one address when discovery is \"static\"",
            );
        }
        self.health_check.validate()?;
        self.outlier.validate()?;
        self.retries.validate()?;
        Ok(())
    }
}

impl Config {
    /// The limits block's rules, with the ranges both programs accept (see
    /// [`ServerLimits::TIMEOUT_MS`] and its neighbours).
    fn limits_error(&self) -> Option<(&'static str, String)> {
        if self.drain_seconds > MAX_DRAIN_SECONDS {
            return Some((
                "drainSeconds",
                format!("must be at most {MAX_DRAIN_SECONDS}"),
            ));
        }
        [
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
        ]
        .into_iter()
        .find_map(|(field, reason)| Some((field, reason?)))
    }
}

/// Longest `drainSeconds`: an hour, like the shutdown timeout's bound.
const MAX_DRAIN_SECONDS: u64 = 3600;

/// Why `value` is not accepted, if it is outside `range`.
fn outside<T: PartialOrd + fmt::Display>(value: T, range: RangeInclusive<T>) -> Option<String> {
    (!range.contains(&value))
        .then(|| format!("must be between {} and {}", range.start(), range.end()))
}

/// Parses one backend address. Host names are not resolved: endpoints in
/// Kubernetes are IPs, and a name that resolves differently over time would make
/// "static" a lie.
pub fn parse_backend_addr(text: &str) -> Result<SocketAddr, AddrError> {
    let text = text.trim();
    text.parse()
        .map_err(|_| AddrError::Invalid(text.to_owned()))
}

/// Parses the `--backends` flag: comma-separated `IP:port` addresses.
pub fn parse_backend_list(list: &str) -> Result<Vec<SocketAddr>, AddrError> {
    let addrs = list
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(parse_backend_addr)
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(AddrError::Empty);
    }
    Ok(addrs)
}

fn deserialize_addrs<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<SocketAddr>, D::Error> {
    Vec::<String>::deserialize(de)?
        .iter()
        .map(|text| parse_backend_addr(text).map_err(serde::de::Error::custom))
        .collect()
}

fn default_admin_port() -> u16 {
    9090
}

fn default_connect_timeout_ms() -> u64 {
    1000
}

fn default_request_timeout_ms() -> u64 {
    30_000
}

fn default_drain_seconds() -> u64 {
    5
}

fn default_shutdown_timeout_seconds() -> u64 {
    ServerLimits::DEFAULT.shutdown_timeout.as_secs()
}

fn default_header_read_timeout_ms() -> u64 {
    duration_ms(ServerLimits::DEFAULT.header_read_timeout)
}

fn default_idle_timeout_ms() -> u64 {
    duration_ms(ServerLimits::DEFAULT.idle_timeout)
}

fn default_max_connections() -> usize {
    ServerLimits::DEFAULT.max_connections
}

fn default_max_header_bytes() -> usize {
    ServerLimits::DEFAULT.max_header_bytes
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl fmt::Display for DiscoveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiscoveryMode::Kubernetes => "kubernetes",
            DiscoveryMode::Static => "static",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(config.port, 8080);
        assert_eq!(config.backend_service_name, "backend-service");
        assert_eq!(config.backend_port, 8080);
        assert_eq!(config.admin_port, 9090);
        assert_eq!(config.discovery, DiscoveryMode::Kubernetes);
        assert!(config.static_backends.is_empty());
        assert_eq!(config.connect_timeout(), Duration::from_millis(1000));
        assert_eq!(config.request_timeout(), Duration::from_millis(30_000));
        assert_eq!(config.log_level, LogLevel::Info);
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.drain(), Duration::from_secs(5));
        assert_eq!(ServerLimits::from(&config), ServerLimits::DEFAULT);
    }

    #[test]
    fn algorithm_defaults_to_round_robin_and_reads_weights() {
        let config = parse(&with_guide_keys("")).expect("guide config parses");
        assert_eq!(config.algorithm, Algorithm::RoundRobin);
        assert_eq!(config.weights, Weights::default());
        let config = parse(&with_guide_keys(
            r#""algorithm": "weighted_round_robin", "weights": {"10.0.0.1:80": 5, "10.0.0.2": 2}"#,
        ))
        .expect("weighted config parses");
        assert_eq!(config.algorithm, Algorithm::WeightedRoundRobin);
        let at = |s: &str| s.parse::<SocketAddr>().expect("valid address");
        assert_eq!(config.weights.of(at("10.0.0.1:80")), 5);
        assert_eq!(config.weights.of(at("10.0.0.2:9000")), 2);
        assert_eq!(config.weights.of(at("10.0.0.3:80")), 1);
        let config = parse(&with_guide_keys(r#""algorithm": "least_request""#))
            .expect("least_request parses");
        assert_eq!(config.algorithm, Algorithm::LeastRequest);
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
        let limits = ServerLimits::from(&config);
        assert!(config.drain() + limits.shutdown_timeout < Duration::from_secs(30));
    }

    #[test]
    fn limits_keys_are_read() {
        let config = parse(&with_guide_keys(
            r#""drainSeconds": 0, "shutdownTimeoutSeconds": 3, "headerReadTimeoutMs": 500,
               "idleTimeoutMs": 700, "maxConnections": 2, "maxHeaderBytes": 8192"#,
        ))
        .expect("limits parse");
        assert_eq!(config.drain(), Duration::ZERO);
        assert_eq!(
            ServerLimits::from(&config),
            ServerLimits {
                header_read_timeout: Duration::from_millis(500),
                idle_timeout: Duration::from_millis(700),
                max_connections: 2,
                max_header_bytes: 8192,
                shutdown_timeout: Duration::from_secs(3),
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
        assert_eq!(config.admin_port, 9191);
        assert_eq!(config.discovery, DiscoveryMode::Static);
        assert_eq!(
            config.static_backends,
            vec![
                "127.0.0.1:8081".parse().expect("valid"),
                "[::1]:8082".parse().expect("valid")
            ]
        );
        assert_eq!(config.connect_timeout_ms, 250);
        assert_eq!(config.request_timeout_ms, 5000);
        assert_eq!(config.log_level, LogLevel::Debug);
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn shipped_local_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.json");
        let config = Config::load(&path).expect("loadbalancer/config.json is valid");
        assert_eq!(config.discovery, DiscoveryMode::Static);
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
        ];
        for (text, field) in cases {
            assert_error_mentions(&text, &[field]);
        }
    }

    #[test]
    fn resilience_blocks_default_when_absent() {
        let config = parse(&with_guide_keys("")).expect("guide config parses");
        assert_eq!(config.health_check, HealthCheckConfig::default());
        assert_eq!(config.health_check.path, "/healthz");
        assert_eq!(config.health_check.interval_ms, 5000);
        assert_eq!(config.outlier.consecutive_failures, 5);
        assert_eq!(config.retries, RetriesConfig::default());
        assert_eq!(config.retries.attempts, 3);
        assert_eq!(config.retries.budget_percent, 20);
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
            config.health_check,
            HealthCheckConfig {
                path: "/readyz".to_owned(),
                interval_ms: 100,
                timeout_ms: 50,
                unhealthy_threshold: 1,
                healthy_threshold: 4,
            }
        );
        assert_eq!(
            config.outlier,
            OutlierConfig {
                consecutive_failures: 2,
                base_ejection_ms: 10,
                max_ejection_ms: 60_000,
            }
        );
        assert_eq!(config.retries.attempts, 1);
        assert_eq!(config.retries.budget_percent, 20);
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
        assert_eq!(config.discovery_source(None), Source::Static(addrs));
    }

    #[test]
    fn kubernetes_source_carries_service_port_and_namespace() {
        let config = parse(&with_guide_keys("")).expect("guide config parses");
        assert_eq!(
            config.discovery_source(Some("demo".to_owned())),
            Source::Kubernetes(KubernetesSource {
                namespace: Some("demo".to_owned()),
                service_name: "backend-service".to_owned(),
                port: 8080,
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
}
