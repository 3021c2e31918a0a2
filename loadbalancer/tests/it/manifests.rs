//! The manifests in `k8s/`, checked against each other and against the code that
//! runs in them, so that a config key, a port or an image tag cannot drift in one
//! place without a test failing.
//!
//! Users deploy with `kubectl apply -f k8s/`, so every file there must hold
//! Kubernetes objects only. That apply is not recursive: `k8s/tls/` holds the
//! opt-in TLS config, applied on its own once its Secret exists, and
//! `k8s/production/` the production extras (disruption budgets, the autoscaler),
//! applied with `kubectl apply -f k8s/ -f k8s/production/`; both are checked
//! against the rest here too. Each YAML document is parsed into its k8s-openapi type
//! (chosen by `apiVersion` and `kind`; anything else fails), and serialised back: a
//! field the type does not know would vanish in that round trip, so a misspelt or
//! misplaced field fails too, instead of being silently ignored as the API server
//! would (mostly) do.
//!
//! What runs in the pods is checked with the crates' own code: each ConfigMap's
//! `config.json` goes through its crate's config loader, and the probe paths through
//! the routers that answer them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backend::handlers::App;
use backend::identity::Identity;
use http::{Request, StatusCode};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PodSpec, Probe, SecretVolumeSource, Service, ServiceAccount, ServicePort,
    VolumeMount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::{Metadata, Resource};
use loadbalancer::admin::Admin;
use loadbalancer::backends::BackendsWriter;
use loadbalancer::metrics::Metrics;
use loadbalancer::shutdown::Shutdown;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The Deployments this repository ships, by name; each has its own crate, config
/// loader, Dockerfile (`Dockerfile.<name>`) and Makefile image variable.
const BACKEND: &str = "backend";
const LOADBALANCER: &str = "loadbalancer";

/// Both programs read `/etc/config/config.json` by default.
const CONFIG_DIR: &str = "/etc/config";
const CONFIG_FILE: &str = "config.json";

/// The lowest UID and GID a pod may run as: IDs below 10000 may belong to real
/// users or system accounts on the node.
const MIN_ID: i64 = 10_000;

/// What the load balancer's pods need beyond the drain to finish requests in flight
/// before Kubernetes sends SIGKILL.
const IN_FLIGHT_ALLOWANCE_SECONDS: i64 = 10;

/// The drain the load balancer does on SIGTERM when its config sets no `drainSeconds`.
const DEFAULT_DRAIN_SECONDS: i64 = 5;

/// The port on the host that `kind/cluster.yaml` maps the load balancer's NodePort to.
const KIND_HOST_PORT: u64 = 8080;

/// The host port `kind/cluster.yaml` maps the load balancer's TLS NodePort to.
const KIND_TLS_HOST_PORT: u64 = 8443;

/// The production extras: `kubectl apply -f k8s/ -f k8s/production/`.
const PRODUCTION_DIR: &str = "k8s/production";

/// The opt-in TLS config: `kubectl apply -f k8s/tls/`, after the Secret exists.
const TLS_DIR: &str = "k8s/tls";

/// The Secret `kubectl create secret tls loadbalancer-tls` makes, holding the
/// certificate and key under the key names of every `kubernetes.io/tls` Secret.
const TLS_SECRET: &str = "loadbalancer-tls";
const TLS_SECRET_KEYS: [&str; 2] = ["tls.crt", "tls.key"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the loadbalancer crate sits directly below the workspace root")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// --- parsing: one YAML document -> one typed Kubernetes object ---------------------

/// Picks objects of one kind out of [`Object`]s.
trait Kind: Resource + Metadata<Ty = ObjectMeta> + Sized {
    fn pick(object: &Object) -> Option<&Self>;
}

/// Declares the kinds `k8s/` may hold, once: the [`Object`] enum, the dispatch from
/// `apiVersion` + `kind` to the k8s-openapi type, and [`Kind`] for each.
macro_rules! known_kinds {
    ($($kind:ident),* $(,)?) => {
        /// A Kubernetes object of a kind the manifests may hold.
        // A test holds a dozen of these: their size does not matter.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug)]
        enum Object {
            $($kind($kind),)*
        }

        impl Object {
            fn from_document(document: Value) -> Result<Self, String> {
                let field = |name: &str| {
                    document
                        .get(name)
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| format!("no `{name}`: not a Kubernetes object"))
                };
                let (api_version, kind) = (field("apiVersion")?, field("kind")?);
                $(
                    if (api_version.as_str(), kind.as_str()) == ($kind::API_VERSION, $kind::KIND) {
                        return typed::<$kind>(document).map(Object::$kind);
                    }
                )*
                Err(format!(
                    "{api_version} {kind} is not a kind these manifests use (known: {})",
                    [$(format!("{} {}", $kind::API_VERSION, $kind::KIND)),*].join(", ")
                ))
            }
        }

        $(
            impl Kind for $kind {
                fn pick(object: &Object) -> Option<&Self> {
                    match object {
                        Object::$kind(it) => Some(it),
                        _ => None,
                    }
                }
            }
        )*
    };
}

known_kinds!(
    ClusterRole,
    ClusterRoleBinding,
    ConfigMap,
    Deployment,
    HorizontalPodAutoscaler,
    PodDisruptionBudget,
    Role,
    RoleBinding,
    Service,
    ServiceAccount
);

/// Parses `document` as a `T`, and fails if any field of it is not part of `T`.
fn typed<T: Resource + Serialize + DeserializeOwned>(document: Value) -> Result<T, String> {
    let object: T = serde_json::from_value(document.clone())
        .map_err(|e| format!("not a valid {}: {e}", T::KIND))?;
    let known = serde_json::to_value(&object).expect("a k8s-openapi object serialises");
    match first_difference(&document, &known) {
        None => Ok(object),
        Some(path) => Err(format!(
            "`{path}` is not a field of {} (misspelt, misplaced or empty?)",
            T::KIND
        )),
    }
}

