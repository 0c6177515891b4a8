//! What bounds throughput right now, and the snapshot of the limits that the log, `dropscan
//! status` and the metrics show.
//!
//! Throughput against KATA is `scans in flight / (scan time + poll wait)`, unless the rate limit
//! or the input bound it first. The observer keeps, from what the limits see anyway:
//! - the **mean scan time**, submitted → verdict (EWMA over finished scans), and the **files per
//!   hour** (scans finished in the last [`RATE_WINDOW`]);
//! - the **saturation**: the share of samples (one a second, EWMA) in which every in-flight slot
//!   was taken, i.e. the cap held submissions back;
//! - the **rate-limit wait**: seconds spent waiting in `rate()` per second (EWMA; several waiters
//!   add up);
//! - the 429s: how many, and when the last one came.
//!
//! From those, [`Binding`] is decided every [`EVALUATE_EVERY`] and logged once per change (after
//! it held for two evaluations, so a boundary case does not flap). The tuner task (`run`) also
//! saves the learned capacity and a [`LimitsSnapshot`] in the journal's `meta` table, at most
//! every [`SAVE_EVERY`] and at shutdown ([`Limits::finish`]), for `dropscan status` and for the next start.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::aimd::Mode;
use super::{Health, Limits, lock};
use crate::journal::Journal;

/// Window of the files-per-hour figure.
pub(super) const RATE_WINDOW: Duration = Duration::from_secs(600);
/// How long a 429 keeps the server's concurrency reported as the binding limit.
pub(super) const THROTTLE_MEMORY: Duration = Duration::from_secs(600);
/// How often the binding limit is decided.
pub(super) const EVALUATE_EVERY: Duration = Duration::from_secs(5);
/// How often the snapshot is saved at most (and at least, while anything changes).
pub(super) const SAVE_EVERY: Duration = Duration::from_secs(15);
/// Samples of the saturation and rate wait (one a second).
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// EWMA weight of one sample (about 20 s of memory).
const SAMPLE_WEIGHT: f64 = 0.05;
/// EWMA weight of one finished scan.
const SCAN_WEIGHT: f64 = 0.1;
/// Completions remembered at most for the files-per-hour figure.
const COMPLETIONS_MAX: usize = 100_000;

/// What bounds throughput right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binding {
    /// Not decided yet (just started).
    Unknown,
    /// Nothing (or too little) to scan: slots stay free.
    Input,
    /// `server.requests_per_second`: requests wait for the rate limiter.
    RateLimit,
    /// The server's own concurrency: it answered 429 lately and the cap sits at what it takes.
    ServerConcurrency,
    /// The configured cap (`max_in_flight = N`, or the ceiling of "auto") while the server
    /// never said 429.
    ConfiguredCap,
    /// Slots are full and finished scans mostly wait for the next results request.
    PollInterval,
    /// Slots are full and the scans themselves take the time.
    ScanTime,
    /// The server is down or refuses this sensor: submissions are paused.
    Unavailable,
}

impl Binding {
    /// The label used in metrics (`snake_case`).
    pub fn as_str(self) -> &'static str {
        match self {
            Binding::Unknown => "unknown",
            Binding::Input => "input",
            Binding::RateLimit => "rate_limit",
            Binding::ServerConcurrency => "server_concurrency",
            Binding::ConfiguredCap => "configured_cap",
            Binding::PollInterval => "poll_interval",
            Binding::ScanTime => "scan_time",
            Binding::Unavailable => "unavailable",
        }
    }

    /// Every value, for metrics.
    pub const ALL: [Binding; 8] = [
        Binding::Unknown,
        Binding::Input,
        Binding::RateLimit,
        Binding::ServerConcurrency,
        Binding::ConfiguredCap,
        Binding::PollInterval,
        Binding::ScanTime,
        Binding::Unavailable,
    ];
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Binding::Unknown => "not known yet",
            Binding::Input => "input (nothing waiting to be scanned; slots are free)",
            Binding::RateLimit => {
                "the rate limit (requests wait for server.requests_per_second)"
            }
            Binding::ServerConcurrency => {
                "the server's concurrency (it answers 429; the cap sits at what it takes)"
            }
            Binding::ConfiguredCap => {
                "the configured cap (server.max_in_flight or max_in_flight_ceiling; the server took every scan)"
            }
            Binding::PollInterval => {
                "the poll interval (finished scans wait for the next results request)"
            }
            Binding::ScanTime => "the scan time (slots are full while the server scans)",
            Binding::Unavailable => "the server being unavailable (submissions paused)",
        })
    }
}

