//! The emulator's memory: scans, the authorization table, counters and the runtime settings.
//!
//! Everything sits behind one `std::sync::Mutex`, taken for short, synchronous sections and never
//! across an `.await`. A scan's state is computed lazily from its timestamps (`processing` until
//! `ready_at`), so no timer runs per scan. This module knows nothing of HTTP or TLS: `server.rs`
//! asks it questions and reports what happened.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{EmulatorConfig, Faults, ResultShape};

/// Where an integration request stands, as in KATA's "External systems" page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Authorization {
    /// Waiting for an administrator: requests get 401.
    Pending,
    /// Accepted: requests are served.
    Accepted,
    /// Rejected: requests get 401.
    Rejected,
}

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

/// Counters, for tests and the CLI.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// POSTs answered 200.
    pub submits_accepted: u64,
    /// POST answers by HTTP status, including injected faults.
    pub submits_by_status: BTreeMap<u16, u64>,
    /// `GET …/scans/state` requests that reached the handler.
    pub state_requests: u64,
    /// `DELETE …/scans/{scanId}` requests.
    pub deletes: u64,
    /// `DELETE …/scans` requests.
    pub delete_all: u64,
    /// `GET …/scans/filters` requests.
    pub filters_requests: u64,
    /// POSTs without a `Content-Length` header (chunked bodies).
    pub chunked_uploads: u64,
    /// Bytes of `content` received, all POSTs together.
    pub bytes_received: u64,
    /// Connections closed without an answer by the `drop` fault.
    pub dropped_connections: u64,
    /// Submissions per scanId (2 or more: the scanId was reused).
    pub submissions_per_scan_id: HashMap<String, u32>,
    /// Scans known, deleted ones included until forgotten.
    pub scans_known: usize,
}

