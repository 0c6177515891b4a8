//! Upload: hashed files → KATA, within the limits.
//!
//! For each file: wait while the server is paused (backoff, 401), take an in-flight slot, check
//! the server's maximum object size, wait for the rate limiter, journal a fresh scanId
//! (`submitting`), then stream the file. The client returns the SHA-256 of the bytes it actually
//! sent; if that differs from the journaled hash the file changed under us and is hashed again,
//! so that a verdict always belongs to the exact bytes recorded. An accepted scan carries its slot
//! to the poller, which frees it when the verdict is final.
//!
//! What the answer to one upload means (accepted, changed, refused, retry later) is decided
//! without I/O by `answer` (tested with tables); `Upload::submit` acts on it.
//!
//! Files come from the claim stage (`claimed_rx`) and from the [`Resubmit`] queue: scans that
//! ended in `error`/`timeout`, submissions refused with 429/5xx, and files found waiting at
//! start-up. The queue is the only edge that points backwards in the pipeline, so it is not a
//! bounded channel (a full channel there could deadlock the loop); it holds at most the files in
//! flight plus those found at start-up. A periodic sweep of the journal also re-queues any
//! `hashed` record this stage does not know about (e.g. a twin that took over after its primary
//! failed), so no hand-off can be lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::context::Shared;
use crate::error::{FatalError, FileError};
use crate::hashing;
use crate::journal::{Decision, FileId, FileRecord, FileState, JournalError};
use crate::limits::InFlight;
use crate::pipeline::{Claimed, Content, Hashed, Resubmit, Submitted};
use crate::pipeline::{Verdict, decide_then_announce};
use crate::scanner::{ApiError, ScanId, Sent, UploadDisposition, UploadSource};

/// Capacity of upload → poll. The poller only files these away, so it is rarely full.
pub(crate) const SUBMITTED_CAPACITY: usize = 1024;
/// How often the journal is swept for `hashed` records nobody holds.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// POSTs on the wire at once, at most (each needs a connection of its own). The in-flight limit
/// counts scans until their verdict, and may be thousands; without this cap a burst of hashed
/// files (a claim batch's small files arrive together, issue 20) opened a TLS connection per
/// file of the burst: 513 handshakes for 5,000 files instead of 20.
const POSTS_AT_ONCE: usize = 32;

/// What this stage reads.
pub(crate) struct Inputs {
    /// Hashed files, from claim.
    pub claimed_rx: mpsc::Receiver<Claimed>,
    /// Files to submit again (poller, sorter, own sweep).
    pub resubmit: Resubmit,
}

/// What this stage writes.
pub(crate) struct Outputs {
    /// Accepted scans, to the poller.
    pub submitted_tx: mpsc::Sender<Submitted>,
    /// Files decided without a verdict (too large, rejected), to the sorter.
    pub verdicts_tx: mpsc::Sender<Verdict>,
}

