//! Live reload: watches the config file and applies a valid change without a
//! restart and without dropping a request.
//!
//! Kubernetes updates a mounted ConfigMap by writing a new timestamped directory,
//! pointing a `..data_tmp` symlink at it and renaming that over `..data`; the
//! file we were given (`config.json`) is a symlink to `..data/config.json`. The
//! swap is atomic, but it replaces the *directory*, so an inotify watch on the
//! old file sees nothing useful. We therefore poll (every [`POLL_INTERVAL`]) a
//! [`ConfigFile`], which re-resolves the path each time and compares a
//! fingerprint: the resolved target, its modification time and a hash of its
//! content. Only changed content is parsed, with the same loader as at start-up.
//!
//! A valid new config is applied piece by piece, each where it lives:
//!
//! * log level and format: through the [`LogHandle`];
//! * algorithm and weights: a new balancer swapped into every [`Proxy`];
//! * upstream timeouts, retries and outlier settings: [`Proxy::reconfigure`],
//!   from each proxy's next attempt on (the retry budget and each backend's
//!   outlier counters carry over);
//! * the static backend list: one [`Backends::replace`], like any discovery update;
//! * health-check settings: the checker task is restarted (verdicts live in each
//!   backend's state and carry over);
//! * in Kubernetes mode, `backendServiceName` and `backendPort`: the
//!   [`DiscoveryTask`] is restarted with the new Service, and the old list serves
//!   until the new watch's first complete list.
//!
//! What is baked into listening sockets and server settings at start-up (ports,
//! connection limits, server timeouts, the discovery mode) needs a restart; a
//! change to one of them is named in a warning, so nobody believes it took effect.
//! An invalid file is rejected with an error line giving the reason, and the old
//! config stays in force. Every reload is counted in the [`Metrics`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use service_kit::config_watch::ConfigFile;
pub use service_kit::config_watch::POLL_INTERVAL;
use service_kit::logging::LogHandle;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::backends::Backends;
use crate::balancer;
use crate::config::{Config, DiscoveryMode};
use crate::discovery::DiscoveryTask;
use crate::health::{HealthCheckSettings, HealthChecker};
use crate::metrics::{Metrics, ReloadResult};
use crate::proxy::{Proxy, ProxySettings, Resilience};

/// The running parts a reload can change.
#[derive(Debug, Clone)]
pub struct Live {
    /// Every worker's proxy: each gets the one new balancer when `algorithm` or
    /// `weights` change, so the workers keep sharing one rotation.
    pub proxies: Vec<Proxy>,
    /// Gets the new list when `staticBackends` change under static discovery.
    pub backends: Backends,
    /// Changes the log level; `None` when logging was set up elsewhere (tests).
    pub log: Option<LogHandle>,
    /// Where reloads are counted.
    pub metrics: Arc<Metrics>,
}

/// The active health checker's task, which a reload restarts with new settings.
/// Dropping it stops the checker, so it ends with the reloader that owns it.
#[derive(Debug)]
pub struct HealthTask {
    /// The list the checker probes, handed to each new checker.
    backends: Backends,
    /// The running checker.
    task: JoinHandle<()>,
}

impl HealthTask {
    /// Starts a checker over `backends`.
    pub fn spawn(backends: Backends, settings: HealthCheckSettings) -> Self {
        let task = tokio::spawn(HealthChecker::new(backends.clone(), settings).run());
        Self { backends, task }
    }

    /// Replaces the checker with one using `settings`. Its first round comes one
    /// interval later; until then the verdicts in force stay.
    fn restart(&mut self, settings: HealthCheckSettings) {
        self.task.abort();
        self.task = tokio::spawn(HealthChecker::new(self.backends.clone(), settings).run());
    }
}

