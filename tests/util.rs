//! The shared harness: an emulator over real mTLS on 127.0.0.1, temp folders, a real config file,
//! and the agent running in-process (or as the real binary), so that tests read like specs.

#![allow(clippy::unwrap_used, dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::Duration;

use dropscan::app::{Agent, Placement};
use dropscan::config::Config;
use dropscan::emulator::{
    CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, CertBundle, Emulator, EmulatorConfig,
    EmulatorHandle, RequestCounts,
};
use dropscan::metrics::Metrics;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The EICAR test string.
pub(crate) const EICAR: &[u8] =
    br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
/// The sensorId the harness uses.
pub(crate) const SENSOR: &str = "6d0c3c1e-8a5f-4b7e-9f2a-1c3d5e7f9a0b";

/// Where a file ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Clean,
    Quarantine,
    Failed,
}

/// One test world: folders, certificates, an emulator.
pub(crate) struct World {
    pub dir: tempfile::TempDir,
    pub inbox: PathBuf,
    pub clean: PathBuf,
    pub quarantine: PathBuf,
    pub failed: PathBuf,
    pub certs: CertBundle,
    pub certs_dir: PathBuf,
    pub emulator: Option<EmulatorHandle>,
    pub addr: std::net::SocketAddr,
    /// Extra lines for `[server]`.
    pub server_extra: String,
    /// Extra lines for `[[watch]]`.
    pub watch_extra: String,
    /// Extra `[[watch]]` tables (second roots).
    pub more_watches: String,
    /// The inbox's settle time.
    pub settle: &'static str,
    /// The inbox's settle time for empty files (short here, so that tests with empty files stay
    /// quick; it is still longer than `settle`).
    pub settle_empty: &'static str,
    /// The inbox's `reconcile_interval`.
    pub reconcile: &'static str,
}

impl World {
    /// A world whose emulator has this configuration (listen is forced to 127.0.0.1:0).
    pub(crate) async fn new(emu: EmulatorConfig) -> World {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let certs_dir = root.join("certs");
        let certs = CertBundle::load_or_generate(&certs_dir).unwrap();
        let emulator = Emulator::start(emu, &certs).await.unwrap();
        let addr = emulator.local_addr();
        let w = World {
            inbox: root.join("inbox"),
            clean: root.join("out/clean"),
            quarantine: root.join("out/quarantine"),
            failed: root.join("out/failed"),
            dir,
            certs,
            certs_dir,
            emulator: Some(emulator),
            addr,
            server_extra: String::new(),
            watch_extra: String::new(),
            more_watches: String::new(),
            settle: "300ms",
            settle_empty: "2s",
            reconcile: "2s",
        };
        std::fs::create_dir_all(&w.inbox).unwrap();
        w
    }

    /// The default world: quick scans, no limits beyond the defaults.
    pub(crate) async fn quick() -> World {
        World::new(EmulatorConfig {
            scan_delay: Duration::from_millis(100),
            ..EmulatorConfig::default()
        })
        .await
    }

