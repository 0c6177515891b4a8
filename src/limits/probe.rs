//! The restrictions request as the health probe: an idle agent hears nothing from the server,
//! so it asks (`GET scans/filters`) when it has heard nothing for `server.health_probe`, and
//! every answer of that request, at start, periodic or after a 413, feeds the gate's health.

use std::time::Duration;

use tokio::time::Instant;

use super::{Limits, lock};
use crate::scanner::{ApiError, Restrictions, Scanner};

/// The part of `health_probe` a probe may wait for an answer, and after which a failed probe is
/// confirmed by another: the second failure in a row marks the server down, so a server that
/// never answers is found out within two intervals of its last answer (probe at 1, given up at
/// 1¼, confirmed at 1½, given up at 1¾).
const PROBE_SHARE: u32 = 4;

impl Limits {
    /// Fetches the restrictions now; keeps the last known value on failure. The answer is
    /// evidence of the server's health like any other: a refusal (401) marks it unauthorized,
    /// two failures in a row with no success between mark it down, an answer marks it up (a
    /// server without the route, 404/405, answers too).
    pub async fn refresh(&self, client: &Scanner) -> Result<(), ApiError> {
        self.rate().await;
        let answer = client.restrictions().await;
        self.heard(answer)
    }

    /// The health probe of an idle agent ([`Limits::probe_due`]): [`Limits::refresh`] with an
    /// answer awaited for a quarter of `every` at most (never more than the request timeout).
    pub async fn probe(&self, client: &Scanner, every: Duration) -> Result<(), ApiError> {
        self.rate().await;
        let answer = client.probe(every / PROBE_SHARE).await;
        self.heard(answer)
    }

    fn heard(&self, answer: Result<Restrictions, ApiError>) -> Result<(), ApiError> {
        match answer {
            Ok(r) => {
                self.set_restrictions(&r);
                self.server_ok();
                Ok(())
            }
            Err(e @ ApiError::Rejected { .. }) => {
                self.server_ok();
                Err(e)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not fetch the server restrictions; keeping the last known");
                self.failed(&e, true);
                Err(e)
            }
        }
    }

    /// When an idle agent should ask the server next: `every` after it last heard from it (now,
    /// if it never did); a quarter of `every` after a failed restrictions request, to confirm
    /// it.
    pub fn probe_due(&self, every: Duration) -> Instant {
        let g = lock(&self.inner.gate);
        let wait = if g.refresh_failed {
            every / PROBE_SHARE
        } else {
            every
        };
        g.last_heard.map_or_else(Instant::now, |t| t + wait)
    }
}
