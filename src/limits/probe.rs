//! The restrictions request as the health probe: an idle agent hears nothing from the server,
//! so it asks (`GET scans/filters`) when it has heard nothing for `server.health_probe`, and
//! every answer of that request, at start, periodic or after a 413, feeds the gate's health.

use std::time::Duration;

use tokio::time::Instant;

use super::{Limits, lock};
use crate::scanner::{ApiError, Scanner};

impl Limits {
    /// Fetches the restrictions now; keeps the last known value on failure. The answer is
    /// evidence of the server's health like any other: a refusal (401) marks it unauthorized,
    /// two failures in a row with no success between mark it down, an answer marks it up (a
    /// server without the route, 404/405, answers too). This is the health probe of an idle
    /// agent ([`Limits::probe_due`]).
    pub async fn refresh(&self, client: &Scanner) -> Result<(), ApiError> {
        self.rate().await;
        match client.restrictions().await {
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
    /// if it never did).
    pub fn probe_due(&self, every: Duration) -> Instant {
        lock(&self.inner.gate)
            .last_heard
            .map_or_else(Instant::now, |t| t + every)
    }
}
