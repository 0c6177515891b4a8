//! Results poller: one `GET scans/state` per tick for every scan in flight, never one per file.
//!
//! Final states are journaled in one transaction per tick, then handed to the sorter:
//! `not detected` → clean (bound to the SHA-256 of the bytes uploaded), `detect` → quarantine,
//! `error`/`timeout` → submitted again under a new scanId until `max_attempts`, then failed. A scan
//! without a final answer after `scan_timeout` fails. Results that are no longer needed (retried
//! or timed-out scans) are deleted on the server here; results of placed files are deleted by the
//! sorter once the file is in place.
//!
//! At start-up the poller also settles scans the journal left `submitting` (the process died
//! while the POST was in flight): a scan the server knows in any state is adopted as submitted,
//! never sent again; one it does not know after a successful poll was never accepted and goes back
//! to the uploader.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::claim::Claimed;
use crate::journal::{Decision, FileId, FileRecord, Outcome, now_ms};
use crate::kata::{ScanId, ScanState};
use crate::limits::InFlight;
use crate::sort::Verdict;
use crate::upload::{Resubmit, Submitted};

/// Stale results deleted per tick at most.
const STALE_DELETES_PER_TICK: usize = 100;

struct Entry {
    id: FileId,
    sha256: [u8; 32],
    attempts: u32,
    submitted_at_ms: i64,
    _slot: InFlight,
}

/// Runs the poller until shutdown. `submitted` and `unconfirmed` come from the journal at start-up
/// (`submitted` and `submitting` records).
pub async fn run(
    shared: Arc<Shared>,
    mut submitted_rx: mpsc::Receiver<Submitted>,
    resubmit: Resubmit,
    verdicts_tx: mpsc::Sender<Verdict>,
    submitted: Vec<FileRecord>,
    unconfirmed: Vec<FileRecord>,
    shutdown: CancellationToken,
) {
    let mut scans: HashMap<String, Entry> = HashMap::new();
    for r in submitted {
        if let (Some(scan_id), Some(sha256)) = (r.scan_id, r.sha256) {
            shared.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
            scans.insert(
                scan_id,
                Entry {
                    id: r.id,
                    sha256,
                    attempts: r.attempts.max(1),
                    submitted_at_ms: r.submitted_at_ms.unwrap_or_else(now_ms),
                    _slot: shared.limits.adopt(),
                },
            );
        }
    }
    let mut unconfirmed: HashMap<String, FileRecord> = unconfirmed
        .into_iter()
        .filter_map(|r| r.scan_id.clone().map(|s| (s, r)))
        .collect();
    let mut tick = tokio::time::interval(shared.config.server.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poller = Poller {
        shared: &shared,
        resubmit: &resubmit,
        verdicts_tx: &verdicts_tx,
        down_since_ms: None,
    };
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            s = submitted_rx.recv() => match s {
                Some(s) => {
                    scans.insert(s.scan_id.as_str().to_string(), Entry {
                        id: s.id,
                        sha256: s.sha256,
                        attempts: s.attempts,
                        submitted_at_ms: s.submitted_at_ms,
                        _slot: s.slot,
                    });
                }
                None => break,
            },
            _ = tick.tick() => {
                poller.tick(&mut scans, &mut unconfirmed).await;
            }
        }
    }
}

struct Poller<'a> {
    shared: &'a Shared,
    resubmit: &'a Resubmit,
    verdicts_tx: &'a mpsc::Sender<Verdict>,
    /// Since when (ms) the results request has been failing, if it is.
    down_since_ms: Option<i64>,
}

