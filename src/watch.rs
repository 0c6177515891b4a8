//! Watch: hints that something in an inbox may be new, from notify (inotify) or polling, plus a
//! periodic reconcile scan that is the source of truth.
//!
//! `mode = "auto"` reads the root's filesystem type (statfs): on NFS, SMB/CIFS, FUSE, 9p, Ceph and
//! other network filesystems inotify sees nothing done by other hosts, so the root is polled
//! instead, and the log says so. If a watch cannot be set (typically the inotify watch limit),
//! the root falls back to polling with an error naming the sysctl to raise: a root is never left
//! unprotected.
//!
//! The notify callback is synchronous and cannot wait: it `try_send`s. When the channel is full,
//! or the kernel reports a queue overflow (`Flag::Rescan`), the root's rescan flag is set and a
//! full listing follows soon: the filesystem itself is the durable queue. A new subfolder is
//! listed as soon as it appears (after its watch exists, since notify adds it on the create
//! event), so files created in it at once are not missed.
//!
//! What this stage does not do: decide anything about a file. Settle checks every candidate.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{WatchConfig, WatchMode};

/// Capacity of the watch → settle channel. When full, the notify callback (which cannot wait)
/// drops the event and sets the root's rescan flag, so the root is listed again soon.
pub const CANDIDATES_CAPACITY: usize = 4096;

/// A hint that the file at `path` may be new or changed.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Index of the root in the config's watches.
    pub root: usize,
    /// Absolute path.
    pub path: PathBuf,
}

