//! Topology: where this replica runs, its node and zone, for routing that
//! prefers backends close by (issue #21; the routing itself lives with the
//! balancer).
//!
//! The zone is the config key `zone` when it is set; otherwise it is the
//! `topology.kubernetes.io/zone` label of the replica's own Node, whose name
//! comes from the Downward API (`NODE_NAME`, from `spec.nodeName`), read once
//! through the API at start and again on each reload. That read needs `get` on
//! `nodes`, a ClusterRole of its own (`k8s/loadbalancer-rbac.yaml`). When the
//! zone cannot be learned (no `NODE_NAME`, no client, the API refuses, the
//! label is missing), one `warn` line says why and [`learn`] returns `None`:
//! the replica routes without topology, which is always correct, only not
//! always closest. `topologyAware: false` turns the lookup off altogether.
//!
//! This module sits at the bottom of the layer table: the routing that reads a
//! [`Locality`] lives in the balancer and the backend list, below everything
//! that could learn one.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The well-known label that names a Node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The Downward API variable that names this replica's Node.
pub const NODE_NAME_VARIABLE: &str = "NODE_NAME";

/// Where this replica runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Locality {
    /// The Node's name, when `NODE_NAME` is set (a zone from the config needs
    /// none).
    pub node: Option<String>,
    /// The zone: the config's `zone`, or the Node's [`ZONE_LABEL`].
    pub zone: String,
}

/// The `zone` and `topologyAware` keys.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TopologyConfig {
    /// This replica's zone, instead of its Node's label: for a cluster whose
    /// nodes carry no zone label, or a load balancer outside the cluster.
    /// Default: none, read from the Node.
    pub zone: Option<String>,
    /// Whether routing may prefer backends in this replica's zone (and on its
    /// node); `false` skips the lookup and routes over every backend. Default
    /// `true`.
    pub topology_aware: bool,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            zone: None,
            topology_aware: true,
        }
    }
}

/// This replica's locality, or `None` (with one `warn` line saying why, unless
/// `topologyAware` is off) when it cannot be learned.
///
/// `node` is the Node's name (`NODE_NAME`); `connect` builds the client for
/// the Node lookup, and is only awaited when the zone is not configured.
pub async fn learn<C>(config: &TopologyConfig, node: Option<&str>, connect: C) -> Option<Locality>
where
    C: Future<Output = Result<kube::Client, kube::Error>>,
{
    if !config.topology_aware {
        debug!("topologyAware is off: routing ignores zones");
        return None;
    }
    let node = node.filter(|name| !name.is_empty());
    let locality = match (&config.zone, node) {
        (Some(zone), _) => Ok(Locality {
            node: node.map(str::to_owned),
            zone: zone.clone(),
        }),
        (None, None) => Err(format!(
            "{NODE_NAME_VARIABLE} is not set (the Downward API's spec.nodeName) and the \
             config sets no zone"
        )),
        (None, Some(node)) => node_zone(node, connect).await.map(|zone| Locality {
            node: Some(node.to_owned()),
            zone,
        }),
    };
    match locality {
        Ok(locality) => {
            let from = if config.zone.is_some() {
                "config"
            } else {
                "node label"
            };
            info!(zone = %locality.zone, node = locality.node.as_deref(), from, "learned this replica's zone");
            Some(locality)
        }
        Err(reason) => {
            warn!(%reason, "cannot learn this replica's zone; routing is not topology-aware");
            None
        }
    }
}

/// The [`ZONE_LABEL`] of Node `name`, or why it could not be read.
async fn node_zone<C>(name: &str, connect: C) -> Result<String, String>
where
    C: Future<Output = Result<kube::Client, kube::Error>>,
{
    let client = connect
        .await
        .map_err(|error| format!("no Kubernetes client to read node {name:?}: {error}"))?;
    let node = Api::<Node>::all(client)
        .get(name)
        .await
        .map_err(|error| match &error {
            kube::Error::Api(status) if status.code == 403 => format!(
                "not allowed to get node {name:?}: the service account needs `get` on \
                 `nodes` (k8s/loadbalancer-rbac.yaml): {error}"
            ),
            _ => format!("cannot read node {name:?}: {error}"),
        })?;
    node.metadata
        .labels
        .and_then(|mut labels| labels.remove(ZONE_LABEL))
        .filter(|zone| !zone.is_empty())
        .ok_or_else(|| format!("node {name:?} has no {ZONE_LABEL} label"))
}

/// A kube client (for the Node lookup, and discovery's when one is handed
/// in); kube's own type has no `Debug`, and the structs that hold it want one.
#[derive(Clone)]
pub struct NodeClient(pub kube::Client);

impl fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeClient")
    }
}

