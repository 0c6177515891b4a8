//! Validation: `RawConfig` in, `Config` out, every value checked once.
//!
//! Resolves every relative path against the config file's folder, parses durations
//! (`humantime`), turns limits into `NonZero*`, compiles the globs, checks that the folders are
//! distinct and correctly nested, refuses the example's `REPLACE-ME` placeholders, and reads the
//! TLS material: each file must be a regular file before any advice about its permissions, a
//! key file holding a certificate is named as swapped, and each TLS error names its own key. Every error names the key; the caller (`Config::load`) adds its line. Owns no
//! parsing of TOML and no defaults' documentation (those are in `raw` and the module root).

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::raw::{RawConfig, RawLog, RawServer, RawState, RawWatch};
use super::{
    Config, ConfigError, DEFAULT_HEALTH_PROBE, DEFAULT_HELD_OPEN_LIMIT, DEFAULT_KEEP_ORIGINAL,
    DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_IN_FLIGHT_CEILING, DEFAULT_POLL_INTERVAL,
    DEFAULT_RECONCILE_INTERVAL, DEFAULT_REQUEST_TIMEOUT, DEFAULT_REQUESTS_PER_SECOND,
    DEFAULT_RESTRICTIONS_REFRESH, DEFAULT_SCAN_TIMEOUT, DEFAULT_SETTLE, DEFAULT_SETTLE_EMPTY,
    DEFAULT_SHUTDOWN_GRACE, DEFAULT_VERDICT_TTL, DEFAULT_WATCH_POLL_INTERVAL, LogConfig, LogFormat,
    Pattern, ServerConfig, StateConfig, WatchConfig, WatchMode,
};
use super::{MaxInFlight, raw::RawCount};
use crate::kata::{self, TlsOptions};

/// What the example config (the `.deb`'s conffile) holds where only an administrator knows the
/// value: `check` and `run` refuse it until it is replaced.
const PLACEHOLDER: &str = "REPLACE-ME";

/// Validates and resolves a parsed file. Relative paths are taken relative to `path`'s folder.
pub(super) fn config(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
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
    let hooks = raw
        .hook
        .into_iter()
        .enumerate()
        .map(|(i, h)| v.hook(i, h))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Config {
        hooks,
        path: v.file.clone(),
        server,
        state,
        watches,
        log,
        metrics_listen,
    })
}

/// Validation helpers that know the file and its folder.
pub(super) struct Validator {
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

