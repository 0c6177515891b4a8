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

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use crate::config::Config;
pub use crate::context::{Shared, instance_of};
use crate::error::FatalError;

use crate::fsops::roots::{Owner, RootDirs, Which};
use crate::fsops::{self, Dir};
use crate::journal::{FileId, FileState, Journal, NewClaim};
use crate::kata::KataClient;
use crate::limits::Limits;
use crate::metrics::Metrics;
pub use crate::pipeline::Placement;
use crate::pipeline::{Claimed, Resubmit};
use crate::{claim, poll, settle, sort, upload, watch};

/// A stage as the supervisor holds it.
type StageFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), FatalError>> + Send>>;

/// Capacity of the placement event channel (observers that lag lose old events).
const EVENTS_CAPACITY: usize = 1024;

/// The agent before it runs: lets callers subscribe to events first.
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    /// Opens the journal, builds the client and prepares the folders.
    pub fn new(config: Config) -> Result<Self, FatalError> {
        let config = Arc::new(config);
        let (roots, hard_links_ok) = prepare_folders(&config)?;
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
                roots,
                owner: Owner::this_host(),
                hard_links_ok,
                warned: std::sync::Mutex::default(),
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
        let resume = reconcile(&shared, &shutdown).await?;

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
        let stage = |name: &'static str, fut: StageFuture| {
            let (stages, failure) = (stages.clone(), Arc::clone(&failure));
            tracker.spawn(async move {
                let outcome = std::panic::AssertUnwindSafe(fut).catch_unwind().await;
                if stages.is_cancelled() {
                    return;
                }
                let error = match outcome {
                    Ok(Ok(())) => FatalError::Stage {
                        stage: name,
                        detail: "ended".into(),
                    },
                    Ok(Err(e)) => e,
                    Err(_) => FatalError::Stage {
                        stage: name,
                        detail: "panicked".into(),
                    },
                };
                tracing::error!(stage = name, error = %error, "stage stopped unexpectedly; stopping the agent");
                failure
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert(error);
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
                        .map_err(|e| FatalError::Stage {
                            stage: "watch",
                            detail: e.to_string(),
                        })
                }),
            );
        }
        stage(
            "settle",
            Box::pin(settle::run(watches, candidates_rx, settled_tx, stages.clone()).map(Ok)),
        );
        let claim = claim::run(
            Arc::clone(&shared),
            claim::Inputs {
                settled_rx,
                resume: resume.claimed,
            },
            claim::Outputs {
                claimed_tx,
                verdicts_tx: verdicts_tx.clone(),
            },
            stages.clone(),
        );
        stage("claim", Box::pin(claim));
        let upload = upload::run(
            Arc::clone(&shared),
            upload::Inputs {
                claimed_rx,
                resubmit: resubmit.clone(),
            },
            upload::Outputs {
                submitted_tx,
                verdicts_tx: verdicts_tx.clone(),
            },
            stages.clone(),
        );
        stage("upload", Box::pin(upload));
        let poll = poll::run(
            Arc::clone(&shared),
            poll::Inputs {
                submitted_rx,
                submitted: resume.submitted,
                unconfirmed: resume.submitting,
            },
            poll::Outputs {
                resubmit: resubmit.clone(),
                verdicts_tx,
            },
            stages.clone(),
        );
        stage("poll", Box::pin(poll));
        let sort = sort::run(
            Arc::clone(&shared),
            sort::Inputs {
                verdicts_rx,
                resume: resume.to_place,
            },
            sort::Outputs { resubmit },
            stages.clone(),
        );
        stage("sort", Box::pin(sort));
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

