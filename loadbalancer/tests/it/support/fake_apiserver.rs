//! A fake Kubernetes API server for EndpointSlices, speaking the real wire protocol.
//!
//! Discovery is tested against this server through the real `kube::Client` and the real
//! kube-runtime watcher, so the tests exercise exactly the requests a cluster would see:
//!
//! * **list**: `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=..&limit=500`
//!   answers an `EndpointSliceList` whose `metadata.resourceVersion` is the store's
//!   current revision.
//! * **watch**: the same path with `watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=290`
//!   answers `200` with a chunked body of newline-delimited
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":..}` events: first every
//!   change after revision `N` (that is how a dropped watch resumes without loss), then
//!   live changes as the test makes them.
//!
//! Like etcd behind a real API server, every change bumps one global revision, and the
//! store keeps a history of changes so watches can resume. [`FakeApiServer::compact`]
//! forgets that history: a watch from an older revision then gets an `ERROR` event
//! carrying a `Status` with code 410 (reason `Expired`), which is how a real API server
//! answers a too-old `resourceVersion` on a watch, and the client must re-list.
//!
//! Note for test writers: kube-runtime 5.0.0 re-lists only on that `ERROR` event. An
//! HTTP `410` *response* to the watch request is treated as a failed watch start and
//! retried with the same `resourceVersion`, so this server never answers a watch that way.
//!
//! * **services**: the same list and watch, on `/api/v1/namespaces/{ns}/services`,
//!   for Services added with [`FakeApiServer::apply_service`]; a `fieldSelector`
//!   of `metadata.name=<name>` (what discovery sends) selects one.
//! * **get node**: `GET /api/v1/nodes/{name}` answers a Node added with
//!   [`FakeApiServer::add_node`] (its zone label set), 404 for another name, or
//!   403 `Forbidden`, as RBAC does, after [`FakeApiServer::refuse_nodes`].
//!
//! What it leaves out: a label selector may only use `key=value` terms, a field
//! selector only `metadata.name` and `metadata.namespace` (what discovery sends); `limit` is recorded but every list fits in one page; `timeoutSeconds` is not
//! enforced (tests end long before 290 s); a change of a slice's labels does not turn
//! into ADDED/DELETED for watches whose selector it enters or leaves.
//!
//! ```ignore
//! let server = FakeApiServer::start().await;
//! server.apply(slice("web-1", "web", &[("10.0.0.1", Ready)], 8080));
//! // in-process: server.client().await, or for a child process:
//! //   Command::new(bin).env("KUBECONFIG", server.kubeconfig_path())
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
    NamedContext,
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// The namespace of the generated kubeconfig's context, and of slices applied
/// without one.
pub(crate) const NAMESPACE: &str = "lb-test";

/// The kinds of object the server lists and watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Resource {
    EndpointSlices,
    Services,
}

impl Resource {
    /// The resource whose namespaced collection `path` names, and the namespace.
    fn of_path(path: &str) -> Option<(Self, &str)> {
        [Resource::EndpointSlices, Resource::Services]
            .into_iter()
            .find_map(|resource| {
                let namespace = path
                    .strip_prefix(resource.prefix())?
                    .strip_prefix("/namespaces/")?
                    .strip_suffix(resource.plural())?
                    .strip_suffix('/')?;
                (!namespace.contains('/')).then_some((resource, namespace))
            })
    }

    fn prefix(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1",
            Resource::Services => "/api/v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "endpointslices",
            Resource::Services => "services",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::Services => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Services => "Service",
        }
    }
}

/// A running fake API server. Dropping it stops the server and removes its kubeconfig.
#[derive(Debug)]
pub(crate) struct FakeApiServer {
    /// Fixed for the server's life, so a client (or a child process holding the
    /// kubeconfig) reconnects to the same place after [`Self::restart`].
    addr: SocketAddr,
    /// The object store, shared with every connection task.
    state: Arc<Mutex<Store>>,
    /// The accept loop. It owns the listener and every connection task, so aborting
    /// it is "the API server process died": the port refuses and streams break.
    serving: Option<JoinHandle<()>>,
    /// A kubeconfig file pointing at this server, for child processes.
    kubeconfig_path: PathBuf,
}

