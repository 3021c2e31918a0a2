//! The Kubernetes rules for turning EndpointSlices into backend addresses.
//!
//! Discovery's watch loop ([`super::kubernetes`]) keeps one [`SliceEndpoints`] per
//! slice and feeds each slice's change into [`MergedEndpoints`], which keeps the
//! list the balancer uses and says how a change alters it. Both are plain code
//! with no I/O, so that each rule below has a unit test of its own:
//!
//! * **Ready**: an endpoint takes traffic when `conditions.ready` is true or absent
//!   (the API says a nil `ready` means true).
//! * **Terminating fallback**: when *no* endpoint of the Service is ready but some are
//!   `serving` (true or absent) and `terminating`, those are used instead, as kube-proxy
//!   does. During a rolling update where every old pod is shutting down and no new one
//!   is ready yet, a pod that still serves is better than a 503 for everyone.
//! * **One address per endpoint**: only `addresses[0]` counts. The API defines no
//!   meaning for the others and kube-proxy ignores them too.
//! * **Address types**: `IPv4` and `IPv6` slices are used; `FQDN` slices are skipped,
//!   because proxying to a name would need a resolver in the request path.
//! * **Port**: every address gets the configured backend port. A slice lists the
//!   target ports of its Service; if it lists some and none is the backend port, the
//!   configured port still wins (it is what the operator asked for, and a Service may
//!   name ports the load balancer does not use) and the mismatch is logged at debug.
//! * **Protocol**: a port's `appProtocol` says what it speaks
//!   ([`BackendProtocol::from_app_protocol`]); the first slice that names one for
//!   the backend port (or the gRPC port) decides, since every slice of a Service
//!   lists the same ports.
//! * **Duplicates**: an address listed by two slices (a pod the controller is
//!   moving between them) is one backend, listed until neither slice has it.
//!
//! **Cost.** A Service may have thousands of endpoints in a hundred slices, and
//! each change of one slice must cost in proportion to that slice, not to the
//! Service. [`MergedEndpoints`] counts, per address, the slices that list it
//! ready (and, apart, serving but terminating); a slice's change compares its
//! old and new endpoints and moves only the counts of those that differ. An
//! address whose count leaves or reaches zero joins or leaves the list, and that
//! difference is all that is published ([`ListChange::Delta`]). Only a switch
//! into or out of the terminating fallback, and a re-list, publish the whole
//! list ([`ListChange::Whole`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};

use super::hints::Placement;
use crate::backends::{BackendProtocol, LearnedProtocols};

/// What one EndpointSlice contributes to the backend list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SliceEndpoints {
    /// Endpoints that should take traffic.
    pub(crate) ready: Vec<SocketAddr>,
    /// Endpoints on their way out that still serve: kept apart because they are used
    /// only when no endpoint of the whole Service is ready.
    pub(crate) serving_terminating: Vec<SocketAddr>,
    /// What the slice's ports say they speak.
    pub(crate) protocols: LearnedProtocols,
    /// Where each ready endpoint runs and what its hints say:
    /// `placements[i]` is `ready[i]`'s.
    pub(crate) placements: Vec<Placement>,
}

impl SliceEndpoints {
    /// The ready endpoints with their placements.
    pub(crate) fn ready_placements(
        &self,
    ) -> impl Iterator<Item = (SocketAddr, &Placement)> + Clone {
        self.ready.iter().copied().zip(&self.placements)
    }
}

/// How a slice's change alters the published list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ListChange {
    /// These addresses join the list, those leave it; the rest stay as they are.
    Delta {
        added: Vec<SocketAddr>,
        removed: Vec<SocketAddr>,
    },
    /// The list is now this one, sorted and without duplicates.
    Whole(Vec<SocketAddr>),
}

/// Every slice's endpoints merged into the list the balancer should use, kept
/// current one slice at a time (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct MergedEndpoints {
    /// How many slices list each address as ready.
    ready: HashMap<SocketAddr, u32>,
    /// How many slices list each address as serving but terminating.
    serving_terminating: HashMap<SocketAddr, u32>,
    /// Whether the list is the serving-terminating endpoints, no endpoint
    /// being ready (with none of those either, the list is empty).
    fallback: bool,
}

