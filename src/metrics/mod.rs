//! Metrics and health, the way Prometheus expects them (`prometheus-client`): counters the
//! stages bump, `_seconds` histograms, gauges, and a small HTTP endpoint ([`serve`]) answering
//! `/metrics` (`text/plain; version=0.0.4`), `/healthz` (the process runs) and `/readyz` (the
//! server answers and every inbox exists).
//!
//! One [`Metrics`] lives as long as the process: `dropscan run` creates it (and the endpoint)
//! outside the SIGHUP reload loop, so counters survive a reload and the port stays open. Each
//! agent generation [`attach`](Metrics::attach)es its limits and journal; what depends on them
//! (in-flight cap, server health, queue depth per state) is read at scrape time.
//!
//! The hot counters are plain atomics ([`Counters`], reached through `Deref`; `counters.rs`):
//! the stages never wait on metrics; a collector turns them into Prometheus counters when
//! scraped. Adding a gauge
//! is one line: `metrics.gauge("name", "help").set(v)`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::journal::Outcome;
use crate::limits::{Health, Limits};

mod counters;
mod http;
mod process;
mod watches;

pub use counters::Counters;
use counters::{CountersCollector, TallyCollector};
pub use http::{
    ACCEPT_ERROR_PAUSE, CONNECTION_LIFETIME, CONTENT_TYPE, HEADER_READ_TIMEOUT, MAX_CONNECTIONS,
    serve,
};

/// Labels of a family: `(name, value)` pairs.
type Labels = Vec<(&'static str, String)>;

/// What the current agent generation lends the metrics for scrape-time readings.
#[derive(Clone)]
struct Live {
    limits: Limits,
    journal: PathBuf,
}

/// Why the agent is not ready (`/readyz` answers 503 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// Watched inboxes that do not exist now.
    #[error("inbox missing: {}", shown_paths(.0))]
    InboxMissing(Vec<PathBuf>),
    /// Watches held, with why.
    #[error("watch held: {}", shown_held(.0))]
    WatchHeld(Vec<(PathBuf, String)>),
    /// No agent attached yet.
    #[error("agent starting")]
    Starting,
    /// The server is unreachable or failing.
    #[error("KATA unavailable")]
    ServerDown,
    /// The server refuses this sensor.
    #[error("KATA refuses this sensor (401)")]
    Unauthorized,
}

fn shown_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths
        .iter()
        .map(|p| crate::fsops::shown(p).to_string())
        .collect();
    shown.join(", ")
}

fn shown_held(held: &[(PathBuf, String)]) -> String {
    let shown: Vec<String> = held
        .iter()
        .map(|(p, r)| format!("{} ({r})", crate::fsops::shown(p)))
        .collect();
    shown.join("; ")
}