impl Poller<'_> {
    async fn tick(
        &mut self,
        scans: &mut HashMap<String, Entry>,
        unconfirmed: &mut HashMap<String, FileRecord>,
    ) {
        if !scans.is_empty() || !unconfirmed.is_empty() {
            if self.poll(scans, unconfirmed).await {
                // The scan clock stops while KATA is unreachable: an outage of hours must not
                // fail the scans that were in flight when it began.
                if let Some(since) = self.down_since_ms.take() {
                    let outage = now_ms().saturating_sub(since);
                    for e in scans.values_mut() {
                        e.submitted_at_ms = e.submitted_at_ms.saturating_add(outage);
                    }
                }
            } else {
                self.down_since_ms.get_or_insert_with(now_ms);
                return;
            }
        }
        self.expire(scans).await;
        self.delete_stale().await;
    }

    /// One results request and its consequences; false when the request failed.
    async fn poll(
        &mut self,
        scans: &mut HashMap<String, Entry>,
        unconfirmed: &mut HashMap<String, FileRecord>,
    ) -> bool {
        let shared = self.shared;
        let mut states = vec![
            ScanState::Detect,
            ScanState::NotDetected,
            ScanState::Timeout,
            ScanState::Error,
        ];
        if !unconfirmed.is_empty() {
            states.push(ScanState::Processing);
        }
        shared.limits.rate().await;
        shared.metrics.polls.fetch_add(1, Ordering::Relaxed);
        let results = match shared.client.results(&states).await {
            Ok(r) => {
                shared.limits.server_ok();
                r
            }
            Err(e) => {
                shared
                    .metrics
                    .request_errors
                    .fetch_add(1, Ordering::Relaxed);
                shared.server_failed(&e).await;
                tracing::debug!(error = %e, "results request failed; retrying next tick");
                return false;
            }
        };
        let mut decisions: Vec<(FileId, Decision)> = Vec::new();
        let mut retries: Vec<(FileId, String, String)> = Vec::new();
        let mut seen_unconfirmed = Vec::new();
        let max_attempts = shared.config.server.max_attempts.get();
        for r in results {
            if let Some(rec) = unconfirmed.remove(&r.scan_id) {
                seen_unconfirmed.push(rec);
            }
            let Some(entry) = scans.get(&r.scan_id) else {
                if !matches!(r.state, ScanState::Processing) {
                    tracing::trace!(scan_id = %r.scan_id, "result for a scan we do not know; ignored");
                }
                continue;
            };
            let verdict = |outcome, state: &str| Decision {
                outcome,
                verdict: Some(state.to_string()),
                verdict_sha256: Some(entry.sha256),
                reason: None,
                propagate: true,
            };
            match &r.state {
                ScanState::NotDetected => {
                    decisions.push((entry.id, verdict(Outcome::Clean, "not detected")));
                }
                ScanState::Detect => {
                    decisions.push((entry.id, verdict(Outcome::Quarantine, "detect")));
                }
                ScanState::Error | ScanState::Timeout => {
                    let what = if r.state == ScanState::Error {
                        "error"
                    } else {
                        "timeout"
                    };
                    if entry.attempts < max_attempts {
                        retries.push((
                            entry.id,
                            r.scan_id.clone(),
                            format!("scan {} ended with {what}; submitted again", r.scan_id),
                        ));
                    } else {
                        decisions.push((
                            entry.id,
                            Decision::failed(
                                format!(
                                    "scan ended with {what} on each of {} attempts",
                                    entry.attempts
                                ),
                                true,
                            ),
                        ));
                    }
                }
                ScanState::Processing | ScanState::Unknown(_) => {}
            }
        }
        // Scans found `submitting` at start-up: known to the server → adopt; unknown → resubmit.
        for rec in seen_unconfirmed {
            if let Err(e) = shared.journal.submitted(rec.id).await {
                tracing::error!(id = rec.id, error = %e, "journal write failed");
                continue;
            }
            if let (Some(scan_id), Some(sha256)) = (rec.scan_id.clone(), rec.sha256) {
                tracing::info!(id = rec.id, scan_id = %scan_id, "scan submitted before the restart is known to the server: polling it");
                shared.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
                scans.insert(
                    scan_id,
                    Entry {
                        id: rec.id,
                        sha256,
                        attempts: rec.attempts + 1,
                        submitted_at_ms: rec.submitted_at_ms.unwrap_or_else(now_ms),
                        _slot: shared.limits.adopt(),
                    },
                );
            }
        }
        for (_, rec) in unconfirmed.drain() {
            tracing::info!(
                id = rec.id,
                "scan interrupted by the restart was never accepted: submitting again"
            );
            if shared.journal.not_submitted(rec.id).await.is_ok() {
                self.requeue(&rec);
            }
        }
        for (id, scan_id, note) in retries {
            tracing::info!(id, %scan_id, "{note}");
            match shared.journal.resubmit(id, scan_id.clone(), note).await {
                Ok(()) => {
                    self.finish(scans, &scan_id);
                    if let Ok(rec) = shared.journal.get(id).await {
                        self.requeue(&rec);
                    }
                }
                Err(e) => {
                    tracing::error!(id, error = %e, "journal write failed; retried next tick")
                }
            }
        }
        self.decide(scans, decisions).await;
        true
    }

    fn finish(&self, scans: &mut HashMap<String, Entry>, scan_id: &str) {
        if scans.remove(scan_id).is_some() {
            self.shared
                .metrics
                .in_flight
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn requeue(&self, rec: &FileRecord) {
        if let (Some(sha256), Some(stamp)) = (rec.sha256, rec.stamp) {
            self.resubmit.push(Claimed {
                id: rec.id,
                staged: rec.staged.clone(),
                sha256,
                stamp,
            });
        }
    }

    async fn decide(&self, scans: &mut HashMap<String, Entry>, decisions: Vec<(FileId, Decision)>) {
        if decisions.is_empty() {
            return;
        }
        let ids: Vec<FileId> = decisions.iter().map(|(id, _)| *id).collect();
        match self.shared.journal.decide(decisions).await {
            Ok(decided) => {
                scans.retain(|_, e| !ids.contains(&e.id));
                self.shared
                    .metrics
                    .in_flight
                    .store(i64::try_from(scans.len()).unwrap_or(0), Ordering::Relaxed);
                for id in decided {
                    self.verdicts_tx.send(Verdict { id }).await.ok();
                }
            }
            Err(e) => {
                // Nothing was journaled: the scans stay in flight and the next tick decides again.
                tracing::error!(error = %e, "journal write failed; verdicts applied next tick");
            }
        }
    }

    /// Fails scans that had no final answer within `scan_timeout`.
    async fn expire(&self, scans: &mut HashMap<String, Entry>) {
        let timeout = self.shared.config.server.scan_timeout;
        let limit = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        let expired: Vec<(String, FileId)> = scans
            .iter()
            .filter(|(_, e)| now.saturating_sub(e.submitted_at_ms) > limit)
            .map(|(s, e)| (s.clone(), e.id))
            .collect();
        if expired.is_empty() {
            return;
        }
        let mut decisions = Vec::new();
        for (scan_id, id) in &expired {
            tracing::warn!(id, %scan_id, ?timeout, "no verdict within scan_timeout");
            self.shared.journal.stale_scan(scan_id.clone()).await.ok();
            decisions.push((
                *id,
                Decision::failed(
                    format!(
                        "no verdict within {} (scan {scan_id})",
                        humantime::format_duration(timeout)
                    ),
                    true,
                ),
            ));
        }
        self.decide(scans, decisions).await;
    }

    /// Deletes results nobody needs any more (retried or timed-out scans).
    async fn delete_stale(&self) {
        let shared = self.shared;
        let Ok(stale) = shared.journal.stale_scans().await else {
            return;
        };
        for scan_id in stale.into_iter().take(STALE_DELETES_PER_TICK) {
            let Ok(id) = ScanId::parse(&scan_id) else {
                shared.journal.stale_deleted(scan_id).await.ok();
                continue;
            };
            shared.limits.rate().await;
            match shared.client.delete(&id).await {
                Ok(_) => {
                    shared.journal.stale_deleted(scan_id).await.ok();
                }
                Err(e) => {
                    tracing::debug!(%scan_id, error = %e, "deleting a stale result failed; retried next tick");
                    break;
                }
            }
        }
    }
}
