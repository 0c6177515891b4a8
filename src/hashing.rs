//! Hashing a staged file and journaling the result: the second half of the claim stage, also
//! run by the uploader and the sorter when a staged file changed after it was hashed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::context::Shared;
use crate::error::FileError;
use crate::fsops::{self, FsError};
use crate::journal::{Decision, FileId, HashedAs, Stamp};
use crate::pipeline::{Claimed, Hashed};

/// Hash attempts of a file that keeps changing before it is failed.
const HASH_TRIES: u32 = 3;
/// Looks (100 ms apart) at a staged file with several links before it counts as hard-linked.
const HARD_LINK_SETTLE_TRIES: u32 = 10;

/// Opens and hashes a staged file; retries while it changes under us.
fn hash_blocking(shared: &Shared, staged: &Path) -> Result<([u8; 32], Stamp), FsError> {
    let (staging, name) = shared.staging_of(staged)?;
    let mut last = None;
    for _ in 0..HASH_TRIES {
        let (mut file, mut before) = staging.open_file(&name)?;
        // Where a claim is link + unlink (no RENAME_NOREPLACE, e.g. NFS), the agent that lost
        // the race removes its second link a moment later: look again before calling it a hard
        // link.
        for _ in 0..HARD_LINK_SETTLE_TRIES {
            if before.nlink <= 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            before = fsops::stamp_of(&file)?;
        }
        if before.nlink > 1 {
            return Err(FsError::HardLinked {
                path: staged.to_path_buf(),
                nlink: before.nlink,
            });
        }
        let (sha, bytes) = fsops::sha256_file(&mut file)?;
        let after = fsops::stamp_of(&file)?;
        if before == after && bytes == after.size {
            return Ok((sha, after.stamp()));
        }
        last = Some(format!(
            "changed while hashed ({} → {} bytes)",
            before.size, after.size
        ));
    }
    Err(FsError::Changed {
        path: staged.to_path_buf(),
        detail: last.unwrap_or_default(),
    })
}

/// Hashes a claimed record's staged file and journals the result. Used for new claims, for
/// records found `claimed` at start-up, and for files that changed after hashing.
pub async fn hash_record(shared: &Arc<Shared>, id: FileId, staged: PathBuf) -> Hashed {
    let path = staged.clone();
    let sh = Arc::clone(shared);
    let result = tokio::task::spawn_blocking(move || hash_blocking(&sh, &path)).await;
    let result = match result {
        Ok(r) => r,
        Err(e) => Err(FsError::Changed {
            path: staged.clone(),
            detail: format!("hash task failed: {e}"),
        }),
    };
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
                .decide(vec![(
                    id,
                    Decision::failed(FileError::from(e).to_string(), false),
                )])
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
