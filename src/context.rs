//! The context every stage shares: configuration, journal, client, limits, metrics, the roots'
//! folders as descriptors, and the placement events.
//!
//! It sits below the stages: it knows the filesystem layer and the journal, never a stage.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::config::Config;
use crate::fsops::claim::Claim;
use crate::fsops::roots::{Owner, RootDirs, Which};
use crate::fsops::{self, Dir, FsError};
use crate::journal::{Journal, Stamp};
use crate::kata::KataClient;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::pipeline::Placement;

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
    /// The folders of each watched root, as descriptors (same order as `config.watches`).
    pub roots: Vec<RootDirs>,
    /// This host, as written in the staging folders' owner markers.
    pub owner: Owner,
    /// Per root: whether its failed folder is on the inbox's filesystem, so that a hard-linked
    /// file can be moved there unread.
    pub hard_links_ok: Vec<bool>,
    /// Paths already warned about (hard-linked files left in the inbox), to warn once.
    pub(crate) warned: std::sync::Mutex<HashSet<PathBuf>>,
}

impl Shared {
    /// The index of the watched root `root` (a journal record's root).
    pub fn root_index(&self, root: &Path) -> Option<usize> {
        self.config.watches.iter().position(|w| w.path == root)
    }

    /// The staging folder holding `staged` (a journal record's staged path), opened beneath
    /// its root, and the file's name in it.
    pub fn staging_of(&self, staged: &Path) -> Result<(Arc<Dir>, OsString), FsError> {
        let parent = staged.parent().unwrap_or(Path::new(""));
        let name = staged.file_name().map(OsStr::to_os_string);
        let i = self
            .config
            .watches
            .iter()
            .position(|w| w.staging_dir == parent);
        match (i, name) {
            (Some(i), Some(name)) => Ok((self.roots[i].get(Which::Staging, false)?, name)),
            _ => Err(FsError::NotBeneath {
                path: staged.to_path_buf(),
            }),
        }
    }

    /// The index of the root whose staging folder holds `staged`.
    pub fn root_of_staging(&self, staged: &Path) -> Option<usize> {
        let parent = staged.parent()?;
        self.config
            .watches
            .iter()
            .position(|w| w.staging_dir == parent)
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

    /// Makes sure root `i` is safe to claim from: files can be moved out of its inbox without
    /// replacing another (not an SMB client mount), its staging folder opened beneath the inbox
    /// without following links (made again if removed) and owned by this host, and its
    /// destinations dropscan's own (`fsops::dest`), so that nothing is taken in that could not
    /// be placed.
    pub fn staging_ready(&self, i: usize) -> Result<(), FsError> {
        self.roots[i].safe_moves()?;
        let staging = self.roots[i].staging_in_place()?;
        self.roots[i].hold_staging(&staging)?;
        fsops::roots::claim_owner_if_missing(&staging, &self.owner)?;
        self.roots[i].destinations_ready()
    }

    /// Claims a batch of settled files of root `i` (relative path, settled stamp, staged name,
    /// taken even if held open)
    /// with one fsync per folder for the whole batch. One result per file, in order.
    pub fn claim_files(
        &self,
        i: usize,
        files: &[(PathBuf, Stamp, OsString, bool)],
    ) -> Vec<Result<Claim, FsError>> {
        let dirs = self.roots[i]
            .get(Which::Inbox, false)
            .and_then(|inbox| Ok((inbox, self.roots[i].get(Which::Staging, false)?)));
        let (inbox, staging) = match dirs {
            Ok(d) => d,
            Err(e) => {
                let msg = e.to_string();
                return files
                    .iter()
                    .map(|(rel, _, _, _)| {
                        Err(FsError::io(
                            rel,
                            "claim",
                            std::io::Error::other(msg.clone()),
                        ))
                    })
                    .collect();
            }
        };
        let items: Vec<fsops::claim::ClaimItem<'_>> = files
            .iter()
            .map(|(rel, settled, name, held_open)| fsops::claim::ClaimItem {
                rel,
                settled,
                staged_name: name,
                held_open_ok: *held_open,
            })
            .collect();
        let leases = self.leases_here(i, &inbox);
        fsops::claim::claim_many(&inbox, &staging, &items, self.hard_links_ok[i], leases)
    }

    /// Whether open writers of root `i` are asked for with leases (its config, and not on a
    /// client mount): see [`fsops::lease::check_here`].
    pub fn leases_here(&self, i: usize, inbox: &Dir) -> bool {
        let enabled = self.config.watches[i].lease_check == crate::config::LeaseCheck::Auto;
        fsops::lease::check_here(inbox, enabled).is_ok()
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

/// The tag of a root's temp names: its staging folder's name (the instance id or the host
/// name) and a short hash of the staging folder's path. Two agents configured with one instance
/// id for different inboxes that share a destination never take each other's temps.
pub fn instance_of(w: &crate::config::WatchConfig) -> String {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let path = sha2::Sha256::digest(w.staging_dir.as_os_str().as_bytes());
    format!("{}-{}", legacy_instance_of(w), hex::encode(&path[..4]))
}

/// The tag older versions gave their temp names (the staging folder's name alone): still
/// recognised at start-up, for a placement an older version left half-way.
pub fn legacy_instance_of(w: &crate::config::WatchConfig) -> String {
    w.staging_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
