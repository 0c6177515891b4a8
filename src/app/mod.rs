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
//! Once every stage runs, the service manager is told `READY=1` (`crate::service`).
//!
//! Shutdown: the token is cancelled (SIGINT/SIGTERM); sources stop taking work; uploads in
//! progress get `shutdown_grace`, then are abandoned, which is safe because the journal already
//! says `submitting(scanId)`.

use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

mod inboxes;
mod leftovers;
pub mod lock;
pub mod preflight;
mod reconcile;
mod reload;
mod route;
mod supervise;

pub use inboxes::missing_inboxes;
pub use reload::{run_reloading, run_reloading_with};

use crate::config::Config;
pub use crate::context::Shared;
use crate::error::FatalError;
pub use crate::root::instance_of;

use crate::fsops;
use crate::fsops::roots::Owner;
use crate::journal::Journal;
use crate::kata::KataClient;
use crate::limits::Limits;
use crate::metrics::Metrics;
pub use crate::pipeline::Placement;
use crate::pipeline::Resubmit;
use crate::scanner::Scanner;
use crate::{claim, poll, settle, sort, upload, watch};
use supervise::Supervisor;

/// Capacity of the placement event channel (observers that lag lose old events).
const EVENTS_CAPACITY: usize = 1024;

/// The agent before it runs: lets callers subscribe to events first.
pub struct Agent {
    shared: Arc<Shared>,
    /// Whether this agent serves its own metrics endpoint (`dropscan run` serves one for the
    /// whole process instead, outside the reload loop).
    serve_metrics: bool,
    /// Whether its staging folders' locks outlive it: a SIGHUP reload's next generation takes
    /// them over without letting go for a moment ([`fsops::roots::StagingLock`]).
    keep_staging_locks: bool,
    /// How it asks the reload loop to start again on the whole configuration (a watch held at
    /// start until its staging folder is back); without it, start-up waits for that folder.
    restart: Option<inboxes::Restart>,
}

impl Agent {
    /// Opens the journal, builds the client and prepares the folders; the agent serves its own
    /// metrics endpoint when `[metrics] listen` is set.
    pub fn new(config: Config) -> Result<Self, FatalError> {
        let mut agent = Agent::with_metrics(config, Arc::new(Metrics::new()))?;
        agent.serve_metrics = true;
        Ok(agent)
    }

    /// As [`Agent::new`], counting into `metrics`, which outlive this agent (a SIGHUP reload
    /// replaces the agent, never the counters); the caller serves them.
    pub fn with_metrics(config: Config, metrics: Arc<Metrics>) -> Result<Self, FatalError> {
        let config = Arc::new(config);
        let roots = reconcile::prepare_folders(&config)?;
        let journal = Journal::open(&config.journal_path())?;
        let client = KataClient::new(config.server.client_options())?;
        let limits = Limits::from_config(&config.server);
        let (events, _) = broadcast::channel(EVENTS_CAPACITY);
        let cert_expiry = crate::kata::tls::warn_at_start(&config.server.tls);
        metrics.set_client_cert_expiry(cert_expiry);
        metrics.attach(limits.clone(), &config.journal_path());
        metrics.attach_tally(journal.tally());
        metrics.set_roots(&roots);
        {
            let m = Arc::clone(&metrics);
            client.observe(Arc::new(move |endpoint, code| m.answer(endpoint, code)));
        }
        let scanner = Scanner::kata(client);
        Ok(Agent {
            serve_metrics: false,
            keep_staging_locks: false,
            restart: None,
            shared: Arc::new(Shared {
                config,
                journal,
                scanner,
                limits,
                metrics,
                events,
                roots,
                owner: Owner::this_host(),
                warned: std::sync::Mutex::default(),
                staging_full: tokio::sync::Notify::new(),
            }),
        })
    }

