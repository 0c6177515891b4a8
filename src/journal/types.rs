//! The journal's vocabulary: the typed states and their transition table ([`FileState`]), the
//! verdicts and outcomes, the record read back ([`FileRecord`]), what callers hand in
//! ([`NewClaim`], [`Decision`]) and get back ([`HashedAs`], [`Summary`]), and [`JournalError`].
//!
//! What this file does not do: SQL. The `as_str` names are the on-disk values; `schema.rs` maps
//! rows to these types and the `ops_*` files enforce the transitions.

use std::path::PathBuf;
use std::sync::Arc;

pub use crate::fsops::Stamp;
use crate::scanner::{ScanId, ScanState};

/// A journal failure.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The database could not be opened or created.
    #[error("cannot open the journal {path}: {source}")]
    Open {
        /// Database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The state folder could not be created.
    #[error("cannot create the state folder {path}: {source}")]
    Dir {
        /// The folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A statement failed (disk full, I/O error, corruption).
    #[error("journal {about}: {source}")]
    Sqlite {
        /// What was being done.
        about: &'static str,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A record was not in the state an operation expects (a bug, or a concurrent instance).
    #[error("journal record {id}: {detail}")]
    Conflict {
        /// The record.
        id: FileId,
        /// What was expected.
        detail: String,
    },
    /// The transaction could not be committed (disk full, I/O error): nothing of it happened.
    #[error("journal commit failed: {source}")]
    Commit {
        /// Why the transaction did not reach the disk.
        source: CommitFailure,
    },
    /// The journal thread has stopped.
    #[error("the journal is closed")]
    Closed,
}

/// Why a transaction's work did not reach the disk. One value answers every operation of the
/// transaction, hence the shared SQLite error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitFailure {
    /// `BEGIN` failed: no transaction was had.
    #[error("{0}")]
    Begin(Arc<rusqlite::Error>),
    /// The operation's savepoint could not be opened.
    #[error("{0}")]
    Savepoint(Arc<rusqlite::Error>),
    /// SQLite rolled the transaction back on its own.
    #[error("the transaction was rolled back by SQLite (disk full or I/O error?)")]
    RolledBack,
    /// `COMMIT` failed.
    #[error("{0}")]
    Commit(Arc<rusqlite::Error>),
}

impl JournalError {
    /// Wraps an SQLite error with what was being done (for `map_err`).
    pub(super) fn sql(about: &'static str) -> impl FnOnce(rusqlite::Error) -> Self {
        move |source| JournalError::Sqlite { about, source }
    }

    /// Whether the disk refused the write (full, I/O error, read-only), as opposed to a refusal
    /// of the operation itself: such a failure ends when space returns.
    pub fn is_storage(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            JournalError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(C::DiskFull | C::SystemIoFailure | C::ReadOnly | C::CannotOpen)
            ),
            JournalError::Commit { .. } => true,
            _ => false,
        }
    }
}

/// A record's id.
pub type FileId = i64;

/// Where a record stands. Stored as text; the `as_str` names are the on-disk values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileState {
    /// Moved into staging (or about to be: the record is written first).
    Claimed,
    /// SHA-256 known; waiting for an upload slot.
    Hashed,
    /// Same content as another record in flight: waits for its verdict.
    Waiting,
    /// A scanId is chosen and the POST may have reached the server. With no SHA-256 yet, the
    /// file is being owned while it is uploaded (the tee, [`crate::journal::Journal::teeing`]).
    Submitting,
    /// The server accepted the scan; waiting for a verdict.
    Submitted,
    /// The outcome is decided and durable; the file is not yet placed.
    Decided,
    /// The exact destination path is chosen; the move may have happened.
    Placing,
    /// The file is in its destination; the server result may still need a DELETE.
    Placed,
    /// Finished.
    Done,
}

impl FileState {
    /// Every state, in pipeline order.
    pub const ALL: [FileState; 9] = [
        FileState::Claimed,
        FileState::Hashed,
        FileState::Waiting,
        FileState::Submitting,
        FileState::Submitted,
        FileState::Decided,
        FileState::Placing,
        FileState::Placed,
        FileState::Done,
    ];