/// How one endpoint in a [`slice`] is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndpointState {
    /// `ready: true`.
    Ready,
    /// `ready: false, serving: false` (a pod failing its readiness probe).
    NotReady,
    /// `ready: false, serving: true, terminating: true` (a pod shutting down that
    /// still answers, as during a rolling update).
    Terminating,
    /// No `conditions` at all; the API says to treat that as ready.
    Unset,
}

/// An EndpointSlice for Service `service` as the EndpointSlice controller writes it:
/// labelled `kubernetes.io/service-name=<service>`, one port named `http`, the
/// address type taken from the first address (IPv6 if it contains a colon).
pub(crate) fn slice(
    name: &str,
    service: &str,
    endpoints: &[(&str, EndpointState)],
    port: u16,
) -> EndpointSlice {
    let ipv6 = endpoints.first().is_some_and(|(ip, _)| ip.contains(':'));
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/service-name".to_owned(), service.to_owned()),
                (
                    "endpointslice.kubernetes.io/managed-by".to_owned(),
                    "endpointslice-controller.k8s.io".to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        address_type: if ipv6 { "IPv6" } else { "IPv4" }.to_owned(),
        endpoints: endpoints
            .iter()
            .map(|&(ip, state)| Endpoint {
                addresses: vec![ip.to_owned()],
                conditions: conditions(state),
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".to_owned()),
            port: Some(i32::from(port)),
            protocol: Some("TCP".to_owned()),
            ..EndpointPort::default()
        }]),
    }
}

fn conditions(state: EndpointState) -> Option<EndpointConditions> {
    let (ready, serving, terminating) = match state {
        EndpointState::Unset => return None,
        EndpointState::Ready => (true, true, false),
        EndpointState::NotReady => (false, false, false),
        EndpointState::Terminating => (false, true, true),
    };
    Some(EndpointConditions {
        ready: Some(ready),
        serving: Some(serving),
        terminating: Some(terminating),
    })
}

/// One request the server received, for assertions on what the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordedRequest {
    pub(crate) method: Method,
    pub(crate) path: String,
    /// Decoded query parameters in the order sent.
    pub(crate) query: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The (first) value of query parameter `name`.
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Whether this was a watch (as opposed to a list).
    pub(crate) fn is_watch(&self) -> bool {
        self.param("watch") == Some("true")
    }
}