    pub(super) fn invalid(&self, key: &str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.file.clone(),
            line: None,
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    pub(super) fn path(&self, p: &Path, key: &str) -> Result<PathBuf, ConfigError> {
        if p.as_os_str().is_empty() {
            return Err(self.invalid(key, "is empty; give a path"));
        }
        Ok(absolute(p, &self.base))
    }

    pub(super) fn duration(
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

    pub(super) fn positive(
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

    /// Refuses a value still holding the example config's placeholder, saying what to put there.
    fn not_placeholder(&self, key: &str, value: &str, what: &str) -> Result<(), ConfigError> {
        if value.to_ascii_uppercase().contains(PLACEHOLDER) {
            return Err(self.invalid(
                key,
                &format!("still holds the example's placeholder `{value}`: set it to {what}"),
            ));
        }
        Ok(())
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        self.not_placeholder(
            "server.url",
            &raw.url,
            "the address of your KATA Central Node, e.g. \"https://kata.example.org\"",
        )?;
        self.not_placeholder(
            "server.sensor_id",
            &raw.sensor_id,
            "one UUID for the whole installation, generated once (e.g. with `uuidgen`) and shared by all its agents",
        )?;
        if let Some(id) = &raw.sensor_instance_id {
            self.not_placeholder(
                "server.sensor_instance_id",
                id,
                "a name unique to this host (letters, digits, - _ .), or remove the key to use the host name",
            )?;
        }
        let url = reqwest::Url::parse(raw.url.trim()).map_err(|e| {
            let shown = super::redact_userinfo(&raw.url);
            self.invalid("server.url", &format!("`{shown}` is not a URL ({e})"))
        })?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.invalid(
                "server.url",
                "holds a user name or password, which would be written into logs; KATA authenticates this client by its certificate only: remove it",
            ));
        }
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
                    .map_err(|e| self.invalid("server.server_fingerprint", &e.to_string()))
            })
            .transpose()?;
        for (key, p) in [
            ("server.client_cert", Some(&client_cert)),
            ("server.client_key", Some(&client_key)),
            ("server.ca_cert", ca_cert.as_ref()),
        ] {
            if let Some(p) = p {
                self.regular_file(key, p, "the PEM file")?;
            }
        }
        self.not_swapped(&client_cert, &client_key)?;
        let tls = TlsOptions::from_pem_files(&client_cert, &client_key, ca_cert.as_deref(), pin)
            .map_err(|e| self.invalid(tls_key(&e), &e.to_string()))?;
        let max_in_flight = match raw.max_in_flight {
            None => MaxInFlight::Auto,
            Some(RawCount::Word(w)) if w.trim().eq_ignore_ascii_case("auto") => MaxInFlight::Auto,
            Some(RawCount::Word(w)) => {
                return Err(self.invalid(
                    "server.max_in_flight",
                    &format!("`{w}` is neither a number (1 to 100000) nor \"auto\""),
                ));
            }
            Some(RawCount::Number(n)) => MaxInFlight::Fixed(to_nonzero_usize(self.positive(
                Some(n),
                1,
                "server.max_in_flight",
                100_000,
            )?)),
        };
        let ceiling = self.positive(
            raw.max_in_flight_ceiling,
            DEFAULT_MAX_IN_FLIGHT_CEILING as u64,
            "server.max_in_flight_ceiling",
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
        let health_probe = self.duration(
            raw.health_probe.as_deref(),
            DEFAULT_HEALTH_PROBE,
            "server.health_probe",
        )?;
        if health_probe < Duration::from_secs(1) {
            return Err(self.invalid("server.health_probe", "must be at least 1s"));
        }
        Ok(ServerConfig {
            url,
            sensor_id,
            sensor_instance_id,
            tls,
            client_cert_path: client_cert,
            poll_interval,
            poll_early: false,
            request_timeout,
            max_in_flight,
            max_in_flight_ceiling: to_nonzero_usize(ceiling),
            requests_per_second: to_nonzero_u32(rps),
            max_attempts: to_nonzero_u32(attempts),
            scan_timeout,
            restrictions_refresh,
            health_probe,
        })
    }

    /// `p` must be an existing regular file (not a folder, not `/dev/null`): checked before any
    /// advice about its permissions, which would be wrong, even harmful, for anything else.
    pub(super) fn regular_file(&self, key: &str, p: &Path, what: &str) -> Result<(), ConfigError> {
        let m = std::fs::metadata(p)
            .map_err(|e| self.invalid(key, &format!("{}: {e}", p.display())))?;
        if m.is_file() {
            return Ok(());
        }
        let kind = if m.is_dir() {
            "a folder"
        } else {
            "a device or special file"
        };
        Err(self.invalid(
            key,
            &format!(
                "{} is {kind}, not a regular file: give the path of {what}",
                p.display()
            ),
        ))
    }

