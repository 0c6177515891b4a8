//! Journal operations of the sort stage and the readers every stage shares: the destination
//! recorded before the move (`placing`, `placing_checked`), `placed`, `done`, records closed
//! because their file vanished (`placed_with_events` also queues the placement's notifications),
//! and reading records back (`get`, `in_states`,
//! `closed_records_of`).
//!
//! What this file does not do: move files (the sorter does, through `fsops`).

use std::path::PathBuf;

use rusqlite::{OptionalExtension, params};

use super::Journal;
use super::ops_hooks::{NewHookEvent, queue_in};
use super::schema::{blob_path, execute, in_savepoint, load, load_state, path_blob, transition};
use super::types::{FileId, FileRecord, FileState, JournalError, Outcome};

/// The states a record may be closed as vanished from: any before the file was placed.
pub(super) const VANISH_FROM: [FileState; 7] = [
    FileState::Claimed,
    FileState::Hashed,
    FileState::Waiting,
    FileState::Submitting,
    FileState::Submitted,
    FileState::Decided,
    FileState::Placing,
];

impl Journal {
    /// Records the exact destination path before the move. Prefer [`Journal::placing_checked`],
    /// which also refuses when the outcome changed since the caller read the record.
    pub async fn placing(&self, id: FileId, dest: PathBuf) -> Result<(), JournalError> {
        self.placing_inner(id, None, dest, None).await
    }

    /// Records the exact destination path before the move, provided the record's outcome and
    /// content are still `seen` and `seen_sha256` (what the caller read when it chose the
    /// destination; the sorter may hold a record read when it was decided). A contradicting
    /// `detect` may flip a decided clean record to quarantine at any time before `placing`; this
    /// makes sure a destination chosen for the old outcome is refused rather than used.
    /// `dest_root` is the destination root the path was chosen in: the placement is finished
    /// there even if the configuration names another folder by then.
    pub async fn placing_checked(
        &self,
        id: FileId,
        dest_root: PathBuf,
        dest: PathBuf,
        seen: Option<Outcome>,
        seen_sha256: Option<[u8; 32]>,
    ) -> Result<(), JournalError> {
        self.placing_inner(id, Some(dest_root), dest, Some((seen, seen_sha256)))
            .await
    }

    async fn placing_inner(
        &self,
        id: FileId,
        dest_root: Option<PathBuf>,
        dest: PathBuf,
        seen: Option<(Option<Outcome>, Option<[u8; 32]>)>,
    ) -> Result<(), JournalError> {
        self.run(move |conn| placing_in(conn, id, dest_root.as_deref(), &dest, seen, &PLACING_FROM))
            .await
    }

    /// [`Journal::placing_checked`] for a batch of records, in one operation: each row in a
    /// savepoint of its own, refused by the same rules (the outcome or content changed since the
    /// caller read the record) and one more: the record is no longer `decided`. A batch carries
    /// records as their decision left them; one `placing` since was taken up by another attempt
    /// (a retry, a sweep, the agent of a reload), whose journaled destination may already hold
    /// the file, and is never given another. A refused row leaves the others untouched. The
    /// outer error: none was written.
    pub async fn placing_many(
        &self,
        rows: Vec<PlacingRow>,
    ) -> Result<Vec<Result<(), JournalError>>, JournalError> {
        self.run(move |conn| {
            rows.into_iter()
                .map(|r| {
                    let seen = Some((r.seen, r.seen_sha256));
                    in_savepoint(conn, |c| {
                        let decided = [FileState::Decided];
                        placing_in(c, r.id, Some(&r.dest_root), &r.dest, seen, &decided)
                    })
                })
                .collect()
        })
        .await
    }

    /// [`Journal::placed_with_events`] for a batch of records, in one operation, each record
    /// with its own notifications in a savepoint of its own. The outer error: none was written.
    pub async fn placed_many(
        &self,
        rows: Vec<(FileId, Vec<NewHookEvent>)>,
    ) -> Result<Vec<Result<(), JournalError>>, JournalError> {
        self.run(move |conn| {
            rows.into_iter()
                .map(|(id, events)| {
                    in_savepoint(conn, |c| {
                        let rec = load(c, id)?;
                        transition(c, &rec, &[FileState::Placing], FileState::Placed)?;
                        queue_in(c, id, &events)
                    })
                })
                .collect()
        })
        .await
    }

    /// [`Journal::done`] for a batch of records whose results are deleted, in one operation,
    /// each in a savepoint of its own. The outer error: none was written.
    pub async fn done_many(
        &self,
        ids: Vec<FileId>,
    ) -> Result<Vec<Result<(), JournalError>>, JournalError> {
        self.run(move |conn| {
            ids.into_iter()
                .map(|id| {
                    in_savepoint(conn, |c| {
                        let rec = load(c, id)?;
                        transition(c, &rec, &[FileState::Placed], FileState::Done)
                    })
                })
                .collect()
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

    /// The file is in its destination, and `events` (notifications of this placement) are
    /// queued in the same transaction: a placement is never announced without being recorded,
    /// nor recorded without its notifications queued.
    pub async fn placed_with_events(
        &self,
        id: FileId,
        events: Vec<NewHookEvent>,
    ) -> Result<(), JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            transition(conn, &rec, &[FileState::Placing], FileState::Placed)?;
            queue_in(conn, id, &events)
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
            execute(
                conn,
                "UPDATE files SET outcome = ?2, reason = ?3 WHERE id = ?1",
                params![id, Outcome::Vanished.as_str(), reason],
                "close",
            )?;
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
                .prepare_cached("SELECT rel_path FROM files WHERE staged = ?1")
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
}

/// One row of [`Journal::placing_many`]: record `id` goes to `dest`, chosen in `dest_root`,
/// provided its outcome and content are still `seen` and `seen_sha256`.
#[derive(Debug, Clone)]
pub struct PlacingRow {
    /// The record.
    pub id: FileId,
    /// The destination root the path was chosen in.
    pub dest_root: PathBuf,
    /// The exact destination path.
    pub dest: PathBuf,
    /// The outcome the caller read.
    pub seen: Option<Outcome>,
    /// The SHA-256 the caller read.
    pub seen_sha256: Option<[u8; 32]>,
}

/// The states a record may be given a destination from: decided, or placing again (a retry
/// that chooses another name).
const PLACING_FROM: [FileState; 2] = [FileState::Decided, FileState::Placing];

/// The `placing` row of record `id` (see [`Journal::placing_checked`]), from one of `from`.
fn placing_in(
    conn: &rusqlite::Connection,
    id: FileId,
    dest_root: Option<&std::path::Path>,
    dest: &std::path::Path,
    seen: Option<(Option<Outcome>, Option<[u8; 32]>)>,
    from: &[FileState],
) -> Result<(), JournalError> {
    let rec = load(conn, id)?;
    if let Some((_, seen_sha256)) = seen {
        if rec.sha256 != seen_sha256 {
            return Err(JournalError::Conflict {
                id,
                detail: "its content was hashed again since it was read".into(),
            });
        }
    }
    if let Some((seen, _)) = seen {
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
    transition(conn, &rec, from, FileState::Placing)?;
    execute(
        conn,
        "UPDATE files SET dest = ?2, dest_root = ?3 WHERE id = ?1",
        params![id, path_blob(dest), dest_root.map(path_blob)],
        "placing",
    )?;
    Ok(())
}
