//! Kubernetes-aware HTTP load balancer.
//!
//! A request travels config → discovery → balancer → proxy → server:
//! `discovery` keeps the shared [`backends::Backends`] list current, `balancer`
//! picks the next address from it, `proxy` forwards the request there, and
//! `server` accepts client connections and shuts down gracefully. `main.rs` only
//! wires these together.

pub mod backend_state;
pub mod backends;
pub mod discovery;
