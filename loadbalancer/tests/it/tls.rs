//! HTTPS through the load balancer's `App`, with rustls clients and
//! certificates made in the tests: plain HTTP and HTTPS side by side, SNI,
//! ALPN, session resumption, refused protocol versions, stalled and garbage
//! handshakes, `X-Forwarded-Proto`, the redirect to HTTPS, and certificate
//! rotation through a Secret-style symlink swap under load.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use rustls::pki_types::pem::PemObject;

use crate::support::configmap::ConfigMapDir;
use crate::support::raw::RawConn;
use crate::support::tls::{TestCert, TlsClient, https, rotate, secret_mount, start, tls_block};
use crate::support::{PATIENCE, get, metric, start_backend, wait_for_metric};

#[tokio::test]
async fn plain_http_and_https_serve_side_by_side_and_the_backend_hears_which() {
    let upstream = start_backend("backend-1").await;
    let cert = TestCert::for_names(&["localhost"]);
    let mount = secret_mount(&cert);
    let (app, tls_addr) = https(&upstream, &mount, "").await;
    let client = TlsClient::trusting(&[&cert]);

    let secure = client
        .get(tls_addr, "localhost", "/echo-headers")
        .await
        .expect("an HTTPS exchange");
    assert_eq!(secure.status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_slice(&secure.body).expect("JSON");
    assert_eq!(seen["x-forwarded-proto"], serde_json::json!(["https"]));
    assert_eq!(
        secure.alpn.as_deref(),
        Some(&b"http/1.1"[..]),
        "ALPN agreed"
    );

    let plain = get(&format!("http://{}/echo-headers", app.proxy_addr())).await;
    assert_eq!(
        plain.json()["x-forwarded-proto"],
        serde_json::json!(["http"])
    );
    assert_eq!(
        metric(
            app.admin_addr(),
            r#"loadbalancer_tls_handshakes_total{result="success",version="TLSv1.3"}"#
        )
        .await,
        1.0
    );
    app.stop(Duration::ZERO).await;
}

#[tokio::test]
async fn sni_picks_the_matching_certificate_and_an_unknown_name_gets_the_default() {
    let upstream = start_backend("backend-1").await;
    let default = TestCert::for_names(&["default.test"]);
    let shop = TestCert::for_names(&["shop.test", "*.shop.test"]);
    let default_mount = secret_mount(&default);
    let shop_mount = secret_mount(&shop);
    let extra = format!(
        r#", "certificates": [{{"certFile": "{}", "keyFile": "{}"}}]"#,
        shop_mount.file("tls.crt").display(),
        shop_mount.file("tls.key").display()
    );
    let (app, addr) = https(&upstream, &default_mount, &extra).await;
    let client = TlsClient::trusting(&[&default, &shop]);
    for (name, expected) in [
        ("shop.test", &shop),
        ("www.shop.test", &shop),
        ("default.test", &default),
    ] {
        let reply = client
            .get(addr, name, "/")
            .await
            .expect("an HTTPS exchange");
        assert_eq!(reply.peer_cert, expected.der, "{name}");
    }
    // A name no certificate has gets the default one, which the client then
    // rightly refuses.
    let refused = client.get(addr, "other.test", "/").await;
    assert!(
        refused.is_err_and(|e| e.starts_with("handshake")),
        "the default certificate does not name other.test"
    );
    let status = get(&format!("http://{}/debug/backends", app.admin_addr()))
        .await
        .json();
    assert_eq!(
        status["certificates"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    assert_eq!(status["certificates"][1]["names"][0], "shop.test");
    app.stop(Duration::ZERO).await;
}

#[tokio::test]
async fn a_second_connection_resumes_the_session() {
    let upstream = start_backend("backend-1").await;
    let cert = TestCert::for_names(&["localhost"]);
    let mount = secret_mount(&cert);
    let (app, addr) = https(&upstream, &mount, "").await;
    let client = TlsClient::resuming(&[&cert]);
    let first = client.get(addr, "localhost", "/").await.expect("first");
    assert!(!first.resumed);
    let second = client.get(addr, "localhost", "/").await.expect("second");
    assert!(second.resumed, "TLS 1.3 tickets resume the session");
    app.stop(Duration::ZERO).await;
}

/// A TLS 1.1 ClientHello, written out by hand since no Rust client speaks 1.1:
/// version 3.2, one RSA AES-128-CBC-SHA suite, no extensions.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let len = body.len();
    let mut handshake = vec![0x01, 0, (len >> 8) as u8, len as u8];
    handshake.extend(body);
    let mut record = vec![
        0x16,
        0x03,
        0x01,
        (handshake.len() >> 8) as u8,
        handshake.len() as u8,
    ];
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls_1_1_garbage_and_stalled_handshakes_are_closed_and_counted() {
    let upstream = start_backend("backend-1").await;
    let cert = TestCert::for_names(&["localhost"]);
    let mount = secret_mount(&cert);
    let (app, addr) = https(&upstream, &mount, "").await;

    let answer = RawConn::send_until_closed(addr, &tls11_client_hello()).await;
    assert_eq!(
        answer.first(),
        Some(&0x15),
        "a TLS alert, then the close: {answer:?}"
    );
    RawConn::send_until_closed(addr, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    // Nothing at all, then half a ClientHello: both closed at the header-read
    // timeout (500 ms here).
    let mut silent = RawConn::connect(addr).await;
    silent.closed().await;
    RawConn::send_until_closed(addr, &tls11_client_hello()[..20]).await;

    for (reason, count) in [("incompatible", 1.0), ("not_tls", 1.0), ("timeout", 2.0)] {
        let series = format!(r#"loadbalancer_tls_handshake_failures_total{{reason="{reason}"}}"#);
        assert_eq!(metric(app.admin_addr(), &series).await, count, "{reason}");
    }
    // The listener serves on.
    let client = TlsClient::trusting(&[&cert]);
    assert!(client.get(addr, "localhost", "/").await.is_ok());
    app.stop(Duration::ZERO).await;
}

#[tokio::test]
async fn redirect_http_sends_plain_requests_to_https() {
    let upstream = start_backend("backend-1").await;
    let cert = TestCert::for_names(&["localhost"]);
    let mount = secret_mount(&cert);
    let (app, _) = https(&upstream, &mount, r#", "redirectHttp": true"#).await;
    let tls_port = app.tls_addr().expect("an HTTPS port").port();
    let reply = get(&format!("http://{}/cart?id=7", app.proxy_addr())).await;
    assert_eq!(reply.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        reply.headers["location"],
        format!("https://127.0.0.1:{tls_port}/cart?id=7")
    );
    assert_eq!(upstream.received(), 0, "nothing was proxied");
    app.stop(Duration::ZERO).await;
}

#[tokio::test]
async fn a_mismatched_missing_or_expired_pair_stops_the_start_naming_the_file() {
    let upstream = start_backend("backend-1").await;
    let (a, b) = (
        TestCert::for_names(&["a.test"]),
        TestCert::for_names(&["b.test"]),
    );
    let mismatched = ConfigMapDir::with_files(&[
        ("tls.crt", a.cert_pem.as_bytes()),
        ("tls.key", b.key_pem.as_bytes()),
    ]);
    let error = start(&upstream, &format!(", {}", tls_block(&mismatched, "")))
        .await
        .expect_err("a key of another certificate stops the start");
    let message = format!("{error:#}");
    assert!(
        message.contains("does not belong to the certificate"),
        "{message}"
    );
    assert!(
        message.contains(&mismatched.file("tls.key").display().to_string()),
        "{message}"
    );

    let error = start(
        &upstream,
        r#", "tls": {"port": 0, "certFile": "/nonexistent/tls.crt"}"#,
    )
    .await
    .expect_err("a missing file stops the start");
    assert!(
        format!("{error:#}").contains("/nonexistent/tls.crt"),
        "{error:#}"
    );

    let expired = secret_mount(&TestCert::expired(&["localhost"]));
    let error = start(&upstream, &format!(", {}", tls_block(&expired, "")))
        .await
        .expect_err("an expired certificate stops the start");
    let message = format!("{error:#}");
    assert!(
        message.contains("expired at 2021-01-01T00:00:00Z"),
        "{message}"
    );
}

#[tokio::test]
async fn a_rotated_secret_serves_new_handshakes_with_no_failed_request_and_a_broken_one_is_refused()
{
    let upstream = start_backend("backend-1").await;
    let old = TestCert::for_names(&["localhost"]);
    let new = TestCert::for_names(&["localhost"]);
    let mut mount = secret_mount(&old);
    let (app, addr) = https(&upstream, &mount, "").await;
    let client = TlsClient::trusting(&[&old, &new]);

    // Load on fresh connections while the Secret rotates.
    let (stop, failed, sent) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let load = {
        let (client, stop, failed, sent) =
            (client.clone(), stop.clone(), failed.clone(), sent.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < 2_000 {
                sent.fetch_add(1, Ordering::Relaxed);
                if let Err(error) = client.get(addr, "localhost", "/").await {
                    eprintln!("request failed: {error:?}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    rotate(&mut mount, &new);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let reply = client
            .get(addr, "localhost", "/")
            .await
            .expect("an HTTPS exchange");
        if reply.peer_cert == new.der {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate is never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.expect("the load task ends");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "of {} requests",
        sent.load(Ordering::Relaxed)
    );
    let status = get(&format!("http://{}/debug/backends", app.admin_addr()))
        .await
        .json();
    assert_eq!(status["certificates"][0]["serial"], new.serial());

    // A broken rotation (a key of another certificate) is refused; the new
    // certificate stays in force.
    let other = TestCert::for_names(&["localhost"]);
    mount.update_files(&[
        ("tls.crt", other.cert_pem.as_bytes()),
        ("tls.key", new.key_pem.as_bytes()),
    ]);
    let refused = r#"loadbalancer_tls_certificate_reloads_total{result="failure"}"#;
    wait_for_metric(app.admin_addr(), refused, |count| count >= 1.0).await;
    let reply = client
        .get(addr, "localhost", "/")
        .await
        .expect("still served");
    assert_eq!(reply.peer_cert, new.der, "the last good certificate stays");
    app.stop(Duration::ZERO).await;
}

/// Runs `openssl` with `args` in `dir`, which the CI script installs.
fn openssl(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs (Debian package openssl)");
    assert!(status.success(), "openssl {args:?}");
}

#[tokio::test]
async fn rsa_keys_in_pkcs1_and_ecdsa_keys_in_sec1_are_accepted() {
    let upstream = start_backend("backend-1").await;
    let dir = crate::support::process::temp_dir();
    // An RSA key in PKCS#1 ("BEGIN RSA PRIVATE KEY") and an EC key in SEC1
    // ("BEGIN EC PRIVATE KEY"); rcgen's own keys, used elsewhere, are PKCS#8.
    openssl(&dir, &["genrsa", "-traditional", "-out", "rsa.key", "2048"]);
    openssl(
        &dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.key",
        ],
    );
    for key in ["rsa.key", "ec.key"] {
        let cert = format!("{key}.crt");
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-key",
                key,
                "-out",
                &cert,
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
            ],
        );
        let pem = std::fs::read_to_string(dir.join(key)).expect("the key was written");
        let format = if key == "rsa.key" {
            "BEGIN RSA PRIVATE KEY"
        } else {
            "BEGIN EC PRIVATE KEY"
        };
        assert!(pem.contains(format), "{key} is {format}");
        let extra = format!(
            r#", "tls": {{"port": 0, "certFile": "{}", "keyFile": "{}"}}"#,
            dir.join(&cert).display(),
            dir.join(key).display()
        );
        let app = start(&upstream, &extra)
            .await
            .expect("the pair is accepted");
        let der = rustls::pki_types::CertificateDer::from_pem_file(dir.join(&cert))
            .expect("the certificate reads back");
        let client = TlsClient::trusting_der(der.clone());
        let addr = app.tls_addr().expect("an HTTPS port");
        let reply = client
            .get(addr, "localhost", "/")
            .await
            .expect("an HTTPS exchange");
        assert_eq!(reply.peer_cert, der, "{key}");
        app.stop(Duration::ZERO).await;
    }
}
