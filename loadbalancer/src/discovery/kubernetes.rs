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
//! After each change what it does to the merged list (rules in [`super::endpoints`])
//! is published in one write: for `Apply` and `Delete` only the addresses that
//! joined or left, so that with 10,000 endpoints in 100 slices an update costs
//! in proportion to its slice, and the other backends' states are left alone;
//! for `InitDone` the whole list. Errors never touch the list: while the API
//! server is unreachable the last known backends keep serving, and the watcher's
//! backoff (0.8 s doubling to 30 s, with jitter) keeps the retries from spinning.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use super::KubernetesSource;
use super::endpoints::{
    ListChange, MergedEndpoints, SliceEndpoints, protocols, slice_endpoints, slice_protocols,
};
use super::hints::{Distribution, HintChange, HintIndex};
use crate::backends::{BackendsWriter, LearnedProtocols, TopologyUpdate};
use crate::topology::{Locality, Place};

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
/// kubeconfig context's, or the pod's own in-cluster). Beside the slices it
/// watches the Service itself, for what it asks of topology-aware routing
/// ([`super::hints`]), and follows `locality`, this replica's zone and node,
/// as start-up and reloads learn it. Runs until the task is dropped.
pub async fn watch_endpoint_slices(
    client: Client,
    source: &KubernetesSource,
    backends: &BackendsWriter,
    mut locality: watch::Receiver<Option<Locality>>,
) -> Result<(), WatchEnded> {
    let namespace = source
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let service = source.service_name.as_str();
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace);
    // The selector goes to the API server, so slices of other Services never reach us.
    let selector = format!("{SERVICE_NAME_LABEL}={service}");
    let config = watcher::Config::default().labels(&selector);
    // One object, selected by name: a watch rather than a get, so that a
    // change of `trafficDistribution` applies within a second.
    let services: Api<Service> = Api::namespaced(client, &namespace);
    let by_name = watcher::Config::default().fields(&format!("metadata.name={service}"));
    tracing::info!(namespace = %namespace, service = %service, port = source.port, "watching EndpointSlices");

    // `default_backoff` sleeps between retries after an error; the stream holds that
    // timer, so it is pinned (on the stack: it lives exactly as long as this loop).
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    let mut service_events = std::pin::pin!(watcher::watcher(services, by_name).default_backoff());
    let mut asked = ServiceWatch::default();
    let here = locality.borrow_and_update().clone();
    let mut store = SliceStore::new(source.port, source.grpc_port, here);
    let mut publisher = Publisher::new(service, backends);
    // A dropped sender (tests, shutdown) leaves the locality as it is.
    let mut following_locality = true;
    loop {
        let update = tokio::select! {
            event = events.next() => match event {
                None => break,
                Some(Ok(event)) => store.handle(event),
                Some(Err(err)) => {
                    tracing::warn!(
                        service = %service,
                        error = %err,
                        cause = %root_cause(&err),
                        "EndpointSlice watch failed; keeping the last known backends and retrying with backoff"
                    );
                    publisher.backends.discovery_status().record_error(&err);
                    None
                }
            },
            Some(event) = service_events.next() => asked
                .handle(service, event)
                .map(|distribution| store.set_distribution(distribution)),
            changed = locality.changed(), if following_locality => match changed {
                Ok(()) => {
                    let here = locality.borrow_and_update().clone();
                    Some(store.set_locality(here))
                }
                Err(_) => {
                    following_locality = false;
                    None
                }
            },
        };
        if let Some(update) = update {
            publisher.publish(update);
        }
    }
    Err(WatchEnded)
}

/// What the Service asks of the routing, as its watch reports it.
#[derive(Debug, Default)]
struct ServiceWatch {
    /// A re-list in progress: what it found so far.
    relist: Option<Distribution>,
    /// Whether a failed watch was logged at `warn` already: the watcher retries
    /// forever, and an account without `watch` on `services` would otherwise
    /// log one line per retry.
    warned: bool,
}