/// Runs the upload stage until shutdown; in-flight uploads get `shutdown_grace` to finish.
pub(crate) async fn run(
    ctx: Arc<Shared>,
    inputs: Inputs,
    outputs: Outputs,
    shutdown: CancellationToken,
) -> Result<(), FatalError> {
    let shared = ctx;
    let Inputs {
        mut claimed_rx,
        resubmit,
    } = inputs;
    let Outputs {
        submitted_tx,
        verdicts_tx,
    } = outputs;
    let mut uploads: JoinSet<()> = JoinSet::new();
    let posting = Arc::new(tokio::sync::Semaphore::new(POSTS_AT_ONCE));
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    // `hashed` records seen by the previous sweep (see `sweep_strays`).
    let mut strays: HashSet<FileId> = HashSet::new();
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The capacity learned by an earlier run, before the first slot is taken; the tuner then
    // logs the binding limit and keeps the snapshot in the journal.
    shared.limits.start(&shared.journal, &shutdown).await;
    loop {
        shared.limits.gate(&shutdown).await;
        let slot = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            slot = shared.limits.acquire() => slot,
        };
        let next = loop {
            if let Some(c) = resubmit.pop() {
                break Some(c);
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break None,
                () = resubmit.notified() => {}
                c = claimed_rx.recv() => match c {
                    Some(c) => if resubmit.start(c.id) { break Some(c) },
                    None => break None,
                },
                _ = sweep.tick() => sweep_strays(&shared, &resubmit, &mut strays).await,
                Some(_) = uploads.join_next(), if !uploads.is_empty() => {}
            }
        };
        let Some(item) = next else { break };
        if let (Some(max), Content::Hashed(_)) = (shared.limits.max_object_size(), &item.content) {
            // A file not owned yet is owned first (`tee`), then judged here.
            if item.stamp.size > max {
                let reason = FileError::TooLarge {
                    size: item.stamp.size,
                    max,
                };
                resubmit.finish(item.id);
                decide(&shared, &verdicts_tx, item.id, reason.decision(true)).await;
                continue;
            }
        }
        let task = Upload {
            shared: Arc::clone(&shared),
            resubmit: resubmit.clone(),
            submitted_tx: submitted_tx.clone(),
            verdicts_tx: verdicts_tx.clone(),
            posting: Arc::clone(&posting),
        };
        spawn_reaping(&mut uploads, task.run(item, slot));
    }
    // Shutdown: let uploads in progress finish within the grace time, then abandon them. That is
    // safe: the journal says `submitting(scanId)` and the next start asks the server about it.
    let grace = shared.config.state.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        while uploads.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            abandoned = uploads.len(),
            "uploads abandoned at shutdown; they resume at the next start"
        );
        uploads.abort_all();
    }
    shared.limits.finish(&shared.journal).await;
    Ok(())
}

/// Spawns `upload` into `uploads` after taking out the uploads that have finished.
///
/// A finished task stays in its `JoinSet`, its whole future's memory with it (about 2 KiB per
/// upload), until it is joined, and the stage's loop joins only while it waits for the next
/// file: under a steady backlog it never waits, so every upload since the start stayed (issue
/// 20: `many` kept 88 MB of them at 43,000 files). Bounded by design: the set holds only the
/// uploads in progress, each holding an in-flight slot, so at most the in-flight limit.
fn spawn_reaping(
    uploads: &mut JoinSet<()>,
    upload: impl std::future::Future<Output = ()> + Send + 'static,
) {
    // A panicked upload's record stays as journaled; the sweep finds it.
    while uploads.try_join_next().is_some() {}
    uploads.spawn(upload);
}

/// Re-queues `hashed` records that no stage holds (the queue ignores those it holds). A record is
/// re-queued only when the previous sweep, `SWEEP_EVERY` ago on the monotonic clock, saw it
/// `hashed` too: one just hashed is probably still on its way through the claim → upload channel.
/// (`strays` carries the ids seen from one sweep to the next; the journal's wall-clock
/// `updated_at` is not used, so a clock jump cannot make every record look stale or fresh.)
async fn sweep_strays(shared: &Shared, resubmit: &Resubmit, strays: &mut HashSet<FileId>) {
    match shared.journal.promote_orphaned_waiting().await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(
            files = n,
            "identical files whose twin left: submitted on their own"
        ),
        Err(e) => tracing::warn!(error = %e, "journal sweep failed"),
    }
    let Ok(records) = shared.journal.in_states(&[FileState::Hashed]).await else {
        return;
    };
    let seen_before = std::mem::take(strays);
    for r in records {
        strays.insert(r.id);
        if !seen_before.contains(&r.id) {
            continue; // Probably still on its way through the claim → upload channel.
        }
        if let Some(c) = Claimed::from_record(&r).filter(|c| shared.serves(&c.staged)) {
            resubmit.push(c);
        }
    }
}

