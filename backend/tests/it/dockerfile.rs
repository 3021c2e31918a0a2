//! `Dockerfile.backend`'s build stage gets every file its `cargo build` needs: the
//! paths it copies (minus `.dockerignore`) are rebuilt in a directory of their own
//! and the same cargo command runs there, offline, as `cargo check` (see
//! `support/dockerfile.rs` for why). `loadbalancer/tests/it/dockerfile.rs` does the
//! same for `Dockerfile.loadbalancer`.

use std::path::Path;

use crate::support::TempDir;
use crate::support::dockerfile::{DockerIgnore, check_build_context};

#[test]
fn the_backend_build_stage_copies_everything_cargo_needs() {
    let (ok, stderr) = check_build_context("Dockerfile.backend", "backend", &[]);
    assert!(ok, "cargo failed in the Docker build context:\n{stderr}");
}

#[test]
fn the_check_fails_when_a_copied_path_is_left_out() {
    let (ok, stderr) =
        check_build_context("Dockerfile.backend", "backend-partial", &["loadbalancer/"]);
    assert!(!ok, "cargo succeeded without the loadbalancer member");
    assert!(stderr.contains("loadbalancer"), "{stderr}");
}

#[test]
fn dockerignore_patterns_match_like_docker() {
    let dir = TempDir::new("dockerignore");
    let rules =
        DockerIgnore::read(&dir.write(".dockerignore", ".git\ntarget\n**/target\nDockerfile.*\n"));
    for excluded in [
        ".git/HEAD",
        "target",
        "backend/target/debug/x",
        "Dockerfile.backend",
    ] {
        assert!(rules.excludes(Path::new(excluded)), "{excluded}");
    }
    for kept in ["backend/src/main.rs", "Cargo.toml", "targets", "Dockerfile"] {
        assert!(!rules.excludes(Path::new(kept)), "{kept}");
    }
}
