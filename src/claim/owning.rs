//! Owning a claim batch's small files together (issue 20): one task, one blocking call and one
//! journal operation for the batch ([`crate::hashing::hash_batch`]) instead of one of each per
//! file.

use std::sync::{Arc, PoisonError};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::task::TaskTracker;

use super::{HashingNow, ToOwn, forward};
use crate::context::Shared;
use crate::hashing::{self, ToHash};
use crate::pipeline::{Claimed, Verdict};

/// What owning tasks share: the permits that bound them, the records they work on, the tasks.
pub(super) struct Hashers<'a> {
    pub(super) shared: &'a Arc<Shared>,
    pub(super) permits: &'a Arc<Semaphore>,
    pub(super) now: &'a HashingNow,
    pub(super) tasks: &'a TaskTracker,
}

/// Owns a claim batch's small files in one task ([`hashing::hash_batch`]), which takes one
/// hashing permit and keeps it until every result is handed on: claim waits as for single
/// files, with at most [`super::HASH_CONCURRENCY`] batches (of [`super::CLAIM_BATCH`] files) owned or
/// waiting for room at once.
pub(super) async fn spawn_batch(
    h: &Hashers<'_>,
    claimed_tx: &mpsc::Sender<Claimed>,
    verdicts_tx: &mpsc::Sender<Verdict>,
    jobs: Vec<ToOwn>,
) {
    let Ok(permit) = Arc::clone(h.permits).acquire_owned().await else {
        return;
    };
    let files: Vec<ToHash> = {
        let mut busy = h.now.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.into_iter()
            .filter(|j| busy.insert(j.id))
            .map(|j| ToHash {
                id: j.id,
                staged: j.staged,
                held_open: j.held_open,
            })
            .collect()
    };
    if files.is_empty() {
        return;
    }
    let (shared, now) = (Arc::clone(h.shared), Arc::clone(h.now));
    let (claimed_tx, verdicts_tx) = (claimed_tx.clone(), verdicts_tx.clone());
    h.tasks.spawn(async move {
        let hashed = hashing::hash_batch(&shared, files).await;
        {
            let mut busy = now.lock().unwrap_or_else(PoisonError::into_inner);
            for (id, _) in &hashed {
                busy.remove(id);
            }
        }
        for (_, h) in hashed {
            forward(h, &claimed_tx, &verdicts_tx).await;
        }
        drop(permit);
    });
}
