//! Logging set-up: structured `tracing` output as text or JSON on stderr. `RUST_LOG`, when set,
//! overrides the configured level.
//!
//! Under systemd (stderr is the journal stream that `JOURNAL_STREAM` names), each line starts
//! with its syslog priority, `<3>` for ERROR to `<7>` for DEBUG and TRACE: journald reads the
//! prefix (`SyslogLevelPrefix=`, on by default) and strips it, so `journalctl -p err` finds the
//! agent's errors. Elsewhere lines carry no prefix.
//!
//! The level filter sits behind a reload handle: a SIGHUP with a new `[log] level` applies it
//! without a restart ([`apply`]). The format (text or JSON) is fixed at start; a change of it
//! is reported as needing a restart.

use std::sync::{Mutex, OnceLock, PoisonError};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
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

/// The syslog priority journald files a line of `level` under.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// A line format with the syslog priority prefix (`<3>` …) before what `F` writes.
struct PriorityPrefix<F>(F);

impl<S, N, F> FormatEvent<S, N> for PriorityPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` (`DEV:INODE`, set by systemd) names
/// the very file stderr is (a child whose stderr was redirected keeps the variable, not the
/// stream).
fn stderr_is_journal() -> bool {
    let Some(named) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    named.to_string_lossy() == format!("{}:{}", st.st_dev, st.st_ino)
}

/// The stderr layer: text or JSON, with priority prefixes when `journal`.
fn stderr_layer<S>(format: LogFormat, journal: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal() && !journal)
        .with_writer(std::io::stderr);
    match (format, journal) {
        (LogFormat::Text, false) => Box::new(fmt.with_target(false)),
        (LogFormat::Text, true) => Box::new(fmt.event_format(PriorityPrefix(
            tracing_subscriber::fmt::format().with_target(false),
        ))),
        (LogFormat::Json, false) => Box::new(fmt.json().flatten_event(true)),
        (LogFormat::Json, true) => Box::new(fmt.json().event_format(PriorityPrefix(
            tracing_subscriber::fmt::format().json().flatten_event(true),
        ))),
    }
}

/// Installs the global subscriber. Calling it twice is harmless (the second call does nothing).
pub(crate) fn init(format: LogFormat, level: &str) {
    let (filter_layer, handle) = reload::Layer::new(filter(level));
    let fmt = stderr_layer(format, stderr_is_journal());
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
pub(crate) fn apply(format: LogFormat, level: &str) {
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

    /// A writer into a shared buffer, for a subscriber under test.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines the journal-stream formats (text, JSON) write for an error, a warning and an
    /// info event.
    fn journal_lines(json: bool) -> Vec<String> {
        let buf = Buffer::default();
        let b = buf.clone();
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || b.clone());
        let layer: Box<dyn Layer<Registry> + Send + Sync> = if json {
            Box::new(fmt.json().event_format(PriorityPrefix(
                tracing_subscriber::fmt::format().json().flatten_event(true),
            )))
        } else {
            Box::new(fmt.event_format(PriorityPrefix(
                tracing_subscriber::fmt::format().with_target(false),
            )))
        };
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(stage = "poll", "stage stopped");
            tracing::warn!("server slow");
            tracing::info!("placed");
            tracing::debug!("detail");
        });
        let bytes = buf.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn error_lines_carry_priority_3_for_the_journal() {
        for json in [false, true] {
            let lines = journal_lines(json);
            let prefixes: Vec<&str> = lines.iter().map(|l| &l[..3]).collect();
            assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>"], "{lines:#?}");
            assert!(lines[0].contains("stage stopped"), "{lines:#?}");
            if json {
                let v: serde_json::Value = serde_json::from_str(&lines[0][3..]).unwrap_or_default();
                assert_eq!(v["level"], "ERROR", "{lines:#?}");
            }
        }
    }

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