    pub(crate) fn emulator(&self) -> &EmulatorHandle {
        self.emulator.as_ref().unwrap()
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Writes the config file and returns its path.
    pub(crate) fn write_config(&self) -> PathBuf {
        let p = |name: &str| self.certs_dir.join(name).display().to_string();
        // Destinations as given (relative to the config's folder when beneath it).
        let dest = |d: &Path| {
            d.strip_prefix(self.dir.path())
                .unwrap_or(d)
                .display()
                .to_string()
        };
        let text = format!(
            r#"
[server]
url = "https://{addr}"
sensor_id = "{SENSOR}"
sensor_instance_id = "test"
client_cert = "{cert}"
client_key = "{key}"
ca_cert = "{ca}"
poll_interval = "100ms"
{request_timeout}
max_in_flight = 16
requests_per_second = 10000
{scan_timeout}
{server_extra}

[state]
dir = "state"
shutdown_grace = "2s"

[[watch]]
path = "inbox"
settle = "{settle}"
settle_empty = "{settle_empty}"
reconcile_interval = "{reconcile}"
poll_interval = "200ms"
clean_dir = "{clean}"
quarantine_dir = "{quarantine}"
failed_dir = "{failed}"
{watch_extra}
{more}

[log]
level = "warn"
"#,
            addr = self.addr,
            cert = p(CLIENT_CERT_FILE),
            key = p(CLIENT_KEY_FILE),
            ca = p(CA_CERT_FILE),
            settle = self.settle,
            settle_empty = self.settle_empty,
            reconcile = self.reconcile,
            server_extra = self.server_extra,
            request_timeout = if self.server_extra.contains("request_timeout") {
                ""
            } else {
                "request_timeout = \"10s\""
            },
            scan_timeout = if self.server_extra.contains("scan_timeout") {
                ""
            } else {
                "scan_timeout = \"60s\""
            },
            watch_extra = self.watch_extra,
            more = self.more_watches,
            clean = dest(&self.clean),
            quarantine = dest(&self.quarantine),
            failed = dest(&self.failed),
        );
        let path = self.dir.path().join("dropscan.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts the agent in-process.
    pub(crate) fn start_agent(&self) -> Running {
        init_tracing();
        let config = Config::load(&self.write_config()).unwrap();
        let agent = Agent::new(config).unwrap();
        let events = agent.subscribe();
        let metrics = agent.metrics();
        let token = CancellationToken::new();
        let t = token.clone();
        let task = tokio::spawn(async move { agent.run(t).await.map_err(|e| e.to_string()) });
        Running {
            token,
            task: Some(task),
            events,
            metrics,
        }
    }

    /// Creates `rel` in the inbox with `bytes` (parents created).
    pub(crate) fn drop_file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let p = self.inbox.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        // Write under a temp name and rename, as a careful uploader would; tests that need a
        // slow writer write in place themselves.
        let tmp = p.with_file_name(format!(".{}.tmp", p.file_name().unwrap().to_string_lossy()));
        std::fs::write(&tmp, bytes).unwrap();
        #[allow(clippy::disallowed_methods)]
        std::fs::rename(&tmp, &p).unwrap();
        p
    }

    /// Every file under `dir` (relative path → content), sidecars and hidden files excluded.
    pub(crate) fn files_in(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        entries_below(dir)
            .into_iter()
            .filter_map(|p| {
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                let hidden = rel
                    .components()
                    .any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
                let sidecar = rel.to_string_lossy().ends_with(".dropscan.json");
                let folder = std::fs::symlink_metadata(&p).ok()?.is_dir();
                (!hidden && !sidecar && !folder).then(|| (rel, std::fs::read(&p).unwrap()))
            })
            .collect()
    }

    /// Where each file ended: relative path → outcome (a file in two places panics).
    pub(crate) fn outcomes(&self) -> BTreeMap<PathBuf, Outcome> {
        let mut out = BTreeMap::new();
        for (dir, o) in [
            (&self.clean, Outcome::Clean),
            (&self.quarantine, Outcome::Quarantine),
            (&self.failed, Outcome::Failed),
        ] {
            for (p, _) in World::files_in(dir) {
                // A quarantined or failed file is placed once its sidecar is there too (it is
                // written right after the move).
                let mut side = dir.join(&p).into_os_string();
                side.push(".dropscan.json");
                if o != Outcome::Clean && !Path::new(&side).exists() {
                    continue;
                }
                assert!(
                    out.insert(p.clone(), o).is_none(),
                    "{} placed twice",
                    p.display()
                );
            }
        }
        out
    }

    /// Files left in the inbox (staging and hidden files excluded).
    pub(crate) fn inbox_files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        World::files_in(&self.inbox)
            .into_iter()
            .filter(|(p, _)| !p.starts_with("out"))
            .collect()
    }

    /// Files in staging.
    pub(crate) fn staged_files(&self) -> usize {
        let staging = self.inbox.join(".dropscan/test");
        // Staged files only: the owner marker (`.owner`) is ours, not a user's file.
        std::fs::read_dir(staging).map_or(0, |rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".staged"))
                .count()
        })
    }

    /// The requests the emulator has received so far.
    pub(crate) fn requests(&self) -> RequestCounts {
        self.emulator().request_counts()
    }

    /// Waits until the emulator has received `n` more results requests than now: the poller has
    /// ticked `n` times since the call (it requests results only while it watches scans).
    pub(crate) async fn wait_polls(&self, n: u64) {
        let from = self.requests().state_gets;
        wait_until(LONG, "results requests", || {
            (self.requests().state_gets >= from + n).then_some(())
        })
        .await;
    }

    /// Reconcile walks of this world's inbox started so far by in-process agents.
    pub(crate) fn walks(&self) -> u64 {
        events("reconcile", Some(&self.inbox))
    }

    /// Waits until `n` more reconcile walks of the inbox than now have *started*; the walk
    /// before each new start is over, so `n = 2` proves one whole walk since the call (and, with
    /// `n = 3`, the settling of what it found: `settle` is far shorter than
    /// `reconcile_interval`). In-process agents only.
    pub(crate) async fn wait_walks(&self, n: u64) {
        wait_events("reconcile", Some(&self.inbox), n).await;
    }

    /// Waits until an agent started after `walks_before` (what [`World::walks`] said before it
    /// started) has finished its start-up (its first walk of the inbox began, which follows the
    /// start-up reconcile) and the journal holds no unfinished record: everything it resumed or
    /// took back is finished, and nothing is left for it to place.
    pub(crate) async fn wait_idle(&self, walks_before: u64) {
        wait_until(
            LONG,
            "the agent's start-up, then no unfinished record",
            || (self.walks() > walks_before && self.journal_idle()).then_some(()),
        )
        .await;
    }

    /// Whether the journal holds no unfinished record (every file it knows is finished).
    pub(crate) fn journal_idle(&self) -> bool {
        dropscan::journal::read_summary(&self.state_dir().join("journal.sqlite"))
            .is_ok_and(|s| s.oldest_pending.is_none())
    }

    /// Waits until `n` files are placed in all, or panics after `limit`.
    pub(crate) async fn wait_placed(
        &self,
        n: usize,
        limit: Duration,
    ) -> BTreeMap<PathBuf, Outcome> {
        wait_for(limit, || {
            let o = self.outcomes();
            (o.len() >= n).then_some(o)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "not {n} files placed within {limit:?}: {:?}",
                self.outcomes()
            )
        })
    }
}

