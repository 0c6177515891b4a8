//! Listing: walks a folder tree of one root by the walk rules (beneath the root's descriptor, no
//! symlink followed, never into the root's own folders, dot-folders or a folder that is or was a
//! destination (`fsops::dest`), no subfolders when not recursive, at most `MAX_DEPTH` deep) and sends a `Candidate` for every file found. Used for the
//! backlog, the reconcile scan, polling and new subfolders; when to list is the root task's
//! business (`root.rs`). Blocking: runs in `spawn_blocking`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Candidate, is_ignored_name, is_out_of_scope};
use crate::root::Root;

/// Folders deeper than this below the root are not descended into (bind-mount loops).
const MAX_DEPTH: usize = 256;

/// Unreadable folders remembered per root, so that each is logged once; then the memory restarts.
const MAX_WARNED_FOLDERS: usize = 1024;

/// Unreadable folders already logged for one root.
#[derive(Debug, Default)]
pub(super) struct WarnedFolders(HashSet<PathBuf>);

impl WarnedFolders {
    /// True the first time `dir` is reported.
    fn first(&mut self, dir: &Path) -> bool {
        if self.0.contains(dir) {
            return false;
        }
        if self.0.len() >= MAX_WARNED_FOLDERS {
            self.0.clear();
        }
        self.0.insert(dir.to_path_buf());
        true
    }

    fn readable(&mut self, dir: &Path) {
        if !self.0.is_empty() && self.0.remove(dir) {
            info!(folder = %crate::fsops::shown(dir), "folder readable again");
        }
    }
}

/// How a listing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Walked {
    /// Every folder in reach was listed (unreadable ones logged).
    Done,
    /// Shutdown, or settle is gone.
    Stopped,
}

/// Lists `start` (a folder of root `root`) and what is below it by the walk rules, sending a
/// Candidate for every entry that is not a folder and not ignored by name. Blocking: run it in
/// `spawn_blocking`.
pub(super) fn walk_blocking(
    root: &Root,
    start: &Path,
    candidates_tx: &mpsc::Sender<Candidate>,
    shutdown: &CancellationToken,
    warned: &mut WarnedFolders,
) -> Walked {
    let w = &root.config;
    if start != w.path && is_out_of_scope(w, &start.join("x")) {
        return Walked::Done;
    }
    let start_depth = start
        .strip_prefix(&w.path)
        .map_or(0, |rel| rel.components().count());
    // An explicit stack: deep trees cannot exhaust the thread's stack.
    let mut stack = vec![(start.to_path_buf(), start_depth)];
    while let Some((dir, depth)) = stack.pop() {
        if shutdown.is_cancelled() {
            return Walked::Stopped;
        }
        // Listed beneath the root's descriptor: a folder swapped for a symlink while we walk
        // is refused, never listed (what it points to is outside the inbox).
        let listed = crate::fsops::Dir::open_trusted(&w.path).and_then(|root| {
            let rel = dir.strip_prefix(&w.path).unwrap_or(Path::new(""));
            let folder = root.open_dir(rel)?;
            let entries = folder.entry_types()?;
            // A folder that is or was a destination (its marker moves with it when it is
            // renamed into the inbox) holds what dropscan placed: never listed for claiming.
            let destination = dir != w.path
                && crate::fsops::dest::marked(&folder, entries.iter().map(|(n, _)| n.as_os_str()));
            Ok((entries, destination))
        });
        let entries = match listed {
            Ok((_, true)) => {
                if warned.first(&dir) {
                    warn!(folder = %crate::fsops::shown(&dir), "not scanned: a folder that is or was a destination of dropscan (renamed into the inbox?)");
                }
                continue;
            }
            Ok((entries, false)) => {
                warned.readable(&dir);
                entries
            }
            Err(crate::fsops::FsError::Vanished { .. }) if dir != w.path => continue,
            Err(e) => {
                if warned.first(&dir) {
                    warn!(folder = %crate::fsops::shown(&dir), error = %e, "cannot list folder; skipping it");
                }
                continue;
            }
        };
        for (name, file_type) in entries {
            let path = dir.join(&name);
            // As listed (never followed): a symlink is never a folder here.
            let is_dir = file_type == rustix::fs::FileType::Directory;
            if is_dir {
                let descend = w.recursive
                    && !name.as_encoded_bytes().starts_with(b".")
                    && !w.own_dirs().iter().any(|d| *d == path);
                if !descend {
                    continue;
                }
                if depth + 1 > MAX_DEPTH {
                    if warned.first(&path) {
                        warn!(folder = %crate::fsops::shown(&path), max = MAX_DEPTH, "folder too deep; not descending");
                    }
                    continue;
                }
                stack.push((path, depth + 1));
                continue;
            }
            if is_ignored_name(&name) {
                continue;
            }
            if candidates_tx
                .blocking_send(Candidate {
                    root: root.id,
                    path,
                })
                .is_err()
            {
                return Walked::Stopped;
            }
        }
    }
    Walked::Done
}
