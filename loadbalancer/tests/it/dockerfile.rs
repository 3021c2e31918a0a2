//! `Dockerfile.loadbalancer`'s build stage gets every file its `cargo build` needs:
//! the paths it copies (minus `.dockerignore`) are rebuilt in a directory of their
//! own and the same cargo command runs there, offline, as `cargo check`.
//!
//! The checker is the backend's, included from its one home rather than copied, so
//! both Dockerfiles are held to the same rules.

use crate::support::dockerfile::check_build_context;

#[test]
fn the_loadbalancer_build_stage_copies_everything_cargo_needs() {
    let (ok, stderr) = check_build_context("Dockerfile.loadbalancer", "loadbalancer", &[]);
    assert!(ok, "cargo failed in the Docker build context:\n{stderr}");
}

#[test]
fn the_backend_sources_are_needed_to_build_the_loadbalancer() {
    // The backend is a workspace member and a dev-dependency of the load balancer:
    // without its sources cargo cannot even resolve the workspace.
    let (ok, stderr) = check_build_context(
        "Dockerfile.loadbalancer",
        "loadbalancer-partial",
        &["backend/"],
    );
    assert!(!ok, "cargo succeeded without the backend member");
    assert!(stderr.contains("backend"), "{stderr}");
}