/// Opens every inbox and creates the destinations with their modes, each as a descriptor
/// ([`RootDirs`]); a destination inside an inbox is opened beneath it without following links.
/// Staging folders are left to [`reconcile`], which must first recognise each root.
fn prepare_folders(config: &Config) -> Result<(Vec<RootDirs>, Vec<bool>), FatalError> {
    let mut all = Vec::with_capacity(config.watches.len());
    let mut hard_links_ok = Vec::with_capacity(config.watches.len());
    for w in &config.watches {
        let roots = RootDirs::new(w);
        let folder = |about| move |source| FatalError::Folder { about, source };
        let inbox = roots
            .get(Which::Inbox, false)
            .map_err(folder("watched folder"))?;
        for which in [Which::Clean, Which::Failed, Which::Quarantine] {
            roots
                .get(which, true)
                .map_err(folder("destination folder"))?;
        }
        let quarantine = roots
            .get(Which::Quarantine, false)
            .map_err(folder("quarantine folder"))?;
        if let Ok(st) = rustix::fs::fstat(quarantine.fd()) {
            if st.st_mode & 0o077 != 0 {
                tracing::warn!(
                    path = %fsops::shown(quarantine.path()),
                    mode = format!("{:o}", st.st_mode & 0o777),
                    "the quarantine folder is readable by others than its owner; consider chmod 0700"
                );
            }
        }
        let inbox_dev = inbox.identity().map_err(folder("watched folder"))?.0;
        let failed_dev = roots
            .get(Which::Failed, false)
            .and_then(|d| d.identity())
            .map_err(folder("failed folder"))?
            .0;
        hard_links_ok.push(inbox_dev == failed_dev);
        all.push(roots);
    }
    Ok((all, hard_links_ok))
}

