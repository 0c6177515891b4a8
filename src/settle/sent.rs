//! The files settle handed to claim lately, with the snapshot each had: a listing that sees one
//! again while it still waits in claim's queue must not settle it a second time.
//!
//! Bounded by design (issue 20): an entry is kept until its root's reconcile interval passes,
//! and at most [`MAX_SENT`] entries are kept; past that the oldest is forgotten first. Only the
//! files still in the inbox need remembering, and those are the ones in settle → claim's channel
//! ([`super::SETTLED_CAPACITY`]) and in claim's current batch: a few hundred. Without the bound,
//! a backlog of 100,000 files kept 100,000 entries for the whole reconcile interval (three
//! minutes by default). Forgetting one early costs at most a second `Settled` for a file that
//! claim then finds already gone from the inbox (another agent's file is handled the same way).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

use tokio::time::Instant;

use crate::fsops::Stamp;
use crate::root::RootId;

/// Entries kept at most: far more than settle → claim's channel and a claim batch hold.
pub(super) const MAX_SENT: usize = 4096;

/// One file handed on: its snapshot, until when it is remembered, its root and relative path.
struct Entry {
    seq: u64,
    snapshot: Stamp,
    until: Instant,
    root: RootId,
    rel: PathBuf,
}

/// Files handed to claim lately (see the module docs).
pub(super) struct Sent {
    by_path: HashMap<PathBuf, Entry>,
    /// Insertion order, oldest first, with the sequence number each entry had then (a path sent
    /// again later has a newer one, and its older place here is skipped).
    order: VecDeque<(u64, PathBuf)>,
    next: u64,
    cap: usize,
}

impl Sent {
    /// Keeps at most `cap` entries.
    pub(super) fn new(cap: usize) -> Self {
        Sent {
            by_path: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            cap: cap.max(1),
        }
    }

    /// Remembers `path` as handed on with `snapshot` until `until`; forgets the oldest entries
    /// beyond the bound.
    pub(super) fn insert(
        &mut self,
        path: PathBuf,
        snapshot: Stamp,
        until: Instant,
        root: RootId,
        rel: PathBuf,
    ) {
        let seq = self.next;
        self.next += 1;
        self.order.push_back((seq, path.clone()));
        self.by_path.insert(
            path,
            Entry {
                seq,
                snapshot,
                until,
                root,
                rel,
            },
        );
        while self.order.len() > self.cap {
            let Some((seq, path)) = self.order.pop_front() else {
                break;
            };
            if self.by_path.get(&path).is_some_and(|e| e.seq == seq) {
                self.by_path.remove(&path);
            }
        }
    }

    /// Whether `path` was handed on with exactly `snapshot`.
    pub(super) fn holds(&self, path: &PathBuf, snapshot: &Stamp) -> bool {
        self.by_path
            .get(path)
            .is_some_and(|e| e.snapshot == *snapshot)
    }

    /// Forgets the entries whose time ran out.
    pub(super) fn forget_old(&mut self, now: Instant) {
        let before = self.by_path.len();
        self.by_path.retain(|_, e| e.until > now);
        if self.by_path.len() != before {
            let by_path = &self.by_path;
            self.order
                .retain(|(seq, path)| by_path.get(path).is_some_and(|e| e.seq == *seq));
        }
    }

    /// Forgets every entry, returning each path with its root and relative path.
    pub(super) fn drain(&mut self) -> Vec<(PathBuf, RootId, PathBuf)> {
        self.order.clear();
        self.by_path
            .drain()
            .map(|(path, e)| (path, e.root, e.rel))
            .collect()
    }

    /// Entries kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_path.len()
    }

    /// Whether nothing is kept.
    pub(super) fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64) -> Stamp {
        Stamp {
            size: 1,
            mtime_ns: 1,
            ctime_ns: 1,
            dev: 1,
            ino,
        }
    }

    fn path(i: u64) -> PathBuf {
        PathBuf::from(format!("/in/f{i}"))
    }

    /// Regression (issue 20): every file handed on was remembered for the whole reconcile
    /// interval, so a backlog of 100,000 files kept 100,000 entries.
    #[test]
    fn sent_files_are_remembered_up_to_the_bound_oldest_forgotten_first() {
        let until = Instant::now() + std::time::Duration::from_secs(180);
        let mut sent = Sent::new(4);
        for i in 0..10 {
            sent.insert(path(i), stamp(i), until, RootId(0), path(i));
        }
        assert_eq!(sent.len(), 4);
        assert!(sent.order.len() <= 4);
        assert!((0..6).all(|i| !sent.holds(&path(i), &stamp(i))));
        assert!((6..10).all(|i| sent.holds(&path(i), &stamp(i))));

        // Sent again (a new version): its older place in the order does not forget it.
        sent.insert(path(6), stamp(60), until, RootId(0), path(6));
        for i in 10..13 {
            sent.insert(path(i), stamp(i), until, RootId(0), path(i));
        }
        assert!(sent.holds(&path(6), &stamp(60)));
        assert_eq!(sent.len(), 4);
    }

    #[test]
    fn sent_files_are_forgotten_once_their_time_runs_out() {
        let now = Instant::now();
        let mut sent = Sent::new(8);
        sent.insert(path(1), stamp(1), now, RootId(0), path(1));
        sent.insert(
            path(2),
            stamp(2),
            now + std::time::Duration::from_secs(1),
            RootId(0),
            path(2),
        );
        sent.forget_old(now);
        assert!(!sent.holds(&path(1), &stamp(1)));
        assert!(sent.holds(&path(2), &stamp(2)));
        assert_eq!((sent.len(), sent.order.len()), (1, 1));
        assert_eq!(sent.drain(), vec![(path(2), RootId(0), path(2))]);
        assert!(sent.is_empty());
    }
}
