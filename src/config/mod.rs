//! Configuration: the TOML file, parsed into `RawConfig` and validated once into `Config`.
//!
//! `RawConfig::parse` is pure (text in, typed raw structs out, unknown keys rejected) so that it can
//! be unit-tested; only `Config::load` touches the disk. `Config::from_raw` resolves every relative
//! path against the config file's folder, turns durations into `Duration`, limits into `NonZero*`,
//! compiles the globs, checks that the folders are distinct and correctly nested, and reads the TLS
//! material. After that no code checks for a missing key again. Every error names the file, the
//! key and what is wrong (and the line, where the TOML parser gives one).

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::kata::{self, ClientOptions, TlsOptions};

/// Built-in default for `server.poll_interval` (the vendor recommends once a minute).
pub const DEFAULT_POLL_INTERVAL: &str = "60s";
/// Built-in default for `server.request_timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: &str = "30s";
/// Built-in default for `server.max_in_flight`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
/// Built-in default for `server.requests_per_second`.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 10;
/// Built-in default for `server.max_attempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Built-in default for `server.scan_timeout`.
pub const DEFAULT_SCAN_TIMEOUT: &str = "30m";
/// Built-in default for `server.restrictions_refresh`.
pub const DEFAULT_RESTRICTIONS_REFRESH: &str = "10m";
/// Built-in default for `watch.settle`.
pub const DEFAULT_SETTLE: &str = "5s";
/// Built-in default for `watch.reconcile_interval`.
pub const DEFAULT_RECONCILE_INTERVAL: &str = "3m";
/// Built-in default for `watch.poll_interval` (used in poll mode).
pub const DEFAULT_WATCH_POLL_INTERVAL: &str = "2s";
/// Built-in default for `state.verdict_ttl`.
pub const DEFAULT_VERDICT_TTL: &str = "1h";
/// Built-in default for `state.shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "5s";

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown, missing or of the wrong type.
    #[error("{path}: {message}")]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// The parser's message, with the line and the key.
        message: String,
    },
    /// A value is present but not acceptable.
    #[error("{path}{}: key `{key}`: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The line of the key, when it is written in the file.
        line: Option<usize>,
        /// The dotted key, e.g. `watch[0].settle`.
        key: String,
        /// What is wrong, and what would be right.
        message: String,
    },
}

/// The file as written: every key optional where a default exists, unknown keys rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
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
}

/// `[server]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
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
    /// Scans submitted and not finished, at most.
    pub max_in_flight: Option<i64>,
    /// Rate limit for all requests.
    pub requests_per_second: Option<i64>,
    /// Submissions of one file (error/timeout verdicts retried).
    pub max_attempts: Option<i64>,
    /// A scan with no final answer after this goes to failed.
    pub scan_timeout: Option<String>,
    /// How often the server's restrictions are fetched again.
    pub restrictions_refresh: Option<String>,
}

/// `[state]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    /// Journal folder.
    pub dir: PathBuf,
    /// Reuse of a final verdict for the same SHA-256; "0s" disables.
    pub verdict_ttl: Option<String>,
    /// Time given to in-flight requests at shutdown.
    pub shutdown_grace: Option<String>,
}

/// `[[watch]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatch {
    /// The inbox.
    pub path: PathBuf,
    /// Watch subfolders too.
    pub recursive: Option<bool>,
    /// Quiet time before a file counts as complete.
    pub settle: Option<String>,
    /// auto | notify | poll
    pub mode: Option<String>,
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
pub struct RawLog {
    /// text | json
    pub format: Option<String>,
    /// A tracing filter, e.g. `info` or `dropscan=debug`.
    pub level: Option<String>,
}

/// `[metrics]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Address of the Prometheus / health endpoint; absent = off.
    pub listen: Option<String>,
}

impl RawConfig {
    /// Parses TOML text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: syntax_message(text, &e),
        })
    }
}

/// Renders a TOML error as "line N: message" (the parser's message names the key).
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

/// How a root is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// inotify on local filesystems, polling on network and FUSE filesystems.
    Auto,
    /// Always inotify (notify).
    Notify,
    /// Always polling.
    Poll,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// The KATA server and client.
    pub server: ServerConfig,
    /// The journal.
    pub state: StateConfig,
    /// The watched roots, in file order.
    pub watches: Vec<WatchConfig>,
    /// Logging.
    pub log: LogConfig,
    /// Metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
}

