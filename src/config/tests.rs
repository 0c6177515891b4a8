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
    assert_eq!(
        raw.server.max_in_flight,
        Some(raw::RawCount::Word("auto".into()))
    );
    assert_eq!(
        raw.server.max_in_flight_ceiling,
        Some(DEFAULT_MAX_IN_FLIGHT_CEILING as i64)
    );
    assert_eq!(
        raw.server.requests_per_second,
        Some(i64::from(DEFAULT_REQUESTS_PER_SECOND))
    );
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
    let text = "[server]\nurl = \"x\"\n\n[[watch]]\npath = \"a\"\n[[watch]]\n  settle = \"zz\"\n";
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

#[test]
fn bad_watch_mode_names_key_and_line() {
    let text = MINIMAL.replace(
        "path = \"inbox\"\n",
        "path = \"inbox\"\nmode = \"inotify\"\n",
    );
    let err = RawConfig::parse(&text, Path::new("/etc/d.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("/etc/d.toml:13: key `watch[0].mode`: "),
        "{err}"
    );
    assert!(err.contains("inotify") && err.contains("poll"), "{err}");
}

#[test]
fn wrong_type_names_key_and_line() {
    let text = MINIMAL.replace("[state]\n", "[state]\nverdict_ttl = 5\n");
    let err = RawConfig::parse(&text, Path::new("/etc/d.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("/etc/d.toml:9: key `state.verdict_ttl`: "),
        "{err}"
    );
}

#[test]
fn bad_log_format_names_key() {
    let text = format!("{MINIMAL}\n[log]\nformat = \"xml\"\n");
    let err = RawConfig::parse(&text, Path::new("/etc/d.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("key `log.format`"), "{err}");
    assert!(err.contains("xml") && err.contains("json"), "{err}");
}

#[test]
fn enums_are_read_in_lower_case() {
    let text = MINIMAL.replace("path = \"inbox\"\n", "path = \"inbox\"\nmode = \"poll\"\n")
        + "\n[log]\nformat = \"json\"\n";
    let raw = RawConfig::parse(&text, Path::new("/etc/d.toml")).unwrap();
    assert_eq!(raw.watch[0].mode, Some(WatchMode::Poll));
    assert_eq!(raw.log.format, Some(LogFormat::Json));
}

#[test]
fn line_finder_ignores_keys_inside_a_multiline_string() {
    // A text search took the `[[watch]]` and `settle =` lines inside the string for real ones.
    let text = "[server]\nurl = \"\"\"\n[[watch]]\nsettle = 1\n\"\"\"\n[[watch]]\npath = \"a\"\nsettle = \"zz\"\n";
    assert_eq!(locate(text, "server.url"), Some(2));
    assert_eq!(locate(text, "watch[0].settle"), Some(8));
    assert_eq!(locate(text, "watch[1].settle"), None);
}

#[test]
fn line_finder_reads_quoted_keys_and_commented_headers() {
    let text = "[server] # the node\n\"url\" = \"x\"\n[[watch]] # first\n  'path' = \"a\"\n";
    assert_eq!(locate(text, "server.url"), Some(2));
    assert_eq!(locate(text, "watch[0].path"), Some(4));
    assert_eq!(locate("not = [toml", "not.x"), None);
}

#[test]
fn globs_are_case_sensitive_and_star_crosses_folders() {
    let p = |g: &str| Pattern::new(g).unwrap();
    assert!(p("*.tmp").matches("a/b/c.tmp"));
    assert!(p("skip/*").matches("skip/deeper/q.bin"));
    assert!(!p("*.PDF").matches("x.pdf"));
    assert!(p("*").matches(".hidden"));
    assert!(p("[!x]*.bin").matches("a.bin"));
    assert!(!p("[!x]*.bin").matches("x.bin"));
    assert_eq!(p("*.log").as_str(), "*.log");
    assert!(Pattern::new("[").is_err());
}

#[test]
fn userinfo_is_redacted_from_every_url_in_a_text() {
    assert_eq!(
        redact_userinfo("POST https://alice:pw@siem.example.org/h failed (https://pw@x/y?a=b@c)"),
        "POST https://***@siem.example.org/h failed (https://***@x/y?a=b@c)"
    );
    assert_eq!(
        redact_userinfo("no url; mail alice@example.org"),
        "no url; mail alice@example.org"
    );
    assert_eq!(redact_userinfo("https://host/p@q"), "https://host/p@q");
}
