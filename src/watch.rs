//! Watch: turns filesystem activity in the inboxes into `Candidate` hints for settle.
//!
//! One task per `[[watch]]` root. A root is watched with inotify (through `notify`) when it is on
//! a local filesystem, and by listing it every `poll_interval` when it is on a network or FUSE
//! filesystem, where inotify never hears about changes made by other hosts. Either way the root is
//! also listed at start (the backlog), every `reconcile_interval`, and soon after a hint was lost:
//! the notify callback cannot wait, so when the channel is full or inotify's queue overflowed it
//! sets the root's rescan flag instead. The filesystem is the durable queue and the listing is the
//! source of truth; notify only makes us faster.
//!
//! This module does not decide whether a file is complete, and never opens or stats files for
//! that purpose: it only says "look at this path". Settle applies the filters and the completion
//! gates. The walk rules (no symlinks followed, never into the root's own folders or dot-folders,
//! no subfolders when not recursive) live here and are shared by every listing.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{Event, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{WatchConfig, WatchMode};

/// A hint that something at `path` may be new or changed (a file, or a folder to list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Index of the root in the watches slice.
    pub root: usize,
    /// Absolute path, below the root.
    pub path: PathBuf,
}

/// Capacity of the watch → settle channel. When full, the notify callback cannot wait: it drops
/// the event and sets the root's rescan flag, so the next reconcile (forced soon) lists the root
/// again. The listings themselves wait.
pub const CANDIDATES_CAPACITY: usize = 4096;

/// Capacity of the notify callback → folder lister channel (new subfolders to list). When full,
/// the callback sets the root's rescan flag, as for candidates.
const FOLDERS_CAPACITY: usize = 1024;

/// Delay before a new subfolder is listed. notify adds the inotify watch for a new subfolder only
/// after it has delivered the batch of events that announced it; listing a little later closes
/// the window in which a file could be created after our listing but before the watch.
const FOLDER_LIST_DELAY: Duration = Duration::from_millis(200);

/// Forced rescans of one root are at least this far apart, so that a flood of events during a
/// long listing cannot make the root be listed back to back forever.
const MIN_RESCAN_GAP: Duration = Duration::from_secs(1);

/// Folders deeper than this below the root are not descended into (bind-mount loops).
const MAX_DEPTH: usize = 256;

/// Unreadable folders remembered per root, so that each is logged once; then the memory restarts.
const MAX_WARNED_FOLDERS: usize = 1024;

/// Where to raise the inotify limits.
const SYSCTL_ADVICE: &str = "raise fs.inotify.max_user_watches and fs.inotify.max_user_instances \
     (install packaging/sysctl/60-dropscan.conf into /etc/sysctl.d and run `sysctl --system`)";

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

/// What kind of filesystem a root is on, as far as watching it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// A local filesystem (ext4, xfs, btrfs, tmpfs, overlay, …): inotify sees every change.
    Local,
    /// A network filesystem, by name: changes made by other hosts raise no inotify event.
    Network(&'static str),
    /// FUSE (sshfs, rclone, s3fs, glusterfs, virtiofs, …): events depend on the daemon behind it.
    Fuse,
    /// `statfs` failed, so the kind is not known.
    Unknown,
}

impl FsKind {
    /// True when inotify cannot be trusted there and the root must be polled.
    pub fn needs_polling(self) -> bool {
        !matches!(self, FsKind::Local)
    }
}

/// Network filesystems by `statfs` magic (linux/magic.h and the vendors' headers).
const NETWORK_MAGICS: &[(u32, &str)] = &[
    (0x6969, "nfs"),
    (0x517B, "smb"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x0102_1997, "9p"),
    (0x00C3_6400, "ceph"),
    (0x5346_414F, "afs"),
    (0x6B41_4653, "kafs"),
    (0x7375_7245, "coda"),
    (0x564C, "ncp"),
    (0x0116_1970, "gfs2"),
    (0x7461_636F, "ocfs2"),
    (0x0BD0_0BD0, "lustre"),
    (0x4750_4653, "gpfs"),
    (0xAAD7_AAEA, "panfs"),
    (0x2003_0528, "orangefs"),
    (0x1983_0326, "beegfs"),
    (0x786F_4256, "vboxsf"),
    (0xBACB_ACBC, "vmhgfs"),
];

