//! Topology-aware routing: kube-proxy's rules for which endpoints to prefer,
//! read from EndpointSlice hints and the Service.
//!
//! The EndpointSlice controller writes `hints.forZones` (and, for
//! `PreferSameNode`, `hints.forNodes`) on each endpoint when the Service asks
//! for it: `spec.trafficDistribution` `PreferClose` / `PreferSameZone` /
//! `PreferSameNode`, or the annotation `service.kubernetes.io/topology-mode`
//! (`Auto`; older clusters: `service.kubernetes.io/topology-aware-hints`).
//! kube-proxy (`topologyModeFromHints` in `pkg/proxy/topology.go`) then
//! decides per Service, looking at the *ready* endpoints only:
//!
//! * if every ready endpoint has a node hint and one is hinted for this node,
//!   prefer the endpoints hinted for this node;
//! * else, if every ready endpoint has a zone hint and one is hinted for this
//!   zone, prefer the endpoints hinted for this zone;
//! * else use them all: a single endpoint without hints (the controller is
//!   mid-update, or gave up because a zone has too few endpoints) or a zone
//!   nobody is hinted for turns topology off for the whole Service, rather
//!   than overload the few endpoints that are hinted.
//!
//! Here, as in older kube-proxy (`canUseTopology`), the hints count only when
//! the Service asks for them; when the Service cannot be read (no RBAC for
//! it), the hints alone decide, as kube-proxy does today. Where kube-proxy
//! programs only the preferred endpoints, the load balancer keeps the wider
//! sets behind them: `PreferSameNode` prefers this node's endpoints, then this
//! zone's (when zone hints apply), then all, and a preferred set whose every
//! endpoint is unhealthy or ejected widens instead of failing (see
//! [`crate::balancer::pick_nearest_for_attempt`]).
//!
//! [`HintIndex`] keeps what that decision needs as counts, changed one slice
//! at a time like [`super::endpoints::MergedEndpoints`]: the ready endpoints
//! without zone (node) hints, and per address the slices that hint it for this
//! replica's zone (node). A slice's change costs in proportion to the slice;
//! only a new locality (start-up, a reload) recounts everything.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::Endpoint;

use super::endpoints::{SliceEndpoints, count};
use crate::backends::SetChange;
use crate::topology::{InUse, Locality, Place, Proximity, TopologyStatus};

/// The annotation that turns on topology-aware hints, from Kubernetes 1.27.
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";

/// The annotation that did before 1.27, still honoured.
pub const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";

/// Where one ready endpoint runs and what its hints say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Placement {
    /// `zone`.
    pub(crate) zone: Option<String>,
    /// `nodeName`.
    pub(crate) node: Option<String>,
    /// `hints.forZones[].name`; empty means no zone hint.
    pub(crate) for_zones: Vec<String>,
    /// `hints.forNodes[].name`; empty means no node hint.
    pub(crate) for_nodes: Vec<String>,
}

impl Placement {
    /// Reads `endpoint`'s placement and hints.
    pub(crate) fn of(endpoint: &Endpoint) -> Self {
        let hints = endpoint.hints.as_ref();
        Self {
            zone: endpoint.zone.clone(),
            node: endpoint.node_name.clone(),
            for_zones: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|zones| zones.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
            for_nodes: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|nodes| nodes.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
        }
    }

    /// Where this is, and how close to `here`.
    pub(crate) fn place(&self, here: Option<&Locality>) -> Arc<Place> {
        Arc::new(Place {
            zone: self.zone.clone(),
            node: self.node.clone(),
            proximity: Proximity::of(here, self.zone.as_deref(), self.node.as_deref()),
        })
    }
}

/// What the Service asks of the routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Distribution {
    /// The Service has not been read (yet, or not allowed): the hints alone
    /// decide, as in kube-proxy today, which trusts the controller to write
    /// them only when asked.
    #[default]
    Unknown,
    /// No Service of that name, or it asks for nothing: no topology.
    Default,
    /// Prefer this zone; the value is how the Service said so.
    Zone(String),
    /// `PreferSameNode`: this node, then this zone.
    Node,
}

