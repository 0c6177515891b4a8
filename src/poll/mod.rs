//! Results poller: one `GET scans/state` per tick for every scan in flight, never one per file.
//!
//! Final states are journaled in one transaction per tick, then handed to the sorter:
//! `not detected` → clean (bound to the SHA-256 of the bytes uploaded), `detect` → quarantine,
//! `error`/`timeout` → submitted again under a new scanId until `max_attempts`, then failed. A scan
//! without a final answer after `scan_timeout` fails. Results that are no longer needed (retried
//! or timed-out scans) are deleted on the server here; results of placed files are deleted by the
//! sorter once the file is in place.
//!
//! What one answer decides is worked out without I/O by `judge` (tested with
//! tables); `Poller::poll` then journals and announces it.
//!
//! One answer may list a scanId more than once; its entries are folded into one state first, and
//! `detect` wins over anything else (then `error`, `timeout`, `not detected`): a contradicting
//! answer never lets a file through. The journal decides a verdict once; a later answer that
//! contradicts a verdict decided in this process (remembered for [`RECENT_KEEP`]) is handed to it
//! as a server anomaly, which it resolves fail-closed (see the `journal` module).
//!
//! **Released scans stay watched.** The results request goes on, one per tick, while any verdict
//! is remembered (at most [`RECENT_KEEP`] after the last one, at most `RECENT_MAX` scans), not
//! only while scans are in flight: a `detect` that follows the `not detected` a file was released
//! on is caught even when nothing else is scanned. The journal records such a contradiction of a
//! released file as an anomaly; the poller then announces it ([`Journal::announce_anomalies`]:
//! `anomaly` hook events, the `dropscan_verdict_anomalies_total` counter, one ERROR line), and
//! `dropscan anomalies list` shows it. The file is not pulled from clean (see SECURITY.md).
//!
//! **Shutdown** cancels a results request in flight at once: nothing is journaled until its
//! answer is complete, and a server trickling its answer must not hold the agent past the grace.
//!
//! [`Journal::announce_anomalies`]: crate::journal::Journal::announce_anomalies
//!
//! `scan_timeout` counts monotonic time (`tokio::time::Instant`), never the wall clock: a clock
//! jump must not fail (or prolong) the scans in flight. The clock starts when the scan is accepted
//! or, for scans found in the journal at start-up, when they are adopted (they get a full timeout
//! again: fail-safe), and it stops while KATA is unreachable.
//!
//! At start-up the poller also settles scans the journal left `submitting` (the process died
//! while the POST was in flight): a scan the server knows in any state is adopted as submitted,
//! never sent again; one it does not list after a successful poll goes back to the uploader, and
//! its scanId is queued for deletion in the same journal write, since the server may still take
//! it (a scan sent again under a new scanId never leaves the old one behind).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::context::Shared;
use crate::error::{FatalError, FileError};
use crate::journal::{Decision, FileId, FileRecord};
use crate::pipeline::Claimed;
use crate::pipeline::{Resubmit, Submitted};
use crate::pipeline::{Verdict, decide_then_announce};
use crate::scanner::{ScanId, ScanState};

mod judge;
#[cfg(test)]
mod tests;

use judge::{Entry, Recent, ScanClock, judge};

/// Stale results deleted per tick at most.
const STALE_DELETES_PER_TICK: usize = 100;
/// How long a verdict decided here is remembered, to catch a later answer contradicting it;
/// results are requested for that long after the last verdict, even with nothing in flight.
pub(crate) const RECENT_KEEP: Duration = Duration::from_secs(600);
/// Verdicts remembered at most (beyond that, new ones are not remembered).
const RECENT_MAX: usize = 10_000;

/// What this stage reads.
pub(crate) struct Inputs {
    /// Accepted scans, from the uploader.
    pub submitted_rx: mpsc::Receiver<Submitted>,
    /// Records found `submitted` at start-up.
    pub submitted: Vec<FileRecord>,
    /// Records found `submitting` at start-up: asked about, never resent blindly.
    pub unconfirmed: Vec<FileRecord>,
}

