//! TLS termination: the proxy's second listener speaks HTTPS with rustls.
//!
//! On Kubernetes a certificate arrives as a `kubernetes.io/tls` Secret mounted
//! into the pod (`tls.crt` and `tls.key`), and is rotated in place: cert-manager
//! renews it, and the kubelet swaps the mount's `..data` symlink, as it does for
//! the ConfigMap that live reload follows. So:
//!
//! * [`Tls::load`] reads every configured pair at start-up; a missing, broken,
//!   mismatched or expired pair stops the process with one line naming the file
//!   and the reason;
//! * [`Tls::watch`] polls the files (with the config file's watcher) and, when
//!   they change, loads them all again and swaps the set in whole for new
//!   handshakes; a broken set is rejected with a log line and a metric, and the
//!   certificates in force stay. Connections already open keep theirs;
//! * the set is chosen from per handshake by the client's SNI name
//!   ([`certs::CertSet`]), the first pair being the default;
//! * [`Tls`] is the listener's [`Handshake`]: the handshake runs in the
//!   connection's task within the header-read timeout, and every result is
//!   counted by outcome and protocol version.
//!
//! The protocol settings are rustls' defaults, which are what one would choose:
//! TLS 1.2 and 1.3 only, their modern cipher suites, ECDSA and RSA keys, session
//! resumption by tickets (TLS 1.3) and a session cache (TLS 1.2), and ALPN
//! offering `h2`, then `http/1.1`. The crypto is the `ring` provider the Kubernetes client
//! already brings.

mod certs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::ServerSessionMemoryCache;
use serde::{Deserialize, Serialize};
use service_kit::config_watch::{ConfigFile, POLL_INTERVAL};
use service_kit::listener::Handshake;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, info};

pub use certs::{CertError, CertInfo};
use certs::{CertSet, Certificates};

use crate::metrics::{HandshakeFailure, Metrics, ReloadResult, TlsVersion};

/// The `tls` section of the config file: where the certificates are and which
/// port speaks HTTPS. Without it, the load balancer speaks plain HTTP only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The HTTPS port, beside the plain `port`; `0` picks a free port, as for
    /// `port`. Default 8443.
    pub port: u16,
    /// The default certificate chain (PEM). Default `/etc/tls/tls.crt`, where
    /// the manifests mount the `loadbalancer-tls` Secret.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1). Default `/etc/tls/tls.key`.
    pub key_file: PathBuf,
    /// Further pairs, chosen when a client's SNI name matches one of their
    /// certificate's names. Default none.
    pub certificates: Vec<CertPair>,
    /// Answer every plain-HTTP request with a 308 redirect to `https://`.
    /// Default `false`.
    pub redirect_http: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            port: 8443,
            cert_file: "/etc/tls/tls.crt".into(),
            key_file: "/etc/tls/tls.key".into(),
            certificates: Vec::new(),
            redirect_http: false,
        }
    }
}

/// One certificate chain and its key, as files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertPair {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TlsConfig {
    /// Every pair, the default first.
    fn pairs(&self) -> Vec<CertPair> {
        let default = CertPair {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        };
        std::iter::once(default)
            .chain(self.certificates.iter().cloned())
            .collect()
    }
}

/// The TLS side of the proxy listener; cheap to clone, every clone shares the
/// certificates in force.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    certificates: Arc<Certificates>,
    pairs: Arc<[CertPair]>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("pairs", &self.pairs)
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

/// ALPN protocols offered, most preferred first: HTTP/2 to the clients that
/// speak it, HTTP/1.1 to the others. The listener tells them apart by the
/// first bytes either way, so a client that offers no ALPN is served too.
const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// TLS 1.2 sessions remembered for resumption; TLS 1.3 resumes by ticket and
/// needs no server-side memory.
const SESSION_CACHE: usize = 4096;

impl Tls {
    /// Loads every pair `config` names; fails on the first that cannot be used.
    pub fn load(config: &TlsConfig, metrics: Arc<Metrics>) -> Result<Self, CertError> {
        let pairs: Arc<[CertPair]> = config.pairs().into();
        let set = CertSet::read(&pairs)?;
        set.record_expiry(&metrics);
        let certificates = Arc::new(Certificates::new(set));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(CertError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certificates) as _);
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        server.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        server.ticketer = rustls::crypto::ring::Ticketer::new().map_err(CertError::Setup)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            certificates,
            pairs,
            metrics,
        })
    }

    /// The certificates in force, for the status page.
    pub fn certificates(&self) -> Vec<CertInfo> {
        self.certificates.current().infos()
    }

    /// Follows the certificate files and swaps in a changed set that loads
    /// whole; meant to be spawned, and aborted at shutdown.
    pub fn watch(&self) -> JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move { tls.follow_files(POLL_INTERVAL).await })
    }

    async fn follow_files(self, interval: Duration) {
        let mut files: Vec<ConfigFile> = self
            .pairs
            .iter()
            .flat_map(|pair| [pair.cert_file.clone(), pair.key_file.clone()])
            .map(ConfigFile::new)
            .collect();
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            // Every file is looked at on every tick, so that a swap that
            // changed several is seen as one change.
            let mut changed = false;
            for file in &mut files {
                match file.check() {
                    Ok(Some(_)) => changed = true,
                    Ok(None) => {}
                    Err(error) => {
                        error!(file = %file.path().display(), %error, "TLS certificate file unreadable; keeping the certificates in force");
                        self.metrics
                            .record_certificate_reload(ReloadResult::Failure);
                    }
                }
            }
            if changed {
                self.reload();
            }
        }
    }

    /// Loads every pair again and swaps the set in, or keeps the old one.
    fn reload(&self) {
        match CertSet::read(&self.pairs) {
            Ok(set) => {
                set.record_expiry(&self.metrics);
                let infos = set.infos();
                self.certificates.replace(set);
                self.metrics
                    .record_certificate_reload(ReloadResult::Success);
                for cert in infos {
                    info!(
                        file = %cert.cert_file, subject = %cert.subject, serial = %cert.serial,
                        not_after = %cert.not_after, "TLS certificate loaded"
                    );
                }
            }
            Err(error) => {
                error!(%error, "TLS certificates rejected; keeping the certificates in force");
                self.metrics
                    .record_certificate_reload(ReloadResult::Failure);
            }
        }
    }
}

impl Handshake for Tls {
    type Io = TlsStream<TcpStream>;

    async fn handshake(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        limit: Duration,
    ) -> Option<TlsStream<TcpStream>> {
        // The failed connection's socket is held until its failure is
        // counted: a client that sees the close and then reads the metric
        // finds it counted. Boxed: the handshake's state is large, and the
        // connection's task would otherwise keep room for it for its life.
        let mut accepting = Box::pin(tokio::time::timeout(
            limit,
            self.acceptor.accept(stream).into_fallible(),
        ));
        let (failure, _socket) = match accepting.as_mut().await {
            Ok(Ok(stream)) => {
                let version = TlsVersion::of(stream.get_ref().1.protocol_version());
                self.metrics.record_handshake(version, None);
                return Some(stream);
            }
            Ok(Err((error, socket))) => {
                let failure = HandshakeFailure::of(&error);
                debug!(%peer, %error, reason = failure.as_str(), "TLS handshake failed");
                (failure, Some(socket))
            }
            Err(_elapsed) => {
                debug!(%peer, limit_ms = limit.as_millis(), reason = "timeout", "TLS handshake too slow, closing");
                (HandshakeFailure::Timeout, None)
            }
        };
        self.metrics
            .record_handshake(TlsVersion::None, Some(failure));
        None
    }
}
