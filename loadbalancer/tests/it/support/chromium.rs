//! Headless Chromium for the status page test: load a page, let its scripts run for
//! a few seconds of virtual time, and return the rendered DOM or a screenshot.
//!
//! Chromium is a system package (`apt-get install chromium`, which `.ci/run` does).
//! Where it is missing the browser tests skip with a loud message, except under CI
//! (the `CI` environment variable is set), where a skipped test would hide a gap.
//! Every run is bounded: a browser that hangs is killed and the test fails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";

/// How long one browser run may take: far more than the 3 s of virtual time a page
/// gets, because starting a browser on a busy machine is slow.
const RUN_LIMIT: Duration = Duration::from_secs(90);

/// Flags for a quiet, self-contained headless run: no sandbox (containers run as
/// root), no GPU, and none of the background traffic a browser would otherwise
/// send outside the loopback interface.
const FLAGS: [&str; 10] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=3000",
];

/// The installed browser.
#[derive(Debug)]
pub(crate) struct Chromium {
    path: PathBuf,
}

impl Chromium {
    /// The browser, or `None` (after saying so loudly) when it is not installed and
    /// this is not CI. Panics under CI if it is missing.
    pub(crate) fn find() -> Option<Self> {
        let path = PathBuf::from(CHROMIUM);
        if path.exists() {
            return Some(Self { path });
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "{CHROMIUM} is missing and CI is set: install it (apt-get install chromium)"
        );
        eprintln!(
            "\n!!!!! SKIPPED: {CHROMIUM} is not installed, so the status page was not \
             tested in a browser. Install it with `apt-get install chromium`. !!!!!\n"
        );
        None
    }

    /// The DOM of `url` after its scripts have run for the virtual time budget.
    pub(crate) fn dump_dom(&self, url: &str) -> String {
        self.run(&["--dump-dom", url])
    }

    /// Saves a PNG of `url`, as rendered after the virtual time budget, to `to`.
    pub(crate) fn screenshot(&self, url: &str, to: &Path) {
        let _ = std::fs::remove_file(to);
        let target = format!("--screenshot={}", to.display());
        self.run(&[&target, "--window-size=1280,800", url]);
        assert!(
            to.exists(),
            "chromium wrote no screenshot to {}",
            to.display()
        );
    }

    /// Runs the browser with a fresh profile and returns its stdout.
    fn run(&self, args: &[&str]) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let profile = std::env::temp_dir().join(format!(
            "loadbalancer-chromium-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = Command::new(&self.path)
            .args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Headless Chromium complains about D-Bus and the like; none of it matters.
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        // Read on a thread, so a large DOM cannot fill the pipe and stall the browser.
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + RUN_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("query chromium's status") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&profile);
                panic!("chromium did not finish within {RUN_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = std::fs::remove_dir_all(&profile);
        assert!(status.success(), "chromium failed: {status}");
        reader.join().expect("the reader thread does not panic")
    }
}
