//! Configuration: the TOML file, parsed into `RawConfig` and validated once into `Config`.
//!
//! The module root owns the validated types and the built-in defaults; the work is split by
//! concern:
//! - `raw`: the serde structs as written (`deny_unknown_fields`, enums as serde enums); parsing
//!   is pure, so that it can be unit-tested;
//! - `validate`: `RawConfig` → `Config`: paths resolved against the config file's folder,
//!   durations (`humantime`), limits as `NonZero*`, globs (`globset`), folder nesting, TLS
//!   material read;
//! - `spans`: where a key is written, from the TOML parser's spans;
//! - `hooks`: `[[hook]]` (notifications), as written and validated;
//! - `error`: `ConfigError`.
//!
//! Only `Config::load` touches the disk (and `validate`, for the TLS files, a hook's secret and
//! program; what `run` will write is `app::preflight`'s to try). After validation no
//! code checks for a missing key again. Every error names the file, the key and what is wrong,
//! and the line where the key is written.

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::kata::{ClientOptions, TlsOptions};

mod error;
mod folders;
mod hooks;
mod raw;
mod server;
mod spans;
mod validate;

#[cfg(test)]
mod tests;

pub use error::ConfigError;
pub use hooks::{HookConfig, HookOn, HookTarget, Secret, redact_userinfo};
use raw::RawConfig;
pub use validate::host_name;

/// Built-in default for `server.poll_interval` (the vendor recommends once a minute).
pub(crate) const DEFAULT_POLL_INTERVAL: &str = "60s";
/// Built-in default for `server.request_timeout`.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: &str = "30s";
/// Built-in default for `server.max_in_flight_ceiling` (with `max_in_flight = "auto"`).
pub(crate) const DEFAULT_MAX_IN_FLIGHT_CEILING: usize = 1000;
/// Built-in default for `server.requests_per_second`. Sized so that it does not bind before the
/// server does: a file costs two requests (upload, delete of its result) and one results request
/// per poll serves every scan, so 100 requests a second carry 50 files a second, e.g. the whole
/// default ceiling of 1000 scans in flight turning over every 20 s; a real sandbox scan takes
/// tens of seconds to minutes.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 100;
/// Built-in default for `server.max_attempts`.
pub(crate) const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Built-in default for `server.scan_timeout`.
pub(crate) const DEFAULT_SCAN_TIMEOUT: &str = "30m";
/// Built-in default for `server.restrictions_refresh`.
pub(crate) const DEFAULT_RESTRICTIONS_REFRESH: &str = "10m";
/// Built-in default for `server.health_probe`.
pub(crate) const DEFAULT_HEALTH_PROBE: &str = "1m";
/// Built-in default for `watch.settle`.
pub(crate) const DEFAULT_SETTLE: &str = "5s";
/// Built-in default for `watch.settle_empty`.
pub(crate) const DEFAULT_SETTLE_EMPTY: &str = "1m";
/// Built-in default for `watch.keep_original`.
pub(crate) const DEFAULT_KEEP_ORIGINAL: &str = "10m";
/// Built-in default for `watch.tidy_after`.
pub(crate) const DEFAULT_TIDY_AFTER: &str = "1h";
/// Built-in default for `watch.save_temp_settle`.
pub(crate) const DEFAULT_SAVE_TEMP_SETTLE: &str = "1h";
/// Built-in default for `watch.held_open_limit`.
pub(crate) const DEFAULT_HELD_OPEN_LIMIT: &str = "10m";
/// Built-in default for `watch.reconcile_interval`.
pub(crate) const DEFAULT_RECONCILE_INTERVAL: &str = "3m";
/// Built-in default for `watch.poll_interval` (used in poll mode).
pub(crate) const DEFAULT_WATCH_POLL_INTERVAL: &str = "2s";
/// Built-in default for `state.verdict_ttl`.
pub(crate) const DEFAULT_VERDICT_TTL: &str = "1h";
/// Built-in default for `state.shutdown_grace`.
pub(crate) const DEFAULT_SHUTDOWN_GRACE: &str = "5s";
/// Built-in default for `state.history`.
pub(crate) const DEFAULT_HISTORY: &str = "7d";
/// The shortest `state.history` accepted.
pub(crate) const MIN_HISTORY: Duration = Duration::from_secs(60);

/// How a root is watched (`watch.mode`, written in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    /// inotify on local filesystems, polling on network and FUSE filesystems.
    Auto,
    /// Always inotify (notify).
    Notify,
    /// Always polling.
    Poll,
}

/// Whether open writers are asked for with a read lease (`watch.lease_check`, lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseCheck {
    /// On local filesystems; never on client mounts (NFS, SMB, FUSE), where a lease does not
    /// see writers on other machines.
    Auto,
    /// Never: completion rests on `settle`, and originals are kept for `keep_original`.
    Off,
}

/// When the user's original of a taken file is kept beside its copy (`watch.keep_originals`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeepOriginals {
    /// Only where no lease proved that nobody can write to it any more.
    Unleased,
    /// Always, for `keep_original`: for NFSv3 exports, whose clients hold no open state (their
    /// server may close its descriptor while they pause, and the lease is then granted).
    Always,
}

