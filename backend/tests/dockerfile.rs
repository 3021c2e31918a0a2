//! `Dockerfile.backend`'s build stage gets every file its `cargo build` needs: the
//! paths it copies (minus `.dockerignore`) are rebuilt in a temporary directory and
//! the same cargo command runs there, offline.
//!
//! The command runs as `cargo check` instead of `cargo build`: resolving the
//! workspace, finding every source file and type-checking all of it is what the
//! context can make fail, and check does all of that without the slow release code
//! generation and LTO. `--offline` proves nothing is fetched from outside the
//! context beyond the locked registry crates. The real build is exercised by
//! building the image (`make image-backend`).

mod support;

use std::path::Path;

use support::TempDir;
use support::dockerfile::{BuildStage, DockerIgnore, cargo, workspace_root};

/// The Dockerfile's own cargo arguments, with `build` turned into `check` and
/// `--offline` added (see the module docs for why).
fn check_args(stage: &BuildStage) -> Vec<String> {
    assert_eq!(stage.cargo_args[0], "build", "{:?}", stage.cargo_args);
    assert!(
        stage.cargo_args.iter().any(|a| a == "--locked"),
        "the image must build from the committed Cargo.lock"
    );
    let mut args = vec!["check".to_owned()];
    args.extend(stage.cargo_args[1..].iter().cloned());
    args.push("--offline".to_owned());
    args
}

/// Compiled dependencies live here across runs, under the workspace's target dir.
fn target_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_TARGET_TMPDIR"), "/dockerfile-context"))
}

#[test]
fn the_backend_build_stage_copies_everything_cargo_needs() {
    let root = workspace_root();
    let stage = BuildStage::parse(&root.join("Dockerfile.backend"));
    let context = TempDir::new("docker-context");
    stage.copy_context(&root, context.path(), &[]);
    assert!(
        !context.path().join("target").exists(),
        ".dockerignore keeps build output out"
    );

    let (ok, stderr) = cargo(context.path(), &check_args(&stage), target_dir());
    assert!(ok, "cargo failed in the Docker build context:\n{stderr}");
}

#[test]
fn the_check_fails_when_a_copied_path_is_left_out() {
    let root = workspace_root();
    let stage = BuildStage::parse(&root.join("Dockerfile.backend"));
    let context = TempDir::new("docker-context-partial");
    stage.copy_context(&root, context.path(), &["loadbalancer/"]);

    let (ok, stderr) = cargo(context.path(), &check_args(&stage), target_dir());
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
