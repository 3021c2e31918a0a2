//! What a backend port speaks: HTTP/1.1, or HTTP/2 in cleartext (h2c).
//!
//! A Service says it per port, in the EndpointSlice port's `appProtocol`
//! (`kubernetes.io/h2c` is the standard value for HTTP/2 without TLS); the
//! config's `backendProtocol` says it where there is no Service (static
//! discovery) or overrides it. Discovery publishes what the slices say
//! ([`LearnedProtocols`]); the proxy combines that with the config per request.

use serde::{Deserialize, Serialize};

/// The protocol the proxy speaks to a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// HTTP/1.1 over keep-alive connections, one request at a time on each.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge, without TLS: many requests multiplexed on
    /// few connections. What gRPC servers speak.
    H2c,
}

impl BackendProtocol {
    /// The protocol an EndpointSlice port's `appProtocol` names, if it is one
    /// the proxy speaks. `kubernetes.io/h2c` is the standard name; `h2c` and
    /// `grpc` are what Services in the wild use for the same thing.
    pub fn from_app_protocol(app_protocol: &str) -> Option<Self> {
        match app_protocol {
            "kubernetes.io/h2c" | "h2c" | "grpc" => Some(Self::H2c),
            // A WebSocket port speaks HTTP/1.1 until the upgrade.
            "http" | "http1" | "kubernetes.io/ws" => Some(Self::Http1),
            _ => None,
        }
    }

    /// How metrics and logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2c => "h2c",
        }
    }
}

/// What the EndpointSlices say the backend ports speak; `None` where a port has
/// no `appProtocol` (or one the proxy does not know), or discovery is static.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LearnedProtocols {
    /// The port of `backendPort`.
    pub backend_port: Option<BackendProtocol>,
    /// The port of `backendGrpcPort`.
    pub grpc_port: Option<BackendProtocol>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_protocols_map_to_what_the_proxy_speaks() {
        for h2c in ["kubernetes.io/h2c", "h2c", "grpc"] {
            assert_eq!(
                BackendProtocol::from_app_protocol(h2c),
                Some(BackendProtocol::H2c)
            );
        }
        assert_eq!(
            BackendProtocol::from_app_protocol("http"),
            Some(BackendProtocol::Http1)
        );
        // TLS to backends is not spoken.
        for unknown in ["kubernetes.io/wss", "https", ""] {
            assert_eq!(BackendProtocol::from_app_protocol(unknown), None);
        }
    }
}
