//! The in-flight cap as a pure state machine: AIMD on the server's 429 answers.
//!
//! Only the server knows how many scans it takes at once; it says so only by answering 429. The
//! cap therefore probes:
//!
//! - **Slow start** (until the first 429 of this run): +1 per accepted submission while every
//!   slot is taken, i.e. the cap doubles per round of scans. It starts from the capacity learned
//!   by an earlier run (kept in the journal) or from [`START_CAP`]. Overshooting costs little: the
//!   first submission past the server's limit is answered 429 at once and simply waits.
//! - **Multiplicative decrease** on a 429: the cap is cut to ×0.5…×0.75 (jittered, so that
//!   sensors sharing a server do not cut and probe in step), at most once per window: a 429 for
//!   a submission whose slot was taken before the last cut (its `generation` is older) belongs
//!   to the burst already answered and changes nothing. So a burst of 429s cuts once, never down
//!   to 1. The number of scans the server held when it refused becomes the learned capacity.
//! - **Fast recovery**: below the learned capacity the cap grows +1 per accepted submission
//!   again (the server took that many a moment ago); at or above it, **additive increase**: +1
//!   per cap's worth of accepted submissions, i.e. +1 per round of scans. With a server limit of
//!   L this spends one round at L, probes L+1, is refused once, dips and refills: the cut only
//!   holds back new submissions until enough scans finished, so the server stays nearly full.
//!
//! Growth only happens while the cap is what holds submissions back (every slot taken): an idle
//! agent does not inflate it. The floor is 1 and the ceiling `server.max_in_flight_ceiling`.
//!
//! A pinned cap (`max_in_flight = N`) is a ceiling, not a promise to the server: it starts at N
//! and never grows past it, but a 429 cuts it like any other, and it recovers the same way (fast
//! to what the server took, then +1 per round, back up to N). It only skips slow start and the
//! capacity learned by an earlier run. (Pinned at 16 against a server taking 3, holding the cap
//! drew 110 answers of 429 for 30 files.)
//!
//! This file does no I/O and reads no clock; `Limits` applies the changes to the semaphore.

/// Cap of a first run, before anything is learned.
pub const START_CAP: usize = 4;
/// Smallest multiplicative decrease factor (the jitter spans this to [`BETA_MAX`]).
pub(super) const BETA_MIN: f64 = 0.5;
/// Largest multiplicative decrease factor.
pub(super) const BETA_MAX: f64 = 0.75;

/// Whether the cap adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Learned from 429s, up to this ceiling.
    Auto {
        /// The cap never grows past this.
        ceiling: usize,
    },
    /// Pinned: starts at this ceiling, cut by 429s below it, never above it.
    Fixed {
        /// The configured number: the cap never grows past this.
        ceiling: usize,
    },
}

/// The cap and what was learned.
#[derive(Debug, Clone)]
pub(super) struct Aimd {
    mode: Mode,
    cap: usize,
    /// Scans the server held when it last refused one (or the most it accepted since): the
    /// server's capacity as far as this agent can tell; 0 = unknown.
    learned: usize,
    /// True until the first 429 of this run.
    slow_start: bool,
    /// Accepted submissions since the last additive step.
    streak: usize,
    /// Bumped on every cut: slots taken before it belong to the old window.
    generation: u64,
}

impl Aimd {
    /// A cap pinned at `n` (at least 1): starts there, a 429 still cuts it.
    pub(super) fn fixed(n: usize) -> Self {
        Aimd {
            mode: Mode::Fixed { ceiling: n.max(1) },
            cap: n.max(1),
            learned: 0,
            slow_start: false,
            streak: 0,
            generation: 0,
        }
    }

    /// An adaptive cap starting at `learned` (from an earlier run) or [`START_CAP`].
    pub(super) fn auto(ceiling: usize, learned: Option<usize>) -> Self {
        let ceiling = ceiling.max(1);
        let learned = learned.unwrap_or(0).min(ceiling);
        Aimd {
            mode: Mode::Auto { ceiling },
            cap: if learned > 0 { learned } else { START_CAP }.clamp(1, ceiling),
            learned,
            slow_start: true,
            streak: 0,
            generation: 0,
        }
    }

    /// The current cap.
    pub(super) fn cap(&self) -> usize {
        self.cap
    }

    /// The learned capacity (0 = nothing learned yet).
    pub(super) fn learned(&self) -> usize {
        self.learned
    }

    /// The mode.
    pub(super) fn mode(&self) -> Mode {
        self.mode
    }

    /// The current window; a slot remembers the window it was taken in.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The most the cap may grow to.
    pub(super) fn ceiling(&self) -> usize {
        match self.mode {
            Mode::Auto { ceiling } | Mode::Fixed { ceiling } => ceiling,
        }
    }

    /// Whether the cap is at its ceiling.
    pub(super) fn at_ceiling(&self) -> bool {
        self.cap >= self.ceiling()
    }

