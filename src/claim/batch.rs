//! Claiming a batch of settled files: journal first, then one rename each into the root's
//! staging folder, with one blocking call and one fsync per folder for each root's share. The
//! decisions (which roots' files are taken, what each claim's answer means for its record) are
//! the pure functions [`by_root`] and [`taken`], tested by tables below.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{ToOwn, staged_name};
use crate::context::Shared;
use crate::fsops::claim::Claim;
use crate::fsops::{self, FsError, Renamed};
use crate::journal::FileId;
use crate::pipeline::Settled;
use crate::root::RootId;

/// What one claim attempt came to, for the batch: the rename's answer, or the blocking task's
/// failure (a panic), which moved nothing that is known; shared by the files of its batch.
type Moved = Result<Result<Claim, FsError>, Arc<tokio::task::JoinError>>;

/// What becomes of a record after its claim attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// In staging: owned and hashed next. `unsynced`: the folder fsync failed (the rename
    /// happened; the next claim's fsync covers it).
    Own {
        /// The folder fsync failed.
        unsynced: bool,
    },
    /// Not taken: its record is dropped, the file (if any) stays in the inbox.
    Drop(Left),
}

/// Why a file was not taken, which says how loudly to tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    /// Changed since it settled (settle sees it again) or gone (another agent, or the user).
    Quietly,
    /// A writer holds it open: settle sees it again.
    HeldOpen,
    /// Left for a reason worth a warning once per path ([`Claim::why`]).
    Warn,
    /// The claim failed (an I/O error, an unsafe folder on the way).
    Error,
    /// The claim task itself failed.
    TaskFailed,
}

/// The decision for one claim attempt.
fn taken(moved: &Moved) -> Taken {
    match moved {
        Ok(Ok(Claim::Claimed(renamed))) => Taken::Own {
            unsynced: *renamed == Renamed::NotSynced,
        },
        Ok(Ok(Claim::Changed | Claim::Gone)) => Taken::Drop(Left::Quietly),
        Ok(Ok(Claim::HeldOpen)) => Taken::Drop(Left::HeldOpen),
        Ok(Ok(Claim::HardLinkedLeft | Claim::UnreadableLeft | Claim::InDestination)) => {
            Taken::Drop(Left::Warn)
        }
        Ok(Err(_)) => Taken::Drop(Left::Error),
        Err(_) => Taken::Drop(Left::TaskFailed),
    }
}

/// The positions of `roots` grouped by root, in order of first appearance.
fn by_root(roots: impl IntoIterator<Item = RootId>) -> Vec<(RootId, Vec<usize>)> {
    let mut per_root: Vec<(RootId, Vec<usize>)> = Vec::new();
    for (k, root) in roots.into_iter().enumerate() {
        match per_root.iter_mut().find(|(r, _)| *r == root) {
            Some((_, ks)) => ks.push(k),
            None => per_root.push((root, vec![k])),
        }
    }
    per_root
}

