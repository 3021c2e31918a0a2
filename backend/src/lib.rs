//! The demo backend: an HTTP service that answers with the identity of the pod it
//! runs in, so that a load balancer in front of several replicas can be watched at
//! work.
//!
//! A request flows through the modules in this order: [`server`] accepts the
//! connection (through [`service_kit::listener`], the hardened accept loop the
//! load balancer runs too) and hands each request to [`handlers::App`], which
//! answers from the [`identity::Identity`] worked out at start-up, and counts it
//! in [`metrics`]. A WebSocket handshake on `/ws` is answered the same way, after
//! which the connection belongs to a session of [`handlers::websocket`].
//! With `grpcPort` set, [`grpc`] serves the same identity over gRPC (h2c) on a
//! second listener beside it, on the same app and with the same shutdown.
//! [`config`] and the logging set-up ([`service_kit::logging`]) run once before
//! that, and [`reload`] applies a new log level from the config file while it
//! runs; [`shutdown`] produces the signal that ends it.
//!
//! To run a backend in-process (as the load balancer's tests do), bind a listener and
//! call [`server::serve`] with an [`handlers::App`]; see its docs for an example.
//! [`grpc::serve`] does the same for gRPC, and [`grpc::proto`] holds the client.

pub mod config;
pub mod grpc;
pub mod handlers;
pub mod identity;
pub mod metrics;
pub mod reload;
pub mod server;
pub mod shutdown;
