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

use super::raw::{RawConfig, RawLog, RawState, RawWatch};
use super::{
    Config, ConfigError, DEFAULT_HELD_OPEN_LIMIT, DEFAULT_HISTORY, DEFAULT_KEEP_ORIGINAL,
    DEFAULT_RECONCILE_INTERVAL, DEFAULT_SETTLE, DEFAULT_SETTLE_EMPTY, DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_VERDICT_TTL, DEFAULT_WATCH_POLL_INTERVAL, LogConfig, LogFormat, MIN_HISTORY, Pattern,
    ServerConfig, StateConfig, WatchConfig, WatchMode,
};

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
            history: self.history(raw.history.as_deref())?,
        })
    }

    /// `state.history`: a duration of at least [`MIN_HISTORY`].
    fn history(&self, value: Option<&str>) -> Result<Duration, ConfigError> {
        let key = "state.history";
        let d = self.duration(value, DEFAULT_HISTORY, key)?;
        if d < MIN_HISTORY {
            return Err(self.invalid(
                key,
                &format!(
                    "{} is too short: finished records are kept at least 1m",
                    humantime::format_duration(d)
                ),
            ));
        }
        Ok(d)
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

pub(super) fn to_nonzero_usize(n: u64) -> NonZeroUsize {
    NonZeroUsize::new(usize::try_from(n).unwrap_or(usize::MAX)).unwrap_or(NonZeroUsize::MIN)
}

pub(super) fn to_nonzero_u32(n: u64) -> NonZeroU32 {
    NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN)
}
