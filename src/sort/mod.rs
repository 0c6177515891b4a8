//! Sorter: decided files → clean / quarantine / failed, then the server's result is deleted.
//!
//! The file lands at its original relative path under its destination. The exact destination
//! path is chosen first (a free name: an existing file is never overwritten, `name (1).ext` is
//! taken instead) and journaled (`placing`), then the move happens (rename, or copy + fsync +
//! verify + unlink across filesystems), then `placed` is journaled. After a crash, a `placing`
//! record is finished by looking at both ends: staged file gone and destination present means
//! the move happened. Quarantined files get mode 0600 in 0700 folders. Quarantine and failed
//! files get a sidecar `NAME.dropscan.json` saying what happened.
//!
//! Fail closed: a file goes to clean only if its record holds `not detected` for the SHA-256
//! it was hashed with, and only if the staged file still has the size and times it had when it
//! was hashed; a file that changed is hashed and scanned again, never released on an old verdict.
//!
//! `placed` is journaled together with the placement's notifications (`[[hook]]`, see
//! `crate::hooks`), so that none is lost and none announces a placement not recorded.
//!
//! A destination that is full or not writable keeps the file in staging and the move is retried
//! with backoff; nothing is ever deleted to make room.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::context::Shared;
use crate::error::FatalError;
use crate::fsops::place::Release;

mod batch;
mod finish;
mod plan;
mod queue;
mod retry;
use crate::fsops::{self, FsError, blocking};
use crate::hashing;
use crate::journal::{FileId, FileRecord, FileState};
use crate::pipeline::Hashed;
use crate::pipeline::{Resubmit, Verdict};
use crate::root::Root;
pub use finish::hex;
use finish::open_dest;
use plan::{AfterFailure, Plan, Resume, after_failure, plan, resume};
use queue::{QUEUED, Queue, Work};
use retry::Retry;

/// Capacity of the edge into the sorter (from claim, upload and poll). Full: the sender waits.
pub const VERDICTS_CAPACITY: usize = 1024;
/// Placements in progress at once.
pub const SORT_CONCURRENCY: usize = 16;
/// How often the journal is swept for decided records nobody holds, and failed moves retried.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Longest wait before retrying a move into a full or unwritable destination.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What became of one attempt to place a record.
enum Step {
    /// Finished (placed and result deleted, or closed).
    Done,
    /// Try again later (destination full, server unreachable for the DELETE).
    Retry(Retry),
}

/// What this stage reads.
pub struct Inputs {
    /// Decided files, from claim, upload and poll.
    pub verdicts_rx: mpsc::Receiver<Verdict>,
    /// Records found decided, placing or placed at start-up.
    pub resume: Vec<FileId>,
}

/// What this stage writes.
pub struct Outputs {
    /// Files that changed since they were hashed, to scan again.
    pub resubmit: Resubmit,
}