/// The limits as a plain value: for the log, `dropscan status` (saved in the journal as JSON)
/// and the metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitsSnapshot {
    /// "auto" or "fixed".
    pub mode: String,
    /// The current in-flight cap.
    pub cap: usize,
    /// The server capacity learned from 429s (0 = nothing learned yet).
    pub learned: usize,
    /// The ceiling of "auto" (the pinned cap when fixed).
    pub ceiling: usize,
    /// Scans in flight on the server now.
    pub in_flight: usize,
    /// Mean time from acceptance to final verdict, seconds (EWMA); `None` before the first.
    pub mean_scan_secs: Option<f64>,
    /// Scans finished per hour, over the last ten minutes.
    pub files_per_hour: f64,
    /// What bounds throughput now.
    pub binding: Binding,
    /// 429 answers to submissions since start.
    pub throttled: u64,
    /// When this was taken, milliseconds since the epoch.
    pub updated_at: i64,
}

impl LimitsSnapshot {
    /// The snapshot as saved in the journal.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a saved snapshot; `None` when it is not one (e.g. written by another version).
    pub fn from_json(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// Equal but for the time it was taken.
    fn same_as(&self, other: &LimitsSnapshot) -> bool {
        LimitsSnapshot {
            updated_at: 0,
            ..self.clone()
        } == LimitsSnapshot {
            updated_at: 0,
            ..other.clone()
        }
    }
}

/// The observer's state (inside `Limits`).
pub(super) struct Observer {
    started: Instant,
    scan_secs: Option<f64>,
    completions: VecDeque<Instant>,
    pub(super) throttled: u64,
    pub(super) last_429: Option<Instant>,
    saturation: f64,
    rate_busy: f64,
    binding: Binding,
    candidate: (Binding, u32),
}

impl Observer {
    pub(super) fn new() -> Self {
        Observer {
            started: Instant::now(),
            scan_secs: None,
            completions: VecDeque::new(),
            throttled: 0,
            last_429: None,
            saturation: 0.0,
            rate_busy: 0.0,
            binding: Binding::Unknown,
            candidate: (Binding::Unknown, 0),
        }
    }

    /// A scan accepted at `since` got its final verdict now.
    pub(super) fn finished(&mut self, since: Instant) {
        let now = Instant::now();
        let secs = now.saturating_duration_since(since).as_secs_f64();
        self.scan_secs = Some(match self.scan_secs {
            None => secs,
            Some(m) => m + SCAN_WEIGHT * (secs - m),
        });
        if self.completions.len() >= COMPLETIONS_MAX {
            self.completions.pop_front();
        }
        self.completions.push_back(now);
    }

    fn files_per_hour(&mut self, now: Instant) -> f64 {
        while self
            .completions
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > RATE_WINDOW)
        {
            self.completions.pop_front();
        }
        let span = now
            .saturating_duration_since(self.started)
            .clamp(Duration::from_secs(1), RATE_WINDOW);
        #[allow(clippy::cast_precision_loss)]
        let n = self.completions.len() as f64;
        n * 3600.0 / span.as_secs_f64()
    }

