//! Certificates: reading a PEM pair, checking it, and choosing one per
//! handshake by the client's SNI name.
//!
//! A pair is refused, with the file and the reason, when a file cannot be read,
//! holds no certificate or no key, when the key does not belong to the
//! certificate, or when the certificate has expired: serving it would only make
//! every client fail the handshake, so the previous set (or, at start-up, no
//! listener at all) is the better answer. The set in force is swapped whole, so
//! a handshake never sees half of a rotation.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::CertPair;
use crate::metrics::Metrics;

/// Why a certificate pair cannot be used. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("TLS certificate file {file}: cannot read it: {reason}")]
    Read {
        file: String,
        reason: std::io::Error,
    },
    #[error("TLS certificate file {file}: no PEM certificate in it")]
    NoCertificate { file: String },
    #[error("TLS key file {file}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { file: String },
    #[error("TLS key file {file}: the key cannot sign: {reason}")]
    UnusableKey { file: String, reason: rustls::Error },
    #[error("TLS key file {key_file} does not belong to the certificate in {cert_file}")]
    Mismatch { cert_file: String, key_file: String },
    #[error("TLS certificate file {file}: the certificate cannot be read: {reason}")]
    Invalid { file: String, reason: String },
    #[error("TLS certificate file {file}: the certificate expired at {not_after}")]
    Expired { file: String, not_after: String },
    #[error("TLS set-up failed: {0}")]
    Setup(rustls::Error),
}

/// What the status page and the log say about a certificate in force.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    /// The file it was read from.
    pub cert_file: String,
    /// The subject's distinguished name.
    pub subject: String,
    /// Its DNS names and IP addresses (subjectAltName), what SNI is matched on.
    pub names: Vec<String>,
    /// When it expires, RFC 3339.
    pub not_after: String,
    /// The same as Unix time, for the expiry metric.
    #[serde(skip)]
    pub not_after_unix: i64,
    /// The serial number in hex, to tell a renewed certificate from the old one.
    pub serial: String,
}

/// One usable pair.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    info: CertInfo,
    /// The DNS names, lower case, for SNI (`*.example.com` kept as is).
    dns_names: Vec<String>,
}

/// Every pair in force, the default first.
#[derive(Debug)]
pub(super) struct CertSet(Vec<Loaded>);

impl CertSet {
    /// Reads and checks every pair.
    pub(super) fn read(pairs: &[CertPair]) -> Result<Self, CertError> {
        pairs.iter().map(load).collect::<Result<_, _>>().map(Self)
    }

    /// The certificate for a client that asked for `name` by SNI: the first
    /// whose names include it (or a wildcard covering it), else the default.
    fn choose(&self, name: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let by_name = name.and_then(|name| {
            let name = name.to_ascii_lowercase();
            self.0
                .iter()
                .find(|cert| cert.dns_names.iter().any(|pattern| matches(pattern, &name)))
        });
        by_name.or(self.0.first()).map(|cert| &cert.key)
    }

    pub(super) fn infos(&self) -> Vec<CertInfo> {
        self.0.iter().map(|cert| cert.info.clone()).collect()
    }

    /// Publishes each certificate's expiry, so an alert can fire before it
    /// lapses. The configured files do not change while the process runs, so
    /// every series stays current.
    pub(super) fn record_expiry(&self, metrics: &Metrics) {
        for cert in &self.0 {
            metrics.record_certificate_expiry(&cert.info.cert_file, cert.info.not_after_unix);
        }
    }
}

/// Whether a certificate name covers `name`: equal, or a `*.` wildcard for
/// exactly one more label (RFC 6125 section 6.4.3).
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

/// The set in force, swapped whole on rotation; rustls asks it per handshake.
#[derive(Debug)]
pub(super) struct Certificates(RwLock<Arc<CertSet>>);

impl Certificates {
    pub(super) fn new(set: CertSet) -> Self {
        Self(RwLock::new(Arc::new(set)))
    }

    pub(super) fn current(&self) -> Arc<CertSet> {
        // A poisoned lock still holds a whole set (a swap is one store).
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub(super) fn replace(&self, set: CertSet) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current().choose(hello.server_name()).cloned()
    }
}

fn load(pair: &CertPair) -> Result<Loaded, CertError> {
    let cert_file = pair.cert_file.display().to_string();
    let key_file = pair.key_file.display().to_string();
    let cert_pem = read(&pair.cert_file)?;
    let key_pem = read(&pair.key_file)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|error| CertError::Invalid {
            file: cert_file.clone(),
            reason: error.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate { file: cert_file });
    };
    let info = describe(leaf, &cert_file)?;
    if info.not_after_unix <= unix_now() {
        return Err(CertError::Expired {
            file: cert_file,
            not_after: info.not_after,
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| CertError::NoKey {
        file: key_file.clone(),
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|reason| {
        CertError::UnusableKey {
            file: key_file.clone(),
            reason,
        }
    })?;
    let certified = CertifiedKey::new(chain.clone(), signing);
    certified.keys_match().map_err(|_| CertError::Mismatch {
        cert_file: cert_file.clone(),
        key_file,
    })?;
    let dns_names = info
        .names
        .iter()
        .filter(|name| name.parse::<std::net::IpAddr>().is_err())
        .map(|name| name.to_ascii_lowercase())
        .collect();
    Ok(Loaded {
        key: Arc::new(certified),
        info,
        dns_names,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|reason| CertError::Read {
        file: path.display().to_string(),
        reason,
    })
}

/// Reads what the status page shows from the leaf certificate.
fn describe(leaf: &CertificateDer<'_>, file: &str) -> Result<CertInfo, CertError> {
    let invalid = |reason: &dyn fmt::Display| CertError::Invalid {
        file: file.to_owned(),
        reason: reason.to_string(),
    };
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| invalid(&e))?;
    let mut names = Vec::new();
    if let Ok(Some(alt)) = cert.subject_alternative_name() {
        for name in &alt.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_of(bytes) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let not_after_unix = cert.validity().not_after.timestamp();
    let not_after = u64::try_from(not_after_unix).map_or(UNIX_EPOCH, |secs| {
        UNIX_EPOCH + std::time::Duration::from_secs(secs)
    });
    Ok(CertInfo {
        cert_file: file.to_owned(),
        subject: cert.subject().to_string(),
        names,
        not_after: humantime::format_rfc3339_seconds(not_after).to_string(),
        not_after_unix,
        serial: cert.raw_serial_as_string(),
    })
}

fn ip_of(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(Into::into),
        16 => <[u8; 16]>::try_from(bytes).ok().map(Into::into),
        _ => None,
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_covers_one_label_only() {
        assert!(matches("*.example.com", "www.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "a.b.example.com"));
        assert!(matches("example.com", "example.com"));
        assert!(!matches("example.com", "www.example.com"));
    }
}