/// The limit of the harness's event waits: generous, since a loaded machine only makes them
/// slower, never wrong.
pub(crate) const LONG: Duration = Duration::from_secs(60);

/// Polls `f` until it returns Some, or panics naming `what` after `limit`.
pub(crate) async fn wait_until<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_for(limit, f)
        .await
        .unwrap_or_else(|| panic!("still waiting for {what} after {limit:?}"))
}

/// Whether [`init_tracing`] installed the walk counter (another subscriber may have been first).
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Debug events of the agent seen so far, by message and by what they are about: their `root`
/// field, else their `path` field, else their `inbox` field, else nothing. Every in-process agent of the test process
/// counts here; the walks of an inbox (or the checks of a file) are told apart by that field.
static EVENTS: Mutex<Option<HashMap<(String, String), u64>>> = Mutex::new(None);

/// How many events whose message starts with `message` (and, if given, about this root, path or
/// inbox) were seen.
pub(crate) fn events(message: &str, about: Option<&Path>) -> u64 {
    let roots: Vec<String> = match about {
        None => vec![String::new()],
        Some(path) => [
            Some(path.display().to_string()),
            std::fs::canonicalize(path)
                .ok()
                .map(|p| p.display().to_string()),
        ]
        .into_iter()
        .flatten()
        .collect(),
    };
    let events = EVENTS.lock().unwrap();
    let Some(events) = events.as_ref() else {
        return 0;
    };
    events
        .iter()
        .filter(|((m, a), _)| m.starts_with(message) && roots.contains(a))
        .map(|(_, n)| *n)
        .sum()
}

