//! Journal operations of the quarantine and failed tools (`dropscan quarantine …`,
//! `dropscan failed …`): the files kept in quarantine or failed, read with their audit trail
//! ([`Journal::kept`]); custody of one such file while a tool works on it
//! ([`Journal::take_custody`], [`Journal::plan_custody`], [`Journal::end_custody`]); and the
//! audit records themselves.
//!
//! A *kept* file is a record whose outcome is quarantine or failed and whose placement is done
//! (`placed` or `done`, with a destination). While no `custody` row names it, its file is still
//! where the sorter put it. A tool takes custody first (`busy:ACTION`), records where the file
//! is going (`custody_plan`) *before* it moves anything, then ends custody with where the file
//! went (`released`, `restored`, `purged`, `retried`) or with nothing (it is kept, the action was
//! refused), writing the audit record and dropping the plan in the same transaction.
//!
//! Whether a tool is still at work is not the journal's to say: the tool holds an `flock` for
//! its whole life (`commands::custody`), and only the holder calls [`Journal::take_custody`]. A
//! `busy` row found by the holder was therefore left by a run that is gone (killed, Ctrl-C,
//! power cut), whatever its age: it is handed back as [`Interrupted`], with the plan, so that
//! the new run finishes or undoes that move at once. No wall-clock age is involved.
//!
//! Records of kept files are never pruned, nor are records with an audit trail
//! (`ops_maint.rs`): the audit always names its record. Audit rows are never pruned.
//!
//! What this file does not do: touch files or locks (the commands do, through `fsops`).

use std::path::PathBuf;

use rusqlite::{Connection, params};
use serde::Serialize;

use super::schema::{COLUMNS, blob_path, execute, load, path_blob, query_row, row_to_record};
use super::types::{FileId, FileRecord, FileState, JournalError, Outcome};
use super::{Journal, now_ms};

/// One audit record: who did what to which file, when, why.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// Row id (0 before it is written).
    pub id: i64,
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// The Unix user who ran the tool (and the one behind `sudo`, if any).
    pub user: String,
    /// What was done: `release`, `restore`, `purge`, `retry`, or `ACTION-refused`.
    pub action: String,
    /// The record it is about.
    pub file_id: Option<FileId>,
    /// Why, as given by the user.
    pub reason: Option<String>,
    /// The details (paths, hash, error), as JSON.
    pub detail: serde_json::Value,
}

/// A kept file: its record, what became of it (`None`: still kept), and its audit trail.
#[derive(Debug, Clone)]
pub struct Kept {
    /// The journal record.
    pub record: FileRecord,
    /// The custody status (`None` while the file is kept; `busy:ACTION`, `released`, …; the
    /// tools show `busy:ACTION` whose tool is gone as `interrupted:ACTION`).
    pub status: Option<String>,
    /// Its audit records, oldest first.
    pub audit: Vec<AuditEntry>,
}

impl Kept {
    /// True while the file is still in its quarantine or failed folder, or a tool is moving it
    /// (or was, and was interrupted: the next run finishes the move).
    pub fn is_kept(&self) -> bool {
        self.status
            .as_deref()
            .is_none_or(|s| s.starts_with("busy:") || s.starts_with("interrupted:"))
    }
}

/// Where a tool is moving a kept file, recorded before the move ([`Journal::plan_custody`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustodyPlan {
    /// `release`, `restore` or `retry`.
    pub action: String,
    /// The folder the file goes to (absolute): a copy's temp is made at its top.
    pub to_root: PathBuf,
    /// The target, relative to `to_root`.
    pub target: PathBuf,
    /// Who asked for the move (as in [`AuditEntry::user`]).
    pub user: String,
    /// Why, as given.
    pub reason: Option<String>,
    /// When it was recorded (ms since the epoch, for people).
    pub at_ms: i64,
}

/// What a run that was interrupted left behind, found by the next run to take custody.
#[derive(Debug, Clone)]
pub struct Interrupted {
    /// The action it was doing (`release`, `restore`, `retry`, `purge`).
    pub action: String,
    /// When it took custody (ms since the epoch, for people).
    pub since_ms: i64,
    /// Where it was moving the file, once it had chosen (`None`: nothing had moved yet, or a
    /// `purge`).
    pub plan: Option<CustodyPlan>,
}

