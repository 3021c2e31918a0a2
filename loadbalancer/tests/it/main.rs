//! The load balancer's integration tests, as one test program (`cargo test -p
//! loadbalancer --test it`): each module below is one area, run against the
//! public API in-process or against the built binaries, and [`support`] holds the
//! servers, clients and fakes they share, compiled once for all of them. Run one
//! area with a filter on its module path, e.g. `cargo test -p loadbalancer --test
//! it proxy::`.

mod support;

mod admin;
mod architecture;
mod balancing;
mod binary;
mod chaos;
mod config_reference;
mod discovery;
mod dockerfile;
mod docs_links;
mod dual_stack;
mod grpc;
mod hardening;
mod http2;
mod kubernetes_e2e;
mod logs;
mod manifests;
mod metrics;
mod policy;
mod pool;
mod proxy;
mod reload;
mod server;
mod status_page;
mod tls;
mod topology;
mod topology_routing;
mod tunnels;
mod upstream_wire;
mod websocket;
mod workers;