    fn sample(&mut self, saturated: bool, rate_wait: Duration, elapsed: Duration) {
        let s = if saturated { 1.0 } else { 0.0 };
        self.saturation += SAMPLE_WEIGHT * (s - self.saturation);
        let busy = rate_wait.as_secs_f64() / elapsed.as_secs_f64().max(1e-3);
        self.rate_busy += SAMPLE_WEIGHT * (busy - self.rate_busy);
    }
}

/// What the decision needs besides the observer.
pub(super) struct Inputs {
    pub health: Health,
    pub at_ceiling: bool,
    pub poll_interval: Duration,
}

/// The binding limit from the observations (see the module doc for the order).
pub(super) fn decide(o: &Observer, i: &Inputs, now: Instant) -> Binding {
    if i.health != Health::Up {
        return Binding::Unavailable;
    }
    if o.rate_busy >= 0.25 {
        return Binding::RateLimit;
    }
    if o.saturation < 0.5 {
        return Binding::Input;
    }
    let throttled_lately = o
        .last_429
        .is_some_and(|t| now.saturating_duration_since(t) <= THROTTLE_MEMORY);
    if throttled_lately {
        return Binding::ServerConcurrency;
    }
    if i.at_ceiling {
        return Binding::ConfiguredCap;
    }
    match o.scan_secs {
        Some(mean) if i.poll_interval.as_secs_f64() >= mean => Binding::PollInterval,
        _ => Binding::ScanTime,
    }
}

impl Limits {
    /// The limits now, as a plain value.
    pub fn snapshot(&self) -> LimitsSnapshot {
        let inner = &self.inner;
        let (mode, cap, learned, ceiling) = {
            let c = lock(&inner.cap);
            let (mode, ceiling) = match c.aimd.mode() {
                Mode::Auto { ceiling } => ("auto", ceiling),
                Mode::Fixed { ceiling } => ("fixed", ceiling),
            };
            (mode, c.aimd.cap(), c.aimd.learned(), ceiling)
        };
        let in_flight = inner.on_server.load(Ordering::Relaxed);
        let mut o = lock(&inner.observer);
        LimitsSnapshot {
            mode: mode.to_owned(),
            cap,
            learned,
            ceiling,
            in_flight,
            mean_scan_secs: o.scan_secs,
            files_per_hour: o.files_per_hour(Instant::now()),
            binding: o.binding,
            throttled: o.throttled,
            updated_at: crate::journal::now_ms(),
        }
    }

    /// One sample a second; decides the binding limit every [`EVALUATE_EVERY`]. Returns the new
    /// binding when it changed.
    fn observe(&self, elapsed: Duration, evaluate: bool) -> Option<Binding> {
        let inner = &self.inner;
        let (saturated, at_ceiling) = {
            let c = lock(&inner.cap);
            let held = (c.aimd.cap() + c.debt).saturating_sub(inner.sem.available_permits());
            (held >= c.aimd.cap(), c.aimd.at_ceiling())
        };
        let rate_wait = Duration::from_nanos(inner.rate_wait_ns.swap(0, Ordering::Relaxed));
        let now = Instant::now();
        let inputs = Inputs {
            health: self.health(),
            at_ceiling,
            poll_interval: inner.poll_interval,
        };
        let mut o = lock(&inner.observer);
        o.sample(saturated, rate_wait, elapsed);
        if !evaluate {
            return None;
        }
        let candidate = decide(&o, &inputs, now);
        if candidate == o.candidate.0 {
            o.candidate.1 += 1;
        } else {
            o.candidate = (candidate, 1);
        }
        if o.candidate.1 >= 2 && candidate != o.binding {
            o.binding = candidate;
            return Some(candidate);
        }
        None
    }

    /// Saves the learned capacity and the snapshot in the journal now.
    pub async fn save(&self, journal: &Journal) -> LimitsSnapshot {
        let snap = self.snapshot();
        let learned = (snap.mode == "auto" && snap.learned > 0).then_some(snap.learned);
        if let Err(e) = journal.save_capacity(learned, snap.to_json()).await {
            tracing::debug!(error = %e, "could not save the limits in the journal");
        }
        snap
    }

