//! Journal operations of the claim stage: recording claims before the move into staging,
//! recording the hash (upload, wait for an identical file in flight, or reuse a cached verdict),
//! and the sweeps that keep claimed and waiting records moving (`stuck_claimed`,
//! `promote_orphaned_waiting`, `rehash` of a file that changed).
//!
//! What this file does not do: hash or move files (the claim stage does), or decide a scanned
//! file (`ops_decide.rs`).

use std::time::Duration;

use rusqlite::{Connection, params};

use super::ops_maint::stale_scan_in;
use super::schema::{
    COLUMNS, execute, expect_transition, in_savepoint, load, path_blob, query_one, query_row,
    row_to_record, transition,
};
use super::types::{
    FileId, FileRecord, FileState, HashedAs, JournalError, NewClaim, Outcome, ScanVerdict, Stamp,
};
use super::{Journal, now_ms};

/// The states a record may be sent back to `claimed` from (its file changed).
pub(super) const REHASH_FROM: [FileState; 5] = [
    FileState::Hashed,
    FileState::Submitting,
    FileState::Submitted,
    FileState::Placing,
    FileState::Decided,
];

/// Whether a verdict decided at `decided_at_ms` may be reused at `now_ms` under `ttl`. Fails
/// closed against wall-clock jumps: a `decided_at` in the future (the clock went back) is never
/// reused, whatever the TTL.
pub(super) fn verdict_reusable(decided_at_ms: i64, now_ms: i64, ttl: Duration) -> bool {
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
    let cached: Option<(String, String, i64)> = query_row(
        conn,
        "SELECT verdict, scan_id, decided_at FROM verdicts WHERE sha256 = ?1",
        [sha256.to_vec()],
        "hashed",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
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
    execute(
        conn,
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
        "hashed",
    )?;
    Ok(Some(o))
}

/// Records one hash (see [`Journal::hashed`]).
fn hashed_in(
    conn: &Connection,
    id: FileId,
    sha256: [u8; 32],
    stamp: Stamp,
    verdict_ttl: Duration,
) -> Result<HashedAs, JournalError> {
    let rec = load(conn, id)?;
    expect_transition(&rec, &[FileState::Claimed], FileState::Hashed)?;
    #[allow(clippy::cast_possible_wrap)]
    execute(
        conn,
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
        "hashed",
    )?;
    if !verdict_ttl.is_zero() {
        if let Some(reused) = reuse_verdict(conn, id, sha256, verdict_ttl)? {
            return Ok(HashedAs::Reused(reused));
        }
    }
    let in_flight: bool = query_one(
        conn,
        "SELECT EXISTS(SELECT 1 FROM files WHERE sha256 = ?1 AND id != ?2 AND \
         state IN (?3, ?4, ?5))",
        params![
            sha256.to_vec(),
            id,
            FileState::Hashed.as_str(),
            FileState::Submitting.as_str(),
            FileState::Submitted.as_str()
        ],
        "hashed",
        |r| r.get(0),
    )?;
    if in_flight {
        // claimed → waiting: the `hashed` above is part of the same operation.
        execute(
            conn,
            "UPDATE files SET state = ?2 WHERE id = ?1",
            params![id, FileState::Waiting.as_str()],
            "hashed",
        )?;
        return Ok(HashedAs::Waiting);
    }
    Ok(HashedAs::Hashed)
}

impl Journal {
    /// Records claims before the files are moved into staging; returns their ids in order.
    pub async fn claim(&self, claims: Vec<NewClaim>) -> Result<Vec<FileId>, JournalError> {
        self.run(move |conn| {
            let now = now_ms();
            let mut ids = Vec::with_capacity(claims.len());
            for c in &claims {
                #[allow(clippy::cast_possible_wrap)]
                execute(
                    conn,
                    "INSERT INTO files (root, rel_path, staged, state, claimed_at, updated_at, \
                     dropped_at, staging_dev, staging_ino) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8)",
                    params![
                        path_blob(&c.root),
                        path_blob(&c.rel_path),
                        path_blob(&c.staged),
                        FileState::Claimed.as_str(),
                        now,
                        c.dropped_at_ms,
                        // Stored as SQLite's signed integers, bit for bit.
                        c.staging_folder.map(|(dev, _)| dev as i64),
                        c.staging_folder.map(|(_, ino)| ino as i64)
                    ],
                    "claim",
                )?;
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
                execute(
                    conn,
                    "DELETE FROM files WHERE id = ?1 AND state = ?2",
                    params![id, FileState::Claimed.as_str()],
                    "unclaim",
                )?;
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
        self.run(move |conn| hashed_in(conn, id, sha256, stamp, verdict_ttl))
            .await
    }

    /// [`Journal::hashed`] for a batch of files owned together, in one operation: each file in
    /// its own savepoint (a record refused, e.g. no longer `claimed`, is answered alone and
    /// changes nothing), answered in order once the one COMMIT is durable. A refusal by the
    /// disk (full, I/O error) fails the whole operation: nothing of it is kept, and every
    /// record stays `claimed` (hashed again, as after a single `hashed` that failed).
    pub async fn hashed_many(
        &self,
        files: Vec<(FileId, [u8; 32], Stamp)>,
        verdict_ttl: Duration,
    ) -> Result<Vec<Result<HashedAs, JournalError>>, JournalError> {
        self.run(move |conn| {
            let mut answers = Vec::with_capacity(files.len());
            for (id, sha256, stamp) in files {
                let answer = in_savepoint(conn, |c| hashed_in(c, id, sha256, stamp, verdict_ttl))?;
                answers.push(answer);
            }
            Ok(answers)
        })
        .await
    }

    /// Promotes, for each content whose records all wait, the oldest waiting record to `hashed`
    /// (its primary changed, vanished or failed locally). Returns how many were promoted.
    pub async fn promote_orphaned_waiting(&self) -> Result<usize, JournalError> {
        self.run(|conn| {
            execute(
                conn,
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
                "promote",
            )
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
            if let (false, Some(scan_id)) = (rec.reused, &rec.scan_id) {
                if rec.state != FileState::Hashed {
                    stale_scan_in(conn, scan_id.as_str())?;
                }
            }
            execute(
                conn,
                "UPDATE files SET sha256 = NULL, size = NULL, scan_id = NULL, outcome = NULL, \
                 verdict = NULL, verdict_sha256 = NULL, reused = 0, dest = NULL WHERE id = ?1",
                params![id],
                "rehash",
            )?;
            Ok(())
        })
        .await
    }
}
