//! Owning and hashing a staged file, and journaling the result: the second half of the claim
//! stage, also run by the uploader and the sorter when a staged file changed after it was hashed.
//!
//! The staged file is copied into a private inode while it is hashed, under a read lease
//! ([`crate::fsops::own`]); the copy is what is uploaded and released. A file that a writer still
//! holds open (it paused longer than `settle`) is put back into the inbox under its name, and
//! settle waits for it again: nothing the writer adds is lost, and no half-written version is
//! uploaded. Where no lease can be had, the original is kept in staging beside the copy and
//! journaled ([`crate::journal::Journal::retain`]) for the claim stage's sweep.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::context::Shared;
use crate::error::FileError;
use crate::fsops::own::{Owned, Owning};
use crate::fsops::{self, FsError, blocking};
use crate::journal::{FileId, HashedAs};
use crate::pipeline::{Claimed, Content, Hashed};

/// Owns a staged file (see the module docs) on the blocking pool.
async fn own_staged(
    shared: &Arc<Shared>,
    staged: &std::path::Path,
    ask_lease: bool,
) -> Result<Owned, Owning> {
    let (sh, path) = (Arc::clone(shared), staged.to_path_buf());
    blocking(move || Ok(own_here(&sh, &path, ask_lease, None)))
        .await
        .unwrap_or_else(|e| Err(Owning::Failed(e)))
}

/// Owns a staged file on the blocking pool while sending its bytes to `sink` (the tee,
/// [`fsops::own::own_teeing`]); a lease is asked as for a file just claimed.
pub(crate) async fn own_teeing(
    shared: &Arc<Shared>,
    staged: &std::path::Path,
    sink: fsops::own::Sink<'static>,
) -> Result<Owned, Owning> {
    let (sh, path) = (Arc::clone(shared), staged.to_path_buf());
    blocking(move || Ok(own_here(&sh, &path, true, Some(sink))))
        .await
        .unwrap_or_else(|e| Err(Owning::Failed(e)))
}

/// Owns the staged file `path`, on this (blocking) thread, teeing it to `sink` if one is given.
fn own_here(
    shared: &Shared,
    path: &std::path::Path,
    ask_lease: bool,
    sink: Option<fsops::own::Sink<'_>>,
) -> Result<Owned, Owning> {
    let (staging, name) = shared.staging_of(path)?;
    let root = shared.roots.by_staged(path);
    let leases = root
        .filter(|_| ask_lease)
        .is_some_and(|r| r.inbox().is_ok_and(|inbox| r.leases_here(&inbox)));
    let keep_always =
        root.is_some_and(|r| r.config.keep_originals == crate::config::KeepOriginals::Always);
    match sink {
        Some(sink) => fsops::own::own_teeing(&staging, &name, leases, keep_always, sink),
        None => fsops::own::own(&staging, &name, leases, keep_always),
    }
}

/// Whether record `id`'s staging folder is covered by a mount ([`Shared::staging_covered`]).
async fn covered(shared: &Arc<Shared>, id: FileId, staged: &std::path::Path) -> bool {
    // The folder the file was claimed into (a journal that cannot be read: the locked one).
    let staged_in = shared
        .journal
        .get(id)
        .await
        .ok()
        .and_then(|r| r.staging_folder);
    let (sh, path) = (Arc::clone(shared), staged.to_path_buf());
    blocking(move || Ok(sh.staging_covered(&path, staged_in)))
        .await
        .unwrap_or(true)
}

/// A staged file that a writer still holds open goes back into the inbox under its name (or
/// `name (1)` beside it if that was taken meanwhile), and its claim is forgotten.
async fn give_back(shared: &Arc<Shared>, id: FileId, staged: PathBuf) -> Hashed {
    let rec = match shared.journal.get(id).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(id, error = %e, "journal read failed; the file stays in staging");
            return Hashed::Waiting;
        }
    };
    let Some(root) = shared.root_of(&rec.root).cloned() else {
        return Hashed::Waiting;
    };
    let (sh, rel) = (Arc::clone(shared), rec.rel_path.clone());
    let back = blocking(move || {
        let (staging, name) = sh.staging_of(&staged)?;
        let inbox = root.inbox()?;
        fsops::place::return_to_inbox(&staging, &name, &inbox, &rel)
    })
    .await;
    match back {
        Ok(rel_back) => {
            shared
                .metrics
                .returned_still_written
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                id,
                path = %fsops::shown(&rec.rel_path),
                back = %fsops::shown(&rel_back),
                "still held open for writing: put back into the inbox until the writer is done"
            );
            if let Err(e) = shared.journal.unclaim(vec![id]).await {
                // Harmless: at start-up a `claimed` record without a staged file is dropped.
                tracing::warn!(id, error = %e, "could not forget the claim");
            }
            Hashed::Gone
        }
        Err(e) => {
            // It stays claimed: the stuck-claim sweep tries again (the writer may be done).
            tracing::warn!(id, path = %fsops::shown(&rec.rel_path), error = %e, "still held open for writing, and cannot be put back into the inbox; tried again later");
            Hashed::Waiting
        }
    }
}

