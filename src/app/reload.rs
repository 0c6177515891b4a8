//! SIGHUP: the configuration is read again and validated first. A bad one is refused (the agent
//! keeps running on the old one, and says so); a good one replaces the agent through a graceful
//! stop, which the journal makes lossless.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::FatalError;

/// Runs the agent on `config` until `shutdown`, replacing it with the configuration at `path`
/// on each `reload` notification (SIGHUP) whose file is valid.
pub async fn run_reloading(
    config: Config,
    path: &Path,
    shutdown: CancellationToken,
    reload: Arc<Notify>,
) -> Result<(), FatalError> {
    let mut config = config;
    loop {
        // One agent per configuration. SIGHUP: the new file is validated first; a bad one is
        // refused (the agent keeps running on the old one), a good one replaces the agent
        // through a graceful stop, which the journal makes lossless.
        let generation = shutdown.child_token();
        let next: Arc<Mutex<Option<Config>>> = Arc::default();
        let watcher = {
            let (generation, next, reload, path) = (
                generation.clone(),
                Arc::clone(&next),
                Arc::clone(&reload),
                path.to_path_buf(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = generation.cancelled() => return,
                        () = reload.notified() => {}
                    }
                    match Config::load(&path) {
                        Ok(c) => {
                            tracing::info!(config = %crate::fsops::shown(&path), "SIGHUP: configuration valid, restarting the agent on it");
                            crate::service::status(
                                "reloading: restarting the agent on the new configuration",
                            );
                            *next.lock().unwrap_or_else(PoisonError::into_inner) = Some(c);
                            generation.cancel();
                            return;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "SIGHUP: configuration refused; still running on the previous one")
                        }
                    }
                }
            })
        };
        let result = super::run(config, generation.clone()).await;
        generation.cancel();
        watcher.await.ok();
        result?;
        let reloaded = next.lock().unwrap_or_else(PoisonError::into_inner).take();
        match reloaded {
            Some(c) if !shutdown.is_cancelled() => config = c,
            _ => return Ok(()),
        }
    }
}
