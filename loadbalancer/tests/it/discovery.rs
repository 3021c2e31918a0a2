//! Kubernetes discovery against the fake API server, through the real kube client and
//! the real kube-runtime watcher: what the shared backend list shows after each thing
//! a cluster can do (pods come and go, turn unready, slices split or vanish, watches
//! drop, history expires, the API server goes away).

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use loadbalancer::backends::{BackendProtocol, Backends, BackendsWriter, LearnedProtocols};
use loadbalancer::discovery::KubernetesSource;
use loadbalancer::discovery::kubernetes::watch_endpoint_slices;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::support::fake_apiserver::EndpointState::{self, NotReady, Ready, Terminating, Unset};
use crate::support::fake_apiserver::{FakeApiServer, NAMESPACE, RecordedRequest, slice};
use crate::support::wait_for;

const SERVICE: &str = "web";
const PORT: u16 = 8080;
/// The backends' gRPC port, whose `appProtocol` discovery reads too.
const GRPC_PORT: u16 = 9000;

/// Discovery running in a task against a fake server; aborted when dropped.
struct Discovery {
    backends: Backends,
    task: JoinHandle<()>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts discovery of [`SERVICE`] in the kubeconfig's namespace.
async fn discover(server: &FakeApiServer) -> Discovery {
    discover_in(server, None).await
}

async fn discover_in(server: &FakeApiServer, namespace: Option<&str>) -> Discovery {
    let client = server.client().await;
    let source = KubernetesSource {
        namespace: namespace.map(str::to_owned),
        service_name: SERVICE.to_owned(),
        port: PORT,
        grpc_port: Some(GRPC_PORT),
    };
    let writer = BackendsWriter::new();
    let backends = writer.reader();
    // No locality: topology-aware routing has its own tests.
    let locality = watch::channel(None).1;
    let task = tokio::spawn(async move {
        let ended = watch_endpoint_slices(client, &source, &writer, locality).await;
        panic!("discovery returned {ended:?}; it should watch forever");
    });
    Discovery { backends, task }
}

/// A slice of [`SERVICE`] with the backends on [`PORT`].
fn web(name: &str, endpoints: &[(&str, EndpointState)]) -> EndpointSlice {
    slice(name, SERVICE, endpoints, PORT)
}

fn addrs(ips: &[&str]) -> Vec<SocketAddr> {
    ips.iter()
        .map(|ip| {
            let ip = ip.parse().expect("test IP parses");
            SocketAddr::new(ip, PORT)
        })
        .collect()
}

impl Discovery {
    /// Waits until the published list is exactly `ips` on [`PORT`] (sorted).
    async fn wait_for_backends(&self, ips: &[&str]) {
        let expected = addrs(ips);
        wait_for(
            &format!("backends {expected:?}"),
            || self.backends.snapshot(),
            |current| *current == expected,
        )
        .await;
    }
}

/// The EndpointSlice requests among `requests` (discovery watches the
/// Service too).
fn of_slices(requests: &[RecordedRequest]) -> impl Iterator<Item = &RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.path.ends_with("/endpointslices"))
}

fn lists(requests: &[RecordedRequest]) -> usize {
    of_slices(requests).filter(|r| !r.is_watch()).count()
}

fn watches(requests: &[RecordedRequest]) -> usize {
    of_slices(requests).filter(|r| r.is_watch()).count()
}

/// Starts discovery and waits until it has published `ips` and is watching, so that
/// what the test does next happens to an established watch.
async fn watching(server: &FakeApiServer, ips: &[&str]) -> Discovery {
    let discovery = discover(server).await;
    discovery.wait_for_backends(ips).await;
    wait_for("an open watch", || server.open_watches(), |n| *n == 1).await;
    discovery
}

