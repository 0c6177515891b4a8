//! Signals: the first SIGINT or SIGTERM cancels the root token (graceful shutdown); a second one
//! exits at once. The journal makes that safe: whatever was in flight resumes at the next start.
//! SIGHUP asks for a reload of the configuration (`systemctl reload dropscan`). A signal that
//! comes before logging is set up (during `run`'s start-up) says so on stderr.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Exit code after a second signal (128 + SIGINT, as shells report it).
const EXIT_NOW: i32 = crate::error::EXIT_INTERRUPTED as i32;

/// Spawns the signal watcher; returns the token it cancels.
pub(crate) fn shutdown_token() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                const FIRST: &str = "signal received: shutting down (again to exit at once)";
                if logging_set_up() {
                    tracing::info!("{FIRST}");
                } else {
                    eprintln!("dropscan: {FIRST}");
                }
                t.cancel();
            } else {
                const SECOND: &str =
                    "second signal: exiting now; work in flight resumes at the next start";
                if logging_set_up() {
                    tracing::warn!("{SECOND}");
                } else {
                    eprintln!("dropscan: {SECOND}");
                }
                std::process::exit(EXIT_NOW);
            }
        }
    });
    Ok(token)
}

/// Whether logging is set up: `run` installs the handlers before (a signal during a slow start-up
/// must not end the process by its default action), and a line logged before would be lost.
fn logging_set_up() -> bool {
    tracing::dispatcher::has_been_set()
}

/// Spawns a SIGHUP watcher; the returned `Notify` is woken on each SIGHUP.
pub(crate) fn reload_notify() -> std::io::Result<Arc<Notify>> {
    let notify = Arc::new(Notify::new());
    let mut hup = signal(SignalKind::hangup())?;
    let n = Arc::clone(&notify);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            n.notify_one();
        }
    });
    Ok(notify)
}
