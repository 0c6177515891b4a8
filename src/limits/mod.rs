//! Limits: what the server allows and how hard we may push it.
//!
//! - **Restrictions**: `maxObjectSize` from `GET scans/filters`, fetched at start-up, refreshed
//!   periodically and after a 413; the last known value is kept when a refresh fails.
//! - **Rate**: one governor limiter for every request to the server (`requests_per_second`).
//!   governor's own `until_ready()` sleeps on a clock tokio does not control, so we loop on
//!   `check()` and `tokio::time::sleep`. The time spent waiting is measured (see `observe`).
//! - **In flight**: scans submitted and not finished are capped by permits taken *before* the
//!   upload starts and released when the verdict is final. With `max_in_flight = "auto"` the
//!   cap is learned from the server's 429 answers by AIMD (`aimd.rs`: slow start, cut ×0.5–0.75
//!   with jitter once per burst, fast recovery to the learned capacity, then +1 per round), the
//!   learned capacity is kept in the journal and restored at start; a number pins the cap's
//!   ceiling (429s still cut it below, see `aimd.rs`). When
//!   the cap shrinks below the scans in flight, the permits they hold are retired as they come
//!   back (*debt*), so there are never more uploads than the cap, except scans adopted at
//!   start-up, which run over it when no permit is free. Only a 429 to a *submission* moves the
//!   cap; a 429 to a results request pauses the gate like any transient failure.
//! - **Observation** (`observe.rs`): mean scan time, files per hour, which limit binds now (one
//!   info line per change), a [`LimitsSnapshot`] for status and metrics, saved in the journal by
//!   the tuner task that [`Limits::start`] spawns.
//! - **Gate**: the server's health as the pipeline sees it. Transient failures (429, 5xx,
//!   transport) pause submissions with capped, jittered exponential backoff; a 401 pauses them
//!   until the integration is accepted. When a pause ends, **one** submission probes the server
//!   and the others wait for its answer (or for another pause's length, if it never comes):
//!   retries after a wait are spread, never a herd of every queued upload at once. A 429's pause
//!   ends only with an accepted submission (a results request that went through says nothing
//!   about the server's room for scans); an outage's pause ends with any answer.
//! - **Health** changes only on evidence: `Down` once requests have failed for
//!   [`DOWN_AFTER`] with no success between (a 500 now and then among answers is a blip: it
//!   pauses submissions, not the agent's health), or after two failed restrictions requests in a
//!   row (the idle agent's probe, `probe.rs`); `Unauthorized` at the first 401. Each change is
//!   logged once, with its cause (the deepest error: "Connection refused", "HTTP 503").
//!
//! This module does no I/O except the restrictions refresh through the client and the snapshot
//! through the journal.

mod aimd;
mod observe;
mod probe;
#[cfg(test)]
mod tests;

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{MaxInFlight, ServerConfig};
use crate::journal::Journal;
use crate::scanner::{ApiError, Restrictions};

pub use aimd::START_CAP;
pub use observe::{Binding, LimitsSnapshot};

/// First backoff after a transient failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest backoff between tries while the server is down.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long requests must fail, with no success between, before the server counts as down.
pub const DOWN_AFTER: Duration = Duration::from_secs(5);

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    governor::middleware::NoOpMiddleware,
>;

/// Shared limits; cheap to clone.
#[derive(Clone)]
pub struct Limits {
    inner: Arc<Inner>,
}

struct Inner {
    rate: Limiter,
    clock: DefaultClock,
    /// Nanoseconds spent waiting in `rate()` since the tuner last looked.
    rate_wait_ns: AtomicU64,
    sem: Arc<Semaphore>,
    cap: Mutex<CapState>,
    /// Scans the server holds for us (accepted or adopted, verdict not final).
    on_server: AtomicUsize,
    observer: Mutex<observe::Observer>,
    poll_interval: Duration,
    /// Set by [`Limits::start`]: the tuner runs.
    started: AtomicBool,
    /// Set at shutdown: slots dropped from now on are not finished scans.
    closing: AtomicBool,
    max_object_size: AtomicU64,
    gate: Mutex<GateState>,
    /// Woken when the server answers again, so that paused submissions resume at once rather
    /// than at the end of their backoff.
    recovered: Notify,
}

