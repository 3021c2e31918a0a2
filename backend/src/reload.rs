//! Live reload of the log level: the one setting the backend applies without a
//! restart, so a pod can be made chattier by editing its ConfigMap.
//!
//! The kubelet updates a ConfigMap volume by swapping a `..data` symlink to a new
//! directory, which an inotify watch on the old file never sees. So, as the load
//! balancer's reloader does, this polls a [`ConfigFile`]: every [`POLL_INTERVAL`]
//! it looks at the file through the path it was given (following the symlinks
//! afresh each time), and the text is parsed, with the start-up loader, only when
//! it changed. A valid change sets `logLevel` through the [`LogHandle`] and names,
//! in a warning, every changed field that only a restart applies; an invalid file
//! gets one error line and the config in force stays.

use std::path::PathBuf;
use std::time::Duration;

use service_kit::config_watch::ConfigFile;
pub use service_kit::config_watch::POLL_INTERVAL;
use service_kit::logging::LogHandle;
use tracing::{error, info, warn};

use crate::config::{self, Config};

/// Watches one config file and applies its log level.
#[derive(Debug)]
pub struct Reloader {
    /// The config file (`--config`): reports its text when it changed, so an
    /// unchanged file is not parsed again and an invalid one is reported once,
    /// not every poll.
    file: ConfigFile,
    /// The config in force: what a change is compared with.
    config: Config,
    /// Changes the level of the installed subscriber.
    log: LogHandle,
}

impl Reloader {
    /// A reloader for the file at `path`, whose current content `config` is in force.
    pub fn new(path: PathBuf, config: Config, log: LogHandle) -> Self {
        Self {
            file: ConfigFile::new(path),
            config,
            log,
        }
    }

    /// Checks the file every `interval`, forever; meant to be spawned, and aborted
    /// at shutdown.
    pub async fn run(mut self, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            // A blocking read of a small local file takes microseconds, less than a
            // trip to the blocking pool would cost.
            self.check();
        }
    }

    /// Reads the file once and applies a valid change.
    fn check(&mut self) {
        let text = match self.file.check() {
            Ok(Some(text)) => text,
            Ok(None) => return,
            // Reported once: the watcher says so only when the file goes away.
            Err(error) => {
                error!(
                    path = %self.file.path().display(), %error,
                    "config reload failed: cannot read the file; keeping the current config"
                );
                return;
            }
        };
        match config::parse(&text, self.file.path()) {
            Ok(new) if new != self.config => self.apply(new),
            Ok(_) => {}
            Err(error) => error!(%error, "config reload failed; keeping the current config"),
        }
    }

    fn apply(&mut self, new: Config) {
        if new.log_level != self.config.log_level
            && let Err(error) = self.log.set_level(new.log_level)
        {
            warn!(error = %format!("{error:#}"), "log level unchanged");
        }
        info!(path = %self.file.path().display(), log_level = %new.log_level, "config reloaded");
        let restart = needs_restart(&self.config, &new);
        if !restart.is_empty() {
            warn!(fields = ?restart, "config changes that take effect only after a restart");
        }
        self.config = new;
    }
}

/// The keys whose new value the running process cannot apply: they are read once
/// at start-up into the listener, the app and the subscriber.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let (was, now) = (&old.limits, &new.limits);
    let mut fields = Vec::new();
    let mut note = |field, differs: bool| {
        if differs {
            fields.push(field);
        }
    };
    note("port", old.port != new.port);
    note("grpcPort", old.grpc_port != new.grpc_port);
    note("serviceName", old.service_name != new.service_name);
    note("logFormat", old.log_format != new.log_format);
    note("shutdownDelay", old.shutdown_delay != new.shutdown_delay);
    note("responseDelayMs", old.response_delay != new.response_delay);
    note(
        "shutdownTimeoutSeconds",
        was.shutdown_timeout != now.shutdown_timeout,
    );
    note(
        "headerReadTimeoutMs",
        was.header_read_timeout != now.header_read_timeout,
    );
    note("idleTimeoutMs", was.idle_timeout != now.idle_timeout);
    note("maxConnections", was.max_connections != now.max_connections);
    note(
        "maxHeaderBytes",
        was.max_header_bytes != now.max_header_bytes,
    );
    fields
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn only_changed_restart_fields_are_named_and_the_level_is_not_one() {
        let old = config::parse(r#"{"port": 8080, "serviceName": "a"}"#, Path::new("c"))
            .expect("valid config");
        let new = config::parse(
            r#"{"port": 9090, "serviceName": "a", "logLevel": "warn", "maxConnections": 5}"#,
            Path::new("c"),
        )
        .expect("valid config");
        assert_eq!(needs_restart(&old, &new), ["port", "maxConnections"]);
        assert!(needs_restart(&old, &old).is_empty());
    }
}
