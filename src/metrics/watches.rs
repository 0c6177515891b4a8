//! Per-watch series read from the roots of the agent generation now running, at scrape time:
//! files waiting to settle in each inbox, and whether its watch fell back from inotify to
//! polling. Labelled by the configured inbox path (`watch`), never by a file's name.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use super::Metrics;
use crate::root::{RootStatus, Roots};

/// The status of each root attached by [`Metrics::set_roots`], with its `watch` label; none
/// before an agent attached them. Only the status is kept, never the root (its open folders,
/// its staging lock): the metrics outlive an agent that stopped.
pub(super) type AttachedRoots = Arc<Mutex<Option<Vec<(String, Arc<RootStatus>)>>>>;

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
        let watches = roots;
        per_watch(
            &mut encoder,
            "inbox_settling_files",
            "Files seen in the inbox and not complete yet (settling: still written, or quiet for less than settle, or held open), per watched folder",
            watches
                .iter()
                .map(|(w, s)| (w.as_str(), i64::try_from(s.settling()).unwrap_or(i64::MAX))),
        )?;
        per_watch(
            &mut encoder,
            "watch_degraded",
            "1 when the watch fell back from inotify to polling (inotify limit reached or failing, inbox folder removed), per watched folder",
            watches
                .iter()
                .map(|(w, s)| (w.as_str(), i64::from(s.degraded()))),
        )
    }
}

/// One gauge family with a sample per watch.
fn per_watch<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl Iterator<Item = (&'a str, i64)>,
) -> std::fmt::Result {
    let proto = ConstGauge::new(0i64);
    let mut family = encoder.encode_descriptor(name, help, None, proto.metric_type())?;
    for (watch, v) in samples {
        ConstGauge::new(v).encode(family.encode_family(&[("watch", watch)])?)?;
    }
    Ok(())
}

impl Metrics {
    /// The roots of the agent generation now running: the values of the `watch` label (bounded
    /// by the configuration, never a file's name) and what their stages report.
    pub fn set_roots(&self, roots: &Roots) {
        self.set_watches(roots.iter().map(|r| r.path().to_path_buf()));
        let status = roots
            .iter()
            .map(|r| {
                (
                    r.path().to_string_lossy().into_owned(),
                    Arc::clone(&r.status),
                )
            })
            .collect();
        *self.roots.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
    }
}
