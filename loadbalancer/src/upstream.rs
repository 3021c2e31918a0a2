//! Upstream: the load balancer's HTTP/1.1 client toward the backends.
//!
//! Below the proxy and the health checks, which both use it: [`pool`] keeps
//! keep-alive connections to each backend, and [`http1`] runs one exchange on a
//! connection the pool lends (write the request, read the response head, decode
//! the body as it streams). It knows nothing of balancing, retries or metrics;
//! it sends one request to one address and says how that went.

mod http1;
mod pool;

pub(crate) use http1::UpstreamHead;
pub use http1::{ChunkedError, ExchangeError};
pub use pool::Upgraded;
pub use pool::{IDLE_TIMEOUT, MAX_IDLE_PER_BACKEND, UpstreamError};
pub(crate) use pool::{PooledBody, UpstreamPool};