/// This replica's locality as last learned, re-learned on each reload; what the
/// routing and `/debug/backends` read. Clones share it.
#[derive(Debug, Clone)]
pub struct LocalityLookup {
    /// `NODE_NAME`.
    node: Option<String>,
    /// The client for the Node lookup; `None` builds one the way discovery
    /// does, [`kube::Client::try_default`].
    client: Option<NodeClient>,
    current: Arc<watch::Sender<Option<Locality>>>,
}

impl LocalityLookup {
    /// A lookup for Node `node` through `client`; nothing is learned until
    /// [`Self::update`].
    pub fn new(node: Option<String>, client: Option<NodeClient>) -> Self {
        Self {
            node,
            client,
            current: Arc::new(watch::Sender::new(None)),
        }
    }

    /// Learns the locality for `config` (see [`learn`]) and keeps it. With
    /// static discovery and no configured zone there is nothing to ask and no
    /// hint to route by, so nothing is looked up and no warning is logged.
    pub async fn update(&self, config: &TopologyConfig, kubernetes: bool) -> Option<Locality> {
        let locality = if kubernetes || config.zone.is_some() {
            let client = self.client.clone();
            let connect = async move {
                match client {
                    Some(NodeClient(client)) => Ok(client),
                    None => kube::Client::try_default().await,
                }
            };
            learn(config, self.node.as_deref(), connect).await
        } else {
            debug!("static discovery and no zone configured: routing ignores zones");
            None
        };
        self.current.send_replace(locality.clone());
        locality
    }

    /// The locality in force.
    pub fn current(&self) -> Option<Locality> {
        self.current.borrow().clone()
    }

    /// Follows the locality as reloads change it.
    pub fn subscribe(&self) -> watch::Receiver<Option<Locality>> {
        self.current.subscribe()
    }
}

/// How close a backend runs to this replica: the `locality` label of
/// `loadbalancer_requests_by_locality_total`, and what `/status` shows beside
/// each backend. Read from the endpoint's own `nodeName` and `zone`, not from
/// its hints: it says where a request went, whatever the routing preferred.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proximity {
    /// On this replica's Node.
    SameNode,
    /// In this replica's zone, on another Node.
    SameZone,
    /// Anywhere else, or not known to be close (no zone learned, or the
    /// endpoint names none).
    #[default]
    Other,
}

impl Proximity {
    /// Every value, in the order of the metric's series.
    pub const ALL: [Proximity; 3] = [Proximity::SameNode, Proximity::SameZone, Proximity::Other];

    /// How close an endpoint on `node` in `zone` is to `here`.
    pub fn of(here: Option<&Locality>, zone: Option<&str>, node: Option<&str>) -> Self {
        let Some(here) = here else {
            return Proximity::Other;
        };
        if node.is_some() && node == here.node.as_deref() {
            Proximity::SameNode
        } else if zone == Some(here.zone.as_str()) {
            Proximity::SameZone
        } else {
            Proximity::Other
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Proximity::SameNode => "same_node",
            Proximity::SameZone => "same_zone",
            Proximity::Other => "other",
        }
    }
}

/// Where one backend runs, as its EndpointSlice says, and how close that is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Place {
    /// The endpoint's `zone`.
    pub zone: Option<String>,
    /// The endpoint's `nodeName`.
    pub node: Option<String>,
    /// How close that is to this replica.
    pub proximity: Proximity,
}

/// Which backends the routing prefers right now (kube-proxy's rules; see
/// `discovery::hints`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InUse {
    /// Those hinted for this replica's Node first, then for its zone (when
    /// zone hints apply too), then all.
    Node,
    /// Those hinted for this replica's zone first, then all.
    Zone,
    /// Every backend alike: topology is off or does not apply.
    #[default]
    All,
}

/// The routing's topology in force, for `/status` and `/debug/backends`
/// (whose keys are snake_case).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopologyStatus {
    /// This replica's zone, once learned.
    pub zone: Option<String>,
    /// This replica's Node, when `NODE_NAME` is set.
    pub node: Option<String>,
    /// What the Service asks for: its `trafficDistribution`, or its
    /// topology annotation as `annotation=value`; `None` when it asks for
    /// nothing or cannot be read.
    pub mode: Option<String>,
    /// Which set is preferred.
    pub in_use: InUse,
    /// Why, in a sentence: the rule that decided.
    pub reason: String,
}

impl Default for TopologyStatus {
    /// Before Kubernetes discovery has published anything, or with a static list.
    fn default() -> Self {
        Self {
            zone: None,
            node: None,
            mode: None,
            in_use: InUse::All,
            reason: "no EndpointSlice read yet (or static discovery): every backend alike"
                .to_owned(),
        }
    }
}
