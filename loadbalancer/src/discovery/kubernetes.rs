//! Kubernetes discovery: a kube-runtime watcher over one Service's EndpointSlices.
//!
//! This is the writer side of [`Backends`](crate::backends::Backends) in a cluster. kube-runtime's [`watcher`]
//! lists the slices labelled `kubernetes.io/service-name=<service>`, then watches them
//! from the list's `resourceVersion`, resuming after dropped connections and starting
//! over with a fresh list when the API server says the version is too old (410 Gone).
//! One async function consumes that stream, and its events map onto state changes one
//! to one:
//!
//! * `Init` starts an empty side buffer; the old list keeps serving meanwhile.
//! * `InitApply` fills the buffer.
//! * `InitDone` swaps the buffer in whole: a slice deleted while the watch was down is
//!   simply not in it, so it disappears. The first `InitDone` marks the list synced.
//! * `Apply` / `Delete` patch one slice by name.
//!
//! After each change the merged list (rules in [`super::endpoints`]) is published in
//! one write. Errors never touch the list: while the API server is unreachable the
//! last known backends keep serving, and the watcher's backoff (0.8 s doubling to 30 s,
//! with jitter) keeps the retries from spinning.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};

use super::KubernetesSource;
use super::endpoints::{Merged, SliceEndpoints, merge, slice_endpoints, slice_protocols};
use crate::backends::BackendsWriter;

/// The label the EndpointSlice controller puts on every slice of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The watch stream ended, which kube-runtime's watcher with a retry-forever backoff
/// should never do; the caller decides whether that is fatal.
#[derive(Debug, thiserror::Error)]
#[error("the EndpointSlice watch stream ended")]
pub struct WatchEnded;

/// Watches the EndpointSlices of `source.service_name` and keeps `backends` current.
///
/// The namespace is `source.namespace`, else the client's default namespace (the
/// kubeconfig context's, or the pod's own in-cluster). Runs until the task is dropped.
pub async fn watch_endpoint_slices(
    client: Client,
    source: &KubernetesSource,
    backends: &BackendsWriter,
) -> Result<(), WatchEnded> {
    let namespace = source
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let service = source.service_name.as_str();
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    // The selector goes to the API server, so slices of other Services never reach us.
    let selector = format!("{SERVICE_NAME_LABEL}={service}");
    let config = watcher::Config::default().labels(&selector);
    tracing::info!(namespace = %namespace, service = %service, port = source.port, "watching EndpointSlices");

    // `default_backoff` sleeps between retries after an error; the stream holds that
    // timer, so it is pinned (on the stack: it lives exactly as long as this loop).
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    let mut store = SliceStore::new(source.port, source.grpc_port);
    let mut publisher = Publisher::new(service, backends);
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if let Some(update) = store.handle(event) {
                    publisher.publish(update);
                }
            }
            Err(err) => {
                tracing::warn!(
                    service = %service,
                    error = %err,
                    cause = %root_cause(&err),
                    "EndpointSlice watch failed; keeping the last known backends and retrying with backoff"
                );
                publisher.backends.discovery_status().record_error(&err);
            }
        }
    }
    Err(WatchEnded)
}

/// The innermost error, which usually names the real problem ("Connection refused")
/// that the outer layers only wrap.
fn root_cause<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause
}

/// A list to publish, produced by a state change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Update {
    merged: Merged,
    /// True at `InitDone`: the state now reflects a complete list from the API server.
    complete: bool,
}

/// The endpoints of every known slice, by slice name.
#[derive(Debug)]
struct SliceStore {
    /// Every address gets this port (see [`super::endpoints`]).
    port: u16,
    /// The backends' gRPC port, whose `appProtocol` is read too.
    grpc_port: Option<u16>,
    /// The current state; `Apply` and `Delete` patch it by slice name.
    slices: BTreeMap<String, SliceEndpoints>,
    /// A re-list in progress (between `Init` and `InitDone`). Built off to the side so
    /// the current state keeps serving until the new one is complete.
    relist: Option<BTreeMap<String, SliceEndpoints>>,
}

