//! Journal operations of the notification hooks (`[[hook]]`): the events queued with the
//! placement they announce ([`Journal::placed_with_events`], in `ops_place.rs`), read back by
//! the runner when due ([`Journal::hook_due`]), and their fate: delivered (the row goes), failed
//! (retried later), or given up (kept, with its last error, for `status` and until pruned).
//!
//! What this file does not do: deliver anything (`crate::hooks` does).

use rusqlite::{Connection, params};

use super::schema::execute;
use super::types::{FileId, JournalError};
use super::{Journal, now_ms};

/// No retry is ever scheduled further ahead than this (the hooks' longest backoff is well
/// below it): a retry time beyond `now + RETRY_HORIZON` was written before the wall clock
/// stepped back, and is due now rather than hours late.
pub const RETRY_HORIZON: std::time::Duration = std::time::Duration::from_secs(3600);

/// One event to queue for one hook.
#[derive(Debug, Clone)]
pub struct NewHookEvent {
    /// The hook's identity (its target, see `crate::hooks`).
    pub hook: String,
    /// The event, as the JSON text delivered.
    pub event: String,
}

/// A queued event, as the runner reads it.
#[derive(Debug, Clone)]
pub struct HookEvent {
    /// Row id.
    pub id: i64,
    /// The hook's identity.
    pub hook: String,
    /// The record it is about.
    pub file_id: Option<FileId>,
    /// The JSON text to deliver.
    pub event: String,
    /// Deliveries tried so far.
    pub attempts: u32,
}

/// Queues `events` for record `id` (inside the current operation).
pub(super) fn queue_in(
    conn: &Connection,
    id: FileId,
    events: &[NewHookEvent],
) -> Result<(), JournalError> {
    let now = now_ms();
    for e in events {
        execute(
            conn,
            "INSERT INTO hook_events (hook, file_id, event, next_at, created_at) VALUES (?1, ?2, ?3, ?4, ?4)",
            params![e.hook, id, e.event, now],
            "hooks",
        )?;
    }
    Ok(())
}

impl Journal {
    /// Events due now (not given up, their retry time passed, or beyond [`RETRY_HORIZON`]: a
    /// clock stepped back) for each of `hooks`, oldest
    /// first, at most `limit` per hook: a hook's backlog (one that hangs, or one no longer
    /// configured, whose events wait) never keeps the others' events from being read.
    pub async fn hook_due(
        &self,
        limit: usize,
        hooks: Vec<String>,
    ) -> Result<Vec<HookEvent>, JournalError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, hook, file_id, event, attempts FROM hook_events \
                     WHERE hook = ?3 AND gave_up = 0 AND (next_at <= ?1 OR next_at > ?4) \
                     ORDER BY next_at, id LIMIT ?2",
                )
                .map_err(JournalError::sql("hooks"))?;
            let mut out = Vec::new();
            let now = now_ms();
            let horizon =
                now.saturating_add(i64::try_from(RETRY_HORIZON.as_millis()).unwrap_or(i64::MAX));
            for hook in &hooks {
                let rows = stmt
                    .query_map(
                        params![now, i64::try_from(limit).unwrap_or(i64::MAX), hook, horizon],
                        |r| {
                            Ok(HookEvent {
                                id: r.get(0)?,
                                hook: r.get(1)?,
                                file_id: r.get(2)?,
                                event: r.get(3)?,
                                attempts: u32::try_from(r.get::<_, i64>(4)?).unwrap_or(u32::MAX),
                            })
                        },
                    )
                    .map_err(JournalError::sql("hooks"))?;
                for row in rows {
                    out.push(row.map_err(JournalError::sql("hooks"))?);
                }
            }
            Ok(out)
        })
        .await
    }

    /// The hooks with events waiting (not given up), for a warning about those not configured.
    pub async fn hooks_waiting(&self) -> Result<Vec<String>, JournalError> {
        self.run(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT DISTINCT hook FROM hook_events WHERE gave_up = 0")
                .map_err(JournalError::sql("hooks"))?;
            let mut hooks: Vec<String> = Vec::new();
            for h in stmt
                .query_map([], |r| r.get(0))
                .map_err(JournalError::sql("hooks"))?
            {
                hooks.push(h.map_err(JournalError::sql("hooks"))?);
            }
            Ok(hooks)
        })
        .await
    }

    /// The event was delivered: it leaves the queue.
    pub async fn hook_delivered(&self, event: i64) -> Result<(), JournalError> {
        self.health
            .tally
            .hooks_delivered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.run(move |conn| {
            execute(
                conn,
                "DELETE FROM hook_events WHERE id = ?1",
                [event],
                "hooks",
            )?;
            Ok(())
        })
        .await
    }

    /// A delivery failed: tried again at `next_at_ms`, or never again (`give_up`: the row is
    /// kept with its error, for `status`, until pruned).
    pub async fn hook_failed(
        &self,
        event: i64,
        next_at_ms: i64,
        error: String,
        give_up: bool,
    ) -> Result<(), JournalError> {
        let tally = &self.health.tally;
        let counter = if give_up {
            &tally.hooks_given_up
        } else {
            &tally.hooks_failed
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.run(move |conn| {
            execute(
                conn,
                "UPDATE hook_events SET attempts = attempts + 1, next_at = ?2, last_error = ?3, \
                 gave_up = ?4 WHERE id = ?1",
                params![event, next_at_ms, error, i64::from(give_up)],
                "hooks",
            )?;
            Ok(())
        })
        .await
    }

    /// Events waiting and events given up, for `status`.
    pub async fn hook_counts(&self) -> Result<(i64, i64), JournalError> {
        self.run(|conn| {
            conn.query_row(
                "SELECT COALESCE(SUM(gave_up = 0), 0), COALESCE(SUM(gave_up != 0), 0) FROM hook_events",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(JournalError::sql("hooks"))
        })
        .await
    }
}
