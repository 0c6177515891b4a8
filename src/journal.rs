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
//! What this module does not do: touch files or the network. The stages do that, in the order the
//! journal allows. Who reads what it carries between stages: the claim sweep reads
//! [`Journal::stuck_claimed`], the upload sweep reads `hashed` records, the sorter's sweep reads
//! `decided` and `placed` records, and the poller reads `stale_scans`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, params};
use tokio::sync::{mpsc, oneshot};

/// How many waiting operations one transaction takes at most.
const GROUP_COMMIT_MAX: usize = 1024;
/// Capacity of the queue of operations waiting for the journal thread. Full: callers wait.
const OPS_CAPACITY: usize = 4096;
/// Done records older than this are pruned.
pub const DEFAULT_HISTORY: Duration = Duration::from_secs(7 * 24 * 3600);
/// How many recent errors are kept for `dropscan status`.
const ERRORS_KEPT: i64 = 200;

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
    #[error("journal commit failed: {message}")]
    Commit {
        /// SQLite's message.
        message: String,
    },
    /// The journal thread has stopped.
    #[error("the journal is closed")]
    Closed,
}

impl JournalError {
    fn sql(about: &'static str) -> impl FnOnce(rusqlite::Error) -> Self {
        move |source| JournalError::Sqlite { about, source }
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
    /// A scanId is chosen and the POST may have reached the server.
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
            // Hashed, waiting for a twin, decided without a scan (reused, unreadable), or vanished.
            Claimed => &[Hashed, Waiting, Decided, Done],
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

    /// Where a file with this verdict goes.
    pub fn outcome(self) -> Outcome {
        match self {
            ScanVerdict::Detect => Outcome::Quarantine,
            ScanVerdict::NotDetected => Outcome::Clean,
        }
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
    /// anywhere. Only ever on `done` records ([`Journal::close_vanished`]).
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

/// The size and change stamp of a staged file, as hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch.
    pub ctime_ns: i64,
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
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
    pub scan_id: Option<String>,
    /// Every scanId used for it, oldest first.
    pub scan_ids: Vec<String>,
    /// Scans the server accepted for it.
    pub attempts: u32,
    /// When the current scan was submitted (ms since the epoch).
    pub submitted_at_ms: Option<i64>,
    /// The decided outcome.
    pub outcome: Option<Outcome>,
    /// The KATA state that decided it (`detect`, `not detected`, …), if any.
    pub verdict: Option<String>,
    /// The SHA-256 the verdict applies to (the bytes uploaded).
    pub verdict_sha256: Option<[u8; 32]>,
    /// Why it failed, or a note.
    pub reason: Option<String>,
    /// The verdict was reused from an earlier scan of the same content.
    pub reused: bool,
    /// Its destination path, once chosen.
    pub dest: Option<PathBuf>,
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
        self.verdict.as_deref().and_then(ScanVerdict::parse)
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
        }
    }

