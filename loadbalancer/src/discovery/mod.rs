//! Discovery: where the backend addresses come from.
//!
//! Discovery is the first stage after config in the request path: it fills the
//! shared [`Backends`](crate::backends::Backends) list that the balancer reads on every request. It runs as one
//! long-lived task and is the only writer of that list.
//!
//! There are two sources. [`Source::Static`] publishes a fixed list once, for local
//! runs and tests without a cluster. [`Source::Kubernetes`] watches the
//! `discovery.k8s.io/v1` EndpointSlices of one Service and republishes the list of
//! ready endpoints after every change (see [`kubernetes`]). Either way the list is
//! marked synced once the first complete list is in, which is what `/readyz` waits for.
//!
//! [`DiscoveryTask`] runs that task so a config reload can point it elsewhere: a
//! new `backendServiceName`, `backendPort` or static list starts over from the new
//! source, and the old list keeps serving until the new source's first complete
//! list replaces it.

mod endpoints;
pub mod hints;
pub mod kubernetes;

use std::fmt;
use std::net::SocketAddr;

use anyhow::Context;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use crate::backends::SourceKind;
use crate::backends::{BackendProtocol, BackendsWriter};
use crate::topology::{Locality, NodeClient};

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
    /// The backends' gRPC port, if the load balancer serves gRPC: only its
    /// `appProtocol` is read.
    pub grpc_port: Option<u16>,
}

/// The discovery keys of the config file: where backend addresses come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryConfig {
    /// Name of the Kubernetes Service whose ready endpoints receive the traffic.
    pub backend_service_name: String,
    /// Port on the backend pods that requests are sent to.
    pub backend_port: u16,
    /// Where backend addresses come from. Default `kubernetes`.
    #[serde(default)]
    pub discovery: DiscoveryMode,
    /// The backends for `static` discovery, as `IP:port` strings. Default empty;
    /// required when `discovery` is `static`.
    #[serde(
        default,
        deserialize_with = "deserialize_addrs",
        serialize_with = "serialize_addrs"
    )]
    pub static_backends: Vec<SocketAddr>,
    /// What `backendPort` speaks: `http1` or `h2c`. Absent: what the
    /// EndpointSlice port's `appProtocol` says, else `http1`. Set it for static
    /// discovery, or to override the Service.
    #[serde(default)]
    pub backend_protocol: Option<BackendProtocol>,
    /// The port on the backend pods that gRPC calls to `grpcPort` go to
    /// (HTTP/2: `h2c` unless its `appProtocol` says otherwise). Default: the
    /// same number as `grpcPort`.
    #[serde(default)]
    pub backend_grpc_port: Option<u16>,
}

/// Where backend addresses come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// Watch the EndpointSlices of `backendServiceName`.
    #[default]
    Kubernetes,
    /// Use `staticBackends` (or the `--backends` flag): local runs and tests.
    Static,
}

impl fmt::Display for DiscoveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiscoveryMode::Kubernetes => "kubernetes",
            DiscoveryMode::Static => "static",
        })
    }
}

impl DiscoveryConfig {
    /// Checks the rules that types alone cannot express; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let fail = |field, reason: &str| Err((field, reason.to_owned()));
        if self.backend_service_name.trim().is_empty() {
            return fail("backendServiceName", "must not be empty");
        }
        if self.backend_port == 0 {
            return fail("backendPort", "must be between 1 and 65535");
        }
        if self.backend_grpc_port == Some(0) {
            return fail("backendGrpcPort", "must be between 1 and 65535");
        }
        if self.discovery == DiscoveryMode::Static && self.static_backends.is_empty() {
            return fail(
                "staticBackends",
                "must list at least one address when discovery is \"static\"",
            );
        }
        Ok(())
    }

    /// What discovery should watch. `namespace` is the pod's own (the Downward
    /// API's `NAMESPACE`), if known.
    pub fn source(&self, namespace: Option<String>) -> Source {
        match self.discovery {
            DiscoveryMode::Static => Source::Static(self.static_backends.clone()),
            DiscoveryMode::Kubernetes => Source::Kubernetes(KubernetesSource {
                namespace,
                service_name: self.backend_service_name.clone(),
                port: self.backend_port,
                grpc_port: self.backend_grpc_port,
            }),
        }
    }
}

/// A backend address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("no backend addresses given")]
    Empty,
    #[error("{0:?} is not a backend address (expected IP:port, e.g. 127.0.0.1:8081)")]
    Invalid(String),
}

/// Parses one backend address. Host names are not resolved: endpoints in
/// Kubernetes are IPs, and a name that resolves differently over time would make
/// "static" a lie.
pub fn parse_backend_addr(text: &str) -> Result<SocketAddr, AddrError> {
    let text = text.trim();
    text.parse()
        .map_err(|_| AddrError::Invalid(text.to_owned()))
}

/// Parses the `--backends` flag: comma-separated `IP:port` addresses.
pub fn parse_backend_list(list: &str) -> Result<Vec<SocketAddr>, AddrError> {
    let addrs = list
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(parse_backend_addr)
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(AddrError::Empty);
    }
    Ok(addrs)
}