impl Drop for HealthTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches one config file and applies its changes to [`Live`].
#[derive(Debug)]
pub struct Reloader {
    /// The path as given (`--config`), for messages and the parser's errors.
    path: PathBuf,
    /// The file behind `path`: reports its text when it changed.
    file: ConfigFile,
    /// Backends from the `--backends` flag, which override the file's on every
    /// reload as they did at start-up.
    flag_backends: Option<Vec<SocketAddr>>,
    /// The config in force.
    config: Config,
    /// What to apply changes to.
    live: Live,
    /// The health checker to restart when `healthCheck` changes; `None` when
    /// none runs.
    health: Option<HealthTask>,
    /// Discovery, restarted when the watched Service changes; `None` when it runs
    /// elsewhere (tests).
    discovery: Option<DiscoveryTask>,
}

impl Reloader {
    /// A reloader for the file at `path`, whose current content `config` (with
    /// `flag_backends` applied) is already in force.
    pub fn new(
        path: PathBuf,
        flag_backends: Option<Vec<SocketAddr>>,
        config: Config,
        live: Live,
    ) -> Self {
        // The file as it is now is the config in force (or near enough: a change
        // between loading and here is picked up at the next check).
        Self {
            file: ConfigFile::new(path.clone()),
            path,
            flag_backends,
            config,
            live,
            health: None,
            discovery: None,
        }
    }

    /// Owns `health` from now on: restarts it when `healthCheck` changes, and
    /// stops it when the reloader ends.
    pub fn with_health(mut self, health: HealthTask) -> Self {
        self.health = Some(health);
        self
    }

    /// Owns `discovery` from now on: restarts it when the watched Service
    /// changes, and stops it when the reloader ends.
    pub fn with_discovery(mut self, discovery: DiscoveryTask) -> Self {
        self.discovery = Some(discovery);
        self
    }

    /// Checks the file every `interval`, forever; meant to be spawned, and
    /// aborted at shutdown.
    pub async fn run(mut self, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        // After a stall, one check is enough; there is no backlog to catch up on.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            // `check` uses blocking file calls: a `stat` per tick and one small
            // read per change, microseconds on a local or tmpfs-backed volume,
            // so a trip to the blocking pool would cost more than it saves.
            self.check();
        }
    }

    /// The config in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Checks the file once and applies a change. Returns how a reload ended,
    /// or `None` when the file had not changed.
    pub fn check(&mut self) -> Option<ReloadResult> {
        let text = match self.file.check() {
            Ok(Some(text)) => text,
            Ok(None) => return None,
            Err(error) => {
                // Missing or unreadable: keep serving with what we have. The
                // watcher says so once, and reports the file again when it is back.
                error!(
                    path = %self.path.display(), %error,
                    "config reload failed: cannot read the file; keeping the current config"
                );
                self.live
                    .metrics
                    .record_config_reload(ReloadResult::Failure);
                return Some(ReloadResult::Failure);
            }
        };
        let result = match Config::parse(&text, &self.path) {
            Ok(config) => {
                let config = match &self.flag_backends {
                    Some(addrs) => config.with_static_backends(addrs.clone()),
                    None => config,
                };
                self.apply(config);
                ReloadResult::Success
            }
            Err(error) => {
                error!(%error, "config reload failed; keeping the current config");
                ReloadResult::Failure
            }
        };
        self.live.metrics.record_config_reload(result);
        Some(result)
    }

    /// Applies what can change live and names what cannot.
    fn apply(&mut self, new: Config) {
        let old = &self.config;
        let mut applied = Vec::new();
        if new.log_level != old.log_level
            && let Some(log) = &self.live.log
        {
            match log.set_level(new.log_level) {
                Ok(()) => applied.push("logLevel"),
                Err(error) => warn!(error = %format!("{error:#}"), "log level unchanged"),
            }
        }
        if new.log_format != old.log_format
            && let Some(log) = &self.live.log
        {
            log.set_format(new.log_format);
            applied.push("logFormat");
        }
        if new.algorithm != old.algorithm || new.weights != old.weights {
            let chosen = balancer::from_config(new.algorithm, &new.weights);
            for proxy in &self.live.proxies {
                proxy.set_balancer(Arc::clone(&chosen));
            }
            applied.extend(["algorithm", "weights"]);
        }
        let upstream: Vec<_> = changed([
            (
                "connectTimeoutMs",
                old.connect_timeout_ms != new.connect_timeout_ms,
            ),
            (
                "requestTimeoutMs",
                old.request_timeout_ms != new.request_timeout_ms,
            ),
            ("retries", old.retries != new.retries),
            ("outlier", old.outlier != new.outlier),
        ])
        .collect();
        if !upstream.is_empty() {
            let (settings, resilience) = (ProxySettings::from(&new), Resilience::from(&new));
            for proxy in &self.live.proxies {
                proxy.reconfigure(settings, resilience);
            }
            applied.extend(upstream);
        }
        if new.discovery == DiscoveryMode::Static
            && old.discovery == DiscoveryMode::Static
            && new.static_backends != old.static_backends
        {
            self.live.backends.replace(new.static_backends.clone());
            applied.push("staticBackends");
        }
        if new.health_check != old.health_check
            && let Some(health) = &mut self.health
        {
            health.restart(HealthCheckSettings::from(&new.health_check));
            applied.push("healthCheck");
        }
        let watching = old.discovery == DiscoveryMode::Kubernetes
            && new.discovery == DiscoveryMode::Kubernetes;
        let discovery_is_live = watching && self.discovery.is_some();
        if discovery_is_live
            && (new.backend_service_name != old.backend_service_name
                || new.backend_port != old.backend_port)
            && let Some(discovery) = &mut self.discovery
        {
            discovery.restart(new.discovery_source(discovery.namespace.clone()));
            applied.extend(["backendServiceName", "backendPort"]);
        }
        let live_parts = LiveParts {
            health: self.health.is_some(),
            discovery: discovery_is_live,
        };
        let restart = needs_restart(old, &new, live_parts);
        info!(
            path = %self.path.display(), applied = ?applied, algorithm = %new.algorithm,
            log_level = ?new.log_level, "config reloaded"
        );
        if !restart.is_empty() {
            warn!(fields = ?restart, "config changes that take effect only after a restart");
        }
        self.config = new;
    }
}

