//! TLS for the tests: certificates made on the spot with rcgen (never
//! committed), a mount holding them like a `kubernetes.io/tls` Secret, and an
//! HTTPS client that reports what the handshake agreed on.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use loadbalancer::app::{App, Options};
use loadbalancer::config::Config;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::configmap::ConfigMapDir;
use super::{PATIENCE, Upstream};

/// A self-signed ECDSA P-256 certificate and its key, in PEM.
#[derive(Debug, Clone)]
pub(crate) struct TestCert {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    pub(crate) der: CertificateDer<'static>,
}

impl TestCert {
    /// A certificate for `names` (DNS names or IP addresses).
    pub(crate) fn for_names(names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let made = rcgen::generate_simple_self_signed(names).expect("rcgen makes a certificate");
        Self {
            cert_pem: made.cert.pem(),
            key_pem: made.signing_key.serialize_pem(),
            der: made.cert.der().clone(),
        }
    }

    /// A certificate for `names` that expired at the start of 2021.
    pub(crate) fn expired(names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("valid names");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = params.self_signed(&key).expect("a certificate");
        Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// The certificate's serial number in hex, as the load balancer logs it.
    pub(crate) fn serial(&self) -> String {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(&self.der).expect("a certificate rcgen made");
        cert.raw_serial_as_string()
    }
}

/// A Secret-style mount holding `tls.crt` and `tls.key`.
pub(crate) fn secret_mount(cert: &TestCert) -> ConfigMapDir {
    ConfigMapDir::with_files(&[
        ("tls.crt", cert.cert_pem.as_bytes()),
        ("tls.key", cert.key_pem.as_bytes()),
    ])
}

/// Rotates the Secret in `mount` to `cert`, as the kubelet does.
pub(crate) fn rotate(mount: &mut ConfigMapDir, cert: &TestCert) {
    mount.update_files(&[
        ("tls.crt", cert.cert_pem.as_bytes()),
        ("tls.key", cert.key_pem.as_bytes()),
    ]);
}

/// The `tls` config block for the Secret in `mount`, with `extra` keys.
pub(crate) fn tls_block(mount: &ConfigMapDir, extra: &str) -> String {
    format!(
        r#""tls": {{"port": 0, "certFile": "{}", "keyFile": "{}" {extra}}}"#,
        mount.file("tls.crt").display(),
        mount.file("tls.key").display()
    )
}

/// What one HTTPS exchange showed.
#[derive(Debug)]
pub(crate) struct TlsReply {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
    /// The certificate the server presented.
    pub(crate) peer_cert: CertificateDer<'static>,
    /// The ALPN protocol agreed on.
    pub(crate) alpn: Option<Vec<u8>>,
    /// Whether the session was resumed rather than fully negotiated.
    pub(crate) resumed: bool,
}

/// An HTTPS client that trusts the given certificates and offers ALPN
/// `http/1.1` (or `h2`, [`TlsClient::offering_h2`]).
#[derive(Clone)]
pub(crate) struct TlsClient {
    connector: TlsConnector,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").finish_non_exhaustive()
    }
}

impl TlsClient {
    /// A client that does a full handshake every time, so each connection
    /// sees the certificate the server presents now (a resumed session keeps
    /// the one it started with).
    pub(crate) fn trusting(certs: &[&TestCert]) -> Self {
        Self::build(certs, rustls::client::Resumption::disabled())
    }

    /// A client like [`TlsClient::trusting`] that offers ALPN `h2` alone, as
    /// an HTTP/2 client does.
    pub(crate) fn offering_h2(certs: &[&TestCert]) -> Self {
        let roots = certs.iter().map(|cert| cert.der.clone()).collect();
        Self::configured(roots, rustls::client::Resumption::disabled(), b"h2")
    }

    /// A client that remembers its sessions and resumes them.
    pub(crate) fn resuming(certs: &[&TestCert]) -> Self {
        Self::build(certs, rustls::client::Resumption::default())
    }

    /// A client that trusts the one certificate `der`, made outside the tests.
    pub(crate) fn trusting_der(der: CertificateDer<'static>) -> Self {
        Self::with_roots(vec![der], rustls::client::Resumption::disabled())
    }

    fn build(certs: &[&TestCert], resumption: rustls::client::Resumption) -> Self {
        Self::with_roots(
            certs.iter().map(|cert| cert.der.clone()).collect(),
            resumption,
        )
    }

    fn with_roots(
        certs: Vec<CertificateDer<'static>>,
        resumption: rustls::client::Resumption,
    ) -> Self {
        Self::configured(certs, resumption, b"http/1.1")
    }

    fn configured(
        certs: Vec<CertificateDer<'static>>,
        resumption: rustls::client::Resumption,
        alpn: &[u8],
    ) -> Self {
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).expect("a valid certificate");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        config.resumption = resumption;
        Self {
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    /// `GET path` over a new TLS connection to `addr`, asking for `server_name`
    /// by SNI; an error names the step that failed.
    pub(crate) async fn get(
        &self,
        addr: SocketAddr,
        server_name: &str,
        path: &str,
    ) -> Result<TlsReply, String> {
        let exchange = async {
            let tls = self.connect(addr, server_name).await?;
            let (_, session) = tls.get_ref();
            let peer_cert = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .ok_or("no certificate presented")?
                .clone()
                .into_owned();
            let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
            let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("http handshake: {e}"))?;
            tokio::spawn(connection);
            let request = Request::get(path)
                .header("host", server_name)
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok(TlsReply {
                status,
                body,
                peer_cert,
                alpn,
                resumed,
            })
        };
        tokio::time::timeout(PATIENCE, exchange)
            .await
            .map_err(|_| "no answer within PATIENCE".to_owned())?
    }

    /// A TLS connection to `addr`, asking for `server_name` by SNI; an error
    /// names the step that failed.
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<TlsStream<TcpStream>, String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))
    }
}

/// The load balancer over `upstream`, on loopback, with `extra` config keys.
pub(crate) async fn start(upstream: &Upstream, extra: &str) -> anyhow::Result<App> {
    let json = format!(
        r#"{{"port": 0, "adminPort": 0, "bindAddress": "127.0.0.1",
            "backendServiceName": "web", "backendPort": 80, "discovery": "static",
            "staticBackends": ["{}"], "headerReadTimeoutMs": 500 {extra}}}"#,
        upstream.addr
    );
    let config = Config::parse(&json, Path::new("config.json")).expect("a valid test config");
    let options = Options {
        workers: std::num::NonZeroUsize::MIN,
        health_checks: false,
        ..Options::default()
    };
    App::start(config, options).await
}

/// The load balancer over `upstream` with HTTPS on, its certificate the one in
/// `mount`, and its HTTPS address.
pub(crate) async fn https(
    upstream: &Upstream,
    mount: &ConfigMapDir,
    extra: &str,
) -> (App, SocketAddr) {
    let app = start(upstream, &format!(", {}", tls_block(mount, extra)))
        .await
        .expect("the load balancer starts with TLS");
    let addr = app.tls_addr().expect("an HTTPS port");
    (app, addr)
}
