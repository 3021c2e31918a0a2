//! Logging: structured `tracing` events written to stdout, where `kubectl logs`
//! and log collectors expect them.
//!
//! The level comes from the config (`logLevel`); `RUST_LOG`, when set, overrides
//! it with full `EnvFilter` directives (e.g. `loadbalancer=debug,hyper=info`).
//! The format is `text` for people or `json`, one object per line with the event's
//! fields at the top level, for log pipelines.
//!
//! The level filter sits in a `reload` layer, so a live config reload
//! ([`crate::reload`]) can change it through the [`LogHandle`] without a restart.
//! The format is baked into the subscriber's type and needs a restart.

use std::io::IsTerminal;

use anyhow::Context;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogFormat, LogLevel};

/// Changes the installed subscriber's level.
#[derive(Debug, Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    /// Logs at `level` from now on (still overridden by `RUST_LOG`).
    pub fn set_level(&self, level: LogLevel) -> anyhow::Result<()> {
        self.0
            .reload(filter(level)?)
            .context("cannot change the log level")
    }
}

/// Installs the global subscriber. Fails on an invalid `RUST_LOG` or if a
/// subscriber is already installed.
pub fn init(level: LogLevel, format: LogFormat) -> anyhow::Result<LogHandle> {
    let (filter, handle) = reload::Layer::new(filter(level)?);
    let layer = tracing_subscriber::fmt::layer()
        // Colour codes help on a terminal and garble `kubectl logs` and files.
        .with_ansi(std::io::stdout().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(layer).try_init(),
        LogFormat::Json => registry
            .with(
                layer
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("cannot install the logger: {error}"))?;
    Ok(LogHandle(handle))
}

fn filter(level: LogLevel) -> anyhow::Result<EnvFilter> {
    EnvFilter::builder()
        .with_default_directive(LevelFilter::from(level).into())
        .from_env()
        .context("invalid RUST_LOG")
}
