//! The backend's configuration: the JSON file a Kubernetes ConfigMap mounts at
//! `/etc/config/config.json`, read at start-up before anything else runs. While the
//! backend runs, [`crate::reload`] rereads it and applies a new `logLevel`; every
//! other key needs a restart.
//!
//! The file is checked strictly. A typo in a key (`servicename`) is an error rather
//! than a silently ignored line, because a ConfigMap that half-applies is much harder
//! to debug than a pod that refuses to start and says why. Every error names the file
//! and the problem, and [`ConfigError`] keeps the cases apart so tests (and callers)
//! can tell them apart too.
//!
//! | key             | required | default | meaning                                        |
//! |-----------------|----------|---------|------------------------------------------------|
//! | `port`          | yes      |         | TCP port to listen on (1-65535)                |
//! | `grpcPort`      | no       | none    | TCP port of the gRPC listener (1-65535, not `port`); absent or `null`: no gRPC |
//! | `serviceName`   | yes      |         | name reported in every identity answer         |
//! | `logLevel`      | no       | `info`  | `trace`, `debug`, `info`, `warn`, `error`, `off` |
//! | `logFormat`     | no       | `text`  | `text` for people, `json` for log pipelines    |
//! | `shutdownDelay` | no       | `0s`    | how long to keep serving, not ready, after a shutdown signal (the load balancer's `drainSeconds`) |
//! | `shutdownTimeoutSeconds` | no | `20` | after the delay, how long requests in flight may take before they are cut |
//! | `headerReadTimeoutMs` | no | `10000` | a request head must be complete this long after its first byte |
//! | `idleTimeoutMs` | no | `120000` | a connection with no request in progress is closed after this long |
//! | `maxConnections` | no | `10000` | open connections at most; more wait in the listen backlog |
//! | `maxHeaderBytes` | no | `16384` | largest request head; larger ones get 431 |

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use serde_json::{Map, Value};
use tracing::level_filters::LevelFilter;

use crate::server::{DEFAULT_LIMITS, ServerLimits};

// `logFormat` takes the values the shared logging set-up defines.
pub use service_kit::logging::LogFormat;

/// The default location, where the Deployment mounts the ConfigMap.
pub const DEFAULT_PATH: &str = "/etc/config/config.json";

/// Every key the file may contain; anything else is rejected as a likely typo.
const KNOWN_KEYS: [&str; 12] = [
    "port",
    "grpcPort",
    "serviceName",
    "logLevel",
    "logFormat",
    "shutdownDelay",
    "responseDelayMs",
    "shutdownTimeoutSeconds",
    "headerReadTimeoutMs",
    "idleTimeoutMs",
    "maxConnections",
    "maxHeaderBytes",
];

/// Settings the backend runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The port to listen on (all interfaces). Never 0: a pod behind a Service needs a
    /// port known in advance.
    pub port: u16,
    /// The port of the gRPC listener ([`crate::grpc`]), on all interfaces; `None`
    /// serves no gRPC. Never 0, and never `port`: the two listeners speak
    /// different protocols.
    pub grpc_port: Option<u16>,
    /// Reported as `serviceName` in identity answers, so a client of the load balancer
    /// can see which Service it reached.
    pub service_name: String,
    /// The most verbose level logged when `RUST_LOG` is not set.
    pub log_level: LevelFilter,
    /// Text for reading logs in a terminal, JSON for a log pipeline.
    pub log_format: LogFormat,
    /// How long to keep accepting (while `/readyz` says 503) after a shutdown signal,
    /// so load balancers and kube-proxy see the pod leave before its port closes.
    pub shutdown_delay: Duration,
    /// How long every `/` and `/work` answer waits first (`responseDelayMs`, default
    /// 0): a deliberately slow pod for load-balancing experiments.
    pub response_delay: Duration,
    /// Client connection limits and the shutdown timeout, see [`ServerLimits`].
    pub limits: ServerLimits,
}

/// Why a config file could not be used. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist (often: the ConfigMap is not mounted, or a typo in `--config`).
    #[error("config file {path} does not exist")]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The file exists but could not be read (permissions, a directory, ...).
    #[error("config file {path} cannot be read")]
    Read {
        /// The path that was tried.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid JSON, or not a JSON object.
    #[error("config file {path} is not valid JSON: {message} at line {line}, column {column}")]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// The parser's description of the problem.
        message: String,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
    },
    /// The top-level value is valid JSON but not an object.
    #[error("config file {path} must hold a JSON object, not {found}")]
    NotAnObject {
        /// The file.
        path: PathBuf,
        /// The kind of JSON value found instead.
        found: &'static str,
    },
    /// A key the backend does not know, most likely a typo.
    #[error("config file {path}: unknown key `{key}` (known keys: {known})", known = KNOWN_KEYS.join(", "))]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The unexpected key.
        key: String,
    },
    /// A key that has no default is absent.
    #[error("config file {path}: missing required key `{key}`")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The absent key.
        key: &'static str,
    },
    /// A key is present but its value is unusable.
    #[error("config file {path}: invalid value for `{key}`: {reason}")]
    InvalidValue {
        /// The file.
        path: PathBuf,
        /// The offending key.
        key: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
}

/// Reads and checks the config file at `path`.
pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ConfigError::NotFound { path: path.into() }
        } else {
            ConfigError::Read {
                path: path.into(),
                source,
            }
        }
    })?;
    parse(&text, path)
}

