//! The config loader against real files: the defaults, the shipped local config, and
//! one test per kind of error, each checking that the message names the file.

use std::path::Path;
use std::time::Duration;

use backend::config::{self, Config, ConfigError, LogFormat};
use backend::server::{DEFAULT_LIMITS, ServerLimits};
use tracing::level_filters::LevelFilter;

use crate::support::TempDir;

/// Writes `text` to a fresh file and loads it; the file is gone afterwards, which is
/// fine because errors carry the path as text.
fn load_text(text: &str) -> Result<Config, ConfigError> {
    let dir = TempDir::new("config");
    config::load(dir.write("config.json", text))
}

/// Loads `text`, expects an error, and checks that its message names the file.
fn load_error(text: &str) -> ConfigError {
    let error = load_text(text).expect_err("this config must be rejected");
    let message = error.to_string();
    assert!(
        message.contains("config.json"),
        "error does not name the file: {message}"
    );
    error
}

#[test]
fn required_keys_alone_get_the_documented_defaults() {
    let config = load_text(r#"{"port": 9000, "serviceName": "backend"}"#).expect("valid");
    assert_eq!(
        config,
        Config {
            port: 9000,
            grpc_port: None,
            service_name: "backend".to_owned(),
            log_level: LevelFilter::INFO,
            log_format: LogFormat::Text,
            shutdown_delay: Duration::ZERO,
            response_delay: Duration::ZERO,
            limits: DEFAULT_LIMITS,
        }
    );
}

#[test]
fn every_optional_key_is_read() {
    let config = load_text(
        r#"{"port": 1, "serviceName": "s", "logLevel": "debug", "logFormat": "json",
            "shutdownDelay": "1500ms", "responseDelayMs": 25}"#,
    )
    .expect("valid");
    assert_eq!(config.log_level, LevelFilter::DEBUG);
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.shutdown_delay, Duration::from_millis(1500));
    assert_eq!(config.response_delay, Duration::from_millis(25));
}

#[test]
fn limits_keys_are_read() {
    let config = load_text(
        r#"{"port": 1, "serviceName": "s", "shutdownTimeoutSeconds": 3,
            "headerReadTimeoutMs": 500, "idleTimeoutMs": 700, "maxConnections": 2,
            "maxHeaderBytes": 8192}"#,
    )
    .expect("valid");
    assert_eq!(
        config.limits,
        ServerLimits {
            header_read_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_millis(700),
            max_connections: 2,
            max_header_bytes: 8192,
            shutdown_timeout: Duration::from_secs(3),
            ..DEFAULT_LIMITS
        }
    );
}

#[test]
fn default_delay_window_and_shutdown_timeout_fit_a_30_second_grace_period() {
    // With a shutdownDelay of up to 5 s, as the load balancer's drain.
    assert!(Duration::from_secs(5) + DEFAULT_LIMITS.shutdown_timeout < Duration::from_secs(30));
}