async fn decide(shared: &Shared, verdicts_tx: &mpsc::Sender<Verdict>, id: FileId, d: Decision) {
    if let Err(e) = decide_then_announce(&shared.journal, verdicts_tx, vec![(id, d)]).await {
        tracing::error!(id, error = %e, "journal write failed; decision retried later");
    }
}

/// One upload and its consequences.
struct Upload {
    shared: Arc<Shared>,
    resubmit: Resubmit,
    submitted_tx: mpsc::Sender<Submitted>,
    verdicts_tx: mpsc::Sender<Verdict>,
    /// Permits for a POST on the wire ([`POSTS_AT_ONCE`]).
    posting: Arc<tokio::sync::Semaphore>,
}

impl Upload {
    async fn run(self, item: Claimed, slot: InFlight) {
        let id = item.id;
        let again = self.submit(item, slot).await;
        self.resubmit.finish(id);
        if let Some(c) = again {
            self.resubmit.push(c);
        }
    }

    /// Uploads one file; returns it when it must be queued again.
    async fn submit(&self, item: Claimed, slot: InFlight) -> Option<Claimed> {
        let shared = &self.shared;
        if !shared.serves(&item.staged) {
            tracing::debug!(
                id = item.id,
                "staged under a watch not served now: left as it is"
            );
            return None;
        }
        let sha256 = match &item.content {
            Content::Hashed(sha256) => *sha256,
            Content::Tee(scan_id) => {
                let scan_id = scan_id.clone();
                return self.tee(item, scan_id, slot).await;
            }
        };
        let scan_id = ScanId::generate();
        // The scan's id is journaled before a byte is sent (the scanner seam's contract).
        if let Err(e) = shared.journal.submitting(item.id, scan_id.clone()).await {
            if matches!(e, crate::journal::JournalError::Conflict { .. }) {
                // A stale copy of a record that moved on meanwhile: nothing to do.
                tracing::debug!(id = item.id, error = %e, "skipped a stale upload request");
                return None;
            }
            tracing::error!(id = item.id, error = %e, "journal write failed before upload; retrying later");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Some(item);
        }
        let file = match open_for_upload(&self.shared, &item).await {
            Ok(f) => f,
            Err(why) => {
                tracing::info!(id = item.id, reason = %why, "staged file changed or unreadable: hashing again");
                return self.rehash(item.id, item.staged.clone()).await;
            }
        };
        // Never closed: the stage holds it for its whole life.
        let posting = Arc::clone(&self.posting).acquire_owned().await.ok();
        shared.limits.rate().await;
        let span = tracing::info_span!("upload", id = item.id, scan_id = %scan_id);
        let result = tracing::Instrument::instrument(
            shared.scanner.submit(&scan_id, file, item.stamp.size),
            span,
        )
        .await;
        drop(posting);
        match answer(&result, &sha256, item.stamp.size) {
            Answer::Accepted { bytes } => {
                let committed = shared.journal.submitted_record(item.id).await;
                let scan = Accepted {
                    id: item.id,
                    sha256,
                    scan_id,
                    bytes,
                };
                self.accepted(scan, slot, committed).await;
                None
            }
            Answer::Changed => {
                // The server scanned bytes we did not hash: its verdict must not be used. The
                // journal's `rehash` queues this scanId for deletion in the same transaction.
                tracing::warn!(id = item.id, "file changed during upload: hashing again");
                self.rehash(item.id, item.staged.clone()).await
            }
            Answer::Rehash => {
                if let Err(e) = &result {
                    tracing::info!(id = item.id, error = %e, "reading the staged file failed: hashing again");
                }
                self.rehash(item.id, item.staged.clone()).await
            }
            Answer::Fail { reason, refresh } => {
                if refresh {
                    let limits = shared.limits.clone();
                    let scanner = shared.scanner.clone();
                    tokio::spawn(async move {
                        limits.refresh(&scanner).await.ok();
                    });
                }
                let d = reason.decision(true);
                decide(shared, &self.verdicts_tx, item.id, d).await;
                None
            }
            Answer::RetryLater {
                ambiguous,
                throttled,
            } => {
                let Err(e) = result else { return Some(item) };
                self.retry_later(&e, &item, ambiguous, throttled, slot)
                    .await;
                Some(item)
            }
        }
    }