impl SliceStore {
    fn new(port: u16, grpc_port: Option<u16>) -> Self {
        Self {
            port,
            grpc_port,
            slices: BTreeMap::new(),
            relist: None,
        }
    }

    /// Applies one watcher event; returns the list to publish when the state changed.
    fn handle(&mut self, event: Event<EndpointSlice>) -> Option<Update> {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                None
            }
            Event::InitApply(slice) => {
                let endpoints = self.read(&slice);
                // kube-runtime only sends InitApply after Init; tolerate it anyway.
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(slice.name_any(), endpoints);
                None
            }
            Event::InitDone => {
                self.slices = self.relist.take().unwrap_or_default();
                Some(self.update(true))
            }
            Event::Apply(slice) => {
                let endpoints = self.read(&slice);
                self.slices.insert(slice.name_any(), endpoints);
                Some(self.update(false))
            }
            Event::Delete(slice) => {
                self.slices.remove(&slice.name_any());
                Some(self.update(false))
            }
        }
    }

    /// What `slice` contributes: its endpoints and its ports' protocols.
    fn read(&self, slice: &EndpointSlice) -> SliceEndpoints {
        SliceEndpoints {
            protocols: slice_protocols(slice, self.port, self.grpc_port),
            ..slice_endpoints(slice, self.port)
        }
    }

    fn update(&self, complete: bool) -> Update {
        Update {
            merged: merge(self.slices.values()),
            complete,
        }
    }
}

/// Publishes updates into [`Backends`](crate::backends::Backends) and logs what changed.
#[derive(Debug)]
struct Publisher<'a> {
    /// The Service name, for the logs.
    service: String,
    /// The shared list the balancer reads; this task is its only writer.
    backends: &'a BackendsWriter,
    /// Whether the last published list came from the terminating fallback, so the
    /// switch into and out of it is logged once rather than on every event.
    terminating_fallback: bool,
}

impl<'a> Publisher<'a> {
    fn new(service: &str, backends: &'a BackendsWriter) -> Self {
        Self {
            service: service.to_owned(),
            backends,
            terminating_fallback: false,
        }
    }

    fn publish(&mut self, update: Update) {
        let Update { merged, complete } = update;
        let service = self.service.as_str();
        if merged.terminating_fallback != self.terminating_fallback {
            self.terminating_fallback = merged.terminating_fallback;
            if merged.terminating_fallback {
                tracing::warn!(
                    service = %service,
                    "no endpoint is ready; using serving endpoints that are terminating"
                );
            } else {
                tracing::info!(
                    service = %service,
                    "ready endpoints are back; terminating endpoints no longer used"
                );
            }
        }
        self.backends.set_protocols(merged.protocols);
        let old = self.backends.snapshot();
        if self.backends.replace(merged.addrs.clone()) {
            let (added, removed) = diff(&old, &merged.addrs);
            tracing::info!(
                service = %service,
                added = ?added,
                removed = ?removed,
                backends = merged.addrs.len(),
                "backend list changed"
            );
        }
        if complete && !self.backends.is_synced() {
            tracing::info!(service = %service, backends = ?merged.addrs, "first complete EndpointSlice list received");
            self.backends.mark_synced();
        }
    }
}

