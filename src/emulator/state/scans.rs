//! Scans: their registration and verdict (injected, a fault share, EICAR or a configured hash,
//! else `not detected`), the `GET …/scans/state` query, deletion with bounded tombstones, and the
//! count of scans in `processing` behind the 429 answer (upload slots included).

use std::cmp::Reverse;
use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use super::{Inner, SharedState};
use crate::emulator::ResultShape;

/// The state of one scan, as reported by `GET …/scans/state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScanState {
    /// Still being scanned.
    Processing,
    /// A threat was found.
    Detect,
    /// No threat was found.
    NotDetected,
    /// The scan ended with a timeout error.
    Timeout,
    /// The scan ended with an error.
    Error,
}

impl ScanState {
    /// The wire spelling (`not detected` has a space).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "processing",
            Self::Detect => "detect",
            Self::NotDetected => "not detected",
            Self::Timeout => "timeout",
            Self::Error => "error",
        }
    }

    /// Parses the wire spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "processing" => Self::Processing,
            "detect" => Self::Detect,
            "not detected" => Self::NotDetected,
            "timeout" => Self::Timeout,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

/// A verdict forced for content with a given SHA-256, see [`SharedState::inject_verdict`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectedVerdict {
    /// The verdict to report once the scan delay has passed. `Processing` means the scan never
    /// finishes.
    pub verdict: ScanState,
    /// How many submissions of that content get it; later ones are scanned normally.
    pub times: u32,
}

impl InjectedVerdict {
    /// `verdict` for the next submission of the content only.
    pub fn once(verdict: ScanState) -> Self {
        Self { verdict, times: 1 }
    }
}

/// What the emulator knows of one scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanInfo {
    /// The sensorId it was submitted under (lower-case hyphenated).
    pub sensor_id: String,
    /// The `sensorInstanceId` query parameter of the submission, if any.
    pub sensor_instance_id: Option<String>,
    /// SHA-256 of the `content` part.
    pub sha256: [u8; 32],
    /// Size of the `content` part in bytes.
    pub size: u64,
    /// The state now.
    pub state: ScanState,
    /// Deleted by a DELETE: no longer reported.
    pub deleted: bool,
    /// How many times this scanId was submitted by this sensor.
    pub submissions: u32,
}

#[derive(Debug)]
pub(super) struct Scan {
    sensor_instance_id: Option<String>,
    sha256: [u8; 32],
    size: u64,
    verdict: ScanState,
    /// `None`: never ready (an injected `Processing`).
    ready_at: Option<Instant>,
    deleted: bool,
    submissions: u32,
}

impl Scan {
    fn state(&self, now: Instant) -> ScanState {
        match self.ready_at {
            Some(at) if now >= at => self.verdict,
            _ => ScanState::Processing,
        }
    }
}

/// Deleted scans remembered (for [`SharedState::scan`]) before the oldest are forgotten: keeps a
/// long-running emulator's memory bounded.
const MAX_TOMBSTONES: usize = 100_000;

impl Inner {
    /// Scans in `processing` plus uploads in flight, for the 429 check.
    fn busy(&mut self, sensor_id: &str, now: Instant) -> usize {
        let processing = self.due.get_mut(sensor_id).map_or(0, |due| {
            while due.peek().is_some_and(|Reverse(at)| *at <= now) {
                due.pop();
            }
            due.len()
        });
        processing
            + self.stuck.get(sensor_id).copied().unwrap_or(0)
            + self.uploads_in_flight.get(sensor_id).copied().unwrap_or(0)
    }

    /// Bookkeeping for a scan leaving the reported set (deleted or replaced).
    fn retire(&mut self, sensor_id: &str, ready_at: Option<Instant>) {
        if ready_at.is_none() {
            if let Some(n) = self.stuck.get_mut(sensor_id) {
                *n = n.saturating_sub(1);
            }
        }
    }

