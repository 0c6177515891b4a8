//! Watch: turns filesystem activity in the inboxes into `Candidate` hints for settle.
//!
//! One task per root ([`crate::root::Root`]). With `mode = "auto"` a root is watched with
//! inotify (through `notify`) when it is on a local filesystem, and by listing it every
//! `poll_interval` when it is on a network or FUSE filesystem (or one `statfs` cannot name),
//! where inotify never hears about changes made by other hosts; `mode = "notify"` or `"poll"`
//! forces either. A root falls back to polling when inotify cannot start or reaches its limits.
//! Either way the root is also listed at start (the backlog), every `reconcile_interval`, and
//! soon after a hint was lost: the notify callback cannot wait, so when the channel is full or
//! inotify's queue overflowed it sets the root's rescan flag instead. The filesystem is the
//! durable queue and the listing is the source of truth; notify only makes us faster.
//!
//! This module does not decide whether a file is complete, and never opens or stats files for
//! that purpose: it only says "look at this path" (it stats a hinted path only to tell a new
//! folder, which it lists, from a file). Settle applies the filters and the completion gates.
//! Every listing and hint obeys the scope rules of `crate::scope` (no symlink followed, never
//! into the root's own folders or dot-folders, no subfolders when not recursive), which settle
//! and the `scan` command share.
//!
//! Layout: this file holds the stage's entry point (`run`), the record it sends (`Candidate`) and
//! its fatal error. `root.rs` is the task that watches one root (notify or polling, reconcile
//! and forced rescans); `hints.rs` is the notify callback, which must never wait; `walk.rs` lists
//! a folder tree by the walk rules; `fsops::fstype` tells local from network and FUSE
//! filesystems by `statfs`.
//!
//! Departure from the house shape (on purpose): `run` takes the roots ([`crate::root::Roots`])
//! and its channels rather than the agent's `Shared` context, and reports its own error type.
//! This stage needs nothing else (no journal, no client), and its tests drive it without an
//! agent.

mod hints;
mod mounts;
mod root;
#[cfg(test)]
mod tests;
mod walk;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::error;

pub use crate::pipeline::Candidate;
use crate::root::Roots;
pub(crate) use crate::scope::{is_ignored_name, is_out_of_scope};
use root::RootTask;

/// Capacity of the watch → settle channels together (each root has its share, see
/// [`candidate_channels`]). When a root's is full, the notify callback cannot wait: it drops
/// the event and sets the root's rescan flag, so the next reconcile (forced soon) lists the root
/// again. The listings themselves wait.
pub const CANDIDATES_CAPACITY: usize = 4096;

/// The watch → settle channels: one per root, in the roots' order, so that settle can stop
/// taking one root's candidates (that root's share of its bound is full, and its listing waits)
/// and go on taking the others' (review 11: one inbox full of files that do not settle stalled
/// every watch when they shared one channel). Each holds `capacity / roots` candidates, at least
/// [`MIN_CANDIDATES_PER_ROOT`].
pub fn candidate_channels(
    roots: usize,
    capacity: usize,
) -> (Vec<mpsc::Sender<Candidate>>, Vec<mpsc::Receiver<Candidate>>) {
    let each = (capacity / roots.max(1)).max(MIN_CANDIDATES_PER_ROOT);
    (0..roots).map(|_| mpsc::channel(each)).unzip()
}

/// Candidates each root's channel holds at least ([`candidate_channels`]).
pub const MIN_CANDIDATES_PER_ROOT: usize = 256;

/// A watcher error that stops the daemon. Anything that happens later to one folder or file is
/// logged and worked around (polling, rescans) instead.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The inbox cannot be examined at start.
    #[error(
        "{path}: cannot watch the inbox: {source}; create the folder, check that dropscan may \
         read it, or correct `watch.path`"
    )]
    RootUnreadable {
        /// The inbox.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The inbox exists but is not a folder.
    #[error("{path}: the inbox is not a folder; point `watch.path` at a folder")]
    RootNotAFolder {
        /// The inbox.
        path: PathBuf,
    },
    /// The task watching one inbox ended abnormally (a bug).
    #[error("{path}: the watcher of this inbox stopped unexpectedly: {message}")]
    Crashed {
        /// The inbox.
        path: PathBuf,
        /// What the runtime said.
        message: String,
    },
}

/// Watches every root until `shutdown`; see the module docs. Fails only at start, when a root is
/// missing or not a folder. Each change of `list_again` lists every root again soon (the
/// journal takes writes again after a full disk: files it could not claim wait in the inbox).
/// `candidates_tx` has one sender per root, in the roots' order
/// ([`candidate_channels`]); a root without one is an error.
pub async fn run(
    roots: Roots,
    candidates_tx: Vec<mpsc::Sender<Candidate>>,
    mut list_again: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) -> Result<(), WatchError> {
    for root in roots.iter() {
        check_root(root.path())?;
    }
    let mut tasks = JoinSet::new();
    let mut root_of = HashMap::new();
    let mut signals = Vec::with_capacity(roots.len());
    if let Some(root) = roots.iter().nth(candidates_tx.len()) {
        return Err(WatchError::Crashed {
            path: root.path().to_path_buf(),
            message: "no candidate channel for this inbox".into(),
        });
    }
    for (root, candidates_tx) in roots.iter().zip(candidates_tx) {
        let task = RootTask::new(Arc::clone(root), candidates_tx, shutdown.clone());
        signals.push(task.signal());
        root_of.insert(tasks.spawn(task.run()).id(), root.path().to_path_buf());
    }
    list_again.mark_unchanged();
    let relister = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = list_again.changed() => if changed.is_err() { return },
                }
                for s in &signals {
                    s.request_rescan();
                }
            }
        })
    };
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let Err(e) = joined else { continue };
        let path = root_of.get(&e.id()).cloned().unwrap_or_default();
        error!(root = %crate::fsops::shown(&path), error = %e, "an inbox watcher stopped unexpectedly");
        if result.is_ok() {
            result = Err(WatchError::Crashed {
                path,
                message: e.to_string(),
            });
        }
        // Without this watcher the inbox would silently go unscanned: stop everything.
        shutdown.cancel();
    }
    relister.abort();
    result
}

fn check_root(path: &Path) -> Result<(), WatchError> {
    // The root itself may be a symlink (e.g. /srv/inbox → /mnt/nas/inbox); what is inside is not
    // followed.
    let meta = std::fs::metadata(path).map_err(|source| WatchError::RootUnreadable {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(WatchError::RootNotAFolder {
            path: path.to_path_buf(),
        });
    }
    std::fs::read_dir(path).map_err(|source| WatchError::RootUnreadable {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}