/// FUSE's `statfs` magic.
const FUSE_MAGIC: u32 = 0x6573_5546;

/// Maps a `statfs` `f_type` to a kind.
fn fs_kind_from_magic(magic: u32) -> FsKind {
    if magic == FUSE_MAGIC {
        return FsKind::Fuse;
    }
    NETWORK_MAGICS
        .iter()
        .find(|(m, _)| *m == magic)
        .map_or(FsKind::Local, |(_, name)| FsKind::Network(name))
}

/// The kind of filesystem `path` is on, by `statfs` magic.
pub fn detect_fs(path: &Path) -> FsKind {
    match rustix::fs::statfs(path) {
        // `f_type` is a signed long on most targets; the magic is its low 32 bits.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::unnecessary_cast
        )]
        Ok(st) => fs_kind_from_magic(st.f_type as u32),
        Err(e) => {
            debug!(path = %crate::fsops::shown(path), error = %e, "statfs failed");
            FsKind::Unknown
        }
    }
}

/// True for names that are never files to scan: dotfiles (which covers `.~lock.*` and
/// `.syncthing.*`), Office owner files `~$*`, `~syncthing~*`, and the partial-download suffixes
/// `.part`, `.partial`, `.crdownload`, `.filepart` and `.tmp` (suffixes in any letter case).
pub fn is_ignored_name(file_name: &OsStr) -> bool {
    const SUFFIXES: [&[u8]; 5] = [b".part", b".partial", b".crdownload", b".filepart", b".tmp"];
    let name = file_name.as_encoded_bytes();
    if name.is_empty()
        || name.starts_with(b".")
        || name.starts_with(b"~$")
        || name.starts_with(b"~syncthing~")
    {
        return true;
    }
    SUFFIXES
        .iter()
        .any(|s| name.len() > s.len() && name[name.len() - s.len()..].eq_ignore_ascii_case(s))
}

/// True when `path` is somewhere the watcher never looks for `w`: outside the root, inside one of
/// its own folders (`WatchConfig::own_dirs`) or a dot-folder, or in a subfolder when the root is
/// not recursive. The last component is not judged by name (see `is_ignored_name`), only its
/// parents are; a path equal to an own folder is out of scope.
pub fn is_out_of_scope(w: &WatchConfig, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(&w.path) else {
        return true;
    };
    if w.own_dirs().iter().any(|d| path.starts_with(d)) {
        return true;
    }
    let mut parents = 0usize;
    let mut components = rel.components().peekable();
    while let Some(c) = components.next() {
        let Component::Normal(name) = c else {
            // `..` or `.` in a hint: refuse rather than reason about it.
            return true;
        };
        if components.peek().is_some() {
            parents += 1;
            if name.as_encoded_bytes().starts_with(b".") {
                return true;
            }
        }
    }
    !w.recursive && parents > 0
}

