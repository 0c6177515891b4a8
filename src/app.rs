//! The agent: opens the journal, reconciles it with staging, creates the channels, spawns and
//! names the stages, and shuts them down in order.
//!
//! ```text
//!  watch ──Candidate──▶ settle ──Settled──▶ claim ──Claimed──▶ upload ──Submitted──▶ poll
//!                                            │                  ▲  │                  │
//!                                            │                  └──┼── Resubmit ◀─────┤ (error/timeout)
//!                                            └───────Verdict───────┴──────────────────┴──▶ sort
//! ```
//!
//! Start-up order matters: the journal is reconciled with the staging folders *before* any stage
//! runs, so that every record is handed to exactly one stage:
//! - `claimed` with its staged file → hashed again; without it → forgotten when the file is back
//!   in the inbox (the claim never happened), else closed as vanished;
//! - `hashed` → the uploader; `submitting` → the poller asks the server whether the scan exists
//!   (it is never sent twice); `submitted` → the poller;
//! - `decided`, `placing`, `placed` → the sorter (placing is idempotent: it looks at both ends);
//! - a staged file with no record (the journal was lost or is new) re-enters as a new file under
//!   `recovered/`.
//!
//! Shutdown: the token is cancelled (SIGINT/SIGTERM); sources stop taking work; uploads in
//! progress get `shutdown_grace`, then are abandoned, which is safe because the journal already
//! says `submitting(scanId)`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::claim::{self, Claimed};
use crate::config::Config;
use crate::error::FatalError;
use crate::fsops;
use crate::journal::{FileId, FileState, Journal, NewClaim};
use crate::kata::KataClient;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::upload::Resubmit;
use crate::{poll, settle, sort, upload, watch};

/// Capacity of the placement event channel (observers that lag lose old events).
const EVENTS_CAPACITY: usize = 1024;

/// What every stage shares.
pub struct Shared {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The journal.
    pub journal: Journal,
    /// The protocol client (one pooled connection set).
    pub client: KataClient,
    /// Restrictions, rate, in-flight cap, server health.
    pub limits: Limits,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Placement events, for the demo, tests and any observer.
    pub events: broadcast::Sender<Placement>,
}

impl Shared {
    /// A request to KATA failed: pause submissions accordingly, and when this changes the
    /// server's state (up → down, or → unauthorized), keep the error for `dropscan status`.
    pub async fn server_failed(&self, e: &crate::kata::ApiError) -> std::time::Duration {
        let before = self.limits.health();
        let pause = self.limits.server_failed(e);
        if self.limits.health() != before {
            let text = format!("KATA: {e}{}", crate::error::root_cause(e));
            if let Err(err) = self.journal.note_error(text).await {
                tracing::debug!(error = %err, "could not record the error in the journal");
            }
        }
        pause
    }
}

/// A file reached its destination.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Its watched root.
    pub root: PathBuf,
    /// Its path relative to the root.
    pub rel_path: PathBuf,
    /// Where it went.
    pub outcome: crate::journal::Outcome,
    /// Its final path.
    pub dest: PathBuf,
    /// The reason (failed) or a note.
    pub reason: Option<String>,
}