impl FakeApiServer {
    /// Starts an empty server on a free loopback port and writes its kubeconfig.
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the fake API server");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let kubeconfig_path = std::env::temp_dir().join(format!(
            "fake-apiserver-{}-{}.kubeconfig",
            std::process::id(),
            addr.port()
        ));
        let mut server = Self {
            addr,
            state: Arc::new(Mutex::new(Store::default())),
            serving: None,
            kubeconfig_path,
        };
        let kubeconfig =
            serde_json::to_vec_pretty(&server.kubeconfig()).expect("a kubeconfig serialises");
        // JSON is YAML, so kube's kubeconfig loader reads this file as it is.
        std::fs::write(&server.kubeconfig_path, kubeconfig).expect("write the kubeconfig");
        server.serving = Some(tokio::spawn(serve(listener, Arc::clone(&server.state))));
        server
    }

    /// A kubeconfig with one context: this server over plain HTTP, no credentials,
    /// namespace [`NAMESPACE`].
    pub(crate) fn kubeconfig(&self) -> Kubeconfig {
        Kubeconfig {
            clusters: vec![NamedCluster {
                name: "fake".to_owned(),
                cluster: Some(Cluster {
                    server: Some(format!("http://{}", self.addr)),
                    ..Cluster::default()
                }),
                ..NamedCluster::default()
            }],
            auth_infos: vec![NamedAuthInfo {
                name: "fake".to_owned(),
                auth_info: Some(AuthInfo::default()),
                ..NamedAuthInfo::default()
            }],
            contexts: vec![NamedContext {
                name: "fake".to_owned(),
                context: Some(Context {
                    cluster: "fake".to_owned(),
                    user: Some("fake".to_owned()),
                    namespace: Some(NAMESPACE.to_owned()),
                    ..Context::default()
                }),
                ..NamedContext::default()
            }],
            current_context: Some("fake".to_owned()),
            ..Kubeconfig::default()
        }
    }

    /// The kubeconfig as a file, for `KUBECONFIG=<path>` in a child process.
    pub(crate) fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// Sets up a child process the way a pod in [`NAMESPACE`] talking to this
    /// server would be: its kubeconfig and the Downward API's namespace.
    pub(crate) fn configure_pod(&self, command: &mut std::process::Command) {
        command
            .env("KUBECONFIG", self.kubeconfig_path())
            .env("NAMESPACE", NAMESPACE)
            // Only the kubeconfig may decide where the client connects: never a
            // proxy, never an in-cluster API server.
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy");
    }

    /// A real kube client configured from [`Self::kubeconfig`], as
    /// `Client::try_default()` would build it from the file.
    pub(crate) async fn client(&self) -> kube::Client {
        let config =
            kube::Config::from_custom_kubeconfig(self.kubeconfig(), &KubeConfigOptions::default())
                .await
                .expect("the generated kubeconfig is valid");
        kube::Client::try_from(config).expect("a client builds from the generated kubeconfig")
    }

    /// Adds Node `name`, labelled with `zone` (no label when `None`).
    pub(crate) fn add_node(&self, name: &str, zone: Option<&str>) {
        let labels = zone.map_or_else(
            || json!({"kubernetes.io/hostname": name}),
            |zone| json!({"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}),
        );
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels, "resourceVersion": "1"},
        });
        self.store().nodes.insert(name.to_owned(), node);
    }

    /// Refuses `get nodes` from now on with 403, as RBAC does for an account
    /// that was not granted it.
    pub(crate) fn refuse_nodes(&self) {
        self.store().refuse_nodes = true;
    }

    /// Creates or replaces a slice (by namespace and name; namespace defaults to
    /// [`NAMESPACE`]) and sends ADDED or MODIFIED to matching watches.
    pub(crate) fn apply(&self, slice: EndpointSlice) {
        self.store()
            .apply(Resource::EndpointSlices, to_object(slice));
    }

    /// Creates or replaces a Service, as [`Self::apply`] does a slice.
    pub(crate) fn apply_service(&self, service: Service) {
        self.store().apply(Resource::Services, to_object(service));
    }

    /// Deletes slice `name` in [`NAMESPACE`] and sends DELETED to matching watches.
    /// Panics if there is no such slice: that is a mistake in the test.
    pub(crate) fn delete(&self, name: &str) {
        self.store()
            .delete(Resource::EndpointSlices, NAMESPACE, name);
    }

    /// Sends a BOOKMARK at the current revision to every watch that allows them, so
    /// clients advance their resourceVersion without any object changing.
    pub(crate) fn bookmark(&self) {
        self.store().bookmark();
    }

    /// Forgets the change history up to now (etcd compaction): a watch that starts
    /// or resumes from an older resourceVersion gets an `ERROR` 410 event.
    pub(crate) fn compact(&self) {
        self.store().compact();
    }

    /// Compacts, then ends every open watch with an `ERROR` event carrying a 410
    /// `Status`: the client must re-list.
    pub(crate) fn expire_watches_with_410(&self) {
        let mut store = self.store();
        store.compact();
        let gone = expired_event(store.revision, store.revision);
        for watch in store.watches.drain(..) {
            // A failed send means the client already went away; nothing to end.
            let _ = watch.events.send(gone.clone());
        }
    }

    /// Ends every open watch cleanly, as a real API server does when a watch's
    /// timeout runs out; the client resumes from the last resourceVersion it saw.
    pub(crate) fn close_watches(&self) {
        self.store().watches.clear();
    }

    /// The number of EndpointSlice watches currently streaming (whose client is
    /// still there as far as the server knows).
    pub(crate) fn open_watches(&self) -> usize {
        let resource = Resource::EndpointSlices;
        let mut store = self.store();
        store.watches.retain(|watch| !watch.events.is_closed());
        store
            .watches
            .iter()
            .filter(|watch| watch.query.resource == resource)
            .count()
    }

    /// Every request received so far, oldest first.
    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        self.store().requests.clone()
    }

    /// Takes the server down: the port refuses connections and every open
    /// connection breaks. The objects and their history are kept for [`Self::restart`].
    pub(crate) async fn stop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
            // `abort` only asks; awaiting the handle returns once the task (and with it
            // the listener and every connection) has really been dropped.
            let _ = serving.await;
        }
        self.store().watches.clear();
    }

    /// Brings a stopped server back on the same address.
    pub(crate) async fn restart(&mut self) {
        assert!(self.serving.is_none(), "restart() needs a stopped server");
        // Another process may have taken the port meanwhile (TIME_WAIT is no obstacle:
        // tokio sets SO_REUSEADDR on listeners); retry briefly before giving up.
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(err) if attempts < 50 => {
                    attempts += 1;
                    eprintln!("fake API server: rebinding {}: {err}; retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("fake API server cannot rebind {}: {err}", self.addr),
            }
        };
        self.serving = Some(tokio::spawn(serve(listener, Arc::clone(&self.state))));
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.state)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
        }
        // Best effort: a leftover file in the temp dir harms nobody.
        let _ = std::fs::remove_file(&self.kubeconfig_path);
    }
}

