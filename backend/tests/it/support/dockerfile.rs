//! Reads a Dockerfile's build stage and rebuilds its build context on disk, so a
//! test can prove that the files the Dockerfile copies are all its build needs:
//! [`check_build_context`] copies what the `COPY` lines take (minus `.dockerignore`)
//! into a fresh directory and runs the Dockerfile's own cargo command there.
//!
//! Both crates' Dockerfile tests use this one file through their `support` module,
//! the load balancer's with `#[path]` (see `loadbalancer/tests/it/support/mod.rs`),
//! so it depends on nothing but std.
//!
//! The command runs as `cargo check` instead of `cargo build`: resolving the
//! workspace, finding every source file and type-checking all of it is what the
//! context can make fail, and check does all of that without the slow release code
//! generation and LTO. `--offline` proves nothing is fetched from outside the
//! context beyond the locked registry crates. The real build is exercised by
//! building the image (`make images`).
//!
//! Only the Dockerfile features our Dockerfiles use are understood (`FROM`,
//! `WORKDIR`, `COPY` without `--from`, `RUN` with line continuations, and
//! `.dockerignore` lines with `*` and `**`); anything else fails loudly rather than
//! being misread.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root, where the Dockerfiles and `.dockerignore` live.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("every crate sits directly below the workspace root")
        .to_path_buf()
}

/// What the first stage of a Dockerfile does.
#[derive(Debug)]
pub(crate) struct BuildStage {
    /// Each `COPY`: its source paths (relative to the context) and destination
    /// (relative to the stage's `WORKDIR`; empty for the workdir itself).
    pub(crate) copies: Vec<(Vec<String>, String)>,
    /// The `cargo` arguments of the `RUN` that builds, e.g. `build --release ...`.
    pub(crate) cargo_args: Vec<String>,
}

impl BuildStage {
    /// Parses the first stage of the Dockerfile at `path`.
    pub(crate) fn parse(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).expect("the Dockerfile exists");
        let mut workdir = String::from("/");
        let mut copies = Vec::new();
        let mut cargo_args = Vec::new();
        let mut stages = 0;
        for instruction in instructions(&text) {
            let words: Vec<&str> = instruction.split_whitespace().collect();
            match words[0].to_ascii_uppercase().as_str() {
                "FROM" => {
                    stages += 1;
                    if stages > 1 {
                        break;
                    }
                }
                "WORKDIR" => workdir = words[1].trim_end_matches('/').to_owned() + "/",
                "COPY" => {
                    let args: Vec<&str> = words[1..].to_vec();
                    assert!(
                        args.iter().all(|a| !a.starts_with("--")),
                        "COPY flags are not understood here: {instruction}"
                    );
                    let (dest, sources) = args.split_last().expect("COPY has a destination");
                    let dest = dest.strip_prefix(&workdir).unwrap_or(dest);
                    assert!(
                        !dest.starts_with('/'),
                        "COPY outside WORKDIR {workdir}: {instruction}"
                    );
                    let dest = dest.trim_start_matches("./").trim_start_matches('.');
                    copies.push((
                        sources.iter().map(|s| (*s).to_owned()).collect(),
                        dest.to_owned(),
                    ));
                }
                "RUN" => {
                    if let Some(at) = words.windows(2).position(|w| w == ["cargo", "build"]) {
                        cargo_args = words[at + 1..]
                            .iter()
                            .take_while(|w| !matches!(**w, "&&" | ";" | "||"))
                            .map(|w| (*w).to_owned())
                            .collect();
                    }
                }
                _ => {}
            }
        }
        assert!(!copies.is_empty(), "the build stage copies nothing");
        assert!(
            !cargo_args.is_empty(),
            "the build stage runs no `cargo build`"
        );
        Self { copies, cargo_args }
    }

    /// The Dockerfile's own cargo arguments, with `build` turned into `check` and
    /// `--offline` added (see the module docs for why).
    pub(crate) fn check_args(&self) -> Vec<String> {
        assert_eq!(self.cargo_args[0], "build", "{:?}", self.cargo_args);
        assert!(
            self.cargo_args.iter().any(|a| a == "--locked"),
            "the image must build from the committed Cargo.lock"
        );
        let mut args = vec!["check".to_owned()];
        args.extend(self.cargo_args[1..].iter().cloned());
        args.push("--offline".to_owned());
        args
    }

    /// Copies what the build stage's `COPY` lines take from `context` into `into`,
    /// leaving out what `.dockerignore` excludes and any source in `skip`.
    pub(crate) fn copy_context(&self, context: &Path, into: &Path, skip: &[&str]) {
        let ignore = DockerIgnore::read(&context.join(".dockerignore"));
        for (sources, dest) in &self.copies {
            for source in sources.iter().filter(|s| !skip.contains(&s.as_str())) {
                let relative = source.trim_start_matches("./").trim_end_matches('/');
                let from = context.join(relative);
                assert!(from.exists(), "COPY source {source} does not exist");
                let to = if from.is_dir() || dest.ends_with('/') || dest.is_empty() {
                    // A directory's contents land in the destination directory; files
                    // copied "into" a directory keep their name.
                    let base = into.join(dest);
                    if from.is_dir() {
                        base
                    } else {
                        base.join(from.file_name().expect("a file has a name"))
                    }
                } else {
                    into.join(dest)
                };
                copy_tree(&from, Path::new(relative), &to, &ignore);
            }
        }
    }
}