/// The agent before it runs: lets callers subscribe to events first.
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    /// Opens the journal, builds the client and prepares the folders.
    pub fn new(config: Config) -> Result<Self, FatalError> {
        let config = Arc::new(config);
        prepare_folders(&config)?;
        let journal = Journal::open(&config.journal_path())?;
        let client = KataClient::new(config.server.client_options())?;
        let limits = Limits::new(
            config.server.max_in_flight,
            config.server.requests_per_second,
        );
        let (events, _) = broadcast::channel(EVENTS_CAPACITY);
        let cert_expiry = crate::kata::tls::warn_at_start(&config.server.tls);
        Ok(Agent {
            shared: Arc::new(Shared {
                config,
                journal,
                client,
                limits,
                metrics: Arc::new(Metrics::with_client_cert_expiry(cert_expiry)),
                events,
            }),
        })
    }

    /// Placement events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Placement> {
        self.shared.events.subscribe()
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.shared.metrics)
    }

    /// Runs until `shutdown` is cancelled or a stage fails.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), FatalError> {
        let shared = self.shared;
        let cfg = Arc::clone(&shared.config);
        // Restrictions first (a failure is not fatal: the server may be down; it is retried).
        if shared.limits.refresh(&shared.client).await.is_err() {
            tracing::warn!(
                "starting without the server's restrictions; they are fetched again later"
            );
        }
        let resume = reconcile(&shared).await?;

        let (candidates_tx, candidates_rx) = mpsc::channel(watch::CANDIDATES_CAPACITY);
        let (settled_tx, settled_rx) = mpsc::channel(settle::SETTLED_CAPACITY);
        let (claimed_tx, claimed_rx) = mpsc::channel(claim::CLAIMED_CAPACITY);
        let (submitted_tx, submitted_rx) = mpsc::channel(upload::SUBMITTED_CAPACITY);
        let (verdicts_tx, verdicts_rx) = mpsc::channel(sort::VERDICTS_CAPACITY);
        let resubmit = Resubmit::default();
        for c in resume.hashed {
            resubmit.push(c);
        }

        // Stages stop on `stages`; it is cancelled by the caller's token or by a failing stage.
        let stages = shutdown.child_token();
        let tracker = TaskTracker::new();
        let failure: Arc<std::sync::Mutex<Option<FatalError>>> = Arc::default();
        let watches: Arc<[crate::config::WatchConfig]> = cfg.watches.clone().into();

        // Every stage runs until `stages` is cancelled. One that ends before that (a panic, a
        // fatal error) is logged by name and stops the others: the journal makes a restart by
        // the service manager lossless, while a half-running pipeline would silently stall.
        let stage =
            |name: &'static str,
             fut: std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>| {
                let (stages, failure) = (stages.clone(), Arc::clone(&failure));
                tracker.spawn(async move {
                let outcome = std::panic::AssertUnwindSafe(fut).catch_unwind().await;
                if stages.is_cancelled() {
                    return;
                }
                let detail = match outcome {
                    Ok(Ok(())) => "ended".to_string(),
                    Ok(Err(e)) => e,
                    Err(_) => "panicked".to_string(),
                };
                tracing::error!(stage = name, %detail, "stage stopped unexpectedly; stopping the agent");
                failure
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert(FatalError::Stage { stage: name, detail });
                stages.cancel();
            });
            };
        {
            let (watches, stages) = (Arc::clone(&watches), stages.clone());
            stage(
                "watch",
                Box::pin(async move {
                    watch::run(watches, candidates_tx, stages)
                        .await
                        .map_err(|e| e.to_string())
                }),
            );
        }
        stage(
            "settle",
            Box::pin(settle::run(watches, candidates_rx, settled_tx, stages.clone()).map(Ok)),
        );
        stage(
            "claim",
            Box::pin(
                claim::run(
                    Arc::clone(&shared),
                    settled_rx,
                    claimed_tx,
                    verdicts_tx.clone(),
                    resume.claimed,
                    stages.clone(),
                )
                .map(Ok),
            ),
        );
        stage(
            "upload",
            Box::pin(
                upload::run(
                    Arc::clone(&shared),
                    claimed_rx,
                    resubmit.clone(),
                    submitted_tx,
                    verdicts_tx.clone(),
                    stages.clone(),
                )
                .map(Ok),
            ),
        );
        stage(
            "poll",
            Box::pin(
                poll::run(
                    Arc::clone(&shared),
                    submitted_rx,
                    resubmit.clone(),
                    verdicts_tx,
                    resume.submitted,
                    resume.submitting,
                    stages.clone(),
                )
                .map(Ok),
            ),
        );
        stage(
            "sort",
            Box::pin(
                sort::run(
                    Arc::clone(&shared),
                    verdicts_rx,
                    resubmit,
                    resume.to_place,
                    stages.clone(),
                )
                .map(Ok),
            ),
        );
        tracker.spawn(housekeeping(Arc::clone(&shared), stages.clone()));
        if let Some(addr) = cfg.metrics_listen {
            let (m, l, s) = (
                Arc::clone(&shared.metrics),
                shared.limits.clone(),
                stages.clone(),
            );
            tracker.spawn(async move {
                if let Err(e) = crate::metrics::serve(addr, m, l, s).await {
                    tracing::error!(%addr, error = %e, "metrics endpoint failed; the agent goes on without it");
                }
            });
        }
        tracker.close();
        tracing::info!(
            roots = cfg.watches.len(),
            server = %cfg.server.url,
            sensor_id = %cfg.server.sensor_id,
            "dropscan running"
        );

        stages.cancelled().await;
        tracing::info!("shutting down: finishing or journaling work in progress");
        let grace = cfg.state.shutdown_grace + std::time::Duration::from_secs(2);
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                "some stages did not stop in time; their work resumes at the next start"
            );
        }
        let failed = failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Runs the agent with `config` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), FatalError> {
    Agent::new(config)?.run(shutdown).await
}

