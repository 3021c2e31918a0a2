//! The Kubernetes rules for turning EndpointSlices into backend addresses.
//!
//! Discovery's watch loop ([`super::kubernetes`]) keeps one [`SliceEndpoints`] per
//! slice and, after every change, [`merge`]s them into the list the balancer uses.
//! Both steps are plain functions so that each rule below has a unit test of its own:
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

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};

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
}

/// The list to publish, and which rule produced it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Merged {
    /// Sorted, without duplicates (a pod may briefly appear in two slices while the
    /// EndpointSlice controller moves it).
    pub(crate) addrs: Vec<SocketAddr>,
    /// True when `addrs` are serving-but-terminating endpoints because none is ready,
    /// so the watch loop can say so in the logs.
    pub(crate) terminating_fallback: bool,
    /// What the backend ports speak, from the first slice that says.
    pub(crate) protocols: LearnedProtocols,
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
            Usability::Ready => out.ready.push(addr),
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

/// Merges every slice's endpoints into the one list the balancer should use.
pub(crate) fn merge<'a>(slices: impl IntoIterator<Item = &'a SliceEndpoints> + Clone) -> Merged {
    let protocols = slices
        .clone()
        .into_iter()
        .fold(LearnedProtocols::default(), |known, slice| {
            LearnedProtocols {
                backend_port: known.backend_port.or(slice.protocols.backend_port),
                grpc_port: known.grpc_port.or(slice.protocols.grpc_port),
            }
        });
    let ready: BTreeSet<SocketAddr> = slices
        .clone()
        .into_iter()
        .flat_map(|s| s.ready.iter().copied())
        .collect();
    if !ready.is_empty() {
        return Merged {
            addrs: ready.into_iter().collect(),
            terminating_fallback: false,
            protocols,
        };
    }
    let serving: BTreeSet<SocketAddr> = slices
        .into_iter()
        .flat_map(|s| s.serving_terminating.iter().copied())
        .collect();
    Merged {
        terminating_fallback: !serving.is_empty(),
        addrs: serving.into_iter().collect(),
        protocols,
    }
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
                serving_terminating: vec![],
                protocols: LearnedProtocols::default(),
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
            protocols: LearnedProtocols::default(),
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
        assert_eq!(merge([&unnamed, &named]).protocols, protocols);
    }

    #[test]
    fn merge_sorts_and_deduplicates_across_slices() {
        let a = endpoints(&["10.0.0.3:80", "10.0.0.1:80"], &[]);
        let b = endpoints(&["10.0.0.2:80", "10.0.0.1:80"], &[]);
        let merged = merge([&a, &b]);
        assert_eq!(
            merged.addrs,
            addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])
        );
        assert!(!merged.terminating_fallback);
    }

    #[test]
    fn merge_ignores_terminating_endpoints_while_any_endpoint_is_ready() {
        let old = endpoints(&[], &["10.0.0.1:80"]);
        let new = endpoints(&["10.0.0.2:80"], &[]);
        assert_eq!(merge([&old, &new]).addrs, addrs(&["10.0.0.2:80"]));
    }

    #[test]
    fn merge_falls_back_to_serving_terminating_endpoints_when_none_is_ready() {
        let a = endpoints(&[], &["10.0.0.2:80"]);
        let b = endpoints(&[], &["10.0.0.1:80", "10.0.0.2:80"]);
        let merged = merge([&a, &b]);
        assert_eq!(merged.addrs, addrs(&["10.0.0.1:80", "10.0.0.2:80"]));
        assert!(merged.terminating_fallback);
    }

    #[test]
    fn merge_of_nothing_is_an_empty_list() {
        assert_eq!(
            merge(std::iter::empty::<&SliceEndpoints>()),
            Merged::default()
        );
    }
}
