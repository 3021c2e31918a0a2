//! The module layering of each crate, checked so that it cannot erode.
//!
//! Each crate's top-level modules (`src/foo.rs` and everything under `src/foo/`
//! make up the module `foo`) are sorted into layers, from the bottom (small
//! building blocks that know nothing of the rest) to the top (the code that wires
//! everything together). The rule is that a module may import modules of its own
//! layer or of a lower one, never of a higher one, and that no chain of imports
//! leads back to where it started, not even inside one layer. Kept that way, each
//! layer can be read, tested and changed knowing only the layers below it, and a
//! change to a high layer cannot break a low one. When a low module wants
//! something from a higher one, that is nearly always a sign that the type it needs
//! lives in the wrong place: move the type down (into the low module itself, or
//! into a module below both), or have the higher module pass the value in, rather
//! than bending the table. Moving a module up the table is fine when that is where
//! it truly belongs; the table then documents it.
//!
//! The test reads the source files, not the compiler's view of them: a small
//! tokenizer drops comments, strings and character literals, and the scanner then
//! looks for paths that start with `crate::`, `super::` or `self::` (in `use`
//! trees, grouped ones included, and in plain expression and type paths) and works
//! out which top-level module each one lands in. It fails, listing every problem
//! at once, (a) on an import that points up the layer table, (b) on an import
//! cycle between top-level modules, and (c) when the table and `src/lib.rs` do not
//! list the same modules, so the table cannot go stale. Layers are numbered from
//! 0 at the bottom in its messages. `main.rs` sits above every layer and is not
//! checked: it uses the library by the crate's name, not through `crate::`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

/// The load balancer's layers, bottom first; `docs/architecture.md` says what
/// each layer is for.
const LOADBALANCER_LAYERS: &[&[&str]] = &[
    // `topology` is a leaf: the routing that reads its locality lives in the
    // balancer and the backend list, below whatever learns it.
    &[
        "metrics",
        "shutdown",
        "response",
        "balancer",
        "retry",
        "ratelimit",
        "client_ip",
        "topology",
        "concurrency",
    ],
    &["backend_state"],
    &["backends"],
    &["outlier", "discovery", "upstream", "tls"],
    &["proxy", "health"],
    &["server", "workers", "admin"],
    &["config"],
    &["app", "reload"],
];

/// The backend's layers, bottom first.
const BACKEND_LAYERS: &[&[&str]] = &[
    &["identity", "metrics", "shutdown"],
    &["handlers"],
    // The gRPC listener serves the same app beside the HTTP one, and borrows its
    // defaults and request-id header.
    &["server", "grpc"],
    // The config file's format holds the server limits (so `config` imports
    // `server`), and the reloader applies what the config says.
    &["config"],
    &["reload"],
];

/// The shared crate's layers, bottom first: the accept loop checks request
/// framing with the header helpers; the rest stand alone.
const SERVICE_KIT_LAYERS: &[&[&str]] = &[
    &["headers", "logging", "config_watch", "metrics"],
    &["listener"],
];

#[test]
fn loadbalancer_layers_point_down() {
    assert_layers_point_down(&Crate {
        name: "loadbalancer",
        src: Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        layers: LOADBALANCER_LAYERS,
    });
}

#[test]
fn service_kit_layers_point_down() {
    assert_layers_point_down(&Crate {
        name: "service-kit",
        src: Path::new(env!("CARGO_MANIFEST_DIR")).join("../service-kit/src"),
        layers: SERVICE_KIT_LAYERS,
    });
}

#[test]
fn backend_layers_point_down() {
    assert_layers_point_down(&Crate {
        name: "backend",
        src: Path::new(env!("CARGO_MANIFEST_DIR")).join("../backend/src"),
        layers: BACKEND_LAYERS,
    });
}

