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
//! A valid new config is compared with the one in force section by section
//! ([`Config::changes`] says which sections apply live), and each changed live
//! section is applied where it lives:
//!
//! * log level and format: through the [`LogHandle`];
//! * algorithm and weights: a new balancer swapped into every [`Proxy`];
//! * rate limits, trusted proxies and the concurrency limit: a new policy,
//!   shared by every proxy, counting from zero ([`Proxy::set_policy`]);
//!   requests waiting in the queue keep the limit they started with;
//! * upstream timeouts, retries and outlier settings: [`Proxy::reconfigure`],
//!   from each proxy's next attempt on (the retry budget and each backend's
//!   outlier counters carry over);
//! * discovery (the Service, its port, static mode and its list): the
//!   [`DiscoveryTask`] is pointed at the new source, and the old list serves
//!   until the new source's first complete list; `backendProtocol` and
//!   `backendGrpcPort` go to every proxy ([`Proxy::set_routing`]);
//! * health-check settings: the checker task is restarted (verdicts live in each
//!   backend's state and carry over);
//! * this replica's zone (`zone`, `topologyAware`, or the Node's label): learned
//!   again on every reload, in the background.
//!
//! What is baked into listening sockets and server settings at start-up (ports,
//! connection limits, server timeouts) needs a restart; a change to one of them
//! is named in a warning, so nobody believes it took effect. An invalid file is
//! rejected with an error line giving the reason, and the old config stays in
//! force. Every reload is counted in the [`Metrics`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use service_kit::config_watch::ConfigFile;
pub use service_kit::config_watch::POLL_INTERVAL;
use service_kit::logging::LogHandle;
use tracing::{error, info, warn};

use crate::config::{Config, DiscoveryMode};
use crate::discovery::DiscoveryTask;
use crate::health::{HealthCheckSettings, HealthTask};
use crate::metrics::{Metrics, ReloadResult};
use crate::proxy::{Proxy, ProxySettings, Resilience, Routing};
use crate::topology::LocalityLookup;

/// The running parts a reload can change. Whoever holds it keeps health checks
/// and discovery running: dropping it stops both.
#[derive(Debug)]
pub struct Live {
    /// Every worker's proxy: each gets the one new balancer when `algorithm` or
    /// `weights` change, so the workers keep sharing one rotation.
    pub proxies: Vec<Proxy>,
    /// Changes the log level; `None` when logging was set up elsewhere (tests).
    pub log: Option<LogHandle>,
    /// Where reloads are counted.
    pub metrics: Arc<Metrics>,
    /// The health checker, restarted when `healthCheck` changes; `None` when
    /// none runs.
    pub health: Option<HealthTask>,
    /// Discovery, pointed at a new source when its keys change; `None` when the
    /// list is written elsewhere (tests).
    pub discovery: Option<DiscoveryTask>,
    /// The pod's namespace, for a new Kubernetes source.
    pub namespace: Option<String>,
    /// This replica's zone and node, learned again on every reload (from a
    /// changed `zone`, or a Node whose label changed); `None` in tests that
    /// leave it out.
    pub locality: Option<LocalityLookup>,
}