impl Distribution {
    /// What `service` asks for: `spec.trafficDistribution` if it names a mode
    /// this load balancer knows, else either topology annotation with any
    /// value but empty or `disabled` (the rule of kube-proxy's
    /// `canUseTopology`).
    pub fn of(service: &Service) -> Self {
        let traffic = service
            .spec
            .as_ref()
            .and_then(|spec| spec.traffic_distribution.as_deref());
        match traffic {
            Some("PreferSameNode") => return Distribution::Node,
            Some(mode @ ("PreferClose" | "PreferSameZone")) => {
                return Distribution::Zone(mode.to_owned());
            }
            _ => {}
        }
        let annotations = service.metadata.annotations.as_ref();
        [TOPOLOGY_MODE_ANNOTATION, TOPOLOGY_HINTS_ANNOTATION]
            .into_iter()
            .find_map(|name| {
                let value = annotations?.get(name)?;
                (!matches!(value.as_str(), "" | "disabled" | "Disabled"))
                    .then(|| Distribution::Zone(format!("{name}={value}")))
            })
            .unwrap_or(Distribution::Default)
    }

    /// The mode as `/status` shows it.
    fn mode(&self) -> Option<String> {
        match self {
            Distribution::Unknown | Distribution::Default => None,
            Distribution::Zone(mode) => Some(mode.clone()),
            Distribution::Node => Some("PreferSameNode".to_owned()),
        }
    }
}

/// The hint counts of every slice, relative to this replica's locality (see
/// the module docs).
#[derive(Debug, Default)]
pub(crate) struct HintIndex {
    /// This replica's zone and node; `None`: topology is off.
    here: Option<Locality>,
    /// Ready endpoints (one per slice that lists them).
    ready: u32,
    /// Of those, the ones without a zone hint.
    without_zone_hints: u32,
    /// Of those, the ones without a node hint.
    without_node_hints: u32,
    /// Ready addresses hinted for this zone, and by how many slices.
    for_zone: HashMap<SocketAddr, u32>,
    /// Ready addresses hinted for this node, and by how many slices.
    for_node: HashMap<SocketAddr, u32>,
}

/// What one slice adds to the counts of a [`HintIndex`].
#[derive(Debug, Clone, Copy)]
struct Tally {
    ready: u32,
    without_zone_hints: u32,
    without_node_hints: u32,
}

impl Tally {
    fn of(slice: &SliceEndpoints) -> Self {
        let mut tally = Tally {
            ready: 0,
            without_zone_hints: 0,
            without_node_hints: 0,
        };
        for (_, placement) in slice.ready_placements() {
            tally.ready += 1;
            tally.without_zone_hints += u32::from(placement.for_zones.is_empty());
            tally.without_node_hints += u32::from(placement.for_nodes.is_empty());
        }
        tally
    }
}

/// How a slice's change alters the preferred sets.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct HintChange {
    pub(crate) for_zone: SetChange,
    pub(crate) for_node: SetChange,
}

/// What to prefer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) prefer_node: bool,
    pub(crate) prefer_zone: bool,
    pub(crate) status: TopologyStatus,
}

