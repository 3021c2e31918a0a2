//! Our own zone (issue #21 item 1), learned against the fake API server through
//! the real kube client: the config's `zone` wins over the Node; otherwise the
//! Node's `topology.kubernetes.io/zone` label; an API server that refuses `get
//! nodes` (no ClusterRole) leaves no zone and one warning that says why. The
//! App learns it at start-up and exposes it.

use std::io::Write;
use std::sync::{Arc, Mutex};

use loadbalancer::app::{App, Options};
use loadbalancer::config::Config;
use loadbalancer::topology::{Locality, LocalityLookup, NodeClient, TopologyConfig};

use crate::support::fake_apiserver::FakeApiServer;
use crate::support::wait_for;

const NODE: &str = "node-1";

/// Log lines written while the returned guard lives, on this thread.
#[derive(Debug, Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn install() -> (Self, tracing::subscriber::DefaultGuard) {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    fn lines(&self, level: &str) -> Vec<String> {
        let bytes = self.0.lock().expect("never poisoned").clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|line| line.contains(level))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .expect("never poisoned")
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn node_gets(server: &FakeApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|request| request.path.starts_with("/api/v1/nodes/"))
        .count()
}

async fn lookup(server: &FakeApiServer, zone: Option<&str>) -> Option<Locality> {
    let config = TopologyConfig {
        zone: zone.map(str::to_owned),
        ..TopologyConfig::default()
    };
    LocalityLookup::new(
        Some(NODE.to_owned()),
        Some(NodeClient(server.client().await)),
    )
    .update(&config, true)
    .await
}

#[tokio::test]
async fn the_configured_zone_wins_over_the_node_label() {
    let server = FakeApiServer::start().await;
    server.add_node(NODE, Some("zone-a"));
    let locality = lookup(&server, Some("zone-c")).await;
    assert_eq!(
        locality,
        Some(Locality {
            node: Some(NODE.to_owned()),
            zone: "zone-c".to_owned()
        })
    );
    assert_eq!(node_gets(&server), 0, "a configured zone needs no API call");
}

#[tokio::test]
async fn the_zone_comes_from_the_node_label() {
    let server = FakeApiServer::start().await;
    server.add_node(NODE, Some("zone-a"));
    let locality = lookup(&server, None).await;
    assert_eq!(
        locality,
        Some(Locality {
            node: Some(NODE.to_owned()),
            zone: "zone-a".to_owned()
        })
    );
    assert_eq!(node_gets(&server), 1);
}

#[tokio::test]
async fn without_rbac_for_nodes_there_is_no_zone_and_one_warning() {
    let server = FakeApiServer::start().await;
    server.add_node(NODE, Some("zone-a"));
    server.refuse_nodes();
    let (log, _guard) = Captured::install();
    assert_eq!(lookup(&server, None).await, None);
    let warnings = log.lines("WARN");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    for needle in [
        "cannot learn this replica's zone",
        "not allowed to get node",
        "nodes",
    ] {
        assert!(
            warnings[0].contains(needle),
            "{needle:?} in {}",
            warnings[0]
        );
    }
}

#[tokio::test]
async fn a_node_without_a_zone_label_or_no_node_name_warns_once_each() {
    let server = FakeApiServer::start().await;
    server.add_node(NODE, None);
    let (log, _guard) = Captured::install();
    assert_eq!(lookup(&server, None).await, None);
    let unnamed = LocalityLookup::new(None, Some(NodeClient(server.client().await)));
    assert_eq!(unnamed.update(&TopologyConfig::default(), true).await, None);
    let warnings = log.lines("WARN");
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].contains("no topology.kubernetes.io/zone label"),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[1].contains("NODE_NAME is not set"),
        "{}",
        warnings[1]
    );
}

#[tokio::test]
async fn topology_aware_off_skips_the_lookup() {
    let server = FakeApiServer::start().await;
    server.add_node(NODE, Some("zone-a"));
    let config = TopologyConfig {
        zone: None,
        topology_aware: false,
    };
    let lookup = LocalityLookup::new(
        Some(NODE.to_owned()),
        Some(NodeClient(server.client().await)),
    );
    assert_eq!(lookup.update(&config, true).await, None);
    assert_eq!(node_gets(&server), 0);
}

#[tokio::test]
async fn the_app_learns_its_zone_at_start() {
    let server = FakeApiServer::start().await;
    server.add_node(NODE, Some("zone-b"));
    let config = Config::parse(
        r#"{"port": 0, "adminPort": 0, "bindAddress": "127.0.0.1",
            "backendServiceName": "web", "backendPort": 80,
            "discovery": "static", "staticBackends": ["127.0.0.1:9"], "zone": "zone-b"}"#,
        std::path::Path::new("topology-test.json"),
    )
    .expect("a valid config");
    let options = Options {
        workers: std::num::NonZeroUsize::MIN,
        health_checks: false,
        node_name: Some(NODE.to_owned()),
        kube_client: Some(NodeClient(server.client().await)),
        ..Options::default()
    };
    let app = App::start(config, options).await.expect("the app starts");
    let locality = wait_for("the zone", || app.locality(), Option::is_some).await;
    assert_eq!(locality.map(|l| l.zone).as_deref(), Some("zone-b"));
    app.stop(std::time::Duration::ZERO).await;
}