/// Hashes a claimed record's staged file and journals the result. Used for new claims, for
/// records found `claimed` at start-up, and for files that changed after hashing.
///
/// `held_open`: the file was taken although a writer holds it open (`Settled::held_open`), so
/// no lease is asked and its original is kept.
pub(crate) async fn hash_record(
    shared: &Arc<Shared>,
    id: FileId,
    staged: PathBuf,
    held_open: bool,
) -> Hashed {
    if !shared.serves(&staged) {
        tracing::debug!(id, "staged under a watch not served now: left as it is");
        return Hashed::Waiting;
    }
    let owned = own_staged(shared, &staged, !held_open).await;
    journal_owned(shared, id, staged, owned).await
}

/// A claimed file to own in a batch: its record, staged path, and whether it was taken held
/// open (see [`hash_record`]).
pub(crate) struct ToHash {
    /// Its record.
    pub id: FileId,
    /// Its staged path.
    pub staged: PathBuf,
    /// Taken although held open.
    pub held_open: bool,
}

/// [`hash_record`] for a batch of small files claimed together (issue 20): the files are owned
/// one after the other in **one** blocking call (one trip to the blocking pool instead of one
/// per file; each copy is still fsynced by `own` before it replaces its original), and the
/// hashes of those owned plainly (no original kept) are journaled in **one** operation
/// ([`Journal::hashed_many`](crate::journal::Journal::hashed_many)), answered once its commit
/// is durable. Every other outcome (still written, kept original, failure) goes the way of a
/// single file. One answer per file, in order.
pub(crate) async fn hash_batch(shared: &Arc<Shared>, files: Vec<ToHash>) -> Vec<(FileId, Hashed)> {
    let asks: Vec<(PathBuf, bool)> = files
        .iter()
        .map(|f| (f.staged.clone(), !f.held_open))
        .collect();
    let sh = Arc::clone(shared);
    let owned: Vec<Result<Owned, Owning>> = match tokio::task::spawn_blocking(move || {
        asks.iter()
            .map(|(path, ask)| own_here(&sh, path, *ask, None))
            .collect::<Vec<_>>()
    })
    .await
    {
        Ok(o) => o,
        Err(e) => {
            // The task failed (a panic): what it did is not known; every record stays
            // `claimed`, and the stuck-claim sweep owns it again.
            tracing::error!(error = %e, "owning task failed; its files are owned again later");
            return files.into_iter().map(|f| (f.id, Hashed::Waiting)).collect();
        }
    };
    let ids: Vec<FileId> = files.iter().map(|f| f.id).collect();
    let mut answers: Vec<Option<Hashed>> = (0..files.len()).map(|_| None).collect();
    let mut plain = Vec::new();
    let mut others = Vec::new();
    for (k, (f, o)) in files.into_iter().zip(owned).enumerate() {
        match o {
            Ok(Owned {
                sha256,
                stamp,
                kept: None,
                ..
            }) => plain.push((k, f, sha256, stamp)),
            o => others.push((k, f, o)),
        }
    }
    if !plain.is_empty() {
        let rows = plain
            .iter()
            .map(|(_, f, sha, st)| (f.id, *sha, *st))
            .collect();
        let ttl = shared.config.state.verdict_ttl;
        match shared.journal.hashed_many(rows, ttl).await {
            Ok(rs) => {
                for ((k, f, sha256, stamp), r) in plain.into_iter().zip(rs) {
                    let h = hashed_as(shared, f.id, f.staged, sha256, stamp, r);
                    answers[k] = Some(h.unwrap_or_else(|e| journal_failed(f.id, &e)));
                }
            }
            Err(e) => {
                for (k, f, ..) in plain {
                    answers[k] = Some(journal_failed(f.id, &e));
                }
            }
        }
    }
    for (k, f, o) in others {
        answers[k] = Some(journal_owned(shared, f.id, f.staged, o).await);
    }
    ids.into_iter()
        .zip(answers)
        .map(|(id, a)| (id, a.unwrap_or(Hashed::Waiting)))
        .collect()
}