/// Waits until `n` more events with this message (and root or path) than now were seen.
/// In-process agents only; the message must be one [`init_tracing`] lets through
/// (`dropscan::watch`, `dropscan::settle`, `dropscan::claim`, `dropscan::hashing`,
/// `dropscan::upload` and `dropscan::app`, at debug).
pub(crate) async fn wait_events(message: &str, about: Option<&Path>, n: u64) {
    init_tracing();
    assert!(
        COUNTING.load(std::sync::atomic::Ordering::Relaxed),
        "another tracing subscriber was installed first: events cannot be counted"
    );
    let from = events(message, about);
    wait_until(LONG, &format!("{n} more \"{message}\" events"), || {
        (events(message, about) >= from + n).then_some(())
    })
    .await;
}

/// Counts the agent's events by their message and `root` (or `path`) field.
struct EventCounter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for EventCounter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        #[derive(Default)]
        struct Fields {
            message: String,
            root: String,
            path: String,
            inbox: String,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "message" => self.message = format!("{value:?}"),
                    "root" => self.root = format!("{value:?}"),
                    "path" => self.path = format!("{value:?}"),
                    "inbox" => self.inbox = format!("{value:?}"),
                    _ => {}
                }
            }
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let about = [f.root, f.path, f.inbox]
            .into_iter()
            .find(|a| !a.is_empty())
            .unwrap_or_default();
        let mut events = EVENTS.lock().unwrap();
        *events
            .get_or_insert_with(HashMap::new)
            .entry((f.message, about))
            .or_default() += 1;
    }
}

/// The agent's log lines at info and above (every in-process agent of the test process), each
/// with its number, kept for a failing test's report ([`logged_since`]); the oldest go beyond
/// [`LOGGED_KEEP`].
static LOGGED: Mutex<std::collections::VecDeque<(u64, String)>> =
    Mutex::new(std::collections::VecDeque::new());
const LOGGED_KEEP: usize = 50_000;
static LOGGED_NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where the agent's log is now, for [`logged_since`].
pub(crate) fn logged_mark() -> u64 {
    LOGGED_NEXT.load(std::sync::atomic::Ordering::Relaxed)
}

/// The agent's log lines (info and above) since `mark` that mention any of `about` (a test's
/// folder, its emulator's address): what its own agents said, without the other tests'.
pub(crate) fn logged_since(mark: u64, about: &[String]) -> Vec<String> {
    let logged = LOGGED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    logged
        .iter()
        .filter(|(n, line)| *n >= mark && about.iter().any(|a| line.contains(a.as_str())))
        .map(|(_, line)| line.clone())
        .collect()
}

/// Keeps the agent's log lines for [`logged_since`]: level, target, message and fields.
struct LogRecorder;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogRecorder {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Line(String);
        impl tracing::field::Visit for Line {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                if field.name() == "message" {
                    write!(self.0, " {value:?}").ok();
                } else {
                    write!(self.0, " {}={value:?}", field.name()).ok();
                }
            }
        }
        let meta = event.metadata();
        let mut line = Line(format!("{} {}:", meta.level(), meta.target()));
        event.record(&mut line);
        let n = LOGGED_NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut logged = LOGGED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if logged.len() >= LOGGED_KEEP {
            logged.pop_front();
        }
        logged.push_back((n, line.0));
    }
}