/// Runs the sorter until shutdown. `resume` are records found decided/placing/placed at start-up.
///
/// Placements run concurrently (up to [`SORT_CONCURRENCY`]) so that their journal commits group
/// together; one record is never worked on twice at the same time.
pub async fn run(
    ctx: Arc<Shared>,
    inputs: Inputs,
    outputs: Outputs,
    shutdown: CancellationToken,
) -> Result<(), FatalError> {
    let shared = ctx;
    let Inputs {
        mut verdicts_rx,
        resume,
    } = inputs;
    let Outputs { resubmit } = outputs;
    let sorter = Sorter {
        shared: Arc::clone(&shared),
        resubmit,
        deletes: Arc::new(tokio::sync::Semaphore::new(SORT_CONCURRENCY)),
    };
    // Records waiting for a retry: id → (when, attempts).
    let mut retry: HashMap<FileId, (Instant, u32)> = HashMap::new();
    let mut queue = Queue::default();
    for id in resume {
        queue.push(id);
    }
    let mut busy: HashMap<tokio::task::Id, Vec<FileId>> = HashMap::new();
    let mut tasks: JoinSet<Vec<(FileId, Step)>> = JoinSet::new();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Records the previous sweep saw decided/placed and unheld: seen twice in a row, they are
    // queued (monotonic: no comparison with the journal's wall-clock times).
    let mut seen_last_sweep: HashSet<FileId> = HashSet::new();
    loop {
        while tasks.len() < SORT_CONCURRENCY {
            let is_busy = |id: FileId| busy.values().any(|b| b.contains(&id));
            let Some(work) = queue.pop(is_busy) else {
                break;
            };
            let s = sorter.clone();
            let (handle, ids) = match work {
                Work::One(id, rec) => (
                    tasks.spawn(async move { vec![(id, s.step(id, rec).await)] }),
                    vec![id],
                ),
                Work::Batch(recs) => {
                    let ids = recs.iter().map(|r| r.id).collect();
                    (tasks.spawn(async move { s.place_batch(recs).await }), ids)
                }
            };
            busy.insert(handle.id(), ids);
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => match done {
                Ok((task, steps)) => {
                    busy.remove(&task);
                    for (id, step) in steps {
                        sorter.record(id, step, &mut retry).await;
                    }
                }
                Err(e) => {
                    // A panic in one placement: the record stays as journaled; the sweep retries.
                    busy.remove(&e.id());
                    tracing::error!(error = %e, "placement task failed");
                }
            },
            v = verdicts_rx.recv(), if queue.len() < QUEUED => match v {
                Some(v) => {
                    queue.push_decided(v.id, v.rec);
                    // Whatever else was announced meanwhile (a poll decides many at once):
                    // queued together, so that it is placed in batches.
                    while queue.len() < QUEUED {
                        let Ok(v) = verdicts_rx.try_recv() else { break };
                        queue.push_decided(v.id, v.rec);
                    }
                }
                None => break,
            },
            _ = sweep.tick() => {
                let now = Instant::now();
                for id in retry.iter().filter(|(_, (t, _))| *t <= now).map(|(id, _)| *id) {
                    queue.push(id);
                }
                // Safety net: decided records no message announced (e.g. a failed send).
                if let Ok(recs) = shared.journal.in_states(&[FileState::Decided, FileState::Placed]).await {
                    let mut seen = HashSet::with_capacity(recs.len());
                    for r in recs {
                        let held = retry.contains_key(&r.id) || busy.values().any(|b| b.contains(&r.id));
                        if !held {
                            if seen_last_sweep.contains(&r.id) {
                                queue.push(r.id);
                            }
                            seen.insert(r.id);
                        }
                    }
                    seen_last_sweep = seen;
                }
            }
        }
    }
    // Placements in progress are local moves and their DELETEs (a batch's up to 64, 16 at a
    // time): let them finish within the grace. Aborted, a batch's renames already begun still
    // run to their end (a blocking call is not cancelled); its records stay as journaled.
    let grace = shared.config.state.shutdown_grace;
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    Ok(())
}

#[derive(Clone)]
struct Sorter {
    shared: Arc<Shared>,
    resubmit: Resubmit,
    /// DELETEs in flight at once, over every placement task: as many as placements ran at
    /// once before batches (a batch's DELETEs go out together).
    deletes: Arc<tokio::sync::Semaphore>,
}

impl Sorter {
    async fn record(&self, id: FileId, step: Step, retry: &mut HashMap<FileId, (Instant, u32)>) {
        match step {
            Step::Done => {
                retry.remove(&id);
            }
            Step::Retry(why) => {
                let entry = retry.entry(id).or_insert((Instant::now(), 0));
                entry.1 += 1;
                let wait = crate::limits::backoff(entry.1, rand::random::<f64>()).min(RETRY_MAX);
                entry.0 = Instant::now() + wait.max(Duration::from_secs(1));
                if entry.1 == 1 || entry.1 % 10 == 0 {
                    tracing::warn!(id, attempts = entry.1, reason = %why, "will retry");
                    self.shared.journal.note_error(why.to_string()).await.ok();
                }
            }
        }
    }

