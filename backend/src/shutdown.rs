//! The shutdown signal: a future that completes on SIGTERM (what Kubernetes sends a
//! pod it is stopping) or Ctrl-C (what a person sends a local run). `main` hands it to
//! `server::serve`, which starts the graceful shutdown when it completes.

use tracing::{info, warn};

/// Completes when the process receives SIGTERM or Ctrl-C (SIGINT).
pub async fn signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(error) => {
                warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => info!(signal = "SIGINT", "shutdown signal received"),
        () = terminate => info!(signal = "SIGTERM", "shutdown signal received"),
    }
}
