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
//! A destination that is full or not writable keeps the file in staging and the move is retried
//! with backoff; nothing is ever deleted to make room.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::{Placement, Shared};
use crate::claim::{self, Hashed};
use crate::config::WatchConfig;
use crate::fsops::{self, FsError, PlaceOptions};
use crate::journal::{FileId, FileRecord, FileState, Outcome, now_ms};
use crate::kata::ScanId;
use crate::upload::Resubmit;

/// Capacity of the edge into the sorter (from claim, upload and poll). Full: the sender waits.
pub const VERDICTS_CAPACITY: usize = 1024;
/// Placements in progress at once.
pub const SORT_CONCURRENCY: usize = 16;
/// How often the journal is swept for decided records nobody holds, and failed moves retried.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Longest wait before retrying a move into a full or unwritable destination.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A record whose outcome is journaled and which is ready to be placed.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    /// Journal record.
    pub id: FileId,
}

/// The sidecar written beside quarantined and failed files.
#[derive(Serialize)]
struct Sidecar<'a> {
    original_path: String,
    size: Option<u64>,
    sha256: Option<String>,
    outcome: &'a str,
    verdict: Option<&'a str>,
    reason: Option<&'a str>,
    scan_ids: &'a [String],
    verdict_reused: bool,
    dropped_at: Option<String>,
    claimed_at: String,
    placed_at: String,
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            write!(s, "{b:02x}").ok();
            s
        })
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// What became of one attempt to place a record.
enum Step {
    /// Finished (placed and result deleted, or closed).
    Done,
    /// Try again later (destination full, server unreachable for the DELETE).
    Retry(String),
}

/// Runs the sorter until shutdown. `resume` are records found decided/placing/placed at start-up.
///
/// Placements run concurrently (up to [`SORT_CONCURRENCY`]) so that their journal commits group
/// together; one record is never worked on twice at the same time.
pub async fn run(
    shared: Arc<Shared>,
    mut verdicts_rx: mpsc::Receiver<Verdict>,
    resubmit: Resubmit,
    resume: Vec<FileId>,
    shutdown: CancellationToken,
) {
    let sorter = Sorter {
        shared: Arc::clone(&shared),
        resubmit,
    };
    // Records waiting for a retry: id → (when, attempts).
    let mut retry: HashMap<FileId, (Instant, u32)> = HashMap::new();
    let mut queue: VecDeque<FileId> = resume.into();
    let mut busy: HashMap<tokio::task::Id, FileId> = HashMap::new();
    let mut tasks: JoinSet<(FileId, Step)> = JoinSet::new();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while tasks.len() < SORT_CONCURRENCY {
            let Some(id) = queue.pop_front() else { break };
            if busy.values().any(|b| *b == id) {
                continue;
            }
            let s = sorter.clone();
            let handle = tasks.spawn(async move { (id, s.step(id).await) });
            busy.insert(handle.id(), id);
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => match done {
                Ok((task, (id, step))) => {
                    busy.remove(&task);
                    sorter.record(id, step, &mut retry).await;
                }
                Err(e) => {
                    // A panic in one placement: the record stays as journaled; the sweep retries.
                    busy.remove(&e.id());
                    tracing::error!(error = %e, "placement task failed");
                }
            },
            v = verdicts_rx.recv(), if queue.len() < SORT_CONCURRENCY => match v {
                Some(v) => queue.push_back(v.id),
                None => break,
            },
            _ = sweep.tick() => {
                let now = Instant::now();
                queue.extend(retry.iter().filter(|(_, (t, _))| *t <= now).map(|(id, _)| *id));
                // Safety net: decided records no message announced (e.g. a failed send).
                if let Ok(recs) = shared.journal.in_states(&[FileState::Decided, FileState::Placed]).await {
                    for r in recs {
                        if !retry.contains_key(&r.id) && now_ms() - r.updated_at_ms > 10_000 {
                            queue.push_back(r.id);
                        }
                    }
                }
            }
        }
    }
    // Placements in progress are local moves and one DELETE: let them finish within the grace.
    let grace = shared.config.state.shutdown_grace;
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tasks.abort_all();
    }
}

