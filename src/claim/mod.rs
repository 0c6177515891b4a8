//! Claim and hash: settled files are taken out of users' reach, then owned and fingerprinted.
//!
//! A settled file is first recorded in the journal (so its original relative path survives any
//! crash), then moved by atomic rename into the root's per-instance staging folder under a unique
//! name, under a read lease where leases can be asked ([`crate::fsops::claim`]): a file that a
//! writer holds open is left where it is. A rename that fails because the file is gone means
//! another agent sharing the folder took it (or the user removed it): the record is dropped and
//! nothing else happens. Once staged, the file is **owned** (`crate::hashing`,
//! [`crate::fsops::own`]): copied into a private inode while it is hashed with streaming SHA-256,
//! under the lease; a writer still at it sends it back to the inbox. Where no lease can be had,
//! the user's original is kept beside the copy, and this stage's sweep of kept originals drops
//! each once unchanged for `keep_original`, or sends it back to the inbox as a new version if a
//! late writer changed it.
//!
//! What this stage does not do: decide verdicts. It hands hashed files to the uploader, and files
//! it can already decide (unreadable, hard-linked, verdict reused) straight to the sorter; what it
//! must leave in the inbox, it leaves ([`crate::fsops::claim::Claim::why`]).

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::Shared;
use crate::error::FatalError;
use crate::fsops;
use crate::hashing::hash_record;
use crate::journal::FileId;
use crate::pipeline::{Claimed, Hashed, Settled, Verdict};
use crate::root::Root;
use batch::claim_batch;
use owning::{Hashers, spawn_batch};
use tee::send_tees;

mod batch;
mod owning;
mod tee;

/// Capacity of claim → upload. Full: claim stops claiming, and files stay in the inbox, where
/// another agent on the same share can take them.
pub const CLAIMED_CAPACITY: usize = 64;
/// Files owned (copied and hashed, see `fsops::own`) at once. More than the cores: each copy
/// ends with an fsync, which waits on the disk, not the CPU.
const HASH_CONCURRENCY: usize = 8;
/// How often the journal is swept for records left `claimed`.
const STUCK_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// A `claimed` record untouched this long is hashed again (longer than any hash queue).
const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(600);
/// How long after a private copy found staging full the records left `claimed` are owned again
/// (the rest of its batch, released, may have made room; the stuck-claim sweep would wait
/// [`STUCK_AFTER`]).
const ROOM_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);
/// Bounds of the kept originals' sweep period.
const KEPT_SWEEP_MIN: std::time::Duration = std::time::Duration::from_millis(250);
const KEPT_SWEEP_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// Settled files claimed in one journal transaction at most.
const CLAIM_BATCH: usize = 64;
/// Files up to this size (when claimed) are owned with the others of their claim batch in one
/// blocking call, and their hashes journaled in one operation ([`hashing::hash_batch`]); bigger
/// ones are owned each in a task of its own, several at once.
const SMALL_FILE: u64 = 1024 * 1024;

/// Hands a hashing result to the next stage.
async fn forward(
    h: Hashed,
    claimed_tx: &mpsc::Sender<Claimed>,
    verdicts_tx: &mpsc::Sender<Verdict>,
) {
    match h {
        Hashed::Ready(c) => {
            claimed_tx.send(c).await.ok();
        }
        Hashed::Decided(ids) => {
            for id in ids {
                verdicts_tx.send(Verdict::of(id)).await.ok();
            }
        }
        Hashed::Waiting | Hashed::Gone => {}
    }
}

/// A unique name in staging. The original name is kept in the journal, never in staging, so a
/// hostile name cannot do anything there.
pub(crate) fn staged_name() -> OsString {
    OsString::from(format!("{}.staged", uuid::Uuid::new_v4().simple()))
}

/// A claimed file to own and hash.
struct ToOwn {
    id: FileId,
    staged: PathBuf,
    /// Taken although held open (`Settled::held_open`).
    held_open: bool,
    /// At most [`SMALL_FILE`] when it settled (owned in a batch).
    small: bool,
    /// Its stamp when it settled, for a file just claimed (`None`: resumed or swept up).
    settled: Option<crate::fsops::Stamp>,
}

