//! The tee (issue 20): a big file is owned while it is uploaded, in one pass over its bytes.
//!
//! A big file just claimed is not owned by the claim stage: its record goes `claimed` →
//! `submitting` with a scanId and no hash ([`crate::journal::Journal::teeing`]), and it waits
//! here for an upload slot. Then one blocking thread owns it ([`fsops::own::own_teeing`]: the
//! read lease, the private copy, the hash, as for any file) and hands every piece it copies to
//! the upload body ([`Tee`]), which streams it to the server while the copy goes on. The body
//! hashes what it sends, as for any upload.
//!
//! Only when both ended well, the copy made durable and the staged file, and the server accepted
//! the scan for exactly the bytes the copy holds (same SHA-256, same length), is the hash
//! journaled, together with the acceptance ([`crate::journal::Journal::teed`]). Anything else
//! unties the record ([`crate::journal::Journal::untee`]: back to `claimed`, the scan queued for
//! deletion on the server in the same transaction), and the file goes the usual way: owned on
//! its own (if the copy did not end), then uploaded again. A file still written, unreadable or
//! hard-linked ends as its owning says ([`hashing::journal_owned`]).
//!
//! Crash rules: a record found `submitting` with no hash at start-up is untied the same way, and
//! its staged file is repaired and owned again as for any `claimed` record (`fsops::own::repair`).
//! So the server's verdict is never used for bytes not owned, and the copy never released
//! without a verdict for its own hash.
//!
//! What the tee gives up: identical files in flight share one scan, and a recent verdict is
//! reused, only for files owned before their upload; a big file is always scanned.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::{Accepted, Upload};
use crate::fsops::FsError;
use crate::fsops::own::{Owned, Owning, Sink};
use crate::hashing;
use crate::limits::InFlight;
use crate::pipeline::Claimed;
use crate::scanner::{ApiError, ScanId, Sent, Tee, UploadDisposition, UploadSource};

/// How long the copying thread waits for room in the tee before it asks again whether the lease
/// is breaking: a writer opening the file waits at most about this long for the copy to let go.
const ASK_LEASE_EVERY: Duration = Duration::from_millis(50);

impl Upload {
    /// Owns and uploads a file not owned yet, under the scan its record was given when claimed;
    /// returns it (owned) when it must be queued again. See the module docs.
    pub(super) async fn tee(
        &self,
        item: Claimed,
        scan_id: ScanId,
        slot: InFlight,
    ) -> Option<Claimed> {
        let shared = &self.shared;
        let (tx, source) = Tee::new();
        let gone = Arc::new(AtomicBool::new(false));
        let sink = sink(tx, Arc::clone(&gone));
        // Never closed: the stage holds it for its whole life.
        let posting = Arc::clone(&self.posting).acquire_owned().await.ok();
        shared.limits.rate().await;
        // Started only now: the copying thread holds the lease while it waits for the body.
        let owning = hashing::own_teeing(shared, &item.staged, sink);
        let span = tracing::info_span!("upload", id = item.id, scan_id = %scan_id, tee = true);
        let sending = tracing::Instrument::instrument(
            shared
                .scanner
                .submit(&scan_id, UploadSource::Tee(source), item.stamp.size),
            span,
        );
        let (owned, result) = tokio::join!(owning, sending);
        drop(posting);
        if let (Ok(o), Ok(sent)) = (&owned, &result) {
            if sent.sha256.is_none_or(|s| s == o.sha256) && sent.bytes == o.stamp.size {
                self.teed(&item, scan_id, o, sent.bytes, slot).await;
                return None;
            }
        }
        self.untied(&item, &owned, &result, &gone, slot).await;
        if self.untee(item.id).await.is_err() {
            return None;
        }
        match owned {
            // The copy ended: the file is owned (whatever became of the upload) and journaled
            // as any owning is, then uploaded again if it is to be.
            Ok(o) => self.routed_owned(&item, Ok(o)).await,
            // The upload ended first and the copy stopped for it, or the one try a tee has saw
            // the file's attributes move: owned again on its own, as after a restart.
            Err(_) if gone.load(Ordering::Relaxed) => self.owned_again(&item).await,
            Err(Owning::Failed(FsError::Changed { .. })) => self.owned_again(&item).await,
            // Still written, unreadable, hard-linked, no room: as its owning says.
            Err(e) => self.routed_owned(&item, Err(e)).await,
        }
    }

    /// Both ended well: the hash and the acceptance are journaled in one transaction, and the
    /// scan goes to the poller.
    async fn teed(&self, item: &Claimed, scan_id: ScanId, o: &Owned, bytes: u64, slot: InFlight) {
        let shared = &self.shared;
        if let Some(kept) = &o.kept {
            let orig = item.staged.with_file_name(&kept.name);
            // Not journaled (disk full): start-up finds the `X.orig` and keeps it from then on.
            if let Err(e) = shared.journal.retain(item.id, orig, kept.stamp).await {
                tracing::warn!(id = item.id, error = %e, "could not journal the kept original");
            }
        }
        count_hashed(shared, o);
        if let Some(root) = shared.roots.by_staged(&item.staged) {
            tracing::debug!(id = item.id, root = %crate::fsops::shown(root.path()), size = o.stamp.size, "owned while uploaded");
        }
        let committed = shared
            .journal
            .teed(item.id, scan_id.clone(), o.sha256, o.stamp)
            .await;
        let scan = Accepted {
            id: item.id,
            sha256: o.sha256,
            scan_id,
            bytes,
        };
        self.accepted(scan, slot, committed).await;
    }

