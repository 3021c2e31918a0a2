//! The documentation holds together: every relative link and `#anchor` in
//! `README.md` and `docs/*.md` leads somewhere (a file or directory of the
//! repository, and a heading of the target page whose GitHub-style slug is the
//! anchor), the README stays a front page of at most 10,000 characters, each
//! docs page links back to it, and no file tracked by git names a path outside
//! the repository (the sibling `shared` directory, or absolute paths under
//! `/work`), since a reader's checkout has neither. Only std: the Markdown
//! read here is the subset these pages use (inline links, ATX headings, fenced
//! code blocks and code spans, which are skipped).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The longest README allowed, in characters: a front page, with the guide in `docs/`.
const README_MAX_CHARS: usize = 10_000;

/// The repository's root: the load balancer crate's parent.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate sits inside the repository")
        .to_path_buf()
}

/// `README.md` and every Markdown page directly in `docs/`.
fn doc_pages() -> Vec<PathBuf> {
    let root = repo_root();
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.expect("docs/ is readable").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ holds the guide's pages");
    pages.extend(docs);
    pages
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `path` relative to the repository, for messages.
fn shown(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

// ---- Markdown, the subset these pages use ----

/// Whether `line` opens or closes a fenced code block (``` or ~~~, indented at
/// most three spaces).
fn is_fence(line: &str) -> bool {
    let trimmed = line.trim_start_matches(' ');
    line.len() - trimmed.len() <= 3 && (trimmed.starts_with("```") || trimmed.starts_with("~~~"))
}

/// The text outside fenced code blocks, as blocks (paragraphs, list items, table
/// rows run together) separated where a blank line or a fence separates them, so
/// that a code span may run over a line break but never out of its block.
fn prose_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current = String::new();
    let mut in_fence = false;
    for line in text.lines() {
        if is_fence(line) {
            in_fence = !in_fence;
            blocks.push(std::mem::take(&mut current));
            continue;
        }
        if in_fence {
            continue;
        }
        if line.trim().is_empty() {
            blocks.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    blocks.push(current);
    blocks.retain(|block| !block.is_empty());
    blocks
}

/// `block` with its code spans removed: a run of backticks opens one, and the
/// next run of the same length closes it; a run with no partner is literal text.
fn without_code_spans(block: &str) -> String {
    let chars: Vec<char> = block.chars().collect();
    let run_at = |i: usize| chars[i..].iter().take_while(|&&c| c == '`').count();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let open = run_at(i);
        let mut j = i + open;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let run = run_at(j);
                if run == open {
                    close = Some(j + run);
                    break;
                }
                j += run;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                out.push(' ');
                i = end;
            }
            None => {
                out.extend(&chars[i..i + open]);
                i += open;
            }
        }
    }
    out
}

/// The targets of the inline links (and images) `[text](target)` in `text`,
/// outside code; a title after the target (`[a](b "title")`) and angle brackets
/// around it (`[a](<b>)`) are dropped.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for block in prose_blocks(text) {
        let prose = without_code_spans(&block);
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            // The link text must have an opening bracket before it.
            if !rest[..at].contains('[') {
                rest = after;
                continue;
            }
            let Some(end) = closing_paren(after) else {
                break;
            };
            let inner = after[..end].trim();
            let target = match inner.strip_prefix('<') {
                Some(bracketed) => bracketed.split('>').next().unwrap_or_default(),
                None => inner.split_whitespace().next().unwrap_or_default(),
            };
            targets.push(target.to_owned());
            rest = &after[end + 1..];
        }
    }
    targets
}

/// The index of the `)` that closes a link target, allowing balanced parentheses
/// inside it.
fn closing_paren(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some(i),
            ')' => depth -= 1,
            '\n' => return None,
            _ => {}
        }
    }
    None
}

/// Whether a link target leaves the repository (a web address, a mail address).
fn is_external(target: &str) -> bool {
    let lower = target.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("mailto:")
}

/// The text of each ATX heading (`#` to `######`) outside fenced code, as
/// rendered: code span backticks, emphasis asterisks and link targets dropped.
fn headings(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if is_fence(line) {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let trimmed = line.trim_start_matches(' ');
        if line.len() - trimmed.len() > 3 {
            continue;
        }
        let hashes = trimmed.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) {
            continue;
        }
        let rest = &trimmed[hashes..];
        if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t')) {
            continue;
        }
        let content = rest.trim().trim_end_matches('#').trim_end();
        found.push(rendered(content));
    }
    found
}

