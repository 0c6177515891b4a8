//! Metrics and health: counters the stages bump, rendered in the Prometheus text format, and a
//! small HTTP endpoint serving `/metrics`, `/healthz` (the process runs) and `/readyz` (the
//! server answers and the journal works).
//!
//! Counters are plain atomics: the stages never wait on metrics. One gauge is set once at
//! start: `dropscan_client_cert_expiry_timestamp_seconds`, the client certificate's notAfter.
//! The limits' gauges (cap, learned capacity, mean scan time, files per hour, 429s, binding
//! limit) come from `Limits::snapshot()` at each scrape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::journal::Outcome;
use crate::limits::{Health, Limits};

/// The counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Files moved into staging.
    pub claimed: AtomicU64,
    /// Files hashed.
    pub hashed: AtomicU64,
    /// Bytes hashed.
    pub hashed_bytes: AtomicU64,
    /// Submissions accepted by the server.
    pub submitted: AtomicU64,
    /// Bytes uploaded in accepted submissions.
    pub uploaded_bytes: AtomicU64,
    /// Submissions refused with 429.
    pub throttled: AtomicU64,
    /// Requests that failed (any endpoint, any reason).
    pub request_errors: AtomicU64,
    /// `scans/state` requests.
    pub polls: AtomicU64,
    /// Verdicts reused from identical content.
    pub reused: AtomicU64,
    /// Files placed in clean.
    pub placed_clean: AtomicU64,
    /// Files placed in quarantine.
    pub placed_quarantine: AtomicU64,
    /// Files placed in failed.
    pub placed_failed: AtomicU64,
    /// Placement attempts that failed and will be retried.
    pub place_errors: AtomicU64,
    /// Scans in flight now.
    pub in_flight: AtomicI64,
    /// Sum of milliseconds from claim to placement.
    pub latency_ms_sum: AtomicU64,
    /// The client certificate's notAfter in Unix seconds; 0 when unknown (not exported then).
    pub client_cert_expiry: AtomicI64,
}

impl Metrics {
    /// Fresh counters with the client certificate's notAfter (Unix seconds) set, if known.
    pub fn with_client_cert_expiry(not_after: Option<i64>) -> Self {
        let m = Metrics::default();
        m.client_cert_expiry
            .store(not_after.unwrap_or(0), Ordering::Relaxed);
        m
    }