/// What this stage reads.
pub struct Inputs {
    /// Settled files, from settle.
    pub settled_rx: mpsc::Receiver<Settled>,
    /// Records found `claimed` at start-up, to hash.
    pub resume: Vec<(FileId, PathBuf)>,
}

/// What this stage writes.
pub struct Outputs {
    /// Hashed files, to the uploader.
    pub claimed_tx: mpsc::Sender<Claimed>,
    /// Files decided without a scan, to the sorter.
    pub verdicts_tx: mpsc::Sender<Verdict>,
}

/// Runs the claim stage until shutdown. `resume` lists records found `claimed` at start-up.
pub async fn run(
    ctx: Arc<Shared>,
    inputs: Inputs,
    outputs: Outputs,
    shutdown: CancellationToken,
) -> Result<(), FatalError> {
    let shared = ctx;
    let Inputs {
        mut settled_rx,
        resume,
    } = inputs;
    let Outputs {
        claimed_tx,
        verdicts_tx,
    } = outputs;
    let hashing = Arc::new(Semaphore::new(HASH_CONCURRENCY));
    let hashing_now: HashingNow = Arc::default();
    let tasks = TaskTracker::new();
    for (id, staged) in resume {
        let job = ToOwn {
            id,
            staged,
            held_open: false,
            small: false,
            settled: None,
        };
        spawn_hash(
            &shared,
            &hashing,
            &hashing_now,
            &tasks,
            &claimed_tx,
            &verdicts_tx,
            job,
        )
        .await;
    }
    let mut batch = Vec::with_capacity(CLAIM_BATCH);
    let mut sweep = tokio::time::interval(STUCK_SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep.tick().await;
    let mut kept_sweep = tokio::time::interval(kept_sweep_period(&shared));
    kept_sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut journal_back = shared.journal.recovered();
    journal_back.mark_unchanged();
    // When the records a full staging folder left `claimed` are owned again.
    let mut room_due: Option<tokio::time::Instant> = None;
    loop {
        batch.clear();
        let claimed = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            n = settled_rx.recv_many(&mut batch, CLAIM_BATCH) => {
                if n == 0 { break }
                claim_batch(&shared, &batch).await
            }
            _ = kept_sweep.tick() => {
                sweep_kept(&shared).await;
                Vec::new()
            }
            // A record left `claimed` because the journal write after hashing failed (disk
            // full): hashed again as soon as the journal takes writes again (every record
            // `claimed` that no hash is working on), and at the latest by the periodic sweep.
            changed = journal_back.changed() => {
                if changed.is_err() {
                    break;
                }
                stuck(&shared, std::time::Duration::ZERO, &hashing_now).await
            }
            _ = sweep.tick() => stuck(&shared, STUCK_AFTER, &hashing_now).await,
            () = shared.staging_full.notified() => {
                room_due.get_or_insert_with(|| tokio::time::Instant::now() + ROOM_RETRY_AFTER);
                Vec::new()
            }
            () = tokio::time::sleep_until(room_due.unwrap_or_else(tokio::time::Instant::now)), if room_due.is_some() => {
                room_due = None;
                stuck(&shared, std::time::Duration::ZERO, &hashing_now).await
            }
        };
        let (small, claimed): (Vec<ToOwn>, Vec<ToOwn>) = claimed.into_iter().partition(|j| j.small);
        if !small.is_empty() {
            let hashers = Hashers {
                shared: &shared,
                permits: &hashing,
                now: &hashing_now,
                tasks: &tasks,
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = spawn_batch(&hashers, &claimed_tx, &verdicts_tx, small) => {}
            }
        }
        let Some(claimed) = send_tees(&shared, claimed, &claimed_tx, &shutdown).await else {
            break;
        };
        for job in claimed {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = spawn_hash(&shared, &hashing, &hashing_now, &tasks, &claimed_tx, &verdicts_tx, job) => {}
            }
        }
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// How often kept originals are looked at: a quarter of the shortest `keep_original`, 250 ms to
/// 30 s.
fn kept_sweep_period(shared: &Shared) -> std::time::Duration {
    shared
        .roots
        .iter()
        .map(|r| r.config.keep_original / 4)
        .min()
        .unwrap_or(KEPT_SWEEP_MAX)
        .clamp(KEPT_SWEEP_MIN, KEPT_SWEEP_MAX)
}

/// What became of one kept original.
enum KeptStep {
    /// Unchanged, and not yet kept for `keep_original`.
    Waiting,
    /// Unchanged for `keep_original`: removed (its copy went through the pipeline).
    Dropped,
    /// Changed after its copy was taken: back in the inbox at this path, as a new version.
    Returned(PathBuf),
    /// Gone (a user with access to staging, or an operator).
    Gone,
}

/// The kept originals' sweep (see [`crate::fsops::own`]): an original that a late writer
/// changed goes back into the inbox under its name (or `name (1)`), so that what the writer
/// added is scanned as a new version; one unchanged for `keep_original` is removed, unless it is
/// still held open for writing (a file taken after `held_open_limit`: its writer may go on). An
/// original of a root no longer configured is left where it is.
async fn sweep_kept(shared: &Arc<Shared>) {
    let kept = match shared.journal.retained().await {
        Ok(k) => k,
        Err(e) => {
            tracing::debug!(error = %e, "kept-originals sweep failed");
            return;
        }
    };
    let now = crate::journal::now_ms();
    for k in kept {
        let Some(root) = shared.root_of(&k.root).cloned() else {
            continue;
        };
        let keep_ms = i64::try_from(root.config.keep_original.as_millis()).unwrap_or(i64::MAX);
        let old_enough = now.saturating_sub(k.kept_at_ms) >= keep_ms;
        let (sh, orig, rel, stamp) = (
            Arc::clone(shared),
            k.orig.clone(),
            k.rel_path.clone(),
            k.stamp,
        );
        let step = fsops::blocking(move || -> Result<KeptStep, fsops::FsError> {
            let (staging, name) = sh.staging_of(&orig)?;
            match staging.stamp(&name) {
                Err(fsops::FsError::Vanished { .. }) => Ok(KeptStep::Gone),
                Err(e) => Err(e),
                Ok(st) if fsops::same_file(&stamp, &st.stamp()) => {
                    // Still held open for writing (a file taken after `held_open_limit`): its
                    // writer may go on, and must never write into a deleted inode.
                    if old_enough && !held_open_for_writing(&root, &staging, &name) {
                        staging.unlink(&name)?;
                        // Durable before its row goes: after a power cut a kept original that
                        // came back without a row would be scanned again as a new file.
                        staging.fsync()?;
                        Ok(KeptStep::Dropped)
                    } else {
                        Ok(KeptStep::Waiting)
                    }
                }
                Ok(_) => {
                    let inbox = root.inbox()?;
                    fsops::place::return_to_inbox(&staging, &name, &inbox, &rel)
                        .map(KeptStep::Returned)
                }
            }
        })
        .await;
        match step {
            Ok(KeptStep::Waiting) => continue,
            Ok(KeptStep::Returned(back)) => {
                shared
                    .metrics
                    .returned_changed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    path = %fsops::shown(&k.rel_path),
                    back = %fsops::shown(&back),
                    "a writer changed this file after it was taken: the new version is back in the inbox and will be scanned"
                );
            }
            Ok(KeptStep::Dropped | KeptStep::Gone) => {}
            Err(e) => {
                tracing::warn!(path = %fsops::shown(&k.orig), error = %e, "kept original: cannot look at it or put it back; tried again later");
                continue;
            }
        }
        if let Err(e) = shared.journal.unretain(k.orig, Some(k.kept_at_ms)).await {
            tracing::debug!(error = %e, "could not forget a kept original");
        }
    }
}

