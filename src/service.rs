//! The service manager's side channel (systemd `Type=notify`, `sd_notify(3)`).
//!
//! Under systemd with `NOTIFY_SOCKET` set, the agent says `READY=1` once every stage runs,
//! keeps a one-line `STATUS=` current (scans in flight, files waiting, the limit that binds,
//! the server's state), pings `WATCHDOG=1` from housekeeping when the unit sets
//! `WatchdogSec=`, says `RELOADING=1` when a SIGHUP reload begins (`READY=1` again when the new
//! agent runs) and `STOPPING=1` when a shutdown begins. Without `NOTIFY_SOCKET` (a
//! terminal, a container, the tests) every function here does nothing. A notification that
//! cannot be sent is logged at debug level and otherwise ignored: the service manager's
//! channel must never stop the pipeline.
//!
//! It also raises the process's descriptor limit at start ([`raise_nofile_limit`]): the soft
//! limit (1,024 by default) to the hard one, which the unit sets with `LimitNOFILE=`.

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
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new `STATUS=` line (what `systemctl status` shows).
pub(crate) fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` systemd requires beside it (systemd ≥ 253 refuses
/// a reload notification without it), and a status line: a reload has begun; the next agent's
/// [`ready`] ends it.
pub(crate) fn reloading(status: &str) {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the monotonic clock for RELOADING=1");
            send(&[NotifyState::Status(status)]);
        }
    }
}

/// Whether a service manager listens (`NOTIFY_SOCKET` set): status lines are worth composing.
pub(crate) fn listening() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The `STATUS=` line of a running agent: what it does now.
pub(crate) fn running_line(
    in_flight: usize,
    cap: usize,
    waiting: usize,
    bound_by: &str,
    server: &str,
) -> String {
    format!(
        "running: {in_flight} scan(s) in flight (cap {cap}), {waiting} file(s) waiting; bound by {bound_by}; KATA {server}"
    )
}

/// `STOPPING=1`: a shutdown has begun.
pub(crate) fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing or journaling work in progress"),
    ]);
}

/// `WATCHDOG=1`: the agent's housekeeping loop is alive.
pub(crate) fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half the unit's `WatchdogSec=` (as `sd_watchdog_enabled(3)`
/// advises), or `None` when no watchdog is set for this process.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| (d / 2).max(Duration::from_millis(100)))
}

/// Says `STOPPING=1` as soon as `shutdown` is cancelled (SIGINT/SIGTERM), from a task of its own,
/// so that the service manager knows while the graceful stop is still running.
pub(crate) fn stopping_on(shutdown: CancellationToken) {
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stopping();
    });
}

/// Raises the soft limit on open descriptors (`RLIMIT_NOFILE`) to the hard limit, once at start:
/// watches, staged files, connections to KATA and to the metrics port all take descriptors, and
/// the soft default of 1,024 is a limit only for old `select(2)` users, which we are not. Returns
/// the soft limit in force afterwards; a refusal is logged and the old limit kept.
pub(crate) fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is "unlimited": nothing to raise (or to raise to).
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        return limit.current;
    };
    if soft >= hard {
        return Some(soft);
    }
    let raised = rustix::process::Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = soft, to = hard, "raised the open file limit");
            Some(hard)
        }
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open file limit");
            Some(soft)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
        use rustix::process::{Resource, getrlimit};
        let hard = getrlimit(Resource::Nofile).maximum;
        let now = raise_nofile_limit();
        let after = getrlimit(Resource::Nofile);
        assert_eq!(now, after.current);
        if hard.is_some() {
            assert_eq!(after.current, hard, "raised to the hard limit");
        }
    }
}