/// What the journal's answer to a hash means for the pipeline; counts the hash.
fn hashed_as(
    shared: &Shared,
    id: FileId,
    staged: PathBuf,
    sha256: [u8; 32],
    stamp: crate::journal::Stamp,
    answer: Result<HashedAs, crate::journal::JournalError>,
) -> Result<Hashed, crate::journal::JournalError> {
    shared.metrics.hashed.fetch_add(1, Ordering::Relaxed);
    shared
        .metrics
        .hashed_bytes
        .fetch_add(stamp.size, Ordering::Relaxed);
    match answer? {
        HashedAs::Hashed => Ok(Hashed::Ready(Claimed {
            id,
            staged,
            content: Content::Hashed(sha256),
            stamp,
        })),
        HashedAs::Waiting => {
            tracing::debug!(id, "identical content in flight: waiting for its verdict");
            Ok(Hashed::Waiting)
        }
        HashedAs::Reused(_) => {
            shared.metrics.reused.fetch_add(1, Ordering::Relaxed);
            Ok(Hashed::Decided(vec![id]))
        }
    }
}

/// The journal is unusable (disk full?): the file stays in staging, and the record says
/// `claimed`, so a restart (or the stuck-claim sweep) hashes it again.
fn journal_failed(id: FileId, e: &crate::journal::JournalError) -> Hashed {
    tracing::error!(id, error = %e, "journal write failed after hashing; file kept in staging");
    Hashed::Waiting
}

/// Journals what owning record `id`'s staged file came to.
pub(crate) async fn journal_owned(
    shared: &Arc<Shared>,
    id: FileId,
    staged: PathBuf,
    owned: Result<Owned, Owning>,
) -> Hashed {
    let result = match owned {
        Ok(owned) => Ok(owned),
        Err(Owning::StillWritten) => return give_back(shared, id, staged).await,
        // Staging is full: the copy cannot be made yet. The record stays `claimed` and claim
        // owns it again a little later (`Shared::staging_full`); nothing is failed for want of
        // space.
        Err(Owning::Failed(e @ FsError::NoSpace { .. })) => {
            tracing::warn!(id, error = %e, "no space in staging for the private copy; retried later");
            shared.staging_full.notify_one();
            return Hashed::Waiting;
        }
        Err(Owning::Failed(e)) => Err(e),
    };
    if let Ok(Owned {
        kept: Some(kept), ..
    }) = &result
    {
        let orig = staged.with_file_name(&kept.name);
        // Not journaled (disk full): start-up finds the `X.orig` and keeps it from then on.
        if let Err(e) = shared.journal.retain(id, orig, kept.stamp).await {
            tracing::warn!(id, error = %e, "could not journal the kept original");
        }
    }
    let result = result.map(|o| (o.sha256, o.stamp));
    let journal = &shared.journal;
    let outcome = match result {
        Ok((sha256, stamp)) => {
            let answer = journal
                .hashed(id, sha256, stamp, shared.config.state.verdict_ttl)
                .await;
            hashed_as(shared, id, staged, sha256, stamp, answer)
        }
        // Not in the staging folder reached now, which is not the one the file was staged in
        // (a share mounted over the inbox covers it): kept `claimed`; the stuck-claim sweep
        // owns it again once the folder is reachable.
        Err(e @ FsError::Vanished { .. }) if covered(shared, id, &staged).await => {
            tracing::warn!(id, error = %e, "the staging folder is covered by a mount; hashed once it is reachable again");
            Ok(Hashed::Waiting)
        }
        Err(FsError::Vanished { .. }) => journal
            .close_vanished(id, "vanished from staging before it was hashed".into())
            .await
            .map(|()| Hashed::Gone),
        Err(e) => {
            // Unreadable, not a regular file, hard-linked, or never still: this one file fails.
            // The reason names the user's path, not the staging name.
            let e = match journal.get(id).await {
                Ok(rec) => e.at(&rec.root.join(&rec.rel_path)),
                Err(_) => e,
            };
            tracing::warn!(id, error = %e, "cannot hash staged file");
            journal
                .decide(vec![(id, FileError::from(e).decision(false))])
                .await
                .map(Hashed::Decided)
        }
    };
    outcome.unwrap_or_else(|e| journal_failed(id, &e))
}