#[tokio::test]
async fn the_ports_app_protocol_says_what_the_backends_speak() {
    let server = FakeApiServer::start().await;
    let mut grpc = web("web-1", &[("10.0.0.1", Ready)]);
    let ports = grpc.ports.get_or_insert_with(Vec::new);
    ports[0].app_protocol = Some("kubernetes.io/h2c".to_owned());
    ports.push(EndpointPort {
        name: Some("grpc".to_owned()),
        port: Some(i32::from(GRPC_PORT)),
        app_protocol: Some("grpc".to_owned()),
        ..EndpointPort::default()
    });
    server.apply(grpc);
    let discovery = watching(&server, &["10.0.0.1"]).await;
    assert_eq!(
        discovery.backends.protocols(),
        LearnedProtocols {
            backend_port: Some(BackendProtocol::H2c),
            grpc_port: Some(BackendProtocol::H2c),
        }
    );

    // The Service drops the annotation: back to the config's choice (HTTP/1.1
    // by default).
    server.apply(web("web-1", &[("10.0.0.1", Ready)]));
    wait_for(
        "protocols forgotten",
        || discovery.backends.protocols(),
        |learned| *learned == LearnedProtocols::default(),
    )
    .await;
}

#[tokio::test]
async fn initial_list_is_published_and_marks_the_list_synced() {
    let server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.2", Ready), ("10.0.0.1", Unset)]));

    let discovery = watching(&server, &["10.0.0.1", "10.0.0.2"]).await;
    assert!(discovery.backends.is_synced());

    let requests = server.requests();
    let first = of_slices(&requests).next().expect("a request for slices");
    assert_eq!(
        first.path,
        format!("/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"),
        "the namespace comes from the kubeconfig context"
    );
    assert!(!first.is_watch(), "the watcher lists first");
}

#[tokio::test]
async fn not_synced_until_the_first_complete_list_arrives() {
    let mut server = FakeApiServer::start().await;
    server.stop().await;
    let discovery = discover(&server).await;

    // Give the watcher time to fail against the refused port; whatever it did meanwhile,
    // it has no list, so it must not claim to be synced.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!discovery.backends.is_synced());

    // A Service with no endpoints yet is still a complete answer.
    server.restart().await;
    wait_for(
        "synced",
        || discovery.backends.is_synced(),
        |synced| *synced,
    )
    .await;
    assert!(discovery.backends.snapshot().is_empty());
}

#[tokio::test]
async fn endpoints_added_to_and_removed_from_a_slice_follow() {
    let server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.1", Ready)]));
    let discovery = watching(&server, &["10.0.0.1"]).await;

    let three = [
        ("10.0.0.1", Ready),
        ("10.0.0.2", Ready),
        ("10.0.0.3", Ready),
    ];
    server.apply(web("web-1", &three));
    discovery
        .wait_for_backends(&["10.0.0.1", "10.0.0.2", "10.0.0.3"])
        .await;

    server.apply(web("web-1", &[("10.0.0.3", Ready), ("10.0.0.2", Ready)]));
    discovery.wait_for_backends(&["10.0.0.2", "10.0.0.3"]).await;
}

#[tokio::test]
async fn a_not_ready_endpoint_is_left_out_until_it_turns_ready() {
    let server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.1", Ready), ("10.0.0.2", NotReady)]));
    let discovery = watching(&server, &["10.0.0.1"]).await;

    server.apply(web("web-1", &[("10.0.0.1", Ready), ("10.0.0.2", Ready)]));
    discovery.wait_for_backends(&["10.0.0.1", "10.0.0.2"]).await;
}

#[tokio::test]
async fn a_deleted_slice_takes_its_endpoints_with_it() {
    let server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.1", Ready)]));
    server.apply(web("web-2", &[("10.0.0.2", Ready)]));
    let discovery = watching(&server, &["10.0.0.1", "10.0.0.2"]).await;

    server.delete("web-1");
    discovery.wait_for_backends(&["10.0.0.2"]).await;
}

