//! The task that watches one root: picks notify or polling (`fsops::fstype`, the root's `mode`),
//! lists the backlog, then lists again on every poll or reconcile tick, on a forced rescan (a
//! hint was lost, see `hints.rs`) and when a new subfolder appears. Falls back to polling when
//! inotify cannot be started or hits its limits. The listing itself is `walk.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::Candidate;
use super::hints::{Hints, RootSignal, SYSCTL_ADVICE, is_watch_limit};
use super::walk::{Walked, WarnedFolders, walk_blocking};
use crate::config::{WatchConfig, WatchMode};
use crate::fsops::fstype::{FsKind, detect_fs};
use crate::root::Root;

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

/// How a root is watched now: the inotify watcher (none when polling), and whether it polls.
struct Watching {
    watcher: Option<RecommendedWatcher>,
    polling: bool,
}

/// A root's listing clocks: the poll and reconcile ticks (each first one interval after the
/// backlog was listed), and when a listing last started.
struct Ticks {
    poll: Interval,
    reconcile: Interval,
    last_walk: Instant,
}

impl Ticks {
    fn new(w: &WatchConfig, last_walk: Instant) -> Self {
        let every = |period: Duration| {
            let mut tick = tokio::time::interval_at(
                Instant::now() + period,
                period.max(Duration::from_millis(10)),
            );
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick
        };
        Ticks {
            poll: every(w.poll_interval),
            reconcile: every(w.reconcile_interval),
            last_walk,
        }
    }
}

/// Watches one root.
pub(super) struct RootTask {
    root: Arc<Root>,
    candidates_tx: mpsc::Sender<Candidate>,
    shutdown: CancellationToken,
    signal: Arc<RootSignal>,
    warned: WarnedFolders,
}

impl RootTask {
    pub(super) fn new(
        root: Arc<Root>,
        candidates_tx: mpsc::Sender<Candidate>,
        shutdown: CancellationToken,
    ) -> Self {
        RootTask {
            root,
            candidates_tx,
            shutdown,
            signal: Arc::new(RootSignal::default()),
            warned: WarnedFolders::default(),
        }
    }

    /// What makes this root list itself again soon (a lost hint, the journal taking writes
    /// again).
    pub(super) fn signal(&self) -> Arc<RootSignal> {
        Arc::clone(&self.signal)
    }

    fn config(&self) -> &WatchConfig {
        &self.root.config
    }