    fn bury(&mut self, sensor_id: &str, scan_id: &str) {
        self.tombstones
            .push_back((sensor_id.to_owned(), scan_id.to_owned()));
        while self.tombstones.len() > MAX_TOMBSTONES {
            let Some((sensor, id)) = self.tombstones.pop_front() else {
                break;
            };
            if let Some(scans) = self.scans.get_mut(&sensor) {
                // It may have been submitted again since: only a deleted scan is forgotten.
                if scans.get(&id).is_some_and(|s| s.deleted) {
                    scans.remove(&id);
                }
            }
        }
    }
}

/// A slot for one upload between the 429 check and its registration; frees itself on drop, so an
/// upload that fails half-way never leaks a slot.
pub(crate) struct UploadSlot {
    state: SharedState,
    sensor_id: String,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut inner = self.state.lock();
        if let Some(n) = inner.uploads_in_flight.get_mut(&self.sensor_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.uploads_in_flight.remove(&self.sensor_id);
            }
        }
    }
}

impl SharedState {
    /// What is known of `scan_id` (searched across sensors; the first match wins). Deleted scans
    /// are forgotten after 100,000 newer deletions.
    pub fn scan(&self, scan_id: &str) -> Option<ScanInfo> {
        let inner = self.lock();
        let now = Instant::now();
        inner.scans.iter().find_map(|(sensor_id, scans)| {
            scans.get(scan_id).map(|s| ScanInfo {
                sensor_id: sensor_id.clone(),
                sensor_instance_id: s.sensor_instance_id.clone(),
                sha256: s.sha256,
                size: s.size,
                state: s.state(now),
                deleted: s.deleted,
                submissions: s.submissions,
            })
        })
    }

    /// Forces `v.verdict` for the next `v.times` submissions of content with this SHA-256.
    /// Several injections for one hash queue up in order.
    pub fn inject_verdict(&self, sha256: [u8; 32], v: InjectedVerdict) {
        if v.times == 0 {
            return;
        }
        self.lock().injected.entry(sha256).or_default().push_back(v);
    }

    /// Takes an upload slot unless the sensor is at `max_scans`.
    pub(crate) fn try_reserve_upload(&self, sensor_id: &str) -> Option<UploadSlot> {
        let mut inner = self.lock();
        if let Some(max) = inner.settings.max_scans {
            if inner.busy(sensor_id, Instant::now()) >= max {
                return None;
            }
        }
        *inner
            .uploads_in_flight
            .entry(sensor_id.to_owned())
            .or_default() += 1;
        drop(inner);
        Some(UploadSlot {
            state: self.clone(),
            sensor_id: sensor_id.to_owned(),
        })
    }

    /// Registers a finished upload: decides the verdict now, reports it after the scan delay.
    pub(crate) fn register_scan(
        &self,
        slot: UploadSlot,
        scan_id: &str,
        sensor_instance_id: Option<String>,
        sha256: [u8; 32],
        size: u64,
        eicar: bool,
    ) {
        let now = Instant::now();
        let error_roll: f64 = rand::random();
        let mut inner = self.lock();
        let injected = match inner.injected.get_mut(&sha256) {
            Some(queue) => {
                let verdict = queue.front_mut().map(|v| {
                    v.times -= 1;
                    v.verdict
                });
                if queue.front().is_some_and(|v| v.times == 0) {
                    queue.pop_front();
                }
                if queue.is_empty() {
                    inner.injected.remove(&sha256);
                }
                verdict
            }
            None => None,
        };
        let faults = &inner.settings.faults;
        let verdict = if let Some(v) = injected {
            v
        } else if error_roll < faults.error_verdict_share {
            ScanState::Error
        } else if error_roll < faults.error_verdict_share + faults.timeout_verdict_share {
            ScanState::Timeout
        } else if eicar || inner.settings.detect_sha256.contains(&sha256) {
            ScanState::Detect
        } else {
            ScanState::NotDetected
        };
        let delay = scan_delay(
            inner.settings.scan_delay,
            inner.settings.scan_delay_max,
            rand::random::<f64>(),
        );
        let ready_at = (verdict != ScanState::Processing).then(|| now + delay);
        let sensor_id = slot.sensor_id.clone();
        match ready_at {
            Some(at) if at > now => inner
                .due
                .entry(sensor_id.clone())
                .or_default()
                .push(Reverse(at)),
            Some(_) => {}
            None => *inner.stuck.entry(sensor_id.clone()).or_default() += 1,
        }
        let previous = inner
            .scans
            .get(&sensor_id)
            .and_then(|scans| scans.get(scan_id))
            .map(|s| (s.submissions, s.ready_at, s.deleted));
        if let Some((_, ready_at, false)) = previous {
            inner.retire(&sensor_id, ready_at);
        }
        let submissions = previous.map_or(0, |p| p.0) + 1;
        // A repeated scanId restarts the scan under it.
        inner.scans.entry(sensor_id).or_default().insert(
            scan_id.to_owned(),
            Scan {
                sensor_instance_id,
                sha256,
                size,
                verdict,
                ready_at,
                deleted: false,
                submissions,
            },
        );
        *inner
            .stats
            .submissions_per_scan_id
            .entry(scan_id.to_owned())
            .or_default() += 1;
        drop(inner);
        // The scan is registered: the slot's count moves to the `processing` scan.
        drop(slot);
    }