/// The path of the first place where `written` and `understood` differ.
fn first_difference(written: &Value, understood: &Value) -> Option<String> {
    match (written, understood) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter()
                .find_map(|key| match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => first_difference(x, y).map(|rest| join(key, &rest)),
                    _ => Some(key.clone()),
                })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (x, y))| {
                first_difference(x, y).map(|rest| join(&format!("[{i}]"), &rest))
            })
        }
        _ if written == understood => None,
        _ => Some(String::new()),
    }
}

fn join(head: &str, rest: &str) -> String {
    match rest {
        "" => head.to_owned(),
        _ if rest.starts_with('[') => format!("{head}{rest}"),
        _ => format!("{head}.{rest}"),
    }
}

/// Every object in a YAML file; empty documents are skipped, as kubectl does.
fn parse_documents(text: &str) -> Result<Vec<Object>, String> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| format!("not YAML: {e}"))?;
    documents
        .into_iter()
        .filter(|document| !document.is_null())
        .enumerate()
        .map(|(i, document)| {
            Object::from_document(document).map_err(|e| format!("document {}: {e}", i + 1))
        })
        .collect()
}

/// Everything in `k8s/` (or in another directory applied whole, such as `k8s/tls/`).
#[derive(Debug)]
struct Manifests {
    /// The directory, relative to the workspace root, for messages.
    dir: String,
    objects: Vec<Object>,
}

impl Manifests {
    /// Parses every file in `k8s/`; panics naming the file and the problem.
    fn load() -> Self {
        Self::load_dir("k8s")
    }

    /// Parses every file directly in `dir` (relative to the workspace root), as
    /// `kubectl apply -f dir/` reads it: subdirectories are left out.
    fn load_dir(dir: &str) -> Self {
        let mut files: Vec<PathBuf> = std::fs::read_dir(workspace_root().join(dir))
            .unwrap_or_else(|e| panic!("cannot list {dir}/: {e}"))
            .map(|entry| entry.expect("the directory is readable").path())
            .filter(|path| !path.is_dir())
            .collect();
        files.sort();
        let mut objects = Vec::new();
        for file in files {
            assert!(
                file.extension().is_some_and(|ext| ext == "yaml"),
                "{}: `kubectl apply -f {dir}/` applies every file there; keep only \
                 Kubernetes manifests (*.yaml) in {dir}/",
                file.display()
            );
            let text = std::fs::read_to_string(&file).expect("a manifest is readable");
            let parsed =
                parse_documents(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(!parsed.is_empty(), "{}: no objects", file.display());
            objects.extend(parsed);
        }
        Self {
            dir: dir.to_owned(),
            objects,
        }
    }

    fn all<T: Kind>(&self) -> Vec<&T> {
        self.objects.iter().filter_map(T::pick).collect()
    }

    /// The object of kind `T` named `name`; panics if there is none.
    fn get<T: Kind>(&self, name: &str) -> &T {
        self.all::<T>()
            .into_iter()
            .find(|object| object.metadata().name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{}/ has no {} named {name}", self.dir, T::KIND))
    }

    /// The Deployment `name` and its one container.
    fn app(&self, name: &str) -> (&PodSpec, &Container) {
        let pod = pod_spec(self.get::<Deployment>(name));
        assert_eq!(pod.containers.len(), 1, "{name}: one container per pod");
        (pod, &pod.containers[0])
    }

    /// The `config.json` of the ConfigMap that Deployment `name` mounts at
    /// [`CONFIG_DIR`].
    fn config_text(&self, name: &str) -> &str {
        config_file(self.get::<ConfigMap>(&mounted_config_map(self.app(name))))
    }

    fn backend_config(&self) -> backend::config::Config {
        backend::config::parse(self.config_text(BACKEND), Path::new("backend ConfigMap"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn loadbalancer_config(&self) -> loadbalancer::config::Config {
        loadbalancer::config::Config::parse(
            self.config_text(LOADBALANCER),
            Path::new("loadbalancer ConfigMap"),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The [`CONFIG_FILE`] a ConfigMap holds.
fn config_file(config_map: &ConfigMap) -> &str {
    config_map
        .data
        .as_ref()
        .and_then(|data| data.get(CONFIG_FILE))
        .unwrap_or_else(|| {
            panic!(
                "ConfigMap {:?} has no {CONFIG_FILE}",
                config_map.metadata.name
            )
        })
}

fn pod_spec(deployment: &Deployment) -> &PodSpec {
    deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("a Deployment has a pod template")
}

fn pod_labels(deployment: &Deployment) -> BTreeMap<String, String> {
    deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.template.metadata.as_ref())
        .and_then(|meta| meta.labels.clone())
        .unwrap_or_default()
}

/// The name of the ConfigMap mounted at [`CONFIG_DIR`] in this pod.
fn mounted_config_map((pod, container): (&PodSpec, &Container)) -> String {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.mount_path == CONFIG_DIR)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {CONFIG_DIR}", container.name));
    pod.volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == mount.name)
        .and_then(|volume| volume.config_map.as_ref())
        .map(|source| source.name.clone())
        .unwrap_or_else(|| panic!("{}: {CONFIG_DIR} is not a ConfigMap", container.name))
}

/// The volume that mounts the Secret `secret` in this pod, and its mount in the
/// container.
fn secret_mount<'a>(
    (pod, container): (&'a PodSpec, &'a Container),
    secret: &str,
) -> (&'a SecretVolumeSource, &'a VolumeMount) {
    let (volume, source) = pod
        .volumes
        .iter()
        .flatten()
        .find_map(|volume| {
            volume
                .secret
                .as_ref()
                .filter(|source| source.secret_name.as_deref() == Some(secret))
                .map(|source| (volume, source))
        })
        .unwrap_or_else(|| panic!("{}: no volume of Secret {secret}", container.name));
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.name == volume.name)
        .unwrap_or_else(|| panic!("{}: volume {} is not mounted", container.name, volume.name));
    (source, mount)
}

/// The opt-in TLS ConfigMap: the one object in [`TLS_DIR`].
fn tls_config_map(tls: &Manifests) -> &ConfigMap {
    let config_maps = tls.all::<ConfigMap>();
    assert!(
        tls.objects.len() == 1 && config_maps.len() == 1,
        "{TLS_DIR}/ holds one ConfigMap, the config it swaps in: {:?}",
        tls.objects
    );
    config_maps[0]
}

/// The `tls` section of the opt-in TLS config, as JSON.
fn tls_section(tls: &Manifests) -> serde_json::Map<String, Value> {
    let config: Value = serde_json::from_str(config_file(tls_config_map(tls)))
        .unwrap_or_else(|e| panic!("{TLS_DIR}/: {CONFIG_FILE} is not JSON: {e}"));
    config
        .get("tls")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_else(|| panic!("{TLS_DIR}/: the config has no `tls` object"))
}

/// The container port named `name`.
fn named_port(container: &Container, name: &str) -> u16 {
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|port| port.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{}: no port named {name}", container.name));
    u16::try_from(port.container_port).expect("a container port fits in u16")
}

/// The container port a probe or Service `targetPort` refers to, by number or name.
fn resolve(container: &Container, port: &IntOrString) -> u16 {
    match port {
        IntOrString::Int(number) => u16::try_from(*number).expect("a port fits in u16"),
        IntOrString::String(name) => named_port(container, name),
    }
}

/// The port `name` of a Service.
fn service_port<'a>(service: &'a Service, name: &str) -> &'a ServicePort {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some(name)))
        .unwrap_or_else(|| panic!("Service has no port named {name}"))
}

/// The HTTP path and container port of the liveness and of the readiness probe.
fn probe_targets(container: &Container) -> [(String, u16); 2] {
    let target = |probe: Option<&Probe>, which: &str| {
        let action = probe
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("{}: no HTTP {which} probe", container.name));
        let path = action.path.clone().unwrap_or_else(|| "/".to_owned());
        (path, resolve(container, &action.port))
    };
    [
        target(container.liveness_probe.as_ref(), "liveness"),
        target(container.readiness_probe.as_ref(), "readiness"),
    ]
}