impl ServiceWatch {
    /// What the Service asks for after `event`, when that is known.
    fn handle(
        &mut self,
        service: &str,
        event: Result<Event<Service>, watcher::Error>,
    ) -> Option<Distribution> {
        match event {
            Ok(Event::Init) => {
                self.relist = Some(Distribution::Default);
                None
            }
            Ok(Event::InitApply(object)) => {
                self.relist = Some(Distribution::of(&object));
                None
            }
            Ok(Event::InitDone) => {
                self.warned = false;
                Some(self.relist.take().unwrap_or_default())
            }
            Ok(Event::Apply(object)) => Some(Distribution::of(&object)),
            Ok(Event::Delete(_)) => Some(Distribution::Default),
            Err(err) if !self.warned => {
                self.warned = true;
                tracing::warn!(
                    service = %service,
                    error = %err,
                    cause = %root_cause(&err),
                    "cannot watch the Service (the account needs get, list and watch on \
                     services, k8s/loadbalancer-rbac.yaml); EndpointSlice hints alone \
                     decide topology-aware routing"
                );
                None
            }
            Err(err) => {
                tracing::debug!(service = %service, error = %err, "Service watch failed again");
                None
            }
        }
    }
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

/// A change to publish, produced by a state change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Update {
    change: ListChange,
    /// Whether the list is serving-but-terminating endpoints, none being ready.
    terminating_fallback: bool,
    /// What the backend ports speak, from the first slice that says.
    protocols: LearnedProtocols,
    /// True at `InitDone`: the state now reflects a complete list from the API server.
    complete: bool,
    /// Which backends the routing prefers and where they run.
    topology: TopologyUpdate,
}

/// The endpoints of every known slice, by slice name, and their merge.
#[derive(Debug)]
struct SliceStore {
    /// Every address gets this port (see [`super::endpoints`]).
    port: u16,
    /// The backends' gRPC port, whose `appProtocol` is read too.
    grpc_port: Option<u16>,
    /// The current state; `Apply` and `Delete` patch it by slice name.
    slices: BTreeMap<String, SliceEndpoints>,
    /// The list `slices` make, kept in step with each patch.
    merged: MergedEndpoints,
    /// A re-list in progress (between `Init` and `InitDone`). Built off to the side so
    /// the current state keeps serving until the new one is complete.
    relist: Option<BTreeMap<String, SliceEndpoints>>,
    /// The hints of `slices`, counted for this replica's locality.
    hints: HintIndex,
    /// What the Service asks for.
    asked: Distribution,
}

impl SliceStore {
    fn new(port: u16, grpc_port: Option<u16>, here: Option<Locality>) -> Self {
        Self {
            port,
            grpc_port,
            slices: BTreeMap::new(),
            merged: MergedEndpoints::default(),
            relist: None,
            hints: HintIndex::of(here, []),
            asked: Distribution::default(),
        }
    }

    /// A new locality: every hint and proximity is counted again.
    fn set_locality(&mut self, here: Option<Locality>) -> Update {
        self.hints = HintIndex::of(here, self.slices.values());
        let no_change = ListChange::Delta {
            added: Vec::new(),
            removed: Vec::new(),
        };
        self.update(no_change, self.hints.whole(), self.all_places(), false)
    }

    /// The Service asks for something new: only the decision changes.
    fn set_distribution(&mut self, asked: Distribution) -> Update {
        self.asked = asked;
        let no_change = ListChange::Delta {
            added: Vec::new(),
            removed: Vec::new(),
        };
        self.update(no_change, HintChange::default(), Vec::new(), false)
    }

    /// Where the ready endpoints of `slice` run.
    fn places(&self, slice: &SliceEndpoints) -> Vec<(SocketAddr, Arc<Place>)> {
        slice
            .ready_placements()
            .map(|(addr, placement)| (addr, placement.place(self.hints.here())))
            .collect()
    }

    /// Where every ready endpoint runs.
    fn all_places(&self) -> Vec<(SocketAddr, Arc<Place>)> {
        self.slices
            .values()
            .flat_map(|slice| self.places(slice))
            .collect()
    }