fn deserialize_addrs<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<SocketAddr>, D::Error> {
    Vec::<String>::deserialize(de)?
        .iter()
        .map(|text| parse_backend_addr(text).map_err(serde::de::Error::custom))
        .collect()
}

fn serialize_addrs<S: Serializer>(addrs: &[SocketAddr], ser: S) -> Result<S::Ok, S::Error> {
    ser.collect_seq(addrs.iter().map(ToString::to_string))
}

/// What Kubernetes discovery needs besides its [`Source`].
#[derive(Debug, Clone)]
pub struct Cluster {
    /// This replica's zone and node, followed for topology-aware routing
    /// ([`hints`]); a closed channel leaves topology off.
    pub locality: watch::Receiver<Option<Locality>>,
    /// The API client; `None` builds one with [`kube::Client::try_default`].
    /// Tests hand in one for their fake API server.
    pub client: Option<NodeClient>,
}

impl Default for Cluster {
    /// No locality, and the client from the environment.
    fn default() -> Self {
        Self {
            locality: watch::channel(None).1,
            client: None,
        }
    }
}

/// Fills the list behind `backends` from `source`.
///
/// Static: publishes the list, marks it synced and returns `Ok` at once.
/// Kubernetes: builds a client with [`kube::Client::try_default`] (the kubeconfig from
/// `KUBECONFIG` or `~/.kube/config` if there is one, else the in-cluster service
/// account), then watches forever; it only returns if the watch stream ends, which
/// the watcher's retry-forever backoff should never let happen.
///
/// `cluster` is what Kubernetes discovery needs besides its source.
pub async fn run(
    source: Source,
    backends: &BackendsWriter,
    cluster: Cluster,
) -> anyhow::Result<()> {
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
            let client = match cluster.client {
                Some(NodeClient(client)) => client,
                None => kube::Client::try_default().await.map_err(|error| {
                    anyhow::anyhow!(
                        "no Kubernetes client configuration (neither a kubeconfig from \
                         KUBECONFIG or ~/.kube/config nor an in-cluster service account): {error}"
                    )
                })?,
            };
            kubernetes::watch_endpoint_slices(client, &source, backends, cluster.locality)
                .await
                .with_context(|| format!("discovery of Service {:?}", source.service_name))
        }
    }
}

/// Discovery running as a task that a reload can point at a new source.
///
/// The task owns the [`BackendsWriter`] for its whole life, so there is never a
/// second writer, not even for a moment while the source changes: a new source
/// arrives through a channel, and the task drops the old watch before it starts
/// the new one. The list in force stays until the new source publishes its first
/// complete list. Dropping the handle stops discovery.
#[derive(Debug)]
pub struct DiscoveryTask {
    /// Where a new source is sent.
    sources: watch::Sender<Source>,
    /// The running discovery.
    task: JoinHandle<()>,
}

impl DiscoveryTask {
    /// Starts discovery from `source`, writing through `backends`, in
    /// `cluster`; the receiver gets the error of any source that fails (the
    /// process cannot serve without its backend list, so the caller ends it).
    pub fn spawn(
        source: Source,
        backends: BackendsWriter,
        cluster: Cluster,
    ) -> (Self, mpsc::UnboundedReceiver<anyhow::Error>) {
        let (failures, failed) = mpsc::unbounded_channel();
        let (sources, current) = watch::channel(source);
        let task = tokio::spawn(follow(current, backends, cluster, failures));
        (Self { sources, task }, failed)
    }

    /// Switches to `source`, unless it is the one in force.
    pub fn set_source(&self, source: Source) {
        self.sources.send_if_modified(|current| {
            let changed = *current != source;
            *current = source;
            changed
        });
    }
}

impl Drop for DiscoveryTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs discovery from the current source, and starts over whenever the source
/// changes. Ends when the [`DiscoveryTask`] is dropped.
async fn follow(
    mut sources: watch::Receiver<Source>,
    backends: BackendsWriter,
    cluster: Cluster,
    failures: mpsc::UnboundedSender<anyhow::Error>,
) {
    loop {
        let source = sources.borrow_and_update().clone();
        tokio::select! {
            outcome = run(source, &backends, cluster.clone()) => {
                if let Err(error) = outcome {
                    // Nobody listening means the process is already stopping.
                    let _ = failures.send(error);
                }
                // A static list is published; wait for the next source.
                if sources.changed().await.is_err() {
                    return;
                }
            }
            changed = sources.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_source_publishes_its_list_and_marks_it_synced() {
        let backends = BackendsWriter::new();
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:9002".parse().expect("literal address parses"),
            "127.0.0.1:9001".parse().expect("literal address parses"),
        ];
        run(Source::Static(addrs.clone()), &backends, Cluster::default())
            .await
            .expect("a static source cannot fail");
        assert!(backends.is_synced());
        assert_eq!(backends.snapshot(), vec![addrs[1], addrs[0]]);
    }
}
