//! Journal operations of the upload and poll stages: the scanId chosen before the POST
//! (`submitting`), the server's acceptance (`submitted`), and the ways back to `hashed` when a
//! submission was certainly not accepted (`not_submitted`), may have been (`resend`), or ended in
//! `error`/`timeout` (`resubmit`). Every abandoned scanId is queued for deletion on the server in
//! the same transaction.
//!
//! What this file does not do: talk to the server, or decide a verdict (`ops_decide.rs`).

use rusqlite::params;

use super::Journal;
use super::now_ms;
use super::ops_maint::stale_scan_in;
use super::schema::{execute, load, transition};
use super::types::{FileId, FileRecord, FileState, JournalError, Stamp};
use crate::scanner::ScanId;

/// `submitting` → `submitted`, one more attempt counted.
fn mark_submitted(conn: &rusqlite::Connection, id: FileId) -> Result<(), JournalError> {
    let rec = load(conn, id)?;
    transition(conn, &rec, &[FileState::Submitting], FileState::Submitted)?;
    execute(
        conn,
        "UPDATE files SET attempts = attempts + 1 WHERE id = ?1",
        params![id],
        "submitted",
    )?;
    Ok(())
}

/// Refuses a `submitting` record with no hash (a tee, [`Journal::teeing`]) a way back to
/// `hashed`: it has no hash to be uploaded under.
fn hash_known(rec: &FileRecord) -> Result<(), JournalError> {
    if rec.state == FileState::Submitting && rec.sha256.is_none() {
        return Err(JournalError::Conflict {
            id: rec.id,
            detail: "is owned while it is uploaded; it has no hash to go back to".into(),
        });
    }
    Ok(())
}

/// Records `scan_id` as the record's current scan, and among those it ever had.
fn set_scan(
    conn: &rusqlite::Connection,
    rec: &FileRecord,
    scan_id: &ScanId,
    op: &'static str,
) -> Result<(), JournalError> {
    let mut ids = rec.scan_ids.clone();
    if !ids.contains(scan_id) {
        ids.push(scan_id.clone());
    }
    execute(
        conn,
        "UPDATE files SET scan_id = ?2, scan_ids = ?3, submitted_at = ?4 WHERE id = ?1",
        params![rec.id, scan_id.as_str(), joined(&ids), now_ms()],
        op,
    )?;
    Ok(())
}

/// The `scan_ids` column: the ids, comma-separated (no scanId holds a comma).
fn joined(ids: &[ScanId]) -> String {
    ids.iter().map(ScanId::as_str).collect::<Vec<_>>().join(",")
}

impl Journal {
    /// Records the scanId of a submission about to be sent.
    pub async fn submitting(&self, id: FileId, scan_id: ScanId) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            transition(conn, &rec, &[FileState::Hashed], FileState::Submitting)?;
            set_scan(conn, &rec, &scan_id, "submitting")
        })
        .await
    }

    /// The tee (issue 20): a `claimed` record's file is about to be owned while it is uploaded
    /// under `scan_id`, its hash known only at the end. The record says `submitting` with no
    /// hash until [`Journal::teed`] or [`Journal::untee`]; a start-up finding it so unties it
    /// (the file is owned again, the scan deleted).
    pub async fn teeing(&self, id: FileId, scan_id: ScanId) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            transition(conn, &rec, &[FileState::Claimed], FileState::Submitting)?;
            set_scan(conn, &rec, &scan_id, "teeing")
        })
        .await
    }

    /// The tee ended well: the file is owned (its copy is the staged file, durable) and hashed
    /// as `sha256`, and the server accepted `scan_id` for exactly those bytes. One transaction
    /// records the hash and the acceptance (`submitting` → `submitted`); answers the record as
    /// committed. Refused unless the record is still the tee of `scan_id`.
    pub async fn teed(
        &self,
        id: FileId,
        scan_id: ScanId,
        sha256: [u8; 32],
        stamp: Stamp,
    ) -> Result<FileRecord, JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            if rec.sha256.is_some() || rec.scan_id.as_ref() != Some(&scan_id) {
                return Err(JournalError::Conflict {
                    id,
                    detail: format!("is not the tee of scan {scan_id}"),
                });
            }
            #[allow(clippy::cast_possible_wrap)]
            execute(
                conn,
                "UPDATE files SET sha256 = ?2, size = ?3, mtime_ns = ?4, ctime_ns = ?5, \
                 dev = ?6, ino = ?7 WHERE id = ?1",
                params![
                    id,
                    sha256.to_vec(),
                    stamp.size as i64,
                    stamp.mtime_ns,
                    stamp.ctime_ns,
                    stamp.dev as i64,
                    stamp.ino as i64
                ],
                "teed",
            )?;
            mark_submitted(conn, id)?;
            load(conn, id)
        })
        .await
    }

    /// The tee did not end well (the owning or the upload failed, or the agent stopped): back
    /// to `claimed`, to be owned the usual way, and the scan is queued for deletion in the same
    /// transaction (the server may have taken it). Refused unless the record is a tee.
    pub async fn untee(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            if rec.state != FileState::Submitting || rec.sha256.is_some() {
                return Err(JournalError::Conflict {
                    id,
                    detail: "is not owned while it is uploaded".into(),
                });
            }
            transition(conn, &rec, &[FileState::Submitting], FileState::Claimed)?;
            if let Some(old) = &rec.scan_id {
                stale_scan_in(conn, old.as_str())?;
            }
            execute(
                conn,
                "UPDATE files SET scan_id = NULL WHERE id = ?1",
                params![id],
                "untee",
            )
            .map(|_| ())
        })
        .await
    }

    /// The server accepted the scan (or, at start-up, knows it).
    pub async fn submitted(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| mark_submitted(conn, id)).await
    }

    /// [`Journal::submitted`], answering with the record as committed: one operation where the
    /// uploader needed two (the record read in the same transaction, no second trip to the
    /// journal thread).
    pub async fn submitted_record(&self, id: FileId) -> Result<FileRecord, JournalError> {
        self.run(move |conn| {
            mark_submitted(conn, id)?;
            load(conn, id)
        })
        .await
    }

    /// The submission was certainly not accepted (429, 5xx, 401): back to waiting for a slot.
    /// When it may have been accepted after all, use [`Journal::resend`].
    pub async fn not_submitted(&self, id: FileId) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            hash_known(&rec)?;
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
            hash_known(&rec)?;
            transition(conn, &rec, &[FileState::Submitting], FileState::Hashed)?;
            if let Some(old) = &rec.scan_id {
                stale_scan_in(conn, old.as_str())?;
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
        old_scan_id: ScanId,
        note: String,
    ) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            if rec.scan_id.as_ref() != Some(&old_scan_id) {
                return Err(JournalError::Conflict {
                    id,
                    detail: format!("scan {old_scan_id} is not its current scan"),
                });
            }
            transition(conn, &rec, &[FileState::Submitted], FileState::Hashed)?;
            execute(
                conn,
                "UPDATE files SET reason = ?2 WHERE id = ?1",
                params![id, note],
                "resubmit",
            )?;
            stale_scan_in(conn, old_scan_id.as_str())
        })
        .await
    }
}
