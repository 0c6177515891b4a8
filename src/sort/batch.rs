//! Placement in batches (issue 20): the common case, decided clean records of one watch fresh
//! from their decision, is placed a batch at a time with one journal operation per step and
//! one fsync per folder per batch.
//!
//! The order of durable steps is the one-record order, per batch: the names are chosen (one
//! blocking call); the `placing` rows of the batch are committed together (one journal
//! operation, each row in a savepoint of its own and refused by the same rules as
//! `placing_checked`) before any of its renames; the renames are made (one blocking call), then
//! each destination folder is fsynced once and the staging folder once, and only then are the
//! modes set and the `placed` rows (with their notifications) committed together; the DELETEs
//! are sent (one request each) and the `done` rows of those answered are committed together.
//! A crash between two steps leaves each record of the batch in the state one record would be
//! left in, and it is finished the same way (`placing`: by looking at both ends).
//!
//! Anything out of the ordinary leaves the batch for the one-record path, which reads the
//! record again from the journal and handles every case: a watch held or gone, a name taken
//! twice in the batch or meanwhile, a refused `placing`, a move that failed (a copy across
//! filesystems is finished inside the batch's blocking call, made durable as for one file).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt;

use super::plan::plan;
use super::{SORT_CONCURRENCY, Sorter, Step, open_dest};
use crate::fsops::place::{Deferred, Placed, Release};
use crate::fsops::{self, FsError, blocking};
use crate::journal::{FileId, FileRecord, FileState, Outcome, PlacingRow};
use crate::root::{Root, Which};

/// Records placed in one batch at most.
pub(super) const BATCH: usize = 64;

/// Whether a queued record, as its decision carried it, is placed in a batch: decided (not a
/// `placing` resumed after a crash or a failed attempt), and a clean release.
pub(super) fn batchable(rec: &FileRecord) -> bool {
    rec.state == FileState::Decided && rec.is_clean_verdict_for_content()
}

/// A record of the batch, with the name chosen for it.
struct Item {
    rec: FileRecord,
    rel: PathBuf,
}

impl Sorter {
    /// Places `recs` (batchable records of one watch, see [`batchable`]) together, then
    /// deletes their results; see the module docs. Every record is answered once.
    pub(super) async fn place_batch(&self, recs: Vec<FileRecord>) -> Vec<(FileId, Step)> {
        let mut out = Vec::with_capacity(recs.len());
        // Records left to the one-record path: as carried (nothing journaled for them yet), or
        // read again (`None`: their `placing` may have been written).
        let mut alone: Vec<(FileId, Option<Box<FileRecord>>)> = Vec::new();
        let src = recs
            .first()
            .and_then(|r| self.shared.root_of(&r.root))
            .cloned();
        let Some(src) = src else {
            alone.extend(recs.into_iter().map(|r| (r.id, Some(Box::new(r)))));
            return self.alone(alone, out).await;
        };
        let (mut fresh, mut others) = (Vec::with_capacity(recs.len()), Vec::new());
        for rec in recs {
            let same = self
                .shared
                .root_of(&rec.root)
                .is_some_and(|r| Arc::ptr_eq(r, &src));
            if batchable(&rec) && same && !self.held(&rec) {
                fresh.push(rec);
            } else {
                others.push(rec);
            }
        }
        alone.extend(others.into_iter().map(|r| (r.id, Some(Box::new(r)))));
        tracing::debug!(
            records = fresh.len(),
            alone = alone.len(),
            "placing a batch"
        );
        let dest_root = src.folder_path(Which::Clean).to_path_buf();
        let items = self.choose_names(&src, &dest_root, fresh, &mut alone).await;
        let items = self.journal_placing(&dest_root, items, &mut alone).await;
        let placed = self.move_batch(&src, &dest_root, items, &mut alone).await;
        let placed = self.journal_placed(&dest_root, placed, &mut alone).await;
        self.delete_results(placed, &mut out).await;
        self.alone(alone, out).await
    }

    /// The one-record path for `alone`, one after the other, after the batch.
    async fn alone(
        &self,
        alone: Vec<(FileId, Option<Box<FileRecord>>)>,
        mut out: Vec<(FileId, Step)>,
    ) -> Vec<(FileId, Step)> {
        for (id, rec) in alone {
            out.push((id, self.step(id, rec).await));
        }
        out
    }

