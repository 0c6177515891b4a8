//! SIGHUP: the configuration is read again and validated first. A bad one is refused (the agent
//! keeps running on the old one, and says so); a good one replaces the agent through a graceful
//! stop, which the journal makes lossless.
//!
//! What outlives the agents lives here: the [`Metrics`] (counters survive a reload) and their
//! HTTP endpoint (the port stays open; it is rebound only when `[metrics] listen` changed). A new
//! `[log]` level is applied at once. Before each agent starts, missing inboxes (a share not
//! mounted yet, or one whose server hangs) are waited for while the other watches are served
//! ([`super::inboxes`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::FatalError;
use crate::metrics::Metrics;

/// The metrics endpoint, across agent generations.
struct Endpoint {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Endpoint {
    /// Serves `metrics` on `addr` (a bind error is logged; the agent goes on without it).
    fn start(addr: SocketAddr, metrics: &Arc<Metrics>) -> Endpoint {
        let stop = CancellationToken::new();
        let (m, s) = (Arc::clone(metrics), stop.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, m, s).await {
                tracing::error!(%addr, error = %e, "metrics endpoint failed; the agent goes on without it");
            }
        });
        Endpoint { addr, stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.ok();
    }
}

/// Keeps the endpoint on `wanted`: unchanged when it already listens there, rebound otherwise.
async fn keep_endpoint(
    current: Option<Endpoint>,
    wanted: Option<SocketAddr>,
    metrics: &Arc<Metrics>,
) -> Option<Endpoint> {
    match (current, wanted) {
        (Some(e), Some(addr)) if e.addr == addr => Some(e),
        (current, wanted) => {
            if let Some(e) = current {
                e.stop().await;
            }
            wanted.map(|addr| Endpoint::start(addr, metrics))
        }
    }
}

/// Runs the agent on `config` until `shutdown`, replacing it with the configuration at `path`
/// on each `reload` notification (SIGHUP) whose file is valid.
pub async fn run_reloading(
    config: Config,
    path: &Path,
    shutdown: CancellationToken,
    reload: Arc<Notify>,
) -> Result<(), FatalError> {
    run_reloading_with(config, path, shutdown, reload, Arc::new(Metrics::new())).await
}

/// As [`run_reloading`], counting into `metrics` (kept across reloads).
pub async fn run_reloading_with(
    config: Config,
    path: &Path,
    shutdown: CancellationToken,
    reload: Arc<Notify>,
    metrics: Arc<Metrics>,
) -> Result<(), FatalError> {
    let mut config = config;
    let mut stagings = staging_paths(&config);
    let mut endpoint = keep_endpoint(None, config.metrics_listen, &metrics).await;
    let result = loop {
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
                    let checked = tokio::select! {
                        () = generation.cancelled() => {
                            // The generation ended first (the restart that serves an inbox
                            // back, a shutdown): this SIGHUP is the next generation's to check,
                            // not dropped.
                            reload.notify_one();
                            return;
                        }
                        checked = load_and_check(&path) => checked,
                    };
                    let Some(checked) = checked else { continue };
                    match checked {
                        Ok(c) => {
                            tracing::info!(config = %crate::fsops::shown(&path), "SIGHUP: configuration valid, restarting the agent on it");
                            crate::service::reloading(
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
        let result = serve_generation(&config, &metrics, &generation, &next).await;
        generation.cancel();
        watcher.await.ok();
        if let Err(e) = result {
            break Err(e);
        }
        let reloaded = next.lock().unwrap_or_else(PoisonError::into_inner).take();
        match reloaded {
            Some(c) if !shutdown.is_cancelled() => {
                // The staging folders the new configuration no longer names are free at once;
                // the others stay locked into the next generation.
                stagings = staging_paths(&c);
                let kept = stagings.clone();
                crate::fsops::roots::off_thread(move || {
                    crate::fsops::roots::keep_only_staging_locks(&staging_ids(&kept));
                })
                .await;
                crate::logging::apply(c.log.format, &c.log.level);
                endpoint = keep_endpoint(endpoint, c.metrics_listen, &metrics).await;
                config = c;
            }
            _ => break Ok(()),
        }
    };
    // Stopped for good: the last configuration's staging folders are free again.
    crate::fsops::roots::off_thread(move || {
        crate::fsops::roots::release_staging_locks(&staging_ids(&stagings));
    })
    .await;
    if let Some(e) = endpoint {
        e.stop().await;
    }
    result
}

/// One generation on `config`: the watches whose inbox answers are served, the others waited for
/// ([`super::inboxes`]); a watch back, or one held at start until its folder is back, restarts
/// the loop through `next`.
async fn serve_generation(
    config: &Config,
    metrics: &Arc<Metrics>,
    generation: &CancellationToken,
    next: &Arc<Mutex<Option<Config>>>,
) -> Result<(), FatalError> {
    let Some((served, missing)) = super::inboxes::wait_for_some(config, metrics, generation).await
    else {
        return Ok(());
    };
    let restart = super::inboxes::Restart {
        next: Arc::clone(next),
        config: config.clone(),
    };
    let waiting = (!missing.is_empty()).then(|| {
        tokio::spawn(super::inboxes::restart_when_back(
            restart.clone(),
            missing,
            Arc::clone(metrics),
            generation.clone(),
        ))
    });
    let ran = match super::Agent::with_metrics(served, Arc::clone(metrics)) {
        Ok(agent) => {
            agent
                .keep_staging_locks()
                .restart_into(restart)
                .run(generation.clone())
                .await
        }
        Err(e) => Err(e),
    };
    if let Some(w) = waiting {
        w.abort();
    }
    ran
}

/// Reads the configuration at `path` again and tries its folders ([`super::preflight::check`]),
/// on a thread of its own: the check waits for every folder, and one on a share whose server
/// hangs waits for ever. On an async worker thread that wait took a worker from every other
/// watch (two on a two-core machine: all of them), and kept a shutdown from ever ending.
/// `None` when it could not be done (logged).
async fn load_and_check(path: &Path) -> Option<Result<Config, crate::config::ConfigError>> {
    let path = path.to_path_buf();
    let spawned = crate::runtime::on_own_thread("dropscan-reload", move || {
        Config::load(&path).and_then(|c| {
            super::preflight::check(&c).map(|notes| {
                for note in notes {
                    tracing::warn!("{note}");
                }
                c
            })
        })
    });
    let done_rx = match spawned {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: cannot start a thread to read the configuration; still running on the previous one (send SIGHUP again)");
            return None;
        }
    };
    let checked = done_rx.await.ok();
    if checked.is_none() {
        // The thread ended without answering: it panicked.
        tracing::error!(
            "SIGHUP: reading the configuration failed; still running on the previous one"
        );
    }
    checked
}

/// The (dev, ino) of the staging folders that exist among `paths`.
fn staging_ids(paths: &[PathBuf]) -> Vec<(u64, u64)> {
    paths
        .iter()
        .filter_map(|p| rustix::fs::stat(p).ok())
        .map(|st| (st.st_dev, st.st_ino))
        .collect()
}

/// The staging folders `config` names.
fn staging_paths(config: &Config) -> Vec<PathBuf> {
    config
        .watches
        .iter()
        .map(|w| w.staging_dir.clone())
        .collect()
}