/// Log output format (`log.format`, written in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// Notifications of placements (`[[hook]]`), in file order.
    pub hooks: Vec<HookConfig>,
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
    /// One-shot runs (`scan`): after each submission, poll after 1 s, then 2 s, 4 s … up to
    /// `poll_interval` (`crate::backoff::Pace`), not a whole `poll_interval` later. Not a
    /// configuration key: `scan` sets it.
    pub poll_early: bool,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// Scans in flight, at most: learned from the server's 429 answers, or pinned.
    pub max_in_flight: MaxInFlight,
    /// With [`MaxInFlight::Auto`]: the cap never grows past this.
    pub max_in_flight_ceiling: NonZeroUsize,
    /// Requests per second, at most.
    pub requests_per_second: NonZeroU32,
    /// Submissions of one file, at most.
    pub max_attempts: NonZeroU32,
    /// Scan deadline.
    pub scan_timeout: Duration,
    /// Restrictions refresh period.
    pub restrictions_refresh: Duration,
    /// How long the server may go unheard before an idle agent asks it (health probe).
    pub health_probe: Duration,
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
            max_idle_per_host: match self.max_in_flight {
                MaxInFlight::Fixed(n) => n.get(),
                MaxInFlight::Auto => self.max_in_flight_ceiling.get().min(128),
            }
            .max(4),
        }
    }
}

/// `server.max_in_flight`: how many scans may be in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxInFlight {
    /// `"auto"` (the default): learned from the server's 429 answers (AIMD, see `limits`), kept
    /// in the journal across restarts, bounded by `server.max_in_flight_ceiling`.
    Auto,
    /// A number: the cap is pinned there and never adapts.
    Fixed(NonZeroUsize),
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
    /// How long a finished record stays in the journal (for `status`, `moves` and the sidecar
    /// tools) before it is pruned; records of files still kept in quarantine or failed, and
    /// records with an audit trail, are kept whatever their age.
    pub history: Duration,
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
    /// Quiet time before an empty file counts as complete (used as at least `settle`).
    pub settle_empty: Duration,
    /// Where no open-writer check is available (no lease): how long the original of a taken
    /// file is kept unchanged in staging after it was copied, so that a writer still holding it
    /// loses nothing (a change sends it back to the inbox as a new version).
    pub keep_original: Duration,
    /// Whether open writers are asked for with a read lease.
    pub lease_check: LeaseCheck,
    /// When originals are kept for `keep_original`.
    pub keep_originals: KeepOriginals,
    /// A quiet file that a writer holds open is waited for this long; then it is taken with its
    /// original kept (for servers that keep descriptors open after their client is done).
    pub held_open_limit: Duration,
    /// How long an orphaned leftover (`._X`, `~$X`, desktop clutter) or a folder dropscan
    /// emptied stays before it is removed; `None` ("off"): never (see `tidy`).
    pub tidy_after: Option<Duration>,
    /// How long a file named like Excel's save temp (8 hex digits, no extension) must be left
    /// alone before it is taken (see `scope::is_save_temp_name`).
    pub save_temp_settle: Duration,
    /// How it is watched.
    pub mode: WatchMode,
    /// Included globs (relative path).
    pub include: Vec<Pattern>,
    /// Excluded globs (relative path).
    pub exclude: Vec<Pattern>,
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
                line: spans::locate(&text, &key),
                path,
                key,
                message,
            },
            other => other,
        })
    }

    /// Validates and resolves a parsed file. Relative paths are taken relative to `path`'s folder.
    pub(crate) fn from_raw(raw: RawConfig, path: &Path) -> Result<Self, ConfigError> {
        validate::config(raw, path)
    }

    /// An error about `key` found after validation (by the preflight of `check` and `run`),
    /// with the line where the key is written when the file still says so.
    pub fn error_at(&self, key: &str, message: String) -> ConfigError {
        let line = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| spans::locate(&text, key));
        ConfigError::Invalid {
            path: self.path.clone(),
            line,
            key: key.to_owned(),
            message,
        }
    }

    /// What is valid but worth saying, each naming its key and line: `check` prints these and
    /// `run` logs them at start (both through `app::preflight`).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(addr) = self.metrics_listen.filter(|a| !a.ip().is_loopback()) {
            let whom = if addr.ip().is_unspecified() {
                "on every address of this host"
            } else {
                "on an address that is not loopback"
            };
            out.push(self.error_at(
                "metrics.listen",
                format!(
                    "`{addr}` listens {whom}: other hosts can reach /metrics, /healthz and /readyz, which need no authentication; use 127.0.0.1 unless a firewall guards the port"
                ),
            ).to_string());
        }
        out
    }

    /// The journal database file.
    pub fn journal_path(&self) -> PathBuf {
        self.state.dir.join("journal.sqlite")
    }
}

/// One `include` / `exclude` glob, compiled (`globset` syntax). Matching is case-sensitive and
/// `*` also crosses `/`, so `*.tmp` excludes `a/b/c.tmp` and `skip/*` everything under `skip`;
/// a leading dot needs no literal dot.
#[derive(Debug, Clone)]
pub struct Pattern(globset::GlobMatcher);

impl Pattern {
    /// Compiles `glob`; the error says what is wrong with it.
    pub fn new(glob: &str) -> Result<Self, globset::Error> {
        globset::GlobBuilder::new(glob)
            .literal_separator(false)
            .case_insensitive(false)
            .backslash_escape(true)
            .build()
            .map(|g| Pattern(g.compile_matcher()))
    }

    /// True when `text` (a relative path or a file name) matches.
    pub fn matches(&self, text: &str) -> bool {
        self.0.is_match(text)
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        self.0.glob().glob()
    }
}