/// A watcher failure that stops the daemon.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The inbox is missing or not a folder.
    #[error("inbox {}: {detail}", path.display())]
    Root {
        /// The inbox.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// What kind of filesystem a root is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// A local filesystem: inotify works.
    Local,
    /// A network or user-space filesystem (its name): inotify misses other hosts' changes.
    Remote(&'static str),
}

/// Maps a statfs magic number to a filesystem kind.
pub fn fs_kind_of_magic(magic: i64) -> FsKind {
    #[allow(clippy::cast_possible_wrap)]
    let name = match magic {
        0x6969 => "NFS",
        0x517B => "SMB",
        x if x == 0xFF53_4D42_u32 as i64 || x == i64::from(0xFF53_4D42_u32 as i32) => "CIFS",
        x if x == 0xFE53_4D42_u32 as i64 || x == i64::from(0xFE53_4D42_u32 as i32) => "SMB2",
        0x6573_5546 => "FUSE",
        0x0102_1997 => "9p",
        0x00C3_6400 => "Ceph",
        0x5346_414F => "AFS",
        0x7375_7245 => "Coda",
        0x564C => "NCP",
        0x0BD0_0BD0 => "Lustre",
        0x0116_1970 => "GFS2",
        0x7461_636F => "OCFS2",
        0x2003_0528 => "OrangeFS",
        0x786F_4256 => "vboxsf",
        _ => return FsKind::Local,
    };
    FsKind::Remote(name)
}

/// The filesystem kind of `path` (local when it cannot be told).
pub fn detect_fs(path: &Path) -> FsKind {
    match rustix::fs::statfs(path) {
        #[allow(clippy::unnecessary_cast, clippy::cast_possible_wrap)]
        Ok(s) => fs_kind_of_magic(s.f_type as i64),
        Err(_) => FsKind::Local,
    }
}

/// Lists the files below `dir` (within `w`'s rules) without following symlinks. Symlinks, FIFOs
/// and other non-folders are reported too: settle logs and skips them.
pub fn walk(w: &WatchConfig, dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) => {
                if d.exists() {
                    tracing::warn!(path = %d.display(), error = %e, "cannot list folder");
                }
                continue;
            }
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                let hidden = e.file_name().as_encoded_bytes().first() == Some(&b'.');
                let own = w.own_dirs().iter().any(|o| p.starts_with(o));
                if w.recursive && !hidden && !own {
                    stack.push(p);
                }
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Runs a watcher per root until shutdown. Fails only if a root is missing at start.
pub async fn run(
    watches: Arc<[WatchConfig]>,
    candidates_tx: mpsc::Sender<Candidate>,
    shutdown: CancellationToken,
) -> Result<(), WatchError> {
    for w in watches.iter() {
        if !w.path.is_dir() {
            return Err(WatchError::Root {
                path: w.path.clone(),
                detail: "does not exist or is not a folder".into(),
            });
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, _) in watches.iter().enumerate() {
        let root = RootWatch {
            index: i,
            watches: Arc::clone(&watches),
            tx: candidates_tx.clone(),
            wake: Arc::new(Notify::new()),
            rescan: Arc::new(AtomicBool::new(true)),
            new_dirs: Arc::default(),
        };
        tasks.spawn(root.run(shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

struct RootWatch {
    index: usize,
    watches: Arc<[WatchConfig]>,
    tx: mpsc::Sender<Candidate>,
    wake: Arc<Notify>,
    rescan: Arc<AtomicBool>,
    new_dirs: Arc<Mutex<Vec<PathBuf>>>,
}

impl RootWatch {
    fn cfg(&self) -> &WatchConfig {
        &self.watches[self.index]
    }

    async fn run(self, shutdown: CancellationToken) {
        let w = self.cfg().clone();
        let poll = match w.mode {
            WatchMode::Poll => true,
            WatchMode::Notify => false,
            WatchMode::Auto => match detect_fs(&w.path) {
                FsKind::Local => false,
                FsKind::Remote(fs) => {
                    tracing::info!(
                        root = %w.path.display(),
                        filesystem = fs,
                        interval = ?w.poll_interval,
                        "polling this inbox: inotify does not see changes made by other hosts on a {fs} filesystem"
                    );
                    true
                }
            },
        };
        let _watcher = if poll { None } else { self.start_notify(&w) };
        let poll = poll || _watcher.is_none();
        let mut reconcile = tokio::time::interval(if poll {
            w.poll_interval.min(w.reconcile_interval)
        } else {
            w.reconcile_interval
        });
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The first tick is immediate: the backlog is listed at start.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = reconcile.tick() => self.rescan.store(true, Ordering::Relaxed),
                () = self.wake.notified() => {}
            }
            let dirs: Vec<PathBuf> = std::mem::take(
                &mut *self
                    .new_dirs
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            let full = self.rescan.swap(false, Ordering::Relaxed);
            let targets = if full { vec![w.path.clone()] } else { dirs };
            for dir in targets {
                let wc = w.clone();
                let files = tokio::task::spawn_blocking(move || walk(&wc, &dir))
                    .await
                    .unwrap_or_default();
                for path in files {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return,
                        r = self.tx.send(Candidate { root: self.index, path }) => if r.is_err() { return },
                    }
                }
            }
        }
    }

    /// Starts inotify on the root; `None` (with an error logged) means: poll instead.
    fn start_notify(&self, w: &WatchConfig) -> Option<notify::RecommendedWatcher> {
        let tx = self.tx.clone();
        let wake = Arc::clone(&self.wake);
        let rescan = Arc::clone(&self.rescan);
        let new_dirs = Arc::clone(&self.new_dirs);
        let index = self.index;
        let own: Vec<PathBuf> = w.own_dirs().iter().map(|p| p.to_path_buf()).collect();
        let handler = move |res: notify::Result<notify::Event>| {
            let event = match res {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "watch error: listing the inbox again");
                    rescan.store(true, Ordering::Relaxed);
                    wake.notify_one();
                    return;
                }
            };
            if event.need_rescan() {
                rescan.store(true, Ordering::Relaxed);
                wake.notify_one();
                return;
            }
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            for path in event.paths {
                if own.iter().any(|o| path.starts_with(o)) {
                    continue;
                }
                let is_new_dir = matches!(
                    event.kind,
                    EventKind::Create(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
                ) && std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
                if is_new_dir {
                    new_dirs
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(path);
                    wake.notify_one();
                    continue;
                }
                if tx.try_send(Candidate { root: index, path }).is_err() {
                    // Full (or closed): the event is dropped, the inbox is listed again soon.
                    rescan.store(true, Ordering::Relaxed);
                    wake.notify_one();
                }
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(root = %w.path.display(), error = %e, "cannot start inotify; polling this inbox instead");
                return None;
            }
        };
        let mode = if w.recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        if let Err(e) = watcher.watch(&w.path, mode) {
            let limit = matches!(e.kind, notify::ErrorKind::MaxFilesWatch)
                || matches!(&e.kind, notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::ENOSPC));
            if limit {
                tracing::error!(
                    root = %w.path.display(),
                    error = %e,
                    "inotify watch limit reached: polling this inbox instead; raise fs.inotify.max_user_watches (see packaging/sysctl/60-dropscan.conf)"
                );
            } else {
                tracing::error!(root = %w.path.display(), error = %e, "cannot watch inbox; polling it instead");
            }
            return None;
        }
        tracing::debug!(root = %w.path.display(), "watching with inotify");
        Some(watcher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_filesystems_are_polled() {
        assert_eq!(fs_kind_of_magic(0x6969), FsKind::Remote("NFS"));
        assert_eq!(fs_kind_of_magic(0xFF53_4D42), FsKind::Remote("CIFS"));
        assert_eq!(fs_kind_of_magic(0xFE53_4D42), FsKind::Remote("SMB2"));
        assert_eq!(fs_kind_of_magic(0x6573_5546), FsKind::Remote("FUSE"));
        assert_eq!(fs_kind_of_magic(0x0102_1997), FsKind::Remote("9p"));
        assert_eq!(fs_kind_of_magic(0xEF53), FsKind::Local); // ext4
        assert_eq!(fs_kind_of_magic(0x5846_5342), FsKind::Local); // xfs
    }
}
