//! Settle: decides when a dropped file is completely written, and hands it on as `Settled`.
//!
//! Settle applies the filters (built-in temporary names, the root's `include` / `exclude` globs,
//! own folders and dot-folders; the rules themselves are `crate::scope`) and owns the
//! completion rule. Every pending path is re-stated on a tick (a
//! quarter of the shortest `settle`, 50 ms to 1 s), off the async threads, since a stat on a
//! network share may block. When claim is slow, `settled_tx.send` waits, and the files simply
//! stay in the inbox.
//!
//! ## The completion rule, and the signals it rests on
//!
//! A file is complete when **all** of these hold:
//!
//! 1. **Quiet.** Its size, mtime, ctime, device and inode have not changed for the root's
//!    `settle` time. ctime is in the gate because `cp -p` and rsync put an old mtime back after
//!    writing, and nobody can set ctime.
//! 2. **Empty files wait longer.** A 0-byte file must be quiet for `settle_empty` (default one
//!    minute, never less than `settle`). Created empty and written later is the usual shape of a
//!    paused copy (smbd creates the file at the client's open; an NFS client creates it before
//!    its first WRITE), and an empty file's verdict is always reusable, so it would otherwise be
//!    released at once with no upload at all.
//! 3. **Nobody holds it open for writing.** Before a quiet file is handed on, settle opens it
//!    read-only (never following a link, never blocking on a FIFO) and takes and drops a read
//!    lease ([`crate::fsops::lease`]). The kernel refuses it while any process has the file open
//!    for writing: on the file server that is smbd for a paused SMB client, Ganesha or knfsd for
//!    an NFS client with open state, rsync, or a local program. Refused: the file is not
//!    complete, whatever its times say; its quiet period starts again. A file that stays
//!    unchanged but held open for `held_open_limit` (a server that keeps descriptors open after
//!    its client is done, like NFS-Ganesha's default cache) is handed on marked `held_open`: it
//!    is then owned without a lease, its original kept (below).
//!
//! 4. **Save temps wait much longer.** A name shaped like Excel's save temp (8 hex digits, no
//!    extension: `crate::scope::is_save_temp_name`) must be quiet for the root's
//!    `save_temp_settle` (default an hour): Excel writes the whole workbook under it and renames
//!    it over the real name, and a slow save to a share pauses for seconds. Taken earlier, the
//!    save fails and clean gets a file named `5A7C1E00`. A crashed save's leftover is still
//!    scanned, an hour later (never left for ever, never deleted unscanned).
//!
//! The lease is asked again by claim around its rename and held by the hash while it copies the
//! file into a private inode (see [`crate::claim`] and `crate::hashing`): a writer that opens
//! the file in between breaks it, the work stops at once, and the file stays (or goes back) in
//! the inbox. No writer waits on dropscan for more than one copy step.
//!
//! **When a signal is missing.** Leases need a local filesystem that supports them and, for
//! files of other users, `CAP_LEASE` (the systemd unit grants it). On a client mount (an inbox
//! that is itself an SMB or NFS mount), without the capability, or for NFSv3 writers that hold
//! no open state, rule 3 cannot be asked: settle logs this once per root and the rule rests on
//! 1 and 2, so `settle` must be longer than the writers' longest pause. What still holds there is
//! that nothing is lost: the hash keeps the user's original inode in staging (`keep_original`)
//! after copying it, and if a writer that was still at it changes it, it goes back to the inbox
//! and through the pipeline again as a new version.
//!
//! Settle never moves a file (that is claim), and does not list folders (that is watch: a
//! candidate that turns out to be a folder is dropped).
//!
//! Departure from the house shape (on purpose): `run` takes the roots ([`crate::root::Roots`])
//! and its channels rather than the agent's `Shared` context, and has no error to report (a
//! file it cannot stat is logged and looked at again when seen again). This stage needs nothing
//! else (no journal, no client), and its tests drive it without an agent.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::WatchConfig;
use crate::fsops::Stamp;
pub use crate::pipeline::{Candidate, Settled};
use crate::root::{RootId, Roots};
pub(crate) use crate::scope::admit;