/// Copies `from` (whose context-relative path is `relative`) to `to`, recursively,
/// skipping ignored paths.
fn copy_tree(from: &Path, relative: &Path, to: &Path, ignore: &DockerIgnore) {
    if ignore.excludes(relative) {
        return;
    }
    if from.is_dir() {
        std::fs::create_dir_all(to).expect("the temp dir is writable");
        for entry in std::fs::read_dir(from).expect("the context is readable") {
            let name = entry.expect("the context is readable").file_name();
            copy_tree(
                &from.join(&name),
                &relative.join(&name),
                &to.join(&name),
                ignore,
            );
        }
    } else {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).expect("the temp dir is writable");
        }
        std::fs::copy(from, to).expect("the context file copies");
    }
}

/// Dockerfile instructions with comments dropped and `\` continuations joined.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// The patterns of a `.dockerignore` file.
#[derive(Debug)]
pub(crate) struct DockerIgnore {
    patterns: Vec<Vec<String>>,
}

impl DockerIgnore {
    /// Reads the file at `path`; a missing file ignores nothing.
    pub(crate) fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let patterns = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                assert!(
                    !l.starts_with('!'),
                    "`!` exceptions are not understood here: {l}"
                );
                l.trim_start_matches('/')
                    .trim_end_matches('/')
                    .split('/')
                    .map(str::to_owned)
                    .collect()
            })
            .collect();
        Self { patterns }
    }

    /// Docker excludes a path when a pattern matches it or any directory above it.
    pub(crate) fn excludes(&self, path: &Path) -> bool {
        let parts: Vec<String> = path
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        (1..=parts.len()).any(|n| {
            self.patterns
                .iter()
                .any(|pattern| matches_parts(pattern, &parts[..n]))
        })
    }
}

/// Matches path components against pattern components; `**` spans any number of
/// components and `*` any run of characters within one.
fn matches_parts(pattern: &[String], parts: &[String]) -> bool {
    match pattern.split_first() {
        None => parts.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=parts.len()).any(|skip| matches_parts(rest, &parts[skip..]))
        }
        Some((first, rest)) => match parts.split_first() {
            Some((part, others)) => glob(first, part) && matches_parts(rest, others),
            None => false,
        },
    }
}

fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, suffix)) => {
            name.len() >= prefix.len() + suffix.len()
                && name.starts_with(prefix)
                && (0..=name.len() - prefix.len()).any(|at| {
                    name.is_char_boundary(prefix.len() + at)
                        && glob(suffix, &name[prefix.len() + at..])
                })
        }
    }
}

/// Runs `cargo args` in `dir`, with compiled dependencies kept under `target_dir` so
/// that later runs reuse them. Returns whether it succeeded, and its stderr.
pub(crate) fn cargo(dir: &Path, args: &[String], target_dir: &Path) -> (bool, String) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir)
        .output()
        .expect("cargo runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Rebuilds the build context that `dockerfile` (a file name in the workspace root)
/// copies, leaving out the sources in `skip`, in a fresh directory named after
/// `label`, and runs the Dockerfile's cargo command there (see the module docs).
/// Returns whether cargo succeeded, and its stderr.
///
/// The directory is left in place afterwards for a look at what the image would
/// get; the next run with the same label starts it afresh.
pub(crate) fn check_build_context(dockerfile: &str, label: &str, skip: &[&str]) -> (bool, String) {
    let root = workspace_root();
    let stage = BuildStage::parse(&root.join(dockerfile));
    let context = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("docker-context")
        .join(label);
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).expect("the target dir is writable");
    stage.copy_context(&root, &context, skip);
    assert!(
        !context.join("target").exists(),
        ".dockerignore keeps build output out"
    );
    // Compiled dependencies are kept here across runs (and shared by every context),
    // so only the workspace's own crates are checked again each time.
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dockerfile-context");
    cargo(&context, &stage.check_args(), &target_dir)
}
