//! The journal's writer: one thread owns the connection and runs every operation in a group
//! commit ([`serve`]). [`Journal::run`] is how an operation reaches it; it is private to the
//! journal module, so the rest of the crate sees operations, never the connection.
//!
//! What this file does not do: know any operation or any table.

use std::collections::VecDeque;
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::types::{CommitFailure, JournalError};
use super::{Journal, WriteHealth};

/// How many waiting operations one transaction takes at most.
const GROUP_COMMIT_MAX: usize = 1024;
/// Capacity of the queue of operations waiting for the journal thread. Full: callers wait.
pub(super) const OPS_CAPACITY: usize = 4096;

/// Answers an operation's caller with the result of the COMMIT its work was part of.
type Reply = Box<dyn FnOnce(Result<(), CommitFailure>) + Send>;
/// One operation: runs on the journal thread, says whether it succeeded, and hands back its reply.
pub(super) type Op = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

/// The journal thread: takes what is waiting, runs each operation in its own savepoint, commits
/// once, then answers every caller with the commit's result.
pub(super) fn serve(conn: &Connection, mut ops_rx: mpsc::Receiver<Op>, health: &WriteHealth) {
    let mut pending: VecDeque<Op> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match ops_rx.blocking_recv() {
                Some(op) => pending.push_back(op),
                None => break,
            }
        }
        while pending.len() < GROUP_COMMIT_MAX {
            match ops_rx.try_recv() {
                Ok(op) => pending.push_back(op),
                Err(_) => break,
            }
        }
        match run_batch(conn, &mut pending) {
            Batch::Wrote => health.wrote(),
            Batch::Failed => health.failed(),
            Batch::ReadOnly => {}
        }
    }
}

/// What one transaction did, for [`WriteHealth`].
enum Batch {
    /// Committed with at least one change.
    Wrote,
    /// Committed without changes (reads, or operations that refused).
    ReadOnly,
    /// Not committed: no transaction, rolled back by SQLite, or the COMMIT failed.
    Failed,
}

/// Runs one transaction of operations taken from the front of `pending`. Every operation taken is
/// answered; operations left in `pending` run in the next transaction. Each run takes at least
/// one operation, so the thread always makes progress.
fn run_batch(conn: &Connection, pending: &mut VecDeque<Op>) -> Batch {
    if let Err(e) = cached(conn, "BEGIN IMMEDIATE") {
        let failure = CommitFailure::Begin(Arc::new(e));
        for op in pending.drain(..) {
            // Each op still has to answer; report the failure, keep nothing of what it did.
            let (_, reply) = op_failed(op, conn);
            reply(Err(failure.clone()));
        }
        return Batch::Failed;
    }
    let changes_before = conn.total_changes();
    let mut replies: Vec<Reply> = Vec::with_capacity(pending.len().min(GROUP_COMMIT_MAX));
    while replies.len() < GROUP_COMMIT_MAX {
        let Some(op) = pending.pop_front() else { break };
        let reply = match cached(conn, "SAVEPOINT op") {
            Ok(()) => {
                let (ok, reply) = op(conn);
                // If the transaction is already gone, there is no savepoint left to end.
                if !conn.is_autocommit() {
                    let ended = if ok {
                        cached(conn, "RELEASE op")
                    } else {
                        conn.execute_batch("ROLLBACK TO op; RELEASE op")
                    };
                    if let Err(e) = ended {
                        tracing::error!(error = %e, "journal savepoint end failed");
                    }
                }
                reply
            }
            Err(e) => {
                tracing::error!(error = %e, "journal savepoint failed");
                let (_, reply) = op_failed(op, conn);
                let failure = CommitFailure::Savepoint(Arc::new(e));
                Box::new(move |_: Result<(), CommitFailure>| reply(Err(failure))) as Reply
            }
        };
        replies.push(reply);
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back on its own (SQLITE_FULL, SQLITE_IOERR,
            // SQLITE_NOMEM…), or an operation ended it. Nothing of this batch is on disk, so
            // every operation run so far is told so; the operations not yet run would otherwise
            // run outside any transaction (each committed on its own) and are left for a fresh
            // transaction instead.
            tracing::error!(
                operations = replies.len(),
                "the journal transaction was rolled back by SQLite; its operations failed"
            );
            for reply in replies {
                reply(Err(CommitFailure::RolledBack));
            }
            return Batch::Failed;
        }
    }
    let commit = cached(conn, "COMMIT").map_err(|e| {
        // The transaction is void; nothing of it happened.
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK").ok();
        }
        CommitFailure::Commit(Arc::new(e))
    });
    let outcome = match &commit {
        Err(_) => Batch::Failed,
        Ok(()) if conn.total_changes() > changes_before => Batch::Wrote,
        Ok(()) => Batch::ReadOnly,
    };
    for reply in replies {
        reply(commit.clone());
    }
    outcome
}

/// Runs one statement of the writer's own (BEGIN, SAVEPOINT, RELEASE, COMMIT) through the cache
/// of prepared statements: `execute_batch` would parse it again for every operation.
fn cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute([]))
        .map(drop)
}

/// Runs an operation only to obtain its reply handle, keeping nothing of what it did; used when
/// no transaction can be had for it.
fn op_failed(op: Op, conn: &Connection) -> (bool, Reply) {
    // A savepoint outside a transaction starts one; roll it back whatever the op did.
    if conn.execute_batch("SAVEPOINT failed").is_ok() {
        let out = op(conn);
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK TO failed; RELEASE failed")
                .ok();
        }
        out
    } else {
        // Not even a savepoint: the op is dropped unanswered, and its caller sees the journal
        // as closed rather than being told something happened.
        (false, Box::new(|_| {}))
    }
}

impl Journal {
    /// Runs `f` in the journal's next transaction; answers once it is committed. Private to the
    /// journal: callers use the named operations.
    pub(super) async fn run<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, JournalError>>();
        let health = Arc::clone(&self.health);
        let op: Op = Box::new(move |conn| {
            let result = f(conn);
            if result.as_ref().is_err_and(JournalError::is_storage) {
                health.failed();
            }
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit| {
                let answer = match (result, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(source)) => Err(JournalError::Commit { source }),
                };
                tx.send(answer).ok();
            });
            (ok, reply)
        });
        self.ops_tx
            .send(op)
            .await
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }
}