/// The store's lock is never held across an `.await`, so a `std` mutex is right; a
/// panic while holding it is a failing test, and the store is still usable after it.
fn lock(state: &Mutex<Store>) -> MutexGuard<'_, Store> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The API server's state: what etcd and the watch cache hold in a real cluster.
#[derive(Debug)]
struct Store {
    /// The global revision: bumped by every change, stamped on the changed object as
    /// its resourceVersion, and reported by lists.
    revision: u64,
    /// Watches from a resourceVersion below this get 410: their history is gone.
    compacted: u64,
    /// Current objects, as JSON, by resource, namespace and name.
    objects: BTreeMap<(Resource, String, String), serde_json::Value>,
    /// Every change after `compacted`, oldest first, for watches that resume.
    history: Vec<Change>,
    /// Open watch streams.
    watches: Vec<Watch>,
    /// Every request, for tests to assert on.
    requests: Vec<RecordedRequest>,
    /// Nodes by name, as JSON: only `get` is served.
    nodes: BTreeMap<String, serde_json::Value>,
    /// Whether `get nodes` is refused with 403, as for an account without the
    /// ClusterRole.
    refuse_nodes: bool,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            revision: 1,
            compacted: 1,
            objects: BTreeMap::new(),
            history: Vec::new(),
            watches: Vec::new(),
            requests: Vec::new(),
            nodes: BTreeMap::new(),
            refuse_nodes: false,
        }
    }
}

#[derive(Debug, Clone)]
struct Change {
    revision: u64,
    kind: &'static str,
    resource: Resource,
    object: serde_json::Value,
}

/// What a list or watch request selects.
#[derive(Debug)]
struct Query {
    resource: Resource,
    namespace: String,
    selector: Selector,
    fields: Selector,
}

/// One open watch stream.
#[derive(Debug)]
struct Watch {
    query: Query,
    bookmarks: bool,
    /// Event lines for the response body; dropping the sender ends the stream.
    events: mpsc::UnboundedSender<Bytes>,
}

impl Store {
    fn apply(&mut self, resource: Resource, mut object: serde_json::Value) {
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        let key = key(resource, &object);
        let kind = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key, object.clone());
        self.record(kind, resource, object);
    }

    fn delete(&mut self, resource: Resource, namespace: &str, name: &str) {
        let mut object = self
            .objects
            .remove(&(resource, namespace.to_owned(), name.to_owned()))
            .unwrap_or_else(|| {
                panic!("fake API server: no {resource:?} {namespace}/{name} to delete")
            });
        self.revision += 1;
        // A DELETED event carries the object as last seen, at the deletion's revision.
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.record("DELETED", resource, object);
    }

    fn record(&mut self, kind: &'static str, resource: Resource, object: serde_json::Value) {
        let change = Change {
            revision: self.revision,
            kind,
            resource,
            object,
        };
        // Drop watches whose client went away (their receiver is gone).
        self.watches.retain(|watch| {
            !watch.matches(change.resource, &change.object)
                || watch.events.send(change.line()).is_ok()
        });
        self.history.push(change);
    }

    fn bookmark(&mut self) {
        let revision = self.revision.to_string();
        self.watches.retain(|watch| {
            let line = event_line(
                "BOOKMARK",
                json!({
                    "apiVersion": watch.query.resource.api_version(),
                    "kind": watch.query.resource.kind(),
                    "metadata": { "resourceVersion": revision },
                }),
            );
            !watch.bookmarks || watch.events.send(line).is_ok()
        });
    }

    fn compact(&mut self) {
        self.compacted = self.revision;
        self.history.clear();
    }
}