    /// Applies one watcher event; returns the change to publish when the state changed.
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
                self.merged = MergedEndpoints::of(self.slices.values());
                self.hints = HintIndex::of(self.hints.here().cloned(), self.slices.values());
                let change = ListChange::Whole(self.merged.addrs());
                Some(self.update(change, self.hints.whole(), self.all_places(), true))
            }
            Event::Apply(slice) => {
                let name = slice.name_any();
                let endpoints = self.read(&slice);
                let old = self.slices.get(&name);
                let change = self.merged.replace_slice(old, Some(&endpoints));
                let hints = self.hints.replace_slice(old, Some(&endpoints));
                let places = self.places(&endpoints);
                self.slices.insert(name, endpoints);
                Some(self.update(change, hints, places, false))
            }
            Event::Delete(slice) => {
                let old = self.slices.remove(&slice.name_any());
                let change = self.merged.replace_slice(old.as_ref(), None);
                let hints = self.hints.replace_slice(old.as_ref(), None);
                Some(self.update(change, hints, Vec::new(), false))
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

    fn update(
        &self,
        change: ListChange,
        hints: HintChange,
        places: Vec<(SocketAddr, Arc<Place>)>,
        complete: bool,
    ) -> Update {
        let decision = self.hints.decide(&self.asked);
        Update {
            change,
            terminating_fallback: self.merged.terminating_fallback(),
            // One step per slice, not per endpoint.
            protocols: protocols(self.slices.values()),
            complete,
            topology: TopologyUpdate {
                for_node: hints.for_node,
                for_zone: hints.for_zone,
                prefer_node: decision.prefer_node,
                prefer_zone: decision.prefer_zone,
                places,
                status: decision.status,
            },
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
        let Update {
            change,
            terminating_fallback,
            protocols,
            complete,
            topology,
        } = update;
        let service = self.service.as_str();
        if terminating_fallback != self.terminating_fallback {
            self.terminating_fallback = terminating_fallback;
            if terminating_fallback {
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
        self.backends.set_protocols(protocols);
        let changed = match change {
            ListChange::Delta { added, removed } => self
                .backends
                .change(&added, &removed)
                .then_some((added, removed)),
            ListChange::Whole(addrs) => {
                let old = self.backends.snapshot();
                let (added, removed) = diff(&old, &addrs);
                self.backends.replace(addrs).then_some((added, removed))
            }
        };
        // After the list: the places it sets belong to states the change made.
        let (status, before) = (&topology.status, self.backends.reader().topology());
        if (status.in_use, &status.mode, &status.zone)
            != (before.in_use, &before.mode, &before.zone)
        {
            tracing::info!(
                service = %service,
                in_use = ?status.in_use,
                mode = status.mode.as_deref(),
                zone = status.zone.as_deref(),
                reason = %status.reason,
                "topology-aware routing"
            );
        }
        self.backends.set_topology(topology);
        let backends = self.backends.reader().with(<[_]>::len);
        if let Some((added, removed)) = changed {
            tracing::info!(
                service = %service,
                added = %Preview(&added),
                removed = %Preview(&removed),
                backends,
                "backend list changed"
            );
        }
        if complete && !self.backends.is_synced() {
            tracing::info!(service = %service, backends, "first complete EndpointSlice list received");
            self.backends.mark_synced();
        }
    }
}

/// The addresses in `new` but not `old`, and those in `old` but not `new`, in one
/// walk over both. Both inputs are sorted (the published list always is), so the
/// outputs are too.
fn diff(old: &[SocketAddr], new: &[SocketAddr]) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (old.peek(), new.peek()) {
            (Some(o), Some(n)) if o == n => {
                old.next();
                new.next();
            }
            (Some(o), Some(n)) if o < n => removed.extend(old.next()),
            (_, Some(_)) => added.extend(new.next()),
            (Some(_), None) => removed.extend(old.next()),
            (None, None) => return (added, removed),
        }
    }
}

/// Up to this many addresses of a change are written in its log line; a change
/// of thousands (a first list, a re-list) would otherwise make a line of
/// hundreds of kilobytes.
const LOGGED_ADDRESSES: usize = 16;

/// A list of addresses for the log: `[a, b]`, or the first
/// [`LOGGED_ADDRESSES`] of a longer one and how many more there are.
struct Preview<'a>(&'a [SocketAddr]);

