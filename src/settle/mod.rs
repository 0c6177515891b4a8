//! Settle: decides when a dropped file is completely written, and hands it on as `Settled`.
//!
//! Settle owns the filters (built-in temporary names, the root's `include` / `exclude` globs, own
//! folders and dot-folders) and the completion gate: a file is complete when its size, mtime,
//! ctime, device and inode have not changed for the root's `settle` time. ctime is in the gate
//! because `cp -p` and many sync tools put an old mtime back after writing; nobody can set ctime.
//! Every pending path is re-stated on a tick (a quarter of the shortest `settle`, 50 ms to 1 s),
//! off the async threads, since a stat on a network share may block.
//!
//! Settle never opens a file (so a FIFO cannot hang it), never moves one (that is claim), and does
//! not list folders (that is watch: a candidate that turns out to be a folder is dropped). When
//! claim is slow, `settled_tx.send` waits, and the files simply stay in the inbox.
//!
//! Departure from the house shape (on purpose): `run` takes the roots' configuration and its
//! channels rather than the agent's `Shared` context, and reports its own error type. This stage
//! needs nothing else (no journal, no client), and its tests drive it without an agent.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::WatchConfig;
pub use crate::pipeline::{Candidate, Settled};
pub(crate) use crate::scope::admit;

#[cfg(test)]
mod tests;

/// Capacity of settle → claim. Full: settle waits (files stay in the inbox, which is the durable
/// queue).
pub const SETTLED_CAPACITY: usize = 256;

/// Bounds of the re-stat tick.
const MIN_TICK: Duration = Duration::from_millis(50);
const MAX_TICK: Duration = Duration::from_secs(1);

/// Paths remembered as already warned about (not regular files, unreadable); then the memory
/// restarts, so a folder full of FIFOs costs one line per FIFO per this many.
const MAX_WARNED_PATHS: usize = 4096;

/// What a stat says about a file, as far as completion is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Size in bytes.
    pub size: u64,
    /// mtime in nanoseconds.
    pub mtime_ns: i128,
    /// ctime in nanoseconds.
    pub ctime_ns: i128,
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
}

impl Snapshot {
    /// Takes the fields from `symlink_metadata`.
    pub(crate) fn from_metadata(meta: &std::fs::Metadata) -> Self {
        Snapshot {
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// The outcome of one observation of a pending file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Changed recently, or not quiet for long enough yet.
    Wait,
    /// Unchanged for at least the settle time.
    Ready,
}

/// A file being watched for quiet.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// Index of the root.
    pub root: usize,
    /// Path relative to the root.
    pub rel_path: PathBuf,
    /// The last snapshot seen.
    pub snapshot: Snapshot,
    /// When the last change was seen (or the file first seen).
    pub stable_since: Instant,
    /// The root's settle time.
    pub settle: Duration,
}

impl Pending {
    /// Starts watching a file first seen at `now` with `snapshot`.
    pub(crate) fn new(
        root: usize,
        rel_path: PathBuf,
        snapshot: Snapshot,
        now: Instant,
        settle: Duration,
    ) -> Self {
        Pending {
            root,
            rel_path,
            snapshot,
            stable_since: now,
            settle,
        }
    }

    /// Records a new observation: any change restarts the quiet period.
    pub(crate) fn observe(&mut self, snapshot: Snapshot, now: Instant) -> Decision {
        if snapshot != self.snapshot {
            self.snapshot = snapshot;
            self.stable_since = now;
            return Decision::Wait;
        }
        if now.saturating_duration_since(self.stable_since) >= self.settle {
            Decision::Ready
        } else {
            Decision::Wait
        }
    }
}

/// The re-stat period for these roots.
fn tick_period(watches: &[WatchConfig]) -> Duration {
    watches
        .iter()
        .map(|w| w.settle / 4)
        .min()
        .unwrap_or(MAX_TICK)
        .clamp(MIN_TICK, MAX_TICK)
}

/// Settles candidates until `shutdown` or until the watcher is gone.
pub async fn run(
    watches: Arc<[WatchConfig]>,
    mut candidates_rx: mpsc::Receiver<Candidate>,
    settled_tx: mpsc::Sender<Settled>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(tick_period(&watches));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut settler = Settler::new(watches);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            // Before candidates: a steady flood of hints must not starve the re-stats.
            _ = tick.tick() => {
                if settler.step(&settled_tx, &shutdown).await.is_break() {
                    break;
                }
            }
            candidate = candidates_rx.recv() => match candidate {
                Some(candidate) => settler.offer(candidate),
                None => break,
            },
        }
    }
}

