//! The `/status` page in a real browser: headless Chromium loads it from the admin
//! port, its script polls `/debug/backends`, and the test reads the rendered DOM:
//! every backend with its request count and health, updated after more traffic,
//! with no backends, and with a hundred. A screenshot is saved to
//! `target/status-page.png` for people (and CI artifacts) to look at.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support::chromium::Chromium;
use crate::support::{TestLb, get, start_backends};

/// Loads `/status` and returns the rendered DOM. Chromium blocks, so it runs off
/// the runtime's worker threads, which keep serving the page meanwhile.
async fn rendered(chromium: &'static Chromium, lb: &TestLb) -> String {
    let url = lb.admin_url("/status");
    tokio::task::spawn_blocking(move || chromium.dump_dom(&url))
        .await
        .expect("chromium runner does not panic")
}

/// The markup of the row for `addr`, from its `data-backend` attribute to its end.
fn row<'a>(dom: &'a str, addr: &SocketAddr) -> &'a str {
    let marker = format!(r#"data-backend="{addr}""#);
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no row for {addr} in the page:\n{dom}"));
    let len = dom[start..].find("</li>").expect("the row is closed");
    &dom[start..start + len]
}

/// The text of the element marked `data-field="field"` in `row`.
fn field<'a>(row: &'a str, field: &str) -> &'a str {
    let marker = format!(r#"data-field="{field}">"#);
    let start = row
        .find(&marker)
        .unwrap_or_else(|| panic!("no {field} in {row}"))
        + marker.len();
    let len = row[start..].find('<').expect("the field is closed");
    &row[start..start + len]
}

/// The one browser of the test process, leaked so blocking tasks can borrow it.
fn chromium() -> Option<&'static Chromium> {
    Chromium::find().map(|found| &*Box::leak(Box::new(found)))
}

async fn send(lb: &TestLb, n: usize) {
    for _ in 0..n {
        assert_eq!(get(&lb.url("/")).await.status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_every_backend_with_its_count_and_follows_traffic() {
    let Some(chromium) = chromium() else { return };
    let upstreams = start_backends(3).await;
    let lb = TestLb::start(&upstreams).await;
    let addrs = lb.backends.snapshot();
    send(&lb, 6).await;

    let dom = rendered(chromium, &lb).await;
    for addr in &addrs {
        let row = row(&dom, addr);
        assert_eq!(field(row, "requests"), "2", "{addr}: {row}");
        assert_eq!(field(row, "share"), "33.3", "{addr}: {row}");
        assert!(
            row.contains("width: 33.3%"),
            "the bar shows the share: {row}"
        );
        assert!(row.contains(">healthy</span>"), "{addr}: {row}");
    }

    // More traffic, then health changes (flipped in-process, as the resilience
    // work's health checks and outlier detection will): the page follows both.
    send(&lb, 3).await;
    lb.backends.state(addrs[1]).set_healthy(false);
    lb.backends
        .state(addrs[2])
        .eject_until(Instant::now() + Duration::from_secs(600));
    let dom = rendered(chromium, &lb).await;
    for addr in &addrs {
        assert_eq!(field(row(&dom, addr), "requests"), "3", "{addr}");
    }
    assert!(row(&dom, &addrs[0]).contains(">healthy</span>"));
    assert!(row(&dom, &addrs[1]).contains(">unhealthy</span>"));
    assert!(row(&dom, &addrs[2]).contains(">ejected</span>"));
    assert!(
        dom.contains(r#"<b id="total">9</b>"#),
        "the summary counts all"
    );

    let screenshot = target_dir().join("status-page.png");
    let url = lb.admin_url("/status");
    tokio::task::spawn_blocking(move || chromium.screenshot(&url, &screenshot))
        .await
        .expect("chromium runner does not panic");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_says_so_when_there_are_no_backends() {
    let Some(chromium) = chromium() else { return };
    let lb = TestLb::start(&[]).await;
    let dom = rendered(chromium, &lb).await;
    assert!(!dom.contains("data-backend="), "no rows: {dom}");
    assert!(
        dom.contains(r#"<p id="empty">"#),
        "the empty notice is shown: {dom}"
    );
    assert!(dom.contains("discovery: static · synced"), "{dom}");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_lists_a_hundred_backends_in_address_order() {
    let Some(chromium) = chromium() else { return };
    // Nothing listens on these ports and no request is sent: the page only lists them.
    let addrs: Vec<SocketAddr> = (0..100u16)
        .rev()
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 20_000 + i * 7)))
        .collect();
    let lb = TestLb::start_with(addrs, TestLb::SETTINGS).await;
    let dom = rendered(chromium, &lb).await;
    let rows: Vec<SocketAddr> = dom
        .split(r#"data-backend=""#)
        .skip(1)
        .map(|rest| {
            rest[..rest.find('"').expect("closed")]
                .parse()
                .expect("an address")
        })
        .collect();
    assert_eq!(rows, lb.backends.snapshot(), "every backend, sorted");
    assert_eq!(rows.len(), 100);
    assert!(dom.contains(r#"<b id="known">100</b>"#));
    lb.stop().await;
}

/// `target/` (or `$CARGO_TARGET_DIR`): the parent of the integration tests' tmp dir.
fn target_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().map_or(tmp.clone(), PathBuf::from)
}