    pub(super) async fn run(mut self) {
        let (folders_tx, mut folders_rx) = mpsc::channel::<PathBuf>(FOLDERS_CAPACITY);
        let (watcher, polling) = self.start_watching(&folders_tx).await;
        let mut watching = Watching { watcher, polling };
        let path = self.config().path.clone();
        info!(
            root = %crate::fsops::shown(&path),
            mode = if polling { "poll" } else { "notify" },
            "watching inbox"
        );

        // The backlog: whatever is already there.
        let last_walk = Instant::now();
        if self.walk(path.clone()).await == Walked::Stopped {
            return;
        }
        let mut ticks = Ticks::new(self.config(), last_walk);

        let signal = self.signal.clone();
        let shutdown = self.shutdown.clone();
        let mut mounts = super::mounts::subscribe();
        // A stat may hang on a dead share: never in the way of shutdown.
        let mut identity = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            id = root_identity(&path) => id,
        };
        loop {
            let walked = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Ok(()) = mounts.changed() => {
                    let Some(walked) = self
                        .remounted(&mut identity, &mut watching, &mut ticks, &folders_tx)
                        .await
                    else {
                        continue;
                    };
                    walked
                }
                () = signal.wake.notified() => {
                    let Some(walked) = self.woken(&mut watching, &mut ticks).await else {
                        continue;
                    };
                    walked
                }
                Some(first) = folders_rx.recv() => self.new_folders(first, &mut folders_rx).await,
                _ = ticks.poll.tick(), if watching.polling => {
                    // Polled, each listing is the reconcile walk too.
                    debug!(root = %crate::fsops::shown(&path), "reconcile (polling)");
                    ticks.last_walk = Instant::now();
                    self.walk(path.clone()).await
                }
                _ = ticks.reconcile.tick(), if !watching.polling => {
                    debug!(root = %crate::fsops::shown(&path), "reconcile");
                    ticks.last_walk = Instant::now();
                    self.walk(path.clone()).await
                }
            };
            if walked == Walked::Stopped {
                break;
            }
        }
        drop(watching);
        drop(folders_tx);
    }

    /// The mount table changed: if the inbox's filesystem did (a share mounted over the inbox,
    /// or unmounted from under it), it is watched afresh, the way the filesystem now there
    /// needs, and listed. `None`: it did not, nothing to do.
    async fn remounted(
        &mut self,
        identity: &mut Option<(u64, u64)>,
        watching: &mut Watching,
        ticks: &mut Ticks,
        folders_tx: &mpsc::Sender<PathBuf>,
    ) -> Option<Walked> {
        let path = self.config().path.clone();
        let now = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return Some(Walked::Stopped),
            id = root_identity(&path) => id,
        };
        if now == *identity {
            return None;
        }
        *identity = now;
        // The old watcher goes first: its inotify watches count against the limit.
        drop(watching.watcher.take());
        (watching.watcher, watching.polling) = self.start_watching(folders_tx).await;
        info!(
            root = %crate::fsops::shown(&path),
            mode = if watching.polling { "poll" } else { "notify" },
            "the inbox's filesystem changed (mounted or unmounted): watching it again"
        );
        ticks.poll.reset();
        ticks.reconcile.reset();
        ticks.last_walk = Instant::now();
        Some(self.walk(path).await)
    }

    /// The root's signal was raised: falls back to polling if the watcher degraded, and lists
    /// the root if a rescan is asked (no sooner than `MIN_RESCAN_GAP` after the last listing).
    /// `None`: no rescan asked.
    async fn woken(&mut self, watching: &mut Watching, ticks: &mut Ticks) -> Option<Walked> {
        let path = self.config().path.clone();
        let signal = Arc::clone(&self.signal);
        if signal.degraded.swap(false, Ordering::AcqRel) && !watching.polling {
            // Dropping the watcher removes its inotify watches and ends its thread.
            watching.watcher = None;
            watching.polling = true;
            self.root.status.set_degraded(true);
            ticks.poll.reset();
            info!(root = %crate::fsops::shown(&path), mode = "poll", "watching inbox");
        }
        if !signal.rescan.load(Ordering::Acquire) {
            return None;
        }
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return Some(Walked::Stopped),
            () = tokio::time::sleep_until(ticks.last_walk + MIN_RESCAN_GAP) => {}
        }
        // Cleared before listing: a hint lost during the listing forces another.
        signal.rescan.store(false, Ordering::Release);
        debug!(root = %crate::fsops::shown(&path), "forced rescan");
        ticks.last_walk = Instant::now();
        ticks.reconcile.reset();
        Some(self.walk(path).await)
    }

    /// New subfolders: listed a little later (`FOLDER_LIST_DELAY`), each once however many
    /// hints named it meanwhile.
    async fn new_folders(
        &mut self,
        first: PathBuf,
        folders_rx: &mut mpsc::Receiver<PathBuf>,
    ) -> Walked {
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return Walked::Stopped,
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

    /// Starts watching the way the root's filesystem needs: (the inotify watcher, or `None`
    /// and whether it polls). Polling because inotify failed is recorded as degraded; polling by
    /// choice is not.
    async fn start_watching(
        &self,
        folders_tx: &mpsc::Sender<PathBuf>,
    ) -> (Option<RecommendedWatcher>, bool) {
        let chosen = self.choose_polling();
        let (mut watcher, mut degraded) = (None, false);
        if !chosen {
            match self.start_notify(folders_tx.clone()).await {
                Ok(w) => watcher = Some(w),
                Err(e) => {
                    self.log_notify_failure(&e);
                    degraded = true;
                }
            }
        }
        self.root.status.set_degraded(degraded);
        (watcher, chosen || degraded)
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
                    FsKind::Local => {}
                    FsKind::Network(fs) => {
                        info!(
                            root = %w.path.display(),
                            filesystem = fs,
                            "network filesystem: polling, because inotify gives no events for \
                             changes made by other hosts"
                        );
                    }
                    FsKind::Fuse => {
                        info!(
                            root = %w.path.display(),
                            filesystem = "fuse",
                            "FUSE filesystem: polling, because inotify events depend on the FUSE \
                             daemon and miss changes made elsewhere"
                        );
                    }
                    FsKind::Unknown => {
                        info!(
                            root = %w.path.display(),
                            "filesystem type unknown (statfs failed): polling, to be safe"
                        );
                    }
                }
                kind.needs_polling()
            }
        }
    }

    /// Starts inotify on the root, without its own folders beneath it
    /// ([`crate::scope::unwatched_dirs`]). Adding a recursive watch walks the tree, so it runs
    /// off the async threads.
    async fn start_notify(
        &self,
        folders_tx: mpsc::Sender<PathBuf>,
    ) -> notify::Result<RecommendedWatcher> {
        let hints = Hints {
            root: Arc::clone(&self.root),
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
        let unwatched = crate::scope::unwatched_dirs(self.config());
        let started = tokio::task::spawn_blocking(move || {
            let config = notify::Config::default().with_follow_symlinks(false);
            let mut watcher = RecommendedWatcher::new(move |res| hints.handle(res), config)?;
            watcher.watch(&path, mode)?;
            for dir in unwatched {
                // Not there (yet), or outside the inbox: nothing to drop. A folder made again
                // later is watched again (notify adds new folders): only its events cost.
                watcher.unwatch(&dir).ok();
            }
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

    /// Lists `start` on a thread of its own; the listing waits for room in the channel.
    ///
    /// Not on the runtime's blocking pool: that pool is bounded (`crate::runtime`), and a
    /// listing blocked on a full channel holds its thread until settle drains the channel,
    /// which settle does between stats that themselves need a pool thread. With as many
    /// listings as pool threads (one per watch at start-up, each with a backlog), every thread
    /// would wait for settle and settle for a thread.
    async fn walk(&mut self, start: PathBuf) -> Walked {
        if self.candidates_tx.is_closed() {
            return Walked::Stopped;
        }
        let root = Arc::clone(&self.root);
        let candidates_tx = self.candidates_tx.clone();
        let token = self.shutdown.clone();
        let mut warned = std::mem::take(&mut self.warned);
        let spawned = crate::runtime::on_own_thread("dropscan-walk", move || {
            let walked = walk_blocking(&root, &start, &candidates_tx, &token, &mut warned);
            (walked, warned)
        });
        let done_rx = match spawned {
            Ok(rx) => rx,
            Err(e) => {
                error!(root = %self.config().path.display(), error = %e, "cannot start a listing thread; listed again at the next reconcile");
                return Walked::Done;
            }
        };
        tokio::select! {
            biased;
            // A listing stuck on a dead network share must not hold up shutdown.
            () = self.shutdown.cancelled() => Walked::Stopped,
            joined = done_rx => match joined {
                Ok((walked, warned)) => {
                    self.warned = warned;
                    walked
                }
                // The thread ended without answering: it panicked.
                Err(_) => {
                    error!(root = %self.config().path.display(), "listing failed");
                    Walked::Done
                }
            }
        }
    }
}

/// The inbox's identity (device, inode, following a symlink the administrator configured):
/// it changes when a share is mounted over it or unmounted. `None` while it cannot be looked
/// at. Off the async threads: a stat may block on a dead share.
async fn root_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::metadata(&p).ok().map(|m| (m.dev(), m.ino())))
        .await
        .ok()
        .flatten()
}