/// A file stat result, for one tick.
type Observation = (PathBuf, io::Result<std::fs::Metadata>);

/// Folders opened beneath their roots during one stat pass, so that a thousand pending files
/// in one folder cost one resolution, not a thousand.
type OpenFolders = HashMap<(PathBuf, PathBuf), Result<crate::fsops::Dir, (io::ErrorKind, String)>>;

/// `lstat` of `rel` beneath the inbox `root`: every folder on the way is resolved beneath the
/// root without following a symlink (a folder swapped for a link is an error, never followed),
/// then the last name is looked up in that folder through its descriptor.
fn stat_beneath(
    folders: &mut OpenFolders,
    root: &Path,
    rel: &Path,
) -> io::Result<std::fs::Metadata> {
    use std::os::fd::AsRawFd;
    let refused = |e: crate::fsops::FsError| match e {
        crate::fsops::FsError::Vanished { .. } => (io::ErrorKind::NotFound, e.to_string()),
        e => (io::ErrorKind::Other, e.to_string()),
    };
    let (parent, name) = crate::fsops::split_rel(rel).map_err(|e| {
        let (kind, text) = refused(e);
        io::Error::new(kind, text)
    })?;
    let dir = folders
        .entry((root.to_path_buf(), parent.to_path_buf()))
        .or_insert_with(|| {
            crate::fsops::Dir::open_trusted(root)
                .and_then(|d| d.open_dir(parent))
                .map_err(refused)
        })
        .as_ref()
        .map_err(|(kind, text)| io::Error::new(*kind, text.clone()))?;
    let mut via = PathBuf::from(format!("/proc/self/fd/{}", dir.fd().as_raw_fd()));
    via.push(name);
    match std::fs::symlink_metadata(&via) {
        // No /proc here (a minimal container): the folders were checked just now; the claim
        // checks again beneath the root before it moves anything.
        Err(e) if e.kind() == io::ErrorKind::NotFound && !Path::new("/proc/self/fd").exists() => {
            std::fs::symlink_metadata(root.join(rel))
        }
        other => other,
    }
}

/// The state of settle.
struct Settler {
    watches: Arc<[WatchConfig]>,
    /// Files seen at least once, waiting for quiet.
    pending: HashMap<PathBuf, Pending>,
    /// Admitted candidates not yet stat'ed (root, relative path).
    fresh: HashMap<PathBuf, (usize, PathBuf)>,
    /// Files handed to claim, with the snapshot they had, until the root's reconcile interval
    /// passes: listings would otherwise settle a file again while it waits in claim's queue.
    sent: HashMap<PathBuf, (Snapshot, Instant)>,
    /// Paths already warned about.
    warned: HashSet<PathBuf>,
}