impl Change {
    fn line(&self) -> Bytes {
        event_line(self.kind, self.object.clone())
    }
}

impl Watch {
    fn matches(&self, resource: Resource, object: &serde_json::Value) -> bool {
        self.query.matches(resource, object)
    }
}

impl Query {
    fn matches(&self, resource: Resource, object: &serde_json::Value) -> bool {
        resource == self.resource
            && object["metadata"]["namespace"].as_str() == Some(self.namespace.as_str())
            && self.selector.matches_labels(object)
            && self.fields.matches_fields(object)
    }
}

/// `object` as the JSON the server stores, in [`NAMESPACE`] unless it names one.
fn to_object(object: impl serde::Serialize) -> serde_json::Value {
    let mut object = serde_json::to_value(object).expect("a Kubernetes object serialises");
    let metadata = &mut object["metadata"];
    if metadata["namespace"].is_null() {
        metadata["namespace"] = json!(NAMESPACE);
    }
    object
}

fn key(resource: Resource, object: &serde_json::Value) -> (Resource, String, String) {
    let field = |name: &str| object["metadata"][name].as_str().map(str::to_owned);
    (
        resource,
        field("namespace").unwrap_or_default(),
        field("name").expect("an object has a name"),
    )
}

/// One watch event: a JSON object on its own line, as the API server streams them.
fn event_line(kind: &str, object: serde_json::Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object }))
        .expect("an event serialises");
    line.push(b'\n');
    Bytes::from(line)
}

/// The event a real API server sends when a watch's resourceVersion was compacted away.
fn expired_event(requested: u64, current: u64) -> Bytes {
    event_line(
        "ERROR",
        status(
            410,
            "Expired",
            &format!("too old resource version: {requested} ({current})"),
        ),
    )
}

fn status(code: u16, reason: &str, message: &str) -> serde_json::Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// An equality-based label or field selector: `k=v` or `k==v` terms joined by
/// commas.
#[derive(Debug, Clone, Default)]
struct Selector(Vec<(String, String)>);

impl Selector {
    fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',').filter(|t| !t.is_empty()) {
            if term.contains("!=") || term.contains(' ') {
                return Err(format!("unsupported label selector term {term:?}"));
            }
            let (key, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("unsupported label selector term {term:?}"))?;
            terms.push((key.to_owned(), value.to_owned()));
        }
        Ok(Self(terms))
    }

    fn matches_labels(&self, object: &serde_json::Value) -> bool {
        self.0
            .iter()
            .all(|(key, value)| object["metadata"]["labels"][key].as_str() == Some(value.as_str()))
    }

    /// `metadata.name` and `metadata.namespace` are the only fields known.
    fn matches_fields(&self, object: &serde_json::Value) -> bool {
        self.0.iter().all(|(key, value)| {
            let field = key
                .strip_prefix("metadata.")
                .map(|name| &object["metadata"][name]);
            field.and_then(serde_json::Value::as_str) == Some(value.as_str())
        })
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// The accept loop. Connection tasks live in a `JoinSet` owned by this task, so
/// aborting it (in `stop`) drops the listener and aborts every connection with it.
async fn serve(listener: TcpListener, state: Arc<Mutex<Store>>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("fake API server: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // As a real API server does (Go sets it on every TCP connection): without
        // it, Nagle's algorithm holds a watch event back until the client's delayed
        // ACK of the previous one, up to 40 ms.
        let _ = stream.set_nodelay(true);
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
        let state = Arc::clone(&state);
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let response = handle(&state, request);
                async move { Ok::<_, Infallible>(response) }
            });
            // Errors here are clients hanging up mid-stream, which tests do on purpose.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn handle(state: &Mutex<Store>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query: Vec<(String, String)> =
        form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let recorded = RecordedRequest {
        method: request.method().clone(),
        path,
        query,
    };
    let mut store = lock(state);
    store.requests.push(recorded.clone());

    if let Some(name) = recorded.path.strip_prefix("/api/v1/nodes/") {
        return get_node(&store, name);
    }
    let Some((resource, namespace)) = Resource::of_path(&recorded.path) else {
        let message = format!("the fake API server does not serve {}", recorded.path);
        return json_response(StatusCode::NOT_FOUND, status(404, "NotFound", &message));
    };
    if recorded.method != Method::GET {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            status(405, "MethodNotAllowed", "the fake API server only reads"),
        );
    }
    let selectors =
        Selector::parse(recorded.param("labelSelector").unwrap_or_default()).and_then(|labels| {
            Selector::parse(recorded.param("fieldSelector").unwrap_or_default())
                .map(|fields| (labels, fields))
        });
    let (selector, fields) = match selectors {
        Ok(selectors) => selectors,
        Err(message) => {
            return json_response(StatusCode::BAD_REQUEST, status(400, "BadRequest", &message));
        }
    };
    let query = Query {
        resource,
        namespace: namespace.to_owned(),
        selector,
        fields,
    };
    if recorded.is_watch() {
        start_watch(&mut store, query, &recorded)
    } else {
        list(&store, &query)
    }
}

