//! Unit tests of the config module: parsing, the line finder, path folding.

use std::path::{Path, PathBuf};

use super::raw::RawConfig;
use super::spans::locate;
use super::validate::absolute;
use super::*;

const MINIMAL: &str = r#"
[server]
url = "https://kata.example.org"
sensor_id = "3f2a6c1e-0b7d-4a58-9c11-2f4e5d6a7b8c"
client_cert = "client.crt"
client_key = "client.key"

[state]
dir = "state"

[[watch]]
path = "inbox"
clean_dir = "clean"
quarantine_dir = "quarantine"
failed_dir = "failed"
"#;

#[test]
fn parses_minimal_raw() {
    let raw = RawConfig::parse(MINIMAL, Path::new("/etc/dropscan.toml")).unwrap();
    assert_eq!(raw.watch.len(), 1);
    assert_eq!(raw.server.sensor_instance_id, None);
}

#[test]
fn unknown_key_is_named_with_line() {
    let text = MINIMAL.replace("[state]\n", "[state]\nbogus = 1\n");
    let err = RawConfig::parse(&text, Path::new("/etc/d.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/etc/d.toml"), "{err}");
    assert!(err.contains("bogus"), "{err}");
    assert!(err.contains("line 9"), "{err}");
}

#[test]
fn missing_key_is_named() {
    let text = MINIMAL.replace("client_key = \"client.key\"\n", "");
    let err = RawConfig::parse(&text, Path::new("/etc/d.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("client_key"), "{err}");
}

#[test]
fn example_config_parses_and_names_every_key() {
    let text = include_str!("../../config/dropscan.example.toml");
    let raw = RawConfig::parse(text, Path::new("config/dropscan.example.toml")).unwrap();
    assert_eq!(raw.watch.len(), 1);
    assert_eq!(raw.server.max_in_flight, Some(DEFAULT_MAX_IN_FLIGHT as i64));
    assert_eq!(
        raw.server.poll_interval.as_deref(),
        Some(DEFAULT_POLL_INTERVAL)
    );
    assert_eq!(raw.state.verdict_ttl.as_deref(), Some(DEFAULT_VERDICT_TTL));
    assert_eq!(raw.watch[0].settle.as_deref(), Some(DEFAULT_SETTLE));
    assert_eq!(raw.metrics.listen.as_deref(), Some("127.0.0.1:9187"));
}

#[test]
fn keys_are_located_in_the_text() {
    let text =
        "[server]\nurl = \"x\"\n\n[[watch]]\npath = \"a\"\n[[watch]]\n  settle = \"zz\"\n";
    assert_eq!(locate(text, "server.url"), Some(2));
    assert_eq!(locate(text, "watch[0].path"), Some(5));
    assert_eq!(locate(text, "watch[1].settle"), Some(7));
    assert_eq!(locate(text, "watch[1].path"), None);
    assert_eq!(
        locate(text, "server.client_cert / client_key / ca_cert"),
        None
    );
}

#[test]
fn absolute_folds_dots() {
    assert_eq!(
        absolute(Path::new("../a/./b"), Path::new("/etc/dropscan")),
        PathBuf::from("/etc/a/b")
    );
    assert_eq!(
        absolute(Path::new("/x/y"), Path::new("/etc")),
        PathBuf::from("/x/y")
    );
}