mod count;
mod look;
mod pending;
mod sent;
mod share;
#[cfg(test)]
mod share_tests;
#[cfg(test)]
mod tests;

use look::{Observation, OpenFolders, Probe, probe_beneath, stat_beneath};
pub(crate) use pending::{Decision, Pending, Quiet};
use sent::{MAX_SENT, Sent};
use share::{MAX_REMEMBERED, Memory};

/// Capacity of settle → claim. Full: settle waits (files stay in the inbox, which is the durable
/// queue).
pub const SETTLED_CAPACITY: usize = 256;

/// Files settle holds at most: waiting for quiet, or hinted and not looked at yet. Each root has
/// a share of it (`share.rs`: the bound divided by the roots, at least `share::MIN_SHARE`). At its
/// share settle takes no more of that root's candidates: its listing waits for room in its
/// candidates channel and a notify hint that finds it full asks for a rescan (`watch::hints`),
/// so the files stay in the inbox, which is the durable queue, and are looked at as room comes;
/// the other roots go on. Without it a backlog of
/// 100,000 files was held whole, stat'ed whole on every tick and copied for each stat pass
/// (issue 20: `many` peaked near 300 MiB). A root whose share is full of files that do not settle
/// soon (being written, held open, empty, Excel save temps) rotates them out, keeping their
/// times, so that its newer files are looked at too (`share.rs`).
pub(crate) const MAX_WAITING: usize = 8192;

/// Bounds of the re-stat tick.
const MIN_TICK: Duration = Duration::from_millis(50);
const MAX_TICK: Duration = Duration::from_secs(1);

/// Paths remembered as already warned about (not regular files, unreadable); then the memory
/// restarts, so a folder full of FIFOs costs one line per FIFO per this many.
const MAX_WARNED_PATHS: usize = 4096;
/// Quiet files probed for writers (rule 3) and handed on per slice, so that thousands found
/// quiet in one tick reach the claim a slice at a time.
const PROBE_SLICE: usize = 512;

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
/// `candidates_rx` has one receiver per root, in the roots' order
/// (`crate::watch::candidate_channels`).
pub async fn run(
    roots: Roots,
    candidates_rx: Vec<mpsc::Receiver<Candidate>>,
    settled_tx: mpsc::Sender<Settled>,
    offer_again: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let settler = Settler::new(roots, MAX_WAITING, MAX_SENT, MAX_REMEMBERED);
    drive(settler, candidates_rx, settled_tx, offer_again, shutdown).await;
}

/// The loop of [`run`], for a settler with any bounds.
async fn drive(
    mut settler: Settler,
    mut candidates_rx: Vec<mpsc::Receiver<Candidate>>,
    settled_tx: mpsc::Sender<Settled>,
    mut offer_again: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(settler.tick);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    offer_again.mark_unchanged();
    let mut offers = true;
    // The root whose channel is read first next time, so that none is always served last.
    let mut first = 0;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            changed = offer_again.changed(), if offers => match changed {
                Ok(()) => settler.offer_sent_again(),
                Err(_) => offers = false,
            },
            // Before candidates: a steady flood of hints must not starve the re-stats.
            _ = tick.tick() => {
                if settler.step(&settled_tx, &shutdown).await.is_break() {
                    break;
                }
                let backlogged: Vec<bool> = candidates_rx.iter().map(|rx| !rx.is_empty()).collect();
                settler.rotate(&backlogged, Instant::now());
            }
            // A root at its share is not read: its candidates wait in its channel and its
            // listing behind them.
            candidate = std::future::poll_fn(|cx| share::poll_candidates(cx, &mut candidates_rx, &settler, &mut first)) => match candidate {
                Some(candidate) => settler.offer(candidate),
                None => break,
            },
        }
    }
}

