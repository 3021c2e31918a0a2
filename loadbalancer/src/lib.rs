//! Kubernetes-aware HTTP load balancer.
//!
//! A request travels config → discovery → balancer → proxy → server: `config` is
//! read once at start-up, `discovery` keeps the shared [`backends::Backends`] list
//! current, `balancer` picks the next address from it, `proxy` forwards the request
//! there, and `server` accepts client connections (through
//! [`service_kit::listener`], the hardened accept loop the backend runs too) and
//! shuts down gracefully when `shutdown` says so. `admin` answers the probes on a
//! port of its own, and `service_kit::logging` sets up the structured logs.
//! `main.rs` only wires these together.
//!
//! Resilience sits beside that path: `health` probes every backend in the
//! background, `outlier` ejects backends whose requests keep failing (both mark
//! each backend's [`backend_state::BackendState`], which the balancer reads), and
//! `retry` decides when the proxy repeats a failed attempt on another backend.
//! `reload` watches the config file and applies a valid change while serving.

pub mod admin;
pub mod backend_state;
pub mod backends;
pub mod balancer;
pub mod config;
pub mod discovery;
pub mod health;
pub mod metrics;
pub mod outlier;
pub mod proxy;
pub mod reload;
mod response;
pub mod retry;
pub mod server;
pub mod shutdown;
pub mod workers;
