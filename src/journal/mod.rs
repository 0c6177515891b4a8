//! The journal: the durable state machine that survives kill -9 and power loss.
//!
//! One SQLite database (WAL mode, `synchronous = FULL`, bundled library) in `[state].dir` holds a
//! record per claimed file. Every transition is committed *before* the side effect that depends on
//! it, so that after a crash the record always says enough to finish the job without doing a step
//! twice:
//!
//! ```text
//!   claimed ──hash──▶ hashed ──POST──▶ submitting(scanId) ──200──▶ submitted ──verdict──▶ decided
//!      │                 │  ▲                                          │   (error/timeout: back to hashed)
//!      │                 │  └──────────── 429 / 5xx / transport ───────┘
//!      │                 └─ same SHA-256 in flight ─▶ waiting ─(primary decided)─▶ decided
//!      └─ unreadable, hard link, verdict reused ─────────────────────────────────▶ decided
//!   decided ──▶ placing(dest) ──rename──▶ placed ──DELETE result──▶ done
//!   (file changed: hashed/submitting/submitted/decided ──▶ claimed; gone: any unplaced ──▶ done)
//! ```
//!
//! **The journal is the state machine.** Every operation checks the record's state against its
//! own list of source states and against [`FileState::can_become`], the one table of allowed
//! transitions; a record in any other state is refused with [`JournalError::Conflict`] and left
//! unchanged. States and outcomes are typed ([`FileState`], [`Outcome`], [`ScanVerdict`]) and bound
//! into SQL as parameters from their `as_str` names, never spelled as string literals in queries.
//!
//! **A verdict is decided once.** A record that is already decided (or placed, or done) is never
//! overwritten by a later decision. A *contradicting* server answer for it (`detect` after
//! `not detected`, or the reverse) is a server anomaly: it is logged and kept in the error history,
//! and resolved fail-closed. `detect` wins while the file is still in staging (a record decided
//! clean and not yet placing flips to quarantine, with every other unplaced record of the same
//! content); a file already placing or placed stays where it is and the anomaly says so. The
//! verdict cache (reuse of a verdict for the same SHA-256) never replaces `detect` by
//! `not detected` either.
//!
//! **Clocks.** The journal's times (`claimed_at`, `updated_at`, `submitted_at`, `decided_at`) are
//! wall-clock milliseconds for people and for history; no timeout is computed from them (the
//! stages keep monotonic `tokio::time::Instant` deadlines). The one wall-clock rule that must
//! survive restarts, the verdict TTL, fails closed against clock jumps: a cached verdict whose
//! `decided_at` lies in the future (the clock went back) is never reused, and is pruned.
//!
//! Why SQLite rather than redb: the journal is also read by `dropscan status` while the daemon
//! runs (WAL gives concurrent readers in another process for free), its crash behaviour is the
//! best-studied of any embedded store, and ad-hoc queries ("oldest pending file") are one line.
//!
//! All writes go through one thread that owns the connection. It takes every operation that is
//! waiting, runs each inside its own SAVEPOINT (a failing operation rolls back alone), and commits
//! them in one transaction: *group commit*, so that a burst of thousands of files costs a handful
//! of fsyncs. An operation's caller is answered only after the COMMIT is durable. If SQLite rolls
//! the whole transaction back on its own (disk full, I/O error), every operation of the batch run
//! so far is answered as failed, and the operations not yet run go into a fresh transaction:
//! what a caller is told always matches what is on disk.
//!
//! ## The journal as the bus
//!
//! The messages on the stages' channels carry little more than a record id; what a file *is* (its
//! state, hash, scanId, outcome, destination) lives here. A message is sent only after the state
//! it announces is committed (durable before announce), so a message that is lost (a full
//! channel, a failed send, a crash) loses no work: each stage also sweeps the journal for records
//! in the state it consumes that no message brought it.
//!
//! | Writes the state | State(s) | Swept by | Why the sweep |
//! |---|---|---|---|
//! | claim ([`Journal::claim`]) | `claimed` | claim, [`Journal::stuck_claimed`] | the write after hashing failed (disk full): hash again without a restart |
//! | claim ([`Journal::hashed`]), poll (`error`/`timeout`) | `hashed`, `waiting` | upload, [`Journal::in_states`] and [`Journal::promote_orphaned_waiting`] | a record no queue holds; a twin whose primary left |
//! | upload ([`Journal::submitting`], [`Journal::submitted`]) | `submitting`, `submitted` | start-up reconciliation (`app`) | the POST's fate is known only to the server |
//! | poll (verdicts), upload and claim (failures, reused verdicts) ([`Journal::decide`], [`Journal::hashed`]) | `decided` | sort, [`Journal::in_states`] | a verdict whose message was lost; a contradicting `detect` that flipped a clean record |
//! | sort ([`Journal::placing`], [`Journal::placed`]) | `placing`, `placed` | sort (`placed`), start-up reconciliation (`placing`) | the DELETE on the server still due; a move cut short by a crash |
//! | claim ([`Journal::retain`]), start-up | `retained` table | claim, [`Journal::retained`] | an original kept until `keep_original` has passed unchanged, or sent back to the inbox changed |
//! | poll, through [`Journal::decide`] (a `detect` for content already released as clean) | `anomalies` table | poll ([`Journal::announce_anomalies`]), `dropscan anomalies` | a contradiction the SOC must see, hook events not queued yet |
//! | upload, poll, sort, start-up (abandoned scanIds: `resend`, `resubmit`, `rehash`, `stale_scan`) | `stale_scans` table | poll, [`Journal::stale_scans`] | results nobody needs any more, deleted on the server |
//!
//! ## Layout
//!
//! - `types.rs`: the vocabulary ([`FileState`] and its transition table, [`Outcome`],
//!   [`ScanVerdict`], [`FileRecord`], [`Decision`], [`JournalError`], …);
//! - `schema.rs`: the SQL schema, the connection, row mapping, the transition helpers;
//! - `writer.rs`: the group-commit thread; `Journal::run`, private to this module, is the only
//!   way to the connection: the rest of the crate sees operations;
//! - `ops_claim.rs`, `ops_submit.rs`, `ops_decide.rs`, `ops_place.rs`, `ops_maint.rs`: the
//!   operations, by pipeline stage (claim and hash; submit and poll; decide; place and done, and
//!   reading records; stale scans, errors, pruning and the summary);
//! - `ops_audit.rs`: the quarantine and failed tools: kept files, custody, audit records;
//! - `ops_hooks.rs`: the queue of notifications (`[[hook]]`), filled with the placement;
//! - `ops_anomaly.rs`: verdicts contradicted after release, written with the decision,
//!   announced by the poller (`anomaly` hook events), listed by `dropscan anomalies`;
//! - `ops_retain.rs`: users' originals kept in staging beside their copy where no lease could
//!   be had (see `fsops::own`), swept by the claim stage;
//! - `ops_capacity.rs`: the server capacity learned by the limits and their snapshot for
//!   `dropscan status`, in the `meta` table;
//! - `testing.rs`: a test hook (raw access for integration tests that simulate a clock jump or a
//!   rollback by SQLite), hidden from the docs and never used by the daemon.
//!
//! What this module does not do: touch files or the network. The stages do that, in the order the
//! journal allows.