    /// Counts a placement.
    pub fn placed(&self, outcome: Outcome, latency_ms: u64) {
        let c = match outcome {
            Outcome::Clean => &self.placed_clean,
            Outcome::Quarantine => &self.placed_quarantine,
            // Vanished files are never placed; counted with failed if one were.
            Outcome::Failed | Outcome::Vanished => &self.placed_failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.latency_ms_sum.fetch_add(latency_ms, Ordering::Relaxed);
    }

    /// Total files placed.
    pub fn placed_total(&self) -> u64 {
        self.placed_clean.load(Ordering::Relaxed)
            + self.placed_quarantine.load(Ordering::Relaxed)
            + self.placed_failed.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self, limits: &Limits) -> String {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(2048);
        let mut counter = |name: &str, help: &str, v: u64| {
            writeln!(
                out,
                "# HELP dropscan_{name} {help}\n# TYPE dropscan_{name} counter\ndropscan_{name} {v}"
            )
            .ok();
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            "files_claimed_total",
            "Files moved into staging.",
            l(&self.claimed),
        );
        counter("files_hashed_total", "Files hashed.", l(&self.hashed));
        counter("hashed_bytes_total", "Bytes hashed.", l(&self.hashed_bytes));
        counter(
            "scans_submitted_total",
            "Submissions accepted by KATA.",
            l(&self.submitted),
        );
        counter(
            "uploaded_bytes_total",
            "Bytes uploaded in accepted submissions.",
            l(&self.uploaded_bytes),
        );
        counter(
            "throttled_total",
            "Submissions answered 429.",
            l(&self.throttled),
        );
        counter(
            "request_errors_total",
            "Requests to KATA that failed.",
            l(&self.request_errors),
        );
        counter(
            "polls_total",
            "Results requests (one per tick for all scans).",
            l(&self.polls),
        );
        counter(
            "verdicts_reused_total",
            "Verdicts reused for identical content.",
            l(&self.reused),
        );
        counter(
            "place_errors_total",
            "Placements that failed and are retried.",
            l(&self.place_errors),
        );
        counter(
            "placement_latency_ms_sum",
            "Sum of claim-to-placement times.",
            l(&self.latency_ms_sum),
        );
        writeln!(
            out,
            "# HELP dropscan_files_placed_total Files placed, by outcome.\n# TYPE dropscan_files_placed_total counter"
        ).ok();
        for (o, a) in [
            ("clean", &self.placed_clean),
            ("quarantine", &self.placed_quarantine),
            ("failed", &self.placed_failed),
        ] {
            writeln!(
                out,
                "dropscan_files_placed_total{{outcome=\"{o}\"}} {}",
                l(a)
            )
            .ok();
        }
        let up = i32::from(limits.health() == Health::Up);
        writeln!(
            out,
            "# HELP dropscan_scans_in_flight Scans submitted and not finished.\n# TYPE dropscan_scans_in_flight gauge\ndropscan_scans_in_flight {}\n\
             # HELP dropscan_in_flight_cap Current cap on scans in flight (adapts to 429).\n# TYPE dropscan_in_flight_cap gauge\ndropscan_in_flight_cap {}\n\
             # HELP dropscan_server_up 1 when KATA answers normally.\n# TYPE dropscan_server_up gauge\ndropscan_server_up {up}",
            self.in_flight.load(Ordering::Relaxed),
            limits.cap()
        ).ok();
        render_limits(&mut out, &limits.snapshot());
        let expiry = self.client_cert_expiry.load(Ordering::Relaxed);
        if expiry != 0 {
            writeln!(
                out,
                "# HELP dropscan_client_cert_expiry_timestamp_seconds notAfter of the client certificate, Unix seconds.\n# TYPE dropscan_client_cert_expiry_timestamp_seconds gauge\ndropscan_client_cert_expiry_timestamp_seconds {expiry}"
            )
            .ok();
        }
        out
    }
}

/// The gauges of the limits: learned capacity, mean scan time, files per hour, 429s since
/// start, and the binding limit (1 for the one that binds).
fn render_limits(out: &mut String, s: &crate::limits::LimitsSnapshot) {
    use std::fmt::Write as _;
    let mut gauge = |name: &str, help: &str, v: String| {
        writeln!(
            out,
            "# HELP dropscan_{name} {help}\n# TYPE dropscan_{name} gauge\ndropscan_{name} {v}"
        )
        .ok();
    };
    gauge(
        "in_flight_learned_capacity",
        "Scans in flight the server took before answering 429 (0 = not known yet).",
        s.learned.to_string(),
    );
    gauge(
        "scan_seconds_mean",
        "Mean time from acceptance to final verdict (EWMA), seconds.",
        format!("{}", s.mean_scan_secs.unwrap_or(0.0)),
    );
    gauge(
        "files_per_hour",
        "Scans finished per hour, over the last ten minutes.",
        format!("{}", s.files_per_hour),
    );
    gauge(
        "submissions_throttled",
        "Submissions answered 429 since start.",
        s.throttled.to_string(),
    );
    writeln!(
        out,
        "# HELP dropscan_binding_limit 1 for the limit that bounds throughput now.\n# TYPE dropscan_binding_limit gauge"
    )
    .ok();
    for b in crate::limits::Binding::ALL {
        writeln!(
            out,
            "dropscan_binding_limit{{limit=\"{}\"}} {}",
            b.as_str(),
            i32::from(b == s.binding)
        )
        .ok();
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until shutdown.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics and health endpoint listening");
    loop {
        let (stream, _) = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let metrics = Arc::clone(&metrics);
        let limits = limits.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/metrics" => (StatusCode::OK, metrics.render(&limits)),
                    "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                    "/readyz" => match limits.health() {
                        Health::Up => (StatusCode::OK, "ready\n".to_string()),
                        Health::Down => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "KATA unavailable\n".to_string(),
                        ),
                        Health::Unauthorized => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "KATA refuses this sensor (401)\n".to_string(),
                        ),
                    },
                    _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
                };
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
                .ok();
        });
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroUsize};

    use super::*;

    #[test]
    fn client_cert_expiry_gauge_is_exported_when_known() {
        let limits = Limits::new(NonZeroUsize::MIN, NonZeroU32::MIN);
        let known = Metrics::with_client_cert_expiry(Some(1_800_000_000)).render(&limits);
        assert!(
            known.contains("# TYPE dropscan_client_cert_expiry_timestamp_seconds gauge\ndropscan_client_cert_expiry_timestamp_seconds 1800000000"),
            "{known}"
        );
        let unknown = Metrics::with_client_cert_expiry(None).render(&limits);
        assert!(!unknown.contains("client_cert_expiry"), "{unknown}");
    }

    #[test]
    fn limits_gauges_are_exported() {
        let limits = Limits::auto(NonZeroUsize::new(100).unwrap(), NonZeroU32::MIN);
        let text = Metrics::with_client_cert_expiry(None).render(&limits);
        for line in [
            "dropscan_in_flight_cap 4",
            "dropscan_in_flight_learned_capacity 0",
            "dropscan_scan_seconds_mean 0",
            "dropscan_files_per_hour 0",
            "dropscan_submissions_throttled 0",
            "dropscan_binding_limit{limit=\"unknown\"} 1",
            "dropscan_binding_limit{limit=\"server_concurrency\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