impl MergedEndpoints {
    /// The merge of `slices`, built from nothing.
    pub(crate) fn of<'a>(slices: impl IntoIterator<Item = &'a SliceEndpoints>) -> Self {
        let mut merged = Self::default();
        for slice in slices {
            count(&mut merged.ready, &[], &slice.ready);
            count(
                &mut merged.serving_terminating,
                &[],
                &slice.serving_terminating,
            );
        }
        merged.fallback = merged.ready.is_empty();
        merged
    }

    /// Replaces what one slice contributes: `old` (`None`: the slice is new)
    /// becomes `new` (`None`: the slice was deleted). Returns how the list changes.
    pub(crate) fn replace_slice(
        &mut self,
        old: Option<&SliceEndpoints>,
        new: Option<&SliceEndpoints>,
    ) -> ListChange {
        let nothing = SliceEndpoints::default();
        let (old, new) = (old.unwrap_or(&nothing), new.unwrap_or(&nothing));
        let ready = count(&mut self.ready, &old.ready, &new.ready);
        let serving_terminating = count(
            &mut self.serving_terminating,
            &old.serving_terminating,
            &new.serving_terminating,
        );
        let fallback = self.ready.is_empty();
        if fallback != self.fallback {
            self.fallback = fallback;
            return ListChange::Whole(self.addrs());
        }
        let (added, removed) = if fallback { serving_terminating } else { ready };
        ListChange::Delta { added, removed }
    }

    /// The list, sorted.
    pub(crate) fn addrs(&self) -> Vec<SocketAddr> {
        let listed = if self.fallback {
            &self.serving_terminating
        } else {
            &self.ready
        };
        let mut addrs: Vec<SocketAddr> = listed.keys().copied().collect();
        addrs.sort_unstable();
        addrs
    }

    /// True when the list is serving-but-terminating endpoints because none is
    /// ready, so the watch loop can say so in the logs.
    pub(crate) fn terminating_fallback(&self) -> bool {
        self.fallback && !self.serving_terminating.is_empty()
    }
}

/// Moves the slice counts in `counts` from a slice's `old` endpoints to its
/// `new` ones, touching only the addresses in one and not the other. Returns
/// the addresses whose count rose from zero and those whose count fell to it.
pub(crate) fn count(
    counts: &mut HashMap<SocketAddr, u32>,
    old: &[SocketAddr],
    new: &[SocketAddr],
) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let (old, new) = (sorted(old), sorted(new));
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for addr in new.iter().filter(|addr| old.binary_search(addr).is_err()) {
        let slices = counts.entry(*addr).or_insert(0);
        *slices += 1;
        if *slices == 1 {
            added.push(*addr);
        }
    }
    for addr in old.iter().filter(|addr| new.binary_search(addr).is_err()) {
        if let Some(slices) = counts.get_mut(addr) {
            *slices -= 1;
            if *slices == 0 {
                counts.remove(addr);
                removed.push(*addr);
            }
        }
    }
    (added, removed)
}

/// A sorted copy of `addrs` without duplicates (an address listed twice in one
/// slice counts once).
fn sorted(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut addrs = addrs.to_vec();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// How one endpoint's conditions classify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Usability {
    Ready,
    ServingTerminating,
    Unusable,
}

/// Applies the API's defaults: `ready` and `serving` absent mean true, `terminating`
/// absent means false.
fn usability(conditions: Option<&EndpointConditions>) -> Usability {
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if ready {
        Usability::Ready
    } else if serving && terminating {
        Usability::ServingTerminating
    } else {
        Usability::Unusable
    }
}

/// The addresses one slice contributes on `port`, split by readiness.
pub(crate) fn slice_endpoints(slice: &EndpointSlice, port: u16) -> SliceEndpoints {
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        tracing::debug!(slice = name, address_type = %slice.address_type, "skipping slice: not an IP address type");
        return SliceEndpoints::default();
    }
    if !lists_port(slice, port) {
        tracing::debug!(
            slice = name,
            backend_port = port,
            "slice does not list the backend port; using the backend port anyway"
        );
    }

    let mut out = SliceEndpoints::default();
    for endpoint in &slice.endpoints {
        let Some(first) = endpoint.addresses.first() else {
            continue;
        };
        let Ok(ip) = first.parse::<IpAddr>() else {
            tracing::debug!(slice = name, address = %first, "skipping endpoint: address is not an IP");
            continue;
        };
        let addr = SocketAddr::new(ip, port);
        match usability(endpoint.conditions.as_ref()) {
            Usability::Ready => {
                out.ready.push(addr);
                out.placements.push(Placement::of(endpoint));
            }
            Usability::ServingTerminating => out.serving_terminating.push(addr),
            Usability::Unusable => {}
        }
    }
    out
}