mod ops_anomaly;
mod ops_audit;
mod ops_capacity;
mod ops_claim;
mod ops_decide;
mod ops_hooks;
mod ops_maint;
mod ops_place;
mod ops_retain;
mod ops_submit;
mod schema;
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod testing;
#[cfg(test)]
mod tests;
mod types;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

pub use ops_anomaly::Anomaly;
pub use ops_audit::{AuditEntry, Custody, CustodyPlan, Interrupted, Kept};
pub use ops_capacity::read_capacity_snapshot;
pub use ops_hooks::{HookEvent, NewHookEvent, RETRY_HORIZON};
pub use ops_maint::read_summary;
pub use ops_place::PlacingRow;
pub use ops_retain::Retained;
pub use types::{
    CommitFailure, Decision, FailureKind, FileId, FileRecord, FileState, HashedAs, JournalError,
    NewClaim, Outcome, ScanVerdict, Stamp, Summary,
};

use schema::open_connection;
use writer::{OPS_CAPACITY, Op, serve};

/// Handle to the journal; cheap to clone. The connection lives on a dedicated thread, and every
/// reader and writer goes through the operations below (grouped by pipeline stage in the
/// `ops_*` files); no caller outside this module sees the connection.
#[derive(Clone)]
pub struct Journal {
    ops_tx: mpsc::Sender<Op>,
    path: PathBuf,
    health: Arc<WriteHealth>,
}

