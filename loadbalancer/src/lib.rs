//! Kubernetes-aware HTTP load balancer.
//!
//! A request travels config → discovery → balancer → proxy → server:
//! `config` is read once at start-up, `discovery` keeps the shared
//! [`backends::Backends`] list current, `balancer` picks the next address from it,
//! `proxy` forwards the request there, and `server` accepts client connections and
//! shuts down gracefully when `shutdown` says so. `admin` answers the probes on a
//! port of its own, and `logging` sets up the structured logs. `main.rs` only wires
//! these together.

pub mod admin;
pub mod backend_state;
pub mod backends;
pub mod balancer;
pub mod config;
pub mod discovery;
pub mod logging;
pub mod proxy;
mod response;
pub mod server;
pub mod shutdown;
pub mod workers;