    /// Places record `id`, or deletes its result once placed. `carried`: the record as its
    /// decision committed it (no trip to the journal to read it; the destination is refused
    /// if its outcome or content changed since, see `choose_name`).
    async fn step(&self, id: FileId, carried: Option<Box<FileRecord>>) -> Step {
        let rec = match carried {
            Some(rec) if rec.id == id => *rec,
            _ => match self.shared.journal.get(id).await {
                Ok(r) => r,
                Err(e) => return Step::Retry(Retry::read(e)),
            },
        };
        match rec.state {
            FileState::Decided | FileState::Placing if self.held(&rec) => {
                tracing::debug!(id, "staged under a watch held now: left as it is");
                Step::Done
            }
            FileState::Decided | FileState::Placing => self.place(rec).await,
            FileState::Placed => self.delete_result(&rec).await,
            // Anything else is not ours (a stale message): ignore.
            _ => Step::Done,
        }
    }

    /// Whether `rec`'s watch is configured but held (see [`Shared::serves`]): its staged file
    /// cannot be reached safely now and must not be closed as vanished; the start that serves
    /// the watch places it. (A watch no longer configured is `Retry::RootGone` in `place`.)
    fn held(&self, rec: &FileRecord) -> bool {
        self.shared.root_of(&rec.root).is_some() && !self.shared.serves(&rec.staged)
    }

    async fn place(&self, rec: FileRecord) -> Step {
        let Some(src) = self.shared.root_of(&rec.root).cloned() else {
            return Step::Retry(Retry::RootGone {
                root: rec.root.clone(),
                staged: rec.staged.clone(),
            });
        };
        let original = rec.root.join(&rec.rel_path);
        let plan = plan(rec.outcome, rec.is_clean_verdict_for_content());
        let reason = plan.note.map(str::to_string).or_else(|| rec.reason.clone());
        let temp_name = fsops::names::copy_temp_name(
            &src.instance,
            fsops::names::TempOf::Agent,
            &fsops::names::staged_token(&rec.staged),
            &rec.rel_path,
        );
        let current_root = src.folder_path(plan.which).to_path_buf();
        // After a crash or a failed attempt in `placing`: the journaled target first (the move
        // may have happened, or a verified copy may wait under its temp name), in the root it
        // was chosen in, even if the configuration names another folder by now.
        let mut dest_root_path = current_root.clone();
        let mut target: Option<PathBuf> = None;
        let journaled = (rec.dest.as_deref(), rec.dest_root.as_deref());
        match resume(rec.state, journaled.0, journaled.1, &current_root) {
            Resume::Fresh => {}
            Resume::Here { rel } => target = rel,
            Resume::Outside { dest } => {
                return Step::Retry(Retry::PlacedOutside {
                    original,
                    dest,
                    configured: current_root,
                    temp: PathBuf::from(&temp_name),
                });
            }
            Resume::Elsewhere { root, dest, rel } => {
                match self.root_changed(&rec, &root, &dest, &temp_name).await {
                    Ok(true) => {
                        dest_root_path = root;
                        target = rel;
                    }
                    Ok(false) => {}
                    Err(why) => return Step::Retry(why),
                }
            }
        }
        let open_root = {
            let (src, root, which) = (Arc::clone(&src), dest_root_path.clone(), plan.which);
            move |create: bool| open_dest(&src, which, &root, create)
        };
        for _ in 0..16 {
            let rel = match target.take() {
                Some(t) => t,
                None => {
                    let chosen = self
                        .choose_name(&rec, open_root.clone(), &dest_root_path, plan.dir_mode)
                        .await;
                    match chosen {
                        Ok(t) => t,
                        Err(why) => return Step::Retry(why),
                    }
                }
            };
            let placed = self
                .move_once(&rec, &plan, open_root.clone(), &rel, &temp_name)
                .await;
            let e = match placed {
                Ok(()) => {
                    return self
                        .finish_placement(
                            rec,
                            plan.outcome,
                            reason,
                            plan.which,
                            &dest_root_path,
                            rel,
                        )
                        .await;
                }
                Err(e) => e,
            };
            match after_failure(&e, plan.copy, plan.clean) {
                AfterFailure::ChooseAgain => {}
                AfterFailure::Busy => return Step::Retry(Retry::Busy(e)),
                AfterFailure::BackToInbox => return self.return_to_inbox(rec, &src, e).await,
                AfterFailure::Vanished => return self.vanished(rec, e, original).await,
                AfterFailure::Rescan => return self.rescan(rec).await,
                AfterFailure::Move => {
                    self.shared
                        .metrics
                        .place_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let source = e.at(&original);
                    return Step::Retry(Retry::Move {
                        original,
                        dest_root: dest_root_path,
                        source,
                    });
                }
            }
        }
        Step::Retry(Retry::NoFreeName { original })
    }

