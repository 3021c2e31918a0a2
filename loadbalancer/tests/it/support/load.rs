//! A load generator for the chaos tests: a number of keep-alive clients, each
//! sending `GET`s one after the other until told to stop or until its own request
//! bound, tallying every answer. Bounded in count (per client) and in time (every
//! request within [`PATIENCE`]), so a broken load balancer fails the test instead
//! of hanging it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::task::JoinHandle;

use super::{PATIENCE, client, wait_for};

/// What a load run saw.
#[derive(Debug, Default)]
pub(crate) struct LoadReport {
    /// Requests sent.
    pub(crate) sent: usize,
    /// Requests answered 200 with a complete body.
    pub(crate) succeeded: usize,
    /// Everything else.
    pub(crate) failed: usize,
    /// Answers by status code.
    pub(crate) statuses: BTreeMap<u16, usize>,
    /// The first few transport errors, for the failure message.
    pub(crate) errors: Vec<String>,
}

impl LoadReport {
    /// Prints the figures every chaos test reports; `retried` comes from the
    /// load balancer, which is the only one that knows.
    pub(crate) fn print(&self, test: &str, retried: u64) {
        println!(
            "chaos {test}: sent={} succeeded={} failed={} retried={retried} statuses={:?} errors={:?}",
            self.sent, self.succeeded, self.failed, self.statuses, self.errors
        );
    }

    fn merge(&mut self, other: LoadReport) {
        self.sent += other.sent;
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.errors.extend(other.errors);
        self.errors.truncate(5);
    }
}

/// Load running in the background.
#[derive(Debug)]
pub(crate) struct Load {
    /// Set to make every client finish its current request and stop.
    stop: Arc<AtomicBool>,
    /// Requests completed so far, across all clients.
    completed: Arc<AtomicUsize>,
    clients: Vec<JoinHandle<LoadReport>>,
}

impl Load {
    /// Starts `clients` clients sending `GET url`, each at most `max_per_client`
    /// times.
    pub(crate) fn start(url: String, clients: usize, max_per_client: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicUsize::new(0));
        let clients = (0..clients)
            .map(|_| {
                let (url, stop, completed) = (url.clone(), stop.clone(), completed.clone());
                tokio::spawn(run_client(url, stop, completed, max_per_client))
            })
            .collect();
        Self {
            stop,
            completed,
            clients,
        }
    }

    /// Requests completed so far.
    pub(crate) fn completed(&self) -> usize {
        self.completed.load(Ordering::Relaxed)
    }

    /// Waits until `more` requests beyond those completed now have completed,
    /// so that what the test did last is known to have met traffic.
    pub(crate) async fn wait_for_more(&self, more: usize) {
        self.wait_for_total(self.completed() + more).await;
    }

    /// Waits until `total` requests have completed since the start: for a load
    /// whose clients stop at a bound, where "more than now" could exceed it.
    pub(crate) async fn wait_for_total(&self, total: usize) {
        wait_for(
            &format!("{total} completed requests"),
            || self.completed(),
            |&n| n >= total,
        )
        .await;
    }

    /// Stops the clients and adds up what they saw.
    pub(crate) async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = LoadReport::default();
        for client in self.clients {
            let tally = tokio::time::timeout(PATIENCE, client)
                .await
                .expect("load clients stop within PATIENCE")
                .expect("load client does not panic");
            report.merge(tally);
        }
        report
    }
}

async fn run_client(
    url: String,
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicUsize>,
    max_requests: usize,
) -> LoadReport {
    let client = client();
    let mut report = LoadReport::default();
    while !stop.load(Ordering::Relaxed) && report.sent < max_requests {
        let req = Request::get(url.as_str())
            .body(Full::<Bytes>::default())
            .expect("valid request");
        report.sent += 1;
        let exchange = async {
            let response = client.request(req).await.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body of a {status}: {e}"))?;
            Ok::<_, String>(status)
        };
        match tokio::time::timeout(PATIENCE, exchange).await {
            Ok(Ok(status)) => {
                *report.statuses.entry(status).or_default() += 1;
                if status == 200 {
                    report.succeeded += 1;
                } else {
                    report.failed += 1;
                }
            }
            Ok(Err(error)) => {
                report.failed += 1;
                report.errors.push(error);
                report.errors.truncate(5);
            }
            Err(_) => {
                report.failed += 1;
                report.errors.push(format!("no answer within {PATIENCE:?}"));
                report.errors.truncate(5);
            }
        }
        completed.fetch_add(1, Ordering::Relaxed);
    }
    report
}
