//! Per-watch series read from the roots of the agent generation now running, at scrape time:
//! files waiting to settle in each inbox, and whether its watch fell back from inotify to
//! polling. Labelled by the configured inbox path (`watch`), never by a file's name.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use super::Metrics;
use crate::root::Roots;

/// The roots attached by [`Metrics::set_roots`]; none before an agent attached them.
pub(super) type AttachedRoots = Arc<Mutex<Option<Roots>>>;

/// Turns each attached root's [`RootStatus`](crate::root::RootStatus) into series.
pub(super) struct WatchesCollector(pub(super) AttachedRoots);

impl std::fmt::Debug for WatchesCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchesCollector").finish_non_exhaustive()
    }
}

impl Collector for WatchesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(roots) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let watches: Vec<(String, u64, bool)> = roots
            .iter()
            .map(|r| {
                let watch = r.path().to_string_lossy().into_owned();
                (watch, r.status.settling(), r.status.degraded())
            })
            .collect();
        let proto = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "inbox_settling_files",
            "Files seen in the inbox and not complete yet (settling: still written, or quiet for less than settle, or held open), per watched folder",
            None,
            proto.metric_type(),
        )?;
        for (watch, settling, _) in &watches {
            ConstGauge::new(i64::try_from(*settling).unwrap_or(i64::MAX))
                .encode(family.encode_family(&[("watch", watch.as_str())])?)?;
        }
        drop(family);
        let mut family = encoder.encode_descriptor(
            "watch_degraded",
            "1 when the watch fell back from inotify to polling (inotify limit reached or failing, inbox folder removed), per watched folder",
            None,
            proto.metric_type(),
        )?;
        for (watch, _, degraded) in &watches {
            ConstGauge::new(i64::from(*degraded))
                .encode(family.encode_family(&[("watch", watch.as_str())])?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// The roots of the agent generation now running: the values of the `watch` label (bounded
    /// by the configuration, never a file's name) and what their stages report.
    pub fn set_roots(&self, roots: &Roots) {
        self.set_watches(roots.iter().map(|r| r.path().to_path_buf()));
        *self.roots.lock().unwrap_or_else(PoisonError::into_inner) = Some(roots.clone());
    }
}
