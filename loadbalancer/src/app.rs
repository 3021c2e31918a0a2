//! App: the whole load balancer, started and stopped in the right order.
//!
//! [`App::start`] builds every part from a [`Config`] and starts it: the backend
//! list and the discovery that fills it, the metrics, one balancer shared by the
//! proxy workers, the admin listener, the health checker and the reloader that
//! watches the config file. [`App::run_until`] serves until a stop signal (or
//! until discovery fails, since the proxy cannot serve without it) and then
//! shuts down in the order that loses no request:
//!
//! 1. `/readyz` answers 503 and the proxy keeps serving for `drainSeconds`, so
//!    that Kubernetes takes the pod out of every Service before its port closes;
//! 2. the listeners close, and requests in flight finish (by force after
//!    `shutdownTimeoutSeconds`);
//! 3. health checks, discovery and the reloader stop;
//! 4. `run_until` returns once every worker and the admin listener are done.
//!
//! The binary's `main` parses flags, loads the config and calls these two; the
//! integration tests start the same `App` in-process, so what the binary wires is
//! what the tests test.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use service_kit::logging::LogHandle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;

use crate::admin::{self, Admin};
use crate::backends::{Backends, BackendsWriter};
use crate::balancer::Balancer;
use crate::config::{Config, DiscoveryMode};
use crate::discovery::{Cluster, DiscoveryTask};
use crate::health::{HealthCheckSettings, HealthTask};
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxySettings, Resilience, Routing};
use crate::reload::{self, Live, Reloader};
use crate::server::{self, Entry, ServerLimits};
use crate::shutdown::Shutdown;
use crate::tls::Tls;
use crate::topology::{Locality, LocalityLookup, NodeClient};
use crate::workers::{self, Workers};

/// What the app needs besides the config: what the binary learns from its flags
/// and environment, and the few parts a test may supply itself.
#[derive(Debug)]
pub struct Options {
    /// The config file to follow for live reload; `None` runs without reload.
    pub config_path: Option<PathBuf>,
    /// Backends from the `--backends` flag: static discovery over them, at start
    /// and after every reload, whatever the file says.
    pub flag_backends: Option<Vec<SocketAddr>>,
    /// The pod's namespace (the Downward API's `NAMESPACE`), watched for
    /// EndpointSlices; `None` uses the Kubernetes client's default.
    pub namespace: Option<String>,
    /// The installed logger, so a reload can change level and format.
    pub log: Option<LogHandle>,
    /// Proxy worker threads; see [`workers`].
    pub workers: NonZeroUsize,
    /// A list written elsewhere instead of by discovery, which then does not run:
    /// for tests that change the list themselves.
    pub backends: Option<Backends>,
    /// A balancer to use instead of the configured algorithm (tests of balancers).
    pub balancer: Option<Arc<dyn Balancer>>,
    /// Retry and ejection settings to use instead of the configured ones (tests
    /// that want a proxy without either).
    pub resilience: Option<Resilience>,
    /// Whether active health checks run.
    pub health_checks: bool,
    /// The Node this replica runs on (the Downward API's `NODE_NAME`), whose
    /// zone label is this replica's zone unless the config sets `zone`.
    pub node_name: Option<String>,
    /// The Kubernetes API client, for discovery and that Node lookup; `None`
    /// builds one from the environment ([`kube::Client::try_default`]).
    pub kube_client: Option<NodeClient>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config_path: None,
            flag_backends: None,
            namespace: None,
            log: None,
            workers: workers::default_count(),
            backends: None,
            balancer: None,
            resilience: None,
            health_checks: true,
            node_name: None,
            kube_client: None,
        }
    }
}

/// The running load balancer; see the module docs.
#[derive(Debug)]
pub struct App {
    /// How long to drain after a stop signal (`drainSeconds`).
    drain: Duration,
    /// The list every part reads.
    backends: Backends,
    /// Tells the listeners to drain and then stop.
    shutdown: Shutdown,
    /// Shared by the proxies and the admin listener.
    metrics: Arc<Metrics>,
    /// One proxy per worker.
    proxies: Vec<Proxy>,
    /// The proxy's worker threads.
    workers: Workers,
    /// The admin listener's address.
    admin_addr: SocketAddr,
    /// The admin listener's task.
    admin: JoinHandle<()>,
    /// Follows the certificate files for rotation, with `tls`.
    certificate_watch: Option<JoinHandle<()>>,
    /// The reloader, which owns the health checker and discovery: aborting it
    /// stops all three.
    live: JoinHandle<()>,
    /// Errors of a discovery that failed; `None` when discovery does not run.
    discovery_failures: Option<mpsc::UnboundedReceiver<anyhow::Error>>,
    /// This replica's zone and node, once learned.
    locality: LocalityLookup,
}