    /// Adopts a capacity learned by an earlier run, read after start-up (never lowers what this
    /// run learned itself). Returns the change of the cap.
    pub(super) fn restore(&mut self, learned: usize) -> isize {
        let Mode::Auto { ceiling } = self.mode else {
            return 0;
        };
        if learned == 0 || self.learned > 0 {
            return 0;
        }
        self.learned = learned.min(ceiling);
        let old = self.cap;
        self.cap = self.cap.max(self.learned);
        delta(old, self.cap)
    }

    /// A submission was accepted; `on_server` scans are now in flight (this one included) and
    /// `saturated` says whether every slot was taken. Returns the change of the cap.
    pub(super) fn accepted(&mut self, on_server: usize, saturated: bool) -> isize {
        let ceiling = self.ceiling();
        self.learned = self.learned.max(on_server.min(ceiling));
        if !saturated || self.cap >= ceiling {
            return 0;
        }
        let old = self.cap;
        if self.slow_start || self.cap < self.learned {
            self.cap += 1;
        } else {
            self.streak += 1;
            if self.streak >= self.cap {
                self.streak = 0;
                self.cap += 1;
            }
        }
        delta(old, self.cap)
    }

    /// The server answered 429 to a submission whose slot was taken in window `generation`,
    /// with `on_server` scans in flight; `jitter` is in [0, 1). Returns the change of the cap.
    pub(super) fn throttled(&mut self, generation: u64, on_server: usize, jitter: f64) -> isize {
        let ceiling = self.ceiling();
        if generation < self.generation {
            return 0; // Part of a burst already answered.
        }
        self.generation += 1;
        self.slow_start = false;
        self.streak = 0;
        self.learned = on_server.clamp(1, ceiling);
        let beta = BETA_MIN + (BETA_MAX - BETA_MIN) * jitter.clamp(0.0, 1.0);
        let old = self.cap;
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let cut = (old as f64 * beta).floor() as usize;
        self.cap = cut.max(1);
        delta(old, self.cap)
    }
}

fn delta(old: usize, new: usize) -> isize {
    let signed = |n: usize| isize::try_from(n).unwrap_or(isize::MAX);
    signed(new) - signed(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_grows_per_accept_until_the_first_429() {
        let mut a = Aimd::auto(1000, None);
        assert_eq!(a.cap(), START_CAP);
        for i in 0..10 {
            assert_eq!(a.accepted(START_CAP + i, true), 1);
        }
        assert_eq!(a.cap(), START_CAP + 10);
        // Not saturated: no growth.
        assert_eq!(a.accepted(3, false), 0);
    }

    #[test]
    fn additive_increase_after_the_first_429() {
        let mut a = Aimd::auto(1000, Some(20));
        assert_eq!(a.cap(), 20);
        let g = a.generation();
        assert!(a.throttled(g, 20, 0.0) < 0);
        assert_eq!(a.cap(), 10);
        assert_eq!(a.learned(), 20);
        // Fast recovery to the learned capacity: +1 per accept.
        for _ in 0..10 {
            a.accepted(15, true);
        }
        assert_eq!(a.cap(), 20);
        // Then +1 per cap's worth of accepts.
        for _ in 0..19 {
            assert_eq!(a.accepted(20, true), 0);
        }
        assert_eq!(a.accepted(20, true), 1);
        assert_eq!(a.cap(), 21);
    }

    #[test]
    fn a_cut_is_jittered_between_half_and_three_quarters() {
        for jitter in [0.0, 0.3, 0.999] {
            let mut a = Aimd::auto(1000, Some(100));
            a.throttled(0, 100, jitter);
            assert!((50..=75).contains(&a.cap()), "{}", a.cap());
        }
        let mut a = Aimd::auto(1000, Some(1));
        a.throttled(0, 1, 0.0);
        assert_eq!(a.cap(), 1);
    }

    #[test]
    fn a_pinned_cap_is_a_ceiling_that_429_still_cuts() {
        let mut a = Aimd::fixed(8);
        assert!(a.at_ceiling());
        // Never past the pinned number, and nothing learned earlier is restored.
        assert_eq!(a.accepted(8, true), 0);
        assert_eq!(a.restore(40), 0);
        assert_eq!(a.cap(), 8);
        // A 429 cuts it (once per burst), and it recovers up to the pin, not beyond.
        let g = a.generation();
        assert!(a.throttled(g, 3, 0.0) < 0);
        assert_eq!(a.cap(), 4);
        assert_eq!(a.learned(), 3);
        assert_eq!(a.throttled(g, 3, 0.0), 0, "the same burst cuts once");
        for _ in 0..100 {
            a.accepted(8, true);
        }
        assert_eq!(a.cap(), 8);
        assert!(a.at_ceiling());
    }

    #[test]
    fn restore_raises_a_fresh_cap_only() {
        let mut a = Aimd::auto(30, None);
        assert_eq!(a.restore(50), 30 - START_CAP as isize);
        assert_eq!(a.learned(), 30);
        assert_eq!(a.restore(10), 0);
    }
}