struct CapState {
    aimd: aimd::Aimd,
    /// Permits to retire instead of releasing (after a shrink).
    debt: usize,
}

impl CapState {
    /// Applies a change of the cap to the semaphore: new permits pay the debt first; a shrink
    /// retires free permits now and the rest as they come back.
    fn apply(&mut self, sem: &Semaphore, delta: isize) {
        let n = delta.unsigned_abs();
        if delta > 0 {
            let paid = n.min(self.debt);
            self.debt -= paid;
            sem.add_permits(n - paid);
        } else if delta < 0 {
            let retired = sem.forget_permits(n);
            self.debt += n - retired;
        }
    }
}

/// The server's state as seen by the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Answering normally.
    Up,
    /// Transient failures: retrying with backoff.
    Down,
    /// 401: the integration is not accepted (yet, or any more).
    Unauthorized,
}

struct GateState {
    health: Health,
    /// Failures since the last success (429s included: they lengthen the backoff), one per
    /// burst: those that come while a pause is in force do not count.
    failures: u32,
    /// The first failure (429s excluded) since the last success.
    failing_since: Option<Instant>,
    /// The cause of the last failure, for the recovery line.
    last_cause: String,
    paused_until: Option<Instant>,
    /// Why submissions are paused (or probing).
    pause: Pause,
    /// The length of the last pause.
    last_pause: Duration,
    /// A probe is out since a pause ended: other submissions wait until its answer, or until
    /// this time (then another probes).
    probing_until: Option<Instant>,
    /// When a request last came back (answered or failed): an agent that has not heard from
    /// the server for `health_probe` asks it ([`Limits::probe_due`]).
    last_heard: Option<Instant>,
    /// The last restrictions request failed and nothing succeeded since: a second failure in a
    /// row marks the server down at once (an idle agent has no other evidence).
    refresh_failed: bool,
}

/// Why submissions wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pause {
    /// Nothing.
    None,
    /// The server failed (5xx, transport, 401): any answer ends it.
    Outage,
    /// The server is full (429): only an accepted submission ends it.
    Throttle,
}

