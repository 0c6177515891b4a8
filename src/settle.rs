//! Settle: decides when a file is complete.
//!
//! A candidate file is ready only when its size, mtime **and ctime** (and identity) have not
//! changed for the root's `settle` time. ctime matters: `cp -p`, rsync and SFTP restore an old
//! mtime after each write, but every write still moves ctime. Temporary names are never ready:
//! the built-in ignores (`*.part`, `*.partial`, `*.crdownload`, `*.filepart`, `*.tmp`, `~$*`,
//! `.~lock.*`, `.syncthing.*`, `~syncthing~*`, dotfiles) and the root's `include` / `exclude`
//! globs. Only regular files settle: a symlink, FIFO, socket or device is logged once and skipped
//! (never opened), so it can neither leak nor stall anything.
//!
//! What this stage does not do: open files, or move them. It only looks (`lstat`).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::WatchConfig;
use crate::fsops::{self, FileStamp, FsError};
use crate::watch::Candidate;

/// Capacity of settle → claim. Full: settle waits (the files stay in the inbox, which is the
/// durable queue).
pub const SETTLED_CAPACITY: usize = 256;
/// Paths remembered as already warned about (non-regular files), at most.
const WARNED_MAX: usize = 10_000;

/// A file whose size, mtime and ctime have been quiet for the root's `settle` time.
#[derive(Debug, Clone)]
pub struct Settled {
    /// Index of the root in the config's watches.
    pub root: usize,
    /// Absolute path in the inbox.
    pub path: PathBuf,
    /// Path relative to the root.
    pub rel_path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// mtime, ns since the epoch.
    pub mtime_ns: i128,
    /// ctime, ns since the epoch.
    pub ctime_ns: i128,
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
}

/// Whether a file name is one of the built-in temporary names (or a dotfile).
pub fn is_ignored_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    if b.is_empty() || b[0] == b'.' || b.starts_with(b"~$") || b.starts_with(b"~syncthing~") {
        return true;
    }
    let lower = b.to_ascii_lowercase();
    [
        &b".part"[..],
        b".partial",
        b".crdownload",
        b".filepart",
        b".tmp",
    ]
    .iter()
    .any(|suffix| lower.ends_with(suffix))
}

/// Whether a relative path passes the root's globs: an include must match and no exclude may.
/// A pattern is matched against the whole relative path and against the file name, so that
/// `*.tmp` excludes `a/b/c.tmp`.
pub fn matches_filters(rel: &Path, include: &[glob::Pattern], exclude: &[glob::Pattern]) -> bool {
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: false,
        require_literal_leading_dot: false,
    };
    let name = rel.file_name().map(Path::new).unwrap_or(rel);
    let hit = |p: &glob::Pattern| p.matches_path_with(rel, opts) || p.matches_path_with(name, opts);
    (include.is_empty() || include.iter().any(hit)) && !exclude.iter().any(hit)
}

/// Whether a path under `root` is one dropscan takes: not inside the root's own folders, no
/// hidden component, an acceptable name, and passing the globs. Returns the relative path.
pub fn accept(w: &WatchConfig, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix(&w.path).ok()?;
    if rel.as_os_str().is_empty() || w.own_dirs().iter().any(|d| path.starts_with(d)) {
        return None;
    }
    let mut components = rel.components().peekable();
    let mut depth = 0;
    while let Some(c) = components.next() {
        let name = c.as_os_str();
        depth += 1;
        if components.peek().is_some() {
            // A folder on the way: hidden folders (.dropscan, .git, .sync) are not ours.
            if name.as_bytes().first() == Some(&b'.') {
                return None;
            }
        } else if is_ignored_name(name) {
            return None;
        }
    }
    if !w.recursive && depth > 1 {
        return None;
    }
    matches_filters(rel, &w.include, &w.exclude).then(|| rel.to_path_buf())
}

/// The change-relevant part of a stamp.
fn key(s: &FileStamp) -> (u64, i128, i128, u64, u64) {
    (s.size, s.mtime_ns, s.ctime_ns, s.dev, s.ino)
}

/// One file being watched for quiet.
#[derive(Debug, Clone)]
pub struct Pending {
    root: usize,
    rel: PathBuf,
    stamp: FileStamp,
    since: Instant,
}

/// What a new observation means.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Still changing, or not quiet for long enough.
    Wait,
    /// Quiet for `settle`: complete.
    Ready,
}

impl Pending {
    /// Starts watching a file seen now.
    pub fn new(root: usize, rel: PathBuf, stamp: FileStamp, now: Instant) -> Self {
        Pending {
            root,
            rel,
            stamp,
            since: now,
        }
    }

    /// Takes a new observation: any change restarts the quiet period.
    pub fn observe(&mut self, stamp: FileStamp, now: Instant, settle: Duration) -> Decision {
        if key(&stamp) != key(&self.stamp) {
            self.stamp = stamp;
            self.since = now;
            return Decision::Wait;
        }
        if now.duration_since(self.since) >= settle {
            Decision::Ready
        } else {
            Decision::Wait
        }
    }
}

/// Runs the settle stage until shutdown.
pub async fn run(
    watches: Arc<[WatchConfig]>,
    mut candidates_rx: mpsc::Receiver<Candidate>,
    settled_tx: mpsc::Sender<Settled>,
    shutdown: CancellationToken,
) {
    let min_settle = watches
        .iter()
        .map(|w| w.settle)
        .min()
        .unwrap_or(Duration::from_secs(5));
    let period = (min_settle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: HashMap<PathBuf, Pending> = HashMap::new();
    let mut warned: HashSet<PathBuf> = HashSet::new();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            c = candidates_rx.recv() => match c {
                Some(c) => consider(&watches, c, &mut pending, &mut warned),
                None => break,
            },
            _ = tick.tick() => {
                let ready = recheck(&watches, &mut pending);
                for s in ready {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return,
                        r = settled_tx.send(s) => if r.is_err() { return },
                    }
                }
            }
        }
    }
}

