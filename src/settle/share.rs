//! Settle's bound shared out between the roots, and the rotation of a root that is full of files
//! that do not settle (review 11).
//!
//! Settle holds at most [`super::MAX_WAITING`] files. Each root gets a share of it (the bound
//! divided by the number of roots, at least [`MIN_SHARE`]), and its own candidates channel
//! (`crate::watch::candidate_channels`): a root at its share is not read from, so its listing
//! waits (the inbox is the queue) while the other roots go on. Before this, the bound was one
//! for all roots and one user who kept 8,192 files unsettled (held open, rewritten every second,
//! Excel-shaped save temps that wait `save_temp_settle`) stopped every watch.
//!
//! A share full of such files would still stop its own root: newer files in it would never be
//! looked at. So a root at its share, with candidates waiting in its channel, **rotates**: on
//! each tick it forgets up to a quarter of its share of the files that have waited longest, among
//! those looked at more than twice as often as a file of that root needs to settle
//! ([`patience`]): files waiting for something other than `settle` (a long quiet time, an open
//! writer, a writer that never stops). A file that is quiet normally is never rotated out, so a
//! backlog of files that settle (`many`: 100,000) is worked through in order as before.
//!
//! A forgotten file stays in the inbox and is offered again by a later listing (the next
//! reconcile at the latest). What settle knew about it is kept in [`Memory`], keyed by a hash of
//! its path: its snapshot, since when it was unchanged, when it was first seen, and since when it
//! was found held open. Offered again with the same snapshot (size, mtime, ctime, device, inode:
//! ctime cannot be set back), it goes on from those times, so `settle`, `settle_empty`,
//! `save_temp_settle` and `held_open_limit` still count from when it was first seen unchanged,
//! and it is handed on at once if that quiet time passed meanwhile. Offered changed, its quiet
//! time starts again from then (a file rewritten for ever never settles, rotated or not).
//!
//! The memory is bounded: at most [`MAX_REMEMBERED`] files (under 128 bytes each with its key, no
//! path kept, in a table of at most 32,768 slots: about 4 MiB), each kept until its root's longest quiet time plus two reconcile intervals have
//! passed (a file deleted from the inbox meanwhile is not kept for ever). When it is full, a file
//! rotated out is not remembered and starts from scratch when offered again: a longer wait, never
//! an earlier release. The files already remembered keep their times, so they settle and make
//! room.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Candidate, Decision, Pending, Settled, Settler};
use crate::config::WatchConfig;
use crate::fsops::Stamp;
use crate::root::RootId;

/// A root's share of settle's bound is never smaller than this (nor than the bound itself, in
/// tests with tiny bounds); with many roots, settle may then hold `roots × MIN_SHARE` files.
pub(super) const MIN_SHARE: usize = 256;

/// Files rotated out whose times settle keeps at most (see the module docs).
pub(super) const MAX_REMEMBERED: usize = 16_384;

/// Each root's share of `max_waiting` when there are `roots` roots.
pub(super) fn share(max_waiting: usize, roots: usize) -> usize {
    (max_waiting / roots.max(1)).max(MIN_SHARE.min(max_waiting))
}

/// Looks after which a file of a root configured as `w` that has still not settled may be
/// rotated out, when settle looks every `tick`: twice the looks a quiet file of that root needs,
/// and two more.
pub(super) fn patience(w: &WatchConfig, tick: Duration) -> u32 {
    let per_settle = w.settle.as_nanos().div_ceil(tick.as_nanos().max(1));
    u32::try_from(per_settle.saturating_mul(2).saturating_add(2)).unwrap_or(u32::MAX)
}

/// What settle knew about a file it rotated out.
#[derive(Debug, Clone, Copy)]
pub(super) struct Remembered {
    /// Its last snapshot.
    pub stamp: Stamp,
    /// Since when it was unchanged (or last found held open).
    pub stable_since: Instant,
    /// When settle first saw it.
    pub first_seen: Instant,
    /// Looks that found it not ready.
    pub looks: u32,
    /// Since when it was found held open for writing, unchanged (with this snapshot).
    pub held: Option<Instant>,
    /// Forgotten after this.
    until: Instant,
}

impl Remembered {
    /// What to keep of `pending`, found held open since `held` (with the snapshot it had then),
    /// until `until`.
    pub(super) fn of(pending: &Pending, held: Option<(Instant, Stamp)>, until: Instant) -> Self {
        Remembered {
            stamp: pending.snapshot,
            stable_since: pending.stable_since,
            first_seen: pending.first_seen,
            looks: pending.looks,
            held: held.and_then(|(since, seen)| (seen == pending.snapshot).then_some(since)),
            until,
        }
    }
}

