//! A file settle watches for quiet (rules 1 and 2 of the completion rule in the stage's docs):
//! its last snapshot, since when it has not changed, and the quiet time its root asks for.

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::WatchConfig;
use crate::fsops::Stamp;
use crate::root::RootId;

/// The outcome of one observation of a pending file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Changed recently, or not quiet for long enough yet.
    Wait,
    /// Unchanged for at least the settle time.
    Ready,
}

/// How long a file must stay unchanged: rules 1 and 2 of the stage's docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quiet {
    /// For a file with content.
    pub settle: Duration,
    /// For an empty file (never less than `settle`).
    pub empty: Duration,
}

impl Quiet {
    /// The root's rule.
    pub(crate) fn of(w: &WatchConfig) -> Self {
        Quiet {
            settle: w.settle,
            empty: w.settle_empty.max(w.settle),
        }
    }

    /// The quiet time a file of `size` bytes needs.
    fn needed(self, size: u64) -> Duration {
        if size == 0 { self.empty } else { self.settle }
    }
}

/// A file being watched for quiet.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// Its root.
    pub root: RootId,
    /// Path relative to the root.
    pub rel_path: PathBuf,
    /// The last snapshot seen.
    pub snapshot: Stamp,
    /// When the last change was seen (or the file first seen, or last found held open).
    pub stable_since: Instant,
    /// The root's quiet times.
    pub quiet: Quiet,
    /// When settle first saw it (kept while it is rotated out of its root's share, see
    /// `share.rs`).
    pub first_seen: Instant,
    /// Looks that found it not ready yet.
    pub looks: u32,
}

impl Pending {
    /// Starts watching a file first seen at `now` with `snapshot`.
    pub(crate) fn new(
        root: RootId,
        rel_path: PathBuf,
        snapshot: Stamp,
        now: Instant,
        quiet: Quiet,
    ) -> Self {
        Pending {
            root,
            rel_path,
            snapshot,
            stable_since: now,
            quiet,
            first_seen: now,
            looks: 0,
        }
    }

    /// Records a new observation: any change restarts the quiet period.
    pub(crate) fn observe(&mut self, snapshot: Stamp, now: Instant) -> Decision {
        if snapshot != self.snapshot {
            self.snapshot = snapshot;
            self.stable_since = now;
        } else if now.saturating_duration_since(self.stable_since)
            >= self.quiet.needed(snapshot.size)
        {
            return Decision::Ready;
        }
        self.looks = self.looks.saturating_add(1);
        Decision::Wait
    }
}