/// Watches every root until `shutdown`; see the module docs. Fails only at start, when a root is
/// missing or not a folder.
pub async fn run(
    watches: Arc<[WatchConfig]>,
    candidates_tx: mpsc::Sender<Candidate>,
    shutdown: CancellationToken,
) -> Result<(), WatchError> {
    for w in watches.iter() {
        check_root(&w.path)?;
    }
    let mut roots = JoinSet::new();
    let mut root_of = HashMap::new();
    for root in 0..watches.len() {
        let task = RootTask::new(
            root,
            watches.clone(),
            candidates_tx.clone(),
            shutdown.clone(),
        );
        root_of.insert(roots.spawn(task.run()).id(), root);
    }
    drop(candidates_tx);
    let mut result = Ok(());
    while let Some(joined) = roots.join_next().await {
        let Err(e) = joined else { continue };
        let path = root_of
            .get(&e.id())
            .map_or_else(PathBuf::new, |&root| watches[root].path.clone());
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

/// What the notify callback tells the root task.
#[derive(Debug, Default)]
struct RootSignal {
    /// A hint was lost: list the whole root soon.
    rescan: AtomicBool,
    /// inotify hit a limit: drop it and poll.
    degraded: AtomicBool,
    /// Wakes the root task after either flag was set.
    wake: Notify,
}

impl RootSignal {
    fn request_rescan(&self) {
        self.rescan.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn request_polling(&self) {
        self.degraded.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// The notify callback's state (runs on notify's thread, must never wait).
struct Hints {
    root: usize,
    watches: Arc<[WatchConfig]>,
    candidates_tx: mpsc::Sender<Candidate>,
    folders_tx: mpsc::Sender<PathBuf>,
    signal: Arc<RootSignal>,
}

impl Hints {
    fn handle(&self, res: notify::Result<Event>) {
        let w = &self.watches[self.root];
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
            root: self.root,
            path,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.candidates_tx.try_send(candidate) {
            self.signal.request_rescan();
        }
    }
}

fn is_watch_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => {
            matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EMFILE))
        }
        _ => false,
    }
}

/// Unreadable folders already logged for one root.
#[derive(Debug, Default)]
struct WarnedFolders(HashSet<PathBuf>);

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
enum Walked {
    /// Every folder in reach was listed (unreadable ones logged).
    Done,
    /// Shutdown, or settle is gone.
    Stopped,
}

/// Lists `start` (a folder of root `root`) and what is below it by the walk rules, sending a
/// Candidate for every entry that is not a folder and not ignored by name. Blocking: run it in
/// `spawn_blocking`.
fn walk_blocking(
    root: usize,
    w: &WatchConfig,
    start: &Path,
    candidates_tx: &mpsc::Sender<Candidate>,
    shutdown: &CancellationToken,
    warned: &mut WarnedFolders,
) -> Walked {
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
            root.open_dir(rel)?.entry_types()
        });
        let entries = match listed {
            Ok(entries) => {
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
                .blocking_send(Candidate { root, path })
                .is_err()
            {
                return Walked::Stopped;
            }
        }
    }
    Walked::Done
}

/// Watches one root.
struct RootTask {
    root: usize,
    watches: Arc<[WatchConfig]>,
    candidates_tx: mpsc::Sender<Candidate>,
    shutdown: CancellationToken,
    signal: Arc<RootSignal>,
    warned: WarnedFolders,
}

impl RootTask {
    fn new(
        root: usize,
        watches: Arc<[WatchConfig]>,
        candidates_tx: mpsc::Sender<Candidate>,
        shutdown: CancellationToken,
    ) -> Self {
        RootTask {
            root,
            watches,
            candidates_tx,
            shutdown,
            signal: Arc::new(RootSignal::default()),
            warned: WarnedFolders::default(),
        }
    }

    fn config(&self) -> &WatchConfig {
        &self.watches[self.root]
    }