/// Asserts that `service` selects the pods of `deployment` (and not every pod).
fn assert_selects(service: &Service, deployment: &Deployment) {
    let selector = service
        .spec
        .as_ref()
        .and_then(|spec| spec.selector.clone())
        .unwrap_or_default();
    let labels = pod_labels(deployment);
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "Service {:?} must select the pods of {:?}: {selector:?} vs {labels:?}",
        service.metadata.name,
        deployment.metadata.name
    );
}

/// The status the backend's router answers `GET path` with.
async fn backend_status(app: &App, path: &str) -> StatusCode {
    let request = Request::get(path).body(()).expect("a valid request");
    app.handle(request).await.status()
}

/// The status the load balancer's admin router answers `GET path` with.
fn admin_status(admin: &Admin, path: &str) -> StatusCode {
    let request = Request::get(path).body(()).expect("a valid request");
    admin.respond(&request).status()
}

/// Asserts that `kind/cluster.yaml` maps port `node_port` of the kind node to
/// `host_port` on the host.
fn assert_kind_maps(node_port: i32, host_port: u64) {
    let kind: Value =
        serde_saphyr::from_str(&read("kind/cluster.yaml")).expect("kind/cluster.yaml is YAML");
    let mappings: Vec<&Value> = kind["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|node| node["extraPortMappings"].as_array().into_iter().flatten())
        .collect();
    assert!(
        mappings.iter().any(|m| {
            m["containerPort"].as_i64() == Some(i64::from(node_port))
                && m["hostPort"].as_u64() == Some(host_port)
        }),
        "kind/cluster.yaml must map nodePort {node_port} to host port {host_port}: {mappings:?}"
    );
}

/// `NAME ?= value` lines of the Makefile.
fn makefile_variables() -> BTreeMap<String, String> {
    read("Makefile")
        .lines()
        .filter_map(|line| line.split_once("?="))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

// --- the checker itself can fail ----------------------------------------------------

#[test]
fn a_document_without_api_version_or_kind_is_rejected() {
    let no_api_version = parse_documents("kind: ConfigMap\nmetadata:\n  name: x\n")
        .expect_err("no apiVersion is rejected");
    assert!(no_api_version.contains("apiVersion"), "{no_api_version}");
    let no_kind =
        parse_documents("apiVersion: v1\nmetadata:\n  name: x\n").expect_err("no kind is rejected");
    assert!(no_kind.contains("kind"), "{no_kind}");
}

#[test]
fn a_kind_the_manifests_do_not_use_is_rejected() {
    // kind's own config must stay out of k8s/: kubectl would reject it there.
    let error = parse_documents(&read("kind/cluster.yaml")).expect_err("not an object");
    assert!(error.contains("kind.x-k8s.io/v1alpha4 Cluster"), "{error}");
    // A known kind under the wrong API group is no better.
    let error = parse_documents("apiVersion: v1\nkind: Deployment\nmetadata: {name: x}\n")
        .expect_err("Deployments are apps/v1");
    assert!(error.contains("v1 Deployment"), "{error}");
}

#[test]
fn a_misspelt_field_is_rejected() {
    let text = read("k8s/loadbalancer-deployment.yaml");
    assert!(text.contains("  replicas: 2"), "the test edits this line");
    let error = parse_documents(&text.replace("  replicas: 2", "  replica: 2"))
        .expect_err("`replica` is not a DeploymentSpec field");
    assert!(error.contains("`spec.replica`"), "{error}");

    let misplaced = text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem");
    let error = parse_documents(&misplaced).expect_err("field names are case-sensitive");
    assert!(error.contains("readOnlyRootFileSystem"), "{error}");
}

// --- the manifests --------------------------------------------------------------

#[test]
fn every_file_in_k8s_holds_only_known_kubernetes_objects() {
    let manifests = Manifests::load();
    assert_eq!(manifests.all::<Deployment>().len(), 2);
    assert_eq!(manifests.all::<ConfigMap>().len(), 2);
    assert_eq!(manifests.all::<Service>().len(), 2);
    manifests.get::<ServiceAccount>("loadbalancer-sa");
}

#[test]
fn each_configmap_loads_with_its_crates_own_config_loader() {
    let manifests = Manifests::load();
    let backend = manifests.backend_config();
    assert_eq!(backend.port, 8080);
    let lb = manifests.loadbalancer_config();
    assert_eq!(
        lb.discovery.discovery,
        loadbalancer::config::DiscoveryMode::Kubernetes,
        "in the cluster the load balancer watches EndpointSlices"
    );
    // The programs look for their config where the ConfigMaps are mounted.
    let default_path = Path::new(CONFIG_DIR).join(CONFIG_FILE);
    assert_eq!(Path::new(backend::config::DEFAULT_PATH), default_path);
    assert_eq!(Path::new(loadbalancer::config::DEFAULT_PATH), default_path);
    // No ConfigMap is left that no Deployment reads.
    let mounted: BTreeSet<String> = [BACKEND, LOADBALANCER]
        .into_iter()
        .map(|name| mounted_config_map(manifests.app(name)))
        .collect();
    for config_map in manifests.all::<ConfigMap>() {
        let name = config_map.metadata.name.clone().unwrap_or_default();
        assert!(
            mounted.contains(&name),
            "ConfigMap {name} is mounted nowhere"
        );
    }
}

#[test]
fn the_loadbalancer_watches_the_backend_service_on_the_backend_pod_port() {
    let manifests = Manifests::load();
    let lb = manifests.loadbalancer_config();
    let backend_service = manifests.get::<Service>(&lb.discovery.backend_service_name);
    let (_, backend_container) = manifests.app(BACKEND);

    assert_selects(backend_service, manifests.get::<Deployment>(BACKEND));
    let spec = backend_service.spec.as_ref().expect("a Service has a spec");
    // EndpointSlices list the pods' target port, and that is where the load
    // balancer connects: backendPort must be the container port the Service targets.
    let ports = spec.ports.as_ref().expect("the Service has ports");
    assert!(
        ports.iter().any(|port| {
            let target = port
                .target_port
                .clone()
                .unwrap_or(IntOrString::Int(port.port));
            resolve(backend_container, &target) == lb.discovery.backend_port
        }),
        "no port of Service {} targets backendPort {}",
        lb.discovery.backend_service_name,
        lb.discovery.backend_port
    );
}

#[test]
fn the_backend_service_offers_grpc_as_h2c_on_the_grpc_container_port() {
    let manifests = Manifests::load();
    let (_, container) = manifests.app(BACKEND);
    let service = manifests.get::<Service>("backend-service");
    let grpc = service_port(service, "grpc");
    let target = grpc
        .target_port
        .clone()
        .unwrap_or(IntOrString::Int(grpc.port));
    assert_eq!(resolve(container, &target), named_port(container, "grpc"));
    // Without it, a proxy that reads appProtocol would speak HTTP/1.1 to a port
    // that answers only HTTP/2.
    assert_eq!(grpc.app_protocol.as_deref(), Some("kubernetes.io/h2c"));
}

#[test]
fn container_ports_match_the_configs() {
    let manifests = Manifests::load();
    let (_, backend) = manifests.app(BACKEND);
    assert_eq!(named_port(backend, "http"), manifests.backend_config().port);
    assert_eq!(
        Some(named_port(backend, "grpc")),
        manifests.backend_config().grpc_port
    );

    let (_, lb) = manifests.app(LOADBALANCER);
    let config = manifests.loadbalancer_config();
    assert_eq!(named_port(lb, "http"), config.listen.port);
    assert_eq!(named_port(lb, "admin"), config.listen.admin_port);
}

#[tokio::test]
async fn backend_probes_ask_the_backend_port_for_paths_it_answers() {
    let manifests = Manifests::load();
    let (_, container) = manifests.app(BACKEND);
    let port = manifests.backend_config().port;
    let [(live, live_port), (ready, ready_port)] = probe_targets(container);
    assert_eq!((live_port, ready_port), (port, port));

    let app = App::new(Identity {
        pod_name: "backend-0".to_owned(),
        pod_ip: "10.0.0.1".to_owned(),
        service_name: "backend-service".to_owned(),
    });
    assert_eq!(backend_status(&app, &live).await, StatusCode::OK, "{live}");
    assert_eq!(
        backend_status(&app, &ready).await,
        StatusCode::OK,
        "{ready}"
    );
    // The readiness path is the one that turns false when the pod is stopping.
    app.begin_shutdown();
    assert_eq!(
        backend_status(&app, &ready).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "{ready}"
    );
    assert_eq!(backend_status(&app, &live).await, StatusCode::OK, "{live}");
}

#[test]
fn loadbalancer_probes_ask_the_admin_port_for_paths_it_answers() {
    let manifests = Manifests::load();
    let (_, container) = manifests.app(LOADBALANCER);
    let admin_port = manifests.loadbalancer_config().listen.admin_port;
    let [(live, live_port), (ready, ready_port)] = probe_targets(container);
    assert_eq!(
        (live_port, ready_port),
        (admin_port, admin_port),
        "probes go to the admin port, never queued behind client traffic"
    );

    let writer = BackendsWriter::new();
    let backends = writer.reader();
    let metrics = Arc::new(Metrics::new(backends.gauges()));
    let admin = Admin::new(backends.clone(), Shutdown::new(), metrics);
    // Before discovery's first complete list the pod must not get traffic.
    assert_eq!(admin_status(&admin, &live), StatusCode::OK, "{live}");
    assert_eq!(
        admin_status(&admin, &ready),
        StatusCode::SERVICE_UNAVAILABLE,
        "{ready}"
    );
    writer.mark_synced();
    assert_eq!(admin_status(&admin, &ready), StatusCode::OK, "{ready}");
}

#[test]
fn prometheus_annotations_point_at_a_port_of_the_pod() {
    let manifests = Manifests::load();
    // The load balancer's metrics are on its admin port, the backend's on its only one.
    for (name, port_name) in [(BACKEND, "http"), (LOADBALANCER, "admin")] {
        let deployment = manifests.get::<Deployment>(name);
        let annotations = deployment
            .spec
            .as_ref()
            .and_then(|spec| spec.template.metadata.as_ref())
            .and_then(|meta| meta.annotations.clone())
            .unwrap_or_default();
        let get = |key: &str| annotations.get(key).map(String::as_str);
        let (_, container) = manifests.app(name);
        assert_eq!(get("prometheus.io/scrape"), Some("true"), "{name}");
        assert_eq!(
            get("prometheus.io/port"),
            Some(named_port(container, port_name).to_string().as_str()),
            "{name}"
        );
        assert_eq!(get("prometheus.io/path"), Some("/metrics"), "{name}");
    }
}

#[test]
fn images_match_the_makefile_and_the_dockerfiles() {
    let manifests = Manifests::load();
    let variables = makefile_variables();
    for name in [BACKEND, LOADBALANCER] {
        let (_, container) = manifests.app(name);
        let image = container.image.as_deref().unwrap_or_default();
        let variable = format!("{}_IMAGE", name.to_uppercase());
        assert_eq!(
            variables.get(&variable).map(String::as_str),
            Some(image),
            "{name}: the Makefile's {variable} builds the image the Deployment runs"
        );
        let dockerfile = read(&format!("Dockerfile.{name}"));
        assert_eq!(
            dockerfile.lines().next(),
            Some(format!("# image: {image}").as_str()),
            "Dockerfile.{name} names its image on its first line"
        );
        // A version tag and IfNotPresent: `kind load docker-image` images are used.
        // With `latest` (or no tag) Kubernetes always pulls, and fails.
        let tag = image
            .rsplit_once(':')
            .map(|(_, tag)| tag)
            .filter(|tag| !tag.contains('/'));
        assert!(
            tag.is_some_and(|tag| !tag.is_empty() && tag != "latest"),
            "{name}: image {image:?} needs a version tag"
        );
        assert_eq!(
            container.image_pull_policy.as_deref(),
            Some("IfNotPresent"),
            "{name}"
        );
    }
}

#[test]
fn the_role_grants_only_reading_endpointslices_and_services_to_the_loadbalancer() {
    let manifests = Manifests::load();
    assert_eq!(manifests.all::<Role>().len(), 1, "one Role");
    assert_eq!(manifests.all::<RoleBinding>().len(), 1, "one RoleBinding");
    let role = manifests.all::<Role>()[0];
    let rules = role.rules.as_deref().unwrap_or_default();
    // The slices name the backends; the Service says whether to route by
    // topology (its trafficDistribution or topology annotation).
    fn one(list: Option<&[String]>) -> &str {
        match list {
            Some([only]) => only,
            other => panic!("one API group and one resource per rule: {other:?}"),
        }
    }
    let granted: Vec<(&str, &str)> = rules
        .iter()
        .map(|rule| {
            (
                one(rule.api_groups.as_deref()),
                one(rule.resources.as_deref()),
            )
        })
        .collect();
    assert_eq!(
        granted,
        [("discovery.k8s.io", "endpointslices"), ("", "services")]
    );
    for rule in rules {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]));
        assert_eq!(rule.verbs.len(), 3, "no verb twice: {:?}", rule.verbs);
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
    }

    // The binding gives that Role to the account the load balancer pods run as.
    let binding = manifests.all::<RoleBinding>()[0];
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let (pod, _) = manifests.app(LOADBALANCER);
    let account = pod
        .service_account_name
        .as_deref()
        .expect("the load balancer names its ServiceAccount");
    manifests.get::<ServiceAccount>(account);
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(
        (subjects[0].kind.as_str(), subjects[0].name.as_str()),
        ("ServiceAccount", account)
    );
    assert_ne!(
        pod.automount_service_account_token,
        Some(false),
        "the load balancer needs its token to watch"
    );
}

