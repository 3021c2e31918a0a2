//! Demo backend library: config, handlers and server, started by `main.rs`.