/// What the slice's `appProtocol`s say `port` and `grpc_port` speak.
pub(crate) fn slice_protocols(
    slice: &EndpointSlice,
    port: u16,
    grpc_port: Option<u16>,
) -> LearnedProtocols {
    let protocol_of = |wanted: u16| {
        slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.port == Some(i32::from(wanted)))
            .and_then(|p| p.app_protocol.as_deref())
            .and_then(BackendProtocol::from_app_protocol)
    };
    LearnedProtocols {
        backend_port: protocol_of(port),
        grpc_port: grpc_port.and_then(protocol_of),
    }
}

/// Whether the slice has no port list to check, or lists `port` in it.
fn lists_port(slice: &EndpointSlice, port: u16) -> bool {
    match slice.ports.as_deref() {
        None | Some([]) => true,
        Some(ports) => ports.iter().any(|p| p.port == Some(i32::from(port))),
    }
}

/// What the backend ports speak, from the first of `slices` that names it.
pub(crate) fn protocols<'a>(
    slices: impl IntoIterator<Item = &'a SliceEndpoints>,
) -> LearnedProtocols {
    slices
        .into_iter()
        .fold(LearnedProtocols::default(), |known, slice| {
            LearnedProtocols {
                backend_port: known.backend_port.or(slice.protocols.backend_port),
                grpc_port: known.grpc_port.or(slice.protocols.grpc_port),
            }
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address parses")
    }

    fn conditions(
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Option<EndpointConditions> {
        Some(EndpointConditions {
            ready,
            serving,
            terminating,
        })
    }

    fn endpoint(ip: &str, conditions: Option<EndpointConditions>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_owned()],
            conditions,
            ..Endpoint::default()
        }
    }

    fn slice(
        address_type: &str,
        ports: Option<Vec<i32>>,
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-abc".to_owned()),
                ..ObjectMeta::default()
            },
            address_type: address_type.to_owned(),
            endpoints,
            ports: ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|port| EndpointPort {
                        port: Some(port),
                        ..EndpointPort::default()
                    })
                    .collect()
            }),
        }
    }

    fn ipv4(endpoints: Vec<Endpoint>) -> EndpointSlice {
        slice("IPv4", None, endpoints)
    }

    #[test]
    fn absent_conditions_count_as_ready() {
        let s = ipv4(vec![
            endpoint("10.0.0.1", None),
            endpoint("10.0.0.2", conditions(None, None, None)),
        ]);
        assert_eq!(
            slice_endpoints(&s, 8080).ready,
            vec![addr("10.0.0.1:8080"), addr("10.0.0.2:8080")]
        );
    }

    #[test]
    fn not_ready_endpoints_are_left_out() {
        let s = ipv4(vec![
            endpoint("10.0.0.1", conditions(Some(true), None, None)),
            endpoint(
                "10.0.0.2",
                conditions(Some(false), Some(false), Some(false)),
            ),
        ]);
        assert_eq!(
            slice_endpoints(&s, 8080),
            SliceEndpoints {
                ready: vec![addr("10.0.0.1:8080")],
                placements: vec![Placement::default()],
                ..SliceEndpoints::default()
            }
        );
    }

    #[test]
    fn serving_terminating_endpoints_are_kept_apart_from_ready_ones() {
        let s = ipv4(vec![
            endpoint("10.0.0.1", conditions(Some(false), Some(true), Some(true))),
            endpoint("10.0.0.2", conditions(Some(false), None, Some(true))),
            endpoint("10.0.0.3", conditions(Some(false), Some(false), Some(true))),
        ]);
        let endpoints = slice_endpoints(&s, 80);
        assert!(endpoints.ready.is_empty());
        assert_eq!(
            endpoints.serving_terminating,
            vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")]
        );
    }

    #[test]
    fn not_ready_endpoints_that_are_not_terminating_are_never_used() {
        let s = ipv4(vec![endpoint(
            "10.0.0.1",
            conditions(Some(false), Some(true), None),
        )]);
        assert_eq!(slice_endpoints(&s, 80), SliceEndpoints::default());
    }

    #[test]
    fn only_the_first_address_of_an_endpoint_is_used() {
        let mut e = endpoint("10.0.0.1", None);
        e.addresses.push("10.0.0.9".to_owned());
        let s = ipv4(vec![e]);
        assert_eq!(slice_endpoints(&s, 80).ready, vec![addr("10.0.0.1:80")]);
    }

    #[test]
    fn ipv6_slices_give_ipv6_socket_addresses() {
        let s = slice("IPv6", None, vec![endpoint("fd00::1", None)]);
        assert_eq!(
            slice_endpoints(&s, 8080).ready,
            vec![addr("[fd00::1]:8080")]
        );
    }

    #[test]
    fn fqdn_slices_are_skipped() {
        let s = slice("FQDN", None, vec![endpoint("backend.example", None)]);
        assert_eq!(slice_endpoints(&s, 80), SliceEndpoints::default());
    }

    #[test]
    fn unparsable_addresses_are_skipped() {
        let s = ipv4(vec![
            endpoint("not-an-ip", None),
            endpoint("10.0.0.1", None),
        ]);
        assert_eq!(slice_endpoints(&s, 80).ready, vec![addr("10.0.0.1:80")]);
    }

    #[test]
    fn the_configured_port_is_used_whether_or_not_the_slice_lists_it() {
        for ports in [None, Some(vec![]), Some(vec![9090, 8080]), Some(vec![9090])] {
            let s = slice("IPv4", ports.clone(), vec![endpoint("10.0.0.1", None)]);
            assert_eq!(
                slice_endpoints(&s, 8080).ready,
                vec![addr("10.0.0.1:8080")],
                "ports {ports:?}"
            );
        }
    }

    #[test]
    fn a_port_list_without_the_backend_port_is_detected() {
        assert!(lists_port(&ipv4(vec![]), 8080));
        assert!(lists_port(
            &slice("IPv4", Some(vec![9090, 8080]), vec![]),
            8080
        ));
        assert!(!lists_port(&slice("IPv4", Some(vec![9090]), vec![]), 8080));
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| addr(s)).collect()
    }

    /// A slice's endpoints: `ready` ones and `terminating` (serving) ones.
    fn endpoints(ready: &[&str], terminating: &[&str]) -> SliceEndpoints {
        SliceEndpoints {
            ready: addrs(ready),
            serving_terminating: addrs(terminating),
            ..SliceEndpoints::default()
        }
    }

    #[test]
    fn app_protocol_is_read_for_the_backend_and_grpc_ports() {
        let mut s = slice("IPv4", Some(vec![8080, 9000, 9100]), vec![]);
        for (port, app_protocol) in
            s.ports
                .iter_mut()
                .flatten()
                .zip(["http", "kubernetes.io/h2c", "grpc"])
        {
            port.app_protocol = Some(app_protocol.to_owned());
        }
        let protocols = slice_protocols(&s, 8080, Some(9000));
        assert_eq!(protocols.backend_port, Some(BackendProtocol::Http1));
        assert_eq!(protocols.grpc_port, Some(BackendProtocol::H2c));
        assert_eq!(
            slice_protocols(&s, 9100, None).backend_port,
            Some(BackendProtocol::H2c)
        );
        // A port the slice does not list, or lists without appProtocol: unknown.
        assert_eq!(
            slice_protocols(&s, 7000, Some(7001)),
            LearnedProtocols::default()
        );
        // The first slice that names a protocol decides for the Service.
        let named = SliceEndpoints {
            protocols,
            ..endpoints(&["10.0.0.1:8080"], &[])
        };
        let unnamed = endpoints(&["10.0.0.2:8080"], &[]);
        assert_eq!(super::protocols([&unnamed, &named]), protocols);
    }

    #[test]
    fn merge_sorts_and_deduplicates_across_slices() {
        let a = endpoints(&["10.0.0.3:80", "10.0.0.1:80"], &[]);
        let b = endpoints(&["10.0.0.2:80", "10.0.0.1:80"], &[]);
        let merged = MergedEndpoints::of([&a, &b]);
        assert_eq!(
            merged.addrs(),
            addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])
        );
        assert!(!merged.terminating_fallback());
    }

    #[test]
    fn merge_ignores_terminating_endpoints_while_any_endpoint_is_ready() {
        let old = endpoints(&[], &["10.0.0.1:80"]);
        let new = endpoints(&["10.0.0.2:80"], &[]);
        assert_eq!(
            MergedEndpoints::of([&old, &new]).addrs(),
            addrs(&["10.0.0.2:80"])
        );
    }

    #[test]
    fn merge_falls_back_to_serving_terminating_endpoints_when_none_is_ready() {
        let a = endpoints(&[], &["10.0.0.2:80"]);
        let b = endpoints(&[], &["10.0.0.1:80", "10.0.0.2:80"]);
        let merged = MergedEndpoints::of([&a, &b]);
        assert_eq!(merged.addrs(), addrs(&["10.0.0.1:80", "10.0.0.2:80"]));
        assert!(merged.terminating_fallback());
    }

    #[test]
    fn merge_of_nothing_is_an_empty_list() {
        let merged = MergedEndpoints::of(std::iter::empty::<&SliceEndpoints>());
        assert_eq!(merged.addrs(), vec![]);
        assert!(!merged.terminating_fallback());
    }

    fn delta(added: &[&str], removed: &[&str]) -> ListChange {
        ListChange::Delta {
            added: addrs(added),
            removed: addrs(removed),
        }
    }

    #[test]
    fn a_slice_change_publishes_only_its_own_difference() {
        let a = endpoints(&["10.0.0.1:80", "10.0.0.2:80"], &[]);
        let b = endpoints(&["10.0.1.1:80"], &[]);
        let mut merged = MergedEndpoints::of([&a, &b]);
        let changed = endpoints(&["10.0.0.2:80", "10.0.0.3:80"], &[]);
        assert_eq!(
            merged.replace_slice(Some(&a), Some(&changed)),
            delta(&["10.0.0.3:80"], &["10.0.0.1:80"])
        );
        // The same slice again, reordered: nothing to publish.
        let reordered = endpoints(&["10.0.0.3:80", "10.0.0.2:80"], &[]);
        assert_eq!(
            merged.replace_slice(Some(&changed), Some(&reordered)),
            delta(&[], &[])
        );
        assert_eq!(
            merged.addrs(),
            addrs(&["10.0.0.2:80", "10.0.0.3:80", "10.0.1.1:80"])
        );
    }

    #[test]
    fn new_and_deleted_slices_add_and_remove_their_endpoints() {
        let a = endpoints(&["10.0.0.1:80"], &[]);
        let mut merged = MergedEndpoints::of([&a]);
        let b = endpoints(&["10.0.1.1:80", "10.0.1.2:80"], &[]);
        assert_eq!(
            merged.replace_slice(None, Some(&b)),
            delta(&["10.0.1.1:80", "10.0.1.2:80"], &[])
        );
        assert_eq!(
            merged.replace_slice(Some(&b), None),
            delta(&[], &["10.0.1.1:80", "10.0.1.2:80"])
        );
    }

    #[test]
    fn an_address_in_two_slices_stays_until_neither_lists_it() {
        let a = endpoints(&["10.0.0.1:80"], &[]);
        let b = endpoints(&["10.0.0.1:80", "10.0.0.2:80"], &[]);
        let mut merged = MergedEndpoints::of([&a, &b]);
        let none = endpoints(&[], &[]);
        assert_eq!(merged.replace_slice(Some(&a), Some(&none)), delta(&[], &[]));
        let c = endpoints(&["10.0.1.1:80"], &[]);
        merged.replace_slice(None, Some(&c));
        assert_eq!(
            merged.replace_slice(Some(&b), None),
            delta(&[], &["10.0.0.1:80", "10.0.0.2:80"])
        );
    }

    #[test]
    fn the_terminating_fallback_starts_and_ends_with_a_whole_list() {
        let serving = endpoints(&["10.0.0.1:80"], &["10.0.0.2:80"]);
        let mut merged = MergedEndpoints::of([&serving]);
        // The last ready endpoint goes: the terminating ones are the list.
        let terminating = endpoints(&[], &["10.0.0.1:80", "10.0.0.2:80"]);
        assert_eq!(
            merged.replace_slice(Some(&serving), Some(&terminating)),
            ListChange::Whole(addrs(&["10.0.0.1:80", "10.0.0.2:80"]))
        );
        assert!(merged.terminating_fallback());
        // Within the fallback, terminating endpoints come and go by delta.
        let fewer = endpoints(&[], &["10.0.0.2:80"]);
        assert_eq!(
            merged.replace_slice(Some(&terminating), Some(&fewer)),
            delta(&[], &["10.0.0.1:80"])
        );
        // A ready endpoint is back: it alone is the list.
        let ready = endpoints(&["10.0.0.3:80"], &["10.0.0.2:80"]);
        assert_eq!(
            merged.replace_slice(Some(&fewer), Some(&ready)),
            ListChange::Whole(addrs(&["10.0.0.3:80"]))
        );
        assert!(!merged.terminating_fallback());
    }
}