/// Checks config text; `path` is only used in error messages.
///
/// The text is parsed into a generic JSON value first and the keys are checked by
/// hand, rather than with `#[serde(deny_unknown_fields)]`, so that each problem gets
/// its own [`ConfigError`] variant instead of one opaque serde message.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::InvalidJson {
        path: path.into(),
        message: without_position(&e),
        line: e.line(),
        column: e.column(),
    })?;
    let Value::Object(map) = value else {
        return Err(ConfigError::NotAnObject {
            path: path.into(),
            found: json_kind(&value),
        });
    };
    if let Some(key) = map.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
        return Err(ConfigError::UnknownKey {
            path: path.into(),
            key: key.clone(),
        });
    }

    let fields = Fields { map: &map, path };
    let port: u16 = fields.required("port")?;
    if port == 0 {
        return Err(fields.invalid("port", "must be between 1 and 65535, not 0"));
    }
    // Read wide, so that 65536 gets the same "between" message as 0.
    let grpc_port = match fields.optional::<Option<u64>>("grpcPort")?.flatten() {
        None => None,
        Some(grpc_port) => match u16::try_from(grpc_port) {
            Ok(0) | Err(_) => {
                return Err(fields.invalid(
                    "grpcPort",
                    format!("must be between 1 and 65535, not {grpc_port}"),
                ));
            }
            Ok(grpc_port) if grpc_port == port => {
                return Err(fields.invalid(
                    "grpcPort",
                    format!("must differ from `port` ({port}): each listener needs its own port"),
                ));
            }
            Ok(grpc_port) => Some(grpc_port),
        },
    };
    let service_name: String = fields.required("serviceName")?;
    if service_name.trim().is_empty() {
        return Err(fields.invalid("serviceName", "must not be empty"));
    }
    let log_level = match fields.optional::<String>("logLevel")? {
        None => LevelFilter::INFO,
        Some(level) => level.parse().map_err(|_| {
            fields.invalid(
                "logLevel",
                format!("`{level}` is not one of trace, debug, info, warn, error, off"),
            )
        })?,
    };
    let log_format = fields.optional("logFormat")?.unwrap_or_default();
    let shutdown_delay = match fields.optional::<String>("shutdownDelay")? {
        None => Duration::ZERO,
        Some(delay) => humantime::parse_duration(&delay).map_err(|e| {
            fields.invalid(
                "shutdownDelay",
                format!("`{delay}` is not a duration like \"5s\": {e}"),
            )
        })?,
    };

    let response_delay = Duration::from_millis(fields.bounded("responseDelayMs", 0, 0..=60_000)?);

    let defaults = DEFAULT_LIMITS;
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let limits = ServerLimits {
        shutdown_timeout: Duration::from_secs(fields.bounded(
            "shutdownTimeoutSeconds",
            defaults.shutdown_timeout.as_secs(),
            ServerLimits::SHUTDOWN_TIMEOUT_SECONDS,
        )?),
        header_read_timeout: Duration::from_millis(fields.bounded(
            "headerReadTimeoutMs",
            millis(defaults.header_read_timeout),
            ServerLimits::TIMEOUT_MS,
        )?),
        idle_timeout: Duration::from_millis(fields.bounded(
            "idleTimeoutMs",
            millis(defaults.idle_timeout),
            ServerLimits::TIMEOUT_MS,
        )?),
        max_connections: fields.bounded(
            "maxConnections",
            defaults.max_connections,
            ServerLimits::MAX_CONNECTIONS,
        )?,
        max_header_bytes: fields.bounded(
            "maxHeaderBytes",
            defaults.max_header_bytes,
            ServerLimits::MAX_HEADER_BYTES,
        )?,
        // HTTP/2's limits are not in the backend's file: its main client is
        // the load balancer, whose own limits face the clients.
        http2: defaults.http2,
    };

    Ok(Config {
        port,
        grpc_port,
        service_name,
        log_level,
        log_format,
        shutdown_delay,
        response_delay,
        limits,
    })
}

/// The parsed object plus the file name, so each field lookup can build its own error.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn optional<T: DeserializeOwned>(&self, key: &'static str) -> Result<Option<T>, ConfigError> {
        self.map
            .get(key)
            .map(|value| T::deserialize(value).map_err(|e| self.invalid(key, without_position(&e))))
            .transpose()
    }

    fn required<T: DeserializeOwned>(&self, key: &'static str) -> Result<T, ConfigError> {
        self.optional(key)?.ok_or_else(|| ConfigError::MissingKey {
            path: self.path.into(),
            key,
        })
    }

    /// An optional number within `range`, or `default` when the key is absent.
    fn bounded<T>(
        &self,
        key: &'static str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: DeserializeOwned + PartialOrd + std::fmt::Display,
    {
        let value = self.optional(key)?.unwrap_or(default);
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(
                key,
                format!(
                    "must be between {} and {}, not {value}",
                    range.start(),
                    range.end()
                ),
            ))
        }
    }

    fn invalid(&self, key: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            path: self.path.into(),
            key,
            reason: reason.into(),
        }
    }
}

/// serde_json appends " at line L column C" to its messages; we report the position
/// in our own words (or, for a single value, it is meaningless), so strip it.
fn without_position(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(at) if error.line() > 0 => message[..at].to_owned(),
        _ => message,
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
