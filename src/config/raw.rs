//! The file as written: serde structs with `deny_unknown_fields`, parsed by `toml`.
//!
//! Parsing is pure (text in, typed raw structs out) so that it can be unit-tested. Enumerated
//! values (`watch.mode`, `log.format`) are serde enums; durations and limits stay as written and
//! are checked by `validate`, which names the key and its line. A parser error on a value is
//! reported like a validation error (file, line, key); an unknown or missing key names the line
//! and the key in the parser's message.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::ConfigError;
use super::spans;
use super::{LogFormat, WatchMode};

/// The file as written: every key optional where a default exists, unknown keys rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// `[server]`
    pub server: RawServer,
    /// `[state]`
    pub state: RawState,
    /// `[[watch]]`, one or more.
    #[serde(default)]
    pub watch: Vec<RawWatch>,
    /// `[log]`
    #[serde(default)]
    pub log: RawLog,
    /// `[metrics]`
    #[serde(default)]
    pub metrics: RawMetrics,
    /// `[[hook]]`, zero or more.
    #[serde(default)]
    pub hook: Vec<super::hooks::RawHook>,
}

/// `[server]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    /// Central Node base URL.
    pub url: String,
    /// The sensorId (a UUID), one per installation.
    pub sensor_id: String,
    /// Optional per-host instance id.
    pub sensor_instance_id: Option<String>,
    /// Client certificate (PEM).
    pub client_cert: PathBuf,
    /// Client key (PEM).
    pub client_key: PathBuf,
    /// CA bundle for the server certificate.
    pub ca_cert: Option<PathBuf>,
    /// SHA-256 pin of the server certificate.
    pub server_fingerprint: Option<String>,
    /// Results polling period.
    pub poll_interval: Option<String>,
    /// Timeout of one request.
    pub request_timeout: Option<String>,
    /// Scans submitted and not finished, at most: a number (pinned) or "auto" (learned).
    pub max_in_flight: Option<RawCount>,
    /// With `max_in_flight = "auto"`: the cap never grows past this.
    pub max_in_flight_ceiling: Option<i64>,
    /// Rate limit for all requests.
    pub requests_per_second: Option<i64>,
    /// Submissions of one file (error/timeout verdicts retried).
    pub max_attempts: Option<i64>,
    /// A scan with no final answer after this goes to failed.
    pub scan_timeout: Option<String>,
    /// How often the server's restrictions are fetched again.
    pub restrictions_refresh: Option<String>,
    /// How long the server may go unheard before the agent asks it (health probe).
    pub health_probe: Option<String>,
}

/// A count that may also be a word (`max_in_flight = 40` or `max_in_flight = "auto"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawCount {
    /// An integer as written (checked by `validate`).
    Number(i64),
    /// A string as written (only "auto" is valid; checked by `validate`).
    Word(String),
}

impl<'de> Deserialize<'de> for RawCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawCount;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a positive integer or \"auto\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawCount, E> {
                Ok(RawCount::Number(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawCount, E> {
                Ok(RawCount::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawCount, E> {
                Ok(RawCount::Word(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[state]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawState {
    /// Journal folder.
    pub dir: PathBuf,
    /// Reuse of a final verdict for the same SHA-256; "0s" disables.
    pub verdict_ttl: Option<String>,
    /// Time given to in-flight requests at shutdown.
    pub shutdown_grace: Option<String>,
    /// How long finished records are kept in the journal.
    pub history: Option<String>,
}

/// `[[watch]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWatch {
    /// The inbox.
    pub path: PathBuf,
    /// Watch subfolders too.
    pub recursive: Option<bool>,
    /// Quiet time before a file counts as complete.
    pub settle: Option<String>,
    /// Quiet time before an empty file counts as complete.
    pub settle_empty: Option<String>,
    /// Where open writers cannot be detected: how long a taken file's original is kept.
    pub keep_original: Option<String>,
    /// auto | off
    pub lease_check: Option<super::LeaseCheck>,
    /// unleased | always
    pub keep_originals: Option<super::KeepOriginals>,
    /// How long a quiet file held open for writing is waited for.
    pub held_open_limit: Option<String>,
    /// A duration, or "off".
    pub tidy_after: Option<String>,
    /// A duration.
    pub save_temp_settle: Option<String>,
    /// auto | notify | poll
    pub mode: Option<WatchMode>,
    /// Globs on the relative path that are taken.
    pub include: Option<Vec<String>>,
    /// Globs on the relative path that are left alone.
    pub exclude: Option<Vec<String>>,
    /// Destination of `not detected` files.
    pub clean_dir: PathBuf,
    /// Destination of `detect` files.
    pub quarantine_dir: PathBuf,
    /// Destination of everything else.
    pub failed_dir: PathBuf,
    /// Staging folder (same filesystem as `path`).
    pub staging_dir: Option<PathBuf>,
    /// Full rescan period (safety net).
    pub reconcile_interval: Option<String>,
    /// Scan period in poll mode.
    pub poll_interval: Option<String>,
}

/// `[log]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    /// text | json
    pub format: Option<LogFormat>,
    /// A tracing filter, e.g. `info` or `dropscan=debug`.
    pub level: Option<String>,
}

/// `[metrics]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    /// Address of the Prometheus / health endpoint; absent = off.
    pub listen: Option<String>,
}

impl RawConfig {
    /// Parses TOML text; `path` is only used in error messages.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| parse_error(text, path, &e))
    }
}

/// A TOML error as a `ConfigError`: on a value, "file:N: key `k`: message" like a validation
/// error; otherwise (bad syntax, unknown or missing key) "file: line N: message", where the
/// parser's message names the key.
fn parse_error(text: &str, path: &Path, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    let path = path.to_path_buf();
    let Some(span) = e.span() else {
        return ConfigError::Syntax { path, message };
    };
    let line = spans::line_of(text, span.start);
    match spans::key_at(text, span.start) {
        Some(key) => ConfigError::Invalid {
            path,
            line: Some(line),
            key,
            message,
        },
        None => ConfigError::Syntax {
            path,
            message: format!("line {line}: {message}"),
        },
    }
}