/// Which restartable tasks this reloader owns, so their settings apply live.
#[derive(Debug, Clone, Copy)]
struct LiveParts {
    /// The health checker (`healthCheck`).
    health: bool,
    /// The EndpointSlice watch (`backendServiceName`, `backendPort`).
    discovery: bool,
}

/// The keys whose new value the running process cannot apply: they are read
/// once at start-up into listeners, clients, discovery and background tasks.
fn needs_restart(old: &Config, new: &Config, live: LiveParts) -> Vec<&'static str> {
    let static_list_mode = old.discovery == DiscoveryMode::Static;
    changed([
        ("port", old.port != new.port),
        ("adminPort", old.admin_port != new.admin_port),
        ("discovery", old.discovery != new.discovery),
        (
            "backendServiceName",
            !live.discovery && old.backend_service_name != new.backend_service_name,
        ),
        (
            "backendPort",
            !live.discovery && old.backend_port != new.backend_port,
        ),
        (
            "staticBackends",
            !static_list_mode && old.static_backends != new.static_backends,
        ),
        ("drainSeconds", old.drain_seconds != new.drain_seconds),
        (
            "shutdownTimeoutSeconds",
            old.shutdown_timeout_seconds != new.shutdown_timeout_seconds,
        ),
        (
            "headerReadTimeoutMs",
            old.header_read_timeout_ms != new.header_read_timeout_ms,
        ),
        ("idleTimeoutMs", old.idle_timeout_ms != new.idle_timeout_ms),
        ("maxConnections", old.max_connections != new.max_connections),
        (
            "maxHeaderBytes",
            old.max_header_bytes != new.max_header_bytes,
        ),
        (
            "healthCheck",
            !live.health && old.health_check != new.health_check,
        ),
    ])
    .collect()
}

