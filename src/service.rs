//! The service manager's side channel (systemd `Type=notify`, `sd_notify(3)`).
//!
//! Under systemd with `NOTIFY_SOCKET` set, the agent says `READY=1` once every stage runs,
//! keeps a one-line `STATUS=` current, pings `WATCHDOG=1` from housekeeping when the unit sets
//! `WatchdogSec=`, and says `STOPPING=1` when a shutdown begins. Without `NOTIFY_SOCKET` (a
//! terminal, a container, the tests) every function here does nothing. A notification that
//! cannot be sent is logged at debug level and otherwise ignored: the service manager's
//! channel must never stop the pipeline.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Sends `states`; a failure is logged, never returned.
fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify the service manager");
    }
}

/// `READY=1` with a status line: every stage of the pipeline runs.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new `STATUS=` line (what `systemctl status` shows).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `STOPPING=1`: a shutdown has begun.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing or journaling work in progress"),
    ]);
}

/// `WATCHDOG=1`: the agent's housekeeping loop is alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half the unit's `WatchdogSec=` (as `sd_watchdog_enabled(3)`
/// advises), or `None` when no watchdog is set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| (d / 2).max(Duration::from_millis(100)))
}

/// Says `STOPPING=1` as soon as `shutdown` is cancelled (SIGINT/SIGTERM), from a task of its own,
/// so that the service manager knows while the graceful stop is still running.
pub fn stopping_on(shutdown: CancellationToken) {
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stopping();
    });
}