/// The state of settle.
struct Settler {
    roots: Roots,
    /// Files seen at least once, waiting for quiet.
    pending: HashMap<PathBuf, Pending>,
    /// Admitted candidates not yet stat'ed (root, relative path).
    fresh: HashMap<PathBuf, (RootId, PathBuf)>,
    /// Files handed to claim, with the snapshot they had, until the root's reconcile interval
    /// passes: listings would otherwise settle a file again while it waits in claim's queue.
    /// With their root and relative path, to offer them again at once when the journal takes
    /// writes again (a claim refused for a full disk leaves the file in the inbox). Bounded
    /// (`sent.rs`).
    sent: Sent,
    /// `pending` and `fresh` together hold at most this many files of each root (its share of
    /// [`MAX_WAITING`], `share.rs`).
    share: usize,
    /// How many files of each root `pending` and `fresh` hold (counted whole after each look,
    /// added to as candidates come).
    waiting: Vec<usize>,
    /// What it knew of the files it rotated out (`share.rs`).
    memory: Memory,
    /// The re-stat period.
    tick: Duration,
    /// Paths already warned about.
    warned: HashSet<PathBuf>,
    /// Roots already named as having no open-writer check.
    no_lease_noted: HashSet<RootId>,
    /// Quiet files found held open for writing: since when, unchanged.
    held: HashMap<PathBuf, (Instant, Stamp)>,
}

impl Settler {
    fn new(roots: Roots, max_waiting: usize, max_sent: usize, max_remembered: usize) -> Self {
        let configs: Vec<WatchConfig> = roots.iter().map(|r| r.config.clone()).collect();
        Settler {
            share: share::share(max_waiting, roots.len()),
            waiting: vec![0; roots.len()],
            memory: Memory::new(max_remembered),
            tick: tick_period(&configs),
            roots,
            pending: HashMap::new(),
            fresh: HashMap::new(),
            sent: Sent::new(max_sent),
            warned: HashSet::new(),
            no_lease_noted: HashSet::new(),
            held: HashMap::new(),
        }
    }

    /// Whether it takes more candidates of root `root` (below its share of [`MAX_WAITING`]).
    fn has_room(&self, root: RootId) -> bool {
        self.waiting.get(root.0).is_some_and(|n| *n < self.share)
    }

    /// Takes a hint in; it is stat'ed on the next tick.
    fn offer(&mut self, candidate: Candidate) {
        if self.pending.contains_key(&candidate.path) || self.fresh.contains_key(&candidate.path) {
            return;
        }
        let Some(w) = self.config_of(candidate.root) else {
            return;
        };
        if let Some(rel) = admit(w, &candidate.path) {
            self.fresh.insert(candidate.path, (candidate.root, rel));
            self.count_in(candidate.root);
        }
    }

