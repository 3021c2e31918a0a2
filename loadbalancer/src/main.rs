//! The load balancer binary: parses flags, loads the config, starts logging,
//! and runs the [`App`] until SIGTERM or Ctrl-C. Everything it wires lives in the
//! library, where it is tested.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use loadbalancer::app::{App, Options};
use loadbalancer::config::{self, Config};
use loadbalancer::shutdown::Signals;
use loadbalancer::topology;
use service_kit::logging;

// jemalloc rather than glibc's malloc. An idle client connection is a few
// small, long-lived allocations left among the freed buffers of the requests
// served around it, and glibc's malloc fragments around them: it kept 0.93 KiB
// of RSS per idle connection for 0.65 KiB of heap, jemalloc 0.73 KiB. jemalloc
// also took 5 % less CPU per keep-alive request, and the same per new
// connection (docs/performance.md, Idle clients).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    let config = Config::load(&args.config)?;
    let log = logging::init(config.logging.log_level, config.logging.log_format)?;
    let mut signals = Signals::install().context("installing signal handlers")?;
    let options = Options {
        config_path: Some(args.config),
        flag_backends,
        namespace: std::env::var("NAMESPACE").ok().filter(|ns| !ns.is_empty()),
        log: Some(log),
        node_name: std::env::var(topology::NODE_NAME_VARIABLE)
            .ok()
            .filter(|node| !node.is_empty()),
        ..Options::default()
    };
    let app = App::start(config, options).await?;
    app.run_until(async { signals.recv().await.context("waiting for shutdown signals") })
        .await
}