    /// A failure with a reason, shared with files of the same content.
    pub fn failed(reason: impl Into<String>, propagate: bool) -> Self {
        Decision {
            outcome: Outcome::Failed,
            verdict: None,
            verdict_sha256: None,
            reason: Some(reason.into()),
            propagate,
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
    /// The latest errors, newest first: time (ms) and text.
    pub last_errors: Vec<(i64, String)>,
}

type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
type Op = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

/// Handle to the journal; cheap to clone. The connection lives on a dedicated thread.
#[derive(Clone)]
pub struct Journal {
    ops_tx: mpsc::Sender<Op>,
    path: PathBuf,
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id              INTEGER PRIMARY KEY,
    root            BLOB NOT NULL,
    rel_path        BLOB NOT NULL,
    staged          BLOB NOT NULL UNIQUE,
    state           TEXT NOT NULL,
    size            INTEGER,
    mtime_ns        INTEGER,
    ctime_ns        INTEGER,
    dev             INTEGER,
    ino             INTEGER,
    sha256          BLOB,
    scan_id         TEXT,
    scan_ids        TEXT NOT NULL DEFAULT '',
    attempts        INTEGER NOT NULL DEFAULT 0,
    submitted_at    INTEGER,
    outcome         TEXT,
    verdict         TEXT,
    verdict_sha256  BLOB,
    reason          TEXT,
    reused          INTEGER NOT NULL DEFAULT 0,
    dest            BLOB,
    dropped_at      INTEGER,
    claimed_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_state ON files(state);
CREATE INDEX IF NOT EXISTS files_sha ON files(sha256) WHERE sha256 IS NOT NULL;
CREATE INDEX IF NOT EXISTS files_scan ON files(scan_id) WHERE scan_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS verdicts (
    sha256      BLOB PRIMARY KEY,
    outcome     TEXT NOT NULL,
    verdict     TEXT NOT NULL,
    scan_id     TEXT NOT NULL,
    decided_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stale_scans (scan_id TEXT PRIMARY KEY, added_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS errors (id INTEGER PRIMARY KEY, at INTEGER NOT NULL, text TEXT NOT NULL);
";

const SCHEMA_VERSION: &str = "1";

const COLUMNS: &str = "id, root, rel_path, staged, state, size, mtime_ns, ctime_ns, dev, ino, \
    sha256, scan_id, scan_ids, attempts, submitted_at, outcome, verdict, verdict_sha256, reason, \
    reused, dest, claimed_at, updated_at, dropped_at";

fn path_blob(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().to_vec()
}

fn blob_path(b: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(b))
}

fn sha_from(b: Option<Vec<u8>>) -> Option<[u8; 32]> {
    b.and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
}

#[allow(clippy::cast_sign_loss, clippy::cast_possible_wrap)]
fn row_to_record(r: &Row<'_>) -> rusqlite::Result<FileRecord> {
    let state: String = r.get(4)?;
    let size: Option<i64> = r.get(5)?;
    let stamp = match size {
        Some(size) => Some(Stamp {
            size: size as u64,
            mtime_ns: r.get::<_, Option<i64>>(6)?.unwrap_or(0),
            ctime_ns: r.get::<_, Option<i64>>(7)?.unwrap_or(0),
            dev: r.get::<_, Option<i64>>(8)?.unwrap_or(0) as u64,
            ino: r.get::<_, Option<i64>>(9)?.unwrap_or(0) as u64,
        }),
        None => None,
    };
    let scan_ids: String = r.get(12)?;
    let outcome: Option<String> = r.get(15)?;
    Ok(FileRecord {
        id: r.get(0)?,
        root: blob_path(r.get(1)?),
        rel_path: blob_path(r.get(2)?),
        staged: blob_path(r.get(3)?),
        state: FileState::parse(&state).unwrap_or(FileState::Claimed),
        stamp,
        sha256: sha_from(r.get(10)?),
        scan_id: r.get(11)?,
        scan_ids: scan_ids
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        attempts: u32::try_from(r.get::<_, i64>(13)?).unwrap_or(0),
        submitted_at_ms: r.get(14)?,
        outcome: outcome.as_deref().and_then(Outcome::parse),
        verdict: r.get(16)?,
        verdict_sha256: sha_from(r.get(17)?),
        reason: r.get(18)?,
        reused: r.get::<_, i64>(19)? != 0,
        dest: r.get::<_, Option<Vec<u8>>>(20)?.map(blob_path),
        claimed_at_ms: r.get(21)?,
        updated_at_ms: r.get(22)?,
        dropped_at_ms: r.get(23)?,
    })
}

/// Loads one record inside an operation.
fn load(conn: &Connection, id: FileId) -> Result<FileRecord, JournalError> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM files WHERE id = ?1"),
        [id],
        row_to_record,
    )
    .optional()
    .map_err(JournalError::sql("read"))?
    .ok_or_else(|| JournalError::Conflict {
        id,
        detail: "no such record".into(),
    })
}

/// `?first, ?first+1, …` for `n` values: an SQL list of numbered parameters.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn load_state(conn: &Connection, states: &[FileState]) -> Result<Vec<FileRecord>, JournalError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {COLUMNS} FROM files WHERE state IN ({}) ORDER BY id",
            placeholders(1, states.len())
        ))
        .map_err(JournalError::sql("read"))?;
    let rows = stmt
        .query_map(
            rusqlite::params_from_iter(states.iter().map(|s| s.as_str())),
            row_to_record,
        )
        .map_err(JournalError::sql("read"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(JournalError::sql("read"))
}

/// Refuses an operation on a record that is not in one of the states it starts from.
fn expect_state(rec: &FileRecord, allowed: &[FileState]) -> Result<(), JournalError> {
    if allowed.contains(&rec.state) {
        Ok(())
    } else {
        Err(JournalError::Conflict {
            id: rec.id,
            detail: format!(
                "is {}, expected one of {:?}",
                rec.state.as_str(),
                allowed.iter().map(|s| s.as_str()).collect::<Vec<_>>()
            ),
        })
    }
}

/// Checks a transition twice: against the operation's own source states, and against the table
/// of allowed transitions ([`FileState::can_become`]).
fn expect_transition(
    rec: &FileRecord,
    from: &[FileState],
    to: FileState,
) -> Result<(), JournalError> {
    expect_state(rec, from)?;
    if rec.state.can_become(to) {
        Ok(())
    } else {
        Err(JournalError::Conflict {
            id: rec.id,
            detail: format!("may not go from {} to {}", rec.state.as_str(), to.as_str()),
        })
    }
}

/// Moves a loaded record to `to` after checking the transition. The update also requires the
/// state the record was loaded in, so it can never apply to a record that moved meanwhile.
fn transition(
    conn: &Connection,
    rec: &FileRecord,
    from: &[FileState],
    to: FileState,
) -> Result<(), JournalError> {
    expect_transition(rec, from, to)?;
    conn.execute(
        "UPDATE files SET state = ?2, updated_at = ?3 WHERE id = ?1 AND state = ?4",
        params![rec.id, to.as_str(), now_ms(), rec.state.as_str()],
    )
    .map_err(JournalError::sql("update"))?;
    Ok(())
}

/// Appends to the error history (inside the current operation).
fn note_error_in(conn: &Connection, text: &str) -> Result<(), JournalError> {
    conn.execute(
        "INSERT INTO errors (at, text) VALUES (?1, ?2)",
        params![now_ms(), text],
    )
    .map_err(JournalError::sql("errors"))?;
    conn.execute(
        "DELETE FROM errors WHERE id <= (SELECT MAX(id) FROM errors) - ?1",
        [ERRORS_KEPT],
    )
    .map_err(JournalError::sql("errors"))?;
    Ok(())
}

/// Queues a scan's result for deletion on the server (inside the current operation).
fn stale_scan_in(conn: &Connection, scan_id: &str) -> Result<(), JournalError> {
    conn.execute(
        "INSERT OR IGNORE INTO stale_scans (scan_id, added_at) VALUES (?1, ?2)",
        params![scan_id, now_ms()],
    )
    .map_err(JournalError::sql("stale"))?;
    Ok(())
}

/// Records a verdict in the reuse table. `detect` wins: a cached `detect` is never replaced by
/// `not detected` for the same SHA-256 (it expires with the TTL instead).
fn cache_verdict(
    conn: &Connection,
    sha256: [u8; 32],
    verdict: ScanVerdict,
    scan_id: &str,
) -> Result<(), JournalError> {
    conn.execute(
        "INSERT INTO verdicts (sha256, outcome, verdict, scan_id, decided_at) \
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(sha256) DO UPDATE SET \
         outcome = excluded.outcome, verdict = excluded.verdict, \
         scan_id = excluded.scan_id, decided_at = excluded.decided_at \
         WHERE verdicts.verdict != ?6 OR excluded.verdict = ?6",
        params![
            sha256.to_vec(),
            verdict.outcome().as_str(),
            verdict.as_str(),
            scan_id,
            now_ms(),
            ScanVerdict::Detect.as_str()
        ],
    )
    .map_err(JournalError::sql("decide"))?;
    Ok(())
}

/// The states a first decision may start from.
const DECIDE_FROM: [FileState; 5] = [
    FileState::Claimed,
    FileState::Hashed,
    FileState::Waiting,
    FileState::Submitting,
    FileState::Submitted,
];

/// Writes a decision on `id` and, if it propagates, on every record waiting for the same content.
/// Returns the ids decided. A record already decided is never overwritten: see
/// [`decided_again`].
fn decide_in(conn: &Connection, id: FileId, d: &Decision) -> Result<Vec<FileId>, JournalError> {
    let rec = load(conn, id)?;
    if rec.state.is_decided() {
        return decided_again(conn, &rec, d);
    }
    expect_transition(&rec, &DECIDE_FROM, FileState::Decided)?;
    let now = now_ms();
    let mut decided = vec![id];
    let verdict = d.verdict.map(ScanVerdict::as_str);
    conn.execute(
        "UPDATE files SET state = ?2, outcome = ?3, verdict = ?4, verdict_sha256 = ?5, \
         reason = ?6, updated_at = ?7 WHERE id = ?1 AND state = ?8",
        params![
            id,
            FileState::Decided.as_str(),
            d.outcome.as_str(),
            verdict,
            d.verdict_sha256.map(|s| s.to_vec()),
            d.reason,
            now,
            rec.state.as_str()
        ],
    )
    .map_err(JournalError::sql("decide"))?;
    let Some(sha) = rec.sha256 else {
        return Ok(decided);
    };
    if d.propagate {
        let mut stmt = conn
            .prepare("SELECT id FROM files WHERE state = ?1 AND sha256 = ?2 ORDER BY id")
            .map_err(JournalError::sql("decide"))?;
        let waiting: Vec<FileId> = stmt
            .query_map(params![FileState::Waiting.as_str(), sha.to_vec()], |r| {
                r.get(0)
            })
            .map_err(JournalError::sql("decide"))?
            .collect::<Result<_, _>>()
            .map_err(JournalError::sql("decide"))?;
        let note = match &d.reason {
            Some(r) => format!("{r} (verdict shared with an identical file in flight)"),
            None => "verdict shared with an identical file in flight".to_string(),
        };
        for w in waiting {
            conn.execute(
                "UPDATE files SET state = ?2, outcome = ?3, verdict = ?4, \
                 verdict_sha256 = ?5, reason = ?6, reused = 1, scan_id = ?7, updated_at = ?8 \
                 WHERE id = ?1 AND state = ?9",
                params![
                    w,
                    FileState::Decided.as_str(),
                    d.outcome.as_str(),
                    verdict,
                    d.verdict_sha256.map(|s| s.to_vec()),
                    note,
                    rec.scan_id,
                    now,
                    FileState::Waiting.as_str()
                ],
            )
            .map_err(JournalError::sql("decide"))?;
            decided.push(w);
        }
    } else {
        // The content was not judged: one waiting record takes over as the primary.
        conn.execute(
            "UPDATE files SET state = ?3, updated_at = ?2 WHERE id = \
             (SELECT id FROM files WHERE state = ?4 AND sha256 = ?1 ORDER BY id LIMIT 1)",
            params![
                sha.to_vec(),
                now,
                FileState::Hashed.as_str(),
                FileState::Waiting.as_str()
            ],
        )
        .map_err(JournalError::sql("decide"))?;
    }
    if let (Some(v), Some(vsha)) = (d.verdict, d.verdict_sha256) {
        if d.outcome == v.outcome() {
            cache_verdict(conn, vsha, v, rec.scan_id.as_deref().unwrap_or_default())?;
        }
    }
    Ok(decided)
}

/// A decision for a record that is already decided. Never overwrites it:
/// - the same verdict again (a repeated answer, a retried write): nothing to do;
/// - a decision without a verdict (a local failure, a timeout) that arrives late: ignored;
/// - a contradicting verdict: a server anomaly, logged and kept in the error history, and resolved
///   fail-closed. `detect` wins: it replaces `not detected` in the verdict cache, and every
///   record of that content still `decided` clean (not yet placing) flips to quarantine; files
///   already placing or placed stay, and the anomaly names how many. A `not detected` after
///   `detect` changes nothing.
///
/// Returns the ids whose outcome changed (to be placed again by the sorter).
fn decided_again(
    conn: &Connection,
    rec: &FileRecord,
    d: &Decision,
) -> Result<Vec<FileId>, JournalError> {
    let old = rec.scan_verdict();
    let Some(new) = d.verdict else {
        tracing::warn!(
            id = rec.id,
            state = rec.state.as_str(),
            outcome = rec.outcome.map_or("-", Outcome::as_str),
            "a late decision for a file already decided is ignored"
        );
        return Ok(Vec::new());
    };
    if old == Some(new) {
        return Ok(Vec::new());
    }
    if old.is_none() {
        // Decided without a verdict (failed, vanished): the file never goes to clean anyway.
        tracing::warn!(
            id = rec.id,
            verdict = new.as_str(),
            "a verdict for a file already failed is ignored"
        );
        return Ok(Vec::new());
    }
    let scan = rec.scan_id.as_deref().unwrap_or("-");
    let mut text = format!(
        "server anomaly: scan {scan} answered {} for {} after {} was journaled",
        new.as_str(),
        rec.rel_path.display(),
        old.map_or("-", ScanVerdict::as_str)
    );
    let mut flipped = Vec::new();
    if new == ScanVerdict::Detect {
        if let Some(vsha) = d.verdict_sha256.or(rec.verdict_sha256) {
            cache_verdict(conn, vsha, ScanVerdict::Detect, scan)?;
            let mut stmt = conn
                .prepare(
                    "UPDATE files SET outcome = ?1, verdict = ?2, reason = ?3, updated_at = ?4 \
                     WHERE state = ?5 AND outcome = ?6 AND verdict_sha256 = ?7 RETURNING id",
                )
                .map_err(JournalError::sql("decide"))?;
            flipped = stmt
                .query_map(
                    params![
                        Outcome::Quarantine.as_str(),
                        ScanVerdict::Detect.as_str(),
                        format!("{text}: detect wins"),
                        now_ms(),
                        FileState::Decided.as_str(),
                        Outcome::Clean.as_str(),
                        vsha.to_vec()
                    ],
                    |r| r.get(0),
                )
                .map_err(JournalError::sql("decide"))?
                .collect::<Result<Vec<FileId>, _>>()
                .map_err(JournalError::sql("decide"))?;
            let released: i64 = conn
                .query_row(
                    &format!(
                        "SELECT COUNT(*) FROM files WHERE outcome = ?1 AND verdict_sha256 = ?2 \
                         AND state IN ({})",
                        placeholders(3, 3)
                    ),
                    params![
                        Outcome::Clean.as_str(),
                        vsha.to_vec(),
                        FileState::Placing.as_str(),
                        FileState::Placed.as_str(),
                        FileState::Done.as_str()
                    ],
                    |r| r.get(0),
                )
                .map_err(JournalError::sql("decide"))?;
            text.push_str(&format!(
                "; detect wins: {} file(s) still in staging go to quarantine",
                flipped.len()
            ));
            if released > 0 {
                text.push_str(&format!(
                    "; {released} file(s) of this content were already placed as clean: check them"
                ));
            }
        }
    } else {
        text.push_str("; the detect stands");
    }
    tracing::warn!(id = rec.id, scan_id = scan, "{text}");
    note_error_in(conn, &text)?;
    Ok(flipped)
}

/// The states a record may be sent back to `claimed` from (its file changed). `placing`
/// included: a clean placement journals its target before it finds the staged file changed.
const REHASH_FROM: [FileState; 5] = [
    FileState::Hashed,
    FileState::Submitting,
    FileState::Submitted,
    FileState::Decided,
    FileState::Placing,
];

/// The states a record may be closed as vanished from: any before the file was placed.
const VANISH_FROM: [FileState; 7] = [
    FileState::Claimed,
    FileState::Hashed,
    FileState::Waiting,
    FileState::Submitting,
    FileState::Submitted,
    FileState::Decided,
    FileState::Placing,
];

/// Whether a verdict decided at `decided_at_ms` may be reused at `now_ms` under `ttl`. Fails
/// closed against wall-clock jumps: a `decided_at` in the future (the clock went back) is never
/// reused, whatever the TTL.
pub fn verdict_reusable(decided_at_ms: i64, now_ms: i64, ttl: Duration) -> bool {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let age = now_ms.saturating_sub(decided_at_ms);
    !ttl.is_zero() && (0..=ttl_ms).contains(&age)
}

/// Decides a record just hashed from a cached verdict for its content, if one is young enough.
fn reuse_verdict(
    conn: &Connection,
    id: FileId,
    sha256: [u8; 32],
    ttl: Duration,
) -> Result<Option<Outcome>, JournalError> {
    let cached: Option<(String, String, i64)> = conn
        .query_row(
            "SELECT verdict, scan_id, decided_at FROM verdicts WHERE sha256 = ?1",
            [sha256.to_vec()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(JournalError::sql("hashed"))?;
    let Some((verdict, scan_id, at)) = cached else {
        return Ok(None);
    };
    let now = now_ms();
    let Some(v) = ScanVerdict::parse(&verdict) else {
        return Ok(None);
    };
    if !verdict_reusable(at, now, ttl) {
        return Ok(None);
    }
    let o = v.outcome();
    conn.execute(
        "UPDATE files SET state = ?7, outcome = ?2, verdict = ?3, verdict_sha256 = ?4, \
         reused = 1, scan_id = ?5, reason = ?6, updated_at = ?8 WHERE id = ?1",
        params![
            id,
            o.as_str(),
            v.as_str(),
            sha256.to_vec(),
            scan_id,
            format!(
                "verdict reused from scan {scan_id} of identical content {}s ago",
                now.saturating_sub(at) / 1000
            ),
            FileState::Decided.as_str(),
            now
        ],
    )
    .map_err(JournalError::sql("hashed"))?;
    Ok(Some(o))
}

fn ensure_parent_dir(path: &Path) -> Result<(), JournalError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // The journal holds file names of users' drops: owner only.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).ok();
        }
    }
    Ok(())
}