/// Recognises root `i` before anything under it is judged: its staging folder must exist
/// (opened beneath the inbox, never through a link), be on the inbox's filesystem and be ours.
/// A missing staging folder while records of the root are in flight means the inbox is not
/// what it was (a share not mounted yet): wait for it rather than call every file vanished.
async fn recognise_root(
    shared: &Shared,
    i: usize,
    in_flight: usize,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<Dir>>, FatalError> {
    let roots = &shared.roots[i];
    let unsafe_staging = |source| FatalError::Folder {
        about: "staging folder",
        source,
    };
    let mut waited = 0u64;
    let staging = loop {
        if waited > 0 {
            roots.forget();
        }
        let inbox_ok = roots.get(Which::Inbox, false).is_ok();
        match roots.staging_if_present().map_err(unsafe_staging)? {
            Some(d) => break d,
            None if in_flight == 0 && inbox_ok => {
                break roots.get(Which::Staging, true).map_err(unsafe_staging)?;
            }
            None => {
                if waited % 60 == 0 {
                    tracing::warn!(
                        inbox = %fsops::shown(roots.path(Which::Inbox)),
                        staging = %fsops::shown(roots.path(Which::Staging)),
                        files = in_flight,
                        "the staging folder is missing while files are in flight: is the share \
                         mounted? waiting for it (nothing is judged missing until it is back; if \
                         the folder is really gone, create it empty to let dropscan close the records)"
                    );
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(None),
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
                waited += 1;
            }
        }
    };
    let inbox = roots
        .get(Which::Inbox, false)
        .map_err(|source| FatalError::Folder {
            about: "watched folder",
            source,
        })?;
    let same_fs = match (inbox.identity(), staging.identity()) {
        (Ok(a), Ok(b)) => a.0 == b.0,
        _ => false,
    };
    if !same_fs {
        return Err(FatalError::Io {
            about: "staging folder must be on the same filesystem as the inbox",
            path: roots.path(Which::Staging).to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::CrossesDevices),
        });
    }
    fsops::roots::claim_owner(&staging, &shared.owner).map_err(unsafe_staging)?;
    Ok(Some(staging))
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
async fn reconcile(shared: &Shared, shutdown: &CancellationToken) -> Result<Resume, FatalError> {
    let journal = &shared.journal;
    let records = journal.in_states(&FileState::UNFINISHED).await?;
    let mut resume = Resume {
        claimed: Vec::new(),
        hashed: Vec::new(),
        submitting: Vec::new(),
        submitted: Vec::new(),
        to_place: Vec::new(),
    };
    // Every root is recognised first; records of a root no longer configured are left alone
    // (the sorter says so when it meets them).
    let mut stagings = Vec::with_capacity(shared.roots.len());
    for i in 0..shared.roots.len() {
        let in_flight = records
            .iter()
            .filter(|r| shared.root_index(&r.root) == Some(i))
            .count();
        match recognise_root(shared, i, in_flight, shutdown).await? {
            Some(d) => stagings.push(d),
            None => return Ok(resume),
        }
    }
    let unfinished: HashSet<FileId> = records.iter().map(|r| r.id).collect();
    let mut known: HashSet<PathBuf> = HashSet::new();
    for r in records {
        known.insert(r.staged.clone());
        let Some(i) = shared.root_index(&r.root) else {
            tracing::warn!(id = r.id, root = %fsops::shown(&r.root), "record of a root that is no longer configured: left as it is");
            continue;
        };
        let name = r.staged.file_name().unwrap_or_default();
        let staged_exists = match stagings[i].exists(name) {
            Ok(x) => x,
            Err(e) => {
                return Err(FatalError::Folder {
                    about: "staging folder",
                    source: e,
                });
            }
        };
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
                tracing::warn!(id = r.id, path = %fsops::shown(&r.rel_path), "staged file vanished while the agent was down");
                if let (FileState::Submitting | FileState::Submitted, Some(scan_id)) =
                    (r.state, r.scan_id.clone())
                {
                    journal.stale_scan(scan_id).await?;
                }
                journal
                    .decide(vec![(
                        r.id,
                        crate::journal::Decision::failed(
                            crate::error::FileError::Vanished.to_string(),
                            false,
                        ),
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
    // Staged files without an unfinished record re-enter as new files: under their original
    // path when a finished record still names them (a file must never sit in staging behind a
    // closed record), else under `recovered/`.
    let mut orphans = Vec::new();
    for (i, staging) in stagings.iter().enumerate() {
        let entries = staging.entries().map_err(|source| FatalError::Folder {
            about: "staging folder",
            source,
        })?;
        for (name, st) in entries {
            let p = staging.path().join(&name);
            if known.contains(&p) || !st.is_regular() || !name.as_bytes().ends_with(b".staged") {
                continue;
            }
            orphans.push((i, name, p));
        }
    }
    if !orphans.is_empty() {
        let staged: Vec<PathBuf> = orphans.iter().map(|(_, _, p)| p.clone()).collect();
        let previous = journal.closed_records_of(staged).await?;
        let mut claims = Vec::new();
        let mut moves = Vec::new();
        for ((i, name, p), prev) in orphans.into_iter().zip(previous) {
            let w = &shared.config.watches[i];
            let rel_path = match prev {
                Some(rel) => {
                    tracing::warn!(path = %fsops::shown(&rel), "file still in staging behind a finished record: scanning it again");
                    rel
                }
                None => {
                    tracing::warn!(path = %fsops::shown(&p), "file in staging without a journal record: scanning it as new");
                    Path::new("recovered").join(&name)
                }
            };
            // A fresh staged name: the old one may still be on a finished record.
            let fresh = OsString::from(format!("{}.staged", uuid::Uuid::new_v4().simple()));
            claims.push(NewClaim {
                root: w.path.clone(),
                rel_path,
                staged: w.staging_dir.join(&fresh),
                dropped_at_ms: None,
            });
            moves.push((i, name, fresh));
        }
        let staged: Vec<PathBuf> = claims.iter().map(|c| c.staged.clone()).collect();
        let ids = journal.claim(claims).await?;
        for ((id, to), (i, from, fresh)) in ids.into_iter().zip(staged).zip(moves) {
            match fsops::rename_noreplace(&stagings[i], &from, &stagings[i], &fresh) {
                Ok(_) => resume.claimed.push((id, to)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-enter a staged file; retried at the next start");
                    journal.unclaim(vec![id]).await?;
                }
            }
        }
    }
    for (i, roots) in shared.roots.iter().enumerate() {
        let instance = instance_of(&shared.config.watches[i]);
        for which in [Which::Clean, Which::Quarantine, Which::Failed] {
            if let Ok(d) = roots.get(which, false) {
                fsops::place::remove_partials(&d, &instance, &|id| unfinished.contains(&id));
            }
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
    let mut heartbeat = tokio::time::interval(fsops::roots::OWNER_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = heartbeat.tick() => {
                // Keep the staging folders' owner markers fresh: another host configured with
                // our instance id is refused while we run.
                let sh = Arc::clone(&shared);
                let beat = tokio::task::spawn_blocking(move || {
                    for roots in &sh.roots {
                        if let Ok(Some(staging)) = roots.staging_if_present() {
                            if let Err(e) = fsops::roots::claim_owner(&staging, &sh.owner) {
                                tracing::error!(error = %e, "cannot refresh the staging folder's owner marker");
                            }
                        }
                    }
                });
                beat.await.ok();
            }
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
