//! The notify callback: turns inotify events into `Candidate`s and new-folder hints. It runs on
//! notify's thread and must never wait, so a full channel, an overflowed inotify queue or a
//! watcher error sets the root's rescan (or polling) flag in `RootSignal` instead; the root task
//! (`root.rs`) acts on the flags. Does not list folders (that is `walk.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use notify::Event;
use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, error, warn};

use super::{Candidate, is_ignored_name, is_out_of_scope};
use crate::config::WatchConfig;
use crate::root::Root;

/// Where to raise the inotify limits.
pub(super) const SYSCTL_ADVICE: &str = "raise fs.inotify.max_user_watches and fs.inotify.max_user_instances \
     (install packaging/sysctl/60-dropscan.conf into /etc/sysctl.d and run `sysctl --system`)";

/// What the notify callback tells the root task.
#[derive(Debug, Default)]
pub(super) struct RootSignal {
    /// A hint was lost: list the whole root soon.
    pub(super) rescan: AtomicBool,
    /// inotify hit a limit: drop it and poll.
    pub(super) degraded: AtomicBool,
    /// Wakes the root task after either flag was set.
    pub(super) wake: Notify,
}

impl RootSignal {
    pub(super) fn request_rescan(&self) {
        self.rescan.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub(super) fn request_polling(&self) {
        self.degraded.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// The notify callback's state (runs on notify's thread, must never wait).
pub(super) struct Hints {
    /// The root watched.
    pub(super) root: Arc<Root>,
    /// Files to settle.
    pub(super) candidates_tx: mpsc::Sender<Candidate>,
    /// New subfolders, for the root task to list.
    pub(super) folders_tx: mpsc::Sender<PathBuf>,
    /// Flags for the root task.
    pub(super) signal: Arc<RootSignal>,
}

impl Hints {
    pub(super) fn handle(&self, res: notify::Result<Event>) {
        let w = &self.root.config;
        let ev = match res {
            Ok(ev) => ev,
            Err(e) => {
                if is_watch_limit(&e) {
                    error!(
                        root = %w.path.display(),
                        error = %e,
                        advice = SYSCTL_ADVICE,
                        "inotify watch limit reached (fs.inotify.max_user_watches); \
                         switching this inbox to polling"
                    );
                    self.signal.request_polling();
                } else {
                    warn!(root = %w.path.display(), error = %e, "watcher error; rescanning the inbox");
                }
                self.signal.request_rescan();
                return;
            }
        };
        if ev.need_rescan() {
            debug!(root = %w.path.display(), "inotify queue overflowed; rescanning the inbox");
            self.signal.request_rescan();
        }
        let root_gone = matches!(
            ev.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))
        ) && ev.paths.contains(&w.path);
        if root_gone {
            // The inotify watch died with the folder; a folder created again under the same name
            // would be silent. Polling finds it whenever it is back.
            warn!(
                root = %w.path.display(),
                "the inbox folder was removed or moved away; switching this inbox to polling"
            );
            self.signal.request_polling();
            return;
        }
        let folder_known = match ev.kind {
            EventKind::Create(CreateKind::Folder) => Some(true),
            EventKind::Create(CreateKind::File)
            | EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(false),
            EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Any)) => None,
            // Writes are followed by settle's re-stats once the creation was seen; forwarding
            // every write would only fill the channel.
            _ => return,
        };
        for path in ev.paths {
            self.hint(w, path, folder_known);
        }
    }

    fn hint(&self, w: &WatchConfig, path: PathBuf, folder_known: Option<bool>) {
        if is_out_of_scope(w, &path) {
            return;
        }
        let Some(name) = path.file_name() else {
            return;
        };
        if name.as_encoded_bytes().starts_with(b".") {
            return;
        }
        let is_folder = folder_known.unwrap_or_else(|| {
            std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_dir())
        });
        if is_folder {
            if w.recursive
                && self.folders_tx.try_send(path).is_err()
                && !self.folders_tx.is_closed()
            {
                self.signal.request_rescan();
            }
            return;
        }
        if is_ignored_name(name) {
            return;
        }
        let candidate = Candidate {
            root: self.root.id,
            path,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.candidates_tx.try_send(candidate) {
            self.signal.request_rescan();
        }
    }
}

pub(super) fn is_watch_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => {
            matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EMFILE))
        }
        _ => false,
    }
}