/// Journals a batch of claims, then moves each file into staging. Returns the claimed ones.
pub(super) async fn claim_batch(shared: &Arc<Shared>, batch: &[Settled]) -> Vec<ToOwn> {
    let ready = ready_roots(shared, batch).await;
    let mut claims = Vec::with_capacity(batch.len());
    let mut sources = Vec::with_capacity(batch.len());
    let mut staging_of = std::collections::HashMap::new();
    for s in batch.iter().filter(|s| ready.contains(&s.root)) {
        let Some(root) = shared.roots.get(s.root) else {
            continue;
        };
        let name = staged_name();
        let dropped_at_ms = Some(s.stamp.ctime_ns / 1_000_000);
        // The folder `ready_roots` checked and locked, once per root: the moves go there or
        // nowhere (`Root::claim_files`).
        let staging_folder = *staging_of
            .entry(s.root)
            .or_insert_with(|| root.dirs().locked_staging());
        claims.push(root.new_claim(s.rel_path.clone(), &name, dropped_at_ms, staging_folder));
        sources.push((s, name, staging_folder));
    }
    if claims.is_empty() {
        return Vec::new();
    }
    let staged: Vec<PathBuf> = claims.iter().map(|c| c.staged.clone()).collect();
    let ids = match shared.journal.claim(claims).await {
        Ok(ids) => ids,
        Err(e) => {
            // Nothing moved: the files stay in the inbox and are seen again by the next scan.
            tracing::error!(error = %e, "journal write failed; files left in the inbox");
            return Vec::new();
        }
    };
    let mut results = move_all(shared, &sources).await.into_iter();
    let mut claimed = Vec::with_capacity(ids.len());
    let mut dropped = Vec::new();
    for ((id, to), (s, ..)) in ids.into_iter().zip(staged).zip(&sources) {
        let Some(moved) = results.next().flatten() else {
            // Not attempted: its root left the configuration (a reload). Nothing moved.
            tracing::debug!(id, path = %fsops::shown(&s.rel_path), "its root is gone; left in the inbox");
            dropped.push(id);
            continue;
        };
        match taken(&moved) {
            Taken::Own { unsynced } => {
                if unsynced {
                    // The rename happened: the file is ours now, whatever the fsync said.
                    tracing::warn!(
                        id,
                        "claimed, but the folder fsync failed; it is retried with the next claim"
                    );
                }
                shared.metrics.claimed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(id, path = %fsops::shown(&s.rel_path), "claimed");
                claimed.push(ToOwn {
                    id,
                    staged: to,
                    held_open: s.held_open,
                    small: s.stamp.size <= super::SMALL_FILE,
                    settled: Some(s.stamp),
                });
            }
            Taken::Drop(left) => {
                tell(shared, s, &moved, left);
                dropped.push(id);
            }
        }
    }
    forget(shared, dropped).await;
    claimed
}

/// The roots of `batch` that are safe to claim from. The staging folder lives in the inbox,
/// where users can write: it is opened beneath the inbox without following links (a
/// `.dropscan` swapped for a symlink must not redirect claimed files), made again if removed,
/// and must carry our owner marker. A root whose staging is unsafe, or one of whose
/// destinations others control (`fsops::dest`), is not claimed from: its files stay in the
/// inbox and the error says why.
async fn ready_roots(shared: &Arc<Shared>, batch: &[Settled]) -> HashSet<RootId> {
    let mut roots: Vec<RootId> = batch.iter().map(|s| s.root).collect();
    roots.sort_unstable();
    roots.dedup();
    let mut ready = HashSet::new();
    for root in roots.iter().filter_map(|&id| shared.roots.get(id)) {
        let (sh, r) = (Arc::clone(shared), Arc::clone(root));
        let check = fsops::blocking(move || sh.staging_ready(&r)).await;
        match check {
            Ok(()) => {
                shared.metrics.set_watch_held(root.path(), None);
                ready.insert(root.id);
            }
            Err(e @ FsError::Task { .. }) => tracing::error!(error = %e, "staging check failed"),
            Err(e) => {
                tracing::error!(error = %e, "staging folder or a destination is not safe; files stay in the inbox");
                shared
                    .metrics
                    .set_watch_held(root.path(), Some(e.to_string()));
            }
        }
    }
    ready
}

/// A settled file to claim, its staged name, and the staging folder (dev, ino) its record names.
type Source<'a> = (&'a Settled, std::ffi::OsString, Option<(u64, u64)>);

