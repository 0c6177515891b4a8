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
//! ```
//!
//! Why SQLite rather than redb: the journal is also read by `dropscan status` while the daemon
//! runs (WAL gives concurrent readers in another process for free), its crash behaviour is the
//! best-studied of any embedded store, and ad-hoc queries ("oldest pending file") are one line.
//!
//! All writes go through one thread that owns the connection. It takes every operation that is
//! waiting, runs each inside its own SAVEPOINT (a failing operation rolls back alone), and commits
//! them in one transaction: *group commit*, so that a burst of thousands of files costs a handful
//! of fsyncs. An operation's caller is answered only after the COMMIT is durable.
//!
//! What this module does not do: touch files or the network. The stages do that, in the order the
//! journal allows.

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
}

impl Outcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Clean => "clean",
            Outcome::Quarantine => "quarantine",
            Outcome::Failed => "failed",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "clean" => Some(Outcome::Clean),
            "quarantine" => Some(Outcome::Quarantine),
            "failed" => Some(Outcome::Failed),
            _ => None,
        }
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
    /// The KATA state that decided it, if a verdict did.
    pub verdict: Option<String>,
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

fn load_state(conn: &Connection, states: &[FileState]) -> Result<Vec<FileRecord>, JournalError> {
    let list = states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(",");
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {COLUMNS} FROM files WHERE state IN ({list}) ORDER BY id"
        ))
        .map_err(JournalError::sql("read"))?;
    let rows = stmt
        .query_map([], row_to_record)
        .map_err(JournalError::sql("read"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(JournalError::sql("read"))
}

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

fn set_state(conn: &Connection, id: FileId, state: FileState) -> Result<(), JournalError> {
    conn.execute(
        "UPDATE files SET state = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, state.as_str(), now_ms()],
    )
    .map_err(JournalError::sql("update"))?;
    Ok(())
}

/// Writes a decision on `id` and, if it propagates, on every record waiting for the same content.
/// Returns the ids decided.
fn decide_in(conn: &Connection, id: FileId, d: &Decision) -> Result<Vec<FileId>, JournalError> {
    let rec = load(conn, id)?;
    let now = now_ms();
    let mut decided = vec![id];
    conn.execute(
        "UPDATE files SET state = 'decided', outcome = ?2, verdict = ?3, verdict_sha256 = ?4, \
         reason = ?5, updated_at = ?6 WHERE id = ?1",
        params![
            id,
            d.outcome.as_str(),
            d.verdict,
            d.verdict_sha256.map(|s| s.to_vec()),
            d.reason,
            now
        ],
    )
    .map_err(JournalError::sql("decide"))?;
    if let Some(sha) = rec.sha256 {
        if d.propagate {
            let mut stmt = conn
                .prepare("SELECT id FROM files WHERE state = 'waiting' AND sha256 = ?1")
                .map_err(JournalError::sql("decide"))?;
            let waiting: Vec<FileId> = stmt
                .query_map([sha.to_vec()], |r| r.get(0))
                .map_err(JournalError::sql("decide"))?
                .collect::<Result<_, _>>()
                .map_err(JournalError::sql("decide"))?;
            for w in waiting {
                let note = match &d.reason {
                    Some(r) => format!("{r} (verdict shared with an identical file in flight)"),
                    None => "verdict shared with an identical file in flight".to_string(),
                };
                conn.execute(
                    "UPDATE files SET state = 'decided', outcome = ?2, verdict = ?3, \
                     verdict_sha256 = ?4, reason = ?5, reused = 1, scan_id = ?6, updated_at = ?7 \
                     WHERE id = ?1",
                    params![
                        w,
                        d.outcome.as_str(),
                        d.verdict,
                        d.verdict_sha256.map(|s| s.to_vec()),
                        note,
                        rec.scan_id,
                        now
                    ],
                )
                .map_err(JournalError::sql("decide"))?;
                decided.push(w);
            }
        } else {
            // The content was not judged: one waiting record takes over as the primary.
            conn.execute(
                "UPDATE files SET state = 'hashed', updated_at = ?2 WHERE id = \
                 (SELECT id FROM files WHERE state = 'waiting' AND sha256 = ?1 ORDER BY id LIMIT 1)",
                params![sha.to_vec(), now],
            )
            .map_err(JournalError::sql("decide"))?;
        }
        if d.outcome != Outcome::Failed {
            if let (Some(verdict), Some(vsha)) = (&d.verdict, d.verdict_sha256) {
                conn.execute(
                    "INSERT INTO verdicts (sha256, outcome, verdict, scan_id, decided_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(sha256) DO UPDATE SET \
                     outcome = excluded.outcome, verdict = excluded.verdict, \
                     scan_id = excluded.scan_id, decided_at = excluded.decided_at",
                    params![
                        vsha.to_vec(),
                        d.outcome.as_str(),
                        verdict,
                        rec.scan_id.clone().unwrap_or_default(),
                        now
                    ],
                )
                .map_err(JournalError::sql("decide"))?;
            }
        }
    }
    Ok(decided)
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
    let pairs = |sql: &str| -> Result<Vec<(String, i64)>, JournalError> {
        let mut stmt = conn.prepare(sql).map_err(JournalError::sql("summary"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(JournalError::sql("summary"))?;
        rows.collect::<Result<_, _>>()
            .map_err(JournalError::sql("summary"))
    };
    let per_state = pairs("SELECT state, COUNT(*) FROM files GROUP BY state")?;
    let per_outcome = pairs(
        "SELECT outcome, COUNT(*) FROM files WHERE state IN ('placed','done') GROUP BY outcome",
    )?;
    let oldest_pending = conn
        .query_row(
            "SELECT rel_path, claimed_at FROM files WHERE state NOT IN ('placed','done') \
             ORDER BY claimed_at LIMIT 1",
            [],
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
    while let Some(first) = ops_rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX {
            match ops_rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            for op in batch {
                // Each op still has to answer; run nothing, report the failure.
                let (_, reply) = op_failed(op, conn);
                reply(Err(msg.clone()));
            }
            continue;
        }
        let mut replies = Vec::with_capacity(batch.len());
        for op in batch {
            if let Err(e) = conn.execute_batch("SAVEPOINT op") {
                replies.push(Box::new(move |_: Result<(), String>| {
                    tracing::error!(error = %e, "journal savepoint failed");
                }) as Reply);
                continue;
            }
            let (ok, reply) = op(conn);
            let end = if ok {
                "RELEASE op"
            } else {
                "ROLLBACK TO op; RELEASE op"
            };
            if let Err(e) = conn.execute_batch(end) {
                tracing::error!(error = %e, "journal savepoint end failed");
            }
            replies.push(reply);
        }
        let commit = conn.execute_batch("COMMIT").map_err(|e| {
            // The transaction is void; nothing of it happened.
            conn.execute_batch("ROLLBACK").ok();
            e.to_string()
        });
        for reply in replies {
            reply(commit.clone());
        }
    }
}

/// Runs an operation outside a transaction only to obtain its reply handle; used when BEGIN fails.
fn op_failed(op: Op, conn: &Connection) -> (bool, Reply) {
    // A savepoint outside a transaction starts one; roll it back whatever the op did.
    if conn.execute_batch("SAVEPOINT failed").is_ok() {
        let out = op(conn);
        conn.execute_batch("ROLLBACK TO failed; RELEASE failed")
            .ok();
        out
    } else {
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
                     dropped_at) VALUES (?1, ?2, ?3, 'claimed', ?4, ?4, ?5)",
                    params![
                        path_blob(&c.root),
                        path_blob(&c.rel_path),
                        path_blob(&c.staged),
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
    /// vanished). The file, if any, is still in the inbox.
    pub async fn unclaim(&self, ids: Vec<FileId>) -> Result<(), JournalError> {
        self.run(move |conn| {
            for id in ids {
                conn.execute(
                    "DELETE FROM files WHERE id = ?1 AND state = 'claimed'",
                    [id],
                )
                .map_err(JournalError::sql("unclaim"))?;
            }
            Ok(())
        })
        .await
    }

    /// Records a hash. Chooses between uploading, waiting for an identical file in flight, and
    /// reusing a verdict younger than `verdict_ttl` (zero: never reused).
    pub async fn hashed(
        &self,
        id: FileId,
        sha256: [u8; 32],
        stamp: Stamp,
        verdict_ttl: Duration,
    ) -> Result<HashedAs, JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            expect_state(&rec, &[FileState::Claimed])?;
            #[allow(clippy::cast_possible_wrap)]
            conn.execute(
                "UPDATE files SET state = 'hashed', sha256 = ?2, size = ?3, mtime_ns = ?4, \
                 ctime_ns = ?5, dev = ?6, ino = ?7, updated_at = ?8 WHERE id = ?1",
                params![
                    id,
                    sha256.to_vec(),
                    stamp.size as i64,
                    stamp.mtime_ns,
                    stamp.ctime_ns,
                    stamp.dev as i64,
                    stamp.ino as i64,
                    now_ms()
                ],
            )
            .map_err(JournalError::sql("hashed"))?;
            if !verdict_ttl.is_zero() {
                let ttl_ms = i64::try_from(verdict_ttl.as_millis()).unwrap_or(i64::MAX);
                let cached: Option<(String, String, String, i64)> = conn
                    .query_row(
                        "SELECT outcome, verdict, scan_id, decided_at FROM verdicts WHERE sha256 = ?1",
                        [sha256.to_vec()],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .optional()
                    .map_err(JournalError::sql("hashed"))?;
                if let Some((outcome, verdict, scan_id, at)) = cached {
                    let age = now_ms().saturating_sub(at);
                    if let (Some(o), true) = (Outcome::parse(&outcome), age <= ttl_ms) {
                        conn.execute(
                            "UPDATE files SET state = 'decided', outcome = ?2, verdict = ?3, \
                             verdict_sha256 = ?4, reused = 1, scan_id = ?5, reason = ?6 WHERE id = ?1",
                            params![
                                id,
                                o.as_str(),
                                verdict,
                                sha256.to_vec(),
                                scan_id,
                                format!(
                                    "verdict reused from scan {scan_id} of identical content {}s ago",
                                    age / 1000
                                )
                            ],
                        )
                        .map_err(JournalError::sql("hashed"))?;
                        return Ok(HashedAs::Reused(o));
                    }
                }
            }
            let in_flight: bool = conn
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM files WHERE sha256 = ?1 AND id != ?2 AND \
                     state IN ('hashed','submitting','submitted'))",
                    params![sha256.to_vec(), id],
                    |r| r.get(0),
                )
                .map_err(JournalError::sql("hashed"))?;
            if in_flight {
                set_state(conn, id, FileState::Waiting)?;
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
                "UPDATE files SET state = 'hashed', updated_at = ?1 WHERE id IN ( \
                   SELECT MIN(w.id) FROM files w WHERE w.state = 'waiting' AND NOT EXISTS ( \
                     SELECT 1 FROM files p WHERE p.sha256 = w.sha256 AND p.id != w.id \
                     AND p.state IN ('hashed','submitting','submitted')) \
                   GROUP BY w.sha256)",
                [now_ms()],
            )
            .map_err(JournalError::sql("promote"))
        })
        .await
    }

    /// Sends a record back to be hashed again (its file changed).
    pub async fn rehash(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            conn.execute(
                "UPDATE files SET state = 'claimed', sha256 = NULL, size = NULL, updated_at = ?2 \
                 WHERE id = ?1",
                params![id, now_ms()],
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
            expect_state(&rec, &[FileState::Hashed])?;
            let mut ids = rec.scan_ids.clone();
            if !ids.contains(&scan_id) {
                ids.push(scan_id.clone());
            }
            let now = now_ms();
            conn.execute(
                "UPDATE files SET state = 'submitting', scan_id = ?2, scan_ids = ?3, \
                 submitted_at = ?4, updated_at = ?4 WHERE id = ?1",
                params![id, scan_id, ids.join(","), now],
            )
            .map_err(JournalError::sql("submitting"))?;
            Ok(())
        })
        .await
    }

    /// The server accepted the scan.
    pub async fn submitted(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            conn.execute(
                "UPDATE files SET state = 'submitted', attempts = attempts + 1, updated_at = ?2 \
                 WHERE id = ?1 AND state = 'submitting'",
                params![id, now_ms()],
            )
            .map_err(JournalError::sql("submitted"))?;
            Ok(())
        })
        .await
    }

    /// The submission was not accepted (429, 5xx, transport, 401): back to waiting for a slot.
    pub async fn not_submitted(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            set_state(conn, id, FileState::Hashed)?;
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
            set_state(conn, id, FileState::Hashed)?;
            conn.execute(
                "UPDATE files SET reason = ?2 WHERE id = ?1",
                params![id, note],
            )
            .map_err(JournalError::sql("resubmit"))?;
            conn.execute(
                "INSERT OR IGNORE INTO stale_scans (scan_id, added_at) VALUES (?1, ?2)",
                params![old_scan_id, now_ms()],
            )
            .map_err(JournalError::sql("resubmit"))?;
            Ok(())
        })
        .await
    }

    /// Journals several decisions in one transaction; returns every id decided (with the waiting
    /// records that share a verdict).
    pub async fn decide(
        &self,
        decisions: Vec<(FileId, Decision)>,
    ) -> Result<Vec<FileId>, JournalError> {
        self.run(move |conn| {
            let mut all = Vec::new();
            for (id, d) in &decisions {
                all.extend(decide_in(conn, *id, d)?);
            }
            Ok(all)
        })
        .await
    }

    /// Queues scan results to delete on the server (a scan abandoned after a timeout).
    pub async fn stale_scan(&self, scan_id: String) -> Result<(), JournalError> {
        self.run(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO stale_scans (scan_id, added_at) VALUES (?1, ?2)",
                params![scan_id, now_ms()],
            )
            .map_err(JournalError::sql("stale"))?;
            Ok(())
        })
        .await
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

    /// Records the exact destination path before the move.
    pub async fn placing(&self, id: FileId, dest: PathBuf) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            expect_state(&rec, &[FileState::Decided, FileState::Placing])?;
            conn.execute(
                "UPDATE files SET state = 'placing', dest = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, path_blob(&dest), now_ms()],
            )
            .map_err(JournalError::sql("placing"))?;
            Ok(())
        })
        .await
    }

    /// The file is in its destination.
    pub async fn placed(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            conn.execute(
                "UPDATE files SET state = 'placed', updated_at = ?2 WHERE id = ?1 AND state = 'placing'",
                params![id, now_ms()],
            )
            .map_err(JournalError::sql("placed"))?;
            Ok(())
        })
        .await
    }

    /// The server's result is deleted (or there was none): the record is finished.
    pub async fn done(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            set_state(conn, id, FileState::Done)?;
            Ok(())
        })
        .await
    }

    /// Closes a record whose file is gone for good (vanished from staging before it was placed:
    /// removed by hand, say). Its outcome reads `vanished`: nothing was placed anywhere.
    pub async fn close_vanished(&self, id: FileId, reason: String) -> Result<(), JournalError> {
        self.run(move |conn| {
            conn.execute(
                "UPDATE files SET state = 'done', outcome = 'vanished', \
                 reason = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, reason, now_ms()],
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
        self.run(move |conn| {
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
        })
        .await
    }

    /// Drops finished records and expired verdicts older than `history`.
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
                    "DELETE FROM files WHERE state = 'done' AND updated_at < ?1",
                    [now.saturating_sub(h)],
                )
                .map_err(JournalError::sql("prune"))?;
            conn.execute(
                "DELETE FROM verdicts WHERE decided_at < ?1",
                [now.saturating_sub(t)],
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
                Decision {
                    outcome: Outcome::Clean,
                    verdict: Some("not detected".into()),
                    verdict_sha256: Some(sha),
                    reason: None,
                    propagate: true,
                },
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
