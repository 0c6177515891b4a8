//! Journal maintenance: the queue of scan results to delete on the server (`stale_scans`, read
//! by the poller), the short error history, pruning of old records and expired verdicts, and the
//! summary for `dropscan status` and metrics (also read from another process, read-only, by
//! [`read_summary`]).
//!
//! What this file does not do: delete anything on the server (the poller does).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::schema::{blob_path, execute, path_blob};
use super::types::{FileState, JournalError, Outcome, Summary};
use super::{Journal, now_ms};

/// How many recent errors are kept for `dropscan status`.
const ERRORS_KEPT: i64 = 200;

/// Appends to the error history (inside the current operation).
pub(super) fn note_error_in(conn: &Connection, text: &str) -> Result<(), JournalError> {
    execute(
        conn,
        "INSERT INTO errors (at, text) VALUES (?1, ?2)",
        params![now_ms(), text],
        "errors",
    )?;
    execute(
        conn,
        "DELETE FROM errors WHERE id <= (SELECT MAX(id) FROM errors) - ?1",
        [ERRORS_KEPT],
        "errors",
    )?;
    Ok(())
}

/// Queues a scan's result for deletion on the server (inside the current operation).
pub(super) fn stale_scan_in(conn: &Connection, scan_id: &str) -> Result<(), JournalError> {
    execute(
        conn,
        "INSERT OR IGNORE INTO stale_scans (scan_id, added_at) VALUES (?1, ?2)",
        params![scan_id, now_ms()],
        "stale",
    )?;
    Ok(())
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

/// Counts and ages, read on `conn` (the writer's, or a read-only one).
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
        .prepare(
            "SELECT root, COUNT(*), MIN(claimed_at) FROM files WHERE state NOT IN (?1, ?2) \
             GROUP BY root",
        )
        .map_err(JournalError::sql("summary"))?;
    let pending_by_root = stmt
        .query_map(
            params![FileState::Placed.as_str(), FileState::Done.as_str()],
            |r| Ok((blob_path(r.get(0)?), r.get(1)?, r.get(2)?)),
        )
        .map_err(JournalError::sql("summary"))?
        .collect::<Result<_, _>>()
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
        pending_by_root,
        last_errors,
    })
}

impl Journal {
    /// Whether a write was refused by the disk (full, I/O error) and none has succeeded since.
    pub fn writes_failing(&self) -> bool {
        self.health
            .failing
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// A small write that tells whether the disk takes writes again (see [`Journal::recovered`]):
    /// called while [`Journal::writes_failing`], since nothing else may write while files wait.
    pub async fn probe_write(&self) -> Result<(), JournalError> {
        self.run(|conn| {
            execute(
                conn,
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('write_probe', ?1)",
                params![now_ms().to_string()],
                "write probe",
            )?;
            Ok(())
        })
        .await
    }

    /// Queues scan results to delete on the server (a scan abandoned after a timeout).
    pub async fn stale_scan(&self, scan_id: String) -> Result<(), JournalError> {
        self.run(move |conn| stale_scan_in(conn, &scan_id)).await
    }

    /// When dropscan first took a file from below the folder `rel_dir` of the inbox `root`
    /// (ms since the epoch) at or after `since_ms` (the folder's creation: a file taken from an
    /// earlier folder of the same name says nothing about this one), among the records kept:
    /// what `tidy` asks before it removes a folder.
    pub async fn first_taken_below(
        &self,
        root: PathBuf,
        rel_dir: PathBuf,
        since_ms: i64,
    ) -> Result<Option<i64>, JournalError> {
        let mut prefix = path_blob(&rel_dir);
        prefix.push(b'/');
        let root = path_blob(&root);
        self.run(move |conn| {
            let len = i64::try_from(prefix.len()).unwrap_or(i64::MAX);
            conn.query_row(
                "SELECT MIN(claimed_at) FROM files WHERE root = ?1 AND substr(rel_path, 1, ?2) = ?3 \
                 AND claimed_at >= ?4",
                params![root, len, prefix, since_ms],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map_err(JournalError::sql("tidy"))
        })
        .await
    }

    /// Scan results waiting to be deleted on the server.
    pub async fn stale_scans(&self) -> Result<Vec<String>, JournalError> {
        self.run(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT scan_id FROM stale_scans ORDER BY added_at LIMIT 1000")
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
            execute(
                conn,
                "DELETE FROM stale_scans WHERE scan_id = ?1",
                [scan_id],
                "stale",
            )?;
            Ok(())
        })
        .await
    }

    /// Keeps a short history of errors for `dropscan status`.
    pub async fn note_error(&self, text: String) -> Result<(), JournalError> {
        self.run(move |conn| note_error_in(conn, &text)).await
    }

    /// Drops finished records older than `history` (but never one whose file is still kept in
    /// quarantine or failed, a tool's custody of it included, nor one with an audit trail; see `ops_audit.rs`), notifications
    /// given up on longer ago than `history`, and verdicts older than `verdict_ttl`. A
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
            // Never pruned: a file still kept in quarantine or failed (no custody row says it
            // left: a `busy:` row is a tool at work on it, or one killed mid-move whose next run
            // finishes that move from this record), and a record with an audit trail (the audit
            // names it).
            let n = conn
                .execute(
                    "DELETE FROM files WHERE state = ?2 AND updated_at < ?1 \
                     AND NOT (outcome IN (?3, ?4) AND dest IS NOT NULL \
                              AND id NOT IN (SELECT file_id FROM custody \
                                             WHERE status NOT LIKE 'busy:%')) \
                     AND id NOT IN (SELECT file_id FROM audit WHERE file_id IS NOT NULL)",
                    params![
                        now.saturating_sub(h),
                        FileState::Done.as_str(),
                        Outcome::Quarantine.as_str(),
                        Outcome::Failed.as_str()
                    ],
                )
                .map_err(JournalError::sql("prune"))?;
            // Notifications given up on are kept for `status` as long as finished records.
            execute(
                conn,
                "DELETE FROM hook_events WHERE gave_up != 0 AND next_at < ?1",
                [now.saturating_sub(h)],
                "prune",
            )?;
            execute(
                conn,
                "DELETE FROM verdicts WHERE decided_at < ?1 OR decided_at > ?2",
                params![now.saturating_sub(t), now],
                "prune",
            )?;
            Ok(n)
        })
        .await
    }

    /// Counts and ages.
    pub async fn summary(&self) -> Result<Summary, JournalError> {
        self.run(summary_in).await
    }
}
