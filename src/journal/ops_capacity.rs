//! Journal operations of the limits: what the agent learned about the server's capacity, kept in
//! the `meta` table so that a restart does not start from scratch, and a small snapshot of the
//! limits (cap, learned capacity, scan time, throughput, binding limit) that `dropscan status`
//! reads from another process.
//!
//! The journal stores the snapshot as opaque text (the `limits` module owns its format); it only
//! knows the keys. What this file does not do: decide anything about the cap.

use std::path::Path;
use std::time::Duration;

use rusqlite::{OptionalExtension, params};

use super::Journal;
use super::schema::execute;
use super::types::JournalError;

/// `meta` key of the learned capacity (a decimal number of scans).
const LEARNED_KEY: &str = "capacity.learned";
/// `meta` key of the limits snapshot (text owned by `limits`).
const SNAPSHOT_KEY: &str = "capacity.snapshot";

impl Journal {
    /// The server capacity learned by an earlier run, if any (a malformed value counts as none).
    pub async fn learned_capacity(&self) -> Result<Option<usize>, JournalError> {
        self.run(|conn| {
            let v: Option<String> = conn
                .query_row(
                    "SELECT value FROM meta WHERE key = ?1",
                    [LEARNED_KEY],
                    |r| r.get(0),
                )
                .optional()
                .map_err(JournalError::sql("meta"))?;
            Ok(v.and_then(|s| s.trim().parse::<usize>().ok())
                .filter(|n| *n > 0))
        })
        .await
    }

    /// Stores the learned capacity (when known) and the limits snapshot, in one transaction.
    pub async fn save_capacity(
        &self,
        learned: Option<usize>,
        snapshot: String,
    ) -> Result<(), JournalError> {
        self.run(move |conn| {
            let upsert = "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                          ON CONFLICT(key) DO UPDATE SET value = excluded.value";
            if let Some(n) = learned.filter(|n| *n > 0) {
                execute(conn, upsert, params![LEARNED_KEY, n.to_string()], "meta")?;
            }
            execute(conn, upsert, params![SNAPSHOT_KEY, snapshot], "meta")?;
            Ok(())
        })
        .await
    }
}

/// The limits snapshot as last saved by the daemon, read from another process (read-only; the
/// daemon may be writing). `None` when no run has saved one yet.
pub fn read_capacity_snapshot(path: &Path) -> Result<Option<String>, JournalError> {
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
    conn.query_row(
        "SELECT value FROM meta WHERE key = ?1",
        [SNAPSHOT_KEY],
        |r| r.get(0),
    )
    .optional()
    .map_err(JournalError::sql("meta"))
}