    /// A client key file that holds a certificate and no key (or a certificate file that holds
    /// a key and no certificate): the two keys are swapped, which the permission check would
    /// otherwise report as "run chmod 600" on the certificate.
    fn not_swapped(&self, cert: &Path, key: &Path) -> Result<(), ConfigError> {
        let markers = |p: &Path| {
            let text = std::fs::read(p).unwrap_or_default();
            let has = |m: &[u8]| text.windows(m.len()).any(|w| w == m);
            (
                has(b"-----BEGIN CERTIFICATE-----"),
                has(b"PRIVATE KEY-----"),
            )
        };
        let (key_has_cert, key_has_key) = markers(key);
        if key_has_cert && !key_has_key {
            let (_, cert_has_key) = markers(cert);
            let hint = if cert_has_key {
                " and server.client_cert names a key: the two are swapped"
            } else {
                ""
            };
            return Err(self.invalid(
                "server.client_key",
                &format!(
                    "{} holds a certificate, not a private key{hint}; give the key file (PEM PKCS#8, PKCS#1 or SEC1)",
                    key.display()
                ),
            ));
        }
        Ok(())
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
    ) -> Result<Vec<Pattern>, ConfigError> {
        let list = list.unwrap_or_else(|| default.iter().map(|s| (*s).to_string()).collect());
        list.iter()
            .map(|g| {
                Pattern::new(g)
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
        let mode = raw.mode.unwrap_or(WatchMode::Auto);
        let settle = self.duration(raw.settle.as_deref(), DEFAULT_SETTLE, &key("settle"))?;
        // Agents sharing an inbox on a NAS must never share a staging folder (each would take
        // the other's staged files for orphans): without an instance id, the host name keeps
        // them apart.
        let instance = server.sensor_instance_id.clone().unwrap_or_else(host_name);
        let staging_dir = match raw.staging_dir {
            Some(p) => self.path(&p, &key("staging_dir"))?,
            None => path.join(".dropscan").join(instance),
        };
        let settle_empty = self.duration(
            raw.settle_empty.as_deref(),
            DEFAULT_SETTLE_EMPTY,
            &key("settle_empty"),
        )?;
        let keep_original = self.duration(
            raw.keep_original.as_deref(),
            DEFAULT_KEEP_ORIGINAL,
            &key("keep_original"),
        )?;
        Ok(WatchConfig {
            recursive: raw.recursive.unwrap_or(true),
            settle,
            settle_empty,
            keep_original,
            lease_check: raw.lease_check.unwrap_or(super::LeaseCheck::Auto),
            keep_originals: raw.keep_originals.unwrap_or(super::KeepOriginals::Unleased),
            held_open_limit: self.duration(
                raw.held_open_limit.as_deref(),
                DEFAULT_HELD_OPEN_LIMIT,
                &key("held_open_limit"),
            )?,
            tidy_after: match raw.tidy_after.as_deref().map(str::trim) {
                Some("off") => None,
                v => Some(self.duration(v, super::DEFAULT_TIDY_AFTER, &key("tidy_after"))?),
            },
            save_temp_settle: self.duration(
                raw.save_temp_settle.as_deref(),
                super::DEFAULT_SAVE_TEMP_SETTLE,
                &key("save_temp_settle"),
            )?,
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

    fn log(&self, raw: RawLog) -> Result<LogConfig, ConfigError> {
        let format = raw.format.unwrap_or(LogFormat::Text);
        let level = raw.level.unwrap_or_else(|| "info".to_string());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(self.invalid(
                "log.level",
                &format!("`{level}` is not a level or filter like `info` or `dropscan=debug`"),
            ));
        }
        // A bare word is a valid filter (it enables that target at `trace` and hides everything
        // else), so a misspelt level such as `verbose` or `warning` would silence the log.
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            if !directive.contains('=')
                && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
            {
                return Err(self.invalid(
                    "log.level",
                    &format!(
                        "`{directive}` is not a level: use one of {}, or a filter like `dropscan=debug` (a bare word would hide every log line but that module's)",
                        LEVELS.join(", ")
                    ),
                ));
            }
        }
        Ok(LogConfig { format, level })
    }
}

/// The key a TLS loading error is about: each names its own file's key (and so its line).
fn tls_key(e: &kata::TlsError) -> &'static str {
    use kata::TlsError;
    let by_what = |what: &str| match what {
        "client key" => "server.client_key",
        "CA certificate" => "server.ca_cert",
        _ => "server.client_cert",
    };
    match e {
        TlsError::Read { what, .. } | TlsError::Invalid { what, .. } => by_what(what),
        TlsError::KeyReadableByOthers { .. } | TlsError::KeyMismatch { .. } => "server.client_key",
        TlsError::NoSystemRoots { .. } => "server.ca_cert",
        TlsError::Config { .. } => "server.client_cert",
    }
}

/// `p` made absolute against `base`, with `.` and `..` folded lexically (no symlink resolution:
/// the folders may not exist yet).
pub(crate) fn absolute(p: &Path, base: &Path) -> PathBuf {
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

/// This host's name, made safe as a folder name: the staging folders' instance name when
/// `server.sensor_instance_id` is not set.
pub fn host_name() -> String {
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