    /// One more file of `root` waits (until the next count).
    fn count_in(&mut self, root: RootId) {
        if let Some(n) = self.waiting.get_mut(root.0) {
            *n += 1;
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
            self.publish_counts();
            return Continue(());
        }
        let roots = &self.roots;
        let root_of = |root: RootId| roots.get(root).map(|r| r.path().to_path_buf());
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
        if ready.is_empty() {
            self.publish_counts();
            return Continue(());
        }
        // Probed and handed on a slice at a time: with thousands quiet at once (a share full of
        // files at start), the first reach the claim after one slice's probes, not everybody's
        // (issue 20: `many`'s first upload).
        let mut quiet = ready.into_iter().peekable();
        while quiet.peek().is_some() {
            let slice: Vec<Settled> = quiet.by_ref().take(PROBE_SLICE).collect();
            let ready = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Break(()),
                ready = self.not_held_open(slice) => ready,
            };
            self.publish_counts();
            if self
                .hand_on(ready, now, settled_tx, shutdown)
                .await
                .is_break()
            {
                return Break(());
            }
        }
        Continue(())
    }

    /// Hands files found complete to the claim stage, and remembers them as sent.
    async fn hand_on(
        &mut self,
        ready: Vec<Settled>,
        now: Instant,
        settled_tx: &mpsc::Sender<Settled>,
        shutdown: &CancellationToken,
    ) -> std::ops::ControlFlow<()> {
        use std::ops::ControlFlow::{Break, Continue};
        for settled in ready {
            let sent = self.config_of(settled.root).map(|w| {
                (
                    settled.root,
                    settled.rel_path.clone(),
                    settled.path.clone(),
                    settled.stamp,
                    now + w.reconcile_interval.max(w.settle),
                )
            });
            debug!(path = %crate::fsops::shown(&settled.path), size = settled.stamp.size, "settled");
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Break(()),
                res = settled_tx.send(settled) => if res.is_err() {
                    return Break(());
                },
            }
            if let Some((root, rel, path, snapshot, until)) = sent {
                self.sent.insert(path, snapshot, until, root, rel);
            }
        }
        Continue(())
    }

    /// Rule 3: asks for a read lease on each quiet file. One that somebody holds open for
    /// writing goes back to waiting (its quiet period starts again); one where leases cannot be
    /// had goes on, and its root is named once in the log.
    async fn not_held_open(&mut self, quiet: Vec<Settled>) -> Vec<Settled> {
        let roots = self.roots.clone();
        let probed = tokio::task::spawn_blocking(move || {
            let mut folders = OpenFolders::new();
            quiet
                .into_iter()
                .map(|s| {
                    let probe = match roots.get(s.root).map(|r| &r.config) {
                        Some(w) => probe_beneath(
                            &mut folders,
                            &w.path,
                            &s,
                            w.lease_check == crate::config::LeaseCheck::Auto,
                        ),
                        None => Probe::Changed,
                    };
                    (s, probe)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let probed = match probed {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "open-writer check failed; the files are checked again");
                return Vec::new();
            }
        };
        let now = Instant::now();
        let mut ready = Vec::with_capacity(probed.len());
        for (s, probe) in probed {
            if !matches!(probe, Probe::HeldOpen) {
                self.held.remove(&s.path);
            }
            match probe {
                Probe::Free | Probe::Unreadable => ready.push(s),
                Probe::Unsupported(why) => {
                    if self.no_lease_noted.insert(s.root) {
                        warn!(
                            root = %self.config_of(s.root).map(|w| crate::fsops::shown(&w.path).to_string()).unwrap_or_default(),
                            reason = %why.describe(),
                            "cannot ask whether a writer still holds files open here: completion \
                             rests on `settle` alone (make it longer than your writers' longest \
                             pause); originals are kept for `keep_original` so that nothing a late \
                             writer adds is lost"
                        );
                    }
                    ready.push(s);
                }
                Probe::HeldOpen => {
                    let snapshot = s.stamp;
                    let limit = self
                        .config_of(s.root)
                        .map_or(Duration::MAX, |w| w.held_open_limit);
                    let since = match self.held.get(&s.path) {
                        Some((since, seen)) if *seen == snapshot => *since,
                        _ => {
                            self.held.insert(s.path.clone(), (now, snapshot));
                            now
                        }
                    };
                    if now.saturating_duration_since(since) >= limit {
                        self.held.remove(&s.path);
                        warn!(
                            path = %crate::fsops::shown(&s.path),
                            "held open for writing but unchanged for `held_open_limit`: taken, and \
                             its original kept for `keep_original` in case the writer goes on"
                        );
                        ready.push(Settled {
                            held_open: true,
                            ..s
                        });
                    } else {
                        debug!(path = %crate::fsops::shown(&s.path), "quiet but held open for writing; waiting");
                        self.wait_again(s, since, now);
                    }
                }
                // Changed or vanished between the stat and the open: watched from scratch.
                Probe::Changed => {
                    self.fresh.insert(s.path, (s.root, s.rel_path));
                }
            }
        }
        ready
    }

    /// The quiet times of the file `rel` of root `root` (none for a root that is not
    /// configured): the root's, or its `save_temp_settle` for a name shaped like Excel's save
    /// temp (rule 4 of the module docs).
    fn quiet_of(&self, root: RootId, rel: &Path) -> Quiet {
        let Some(w) = self.config_of(root) else {
            return Quiet {
                settle: Duration::ZERO,
                empty: Duration::ZERO,
            };
        };
        let quiet = Quiet::of(w);
        if rel.file_name().is_some_and(crate::scope::is_save_temp_name) {
            Quiet {
                settle: quiet.settle.max(w.save_temp_settle),
                empty: quiet.empty.max(w.save_temp_settle),
            }
        } else {
            quiet
        }
    }

    /// Puts a file found held open for writing (unchanged since `held_since`) back to waiting
    /// from `now`. It waits for its writer, not for quiet: past its root's patience at once, so
    /// that a share full of held files rotates (`share.rs`) like one full of rewritten files.
    fn wait_again(&mut self, s: Settled, held_since: Instant, now: Instant) {
        let quiet = self.quiet_of(s.root, &s.rel_path);
        let snapshot = s.stamp;
        let mut pending = Pending::new(s.root, s.rel_path, snapshot, now, quiet);
        pending.first_seen = held_since;
        pending.looks = u32::MAX;
        self.pending.insert(s.path, pending);
    }

    /// Applies one stat result; returns the file when it is ready to go.
    fn observe(
        &mut self,
        path: PathBuf,
        meta: io::Result<crate::fsops::FileStamp>,
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
        if !meta.is_regular() {
            self.forget(&path);
            if !meta.is_dir() && self.first_warning(&path) {
                warn!(
                    path = %crate::fsops::shown(&path),
                    kind = crate::fsops::kind_of_mode(meta.mode),
                    "not a regular file; skipped and never opened"
                );
            }
            return None;
        }
        let snapshot = meta.stamp();
        if let Some((root, rel_path)) = self.fresh.remove(&path) {
            if self.sent.holds(&path, &snapshot) {
                // Already handed to claim, unchanged since: a listing saw it again.
                return None;
            }
            let quiet = self.quiet_of(root, &rel_path);
            let pending = Pending::new(root, rel_path, snapshot, now, quiet);
            // A file rotated out goes on from what settle knew (`share.rs`).
            return self.watch_again(path, pending, now);
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
            stamp: snapshot,
            held_open: false,
        })
    }

    /// Counts and publishes how many files of each root it waits on (seen or hinted, not handed
    /// on).
    fn publish_counts(&mut self) {
        let waiting = self.pending.values().map(|p| p.root);
        self.waiting = count::publish(
            &self.roots,
            waiting.chain(self.fresh.values().map(|(r, _)| *r)),
        );
    }

    /// The configuration of root `root` (none for a root that is not configured).
    fn config_of(&self, root: RootId) -> Option<&WatchConfig> {
        self.roots.get(root).map(|r| &r.config)
    }

    fn forget(&mut self, path: &Path) {
        self.pending.remove(path);
        self.fresh.remove(path);
        self.held.remove(path);
    }

    fn forget_old_sends(&mut self) {
        if self.sent.is_empty() {
            return;
        }
        self.sent.forget_old(Instant::now());
    }

    /// The journal takes writes again: every file handed on lately is looked at again now (one
    /// whose claim the full disk refused is still in the inbox; the others are gone from it).
    /// Past a root's share the rest are left to the listing that the journal's recovery also
    /// asks for (`watch`'s `list_again`).
    fn offer_sent_again(&mut self) {
        for (path, root, rel) in self.sent.drain() {
            if !self.has_room(root) {
                continue;
            }
            if !self.pending.contains_key(&path) && self.fresh.insert(path, (root, rel)).is_none() {
                self.count_in(root);
            }
        }
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