impl HintIndex {
    /// The index of `slices` for a replica at `here`, built from nothing.
    pub(crate) fn of<'a>(
        here: Option<Locality>,
        slices: impl IntoIterator<Item = &'a SliceEndpoints>,
    ) -> Self {
        let mut index = Self {
            here,
            ..Self::default()
        };
        for slice in slices {
            index.replace_slice(None, Some(slice));
        }
        index
    }

    /// This replica's locality, as the index was built for.
    pub(crate) fn here(&self) -> Option<&Locality> {
        self.here.as_ref()
    }

    /// Both preferred sets in full, for a new list or locality.
    pub(crate) fn whole(&self) -> HintChange {
        let set =
            |counts: &HashMap<SocketAddr, u32>| SetChange::Whole(counts.keys().copied().collect());
        HintChange {
            for_zone: set(&self.for_zone),
            for_node: set(&self.for_node),
        }
    }

    /// Replaces what one slice contributes, as
    /// [`MergedEndpoints::replace_slice`](super::endpoints::MergedEndpoints::replace_slice)
    /// does for the list.
    pub(crate) fn replace_slice(
        &mut self,
        old: Option<&SliceEndpoints>,
        new: Option<&SliceEndpoints>,
    ) -> HintChange {
        let nothing = SliceEndpoints::default();
        let (old, new) = (old.unwrap_or(&nothing), new.unwrap_or(&nothing));
        let (before, after) = (Tally::of(old), Tally::of(new));
        for (total, before, after) in [
            (&mut self.ready, before.ready, after.ready),
            (
                &mut self.without_zone_hints,
                before.without_zone_hints,
                after.without_zone_hints,
            ),
            (
                &mut self.without_node_hints,
                before.without_node_hints,
                after.without_node_hints,
            ),
        ] {
            *total = total.saturating_sub(before).saturating_add(after);
        }
        let Some(here) = &self.here else {
            return HintChange::default();
        };
        let hinted =
            |slice: &SliceEndpoints, wanted: Option<&str>, hints: fn(&Placement) -> &[String]| {
                slice
                    .ready_placements()
                    .filter(|(_, p)| wanted.is_some_and(|w| hints(p).iter().any(|h| h == w)))
                    .map(|(addr, _)| addr)
                    .collect::<Vec<_>>()
            };
        let zone = Some(here.zone.as_str());
        let node = here.node.as_deref();
        let (added, removed) = count(
            &mut self.for_zone,
            &hinted(old, zone, |p| &p.for_zones),
            &hinted(new, zone, |p| &p.for_zones),
        );
        let for_zone = SetChange::Delta { added, removed };
        let (added, removed) = count(
            &mut self.for_node,
            &hinted(old, node, |p| &p.for_nodes),
            &hinted(new, node, |p| &p.for_nodes),
        );
        HintChange {
            for_zone,
            for_node: SetChange::Delta { added, removed },
        }
    }

    /// kube-proxy's decision (see the module docs) for a Service that asks
    /// for `asked`.
    pub(crate) fn decide(&self, asked: &Distribution) -> Decision {
        let status = |in_use, reason: Reason| TopologyStatus {
            zone: self.here.as_ref().map(|here| here.zone.clone()),
            node: self.here.as_ref().and_then(|here| here.node.clone()),
            mode: asked.mode(),
            in_use,
            reason: reason.to_string(),
        };
        let all = |reason| Decision {
            prefer_node: false,
            prefer_zone: false,
            status: status(InUse::All, reason),
        };
        let Some(here) = &self.here else {
            return all(Reason::NoLocality);
        };
        if *asked == Distribution::Default {
            return all(Reason::NotAsked);
        }
        if self.ready == 0 {
            return all(Reason::NoReadyEndpoint);
        }
        let node_asked = matches!(asked, Distribution::Node | Distribution::Unknown);
        let prefer_node = node_asked
            && here.node.is_some()
            && self.without_node_hints == 0
            && !self.for_node.is_empty();
        let prefer_zone = self.without_zone_hints == 0 && !self.for_zone.is_empty();
        let (in_use, reason) = match (prefer_node, prefer_zone) {
            (true, _) => (InUse::Node, Reason::Hinted("node", self.for_node.len())),
            (false, true) => (InUse::Zone, Reason::Hinted("zone", self.for_zone.len())),
            (false, false) if self.without_zone_hints > 0 => {
                (InUse::All, Reason::Unhinted(self.without_zone_hints))
            }
            (false, false) => (InUse::All, Reason::NoneForZone),
        };
        Decision {
            prefer_node,
            prefer_zone,
            status: status(in_use, reason),
        }
    }
}