/// What this stage writes.
pub(crate) struct Outputs {
    /// Scans to run again (`error`/`timeout`, never accepted).
    pub resubmit: Resubmit,
    /// Decided files, to the sorter.
    pub verdicts_tx: mpsc::Sender<Verdict>,
}

/// Runs the poller until shutdown. `submitted` and `unconfirmed` come from the journal at start-up
/// (`submitted` and `submitting` records).
pub(crate) async fn run(
    ctx: Arc<Shared>,
    inputs: Inputs,
    outputs: Outputs,
    shutdown: CancellationToken,
) -> Result<(), FatalError> {
    let shared = ctx;
    let Inputs {
        mut submitted_rx,
        submitted,
        unconfirmed,
    } = inputs;
    let Outputs {
        resubmit,
        verdicts_tx,
    } = outputs;
    let mut scans: HashMap<ScanId, Entry> = HashMap::new();
    // Adopted scans start their clock now: the journal's submit time is wall-clock time, and a
    // full timeout again is the fail-safe choice.
    let adopted_at = Instant::now();
    for r in submitted {
        if let (Some(scan_id), Some(sha256)) = (r.scan_id, r.sha256) {
            scans.insert(
                scan_id,
                Entry {
                    id: r.id,
                    sha256,
                    attempts: r.attempts.max(1),
                    clock: ScanClock::starting_at(adopted_at),
                    _slot: shared.limits.adopt(),
                },
            );
        }
    }
    let mut unconfirmed: HashMap<ScanId, FileRecord> = unconfirmed
        .into_iter()
        .filter_map(|r| r.scan_id.clone().map(|s| (s, r)))
        .collect();
    let server = &shared.config.server;
    let mut pace = crate::backoff::Pace::new(server.poll_interval, server.poll_early);
    let mut poller = Poller {
        shared: &shared,
        resubmit: &resubmit,
        verdicts_tx: &verdicts_tx,
        down_since: None,
        recent: HashMap::new(),
    };
    // Anomalies journaled before a crash and not announced yet.
    poller.announce_anomalies().await;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            s = submitted_rx.recv() => match s {
                Some(s) => {
                    pace.submitted();
                    scans.insert(s.scan_id, Entry {
                        id: s.id,
                        sha256: s.sha256,
                        attempts: s.attempts,
                        clock: ScanClock::starting_at(s.submitted_at),
                        _slot: s.slot,
                    });
                }
                None => break,
            },
            () = tokio::time::sleep_until(pace.due()) => {
                // A results request in flight is cancelled by a shutdown: nothing is journaled
                // before its answer is complete (a trickling answer must not hold the agent).
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = poller.tick(&mut scans, &mut unconfirmed) => {}
                }
                pace.asked();
            }
        }
    }
    Ok(())
}

struct Poller<'a> {
    shared: &'a Shared,
    resubmit: &'a Resubmit,
    verdicts_tx: &'a mpsc::Sender<Verdict>,
    /// Since when the results request has been failing, if it is.
    down_since: Option<Instant>,
    /// Verdicts decided here lately, by scanId.
    recent: HashMap<ScanId, Recent>,
}