#[test]
fn the_cluster_role_grants_only_getting_nodes_to_the_loadbalancer() {
    let manifests = Manifests::load();
    assert_eq!(manifests.all::<ClusterRole>().len(), 1, "one ClusterRole");
    let role = manifests.all::<ClusterRole>()[0];
    let rules = role.rules.as_deref().unwrap_or_default();
    assert_eq!(
        rules,
        [PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["nodes".to_owned()]),
            verbs: vec!["get".to_owned()],
            ..PolicyRule::default()
        }],
        "get on nodes, nothing else"
    );
    let bindings = manifests.all::<ClusterRoleBinding>();
    assert_eq!(bindings.len(), 1, "one ClusterRoleBinding");
    let binding = bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let (pod, _) = manifests.app(LOADBALANCER);
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(
        (subjects[0].kind.as_str(), subjects[0].name.as_str()),
        (
            "ServiceAccount",
            pod.service_account_name.as_deref().unwrap_or_default()
        )
    );
    assert!(
        subjects[0].namespace.is_some(),
        "a ClusterRoleBinding must name its ServiceAccount's namespace"
    );
}

#[test]
fn every_pod_runs_restricted() {
    let manifests = Manifests::load();
    for deployment in manifests.all::<Deployment>() {
        let pod = pod_spec(deployment);
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let context = pod
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no pod securityContext"));
        for (what, id) in [
            ("runAsUser", context.run_as_user),
            ("runAsGroup", context.run_as_group),
        ] {
            assert!(
                id.is_some_and(|id| id >= MIN_ID),
                "{name}: pod {what} must be a fixed ID >= {MIN_ID}, is {id:?}"
            );
        }
        let seccomp = context.seccomp_profile.as_ref().map(|p| p.type_.as_str());
        assert_eq!(seccomp, Some("RuntimeDefault"), "{name}");

        let containers = pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten());
        for container in containers {
            let at = format!("{name}/{}", container.name);
            let own = container.security_context.clone().unwrap_or_default();
            assert!(
                own.run_as_non_root
                    .or(context.run_as_non_root)
                    .unwrap_or(false),
                "{at}: runAsNonRoot"
            );
            assert_eq!(own.read_only_root_filesystem, Some(true), "{at}");
            assert_eq!(own.allow_privilege_escalation, Some(false), "{at}");
            assert_ne!(own.privileged, Some(true), "{at}");
            let capabilities = own.capabilities.unwrap_or_default();
            assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]), "{at}");
            assert!(capabilities.add.unwrap_or_default().is_empty(), "{at}");
            assert!(container.resources.is_some(), "{at}: requests and limits");
        }
    }
}

