//! Journal operations of the poll stage's outcome: [`Journal::decide`] writes a decision once,
//! shares it with the records waiting for the same content, caches the verdict for reuse, and
//! resolves a contradicting server answer fail-closed (`detect` wins while the file is still in
//! staging; see the module docs of `journal`); a file already released is recorded as an anomaly.
//!
//! What this file does not do: read verdicts from the server (the poller does), or place files
//! (`ops_place.rs` and the sorter).

use rusqlite::{Connection, params};

use super::ops_anomaly::record_in;
use super::ops_maint::note_error_in;
use super::schema::{COLUMNS, execute, expect_transition, load, placeholders, row_to_record};
use super::types::{Decision, FileId, FileRecord, FileState, JournalError, Outcome, ScanVerdict};
use super::{Journal, now_ms};
use crate::scanner::ScanId;

/// Records a verdict in the reuse table. `detect` wins: a cached `detect` is never replaced by
/// `not detected` for the same SHA-256 (it expires with the TTL instead).
fn cache_verdict(
    conn: &Connection,
    sha256: [u8; 32],
    verdict: ScanVerdict,
    scan_id: &str,
) -> Result<(), JournalError> {
    execute(
        conn,
        "INSERT INTO verdicts (sha256, outcome, verdict, scan_id, decided_at) \
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(sha256) DO UPDATE SET \
         outcome = excluded.outcome, verdict = excluded.verdict, \
         scan_id = excluded.scan_id, decided_at = excluded.decided_at \
         WHERE verdicts.verdict != ?6 OR excluded.verdict = ?6",
        params![
            sha256.to_vec(),
            verdict.outcome().as_str(),
            verdict.as_str(),
            scan_id,
            now_ms(),
            ScanVerdict::Detect.as_str()
        ],
        "decide",
    )?;
    Ok(())
}

/// The states a first decision may start from.
pub(super) const DECIDE_FROM: [FileState; 5] = [
    FileState::Claimed,
    FileState::Hashed,
    FileState::Waiting,
    FileState::Submitting,
    FileState::Submitted,
];

/// Writes a decision on `id` and, if it propagates, on every record waiting for the same content.
/// Returns the ids decided. A record already decided is never overwritten: see
/// [`decided_again`].
fn decide_in(conn: &Connection, id: FileId, d: &Decision) -> Result<Vec<FileId>, JournalError> {
    let rec = load(conn, id)?;
    if rec.state.is_decided() {
        return decided_again(conn, &rec, d);
    }
    expect_transition(&rec, &DECIDE_FROM, FileState::Decided)?;
    let now = now_ms();
    let mut decided = vec![id];
    let verdict = d.verdict.map(ScanVerdict::as_str);
    execute(
        conn,
        "UPDATE files SET state = ?2, outcome = ?3, verdict = ?4, verdict_sha256 = ?5, \
         reason = ?6, updated_at = ?7 WHERE id = ?1 AND state = ?8",
        params![
            id,
            FileState::Decided.as_str(),
            d.outcome.as_str(),
            verdict,
            d.verdict_sha256.map(|s| s.to_vec()),
            d.reason,
            now,
            rec.state.as_str()
        ],
        "decide",
    )?;
    let Some(sha) = rec.sha256 else {
        return Ok(decided);
    };
    if d.propagate {
        let mut stmt = conn
            .prepare_cached("SELECT id FROM files WHERE state = ?1 AND sha256 = ?2 ORDER BY id")
            .map_err(JournalError::sql("decide"))?;
        let waiting: Vec<FileId> = stmt
            .query_map(params![FileState::Waiting.as_str(), sha.to_vec()], |r| {
                r.get(0)
            })
            .map_err(JournalError::sql("decide"))?
            .collect::<Result<_, _>>()
            .map_err(JournalError::sql("decide"))?;
        let note = match &d.reason {
            Some(r) => format!("{r} (verdict shared with an identical file in flight)"),
            None => "verdict shared with an identical file in flight".to_string(),
        };
        for w in waiting {
            execute(
                conn,
                "UPDATE files SET state = ?2, outcome = ?3, verdict = ?4, \
                 verdict_sha256 = ?5, reason = ?6, reused = 1, scan_id = ?7, updated_at = ?8 \
                 WHERE id = ?1 AND state = ?9",
                params![
                    w,
                    FileState::Decided.as_str(),
                    d.outcome.as_str(),
                    verdict,
                    d.verdict_sha256.map(|s| s.to_vec()),
                    note,
                    rec.scan_id.as_ref().map(ScanId::as_str),
                    now,
                    FileState::Waiting.as_str()
                ],
                "decide",
            )?;
            decided.push(w);
        }
    } else {
        // The content was not judged: one waiting record takes over as the primary.
        execute(
            conn,
            "UPDATE files SET state = ?3, updated_at = ?2 WHERE id = \
             (SELECT id FROM files WHERE state = ?4 AND sha256 = ?1 ORDER BY id LIMIT 1)",
            params![
                sha.to_vec(),
                now,
                FileState::Hashed.as_str(),
                FileState::Waiting.as_str()
            ],
            "decide",
        )?;
    }
    if let (Some(v), Some(vsha)) = (d.verdict, d.verdict_sha256) {
        if d.outcome == v.outcome() {
            cache_verdict(
                conn,
                vsha,
                v,
                rec.scan_id.as_ref().map_or("", ScanId::as_str),
            )?;
        }
    }
    Ok(decided)
}