impl Poller<'_> {
    async fn tick(
        &mut self,
        scans: &mut HashMap<ScanId, Entry>,
        unconfirmed: &mut HashMap<ScanId, FileRecord>,
    ) {
        // Released verdicts are watched for contradictions for `RECENT_KEEP`, in flight or not.
        let now = Instant::now();
        self.recent.retain(|_, r| r.until > now);
        if !scans.is_empty() || !unconfirmed.is_empty() || !self.recent.is_empty() {
            if self.poll(scans, unconfirmed).await {
                // The scan clock stops while KATA is unreachable: an outage of hours must not
                // fail the scans that were in flight when it began.
                if let Some(since) = self.down_since.take() {
                    let outage = since.elapsed();
                    for e in scans.values_mut() {
                        e.clock.stop_for(outage);
                    }
                }
            } else {
                self.down_since.get_or_insert_with(Instant::now);
                return;
            }
        }
        self.expire(scans).await;
        self.delete_stale().await;
    }

    /// One results request and its consequences; false when the request failed.
    async fn poll(
        &mut self,
        scans: &mut HashMap<ScanId, Entry>,
        unconfirmed: &mut HashMap<ScanId, FileRecord>,
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
        let results = match shared.scanner.results(&states).await {
            Ok(r) => {
                shared.limits.server_ok();
                shared.metrics.poll_succeeded();
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
        // One answer listing a scan twice is folded fail-closed (detect wins).
        let (results, contradictions) = crate::scanner::merge_duplicates(results);
        for scan_id in contradictions.into_iter().map(|c| c.scan_id) {
            let text = format!(
                "server anomaly: one results answer lists scan {scan_id} with contradicting final states; the most cautious one is used"
            );
            tracing::warn!(%scan_id, "{text}");
            shared.journal.note_error(text).await.ok();
        }
        let max_attempts = shared.config.server.max_attempts.get();
        let judged = judge(results, scans, unconfirmed, &mut self.recent, max_attempts);
        for clock in &judged.verdict_clocks {
            shared.metrics.observe_verdict(clock.started.elapsed());
        }
        let seen_unconfirmed: Vec<FileRecord> = judged
            .known
            .iter()
            .filter_map(|s| unconfirmed.remove(s))
            .collect();
        self.settle_unconfirmed(scans, unconfirmed, seen_unconfirmed)
            .await;
        for (id, scan_id, note) in judged.retries {
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
        if self.decide(scans, judged.decisions).await {
            let until = Instant::now() + RECENT_KEEP;
            for (scan_id, id, sha256, verdict) in judged.verdicts {
                if self.recent.len() < RECENT_MAX || self.recent.contains_key(&scan_id) {
                    // The first verdict stays the reference: the journal never changes it.
                    self.recent.entry(scan_id).or_insert(Recent {
                        id,
                        sha256,
                        verdict,
                        until,
                        contradicted: false,
                    });
                }
            }
        }
        true
    }

    /// Scans found `submitting` at start-up, after a successful results request: those the
    /// server listed (`seen`) are adopted as submitted, the others (left in `unconfirmed`) go
    /// back to the uploader with their scanId queued for deletion.
    async fn settle_unconfirmed(
        &self,
        scans: &mut HashMap<ScanId, Entry>,
        unconfirmed: &mut HashMap<ScanId, FileRecord>,
        seen: Vec<FileRecord>,
    ) {
        let shared = self.shared;
        let adopted_at = Instant::now();
        for rec in seen {
            if let Err(e) = shared.journal.submitted(rec.id).await {
                tracing::error!(id = rec.id, error = %e, "journal write failed");
                continue;
            }
            if let (Some(scan_id), Some(sha256)) = (rec.scan_id.clone(), rec.sha256) {
                tracing::info!(id = rec.id, scan_id = %scan_id, "scan submitted before the restart is known to the server: polling it");
                scans.insert(
                    scan_id,
                    Entry {
                        id: rec.id,
                        sha256,
                        attempts: rec.attempts + 1,
                        clock: ScanClock::starting_at(adopted_at),
                        _slot: shared.limits.adopt(),
                    },
                );
            }
        }
        for (_, rec) in unconfirmed.drain() {
            tracing::info!(
                id = rec.id,
                scan_id = rec.scan_id.as_ref().map_or("-", ScanId::as_str),
                "scan interrupted by the restart is not known to the server: its scanId is deleted and the file submitted again"
            );
            match shared.journal.resend(rec.id).await {
                Ok(()) => self.requeue(&rec),
                Err(e) => tracing::error!(id = rec.id, error = %e, "journal write failed"),
            }
        }
    }

    fn finish(&self, scans: &mut HashMap<ScanId, Entry>, scan_id: &ScanId) {
        // Dropping the entry frees its in-flight slot (and the gauge with it).
        scans.remove(scan_id);
    }

    fn requeue(&self, rec: &FileRecord) {
        if let Some(c) = Claimed::from_record(rec) {
            self.resubmit.push(c);
        }
    }

    /// Journals decisions and announces what was decided; false when the journal write failed.
    async fn decide(
        &self,
        scans: &mut HashMap<ScanId, Entry>,
        decisions: Vec<(FileId, Decision)>,
    ) -> bool {
        if decisions.is_empty() {
            return true;
        }
        // A set: a tick may decide hundreds of the thousands of scans in flight.
        let ids: HashSet<FileId> = decisions.iter().map(|(id, _)| *id).collect();
        match decide_then_announce(&self.shared.journal, self.verdicts_tx, decisions).await {
            Ok(_) => {
                scans.retain(|_, e| !ids.contains(&e.id));
                self.announce_anomalies().await;
                true
            }
            Err(e) => {
                // Nothing was journaled: the scans stay in flight and the next tick decides again.
                tracing::error!(error = %e, "journal write failed; verdicts applied next tick");
                false
            }
        }
    }

    /// Fails scans that had no final answer within `scan_timeout` (monotonic time).
    async fn expire(&self, scans: &mut HashMap<ScanId, Entry>) {
        let timeout = self.shared.config.server.scan_timeout;
        let now = Instant::now();
        let expired: Vec<(ScanId, FileId)> = scans
            .iter()
            .filter(|(_, e)| e.clock.overdue(now, timeout))
            .map(|(s, e)| (s.clone(), e.id))
            .collect();
        if expired.is_empty() {
            return;
        }
        let mut decisions = Vec::new();
        for (scan_id, id) in &expired {
            tracing::warn!(id, %scan_id, ?timeout, "no verdict within scan_timeout");
            // Its result is deleted once, by the sorter, after the file is in failed (the
            // record keeps the scanId); queuing it here too deleted it twice.
            let reason = FileError::NoVerdict {
                timeout,
                scan_id: scan_id.clone(),
            };
            decisions.push((*id, reason.decision(true)));
        }
        self.decide(scans, decisions).await;
    }

    /// Announces the anomalies the journal recorded and nobody announced yet: one ERROR line
    /// each, the `anomaly` hook events (queued with marking them, in one transaction), and the
    /// counter. A failure leaves them for the next decision or start.
    async fn announce_anomalies(&self) {
        let shared = self.shared;
        let Ok(found) = shared.journal.unannounced_anomalies().await else {
            return;
        };
        if found.is_empty() {
            return;
        }
        let mut announced = Vec::with_capacity(found.len());
        for a in &found {
            tracing::error!(
                anomaly = a.id,
                path = %crate::fsops::shown(&a.rel_path),
                dest = %a.dest.as_deref().map(crate::fsops::shown).map(|d| d.to_string()).unwrap_or_default(),
                scan_id = a.scan_id.as_deref().unwrap_or("-"),
                sha256 = a.sha256.map(hex::encode).unwrap_or_default(),
                "server anomaly: a file already released as clean is now reported {} (it was released on {}); it stays where it is: check it (dropscan anomalies list)",
                a.later,
                a.first
            );
            let events = crate::hooks::anomaly_events(&shared.config, a);
            announced.push((a.id, a.file_id, events));
        }
        match shared.journal.announce_anomalies(announced).await {
            Ok(()) => {
                shared
                    .metrics
                    .anomalies
                    .fetch_add(found.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, "journal write failed; anomalies announced later")
            }
        }
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
            match shared.scanner.forget(&id).await {
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
