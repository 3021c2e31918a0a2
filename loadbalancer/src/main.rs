//! The load balancer binary: parses flags, loads the config, starts logging,
//! builds the parts and serves until SIGTERM or Ctrl-C. Everything it wires
//! lives in the library, where it is tested.

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use loadbalancer::admin::{self, Admin};
use loadbalancer::backends::Backends;
use loadbalancer::balancer;
use loadbalancer::config::{self, Config};
use loadbalancer::discovery::DiscoveryTask;
use loadbalancer::health::HealthCheckSettings;
use loadbalancer::metrics::Metrics;
use loadbalancer::proxy::{Proxy, ProxySettings, Resilience};
use loadbalancer::reload::{self, HealthTask, Live, Reloader};
use loadbalancer::server::{self, ServerLimits};
use loadbalancer::shutdown::{Shutdown, Signals};
use loadbalancer::workers::{self, Workers};
use service_kit::logging;
use tracing::info;

/// Kubernetes-aware HTTP load balancer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Path of the JSON config file.
    #[arg(long, env = "CONFIG_PATH", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Balance over these backends (comma-separated IP:port) instead of
    /// discovering them: selects static discovery.
    #[arg(long, value_name = "IP:PORT,...")]
    backends: Option<String>,
}

// The proxy runs on its own worker threads (see `workers`); this runtime only
// carries discovery, the admin endpoints and signal handling, so one thread is plenty.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the context chain on one line: one clear line.
            eprintln!("loadbalancer: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let flag_backends = args
        .backends
        .as_deref()
        .map(config::parse_backend_list)
        .transpose()
        .context("--backends")?;
    let mut config = Config::load(&args.config)?;
    if let Some(addrs) = flag_backends.clone() {
        config = config.with_static_backends(addrs);
    }
    let log = logging::init(config.log_level, config.log_format)?;
    let mut signals = Signals::install().context("installing signal handlers")?;

    let backends = Backends::default();
    let shutdown = Shutdown::new();
    let metrics = Arc::new(Metrics::new(backends.clone()));
    // One balancer for all workers, so the rotation stays exact across them; a
    // reload hands every worker's proxy the same new one.
    let balancer = balancer::from_config(config.algorithm, &config.weights);
    let settings = ProxySettings::from(&config);
    let resilience = Resilience::from(&config);
    let worker_count = workers::default_count();
    let proxies = RefCell::new(Vec::with_capacity(worker_count.get()));
    let proxy_workers = Workers::start(
        worker_count,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.port)),
        || {
            let proxy = Proxy::with_resilience(
                backends.clone(),
                Arc::clone(&balancer),
                settings,
                resilience,
                Arc::clone(&metrics),
            );
            proxies.borrow_mut().push(proxy.clone());
            proxy
        },
        ServerLimits::from(&config),
        &shutdown,
    )
    .await
    .context("binding the proxy port")?;
    let live = Live {
        proxies: proxies.into_inner(),
        backends: backends.clone(),
        log: Some(log),
        metrics: Arc::clone(&metrics),
    };
    let admin_listener = server::bind((Ipv4Addr::UNSPECIFIED, config.admin_port).into())
        .context("binding the admin port")?;
    info!(
        proxy = %proxy_workers.local_addr(),
        workers = worker_count,
        admin = %admin_listener.local_addr()?,
        discovery = %config.discovery,
        algorithm = %config.algorithm,
        "listening"
    );

    let admin = Admin::new(backends.clone(), shutdown.clone(), metrics);
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, shutdown.clone()));
    let health = HealthTask::spawn(
        backends.clone(),
        HealthCheckSettings::from(&config.health_check),
    );
    let namespace = std::env::var("NAMESPACE").ok().filter(|ns| !ns.is_empty());
    let (discovery, mut discovery_failures) = DiscoveryTask::spawn(
        config.discovery_source(namespace.clone()),
        namespace,
        backends,
    );
    let reloader = Reloader::new(args.config, flag_backends, config.clone(), live)
        .with_health(health)
        .with_discovery(discovery);
    let reload_task = tokio::spawn(reloader.run(reload::POLL_INTERVAL));

    let outcome = tokio::select! {
        received = signals.recv() => received.context("waiting for shutdown signals"),
        // Static discovery publishes and ends without a word: only an error arrives.
        Some(error) = discovery_failures.recv() => Err(error.context("discovery failed")),
    };
    shutdown.drain_then_stop(config.drain()).await;
    // The reloader owns the health checker and discovery: aborting it stops all three.
    reload_task.abort();
    proxy_workers.finished().await;
    admin_task.await.context("admin server task")?;
    info!("stopped");
    outcome
}
