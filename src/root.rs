//! One watched root, named: its configuration, its folders as descriptors, and what was learnt
//! about it at start-up. The stages take a [`Root`] (or its [`RootId`]); no stage knows how a
//! root keeps its folders (the layout check in `tests/layout.rs` keeps [`RootDirs`] and
//! `fsops::roots` out of them).
//!
//! # What an input source provides
//!
//! A root is today a folder. Whatever stands in for it must give the pipeline five things:
//!
//! 1. **list**: the names beneath it that may be new (watch: notify hints plus a periodic full
//!    listing, the listing being the truth);
//! 2. **stat**: for one name, a [`Stamp`] (size, identity, change times) that changes whenever
//!    the content may have (settle waits for it to stay the same; `fsops::same_file` compares);
//! 3. **claim atomically**: take one object whose stamp is still the settled one, so that no
//!    writer and no other agent can change or take it afterwards (a rename into the staging
//!    folder, beneath the inbox's descriptor, journaled before);
//! 4. **read**: stream the claimed bytes, twice (hash, then upload), checking the stamp still
//!    matches;
//! 5. **place**: put the claimed object into clean, quarantine or failed under a free name, or
//!    back, durably and exactly once (`fsops::place`, temp name tagged with [`Root::instance`]).
//!
//! A bucket (S3-compatible) gives the same with other primitives: list is `ListObjectsV2`
//! (plus event notifications as hints); stat is `HeadObject`, the stamp being size, `ETag` and
//! `Last-Modified` (no ctime: quiet is judged on those); claim is a `CopyObject` to a staging
//! prefix conditional on the `ETag` (`x-amz-copy-source-if-match`) followed by a `DeleteObject`
//! of the source, or a conditional write of a claim marker where copies are costly; read is
//! `GetObject` with `If-Match`; place is a copy to the destination prefix with
//! `If-None-Match: *` (a free name) and a delete of the staged copy. The journal keeps the root
//! and staged place as paths, so a key works where a path does.
//!
//! What a bucket source would touch today: a new module for the five primitives, `config` (a
//! `[[watch]]` naming a bucket), and this module (`Root` holding either kind; claiming and
//! record-building are already here: [`Root::claim_files`], [`Root::new_claim`]). Still bound to
//! folders, and to move behind `Root` next: listing (`watch/walk.rs`, `watch/hints.rs`), stat
//! and the open-writer check (`settle/look.rs`), owning and hashing (`hashing.rs` through
//! `fsops::own`), and placing (`sort` through `fsops::place`), each of which opens a
//! [`Dir`] from the root today.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::config::WatchConfig;
use crate::fsops::roots::RootDirs;
pub use crate::fsops::roots::Which;
use crate::fsops::{Dir, FsError, Stamp};
use crate::journal::NewClaim;

/// A root's place in the configuration: stable for one agent's life (a reload builds new
/// roots), the same as its `[[watch]]` entry's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RootId(pub usize);

impl std::fmt::Display for RootId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "root {}", self.0)
    }
}

/// One watched root.
pub struct Root {
    /// Its id.
    pub id: RootId,
    /// Its `[[watch]]` configuration.
    pub config: WatchConfig,
    /// Its folders as descriptors, opened on first use.
    dirs: RootDirs,
    /// Whether its failed folder is on the inbox's filesystem, so that a hard-linked file can
    /// be moved there unread.
    pub hard_links_ok: bool,
    /// The tag of its temp names ([`instance_of`]).
    pub instance: String,
    /// The tag older versions gave its temp names ([`legacy_instance_of`]).
    pub legacy_instance: String,
    /// What its stages report while it runs (read by the metrics).
    pub status: Arc<RootStatus>,
}

impl Root {
    /// The root `id` configured by `config`; nothing is opened yet.
    pub fn new(id: RootId, config: WatchConfig, hard_links_ok: bool) -> Root {
        Root {
            id,
            dirs: RootDirs::new(&config),
            instance: instance_of(&config),
            legacy_instance: legacy_instance_of(&config),
            config,
            hard_links_ok,
            status: Arc::default(),
        }
    }