/// The emulator's state, shared between server instances and the test that drives them.
///
/// Cloning is cheap (an `Arc`). All methods are synchronous.
#[derive(Clone, Debug, Default)]
pub struct SharedState {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Settings {
    auto_accept: bool,
    max_object_size: i64,
    max_scans: Option<usize>,
    scan_delay: Duration,
    detect_sha256: HashSet<[u8; 32]>,
    shape: ResultShape,
    faults: Faults,
    version: String,
    no_filters_route: Option<u16>,
}

#[derive(Debug)]
struct Scan {
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

#[derive(Debug)]
struct Inner {
    settings: Settings,
    /// sensorId → scanId → scan.
    scans: HashMap<String, HashMap<String, Scan>>,
    /// Per sensor, the `ready_at` of scans that were processing when registered: popped when
    /// due, so counting scans in `processing` costs no walk over all scans. A scan deleted or
    /// restarted while processing keeps its place until due (the scanner does not abort it).
    due: HashMap<String, BinaryHeap<Reverse<Instant>>>,
    /// Per sensor, scans that never finish (injected `Processing`) and are not deleted.
    stuck: HashMap<String, usize>,
    /// Deleted scans, oldest first: (sensorId, scanId).
    tombstones: VecDeque<(String, String)>,
    /// Uploads past the 429 check and not yet registered, per sensor: they count as scans.
    uploads_in_flight: HashMap<String, usize>,
    authorizations: HashMap<(String, [u8; 32]), Authorization>,
    injected: HashMap<[u8; 32], VecDeque<InjectedVerdict>>,
    stats: Stats,
}

impl Default for Inner {
    fn default() -> Self {
        let mut inner = Self {
            settings: Settings {
                auto_accept: true,
                max_object_size: 0,
                max_scans: None,
                scan_delay: Duration::ZERO,
                detect_sha256: HashSet::new(),
                shape: ResultShape::default(),
                faults: Faults::default(),
                version: String::new(),
                no_filters_route: None,
            },
            scans: HashMap::new(),
            due: HashMap::new(),
            stuck: HashMap::new(),
            tombstones: VecDeque::new(),
            uploads_in_flight: HashMap::new(),
            authorizations: HashMap::new(),
            injected: HashMap::new(),
            stats: Stats::default(),
        };
        inner.apply(&EmulatorConfig::default());
        inner
    }
}

impl Inner {
    fn apply(&mut self, config: &EmulatorConfig) {
        self.settings = Settings {
            auto_accept: config.auto_accept,
            max_object_size: config.max_object_size,
            max_scans: config.max_scans,
            scan_delay: config.scan_delay,
            detect_sha256: config.detect_sha256.clone(),
            shape: config.shape,
            faults: config.faults.clone(),
            version: config.version.clone(),
            no_filters_route: config.no_filters_route,
        };
    }

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

/// Normalizes a sensorId: a UUID in any accepted spelling becomes lower-case hyphenated.
pub(crate) fn parse_sensor_id(raw: &str) -> Option<String> {
    uuid::Uuid::try_parse(raw)
        .ok()
        .map(|u| u.hyphenated().to_string())
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

/// A snapshot of the settings a request needs.
pub(crate) struct RequestSettings {
    pub(crate) faults: Faults,
    pub(crate) max_object_size: i64,
}

impl SharedState {
    /// A fresh state with the settings of `config`.
    pub fn new(config: &EmulatorConfig) -> Self {
        let state = Self::default();
        state.apply(config);
        state
    }

    /// Replaces the settings with those of `config`; scans, authorizations and counters stay.
    pub fn apply(&self, config: &EmulatorConfig) {
        self.lock().apply(config);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // to an emulator: keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the fault shares.
    pub fn set_faults(&self, f: Faults) {
        self.lock().settings.faults = f;
    }

    /// Sets the maximum object size in bytes; `<= 0` means no limit.
    pub fn set_max_object_size(&self, n: i64) {
        self.lock().settings.max_object_size = n;
    }

    /// Sets the maximum number of scans in `processing` per sensor; `None` means no limit.
    pub fn set_max_scans(&self, n: Option<usize>) {
        self.lock().settings.max_scans = n;
    }

    /// Sets the scan delay for scans submitted from now on.
    pub fn set_scan_delay(&self, d: Duration) {
        self.lock().settings.scan_delay = d;
    }

    /// Sets the body shape of `GET …/scans/state` answers.
    pub fn set_shape(&self, s: ResultShape) {
        self.lock().settings.shape = s;
    }

    /// Makes `GET …/scans/filters` answer `status` (404 or 405) as if the route did not exist;
    /// `None` restores it.
    pub fn set_no_filters_route(&self, status: Option<u16>) {
        self.lock().settings.no_filters_route = status;
    }

    /// Sets whether new (sensorId, certificate) pairs are accepted without an administrator.
    pub fn set_auto_accept(&self, b: bool) {
        self.lock().settings.auto_accept = b;
    }

    /// Sets the authorization of a (sensorId, client-certificate SHA-256) pair.
    pub fn set_authorization(
        &self,
        sensor_id: &str,
        client_cert_sha256: [u8; 32],
        a: Authorization,
    ) {
        let sensor_id = parse_sensor_id(sensor_id).unwrap_or_else(|| sensor_id.to_owned());
        self.lock()
            .authorizations
            .insert((sensor_id, client_cert_sha256), a);
    }

    /// The authorization table, sorted by sensorId then fingerprint.
    pub fn authorizations(&self) -> Vec<(String, [u8; 32], Authorization)> {
        let mut all: Vec<_> = self
            .lock()
            .authorizations
            .iter()
            .map(|((s, f), a)| (s.clone(), *f, *a))
            .collect();
        all.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        all
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        let mut stats = inner.stats.clone();
        stats.scans_known = inner.scans.values().map(HashMap::len).sum();
        stats
    }

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

    pub(crate) fn request_settings(&self) -> RequestSettings {
        let inner = self.lock();
        RequestSettings {
            faults: inner.settings.faults.clone(),
            max_object_size: inner.settings.max_object_size,
        }
    }

    /// `Ok((maxObjectSize, version))`, or `Err(status)` when the route is switched off.
    pub(crate) fn filters(&self) -> Result<(i64, String), u16> {
        let mut inner = self.lock();
        inner.stats.filters_requests += 1;
        if let Some(status) = inner.settings.no_filters_route {
            return Err(status);
        }
        Ok((
            inner.settings.max_object_size,
            inner.settings.version.clone(),
        ))
    }

    /// Looks up, and on first sight records, the (sensorId, certificate) pair.
    pub(crate) fn authorize(&self, sensor_id: &str, fingerprint: [u8; 32]) -> Authorization {
        let mut inner = self.lock();
        let key = (sensor_id.to_owned(), fingerprint);
        if let Some(a) = inner.authorizations.get(&key) {
            return *a;
        }
        // A new certificate on a sensorId that is already integrated is a new integration
        // request: it waits for an administrator even with auto_accept (the docs: changing the
        // certificate means integrating again).
        let integrated = inner
            .authorizations
            .iter()
            .any(|((s, _), a)| s == sensor_id && *a == Authorization::Accepted);
        let a = if inner.settings.auto_accept && !integrated {
            Authorization::Accepted
        } else {
            Authorization::Pending
        };
        inner.authorizations.insert(key, a);
        a
    }

    pub(crate) fn record_post_status(&self, status: u16, chunked: bool) {
        let mut inner = self.lock();
        *inner.stats.submits_by_status.entry(status).or_default() += 1;
        if status == 200 {
            inner.stats.submits_accepted += 1;
        }
        if chunked {
            inner.stats.chunked_uploads += 1;
        }
    }

    pub(crate) fn record_dropped(&self) {
        self.lock().stats.dropped_connections += 1;
    }

    pub(crate) fn record_bytes(&self, n: u64) {
        self.lock().stats.bytes_received += n;
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
        let ready_at = (verdict != ScanState::Processing).then(|| now + inner.settings.scan_delay);
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

    /// Marks every scan of the sensor deleted.
    pub(crate) fn delete_all(&self, sensor_id: &str) {
        let mut inner = self.lock();
        inner.stats.delete_all += 1;
        let mut deleted = Vec::new();
        if let Some(scans) = inner.scans.get_mut(sensor_id) {
            for (id, scan) in scans.iter_mut().filter(|(_, s)| !s.deleted) {
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

#[cfg(test)]
mod tests {
    use super::*;

    const SENSOR: &str = "0b6b7a52-6c1e-4c1f-9d55-3d7a1c2b9e01";

    #[test]
    fn sensor_id_is_normalized() {
        assert_eq!(
            parse_sensor_id(&SENSOR.to_uppercase()).as_deref(),
            Some(SENSOR)
        );
        assert_eq!(parse_sensor_id("not-a-uuid"), None);
    }

    #[test]
    fn new_certificate_on_integrated_sensor_waits() {
        let state = SharedState::default();
        assert_eq!(state.authorize(SENSOR, [1; 32]), Authorization::Accepted);
        assert_eq!(state.authorize(SENSOR, [2; 32]), Authorization::Pending);
        state.set_authorization(SENSOR, [2; 32], Authorization::Accepted);
        assert_eq!(state.authorize(SENSOR, [2; 32]), Authorization::Accepted);
    }

    #[test]
    fn injected_verdicts_are_consumed_in_order() {
        let state = SharedState::default();
        state.inject_verdict(
            [7; 32],
            InjectedVerdict {
                verdict: ScanState::Error,
                times: 2,
            },
        );
        state.inject_verdict([7; 32], InjectedVerdict::once(ScanState::Timeout));
        let mut seen = Vec::new();
        for n in 0..4 {
            let slot = state.try_reserve_upload(SENSOR).unwrap();
            let id = format!("s{n}");
            state.register_scan(slot, &id, None, [7; 32], 1, false);
            seen.push(state.scan(&id).unwrap());
        }
        let verdicts: Vec<_> = seen.iter().map(|s| s.state).collect();
        // scan_delay is zero by default: states are final at once.
        assert_eq!(
            verdicts,
            [
                ScanState::Error,
                ScanState::Error,
                ScanState::Timeout,
                ScanState::NotDetected
            ]
        );
    }

    #[test]
    fn stuck_scan_holds_a_slot_until_deleted() {
        let state = SharedState::default();
        state.set_max_scans(Some(1));
        state.inject_verdict([3; 32], InjectedVerdict::once(ScanState::Processing));
        let slot = state.try_reserve_upload(SENSOR).unwrap();
        state.register_scan(slot, "stuck", None, [3; 32], 1, false);
        assert!(state.try_reserve_upload(SENSOR).is_none());
        assert!(state.delete(SENSOR, "stuck"));
        assert!(state.try_reserve_upload(SENSOR).is_some());
    }

    #[test]
    fn upload_slots_count_toward_max_scans() {
        let state = SharedState::default();
        state.set_max_scans(Some(1));
        let slot = state.try_reserve_upload(SENSOR).unwrap();
        assert!(state.try_reserve_upload(SENSOR).is_none());
        drop(slot);
        assert!(state.try_reserve_upload(SENSOR).is_some());
    }
}