/// `[server]`, validated.
#[derive(Clone)]
pub struct ServerConfig {
    /// Base URL (https).
    pub url: reqwest::Url,
    /// The sensorId (lower-case UUID).
    pub sensor_id: String,
    /// The instance id, if set.
    pub sensor_instance_id: Option<String>,
    /// Client certificate, key, CA and pin, read and parsed.
    pub tls: TlsOptions,
    /// Where they came from (for messages).
    pub client_cert_path: PathBuf,
    /// Results polling period.
    pub poll_interval: Duration,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// Scans in flight, at most.
    pub max_in_flight: NonZeroUsize,
    /// Requests per second, at most.
    pub requests_per_second: NonZeroU32,
    /// Submissions of one file, at most.
    pub max_attempts: NonZeroU32,
    /// Scan deadline.
    pub scan_timeout: Duration,
    /// Restrictions refresh period.
    pub restrictions_refresh: Duration,
}

impl fmt::Debug for ServerConfig {
    // Hand-written so that key material can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("url", &self.url.as_str())
            .field("sensor_id", &self.sensor_id)
            .field("sensor_instance_id", &self.sensor_instance_id)
            .field("client_cert", &self.client_cert_path)
            .field("poll_interval", &self.poll_interval)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// The options of the protocol client.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            base_url: self.url.clone(),
            sensor_id: self.sensor_id.clone(),
            sensor_instance_id: self.sensor_instance_id.clone(),
            tls: self.tls.clone(),
            request_timeout: self.request_timeout,
            connect_timeout: self.request_timeout.min(Duration::from_secs(10)),
            max_idle_per_host: self.max_in_flight.get().max(4),
        }
    }
}

/// `[state]`, validated.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Journal folder.
    pub dir: PathBuf,
    /// Verdict reuse window; zero disables.
    pub verdict_ttl: Duration,
    /// Grace for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
}

/// One `[[watch]]`, validated.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The inbox (absolute).
    pub path: PathBuf,
    /// Watch subfolders too.
    pub recursive: bool,
    /// Quiet time before a file counts as complete.
    pub settle: Duration,
    /// How it is watched.
    pub mode: WatchMode,
    /// Included globs (relative path).
    pub include: Vec<glob::Pattern>,
    /// Excluded globs (relative path).
    pub exclude: Vec<glob::Pattern>,
    /// `not detected` destination.
    pub clean_dir: PathBuf,
    /// `detect` destination.
    pub quarantine_dir: PathBuf,
    /// Destination of everything else.
    pub failed_dir: PathBuf,
    /// Staging folder, same filesystem as `path`.
    pub staging_dir: PathBuf,
    /// Reconcile scan period.
    pub reconcile_interval: Duration,
    /// Scan period in poll mode.
    pub poll_interval: Duration,
}

impl WatchConfig {
    /// The folders dropscan itself writes into, which are never watched.
    pub fn own_dirs(&self) -> [&Path; 4] {
        [
            &self.clean_dir,
            &self.quarantine_dir,
            &self.failed_dir,
            &self.staging_dir,
        ]
    }
}

/// `[log]`, validated.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// Filter directive.
    pub level: String,
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw = RawConfig::parse(&text, path)?;
        Self::from_raw(raw, path).map_err(|e| match e {
            ConfigError::Invalid {
                path, key, message, ..
            } => ConfigError::Invalid {
                line: locate(&text, &key),
                path,
                key,
                message,
            },
            other => other,
        })
    }

    /// Validates and resolves a parsed file. Relative paths are taken relative to `path`'s folder.
    pub fn from_raw(raw: RawConfig, path: &Path) -> Result<Self, ConfigError> {
        let v = Validator::new(path);
        let server = v.server(raw.server)?;
        let state = v.state(raw.state)?;
        if raw.watch.is_empty() {
            return Err(v.invalid("watch", "at least one [[watch]] table is required"));
        }
        let mut watches = Vec::with_capacity(raw.watch.len());
        for (i, w) in raw.watch.into_iter().enumerate() {
            watches.push(v.watch(i, w, &server)?);
        }
        v.check_folders(&watches, &state)?;
        let log = v.log(raw.log)?;
        let metrics_listen = match raw.metrics.listen {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|e| {
                v.invalid(
                    "metrics.listen",
                    &format!("`{s}` is not an address like 127.0.0.1:9187 ({e})"),
                )
            })?),
        };
        Ok(Config {
            path: v.file.clone(),
            server,
            state,
            watches,
            log,
            metrics_listen,
        })
    }

    /// The journal database file.
    pub fn journal_path(&self) -> PathBuf {
        self.state.dir.join("journal.sqlite")
    }
}

/// Validation helpers that know the file and its folder.
struct Validator {
    file: PathBuf,
    base: PathBuf,
}