#[test]
fn backend_pods_mount_no_service_account_token() {
    let manifests = Manifests::load();
    let (pod, _) = manifests.app(BACKEND);
    assert_eq!(pod.automount_service_account_token, Some(false));
}

#[test]
fn loadbalancer_pods_learn_their_namespace_and_name_from_the_downward_api() {
    let manifests = Manifests::load();
    let (_, container) = manifests.app(LOADBALANCER);
    let field = |variable: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|env| env.name == variable)
            .and_then(|env| env.value_from.as_ref())
            .and_then(|source| source.field_ref.as_ref())
            .map(|selector| selector.field_path.clone())
    };
    assert_eq!(field("NAMESPACE").as_deref(), Some("metadata.namespace"));
    assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
    // The node, whose zone label is the replica's own zone.
    assert_eq!(field("NODE_NAME").as_deref(), Some("spec.nodeName"));
}

#[test]
fn termination_grace_covers_the_drain_and_requests_in_flight() {
    let manifests = Manifests::load();
    let grace = |name: &str| {
        // Kubernetes' default when the field is absent.
        manifests
            .app(name)
            .0
            .termination_grace_period_seconds
            .unwrap_or(30)
    };
    let backend_delay = i64::try_from(manifests.backend_config().shutdown_delay.as_secs())
        .expect("seconds fit in i64");
    assert!(
        grace(BACKEND) >= backend_delay + IN_FLIGHT_ALLOWANCE_SECONDS,
        "backend: grace {}s vs shutdownDelay {backend_delay}s",
        grace(BACKEND)
    );
    // `drainSeconds` is read from the JSON so this holds whether or not the
    // config sets it.
    let config: Value =
        serde_json::from_str(manifests.config_text(LOADBALANCER)).expect("config is JSON");
    let drain = config["drainSeconds"]
        .as_i64()
        .unwrap_or(DEFAULT_DRAIN_SECONDS);
    assert!(
        grace(LOADBALANCER) >= drain + IN_FLIGHT_ALLOWANCE_SECONDS,
        "loadbalancer: grace {}s vs drainSeconds {drain}s",
        grace(LOADBALANCER)
    );
}