/// Why a [`Decision`] prefers what it does; its text is `/status`'s `reason`.
#[derive(Debug, Clone, Copy)]
enum Reason {
    NoLocality,
    NotAsked,
    NoReadyEndpoint,
    /// Every ready endpoint is hinted; this many for this node or zone.
    Hinted(&'static str, usize),
    /// This many ready endpoints have no zone hint.
    Unhinted(u32),
    NoneForZone,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoLocality => f.write_str(
                "this replica's zone is not known (or topologyAware is false): every backend alike",
            ),
            Reason::NotAsked => f.write_str(
                "the Service asks for no traffic distribution or topology mode: every backend alike",
            ),
            Reason::NoReadyEndpoint => f.write_str("no endpoint is ready"),
            Reason::Hinted(scope, n) => write!(
                f,
                "every ready endpoint has hints; {n} hinted for this {scope}, preferred while any is available"
            ),
            Reason::Unhinted(n) => write!(
                f,
                "{n} ready endpoint(s) have no zone hint: every backend alike, as kube-proxy does"
            ),
            Reason::NoneForZone => f.write_str(
                "no ready endpoint is hinted for this zone: every backend alike, as kube-proxy does",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::api::discovery::v1::{EndpointHints, ForNode, ForZone};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn here() -> Option<Locality> {
        Some(Locality {
            node: Some("node-1".to_owned()),
            zone: "zone-a".to_owned(),
        })
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 80))
    }

    /// A slice of ready endpoints `(n, zone hints, node hints)`.
    fn slice(endpoints: &[(u8, &[&str], &[&str])]) -> SliceEndpoints {
        let mut slice = SliceEndpoints::default();
        for (n, zones, nodes) in endpoints {
            slice.ready.push(addr(*n));
            slice.placements.push(Placement {
                zone: zones.first().map(|z| (*z).to_owned()),
                node: nodes.first().map(|n| (*n).to_owned()),
                for_zones: zones.iter().map(|z| (*z).to_owned()).collect(),
                for_nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            });
        }
        slice
    }

    fn zone() -> Distribution {
        Distribution::Zone("PreferClose".to_owned())
    }

    fn sorted(change: SetChange) -> Vec<SocketAddr> {
        let mut set = match change {
            SetChange::Whole(set) => set,
            SetChange::Delta { added, .. } => added,
        };
        set.sort_unstable();
        set
    }

    #[test]
    fn every_endpoint_hinted_and_some_for_our_zone_prefers_those() {
        let s = slice(&[
            (1, &["zone-a"], &[]),
            (2, &["zone-b"], &[]),
            (3, &["zone-a"], &[]),
        ]);
        let index = HintIndex::of(here(), [&s]);
        let decision = index.decide(&zone());
        assert!(decision.prefer_zone && !decision.prefer_node);
        assert_eq!(decision.status.in_use, InUse::Zone);
        assert_eq!(decision.status.mode.as_deref(), Some("PreferClose"));
        assert_eq!(sorted(index.whole().for_zone), vec![addr(1), addr(3)]);
    }

    #[test]
    fn one_endpoint_without_hints_turns_topology_off() {
        let s = slice(&[(1, &["zone-a"], &[]), (2, &[], &[])]);
        let decision = HintIndex::of(here(), [&s]).decide(&zone());
        assert_eq!(decision.status.in_use, InUse::All);
        assert!(
            decision
                .status
                .reason
                .contains("1 ready endpoint(s) have no zone hint")
        );
    }

    #[test]
    fn no_endpoint_hinted_for_our_zone_uses_all() {
        let s = slice(&[(1, &["zone-b"], &[]), (2, &["zone-c"], &[])]);
        let decision = HintIndex::of(here(), [&s]).decide(&zone());
        assert!(!decision.prefer_zone);
        assert!(
            decision
                .status
                .reason
                .contains("no ready endpoint is hinted for this zone")
        );
    }

    #[test]
    fn prefer_same_node_prefers_the_node_then_the_zone() {
        let s = slice(&[
            (1, &["zone-a"], &["node-1"]),
            (2, &["zone-a"], &["node-2"]),
            (3, &["zone-b"], &["node-3"]),
        ]);
        let index = HintIndex::of(here(), [&s]);
        let decision = index.decide(&Distribution::Node);
        assert!(decision.prefer_node && decision.prefer_zone);
        assert_eq!(decision.status.in_use, InUse::Node);
        assert_eq!(sorted(index.whole().for_node), vec![addr(1)]);
        // Zone hints only: the zone.
        let zone_only = index.decide(&zone());
        assert_eq!(
            (zone_only.prefer_node, zone_only.prefer_zone),
            (false, true)
        );
    }

