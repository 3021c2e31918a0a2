//! Who this backend is: the pod name, pod IP and Service name it reports in every
//! answer, so a client of the load balancer can see which pod served it.
//!
//! Inside Kubernetes the Deployment injects `POD_NAME` and `POD_IP` through the
//! Downward API. Outside a cluster (a laptop, a test) those variables are absent, so
//! we fall back to the hostname and a non-loopback local address, and to a clear
//! placeholder when even those are unknown. Identity is worked out once at start-up
//! from lookups passed in as functions, which keeps the fallback rules testable
//! without touching the process environment.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};

/// Reported when neither the Downward API nor the host can tell us a value.
pub const UNKNOWN: &str = "unknown";

/// The values every identity answer carries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    /// The pod's name: tells replicas apart when watching round-robin at work.
    #[serde(rename = "podName")]
    pub pod_name: String,
    /// The pod's IP: the address the load balancer's discovery found this pod under.
    #[serde(rename = "podIP")]
    pub pod_ip: String,
    /// The Service this backend belongs to, from the config file.
    #[serde(rename = "serviceName")]
    pub service_name: String,
}

impl Identity {
    /// Builds the identity from the real environment, hostname and network interfaces.
    pub fn from_environment(service_name: impl Into<String>) -> Self {
        Self::from_lookup(
            service_name,
            |var| std::env::var(var).ok(),
            hostname,
            local_ip,
        )
    }

    /// Builds the identity from the given lookups: `env` reads a variable, `hostname`
    /// and `local_ip` are asked only when the matching variable is absent or empty.
    pub fn from_lookup(
        service_name: impl Into<String>,
        env: impl Fn(&str) -> Option<String>,
        hostname: impl FnOnce() -> Option<String>,
        local_ip: impl FnOnce() -> Option<IpAddr>,
    ) -> Self {
        // An empty variable counts as absent: a Downward API typo yields "", not an error.
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let pod_name = var("POD_NAME")
            .or_else(|| hostname().filter(|h| !h.trim().is_empty()))
            .unwrap_or_else(|| UNKNOWN.to_owned());
        let pod_ip = var("POD_IP")
            .or_else(|| {
                local_ip()
                    .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
                    .map(|ip| ip.to_string())
            })
            .unwrap_or_else(|| UNKNOWN.to_owned());
        Self {
            pod_name,
            pod_ip,
            service_name: service_name.into(),
        }
    }
}

/// The host's name, as the kernel knows it (no `unsafe` `gethostname` call needed).
fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .map(|name| name.trim().to_owned())
        .or_else(|| std::env::var("HOSTNAME").ok())
}

/// The local address the host would use for outbound traffic.
///
/// "Connecting" a UDP socket sends no packet; it only asks the kernel to choose a
/// route and a source address, which we then read back. The target is in TEST-NET-1
/// (RFC 5737), an address reserved for documentation that nothing answers.
fn local_ip() -> Option<IpAddr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn downward_api_variables_win_over_host_values() {
        let id = Identity::from_lookup(
            "backend",
            env_of(&[("POD_NAME", "backend-7d9f-abc"), ("POD_IP", "10.244.1.5")]),
            || panic!("hostname must not be consulted when POD_NAME is set"),
            || panic!("local IP must not be consulted when POD_IP is set"),
        );
        assert_eq!(id.pod_name, "backend-7d9f-abc");
        assert_eq!(id.pod_ip, "10.244.1.5");
        assert_eq!(id.service_name, "backend");
    }

    #[test]
    fn absent_variables_fall_back_to_hostname_and_local_ip() {
        let id = Identity::from_lookup(
            "svc",
            env_of(&[]),
            || Some("laptop".to_owned()),
            || Some(IpAddr::from([192, 168, 1, 20])),
        );
        assert_eq!(id.pod_name, "laptop");
        assert_eq!(id.pod_ip, "192.168.1.20");
    }

    #[test]
    fn empty_variables_count_as_absent() {
        let id = Identity::from_lookup(
            "svc",
            env_of(&[("POD_NAME", ""), ("POD_IP", " ")]),
            || Some("laptop".to_owned()),
            || Some(IpAddr::from([10, 0, 0, 7])),
        );
        assert_eq!(id.pod_name, "laptop");
        assert_eq!(id.pod_ip, "10.0.0.7");
    }

    #[test]
    fn nothing_known_gives_the_placeholder() {
        let id = Identity::from_lookup("svc", env_of(&[]), || None, || None);
        assert_eq!(id.pod_name, UNKNOWN);
        assert_eq!(id.pod_ip, UNKNOWN);
    }

    #[test]
    fn a_loopback_local_ip_is_not_an_identity() {
        let id = Identity::from_lookup(
            "svc",
            env_of(&[]),
            || None,
            || Some(IpAddr::from([127, 0, 0, 1])),
        );
        assert_eq!(id.pod_ip, UNKNOWN);
    }

    #[test]
    fn serializes_with_the_guide_key_names() {
        let id = Identity::from_lookup(
            "svc",
            env_of(&[("POD_NAME", "p"), ("POD_IP", "10.0.0.1")]),
            || None,
            || None,
        );
        let json = serde_json::to_value(&id).expect("an Identity always serializes");
        assert_eq!(
            json,
            serde_json::json!({"podName": "p", "podIP": "10.0.0.1", "serviceName": "svc"})
        );
    }
}
