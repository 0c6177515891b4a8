//! Results poller: one `GET scans/state` per tick for every scan in flight, never one per file.
//!
//! Final states are journaled in one transaction per tick, then handed to the sorter:
//! `not detected` → clean (bound to the SHA-256 of the bytes uploaded), `detect` → quarantine,
//! `error`/`timeout` → submitted again under a new scanId until `max_attempts`, then failed. A scan
//! without a final answer after `scan_timeout` fails. Results that are no longer needed (retried
//! or timed-out scans) are deleted on the server here; results of placed files are deleted by the
//! sorter once the file is in place.
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::context::Shared;
use crate::error::{FatalError, FileError};
use crate::journal::{Decision, FileId, FileRecord, ScanVerdict};
use crate::kata::{ScanId, ScanState};
use crate::limits::InFlight;
use crate::pipeline::Claimed;
use crate::pipeline::Verdict;
use crate::pipeline::{Resubmit, Submitted};

/// Stale results deleted per tick at most.
const STALE_DELETES_PER_TICK: usize = 100;
/// How long a verdict decided here is remembered, to catch a later answer contradicting it;
/// results are requested for that long after the last verdict, even with nothing in flight.
pub const RECENT_KEEP: Duration = Duration::from_secs(600);
/// Verdicts remembered at most (beyond that, new ones are not remembered).
const RECENT_MAX: usize = 10_000;

/// The monotonic clock of one scan in flight: when it started, moved on by outages.
#[derive(Debug, Clone, Copy)]
struct ScanClock {
    started: Instant,
}

impl ScanClock {
    /// A clock starting at `at` (acceptance, or adoption at start-up).
    fn starting_at(at: Instant) -> Self {
        ScanClock { started: at }
    }

    /// The server was unreachable for `outage`: that time does not count.
    fn stop_for(&mut self, outage: Duration) {
        self.started += outage;
    }

    /// Whether the scan has had no final answer for longer than `timeout` at `now`.
    fn overdue(&self, now: Instant, timeout: Duration) -> bool {
        now.saturating_duration_since(self.started) > timeout
    }
}

struct Entry {
    id: FileId,
    sha256: [u8; 32],
    attempts: u32,
    clock: ScanClock,
    _slot: InFlight,
}

/// A verdict decided in this process, kept for a while to catch contradicting answers.
struct Recent {
    id: FileId,
    sha256: [u8; 32],
    verdict: ScanVerdict,
    until: Instant,
    /// A contradicting answer was handed to the journal already (once is enough).
    contradicted: bool,
}

/// What this stage reads.
pub struct Inputs {
    /// Accepted scans, from the uploader.
    pub submitted_rx: mpsc::Receiver<Submitted>,
    /// Records found `submitted` at start-up.
    pub submitted: Vec<FileRecord>,
    /// Records found `submitting` at start-up: asked about, never resent blindly.
    pub unconfirmed: Vec<FileRecord>,
}

/// What this stage writes.
pub struct Outputs {
    /// Scans to run again (`error`/`timeout`, never accepted).
    pub resubmit: Resubmit,
    /// Decided files, to the sorter.
    pub verdicts_tx: mpsc::Sender<Verdict>,
}

/// Runs the poller until shutdown. `submitted` and `unconfirmed` come from the journal at start-up
/// (`submitted` and `submitting` records).
pub async fn run(
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
    let mut scans: HashMap<String, Entry> = HashMap::new();
    // Adopted scans start their clock now: the journal's submit time is wall-clock time, and a
    // full timeout again is the fail-safe choice.
    let adopted_at = Instant::now();
    for r in submitted {
        if let (Some(scan_id), Some(sha256)) = (r.scan_id, r.sha256) {
            shared.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
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
                    scans.insert(s.scan_id.as_str().to_string(), Entry {
                        id: s.id,
                        sha256: s.sha256,
                        attempts: s.attempts,
                        clock: ScanClock::starting_at(s.submitted_at),
                        _slot: s.slot,
                    });
                }
                None => break,
            },
            _ = tick.tick() => {
                // A results request in flight is cancelled by a shutdown: nothing is journaled
                // before its answer is complete (a trickling answer must not hold the agent).
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = poller.tick(&mut scans, &mut unconfirmed) => {}
                }
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
    recent: HashMap<String, Recent>,
}