/// How long a file of a root configured as `w` is remembered once rotated out: its longest
/// quiet time and two reconcile intervals (the listing that offers it again comes within one).
pub(super) fn remember_for(w: &WatchConfig) -> Duration {
    w.settle
        .max(w.settle_empty)
        .max(w.save_temp_settle)
        .max(w.held_open_limit)
        .saturating_add(w.reconcile_interval.saturating_mul(2))
}

/// Files rotated out, by a hash of their path (see the module docs).
pub(super) struct Memory {
    by_key: HashMap<u64, Remembered>,
    hasher: RandomState,
    cap: usize,
}

impl Memory {
    /// Keeps at most `cap` files.
    pub(super) fn new(cap: usize) -> Self {
        Memory {
            by_key: HashMap::new(),
            hasher: RandomState::new(),
            cap,
        }
    }

    /// Remembers `path` as `r`; false if full (after forgetting the files whose time is up).
    pub(super) fn remember(&mut self, path: &Path, r: Remembered, now: Instant) -> bool {
        if self.by_key.len() >= self.cap {
            self.by_key.retain(|_, r| r.until > now);
        }
        if self.by_key.len() >= self.cap {
            return false;
        }
        self.by_key.insert(self.hasher.hash_one(path), r);
        true
    }

    /// What was remembered of `path`, now forgotten (it is watched again); none if its time is
    /// up at `now`.
    pub(super) fn recall(&mut self, path: &Path, now: Instant) -> Option<Remembered> {
        if self.by_key.is_empty() {
            return None;
        }
        self.by_key
            .remove(&self.hasher.hash_one(path))
            .filter(|r| r.until > now)
    }

    /// Files remembered.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// The next candidate of a root with room, reading the roots' channels in turn from `first`;
/// `None` once every channel is closed and empty (the watcher is gone).
pub(super) fn poll_candidates(
    cx: &mut Context<'_>,
    receivers: &mut [mpsc::Receiver<Candidate>],
    settler: &Settler,
    first: &mut usize,
) -> Poll<Option<Candidate>> {
    if receivers.iter().all(|rx| rx.is_closed() && rx.is_empty()) {
        return Poll::Ready(None);
    }
    let n = receivers.len();
    for k in 0..n {
        let i = (*first + k) % n;
        if !settler.has_room(RootId(i)) {
            continue;
        }
        if let Some(rx) = receivers.get_mut(i)
            && let Poll::Ready(Some(candidate)) = rx.poll_recv(cx)
        {
            *first = (i + 1) % n;
            return Poll::Ready(Some(candidate));
        }
    }
    Poll::Pending
}

impl Settler {
    /// For each root at its share whose channel has candidates waiting (`backlogged`, in the
    /// roots' order): forgets up to a quarter of its share of its longest-waiting files among
    /// those past their [`patience`], remembering their times (see the module docs).
    pub(super) fn rotate(&mut self, backlogged: &[bool], now: Instant) {
        for (i, _) in backlogged.iter().enumerate().filter(|(_, b)| **b) {
            let root = RootId(i);
            let Some(w) = self.config_of(root) else {
                continue;
            };
            if self.has_room(root) {
                continue;
            }
            let (patience, until) = (patience(w, self.tick), now + remember_for(w));
            let mut stuck: Vec<(Instant, &PathBuf)> = self
                .pending
                .iter()
                .filter(|(_, p)| p.root == root && p.looks >= patience)
                .map(|(path, p)| (p.first_seen, path))
                .collect();
            stuck.sort_unstable();
            stuck.truncate((self.share / 4).max(1));
            let stuck: Vec<PathBuf> = stuck.into_iter().map(|(_, p)| p.clone()).collect();
            for path in stuck {
                let Some(pending) = self.pending.remove(&path) else {
                    continue;
                };
                let held = self.held.remove(&path);
                self.memory
                    .remember(&path, Remembered::of(&pending, held, until), now);
                if let Some(n) = self.waiting.get_mut(i) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }

    /// Starts watching `path` (first stat'ed now as `pending`), going on from what settle knew of
    /// it if it was rotated out: handed on at once if it has been quiet for long enough since.
    pub(super) fn watch_again(
        &mut self,
        path: PathBuf,
        mut pending: Pending,
        now: Instant,
    ) -> Option<Settled> {
        if let Some(r) = self.memory.recall(&path, now) {
            pending.first_seen = r.first_seen;
            pending.looks = r.looks;
            if r.stamp == pending.snapshot {
                pending.stable_since = r.stable_since;
                if let Some(since) = r.held {
                    self.held.insert(path.clone(), (since, r.stamp));
                }
                if pending.observe(r.stamp, now) == Decision::Ready {
                    return Some(Settled {
                        root: pending.root,
                        path,
                        rel_path: pending.rel_path,
                        stamp: r.stamp,
                        held_open: false,
                    });
                }
            }
        }
        self.pending.insert(path, pending);
        None
    }
}