/// A decision for a record that is already decided. Never overwrites it:
/// - the same verdict again (a repeated answer, a retried write): nothing to do;
/// - a decision without a verdict (a local failure, a timeout) that arrives late: ignored;
/// - a contradicting verdict: a server anomaly, logged and kept in the error history, and resolved
///   fail-closed. `detect` wins: it replaces `not detected` in the verdict cache, and every
///   record of that content still `decided` clean (not yet placing) flips to quarantine; files
///   already placing or placed stay, the anomaly names how many, and each of them gets a row in
///   `anomalies` (`ops_anomaly.rs`) in the same transaction, for the SOC (the poller announces
///   it). A `not detected` after `detect` changes nothing.
///
/// Returns the ids whose outcome changed (to be placed again by the sorter).
fn decided_again(
    conn: &Connection,
    rec: &FileRecord,
    d: &Decision,
) -> Result<Vec<FileId>, JournalError> {
    let old = rec.scan_verdict();
    let Some(new) = d.verdict else {
        tracing::warn!(
            id = rec.id,
            state = rec.state.as_str(),
            outcome = rec.outcome.map_or("-", Outcome::as_str),
            "a late decision for a file already decided is ignored"
        );
        return Ok(Vec::new());
    };
    if old == Some(new) {
        return Ok(Vec::new());
    }
    if old.is_none() {
        // Decided without a verdict (failed, vanished): the file never goes to clean anyway.
        tracing::warn!(
            id = rec.id,
            verdict = new.as_str(),
            "a verdict for a file already failed is ignored"
        );
        return Ok(Vec::new());
    }
    let scan = rec.scan_id.as_ref().map_or("-", ScanId::as_str);
    let mut text = format!(
        "server anomaly: scan {scan} answered {} for {} after {} was journaled",
        new.as_str(),
        rec.rel_path.display(),
        old.map_or("-", ScanVerdict::as_str)
    );
    let mut flipped = Vec::new();
    if new == ScanVerdict::Detect {
        if let Some(vsha) = d.verdict_sha256.or(rec.verdict_sha256) {
            cache_verdict(conn, vsha, ScanVerdict::Detect, scan)?;
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE files SET outcome = ?1, verdict = ?2, reason = ?3, updated_at = ?4 \
                     WHERE state = ?5 AND outcome = ?6 AND verdict_sha256 = ?7 RETURNING id",
                )
                .map_err(JournalError::sql("decide"))?;
            flipped = stmt
                .query_map(
                    params![
                        Outcome::Quarantine.as_str(),
                        ScanVerdict::Detect.as_str(),
                        format!("{text}: detect wins"),
                        now_ms(),
                        FileState::Decided.as_str(),
                        Outcome::Clean.as_str(),
                        vsha.to_vec()
                    ],
                    |r| r.get(0),
                )
                .map_err(JournalError::sql("decide"))?
                .collect::<Result<Vec<FileId>, _>>()
                .map_err(JournalError::sql("decide"))?;
            let released: Vec<FileRecord> = {
                let sql = format!(
                    "SELECT {COLUMNS} FROM files WHERE outcome = ?1 AND verdict_sha256 = ?2 \
                     AND state IN ({}) ORDER BY id",
                    placeholders(3, 3)
                );
                let mut stmt = conn.prepare(&sql).map_err(JournalError::sql("decide"))?;
                stmt.query_map(
                    params![
                        Outcome::Clean.as_str(),
                        vsha.to_vec(),
                        FileState::Placing.as_str(),
                        FileState::Placed.as_str(),
                        FileState::Done.as_str()
                    ],
                    row_to_record,
                )
                .map_err(JournalError::sql("decide"))?
                .collect::<Result<_, _>>()
                .map_err(JournalError::sql("decide"))?
            };
            // Each released file is an anomaly a SOC must see (hook event, metric, listing).
            for r in &released {
                record_in(conn, r, scan, ScanVerdict::NotDetected, ScanVerdict::Detect)?;
            }
            let released = released.len();
            text.push_str(&format!(
                "; detect wins: {} file(s) still in staging go to quarantine",
                flipped.len()
            ));
            if released > 0 {
                text.push_str(&format!(
                    "; {released} file(s) of this content were already placed as clean: check them"
                ));
            }
        }
    } else {
        text.push_str("; the detect stands");
    }
    tracing::warn!(id = rec.id, scan_id = scan, "{text}");
    note_error_in(conn, &text)?;
    Ok(flipped)
}