/// `get` on one Node, as an API server with RBAC answers it.
fn get_node(store: &Store, name: &str) -> Response<Body> {
    if store.refuse_nodes {
        let message = format!(
            "nodes \"{name}\" is forbidden: User \"system:serviceaccount:{NAMESPACE}:loadbalancer-sa\" \
             cannot get resource \"nodes\" in API group \"\" at the cluster scope"
        );
        return json_response(StatusCode::FORBIDDEN, status(403, "Forbidden", &message));
    }
    match store.nodes.get(name) {
        Some(node) => json_response(StatusCode::OK, node.clone()),
        None => {
            let message = format!("nodes \"{name}\" not found");
            json_response(StatusCode::NOT_FOUND, status(404, "NotFound", &message))
        }
    }
}

/// Lists what `query` selects.
fn list(store: &Store, query: &Query) -> Response<Body> {
    let items: Vec<&serde_json::Value> = store
        .objects
        .iter()
        .filter(|((resource, _, _), object)| query.matches(*resource, object))
        .map(|(_, object)| object)
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "apiVersion": query.resource.api_version(),
            "kind": format!("{}List", query.resource.kind()),
            "metadata": { "resourceVersion": store.revision.to_string() },
            "items": items,
        }),
    )
}

/// Starts a watch stream: replays the history after the requested resourceVersion,
/// then registers for live changes, all under the store lock so nothing slips between.
fn start_watch(store: &mut Store, query: Query, request: &RecordedRequest) -> Response<Body> {
    let (events, receiver) = mpsc::unbounded_channel();
    let watch = Watch {
        query,
        bookmarks: request.param("allowWatchBookmarks") == Some("true"),
        events,
    };
    match request.param("resourceVersion").unwrap_or("0") {
        // "Any version": start with the current objects as ADDED, as a real server does.
        "" | "0" => {
            for ((resource, _, _), object) in &store.objects {
                if watch.matches(*resource, object) {
                    let _ = watch.events.send(event_line("ADDED", object.clone()));
                }
            }
            store.watches.push(watch);
        }
        version => {
            let Ok(from) = version.parse::<u64>() else {
                let message = format!("invalid resourceVersion {version:?}");
                return json_response(StatusCode::BAD_REQUEST, status(400, "BadRequest", &message));
            };
            if from < store.compacted {
                // The stream is answered 200 and ends after the ERROR event (the sender
                // is dropped here), exactly as a real API server does.
                let _ = watch.events.send(expired_event(from, store.revision));
            } else {
                for change in store.history.iter().filter(|c| c.revision > from) {
                    if watch.matches(change.resource, &change.object) {
                        let _ = watch.events.send(change.line());
                    }
                }
                store.watches.push(watch);
            }
        }
    }
    let body = futures::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        Some((Ok(Frame::data(line)), receiver))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(body)))
        .expect("a static response builds")
}

fn json_response(code: StatusCode, body: serde_json::Value) -> Response<Body> {
    let bytes = serde_json::to_vec(&body).expect("JSON serialises");
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .expect("a static response builds")
}