/// The addresses in `new` but not `old`, and those in `old` but not `new`. Both
/// inputs are sorted (the published list always is), so the outputs are too.
fn diff(old: &[SocketAddr], new: &[SocketAddr]) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let added = new
        .iter()
        .filter(|a| old.binary_search(a).is_err())
        .copied()
        .collect();
    let removed = old
        .iter()
        .filter(|a| new.binary_search(a).is_err())
        .copied()
        .collect();
    (added, removed)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::Endpoint;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address parses")
    }

    /// A slice whose endpoints have no conditions, i.e. are all ready.
    fn slice(name: &str, ips: &[&str]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".to_owned(),
            endpoints: ips
                .iter()
                .map(|ip| Endpoint {
                    addresses: vec![(*ip).to_owned()],
                    ..Endpoint::default()
                })
                .collect(),
            ports: None,
        }
    }

    fn addrs(update: Option<Update>) -> Vec<SocketAddr> {
        update.expect("the event changes the state").merged.addrs
    }

    #[test]
    fn a_relist_publishes_nothing_until_init_done() {
        let mut store = SliceStore::new(80, None);
        assert_eq!(store.handle(Event::Init), None);
        assert_eq!(
            store.handle(Event::InitApply(slice("a", &["10.0.0.1"]))),
            None
        );
        let done = store.handle(Event::InitDone).expect("InitDone publishes");
        assert!(done.complete);
        assert_eq!(done.merged.addrs, vec![addr("10.0.0.1:80")]);
    }

    #[test]
    fn a_relist_replaces_the_whole_state() {
        let mut store = SliceStore::new(80, None);
        store.handle(Event::Apply(slice("a", &["10.0.0.1"])));
        store.handle(Event::Apply(slice("gone", &["10.0.0.2"])));
        store.handle(Event::Init);
        store.handle(Event::InitApply(slice("a", &["10.0.0.1"])));
        assert_eq!(
            addrs(store.handle(Event::InitDone)),
            vec![addr("10.0.0.1:80")]
        );
    }

    #[test]
    fn an_empty_relist_empties_the_list() {
        let mut store = SliceStore::new(80, None);
        store.handle(Event::Apply(slice("a", &["10.0.0.1"])));
        store.handle(Event::Init);
        assert_eq!(addrs(store.handle(Event::InitDone)), vec![]);
    }

    #[test]
    fn apply_replaces_one_slice_by_name() {
        let mut store = SliceStore::new(80, None);
        store.handle(Event::Apply(slice("a", &["10.0.0.1"])));
        store.handle(Event::Apply(slice("b", &["10.0.0.2"])));
        let update = store.handle(Event::Apply(slice("a", &["10.0.0.3"])));
        assert_eq!(
            addrs(update),
            vec![addr("10.0.0.2:80"), addr("10.0.0.3:80")]
        );
    }

    #[test]
    fn delete_removes_one_slice_by_name() {
        let mut store = SliceStore::new(80, None);
        store.handle(Event::Apply(slice("a", &["10.0.0.1"])));
        store.handle(Event::Apply(slice("b", &["10.0.0.2"])));
        let update = store.handle(Event::Delete(slice("a", &[])));
        assert_eq!(addrs(update), vec![addr("10.0.0.2:80")]);
    }

    #[test]
    fn watch_events_are_not_complete_lists() {
        let mut store = SliceStore::new(80, None);
        let update = store.handle(Event::Apply(slice("a", &["10.0.0.1"])));
        assert!(!update.expect("Apply publishes").complete);
    }

    #[test]
    fn publishing_marks_synced_only_at_a_complete_list() {
        let backends = BackendsWriter::new();
        let mut publisher = Publisher::new("web", &backends);
        let mut store = SliceStore::new(80, None);
        publisher.publish(
            store
                .handle(Event::Apply(slice("a", &["10.0.0.1"])))
                .expect("changed"),
        );
        assert!(!backends.is_synced());
        store.handle(Event::Init);
        publisher.publish(store.handle(Event::InitDone).expect("changed"));
        assert!(backends.is_synced());
        assert!(backends.snapshot().is_empty());
    }

    #[test]
    fn diff_lists_added_and_removed_addresses() {
        let old = [addr("10.0.0.1:80"), addr("10.0.0.2:80")];
        let new = [addr("10.0.0.2:80"), addr("10.0.0.3:80")];
        assert_eq!(
            diff(&old, &new),
            (vec![addr("10.0.0.3:80")], vec![addr("10.0.0.1:80")])
        );
    }
}