/// Moves each source into staging under its staged name: one blocking call and one fsync per
/// folder for each root's share of the batch. One answer per source, in order (`None`: not
/// attempted, its root gone).
async fn move_all(shared: &Arc<Shared>, sources: &[Source<'_>]) -> Vec<Option<Moved>> {
    let mut results: Vec<Option<Moved>> = (0..sources.len()).map(|_| None).collect();
    for (root, ks) in by_root(sources.iter().map(|(s, ..)| s.root)) {
        let files: Vec<_> = ks
            .iter()
            .map(|&k| {
                let (s, name, _) = &sources[k];
                (s.rel_path.clone(), s.stamp, name.clone(), s.held_open)
            })
            .collect();
        let staging_folder = ks.first().and_then(|&k| sources[k].2);
        let Some(root) = shared.roots.get(root).cloned() else {
            continue;
        };
        match tokio::task::spawn_blocking(move || root.claim_files(&files, staging_folder)).await {
            Ok(rs) => {
                for (&k, r) in ks.iter().zip(rs) {
                    results[k] = Some(Ok(r));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for &k in &ks {
                    results[k] = Some(Err(Arc::clone(&e)));
                }
            }
        }
    }
    results
}

/// Logs why a settled file was left where it is.
fn tell(shared: &Shared, s: &Settled, moved: &Moved, left: Left) {
    let path = fsops::shown(&s.path);
    match (left, moved) {
        (Left::Quietly, _) => {}
        (Left::HeldOpen, _) => {
            tracing::debug!(path = %path, "held open for writing; left in the inbox");
        }
        (Left::Warn, Ok(Ok(c))) => {
            if shared.first_warning(&s.path) {
                tracing::warn!(path = %path, "left in the inbox: {}", c.why());
            }
        }
        (Left::Error, Ok(Err(e))) => {
            tracing::warn!(path = %path, error = %e, "cannot claim; left in the inbox");
        }
        (_, Err(e)) => tracing::error!(error = %e, "claim task failed"),
        (Left::Warn | Left::Error | Left::TaskFailed, _) => {
            tracing::warn!(path = %path, "cannot claim; left in the inbox");
        }
    }
}

/// Drops the records of files that were not taken.
async fn forget(shared: &Shared, dropped: Vec<FileId>) {
    if dropped.is_empty() {
        return;
    }
    if let Err(e) = shared.journal.unclaim(dropped).await {
        // Harmless: at start-up a `claimed` record without a staged file is dropped too.
        tracing::warn!(error = %e, "could not forget abandoned claims");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real `JoinError` (a cancelled task), as the blocking pool gives one.
    fn cancelled() -> tokio::task::JoinError {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let task = tokio::spawn(std::future::pending::<()>());
            task.abort();
            task.await.unwrap_err()
        })
    }

    #[test]
    fn what_each_claim_answer_does_to_its_record() {
        let err = || FsError::NotBeneath { path: "x".into() };
        let table: Vec<(Moved, Taken)> = vec![
            (
                Ok(Ok(Claim::Claimed(Renamed::Durable))),
                Taken::Own { unsynced: false },
            ),
            (
                Ok(Ok(Claim::Claimed(Renamed::NotSynced))),
                Taken::Own { unsynced: true },
            ),
            (Ok(Ok(Claim::Changed)), Taken::Drop(Left::Quietly)),
            (Ok(Ok(Claim::Gone)), Taken::Drop(Left::Quietly)),
            (Ok(Ok(Claim::HeldOpen)), Taken::Drop(Left::HeldOpen)),
            (Ok(Ok(Claim::HardLinkedLeft)), Taken::Drop(Left::Warn)),
            (Ok(Ok(Claim::UnreadableLeft)), Taken::Drop(Left::Warn)),
            (Ok(Ok(Claim::InDestination)), Taken::Drop(Left::Warn)),
            (Ok(Err(err())), Taken::Drop(Left::Error)),
            (Err(Arc::new(cancelled())), Taken::Drop(Left::TaskFailed)),
        ];
        for (moved, want) in table {
            assert_eq!(taken(&moved), want, "{moved:?}");
        }
    }

    #[test]
    fn a_batch_is_grouped_by_root_in_order_of_first_appearance() {
        let (a, b, c) = (RootId(0), RootId(1), RootId(2));
        type Groups = Vec<(RootId, Vec<usize>)>;
        let table: [(&[RootId], Groups); 4] = [
            (&[], vec![]),
            (&[a, a], vec![(a, vec![0, 1])]),
            (
                &[b, a, b, c],
                vec![(b, vec![0, 2]), (a, vec![1]), (c, vec![3])],
            ),
            (&[c, c, a], vec![(c, vec![0, 1]), (a, vec![2])]),
        ];
        for (roots, want) in table {
            assert_eq!(by_root(roots.iter().copied()), want, "{roots:?}");
        }
    }
}