fn consider(
    watches: &[WatchConfig],
    c: Candidate,
    pending: &mut HashMap<PathBuf, Pending>,
    warned: &mut HashSet<PathBuf>,
) {
    if pending.contains_key(&c.path) {
        return; // The tick looks at it again anyway.
    }
    let Some(w) = watches.get(c.root) else { return };
    let Some(rel) = accept(w, &c.path) else {
        return;
    };
    match fsops::lstamp(&c.path) {
        Ok(stamp) => {
            pending.insert(c.path, Pending::new(c.root, rel, stamp, Instant::now()));
        }
        Err(
            FsError::NotRegular {
                kind: "directory", ..
            }
            | FsError::Vanished { .. },
        ) => {}
        Err(e) => {
            if warned.len() >= WARNED_MAX {
                warned.clear();
            }
            if warned.insert(c.path.clone()) {
                tracing::warn!(path = %c.path.display(), error = %e, "skipped");
            }
        }
    }
}

/// Re-stats every pending file; returns those that are ready (and forgets them).
fn recheck(watches: &[WatchConfig], pending: &mut HashMap<PathBuf, Pending>) -> Vec<Settled> {
    let now = Instant::now();
    let mut ready = Vec::new();
    pending.retain(|path, p| {
        let settle = watches
            .get(p.root)
            .map_or(Duration::from_secs(5), |w| w.settle);
        match fsops::lstamp(path) {
            Ok(stamp) => match p.observe(stamp, now, settle) {
                Decision::Wait => true,
                Decision::Ready => {
                    ready.push(Settled {
                        root: p.root,
                        path: path.clone(),
                        rel_path: p.rel.clone(),
                        size: stamp.size,
                        mtime_ns: stamp.mtime_ns,
                        ctime_ns: stamp.ctime_ns,
                        dev: stamp.dev,
                        ino: stamp.ino,
                    });
                    false
                }
            },
            // Gone, or replaced by something that is not a regular file.
            Err(_) => false,
        }
    });
    ready
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64, mtime: i128, ctime: i128) -> FileStamp {
        FileStamp {
            dev: 1,
            ino: 2,
            size,
            mtime_ns: mtime,
            ctime_ns: ctime,
            nlink: 1,
        }
    }

    #[test]
    fn temporary_names_are_ignored() {
        for n in [
            "a.part",
            "a.PARTIAL",
            "x.crdownload",
            "y.filepart",
            "z.tmp",
            "~$doc.docx",
            ".~lock.a.odt#",
            ".syncthing.a.tmp",
            "~syncthing~a.tmp",
            ".hidden",
        ] {
            assert!(is_ignored_name(OsStr::new(n)), "{n}");
        }
        for n in ["report.pdf", "partial", "tmp.txt", "a.part.txt"] {
            assert!(!is_ignored_name(OsStr::new(n)), "{n}");
        }
    }

    #[test]
    fn globs_match_path_or_name() {
        let p = |s: &str| glob::Pattern::new(s).unwrap();
        let all = [p("*")];
        assert!(matches_filters(Path::new("a/b/c.pdf"), &all, &[]));
        assert!(!matches_filters(
            Path::new("a/b/c.log"),
            &all,
            &[p("*.log")]
        ));
        assert!(!matches_filters(Path::new("a/b/c.log"), &all, &[p("a/*")]));
        assert!(matches_filters(Path::new("x/c.pdf"), &[p("*.pdf")], &[]));
        assert!(!matches_filters(Path::new("x/c.doc"), &[p("*.pdf")], &[]));
    }

    #[test]
    fn quiet_size_mtime_and_ctime_make_ready() {
        let settle = Duration::from_millis(500);
        let t0 = Instant::now();
        let mut p = Pending::new(0, "f".into(), stamp(10, 1, 1), t0);
        assert_eq!(
            p.observe(stamp(10, 1, 1), t0 + Duration::from_millis(400), settle),
            Decision::Wait
        );
        assert_eq!(
            p.observe(stamp(10, 1, 1), t0 + Duration::from_millis(500), settle),
            Decision::Ready
        );
    }

    #[test]
    fn ctime_change_with_restored_mtime_restarts_the_wait() {
        let settle = Duration::from_millis(500);
        let t0 = Instant::now();
        let mut p = Pending::new(0, "f".into(), stamp(10, 1, 1), t0);
        // Size grew but mtime was put back (cp -p): ctime moved.
        let t1 = t0 + Duration::from_millis(450);
        assert_eq!(p.observe(stamp(20, 1, 2), t1, settle), Decision::Wait);
        assert_eq!(
            p.observe(stamp(20, 1, 2), t1 + Duration::from_millis(400), settle),
            Decision::Wait
        );
        assert_eq!(
            p.observe(stamp(20, 1, 2), t1 + Duration::from_millis(500), settle),
            Decision::Ready
        );
        // Even a pure ctime change (chmod, or a write with the same size) restarts it.
        let mut q = Pending::new(0, "g".into(), stamp(5, 1, 1), t0);
        assert_eq!(
            q.observe(stamp(5, 1, 9), t0 + settle, settle),
            Decision::Wait
        );
    }
}