/// Whether a kept original of `root` is held open for writing, where leases can tell.
fn held_open_for_writing(root: &Root, staging: &fsops::Dir, name: &std::ffi::OsStr) -> bool {
    let asked = match root.inbox() {
        Ok(inbox) => root.leases_here(&inbox),
        Err(_) => false,
    };
    asked
        && staging.open_file(name).is_ok_and(|(file, _)| {
            matches!(
                fsops::lease::probe(&file),
                Err(fsops::lease::LeaseRefused::HeldOpen)
            )
        })
}

/// Records left `claimed` for at least `older_than` that no hash of this stage is working on.
async fn stuck(
    shared: &Shared,
    older_than: std::time::Duration,
    hashing_now: &HashingNow,
) -> Vec<ToOwn> {
    match shared.journal.stuck_claimed(older_than).await {
        Ok(recs) => {
            let busy = hashing_now.lock().unwrap_or_else(PoisonError::into_inner);
            recs.into_iter()
                .filter(|r| !busy.contains(&r.id))
                .map(|r| ToOwn {
                    id: r.id,
                    staged: r.staged,
                    held_open: false,
                    small: false,
                    settled: None,
                })
                .collect()
        }
        Err(e) => {
            tracing::debug!(error = %e, "stuck-claim sweep failed");
            Vec::new()
        }
    }
}