    /// Chooses a free name for each record in one blocking call; a record whose name cannot be
    /// chosen, or whose name another of the batch took, goes alone (nothing journaled yet).
    async fn choose_names(
        &self,
        src: &Arc<Root>,
        dest_root: &std::path::Path,
        recs: Vec<FileRecord>,
        alone: &mut Vec<(FileId, Option<Box<FileRecord>>)>,
    ) -> Vec<Item> {
        if recs.is_empty() {
            return Vec::new();
        }
        let dir_mode = plan(Some(Outcome::Clean), true).dir_mode;
        let rels: Vec<PathBuf> = recs.iter().map(|r| r.rel_path.clone()).collect();
        let (src2, root) = (Arc::clone(src), dest_root.to_path_buf());
        let chosen = blocking(move || {
            let root = open_dest(&src2, Which::Clean, &root, true)?;
            let mut taken = HashSet::with_capacity(rels.len());
            Ok(rels
                .iter()
                .map(|rel| {
                    let t = fsops::place::free_name(&root, rel, dir_mode).ok()?;
                    taken.insert(t.clone()).then_some(t)
                })
                .collect::<Vec<_>>())
        })
        .await;
        let Ok(chosen) = chosen else {
            alone.extend(recs.into_iter().map(|r| (r.id, Some(Box::new(r)))));
            return Vec::new();
        };
        let mut items = Vec::with_capacity(recs.len());
        for (rec, rel) in recs.into_iter().zip(chosen) {
            match rel {
                Some(rel) => items.push(Item { rec, rel }),
                None => alone.push((rec.id, Some(Box::new(rec)))),
            }
        }
        items
    }

    /// Commits the batch's `placing` rows in one journal operation; a refused record goes alone
    /// and is read again.
    async fn journal_placing(
        &self,
        dest_root: &std::path::Path,
        items: Vec<Item>,
        alone: &mut Vec<(FileId, Option<Box<FileRecord>>)>,
    ) -> Vec<Item> {
        if items.is_empty() {
            return items;
        }
        let rows = items
            .iter()
            .map(|it| PlacingRow {
                id: it.rec.id,
                dest_root: dest_root.to_path_buf(),
                dest: dest_root.join(&it.rel),
                seen: it.rec.outcome,
                seen_sha256: it.rec.sha256,
            })
            .collect();
        let Ok(answers) = self.shared.journal.placing_many(rows).await else {
            alone.extend(items.into_iter().map(|it| (it.rec.id, None)));
            return Vec::new();
        };
        answered(items, answers, alone, "placing refused")
    }

    /// Moves the batch in one blocking call: the renames, then each folder fsynced once
    /// ([`Deferred::finish`]). A record whose move failed goes alone (it is `placing`, and the
    /// one-record path finishes it by looking at both ends).
    async fn move_batch(
        &self,
        src: &Arc<Root>,
        dest_root: &std::path::Path,
        items: Vec<Item>,
        alone: &mut Vec<(FileId, Option<Box<FileRecord>>)>,
    ) -> Vec<Item> {
        if items.is_empty() {
            return items;
        }
        let p = plan(Some(Outcome::Clean), true);
        let work: Vec<_> = items
            .iter()
            .map(|it| {
                let temp = fsops::names::copy_temp_name(
                    &src.instance,
                    fsops::names::TempOf::Agent,
                    &fsops::names::staged_token(&it.rec.staged),
                    &it.rec.rel_path,
                );
                (
                    it.rec.staged.clone(),
                    it.rec.stamp,
                    it.rec.sha256,
                    it.rel.clone(),
                    temp,
                )
            })
            .collect();
        let (sh, src2, root) = (
            Arc::clone(&self.shared),
            Arc::clone(src),
            dest_root.to_path_buf(),
        );
        let moved = blocking(move || {
            let dest = open_dest(&src2, Which::Clean, &root, true)?;
            let staging = src2.staging()?;
            let mut batch = Deferred::default();
            let answers: Vec<Result<Placed, FsError>> = work
                .iter()
                .map(|(staged, stamp, sha256, rel, temp)| {
                    let (st, name) = sh.staging_of(staged)?;
                    if !Arc::ptr_eq(&st, &staging) && st.path() != staging.path() {
                        return Err(FsError::NotBeneath {
                            path: staged.clone(),
                        });
                    }
                    fsops::place::place_deferred(
                        &Release {
                            staging: &st,
                            staged_name: &name,
                            hashed: *stamp,
                            sha256: *sha256,
                            dest_root: &dest,
                            target: rel,
                            file_mode: p.file_mode,
                            copy: p.copy,
                            clean: p.clean,
                            temp_name: temp,
                            own_copy: *stamp,
                        },
                        &mut batch,
                    )
                })
                .collect();
            batch.finish(&staging);
            Ok(answers)
        })
        .await;
        let Ok(moved) = moved else {
            alone.extend(items.into_iter().map(|it| (it.rec.id, None)));
            return Vec::new();
        };
        answered(items, moved, alone, "batched move failed")
    }

