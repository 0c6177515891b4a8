//! The context every stage shares: configuration, journal, client, limits, metrics, the roots
//! ([`crate::root`]), and the placement events.
//!
//! It sits below the stages: it knows the filesystem layer and the journal, never a stage.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::config::Config;
use crate::fsops::roots::Owner;
use crate::fsops::{self, Dir, FsError, Stamp};
use crate::journal::Journal;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::pipeline::Placement;
use crate::root::{Root, Roots};
use crate::scanner::Scanner;

/// What every stage shares.
pub struct Shared {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The journal.
    pub journal: Journal,
    /// The scanning service (one pooled connection set), behind its seam.
    pub scanner: Scanner,
    /// Restrictions, rate, in-flight cap, server health.
    pub limits: Limits,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Placement events, for the demo, tests and any observer.
    pub events: broadcast::Sender<Placement>,
    /// The watched roots (same order as `config.watches`).
    pub roots: Roots,
    /// This host, as written in the staging folders' owner markers.
    pub owner: Owner,
    /// Paths already warned about (hard-linked files left in the inbox), to warn once.
    pub(crate) warned: std::sync::Mutex<HashSet<PathBuf>>,
    /// Told when a private copy found its staging folder full: claim owns the records left
    /// `claimed` again a little later, instead of at the stuck-claim sweep.
    pub(crate) staging_full: tokio::sync::Notify,
}

impl Shared {
    /// The root of a journal record (its `root` path), resolved when the record is read back.
    pub fn root_of(&self, root: &Path) -> Option<&Arc<Root>> {
        self.roots.by_path(root)
    }

    /// The staging folder holding `staged` (a journal record's staged path), opened beneath
    /// its root, and the file's name in it.
    pub fn staging_of(&self, staged: &Path) -> Result<(Arc<Dir>, OsString), FsError> {
        let name = staged.file_name().map(OsStr::to_os_string);
        match (self.roots.by_staged(staged), name) {
            (Some(root), Some(name)) => Ok((root.staging()?, name)),
            _ => Err(FsError::NotBeneath {
                path: staged.to_path_buf(),
            }),
        }
    }

    /// Whether `staged` is in the staging folder of a watch this agent serves. A record of any
    /// other (a watch whose inbox was missing or did not answer at start, or one no longer
    /// configured), or of a watch held at start (its staging folder not recognised) that was in
    /// flight then, is left as it is for the agent that serves it: never hashed, uploaded,
    /// placed or failed here.
    pub fn serves(&self, staged: &Path) -> bool {
        self.roots
            .by_staged(staged)
            .is_some_and(|r| !r.status.holds_record(staged))
    }

    /// Whether the staging folder reached now for `staged` is another folder than the one the
    /// file was moved into at its claim (`staged_in`, its journal record's (dev, ino); for a
    /// record of a version that did not keep it, the folder this agent locked): a share mounted
    /// over the inbox covers the folder that holds the file, or did when it was claimed and has
    /// gone since. A folder that cannot be opened counts as covered.
    pub fn staging_covered(&self, staged: &Path, staged_in: Option<(u64, u64)>) -> bool {
        let Some(root) = self.roots.by_staged(staged) else {
            return false;
        };
        let Some(folder) = staged_in.or_else(|| root.dirs().locked_staging()) else {
            return false;
        };
        root.staging()
            .and_then(|d| d.identity())
            .map_or(true, |now| now != folder)
    }

    /// Opens a staged file for reading; it must still be the file that was hashed.
    pub fn open_staged(&self, staged: &Path, hashed: &Stamp) -> Result<std::fs::File, FsError> {
        let (dir, name) = self.staging_of(staged)?;
        let (file, now) = dir.open_file(&name)?;
        if !fsops::same_file(hashed, &now.stamp()) {
            return Err(FsError::Changed {
                path: staged.to_path_buf(),
                detail: "changed since it was hashed".into(),
            });
        }
        Ok(file)
    }

    /// Makes sure `root` is safe to claim from: files can be moved out of its inbox without
    /// replacing another (not an SMB client mount), its staging folder opened beneath the inbox
    /// without following links (made again if removed) and owned by this host, and its
    /// destinations dropscan's own (`fsops::dest`), so that nothing is taken in that could not
    /// be placed.
    pub fn staging_ready(&self, root: &Root) -> Result<(), FsError> {
        let dirs = root.dirs();
        dirs.safe_moves()?;
        let staging = dirs.staging_in_place()?;
        dirs.hold_staging(&staging)?;
        fsops::roots::claim_owner_if_missing(&staging, &self.owner)?;
        dirs.destinations_ready()
    }

    /// True the first time `path` is warned about.
    pub fn first_warning(&self, path: &Path) -> bool {
        let mut w = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.len() > 10_000 {
            w.clear();
        }
        w.insert(path.to_path_buf())
    }

    /// A request to KATA failed: pause submissions accordingly, and when this changes the
    /// server's state (up → down, or → unauthorized), keep the error for `dropscan status`.
    pub async fn server_failed(&self, e: &crate::scanner::ApiError) -> std::time::Duration {
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