impl App {
    /// Starts every part; fails, with the reason, if a port cannot be bound.
    pub async fn start(mut config: Config, options: Options) -> anyhow::Result<Self> {
        if let Some(addrs) = &options.flag_backends {
            config = config.with_static_backends(addrs.clone());
        }
        let shutdown = Shutdown::new();
        let (backends, writer) = match options.backends {
            Some(backends) => (backends, None),
            None => {
                let writer = BackendsWriter::new();
                (writer.reader(), Some(writer))
            }
        };
        let metrics = Arc::new(Metrics::new(backends.gauges()));
        // One balancer for all workers, so the rotation stays exact across them; a
        // reload hands every worker's proxy the same new one.
        let balancer = options.balancer.unwrap_or_else(|| config.balancing.build());
        let settings = ProxySettings::from(&config.proxy);
        let resilience = options
            .resilience
            .unwrap_or_else(|| Resilience::from(&config.resilience));
        let ip = config.listen.bind_address;
        // Certificates are read before any port opens: a broken pair stops
        // the process with the file and the reason, before it takes traffic.
        let tls = match &config.tls.tls {
            Some(tls_config) => Some((tls_config, Tls::load(tls_config, Arc::clone(&metrics))?)),
            None => None,
        };
        let plain = workers::listen(SocketAddr::new(ip, config.listen.port))
            .context("binding the proxy port")?;
        let mut sockets = Vec::new();
        match &tls {
            Some((tls_config, tls)) => {
                let https = workers::listen(SocketAddr::new(ip, tls_config.port))
                    .context("binding the HTTPS port")?;
                let https_port = https.local_addr()?.port();
                let entry = if tls_config.redirect_http {
                    Entry::RedirectToHttps(https_port)
                } else {
                    Entry::Http
                };
                sockets.push((plain, entry));
                sockets.push((https, Entry::Https(tls.clone())));
            }
            None => sockets.push((plain, Entry::Http)),
        }
        if let Some(port) = config.listen.grpc_port {
            let grpc =
                workers::listen(SocketAddr::new(ip, port)).context("binding the gRPC port")?;
            sockets.push((grpc, Entry::Grpc));
        }
        let routing = Routing::from(&config.discovery);
        // One policy for all workers: the limits count the process's requests.
        let policy = config.policy.build(&config.concurrency, &config.balancing);
        let mut proxies = Vec::with_capacity(options.workers.get());
        let workers = Workers::start(
            options.workers,
            sockets,
            || {
                let proxy = Proxy::with_resilience(
                    backends.clone(),
                    Arc::clone(&balancer),
                    settings,
                    resilience,
                    Arc::clone(&metrics),
                );
                proxy.set_routing(routing);
                proxy.set_policy(policy.clone());
                proxies.push(proxy.clone());
                proxy
            },
            ServerLimits::from(&config.limits),
            &shutdown,
        )
        .await
        .context("starting the proxy workers")?;
        let (proxy_addr, tls_addr, grpc_addr) = (
            workers.local_addrs()[0],
            https_addr(&workers),
            grpc_addr(&workers),
        );
        let admin_listener = server::bind(SocketAddr::new(
            config.listen.bind_address,
            config.listen.admin_port,
        ))
        .context("binding the admin port")?;
        let admin_addr = admin_listener.local_addr()?;
        info!(
            proxy = %proxy_addr,
            https = tls_addr.map(tracing::field::display),
            grpc = grpc_addr.map(tracing::field::display),
            workers = options.workers,
            admin = %admin_addr,
            discovery = %config.discovery.discovery,
            algorithm = %config.balancing.algorithm,
            "listening"
        );
        let tls = tls.map(|(_, tls)| tls);
        let certificate_watch = tls.as_ref().map(Tls::watch);
        let admin = Admin::new(backends.clone(), shutdown.clone(), Arc::clone(&metrics))
            .with_tls(tls)
            .with_proxies(proxies.clone());
        let admin = tokio::spawn(admin::serve(admin_listener, admin, shutdown.clone()));

        let health = options.health_checks.then(|| {
            HealthTask::spawn(
                backends.clone(),
                HealthCheckSettings::from(&config.health.health_check)
                    .speaking(config.discovery.backend_protocol),
            )
        });
        // Learned in the background: an API call must not hold up serving,
        // and until it answers routing ignores zones, which is always correct.
        // Discovery follows it, for topology-aware routing.
        let locality = LocalityLookup::new(options.node_name, options.kube_client.clone());
        {
            let (lookup, topology) = (locality.clone(), config.topology.clone());
            let kubernetes = config.discovery.discovery == DiscoveryMode::Kubernetes;
            tokio::spawn(async move { lookup.update(&topology, kubernetes).await });
        }
        let (discovery, discovery_failures) = match writer {
            Some(writer) => {
                let source = config.discovery.source(options.namespace.clone());
                let cluster = Cluster {
                    locality: locality.subscribe(),
                    client: options.kube_client,
                };
                let (task, failures) = DiscoveryTask::spawn(source, writer, cluster);
                (Some(task), Some(failures))
            }
            None => (None, None),
        };
        let drain = config.limits.drain();
        let live = Live {
            proxies: proxies.clone(),
            log: options.log,
            metrics: Arc::clone(&metrics),
            health,
            discovery,
            namespace: options.namespace,
            locality: Some(locality.clone()),
        };
        let live = match options.config_path {
            Some(path) => {
                let reloader = Reloader::new(path, options.flag_backends, config, live);
                tokio::spawn(reloader.run(reload::POLL_INTERVAL))
            }
            // Nothing to follow: the task only keeps the live parts running.
            None => tokio::spawn(async move {
                let _live = live;
                std::future::pending::<()>().await;
            }),
        };
        Ok(Self {
            drain,
            backends,
            shutdown,
            metrics,
            proxies,
            workers,
            admin_addr,
            admin,
            certificate_watch,
            live,
            discovery_failures,
            locality,
        })
    }

