//! The demo backend's integration tests, as one test program (`cargo test -p
//! backend --test it`): each module below is one area, run against a server
//! in-process or against the built binary, and [`support`] holds the servers,
//! clients and temporary directories they share, compiled once for all of them.
//! Run one area with a filter on its module path, e.g. `cargo test -p backend
//! --test it http::`.

mod support;

mod binary;
mod config;
mod dockerfile;
mod grpc;
mod http;
mod metrics;
mod reload;
mod shutdown;
mod websocket;
