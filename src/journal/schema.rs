//! The journal's storage: the SQL schema and how the connection is opened, the mapping between
//! rows and [`FileRecord`], and the helpers every operation uses to read a record and to move it
//! through the transition table ([`transition`]). Constant statements go through the
//! connection's cache of prepared statements ([`execute`], [`query_row`]).
//!
//! What this file does not do: decide anything. The operations live in the `ops_*` files, the
//! group commit in `writer.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Params, Row, params};

use super::now_ms;
use super::types::{FileId, FileRecord, FileState, JournalError, Outcome, ScanVerdict, Stamp};
use crate::scanner::ScanId;

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
    updated_at      INTEGER NOT NULL,
    -- The destination root `dest` was chosen in: a placement is finished there even after the
    -- configuration names another folder.
    dest_root       BLOB,
    -- The staging folder the file was moved into at the claim (dev, ino): a share mounted over
    -- the inbox later covers that folder, and the file is kept for when it is reachable again.
    staging_dev     INTEGER,
    staging_ino     INTEGER
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
-- The quarantine and failed tools (ops_audit.rs): who did what to a kept file, and why.
CREATE TABLE IF NOT EXISTS audit (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    user        TEXT NOT NULL,
    action      TEXT NOT NULL,
    file_id     INTEGER,
    reason      TEXT,
    detail      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_file ON audit(file_id);
-- What became of a file kept in quarantine or failed: no row while it is kept there; a tool at
-- work on it, or interrupted ('busy:ACTION': whether the tool still runs is its lock's to say,
-- see commands/custody.rs), or where it went ('released', 'restored', 'purged', 'retried').
CREATE TABLE IF NOT EXISTS custody (
    file_id     INTEGER PRIMARY KEY,
    status      TEXT NOT NULL,
    at          INTEGER NOT NULL
);
-- Where a tool at work is moving a kept file (release, restore, retry): written before the move,
-- removed when its custody ends, so that a run taking over from one that was killed finishes the
-- same move. `to_root` is the folder the copy's temp is made in, `target` the path beneath it.
CREATE TABLE IF NOT EXISTS custody_plan (
    file_id     INTEGER PRIMARY KEY,
    action      TEXT NOT NULL,
    to_root     BLOB NOT NULL,
    target      BLOB NOT NULL,
    user        TEXT NOT NULL,
    reason      TEXT,
    at          INTEGER NOT NULL
);
-- Notifications waiting for delivery (ops_hooks.rs), queued with the placement they announce.
CREATE TABLE IF NOT EXISTS hook_events (
    id          INTEGER PRIMARY KEY,
    hook        TEXT NOT NULL,
    file_id     INTEGER,
    event       TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    last_error  TEXT,
    gave_up     INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS hook_events_due ON hook_events(gave_up, next_at);
CREATE INDEX IF NOT EXISTS hook_events_hook_due ON hook_events(hook, gave_up, next_at);
-- Verdicts contradicted after the file was released as clean (ops_anomaly.rs): one row per
-- released file, written with the decision; `announced` once its hook events are queued.
CREATE TABLE IF NOT EXISTS anomalies (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    file_id     INTEGER NOT NULL,
    root        BLOB NOT NULL,
    rel_path    BLOB NOT NULL,
    dest        BLOB,
    sha256      BLOB,
    scan_id     TEXT,
    first       TEXT NOT NULL,
    later       TEXT NOT NULL,
    announced   INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS anomalies_once ON anomalies(file_id, scan_id, later);
-- Originals kept in staging beside their private copy where no lease could tell whether a writer
-- still holds them (ops_retain.rs): dropped once unchanged for keep_original, or sent back to
-- the inbox as a new version when changed.
CREATE TABLE IF NOT EXISTS retained (
    orig        BLOB PRIMARY KEY,
    root        BLOB NOT NULL,
    rel_path    BLOB NOT NULL,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    ctime_ns    INTEGER NOT NULL,
    dev         INTEGER NOT NULL,
    ino         INTEGER NOT NULL,
    kept_at     INTEGER NOT NULL
);
";

const SCHEMA_VERSION: &str = "1";

/// The columns of `files` in the order [`row_to_record`] reads them, as a literal so that
/// constant queries can be built with `concat!` (and so be cached prepared statements).
macro_rules! columns {
    () => {
        "id, root, rel_path, staged, state, size, mtime_ns, ctime_ns, dev, ino, \
         sha256, scan_id, scan_ids, attempts, submitted_at, outcome, verdict, verdict_sha256, \
         reason, reused, dest, claimed_at, updated_at, dropped_at, dest_root, staging_dev, \
         staging_ino"
    };
}

/// The columns of `files` in the order [`row_to_record`] reads them.
pub(super) const COLUMNS: &str = columns!();

/// How many prepared statements the connection keeps. The hot operations use about twenty
/// distinct statements; rusqlite's default of 16 would evict some of them on every batch.
const STATEMENT_CACHE: usize = 64;

/// Runs one statement through the connection's cache of prepared statements: preparing SQL costs
/// more than running it on the hot path. Returns the number of rows changed.
pub(super) fn execute<P: Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    about: &'static str,
) -> Result<usize, JournalError> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute(params))
        .map_err(JournalError::sql(about))
}

/// Reads the one row a query always returns (a count, an `EXISTS`) through the cache of prepared
/// statements.
pub(super) fn query_one<T, P: Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    about: &'static str,
    f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<T, JournalError> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params, f))
        .map_err(JournalError::sql(about))
}