    /// Every state but `done`: the records work is still due on.
    pub const UNFINISHED: [FileState; 8] = [
        FileState::Claimed,
        FileState::Hashed,
        FileState::Waiting,
        FileState::Submitting,
        FileState::Submitted,
        FileState::Decided,
        FileState::Placing,
        FileState::Placed,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            FileState::Claimed => "claimed",
            FileState::Hashed => "hashed",
            FileState::Waiting => "waiting",
            FileState::Submitting => "submitting",
            FileState::Submitted => "submitted",
            FileState::Decided => "decided",
            FileState::Placing => "placing",
            FileState::Placed => "placed",
            FileState::Done => "done",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The table of allowed transitions: every state a record in `self` may move to. Each journal
    /// operation also checks its own, narrower list of source states.
    pub fn next_states(self) -> &'static [FileState] {
        use FileState::{
            Claimed, Decided, Done, Hashed, Placed, Placing, Submitted, Submitting, Waiting,
        };
        match self {
            // Hashed, waiting for a twin, decided without a scan (reused, unreadable), vanished,
            // or owned while it is uploaded (the tee: `submitting` with no hash yet).
            Claimed => &[Hashed, Waiting, Decided, Done, Submitting],
            // Submitted, failed (too large), changed (hashed again), vanished.
            Hashed => &[Submitting, Decided, Claimed, Done],
            // Promoted (primary left), decided with the primary, vanished.
            Waiting => &[Hashed, Decided, Done],
            // Accepted, not accepted (back to hashed), refused (decided), changed, vanished.
            Submitting => &[Submitted, Hashed, Decided, Claimed, Done],
            // Verdict, error/timeout (back to hashed), changed, vanished.
            Submitted => &[Decided, Hashed, Claimed, Done],
            // Placed, changed before the move (scanned again), vanished.
            Decided => &[Placing, Claimed, Done],
            // Another name, moved, vanished.
            // Another name, moved, changed before the move (the target is journaled before the
            // staged file is checked: scanned again), vanished.
            Placing => &[Placing, Placed, Claimed, Done],
            // The server's result is deleted.
            Placed => &[Done],
            Done => &[],
        }
    }

    /// Whether a record in `self` may move to `to` (see [`FileState::next_states`]).
    pub fn can_become(self, to: FileState) -> bool {
        self.next_states().contains(&to)
    }

    /// Whether the outcome is decided (decided, placing, placed, done): a verdict journaled here
    /// never changes again.
    pub fn is_decided(self) -> bool {
        matches!(
            self,
            FileState::Decided | FileState::Placing | FileState::Placed | FileState::Done
        )
    }
}

/// The scan verdicts the journal records: the two final KATA states that decide a file. (`error`
/// and `timeout` never decide a file: it is scanned again or fails without a verdict.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScanVerdict {
    /// `detect`: quarantine.
    Detect,
    /// `not detected`: clean, for the exact bytes uploaded.
    NotDetected,
}

impl ScanVerdict {
    /// The stored name: the KATA state as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ScanVerdict::Detect => "detect",
            ScanVerdict::NotDetected => "not detected",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "detect" => Some(ScanVerdict::Detect),
            "not detected" => Some(ScanVerdict::NotDetected),
            _ => None,
        }
    }

    /// The verdict a final scan state gives, if any (`error` and `timeout` give none).
    pub fn from_state(state: &ScanState) -> Option<Self> {
        match state {
            ScanState::Detect => Some(ScanVerdict::Detect),
            ScanState::NotDetected => Some(ScanVerdict::NotDetected),
            _ => None,
        }
    }

    /// Where a file with this verdict goes.
    pub fn outcome(self) -> Outcome {
        match self {
            ScanVerdict::Detect => Outcome::Quarantine,
            ScanVerdict::NotDetected => Outcome::Clean,
        }
    }
}