#[tokio::test]
async fn two_slices_of_one_service_are_merged_without_duplicates() {
    let server = FakeApiServer::start().await;
    let discovery = watching(&server, &[]).await;

    server.apply(web("web-1", &[("10.0.0.3", Ready), ("10.0.0.1", Ready)]));
    // The controller may briefly list one pod in two slices while it moves it.
    server.apply(web("web-2", &[("10.0.0.2", Ready), ("10.0.0.1", Ready)]));
    discovery
        .wait_for_backends(&["10.0.0.1", "10.0.0.2", "10.0.0.3"])
        .await;
}

#[tokio::test]
async fn slices_of_another_service_are_never_requested() {
    let server = FakeApiServer::start().await;
    server.apply(slice("other-1", "other", &[("10.9.9.1", Ready)], PORT));
    server.apply(web("web-1", &[("10.0.0.1", Ready)]));
    let discovery = watching(&server, &["10.0.0.1"]).await;

    // A change to the other Service, then one to ours: once ours shows, the other's
    // would have too if the client had been sent it.
    server.apply(slice("other-1", "other", &[("10.9.9.2", Ready)], PORT));
    server.apply(web("web-1", &[("10.0.0.2", Ready)]));
    discovery.wait_for_backends(&["10.0.0.2"]).await;

    let requests = server.requests();
    assert!(
        lists(&requests) >= 1 && watches(&requests) >= 1,
        "{requests:?}"
    );
    for request in of_slices(&requests) {
        assert_eq!(
            request.param("labelSelector"),
            Some("kubernetes.io/service-name=web"),
            "the API server filters by Service, not the client: {request:?}"
        );
    }
}

#[tokio::test]
async fn an_explicit_namespace_overrides_the_kubeconfig_namespace() {
    let server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.1", Ready)]));
    let mut elsewhere = web("web-1", &[("10.0.0.7", Ready)]);
    elsewhere.metadata.namespace = Some("staging".to_owned());
    server.apply(elsewhere);

    let discovery = discover_in(&server, Some("staging")).await;
    discovery.wait_for_backends(&["10.0.0.7"]).await;
    assert!(
        server
            .requests()
            .iter()
            .all(|r| r.path.contains("/namespaces/staging/")),
        "{:?}",
        server.requests()
    );
}

#[tokio::test]
async fn a_dropped_watch_resumes_without_a_relist() {
    let server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.1", Ready)]));
    let discovery = watching(&server, &["10.0.0.1"]).await;

    server.close_watches();
    server.apply(web("web-1", &[("10.0.0.1", Ready), ("10.0.0.2", Ready)]));
    discovery.wait_for_backends(&["10.0.0.1", "10.0.0.2"]).await;

    let requests = server.requests();
    assert_eq!(
        lists(&requests),
        1,
        "resumed from its resourceVersion: {requests:?}"
    );
    assert_eq!(watches(&requests), 2, "{requests:?}");
}

#[tokio::test]
async fn a_410_on_an_open_watch_forces_a_relist() {
    let server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.1", Ready)]));
    let discovery = watching(&server, &["10.0.0.1"]).await;

    server.expire_watches_with_410();
    server.apply(web("web-2", &[("10.0.0.2", Ready)]));
    discovery.wait_for_backends(&["10.0.0.1", "10.0.0.2"]).await;
    wait_for("a second list", || lists(&server.requests()), |n| *n == 2).await;
}

#[tokio::test]
async fn a_relist_drops_a_slice_deleted_while_the_watch_was_down() {
    let mut server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.1", Ready)]));
    server.apply(web("web-2", &[("10.0.0.2", Ready)]));
    let discovery = watching(&server, &["10.0.0.1", "10.0.0.2"]).await;

    // While the client cannot watch, web-2 goes and the history of that is compacted
    // away: the DELETED event can never be delivered, only a re-list can tell.
    server.stop().await;
    server.delete("web-2");
    server.compact();
    server.restart().await;

    discovery.wait_for_backends(&["10.0.0.1"]).await;
    assert_eq!(
        lists(&server.requests()),
        2,
        "the watch resumed with 410, then re-listed"
    );
}

