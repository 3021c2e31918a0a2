//! Discovery: where the backend addresses come from.
//!
//! Discovery is the first stage after config in the request path: it fills the
//! shared [`Backends`] list that the balancer reads on every request. It runs as one
//! long-lived task and is the only writer of that list.
//!
//! There are two sources. [`Source::Static`] publishes a fixed list once, for local
//! runs and tests without a cluster. [`Source::Kubernetes`] watches the
//! `discovery.k8s.io/v1` EndpointSlices of one Service and republishes the list of
//! ready endpoints after every change (see [`kubernetes`]). Either way the list is
//! marked synced once the first complete list is in, which is what `/readyz` waits for.
//!
//! [`DiscoveryTask`] runs that task so a config reload can replace it: a new
//! `backendServiceName` or `backendPort` starts a new watch, and the old list keeps
//! serving until the new watch's first complete list replaces it.

mod endpoints;
pub mod kubernetes;
mod status;

use std::net::SocketAddr;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backends::Backends;
pub use status::{DiscoveryError, DiscoveryStatus, SourceKind};

/// Where the load balancer learns its backend addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A fixed list (from config or a flag): no cluster needed.
    Static(Vec<SocketAddr>),
    /// The ready endpoints of a Kubernetes Service, kept current by a watch.
    Kubernetes(KubernetesSource),
}

impl Source {
    /// Which kind of source this is, for the admin endpoints.
    pub fn kind(&self) -> SourceKind {
        match self {
            Source::Static(_) => SourceKind::Static,
            Source::Kubernetes(_) => SourceKind::Kubernetes,
        }
    }
}

/// The Service whose EndpointSlices name the backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSource {
    /// The namespace to watch. `None` means the client's default: the kubeconfig
    /// context's namespace, or the pod's own namespace in-cluster, else `default`.
    /// main passes the `NAMESPACE` env var (Downward API) here when it is set.
    pub namespace: Option<String>,
    /// The Service name; EndpointSlices carry it in the
    /// `kubernetes.io/service-name` label, which is what the watch selects on.
    pub service_name: String,
    /// The port the backends listen on. Every published address uses it; see
    /// [`endpoints`] for how the slices' own port lists are checked against it.
    pub port: u16,
}

/// Fills `backends` from `source`.
///
/// Static: publishes the list, marks it synced and returns `Ok` at once.
/// Kubernetes: builds a client with [`kube::Client::try_default`] (the kubeconfig from
/// `KUBECONFIG` or `~/.kube/config` if there is one, else the in-cluster service
/// account), then watches forever; it only returns if the watch stream ends, which
/// the watcher's retry-forever backoff should never let happen.
pub async fn run(source: Source, backends: Backends) -> anyhow::Result<()> {
    backends.discovery_status().set_source(source.kind());
    match source {
        Source::Static(addrs) => {
            tracing::info!(backends = ?addrs, "using a static backend list");
            backends.replace(addrs);
            backends.mark_synced();
            Ok(())
        }
        Source::Kubernetes(source) => {
            // kube's config error already spells out every cause in its own message
            // (in-cluster: ..., kubeconfig: ...); keeping it as the source as well would
            // make `{:#}` print the whole chain two more times.
            let client = kube::Client::try_default().await.map_err(|error| {
                anyhow::anyhow!(
                    "no Kubernetes client configuration (neither a kubeconfig from \
                     KUBECONFIG or ~/.kube/config nor an in-cluster service account): {error}"
                )
            })?;
            kubernetes::watch_endpoint_slices(client, &source, backends)
                .await
                .with_context(|| format!("discovery of Service {:?}", source.service_name))
        }
    }
}

/// Discovery running as a task, restartable with a new source.
///
/// Dropping it stops discovery, so it ends with the reloader that owns it.
#[derive(Debug)]
pub struct DiscoveryTask {
    /// The list every discovery task writes, handed to each new one.
    backends: Backends,
    /// The namespace a source built from a new config watches (main's `NAMESPACE`).
    pub namespace: Option<String>,
    /// Where a task that fails sends its error, so main can end the process as it
    /// did before discovery became restartable.
    failures: mpsc::UnboundedSender<anyhow::Error>,
    /// The running discovery.
    task: JoinHandle<()>,
}

impl DiscoveryTask {
    /// Starts discovery from `source`; the receiver gets the error of any discovery
    /// task (this one or a restarted one) that fails.
    pub fn spawn(
        source: Source,
        namespace: Option<String>,
        backends: Backends,
    ) -> (Self, mpsc::UnboundedReceiver<anyhow::Error>) {
        let (failures, failed) = mpsc::unbounded_channel();
        let task = Self::start(source, backends.clone(), failures.clone());
        let discovery = Self {
            backends,
            namespace,
            failures,
            task,
        };
        (discovery, failed)
    }

    /// Replaces the running discovery with one from `source`. The list in force
    /// stays until the new source publishes its first complete list.
    pub fn restart(&mut self, source: Source) {
        self.task.abort();
        self.task = Self::start(source, self.backends.clone(), self.failures.clone());
    }

    fn start(
        source: Source,
        backends: Backends,
        failures: mpsc::UnboundedSender<anyhow::Error>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            if let Err(error) = run(source, backends).await {
                // Nobody listening means the process is already stopping.
                let _ = failures.send(error);
            }
        })
    }
}

impl Drop for DiscoveryTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_source_publishes_its_list_and_marks_it_synced() {
        let backends = Backends::default();
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:9002".parse().expect("literal address parses"),
            "127.0.0.1:9001".parse().expect("literal address parses"),
        ];
        run(Source::Static(addrs.clone()), backends.clone())
            .await
            .expect("a static source cannot fail");
        assert!(backends.is_synced());
        assert_eq!(backends.snapshot(), vec![addrs[1], addrs[0]]);
    }
}