/// One crate to check: where its sources are, and its layer table.
#[derive(Debug)]
struct Crate {
    /// The name the problems are reported under.
    name: &'static str,
    /// The crate's `src` directory.
    src: PathBuf,
    /// Layers from the bottom up, each a list of top-level module names.
    layers: &'static [&'static [&'static str]],
}

/// Reads the crate's sources from disk and fails with every problem found.
fn assert_layers_point_down(krate: &Crate) {
    let mut sources = Vec::new();
    read_sources(&krate.src, "", &mut sources);
    let problems = check(krate.name, krate.layers, &sources);
    assert!(
        problems.is_empty(),
        "{} layering problem(s) in the {} crate:\n\n{}\n\n\
         A module may import its own layer or lower ones, never a higher one, and no \
         imports may form a cycle. If a lower module needs a higher module's type, \
         the type most likely belongs lower down: move it, or pass the value in from \
         above. The layer tables are in loadbalancer/tests/it/architecture.rs.",
        problems.len(),
        krate.name,
        problems.join("\n"),
    );
}

/// Collects every `.rs` file under `dir` as (path relative to `src`, text), the
/// form [`check`] works on.
fn read_sources(dir: &Path, prefix: &str, out: &mut Vec<(String, String)>) {
    let entries =
        fs::read_dir(dir).unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()));
    let mut paths: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a directory entry can be read").path())
        .collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .expect("source file names are UTF-8");
        let relative = format!("{prefix}{name}");
        if path.is_dir() {
            read_sources(&path, &format!("{relative}/"), out);
        } else if name.ends_with(".rs") {
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
            out.push((relative, text));
        }
    }
}

/// Where one import was seen.
#[derive(Debug, Clone)]
struct Site {
    /// The file, as `src/...`.
    file: String,
    line: usize,
    /// Inside `#[cfg(test)]` code.
    test: bool,
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)?;
        if self.test {
            write!(f, " (test code)")?;
        }
        Ok(())
    }
}

/// The checker's core: given a crate's layer table and its sources as
/// (path relative to `src`, text) pairs, returns every problem, one message each
/// (a cycle's message spans several lines). No problems means the layering holds.
fn check(crate_name: &str, layers: &[&[&str]], sources: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();

    let mut layer_of: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, layer) in layers.iter().enumerate() {
        for &module in *layer {
            if let Some(earlier) = layer_of.insert(module, index) {
                problems.push(format!(
                    "{crate_name}: the layer table lists `{module}` twice (layers {earlier} and {index})"
                ));
            }
        }
    }

    let declared = match sources.iter().find(|(path, _)| path == "lib.rs") {
        Some((_, text)) => declared_modules(&tokenize(text)),
        None => {
            problems.push(format!(
                "{crate_name}: there is no src/lib.rs to take the module list from"
            ));
            BTreeSet::new()
        }
    };

    // Every import between two different top-level modules, with all its sites.
    let mut modules = declared.clone();
    let mut edges: BTreeMap<(String, String), Vec<Site>> = BTreeMap::new();
    // One site per line: `use crate::a::{X, Y};` is one import of `a`.
    let mut seen = BTreeSet::new();
    for (path, text) in sources {
        let Some(module_path) = module_path_of(path) else {
            continue;
        };
        let from = module_path[0].clone();
        modules.insert(from.clone());
        for import in imports(&module_path, &tokenize(text)) {
            // An item defined at the crate root (a type such as the kit's
            // `BoxError`) belongs to no layer: the root sits below them all.
            if is_root_item(&import.target) {
                continue;
            }
            let site = (path.clone(), import.target.clone(), import.line);
            if import.target != from && seen.insert(site) {
                edges
                    .entry((from.clone(), import.target))
                    .or_default()
                    .push(Site {
                        file: format!("src/{path}"),
                        line: import.line,
                        test: import.test,
                    });
            }
        }
    }

    // The table and the crate must list the same modules.
    for module in &modules {
        if !layer_of.contains_key(module.as_str()) {
            problems.push(format!(
                "{crate_name}: module `{module}` is not in the layer table; add it to the layer it belongs to"
            ));
        }
    }
    for module in layer_of.keys() {
        if !declared.contains(*module) {
            problems.push(format!(
                "{crate_name}: the layer table lists `{module}`, but src/lib.rs declares no such module"
            ));
        }
    }

    // Imports must point down (or sideways).
    for ((from, to), sites) in &edges {
        let sites = sites
            .iter()
            .map(Site::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        match (layer_of.get(from.as_str()), layer_of.get(to.as_str())) {
            (Some(&low), Some(&high)) if low < high => problems.push(format!(
                "{crate_name}: module `{from}` (layer {low}) imports `{to}` (layer {high}) in {sites}"
            )),
            (_, None) if !modules.contains(to) => problems.push(format!(
                "{crate_name}: module `{from}` imports `{to}`, which is no top-level module, in {sites}"
            )),
            _ => {}
        }
    }

    problems.extend(cycles(crate_name, &edges));
    problems
}

