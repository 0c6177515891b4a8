//! Limits: what the server allows and how hard we may push it.
//!
//! - **Restrictions**: `maxObjectSize` from `GET scans/filters`, fetched at start-up, refreshed
//!   periodically and after a 413; the last known value is kept when a refresh fails.
//! - **Rate**: one governor limiter for every request to the server (`requests_per_second`).
//!   governor's own `until_ready()` sleeps on a clock tokio does not control, so we loop on
//!   `check()` and `tokio::time::sleep`.
//! - **In flight**: scans submitted and not finished are capped by permits taken *before* the
//!   upload starts and released when the verdict is final. The cap adapts to 429: it shrinks by
//!   one on every 429 and grows back by one after a run of accepted submissions.
//! - **Gate**: the server's health as the pipeline sees it. Transient failures (429, 5xx,
//!   transport) pause submissions with capped, jittered exponential backoff; a 401 pauses them
//!   until the integration is accepted. Each change of state is logged once, not per request.
//!
//! This module does no I/O except the restrictions refresh through the client.

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::kata::{ApiError, KataClient, Restrictions};

/// First backoff after a transient failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest backoff between tries while the server is down.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Accepted submissions in a row before the in-flight cap grows by one.
const GROW_AFTER: usize = 4;

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
    sem: Arc<Semaphore>,
    cap: Mutex<CapState>,
    max_in_flight: usize,
    max_object_size: AtomicU64,
    gate: Mutex<GateState>,
    /// Woken when the server answers again, so that paused submissions resume at once rather
    /// than at the end of their backoff.
    recovered: Notify,
}

struct CapState {
    /// The current cap.
    cap: usize,
    /// Permits to retire instead of releasing (after a shrink).
    debt: usize,
    /// Accepted submissions since the last change.
    streak: usize,
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
    failures: u32,
    paused_until: Option<Instant>,
}

/// One scan in flight. Dropping it frees the slot (or retires it, after a shrink).
pub struct InFlight {
    permit: Option<OwnedSemaphorePermit>,
    limits: Limits,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let mut cap = lock(&self.limits.inner.cap);
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
    /// New limits with the configured cap and rate.
    pub fn new(max_in_flight: NonZeroUsize, requests_per_second: NonZeroU32) -> Self {
        let max = max_in_flight.get();
        Limits {
            inner: Arc::new(Inner {
                rate: RateLimiter::direct(Quota::per_second(requests_per_second)),
                clock: DefaultClock::default(),
                sem: Arc::new(Semaphore::new(max)),
                cap: Mutex::new(CapState {
                    cap: max,
                    debt: 0,
                    streak: 0,
                }),
                max_in_flight: max,
                max_object_size: AtomicU64::new(0),
                gate: Mutex::new(GateState {
                    health: Health::Up,
                    failures: 0,
                    paused_until: None,
                }),
                recovered: Notify::new(),
            }),
        }
    }

