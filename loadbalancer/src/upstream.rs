//! Upstream: the load balancer's HTTP clients toward the backends.
//!
//! Below the proxy and the health checks, which both use it: [`pool`] keeps
//! keep-alive connections to each backend, and [`http1`] runs one exchange on a
//! connection the pool lends (write the request, read the response head, decode
//! the body as it streams). For backends that speak HTTP/2, [`http2`] keeps a
//! few multiplexed connections to each instead. It knows nothing of balancing,
//! retries or metrics; it sends one request to one address and says how that
//! went.

mod http1;
mod http2;
mod pool;

/// A map keyed by backend address, as both pools keep one, looked up on every
/// request. Hashed with foldhash rather than std's SipHash, which costs more
/// than the rest of the lookup; SipHash guards against keys chosen to collide,
/// and these keys come from discovery, not from clients.
type ByBackend<V> = std::collections::HashMap<std::net::SocketAddr, V, foldhash::fast::RandomState>;

pub(crate) use http1::UpstreamHead;
pub use http1::{ChunkedError, ExchangeError};
pub use http2::{DEFAULT_CONNECTIONS_PER_BACKEND, Http2ConnectError, Http2Error, Http2Stats};
pub(crate) use http2::{Http2Body, Http2Pool};
pub use pool::Upgraded;
pub use pool::{IDLE_TIMEOUT, MAX_IDLE_PER_BACKEND, UpstreamError};
pub(crate) use pool::{PooledBody, UpstreamPool};