/// Whether the journal takes writes: set failing by a write that the disk refused (full, I/O
/// error), and announced as recovered by the first commit that writes after that, so that the
/// stages offer again at once what waited for it (inbox files not claimed, records left
/// `claimed`) instead of at their next periodic look.
pub(crate) struct WriteHealth {
    failing: std::sync::atomic::AtomicBool,
    recovered: tokio::sync::watch::Sender<u64>,
    tally: Arc<Tally>,
}

/// What the journal counts for the metrics, since it was opened: refused writes and the fate
/// of hook deliveries (the hook runner reports each through the journal, so it is counted here
/// without the runner knowing of metrics).
#[derive(Debug, Default)]
pub struct Tally {
    /// Writes (transactions) the disk refused: full, I/O error.
    pub write_errors: std::sync::atomic::AtomicU64,
    /// Hook events delivered.
    pub hooks_delivered: std::sync::atomic::AtomicU64,
    /// Hook deliveries that failed and will be tried again.
    pub hooks_failed: std::sync::atomic::AtomicU64,
    /// Hook events given up on after their last attempt.
    pub hooks_given_up: std::sync::atomic::AtomicU64,
    /// Files decided failed, by [`FailureKind::index`] (those sharing the content included).
    pub failed: [std::sync::atomic::AtomicU64; FailureKind::ALL.len()],
}

impl WriteHealth {
    /// A write failed for lack of space or an I/O error.
    pub(crate) fn failed(&self) {
        self.tally
            .write_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.failing
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// A commit that wrote succeeded: announces a recovery if writes were failing.
    pub(crate) fn wrote(&self) {
        if self
            .failing
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::info!("the journal takes writes again: offering what waited for it");
            self.recovered.send_modify(|n| *n += 1);
        }
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Journal {
    /// Opens (or creates) the journal at `path` and starts its thread.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let conn = open_connection(path)?;
        let (ops_tx, ops_rx) = mpsc::channel::<Op>(OPS_CAPACITY);
        let health = Arc::new(WriteHealth {
            failing: std::sync::atomic::AtomicBool::new(false),
            recovered: tokio::sync::watch::Sender::new(0),
            tally: Arc::default(),
        });
        let h = Arc::clone(&health);
        std::thread::Builder::new()
            .name("dropscan-journal".into())
            .spawn(move || serve(&conn, ops_rx, &h))
            .map_err(|source| JournalError::Dir {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Journal {
            ops_tx,
            path: path.to_path_buf(),
            health,
        })
    }

    /// Changes each time the journal takes writes again after the disk refused one (full, I/O
    /// error): the moment to offer again what waited for it.
    pub fn recovered(&self) -> tokio::sync::watch::Receiver<u64> {
        self.health.recovered.subscribe()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its counters (refused writes, hook deliveries), shared for the metrics.
    pub fn tally(&self) -> Arc<Tally> {
        Arc::clone(&self.health.tally)
    }
}