#[derive(Clone)]
struct Sorter {
    shared: Arc<Shared>,
    resubmit: Resubmit,
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
                    tracing::warn!(id, attempts = entry.1, reason = %why, "file kept in staging; will retry");
                    self.shared.journal.note_error(why).await.ok();
                }
            }
        }
    }

    async fn step(&self, id: FileId) -> Step {
        let rec = match self.shared.journal.get(id).await {
            Ok(r) => r,
            Err(e) => return Step::Retry(format!("journal read failed: {e}")),
        };
        match rec.state {
            FileState::Decided | FileState::Placing => self.place(rec).await,
            FileState::Placed => self.delete_result(&rec).await,
            // Anything else is not ours (a stale message): ignore.
            _ => Step::Done,
        }
    }

    fn watch_for(&self, rec: &FileRecord) -> Option<&WatchConfig> {
        self.shared
            .config
            .watches
            .iter()
            .find(|w| w.path == rec.root)
    }

    async fn place(&self, rec: FileRecord) -> Step {
        let Some(watch) = self.watch_for(&rec) else {
            return Step::Retry(format!(
                "{} is no longer a watched root in the config; the file stays in staging at {}",
                rec.root.display(),
                rec.staged.display()
            ));
        };
        let mut outcome = rec.outcome.unwrap_or(Outcome::Failed);
        let mut reason = rec.reason.clone();
        if outcome == Outcome::Clean {
            // Fail closed: the verdict must be `not detected` for exactly these bytes.
            let bound = rec.verdict.as_deref() == Some("not detected")
                && rec.sha256.is_some()
                && rec.verdict_sha256 == rec.sha256;
            if !bound {
                outcome = Outcome::Failed;
                reason = Some("internal: the clean verdict does not match the content".into());
            } else if rec.state == FileState::Decided && !self.unchanged(&rec).await {
                return self.rescan(rec).await;
            }
        }
        let dest_root = match outcome {
            Outcome::Clean => &watch.clean_dir,
            Outcome::Quarantine => &watch.quarantine_dir,
            Outcome::Failed | Outcome::Vanished => &watch.failed_dir,
        };
        let opts = PlaceOptions {
            file_mode: (outcome == Outcome::Quarantine).then_some(0o600),
            dir_mode: if outcome == Outcome::Quarantine {
                0o700
            } else {
                0o755
            },
            expected_sha256: rec.sha256,
        };
        let staged = rec.staged.clone();
        // After a crash in `placing`: the move may already have happened.
        if rec.state == FileState::Placing {
            if let Some(dest) = rec.dest.clone() {
                let staged_exists = exists(&staged).await;
                if !staged_exists && exists(&dest).await {
                    return self.finish_placement(rec, outcome, reason, dest).await;
                }
                if !staged_exists {
                    self.shared
                        .journal
                        .close_vanished(rec.id, "vanished from staging while being placed".into())
                        .await
                        .ok();
                    return Step::Done;
                }
                // Both ends exist: a copy across filesystems (or link + unlink) was complete
                // but the source not yet removed. Finish it if the destination holds our bytes;
                // otherwise the name was taken by someone else and a new one is chosen below.
                if let Some(sha) = rec.sha256 {
                    let (s, d) = (staged.clone(), dest.clone());
                    match blocking(move || fsops::finish_interrupted_move(&s, &d, sha)).await {
                        Ok(true) => return self.finish_placement(rec, outcome, reason, dest).await,
                        Ok(false) => {}
                        Err(e) => return Step::Retry(e.to_string()),
                    }
                }
            }
        }
        let rel = rec.rel_path.clone();
        let dest_root = dest_root.clone();
        for _ in 0..16 {
            let root = dest_root.clone();
            let rel2 = rel.clone();
            let target = match blocking(move || fsops::free_name(&root, &rel2, opts.dir_mode)).await
            {
                Ok(t) => t,
                Err(e) => return Step::Retry(e.to_string()),
            };
            if let Err(e) = self.shared.journal.placing(rec.id, target.clone()).await {
                return Step::Retry(format!("journal write failed: {e}"));
            }
            let (from, to, o) = (staged.clone(), target.clone(), opts);
            match blocking(move || fsops::place_at(&from, &to, &o)).await {
                Ok(_) => return self.finish_placement(rec, outcome, reason, target).await,
                Err(e) if e.is_already_exists() => continue,
                Err(FsError::Vanished { .. }) => {
                    self.shared
                        .journal
                        .close_vanished(rec.id, "vanished from staging before it was placed".into())
                        .await
                        .ok();
                    return Step::Done;
                }
                Err(e @ (FsError::HardLinked { .. } | FsError::NotRegular { .. })) => {
                    // Only across filesystems: a hard link (or a symlink that slipped in) cannot
                    // be copied without reading what it points to, outside the inbox. Its name
                    // is dropped from staging instead (the data lives on through its other
                    // link; a symlink is only a name) and the sidecar says so.
                    return self.drop_unplaceable(rec, target, &e).await;
                }
                Err(e) => {
                    self.shared
                        .metrics
                        .place_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Step::Retry(format!(
                        "cannot place {} into {}: {e}",
                        rec.rel_path.display(),
                        dest_root.display()
                    ));
                }
            }
        }
        Step::Retry("no free destination name after 16 tries".into())
    }

    async fn drop_unplaceable(&self, rec: FileRecord, target: PathBuf, e: &FsError) -> Step {
        let staged = rec.staged.clone();
        let removed = blocking(move || {
            std::fs::remove_file(&staged).map_err(|source| FsError::Io {
                path: staged.clone(),
                about: "remove",
                source,
            })?;
            fsops::fsync_dir(staged.parent().unwrap_or(Path::new("/")))
        })
        .await;
        if let Err(err) = removed {
            return Step::Retry(err.to_string());
        }
        tracing::warn!(path = %rec.rel_path.display(), error = %e, "not copied across filesystems; only its sidecar is written");
        let reason = format!(
            "{e}; the destination is on another filesystem, so only this note was placed and the link was removed from staging (what it points to is untouched)"
        );
        self.finish_placement(rec, Outcome::Failed, Some(reason), target)
            .await
    }

    /// Whether the staged file still has the stamp it was hashed with.
    async fn unchanged(&self, rec: &FileRecord) -> bool {
        let Some(stamp) = rec.stamp else { return false };
        let staged = rec.staged.clone();
        match blocking(move || fsops::lstamp(&staged)).await {
            Ok(now) => {
                now.size == stamp.size
                    && i64::try_from(now.mtime_ns).ok() == Some(stamp.mtime_ns)
                    && i64::try_from(now.ctime_ns).ok() == Some(stamp.ctime_ns)
                    && now.ino == stamp.ino
            }
            Err(_) => false,
        }
    }

    /// The file changed after hashing: never release it on the old verdict.
    async fn rescan(&self, rec: FileRecord) -> Step {
        tracing::warn!(id = rec.id, path = %rec.rel_path.display(), "file changed after it was hashed: scanning it again");
        if let Err(e) = self.shared.journal.rehash(rec.id).await {
            return Step::Retry(format!("journal write failed: {e}"));
        }
        // The old scan's result is of no use any more: delete it on the server.
        if let (false, Some(old)) = (rec.reused, rec.scan_id.clone()) {
            self.shared.journal.stale_scan(old).await.ok();
        }
        match claim::hash_record(&self.shared, rec.id, rec.staged.clone()).await {
            Hashed::Ready(c) => self.resubmit.push(c),
            Hashed::Decided(_) => {
                // Decided again without a scan (reused verdict or failure): the sweep places it.
            }
            Hashed::Waiting | Hashed::Gone => {}
        }
        Step::Done
    }

    async fn finish_placement(
        &self,
        rec: FileRecord,
        outcome: Outcome,
        reason: Option<String>,
        dest: PathBuf,
    ) -> Step {
        if outcome != Outcome::Clean {
            let sidecar = Sidecar {
                original_path: rec.root.join(&rec.rel_path).display().to_string(),
                size: rec.stamp.map(|s| s.size),
                sha256: rec.sha256.map(|s| hex(&s)),
                outcome: outcome.as_str(),
                verdict: rec.verdict.as_deref(),
                reason: reason.as_deref(),
                scan_ids: &rec.scan_ids,
                verdict_reused: rec.reused,
                dropped_at: rec.dropped_at_ms.map(rfc3339),
                claimed_at: rfc3339(rec.claimed_at_ms),
                placed_at: rfc3339(now_ms()),
            };
            let bytes = serde_json::to_vec_pretty(&sidecar).unwrap_or_default();
            let path = fsops::sidecar_path(&dest);
            let mode = if outcome == Outcome::Quarantine {
                0o600
            } else {
                0o644
            };
            if let Err(e) = blocking(move || fsops::write_atomic(&path, &bytes, mode)).await {
                // The file is placed; a missing sidecar is retried, never a reason to move again.
                return Step::Retry(format!("cannot write the sidecar: {e}"));
            }
        }
        if let Err(e) = self.shared.journal.placed(rec.id).await {
            return Step::Retry(format!("journal write failed: {e}"));
        }
        // From the moment the drop was complete (its last change in the inbox) to placement.
        let since = rec
            .dropped_at_ms
            .unwrap_or(rec.claimed_at_ms)
            .min(rec.claimed_at_ms);
        let latency = u64::try_from(now_ms().saturating_sub(since)).unwrap_or(0);
        self.shared.metrics.placed(outcome, latency);
        tracing::info!(
            path = %rec.rel_path.display(),
            size = rec.stamp.map_or(0, |s| s.size),
            sha256 = %rec.sha256.map(|s| hex(&s)).unwrap_or_default(),
            outcome = outcome.as_str(),
            verdict = rec.verdict.as_deref().unwrap_or("-"),
            reason = reason.as_deref().unwrap_or("-"),
            reused = rec.reused,
            elapsed_ms = latency,
            dest = %dest.display(),
            "placed"
        );
        self.shared
            .events
            .send(Placement {
                root: rec.root.clone(),
                rel_path: rec.rel_path.clone(),
                outcome,
                dest,
                reason,
            })
            .ok();
        let mut rec = rec;
        rec.state = FileState::Placed;
        self.delete_result(&rec).await
    }

    /// Deletes the scan's result on the server, then closes the record.
    async fn delete_result(&self, rec: &FileRecord) -> Step {
        // A reused verdict's result belongs to the record that was scanned.
        if !rec.reused {
            if let Some(scan_id) = rec.scan_id.as_deref().and_then(|s| ScanId::parse(s).ok()) {
                self.shared.limits.rate().await;
                if let Err(e) = self.shared.client.delete(&scan_id).await {
                    return Step::Retry(format!(
                        "cannot delete result {scan_id} on the server: {e}"
                    ));
                }
            }
        }
        match self.shared.journal.done(rec.id).await {
            Ok(()) => Step::Done,
            Err(e) => Step::Retry(format!("journal write failed: {e}")),
        }
    }
}

async fn exists(p: &Path) -> bool {
    tokio::fs::symlink_metadata(p).await.is_ok()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, FsError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(FsError::Io {
            path: PathBuf::new(),
            about: "blocking task",
            source: std::io::Error::other(e.to_string()),
        }),
    }
}