    /// Serves until `stop` completes (a signal, in the binary) or discovery
    /// fails, then shuts down in order (see the module docs). Returns `stop`'s
    /// result, or discovery's error.
    pub async fn run_until(
        mut self,
        stop: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let discovery_failed = async {
            match &mut self.discovery_failures {
                // Static discovery publishes and ends without a word: only an
                // error arrives.
                Some(failures) => match failures.recv().await {
                    Some(error) => error,
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            stopped = stop => stopped,
            error = discovery_failed => Err(error.context("discovery failed")),
        };
        let drain = self.drain;
        self.stop(drain).await;
        outcome
    }

    /// Drains for `drain`, then stops, and returns when everything has finished.
    pub async fn stop(self, drain: Duration) {
        self.shutdown.drain_then_stop(drain).await;
        self.stopped().await;
    }

    /// Returns when everything has finished, after [`Shutdown::stop`] was called
    /// on [`App::shutdown`]'s handle.
    pub async fn stopped(self) {
        // The reloader owns the health checker and discovery: aborting it stops
        // all three.
        self.live.abort();
        if let Some(watch) = &self.certificate_watch {
            watch.abort();
        }
        self.workers.finished().await;
        // The admin task ends when shutdown stops it; a panic in it is a bug
        // worth seeing in the logs, not a reason to hang the shutdown.
        if let Err(error) = self.admin.await {
            tracing::error!(%error, "admin server task failed");
        }
        info!("stopped");
    }

    /// Where the proxy listens for plain HTTP.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.workers.local_addrs()[0]
    }

    /// Where the proxy listens for HTTPS, with `tls`.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        https_addr(&self.workers)
    }

    /// Where the proxy listens for gRPC clients, with `grpcPort`.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        grpc_addr(&self.workers)
    }

    /// Where the admin endpoints listen.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// A read handle on the backend list.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The metrics every part records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Each worker's proxy, for its counters.
    pub fn proxies(&self) -> &[Proxy] {
        &self.proxies
    }

    /// This replica's zone and node, `None` until learned or when they cannot
    /// be (see [`crate::topology`]): for `/debug/backends` and the routing.
    pub fn locality(&self) -> Option<Locality> {
        self.locality.current()
    }

    /// Follows [`Self::locality`] as start-up and reloads learn it.
    pub fn locality_updates(&self) -> tokio::sync::watch::Receiver<Option<Locality>> {
        self.locality.subscribe()
    }

    /// The shutdown signal the listeners follow.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }
}

/// Where the workers serve HTTPS: [`App::start`] gives them the plain socket
/// first, the HTTPS one, with `tls`, next, and the gRPC one, with `grpcPort`,
/// last.
fn https_addr(workers: &Workers) -> Option<SocketAddr> {
    workers
        .entries()
        .find_map(|(addr, entry)| matches!(entry, Entry::Https(_)).then_some(addr))
}

/// Where the workers serve gRPC clients; see [`https_addr`].
fn grpc_addr(workers: &Workers) -> Option<SocketAddr> {
    workers
        .entries()
        .find_map(|(addr, entry)| matches!(entry, Entry::Grpc).then_some(addr))
}