/// Watches one config file and applies its changes to [`Live`].
#[derive(Debug)]
pub struct Reloader {
    /// The file, and the version of it last seen.
    file: ConfigFile,
    /// Backends from the `--backends` flag, which override the file's on every
    /// reload as they did at start-up.
    flag_backends: Option<Vec<SocketAddr>>,
    /// The config in force.
    config: Config,
    /// What to apply changes to.
    live: Live,
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
        Self {
            file: ConfigFile::new(path),
            flag_backends,
            config,
            live,
        }
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
                    path = %self.file.path().display(), %error,
                    "config reload failed: cannot read the file; keeping the current config"
                );
                self.live
                    .metrics
                    .record_config_reload(ReloadResult::Failure);
                return Some(ReloadResult::Failure);
            }
        };
        let result = match Config::parse(&text, self.file.path()) {
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

    /// Applies the live sections that changed and names the keys that need a
    /// restart.
    fn apply(&mut self, new: Config) {
        let old = &self.config;
        let changes = old.changes(&new);
        let live = &mut self.live;
        // Destructured, so that a new section does not compile until it is
        // applied here or left for a restart on purpose.
        let Config {
            listen: _,
            discovery,
            proxy,
            logging,
            limits: _,
            health,
            resilience,
            balancing,
            tls: _,
            policy,
            concurrency,
            topology,
        } = &new;
        if *balancing != old.balancing {
            let chosen = balancing.build();
            for proxy in &live.proxies {
                proxy.set_balancer(Arc::clone(&chosen));
            }
        }
        if *proxy != old.proxy || *resilience != old.resilience {
            let (settings, resilience) = (ProxySettings::from(proxy), Resilience::from(resilience));
            for proxy in &live.proxies {
                proxy.reconfigure(settings, resilience);
            }
        }
        // The status page shows the algorithm beside the policy.
        if *policy != old.policy || *concurrency != old.concurrency || *balancing != old.balancing {
            let built = policy.build(concurrency, balancing);
            for proxy in &live.proxies {
                proxy.set_policy(built.clone());
            }
        }
        if *discovery != old.discovery {
            let routing = Routing::from(discovery);
            for proxy in &live.proxies {
                proxy.set_routing(routing);
            }
            if let Some(task) = &live.discovery {
                task.set_source(discovery.source(live.namespace.clone()));
            }
        }
        if let Some(lookup) = &live.locality {
            let (lookup, topology) = (lookup.clone(), topology.clone());
            let kubernetes = discovery.discovery == DiscoveryMode::Kubernetes;
            // An API call: it must not hold up the reload, and until it
            // answers the locality in force stays.
            tokio::spawn(async move { lookup.update(&topology, kubernetes).await });
        }
        // A health check speaks what the backends speak.
        if (*health != old.health || discovery.backend_protocol != old.discovery.backend_protocol)
            && let Some(task) = &mut live.health
        {
            task.restart(
                HealthCheckSettings::from(&health.health_check)
                    .speaking(discovery.backend_protocol),
            );
        }
        // The log settings go last, right before the reload's own line, so that
        // this line is the first at a new level (other threads log too, so
        // "first" holds to within the two calls).
        if *logging != old.logging
            && let Some(log) = &live.log
        {
            if let Err(error) = log.set_level(logging.log_level) {
                warn!(error = %format!("{error:#}"), "log level unchanged");
            }
            log.set_format(logging.log_format);
        }
        info!(
            path = %self.file.path().display(), applied = ?changes.live,
            algorithm = %balancing.algorithm, log_level = ?logging.log_level, "config reloaded"
        );
        if !changes.at_restart.is_empty() {
            warn!(
                fields = ?changes.at_restart,
                "config changes that take effect only after a restart"
            );
        }
        self.config = new;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::backends::{Backends, BackendsWriter};
    use crate::balancer::RoundRobin;

    const A: &str = "127.0.0.1:8001";
    const B: &str = "127.0.0.1:8002";

    fn json(backend: &str, extra: &str) -> String {
        format!(
            r#"{{"port": 8080, "backendServiceName": "s", "backendPort": 8080,
                "discovery": "static", "staticBackends": ["{backend}"] {extra}}}"#
        )
    }

    /// A reloader over a temporary file holding `json(A, "")`, already in force.
    async fn reloader(dir: &Path) -> (Reloader, Backends, Arc<Metrics>) {
        let path = dir.join("config.json");
        std::fs::write(&path, json(A, "")).expect("write config");
        let config = Config::load(&path).expect("valid config");
        let writer = BackendsWriter::new();
        let backends = writer.reader();
        let metrics = Arc::new(Metrics::new(backends.gauges()));
        let settings = ProxySettings::from(&config.proxy);
        let proxy = Proxy::new(
            backends.clone(),
            RoundRobin::new(),
            settings,
            Arc::clone(&metrics),
        );
        let (discovery, _) = DiscoveryTask::spawn(
            config.discovery.source(None),
            writer,
            crate::discovery::Cluster::default(),
        );
        let live = Live {
            proxies: vec![proxy],
            log: None,
            metrics: Arc::clone(&metrics),
            health: None,
            discovery: Some(discovery),
            namespace: None,
            locality: None,
        };
        wait_for_list(&backends, &[addr(A)]).await;
        (Reloader::new(path, None, config, live), backends, metrics)
    }

    /// Waits until discovery has published `addrs`.
    async fn wait_for_list(backends: &Backends, addrs: &[SocketAddr]) {
        for _ in 0..500 {
            if backends.snapshot() == addrs {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the list never became {addrs:?}: {:?}", backends.snapshot());
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

    #[tokio::test]
    async fn an_unchanged_or_merely_rewritten_file_is_not_a_reload() {
        let dir = temp_dir("unchanged");
        let (mut reloader, _, metrics) = reloader(&dir).await;
        assert_eq!(reloader.check(), None);
        // Same content, new modification time: checked, not applied.
        rewrite(&dir, &json(A, ""));
        assert_eq!(reloader.check(), None);
        assert!(!metrics.encode().contains("config_reloads_total{"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_valid_change_applies_the_static_backends_and_the_new_config() {
        let dir = temp_dir("valid");
        let (mut reloader, backends, metrics) = reloader(&dir).await;
        rewrite(&dir, &json(B, r#", "algorithm": "least_request""#));
        assert_eq!(reloader.check(), Some(ReloadResult::Success));
        wait_for_list(&backends, &[addr(B)]).await;
        assert_eq!(
            reloader.config().balancing.algorithm,
            crate::config::Algorithm::LeastRequest
        );
        assert!(counted_once(&metrics, "success"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_invalid_file_is_rejected_once_and_changes_nothing() {
        let dir = temp_dir("invalid");
        let (mut reloader, backends, metrics) = reloader(&dir).await;
        rewrite(&dir, &json(B, r#", "retries": {"attempts": 0}"#));
        assert_eq!(reloader.check(), Some(ReloadResult::Failure));
        // Reported once, not at every poll while the file stays bad.
        assert_eq!(reloader.check(), None);
        assert_eq!(backends.snapshot(), vec![addr(A)]);
        assert_eq!(reloader.config().discovery.static_backends, vec![addr(A)]);
        assert!(counted_once(&metrics, "failure"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
