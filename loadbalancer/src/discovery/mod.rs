//! Discovery: keeps the shared [`Backends`] list current.
//!
//! Discovery is the only writer of the list; the balancer only reads it. Each
//! source publishes a complete new list in one [`Backends::replace`] and calls
//! [`Backends::mark_synced`] once it has delivered its first complete list, which
//! is when `/readyz` may turn true. A static source (local runs, tests) publishes
//! once and is done; the Kubernetes source watches EndpointSlices for as long as
//! the process runs.

use std::net::SocketAddr;

use tracing::info;

use crate::backends::Backends;

/// Where backend addresses come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A fixed list, from `staticBackends` or the `--backends` flag.
    Static(Vec<SocketAddr>),
    /// The ready endpoints of a Kubernetes Service.
    Kubernetes(KubernetesSource),
}

/// Which Service's endpoints to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSource {
    /// The pod's own namespace (Downward API `NAMESPACE`); `None` falls back to
    /// the kubeconfig's namespace, then `default`.
    pub namespace: Option<String>,
    /// The Service whose EndpointSlices are watched.
    pub service_name: String,
    /// The backend port that traffic goes to.
    pub port: u16,
}

/// Runs discovery for `source`, publishing into `backends`.
///
/// Static discovery returns as soon as the list is published; Kubernetes
/// discovery runs until the process ends and returns only on a fatal error.
pub async fn run(source: Source, backends: Backends) -> anyhow::Result<()> {
    match source {
        Source::Static(addrs) => {
            info!(backends = ?addrs, "static discovery: backends published");
            backends.replace(addrs);
            backends.mark_synced();
            Ok(())
        }
        Source::Kubernetes(_) => anyhow::bail!("kubernetes discovery not built yet"),
    }
}
