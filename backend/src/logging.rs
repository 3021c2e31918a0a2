//! Log set-up: every log line, including the one access-log line per request that
//! `server` writes, goes to stdout through `tracing`, where the container runtime
//! collects it.
//!
//! The level and format come from the config file; `RUST_LOG`, when set, overrides
//! the level with the usual `tracing` directives (`RUST_LOG=debug`,
//! `RUST_LOG=info,hyper=debug`), so a pod can be made chattier without editing its
//! ConfigMap.

use std::io::IsTerminal as _;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Why logging could not be started (in practice: it was already started).
pub type InitError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(level: LevelFilter, format: LogFormat) -> Result<(), InitError> {
    let filter = EnvFilter::builder()
        .with_default_directive(level.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        // Colour codes only for a person at a terminal, never in collected logs.
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.try_init(),
        // Flattened, so fields such as `request_id` are top-level keys a log pipeline
        // can join on.
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
}
