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
use crate::pipeline::{Claimed, Hashed};

/// Owns a staged file (see the module docs) on the blocking pool.
async fn own_staged(
    shared: &Arc<Shared>,
    staged: &std::path::Path,
    ask_lease: bool,
) -> Result<Owned, Owning> {
    let (sh, path) = (Arc::clone(shared), staged.to_path_buf());
    blocking(move || {
        let (staging, name) = sh.staging_of(&path)?;
        let root = sh.roots.by_staged(&path);
        let leases = root
            .filter(|_| ask_lease)
            .is_some_and(|r| r.inbox().is_ok_and(|inbox| r.leases_here(&inbox)));
        let keep_always =
            root.is_some_and(|r| r.config.keep_originals == crate::config::KeepOriginals::Always);
        Ok(fsops::own::own(&staging, &name, leases, keep_always))
    })
    .await
    .unwrap_or_else(|e| Err(Owning::Failed(e)))
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
    let result = match own_staged(shared, &staged, !held_open).await {
        Ok(owned) => Ok(owned),
        Err(Owning::StillWritten) => return give_back(shared, id, staged).await,
        // Staging is full: the copy cannot be made yet. The record stays `claimed` and the
        // stuck-claim sweep owns it again later; nothing is failed for want of space.
        Err(Owning::Failed(e @ FsError::NoSpace { .. })) => {
            tracing::warn!(id, error = %e, "no space in staging for the private copy; retried later");
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
            shared.metrics.hashed.fetch_add(1, Ordering::Relaxed);
            shared
                .metrics
                .hashed_bytes
                .fetch_add(stamp.size, Ordering::Relaxed);
            match journal
                .hashed(id, sha256, stamp, shared.config.state.verdict_ttl)
                .await
            {
                Ok(HashedAs::Hashed) => Ok(Hashed::Ready(Claimed {
                    id,
                    staged,
                    sha256,
                    stamp,
                })),
                Ok(HashedAs::Waiting) => {
                    tracing::debug!(id, "identical content in flight: waiting for its verdict");
                    Ok(Hashed::Waiting)
                }
                Ok(HashedAs::Reused(_)) => {
                    shared.metrics.reused.fetch_add(1, Ordering::Relaxed);
                    Ok(Hashed::Decided(vec![id]))
                }
                Err(e) => Err(e),
            }
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
    outcome.unwrap_or_else(|e| {
        // The journal is unusable (disk full?): the file stays in staging, and the record says
        // `claimed`, so a restart hashes it again.
        tracing::error!(id, error = %e, "journal write failed after hashing; file kept in staging");
        Hashed::Waiting
    })
}
