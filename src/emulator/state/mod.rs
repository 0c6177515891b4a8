//! The emulator's memory: scans, the authorization table, counters and the runtime settings.
//!
//! Everything sits behind one `std::sync::Mutex`, taken for short, synchronous sections and never
//! across an `.await`. A scan's state is computed lazily from its timestamps (`processing` until
//! `ready_at`), so no timer runs per scan. This module knows nothing of HTTP or TLS: the server
//! asks it questions and reports what happened.
//!
//! Layout: this file holds the shared state itself, the runtime settings (limits, faults,
//! answer shape) and the counters; `auth.rs` the authorization table; `scans.rs` the scans,
//! their verdicts (injected, faulty or real), the 429 bookkeeping and deletion.

mod auth;
mod scans;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{EmulatorConfig, Faults, ResultShape};
pub use auth::Authorization;
pub(crate) use auth::parse_sensor_id;
use scans::Scan;
pub use scans::{InjectedVerdict, ScanInfo, ScanState};

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
    /// Upper end of a uniform scan delay, when longer than `scan_delay`.
    scan_delay_max: Option<Duration>,
    detect_sha256: HashSet<[u8; 32]>,
    shape: ResultShape,
    faults: Faults,
    version: String,
    no_filters_route: Option<u16>,
}

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
                scan_delay_max: None,
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
            scan_delay_max: config.scan_delay_max,
            detect_sha256: config.detect_sha256.clone(),
            shape: config.shape,
            faults: config.faults.clone(),
            version: config.version.clone(),
            no_filters_route: config.no_filters_route,
        };
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
        let mut inner = self.lock();
        inner.settings.scan_delay = d;
        inner.settings.scan_delay_max = None;
    }

    /// Sets a uniform scan delay range (`min..=max`) for scans submitted from now on.
    pub fn set_scan_delay_range(&self, min: Duration, max: Duration) {
        let mut inner = self.lock();
        inner.settings.scan_delay = min.min(max);
        inner.settings.scan_delay_max = Some(min.max(max));
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

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        let mut stats = inner.stats.clone();
        stats.scans_known = inner.scans.values().map(HashMap::len).sum();
        stats
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
}