fn open_connection(path: &Path) -> Result<Connection, JournalError> {
    ensure_parent_dir(path)?;
    let open_err = |source| JournalError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(open_err)?;
    // WAL: readers (dropscan status) never block the writer. FULL: a COMMIT is on disk before the
    // side effect it guards happens, even through power loss.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    conn.execute_batch(SCHEMA).map_err(open_err)?;
    let version: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(open_err)?;
    match version.as_deref() {
        None => {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                [SCHEMA_VERSION],
            )
            .map_err(open_err)?;
        }
        Some(SCHEMA_VERSION) => {}
        Some(other) => {
            return Err(JournalError::Conflict {
                id: 0,
                detail: format!(
                    "schema version {other} is not {SCHEMA_VERSION}: this journal was written by another dropscan version"
                ),
            });
        }
    }
    Ok(conn)
}

/// Reads a summary from a journal file without taking part in writing (for `dropscan status`,
/// which runs beside the daemon).
pub fn read_summary(path: &Path) -> Result<Summary, JournalError> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| JournalError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(JournalError::sql("open"))?;
    summary_in(&conn)
}

fn summary_in(conn: &Connection) -> Result<Summary, JournalError> {
    let pairs = |sql: &str, states: &[FileState]| -> Result<Vec<(String, i64)>, JournalError> {
        let mut stmt = conn.prepare(sql).map_err(JournalError::sql("summary"))?;
        let rows = stmt
            .query_map(
                rusqlite::params_from_iter(states.iter().map(|s| s.as_str())),
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(JournalError::sql("summary"))?;
        rows.collect::<Result<_, _>>()
            .map_err(JournalError::sql("summary"))
    };
    let per_state = pairs("SELECT state, COUNT(*) FROM files GROUP BY state", &[])?;
    // Finished records: placed or done. Outcomes include `vanished` (done, nothing placed).
    let per_outcome = pairs(
        "SELECT outcome, COUNT(*) FROM files WHERE state IN (?1, ?2) GROUP BY outcome",
        &[FileState::Placed, FileState::Done],
    )?;
    let oldest_pending = conn
        .query_row(
            "SELECT rel_path, claimed_at FROM files WHERE state NOT IN (?1, ?2) \
             ORDER BY claimed_at LIMIT 1",
            params![FileState::Placed.as_str(), FileState::Done.as_str()],
            |r| Ok((blob_path(r.get(0)?), r.get(1)?)),
        )
        .optional()
        .map_err(JournalError::sql("summary"))?;
    let mut stmt = conn
        .prepare("SELECT at, text FROM errors ORDER BY id DESC LIMIT 10")
        .map_err(JournalError::sql("summary"))?;
    let last_errors = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(JournalError::sql("summary"))?
        .collect::<Result<_, _>>()
        .map_err(JournalError::sql("summary"))?;
    Ok(Summary {
        per_state,
        per_outcome,
        oldest_pending,
        last_errors,
    })
}

/// The journal thread: takes what is waiting, runs each operation in its own savepoint, commits
/// once, then answers every caller with the commit's result.
fn serve(conn: &Connection, mut ops_rx: mpsc::Receiver<Op>) {
    let mut pending: VecDeque<Op> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match ops_rx.blocking_recv() {
                Some(op) => pending.push_back(op),
                None => break,
            }
        }
        while pending.len() < GROUP_COMMIT_MAX {
            match ops_rx.try_recv() {
                Ok(op) => pending.push_back(op),
                Err(_) => break,
            }
        }
        run_batch(conn, &mut pending);
    }
}