impl Validator {
    fn new(path: &Path) -> Self {
        let file = absolute(
            path,
            &std::env::current_dir().unwrap_or_else(|_| "/".into()),
        );
        let base = file
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        Validator { file, base }
    }

    fn invalid(&self, key: &str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.file.clone(),
            line: None,
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    fn path(&self, p: &Path, key: &str) -> Result<PathBuf, ConfigError> {
        if p.as_os_str().is_empty() {
            return Err(self.invalid(key, "is empty; give a path"));
        }
        Ok(absolute(p, &self.base))
    }

    fn duration(
        &self,
        value: Option<&str>,
        default: &str,
        key: &str,
    ) -> Result<Duration, ConfigError> {
        let s = value.unwrap_or(default);
        humantime::parse_duration(s.trim()).map_err(|e| {
            self.invalid(
                key,
                &format!("`{s}` is not a duration like \"500ms\", \"60s\" or \"2m\" ({e})"),
            )
        })
    }

    fn positive(
        &self,
        value: Option<i64>,
        default: u64,
        key: &str,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let n = value.map_or(Ok(default), |n| {
            u64::try_from(n).map_err(|_| self.invalid(key, &format!("{n} is negative")))
        })?;
        if n == 0 || n > max {
            return Err(self.invalid(key, &format!("{n} is out of range (1 to {max})")));
        }
        Ok(n)
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let url = reqwest::Url::parse(raw.url.trim()).map_err(|e| {
            self.invalid("server.url", &format!("`{}` is not a URL ({e})", raw.url))
        })?;
        if url.scheme() != "https" {
            return Err(self.invalid(
                "server.url",
                "must start with https:// (the scanner API is HTTPS only)",
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(self.invalid("server.url", "has no host name"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.invalid("server.url", "must not have a query or fragment"));
        }
        let sensor_id = raw.sensor_id.trim().to_ascii_lowercase();
        if uuid::Uuid::try_parse(&sensor_id).is_err() || sensor_id.len() != 36 {
            return Err(self.invalid(
                "server.sensor_id",
                &format!(
                    "`{}` is not a hyphenated UUID; generate one once per installation (e.g. `uuidgen`)",
                    raw.sensor_id
                ),
            ));
        }
        let sensor_instance_id = match raw.sensor_instance_id {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => {
                if s.len() > 128
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                {
                    return Err(self.invalid(
                        "server.sensor_instance_id",
                        "use 1 to 128 letters, digits, '-', '_' or '.'",
                    ));
                }
                Some(s)
            }
        };
        let client_cert = self.path(&raw.client_cert, "server.client_cert")?;
        let client_key = self.path(&raw.client_key, "server.client_key")?;
        let ca_cert = raw
            .ca_cert
            .as_deref()
            .map(|p| self.path(p, "server.ca_cert"))
            .transpose()?;
        let pin = raw
            .server_fingerprint
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| {
                kata::parse_fingerprint(s)
                    .map_err(|e| self.invalid("server.server_fingerprint", &e))
            })
            .transpose()?;
        for (key, p) in [
            ("server.client_cert", Some(&client_cert)),
            ("server.client_key", Some(&client_key)),
            ("server.ca_cert", ca_cert.as_ref()),
        ] {
            if let Some(p) = p {
                if let Err(e) = std::fs::metadata(p) {
                    return Err(self.invalid(key, &format!("{}: {e}", p.display())));
                }
            }
        }
        let tls = TlsOptions::from_pem_files(&client_cert, &client_key, ca_cert.as_deref(), pin)
            .map_err(|e| {
                self.invalid("server.client_cert / client_key / ca_cert", &e.to_string())
            })?;
        let max_in_flight = self.positive(
            raw.max_in_flight,
            DEFAULT_MAX_IN_FLIGHT as u64,
            "server.max_in_flight",
            100_000,
        )?;
        let rps = self.positive(
            raw.requests_per_second,
            u64::from(DEFAULT_REQUESTS_PER_SECOND),
            "server.requests_per_second",
            1_000_000,
        )?;
        let attempts = self.positive(
            raw.max_attempts,
            u64::from(DEFAULT_MAX_ATTEMPTS),
            "server.max_attempts",
            100,
        )?;
        let poll_interval = self.duration(
            raw.poll_interval.as_deref(),
            DEFAULT_POLL_INTERVAL,
            "server.poll_interval",
        )?;
        if poll_interval < Duration::from_millis(10) {
            return Err(self.invalid("server.poll_interval", "must be at least 10ms"));
        }
        let request_timeout = self.duration(
            raw.request_timeout.as_deref(),
            DEFAULT_REQUEST_TIMEOUT,
            "server.request_timeout",
        )?;
        if request_timeout.is_zero() {
            return Err(self.invalid("server.request_timeout", "must be more than 0"));
        }
        let scan_timeout = self.duration(
            raw.scan_timeout.as_deref(),
            DEFAULT_SCAN_TIMEOUT,
            "server.scan_timeout",
        )?;
        if scan_timeout < poll_interval {
            return Err(self.invalid(
                "server.scan_timeout",
                "must be at least server.poll_interval",
            ));
        }
        let restrictions_refresh = self.duration(
            raw.restrictions_refresh.as_deref(),
            DEFAULT_RESTRICTIONS_REFRESH,
            "server.restrictions_refresh",
        )?;
        if restrictions_refresh < Duration::from_secs(1) {
            return Err(self.invalid("server.restrictions_refresh", "must be at least 1s"));
        }
        Ok(ServerConfig {
            url,
            sensor_id,
            sensor_instance_id,
            tls,
            client_cert_path: client_cert,
            poll_interval,
            request_timeout,
            max_in_flight: to_nonzero_usize(max_in_flight),
            requests_per_second: to_nonzero_u32(rps),
            max_attempts: to_nonzero_u32(attempts),
            scan_timeout,
            restrictions_refresh,
        })
    }

    fn state(&self, raw: RawState) -> Result<StateConfig, ConfigError> {
        Ok(StateConfig {
            dir: self.path(&raw.dir, "state.dir")?,
            verdict_ttl: self.duration(
                raw.verdict_ttl.as_deref(),
                DEFAULT_VERDICT_TTL,
                "state.verdict_ttl",
            )?,
            shutdown_grace: self.duration(
                raw.shutdown_grace.as_deref(),
                DEFAULT_SHUTDOWN_GRACE,
                "state.shutdown_grace",
            )?,
        })
    }

    fn globs(
        &self,
        list: Option<Vec<String>>,
        default: &[&str],
        key: &str,
    ) -> Result<Vec<glob::Pattern>, ConfigError> {
        let list = list.unwrap_or_else(|| default.iter().map(|s| (*s).to_string()).collect());
        list.iter()
            .map(|g| {
                glob::Pattern::new(g)
                    .map_err(|e| self.invalid(key, &format!("`{g}` is not a glob ({e})")))
            })
            .collect()
    }

    fn watch(
        &self,
        i: usize,
        raw: RawWatch,
        server: &ServerConfig,
    ) -> Result<WatchConfig, ConfigError> {
        let key = |k: &str| format!("watch[{i}].{k}");
        let path = self.path(&raw.path, &key("path"))?;
        let mode = match raw.mode.as_deref().unwrap_or("auto") {
            "auto" => WatchMode::Auto,
            "notify" => WatchMode::Notify,
            "poll" => WatchMode::Poll,
            other => {
                return Err(self.invalid(
                    &key("mode"),
                    &format!("`{other}` is not one of auto, notify, poll"),
                ));
            }
        };
        let settle = self.duration(raw.settle.as_deref(), DEFAULT_SETTLE, &key("settle"))?;
        // Agents sharing an inbox on a NAS must never share a staging folder (each would take
        // the other's staged files for orphans): without an instance id, the host name keeps
        // them apart.
        let instance = server.sensor_instance_id.clone().unwrap_or_else(host_name);
        let staging_dir = match raw.staging_dir {
            Some(p) => self.path(&p, &key("staging_dir"))?,
            None => path.join(".dropscan").join(instance),
        };
        Ok(WatchConfig {
            recursive: raw.recursive.unwrap_or(true),
            settle,
            mode,
            include: self.globs(raw.include, &["*"], &key("include"))?,
            exclude: self.globs(raw.exclude, &[], &key("exclude"))?,
            clean_dir: self.path(&raw.clean_dir, &key("clean_dir"))?,
            quarantine_dir: self.path(&raw.quarantine_dir, &key("quarantine_dir"))?,
            failed_dir: self.path(&raw.failed_dir, &key("failed_dir"))?,
            staging_dir,
            reconcile_interval: self.duration(
                raw.reconcile_interval.as_deref(),
                DEFAULT_RECONCILE_INTERVAL,
                &key("reconcile_interval"),
            )?,
            poll_interval: self.duration(
                raw.poll_interval.as_deref(),
                DEFAULT_WATCH_POLL_INTERVAL,
                &key("poll_interval"),
            )?,
            path,
        })
    }

    /// The inboxes, destinations and the state folder must be distinct; a destination may sit
    /// inside an inbox (it is then never watched) but an inbox may not sit inside a destination.
    fn check_folders(
        &self,
        watches: &[WatchConfig],
        state: &StateConfig,
    ) -> Result<(), ConfigError> {
        let mut seen: HashSet<&Path> = HashSet::new();
        for (i, w) in watches.iter().enumerate() {
            if !seen.insert(&w.path) {
                return Err(self.invalid(
                    &format!("watch[{i}].path"),
                    &format!("{} is watched twice", w.path.display()),
                ));
            }
            let named = [
                ("clean_dir", &w.clean_dir),
                ("quarantine_dir", &w.quarantine_dir),
                ("failed_dir", &w.failed_dir),
                ("staging_dir", &w.staging_dir),
            ];
            for (a, (name, dir)) in named.iter().enumerate() {
                if *dir == &w.path {
                    return Err(self.invalid(
                        &format!("watch[{i}].{name}"),
                        "is the inbox itself; choose another folder",
                    ));
                }
                if w.path.starts_with(dir) {
                    return Err(self.invalid(
                        &format!("watch[{i}].{name}"),
                        "contains the inbox; a destination may be inside the inbox, not around it",
                    ));
                }
                for (other_name, other) in named.iter().skip(a + 1) {
                    if dir == other {
                        return Err(self.invalid(
                            &format!("watch[{i}].{other_name}"),
                            &format!("is the same folder as watch[{i}].{name}"),
                        ));
                    }
                }
                if state.dir == **dir {
                    return Err(self.invalid(
                        "state.dir",
                        &format!("is the same folder as watch[{i}].{name}"),
                    ));
                }
            }
            if state.dir.starts_with(&w.path)
                && !w.own_dirs().iter().any(|d| state.dir.starts_with(d))
            {
                // A journal inside an inbox would be picked up as dropped files.
                return Err(self.invalid(
                    "state.dir",
                    &format!("is inside the inbox watch[{i}].path; move it out"),
                ));
            }
            if !w.staging_dir.starts_with(&w.path) {
                tracing::debug!(
                    staging = %w.staging_dir.display(),
                    "staging folder outside the inbox: it must be on the same filesystem"
                );
            }
        }
        for (i, a) in watches.iter().enumerate() {
            for (j, b) in watches.iter().enumerate() {
                if i != j && a.path.starts_with(&b.path) && a.path != b.path && b.recursive {
                    return Err(self.invalid(
                        &format!("watch[{i}].path"),
                        &format!("is inside watch[{j}].path, which is recursive"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn log(&self, raw: RawLog) -> Result<LogConfig, ConfigError> {
        let format = match raw.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(self.invalid("log.format", &format!("`{other}` is not text or json")));
            }
        };
        let level = raw.level.unwrap_or_else(|| "info".to_string());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(self.invalid(
                "log.level",
                &format!("`{level}` is not a level or filter like `info` or `dropscan=debug`"),
            ));
        }
        Ok(LogConfig { format, level })
    }
}

/// The line (1-based) where a dotted key such as `server.url` or `watch[1].settle` is written,
/// found by reading table headers and `key =` lines.
pub fn locate(text: &str, key: &str) -> Option<usize> {
    let (table, field) = key.split_once('.')?;
    let field = field.split([' ', '/']).next()?.trim();
    let (table, index) = match table.split_once('[') {
        Some((t, rest)) => (t, rest.trim_end_matches(']').parse::<usize>().ok()?),
        None => (table, 0),
    };
    let mut current: Option<(String, usize)> = None;
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let i = seen.entry(name.clone()).or_insert(0);
            current = Some((name, *i));
            *i += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            current = Some((name.trim().to_string(), 0));
        } else if let Some((k, _)) = t.split_once('=') {
            if k.trim().trim_matches('"') == field
                && current
                    .as_ref()
                    .is_some_and(|(c, i)| c == table && *i == index)
            {
                return Some(n + 1);
            }
        }
    }
    None
}

/// `p` made absolute against `base`, with `.` and `..` folded lexically (no symlink resolution:
/// the folders may not exist yet).
pub fn absolute(p: &Path, base: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// This host's name, made safe as a folder name.
fn host_name() -> String {
    let raw = rustix::system::uname();
    let name: String = raw
        .nodename()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        format!("host{name}")
    } else {
        name
    }
}

fn to_nonzero_usize(n: u64) -> NonZeroUsize {
    NonZeroUsize::new(usize::try_from(n).unwrap_or(usize::MAX)).unwrap_or(NonZeroUsize::MIN)
}

fn to_nonzero_u32(n: u64) -> NonZeroU32 {
    NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN)
}

#[cfg(test)]
mod tests {
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
        let text = include_str!("../config/dropscan.example.toml");
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
}