    /// Waits for the rate limiter's next slot.
    pub async fn rate(&self) {
        loop {
            match self.inner.rate.check() {
                Ok(()) => return,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.inner.clock.now());
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                }
            }
        }
    }

    /// Waits for a free in-flight slot.
    pub async fn acquire(&self) -> InFlight {
        let permit = Arc::clone(&self.inner.sem).acquire_owned().await.ok();
        InFlight {
            permit,
            limits: self.clone(),
        }
    }

    /// A slot for a scan that is already in flight (found in the journal at start-up): takes a
    /// free permit if there is one, else runs over the cap until it finishes.
    pub fn adopt(&self) -> InFlight {
        InFlight {
            permit: Arc::clone(&self.inner.sem).try_acquire_owned().ok(),
            limits: self.clone(),
        }
    }

    /// The current in-flight cap.
    pub fn cap(&self) -> usize {
        lock(&self.inner.cap).cap
    }

    /// Free slots now (for tests of the cap).
    #[cfg(test)]
    fn available(&self) -> usize {
        self.inner.sem.available_permits()
    }

    /// The server said 429: shrink the cap by one (never below one).
    pub fn throttled(&self) {
        let mut cap = lock(&self.inner.cap);
        cap.streak = 0;
        if cap.cap > 1 {
            cap.cap -= 1;
            match self.inner.sem.try_acquire() {
                Ok(p) => p.forget(),
                Err(_) => cap.debt += 1,
            }
            tracing::info!(cap = cap.cap, "server busy (429): fewer scans in flight");
        }
    }

    /// A submission was accepted: after a run of them, grow the cap back by one.
    pub fn accepted(&self) {
        let mut cap = lock(&self.inner.cap);
        if cap.cap >= self.inner.max_in_flight {
            return;
        }
        cap.streak += 1;
        if cap.streak >= GROW_AFTER.min(cap.cap.max(1)) {
            cap.streak = 0;
            cap.cap += 1;
            if cap.debt > 0 {
                cap.debt -= 1;
            } else {
                self.inner.sem.add_permits(1);
            }
            tracing::debug!(cap = cap.cap, "scans in flight cap raised");
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

    /// Fetches the restrictions now; keeps the last known value on failure.
    pub async fn refresh(&self, client: &KataClient) -> Result<(), ApiError> {
        self.rate().await;
        match client.restrictions().await {
            Ok(r) => {
                self.set_restrictions(&r);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not fetch the server restrictions; keeping the last known");
                Err(e)
            }
        }
    }

    /// The server's state.
    pub fn health(&self) -> Health {
        lock(&self.inner.gate).health
    }

    /// Waits until submissions may go on (no backoff pause in force) or shutdown.
    pub async fn gate(&self, shutdown: &CancellationToken) {
        loop {
            // Registered before the state is read, so a recovery in between is not missed.
            let recovered = self.inner.recovered.notified();
            tokio::pin!(recovered);
            recovered.as_mut().enable();
            let until = lock(&self.inner.gate).paused_until;
            match until {
                Some(t) if t > Instant::now() => {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return,
                        () = recovered => {}
                        () = tokio::time::sleep_until(t) => {}
                    }
                }
                _ => return,
            }
        }
    }

    /// A request went through: the server is up. Logs the recovery once.
    pub fn server_ok(&self) {
        let mut g = lock(&self.inner.gate);
        let was_paused = g.paused_until.is_some();
        if g.health != Health::Up {
            tracing::info!(after_failures = g.failures, "KATA answers again: resuming");
        }
        g.health = Health::Up;
        g.failures = 0;
        g.paused_until = None;
        drop(g);
        if was_paused {
            self.inner.recovered.notify_waiters();
        }
    }

    /// A request failed; pauses submissions accordingly. Returns the pause.
    pub fn server_failed(&self, err: &ApiError) -> Duration {
        let mut g = lock(&self.inner.gate);
        g.failures = g.failures.saturating_add(1);
        let new = match err {
            ApiError::Unauthorized { .. } => Health::Unauthorized,
            _ => Health::Down,
        };
        // At least what the server asked for in Retry-After (capped by the client).
        let pause =
            backoff(g.failures, rand::random::<f64>()).max(err.retry_after().unwrap_or_default());
        g.paused_until = Some(Instant::now() + pause);
        if g.health != new {
            match new {
                Health::Unauthorized => tracing::error!(
                    error = %err,
                    "submissions paused: the server refuses this sensor; accept the integration request in the KATA web UI (External systems). Retrying."
                ),
                _ => tracing::warn!(
                    error = %err,
                    cause = %crate::error::root_cause(err),
                    "KATA unavailable: submissions paused, retrying with backoff (files wait in staging)"
                ),
            }
            g.health = new;
        }
        if matches!(err, ApiError::Busy { .. }) {
            drop(g);
            self.throttled();
        }
        pause
    }
}

/// Capped exponential backoff with full jitter on the upper half: `attempt` counts from 1,
/// `jitter` is in [0, 1).
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let ceiling = exp.min(BACKOFF_MAX);
    let half = ceiling / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff(1, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(1, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(3, 0.0), Duration::from_millis(1000));
        assert_eq!(backoff(30, 1.0), BACKOFF_MAX);
        assert!(backoff(30, 0.0) >= BACKOFF_MAX / 2);
    }

    #[tokio::test]
    async fn cap_shrinks_on_429_and_grows_back() {
        let l = Limits::new(
            NonZeroUsize::new(4).unwrap(),
            NonZeroU32::new(1000).unwrap(),
        );
        let a = l.acquire().await;
        let b = l.acquire().await;
        l.throttled();
        l.throttled();
        assert_eq!(l.cap(), 2);
        // Two permits were free and are retired at once.
        assert_eq!(l.available(), 0);
        l.throttled();
        assert_eq!(l.cap(), 1);
        drop(a); // retired (debt)
        assert_eq!(l.available(), 0);
        drop(b);
        assert_eq!(l.available(), 1);
        for _ in 0..20 {
            l.accepted();
        }
        assert_eq!(l.cap(), 4);
        assert_eq!(l.available(), 4);
    }

    #[tokio::test]
    async fn gate_logs_state_changes_and_pauses() {
        let l = Limits::new(
            NonZeroUsize::new(1).unwrap(),
            NonZeroU32::new(1000).unwrap(),
        );
        assert_eq!(l.health(), Health::Up);
        let p = l.server_failed(&ApiError::Server {
            status: 503,
            retry_after: None,
        });
        assert!(p <= BACKOFF_MIN);
        assert_eq!(l.health(), Health::Down);
        l.server_ok();
        assert_eq!(l.health(), Health::Up);
        l.gate(&CancellationToken::new()).await;
    }

    #[tokio::test]
    async fn retry_after_on_429_or_503_sets_the_minimum_pause() {
        let l = Limits::new(
            NonZeroUsize::new(1).unwrap(),
            NonZeroU32::new(1000).unwrap(),
        );
        let wait = Duration::from_secs(90);
        let p = l.server_failed(&ApiError::Busy {
            retry_after: Some(wait),
        });
        assert!(p >= wait, "{p:?}");
        let p = l.server_failed(&ApiError::Server {
            status: 503,
            retry_after: Some(wait),
        });
        assert!(p >= wait, "{p:?}");
    }
}