/// Runs one transaction of operations taken from the front of `pending`. Every operation taken is
/// answered; operations left in `pending` run in the next transaction. Each run takes at least
/// one operation, so the thread always makes progress.
fn run_batch(conn: &Connection, pending: &mut VecDeque<Op>) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let msg = e.to_string();
        for op in pending.drain(..) {
            // Each op still has to answer; report the failure, keep nothing of what it did.
            let (_, reply) = op_failed(op, conn);
            reply(Err(msg.clone()));
        }
        return;
    }
    let mut replies: Vec<Reply> = Vec::with_capacity(pending.len().min(GROUP_COMMIT_MAX));
    while replies.len() < GROUP_COMMIT_MAX {
        let Some(op) = pending.pop_front() else { break };
        let reply = match conn.execute_batch("SAVEPOINT op") {
            Ok(()) => {
                let (ok, reply) = op(conn);
                // If the transaction is already gone, there is no savepoint left to end.
                if !conn.is_autocommit() {
                    let end = if ok {
                        "RELEASE op"
                    } else {
                        "ROLLBACK TO op; RELEASE op"
                    };
                    if let Err(e) = conn.execute_batch(end) {
                        tracing::error!(error = %e, "journal savepoint end failed");
                    }
                }
                reply
            }
            Err(e) => {
                tracing::error!(error = %e, "journal savepoint failed");
                let (_, reply) = op_failed(op, conn);
                let msg = e.to_string();
                Box::new(move |_: Result<(), String>| reply(Err(msg))) as Reply
            }
        };
        replies.push(reply);
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back on its own (SQLITE_FULL, SQLITE_IOERR,
            // SQLITE_NOMEM…), or an operation ended it. Nothing of this batch is on disk, so
            // every operation run so far is told so; the operations not yet run would otherwise
            // run outside any transaction (each committed on its own) and are left for a fresh
            // transaction instead.
            tracing::error!(
                operations = replies.len(),
                "the journal transaction was rolled back by SQLite; its operations failed"
            );
            let msg = "the transaction was rolled back by SQLite (disk full or I/O error?)";
            for reply in replies {
                reply(Err(msg.to_string()));
            }
            return;
        }
    }
    let commit = conn.execute_batch("COMMIT").map_err(|e| {
        // The transaction is void; nothing of it happened.
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK").ok();
        }
        e.to_string()
    });
    for reply in replies {
        reply(commit.clone());
    }
}