/// Everything exported, for the life of the process.
pub struct Metrics {
    counters: Arc<Counters>,
    registry: Mutex<Registry>,
    gauges: Mutex<HashMap<&'static str, Gauge>>,
    drop_to_submitted: Histogram,
    submitted_to_verdict: Histogram,
    drop_to_placed: Histogram,
    answers: Family<Labels, Counter>,
    queue: Family<Labels, Gauge>,
    binding: Family<Labels, Gauge>,
    scan_mean: Gauge<f64, std::sync::atomic::AtomicU64>,
    files_per_hour: Gauge<f64, std::sync::atomic::AtomicU64>,
    live: Mutex<Option<Live>>,
    missing_inboxes: Mutex<BTreeSet<PathBuf>>,
    /// Watches held (by inbox), with the reason: their staging folder cannot be used.
    held_watches: Mutex<std::collections::BTreeMap<PathBuf, String>>,
    /// The current journal's counters (refused writes, hook deliveries).
    tally: Arc<Mutex<Option<Arc<crate::journal::Tally>>>>,
    /// Files taken in and not placed yet, per watched folder.
    pending: Family<Labels, Gauge>,
    /// Age of the oldest of them, per watched folder.
    oldest_pending: Family<Labels, Gauge>,
    /// Held through a whole [`Metrics::render`]: scrapes never interleave their updates.
    render_lock: Mutex<()>,
    /// The configured inboxes: each has its per-folder series, 0 when nothing waits.
    watches: Mutex<Vec<PathBuf>>,
    /// The roots now running, read at scrape time (settling files, degraded watches).
    roots: watches::AttachedRoots,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for Metrics {
    type Target = Counters;
    fn deref(&self) -> &Counters {
        &self.counters
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Buckets of the latency histograms, in seconds: round bounds an operator reads at a glance
/// (and `histogram_quantile` interpolates between), one second to an hour.
pub const LATENCY_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

fn latency_buckets() -> impl Iterator<Item = f64> {
    LATENCY_BUCKETS.into_iter()
}

impl Metrics {
    /// Fresh metrics, every series registered.
    pub fn new() -> Self {
        let counters = Arc::new(Counters::default());
        let mut registry = Registry::with_prefix("dropscan");
        registry.register_collector(Box::new(CountersCollector(Arc::clone(&counters))));
        let tally: Arc<Mutex<Option<Arc<crate::journal::Tally>>>> = Arc::default();
        registry.register_collector(Box::new(TallyCollector(Arc::clone(&tally))));
        let roots = watches::AttachedRoots::default();
        registry.register_collector(Box::new(watches::WatchesCollector(Arc::clone(&roots))));
        let build_info = Family::<Labels, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1; the labels say which dropscan runs",
            build_info.clone(),
        );
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        let drop_to_submitted = Histogram::new(latency_buckets());
        registry.register(
            "drop_to_submitted_seconds",
            "Time from drop completion (the file's last change in the inbox) to the server accepting its upload",
            drop_to_submitted.clone(),
        );
        let submitted_to_verdict = Histogram::new(latency_buckets());
        registry.register(
            "submitted_to_verdict_seconds",
            "Time from the server accepting an upload to its verdict, server outages excluded",
            submitted_to_verdict.clone(),
        );
        let drop_to_placed = Histogram::new(latency_buckets());
        registry.register(
            "drop_to_placed_seconds",
            "Time from drop completion (the file's last change in the inbox) to placement in clean, quarantine or failed",
            drop_to_placed.clone(),
        );
        let answers = Family::<Labels, Counter>::default();
        registry.register(
            "kata_answers",
            "Answers from KATA by endpoint and HTTP code (code=\"none\": no answer, a transport error)",
            answers.clone(),
        );
        let queue = Family::<Labels, Gauge>::default();
        registry.register(
            "queue_files",
            "Files in the journal by state (work still due on them)",
            queue.clone(),
        );
        let binding = Family::<Labels, Gauge>::default();
        registry.register(
            "binding_limit",
            "1 for the limit that bounds throughput now (input, rate limit, server concurrency, configured cap, poll interval, scan time, unavailable)",
            binding.clone(),
        );
        let scan_mean = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "scan_mean_seconds",
            "Mean time from the server accepting an upload to its final verdict (moving average; 0 before the first)",
            scan_mean.clone(),
        );
        let pending = Family::<Labels, Gauge>::default();
        registry.register(
            "pending_files",
            "Files taken in (claimed) and not placed yet, per watched folder",
            pending.clone(),
        );
        let oldest_pending = Family::<Labels, Gauge>::default();
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the oldest file taken in and not placed yet, per watched folder (since it was claimed)",
            oldest_pending.clone(),
        );
        let files_per_hour = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "files_per_hour",
            "Scans finished per hour, over the last ten minutes",
            files_per_hour.clone(),
        );
        Metrics {
            counters,
            queue,
            binding,
            scan_mean,
            files_per_hour,
            registry: Mutex::new(registry),
            gauges: Mutex::default(),
            drop_to_submitted,
            submitted_to_verdict,
            drop_to_placed,
            answers,
            live: Mutex::default(),
            missing_inboxes: Mutex::default(),
            held_watches: Mutex::default(),
            tally,
            pending,
            oldest_pending,
            render_lock: Mutex::default(),
            watches: Mutex::default(),
            roots,
        }
    }

    /// Fresh metrics with the client certificate's notAfter (Unix seconds) set, if known.
    pub fn with_client_cert_expiry(not_after: Option<i64>) -> Self {
        let m = Metrics::new();
        m.set_client_cert_expiry(not_after);
        m
    }

    /// Sets the client certificate's notAfter (Unix seconds); `None`: unknown, not exported.
    pub fn set_client_cert_expiry(&self, not_after: Option<i64>) {
        self.client_cert_expiry
            .store(not_after.unwrap_or(0), Ordering::Relaxed);
    }

    /// The gauge `dropscan_<name>`, registered on first use; the same gauge on later calls
    /// (so a reloaded agent keeps setting the series the endpoint exports).
    pub fn gauge(&self, name: &'static str, help: &str) -> Gauge {
        let mut gauges = self.gauges.lock().unwrap_or_else(PoisonError::into_inner);
        gauges
            .entry(name)
            .or_insert_with(|| {
                let g = Gauge::default();
                self.registry
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .register(name, help, g.clone());
                g
            })
            .clone()
    }

    /// The agent generation now running: its limits (cap, health) and journal (queue depth).
    pub fn attach(&self, limits: Limits, journal: &Path) {
        *self.live.lock().unwrap_or_else(PoisonError::into_inner) = Some(Live {
            limits,
            journal: journal.to_path_buf(),
        });
    }

    /// The current journal's counters (refused writes, hook deliveries), read at scrape time.
    pub fn attach_tally(&self, tally: Arc<crate::journal::Tally>) {
        *self.tally.lock().unwrap_or_else(PoisonError::into_inner) = Some(tally);
    }

    /// The watched folders (inboxes) of the agent generation now running: the values of the
    /// `watch` label (bounded by the configuration, never a file's name).
    pub fn set_watches(&self, inboxes: impl IntoIterator<Item = PathBuf>) {
        *self.watches.lock().unwrap_or_else(PoisonError::into_inner) =
            inboxes.into_iter().collect();
    }

    /// Records which inboxes are missing now (a share not mounted yet): `/readyz` says not
    /// ready while any is.
    pub fn set_missing_inboxes(&self, missing: impl IntoIterator<Item = PathBuf>) {
        *self
            .missing_inboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = missing.into_iter().collect();
    }

    /// The inboxes missing now.
    pub fn missing_inboxes(&self) -> Vec<PathBuf> {
        self.missing_inboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Records that the watch of `inbox` is held (`Some(reason)`: its staging folder cannot be
    /// used; the other watches go on) or works again (`None`). `/readyz` says not ready while
    /// any is held, and names it.
    pub fn set_watch_held(&self, inbox: &Path, reason: Option<String>) {
        let mut held = self
            .held_watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match reason {
            Some(r) => {
                held.insert(inbox.to_path_buf(), r);
            }
            None => {
                held.remove(inbox);
            }
        }
    }

    /// The watches held now: (inbox, reason).
    pub fn held_watches(&self) -> Vec<(PathBuf, String)> {
        self.held_watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(p, r)| (p.clone(), r.clone()))
            .collect()
    }

    /// Counts an answer of KATA (`code` `None`: no answer, a transport error).
    pub fn answer(&self, endpoint: &'static str, code: Option<u16>) {
        let code = code.map_or_else(|| "none".to_string(), |c| c.to_string());
        self.answers
            .get_or_create(&vec![("endpoint", endpoint.to_string()), ("code", code)])
            .inc();
    }

    /// Counts a successful results request (its time is exported).
    pub fn poll_succeeded(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.last_poll.store(now, Ordering::Relaxed);
    }

    /// An upload accepted `since_drop` after the drop was complete.
    pub fn observe_submitted(&self, since_drop: Duration) {
        self.drop_to_submitted.observe(since_drop.as_secs_f64());
    }

    /// A verdict arrived `since_submit` after the upload was accepted.
    pub fn observe_verdict(&self, since_submit: Duration) {
        self.submitted_to_verdict
            .observe(since_submit.as_secs_f64());
    }

    /// Counts a placement `since_drop_ms` milliseconds after the drop was complete.
    pub fn placed(&self, outcome: Outcome, since_drop_ms: u64) {
        let c = match outcome {
            Outcome::Clean => &self.placed_clean,
            Outcome::Quarantine => &self.placed_quarantine,
            // Vanished files are never placed; counted with failed if one were.
            Outcome::Failed | Outcome::Vanished => &self.placed_failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        self.drop_to_placed.observe(since_drop_ms as f64 / 1000.0);
    }

    /// Total files placed.
    pub fn placed_total(&self) -> u64 {
        self.placed_clean.load(Ordering::Relaxed)
            + self.placed_quarantine.load(Ordering::Relaxed)
            + self.placed_failed.load(Ordering::Relaxed)
    }

    /// Whether the agent is ready: the server answers normally and every inbox exists; else
    /// why not.
    pub fn readiness(&self) -> Result<(), NotReady> {
        let missing = self.missing_inboxes();
        if !missing.is_empty() {
            return Err(NotReady::InboxMissing(missing));
        }
        let held = self.held_watches();
        if !held.is_empty() {
            return Err(NotReady::WatchHeld(held));
        }
        let live = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match live.map(|l| l.limits.health()) {
            None => Err(NotReady::Starting),
            Some(Health::Up) => Ok(()),
            Some(Health::Down) => Err(NotReady::ServerDown),
            Some(Health::Unauthorized) => Err(NotReady::Unauthorized),
        }
    }

    /// The exposition (Prometheus text format 0.0.4), read from the live agent at call time.
    /// Reads the journal summary (a blocking SQLite read): call it off the async threads.
    pub fn render(&self) -> String {
        let _whole = self
            .render_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let live = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(live) = &live {
            self.gauge(
                "in_flight_cap",
                "Current cap on scans in flight (adapts to the server's answers)",
            )
            .set(i64::try_from(live.limits.cap()).unwrap_or(i64::MAX));
            // Read from the slots the limits hand out, never counted by hand: a scan is in
            // flight from its acceptance (or adoption at start-up) until its slot is dropped.
            self.gauge("scans_in_flight", "Scans submitted and not finished")
                .set(i64::try_from(live.limits.on_server()).unwrap_or(i64::MAX));
            self.gauge("server_up", "1 when KATA answers normally")
                .set(i64::from(live.limits.health() == Health::Up));
            self.gauge(
                "server_refusing",
                "1 when KATA refuses this sensor (401: integration not accepted)",
            )
            .set(i64::from(live.limits.health() == Health::Unauthorized));
            self.limits_gauges(&live.limits.snapshot());
            self.queue_depth(&live.journal);
        }
        self.gauge(
            "inboxes_missing",
            "Watched inboxes that do not exist now (waited for)",
        )
        .set(i64::try_from(self.missing_inboxes().len()).unwrap_or(i64::MAX));
        self.gauge(
            "watches_held",
            "Watches held because their staging folder cannot be used (see /readyz for which)",
        )
        .set(i64::try_from(self.held_watches().len()).unwrap_or(i64::MAX));
        let mut out = String::with_capacity(4096);
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut out, &registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        drop(registry);
        let mut text = to_text_0_0_4(&out);
        // The process series are unprefixed: they go before the closing `# EOF`.
        let eof = text.ends_with("# EOF\n");
        if eof {
            text.truncate(text.len() - "# EOF\n".len());
        }
        process::Process::read().encode(&mut text);
        if eof {
            text.push_str("# EOF\n");
        }
        text
    }

    /// The limits' readings: learned capacity, mean scan time, files per hour, 429s, and which
    /// limit binds now.
    fn limits_gauges(&self, snap: &crate::limits::LimitsSnapshot) {
        self.gauge(
            "in_flight_learned_capacity",
            "Scans in flight the server took before answering 429 (0: not known yet)",
        )
        .set(i64::try_from(snap.learned).unwrap_or(i64::MAX));
        self.gauge(
            "submissions_throttled_since_start",
            "Submissions answered 429 since the agent started",
        )
        .set(i64::try_from(snap.throttled).unwrap_or(i64::MAX));
        self.scan_mean.set(snap.mean_scan_secs.unwrap_or(0.0));
        self.files_per_hour.set(snap.files_per_hour);
        for b in crate::limits::Binding::ALL {
            self.binding
                .get_or_create(&vec![("limit", b.as_str().to_string())])
                .set(i64::from(b == snap.binding));
        }
    }

    /// Sets `dropscan_queue_files{state=…}` from the journal summary.
    fn queue_depth(&self, journal: &Path) {
        let Ok(summary) = crate::journal::read_summary(journal) else {
            return;
        };
        for state in crate::journal::FileState::UNFINISHED {
            let name = state.as_str();
            let n = summary
                .per_state
                .iter()
                .find(|(s, _)| s == name)
                .map_or(0, |(_, n)| *n);
            self.queue
                .get_or_create(&vec![("state", name.to_string())])
                .set(n);
        }
        // Per watched folder: a folder whose files are all placed drops out of the query, so
        // the families are rebuilt (under `render_lock`, so a concurrent scrape sees whole sets).
        self.pending.clear();
        self.oldest_pending.clear();
        let now = crate::journal::now_ms();
        let watches = self
            .watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let idle = watches
            .iter()
            .filter(|w| !summary.pending_by_root.iter().any(|(r, _, _)| r == *w))
            .map(|w| (w.clone(), 0, now));
        // Records of a folder no longer configured still count, under its name, until placed.
        for (root, n, oldest) in summary.pending_by_root.iter().cloned().chain(idle) {
            let watch = vec![("watch", root.to_string_lossy().into_owned())];
            self.pending.get_or_create(&watch).set(n);
            self.oldest_pending
                .get_or_create(&watch)
                .set((now.saturating_sub(oldest) / 1000).max(0));
        }
    }
}

/// The OpenMetrics encoder names a counter family `x` and its sample `x_total`; the text format
/// 0.0.4 (what `/metrics` announces) wants the family named as its sample: `# HELP x_total` and
/// `# TYPE x_total counter`.
fn to_text_0_0_4(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 256);
    for line in open_metrics.lines() {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
