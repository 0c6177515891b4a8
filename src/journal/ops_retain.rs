//! Journal operations for originals kept in staging (`retained` table): where no read lease
//! could tell whether a writer still held a claimed file, the hash keeps the user's inode as
//! `X.orig` beside its private copy (see `fsops::own`). The claim stage's sweep reads them back,
//! drops those unchanged for `keep_original`, and sends changed ones back to the inbox.
//!
//! A row is self-contained (root and relative path are copied from the file's record), so it
//! outlives the record's pruning.

use std::path::PathBuf;

use rusqlite::params;

use super::Journal;
use super::now_ms;
use super::schema::{blob_path, execute, path_blob};
use super::types::{FileId, JournalError, Stamp};

/// An original kept in staging.
#[derive(Debug, Clone)]
pub struct Retained {
    /// Its path in staging (`X.orig`).
    pub orig: PathBuf,
    /// The watched root it was dropped into.
    pub root: PathBuf,
    /// Its path relative to the root, where it goes back if it changes.
    pub rel_path: PathBuf,
    /// Its stamp when it was copied.
    pub stamp: Stamp,
    /// When it was kept (ms since the epoch).
    pub kept_at_ms: i64,
}

impl Journal {
    /// Records that record `id`'s original is kept at `orig` with `stamp`. Returns false when
    /// the record is unknown (nothing recorded).
    pub async fn retain(
        &self,
        id: FileId,
        orig: PathBuf,
        stamp: Stamp,
    ) -> Result<bool, JournalError> {
        self.run(move |conn| {
            #[allow(clippy::cast_possible_wrap)]
            let n = execute(
                conn,
                "INSERT OR REPLACE INTO retained (orig, root, rel_path, size, mtime_ns, ctime_ns, \
                 dev, ino, kept_at) SELECT ?2, root, rel_path, ?3, ?4, ?5, ?6, ?7, ?8 FROM files \
                 WHERE id = ?1",
                params![
                    id,
                    path_blob(&orig),
                    stamp.size as i64,
                    stamp.mtime_ns,
                    stamp.ctime_ns,
                    stamp.dev as i64,
                    stamp.ino as i64,
                    now_ms()
                ],
                "retain",
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// Every kept original.
    pub async fn retained(&self) -> Result<Vec<Retained>, JournalError> {
        self.run(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT orig, root, rel_path, size, mtime_ns, ctime_ns, dev, ino, kept_at \
                     FROM retained ORDER BY kept_at",
                )
                .map_err(JournalError::sql("retained"))?;
            #[allow(clippy::cast_sign_loss)]
            let rows = stmt
                .query_map([], |r| {
                    Ok(Retained {
                        orig: blob_path(r.get(0)?),
                        root: blob_path(r.get(1)?),
                        rel_path: blob_path(r.get(2)?),
                        stamp: Stamp {
                            size: r.get::<_, i64>(3)? as u64,
                            mtime_ns: r.get(4)?,
                            ctime_ns: r.get(5)?,
                            dev: r.get::<_, i64>(6)? as u64,
                            ino: r.get::<_, i64>(7)? as u64,
                        },
                        kept_at_ms: r.get(8)?,
                    })
                })
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(JournalError::sql("retained"))?;
            Ok(rows)
        })
        .await
    }

    /// Forgets a kept original (dropped, sent back, or gone). With `kept_at_ms`, only the row
    /// of that keeping: the same name kept again meanwhile (the file owned again) stays.
    pub async fn unretain(
        &self,
        orig: PathBuf,
        kept_at_ms: Option<i64>,
    ) -> Result<(), JournalError> {
        self.run(move |conn| {
            execute(
                conn,
                "DELETE FROM retained WHERE orig = ?1 AND (?2 IS NULL OR kept_at = ?2)",
                params![path_blob(&orig), kept_at_ms],
                "unretain",
            )?;
            Ok(())
        })
        .await
    }
}