    /// The scan was accepted for exactly the bytes hashed, and journaled so (`committed`, the
    /// record as committed): hand it to the poller with its slot.
    async fn accepted(
        &self,
        scan: Accepted,
        mut slot: InFlight,
        committed: Result<FileRecord, JournalError>,
    ) {
        let shared = &self.shared;
        let Accepted {
            id,
            sha256,
            scan_id,
            bytes,
        } = scan;
        shared.limits.server_ok();
        shared.limits.accepted(&mut slot);
        let rec = match committed {
            Ok(rec) => Ok(rec),
            Err(e) => {
                // The record says `submitting`: the next start asks the server about it.
                tracing::error!(id, error = %e, "journal write failed after upload");
                shared.journal.get(id).await
            }
        };
        let attempts = rec.as_ref().map_or(1, |r| r.attempts.max(1));
        if let Ok(r) = &rec {
            let dropped = r
                .dropped_at_ms
                .unwrap_or(r.claimed_at_ms)
                .min(r.claimed_at_ms);
            let ms = crate::journal::now_ms().saturating_sub(dropped);
            shared
                .metrics
                .observe_submitted(Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
            // With a long poll interval nothing else is said until the verdict.
            tracing::info!(
                path = %crate::fsops::shown(&r.rel_path),
                scan_id = %scan_id,
                "submitted; next results request in {}",
                humantime::format_duration(shared.config.server.poll_interval)
            );
        }
        shared.metrics.submitted.fetch_add(1, Ordering::Relaxed);
        shared
            .metrics
            .uploaded_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        tracing::debug!(id, scan_id = %scan_id, "submitted");
        self.submitted_tx
            .send(Submitted {
                id,
                scan_id,
                sha256,
                attempts,
                submitted_at: tokio::time::Instant::now(),
                slot,
            })
            .await
            .ok();
    }

    /// 429, 5xx, transport, TLS, 401, garbage: the file waits and is tried again; when the
    /// server may have taken the scan (`ambiguous`), its scanId is queued for deletion.
    async fn retry_later(
        &self,
        e: &ApiError,
        item: &Claimed,
        ambiguous: bool,
        throttled: bool,
        slot: InFlight,
    ) {
        let shared = &self.shared;
        self.not_accepted(e, item.id, throttled, &slot).await;
        let back = if ambiguous {
            // `resend` queues the scanId for deletion in the same transaction that sends the
            // file back, so a scan the server took is never left behind.
            shared.journal.resend(item.id).await
        } else {
            shared.journal.not_submitted(item.id).await
        };
        if let Err(e) = back {
            // The record still says `submitting(scanId)`: the next start asks the server.
            tracing::error!(id = item.id, error = %e, "journal write failed");
        }
        drop(slot);
    }

    /// What the server's refusal of an upload that is tried again tells: counted, the in-flight
    /// cap told of a 429, and the server paused as its errors ask.
    async fn not_accepted(&self, e: &ApiError, id: FileId, throttled: bool, slot: &InFlight) {
        let shared = &self.shared;
        shared
            .metrics
            .request_errors
            .fetch_add(1, Ordering::Relaxed);
        if throttled {
            shared.metrics.throttled.fetch_add(1, Ordering::Relaxed);
            // The server's concurrency limit: the in-flight cap learns from it.
            shared.limits.throttled(slot);
        }
        let pause = shared.server_failed(e).await;
        tracing::debug!(id, error = %e, ?pause, "upload not accepted; will retry");
    }

    /// The staged file changed: hash again and route the result.
    async fn rehash(&self, id: FileId, staged: std::path::PathBuf) -> Option<Claimed> {
        if let Err(e) = self.shared.journal.rehash(id).await {
            tracing::error!(id, error = %e, "journal write failed");
            return None;
        }
        self.routed(hashing::hash_record(&self.shared, id, staged, false).await)
            .await
    }

    /// Where a hash sends the file: back to the queue when it is to be uploaded.
    async fn routed(&self, hashed: Hashed) -> Option<Claimed> {
        match hashed {
            Hashed::Ready(c) => Some(c),
            Hashed::Decided(ids) => {
                for id in ids {
                    self.verdicts_tx.send(Verdict::of(id)).await.ok();
                }
                None
            }
            Hashed::Waiting | Hashed::Gone => None,
        }
    }
}

/// A scan the server accepted for exactly the bytes hashed.
struct Accepted {
    id: FileId,
    sha256: [u8; 32],
    scan_id: ScanId,
    bytes: u64,
}

/// Why the staged file could not be opened for upload.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    /// Not beneath its root any more, changed since it was hashed, or unreadable.
    #[error(transparent)]
    Fs(#[from] crate::fsops::FsError),
}

/// Opens the staged file (beneath its root, never through a link) and checks it is still what
/// was hashed. A small file is read in the same blocking call
/// ([`UploadSource::read_small`]): one hop to the blocking pool per upload instead of three
/// (open, read, end-of-file check). The body still hashes what it sends, so the verdict is
/// still tied to the bytes uploaded.
async fn open_for_upload(shared: &Arc<Shared>, item: &Claimed) -> Result<UploadSource, OpenError> {
    let (sh, staged, expected) = (Arc::clone(shared), item.staged.clone(), item.stamp);
    let source = crate::fsops::blocking(move || {
        let file = sh.open_staged(&staged, &expected)?;
        UploadSource::read_small(file, expected.size)
            .map_err(|e| crate::fsops::FsError::io(&staged, "read the staged file", e))
    })
    .await?;
    Ok(source)
}

/// What the answer to one upload means for the file (the uploader's decision core).
#[derive(Debug)]
enum Answer {
    /// Accepted for exactly the bytes hashed (`bytes` sent).
    Accepted {
        /// File bytes sent.
        bytes: u64,
    },
    /// Accepted, but the bytes sent are not those hashed: hash again, never use the verdict.
    Changed,
    /// Reading the staged file failed: hash again.
    Rehash,
    /// Refused for good: the file fails; after a 413 the restrictions are asked again.
    Fail {
        /// Why.
        reason: FileError,
        /// Ask the server's restrictions again.
        refresh: bool,
    },
    /// Not accepted now: the file waits and is sent again under a new scanId.
    RetryLater {
        /// The server may have taken the scan: its scanId is deleted.
        ambiguous: bool,
        /// 429: the server's concurrency limit, which the in-flight cap learns from.
        throttled: bool,
    },
}

/// Judges the answer to uploading `size` bytes hashed as `sha256`.
fn answer(result: &Result<Sent, ApiError>, sha256: &[u8; 32], size: u64) -> Answer {
    let e = match result {
        Ok(sent) if sent.sha256 == Some(*sha256) && sent.bytes == size => {
            return Answer::Accepted { bytes: sent.bytes };
        }
        Ok(_) => return Answer::Changed,
        Err(e) => e,
    };
    match e.upload_disposition() {
        UploadDisposition::TooLarge => Answer::Fail {
            reason: FileError::RefusedTooLarge { size },
            refresh: true,
        },
        UploadDisposition::Rehash => Answer::Rehash,
        UploadDisposition::Rejected => {
            let (status, body) = match e {
                ApiError::Rejected { status, body } => (*status, body.clone()),
                _ => (0, String::new()),
            };
            Answer::Fail {
                reason: FileError::Rejected { status, body },
                refresh: false,
            }
        }
        UploadDisposition::RetryLater { ambiguous } => Answer::RetryLater {
            ambiguous,
            throttled: matches!(e, ApiError::Busy { .. }),
        },
    }
}

mod tee;
#[cfg(test)]
mod tests;