    /// Chooses a free name for `rec` in its destination folder (made if missing) and journals it
    /// (`placing`) before anything moves.
    async fn choose_name(
        &self,
        rec: &FileRecord,
        open_root: impl FnOnce(bool) -> Result<Arc<fsops::Dir>, FsError> + Send + 'static,
        dest_root_path: &Path,
        dir_mode: u32,
    ) -> Result<PathBuf, Retry> {
        let rel_path = rec.rel_path.clone();
        let chosen = blocking(move || {
            let root = open_root(true)?;
            fsops::place::free_name(&root, &rel_path, dir_mode)
        })
        .await;
        let t = chosen.map_err(|e| Retry::ChooseName {
            original: rec.root.join(&rec.rel_path),
            dest_root: dest_root_path.to_path_buf(),
            source: e,
        })?;
        self.shared
            .journal
            .placing_checked(
                rec.id,
                dest_root_path.to_path_buf(),
                dest_root_path.join(&t),
                rec.outcome,
                rec.sha256,
            )
            .await
            .map_err(Retry::write)?;
        Ok(t)
    }

    /// One try at moving (or copying) the staged file to `rel` under its destination folder.
    async fn move_once(
        &self,
        rec: &FileRecord,
        plan: &Plan,
        open_root: impl FnOnce(bool) -> Result<Arc<fsops::Dir>, FsError> + Send + 'static,
        rel: &Path,
        temp_name: &std::ffi::OsStr,
    ) -> Result<(), FsError> {
        let sh = Arc::clone(&self.shared);
        let (staged, rel, temp) = (rec.staged.clone(), rel.to_path_buf(), temp_name.to_owned());
        let (hashed, sha256) = if plan.clean {
            (rec.stamp, rec.sha256)
        } else {
            (None, None)
        };
        let (own_copy, file_mode, copy, clean) = (rec.stamp, plan.file_mode, plan.copy, plan.clean);
        blocking(move || {
            let (staging, staged_name) = sh.staging_of(&staged)?;
            let dest_root = open_root(true)?;
            fsops::place::place(&Release {
                staging: &staging,
                staged_name: &staged_name,
                hashed,
                sha256,
                dest_root: &dest_root,
                target: &rel,
                file_mode,
                copy,
                clean,
                temp_name: &temp,
                own_copy,
            })
        })
        .await
        .map(drop)
    }

    /// The staged file is not there. Not in the staging folder opened now, which is on another
    /// filesystem than the one the file was staged on: a share mounted over the inbox covers
    /// the folder that holds it, and it is kept until the folder is reachable again. Otherwise
    /// it is gone, and its record is closed.
    async fn vanished(&self, rec: FileRecord, e: FsError, original: PathBuf) -> Step {
        if self.staged_elsewhere(&rec).await {
            self.shared
                .metrics
                .place_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Step::Retry(Retry::StagingCovered {
                source: e.at(&original),
                original,
            });
        }
        self.shared
            .journal
            .close_vanished(rec.id, "vanished from staging before it was placed".into())
            .await
            .ok();
        Step::Done
    }