/// One scan in flight. Dropping it frees the slot (or retires it, after a shrink); a slot whose
/// submission was accepted counts as a finished scan when dropped.
pub struct InFlight {
    permit: Option<OwnedSemaphorePermit>,
    limits: Limits,
    /// The AIMD window the slot was granted in.
    generation: u64,
    /// Held by a scan the server has (accepted or adopted).
    on_server: bool,
    /// When the server accepted it (not for adopted scans).
    since: Option<Instant>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let inner = &self.limits.inner;
        if self.on_server {
            inner.on_server.fetch_sub(1, Ordering::Relaxed);
            if let Some(since) = self.since {
                if !inner.closing.load(Ordering::Relaxed) {
                    lock(&inner.observer).finished(since);
                }
            }
        }
        if let Some(permit) = self.permit.take() {
            let mut cap = lock(&inner.cap);
            if cap.debt > 0 {
                cap.debt -= 1;
                permit.forget();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these small locks leaves consistent data: keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Limits {
    /// New limits with a cap pinned at `max_in_flight` (no adaptation) and this rate.
    pub fn new(max_in_flight: NonZeroUsize, requests_per_second: NonZeroU32) -> Self {
        Self::with(
            aimd::Aimd::fixed(max_in_flight.get()),
            requests_per_second,
            Duration::from_secs(60),
        )
    }

    /// New limits whose cap is learned from 429s, up to `ceiling`, starting at [`START_CAP`]
    /// until [`Limits::start`] restores what an earlier run learned.
    pub fn auto(ceiling: NonZeroUsize, requests_per_second: NonZeroU32) -> Self {
        Self::with(
            aimd::Aimd::auto(ceiling.get(), None),
            requests_per_second,
            Duration::from_secs(60),
        )
    }

    /// The limits `[server]` describes.
    pub fn from_config(server: &ServerConfig) -> Self {
        let aimd = match server.max_in_flight {
            MaxInFlight::Auto => aimd::Aimd::auto(server.max_in_flight_ceiling.get(), None),
            MaxInFlight::Fixed(n) => aimd::Aimd::fixed(n.get()),
        };
        Self::with(aimd, server.requests_per_second, server.poll_interval)
    }

    fn with(aimd: aimd::Aimd, requests_per_second: NonZeroU32, poll_interval: Duration) -> Self {
        Limits {
            inner: Arc::new(Inner {
                rate: RateLimiter::direct(Quota::per_second(requests_per_second)),
                clock: DefaultClock::default(),
                rate_wait_ns: AtomicU64::new(0),
                sem: Arc::new(Semaphore::new(aimd.cap())),
                cap: Mutex::new(CapState { aimd, debt: 0 }),
                on_server: AtomicUsize::new(0),
                observer: Mutex::new(observe::Observer::new()),
                poll_interval,
                started: AtomicBool::new(false),
                closing: AtomicBool::new(false),
                max_object_size: AtomicU64::new(0),
                gate: Mutex::new(GateState {
                    health: Health::Up,
                    failures: 0,
                    failing_since: None,
                    last_cause: String::new(),
                    paused_until: None,
                    pause: Pause::None,
                    last_pause: Duration::ZERO,
                    probing_until: None,
                    last_heard: None,
                    refresh_failed: false,
                }),
                recovered: Notify::new(),
            }),
        }
    }

    /// Restores the capacity learned by an earlier run (auto mode) and spawns the tuner, which
    /// logs the binding limit and saves the snapshot in the journal until `shutdown`. Only the
    /// first call does anything.
    pub async fn start(&self, journal: &Journal, shutdown: &CancellationToken) {
        if self.inner.started.swap(true, Ordering::Relaxed) {
            return;
        }
        match journal.learned_capacity().await {
            Ok(Some(n)) => self.restore(n),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not read the learned server capacity; learning it again")
            }
        }
        tokio::spawn(self.clone().run_tuner(journal.clone(), shutdown.clone()));
    }

    /// Adopts a capacity learned earlier (auto mode; ignored when pinned).
    fn restore(&self, learned: usize) {
        let mut c = lock(&self.inner.cap);
        let delta = c.aimd.restore(learned);
        c.apply(&self.inner.sem, delta);
        if delta != 0 {
            tracing::info!(
                cap = c.aimd.cap(),
                learned = c.aimd.learned(),
                "scans in flight: starting from the server capacity learned earlier"
            );
        }
    }

    /// Waits for the rate limiter's next slot.
    pub async fn rate(&self) {
        loop {
            match self.inner.rate.check() {
                Ok(()) => return,
                Err(not_until) => {
                    let wait = not_until
                        .wait_time_from(self.inner.clock.now())
                        .max(Duration::from_millis(1));
                    self.inner.rate_wait_ns.fetch_add(
                        u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Scans on the server now: accepted or adopted, and their slot not dropped yet.
    pub fn on_server(&self) -> usize {
        self.inner.on_server.load(Ordering::Relaxed)
    }

    /// Waits for a free in-flight slot.
    pub async fn acquire(&self) -> InFlight {
        let permit = Arc::clone(&self.inner.sem).acquire_owned().await.ok();
        InFlight {
            permit,
            limits: self.clone(),
            generation: lock(&self.inner.cap).aimd.generation(),
            on_server: false,
            since: None,
        }
    }

    /// A slot for a scan that is already in flight (found in the journal at start-up): takes a
    /// free permit if there is one, else runs over the cap until it finishes.
    pub fn adopt(&self) -> InFlight {
        self.inner.on_server.fetch_add(1, Ordering::Relaxed);
        InFlight {
            permit: Arc::clone(&self.inner.sem).try_acquire_owned().ok(),
            limits: self.clone(),
            generation: lock(&self.inner.cap).aimd.generation(),
            on_server: true,
            since: None,
        }
    }

    /// The current in-flight cap.
    pub fn cap(&self) -> usize {
        lock(&self.inner.cap).aimd.cap()
    }

    /// The server capacity learned so far (0 = nothing yet, or a pinned cap).
    pub fn learned(&self) -> usize {
        lock(&self.inner.cap).aimd.learned()
    }

    /// Free slots now (for tests of the cap).
    #[cfg(test)]
    fn available(&self) -> usize {
        self.inner.sem.available_permits()
    }

    /// The server answered 429 to the submission holding `slot`: cuts the cap (auto mode), once
    /// per burst. The gate's pause is [`Limits::server_failed`]'s business.
    pub fn throttled(&self, slot: &InFlight) {
        let now = Instant::now();
        {
            let mut o = lock(&self.inner.observer);
            o.throttled = o.throttled.saturating_add(1);
            o.last_429 = Some(now);
        }
        let on_server = self.inner.on_server.load(Ordering::Relaxed);
        let mut c = lock(&self.inner.cap);
        let delta = c
            .aimd
            .throttled(slot.generation, on_server, rand::random::<f64>());
        if delta < 0 {
            c.apply(&self.inner.sem, delta);
            tracing::info!(
                cap = c.aimd.cap(),
                learned = c.aimd.learned(),
                "server busy (429): fewer scans in flight"
            );
        }
    }

    /// The server accepted the submission holding `slot`: from now on the slot is a scan in
    /// flight (its scan time is measured), and the cap may grow (auto mode).
    pub fn accepted(&self, slot: &mut InFlight) {
        // The server took a scan: it has room again, whatever paused submissions.
        self.resume(true);
        if !slot.on_server {
            slot.on_server = true;
            slot.since = Some(Instant::now());
            self.inner.on_server.fetch_add(1, Ordering::Relaxed);
        }
        let on_server = self.inner.on_server.load(Ordering::Relaxed);
        let mut c = lock(&self.inner.cap);
        let held = (c.aimd.cap() + c.debt).saturating_sub(self.inner.sem.available_permits());
        let saturated = held >= c.aimd.cap();
        let delta = c.aimd.accepted(on_server, saturated);
        if delta != 0 {
            c.apply(&self.inner.sem, delta);
            tracing::debug!(cap = c.aimd.cap(), "scans in flight cap raised");
        }
    }

    /// The largest object the server takes, if known.
    pub fn max_object_size(&self) -> Option<u64> {
        match self.inner.max_object_size.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// Records the server's restrictions.
    pub fn set_restrictions(&self, r: &Restrictions) {
        let old = self
            .inner
            .max_object_size
            .swap(r.max_object_size.unwrap_or(0), Ordering::Relaxed);
        if old != r.max_object_size.unwrap_or(0) {
            tracing::info!(
                max_object_size = r.max_object_size,
                version = r.version.as_deref().unwrap_or("?"),
                "server restrictions"
            );
        }
    }

    /// The server's state.
    pub fn health(&self) -> Health {
        lock(&self.inner.gate).health
    }

    /// Waits until submissions may go on or shutdown. After a pause the first caller goes on
    /// as the probe; later ones wait for the probe's answer ([`Limits::server_ok`],
    /// [`Limits::accepted`] or [`Limits::server_failed`]), or for another pause's length.
    pub async fn gate(&self, shutdown: &CancellationToken) {
        loop {
            // Registered before the state is read, so a recovery in between is not missed.
            let recovered = self.inner.recovered.notified();
            tokio::pin!(recovered);
            recovered.as_mut().enable();
            let wait = {
                let mut g = lock(&self.inner.gate);
                let now = Instant::now();
                match (g.paused_until, g.probing_until) {
                    (Some(t), _) | (None, Some(t)) if t > now => t,
                    (None, None) => return,
                    _ => {
                        // The pause (or the last probe's wait) is over: this caller probes.
                        g.paused_until = None;
                        g.probing_until = Some(now + g.last_pause.max(BACKOFF_MIN));
                        return;
                    }
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = recovered => {}
                () = tokio::time::sleep_until(wait) => {}
            }
        }
    }

    /// A request went through: the server is up. Logs the recovery once; ends an outage's
    /// pause (a 429's pause waits for an accepted submission).
    pub fn server_ok(&self) {
        self.resume(false);
    }

    /// Ends the pause (a throttle's too when `accepted`), resets the failure count, and logs a
    /// recovery from `Down` or `Unauthorized` once.
    fn resume(&self, accepted: bool) {
        let mut g = lock(&self.inner.gate);
        g.last_heard = Some(Instant::now());
        g.refresh_failed = false;
        if g.health != Health::Up {
            let down_for = g
                .failing_since
                .map(|t| humantime::format_duration(round_secs(t.elapsed())).to_string());
            tracing::info!(
                after_failures = g.failures,
                down_for = down_for.as_deref().unwrap_or("-"),
                cause = %g.last_cause,
                "KATA answers again: resuming"
            );
        }
        g.health = Health::Up;
        g.failing_since = None;
        let ends = match g.pause {
            Pause::None => false,
            Pause::Outage => true,
            Pause::Throttle => accepted,
        };
        if !ends {
            return;
        }
        g.failures = 0;
        g.paused_until = None;
        g.probing_until = None;
        g.pause = Pause::None;
        drop(g);
        self.inner.recovered.notify_waiters();
    }

    /// A request failed; pauses submissions accordingly. Returns the pause.
    pub fn server_failed(&self, err: &ApiError) -> Duration {
        self.failed(err, false)
    }

    /// [`Limits::server_failed`]; `refresh`: a restrictions request, of which two failing in a
    /// row mark the server down without waiting [`DOWN_AFTER`].
    fn failed(&self, err: &ApiError, refresh: bool) -> Duration {
        let mut g = lock(&self.inner.gate);
        let now = Instant::now();
        g.last_heard = Some(now);
        let confirmed = refresh && std::mem::replace(&mut g.refresh_failed, true);
        let cause = err.cause();
        let new = match err {
            ApiError::Unauthorized { .. } => Health::Unauthorized,
            // A 429 is the server at its limit, not down: with `max_in_flight = "auto"` it is
            // how the cap is learned, so it pauses submissions briefly without a warning.
            ApiError::Busy { .. } => g.health,
            _ => {
                let since = *g.failing_since.get_or_insert(now);
                if g.health == Health::Up
                    && !confirmed
                    && now.saturating_duration_since(since) < DOWN_AFTER
                {
                    Health::Up // A blip, so far.
                } else {
                    Health::Down
                }
            }
        };
        // A burst of failures (every upload in flight refused at once) is one failure: only one
        // that comes while no pause is in force (the probe's, or the first) lengthens the
        // backoff. Otherwise thirteen 429s of one burst would pause for minutes.
        let retry_after = err.retry_after().unwrap_or_default();
        let pause = match g.paused_until {
            Some(until) if until > now => {
                let until = until.max(now + retry_after);
                g.paused_until = Some(until);
                until - now
            }
            _ => {
                g.failures = g.failures.saturating_add(1);
                // At least what the server asked for in Retry-After (capped by the client).
                let pause = backoff(g.failures, rand::random::<f64>()).max(retry_after);
                g.paused_until = Some(now + pause);
                g.last_pause = pause;
                pause
            }
        };
        g.probing_until = None;
        g.pause = match (err, g.pause) {
            // A 429 during an outage leaves the outage's pause (any answer ends it).
            (ApiError::Busy { .. }, Pause::None | Pause::Throttle) => Pause::Throttle,
            _ => Pause::Outage,
        };
        if g.health != new {
            match new {
                Health::Unauthorized => tracing::error!(
                    error = %err,
                    "submissions paused: the server refuses this sensor; accept the integration request in the KATA web UI (External systems). Retrying."
                ),
                _ => tracing::warn!(
                    error = %err,
                    %cause,
                    failures = g.failures,
                    "KATA unavailable: submissions paused, retrying with backoff (files wait in staging)"
                ),
            }
            g.health = new;
        }
        if !matches!(err, ApiError::Busy { .. }) {
            g.last_cause = cause;
        }
        tracing::debug!(error = %err, ?pause, "request failed; submissions paused");
        pause
    }
}

/// `d` rounded to whole seconds, for log lines.
fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Capped exponential backoff ([`BACKOFF_MIN`] doubling up to [`BACKOFF_MAX`]) with jitter on
/// the upper half: `attempt` counts from 1, `jitter` is in [0, 1).
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    crate::backoff::Backoff::new(BACKOFF_MIN, BACKOFF_MAX).wait(attempt, jitter)
}