    #[test]
    fn hints_count_only_when_the_service_asks_or_cannot_be_read() {
        let s = slice(&[(1, &["zone-a"], &[])]);
        let index = HintIndex::of(here(), [&s]);
        assert_eq!(
            index.decide(&Distribution::Default).status.in_use,
            InUse::All
        );
        assert_eq!(
            index.decide(&Distribution::Unknown).status.in_use,
            InUse::Zone
        );
        assert_eq!(
            HintIndex::of(None, [&s]).decide(&zone()).status.in_use,
            InUse::All
        );
    }

    #[test]
    fn a_slice_change_moves_only_its_own_hints() {
        let a = slice(&[(1, &["zone-a"], &[]), (2, &["zone-b"], &[])]);
        let b = slice(&[(3, &["zone-a"], &[])]);
        let mut index = HintIndex::of(here(), [&a, &b]);
        let changed = slice(&[(1, &["zone-b"], &[]), (2, &["zone-a"], &[]), (4, &[], &[])]);
        let change = index.replace_slice(Some(&a), Some(&changed));
        assert_eq!(
            change.for_zone,
            SetChange::Delta {
                added: vec![addr(2)],
                removed: vec![addr(1)]
            }
        );
        assert_eq!(
            index.decide(&zone()).status.in_use,
            InUse::All,
            "4 has no hint"
        );
        index.replace_slice(Some(&changed), Some(&slice(&[(2, &["zone-a"], &[])])));
        assert_eq!(index.decide(&zone()).status.in_use, InUse::Zone);
        index.replace_slice(Some(&b), None);
        assert_eq!(sorted(index.whole().for_zone), vec![addr(2)]);
    }

    fn service(traffic: Option<&str>, annotations: &[(&str, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                traffic_distribution: traffic.map(str::to_owned),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    #[test]
    fn the_service_asks_by_traffic_distribution_or_annotation() {
        assert_eq!(Distribution::of(&service(Some("PreferClose"), &[])), zone());
        assert_eq!(
            Distribution::of(&service(Some("PreferSameNode"), &[])),
            Distribution::Node
        );
        assert_eq!(
            Distribution::of(&service(None, &[(TOPOLOGY_MODE_ANNOTATION, "Auto")])),
            Distribution::Zone("service.kubernetes.io/topology-mode=Auto".to_owned())
        );
        assert_eq!(
            Distribution::of(&service(None, &[(TOPOLOGY_HINTS_ANNOTATION, "auto")])).mode(),
            Some("service.kubernetes.io/topology-aware-hints=auto".to_owned())
        );
        for disabled in ["", "disabled", "Disabled"] {
            let s = service(None, &[(TOPOLOGY_MODE_ANNOTATION, disabled)]);
            assert_eq!(Distribution::of(&s), Distribution::Default, "{disabled:?}");
        }
        assert_eq!(Distribution::of(&service(None, &[])), Distribution::Default);
    }

    #[test]
    fn placement_reads_zone_node_and_both_hints() {
        let endpoint = Endpoint {
            addresses: vec!["10.0.0.1".to_owned()],
            zone: Some("zone-a".to_owned()),
            node_name: Some("node-1".to_owned()),
            hints: Some(EndpointHints {
                for_zones: Some(vec![ForZone {
                    name: "zone-a".to_owned(),
                }]),
                for_nodes: Some(vec![ForNode {
                    name: "node-1".to_owned(),
                }]),
            }),
            ..Endpoint::default()
        };
        let placement = Placement::of(&endpoint);
        assert_eq!(placement.for_zones, vec!["zone-a"]);
        assert_eq!(placement.for_nodes, vec!["node-1"]);
        assert_eq!(
            placement.place(here().as_ref()).proximity,
            Proximity::SameNode
        );
        assert_eq!(placement.place(None).proximity, Proximity::Other);
    }
}
