//! The poller's decision core: what one results answer means for the scans in flight, the scans
//! found `submitting` at start-up and the verdicts remembered lately. Pure: no journal, no
//! network, no clock read; [`super::Poller::poll`] journals and announces what it returns.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::FileError;
use crate::journal::{Decision, FileId, ScanVerdict};
use crate::limits::InFlight;
use crate::scanner::{ScanId, ScanResult, ScanState};

/// The monotonic clock of one scan in flight: when it started, moved on by outages.
#[derive(Debug, Clone, Copy)]
pub(super) struct ScanClock {
    pub(super) started: Instant,
}

impl ScanClock {
    /// A clock starting at `at` (acceptance, or adoption at start-up).
    pub(super) fn starting_at(at: Instant) -> Self {
        ScanClock { started: at }
    }

    /// The server was unreachable for `outage`: that time does not count.
    pub(super) fn stop_for(&mut self, outage: Duration) {
        self.started += outage;
    }

    /// Whether the scan has had no final answer for longer than `timeout` at `now`.
    pub(super) fn overdue(&self, now: Instant, timeout: Duration) -> bool {
        now.saturating_duration_since(self.started) > timeout
    }
}

/// One scan in flight. Dropping it frees its in-flight slot.
pub(super) struct Entry {
    pub(super) id: FileId,
    pub(super) sha256: [u8; 32],
    pub(super) attempts: u32,
    pub(super) clock: ScanClock,
    pub(super) _slot: InFlight,
}

/// A verdict decided in this process, kept for a while to catch contradicting answers.
pub(super) struct Recent {
    pub(super) id: FileId,
    pub(super) sha256: [u8; 32],
    pub(super) verdict: ScanVerdict,
    pub(super) until: Instant,
    /// A contradicting answer was handed to the journal already (once is enough).
    pub(super) contradicted: bool,
}

/// What one results answer decides.
#[derive(Debug, Default)]
pub(super) struct Judgement {
    /// Verdicts and failures to journal, in one transaction.
    pub(super) decisions: Vec<(FileId, Decision)>,
    /// The verdicts among them, remembered once journaled: scan, file, content, verdict.
    pub(super) verdicts: Vec<(ScanId, FileId, [u8; 32], ScanVerdict)>,
    /// Scans that ended with `error` or `timeout` and have attempts left: file, scan, note.
    pub(super) retries: Vec<(FileId, ScanId, String)>,
    /// Scans found `submitting` at start-up that the server lists, in any state: adopted.
    pub(super) known: Vec<ScanId>,
    /// When each scan given a verdict in this answer started (the verdict latency).
    pub(super) verdict_clocks: Vec<ScanClock>,
}

/// Judges one (already folded) results answer. A scan in flight with `detect` or `not
/// detected` is decided for the content it was uploaded with; one with `error`/`timeout` is
/// retried while it has attempts left, else it fails. A scan decided here lately that now
/// answers otherwise is handed to the journal once more (it keeps the first verdict and
/// resolves the anomaly, detect winning while not yet placed); `recent` marks it so, once.
/// Results for scans nobody knows are ignored, and so are scanIds we could not have made.
/// `unconfirmed` holds the scans found `submitting` at start-up (only its keys are read).
pub(super) fn judge<R>(
    results: Vec<ScanResult>,
    scans: &HashMap<ScanId, Entry>,
    unconfirmed: &HashMap<ScanId, R>,
    recent: &mut HashMap<ScanId, Recent>,
    max_attempts: u32,
) -> Judgement {
    let mut j = Judgement::default();
    for r in results {
        let Ok(scan_id) = ScanId::parse(&r.scan_id) else {
            tracing::trace!(scan_id = %r.scan_id, "result for a scanId we never make; ignored");
            continue;
        };
        if unconfirmed.contains_key(&scan_id) {
            j.known.push(scan_id.clone());
        }
        let verdict = ScanVerdict::from_state(&r.state);
        let Some(entry) = scans.get(&scan_id) else {
            if let (Some(v), Some(recent)) = (verdict, recent.get_mut(&scan_id)) {
                if v != recent.verdict && !recent.contradicted {
                    recent.contradicted = true;
                    j.decisions
                        .push((recent.id, Decision::from_verdict(v, recent.sha256)));
                    j.verdicts.push((scan_id, recent.id, recent.sha256, v));
                }
            } else if !matches!(r.state, ScanState::Processing) {
                tracing::trace!(%scan_id, "result for a scan we do not know; ignored");
            }
            continue;
        };
        if let Some(v) = verdict {
            j.verdict_clocks.push(entry.clock);
            j.decisions
                .push((entry.id, Decision::from_verdict(v, entry.sha256)));
            j.verdicts.push((scan_id, entry.id, entry.sha256, v));
            continue;
        }
        let what = match r.state {
            ScanState::Error => "error",
            ScanState::Timeout => "timeout",
            _ => continue,
        };
        if entry.attempts < max_attempts {
            let note = format!("scan {scan_id} ended with {what}; submitted again");
            j.retries.push((entry.id, scan_id, note));
        } else {
            let reason = FileError::ScanFailed {
                what,
                attempts: entry.attempts,
            };
            j.decisions.push((entry.id, reason.decision(true)));
        }
    }
    j
}