/// A heading's inline Markdown as its rendered text: `[text](target)` becomes
/// `text`, and backticks and asterisks go.
fn rendered(markdown: &str) -> String {
    let mut out = String::new();
    let mut rest = markdown;
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](").map(|m| open + m) else {
            break;
        };
        let Some(end) = closing_paren(&rest[mid + 2..]).map(|e| mid + 2 + e) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..mid]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out.replace(['`', '*'], "")
}

/// GitHub's anchor for a heading's text: lower case, punctuation and symbols
/// dropped except `-` and `_`, each space a `-`. Duplicates are told apart by
/// [`anchors`].
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// Every anchor a page's headings define: the slug of each heading, and for a
/// slug seen before, the slug with `-1`, `-2`, ... appended, as GitHub numbers
/// duplicate headings.
fn anchors(text: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    headings(text)
        .iter()
        .map(|heading| {
            let base = slug(heading);
            let count = seen.entry(base.clone()).or_insert(0);
            let anchor = if *count == 0 {
                base.clone()
            } else {
                format!("{base}-{count}")
            };
            *count += 1;
            anchor
        })
        .collect()
}

// ---- the checks ----

/// Why `target`, linked from `page`, leads nowhere; `None` when it resolves.
fn broken(page: &Path, target: &str) -> Option<String> {
    if is_external(target) {
        return None;
    }
    if target.is_empty() {
        return Some("empty link target".to_owned());
    }
    let (path_part, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let file = if path_part.is_empty() {
        page.to_path_buf()
    } else {
        if path_part.starts_with('/') {
            return Some("absolute path; link relative to the page".to_owned());
        }
        let dir = page.parent().expect("a page has a directory");
        let file = dir.join(path_part);
        if !file.exists() {
            return Some(format!("{} does not exist", shown(&file)));
        }
        let root = repo_root().canonicalize().expect("the root resolves");
        let resolved = file.canonicalize().expect("an existing path resolves");
        if !resolved.starts_with(&root) {
            return Some("leads outside the repository".to_owned());
        }
        file
    };
    let anchor = anchor?;
    if file.extension().is_none_or(|ext| ext != "md") {
        return None;
    }
    let defined = anchors(&read(&file));
    (!defined.iter().any(|a| a == anchor)).then(|| {
        format!(
            "no heading of {} has the anchor #{anchor} (it has: {})",
            shown(&file),
            defined.join(", ")
        )
    })
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for page in doc_pages() {
        for target in link_targets(&read(&page)) {
            checked += 1;
            if let Some(reason) = broken(&page, &target) {
                failures.push(format!("{}: ({target}): {reason}", shown(&page)));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: is the parser blind?"
    );
    assert!(
        failures.is_empty(),
        "broken links:\n{}",
        failures.join("\n")
    );
}

#[test]
fn readme_is_a_front_page() {
    let readme = read(&repo_root().join("README.md"));
    let chars = readme.chars().count();
    assert!(
        chars <= README_MAX_CHARS,
        "README.md has {chars} characters, more than {README_MAX_CHARS}: move detail into docs/"
    );
}

#[test]
fn every_docs_page_opens_with_a_summary_linking_back_to_the_readme() {
    for page in doc_pages().into_iter().skip(1) {
        let text = read(&page);
        let summary = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .nth(1)
            .unwrap_or_default();
        assert!(
            summary.contains("](../README.md)"),
            "{}: the line after the title should summarise the page and link to ../README.md, \
             not {summary:?}",
            shown(&page)
        );
    }
}

/// Text that names a place outside the repository: the sibling `shared`
/// directory, and absolute paths under `/work` (built here from pieces, so that
/// this file does not name them itself).
const OUTSIDE: [&str; 2] = [concat!("..", "/shared"), concat!("/work", "/")];

/// Occurrences that are not paths on disk: the backend has a `/work` endpoint,
/// and its tests ask for a path under it to get a 404.
const NOT_PATHS: [(&str, &str); 1] = [("backend/tests/it/http.rs", concat!("/work", "/extra"))];

/// Where in `text` an outside path starts: an occurrence of a needle of
/// [`OUTSIDE`] that is not the tail of a longer relative path (a directory
/// `work` inside the repository is fine) and is not one of `allowed`.
fn outside_paths(text: &str, allowed: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for needle in OUTSIDE {
        for (at, _) in text.match_indices(needle) {
            let before = text[..at].chars().next_back();
            if needle.starts_with('/')
                && before.is_some_and(|c| c.is_alphanumeric() || "._-".contains(c))
            {
                continue;
            }
            if allowed.iter().any(|a| text[at..].starts_with(a)) {
                continue;
            }
            let line = text[..at].matches('\n').count() + 1;
            let tail = at + needle.len();
            let end = text[tail..]
                .find(['\n', '"', '\'', '`', ' ', ')'])
                .map_or(text.len(), |e| tail + e);
            found.push(format!("line {line}: {}", &text[at..end]));
        }
    }
    found
}

#[test]
fn no_tracked_file_names_a_path_outside_the_repository() {
    let root = repo_root();
    let output = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(&root)
        .output()
        .expect("git runs (the test lists the tracked files with `git ls-files`)");
    assert!(output.status.success(), "git ls-files failed: {output:?}");
    let listing = String::from_utf8(output.stdout).expect("file names are UTF-8");
    let mut failures = Vec::new();
    let mut scanned = 0;
    for name in listing.split('\0').filter(|name| !name.is_empty()) {
        if name == "Cargo.lock" || name.ends_with("/Cargo.lock") {
            continue;
        }
        // A file deleted in the work tree but not yet in the index is not there to read.
        let Ok(bytes) = std::fs::read(root.join(name)) else {
            continue;
        };
        // Binaries (images and the like) are skipped: a NUL byte or invalid UTF-8.
        if bytes.contains(&0) {
            continue;
        }
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        scanned += 1;
        let allowed: Vec<&str> = NOT_PATHS
            .iter()
            .filter(|(file, _)| *file == name)
            .map(|(_, text)| *text)
            .collect();
        for place in outside_paths(&text, &allowed) {
            failures.push(format!("{name}: {place}"));
        }
    }
    assert!(scanned > 50, "only {scanned} tracked text files read");
    assert!(
        failures.is_empty(),
        "files naming paths outside the repository:\n{}",
        failures.join("\n")
    );
}

// ---- the parsing itself ----

#[test]
fn slug_lowercases_drops_punctuation_and_joins_words_with_hyphens() {
    assert_eq!(slug("Quick start"), "quick-start");
    assert_eq!(
        slug("Limits, bad input and shutdown"),
        "limits-bad-input-and-shutdown"
    );
    assert_eq!(slug("Manifests (k8s/)"), "manifests-k8s");
    assert_eq!(
        slug("Scenarios: watch the load balancer follow the pods"),
        "scenarios-watch-the-load-balancer-follow-the-pods"
    );
    assert_eq!(
        slug("Memory with 1,000 connections"),
        "memory-with-1000-connections"
    );
    assert_eq!(
        slug("Why 1.1× is out of reach here"),
        "why-11-is-out-of-reach-here"
    );
    assert_eq!(
        slug("snake_case and kebab-case stay"),
        "snake_case-and-kebab-case-stay"
    );
    assert_eq!(slug("a  b"), "a--b");
}

#[test]
fn duplicate_headings_get_numbered_anchors() {
    let page = "# Title\n## Notes\ntext\n## Notes\n### Notes\n```\n## not a heading\n```\n";
    assert_eq!(anchors(page), ["title", "notes", "notes-1", "notes-2"]);
}

#[test]
fn headings_are_read_as_rendered() {
    let page = "## Manifests (`k8s/`)\n## *Smooth* [weighted](x.md) round-robin ##\n#hashtag\n";
    assert_eq!(
        headings(page),
        ["Manifests (k8s/)", "Smooth weighted round-robin"]
    );
}

#[test]
fn links_in_code_are_not_links() {
    let page = "See [ops](docs/operations.md#resilience) and ![img](a.png \"t\").\n\
                `[not](a link)` and ``[nor](this ` one)``\n\n\
                ```\n[inside](a fence)\n```\n\
                [spans `a code\nspan`](b.md) [web](https://example.com)\n";
    assert_eq!(
        link_targets(page),
        [
            "docs/operations.md#resilience",
            "a.png",
            "b.md",
            "https://example.com"
        ]
    );
    assert!(is_external("https://example.com"));
    assert!(is_external("mailto:someone@example.com"));
    assert!(!is_external("docs/operations.md"));
}

#[test]
fn outside_paths_are_found_but_relative_and_allowed_ones_are_not() {
    let shared = concat!("..", "/shared/tools/x");
    let work = concat!("/work", "/main/target");
    let relative = concat!("some/work", "/dir");
    let endpoint = concat!("/work", "/extra");
    let text = format!("a {shared}\nb \"{work}\"\nc {relative}\nd \"{endpoint}\"\n");
    let found = outside_paths(&text, &[endpoint]);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0], format!("line 1: {shared}"));
    assert_eq!(found[1], format!("line 2: {work}"));
}