#[test]
fn the_loadbalancer_service_reaches_its_pods_and_kind_maps_its_node_port() {
    let manifests = Manifests::load();
    let service = manifests.get::<Service>("loadbalancer-service");
    let spec = service.spec.as_ref().expect("a Service has a spec");
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_selects(service, manifests.get::<Deployment>(LOADBALANCER));

    let (_, container) = manifests.app(LOADBALANCER);
    let config = manifests.loadbalancer_config();
    let grpc_port = config
        .listen
        .grpc_port
        .expect("the demo serves gRPC clients on grpcPort");
    for (name, expected) in [
        ("http", config.listen.port),
        ("admin", config.listen.admin_port),
        ("grpc", grpc_port),
    ] {
        let port = service_port(service, name);
        let target = port
            .target_port
            .clone()
            .unwrap_or(IntOrString::Int(port.port));
        assert_eq!(resolve(container, &target), expected, "Service port {name}");
    }
    // `kubectl port-forward svc/loadbalancer-service 9090` needs the Service port
    // to be the admin port itself.
    assert_eq!(
        service_port(service, "admin").port,
        i32::from(config.listen.admin_port)
    );

    let node_port = service_port(service, "http")
        .node_port
        .expect("a fixed nodePort, so kind can map it");
    assert_kind_maps(node_port, KIND_HOST_PORT);
    // gRPC clients reach the gRPC port from the host at the same number.
    let grpc = service_port(service, "grpc");
    assert_eq!(grpc.port, i32::from(grpc_port));
    assert_eq!(grpc.app_protocol.as_deref(), Some("kubernetes.io/h2c"));
    let node_port = grpc
        .node_port
        .expect("a fixed nodePort, so kind can map it");
    assert_kind_maps(node_port, u64::from(grpc_port));
}

// --- TLS: the Secret, the port, and the opt-in config in k8s/tls/ -------------------