    /// The tuner: samples, decides and logs the binding limit, saves the snapshot; until
    /// shutdown.
    pub(super) async fn run_tuner(self, journal: Journal, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let evaluate_every = (EVALUATE_EVERY.as_secs() / SAMPLE_EVERY.as_secs()).max(1);
        let mut n: u64 = 0;
        let mut last = Instant::now();
        let mut saved: Option<(Instant, LimitsSnapshot)> = None;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            n += 1;
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(last);
            last = now;
            if let Some(b) = self.observe(elapsed, n % evaluate_every == 0) {
                let s = self.snapshot();
                tracing::info!(
                    binding = b.as_str(),
                    cap = s.cap,
                    learned = s.learned,
                    in_flight = s.in_flight,
                    mean_scan_secs = s.mean_scan_secs.map(|m| (m * 10.0).round() / 10.0),
                    files_per_hour = s.files_per_hour.round(),
                    throttled = s.throttled,
                    "throughput is now bound by {b}"
                );
            }
            let current = self.snapshot();
            let due = saved.as_ref().is_none_or(|(at, snap)| {
                // The first finished scan is saved at the next sample, not up to SAVE_EVERY
                // later: `status` right after the first files went through shows their scan
                // time, not "none finished yet".
                let first_finished =
                    snap.mean_scan_secs.is_none() && current.mean_scan_secs.is_some();
                first_finished
                    || now.saturating_duration_since(*at) >= SAVE_EVERY
                        && (!snap.same_as(&current)
                            || now.saturating_duration_since(*at) >= SAVE_EVERY * 20)
            });
            if due {
                saved = Some((now, self.save(&journal).await));
            }
        }
        // Slots dropped from now on are scans abandoned at shutdown, not finished ones. The
        // last save is `finish`'s, awaited by the uploader while the journal still runs.
        self.inner.closing.store(true, Ordering::Relaxed);
    }

    /// At shutdown: stops counting dropped slots as finished scans and saves the snapshot and
    /// the learned capacity one last time.
    pub async fn finish(&self, journal: &Journal) {
        self.inner.closing.store(true, Ordering::Relaxed);
        self.save(journal).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(at_ceiling: bool, poll: u64) -> Inputs {
        Inputs {
            health: Health::Up,
            at_ceiling,
            poll_interval: Duration::from_secs(poll),
        }
    }

    #[test]
    fn the_binding_limit_follows_what_holds_submissions_back() {
        let now = Instant::now();
        let mut o = Observer::new();
        // Slots free: input.
        assert_eq!(decide(&o, &inputs(false, 60), now), Binding::Input);
        o.saturation = 0.9;
        o.scan_secs = Some(100.0);
        // Slots full, no 429, below the ceiling: the scans take the time.
        assert_eq!(decide(&o, &inputs(false, 60), now), Binding::ScanTime);
        // Scans that wait for the poll more than they take.
        assert_eq!(decide(&o, &inputs(false, 120), now), Binding::PollInterval);
        // Pinned (or at the ceiling) without 429s: the configured cap.
        assert_eq!(decide(&o, &inputs(true, 60), now), Binding::ConfiguredCap);
        // 429s lately: the server's concurrency, pinned or not.
        o.last_429 = Some(now);
        assert_eq!(
            decide(&o, &inputs(true, 60), now),
            Binding::ServerConcurrency
        );
        assert_eq!(
            decide(
                &o,
                &inputs(false, 60),
                now + THROTTLE_MEMORY + Duration::from_secs(1)
            ),
            Binding::ScanTime
        );
        // Waiting for the rate limiter beats everything but an outage.
        o.rate_busy = 0.5;
        assert_eq!(decide(&o, &inputs(false, 60), now), Binding::RateLimit);
        let down = Inputs {
            health: Health::Down,
            ..inputs(false, 60)
        };
        assert_eq!(decide(&o, &down, now), Binding::Unavailable);
    }
}
