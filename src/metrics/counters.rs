//! The hot counters ([`Counters`]): plain atomics the stages bump without waiting, and the
//! collector that turns them into Prometheus series when `/metrics` is scraped.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The hot counters, bumped by the stages with relaxed atomics.
#[derive(Debug, Default)]
pub struct Counters {
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
    /// Files taken into staging that a writer still held open: put back into the inbox.
    pub returned_still_written: AtomicU64,
    /// Kept originals that a late writer changed: put back into the inbox as a new version.
    pub returned_changed: AtomicU64,
    /// Files placed in clean.
    pub placed_clean: AtomicU64,
    /// Files placed in quarantine.
    pub placed_quarantine: AtomicU64,
    /// Files placed in failed.
    pub placed_failed: AtomicU64,
    /// Placement attempts that failed and will be retried.
    pub place_errors: AtomicU64,
    /// Verdicts contradicted after the file was released as clean (announced anomalies).
    pub anomalies: AtomicU64,
    /// The client certificate's notAfter in Unix seconds; 0 when unknown (not exported then).
    pub client_cert_expiry: AtomicI64,
    /// Unix seconds of the last successful results request; 0 before the first.
    pub last_poll: AtomicI64,
}

/// Turns the journal's [`Tally`](crate::journal::Tally) (of the agent generation now running)
/// into Prometheus series at scrape time; nothing before an agent attached one.
#[derive(Debug)]
pub(super) struct TallyCollector(
    pub(super) Arc<std::sync::Mutex<Option<Arc<crate::journal::Tally>>>>,
);

impl Collector for TallyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let tally = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let Some(t) = tally else {
            return Ok(());
        };
        CountersCollector::counter(
            &mut encoder,
            "journal_write_errors",
            "Journal writes the disk refused (full, I/O error); files wait meanwhile",
            &t.write_errors,
        )?;
        {
            let proto = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(
                "files_failed",
                "Files decided failed, by reason (a bounded set of kinds; the sidecar has the details)",
                None,
                proto.metric_type(),
            )?;
            for kind in crate::journal::FailureKind::ALL {
                ConstCounter::new(t.failed[kind.index()].load(Ordering::Relaxed))
                    .encode(family.encode_family(&[("reason", kind.as_str())])?)?;
            }
        }
        let proto = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "hook_deliveries",
            "Notification deliveries by result (failed: tried again later; given_up: after the last attempt)",
            None,
            proto.metric_type(),
        )?;
        for (result, v) in [
            ("delivered", &t.hooks_delivered),
            ("failed", &t.hooks_failed),
            ("given_up", &t.hooks_given_up),
        ] {
            ConstCounter::new(v.load(Ordering::Relaxed))
                .encode(family.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}

/// Turns the [`Counters`] atomics into Prometheus series at scrape time.
#[derive(Debug)]
pub(super) struct CountersCollector(pub(super) Arc<Counters>);

impl CountersCollector {
    fn counter(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        v: &AtomicU64,
    ) -> std::fmt::Result {
        let c = ConstCounter::new(v.load(Ordering::Relaxed));
        c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
    }

    fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
        let g = ConstGauge::new(v);
        g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
    }
}

impl Collector for CountersCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let c = &self.0;
        let e = &mut encoder;
        Self::counter(e, "files_claimed", "Files moved into staging", &c.claimed)?;
        Self::counter(e, "files_hashed", "Files hashed", &c.hashed)?;
        Self::counter(e, "hashed_bytes", "Bytes hashed", &c.hashed_bytes)?;
        Self::counter(
            e,
            "scans_submitted",
            "Submissions accepted by KATA",
            &c.submitted,
        )?;
        Self::counter(
            e,
            "uploaded_bytes",
            "Bytes uploaded in accepted submissions",
            &c.uploaded_bytes,
        )?;
        Self::counter(e, "throttled", "Submissions answered 429", &c.throttled)?;
        Self::counter(
            e,
            "request_errors",
            "Requests to KATA that failed",
            &c.request_errors,
        )?;
        Self::counter(
            e,
            "polls",
            "Results requests (one per tick for all scans)",
            &c.polls,
        )?;
        Self::counter(
            e,
            "verdicts_reused",
            "Verdicts reused for identical content",
            &c.reused,
        )?;
        Self::counter(
            e,
            "returned_still_written",
            "Files a writer still held open when dropscan took them, put back into the inbox",
            &c.returned_still_written,
        )?;
        Self::counter(
            e,
            "returned_changed",
            "Kept originals a late writer changed, put back into the inbox as a new version",
            &c.returned_changed,
        )?;
        Self::counter(
            e,
            "place_errors",
            "Placements that failed and are retried",
            &c.place_errors,
        )?;
        Self::counter(
            e,
            "verdict_anomalies",
            "Files released as clean whose verdict the server contradicted later (detect after not detected); see dropscan anomalies list",
            &c.anomalies,
        )?;
        {
            let proto = ConstCounter::new(0u64);
            let mut family = e.encode_descriptor(
                "files_placed",
                "Files placed, by outcome",
                None,
                proto.metric_type(),
            )?;
            for (outcome, v) in [
                ("clean", &c.placed_clean),
                ("quarantine", &c.placed_quarantine),
                ("failed", &c.placed_failed),
            ] {
                ConstCounter::new(v.load(Ordering::Relaxed))
                    .encode(family.encode_family(&[("outcome", outcome)])?)?;
            }
        }
        let expiry = c.client_cert_expiry.load(Ordering::Relaxed);
        if expiry != 0 {
            Self::gauge(
                e,
                "client_cert_expiry_timestamp_seconds",
                "notAfter of the client certificate, Unix seconds",
                expiry,
            )?;
        }
        let last_poll = c.last_poll.load(Ordering::Relaxed);
        if last_poll != 0 {
            Self::gauge(
                e,
                "last_successful_poll_timestamp_seconds",
                "When the last results request succeeded, Unix seconds",
                last_poll,
            )?;
        }
        Ok(())
    }
}