impl serde::Serialize for ScanVerdict {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Where a file ends up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// `not detected` for the exact bytes uploaded.
    Clean,
    /// `detect`.
    Quarantine,
    /// Anything else, with a reason.
    Failed,
    /// The file left staging before it was placed (removed by hand, say): nothing was placed
    /// anywhere. Only ever on `done` records ([`Journal::close_vanished`](super::Journal::close_vanished)).
    Vanished,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 4] = [
        Outcome::Clean,
        Outcome::Quarantine,
        Outcome::Failed,
        Outcome::Vanished,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Clean => "clean",
            Outcome::Quarantine => "quarantine",
            Outcome::Failed => "failed",
            Outcome::Vanished => "vanished",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// One file's record.
#[derive(Debug, Clone)]
pub struct FileRecord {
    /// Id.
    pub id: FileId,
    /// The watched root it came from (absolute).
    pub root: PathBuf,
    /// Its path relative to the root when it was dropped.
    pub rel_path: PathBuf,
    /// Its path in staging.
    pub staged: PathBuf,
    /// Where it stands.
    pub state: FileState,
    /// Size and stamp when hashed.
    pub stamp: Option<Stamp>,
    /// SHA-256 of its content.
    pub sha256: Option<[u8; 32]>,
    /// The current (or last) scanId.
    pub scan_id: Option<ScanId>,
    /// Every scanId used for it, oldest first.
    pub scan_ids: Vec<ScanId>,
    /// Scans the server accepted for it.
    pub attempts: u32,
    /// When the current scan was submitted (ms since the epoch).
    pub submitted_at_ms: Option<i64>,
    /// The decided outcome.
    pub outcome: Option<Outcome>,
    /// The verdict that decided it, if any (a stored name this version does not know reads as
    /// none).
    pub verdict: Option<ScanVerdict>,
    /// The SHA-256 the verdict applies to (the bytes uploaded).
    pub verdict_sha256: Option<[u8; 32]>,
    /// Why it failed, or a note.
    pub reason: Option<String>,
    /// The verdict was reused from an earlier scan of the same content.
    pub reused: bool,
    /// Its destination path, once chosen.
    pub dest: Option<PathBuf>,
    /// The destination root `dest` was chosen in (`None`: chosen by a version that did not
    /// record it).
    pub dest_root: Option<PathBuf>,
    /// The (dev, ino) of the staging folder it was moved into at the claim (`None`: claimed by
    /// a version that did not record it).
    pub staging_folder: Option<(u64, u64)>,
    /// When it was claimed (ms).
    pub claimed_at_ms: i64,
    /// When it was last changed (ms).
    pub updated_at_ms: i64,
    /// When the drop was complete: the file's last change in the inbox (ms), if known.
    pub dropped_at_ms: Option<i64>,
}

impl FileRecord {
    /// The journaled verdict, typed (`None`: no verdict, or a name this version does not know).
    pub fn scan_verdict(&self) -> Option<ScanVerdict> {
        self.verdict
    }

    /// Whether this record may be released as clean: its outcome is clean, its verdict is
    /// `not detected`, and that verdict was given for exactly the content hashed (the SHA-256 of
    /// the bytes uploaded equals the record's SHA-256). Anything else must not reach the clean
    /// folder.
    pub fn is_clean_verdict_for_content(&self) -> bool {
        self.outcome == Some(Outcome::Clean)
            && self.scan_verdict() == Some(ScanVerdict::NotDetected)
            && self.sha256.is_some()
            && self.verdict_sha256 == self.sha256
    }
}

/// What a new claim records.
#[derive(Debug, Clone)]
pub struct NewClaim {
    /// The watched root.
    pub root: PathBuf,
    /// Relative path in the inbox.
    pub rel_path: PathBuf,
    /// Destination in staging.
    pub staged: PathBuf,
    /// The file's last change in the inbox (ms), if known.
    pub dropped_at_ms: Option<i64>,
    /// The (dev, ino) of the staging folder it is moved into, if known.
    pub staging_folder: Option<(u64, u64)>,
}

/// A decision to journal.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Where it goes.
    pub outcome: Outcome,
    /// The scan verdict that decided it, if one did.
    pub verdict: Option<ScanVerdict>,
    /// The SHA-256 the verdict applies to.
    pub verdict_sha256: Option<[u8; 32]>,
    /// Why (for failed), or a note.
    pub reason: Option<String>,
    /// Whether files waiting on the same content get the same decision. True for verdicts and for
    /// content failures (too large, attempts exhausted); false for failures of this one file
    /// (unreadable), after which a waiting file is submitted on its own.
    pub propagate: bool,
    /// For failures: the kind (the `reason` label of `dropscan_files_failed_total`).
    pub kind: Option<FailureKind>,
}