/// The names of the fields marked changed.
fn changed(
    fields: impl IntoIterator<Item = (&'static str, bool)>,
) -> impl Iterator<Item = &'static str> {
    fields
        .into_iter()
        .filter(|&(_, changed)| changed)
        .map(|(field, _)| field)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::balancer::RoundRobin;
    use crate::proxy::ProxySettings;

    const A: &str = "127.0.0.1:8001";
    const B: &str = "127.0.0.1:8002";

    fn json(backend: &str, extra: &str) -> String {
        format!(
            r#"{{"port": 8080, "backendServiceName": "s", "backendPort": 8080,
                "discovery": "static", "staticBackends": ["{backend}"] {extra}}}"#
        )
    }

    /// A reloader over a temporary file holding `json(A, "")`, already in force.
    fn reloader(dir: &Path) -> (Reloader, Backends, Arc<Metrics>) {
        let path = dir.join("config.json");
        std::fs::write(&path, json(A, "")).expect("write config");
        let config = Config::load(&path).expect("valid config");
        let backends = Backends::new(config.static_backends.clone());
        let metrics = Arc::new(Metrics::new(backends.clone()));
        let settings = ProxySettings::from(&config);
        let proxy = Proxy::new(
            backends.clone(),
            RoundRobin::new(),
            settings,
            Arc::clone(&metrics),
        );
        let live = Live {
            proxies: vec![proxy],
            backends: backends.clone(),
            log: None,
            metrics: Arc::clone(&metrics),
        };
        (Reloader::new(path, None, config, live), backends, metrics)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("reload-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    fn rewrite(dir: &Path, text: &str) {
        std::fs::write(dir.join("config.json"), text).expect("rewrite the config");
    }

    /// Whether exactly one reload ended with `result`.
    fn counted_once(metrics: &Metrics, result: &str) -> bool {
        let series = format!("loadbalancer_config_reloads_total{{result=\"{result}\"}} 1\n");
        metrics.encode().contains(&series)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("valid address")
    }

    #[test]
    fn an_unchanged_or_merely_rewritten_file_is_not_a_reload() {
        let dir = temp_dir("unchanged");
        let (mut reloader, _, metrics) = reloader(&dir);
        assert_eq!(reloader.check(), None);
        // Same content, new modification time: checked, not applied.
        rewrite(&dir, &json(A, ""));
        assert_eq!(reloader.check(), None);
        assert!(!metrics.encode().contains("config_reloads_total{"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_valid_change_applies_the_static_backends_and_the_new_config() {
        let dir = temp_dir("valid");
        let (mut reloader, backends, metrics) = reloader(&dir);
        rewrite(&dir, &json(B, r#", "algorithm": "least_request""#));
        assert_eq!(reloader.check(), Some(ReloadResult::Success));
        assert_eq!(backends.snapshot(), vec![addr(B)]);
        assert_eq!(
            reloader.config().algorithm,
            crate::config::Algorithm::LeastRequest
        );
        assert!(counted_once(&metrics, "success"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_invalid_file_is_rejected_once_and_changes_nothing() {
        let dir = temp_dir("invalid");
        let (mut reloader, backends, metrics) = reloader(&dir);
        rewrite(&dir, &json(B, r#", "retries": {"attempts": 0}"#));
        assert_eq!(reloader.check(), Some(ReloadResult::Failure));
        // Reported once, not at every poll while the file stays bad.
        assert_eq!(reloader.check(), None);
        assert_eq!(backends.snapshot(), vec![addr(A)]);
        assert_eq!(reloader.config().static_backends, vec![addr(A)]);
        assert!(counted_once(&metrics, "failure"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn restart_only_fields_are_named() {
        let dir = temp_dir("restart");
        let (reloader, _, _) = reloader(&dir);
        let old = reloader.config().clone();
        let mut new = old.clone();
        new.port = 9999;
        new.request_timeout_ms = 5;
        new.log_level = crate::config::LogLevel::Debug;
        new.health_check.interval_ms = 1;
        new.backend_service_name = "other".to_owned();
        let live = |health, discovery| LiveParts { health, discovery };
        new.log_format = crate::config::LogFormat::Json;
        new.retries.attempts = 1;
        new.idle_timeout_ms = 1;
        assert_eq!(
            needs_restart(&old, &new, live(true, true)),
            ["port", "idleTimeoutMs"]
        );
        assert_eq!(
            needs_restart(&old, &new, live(false, false)),
            ["port", "backendServiceName", "idleTimeoutMs", "healthCheck"]
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