    /// Commits the batch's `placed` rows, each with its notifications, in one journal
    /// operation (after the folder fsyncs), then announces each placement.
    async fn journal_placed(
        &self,
        dest_root: &std::path::Path,
        items: Vec<Item>,
        alone: &mut Vec<(FileId, Option<Box<FileRecord>>)>,
    ) -> Vec<FileRecord> {
        if items.is_empty() {
            return Vec::new();
        }
        let rows = items
            .iter()
            .map(|it| {
                let dest = dest_root.join(&it.rel);
                let reason = it.rec.reason.as_deref();
                let events = crate::hooks::events_for(
                    &self.shared.config,
                    &it.rec,
                    Outcome::Clean,
                    &dest,
                    reason,
                );
                (it.rec.id, events)
            })
            .collect();
        let Ok(answers) = self.shared.journal.placed_many(rows).await else {
            alone.extend(items.into_iter().map(|it| (it.rec.id, None)));
            return Vec::new();
        };
        let mut placed = Vec::with_capacity(items.len());
        for (it, answer) in items.into_iter().zip(answers) {
            if answer.is_err() {
                alone.push((it.rec.id, None));
                continue;
            }
            let Item { mut rec, rel } = it;
            self.announce(
                &rec,
                Outcome::Clean,
                rec.reason.clone(),
                dest_root.join(rel),
            );
            rec.state = FileState::Placed;
            placed.push(rec);
        }
        placed
    }

    /// Deletes the results of the placed records (one request each, as many at once as
    /// placements ran at once before batches), then commits the `done` rows of those answered in
    /// one journal operation. A record whose DELETE failed stays `placed` and is retried.
    async fn delete_results(&self, placed: Vec<FileRecord>, out: &mut Vec<(FileId, Step)>) {
        if placed.is_empty() {
            return;
        }
        let requests = placed.into_iter().map(|rec| {
            let s = self.clone();
            async move { (rec.id, s.forget(&rec).await) }
        });
        let forgotten: Vec<(FileId, Result<(), super::Retry>)> =
            futures_util::stream::iter(requests)
                .buffer_unordered(SORT_CONCURRENCY)
                .collect()
                .await;
        let mut ids = Vec::with_capacity(forgotten.len());
        for (id, answer) in forgotten {
            match answer {
                Ok(()) => ids.push(id),
                Err(why) => out.push((id, Step::Retry(why))),
            }
        }
        if ids.is_empty() {
            return;
        }
        match self.shared.journal.done_many(ids.clone()).await {
            Ok(answers) => {
                for (id, answer) in ids.into_iter().zip(answers) {
                    let step = match answer {
                        Ok(()) => Step::Done,
                        Err(e) => Step::Retry(super::Retry::write(e)),
                    };
                    out.push((id, step));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "done rows of a batch not written: one at a time");
                for id in ids {
                    let step = match self.shared.journal.done(id).await {
                        Ok(()) => Step::Done,
                        Err(e) => Step::Retry(super::Retry::write(e)),
                    };
                    out.push((id, step));
                }
            }
        }
    }
}

/// The items whose step answered Ok; each of the others goes to the one-record path, which
/// reads its record again (`why` names the step in the debug line).
fn answered<T, E: std::fmt::Display>(
    items: Vec<Item>,
    answers: Vec<Result<T, E>>,
    alone: &mut Vec<(FileId, Option<Box<FileRecord>>)>,
    why: &str,
) -> Vec<Item> {
    let mut kept = Vec::with_capacity(items.len());
    for (it, answer) in items.into_iter().zip(answers) {
        match answer {
            Ok(_) => kept.push(it),
            Err(e) => {
                tracing::debug!(id = it.rec.id, error = %e, "{why}: read again, placed alone");
                alone.push((it.rec.id, None));
            }
        }
    }
    kept
}