impl Settler {
    fn new(watches: Arc<[WatchConfig]>) -> Self {
        Settler {
            watches,
            pending: HashMap::new(),
            fresh: HashMap::new(),
            sent: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// Takes a hint in; it is stat'ed on the next tick.
    fn offer(&mut self, candidate: Candidate) {
        if self.pending.contains_key(&candidate.path) || self.fresh.contains_key(&candidate.path) {
            return;
        }
        let Some(w) = self.watches.get(candidate.root) else {
            return;
        };
        if let Some(rel) = admit(w, &candidate.path) {
            self.fresh.insert(candidate.path, (candidate.root, rel));
        }
    }

    /// Re-stats every pending and fresh path, then sends the ones that are ready.
    async fn step(
        &mut self,
        settled_tx: &mpsc::Sender<Settled>,
        shutdown: &CancellationToken,
    ) -> std::ops::ControlFlow<()> {
        use std::ops::ControlFlow::{Break, Continue};
        self.forget_old_sends();
        if self.pending.is_empty() && self.fresh.is_empty() {
            return Continue(());
        }
        let watches = &self.watches;
        let root_of = |root: usize| watches.get(root).map(|w| w.path.clone());
        let paths: Vec<(PathBuf, Option<PathBuf>, PathBuf)> = self
            .pending
            .iter()
            .map(|(p, pe)| (p.clone(), root_of(pe.root), pe.rel_path.clone()))
            .chain(
                self.fresh
                    .iter()
                    .map(|(p, (root, rel))| (p.clone(), root_of(*root), rel.clone())),
            )
            .collect();
        let stat = tokio::task::spawn_blocking(move || {
            let mut folders = OpenFolders::new();
            paths
                .into_iter()
                .map(|(p, root, rel)| {
                    let meta = match root {
                        Some(root) => stat_beneath(&mut folders, &root, &rel),
                        None => Err(io::Error::from(io::ErrorKind::NotFound)),
                    };
                    (p, meta)
                })
                .collect::<Vec<Observation>>()
        });
        let observations = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Break(()),
            joined = stat => match joined {
                Ok(observations) => observations,
                Err(e) => {
                    warn!(error = %e, "stat task failed");
                    return Continue(());
                }
            },
        };
        let now = Instant::now();
        let mut ready = Vec::new();
        for (path, meta) in observations {
            if let Some(settled) = self.observe(path, meta, now) {
                ready.push(settled);
            }
        }
        for settled in ready {
            let sent = self.watches.get(settled.root).map(|w| {
                (
                    settled.path.clone(),
                    Snapshot {
                        size: settled.size,
                        mtime_ns: settled.mtime_ns,
                        ctime_ns: settled.ctime_ns,
                        dev: settled.dev,
                        ino: settled.ino,
                    },
                    now + w.reconcile_interval.max(w.settle),
                )
            });
            debug!(path = %crate::fsops::shown(&settled.path), size = settled.size, "settled");
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Break(()),
                res = settled_tx.send(settled) => if res.is_err() {
                    return Break(());
                },
            }
            if let Some((path, snapshot, until)) = sent {
                self.sent.insert(path, (snapshot, until));
            }
        }
        Continue(())
    }

    /// Applies one stat result; returns the file when it is ready to go.
    fn observe(
        &mut self,
        path: PathBuf,
        meta: io::Result<std::fs::Metadata>,
        now: Instant,
    ) -> Option<Settled> {
        let meta = match meta {
            Ok(meta) => meta,
            Err(e) => {
                self.forget(&path);
                if e.kind() != io::ErrorKind::NotFound && self.first_warning(&path) {
                    warn!(path = %crate::fsops::shown(&path), error = %e, "cannot stat file; skipping it until it is seen again");
                }
                return None;
            }
        };
        let file_type = meta.file_type();
        if !file_type.is_file() {
            self.forget(&path);
            if !file_type.is_dir() && self.first_warning(&path) {
                warn!(
                    path = %crate::fsops::shown(&path),
                    kind = crate::fsops::kind_of(file_type),
                    "not a regular file; skipped and never opened"
                );
            }
            return None;
        }
        let snapshot = Snapshot::from_metadata(&meta);
        if let Some((root, rel_path)) = self.fresh.remove(&path) {
            if self.sent.get(&path).is_some_and(|(s, _)| *s == snapshot) {
                // Already handed to claim, unchanged since: a listing saw it again.
                return None;
            }
            let settle = self.watches.get(root).map_or(Duration::ZERO, |w| w.settle);
            self.pending
                .insert(path, Pending::new(root, rel_path, snapshot, now, settle));
            return None;
        }
        let pending = self.pending.get_mut(&path)?;
        if pending.observe(snapshot, now) == Decision::Wait {
            return None;
        }
        let pending = self.pending.remove(&path)?;
        Some(Settled {
            root: pending.root,
            path,
            rel_path: pending.rel_path,
            size: snapshot.size,
            mtime_ns: snapshot.mtime_ns,
            ctime_ns: snapshot.ctime_ns,
            dev: snapshot.dev,
            ino: snapshot.ino,
        })
    }

    fn forget(&mut self, path: &Path) {
        self.pending.remove(path);
        self.fresh.remove(path);
    }

    fn forget_old_sends(&mut self) {
        if self.sent.is_empty() {
            return;
        }
        let now = Instant::now();
        self.sent.retain(|_, (_, until)| *until > now);
    }

    /// True the first time `path` is warned about.
    fn first_warning(&mut self, path: &Path) -> bool {
        if self.warned.contains(path) {
            return false;
        }
        if self.warned.len() >= MAX_WARNED_PATHS {
            self.warned.clear();
        }
        self.warned.insert(path.to_path_buf());
        true
    }
}