#[test]
fn out_of_range_limits_name_the_key_and_the_range() {
    for (extra, key) in [
        (r#""shutdownTimeoutSeconds": 0"#, "shutdownTimeoutSeconds"),
        (r#""headerReadTimeoutMs": 0"#, "headerReadTimeoutMs"),
        (r#""idleTimeoutMs": 3600001"#, "idleTimeoutMs"),
        (r#""maxConnections": 0"#, "maxConnections"),
        (r#""maxHeaderBytes": 512"#, "maxHeaderBytes"),
        (r#""responseDelayMs": 60001"#, "responseDelayMs"),
    ] {
        let text = format!(r#"{{"port": 1, "serviceName": "s", {extra}}}"#);
        let message = load_error(&text).to_string();
        assert!(message.contains(key), "{key} missing in {message}");
        assert!(message.contains("must be between"), "{message}");
    }
}

#[test]
fn the_shipped_local_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.json");
    let config = config::load(&path).expect("backend/config.json is valid");
    assert_eq!(config.port, 8080);
    assert_eq!(config.grpc_port, Some(9000));
    assert_eq!(config.service_name, "backend");
}

#[test]
fn a_missing_file_is_reported_with_its_path() {
    let dir = TempDir::new("config-missing");
    let path = dir.path().join("absent.json");
    let error = config::load(&path).expect_err("no such file");
    assert!(matches!(error, ConfigError::NotFound { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&*path.to_string_lossy()),
        "{error}"
    );
}

#[test]
fn a_directory_is_an_unreadable_file() {
    let dir = TempDir::new("config-dir");
    let error = config::load(dir.path()).expect_err("a directory is not a file");
    assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
}

#[test]
fn invalid_json_reports_line_and_column() {
    let error = load_error("{\n  \"port\": 8080,\n  \"serviceName\": backend\n}");
    let ConfigError::InvalidJson { line, column, .. } = &error else {
        panic!("expected InvalidJson, got {error:?}");
    };
    assert_eq!((*line, *column), (3, 18));
    assert!(error.to_string().contains("line 3, column 18"), "{error}");
}

#[test]
fn a_json_value_that_is_not_an_object_is_rejected() {
    let error = load_error("[8080]");
    assert!(
        matches!(
            error,
            ConfigError::NotAnObject {
                found: "an array",
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn an_unknown_key_is_named() {
    let error = load_error(r#"{"port": 8080, "serviceName": "b", "servicename": "b"}"#);
    assert!(
        matches!(&error, ConfigError::UnknownKey { key, .. } if key == "servicename"),
        "{error:?}"
    );
}

#[test]
fn a_missing_port_is_named() {
    let error = load_error(r#"{"serviceName": "b"}"#);
    assert!(
        matches!(error, ConfigError::MissingKey { key: "port", .. }),
        "{error:?}"
    );
}

#[test]
fn a_missing_service_name_is_named() {
    let error = load_error(r#"{"port": 8080}"#);
    assert!(
        matches!(
            error,
            ConfigError::MissingKey {
                key: "serviceName",
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn port_zero_is_rejected() {
    let error = load_error(r#"{"port": 0, "serviceName": "b"}"#);
    assert!(
        matches!(error, ConfigError::InvalidValue { key: "port", .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("not 0"), "{error}");
}

#[test]
fn grpc_port_is_read_and_null_means_none() {
    let config =
        load_text(r#"{"port": 8080, "grpcPort": 9000, "serviceName": "b"}"#).expect("valid");
    assert_eq!(config.grpc_port, Some(9000));
    let config =
        load_text(r#"{"port": 8080, "grpcPort": null, "serviceName": "b"}"#).expect("valid");
    assert_eq!(config.grpc_port, None);
}

#[test]
fn grpc_port_out_of_range_names_the_key_and_the_range() {
    for grpc_port in ["0", "65536", "-1"] {
        let text = format!(r#"{{"port": 8080, "grpcPort": {grpc_port}, "serviceName": "b"}}"#);
        let error = load_error(&text);
        assert!(
            matches!(
                error,
                ConfigError::InvalidValue {
                    key: "grpcPort",
                    ..
                }
            ),
            "{grpc_port}: {error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("`grpcPort`"), "{message}");
        if grpc_port != "-1" {
            assert!(
                message.contains(&format!("must be between 1 and 65535, not {grpc_port}")),
                "{message}"
            );
        }
    }
}

#[test]
fn grpc_port_equal_to_port_is_rejected() {
    let error = load_error(r#"{"port": 8080, "grpcPort": 8080, "serviceName": "b"}"#);
    assert!(
        matches!(
            error,
            ConfigError::InvalidValue {
                key: "grpcPort",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("must differ from `port` (8080)"),
        "{error}"
    );
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (r#"{"port": 70000, "serviceName": "b"}"#, "port"),
        (r#"{"port": "8080", "serviceName": "b"}"#, "port"),
        (r#"{"port": 8080, "serviceName": ""}"#, "serviceName"),
        (r#"{"port": 8080, "serviceName": 7}"#, "serviceName"),
        (
            r#"{"port": 8080, "serviceName": "b", "logLevel": "loud"}"#,
            "logLevel",
        ),
        (
            r#"{"port": 8080, "serviceName": "b", "logFormat": "xml"}"#,
            "logFormat",
        ),
        (
            r#"{"port": 8080, "serviceName": "b", "shutdownDelay": "soon"}"#,
            "shutdownDelay",
        ),
        (
            r#"{"port": 8080, "serviceName": "b", "grpcPort": "9000"}"#,
            "grpcPort",
        ),
    ];
    for (text, expected) in cases {
        let error = load_error(text);
        assert!(
            matches!(error, ConfigError::InvalidValue { key, .. } if key == expected),
            "{text}: {error:?}"
        );
    }
}