/// Custody taken by [`Journal::take_custody`].
#[derive(Debug, Clone)]
pub struct Custody {
    /// The record as it is now.
    pub record: FileRecord,
    /// Left by a run that is gone: to be finished or undone before anything else.
    pub interrupted: Option<Interrupted>,
}

fn insert_audit(conn: &Connection, e: &AuditEntry) -> Result<i64, JournalError> {
    execute(
        conn,
        "INSERT INTO audit (at, user, action, file_id, reason, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            e.at_ms,
            e.user,
            e.action,
            e.file_id,
            e.reason,
            e.detail.to_string()
        ],
        "audit",
    )?;
    Ok(conn.last_insert_rowid())
}

fn audit_of(conn: &Connection, id: FileId) -> Result<Vec<AuditEntry>, JournalError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, at, user, action, file_id, reason, detail FROM audit WHERE file_id = ?1 ORDER BY id",
        )
        .map_err(JournalError::sql("audit"))?;
    let rows = stmt
        .query_map([id], |r| {
            let detail: String = r.get(6)?;
            Ok(AuditEntry {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                user: r.get(2)?,
                action: r.get(3)?,
                file_id: r.get(4)?,
                reason: r.get(5)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
            })
        })
        .map_err(JournalError::sql("audit"))?;
    rows.collect::<Result<_, _>>()
        .map_err(JournalError::sql("audit"))
}

