//! The load balancer binary: parses flags, loads the config, starts logging,
//! builds the parts and serves until SIGTERM or Ctrl-C. Everything it wires
//! lives in the library, where it is tested.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use loadbalancer::admin::{self, Admin};
use loadbalancer::backends::Backends;
use loadbalancer::balancer;
use loadbalancer::config::{self, Config};
use loadbalancer::health::HealthCheckSettings;
use loadbalancer::metrics::Metrics;
use loadbalancer::proxy::{Proxy, ProxySettings, Resilience};
use loadbalancer::reload::{self, HealthTask, Live, Reloader};
use loadbalancer::server::ServerLimits;
use loadbalancer::shutdown::{Shutdown, Signals};
use loadbalancer::{discovery, logging, server};
use tokio::net::TcpListener;
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

#[tokio::main]
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
    let proxy = Proxy::with_resilience(
        backends.clone(),
        balancer::from_config(config.algorithm, &config.weights),
        ProxySettings::from(&config),
        Resilience::from(&config),
        Arc::clone(&metrics),
    );
    let live = Live {
        proxy: proxy.clone(),
        backends: backends.clone(),
        log: Some(log),
        metrics: Arc::clone(&metrics),
    };
    let proxy_listener = bind(config.port).await.context("binding the proxy port")?;
    let admin_listener = bind(config.admin_port)
        .await
        .context("binding the admin port")?;
    info!(
        proxy = %proxy_listener.local_addr()?,
        admin = %admin_listener.local_addr()?,
        discovery = %config.discovery,
        algorithm = %config.algorithm,
        "listening"
    );

    let proxy_task = tokio::spawn(server::serve_proxy(
        proxy_listener,
        proxy,
        shutdown.clone(),
        ServerLimits::from(&config),
    ));
    let admin = Admin::new(backends.clone(), shutdown.clone(), metrics);
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, shutdown.clone()));
    let health = HealthTask::spawn(
        backends.clone(),
        HealthCheckSettings::from(&config.health_check),
    );
    let reloader =
        Reloader::new(args.config, flag_backends, config.clone(), live).with_health(health);
    let reload_task = tokio::spawn(reloader.run(reload::POLL_INTERVAL));
    let namespace = std::env::var("NAMESPACE").ok().filter(|ns| !ns.is_empty());
    let discovery = discovery::run(config.discovery_source(namespace), backends);

    let outcome = tokio::select! {
        received = signals.recv() => received.context("waiting for shutdown signals"),
        failed = until_failure(discovery) => failed.context("discovery failed"),
    };
    shutdown.drain_then_stop(config.drain()).await;
    // The reloader owns the health checker: aborting it stops both.
    reload_task.abort();
    proxy_task.await.context("proxy server task")?;
    admin_task.await.context("admin server task")?;
    info!("stopped");
    outcome
}

/// Static discovery returns once it has published its list; that is success,
/// so only an error ends the wait.
async fn until_failure(discovery: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    discovery.await?;
    std::future::pending().await
}

async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await
}