    /// What the server's answer tells when the tee did not end well (logged, counted, and the
    /// server paused or the in-flight cap told as for any upload).
    async fn untied(
        &self,
        item: &Claimed,
        owned: &Result<Owned, Owning>,
        result: &Result<Sent, ApiError>,
        gone: &AtomicBool,
        slot: InFlight,
    ) {
        let shared = &self.shared;
        let why = match (owned, result) {
            (Err(Owning::StillWritten), _) => "still written".to_string(),
            (Err(Owning::Failed(e)), _) if !gone.load(Ordering::Relaxed) => e.to_string(),
            (_, Err(e)) => e.to_string(),
            (_, Ok(_)) => "the server received other bytes than the copy holds".to_string(),
        };
        tracing::info!(id = item.id, reason = %why, "owned while uploaded: not accepted for the bytes owned; the scan is deleted and the file goes the usual way");
        if let Err(e) = result {
            match e.upload_disposition() {
                UploadDisposition::RetryLater { .. } => {
                    let throttled = matches!(e, ApiError::Busy { .. });
                    self.not_accepted(e, item.id, throttled, &slot).await;
                }
                // The server's size limit changed: asked again, as after any 413.
                UploadDisposition::TooLarge => {
                    let (limits, scanner) = (shared.limits.clone(), shared.scanner.clone());
                    tokio::spawn(async move {
                        limits.refresh(&scanner).await.ok();
                    });
                }
                UploadDisposition::Rehash | UploadDisposition::Rejected => {}
            }
        }
        drop(slot);
    }

    /// Back to `claimed`, the scan queued for deletion; an error is logged (the record stays a
    /// tee, untied at the next start).
    async fn untee(&self, id: crate::journal::FileId) -> Result<(), ()> {
        self.shared.journal.untee(id).await.map_err(|e| {
            tracing::error!(id, error = %e, "journal write failed; the file is owned again at the next start");
        })
    }

    /// Journals an owning's result for a record just untied, and routes it.
    async fn routed_owned(&self, item: &Claimed, owned: Result<Owned, Owning>) -> Option<Claimed> {
        let staged = item.staged.clone();
        self.routed(hashing::journal_owned(&self.shared, item.id, staged, owned).await)
            .await
    }

    /// Owns a record just untied on its own, and routes it.
    async fn owned_again(&self, item: &Claimed) -> Option<Claimed> {
        let staged = item.staged.clone();
        self.routed(hashing::hash_record(&self.shared, item.id, staged, false).await)
            .await
    }
}

/// Counts a file hashed by a tee, as the claim stage counts the others.
fn count_hashed(shared: &crate::context::Shared, o: &Owned) {
    shared.metrics.hashed.fetch_add(1, Ordering::Relaxed);
    shared
        .metrics
        .hashed_bytes
        .fetch_add(o.stamp.size, Ordering::Relaxed);
}

/// The copying thread's end of a tee: each piece waits for room in the tee, asking every
/// [`ASK_LEASE_EVERY`] whether the lease is breaking; `gone` is set when the upload ended
/// first (the body dropped).
fn sink(tx: tokio::sync::mpsc::Sender<Bytes>, gone: Arc<AtomicBool>) -> Sink<'static> {
    let runtime = tokio::runtime::Handle::current();
    Box::new(move |piece, breaking| {
        loop {
            match runtime.block_on(tokio::time::timeout(ASK_LEASE_EVERY, tx.reserve())) {
                Ok(Ok(room)) => {
                    room.send(Bytes::copy_from_slice(piece));
                    return Ok(());
                }
                Ok(Err(_)) => {
                    gone.store(true, Ordering::Relaxed);
                    return Err(std::io::Error::other("the upload ended"));
                }
                Err(_) if breaking() => return Err(std::io::ErrorKind::WouldBlock.into()),
                Err(_) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_whose_upload_ended_says_so_and_stops_the_copy() {
        let (tx, tee) = Tee::new();
        let gone = Arc::new(AtomicBool::new(false));
        let mut sink = sink(tx, Arc::clone(&gone));
        drop(tee);
        let sent = tokio::task::spawn_blocking(move || sink(b"piece", &|| false))
            .await
            .unwrap();
        assert!(sent.is_err());
        assert_ne!(sent.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        assert!(gone.load(Ordering::Relaxed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_waiting_for_room_lets_go_when_the_lease_breaks() {
        let (tx, _tee) = Tee::new();
        let gone = Arc::new(AtomicBool::new(false));
        let mut sink = sink(tx, Arc::clone(&gone));
        let stopped = tokio::task::spawn_blocking(move || {
            // The body reads nothing: the tee fills, then the sink waits for room.
            for _ in 0..Tee::PIECES {
                sink(b"piece", &|| false).unwrap();
            }
            sink(b"piece", &|| true)
        })
        .await
        .unwrap();
        assert_eq!(stopped.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        assert!(!gone.load(Ordering::Relaxed));
    }
}