/// Reads one row through the cache of prepared statements; `None` if there is none.
pub(super) fn query_row<T, P: Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    about: &'static str,
    f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>, JournalError> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params, f).optional())
        .map_err(JournalError::sql(about))
}

pub(super) fn path_blob(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().to_vec()
}

pub(super) fn blob_path(b: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(b))
}

fn sha_from(b: Option<Vec<u8>>) -> Option<[u8; 32]> {
    b.and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
}

/// A scanId read back: every one was made by [`ScanId::generate`] and journaled before it was
/// sent, so one that does not parse is a damaged journal, reported as such (it is never put in
/// a URL unchecked). An empty one (a reused verdict whose scan had none) reads as none.
fn stored_scan_id(column: usize, s: &str) -> rusqlite::Result<ScanId> {
    ScanId::parse(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

#[allow(clippy::cast_sign_loss, clippy::cast_possible_wrap)]
pub(super) fn row_to_record(r: &Row<'_>) -> rusqlite::Result<FileRecord> {
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
        scan_id: r
            .get::<_, Option<String>>(11)?
            .filter(|s| !s.is_empty())
            .map(|s| stored_scan_id(11, &s))
            .transpose()?,
        scan_ids: scan_ids
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| stored_scan_id(12, s))
            .collect::<rusqlite::Result<_>>()?,
        attempts: u32::try_from(r.get::<_, i64>(13)?).unwrap_or(0),
        submitted_at_ms: r.get(14)?,
        outcome: outcome.as_deref().and_then(Outcome::parse),
        verdict: r
            .get::<_, Option<String>>(16)?
            .as_deref()
            .and_then(ScanVerdict::parse),
        verdict_sha256: sha_from(r.get(17)?),
        reason: r.get(18)?,
        reused: r.get::<_, i64>(19)? != 0,
        dest: r.get::<_, Option<Vec<u8>>>(20)?.map(blob_path),
        claimed_at_ms: r.get(21)?,
        updated_at_ms: r.get(22)?,
        dropped_at_ms: r.get(23)?,
        dest_root: r.get::<_, Option<Vec<u8>>>(24)?.map(blob_path),
        staging_folder: match (r.get::<_, Option<i64>>(25)?, r.get::<_, Option<i64>>(26)?) {
            // Stored as SQLite's signed integers, bit for bit.
            (Some(dev), Some(ino)) => Some((dev as u64, ino as u64)),
            _ => None,
        },
    })
}

/// Loads one record inside an operation.
pub(super) fn load(conn: &Connection, id: FileId) -> Result<FileRecord, JournalError> {
    query_row(
        conn,
        concat!("SELECT ", columns!(), " FROM files WHERE id = ?1"),
        [id],
        "read",
        row_to_record,
    )?
    .ok_or_else(|| JournalError::Conflict {
        id,
        detail: "no such record".into(),
    })
}

/// `?first, ?first+1, …` for `n` values: an SQL list of numbered parameters.
pub(super) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn load_state(
    conn: &Connection,
    states: &[FileState],
) -> Result<Vec<FileRecord>, JournalError> {
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
pub(super) fn expect_state(rec: &FileRecord, allowed: &[FileState]) -> Result<(), JournalError> {
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
pub(super) fn expect_transition(
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
pub(super) fn transition(
    conn: &Connection,
    rec: &FileRecord,
    from: &[FileState],
    to: FileState,
) -> Result<(), JournalError> {
    expect_transition(rec, from, to)?;
    execute(
        conn,
        "UPDATE files SET state = ?2, updated_at = ?3 WHERE id = ?1 AND state = ?4",
        params![rec.id, to.as_str(), now_ms(), rec.state.as_str()],
        "update",
    )?;
    Ok(())
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

/// Columns added since the schema's first version, added to a journal written before them (a
/// version that does not know a column ignores it: every query names its columns).
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (column, kind) in [
        ("dest_root", "BLOB"),
        ("staging_dev", "INTEGER"),
        ("staging_ino", "INTEGER"),
    ] {
        let has: bool = conn.query_row(
            "SELECT count(*) FROM pragma_table_info('files') WHERE name = ?1",
            [column],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE files ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

/// Opens (or creates) the database, sets WAL and `synchronous = FULL`, creates the schema and
/// checks its version.
pub(super) fn open_connection(path: &Path) -> Result<Connection, JournalError> {
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
    // The savepoint journal of a batch (each row in a savepoint of its own) in memory: past 64
    // KiB SQLite spills it to a temporary file, written page by page, which cost a quarter of
    // the journal thread's CPU with small files (issue 20). It only undoes a savepoint within a
    // transaction, and is never read after a crash (the WAL is).
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(open_err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.execute_batch(SCHEMA).map_err(open_err)?;
    add_missing_columns(&conn).map_err(open_err)?;
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

/// Runs `f` in a savepoint of its own inside an operation: an error rolls back what `f` did
/// and is its answer alone (`Ok(Err(..))`); a refusal by the disk fails the whole operation.
pub(super) fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, JournalError>,
) -> Result<Result<T, JournalError>, JournalError> {
    let sp = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut st| st.execute([]))
            .map(drop)
            .map_err(JournalError::sql("savepoint"))
    };
    sp("SAVEPOINT item")?;
    match f(conn) {
        Ok(v) => {
            sp("RELEASE item")?;
            Ok(Ok(v))
        }
        Err(e) if e.is_storage() => Err(e),
        Err(e) => {
            sp("ROLLBACK TO item")?;
            sp("RELEASE item")?;
            Ok(Err(e))
        }
    }
}
