//! Journal operations of the server anomalies a SOC must see: a verdict contradicted after the
//! file was released as clean (`not detected`, then `detect` for the same scan).
//!
//! `decided_again` (`ops_decide.rs`) writes one row per released file of that content, in the
//! transaction that resolves the contradiction, so a crash cannot lose it. The poller then
//! announces the rows not announced yet ([`Journal::announce_anomalies`]: the `anomaly` hook
//! events are queued and the rows marked in one transaction), and `dropscan anomalies list`
//! reads them ([`Journal::anomalies`]). Rows are never pruned: there is one per released file
//! and contradiction, so they stay few.
//!
//! What this file does not do: decide, deliver or move anything.

use std::path::PathBuf;

use rusqlite::{Connection, params};

use super::ops_hooks::{NewHookEvent, queue_in};
use super::schema::{blob_path, execute, path_blob, placeholders};
use super::types::{FileId, FileRecord, JournalError, ScanVerdict};
use super::{Journal, now_ms};

/// One contradicted verdict of a file already released as clean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    /// Row id (shown by `dropscan anomalies list`).
    pub id: i64,
    /// When the contradicting answer came (ms since the epoch).
    pub at_ms: i64,
    /// The released record.
    pub file_id: FileId,
    /// The watched root it came from.
    pub root: PathBuf,
    /// Its path relative to the root.
    pub rel_path: PathBuf,
    /// Where it was placed in clean, if known.
    pub dest: Option<PathBuf>,
    /// The SHA-256 the verdicts were given for.
    pub sha256: Option<[u8; 32]>,
    /// The scan whose answer changed.
    pub scan_id: Option<String>,
    /// The verdict the file was released on.
    pub first: String,
    /// The verdict that contradicts it.
    pub later: String,
    /// The `anomaly` hook events are queued.
    pub announced: bool,
}

/// Records that the released `rec` was contradicted by `later` (inside the current operation);
/// the same contradiction of the same scan is recorded once.
pub(super) fn record_in(
    conn: &Connection,
    rec: &FileRecord,
    scan_id: &str,
    first: ScanVerdict,
    later: ScanVerdict,
) -> Result<(), JournalError> {
    execute(
        conn,
        "INSERT OR IGNORE INTO anomalies (at, file_id, root, rel_path, dest, sha256, scan_id, first, later) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            now_ms(),
            rec.id,
            path_blob(&rec.root),
            path_blob(&rec.rel_path),
            rec.dest.as_deref().map(path_blob),
            rec.verdict_sha256.or(rec.sha256).map(|s| s.to_vec()),
            scan_id,
            first.as_str(),
            later.as_str()
        ],
        "anomaly",
    )?;
    Ok(())
}

fn read(conn: &Connection, only_unannounced: bool) -> Result<Vec<Anomaly>, JournalError> {
    let sql = if only_unannounced {
        "SELECT id, at, file_id, root, rel_path, dest, sha256, scan_id, first, later, announced \
         FROM anomalies WHERE announced = 0 ORDER BY id"
    } else {
        "SELECT id, at, file_id, root, rel_path, dest, sha256, scan_id, first, later, announced \
         FROM anomalies ORDER BY id"
    };
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(JournalError::sql("anomaly"))?;
    let rows = stmt
        .query_map([], |r| {
            let sha: Option<Vec<u8>> = r.get(6)?;
            Ok(Anomaly {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                file_id: r.get(2)?,
                root: blob_path(r.get(3)?),
                rel_path: blob_path(r.get(4)?),
                dest: r.get::<_, Option<Vec<u8>>>(5)?.map(blob_path),
                sha256: sha.and_then(|s| s.try_into().ok()),
                scan_id: r.get(7)?,
                first: r.get(8)?,
                later: r.get(9)?,
                announced: r.get::<_, i64>(10)? != 0,
            })
        })
        .map_err(JournalError::sql("anomaly"))?;
    rows.collect::<Result<_, _>>()
        .map_err(JournalError::sql("anomaly"))
}

impl Journal {
    /// Every recorded anomaly, oldest first.
    pub async fn anomalies(&self) -> Result<Vec<Anomaly>, JournalError> {
        self.run(|conn| read(conn, false)).await
    }

    /// The anomalies whose hook events are not queued yet, oldest first.
    pub async fn unannounced_anomalies(&self) -> Result<Vec<Anomaly>, JournalError> {
        self.run(|conn| read(conn, true)).await
    }

    /// Queues the hook events of anomalies and marks them announced, in one transaction: each
    /// `(anomaly id, its record, its events)`.
    pub async fn announce_anomalies(
        &self,
        announced: Vec<(i64, FileId, Vec<NewHookEvent>)>,
    ) -> Result<(), JournalError> {
        if announced.is_empty() {
            return Ok(());
        }
        self.run(move |conn| {
            for (_, file_id, events) in &announced {
                queue_in(conn, *file_id, events)?;
            }
            let ids: Vec<i64> = announced.iter().map(|(id, _, _)| *id).collect();
            let sql = format!(
                "UPDATE anomalies SET announced = 1 WHERE id IN ({})",
                placeholders(1, ids.len())
            );
            conn.execute(&sql, rusqlite::params_from_iter(ids.iter()))
                .map_err(JournalError::sql("anomaly"))?;
            Ok(())
        })
        .await
    }
}
