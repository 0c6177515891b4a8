//! Inboxes that are not there: a share not mounted yet, or one whose server does not answer.
//!
//! Each agent generation serves the watches whose inbox is a folder that answers
//! ([`crate::answer`]) and waits for the others: they are logged once, shown on
//! `/readyz` (not ready while any is missing), and looked at again every [`INBOX_RETRY`]. When
//! one comes back and the whole configuration passes its check, the generation ends and the next
//! one serves every watch (the same graceful stop as a SIGHUP reload, which the journal makes
//! lossless). A SIGHUP that came meanwhile wins: its configuration is not overwritten, and one
//! still being checked is checked again by the next generation. When none answers, nothing
//! starts until one does.
//!
//! Records of a watch that is not served are left as they are (`reconcile` leaves records of
//! roots it does not know), so a file in flight on a share that went away is taken up again by
//! the generation that serves it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::answer::{self, Answer};
use crate::config::Config;
use crate::metrics::Metrics;

/// How often missing inboxes are looked for again.
pub(super) const INBOX_RETRY: Duration = Duration::from_secs(5);

/// How an agent that serves part of its configuration gets the whole of it served: the reload
/// loop's slot for the next generation's configuration, and that configuration.
#[derive(Clone)]
pub(crate) struct Restart {
    pub(super) next: Arc<Mutex<Option<Config>>>,
    pub(super) config: Config,
}

impl Restart {
    /// Ends `generation`; the reload loop starts the next one on the whole configuration, or on
    /// a SIGHUP's configuration put there meanwhile (newer: it stays).
    fn now(&self, generation: &CancellationToken) {
        self.next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| self.config.clone());
        generation.cancel();
    }
}

/// The inboxes of `config` that are not folders now, or whose filesystem does not answer
/// within [`answer::DEADLINE`].
pub fn missing_inboxes(config: &Config) -> Vec<PathBuf> {
    let inboxes: Vec<PathBuf> = config.watches.iter().map(|w| w.path.clone()).collect();
    unavailable(&inboxes)
}

fn unavailable(paths: &[PathBuf]) -> Vec<PathBuf> {
    let answers = answer::look(paths, answer::DEADLINE);
    paths
        .iter()
        .zip(answers)
        .filter(|(_, a)| *a != Answer::Folder)
        .map(|(p, _)| p.clone())
        .collect()
}

/// [`unavailable`] off the async threads (it waits up to the deadline).
async fn unavailable_now(paths: Vec<PathBuf>) -> Vec<PathBuf> {
    let fallback = paths.clone();
    tokio::task::spawn_blocking(move || unavailable(&paths))
        .await
        .unwrap_or(fallback)
}

/// After [`INBOX_RETRY`], which of `paths` are still not folders that answer; `None` once
/// `generation` ends.
async fn look_again(paths: &[PathBuf], generation: &CancellationToken) -> Option<Vec<PathBuf>> {
    tokio::select! {
        () = generation.cancelled() => return None,
        () = tokio::time::sleep(INBOX_RETRY) => {}
    }
    tokio::select! {
        () = generation.cancelled() => None,
        still = unavailable_now(paths.to_vec()) => Some(still),
    }
}

/// Waits until at least one inbox of `config` answers as a folder; then the configuration
/// limited to those watches, and the inboxes still missing. `None` when `shutdown` came first.
pub(super) async fn wait_for_some(
    config: &Config,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Option<(Config, Vec<PathBuf>)> {
    let inboxes: Vec<PathBuf> = config.watches.iter().map(|w| w.path.clone()).collect();
    let mut logged: Vec<PathBuf> = Vec::new();
    loop {
        let missing = tokio::select! {
            () = shutdown.cancelled() => return None,
            missing = unavailable_now(inboxes.clone()) => missing,
        };
        metrics.set_missing_inboxes(missing.clone());
        let some = missing.len() < inboxes.len();
        if missing != logged && !missing.is_empty() {
            let shown: Vec<String> = missing
                .iter()
                .map(|p| crate::fsops::shown(p).to_string())
                .collect();
            tracing::warn!(
                inboxes = %shown.join(", "),
                retry = %humantime::format_duration(INBOX_RETRY),
                "inbox missing or not answering (a share not mounted yet, or its server down?): {}",
                if some { "serving the other watches, waiting for it" } else { "waiting for it" }
            );
            logged.clone_from(&missing);
        }
        if some {
            let mut served = config.clone();
            served.watches.retain(|w| !missing.contains(&w.path));
            return Some((served, missing));
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(INBOX_RETRY) => {}
        }
    }
}

/// Looks at the `missing` inboxes every [`INBOX_RETRY`]; once one is back and the whole
/// `config` passes its check ([`super::preflight::check`]), puts `config` into `next` and ends
/// `generation`, so that the next agent serves it. A check that fails is logged and ends the
/// waiting: the other watches go on, and a SIGHUP tries again.
pub(super) async fn restart_when_back(
    restart: Restart,
    missing: Vec<PathBuf>,
    metrics: Arc<Metrics>,
    generation: CancellationToken,
) {
    loop {
        let Some(still) = look_again(&missing, &generation).await else {
            return;
        };
        metrics.set_missing_inboxes(still.clone());
        if still.len() == missing.len() {
            continue;
        }
        let back: Vec<String> = missing
            .iter()
            .filter(|p| !still.contains(p))
            .map(|p| crate::fsops::shown(p).to_string())
            .collect();
        let checking = restart.config.clone();
        let spawned = crate::runtime::on_own_thread("dropscan-check", move || {
            super::preflight::check(&checking)
        });
        let checked = match spawned {
            Ok(rx) => tokio::select! {
                () = generation.cancelled() => return,
                r = rx => r.ok(),
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot start a thread to check the configuration");
                None
            }
        };
        match checked {
            Some(Ok(_)) => {
                tracing::info!(
                    inboxes = %back.join(", "),
                    "inbox answers now: restarting the agent to serve every watch"
                );
                restart.now(&generation);
                return;
            }
            Some(Err(e)) => {
                tracing::error!(
                    inboxes = %back.join(", "),
                    error = %e,
                    "inbox answers now but its watch is refused; the other watches go on (fix it, then reload)"
                );
                return;
            }
            None => continue,
        }
    }
}

/// Looks every [`INBOX_RETRY`] at the folders that watches held at start wait for (their staging
/// folder, missing while files of theirs were in flight: a share not mounted yet; see
/// `reconcile::recognise_root`); once one is a folder that answers, ends `generation` so that the
/// next one, on the whole configuration, serves its watch.
pub(super) async fn restart_when_staging_back(
    awaited: Vec<PathBuf>,
    restart: Restart,
    generation: CancellationToken,
) {
    loop {
        let Some(still) = look_again(&awaited, &generation).await else {
            return;
        };
        if still.len() < awaited.len() {
            let back: Vec<String> = awaited
                .iter()
                .filter(|p| !still.contains(p))
                .map(|p| crate::fsops::shown(p).to_string())
                .collect();
            tracing::info!(
                folders = %back.join(", "),
                "a held watch's folder is back: restarting the agent to serve it"
            );
            restart.now(&generation);
            return;
        }
    }
}