/// Runs an operation only to obtain its reply handle, keeping nothing of what it did; used when
/// no transaction can be had for it.
fn op_failed(op: Op, conn: &Connection) -> (bool, Reply) {
    // A savepoint outside a transaction starts one; roll it back whatever the op did.
    if conn.execute_batch("SAVEPOINT failed").is_ok() {
        let out = op(conn);
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK TO failed; RELEASE failed")
                .ok();
        }
        out
    } else {
        // Not even a savepoint: the op is dropped unanswered, and its caller sees the journal
        // as closed rather than being told something happened.
        (false, Box::new(|_| {}))
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path` and starts its thread.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let conn = open_connection(path)?;
        let (ops_tx, ops_rx) = mpsc::channel::<Op>(OPS_CAPACITY);
        std::thread::Builder::new()
            .name("dropscan-journal".into())
            .spawn(move || serve(&conn, ops_rx))
            .map_err(|source| JournalError::Dir {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Journal {
            ops_tx,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in the journal's next transaction; answers once it is committed.
    pub async fn run<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, JournalError>>();
        let op: Op = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit| {
                let answer = match (result, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(message)) => Err(JournalError::Commit { message }),
                };
                tx.send(answer).ok();
            });
            (ok, reply)
        });
        self.ops_tx
            .send(op)
            .await
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Records claims before the files are moved into staging; returns their ids in order.
    pub async fn claim(&self, claims: Vec<NewClaim>) -> Result<Vec<FileId>, JournalError> {
        self.run(move |conn| {
            let now = now_ms();
            let mut ids = Vec::with_capacity(claims.len());
            for c in &claims {
                conn.execute(
                    "INSERT INTO files (root, rel_path, staged, state, claimed_at, updated_at, \
                     dropped_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
                    params![
                        path_blob(&c.root),
                        path_blob(&c.rel_path),
                        path_blob(&c.staged),
                        FileState::Claimed.as_str(),
                        now,
                        c.dropped_at_ms
                    ],
                )
                .map_err(JournalError::sql("claim"))?;
                ids.push(conn.last_insert_rowid());
            }
            Ok(ids)
        })
        .await
    }

    /// Forgets claims whose move into staging did not happen (another agent took the file, or it
    /// vanished). The file, if any, is still in the inbox. Records past `claimed` are kept.
    pub async fn unclaim(&self, ids: Vec<FileId>) -> Result<(), JournalError> {
        self.run(move |conn| {
            for id in ids {
                conn.execute(
                    "DELETE FROM files WHERE id = ?1 AND state = ?2",
                    params![id, FileState::Claimed.as_str()],
                )
                .map_err(JournalError::sql("unclaim"))?;
            }
            Ok(())
        })
        .await
    }

    /// Records a hash. Chooses between uploading, waiting for an identical file in flight, and
    /// reusing a verdict younger than `verdict_ttl` (zero: never reused).
    ///
    /// The TTL is wall-clock time (it must survive restarts) and fails closed against clock
    /// jumps: a cached verdict whose `decided_at` lies in the future (the clock went back since)
    /// is never reused; after a jump forward verdicts merely expire early.
    pub async fn hashed(
        &self,
        id: FileId,
        sha256: [u8; 32],
        stamp: Stamp,
        verdict_ttl: Duration,
    ) -> Result<HashedAs, JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            expect_transition(&rec, &[FileState::Claimed], FileState::Hashed)?;
            #[allow(clippy::cast_possible_wrap)]
            conn.execute(
                "UPDATE files SET state = ?9, sha256 = ?2, size = ?3, mtime_ns = ?4, \
                 ctime_ns = ?5, dev = ?6, ino = ?7, updated_at = ?8 WHERE id = ?1",
                params![
                    id,
                    sha256.to_vec(),
                    stamp.size as i64,
                    stamp.mtime_ns,
                    stamp.ctime_ns,
                    stamp.dev as i64,
                    stamp.ino as i64,
                    now_ms(),
                    FileState::Hashed.as_str()
                ],
            )
            .map_err(JournalError::sql("hashed"))?;
            if !verdict_ttl.is_zero() {
                if let Some(reused) = reuse_verdict(conn, id, sha256, verdict_ttl)? {
                    return Ok(HashedAs::Reused(reused));
                }
            }
            let in_flight: bool = conn
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM files WHERE sha256 = ?1 AND id != ?2 AND \
                     state IN (?3, ?4, ?5))",
                    params![
                        sha256.to_vec(),
                        id,
                        FileState::Hashed.as_str(),
                        FileState::Submitting.as_str(),
                        FileState::Submitted.as_str()
                    ],
                    |r| r.get(0),
                )
                .map_err(JournalError::sql("hashed"))?;
            if in_flight {
                // claimed → waiting: the `hashed` above is part of the same operation.
                conn.execute(
                    "UPDATE files SET state = ?2 WHERE id = ?1",
                    params![id, FileState::Waiting.as_str()],
                )
                .map_err(JournalError::sql("hashed"))?;
                return Ok(HashedAs::Waiting);
            }
            Ok(HashedAs::Hashed)
        })
        .await
    }

    /// Promotes, for each content whose records all wait, the oldest waiting record to `hashed`
    /// (its primary changed, vanished or failed locally). Returns how many were promoted.
    pub async fn promote_orphaned_waiting(&self) -> Result<usize, JournalError> {
        self.run(|conn| {
            conn.execute(
                "UPDATE files SET state = ?2, updated_at = ?1 WHERE id IN ( \
                   SELECT MIN(w.id) FROM files w WHERE w.state = ?3 AND NOT EXISTS ( \
                     SELECT 1 FROM files p WHERE p.sha256 = w.sha256 AND p.id != w.id \
                     AND p.state IN (?2, ?4, ?5)) \
                   GROUP BY w.sha256)",
                params![
                    now_ms(),
                    FileState::Hashed.as_str(),
                    FileState::Waiting.as_str(),
                    FileState::Submitting.as_str(),
                    FileState::Submitted.as_str()
                ],
            )
            .map_err(JournalError::sql("promote"))
        })
        .await
    }

    /// Records `claimed` whose hash step has not moved them on for `older_than`: the journal
    /// write after hashing failed (disk full?), and nothing else will retry it before a restart.
    /// The caller (the claim sweep) re-hashes those whose staged file exists; [`Journal::hashed`]
    /// refuses a record that moved on meanwhile, so a race with a slow hash is harmless.
    ///
    /// Age is the journal's wall-clock `updated_at`; a record stamped in the future (the clock
    /// went back) counts as stuck: re-hashing too early is safe, never re-hashing is not.
    pub async fn stuck_claimed(
        &self,
        older_than: Duration,
    ) -> Result<Vec<FileRecord>, JournalError> {
        self.run(move |conn| {
            let now = now_ms();
            let age = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM files WHERE state = ?1 \
                     AND (updated_at <= ?2 OR updated_at > ?3) ORDER BY id LIMIT 1000"
                ))
                .map_err(JournalError::sql("read"))?;
            let rows = stmt
                .query_map(
                    params![FileState::Claimed.as_str(), now.saturating_sub(age), now],
                    row_to_record,
                )
                .map_err(JournalError::sql("read"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(JournalError::sql("read"))
        })
        .await
    }

    /// Sends a record back to be hashed again (its file changed). Whatever was decided for the
    /// old content is dropped with it; the record's own scan, if it had one, is queued for
    /// deletion on the server in the same transaction (a reused verdict's scan belongs to
    /// another record and is left alone).
    pub async fn rehash(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            // From `placing` only a clean release is taken back (its file changed before the
            // move); a quarantine or failed placement goes on with the bytes it has.
            if rec.state == FileState::Placing && rec.outcome != Some(Outcome::Clean) {
                return Err(JournalError::Conflict {
                    id,
                    detail: "is placing outside clean; only a clean release is scanned again"
                        .into(),
                });
            }
            transition(conn, &rec, &REHASH_FROM, FileState::Claimed)?;
            if let (false, Some(scan_id)) = (rec.reused, rec.scan_id.as_deref()) {
                if rec.state != FileState::Hashed {
                    stale_scan_in(conn, scan_id)?;
                }
            }
            conn.execute(
                "UPDATE files SET sha256 = NULL, size = NULL, scan_id = NULL, outcome = NULL, \
                 verdict = NULL, verdict_sha256 = NULL, reused = 0, dest = NULL WHERE id = ?1",
                params![id],
            )
            .map_err(JournalError::sql("rehash"))?;
            Ok(())
        })
        .await
    }

    /// Records the scanId of a submission about to be sent.
    pub async fn submitting(&self, id: FileId, scan_id: String) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            transition(conn, &rec, &[FileState::Hashed], FileState::Submitting)?;
            let mut ids = rec.scan_ids.clone();
            if !ids.contains(&scan_id) {
                ids.push(scan_id.clone());
            }
            conn.execute(
                "UPDATE files SET scan_id = ?2, scan_ids = ?3, submitted_at = ?4 WHERE id = ?1",
                params![id, scan_id, ids.join(","), now_ms()],
            )
            .map_err(JournalError::sql("submitting"))?;
            Ok(())
        })
        .await
    }

    /// The server accepted the scan (or, at start-up, knows it).
    pub async fn submitted(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            transition(conn, &rec, &[FileState::Submitting], FileState::Submitted)?;
            conn.execute(
                "UPDATE files SET attempts = attempts + 1 WHERE id = ?1",
                params![id],
            )
            .map_err(JournalError::sql("submitted"))?;
            Ok(())
        })
        .await
    }

    /// The submission was certainly not accepted (429, 5xx, 401): back to waiting for a slot.
    /// When it may have been accepted after all, use [`Journal::resend`].
    pub async fn not_submitted(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            transition(conn, &rec, &[FileState::Submitting], FileState::Hashed)
        })
        .await
    }

    /// The submission may or may not have reached the server (a broken connection, or a
    /// `submitting` scan the server did not list after a restart): back to waiting for a slot,
    /// and the old scanId is queued for deletion in the same transaction, so a scan the server
    /// did take is never left behind when the file is sent again under a new scanId.
    pub async fn resend(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            transition(conn, &rec, &[FileState::Submitting], FileState::Hashed)?;
            if let Some(old) = rec.scan_id.as_deref() {
                stale_scan_in(conn, old)?;
            }
            Ok(())
        })
        .await
    }

    /// A scan ended with `error` or `timeout` and will be tried again under a new scanId; the old
    /// result is queued for deletion on the server.
    pub async fn resubmit(
        &self,
        id: FileId,
        old_scan_id: String,
        note: String,
    ) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            if rec.scan_id.as_deref() != Some(old_scan_id.as_str()) {
                return Err(JournalError::Conflict {
                    id,
                    detail: format!("scan {old_scan_id} is not its current scan"),
                });
            }
            transition(conn, &rec, &[FileState::Submitted], FileState::Hashed)?;
            conn.execute(
                "UPDATE files SET reason = ?2 WHERE id = ?1",
                params![id, note],
            )
            .map_err(JournalError::sql("resubmit"))?;
            stale_scan_in(conn, &old_scan_id)
        })
        .await
    }

    /// Journals several decisions in one transaction; returns every id decided (with the waiting
    /// records that share a verdict). A decision for a record already decided never overwrites
    /// it (see the module docs: a verdict is decided once); the ids of records whose outcome a
    /// contradicting `detect` flipped to quarantine are returned too.
    pub async fn decide(
        &self,
        decisions: Vec<(FileId, Decision)>,
    ) -> Result<Vec<FileId>, JournalError> {
        self.run(move |conn| {
            let mut all = Vec::new();
            for (id, d) in &decisions {
                for decided in decide_in(conn, *id, d)? {
                    if !all.contains(&decided) {
                        all.push(decided);
                    }
                }
            }
            Ok(all)
        })
        .await
    }

    /// Queues scan results to delete on the server (a scan abandoned after a timeout).
    pub async fn stale_scan(&self, scan_id: String) -> Result<(), JournalError> {
        self.run(move |conn| stale_scan_in(conn, &scan_id)).await
    }

    /// Scan results waiting to be deleted on the server.
    pub async fn stale_scans(&self) -> Result<Vec<String>, JournalError> {
        self.run(|conn| {
            let mut stmt = conn
                .prepare("SELECT scan_id FROM stale_scans ORDER BY added_at LIMIT 1000")
                .map_err(JournalError::sql("stale"))?;
            let rows = stmt
                .query_map([], |r| r.get(0))
                .map_err(JournalError::sql("stale"))?;
            rows.collect::<Result<_, _>>()
                .map_err(JournalError::sql("stale"))
        })
        .await
    }

    /// A stale result is gone from the server.
    pub async fn stale_deleted(&self, scan_id: String) -> Result<(), JournalError> {
        self.run(move |conn| {
            conn.execute("DELETE FROM stale_scans WHERE scan_id = ?1", [scan_id])
                .map_err(JournalError::sql("stale"))?;
            Ok(())
        })
        .await
    }

    /// Records the exact destination path before the move. Prefer [`Journal::placing_checked`],
    /// which also refuses when the outcome changed since the caller read the record.
    pub async fn placing(&self, id: FileId, dest: PathBuf) -> Result<(), JournalError> {
        self.placing_inner(id, dest, None).await
    }

    /// Records the exact destination path before the move, provided the record's outcome is
    /// still `seen` (what the caller read when it chose the destination). A contradicting
    /// `detect` may flip a decided clean record to quarantine at any time before `placing`; this
    /// makes sure a destination chosen for the old outcome is refused rather than used.
    pub async fn placing_checked(
        &self,
        id: FileId,
        dest: PathBuf,
        seen: Option<Outcome>,
    ) -> Result<(), JournalError> {
        self.placing_inner(id, dest, Some(seen)).await
    }

    async fn placing_inner(
        &self,
        id: FileId,
        dest: PathBuf,
        seen: Option<Option<Outcome>>,
    ) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            if let Some(seen) = seen {
                if rec.outcome != seen {
                    return Err(JournalError::Conflict {
                        id,
                        detail: format!(
                            "its outcome is now {}, not {}",
                            rec.outcome.map_or("-", Outcome::as_str),
                            seen.map_or("-", Outcome::as_str)
                        ),
                    });
                }
            }
            transition(
                conn,
                &rec,
                &[FileState::Decided, FileState::Placing],
                FileState::Placing,
            )?;
            conn.execute(
                "UPDATE files SET dest = ?2 WHERE id = ?1",
                params![id, path_blob(&dest)],
            )
            .map_err(JournalError::sql("placing"))?;
            Ok(())
        })
        .await
    }

    /// The file is in its destination.
    pub async fn placed(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            transition(conn, &rec, &[FileState::Placing], FileState::Placed)
        })
        .await
    }

    /// The server's result is deleted (or there was none): the record is finished.
    pub async fn done(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            transition(conn, &rec, &[FileState::Placed], FileState::Done)
        })
        .await
    }

    /// Closes a record whose file is gone for good (vanished from staging before it was placed:
    /// removed by hand, say). Its outcome reads [`Outcome::Vanished`]: nothing was placed
    /// anywhere. A placed record is never closed this way.
    pub async fn close_vanished(&self, id: FileId, reason: String) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            transition(conn, &rec, &VANISH_FROM, FileState::Done)?;
            conn.execute(
                "UPDATE files SET outcome = ?2, reason = ?3 WHERE id = ?1",
                params![id, Outcome::Vanished.as_str(), reason],
            )
            .map_err(JournalError::sql("close"))?;
            Ok(())
        })
        .await
    }

    /// One record.
    pub async fn get(&self, id: FileId) -> Result<FileRecord, JournalError> {
        self.run(move |conn| load(conn, id)).await
    }

    /// Every record in one of `states`, oldest first.
    pub async fn in_states(&self, states: &[FileState]) -> Result<Vec<FileRecord>, JournalError> {
        let states = states.to_vec();
        self.run(move |conn| load_state(conn, &states)).await
    }

    /// For each staged path, the original relative path of a record that names it, if any
    /// (the caller asks only about paths no unfinished record holds: such a record is closed).
    pub async fn closed_records_of(
        &self,
        staged: Vec<PathBuf>,
    ) -> Result<Vec<Option<PathBuf>>, JournalError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare("SELECT rel_path FROM files WHERE staged = ?1")
                .map_err(JournalError::sql("read"))?;
            staged
                .iter()
                .map(|p| {
                    stmt.query_row([path_blob(p)], |r| r.get::<_, Vec<u8>>(0))
                        .optional()
                        .map(|o| o.map(blob_path))
                        .map_err(JournalError::sql("read"))
                })
                .collect()
        })
        .await
    }

    /// Keeps a short history of errors for `dropscan status`.
    pub async fn note_error(&self, text: String) -> Result<(), JournalError> {
        self.run(move |conn| note_error_in(conn, &text)).await
    }

    /// Drops finished records older than `history` and verdicts older than `verdict_ttl`. A
    /// verdict stamped in the future (the wall clock went back) is dropped too: its age cannot
    /// be known, so it is never reused.
    pub async fn prune(
        &self,
        history: Duration,
        verdict_ttl: Duration,
    ) -> Result<usize, JournalError> {
        self.run(move |conn| {
            let now = now_ms();
            let h = i64::try_from(history.as_millis()).unwrap_or(i64::MAX);
            let t = i64::try_from(verdict_ttl.as_millis()).unwrap_or(i64::MAX);
            let n = conn
                .execute(
                    "DELETE FROM files WHERE state = ?2 AND updated_at < ?1",
                    params![now.saturating_sub(h), FileState::Done.as_str()],
                )
                .map_err(JournalError::sql("prune"))?;
            conn.execute(
                "DELETE FROM verdicts WHERE decided_at < ?1 OR decided_at > ?2",
                params![now.saturating_sub(t), now],
            )
            .map_err(JournalError::sql("prune"))?;
            Ok(n)
        })
        .await
    }

    /// Counts and ages.
    pub async fn summary(&self) -> Result<Summary, JournalError> {
        self.run(summary_in).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64) -> Stamp {
        Stamp {
            size,
            mtime_ns: 1,
            ctime_ns: 2,
            dev: 3,
            ino: 4,
        }
    }

    async fn claim_one(j: &Journal, name: &str) -> FileId {
        j.claim(vec![NewClaim {
            root: "/in".into(),
            rel_path: name.into(),
            staged: format!("/in/.dropscan/{name}").into(),
            dropped_at_ms: None,
        }])
        .await
        .unwrap()[0]
    }

    #[tokio::test]
    async fn state_machine_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        let a = claim_one(&j, "a").await;
        let b = claim_one(&j, "b").await;
        let sha = [7u8; 32];
        assert_eq!(
            j.hashed(a, sha, stamp(5), Duration::from_secs(60))
                .await
                .unwrap(),
            HashedAs::Hashed
        );
        assert_eq!(
            j.hashed(b, sha, stamp(5), Duration::from_secs(60))
                .await
                .unwrap(),
            HashedAs::Waiting
        );
        j.submitting(a, "s1".into()).await.unwrap();
        j.submitted(a).await.unwrap();
        let decided = j
            .decide(vec![(
                a,
                Decision::from_verdict(ScanVerdict::NotDetected, sha),
            )])
            .await
            .unwrap();
        assert_eq!(decided, vec![a, b]);
        let rb = j.get(b).await.unwrap();
        assert_eq!(rb.outcome, Some(Outcome::Clean));
        assert!(rb.reused);
        // A third identical file reuses the cached verdict.
        let c = claim_one(&j, "c").await;
        assert_eq!(
            j.hashed(c, sha, stamp(5), Duration::from_secs(60))
                .await
                .unwrap(),
            HashedAs::Reused(Outcome::Clean)
        );
        // With reuse disabled it is uploaded.
        let d = claim_one(&j, "d").await;
        assert_eq!(
            j.hashed(d, sha, stamp(5), Duration::ZERO).await.unwrap(),
            HashedAs::Hashed
        );
    }

    #[tokio::test]
    async fn a_waiting_twin_whose_primary_changed_is_promoted() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        let a = claim_one(&j, "a").await;
        let b = claim_one(&j, "b").await;
        let c = claim_one(&j, "c").await;
        let sha = [3u8; 32];
        for id in [a, b, c] {
            j.hashed(id, sha, stamp(1), Duration::ZERO).await.unwrap();
        }
        assert_eq!(j.promote_orphaned_waiting().await.unwrap(), 0);
        // The primary's file changed: it is hashed again, the twins lose their primary.
        j.rehash(a).await.unwrap();
        assert_eq!(j.promote_orphaned_waiting().await.unwrap(), 1);
        assert_eq!(j.get(b).await.unwrap().state, FileState::Hashed);
        assert_eq!(j.get(c).await.unwrap().state, FileState::Waiting);
    }

    #[tokio::test]
    async fn local_failure_hands_over_to_a_waiting_twin() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        let a = claim_one(&j, "a").await;
        let b = claim_one(&j, "b").await;
        let sha = [1u8; 32];
        j.hashed(a, sha, stamp(1), Duration::ZERO).await.unwrap();
        j.hashed(b, sha, stamp(1), Duration::ZERO).await.unwrap();
        let decided = j
            .decide(vec![(a, Decision::failed("unreadable", false))])
            .await
            .unwrap();
        assert_eq!(decided, vec![a]);
        assert_eq!(j.get(b).await.unwrap().state, FileState::Hashed);
    }

    #[tokio::test]
    async fn a_failing_operation_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        let a = claim_one(&j, "a").await;
        // submitting on a claimed record is refused; the record is unchanged.
        let err = j.submitting(a, "x".into()).await.unwrap_err();
        assert!(matches!(err, JournalError::Conflict { .. }), "{err}");
        assert_eq!(j.get(a).await.unwrap().state, FileState::Claimed);
        // Concurrent operations in one group commit all land.
        let mut set = tokio::task::JoinSet::new();
        for i in 0..200 {
            let j = j.clone();
            set.spawn(async move { claim_one(&j, &format!("f{i}")).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        let s = j.summary().await.unwrap();
        assert_eq!(s.per_state, vec![("claimed".to_string(), 201)]);
    }

    #[test]
    fn a_verdict_ttl_fails_closed_against_clock_jumps() {
        let ttl = Duration::from_secs(60);
        assert!(verdict_reusable(1_000, 1_000, ttl));
        assert!(verdict_reusable(1_000, 61_000, ttl));
        assert!(!verdict_reusable(1_000, 61_001, ttl));
        // Decided "in the future": the clock went back; never reused.
        assert!(!verdict_reusable(2_000, 1_000, ttl));
        assert!(!verdict_reusable(1_000, 1_000, Duration::ZERO));
    }

    #[test]
    fn the_transition_table_matches_every_operation() {
        for (from, to) in [
            (&DECIDE_FROM[..], FileState::Decided),
            (&REHASH_FROM[..], FileState::Claimed),
            (&VANISH_FROM[..], FileState::Done),
        ] {
            for s in from {
                assert!(s.can_become(to), "{s:?} -> {to:?}");
            }
        }
        for s in FileState::ALL {
            assert!(!s.can_become(FileState::Claimed) || REHASH_FROM.contains(&s));
        }
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite");
        let a;
        {
            let j = Journal::open(&path).unwrap();
            a = claim_one(&j, "ä/b c").await;
            j.hashed(a, [2; 32], stamp(9), Duration::ZERO)
                .await
                .unwrap();
            j.submitting(a, "scan1".into()).await.unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let r = j.get(a).await.unwrap();
        assert_eq!(r.state, FileState::Submitting);
        assert_eq!(r.scan_id.as_deref(), Some("scan1"));
        assert_eq!(r.rel_path, PathBuf::from("ä/b c"));
        assert_eq!(r.stamp, Some(stamp(9)));
        let summary = read_summary(&path).unwrap();
        assert_eq!(summary.oldest_pending.unwrap().0, PathBuf::from("ä/b c"));
    }
}
