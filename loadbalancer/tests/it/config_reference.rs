//! The configuration reference in `docs/configuration.md`, checked against the
//! code of both programs: every key a program reads is in its table and every key
//! in the table is read, each documented default is the one the code fills in,
//! and each documented range is exactly what the code accepts (both ends pass, one
//! past either end is rejected with an error naming the key).

use std::path::{Path, PathBuf};

use loadbalancer::config::Config;
use serde_json::Value;

/// One row of the reference table.
#[derive(Debug)]
struct Row {
    /// `healthCheck.intervalMs`, as the table writes it.
    key: String,
    /// The documented default as JSON, or `None` for a required key.
    default: Option<Value>,
    /// The documented range: `(low, Some(high))` for `a–b`, `(low, None)` for `≥ a`.
    range: Option<(i64, Option<i64>)>,
}

/// The guide's required keys, the smallest valid file, with TLS on (`"tls": {}`)
/// so that its keys are read with their defaults too.
const REQUIRED: &str =
    r#"{"port": 8080, "backendServiceName": "web", "backendPort": 80, "tls": {}}"#;

fn reference() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md")
}

/// The rows of the table under `heading` (a `##` or `###` heading), up to the next
/// heading of either level.
fn rows(heading: &str) -> Vec<Row> {
    let text = std::fs::read_to_string(reference()).expect("docs/configuration.md is readable");
    let section = text
        .split("\n## ")
        .flat_map(|section| section.split("\n### "))
        .find(|section| section.starts_with(heading))
        .unwrap_or_else(|| panic!("no section {heading:?} in docs/configuration.md"));
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let [_, key, default, range, ..] = cells[..] else {
                panic!("a row has too few cells: {line}");
            };
            Row {
                key: key.trim_matches('`').to_owned(),
                default: (default != "required").then(|| {
                    serde_json::from_str(default.trim_matches('`'))
                        .unwrap_or_else(|_| panic!("the default of {key} is JSON: {default}"))
                }),
                range: parse_range(range),
            }
        })
        .collect()
}

/// The load balancer's rows: the main table and the TLS keys' own.
fn load_balancer_rows() -> Vec<Row> {
    let mut rows = rows("Load balancer keys");
    rows.extend(self::rows("TLS keys"));
    rows
}

/// `a–b`, `≥ a` or `—`.
fn parse_range(text: &str) -> Option<(i64, Option<i64>)> {
    let number = |s: &str| -> i64 { s.trim().parse().expect("a range bound is an integer") };
    if let Some(low) = text.strip_prefix('≥') {
        return Some((number(low), None));
    }
    let (low, high) = text.split_once('–')?;
    Some((number(low), Some(number(high))))
}

/// The JSON pointer of a key path: `healthCheck.intervalMs` → `/healthCheck/intervalMs`.
fn pointer(key: &str) -> String {
    key.split('.').map(|part| format!("/{part}")).collect()
}

/// Every key path of a parsed config, nested blocks as `block.key`; `weights` is
/// a map of the user's own keys, so it counts as one key.
fn key_paths(value: &Value, prefix: &str, paths: &mut Vec<String>) {
    let Value::Object(object) = value else {
        return;
    };
    for (key, value) in object {
        let path = format!("{prefix}{key}");
        match value {
            Value::Object(_) if key != "weights" => key_paths(value, &format!("{path}."), paths),
            _ => paths.push(path),
        }
    }
}

/// `required` (a JSON object) with `key` set to `value`.
fn with(required: &str, key: &str, value: Value) -> String {
    let mut file: Value = serde_json::from_str(required).expect("the required keys are JSON");
    let mut at = &mut file;
    let parts: Vec<&str> = key.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        at = at
            .as_object_mut()
            .expect("an object")
            .entry(part.to_owned())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    at.as_object_mut()
        .expect("an object")
        .insert(parts[parts.len() - 1].to_owned(), value);
    file.to_string()
}

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("config.json")).map_err(|error| error.to_string())
}

/// Checks each documented range of `rows` with `parse`: both ends are
/// accepted, one past either end is rejected with an error naming the key.
fn check_ranges<T>(rows: &[Row], required: &str, parse: impl Fn(&str) -> Result<T, String>) {
    for row in rows {
        let Some((low, high)) = row.range else {
            continue;
        };
        let key = &row.key;
        for accepted in [Some(low), high].into_iter().flatten() {
            if let Err(error) = parse(&with(required, key, accepted.into())) {
                panic!("{key} = {accepted} is documented as valid: {error}");
            }
        }
        for rejected in [Some(low - 1), high.map(|high| high + 1)]
            .into_iter()
            .flatten()
        {
            let Err(error) = parse(&with(required, key, rejected.into())) else {
                panic!("{key} = {rejected} is outside the documented range");
            };
            assert!(error.contains(key), "the error names {key}: {error}");
        }
    }
}

#[test]
fn every_key_the_code_reads_is_documented_with_its_default() {
    let config = parse(REQUIRED).expect("the required keys alone are a valid file");
    let written = serde_json::to_value(&config).expect("a config serializes");
    let mut code_keys = Vec::new();
    key_paths(&written, "", &mut code_keys);
    code_keys.sort();
    let rows = load_balancer_rows();
    let mut documented: Vec<String> = rows.iter().map(|row| row.key.clone()).collect();
    documented.sort();
    assert_eq!(
        documented, code_keys,
        "the table and the code list different keys"
    );
    for row in &rows {
        let Some(default) = &row.default else {
            continue;
        };
        assert_eq!(
            written.pointer(&pointer(&row.key)),
            Some(default),
            "{}: the documented default is not the code's",
            row.key
        );
    }
}

#[test]
fn every_documented_range_is_what_the_code_accepts() {
    check_ranges(&load_balancer_rows(), REQUIRED, parse);
}

/// The backend's required keys.
const BACKEND_REQUIRED: &str = r#"{"port": 8080, "serviceName": "web"}"#;

fn parse_backend(text: &str) -> Result<backend::config::Config, String> {
    backend::config::parse(text, Path::new("config.json")).map_err(|error| error.to_string())
}

#[test]
fn every_key_the_backend_reads_is_documented_with_its_default() {
    // The backend names every key it knows when it meets one it does not.
    let error = parse_backend(&with(BACKEND_REQUIRED, "noSuchKey", 1.into()))
        .expect_err("an unknown key is rejected");
    let known = error
        .split_once("(known keys: ")
        .and_then(|(_, list)| list.strip_suffix(')'))
        .unwrap_or_else(|| panic!("the error lists the known keys: {error}"));
    let mut code_keys: Vec<&str> = known.split(", ").collect();
    code_keys.sort_unstable();
    let rows = rows("Backend keys");
    let mut documented: Vec<&str> = rows.iter().map(|row| row.key.as_str()).collect();
    documented.sort_unstable();
    assert_eq!(
        documented, code_keys,
        "the table and the code list different keys"
    );
    // A documented default, written out, changes nothing.
    let defaults = parse_backend(BACKEND_REQUIRED).expect("the required keys are a valid file");
    for row in &rows {
        if let Some(default) = &row.default {
            let written = parse_backend(&with(BACKEND_REQUIRED, &row.key, default.clone()))
                .unwrap_or_else(|error| panic!("{}'s default is valid: {error}", row.key));
            assert_eq!(
                written, defaults,
                "{}: the documented default is not the code's",
                row.key
            );
        }
    }
}

#[test]
fn every_range_documented_for_the_backend_is_what_it_accepts() {
    check_ranges(&rows("Backend keys"), BACKEND_REQUIRED, parse_backend);
}
