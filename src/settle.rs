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

use crate::config::{Pattern, WatchConfig};
use crate::watch::{self, Candidate};

/// A file whose size, mtime and ctime have not changed for the root's `settle` time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Index of the root in the watches slice.
    pub root: usize,
    /// Absolute path.
    pub path: PathBuf,
    /// Path relative to the root.
    pub rel_path: PathBuf,
    /// Size in bytes when it settled.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Status change time, nanoseconds since the epoch.
    pub ctime_ns: i128,
    /// Device of the file.
    pub dev: u64,
    /// Inode of the file.
    pub ino: u64,
}

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
pub struct Snapshot {
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
    pub fn from_metadata(meta: &std::fs::Metadata) -> Self {
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
pub enum Decision {
    /// Changed recently, or not quiet for long enough yet.
    Wait,
    /// Unchanged for at least the settle time.
    Ready,
}

/// A file being watched for quiet.
#[derive(Debug, Clone)]
pub struct Pending {
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
    pub fn new(
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
    pub fn observe(&mut self, snapshot: Snapshot, now: Instant) -> Decision {
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

/// True when `rel` is taken by the globs: some `include` matches and no `exclude` matches, each
/// tried against the relative path and against the file name (`*` crosses `/`, so `*.tmp` also
/// excludes `a/b/c.tmp`). Non-UTF-8 bytes are matched as U+FFFD.
pub fn matches_filters(rel: &Path, include: &[Pattern], exclude: &[Pattern]) -> bool {
    let rel_str = rel.to_string_lossy();
    let name = rel.file_name().map(|n| n.to_string_lossy());
    let matches = |p: &Pattern| p.matches(&rel_str) || name.as_ref().is_some_and(|n| p.matches(n));
    include.iter().any(matches) && !exclude.iter().any(matches)
}

/// The relative path of `path` when root `w` takes it: in scope (`watch::is_out_of_scope`), a
/// name that is not ignored (`watch::is_ignored_name`), and passing the globs. Pure.
pub fn admit(w: &WatchConfig, path: &Path) -> Option<PathBuf> {
    if watch::is_out_of_scope(w, path) {
        return None;
    }
    let rel = path.strip_prefix(&w.path).ok()?;
    let name = rel.file_name()?;
    if watch::is_ignored_name(name) {
        return None;
    }
    matches_filters(rel, &w.include, &w.exclude).then(|| rel.to_path_buf())
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

/// `lstat` of `rel` beneath the inbox `root`: every folder on the way is resolved beneath the
/// root without following a symlink (a folder swapped for a link is an error, never followed),
/// then the last name is looked up in that folder through its descriptor.
fn stat_beneath(root: &Path, rel: &Path) -> io::Result<std::fs::Metadata> {
    use std::os::fd::AsRawFd;
    let refused = |e: crate::fsops::FsError| match e {
        crate::fsops::FsError::Vanished { .. } => io::Error::from(io::ErrorKind::NotFound),
        e => io::Error::other(e.to_string()),
    };
    let (parent, name) = crate::fsops::split_rel(rel).map_err(refused)?;
    let dir = crate::fsops::Dir::open_trusted(root)
        .and_then(|d| d.open_dir(parent))
        .map_err(refused)?;
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
            paths
                .into_iter()
                .map(|(p, root, rel)| {
                    let meta = match root {
                        Some(root) => stat_beneath(&root, &rel),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WatchMode;

    const SETTLE: Duration = Duration::from_millis(400);

    fn snap(size: u64, mtime_ns: i128, ctime_ns: i128) -> Snapshot {
        Snapshot {
            size,
            mtime_ns,
            ctime_ns,
            dev: 1,
            ino: 7,
        }
    }

    fn globs(list: &[&str]) -> Vec<Pattern> {
        list.iter().map(|g| Pattern::new(g).unwrap()).collect()
    }

    fn config() -> WatchConfig {
        WatchConfig {
            path: PathBuf::from("/in"),
            recursive: true,
            settle: SETTLE,
            mode: WatchMode::Auto,
            include: globs(&["*"]),
            exclude: globs(&["*.log", "skip/*"]),
            clean_dir: PathBuf::from("/in/clean"),
            quarantine_dir: PathBuf::from("/in/q"),
            failed_dir: PathBuf::from("/failed"),
            staging_dir: PathBuf::from("/in/.dropscan/default"),
            reconcile_interval: Duration::from_secs(60),
            poll_interval: Duration::from_secs(2),
        }
    }

    #[test]
    fn unchanged_for_settle_is_ready() {
        let t0 = Instant::now();
        let mut p = Pending::new(0, "a".into(), snap(10, 1, 1), t0, SETTLE);
        assert_eq!(p.observe(snap(10, 1, 1), t0 + SETTLE / 2), Decision::Wait);
        assert_eq!(p.observe(snap(10, 1, 1), t0 + SETTLE), Decision::Ready);
    }

    #[test]
    fn growth_resets_the_quiet_period() {
        let t0 = Instant::now();
        let mut p = Pending::new(0, "a".into(), snap(10, 1, 1), t0, SETTLE);
        assert_eq!(p.observe(snap(20, 2, 2), t0 + SETTLE), Decision::Wait);
        assert_eq!(
            p.observe(snap(20, 2, 2), t0 + SETTLE * 3 / 2),
            Decision::Wait
        );
        assert_eq!(p.observe(snap(20, 2, 2), t0 + SETTLE * 2), Decision::Ready);
    }

    #[test]
    fn ctime_change_with_old_mtime_restored_is_not_ready() {
        // `cp -p`: data written, then the old mtime put back. Only ctime tells.
        let t0 = Instant::now();
        let mut p = Pending::new(0, "a".into(), snap(10, 5, 100), t0, SETTLE);
        assert_eq!(p.observe(snap(10, 5, 200), t0 + SETTLE), Decision::Wait);
        assert_eq!(
            p.observe(snap(10, 5, 200), t0 + SETTLE + SETTLE / 2),
            Decision::Wait
        );
        assert_eq!(
            p.observe(snap(10, 5, 200), t0 + SETTLE * 2),
            Decision::Ready
        );
    }

    #[test]
    fn same_size_rewrite_or_replacement_is_a_change() {
        let t0 = Instant::now();
        let mut p = Pending::new(0, "a".into(), snap(10, 5, 5), t0, SETTLE);
        // Replaced by another file of the same size and times (new inode).
        let mut other = snap(10, 5, 5);
        other.ino = 8;
        assert_eq!(p.observe(other, t0 + SETTLE), Decision::Wait);
        let mut moved = other;
        moved.dev = 2;
        assert_eq!(p.observe(moved, t0 + SETTLE * 2), Decision::Wait);
        assert_eq!(p.observe(moved, t0 + SETTLE * 3), Decision::Ready);
    }

    #[test]
    fn zero_length_files_settle() {
        let t0 = Instant::now();
        let mut p = Pending::new(0, "empty".into(), snap(0, 1, 1), t0, SETTLE);
        assert_eq!(p.observe(snap(0, 1, 1), t0 + SETTLE), Decision::Ready);
    }

    #[test]
    fn filters_match_path_and_name() {
        let include = globs(&["*"]);
        let exclude = globs(&["*.tmp", "*.log", "skip/*"]);
        assert!(matches_filters(Path::new("a.bin"), &include, &exclude));
        assert!(matches_filters(Path::new("a/b/c.bin"), &include, &exclude));
        assert!(!matches_filters(Path::new("a/b/c.tmp"), &include, &exclude));
        assert!(!matches_filters(Path::new("x.log"), &include, &exclude));
        assert!(!matches_filters(
            Path::new("skip/q.bin"),
            &include,
            &exclude
        ));
        assert!(!matches_filters(
            Path::new("skip/deeper/q.bin"),
            &include,
            &exclude
        ));
        assert!(matches_filters(
            Path::new("noskip/q.bin"),
            &include,
            &exclude
        ));

        let only_pdf = globs(&["*.pdf"]);
        assert!(matches_filters(
            Path::new("Übergabe/年報.pdf"),
            &only_pdf,
            &[]
        ));
        assert!(!matches_filters(
            Path::new("Übergabe/年報.doc"),
            &only_pdf,
            &[]
        ));
        // By file name: `report*` takes a report anywhere.
        assert!(matches_filters(
            Path::new("x/y/report-1.pdf"),
            &globs(&["report*"]),
            &[]
        ));
        assert!(!matches_filters(Path::new("a.bin"), &[], &[]));
    }

    #[test]
    fn filters_non_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let rel = Path::new(std::ffi::OsStr::from_bytes(b"d\xff/\xfe.bin"));
        assert!(matches_filters(rel, &globs(&["*"]), &[]));
        assert!(matches_filters(rel, &globs(&["*.bin"]), &[]));
        assert!(!matches_filters(rel, &globs(&["*"]), &globs(&["*.bin"])));
    }

    #[test]
    fn admit_applies_every_filter() {
        let w = config();
        assert_eq!(
            admit(&w, Path::new("/in/a.bin")),
            Some(PathBuf::from("a.bin"))
        );
        assert_eq!(
            admit(&w, Path::new("/in/Übergabe/年報.pdf")),
            Some(PathBuf::from("Übergabe/年報.pdf"))
        );
        for refused in [
            "/in/a.part",
            "/in/sub/b.crdownload",
            "/in/.hidden",
            "/in/~$doc.docx",
            "/in/.~lock.a.odt#",
            "/in/x.log",
            "/in/skip/q.bin",
            "/in/clean/a.bin",
            "/in/q/a.bin",
            "/in/.dropscan/default/a.bin",
            "/in/.git/config",
            "/other/a.bin",
            "/in",
        ] {
            assert_eq!(admit(&w, Path::new(refused)), None, "{refused}");
        }
        let mut flat = config();
        flat.recursive = false;
        assert_eq!(admit(&flat, Path::new("/in/sub/a.bin")), None);
    }

    #[test]
    fn tick_is_a_quarter_of_the_shortest_settle_bounded() {
        let mut a = config();
        a.settle = Duration::from_secs(5);
        let mut b = config();
        b.settle = Duration::from_millis(400);
        assert_eq!(
            tick_period(&[a.clone(), b.clone()]),
            Duration::from_millis(100)
        );
        assert_eq!(tick_period(&[a.clone()]), MAX_TICK);
        b.settle = Duration::ZERO;
        assert_eq!(tick_period(&[a, b]), MIN_TICK);
        assert_eq!(tick_period(&[]), MAX_TICK);
    }

    #[test]
    fn settler_skips_fifos_and_warns_once() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = config();
        w.path = tmp.path().to_path_buf();
        let fifo = tmp.path().join("pipe");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let mut s = Settler::new(Arc::from(vec![w]));
        let now = Instant::now();
        for _ in 0..3 {
            s.offer(Candidate {
                root: 0,
                path: fifo.clone(),
            });
            assert!(s.fresh.contains_key(&fifo));
            let meta = std::fs::symlink_metadata(&fifo);
            assert!(s.observe(fifo.clone(), meta, now).is_none());
            assert!(s.fresh.is_empty() && s.pending.is_empty());
        }
        assert_eq!(s.warned.len(), 1);
    }

    #[test]
    fn settler_does_not_resend_an_unchanged_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = config();
        w.path = tmp.path().to_path_buf();
        let file = tmp.path().join("a.bin");
        std::fs::write(&file, b"abc").unwrap();
        let mut s = Settler::new(Arc::from(vec![w]));
        let t0 = Instant::now();
        let offer = |s: &mut Settler| {
            s.offer(Candidate {
                root: 0,
                path: file.clone(),
            });
        };
        offer(&mut s);
        assert!(
            s.observe(file.clone(), std::fs::symlink_metadata(&file), t0)
                .is_none()
        );
        let settled = s
            .observe(file.clone(), std::fs::symlink_metadata(&file), t0 + SETTLE)
            .unwrap();
        assert_eq!(
            (settled.size, settled.rel_path.as_path()),
            (3, Path::new("a.bin"))
        );
        let snapshot = Snapshot::from_metadata(&std::fs::symlink_metadata(&file).unwrap());
        s.sent
            .insert(file.clone(), (snapshot, t0 + Duration::from_secs(60)));

        // Listed again while it waits for claim: not pending again.
        offer(&mut s);
        assert!(
            s.observe(
                file.clone(),
                std::fs::symlink_metadata(&file),
                t0 + SETTLE * 2
            )
            .is_none()
        );
        assert!(s.pending.is_empty());

        // Rewritten: a new file as far as settle is concerned.
        std::fs::write(&file, b"abcd").unwrap();
        offer(&mut s);
        assert!(
            s.observe(
                file.clone(),
                std::fs::symlink_metadata(&file),
                t0 + SETTLE * 3
            )
            .is_none()
        );
        assert!(s.pending.contains_key(&file));
    }
}
