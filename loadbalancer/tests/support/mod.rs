//! Helpers shared by the integration tests: each test file says `mod support;` and
//! uses what it needs, so nothing here is copied between files.
//!
//! * [`fake_apiserver`]: a fake Kubernetes API server for discovery tests.
//! * [`wait_for`]: wait for an "eventually" condition with a generous deadline,
//!   instead of sleeping a fixed time and hoping.

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code, unreachable_pub)]

pub mod fake_apiserver;

use std::fmt::Debug;
use std::time::Duration;

/// How long an "eventually" condition may take. Generous on purpose: machines are
/// shared and noisy, and a passing test returns as soon as the condition holds.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `probe` until `done` accepts its value and returns that value; panics with
/// the last value seen after [`PATIENCE`].
pub async fn wait_for<T: Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    mut done: impl FnMut(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = probe();
        if done(&value) {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("gave up after {PATIENCE:?} waiting for {what}; last value: {value:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