#[tokio::test]
async fn the_last_list_keeps_serving_while_the_api_server_is_gone() {
    let mut server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.1", Ready), ("10.0.0.2", Ready)]));
    let discovery = watching(&server, &["10.0.0.1", "10.0.0.2"]).await;

    server.stop().await;
    // Let the watcher run into the refused port a few times; no error may empty or
    // change the list, and readiness stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        discovery.backends.snapshot(),
        addrs(&["10.0.0.1", "10.0.0.2"])
    );
    assert!(discovery.backends.is_synced());

    // What changed while it was gone shows up once it is back.
    server.apply(web("web-1", &[("10.0.0.2", Ready), ("10.0.0.3", Ready)]));
    server.restart().await;
    discovery.wait_for_backends(&["10.0.0.2", "10.0.0.3"]).await;

    // And later changes keep flowing.
    server.apply(web("web-1", &[("10.0.0.3", Ready)]));
    discovery.wait_for_backends(&["10.0.0.3"]).await;
}

#[tokio::test]
async fn a_watch_error_is_recorded_and_later_syncs_are_stamped() {
    let mut server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.1", Ready)]));
    let discovery = watching(&server, &["10.0.0.1"]).await;
    let status = discovery.backends.discovery_status();
    assert_eq!(status.last_error(), None);
    assert_eq!(status.updates(), 1);
    let first_sync = status.last_sync().expect("the first list stamps a sync");

    server.stop().await;
    let error = wait_for(
        "a recorded watch error",
        || status.last_error(),
        Option::is_some,
    )
    .await
    .expect("checked by wait_for");
    assert!(!error.message.is_empty());
    assert!(error.at >= first_sync);

    // The error stays on record (with its time); the next list is a newer sync.
    server.apply(web("web-1", &[("10.0.0.1", Ready), ("10.0.0.2", Ready)]));
    server.restart().await;
    discovery.wait_for_backends(&["10.0.0.1", "10.0.0.2"]).await;
    assert_eq!(status.updates(), 2);
    assert!(status.last_sync().expect("synced") >= error.at);
    assert_eq!(status.last_error(), Some(error));
}

#[tokio::test]
async fn a_bookmark_lets_a_resumed_watch_skip_the_relist() {
    let server = FakeApiServer::start().await;
    server.apply(web("web-1", &[("10.0.0.1", Ready)]));
    let discovery = watching(&server, &["10.0.0.1"]).await;

    // Changes the client does not see move the revision past the one it holds; the
    // bookmark brings it up to date, so compacting the history does not hurt it.
    server.apply(slice("other-1", "other", &[("10.9.9.1", Ready)], PORT));
    server.bookmark();
    server.compact();
    server.close_watches();

    server.apply(web("web-1", &[("10.0.0.2", Ready)]));
    discovery.wait_for_backends(&["10.0.0.2"]).await;
    assert_eq!(lists(&server.requests()), 1, "{:?}", server.requests());
}

#[tokio::test]
async fn serving_terminating_endpoints_are_used_only_while_none_is_ready() {
    let server = FakeApiServer::start().await;
    let old = [("10.0.0.1", Terminating), ("10.0.0.2", NotReady)];
    server.apply(web("web-1", &old));
    let discovery = watching(&server, &["10.0.0.1"]).await;

    // A ready replacement arrives (in another slice): the terminating pod is dropped.
    server.apply(web("web-2", &[("10.0.0.3", Ready)]));
    discovery.wait_for_backends(&["10.0.0.3"]).await;
}

#[tokio::test]
async fn ipv6_endpoints_are_published_with_the_backend_port() {
    let server = FakeApiServer::start().await;
    server.apply(web("web-v6", &[("fd00::2", Ready), ("fd00::1", Ready)]));
    server.apply(web("web-v4", &[("10.0.0.1", Ready)]));
    let discovery = watching(&server, &["10.0.0.1", "fd00::1", "fd00::2"]).await;
    assert_eq!(
        discovery.backends.snapshot()[1],
        "[fd00::1]:8080"
            .parse::<SocketAddr>()
            .expect("literal parses")
    );
}