    /// The roots of a configuration, in order, none of them able to move hard links.
    pub fn all(watches: &[WatchConfig]) -> Vec<Arc<Root>> {
        watches
            .iter()
            .enumerate()
            .map(|(i, w)| Arc::new(Root::new(RootId(i), w.clone(), false)))
            .collect()
    }

    /// The inbox's path (what the journal records as a file's root).
    pub fn path(&self) -> &Path {
        &self.config.path
    }

    /// The configured path of one of its folders.
    pub fn folder_path(&self, which: Which) -> &Path {
        self.dirs.path(which)
    }

    /// One of its folders, opened (made first if `create` and it is a destination).
    pub fn folder(&self, which: Which, create: bool) -> Result<Arc<Dir>, FsError> {
        self.dirs.get(which, create)
    }

    /// The inbox, opened.
    pub fn inbox(&self) -> Result<Arc<Dir>, FsError> {
        self.dirs.get(Which::Inbox, false)
    }

    /// The staging folder, opened.
    pub fn staging(&self) -> Result<Arc<Dir>, FsError> {
        self.dirs.get(Which::Staging, false)
    }

    /// Whether `staged` (a journal record's staged path) is in this root's staging folder.
    pub fn holds_staged(&self, staged: &Path) -> bool {
        staged.parent() == Some(self.config.staging_dir.as_path())
    }

    /// The journal's record of a file of this root being claimed under `staged_name`. The
    /// journal keeps the root and staged place as paths (older journals open unchanged); the
    /// root is found again from them when a record is read back ([`Roots::by_path`]).
    pub fn new_claim(
        &self,
        rel_path: PathBuf,
        staged_name: &OsStr,
        dropped_at_ms: Option<i64>,
        staging_folder: Option<(u64, u64)>,
    ) -> NewClaim {
        NewClaim {
            root: self.config.path.clone(),
            rel_path,
            staged: self.config.staging_dir.join(staged_name),
            dropped_at_ms,
            staging_folder,
        }
    }

    /// The folders' descriptors, for the wiring and the filesystem layer.
    pub(crate) fn dirs(&self) -> &RootDirs {
        &self.dirs
    }

    /// Whether open writers are asked for with leases here (its config, and not on a client
    /// mount): see [`crate::fsops::lease::check_here`].
    pub fn leases_here(&self, inbox: &Dir) -> bool {
        let enabled = self.config.lease_check == crate::config::LeaseCheck::Auto;
        crate::fsops::lease::check_here(inbox, enabled).is_ok()
    }

    /// Claims a batch of its settled files (relative path, settled stamp, staged name, taken
    /// even if held open) with one fsync per folder for the whole batch, into the staging
    /// folder `staging_folder` (dev, ino) that their journal records name: none is moved when
    /// the path now leads to another (a share mounted over the inbox meanwhile). One result per
    /// file, in order.
    pub fn claim_files(
        &self,
        files: &[(PathBuf, Stamp, OsString, bool)],
        staging_folder: Option<(u64, u64)>,
    ) -> Vec<Result<crate::fsops::claim::Claim, FsError>> {
        let opened = self.inbox().and_then(|i| {
            let staging = self.staging()?;
            match staging_folder {
                Some(recorded) if staging.identity()? != recorded => Err(FsError::io(
                    staging.path(),
                    "claim",
                    std::io::Error::other(
                        "the staging folder is another one than when the claims were journaled \
                         (a mount over the inbox?)",
                    ),
                )),
                _ => Ok((i, staging)),
            }
        });
        let (inbox, staging) = match opened {
            Ok(d) => d,
            Err(e) => {
                let msg = e.to_string();
                return files
                    .iter()
                    .map(|(rel, ..)| {
                        Err(FsError::io(
                            rel,
                            "claim",
                            std::io::Error::other(msg.clone()),
                        ))
                    })
                    .collect();
            }
        };
        let items: Vec<crate::fsops::claim::ClaimItem<'_>> = files
            .iter()
            .map(
                |(rel, settled, name, held_open)| crate::fsops::claim::ClaimItem {
                    rel,
                    settled,
                    staged_name: name,
                    held_open_ok: *held_open,
                },
            )
            .collect();
        let leases = self.leases_here(&inbox);
        crate::fsops::claim::claim_many(&inbox, &staging, &items, self.hard_links_ok, leases)
    }
}