/// The test process's one tracing subscriber: `RUST_LOG` lines to the test's output (captured
/// unless it fails), the agent's events counted for [`wait_events`], and its log lines at info
/// and above kept for a failing test's report ([`logged_since`]).
pub(crate) fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let counted = tracing_subscriber::filter::Targets::new()
            .with_target("dropscan::watch", tracing::Level::DEBUG)
            .with_target("dropscan::settle", tracing::Level::DEBUG)
            .with_target("dropscan::claim", tracing::Level::DEBUG)
            .with_target("dropscan::hashing", tracing::Level::DEBUG)
            .with_target("dropscan::upload", tracing::Level::DEBUG)
            .with_target("dropscan::app", tracing::Level::DEBUG);
        let installed = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(tracing_subscriber::EnvFilter::from_default_env()),
            )
            .with(EventCounter.with_filter(counted))
            .with(
                LogRecorder.with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target("dropscan", tracing::Level::INFO),
                ),
            )
            .try_init()
            .is_ok();
        COUNTING.store(installed, std::sync::atomic::Ordering::Relaxed);
    });
}

/// A child's stderr, line by line as it comes (the child was spawned with `Stdio::piped()`).
pub(crate) type Lines = std::sync::Arc<Mutex<Vec<String>>>;

/// Collects the child's stderr lines in the background.
pub(crate) fn collect_stderr(child: &mut std::process::Child) -> Lines {
    use std::io::BufRead as _;
    let lines = Lines::default();
    let (stderr, sink) = (child.stderr.take().unwrap(), std::sync::Arc::clone(&lines));
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// How many collected lines contain `needle`.
pub(crate) fn count_lines(lines: &Lines, needle: &str) -> usize {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Waits until at least `n` collected lines contain `needle`.
pub(crate) async fn wait_lines(lines: &Lines, needle: &str, n: usize) {
    wait_until(LONG, &format!("{n} lines with {needle:?}"), || {
        (count_lines(lines, needle) >= n).then_some(())
    })
    .await;
}

/// Whether a line containing every one of `then` comes after the first line containing `first`
/// (anywhere when `first` is empty).
pub(crate) fn line_after(lines: &Lines, first: &str, then: &[&str]) -> bool {
    let lines = lines.lock().unwrap();
    lines
        .iter()
        .position(|l| l.contains(first))
        .is_some_and(|at| {
            // No `first` to look for: any line will do.
            let from = if first.is_empty() { at } else { at + 1 };
            lines[from..]
                .iter()
                .any(|l| then.iter().all(|t| l.contains(t)))
        })
}

/// Polls `f` every 25 ms until it returns Some or `limit` passes.
pub(crate) async fn wait_for<T>(limit: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    poll_every(Duration::from_millis(25), limit, f).await
}

/// Polls `f` every `period` until it returns Some or `limit` passes.
pub(crate) async fn poll_every<T>(
    period: Duration,
    limit: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(period).await;
    }
}

/// An agent running in-process.
pub(crate) struct Running {
    pub token: CancellationToken,
    pub task: Option<JoinHandle<Result<(), String>>>,
    pub events: broadcast::Receiver<Placement>,
    /// The agent's counters (what `/metrics` shows).
    pub metrics: std::sync::Arc<Metrics>,
}

impl Running {
    /// Resolves with the agent's result when it ends by itself (never while it runs): a test
    /// selects on it to report an agent that stopped rather than time out waiting for it.
    pub(crate) async fn ended(&mut self) -> Result<(), String> {
        match self.task.as_mut() {
            Some(task) => {
                let r = task.await.unwrap();
                self.task = None;
                r
            }
            None => std::future::pending().await,
        }
    }

    /// Cancels and waits; returns the agent's result and how long the stop took.
    pub(crate) async fn stop(mut self) -> (Result<(), String>, Duration) {
        let t0 = std::time::Instant::now();
        self.token.cancel();
        let r = tokio::time::timeout(Duration::from_secs(20), self.task.take().unwrap())
            .await
            .expect("agent did not stop within 20 s")
            .unwrap();
        (r, t0.elapsed())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Deterministic pseudo-random bytes.
pub(crate) fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x & 0xff) as u8
        })
        .collect()
}

/// Every entry beneath `dir`, dot names included, without following links, sorted.
pub(crate) fn entries_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}