    /// Whether the staging folder reached through its path now cannot be opened, or is another
    /// folder than the one `rec`'s file was staged in: the folder that holds the file is
    /// covered (a share mounted over the inbox), not emptied.
    async fn staged_elsewhere(&self, rec: &FileRecord) -> bool {
        let (sh, staged, staged_in) = (
            Arc::clone(&self.shared),
            rec.staged.clone(),
            rec.staging_folder,
        );
        blocking(move || Ok(sh.staging_covered(&staged, staged_in)))
            .await
            .unwrap_or(true)
    }

    async fn return_to_inbox(&self, rec: FileRecord, src: &Arc<Root>, why: FsError) -> Step {
        let (sh, src, staged, rel) = (
            Arc::clone(&self.shared),
            Arc::clone(src),
            rec.staged.clone(),
            rec.rel_path.clone(),
        );
        let back = blocking(move || {
            let (staging, name) = sh.staging_of(&staged)?;
            let inbox = src.inbox()?;
            fsops::place::return_to_inbox(&staging, &name, &inbox, &rel)
        })
        .await;
        match back {
            Ok(rel_back) => {
                tracing::warn!(
                    path = %fsops::shown(&rec.rel_path),
                    back = %fsops::shown(&rel_back),
                    error = %why,
                    "returned to the inbox unread (the failed folder is on another filesystem)"
                );
                self.shared
                    .journal
                    .close_vanished(
                        rec.id,
                        format!(
                            "{why}; returned to the inbox as {} (unread; the failed folder is on another filesystem)",
                            fsops::shown(&rel_back)
                        ),
                    )
                    .await
                    .ok();
                Step::Done
            }
            Err(e) => Step::Retry(Retry::CannotReturn {
                rel: rec.rel_path,
                why: Box::new(why),
                source: e,
            }),
        }
    }

    /// The file changed after hashing: never release it on the old verdict.
    async fn rescan(&self, rec: FileRecord) -> Step {
        tracing::warn!(id = rec.id, path = %fsops::shown(&rec.rel_path), "file changed after it was hashed: scanning it again");
        if let Err(e) = self.shared.journal.rehash(rec.id).await {
            return Step::Retry(Retry::write(e));
        }
        match hashing::hash_record(&self.shared, rec.id, rec.staged.clone(), false).await {
            Hashed::Ready(c) => self.resubmit.push(c),
            Hashed::Decided(_) => {
                // Decided again without a scan (reused verdict or failure): the sweep places it.
            }
            Hashed::Waiting | Hashed::Gone => {}
        }
        Step::Done
    }

    /// Deletes the scan's result on the server, then closes the record.
    async fn delete_result(&self, rec: &FileRecord) -> Step {
        if let Err(why) = self.forget(rec).await {
            return Step::Retry(why);
        }
        match self.shared.journal.done(rec.id).await {
            Ok(()) => Step::Done,
            Err(e) => Step::Retry(Retry::write(e)),
        }
    }

    /// Deletes the scan's result on the server (none for a reused verdict: its result belongs
    /// to the record that was scanned).
    async fn forget(&self, rec: &FileRecord) -> Result<(), Retry> {
        if !rec.reused {
            if let Some(scan_id) = &rec.scan_id {
                // Closed only when the sorter is dropped: then there is nobody to answer.
                let _permit = self.deletes.acquire().await.ok();
                self.shared.limits.rate().await;
                if let Err(e) = self.shared.scanner.forget(scan_id).await {
                    return Err(Retry::Forget {
                        scan_id: scan_id.clone(),
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