impl Journal {
    /// Journals several decisions in one transaction; returns every id decided (with the waiting
    /// records that share a verdict). A decision for a record already decided never overwrites
    /// it (see the module docs: a verdict is decided once); the ids of records whose outcome a
    /// contradicting `detect` flipped to quarantine are returned too.
    pub async fn decide(
        &self,
        decisions: Vec<(FileId, Decision)>,
    ) -> Result<Vec<FileId>, JournalError> {
        self.decide_then(decisions, |_, all| Ok(all)).await
    }

    /// [`Journal::decide`], answering with the records decided as committed (read in the same
    /// transaction, after every decision of the batch): what the sorter needs to place each,
    /// without a trip back to the journal per file (issue 20).
    pub async fn decide_records(
        &self,
        decisions: Vec<(FileId, Decision)>,
    ) -> Result<Vec<FileRecord>, JournalError> {
        self.decide_then(decisions, |conn, all| {
            all.into_iter().map(|id| load(conn, id)).collect()
        })
        .await
    }

    /// Decides `decisions` in one operation, then answers with `then` of every id decided.
    async fn decide_then<T: Send + 'static>(
        &self,
        decisions: Vec<(FileId, Decision)>,
        then: impl FnOnce(&Connection, Vec<FileId>) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        let (answer, failed) = self
            .run(move |conn| {
                let mut all = Vec::new();
                // Files failed per kind, counted once the transaction is committed.
                let mut failed = Vec::new();
                for (id, d) in &decisions {
                    let decided = decide_in(conn, *id, d)?;
                    if let Some(kind) = d.kind {
                        failed.push((kind, decided.len()));
                    }
                    for decided in decided {
                        if !all.contains(&decided) {
                            all.push(decided);
                        }
                    }
                }
                Ok((then(conn, all)?, failed))
            })
            .await?;
        for (kind, n) in failed {
            self.health.tally.failed[kind.index()].fetch_add(
                u64::try_from(n).unwrap_or(u64::MAX),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        Ok(answer)
    }
}
