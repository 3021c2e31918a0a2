//! Kubernetes-aware HTTP load balancer.
//!
//! A request travels config → discovery → balancer → proxy → server:
//! `config` reads the file, `discovery` keeps the shared [`backends::Backends`]
//! list current (it holds the list's only writer), `balancer` picks the next
//! address from it, `proxy` forwards the request there over `upstream` (the
//! HTTP/1.1 client and its connection pool), and `server` accepts client
//! connections, through `workers` (one thread per core) and
//! [`service_kit::listener`], the hardened accept loop the backend runs too, and
//! shuts down gracefully when `shutdown` says so. `admin` answers the probes and
//! metrics on a port of its own, and `service_kit::logging` sets up the
//! structured logs.
//!
//! Resilience sits beside that path: `health` probes every backend in the
//! background, `outlier` ejects backends whose requests keep failing (both mark
//! each backend's [`backend_state::BackendState`], which the balancer reads), and
//! `retry` decides when the proxy repeats a failed attempt on another backend.
//! Traffic policy sits there too: `ratelimit` refuses clients over their rate,
//! and `concurrency` caps the requests in flight at each backend and queues
//! the rest briefly.
//! `topology` learns this replica's zone and node, for routing that prefers
//! backends close by.
//!
//! [`app::App`] owns start-up and the shutdown order, `reload` applies a changed
//! config file while serving, and `main.rs` only parses flags, loads the config
//! and runs the app. Modules are layered: each imports only modules below it,
//! from the leaves (metrics, shutdown, balancer, retry) through the backend list
//! and the parts that use it up to config, app and reload; an architecture test
//! keeps it so (`docs/architecture.md` has the table).

pub mod admin;
pub mod app;
pub mod backend_state;
pub mod backends;
pub mod balancer;
pub mod client_ip;
pub mod concurrency;
pub mod config;
pub mod discovery;
pub mod health;
pub mod metrics;
pub mod outlier;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
mod response;
pub mod retry;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod topology;
pub mod upstream;
pub mod workers;