/// What a root's stages report about it while it runs, for the metrics to read at scrape time.
/// Plain atomics: a stage never waits on a scrape, and a reload's new roots start from zero.
#[derive(Debug, Default)]
pub struct RootStatus {
    /// Files settle watches in the inbox, not yet complete (set by settle after each look).
    settling: AtomicU64,
    /// Whether watch fell back from inotify to polling (a limit reached, inotify failing, the
    /// inbox folder removed), as opposed to polling by choice (`mode`, a network filesystem).
    degraded: AtomicBool,
    /// The staged paths of its records in flight when the agent started with this watch held
    /// (its staging folder not recognised, `app::reconcile`): they wait for the start that
    /// recognises it, whatever this agent does meanwhile (claims go on once the staging folder
    /// is made again, into a new folder).
    held_records: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

impl RootStatus {
    /// Keeps the record staged at `staged` for the next start (kept in the root status's held records).
    pub fn hold_record(&self, staged: PathBuf) {
        self.held_records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(staged);
    }

    /// Whether the record staged at `staged` waits for the next start.
    pub fn holds_record(&self, staged: &Path) -> bool {
        self.held_records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(staged)
    }

    /// Files in the inbox that settle is waiting on (not yet complete, not yet handed on).
    pub fn settling(&self) -> u64 {
        self.settling.load(Ordering::Relaxed)
    }

    /// Settle's count of the files it waits on now.
    pub fn set_settling(&self, n: u64) {
        self.settling.store(n, Ordering::Relaxed);
    }

    /// Whether the inbox is polled because inotify failed.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Watch's word on whether it fell back to polling.
    pub fn set_degraded(&self, degraded: bool) {
        self.degraded.store(degraded, Ordering::Relaxed);
    }
}

/// The roots of one agent, indexed by [`RootId`].
#[derive(Clone, Default)]
pub struct Roots(Arc<[Arc<Root>]>);

impl Roots {
    /// The roots, in configuration order (`roots[i].id == RootId(i)`).
    pub fn new(roots: Vec<Arc<Root>>) -> Roots {
        debug_assert!(roots.iter().enumerate().all(|(i, r)| r.id == RootId(i)));
        Roots(roots.into())
    }

    /// Root `id`.
    pub fn get(&self, id: RootId) -> Option<&Arc<Root>> {
        self.0.get(id.0)
    }

    /// All of them, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Arc<Root>> {
        self.0.iter()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The root whose inbox is `path` (a journal record's root), resolved when a record is read
    /// back.
    pub fn by_path(&self, path: &Path) -> Option<&Arc<Root>> {
        self.0.iter().find(|r| r.config.path == path)
    }

    /// The root whose staging folder holds `staged` (a journal record's staged path).
    pub fn by_staged(&self, staged: &Path) -> Option<&Arc<Root>> {
        self.0.iter().find(|r| r.holds_staged(staged))
    }
}

/// The tag of a root's temp names: its staging folder's name (the instance id or the host
/// name) and a short hash of the staging folder's path. Two agents configured with one instance
/// id for different inboxes that share a destination never take each other's temps.
pub fn instance_of(w: &WatchConfig) -> String {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let path = sha2::Sha256::digest(w.staging_dir.as_os_str().as_bytes());
    format!("{}-{}", legacy_instance_of(w), hex::encode(&path[..4]))
}

/// The tag older versions gave their temp names (the staging folder's name alone): still
/// recognised at start-up, for a placement an older version left half-way.
pub fn legacy_instance_of(w: &WatchConfig) -> String {
    w.staging_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