/// The records a hash of this stage is working on now.
type HashingNow = Arc<Mutex<HashSet<FileId>>>;

async fn spawn_hash(
    shared: &Arc<Shared>,
    hashing: &Arc<Semaphore>,
    hashing_now: &HashingNow,
    tasks: &TaskTracker,
    claimed_tx: &mpsc::Sender<Claimed>,
    verdicts_tx: &mpsc::Sender<Verdict>,
    job: ToOwn,
) {
    // Taking the permit here (not in the task) makes claim wait when hashing is saturated.
    let Ok(permit) = Arc::clone(hashing).acquire_owned().await else {
        return;
    };
    if !hashing_now
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(job.id)
    {
        return;
    }
    let shared = Arc::clone(shared);
    let claimed_tx = claimed_tx.clone();
    let verdicts_tx = verdicts_tx.clone();
    let now = Arc::clone(hashing_now);
    tasks.spawn(async move {
        let id = job.id;
        let hash = async {
            let h = hash_record(&shared, id, job.staged, job.held_open).await;
            now.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            h
        };
        hash_then_forward(permit, hash, &claimed_tx, &verdicts_tx).await;
    });
}

/// Runs `hash` and hands its result on, holding the hashing permit until it is handed on.
///
/// Bounded by design (issue 20): claim's tasks are at most [`HASH_CONCURRENCY`], hashing or
/// waiting for room in claim → upload's channel. The permit used to be dropped after the hash,
/// before the hand-off, so while upload was the slower stage every file claimed left a task
/// waiting on the channel and claim went on claiming: `many` kept 10,000 such tasks (17 MB)
/// and had moved the whole backlog into staging. Now claim waits, and the files stay in the
/// inbox (`CLAIMED_CAPACITY`'s promise).
async fn hash_then_forward(
    permit: tokio::sync::OwnedSemaphorePermit,
    hash: impl std::future::Future<Output = Hashed>,
    claimed_tx: &mpsc::Sender<Claimed>,
    verdicts_tx: &mpsc::Sender<Verdict>,
) {
    let h = hash.await;
    forward(h, claimed_tx, verdicts_tx).await;
    drop(permit);
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::path::Path;

    use crate::fsops::claim::{Claim, claim};
    use crate::fsops::{Dir, FileStamp, Renamed};

    /// Regression (issue 20): the hashing permit was dropped before the hand-off to upload, so
    /// while upload was slower every claimed file left a task waiting on the channel (`many`:
    /// 10,000 tasks, 17 MB) and the whole backlog was moved into staging.
    #[tokio::test]
    async fn claim_waits_for_upload_instead_of_keeping_a_task_per_file_hashed() {
        use std::sync::Arc;
        use tokio::sync::{Semaphore, mpsc};

        use crate::pipeline::{Claimed, Hashed};
        let permits = Arc::new(Semaphore::new(2));
        // Upload takes nothing: one hashed file fills its channel.
        let (claimed_tx, _claimed_rx) = mpsc::channel(1);
        let (verdicts_tx, _verdicts_rx) = mpsc::channel(1);
        let tasks = tokio_util::task::TaskTracker::new();
        let mut started = 0;
        for id in 0..100 {
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                break;
            };
            let (claimed_tx, verdicts_tx) = (claimed_tx.clone(), verdicts_tx.clone());
            let hashed = Hashed::Ready(Claimed {
                id,
                staged: format!("/s/{id}").into(),
                content: crate::pipeline::Content::Hashed([0; 32]),
                stamp: crate::fsops::Stamp {
                    size: 1,
                    mtime_ns: 1,
                    ctime_ns: 1,
                    dev: 1,
                    ino: 1,
                },
            });
            tasks.spawn(async move {
                super::hash_then_forward(permit, async { hashed }, &claimed_tx, &verdicts_tx).await;
            });
            started += 1;
            // One thread: the task just spawned hashes and hands on (or waits) before the next.
            tokio::task::yield_now().await;
        }
        assert_eq!(
            (started, tasks.len()),
            (3, 2),
            "hash tasks started, and alive, while upload takes nothing (2 permits, 1 channel slot)"
        );
    }

    /// What the claim decides for each state a settled file can be in when its turn comes.
    #[test]
    fn claim_decisions_table() {
        enum Then {
            Untouched,
            Appended,
            Removed,
            HardLinked,
            FolderSwappedForLink,
        }
        // (what happened since it settled, hard links allowed) → the claim's answer
        let table: [(Then, bool, Result<Claim, &str>); 6] = [
            (Then::Untouched, false, Ok(Claim::Claimed(Renamed::Durable))),
            (Then::Appended, false, Ok(Claim::Changed)),
            (Then::Removed, false, Ok(Claim::Gone)),
            (Then::HardLinked, false, Ok(Claim::HardLinkedLeft)),
            (Then::HardLinked, true, Ok(Claim::Claimed(Renamed::Durable))),
            (Then::FolderSwappedForLink, false, Err("symlink")),
        ];
        for (i, (then, hard_links_ok, want)) in table.into_iter().enumerate() {
            let d = tempfile::tempdir().unwrap();
            let (inbox, staging) = (d.path().join("in"), d.path().join("st"));
            std::fs::create_dir_all(inbox.join("sub")).unwrap();
            std::fs::create_dir_all(&staging).unwrap();
            let file = inbox.join("sub/f.bin");
            std::fs::write(&file, b"settled").unwrap();
            let settled = FileStamp::of(&std::fs::metadata(&file).unwrap()).stamp();
            match then {
                Then::Untouched => {}
                Then::Appended => {
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&file)
                        .unwrap();
                    f.write_all(b" and more").unwrap();
                }
                Then::Removed => std::fs::remove_file(&file).unwrap(),
                Then::HardLinked => std::fs::hard_link(&file, inbox.join("twin.bin")).unwrap(),
                Then::FolderSwappedForLink => {
                    #[allow(clippy::disallowed_methods)]
                    std::fs::rename(inbox.join("sub"), inbox.join("sub-real")).unwrap();
                    std::os::unix::fs::symlink(inbox.join("sub-real"), inbox.join("sub")).unwrap();
                }
            }
            // Hard-linked: the stamp it settled with already had two links.
            let settled = if matches!(then, Then::HardLinked) {
                FileStamp::of(&std::fs::metadata(&file).unwrap()).stamp()
            } else {
                settled
            };
            let got = claim(
                &Dir::open_trusted(&inbox).unwrap(),
                Path::new("sub/f.bin"),
                &settled,
                &Dir::open_trusted(&staging).unwrap(),
                OsStr::new("x.staged"),
                hard_links_ok,
            );
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "row {i}"),
                (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "row {i}: {e}"),
                (got, want) => panic!("row {i}: got {got:?}, want {want:?}"),
            }
        }
    }
}