    async fn run(mut self) {
        let (folders_tx, mut folders_rx) = mpsc::channel::<PathBuf>(FOLDERS_CAPACITY);
        let mut watcher = None;
        let mut polling = self.choose_polling();
        if !polling {
            match self.start_notify(folders_tx.clone()).await {
                Ok(w) => watcher = Some(w),
                Err(e) => {
                    self.log_notify_failure(&e);
                    polling = true;
                }
            }
        }
        let (path, poll_interval, reconcile_interval) = {
            let w = self.config();
            (w.path.clone(), w.poll_interval, w.reconcile_interval)
        };
        info!(
            root = %crate::fsops::shown(&path),
            mode = if polling { "poll" } else { "notify" },
            "watching inbox"
        );

        // The backlog: whatever is already there.
        let mut last_walk = Instant::now();
        if self.walk(path.clone()).await == Walked::Stopped {
            return;
        }

        let mut reconcile_tick = tokio::time::interval_at(
            Instant::now() + reconcile_interval,
            reconcile_interval.max(Duration::from_millis(10)),
        );
        reconcile_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut poll_tick = tokio::time::interval_at(
            Instant::now() + poll_interval,
            poll_interval.max(Duration::from_millis(10)),
        );
        poll_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

        let signal = self.signal.clone();
        let shutdown = self.shutdown.clone();
        loop {
            let walked = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = signal.wake.notified() => {
                    if signal.degraded.swap(false, Ordering::AcqRel) && !polling {
                        // Dropping the watcher removes its inotify watches and ends its thread.
                        watcher = None;
                        polling = true;
                        poll_tick.reset();
                        info!(root = %crate::fsops::shown(&path), mode = "poll", "watching inbox");
                    }
                    if !signal.rescan.load(Ordering::Acquire) {
                        continue;
                    }
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep_until(last_walk + MIN_RESCAN_GAP) => {}
                    }
                    // Cleared before listing: a hint lost during the listing forces another.
                    signal.rescan.store(false, Ordering::Release);
                    debug!(root = %crate::fsops::shown(&path), "forced rescan");
                    last_walk = Instant::now();
                    reconcile_tick.reset();
                    self.walk(path.clone()).await
                }
                Some(first) = folders_rx.recv() => {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(FOLDER_LIST_DELAY) => {}
                    }
                    let mut folders = vec![first];
                    while let Ok(more) = folders_rx.try_recv() {
                        folders.push(more);
                    }
                    folders.sort();
                    folders.dedup();
                    let mut walked = Walked::Done;
                    for folder in folders {
                        walked = self.walk(folder).await;
                        if walked == Walked::Stopped {
                            break;
                        }
                    }
                    walked
                }
                _ = poll_tick.tick(), if polling => {
                    last_walk = Instant::now();
                    self.walk(path.clone()).await
                }
                _ = reconcile_tick.tick(), if !polling => {
                    debug!(root = %crate::fsops::shown(&path), "reconcile");
                    last_walk = Instant::now();
                    self.walk(path.clone()).await
                }
            };
            if walked == Walked::Stopped {
                break;
            }
        }
        drop(watcher);
        drop(folders_tx);
    }

    /// Auto mode: poll on network and FUSE filesystems.
    fn choose_polling(&self) -> bool {
        let w = self.config();
        match w.mode {
            WatchMode::Poll => true,
            WatchMode::Notify => false,
            WatchMode::Auto => {
                let kind = detect_fs(&w.path);
                match kind {
                    FsKind::Local => false,
                    FsKind::Network(fs) => {
                        info!(
                            root = %w.path.display(),
                            filesystem = fs,
                            "network filesystem: polling, because inotify gives no events for \
                             changes made by other hosts"
                        );
                        true
                    }
                    FsKind::Fuse => {
                        info!(
                            root = %w.path.display(),
                            filesystem = "fuse",
                            "FUSE filesystem: polling, because inotify events depend on the FUSE \
                             daemon and miss changes made elsewhere"
                        );
                        true
                    }
                    FsKind::Unknown => {
                        info!(
                            root = %w.path.display(),
                            "filesystem type unknown (statfs failed): polling, to be safe"
                        );
                        true
                    }
                }
            }
        }
    }

    /// Starts inotify on the root. Adding a recursive watch walks the tree, so it runs off the
    /// async threads.
    async fn start_notify(
        &self,
        folders_tx: mpsc::Sender<PathBuf>,
    ) -> notify::Result<RecommendedWatcher> {
        let hints = Hints {
            root: self.root,
            watches: self.watches.clone(),
            candidates_tx: self.candidates_tx.clone(),
            folders_tx,
            signal: self.signal.clone(),
        };
        let path = self.config().path.clone();
        let mode = if self.config().recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        let started = tokio::task::spawn_blocking(move || {
            let config = notify::Config::default().with_follow_symlinks(false);
            let mut watcher = RecommendedWatcher::new(move |res| hints.handle(res), config)?;
            watcher.watch(&path, mode)?;
            Ok(watcher)
        })
        .await;
        match started {
            Ok(result) => result,
            Err(e) => Err(notify::Error::generic(&e.to_string())),
        }
    }

    fn log_notify_failure(&self, e: &notify::Error) {
        let root = self.config().path.display();
        if is_watch_limit(e) {
            error!(
                root = %root,
                error = %e,
                advice = SYSCTL_ADVICE,
                "cannot watch the inbox with inotify: the limit fs.inotify.max_user_watches \
                 (or max_user_instances) is reached; falling back to polling"
            );
        } else {
            error!(
                root = %root,
                error = %e,
                "cannot watch the inbox with inotify; falling back to polling"
            );
        }
    }

    /// Lists `start` in a blocking task; the listing waits for room in the channel.
    async fn walk(&mut self, start: PathBuf) -> Walked {
        if self.candidates_tx.is_closed() {
            return Walked::Stopped;
        }
        let root = self.root;
        let watches = self.watches.clone();
        let candidates_tx = self.candidates_tx.clone();
        let token = self.shutdown.clone();
        let mut warned = std::mem::take(&mut self.warned);
        let listing = tokio::task::spawn_blocking(move || {
            let walked = walk_blocking(
                root,
                &watches[root],
                &start,
                &candidates_tx,
                &token,
                &mut warned,
            );
            (walked, warned)
        });
        tokio::select! {
            biased;
            // A listing stuck on a dead network share must not hold up shutdown.
            () = self.shutdown.cancelled() => Walked::Stopped,
            joined = listing => match joined {
                Ok((walked, warned)) => {
                    self.warned = warned;
                    walked
                }
                Err(e) => {
                    error!(root = %self.config().path.display(), error = %e, "listing failed");
                    Walked::Done
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(recursive: bool) -> WatchConfig {
        WatchConfig {
            path: PathBuf::from("/in"),
            recursive,
            settle: Duration::from_secs(1),
            mode: WatchMode::Auto,
            include: vec![crate::config::Pattern::new("*").unwrap()],
            exclude: vec![],
            clean_dir: PathBuf::from("/in/out/clean"),
            quarantine_dir: PathBuf::from("/in/quarantine"),
            failed_dir: PathBuf::from("/failed"),
            staging_dir: PathBuf::from("/in/.dropscan/default"),
            reconcile_interval: Duration::from_secs(60),
            poll_interval: Duration::from_secs(2),
        }
    }

    #[test]
    fn ignored_names() {
        for name in [
            "a.part",
            "a.PART",
            "a.partial",
            "video.mp4.crdownload",
            "a.filepart",
            "x.tmp",
            "~$report.docx",
            ".~lock.report.odt#",
            ".syncthing.a.bin.tmp",
            "~syncthing~a.bin.tmp",
            ".hidden",
            ".",
            "",
        ] {
            assert!(is_ignored_name(OsStr::new(name)), "{name}");
        }
        for name in [
            "a.bin",
            "part",
            ".tmp.pdf",
            "tmp",
            "a.tmp.pdf",
            "report~$.docx",
            "年報.pdf",
        ] {
            let ignored = is_ignored_name(OsStr::new(name));
            assert_eq!(ignored, name.starts_with('.'), "{name}");
        }
    }

    #[test]
    fn ignored_names_non_utf8() {
        use std::os::unix::ffi::OsStrExt;
        assert!(!is_ignored_name(OsStr::from_bytes(b"\xff\xfe.bin")));
        assert!(is_ignored_name(OsStr::from_bytes(b"\xff\xfe.part")));
        assert!(is_ignored_name(OsStr::from_bytes(b".\xff")));
    }

    #[test]
    fn scope_excludes_own_and_dot_folders() {
        let w = config(true);
        assert!(!is_out_of_scope(&w, Path::new("/in/a.bin")));
        assert!(!is_out_of_scope(&w, Path::new("/in/sub/deep/a.bin")));
        assert!(!is_out_of_scope(&w, Path::new("/in/out/a.bin")));
        assert!(!is_out_of_scope(&w, Path::new("/in/out/cleaner/a.bin")));
        assert!(is_out_of_scope(&w, Path::new("/in/out/clean")));
        assert!(is_out_of_scope(&w, Path::new("/in/out/clean/a.bin")));
        assert!(is_out_of_scope(&w, Path::new("/in/quarantine/x/a.bin")));
        assert!(is_out_of_scope(
            &w,
            Path::new("/in/.dropscan/default/a.bin")
        ));
        assert!(is_out_of_scope(&w, Path::new("/in/sub/.git/a.bin")));
        assert!(is_out_of_scope(&w, Path::new("/elsewhere/a.bin")));
        assert!(is_out_of_scope(&w, Path::new("/in/../etc/passwd")));
        // The name itself is judged by is_ignored_name, not here.
        assert!(!is_out_of_scope(&w, Path::new("/in/.hidden")));
    }

    #[test]
    fn scope_non_recursive_is_flat() {
        let w = config(false);
        assert!(!is_out_of_scope(&w, Path::new("/in/a.bin")));
        assert!(!is_out_of_scope(&w, Path::new("/in/sub")));
        assert!(is_out_of_scope(&w, Path::new("/in/sub/a.bin")));
    }

    #[test]
    fn fs_magic_mapping() {
        assert_eq!(fs_kind_from_magic(0x6969), FsKind::Network("nfs"));
        assert_eq!(fs_kind_from_magic(0x517B), FsKind::Network("smb"));
        assert_eq!(fs_kind_from_magic(0xFF53_4D42), FsKind::Network("cifs"));
        assert_eq!(fs_kind_from_magic(0xFE53_4D42), FsKind::Network("smb2"));
        assert_eq!(fs_kind_from_magic(0x0102_1997), FsKind::Network("9p"));
        assert_eq!(fs_kind_from_magic(0x00C3_6400), FsKind::Network("ceph"));
        assert_eq!(fs_kind_from_magic(0x5346_414F), FsKind::Network("afs"));
        assert_eq!(fs_kind_from_magic(0x7375_7245), FsKind::Network("coda"));
        assert_eq!(fs_kind_from_magic(0x564C), FsKind::Network("ncp"));
        assert_eq!(fs_kind_from_magic(0x6573_5546), FsKind::Fuse);
        // ext4, xfs, btrfs, tmpfs, overlayfs
        for local in [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994, 0x794C_7630] {
            assert_eq!(fs_kind_from_magic(local), FsKind::Local, "{local:#x}");
        }
        assert!(FsKind::Network("nfs").needs_polling());
        assert!(FsKind::Fuse.needs_polling());
        assert!(FsKind::Unknown.needs_polling());
        assert!(!FsKind::Local.needs_polling());
    }

    #[test]
    fn negative_f_type_maps_by_low_bits() {
        // On targets where f_type is a 32-bit signed long, CIFS's magic is negative.
        let as_i32 = 0xFF53_4D42_u32.cast_signed();
        assert_eq!(
            fs_kind_from_magic(as_i32.cast_unsigned()),
            FsKind::Network("cifs")
        );
    }

    #[test]
    fn detect_fs_on_a_missing_path_is_unknown() {
        assert_eq!(
            detect_fs(Path::new("/nonexistent/dropscan/x")),
            FsKind::Unknown
        );
    }

    fn hints(
        w: WatchConfig,
        capacity: usize,
    ) -> (Hints, mpsc::Receiver<Candidate>, mpsc::Receiver<PathBuf>) {
        let (candidates_tx, candidates_rx) = mpsc::channel(capacity);
        let (folders_tx, folders_rx) = mpsc::channel(capacity);
        let hints = Hints {
            root: 0,
            watches: Arc::from(vec![w]),
            candidates_tx,
            folders_tx,
            signal: Arc::new(RootSignal::default()),
        };
        (hints, candidates_rx, folders_rx)
    }

    fn event(kind: EventKind, path: &str) -> notify::Result<Event> {
        Ok(Event::new(kind).add_path(PathBuf::from(path)))
    }

    #[test]
    fn callback_forwards_files_and_folders() {
        let (h, mut candidates_rx, mut folders_rx) = hints(config(true), 8);
        h.handle(event(EventKind::Create(CreateKind::File), "/in/a.bin"));
        h.handle(event(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            "/in/b.bin",
        ));
        h.handle(event(EventKind::Create(CreateKind::Folder), "/in/Übergabe"));
        // Ignored: temp names, own and dot folders, writes, removals.
        h.handle(event(EventKind::Create(CreateKind::File), "/in/a.part"));
        h.handle(event(
            EventKind::Create(CreateKind::File),
            "/in/quarantine/q.bin",
        ));
        h.handle(event(
            EventKind::Create(CreateKind::Folder),
            "/in/.dropscan/default/x",
        ));
        h.handle(event(EventKind::Create(CreateKind::Folder), "/in/.cache"));
        h.handle(event(
            EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any)),
            "/in/c.bin",
        ));
        h.handle(event(
            EventKind::Remove(notify::event::RemoveKind::File),
            "/in/d.bin",
        ));
        let mut got = Vec::new();
        while let Ok(c) = candidates_rx.try_recv() {
            got.push(c.path);
        }
        assert_eq!(
            got,
            vec![PathBuf::from("/in/a.bin"), PathBuf::from("/in/b.bin")]
        );
        assert_eq!(
            folders_rx.try_recv().unwrap(),
            PathBuf::from("/in/Übergabe")
        );
        assert!(folders_rx.try_recv().is_err());
        assert!(!h.signal.rescan.load(Ordering::Acquire));
    }

    #[test]
    fn callback_full_channel_forces_rescan() {
        let (h, _candidates_rx, _folders_rx) = hints(config(true), 1);
        h.handle(event(EventKind::Create(CreateKind::File), "/in/a.bin"));
        assert!(!h.signal.rescan.load(Ordering::Acquire));
        h.handle(event(EventKind::Create(CreateKind::File), "/in/b.bin"));
        assert!(h.signal.rescan.load(Ordering::Acquire));
    }

    #[test]
    fn callback_overflow_flag_forces_rescan() {
        let (h, _candidates_rx, _folders_rx) = hints(config(true), 8);
        h.handle(Ok(
            Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan)
        ));
        assert!(h.signal.rescan.load(Ordering::Acquire));
        assert!(!h.signal.degraded.load(Ordering::Acquire));
    }

    #[test]
    fn callback_watch_limit_switches_to_polling() {
        let (h, _candidates_rx, _folders_rx) = hints(config(true), 8);
        h.handle(Err(notify::Error::new(notify::ErrorKind::MaxFilesWatch)));
        assert!(h.signal.degraded.load(Ordering::Acquire));
        assert!(h.signal.rescan.load(Ordering::Acquire));
        assert!(is_watch_limit(&notify::Error::io(
            io::Error::from_raw_os_error(libc::ENOSPC)
        )));
        assert!(!is_watch_limit(&notify::Error::path_not_found()));
    }

    #[test]
    fn callback_root_removed_switches_to_polling() {
        let (h, _candidates_rx, _folders_rx) = hints(config(true), 8);
        h.handle(event(
            EventKind::Remove(notify::event::RemoveKind::File),
            "/in/a.bin",
        ));
        assert!(!h.signal.degraded.load(Ordering::Acquire));
        h.handle(event(
            EventKind::Remove(notify::event::RemoveKind::Folder),
            "/in",
        ));
        assert!(h.signal.degraded.load(Ordering::Acquire));
    }

    #[test]
    fn walk_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let mut w = config(true);
        w.path = root.clone();
        w.clean_dir = root.join("out/clean");
        w.quarantine_dir = root.join("quarantine");
        w.failed_dir = root.join("failed");
        w.staging_dir = root.join(".dropscan/default");
        for dir in [
            "out/clean",
            "quarantine",
            "failed",
            ".dropscan/default",
            ".git",
            "a/b/c",
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for file in [
            "top.bin",
            "x.part",
            "out/clean/no.bin",
            "out/yes.bin",
            "quarantine/no.bin",
            "failed/no.bin",
            ".dropscan/default/no.bin",
            ".git/no.bin",
            "a/b/c/deep.bin",
        ] {
            std::fs::write(root.join(file), b"x").unwrap();
        }
        std::os::unix::fs::symlink(root.join("a"), root.join("link")).unwrap();

        let listed = |w: &WatchConfig, start: &Path| {
            let (tx, mut rx) = mpsc::channel(100);
            let walked = walk_blocking(
                0,
                w,
                start,
                &tx,
                &CancellationToken::new(),
                &mut WarnedFolders::default(),
            );
            assert_eq!(walked, Walked::Done);
            let mut rels = Vec::new();
            while let Ok(c) = rx.try_recv() {
                rels.push(c.path.strip_prefix(&w.path).unwrap().to_path_buf());
            }
            rels.sort();
            rels
        };
        let rels = listed(&w, &root);
        let expected: Vec<PathBuf> = ["a/b/c/deep.bin", "link", "out/yes.bin", "top.bin"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(rels, expected);
        assert_eq!(
            listed(&w, &root.join("a")),
            vec![PathBuf::from("a/b/c/deep.bin")]
        );
        assert!(listed(&w, &root.join("out/clean")).is_empty());

        w.recursive = false;
        let rels = listed(&w, &root);
        assert_eq!(rels, vec![PathBuf::from("link"), PathBuf::from("top.bin")]);
    }
}
