//! Logging set-up: structured `tracing` output as text or JSON on stderr. `RUST_LOG`, when set,
//! overrides the configured level.
//!
//! The level filter sits behind a reload handle: a SIGHUP with a new `[log] level` applies it
//! without a restart ([`apply`]). The format (text or JSON) is fixed at start; a change of it
//! is reported as needing a restart.

use std::sync::{Mutex, OnceLock, PoisonError};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

/// What was installed: the filter's reload handle and the settings in force.
struct Installed {
    handle: reload::Handle<EnvFilter, Registry>,
    format: LogFormat,
    level: String,
}

static INSTALLED: OnceLock<Mutex<Installed>> = OnceLock::new();

fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. Calling it twice is harmless (the second call does nothing).
pub fn init(format: LogFormat, level: &str) {
    use std::io::IsTerminal;
    let (filter_layer, handle) = reload::Layer::new(filter(level));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => Box::new(fmt.with_target(false)),
        LogFormat::Json => Box::new(fmt.json().flatten_event(true)),
    };
    if tracing_subscriber::registry()
        .with(filter_layer)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        INSTALLED
            .set(Mutex::new(Installed {
                handle,
                format,
                level: level.to_string(),
            }))
            .ok();
    }
}

/// Applies a reloaded `[log]`: a new level takes effect at once (unless `RUST_LOG` overrides
/// it); a new format is logged as needing a restart.
pub fn apply(format: LogFormat, level: &str) {
    let Some(installed) = INSTALLED.get() else {
        return;
    };
    let mut installed = installed.lock().unwrap_or_else(PoisonError::into_inner);
    if installed.level != level {
        if std::env::var_os("RUST_LOG").is_some() {
            tracing::warn!(
                level,
                "SIGHUP: log.level changed, but RUST_LOG is set and overrides it"
            );
        } else {
            match installed.handle.reload(filter(level)) {
                Ok(()) => {
                    tracing::info!(level, "SIGHUP: log.level applied");
                    installed.level = level.to_string();
                }
                Err(e) => tracing::warn!(level, error = %e, "SIGHUP: cannot apply log.level"),
            }
        }
    }
    if installed.format != format {
        tracing::warn!(
            "SIGHUP: log.format changed; it takes effect at the next restart (the level does not need one)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_changes_on_sighup_are_silently_ignored() {
        if std::env::var_os("RUST_LOG").is_some() {
            return; // RUST_LOG overrides the configured level by design.
        }
        init(LogFormat::Text, "warn");
        if INSTALLED.get().is_none() {
            return; // another subscriber was installed first in this process
        }
        assert!(!tracing::enabled!(tracing::Level::INFO));
        apply(LogFormat::Text, "info");
        assert!(tracing::enabled!(tracing::Level::INFO));
        apply(LogFormat::Text, "warn");
        assert!(!tracing::enabled!(tracing::Level::INFO));
    }
}