impl Poller<'_> {
    async fn tick(
        &mut self,
        scans: &mut HashMap<String, Entry>,
        unconfirmed: &mut HashMap<String, FileRecord>,
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
        let (results, contradictions) = crate::kata::merge_duplicates(results);
        for scan_id in contradictions.into_iter().map(|c| c.scan_id) {
            let text = format!(
                "server anomaly: one results answer lists scan {scan_id} with contradicting final states; the most cautious one is used"
            );
            tracing::warn!(%scan_id, "{text}");
            shared.journal.note_error(text).await.ok();
        }
        let mut decisions: Vec<(FileId, Decision)> = Vec::new();
        let mut verdicts: Vec<(String, FileId, [u8; 32], ScanVerdict)> = Vec::new();
        let mut retries: Vec<(FileId, String, String)> = Vec::new();
        let mut seen_unconfirmed = Vec::new();
        let max_attempts = shared.config.server.max_attempts.get();
        for r in results {
            if let Some(rec) = unconfirmed.remove(&r.scan_id) {
                seen_unconfirmed.push(rec);
            }
            let verdict = match &r.state {
                ScanState::Detect => Some(ScanVerdict::Detect),
                ScanState::NotDetected => Some(ScanVerdict::NotDetected),
                _ => None,
            };
            let Some(entry) = scans.get(&r.scan_id) else {
                // A scan decided here lately that now answers otherwise: the journal keeps the
                // first verdict and resolves the anomaly (detect wins while not yet placed).
                if let (Some(v), Some(recent)) = (verdict, self.recent.get_mut(&r.scan_id)) {
                    if v != recent.verdict && !recent.contradicted {
                        recent.contradicted = true;
                        decisions.push((recent.id, Decision::from_verdict(v, recent.sha256)));
                        verdicts.push((r.scan_id.clone(), recent.id, recent.sha256, v));
                    }
                } else if !matches!(r.state, ScanState::Processing) {
                    tracing::trace!(scan_id = %r.scan_id, "result for a scan we do not know; ignored");
                }
                continue;
            };
            if let Some(v) = verdict {
                self.shared
                    .metrics
                    .observe_verdict(entry.clock.started.elapsed());
                decisions.push((entry.id, Decision::from_verdict(v, entry.sha256)));
                verdicts.push((r.scan_id.clone(), entry.id, entry.sha256, v));
                continue;
            }
            match &r.state {
                ScanState::Error | ScanState::Timeout => {
                    let what = r.state.as_wire();
                    if entry.attempts < max_attempts {
                        retries.push((
                            entry.id,
                            r.scan_id.clone(),
                            format!("scan {} ended with {what}; submitted again", r.scan_id),
                        ));
                    } else {
                        decisions.push((
                            entry.id,
                            FileError::ScanFailed {
                                what: if r.state == ScanState::Error {
                                    "error"
                                } else {
                                    "timeout"
                                },
                                attempts: entry.attempts,
                            }
                            .decision(true),
                        ));
                    }
                }
                _ => {}
            }
        }
        // Scans found `submitting` at start-up: known to the server → adopt; unknown → resubmit.
        let adopted_at = Instant::now();
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
                        clock: ScanClock::starting_at(adopted_at),
                        _slot: shared.limits.adopt(),
                    },
                );
            }
        }
        for (_, rec) in unconfirmed.drain() {
            tracing::info!(
                id = rec.id,
                scan_id = rec.scan_id.as_deref().unwrap_or("-"),
                "scan interrupted by the restart is not known to the server: its scanId is deleted and the file submitted again"
            );
            match shared.journal.resend(rec.id).await {
                Ok(()) => self.requeue(&rec),
                Err(e) => tracing::error!(id = rec.id, error = %e, "journal write failed"),
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
        if self.decide(scans, decisions).await {
            let until = Instant::now() + RECENT_KEEP;
            for (scan_id, id, sha256, verdict) in verdicts {
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

    /// Journals decisions and announces what was decided; false when the journal write failed.
    async fn decide(
        &self,
        scans: &mut HashMap<String, Entry>,
        decisions: Vec<(FileId, Decision)>,
    ) -> bool {
        if decisions.is_empty() {
            return true;
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
    async fn expire(&self, scans: &mut HashMap<String, Entry>) {
        let timeout = self.shared.config.server.scan_timeout;
        let now = Instant::now();
        let expired: Vec<(String, FileId)> = scans
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
            decisions.push((
                *id,
                FileError::NoVerdict {
                    timeout,
                    scan_id: scan_id.clone(),
                }
                .decision(true),
            ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kata::ScanResult;

    fn r(id: &str, state: ScanState) -> ScanResult {
        ScanResult {
            scan_id: id.to_string(),
            state,
        }
    }

    #[test]
    fn scan_timeout_counts_monotonic_time_not_the_wall_clock() {
        // The deadline is pure monotonic arithmetic: no wall-clock value enters it, so a jump of
        // the wall clock (forward or back) neither fails nor prolongs a scan. Scans adopted at
        // start-up start their clock at adoption (`run`), whatever their journaled submit time.
        let timeout = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut clock = ScanClock::starting_at(t0);
        assert!(!clock.overdue(t0, timeout));
        assert!(!clock.overdue(t0 + Duration::from_secs(59), timeout));
        assert!(clock.overdue(t0 + Duration::from_secs(61), timeout));
        // An outage of an hour does not count.
        clock.stop_for(Duration::from_secs(3600));
        assert!(!clock.overdue(t0 + Duration::from_secs(3600 + 59), timeout));
        assert!(clock.overdue(t0 + Duration::from_secs(3600 + 61), timeout));
        // A "now" before the start (never happens with a monotonic clock) is not overdue.
        assert!(!ScanClock::starting_at(t0 + timeout * 2).overdue(t0, timeout));
    }

    #[test]
    fn duplicate_entries_for_one_scan_in_one_answer_fold_to_detect() {
        let (folded, contradictions) = crate::kata::merge_duplicates(vec![
            r("a", ScanState::NotDetected),
            r("b", ScanState::NotDetected),
            r("a", ScanState::Detect),
            r("c", ScanState::Processing),
            r("c", ScanState::NotDetected),
            r("d", ScanState::NotDetected),
            r("d", ScanState::Error),
            r("b", ScanState::NotDetected),
        ]);
        assert_eq!(
            folded,
            vec![
                r("a", ScanState::Detect),
                r("b", ScanState::NotDetected),
                r("c", ScanState::NotDetected),
                r("d", ScanState::Error),
            ]
        );
        let ids: Vec<String> = contradictions.into_iter().map(|c| c.scan_id).collect();
        assert_eq!(ids, vec!["a".to_string(), "d".to_string()]);
        // Detect wins whatever the order.
        let (folded, _) = crate::kata::merge_duplicates(vec![
            r("a", ScanState::Detect),
            r("a", ScanState::NotDetected),
        ]);
        assert_eq!(folded, vec![r("a", ScanState::Detect)]);
    }
}