fn status_of(conn: &Connection, id: FileId) -> Result<Option<(String, i64)>, JournalError> {
    query_row(
        conn,
        "SELECT status, at FROM custody WHERE file_id = ?1",
        [id],
        "custody",
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

fn plan_of(conn: &Connection, id: FileId) -> Result<Option<CustodyPlan>, JournalError> {
    query_row(
        conn,
        "SELECT action, to_root, target, user, reason, at FROM custody_plan WHERE file_id = ?1",
        [id],
        "custody",
        |r| {
            Ok(CustodyPlan {
                action: r.get(0)?,
                to_root: blob_path(r.get(1)?),
                target: blob_path(r.get(2)?),
                user: r.get(3)?,
                reason: r.get(4)?,
                at_ms: r.get(5)?,
            })
        },
    )
}

/// Whether `rec` is a placed file of `outcome` (its placement finished, its destination known).
fn is_placed_as(rec: &FileRecord, outcome: Outcome) -> bool {
    rec.outcome == Some(outcome)
        && matches!(rec.state, FileState::Placed | FileState::Done)
        && rec.dest.is_some()
}

fn kept_in(conn: &Connection, rec: FileRecord) -> Result<Kept, JournalError> {
    let status = status_of(conn, rec.id)?.map(|(s, _)| s);
    let audit = audit_of(conn, rec.id)?;
    Ok(Kept {
        record: rec,
        status,
        audit,
    })
}

impl Journal {
    /// The files placed as `outcome` (quarantine or failed), oldest first: those still kept, or
    /// with `all` also those released, restored, purged or retried, each with its audit trail.
    pub async fn kept(&self, outcome: Outcome, all: bool) -> Result<Vec<Kept>, JournalError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM files WHERE outcome = ?1 AND state IN (?2, ?3) \
                     AND dest IS NOT NULL ORDER BY id"
                ))
                .map_err(JournalError::sql("read"))?;
            let recs = stmt
                .query_map(
                    params![
                        outcome.as_str(),
                        FileState::Placed.as_str(),
                        FileState::Done.as_str()
                    ],
                    row_to_record,
                )
                .map_err(JournalError::sql("read"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(JournalError::sql("read"))?;
            let mut out = Vec::with_capacity(recs.len());
            for rec in recs {
                let k = kept_in(conn, rec)?;
                if all || k.is_kept() {
                    out.push(k);
                }
            }
            Ok(out)
        })
        .await
    }

    /// One record placed as `outcome`, with its custody status and audit trail; `None` if there
    /// is no such record or it was not placed as `outcome`.
    pub async fn kept_one(
        &self,
        id: FileId,
        outcome: Outcome,
    ) -> Result<Option<Kept>, JournalError> {
        self.run(move |conn| {
            let Some(rec) = query_row(
                conn,
                &format!("SELECT {COLUMNS} FROM files WHERE id = ?1"),
                [id],
                "read",
                row_to_record,
            )?
            else {
                return Ok(None);
            };
            if !is_placed_as(&rec, outcome) {
                return Ok(None);
            }
            kept_in(conn, rec).map(Some)
        })
        .await
    }

    /// Takes custody of a kept file of `outcome` for `action`: refused (a
    /// [`JournalError::Conflict`] saying why) if there is no such kept file. The caller must
    /// hold the entry's custody lock (see the module docs): custody left `busy` is then a run
    /// that is gone, and comes back as [`Custody::interrupted`] with its plan, which stays
    /// recorded until the new run ends custody.
    pub async fn take_custody(
        &self,
        id: FileId,
        outcome: Outcome,
        action: &'static str,
    ) -> Result<Custody, JournalError> {
        self.run(move |conn| {
            let rec = load(conn, id)?;
            if !is_placed_as(&rec, outcome) {
                return Err(JournalError::Conflict {
                    id,
                    detail: format!("is not a file placed in {}", outcome.as_str()),
                });
            }
            let interrupted = match status_of(conn, id)? {
                None => None,
                Some((s, at)) if s.starts_with("busy:") => Some(Interrupted {
                    action: s.trim_start_matches("busy:").to_string(),
                    since_ms: at,
                    plan: plan_of(conn, id)?,
                }),
                Some((s, _)) => {
                    return Err(JournalError::Conflict {
                        id,
                        detail: format!("is no longer in {} ({s})", outcome.as_str()),
                    });
                }
            };
            execute(
                conn,
                "INSERT OR REPLACE INTO custody (file_id, status, at) VALUES (?1, ?2, ?3)",
                params![id, format!("busy:{action}"), now_ms()],
                "custody",
            )?;
            Ok(Custody {
                record: rec,
                interrupted,
            })
        })
        .await
    }

    /// Records where the file in custody is going, before it moves (replacing an earlier
    /// plan: a target taken meanwhile, a run taking over).
    pub async fn plan_custody(&self, id: FileId, plan: CustodyPlan) -> Result<(), JournalError> {
        self.run(move |conn| {
            execute(
                conn,
                "INSERT OR REPLACE INTO custody_plan (file_id, action, to_root, target, user, reason, at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id,
                    plan.action,
                    path_blob(&plan.to_root),
                    path_blob(&plan.target),
                    plan.user,
                    plan.reason,
                    plan.at_ms
                ],
                "custody",
            )?;
            Ok(())
        })
        .await
    }

    /// Ends custody: `status` says where the file went (`None`: it is still kept), and `entry`
    /// is audited in the same transaction, which also drops the plan. Returns the audit row's
    /// id.
    pub async fn end_custody(
        &self,
        id: FileId,
        status: Option<&'static str>,
        entry: AuditEntry,
    ) -> Result<i64, JournalError> {
        self.run(move |conn| {
            match status {
                Some(s) => execute(
                    conn,
                    "INSERT OR REPLACE INTO custody (file_id, status, at) VALUES (?1, ?2, ?3)",
                    params![id, s, now_ms()],
                    "custody",
                )?,
                None => execute(
                    conn,
                    "DELETE FROM custody WHERE file_id = ?1",
                    [id],
                    "custody",
                )?,
            };
            execute(
                conn,
                "DELETE FROM custody_plan WHERE file_id = ?1",
                [id],
                "custody",
            )?;
            insert_audit(conn, &entry)
        })
        .await
    }

    /// The records a tool holds (or held, and died holding) custody of: the copy temp of such a
    /// record may be the only copy of its file (a release killed after the quarantined file
    /// went), so start-up clean-up leaves it for the tool's next run to finish.
    pub async fn in_custody(&self) -> Result<Vec<FileId>, JournalError> {
        self.run(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT file_id FROM custody WHERE status LIKE 'busy:%'")
                .map_err(JournalError::sql("custody"))?;
            let mut ids = Vec::new();
            for id in stmt
                .query_map([], |r| r.get(0))
                .map_err(JournalError::sql("custody"))?
            {
                ids.push(id.map_err(JournalError::sql("custody"))?);
            }
            Ok(ids)
        })
        .await
    }

    /// Writes one audit record (a refusal that took no custody). Returns its row id.
    pub async fn audit(&self, entry: AuditEntry) -> Result<i64, JournalError> {
        self.run(move |conn| insert_audit(conn, &entry)).await
    }
}
