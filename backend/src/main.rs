//! The backend binary: reads the config, starts logging, works out the pod identity
//! and serves until SIGTERM or Ctrl-C. Everything with logic in it lives in the
//! library; this file only wires it together.

use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use backend::handlers::App;
use backend::identity::Identity;
use backend::reload::{self, Reloader};
use backend::{config, grpc, server, shutdown};
use clap::Parser;
use futures::FutureExt as _;
use service_kit::logging;

/// Demo backend: answers with its pod identity as JSON.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Path of the JSON config file.
    #[arg(long, env = "CONFIG_PATH", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole context chain on one line, which is what a
            // person reading `kubectl logs` of a crash-looping pod needs.
            eprintln!("backend: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = config::load(&args.config)?;
    let log = logging::init(config.log_level, config.log_format).context("starting logging")?;
    let app = App::new(Identity::from_environment(&config.service_name))
        .with_shutdown_delay(config.shutdown_delay)
        .with_response_delay(config.response_delay);

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        // `[::]`: every IPv4 and IPv6 address, so the pod serves in an
        // IPv6-only or dual-stack cluster too; IPv4 only where IPv6 is absent.
        let listener = server::bind((Ipv6Addr::UNSPECIFIED, config.port).into())
            .with_context(|| format!("listening on port {}", config.port))?;
        let grpc_listener = config
            .grpc_port
            .map(|port| {
                server::bind((Ipv6Addr::UNSPECIFIED, port).into())
                    .with_context(|| format!("listening on grpcPort {port}"))
            })
            .transpose()?;
        let limits = config.limits;
        let reloader =
            tokio::spawn(Reloader::new(args.config, config, log).run(reload::POLL_INTERVAL));
        // One signal starts both listeners' shutdown; they share the app, so its
        // readiness and its delay are the pod's.
        let shutdown = shutdown::signal().shared();
        let http = server::serve_with(listener, app.clone(), shutdown.clone(), limits);
        let grpc = async {
            match grpc_listener {
                Some(listener) => {
                    grpc::serve_with(listener, app, shutdown, limits.shutdown_timeout).await
                }
                None => Ok(()),
            }
        };
        let (http, grpc) = tokio::join!(http, grpc);
        reloader.abort();
        http.context("serving HTTP")?;
        grpc.context("serving gRPC")
    })
}