impl fmt::Display for Preview<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, addr) in self.0.iter().take(LOGGED_ADDRESSES).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{addr}")?;
        }
        match self.0.len().checked_sub(LOGGED_ADDRESSES) {
            Some(more) if more > 0 => write!(f, ", and {more} more]"),
            _ => f.write_str("]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
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

    /// Publishes what `event` changes into `list`; the list afterwards.
    fn published(
        store: &mut SliceStore,
        list: &BackendsWriter,
        event: Event<EndpointSlice>,
    ) -> Vec<SocketAddr> {
        let update = store.handle(event).expect("the event changes the state");
        Publisher::new("web", list).publish(update);
        list.snapshot()
    }

    fn whole(update: Option<Update>) -> Vec<SocketAddr> {
        match update.expect("the event changes the state").change {
            ListChange::Whole(addrs) => addrs,
            change => panic!("expected a whole list, got {change:?}"),
        }
    }

    #[test]
    fn a_relist_publishes_nothing_until_init_done() {
        let mut store = SliceStore::new(80, None, None);
        assert_eq!(store.handle(Event::Init), None);
        assert_eq!(
            store.handle(Event::InitApply(slice("a", &["10.0.0.1"]))),
            None
        );
        let done = store.handle(Event::InitDone).expect("InitDone publishes");
        assert!(done.complete);
        assert_eq!(whole(Some(done)), vec![addr("10.0.0.1:80")]);
    }

    #[test]
    fn a_relist_replaces_the_whole_state() {
        let mut store = SliceStore::new(80, None, None);
        store.handle(Event::Apply(slice("a", &["10.0.0.1"])));
        store.handle(Event::Apply(slice("gone", &["10.0.0.2"])));
        store.handle(Event::Init);
        store.handle(Event::InitApply(slice("a", &["10.0.0.1"])));
        assert_eq!(
            whole(store.handle(Event::InitDone)),
            vec![addr("10.0.0.1:80")]
        );
    }

    #[test]
    fn an_empty_relist_empties_the_list() {
        let mut store = SliceStore::new(80, None, None);
        store.handle(Event::Apply(slice("a", &["10.0.0.1"])));
        store.handle(Event::Init);
        assert_eq!(whole(store.handle(Event::InitDone)), vec![]);
    }

    #[test]
    fn apply_replaces_one_slice_by_name() {
        let (mut store, list) = (SliceStore::new(80, None, None), BackendsWriter::new());
        published(&mut store, &list, Event::Apply(slice("a", &["10.0.0.1"])));
        published(&mut store, &list, Event::Apply(slice("b", &["10.0.0.2"])));
        assert_eq!(
            published(&mut store, &list, Event::Apply(slice("a", &["10.0.0.3"]))),
            vec![addr("10.0.0.2:80"), addr("10.0.0.3:80")]
        );
    }

    #[test]
    fn delete_removes_one_slice_by_name() {
        let (mut store, list) = (SliceStore::new(80, None, None), BackendsWriter::new());
        published(&mut store, &list, Event::Apply(slice("a", &["10.0.0.1"])));
        published(&mut store, &list, Event::Apply(slice("b", &["10.0.0.2"])));
        assert_eq!(
            published(&mut store, &list, Event::Delete(slice("a", &[]))),
            vec![addr("10.0.0.2:80")]
        );
    }

    #[test]
    fn watch_events_are_not_complete_lists() {
        let mut store = SliceStore::new(80, None, None);
        let update = store.handle(Event::Apply(slice("a", &["10.0.0.1"])));
        assert!(!update.expect("Apply publishes").complete);
    }

    #[test]
    fn publishing_marks_synced_only_at_a_complete_list() {
        let backends = BackendsWriter::new();
        let mut publisher = Publisher::new("web", &backends);
        let mut store = SliceStore::new(80, None, None);
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

    /// 100 slices of 100 endpoints, `10.<slice>.0.<endpoint>`, all ready.
    fn service() -> Vec<EndpointSlice> {
        (0..100)
            .map(|s| {
                let ips: Vec<String> = (1..=100).map(|e| format!("10.{s}.0.{e}")).collect();
                let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                slice(&format!("web-{s}"), &ips)
            })
            .collect()
    }

    /// The incremental update: a change to one slice of 10,000 endpoints
    /// publishes that slice's difference and nothing else, and every other
    /// backend keeps its state (the same object, with its requests in flight,
    /// health verdict and ejection).
    #[test]
    fn a_slice_update_touches_only_its_own_endpoints() {
        let (mut store, list) = (SliceStore::new(80, None, None), BackendsWriter::new());
        store.handle(Event::Init);
        let mut slices = service();
        for slice in &slices {
            store.handle(Event::InitApply(slice.clone()));
        }
        assert_eq!(published(&mut store, &list, Event::InitDone).len(), 10_000);
        let backends = list.reader();
        let before = backends.states();
        let in_flight: Vec<_> = before.iter().map(|(_, s)| s.start_request()).collect();
        let now = std::time::Instant::now();
        before[17].1.set_healthy(false);
        before[5_000]
            .1
            .eject_until(now + std::time::Duration::from_secs(60));

        // Slice 42: endpoint 7 turns not ready, a new endpoint 101 joins.
        let endpoints = &mut slices[42].endpoints;
        endpoints[6].conditions = Some(EndpointConditions {
            ready: Some(false),
            ..EndpointConditions::default()
        });
        endpoints.push(Endpoint {
            addresses: vec!["10.42.0.101".to_owned()],
            ..Endpoint::default()
        });
        let update = store
            .handle(Event::Apply(slices[42].clone()))
            .expect("Apply publishes");
        assert_eq!(
            update.change,
            ListChange::Delta {
                added: vec![addr("10.42.0.101:80")],
                removed: vec![addr("10.42.0.7:80")],
            }
        );
        Publisher::new("web", &list).publish(update);

        let after = backends.states();
        assert_eq!(after.len(), 10_000);
        let (gone, new) = (addr("10.42.0.7:80"), addr("10.42.0.101:80"));
        for (addr, state) in &before {
            let kept = after.iter().find(|(a, _)| a == addr);
            match kept {
                Some((_, kept)) => assert!(Arc::ptr_eq(kept, state), "{addr} lost its state"),
                None => assert_eq!(*addr, gone),
            }
        }
        let fresh = backends.state(new);
        assert_eq!((fresh.in_flight(), fresh.requests()), (0, 0));
        assert!(after.iter().all(|(a, s)| *a == new || s.in_flight() == 1));
        assert!(!backends.state(before[17].0).is_healthy());
        assert!(backends.state(before[5_000].0).ejected_until(now).is_some());
        drop(in_flight);
    }

    #[test]
    fn diff_lists_added_and_removed_addresses() {
        let old = [
            addr("10.0.0.1:80"),
            addr("10.0.0.2:80"),
            addr("10.0.0.4:80"),
        ];
        let new = [
            addr("10.0.0.2:80"),
            addr("10.0.0.3:80"),
            addr("10.0.0.5:80"),
        ];
        assert_eq!(
            diff(&old, &new),
            (
                vec![addr("10.0.0.3:80"), addr("10.0.0.5:80")],
                vec![addr("10.0.0.1:80"), addr("10.0.0.4:80")]
            )
        );
        assert_eq!(diff(&[], &old), (old.to_vec(), vec![]));
        assert_eq!(diff(&old, &[]), (vec![], old.to_vec()));
    }

    #[test]
    fn a_long_change_is_logged_with_its_first_addresses_and_a_count() {
        let few = [addr("10.0.0.1:80"), addr("10.0.0.2:80")];
        assert_eq!(Preview(&few).to_string(), "[10.0.0.1:80, 10.0.0.2:80]");
        assert_eq!(Preview(&[]).to_string(), "[]");
        let many: Vec<SocketAddr> = (1..=20)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        let line = Preview(&many).to_string();
        assert!(line.starts_with("[10.0.0.1:80, 10.0.0.2:80, "), "{line}");
        assert!(line.ends_with("10.0.0.16:80, and 4 more]"), "{line}");
    }
}