    /// Placement events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Placement> {
        self.shared.events.subscribe()
    }

    /// Its journal (tests simulate a full disk through it).
    #[cfg(any(test, feature = "test-util"))]
    #[doc(hidden)]
    pub fn journal(&self) -> crate::journal::Journal {
        self.shared.journal.clone()
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.shared.metrics)
    }

    /// Keeps its staging folders locked after it stops, for the agent that replaces it (the
    /// reload loop).
    pub(crate) fn keep_staging_locks(mut self) -> Self {
        self.keep_staging_locks = true;
        self
    }

    /// Lets it end its run to have the reload loop start again on `restart`'s configuration: a
    /// watch whose staging folder is missing at start while files of it are in flight is then
    /// held (every other watch goes on) until the folder is back, instead of waited for.
    pub(crate) fn restart_into(mut self, restart: inboxes::Restart) -> Self {
        self.restart = Some(restart);
        self
    }

    /// Runs until `shutdown` is cancelled or a stage fails.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), FatalError> {
        let (shared, keep) = (Arc::clone(&self.shared), self.keep_staging_locks);
        let result = self.run_stages(shutdown).await;
        if !keep {
            // Let go now, not when the last task holding a root is dropped: an aborted task is
            // dropped by the runtime a moment later, and the next agent (a restart in the same
            // process) would find the folder still locked.
            let held: Vec<(u64, u64)> = shared
                .roots
                .iter()
                .filter_map(|r| r.dirs().release_staging())
                .collect();
            fsops::roots::off_thread(move || fsops::roots::release_staging_locks(&held)).await;
        }
        result
    }

    async fn run_stages(self, shutdown: CancellationToken) -> Result<(), FatalError> {
        let (shared, serve_metrics, restart) = (self.shared, self.serve_metrics, self.restart);
        let cfg = Arc::clone(&shared.config);
        // Restrictions first (a failure is not fatal: the server may be down; it is retried).
        // A shutdown meanwhile ends the run: a server trickling its answer must not hold it.
        let refreshed = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            r = shared.limits.refresh(&shared.scanner) => r,
        };
        if refreshed.is_err() {
            tracing::warn!(
                "starting without the server's restrictions; they are fetched again later"
            );
        }
        let mut resume = reconcile::reconcile(&shared, &shutdown, restart.is_some()).await?;
        let awaited = std::mem::take(&mut resume.awaited);

        let sup = Supervisor::new(&shutdown);
        spawn_pipeline(&sup, &shared, resume);
        let (stages, tracker) = (&sup.stages, &sup.tracker);
        tracker.spawn(housekeeping(Arc::clone(&shared), stages.clone()));
        tracker.spawn(crate::runtime::trim_freed_memory(stages.clone()));
        if let Some(restart) = restart.filter(|_| !awaited.is_empty()) {
            tracker.spawn(inboxes::restart_when_staging_back(
                awaited,
                restart,
                shutdown.clone(),
            ));
        }
        // Notifications: their own task, reading the journal's queue; never on a stage's path.
        tracker.spawn(crate::hooks::run(
            shared.journal.clone(),
            cfg.hooks.clone(),
            stages.clone(),
        ));
        if let Some(addr) = cfg.metrics_listen.filter(|_| serve_metrics) {
            let (m, s) = (Arc::clone(&shared.metrics), stages.clone());
            tracker.spawn(async move {
                if let Err(e) = crate::metrics::serve(addr, m, s).await {
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
        crate::service::ready(&format!(
            "running: {} watched folder(s), server {}",
            cfg.watches.len(),
            cfg.server.url
        ));

        sup.wait(cfg.state.shutdown_grace + std::time::Duration::from_secs(2))
            .await
    }
}

/// Makes the channels between the stages and spawns the six stages on `sup`, each with what
/// reconciling left for it (`resume`).
fn spawn_pipeline(sup: &Supervisor, shared: &Arc<Shared>, resume: reconcile::Resume) {
    let (candidates_tx, candidates_rx) =
        crate::watch::candidate_channels(shared.roots.len(), watch::CANDIDATES_CAPACITY);
    let (settled_tx, settled_rx) = mpsc::channel(settle::SETTLED_CAPACITY);
    let (claimed_tx, claimed_rx) = mpsc::channel(claim::CLAIMED_CAPACITY);
    let (submitted_tx, submitted_rx) = mpsc::channel(upload::SUBMITTED_CAPACITY);
    let (verdicts_tx, verdicts_rx) = mpsc::channel(sort::VERDICTS_CAPACITY);
    let resubmit = Resubmit::default();
    for c in resume.hashed {
        resubmit.push(c);
    }

    let roots = shared.roots.clone();
    {
        let (roots, stages) = (roots.clone(), sup.stages.clone());
        let list_again = shared.journal.recovered();
        sup.stage(
            "watch",
            Box::pin(async move {
                watch::run(roots, candidates_tx, list_again, stages)
                    .await
                    .map_err(|e| FatalError::Stage {
                        stage: "watch",
                        detail: e.to_string(),
                    })
            }),
        );
    }
    sup.stage(
        "settle",
        Box::pin(
            settle::run(
                roots,
                candidates_rx,
                settled_tx,
                shared.journal.recovered(),
                sup.stages.clone(),
            )
            .map(Ok),
        ),
    );
    let claim = claim::run(
        Arc::clone(shared),
        claim::Inputs {
            settled_rx,
            resume: resume.claimed,
        },
        claim::Outputs {
            claimed_tx,
            verdicts_tx: verdicts_tx.clone(),
        },
        sup.stages.clone(),
    );
    sup.stage("claim", Box::pin(claim));
    let upload = upload::run(
        Arc::clone(shared),
        upload::Inputs {
            claimed_rx,
            resubmit: resubmit.clone(),
        },
        upload::Outputs {
            submitted_tx,
            verdicts_tx: verdicts_tx.clone(),
        },
        sup.stages.clone(),
    );
    sup.stage("upload", Box::pin(upload));
    let poll = poll::run(
        Arc::clone(shared),
        poll::Inputs {
            submitted_rx,
            submitted: resume.submitted,
            unconfirmed: resume.submitting,
        },
        poll::Outputs {
            resubmit: resubmit.clone(),
            verdicts_tx,
        },
        sup.stages.clone(),
    );
    sup.stage("poll", Box::pin(poll));
    let sort = sort::run(
        Arc::clone(shared),
        sort::Inputs {
            verdicts_rx,
            resume: resume.to_place,
        },
        sort::Outputs { resubmit },
        sup.stages.clone(),
    );
    sup.stage("sort", Box::pin(sort));
}

/// Runs the agent with `config` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), FatalError> {
    Agent::new(config)?.run(shutdown).await
}

/// How often the `STATUS=` line is refreshed under a service manager.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a journal whose writes fail is probed for space.
const JOURNAL_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Periodic chores: restrictions refresh, health probe, journal pruning, owner markers, systemd
/// watchdog pings.
async fn housekeeping(shared: Arc<Shared>, shutdown: CancellationToken) {
    // An idle agent hears nothing from the server: without asking, /readyz and server_up would
    // keep saying "up" through an outage or a revoked integration.
    let probe_every = shared.config.server.health_probe;
    let mut refresh = tokio::time::interval(shared.config.server.restrictions_refresh);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    let history = shared.config.state.history;
    let mut prune = tokio::time::interval(prune_interval(history));
    // While the disk refuses the journal's writes, a small write every few seconds tells when
    // space is back (nothing else may write meanwhile: files wait in the inbox).
    let mut probe = tokio::time::interval(JOURNAL_PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What `systemctl status` shows, refreshed while a service manager listens.
    let mut status = tokio::time::interval(STATUS_EVERY);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status.tick().await;
    let mut heartbeat = tokio::time::interval(fsops::roots::OWNER_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // systemd's WatchdogSec: pinged from here, so a stuck housekeeping loop gets us restarted.
    let watchdog_every = crate::service::watchdog_interval();
    let mut watchdog =
        tokio::time::interval(watchdog_every.unwrap_or(std::time::Duration::from_secs(3600)));
    let tidy_every = tidy_interval(&shared.config);
    let mut tidy =
        tokio::time::interval(tidy_every.unwrap_or(std::time::Duration::from_secs(3600)));
    tidy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = watchdog.tick(), if watchdog_every.is_some() => crate::service::watchdog(),
            _ = tidy.tick(), if tidy_every.is_some() => tidy_inboxes(&shared).await,
            _ = heartbeat.tick() => {
                // Keep the staging folders' owner markers fresh: another host configured with
                // our instance id is refused while we run.
                let sh = Arc::clone(&shared);
                let beat = tokio::task::spawn_blocking(move || {
                    for root in sh.roots.iter() {
                        let roots = root.dirs();
                        if let Ok(Some(staging)) = roots.staging_if_present() {
                            let owned = roots
                                .hold_staging(&staging)
                                .and_then(|()| fsops::roots::claim_owner(&staging, &sh.owner));
                            if let Err(e) = owned {
                                tracing::error!(error = %e, "cannot refresh the staging folder's owner marker");
                            }
                        }
                    }
                });
                beat.await.ok();
            }
            _ = refresh.tick() => {
                shared.limits.refresh(&shared.scanner).await.ok();
            }
            _ = status.tick(), if crate::service::listening() => {
                let snap = shared.limits.snapshot();
                let pending = shared.journal.summary().await.map_or(0, |s| {
                    s.pending_by_root.iter().map(|(_, n, _)| *n).sum::<i64>()
                });
                let waiting = usize::try_from(pending).unwrap_or(0).saturating_sub(snap.in_flight);
                let server = match shared.limits.health() {
                    crate::limits::Health::Up => "up",
                    crate::limits::Health::Down => "unavailable",
                    crate::limits::Health::Unauthorized => "refuses this sensor (401)",
                };
                crate::service::status(&crate::service::running_line(
                    snap.in_flight,
                    snap.cap,
                    waiting,
                    snap.binding.as_str(),
                    server,
                ));
            }
            () = tokio::time::sleep_until(shared.limits.probe_due(probe_every)) => {
                shared.limits.probe(&shared.scanner, probe_every).await.ok();
            }
            _ = probe.tick(), if shared.journal.writes_failing() => {
                if let Err(e) = shared.journal.probe_write().await {
                    tracing::debug!(error = %e, "the journal still refuses writes");
                }
            }
            _ = prune.tick() => {
                match shared.journal.prune(history, shared.config.state.verdict_ttl).await {
                    Ok(n) if n > 0 => tracing::debug!(records = n, "pruned finished records"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "journal prune failed"),
                }
            }
        }
    }
}

/// How often finished records older than `history` are pruned: a quarter of it, between 10 s
/// and an hour (the journal then holds at most 1.25 times `history` of finished records).
fn prune_interval(history: std::time::Duration) -> std::time::Duration {
    (history / 4).clamp(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(3600),
    )
}

/// How often the inboxes are tidied: a quarter of the shortest `tidy_after`, between 1 s and a
/// minute; `None` when every watch has it "off".
fn tidy_interval(config: &Config) -> Option<std::time::Duration> {
    let shortest = config.watches.iter().filter_map(|w| w.tidy_after).min()?;
    Some((shortest / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    ))
}

/// One tidy pass over every inbox that has one ([`crate::tidy`]): leftovers removed during the
/// walk, then each empty folder judged with the journal's first claim below it.
async fn tidy_inboxes(shared: &Arc<Shared>) {
    for root in shared.roots.iter() {
        let w = &root.config;
        let Some(after) = w.tidy_after else { continue };
        let Ok(inbox) = root.inbox() else {
            continue;
        };
        let now = std::time::SystemTime::now();
        let (walked_w, walked_inbox) = (w.clone(), Arc::clone(&inbox));
        let Ok(empty) = tokio::task::spawn_blocking(move || {
            crate::tidy::walk(&walked_w, &walked_inbox, after, now)
        })
        .await
        else {
            continue;
        };
        for f in empty {
            // Without a creation time the folder is kept anyway (`tidy::prunable`).
            let Some(born_ns) = f.born_ns else { continue };
            let first = match shared
                .journal
                .first_taken_below(w.path.clone(), f.rel.clone(), born_ns.div_euclid(1_000_000))
                .await
            {
                Ok(first) => first.map(|ms| ms.saturating_mul(1_000_000)),
                Err(e) => {
                    tracing::debug!(error = %e, "tidy: journal not asked; folder kept");
                    continue;
                }
            };
            let inbox = Arc::clone(&inbox);
            tokio::task::spawn_blocking(move || crate::tidy::prune(&inbox, &f, first, after, now))
                .await
                .ok();
        }
    }
}