/// Whether `name`, the first segment after `crate::`, is an item of the crate
/// root rather than a module: module names are snake case, types and constants
/// start with a capital.
fn is_root_item(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase())
}

/// The module path a file defines, or `None` for the crate roots, which are not
/// checked: `lib.rs` only declares modules (checked against the table instead),
/// and binaries use the library by the crate's name, never by `crate::`.
/// `foo.rs` and `foo/mod.rs` are `foo`, `foo/bar.rs` is `foo::bar`.
fn module_path_of(path: &str) -> Option<Vec<String>> {
    let stem = path.strip_suffix(".rs")?;
    if stem == "lib" || stem == "main" || stem.starts_with("bin/") {
        return None;
    }
    let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
    if parts.len() > 1 && parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    Some(parts)
}

/// Reports the import cycles. Every import that lies on a cycle is shown in one:
/// for each such import `a -> b`, the shortest way back from `b` to `a`, so each
/// cycle is short and concrete. Each cycle is listed once, with the place of each
/// of its imports (outside test code where there is one).
fn cycles(crate_name: &str, edges: &BTreeMap<(String, String), Vec<Site>>) -> Vec<String> {
    let mut next: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().insert(to);
    }

    let mut found: BTreeSet<Vec<&str>> = BTreeSet::new();
    for (from, to) in edges.keys() {
        let (from, to) = (from.as_str(), to.as_str());
        // Breadth first from `to` until an import leads back to `from`.
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([to]);
        let mut back = false;
        while let Some(module) = queue.pop_front() {
            if module == from {
                back = true;
                break;
            }
            for &after in next.get(module).into_iter().flatten() {
                if after != to && !parent.contains_key(after) {
                    parent.insert(after, module);
                    queue.push_back(after);
                }
            }
        }
        if !back {
            continue;
        }
        let mut cycle = vec![from];
        let mut module = from;
        while module != to {
            module = parent[module];
            cycle.push(module);
        }
        // Walked backwards from `from`; turn it round, then start it at the
        // smallest name so that a cycle found from several imports is listed once.
        cycle.reverse();
        cycle.rotate_right(1);
        let smallest = (0..cycle.len())
            .min_by_key(|&i| cycle[i])
            .expect("a cycle has at least two modules");
        cycle.rotate_left(smallest);
        found.insert(cycle);
    }

    found
        .into_iter()
        .map(|cycle| {
            let mut path = cycle.clone();
            path.push(cycle[0]);
            let mut message = format!("{crate_name}: import cycle `{}`:", path.join(" -> "));
            for pair in path.windows(2) {
                let sites = &edges[&(pair[0].to_owned(), pair[1].to_owned())];
                let site = sites.iter().find(|site| !site.test).unwrap_or(&sites[0]);
                message.push_str(&format!("\n    `{}` -> `{}` in {site}", pair[0], pair[1]));
            }
            message
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// The parser. It is deliberately small, and honest about what it does not see:
// * paths a macro builds: `$crate::x` inside a `macro_rules!` counts for the module
//   that defines the macro, not for the modules that use it, and a path inside a
//   string (`#[doc = "..."]`, `include!`, `concat!`) is not seen at all;
// * a `#[path = "..."]` module declared inside a module's file: its file is taken
//   for whatever module its location says. In `lib.rs`, a `#[path]` module whose
//   file lies outside `src/` is never read, so it counts as a leaf (the backend's
//   `listener`);
// * glob imports of the crate root (`use crate::*;`), which name no module;
// * what `lib.rs` re-exports: `crate::Thing` for a re-exported `Thing` is reported
//   as an import of a module that does not exist;
// * `#[cfg(test)] mod tests;` in a file of its own: its imports are not marked as
//   test code.
// Imports in `#[cfg(test)]` code count like any other (they tie the module to the
// higher one whenever its tests compile); the report marks them as test code.
// ---------------------------------------------------------------------------------

/// A token of Rust source, as far as the checker cares: comments, whitespace,
/// literals and lifetimes are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// An identifier or keyword (`r#x` is `x`).
    Ident(String),
    /// `::`.
    PathSep,
    /// Any other single punctuation character.
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    line: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

fn is_ident_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Splits source text into [`Token`]s, skipping comments (line, doc and nested
/// block comments), string literals (plain, byte, C and raw, with any number of
/// `#`), character and byte literals, lifetimes and numbers.
fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i, &mut line);
        } else if c == '\'' {
            i = skip_quote(&chars, i);
        } else if c.is_ascii_digit() {
            while i < chars.len() && is_ident_continue(chars[i]) {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident_continue(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut hashes = 0;
            while at(i + hashes) == '#' {
                hashes += 1;
            }
            match word.as_str() {
                "r" | "br" | "cr" if at(i + hashes) == '"' => {
                    i = skip_raw_string(&chars, i + hashes + 1, hashes, &mut line);
                }
                "r" if hashes == 1 && is_ident_start(at(i + 1)) => {
                    let start = i + 1;
                    i = start;
                    while i < chars.len() && is_ident_continue(chars[i]) {
                        i += 1;
                    }
                    let kind = Kind::Ident(chars[start..i].iter().collect());
                    tokens.push(Token { kind, line });
                }
                "b" | "c" if at(i) == '"' => i = skip_string(&chars, i, &mut line),
                "b" if at(i) == '\'' => i = skip_quote(&chars, i),
                _ => tokens.push(Token {
                    kind: Kind::Ident(word),
                    line,
                }),
            }
        } else if c == ':' && at(i + 1) == ':' {
            tokens.push(Token {
                kind: Kind::PathSep,
                line,
            });
            i += 2;
        } else {
            tokens.push(Token {
                kind: Kind::Punct(c),
                line,
            });
            i += 1;
        }
    }
    tokens
}

/// Skips the string literal whose opening `"` is at `i`; returns the index after it.
fn skip_string(chars: &[char], mut i: usize, line: &mut usize) -> usize {
    i += 1;
    while i < chars.len() && chars[i] != '"' {
        if chars[i] == '\\' {
            i += 1;
        }
        if chars.get(i) == Some(&'\n') {
            *line += 1;
        }
        i += 1;
    }
    i + 1
}

/// Skips a raw string whose body starts at `i` and ends at `"` and `hashes` `#`s.
fn skip_raw_string(chars: &[char], mut i: usize, hashes: usize, line: &mut usize) -> usize {
    while i < chars.len() {
        if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        if chars[i] == '\n' {
            *line += 1;
        }
        i += 1;
    }
    i
}

/// At a `'`: skips a character literal (`'a'`, `'\n'`, `'\''`, `'\u{1F600}'`) or a
/// lifetime or label (`'a`, `'static`), telling them apart by what follows.
fn skip_quote(chars: &[char], mut i: usize) -> usize {
    if chars.get(i + 1) == Some(&'\\') {
        // An escape: the escaped character, then anything up to the closing quote.
        i += 3;
        while i < chars.len() && chars[i] != '\'' {
            i += 1;
        }
        i + 1
    } else if chars.get(i + 2) == Some(&'\'') {
        i + 3
    } else {
        i += 1;
        while i < chars.len() && is_ident_continue(chars[i]) {
            i += 1;
        }
        i
    }
}

/// The identifier at `tokens[i]`, if there is one.
fn ident_at(tokens: &[Token], i: usize) -> Option<&str> {
    match tokens.get(i) {
        Some(Token {
            kind: Kind::Ident(ident),
            ..
        }) => Some(ident),
        _ => None,
    }
}

fn is_ident(token: Option<&Token>, name: &str) -> bool {
    matches!(token, Some(Token { kind: Kind::Ident(ident), .. }) if ident == name)
}

fn is_punct(token: Option<&Token>, c: char) -> bool {
    matches!(token, Some(Token { kind: Kind::Punct(p), .. }) if *p == c)
}

fn is_path_sep(token: Option<&Token>) -> bool {
    matches!(
        token,
        Some(Token {
            kind: Kind::PathSep,
            ..
        })
    )
}

/// The modules `lib.rs` declares with `mod x;` (any visibility, any attributes).
fn declared_modules(tokens: &[Token]) -> BTreeSet<String> {
    let mut modules = BTreeSet::new();
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate() {
        match &token.kind {
            Kind::Punct('{') => depth += 1,
            Kind::Punct('}') => depth = depth.saturating_sub(1),
            Kind::Ident(ident) if ident == "mod" && depth == 0 => {
                if let Some(name) = ident_at(tokens, i + 1)
                    && is_punct(tokens.get(i + 2), ';')
                {
                    modules.insert(name.to_owned());
                }
            }
            _ => {}
        }
    }
    modules
}

/// Whether `tokens[i..]` starts with `#[cfg(test)]` or `#![cfg(test)]`; returns
/// the number of tokens it spans.
fn cfg_test_at(tokens: &[Token], i: usize) -> Option<usize> {
    if !is_punct(tokens.get(i), '#') {
        return None;
    }
    let bang = usize::from(is_punct(tokens.get(i + 1), '!'));
    let j = i + 1 + bang;
    let matched = is_punct(tokens.get(j), '[')
        && is_ident(tokens.get(j + 1), "cfg")
        && is_punct(tokens.get(j + 2), '(')
        && is_ident(tokens.get(j + 3), "test")
        && is_punct(tokens.get(j + 4), ')')
        && is_punct(tokens.get(j + 5), ']');
    matched.then_some(7 + bang)
}

/// One import found in a file: the top-level module it lands in.
#[derive(Debug, PartialEq, Eq)]
struct Import {
    target: String,
    line: usize,
    /// Inside `#[cfg(test)]` code.
    test: bool,
}

/// Every path in a file that starts with `crate`, `super` or `self`, resolved to
/// the top-level module it lands in. `module_path` is the file's own module path
/// (`["foo", "bar"]` for `src/foo/bar.rs`); inline `mod x { ... }` blocks extend
/// it, so `super` inside `mod tests` is the file's module again.
fn imports(module_path: &[String], tokens: &[Token]) -> Vec<Import> {
    let mut found = Vec::new();
    // Inline modules we are inside: name, brace depth inside it, test code or not.
    let mut inline: Vec<(String, usize, bool)> = Vec::new();
    let mut depth = 0usize;
    let mut file_is_test = false;
    let mut next_is_test = false;
    let mut i = 0;
    while i < tokens.len() {
        let in_test = file_is_test || inline.last().is_some_and(|(_, _, test)| *test);
        if let Some(len) = cfg_test_at(tokens, i) {
            if is_punct(tokens.get(i + 1), '!') && inline.is_empty() {
                file_is_test = true;
            } else {
                next_is_test = true;
            }
            i += len;
            continue;
        }
        match &tokens[i].kind {
            Kind::Ident(word) if word == "mod" => {
                if let Some(name) = ident_at(tokens, i + 1)
                    && is_punct(tokens.get(i + 2), '{')
                {
                    depth += 1;
                    inline.push((name.to_owned(), depth, in_test || next_is_test));
                    next_is_test = false;
                    i += 3;
                    continue;
                }
            }
            Kind::Ident(word)
                if matches!(word.as_str(), "crate" | "super" | "self")
                    && is_path_sep(tokens.get(i + 1))
                    && !(i > 0 && is_path_sep(tokens.get(i - 1))) =>
            {
                let mut paths = Vec::new();
                i = parse_tree(tokens, i, Vec::new(), &mut paths);
                let mut here: Vec<&str> = module_path.iter().map(String::as_str).collect();
                here.extend(inline.iter().map(|(name, _, _)| name.as_str()));
                for path in paths {
                    if let Some((target, line)) = resolve(&here, &path) {
                        found.push(Import {
                            target,
                            line,
                            test: in_test,
                        });
                    }
                }
                continue;
            }
            Kind::Punct('{') => {
                depth += 1;
                next_is_test = false;
            }
            Kind::Punct('}') => {
                if inline.last().is_some_and(|(_, inner, _)| *inner == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                next_is_test = false;
            }
            Kind::Punct(';') => next_is_test = false,
            _ => {}
        }
        i += 1;
    }
    found
}

/// A path's segments, each with the line it is on.
type Segments = Vec<(String, usize)>;

/// Parses the path or `use` tree starting at `tokens[i]`, appending every full path
/// it spells (`crate::{a::x, b::{self, y}}` gives `crate::a::x`, `crate::b::self`
/// and `crate::b::y`) to `out`, each after `prefix`. Returns the index after it.
fn parse_tree(tokens: &[Token], mut i: usize, prefix: Segments, out: &mut Vec<Segments>) -> usize {
    let mut path = prefix;
    loop {
        match tokens.get(i) {
            Some(Token {
                kind: Kind::Ident(ident),
                line,
            }) => {
                path.push((ident.clone(), *line));
                i += 1;
            }
            Some(Token {
                kind: Kind::Punct('*'),
                line,
            }) => {
                path.push(("*".to_owned(), *line));
                i += 1;
                break;
            }
            Some(Token {
                kind: Kind::Punct('{'),
                ..
            }) => {
                return parse_group(tokens, i + 1, &path, out);
            }
            _ => break,
        }
        if is_path_sep(tokens.get(i)) {
            i += 1;
        } else {
            break;
        }
    }
    out.push(path);
    i
}

/// Parses the items of a `{ ... }` group in a `use` tree, from just after the `{`;
/// returns the index after the closing `}`.
fn parse_group(
    tokens: &[Token],
    mut i: usize,
    prefix: &Segments,
    out: &mut Vec<Segments>,
) -> usize {
    loop {
        match tokens.get(i).map(|token| &token.kind) {
            None => return i,
            Some(Kind::Punct('}')) => return i + 1,
            // `as alias`: the alias is no path.
            Some(Kind::Ident(ident)) if ident == "as" => i += 2,
            Some(Kind::Ident(_) | Kind::Punct('*' | '{')) => {
                i = parse_tree(tokens, i, prefix.clone(), out);
            }
            Some(_) => i += 1,
        }
    }
}

/// The top-level module a path lands in, seen from module `here`, with the line of
/// the segment that decides it; `None` if it names no module (a glob of the crate
/// root, or more `super`s than there are modules to climb).
fn resolve(here: &[&str], path: &[(String, usize)]) -> Option<(String, usize)> {
    let mut here = here.to_vec();
    let (first, first_line) = path.first()?;
    match first.as_str() {
        "crate" => here.clear(),
        "super" => {
            here.pop()?;
        }
        "self" => {}
        _ => return None,
    }
    for (segment, line) in &path[1..] {
        match segment.as_str() {
            "super" => {
                here.pop()?;
            }
            "self" => {}
            "*" => break,
            _ => {
                let top = here.first().copied().unwrap_or(segment);
                return Some((top.to_owned(), *line));
            }
        }
    }
    here.first().map(|top| ((*top).to_owned(), *first_line))
}

// ---------------------------------------------------------------------------------
// The checker's own tests, on small crates held in memory.
// ---------------------------------------------------------------------------------

fn fake(files: &[(&str, &str)]) -> Vec<(String, String)> {
    files
        .iter()
        .map(|(path, text)| ((*path).to_owned(), (*text).to_owned()))
        .collect()
}

#[test]
fn a_cycle_is_reported() {
    let sources = fake(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
        ("a.rs", "use crate::b::Thing;\n"),
        (
            "b.rs",
            "pub struct Thing;\npub fn f() {\n    crate::c::g();\n}\n",
        ),
        ("c/mod.rs", "mod inner;\npub fn g() {}\n"),
        ("c/inner.rs", "use super::super::a;\n"),
    ]);
    let problems = check("fake", &[&["a", "b", "c"]], &sources);
    assert_eq!(
        problems,
        vec![
            "fake: import cycle `a -> b -> c -> a`:\n    \
             `a` -> `b` in src/a.rs:1\n    \
             `b` -> `c` in src/b.rs:3\n    \
             `c` -> `a` in src/c/inner.rs:1"
        ]
    );
}

#[test]
fn an_upward_import_is_reported() {
    let sources = fake(&[
        ("lib.rs", "pub mod high;\npub mod low;\n"),
        ("high.rs", "use crate::low::Low;\n"),
        (
            "low.rs",
            "use std::fmt;\nuse crate::{\n    high::High,\n};\n",
        ),
    ]);
    let problems = check("fake", &[&["low"], &["high"]], &sources);
    assert_eq!(
        problems,
        vec![
            "fake: module `low` (layer 0) imports `high` (layer 1) in src/low.rs:3",
            "fake: import cycle `high -> low -> high`:\n    \
             `high` -> `low` in src/high.rs:1\n    \
             `low` -> `high` in src/low.rs:3",
        ]
    );
}

#[test]
fn a_stale_table_is_reported() {
    let sources = fake(&[("lib.rs", "pub mod a;\n#[path = \"x.rs\"]\nmod b;\n")]);
    let problems = check("fake", &[&["a", "gone"]], &sources);
    assert_eq!(
        problems,
        vec![
            "fake: module `b` is not in the layer table; add it to the layer it belongs to",
            "fake: the layer table lists `gone`, but src/lib.rs declares no such module",
        ]
    );
}

#[test]
fn comments_strings_and_lifetimes_are_not_imports() {
    let text = r####"
//! Uses [`crate::x1`].
/// See crate::x2 and `crate::x3`.
/* crate::x4 /* nested crate::x5 */ crate::x6 */
fn f<'a>(s: &'a str) -> char {
    let _ = "crate::x7 \" crate::x8";
    let _ = r#"crate::x9 "# ;
    let _ = br##"crate::x10 "# "##;
    let _ = b"crate::x11";
    let _ = (b'"', '"', '\'', '\u{22}');
    'outer: loop { break 'outer; }
    crate::real::call(); // crate::x12
    'x'
}
"####;
    let found = imports(&["here".to_owned()], &tokenize(text));
    assert_eq!(
        found,
        vec![Import {
            target: "real".to_owned(),
            line: 12,
            test: false
        }]
    );
}

#[test]
fn paths_are_resolved_from_the_file_and_inline_modules() {
    let text = "\
use super::sibling::X;
use super::super::up::Y;
pub(crate) use crate::{a::A, b::{self, B}, c as see};
pub use self::inner::Z;
fn f() -> crate::d::D { todo() }
#[cfg(test)]
mod tests {
    use super::*;
    use super::super::super::e;
}
";
    let found = imports(&["foo".to_owned(), "bar".to_owned()], &tokenize(text));
    let found: Vec<(&str, usize, bool)> = found
        .iter()
        .map(|import| (import.target.as_str(), import.line, import.test))
        .collect();
    assert_eq!(
        found,
        vec![
            ("foo", 1, false),
            ("up", 2, false),
            ("a", 3, false),
            ("b", 3, false),
            ("b", 3, false),
            ("c", 3, false),
            ("foo", 4, false),
            ("d", 5, false),
            ("foo", 8, true),
            ("e", 9, true),
        ]
    );
}
