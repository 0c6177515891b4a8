//! Capped exponential backoff, the one rule every retry loop follows: the KATA client's pauses
//! (`limits`), hook deliveries (`hooks`), the sorter's retries; and the results poller's
//! [`Pace`], which backs off the same way in one-shot runs.
//!
//! It owns the arithmetic only; when to retry and what a failure is stays with the caller.

use std::time::Duration;

use tokio::time::Instant;

/// The first results request after a submission in a one-shot run comes this soon.
pub(crate) const EARLY_POLL: Duration = Duration::from_secs(1);

/// Waits doubling from `min` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// The wait before the second attempt (after one failure), before jitter.
    pub min: Duration,
    /// No wait is longer.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `min` doubling up to `max`.
    pub(crate) const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max }
    }

    /// The full wait after `attempt` failures (counting from 1): `min · 2^(attempt-1)`, capped
    /// at `max`, without jitter.
    pub(crate) fn ceiling(self, attempt: u32) -> Duration {
        self.min
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max)
    }

    /// The wait after `attempt` failures with jitter on the upper half: `jitter` in [0, 1)
    /// picks between half of [`Backoff::ceiling`] and all of it, so that many clients failing
    /// together do not retry together.
    pub(crate) fn wait(self, attempt: u32, jitter: f64) -> Duration {
        let half = self.ceiling(attempt) / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// When the results poller asks next. A daemon asks every `poll_interval` (the vendor's
/// advice: once a minute). A one-shot run, with someone waiting for it, asks [`EARLY_POLL`]
/// after each submission and backs off from there up to `poll_interval`: a scan of a few
/// seconds is answered in a few seconds, a long one costs a request per `poll_interval`.
#[derive(Debug, Clone)]
pub(crate) struct Pace {
    /// `None`: steady.
    early: Option<Backoff>,
    every: Duration,
    /// Requests since the last submission.
    step: u32,
    next: Instant,
}

impl Pace {
    /// Every `every`, the first request at once; early after each submission when `early`.
    pub(crate) fn new(every: Duration, early: bool) -> Pace {
        Pace {
            early: early.then(|| Backoff::new(EARLY_POLL.min(every), every)),
            every,
            step: 0,
            next: Instant::now(),
        }
    }

    /// When the next request is due.
    pub(crate) fn due(&self) -> Instant {
        self.next
    }

    /// A scan was submitted: in early mode, the next request comes [`EARLY_POLL`] from now at
    /// the latest, and the backoff starts again.
    pub(crate) fn submitted(&mut self) {
        if let Some(b) = self.early {
            self.step = 0;
            self.next = self.next.min(Instant::now() + b.ceiling(1));
        }
    }

    /// A request was made (or was due with nothing to ask): the next one.
    pub(crate) fn asked(&mut self) {
        self.step = self.step.saturating_add(1);
        let wait = match self.early {
            Some(b) => b.ceiling(self.step),
            None => self.every,
        };
        self.next = Instant::now() + wait;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_one_shot_pace_asks_soon_after_a_submission_then_backs_off_to_the_interval() {
        let minute = Duration::from_secs(60);
        let start = Instant::now();
        let mut steady = Pace::new(minute, false);
        assert_eq!(steady.due(), start);
        steady.asked();
        steady.submitted();
        assert_eq!(steady.due(), start + minute, "a daemon keeps its interval");

        let mut early = Pace::new(minute, true);
        early.asked();
        assert_eq!(early.due(), start + Duration::from_secs(1));
        early.submitted();
        assert_eq!(early.due(), start + EARLY_POLL);
        let mut waits = Vec::new();
        for _ in 0..8 {
            early.asked();
            waits.push(early.due() - start);
        }
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        early.submitted();
        assert_eq!(
            early.due(),
            start + EARLY_POLL,
            "a new submission starts it again"
        );
    }

    #[test]
    fn doubles_caps_and_jitters_on_the_upper_half() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        assert_eq!(b.ceiling(1), Duration::from_secs(1));
        assert_eq!(b.ceiling(3), Duration::from_secs(4));
        assert_eq!(b.ceiling(40), Duration::from_secs(10));
        assert_eq!(b.wait(3, 0.0), Duration::from_secs(2));
        assert_eq!(b.wait(3, 1.0), Duration::from_secs(4));
        assert_eq!(b.wait(3, 7.0), Duration::from_secs(4), "jitter is clamped");
    }
}