/// Creates the destination and staging folders with their modes; a staging folder must be on
/// the inbox's filesystem for the claim to be an atomic rename.
fn prepare_folders(config: &Config) -> Result<(), FatalError> {
    use std::os::unix::fs::MetadataExt;
    for w in &config.watches {
        let meta = std::fs::metadata(&w.path).map_err(|source| FatalError::Io {
            about: "watched folder",
            path: w.path.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(FatalError::Io {
                about: "watched folder is not a folder",
                path: w.path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
            });
        }
        for (dir, mode) in [
            (&w.clean_dir, 0o755),
            (&w.failed_dir, 0o750),
            (&w.quarantine_dir, 0o700),
            (&w.staging_dir, 0o700),
        ] {
            fsops::create_dir_all_mode(dir, mode).map_err(|e| FatalError::Io {
                about: "cannot create folder",
                path: dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        if let Ok(m) = std::fs::metadata(&w.quarantine_dir) {
            use std::os::unix::fs::PermissionsExt;
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %w.quarantine_dir.display(),
                    mode = format!("{:o}", m.permissions().mode() & 0o777),
                    "the quarantine folder is readable by others than its owner; consider chmod 0700"
                );
            }
        }
        let staging_dev = std::fs::metadata(&w.staging_dir)
            .map(|m| m.dev())
            .map_err(|source| FatalError::Io {
                about: "staging folder",
                path: w.staging_dir.clone(),
                source,
            })?;
        if staging_dev != meta.dev() {
            return Err(FatalError::Io {
                about: "staging folder must be on the same filesystem as the inbox",
                path: w.staging_dir.clone(),
                source: std::io::Error::from(std::io::ErrorKind::CrossesDevices),
            });
        }
    }
    Ok(())
}

/// What each stage resumes with.
struct Resume {
    claimed: Vec<(FileId, PathBuf)>,
    hashed: Vec<Claimed>,
    submitting: Vec<crate::journal::FileRecord>,
    submitted: Vec<crate::journal::FileRecord>,
    to_place: Vec<FileId>,
}

/// Reconciles the journal with the staging folders; see the module docs.
async fn reconcile(shared: &Shared) -> Result<Resume, FatalError> {
    let journal = &shared.journal;
    let records = journal.in_states(&FileState::UNFINISHED).await?;
    let mut resume = Resume {
        claimed: Vec::new(),
        hashed: Vec::new(),
        submitting: Vec::new(),
        submitted: Vec::new(),
        to_place: Vec::new(),
    };
    let mut known: HashSet<PathBuf> = HashSet::new();
    for r in records {
        known.insert(r.staged.clone());
        let staged_exists = std::fs::symlink_metadata(&r.staged).is_ok();
        match r.state {
            FileState::Claimed => {
                if staged_exists {
                    resume.claimed.push((r.id, r.staged));
                } else {
                    // The rename never happened: the file is still in the inbox (and is seen
                    // again), or another agent or the user took it. Nothing of it was ours.
                    journal.unclaim(vec![r.id]).await?;
                }
            }
            FileState::Hashed
            | FileState::Waiting
            | FileState::Submitting
            | FileState::Submitted
                if !staged_exists =>
            {
                tracing::warn!(id = r.id, path = %r.rel_path.display(), "staged file vanished while the agent was down");
                if let (FileState::Submitting | FileState::Submitted, Some(scan_id)) =
                    (r.state, r.scan_id.clone())
                {
                    journal.stale_scan(scan_id).await?;
                }
                journal
                    .decide(vec![(
                        r.id,
                        crate::journal::Decision::failed("vanished from staging", false),
                    )])
                    .await?;
                journal
                    .close_vanished(
                        r.id,
                        "vanished from staging while the agent was down".into(),
                    )
                    .await?;
            }
            FileState::Hashed => {
                if let (Some(sha256), Some(stamp)) = (r.sha256, r.stamp) {
                    resume.hashed.push(Claimed {
                        id: r.id,
                        staged: r.staged,
                        sha256,
                        stamp,
                    });
                }
            }
            FileState::Waiting => {}
            FileState::Submitting => resume.submitting.push(r),
            FileState::Submitted => resume.submitted.push(r),
            FileState::Decided | FileState::Placing | FileState::Placed => {
                resume.to_place.push(r.id);
            }
            FileState::Done => {}
        }
    }
    // Staged files without a record: re-enter as new files.
    let mut orphans = Vec::new();
    for w in &shared.config.watches {
        let Ok(entries) = std::fs::read_dir(&w.staging_dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if known.contains(&p) || !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            // A record may exist whose path we did not load (done records); ask the journal.
            orphans.push((w.path.clone(), p));
        }
    }
    if !orphans.is_empty() {
        let staged: Vec<PathBuf> = orphans.iter().map(|(_, p)| p.clone()).collect();
        let known = journal.known_staged(staged).await?;
        let mut claims = Vec::new();
        for ((root, p), k) in orphans.into_iter().zip(known) {
            if k {
                continue;
            }
            tracing::warn!(path = %p.display(), "file in staging without a journal record: scanning it as new");
            let name = p.file_name().map(PathBuf::from).unwrap_or_default();
            claims.push(NewClaim {
                root,
                rel_path: Path::new("recovered").join(name),
                staged: p,
                dropped_at_ms: None,
            });
        }
        let staged: Vec<PathBuf> = claims.iter().map(|c| c.staged.clone()).collect();
        let ids = journal.claim(claims).await?;
        resume.claimed.extend(ids.into_iter().zip(staged));
    }
    for w in &shared.config.watches {
        for d in [&w.clean_dir, &w.quarantine_dir, &w.failed_dir] {
            fsops::remove_partials(d);
        }
    }
    let n = resume.claimed.len()
        + resume.hashed.len()
        + resume.submitting.len()
        + resume.submitted.len()
        + resume.to_place.len();
    if n > 0 {
        tracing::info!(
            files = n,
            submitted = resume.submitted.len(),
            unconfirmed = resume.submitting.len(),
            "resuming work from the journal"
        );
    }
    Ok(resume)
}

/// Periodic chores: restrictions refresh, journal pruning.
async fn housekeeping(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut refresh = tokio::time::interval(shared.config.server.restrictions_refresh);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    let mut prune = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = refresh.tick() => {
                shared.limits.refresh(&shared.client).await.ok();
            }
            _ = prune.tick() => {
                match shared.journal.prune(crate::journal::DEFAULT_HISTORY, shared.config.state.verdict_ttl).await {
                    Ok(n) if n > 0 => tracing::debug!(records = n, "pruned finished records"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "journal prune failed"),
                }
            }
        }
    }
}
