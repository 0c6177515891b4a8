//! Signals: the first SIGINT or SIGTERM cancels the root token (graceful shutdown); a second one
//! exits at once. The journal makes that safe: whatever was in flight resumes at the next start.
//! SIGHUP asks for a reload of the configuration (`systemctl reload dropscan`).

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
                tracing::info!("signal received: shutting down (again to exit at once)");
                t.cancel();
            } else {
                tracing::warn!(
                    "second signal: exiting now; work in flight resumes at the next start"
                );
                std::process::exit(EXIT_NOW);
            }
        }
    });
    Ok(token)
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