#[test]
fn the_tls_configmap_is_the_shipped_config_plus_a_tls_section() {
    let manifests = Manifests::load();
    let tls = Manifests::load_dir(TLS_DIR);
    let opt_in = tls_config_map(&tls);
    let shipped = manifests.get::<ConfigMap>(&mounted_config_map(manifests.app(LOADBALANCER)));
    // The same name and labels: applying it replaces the ConfigMap the pods mount.
    assert_eq!(
        opt_in.metadata, shipped.metadata,
        "{TLS_DIR}/ replaces the ConfigMap the load balancer mounts"
    );
    let files = |config_map: &ConfigMap| {
        let data = config_map.data.clone().unwrap_or_default();
        (
            data.into_keys().collect::<Vec<_>>(),
            config_map.binary_data.is_none(),
        )
    };
    assert_eq!(files(opt_in), files(shipped), "the same files");

    // `kubectl apply -f k8s/` must work without the Secret: only the opt-in has `tls`.
    let shipped: Value =
        serde_json::from_str(manifests.config_text(LOADBALANCER)).expect("config is JSON");
    assert!(
        shipped.get("tls").is_none(),
        "the shipped config keeps TLS off"
    );
    // The load balancer reads it as a whole, `tls` included.
    let parsed = loadbalancer::config::Config::parse(config_file(opt_in), Path::new(TLS_DIR))
        .unwrap_or_else(|error| panic!("{TLS_DIR}/: {error}"));
    assert!(parsed.tls.tls.is_some(), "the opt-in config turns TLS on");
    let mut config: Value = serde_json::from_str(config_file(opt_in)).expect("config is JSON");
    let section = config
        .as_object_mut()
        .and_then(|config| config.remove("tls"))
        .expect("the opt-in config has a `tls` section");
    assert_eq!(
        config, shipped,
        "apart from `tls`, {TLS_DIR}/ must hold the shipped config: change both together"
    );
    let section = section.as_object().expect("`tls` is an object");
    let (_, container) = manifests.app(LOADBALANCER);
    assert_eq!(
        section.get("port").and_then(Value::as_u64),
        Some(u64::from(named_port(container, "https"))),
        "tls.port is the container port named https"
    );
    let (_, mount) = secret_mount(manifests.app(LOADBALANCER), TLS_SECRET);
    for key in ["certFile", "keyFile"] {
        let file = section
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("tls.{key} is set to a path"));
        assert!(
            Path::new(file).starts_with(&mount.mount_path),
            "tls.{key} {file} is not under {}, where Secret {TLS_SECRET} is mounted",
            mount.mount_path
        );
    }
}

#[test]
fn the_tls_secret_is_optional_and_mounted_read_only_where_the_tls_config_reads_it() {
    let manifests = Manifests::load();
    let (pod, _) = manifests.app(LOADBALANCER);
    let (source, mount) = secret_mount(manifests.app(LOADBALANCER), TLS_SECRET);
    // Without the Secret, the pods still start (and serve plaintext).
    assert_eq!(
        source.optional,
        Some(true),
        "Secret {TLS_SECRET} is optional"
    );
    assert_eq!(mount.read_only, Some(true), "mounted read-only");
    // A subPath mount is never updated: a rotated Secret would need a restart.
    assert!(
        mount.sub_path.is_none() && mount.sub_path_expr.is_none(),
        "no subPath: the whole Secret is mounted"
    );
    // Every key of the Secret becomes a file of its own name.
    assert!(
        source.items.is_none(),
        "no `items` renaming the Secret's keys"
    );

    // The certificate and key are the Secret's files, where the opt-in config
    // reads them.
    let section = tls_section(&Manifests::load_dir(TLS_DIR));
    for (key, secret_key) in ["certFile", "keyFile"].into_iter().zip(TLS_SECRET_KEYS) {
        let file = section
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("tls.{key} is set to a path"));
        assert_eq!(
            Path::new(file),
            Path::new(&mount.mount_path).join(secret_key),
            "tls.{key}: the file of the Secret's key {secret_key}"
        );
    }

    // The key is readable by the pod's group (the kubelet gives the files to the
    // fsGroup) and by no one else.
    let mode = source
        .default_mode
        .expect("a defaultMode that hides the key");
    assert_eq!(mode & 0o007, 0, "mode {mode:o}: not world-readable");
    assert_ne!(mode & 0o040, 0, "mode {mode:o}: group-readable");
    let context = pod
        .security_context
        .as_ref()
        .expect("a pod securityContext");
    assert!(context.fs_group.is_some(), "an fsGroup owns the files");
}

#[test]
fn the_https_service_port_reaches_the_tls_port_and_kind_maps_its_node_port() {
    let manifests = Manifests::load();
    let service = manifests.get::<Service>("loadbalancer-service");
    let (_, container) = manifests.app(LOADBALANCER);
    let tls_port = named_port(container, "https");
    let port = service_port(service, "https");
    let target = port
        .target_port
        .clone()
        .unwrap_or(IntOrString::Int(port.port));
    assert_eq!(
        target,
        IntOrString::String("https".to_owned()),
        "Service port https targets the container port by its name"
    );
    assert_eq!(resolve(container, &target), tls_port, "Service port https");
    // `kubectl port-forward svc/loadbalancer-service 8443:8443` and in-cluster
    // clients use the TLS port itself.
    assert_eq!(port.port, i32::from(tls_port));

    let node_port = port
        .node_port
        .expect("a fixed nodePort, so kind can map it");
    assert_kind_maps(node_port, KIND_TLS_HOST_PORT);
}

#[test]
fn make_tls_cert_names_the_loadbalancer_service() {
    let manifests = Manifests::load();
    let service = manifests.get::<Service>("loadbalancer-service");
    let name = service.metadata.name.as_deref().unwrap_or_default();
    let makefile = read("Makefile");
    let names: Vec<&str> = makefile
        .split("subjectAltName=")
        .nth(1)
        .and_then(|rest| rest.split(['"', '\'', ' ']).next())
        .expect("make tls-cert sets subjectAltName")
        .split(',')
        .collect();
    // A client inside the cluster (default namespace) verifies the Service's name.
    for expected in [
        "DNS:localhost",
        "IP:127.0.0.1",
        &format!("DNS:{name}.default.svc"),
    ] {
        assert!(names.contains(&expected), "{expected} is not in {names:?}");
    }
}

// --- the production extras (k8s/production/) ----------------------------------------

