//! Logging: structured `tracing` events written to stdout, where `kubectl logs`
//! and log collectors expect them. Both binaries install this subscriber once,
//! early in `main`, with the level and format from their config file.
//!
//! The level comes from the config (`logLevel`); `RUST_LOG`, when set, overrides
//! it with full `EnvFilter` directives (e.g. `loadbalancer=debug,hyper=info`), so
//! a pod can be made chattier without editing its ConfigMap. An invalid `RUST_LOG`
//! is an error, not a silently ignored directive. The format is `text` for people
//! or `json`, one object per line with the event's fields at the top level, for
//! log pipelines.
//!
//! Both can change while the process runs (each binary's config reloader goes
//! through the [`LogHandle`]): the level filter sits in a `reload` layer, and the
//! one output layer formats each event with whichever format a flag names
//! (`LiveFormat`). Swapping whole output layers instead would leave spans opened
//! under one format to be closed under the other; with one layer, span
//! bookkeeping never changes.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{self, Format, Full, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Log verbosity, from most to least detailed: the `logLevel` config key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

/// How log lines are written: the `logFormat` config key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines with `key=value` fields.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl From<LogLevel> for LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Trace => LevelFilter::TRACE,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Error => LevelFilter::ERROR,
        }
    }
}

/// Changes the installed subscriber's level and format.
#[derive(Debug, Clone)]
pub struct LogHandle {
    /// The level filter's reload handle.
    filter: reload::Handle<EnvFilter, Registry>,
    /// Shared with the output layer's [`LiveFormat`]: `true` writes JSON.
    json: Arc<AtomicBool>,
}

impl LogHandle {
    /// Logs at `level` from now on (still overridden by `RUST_LOG`): a
    /// [`LogLevel`], or any `LevelFilter` (`off` included).
    pub fn set_level(&self, level: impl Into<LevelFilter>) -> anyhow::Result<()> {
        self.filter
            .reload(filter(level)?)
            .context("cannot change the log level")
    }

    /// Writes every event from now on in `format`.
    pub fn set_format(&self, format: LogFormat) {
        self.json
            .store(format == LogFormat::Json, Ordering::Relaxed);
    }
}

/// Installs the global subscriber, logging at `level` (a [`LogLevel`] or any
/// `LevelFilter`) in `format`. Fails on an invalid `RUST_LOG` or if a subscriber
/// is already installed.
pub fn init(level: impl Into<LevelFilter>, format: LogFormat) -> anyhow::Result<LogHandle> {
    let (filter, filter_handle) = reload::Layer::new(filter(level)?);
    let live_format = LiveFormat::new(format);
    let json = Arc::clone(&live_format.json);
    let output = tracing_subscriber::fmt::layer()
        // Colour codes help on a terminal and garble `kubectl logs` and files.
        .with_ansi(std::io::stdout().is_terminal())
        .event_format(live_format);
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .map_err(|error| anyhow::anyhow!("cannot install the logger: {error}"))?;
    Ok(LogHandle {
        filter: filter_handle,
        json,
    })
}

/// `level` as the default, unless `RUST_LOG` says otherwise.
fn filter(level: impl Into<LevelFilter>) -> anyhow::Result<EnvFilter> {
    EnvFilter::builder()
        .with_default_directive(level.into().into())
        .from_env()
        .context("invalid RUST_LOG")
}

/// Formats each event as text or JSON, as the shared flag says at that moment:
/// one relaxed load per event.
#[derive(Debug)]
struct LiveFormat {
    /// `true` writes JSON; see [`LogHandle::set_format`].
    json: Arc<AtomicBool>,
    text_format: Format<Full>,
    /// Event fields flattened to top-level keys, which log pipelines join on
    /// (`request_id`), and no span fields: JSON lines then never depend on how
    /// a span's fields were recorded, which is what makes switching safe.
    json_format: Format<Json>,
}

impl LiveFormat {
    fn new(initial: LogFormat) -> Self {
        Self {
            json: Arc::new(AtomicBool::new(initial == LogFormat::Json)),
            text_format: format::format(),
            json_format: format::format()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for LiveFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if self.json.load(Ordering::Relaxed) {
            self.json_format.format_event(ctx, writer, event)
        } else {
            self.text_format.format_event(ctx, writer, event)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_are_lowercase_both_ways() {
        let levels = [
            (LogLevel::Trace, "\"trace\""),
            (LogLevel::Debug, "\"debug\""),
            (LogLevel::Info, "\"info\""),
            (LogLevel::Warn, "\"warn\""),
            (LogLevel::Error, "\"error\""),
        ];
        for (level, name) in levels {
            assert_eq!(serde_json::to_string(&level).expect("serializes"), name);
            let read: LogLevel = serde_json::from_str(name).expect("deserializes");
            assert_eq!(read, level);
        }
        for (format, name) in [(LogFormat::Text, "\"text\""), (LogFormat::Json, "\"json\"")] {
            assert_eq!(serde_json::to_string(&format).expect("serializes"), name);
            let read: LogFormat = serde_json::from_str(name).expect("deserializes");
            assert_eq!(read, format);
        }
    }

    #[test]
    fn a_log_level_is_the_level_filter_of_the_same_name() {
        assert_eq!(LevelFilter::from(LogLevel::default()), LevelFilter::INFO);
        assert_eq!(LevelFilter::from(LogLevel::Trace), LevelFilter::TRACE);
        assert_eq!(LevelFilter::from(LogLevel::Error), LevelFilter::ERROR);
    }
}
