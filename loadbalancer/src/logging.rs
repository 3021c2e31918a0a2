//! Logging: structured `tracing` events written to stdout, where `kubectl logs`
//! and log collectors expect them.
//!
//! The level comes from the config (`logLevel`); `RUST_LOG`, when set, overrides
//! it with full `EnvFilter` directives (e.g. `loadbalancer=debug,hyper=info`).
//! The format is `text` for people or `json`, one object per line with the event's
//! fields at the top level, for log pipelines.

use std::io::IsTerminal;

use anyhow::Context;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogLevel};

/// Installs the global subscriber. Fails on an invalid `RUST_LOG` or if a
/// subscriber is already installed.
pub fn init(level: LogLevel, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::from(level).into())
        .from_env()
        .context("invalid RUST_LOG")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes help on a terminal and garble `kubectl logs` and files.
        .with_ansi(std::io::stdout().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("cannot install the logger: {error}"))
}