/// Whether `selector` (a `matchLabels` selector, all these manifests use) picks
/// the pods of `deployment`, and not every pod.
fn selects(
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    deployment: &Deployment,
) -> bool {
    let Some(selector) = selector else {
        return false;
    };
    let labels = pod_labels(deployment);
    let wanted = selector.match_labels.clone().unwrap_or_default();
    selector.match_expressions.is_none()
        && !wanted.is_empty()
        && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The fewest replicas `deployment` may run: its `replicas`, or the
/// autoscaler's `minReplicas` when one scales it.
fn fewest_replicas(deployment: &Deployment, production: &Manifests) -> i32 {
    let name = deployment.metadata.name.as_deref();
    let scaled = production
        .all::<HorizontalPodAutoscaler>()
        .into_iter()
        .filter_map(|hpa| hpa.spec.as_ref())
        .find(|spec| Some(spec.scale_target_ref.name.as_str()) == name)
        .map(|spec| spec.min_replicas.unwrap_or(1));
    scaled.unwrap_or_else(|| {
        deployment
            .spec
            .as_ref()
            .and_then(|spec| spec.replicas)
            .unwrap_or(1)
    })
}

#[test]
fn the_production_directory_holds_only_known_kubernetes_objects() {
    let production = Manifests::load_dir(PRODUCTION_DIR);
    assert_eq!(production.all::<PodDisruptionBudget>().len(), 2);
    assert_eq!(production.all::<HorizontalPodAutoscaler>().len(), 1);
    // Deployments stay in k8s/: applying both directories must not leave two
    // definitions of one Deployment fighting over it.
    assert!(production.all::<Deployment>().is_empty());
}

#[test]
fn each_deployment_has_a_disruption_budget_that_never_blocks_every_eviction() {
    let (base, production) = (Manifests::load(), Manifests::load_dir(PRODUCTION_DIR));
    for deployment in base.all::<Deployment>() {
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let budgets: Vec<_> = production
            .all::<PodDisruptionBudget>()
            .into_iter()
            .filter(|pdb| {
                selects(
                    pdb.spec.as_ref().and_then(|s| s.selector.as_ref()),
                    deployment,
                )
            })
            .collect();
        assert_eq!(budgets.len(), 1, "{name}: exactly one PodDisruptionBudget");
        let spec = budgets[0].spec.as_ref().expect("a budget has a spec");
        let replicas = fewest_replicas(deployment, &production);
        // An eviction is allowed while more than minAvailable pods are up, or
        // fewer than maxUnavailable are down.
        let evictable = match (&spec.min_available, &spec.max_unavailable) {
            (Some(IntOrString::Int(min)), None) => *min < replicas,
            (None, Some(IntOrString::Int(max))) => *max >= 1,
            other => {
                panic!("{name}: give one of minAvailable or maxUnavailable, as a number: {other:?}")
            }
        };
        assert!(
            evictable,
            "{name}: the budget blocks every eviction at {replicas} replicas"
        );
    }
}

#[test]
fn the_autoscaler_scales_the_backend_on_cpu_that_its_pods_request() {
    let (base, production) = (Manifests::load(), Manifests::load_dir(PRODUCTION_DIR));
    let hpa = production.get::<HorizontalPodAutoscaler>(BACKEND);
    let spec = hpa.spec.as_ref().expect("an autoscaler has a spec");
    let target = &spec.scale_target_ref;
    assert_eq!(
        (
            target.api_version.as_deref(),
            target.kind.as_str(),
            target.name.as_str()
        ),
        (Some("apps/v1"), "Deployment", BACKEND)
    );
    let min = spec.min_replicas.unwrap_or(1);
    assert!(
        min >= 2 && min <= spec.max_replicas,
        "{min}..{}",
        spec.max_replicas
    );
    let metrics = spec.metrics.as_deref().unwrap_or_default();
    let cpu = metrics
        .iter()
        .filter_map(|metric| metric.resource.as_ref())
        .find(|resource| resource.name == "cpu")
        .expect("the autoscaler scales on CPU");
    assert_eq!(cpu.target.type_, "Utilization");
    assert!(
        cpu.target
            .average_utilization
            .is_some_and(|u| (1..=100).contains(&u))
    );
    // Utilization is a share of the request: without one it cannot be computed.
    let (_, container) = base.app(BACKEND);
    let requests = container
        .resources
        .as_ref()
        .and_then(|resources| resources.requests.as_ref());
    assert!(
        requests.is_some_and(|requests| requests.contains_key("cpu")),
        "backend: the autoscaler needs a CPU request"
    );
}

#[test]
fn both_deployments_spread_over_zones_and_nodes_without_ever_blocking() {
    let manifests = Manifests::load();
    for deployment in manifests.all::<Deployment>() {
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let constraints = pod_spec(deployment)
            .topology_spread_constraints
            .as_deref()
            .unwrap_or_default();
        let keys: BTreeSet<&str> = constraints
            .iter()
            .map(|c| c.topology_key.as_str())
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["topology.kubernetes.io/zone", "kubernetes.io/hostname"]),
            "{name}"
        );
        for constraint in constraints {
            // DoNotSchedule would leave pods pending on a one-node cluster.
            assert_eq!(constraint.when_unsatisfiable, "ScheduleAnyway", "{name}");
            assert!(
                selects(constraint.label_selector.as_ref(), deployment),
                "{name}: the spread counts its own pods"
            );
        }
    }
}

#[test]
fn a_rolling_update_of_the_loadbalancer_loses_no_request() {
    let manifests = Manifests::load();
    let deployment = manifests.get::<Deployment>(LOADBALANCER);
    let spec = deployment.spec.as_ref().expect("a Deployment has a spec");
    assert!(
        spec.replicas.unwrap_or(1) >= 2,
        "one replica serves while another restarts"
    );
    let rolling = spec
        .strategy
        .as_ref()
        .and_then(|strategy| strategy.rolling_update.as_ref())
        .expect("a RollingUpdate strategy");
    // A new pod is ready before an old one stops.
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    // The old pod drains, then finishes what it holds, before SIGKILL.
    let config = manifests.loadbalancer_config();
    let (pod, container) = manifests.app(LOADBALANCER);
    let pre_stop = container
        .lifecycle
        .as_ref()
        .and_then(|lifecycle| lifecycle.pre_stop.as_ref());
    assert!(
        pre_stop.is_none(),
        "the process drains itself; a preStop would add to it"
    );
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    let needed = config.limits.drain_seconds + config.limits.shutdown_timeout_seconds;
    assert!(
        u64::try_from(grace).is_ok_and(|grace| grace > needed),
        "grace {grace}s must exceed drainSeconds + shutdownTimeoutSeconds = {needed}s"
    );
}
