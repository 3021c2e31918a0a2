//! Log set-up: every log line, including the one access-log line per request that
//! `server` writes, goes to stdout through `tracing`, where the container runtime
//! collects it.
//!
//! The level and format come from the config file; `RUST_LOG`, when set, overrides
//! the level with the usual `tracing` directives (`RUST_LOG=debug`,
//! `RUST_LOG=info,hyper=debug`), so a pod can be made chattier without editing its
//! ConfigMap. The level filter sits in a `reload` layer, so a config reload
//! ([`crate::reload`]) changes it through the [`LogHandle`]; the format is part of
//! the subscriber's type and needs a restart.

use std::io::IsTerminal as _;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

/// Why logging could not be started (in practice: it was already started).
pub type InitError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Changes the installed subscriber's level.
#[derive(Debug, Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    /// Logs at `level` from now on (still overridden by `RUST_LOG`).
    pub fn set_level(&self, level: LevelFilter) -> Result<(), reload::Error> {
        self.0.reload(filter(level))
    }
}

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(level: LevelFilter, format: LogFormat) -> Result<LogHandle, InitError> {
    let (filter, handle) = reload::Layer::new(filter(level));
    let registry = tracing_subscriber::registry().with(filter);
    // Colour codes only for a person at a terminal, never in collected logs.
    let layer = tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => registry.with(layer).try_init()?,
        // Flattened, so fields such as `request_id` are top-level keys a log pipeline
        // can join on.
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init()?,
    }
    Ok(LogHandle(handle))
}

/// `level` as the default, unless `RUST_LOG` says otherwise.
fn filter(level: LevelFilter) -> EnvFilter {
    EnvFilter::builder()
        .with_default_directive(level.into())
        .from_env_lossy()
}
