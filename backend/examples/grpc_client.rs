//! A gRPC client for the backend's `identity.v1.Identity` service, straight to a
//! backend's `grpcPort` or through the load balancer: it opens ONE connection,
//! makes `--calls` unary `Get` calls on it, and prints how many each pod answered.
//!
//! ```sh
//! cargo run -p backend --example grpc_client -- --addr http://127.0.0.1:9000 --calls 30
//! ```
//!
//! ```text
//!   backend-1: 10
//!   backend-2: 10
//!   backend-3: 10
//!   total: 30
//! ```
//!
//! All calls share one HTTP/2 connection, so a spread over several pods is the
//! load balancer's doing, per call, and not the client's; straight to a backend
//! there is one line. `--health` first asks `grpc.health.v1.Health` for the
//! server's overall status and prints it. Calls that fail are counted on a
//! `(failed)` line, with the first error on stderr, and make the exit status 1.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use backend::grpc::proto::GetRequest;
use backend::grpc::proto::identity_client::IdentityClient;
use clap::Parser;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Longest wait for the connection to open, and for each call's answer.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(about = "Unary gRPC calls on one connection, counted by the pod that answered")]
struct Args {
    /// Where to connect: a backend's gRPC port or the load balancer, `http://HOST:PORT`
    /// (h2c, no TLS).
    #[arg(long, default_value = "http://127.0.0.1:9000")]
    addr: String,
    /// `Get` calls to make, one after another.
    #[arg(long, default_value_t = 30)]
    calls: u32,
    /// Check `grpc.health.v1.Health` first and print the status; not SERVING makes
    /// the exit status 1.
    #[arg(long)]
    health: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("grpc_client: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Makes the calls and prints the spread; false when something failed.
async fn run(args: Args) -> anyhow::Result<bool> {
    let endpoint = Endpoint::from_shared(args.addr.clone())
        .with_context(|| format!("--addr {} is not a URL", args.addr))?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    // Connected once, here: every call below goes over this one connection.
    let channel: Channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let mut ok = true;

    if args.health {
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest::default())
            .await
            .context("health check")?
            .into_inner()
            .status();
        println!("  health: {}", status.as_str_name());
        ok &= status == ServingStatus::Serving;
    }

    let mut client = IdentityClient::new(channel);
    let mut answered = BTreeMap::<String, u32>::new();
    let mut failed = 0;
    for call in 1..=args.calls {
        let mut request = tonic::Request::new(GetRequest {});
        // Each call can be found in the backend's and the load balancer's logs.
        let id = format!("grpc-client-{call}");
        request
            .metadata_mut()
            .insert("x-request-id", id.parse().context("a request id is ASCII")?);
        match client.get(request).await {
            Ok(reply) => *answered.entry(reply.into_inner().pod_name).or_default() += 1,
            Err(status) => {
                if failed == 0 {
                    eprintln!("grpc_client: call {call} failed: {status}");
                }
                failed += 1;
            }
        }
    }
    for (pod, count) in &answered {
        println!("  {pod}: {count}");
    }
    if failed > 0 {
        println!("  (failed): {failed}");
        ok = false;
    }
    println!("  total: {}", args.calls);
    Ok(ok)
}