    /// The (scanId, state) pairs a `GET …/scans/state` answers, sorted by scanId, plus the shape.
    pub(crate) fn query(
        &self,
        sensor_id: &str,
        sensor_instance_id: Option<&str>,
        states: Option<&HashSet<ScanState>>,
    ) -> (Vec<(String, ScanState)>, ResultShape) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.stats.state_requests += 1;
        let mut found: Vec<(String, ScanState)> = inner
            .scans
            .get(sensor_id)
            .map(|scans| {
                scans
                    .iter()
                    .filter(|(_, s)| !s.deleted)
                    .filter(|(_, s)| {
                        sensor_instance_id
                            .is_none_or(|id| s.sensor_instance_id.as_deref() == Some(id))
                    })
                    .map(|(id, s)| (id.clone(), s.state(now)))
                    .filter(|(_, st)| states.is_none_or(|wanted| wanted.contains(st)))
                    .collect()
            })
            .unwrap_or_default();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        (found, inner.settings.shape)
    }

    /// Marks one scan deleted; `false` if there was nothing to delete.
    pub(crate) fn delete(&self, sensor_id: &str, scan_id: &str) -> bool {
        let mut inner = self.lock();
        inner.stats.deletes += 1;
        let ready_at = match inner
            .scans
            .get_mut(sensor_id)
            .and_then(|scans| scans.get_mut(scan_id))
        {
            Some(scan) if !scan.deleted => {
                scan.deleted = true;
                scan.ready_at
            }
            _ => return false,
        };
        inner.retire(sensor_id, ready_at);
        inner.bury(sensor_id, scan_id);
        true
    }

    /// Marks every scan of the sensor deleted (of that instance only, when one is named).
    pub(crate) fn delete_all(&self, sensor_id: &str, sensor_instance_id: Option<&str>) {
        let mut inner = self.lock();
        inner.stats.delete_all += 1;
        let mut deleted = Vec::new();
        if let Some(scans) = inner.scans.get_mut(sensor_id) {
            let chosen = |s: &Scan| {
                !s.deleted
                    && sensor_instance_id
                        .is_none_or(|id| s.sensor_instance_id.as_deref() == Some(id))
            };
            for (id, scan) in scans.iter_mut().filter(|(_, s)| chosen(s)) {
                scan.deleted = true;
                deleted.push((id.clone(), scan.ready_at));
            }
        }
        for (id, ready_at) in deleted {
            inner.retire(sensor_id, ready_at);
            inner.bury(sensor_id, &id);
        }
    }
}

/// The delay of one scan: `min`, or uniform in `min..=max` when a longer `max` is set; `roll` is
/// in [0, 1).
pub(crate) fn scan_delay(min: Duration, max: Option<Duration>, roll: f64) -> Duration {
    match max {
        Some(max) if max > min => min + (max - min).mul_f64(roll.clamp(0.0, 1.0)),
        _ => min,
    }
}