/// Why a file failed, as a bounded set: the `reason` label of the failure counter. Each kind is
/// one variant of `FileError` (whose text, with the file's details, is the journaled reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The filesystem refused (unreadable, not a regular file, hard-linked, changed, …).
    Filesystem,
    /// Larger than the server's limit (known before the upload, or answered 413).
    TooLarge,
    /// The server refused the upload for good (another 4xx).
    Rejected,
    /// Every attempt ended with `error` or `timeout`.
    ScanFailed,
    /// No final answer within `scan_timeout`.
    NoVerdict,
    /// The staged file disappeared.
    Vanished,
}

impl FailureKind {
    /// Every kind, in the order of [`FailureKind::index`].
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Filesystem,
        FailureKind::TooLarge,
        FailureKind::Rejected,
        FailureKind::ScanFailed,
        FailureKind::NoVerdict,
        FailureKind::Vanished,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Filesystem => "filesystem",
            FailureKind::TooLarge => "too_large",
            FailureKind::Rejected => "rejected",
            FailureKind::ScanFailed => "scan_failed",
            FailureKind::NoVerdict => "no_verdict",
            FailureKind::Vanished => "vanished",
        }
    }

    /// Its position in [`FailureKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl Decision {
    /// A scan verdict for the content whose SHA-256 (of the bytes uploaded) is `sha256`, shared
    /// with files of the same content.
    pub fn from_verdict(verdict: ScanVerdict, sha256: [u8; 32]) -> Self {
        Decision {
            outcome: verdict.outcome(),
            verdict: Some(verdict),
            verdict_sha256: Some(sha256),
            reason: None,
            propagate: true,
            kind: None,
        }
    }

    /// A failure for `reason` (a typed error, never pre-formatted text: the journal stores
    /// its message), shared with files of the same content when `propagate`.
    pub fn failed(reason: &dyn std::error::Error, propagate: bool) -> Self {
        Decision {
            outcome: Outcome::Failed,
            verdict: None,
            verdict_sha256: None,
            reason: Some(reason.to_string()),
            propagate,
            kind: None,
        }
    }

    /// [`Decision::failed`], of a known kind (counted by it).
    pub fn failed_as(kind: FailureKind, reason: &dyn std::error::Error, propagate: bool) -> Self {
        Decision {
            kind: Some(kind),
            ..Decision::failed(reason, propagate)
        }
    }
}

/// Result of recording a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashedAs {
    /// To be uploaded.
    Hashed,
    /// Same content already in flight: waits for its verdict.
    Waiting,
    /// A recent verdict for the same content was reused.
    Reused(Outcome),
}

/// Counts and ages for `dropscan status` and metrics.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Records per state (done included).
    pub per_state: Vec<(String, i64)>,
    /// Finished records per outcome.
    pub per_outcome: Vec<(String, i64)>,
    /// The oldest unfinished record: its relative path and claim time (ms).
    pub oldest_pending: Option<(PathBuf, i64)>,
    /// Unfinished records per watched folder (inbox): the folder, how many, the oldest claim
    /// time (ms).
    pub pending_by_root: Vec<(PathBuf, i64, i64)>,
    /// The latest errors, newest first: time (ms) and text.
    pub last_errors: Vec<(i64, String)>,
}
