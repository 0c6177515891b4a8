//! The folders of one watched root, opened once and reopened only when removed, and the owner
//! marker that says which agent a staging folder belongs to.
//!
//! The inbox and the destinations are named by the administrator and opened as given. A staging
//! folder or destination *inside* the inbox is opened beneath the inbox's descriptor without
//! following links: users can write there, and a `.dropscan` swapped for a symlink must stop
//! claiming, never redirect it.
//!
//! A root is **recognised** before anything under it is judged missing: its staging folder must
//! exist with our owner marker. An inbox on a share that is not mounted yet shows an empty
//! mount point, and the staged files of records in flight would otherwise all look vanished.
//!
//! A destination is opened and judged by [`super::dest`], again on every use.

use std::ffi::{OsStr, OsString};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::dest::{self, Named};
use super::owner::unix_now;
pub use super::owner::{
    OWNER_HEARTBEAT, OWNER_MARKER, OWNER_STALE_AFTER, Owner, OwnerConflict, claim_owner,
    claim_owner_if_missing,
};
pub use super::staging_lock::{
    STAGING_LOCK, StagingLock, keep_only_staging_locks, lock_staging, off_thread,
    release_staging_locks,
};
use super::{Dir, FsError};
use crate::config::WatchConfig;

/// Which folder of a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The inbox.
    Inbox,
    /// Its staging folder.
    Staging,
    /// `not detected`.
    Clean,
    /// `detect`.
    Quarantine,
    /// Everything else.
    Failed,
}

#[derive(Debug)]
struct Slot {
    path: PathBuf,
    /// Relative to the inbox when the folder lives inside it.
    beneath_inbox: Option<PathBuf>,
    mode: u32,
    /// The configuration key of a destination (`None`: the inbox or staging).
    key: Option<&'static str>,
    open: Mutex<Option<Arc<Dir>>>,
}

impl Slot {
    fn new(path: &Path, inbox: &Path, mode: u32, is_inbox: bool) -> Slot {
        let beneath_inbox = if is_inbox {
            None
        } else {
            path.strip_prefix(inbox).ok().map(Path::to_path_buf)
        };
        Slot {
            path: path.to_path_buf(),
            beneath_inbox,
            mode,
            key: None,
            open: Mutex::new(None),
        }
    }
}

/// This agent's hold on its staging folder's lock.
#[derive(Debug, Default)]
struct LockSlot {
    held: Option<StagingLock>,
    /// Let go for good: the agent stopped ([`RootDirs::release_staging`]).
    released: bool,
}

/// The folders of one `[[watch]]`.
#[derive(Debug)]
pub struct RootDirs {
    inbox: Slot,
    staging: Slot,
    clean: Slot,
    quarantine: Slot,
    failed: Slot,
    /// The staging folder's lock, held while this agent uses it ([`lock_staging`]).
    lock: Mutex<LockSlot>,
    /// The inbox (device, inode) on which files were last found movable without replacing
    /// ([`RootDirs::safe_moves`]).
    moves_ok: Mutex<Option<(u64, u64)>>,
}

impl RootDirs {
    /// The folders of `w` (nothing is opened yet).
    pub fn new(w: &WatchConfig) -> RootDirs {
        let slot = |p: &Path, mode, key| Slot {
            key,
            ..Slot::new(p, &w.path, mode, false)
        };
        RootDirs {
            inbox: Slot::new(&w.path, &w.path, 0o755, true),
            staging: slot(&w.staging_dir, 0o700, None),
            clean: slot(&w.clean_dir, 0o755, Some("clean_dir")),
            quarantine: slot(&w.quarantine_dir, 0o700, Some("quarantine_dir")),
            failed: slot(&w.failed_dir, 0o750, Some("failed_dir")),
            lock: Mutex::new(LockSlot::default()),
            moves_ok: Mutex::new(None),
        }
    }

    /// Whether files can be moved out of the inbox without ever replacing another
    /// ([`super::probe_safe_move`] on a dotfile made, closed, moved and removed in it): asked
    /// once per inbox filesystem, again after a share is mounted over it. A share mounted there
    /// as an SMB client mount ([`FsError::NoSafeMove`]) holds the watch, with the reason.
    pub fn safe_moves(&self) -> Result<(), FsError> {
        let inbox = self.get(Which::Inbox, false)?;
        let id = inbox.identity()?;
        let mut ok = self.moves_ok.lock().unwrap_or_else(PoisonError::into_inner);
        if *ok == Some(id) {
            return Ok(());
        }
        let probe = OsString::from(format!(".dropscan-probe-{}", std::process::id()));
        let mut moved = probe.clone();
        moved.push(".moved");
        for n in [&probe, &moved] {
            inbox.unlink(n).ok();
        }
        drop(inbox.create_file(&probe, 0o600)?);
        let tried = super::probe_safe_move(&inbox, &probe, &moved);
        let left = if tried.is_ok() { &moved } else { &probe };
        inbox.unlink(left).ok();
        tried?;
        *ok = Some(id);
        Ok(())
    }

    /// The staging folder, made if missing, for claiming into: its path must still lead to the
    /// open folder. One moved away or replaced (an inbox writer's `mv .dropscan .x`) is opened
    /// again from its path, and judged again, so that nothing more is claimed into the old one.
    pub fn staging_in_place(&self) -> Result<Arc<Dir>, FsError> {
        let staging = self.get(Which::Staging, true)?;
        let now = match &self.staging.beneath_inbox {
            Some(rel) => match self.get(Which::Inbox, false)?.open_dir(rel) {
                Ok(found) => Some(found.identity()?),
                Err(FsError::Vanished { .. } | FsError::NotRegular { .. }) => None,
                Err(e) => return Err(e),
            },
            None => rustix::fs::stat(&self.staging.path)
                .ok()
                .map(|st| (st.st_dev, st.st_ino)),
        };
        if now == Some(staging.identity()?) {
            return Ok(staging);
        }
        tracing::warn!(
            staging = %super::shown(&self.staging.path),
            "the staging folder is another folder now (moved away or replaced): it is opened again \
             and judged again; nothing more is claimed into the old one"
        );
        *self
            .staging
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.get(Which::Staging, true)
    }

    /// The (dev, ino) of the staging folder whose lock this agent holds: the folder its staged
    /// files are in, even when a mount now covers the path to it.
    pub fn locked_staging(&self) -> Option<(u64, u64)> {
        self.lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
            .as_ref()
            .map(|l| l.folder)
    }

    /// Lets go of this agent's hold on its staging folder's lock for good, returning the
    /// folder's (dev, ino) for [`release_staging_locks`]: the lock file is closed once no other
    /// hold on it is left in the process (a reload's next generation shares it). A blocking task
    /// of the stopped agent that is still running (a claim's check, the owner heartbeat) is
    /// refused the lock from now on ([`FsError::StagingReleased`]), so it cannot take it again
    /// and keep it from the next agent.
    pub fn release_staging(&self) -> Option<(u64, u64)> {
        let mut slot = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        slot.released = true;
        slot.held.take().map(|l| l.folder)
    }

    /// Holds the staging folder's lock for this agent ([`lock_staging`]): taken on first use,
    /// and again when the folder was made anew. Refused while another process holds it.
    pub fn hold_staging(&self, staging: &Dir) -> Result<(), FsError> {
        let mut slot = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.released {
            return Err(FsError::StagingReleased {
                staging: staging.path().to_path_buf(),
            });
        }
        let here = staging.identity()?;
        if slot.held.as_ref().is_some_and(|l| l.folder == here) {
            return Ok(());
        }
        // The folder was made anew (or moved away and replaced): the old one's lock goes.
        if let Some(old) = slot.held.take() {
            release_staging_locks(&[old.folder]);
        }
        slot.held = Some(lock_staging(staging)?);
        Ok(())
    }

    fn slot(&self, which: Which) -> &Slot {
        match which {
            Which::Inbox => &self.inbox,
            Which::Staging => &self.staging,
            Which::Clean => &self.clean,
            Which::Quarantine => &self.quarantine,
            Which::Failed => &self.failed,
        }
    }

    /// The configured path of a folder (for messages and the journal).
    pub fn path(&self, which: Which) -> &Path {
        &self.slot(which).path
    }

    /// The open folder, made if missing (`create`), reopened if it was removed since.
    pub fn get(&self, which: Which, create: bool) -> Result<Arc<Dir>, FsError> {
        if let Some(key) = self.slot(which).key {
            return self.destination(which, key, create);
        }
        if which == Which::Inbox || self.slot(which).beneath_inbox.is_some() {
            self.forget_if_remounted();
        }
        let slot = self.slot(which);
        let cached =
            |open: &Option<Arc<Dir>>| open.as_ref().filter(|d| !d.is_removed()).map(Arc::clone);
        if let Some(d) = cached(&slot.open.lock().unwrap_or_else(PoisonError::into_inner)) {
            return Ok(d);
        }
        // The inbox is taken before this slot is locked: taking it may forget every open folder,
        // this one's included (a remount), which under this slot's lock would deadlock.
        let inbox = match &slot.beneath_inbox {
            Some(_) => Some(self.get(Which::Inbox, false)?),
            None => None,
        };
        let mut open = slot.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = cached(&open) {
            return Ok(d);
        }
        let dir = match (&slot.beneath_inbox, inbox) {
            (Some(rel), Some(inbox)) => {
                let dir = if create {
                    if which == Which::Staging {
                        move_planted_aside(&inbox, rel);
                    }
                    inbox.create_dirs(rel, slot.mode)?
                } else {
                    inbox.open_dir(rel)?
                };
                if which == Which::Staging {
                    check_private(&inbox, rel)?;
                }
                dir
            }
            _ => {
                if create && which != Which::Inbox {
                    create_trusted(&slot.path, slot.mode)?;
                }
                Dir::open_trusted(&slot.path)?
            }
        };
        let dir = Arc::new(dir);
        *open = Some(Arc::clone(&dir));
        Ok(dir)
    }

    /// A destination: judged when opened ([`dest::open`]) and on every use ([`dest::still_leads_to`]).
    fn destination(
        &self,
        which: Which,
        key: &'static str,
        create: bool,
    ) -> Result<Arc<Dir>, FsError> {
        let slot = self.slot(which);
        let named = Named::new(key, &slot.path);
        // Inside the inbox: judged through the inbox's descriptor, taken before the slot is
        // locked (taking it may forget every open folder, this one's included).
        let inbox = match &slot.beneath_inbox {
            Some(rel) => Some((self.get(Which::Inbox, false)?, rel.as_path())),
            None => None,
        };
        let beneath = inbox.as_ref().map(|(d, rel)| (&**d, *rel));
        let mut open = slot.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = open.as_ref() {
            if !d.is_removed() && dest::still_leads_to(d, beneath, named)? {
                return Ok(Arc::clone(d));
            }
        }
        *open = None;
        let dir = Arc::new(dest::open(beneath, named, slot.mode, create)?);
        *open = Some(Arc::clone(&dir));
        Ok(dir)
    }

    /// A share mounted over the inbox after it was opened (or unmounted): the path now leads to
    /// another folder than the open descriptor. Everything is opened again from the paths.
    fn forget_if_remounted(&self) {
        let cached = self
            .inbox
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(Arc::clone);
        let Some(cached) = cached else { return };
        let now = rustix::fs::stat(&self.inbox.path).map(|st| (st.st_dev, st.st_ino));
        if now.ok() != cached.identity().ok() {
            tracing::info!(inbox = %super::shown(&self.inbox.path), "the inbox is another folder now (a share mounted or unmounted): opening it again");
            self.forget();
        }
    }

    /// Forgets every open folder: the next use opens them again from their paths (after a
    /// share was mounted over an inbox, the old descriptor still shows the empty mount point).
    pub fn forget(&self) {
        for which in [
            Which::Inbox,
            Which::Staging,
            Which::Clean,
            Which::Quarantine,
            Which::Failed,
        ] {
            *self
                .slot(which)
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// The staging folder if the root is recognised (it exists, with an owner marker): `None`
    /// when it is missing, which after a crash means "not mounted yet" until proven otherwise.
    pub fn staging_if_present(&self) -> Result<Option<Arc<Dir>>, FsError> {
        match self.get(Which::Staging, false) {
            Ok(d) => Ok(Some(d)),
            Err(FsError::Vanished { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Where the staging folder (or a folder above it) should be, beneath the inbox, stands an entry
/// that is no folder: a symlink, a file or a FIFO that a user who can write the inbox planted
/// (for example while the agent was stopped). It is never dropscan's and never followed: it is
/// renamed aside (`<name>.planted-<unix time>`, logged) so that a fresh staging folder can be
/// made, and only this watch is concerned. A folder is left as it is: one that is not dropscan's
/// own is refused by [`check_private`], which holds this watch alone.
fn move_planted_aside(inbox: &Dir, rel: &Path) {
    let mut parent = match inbox.try_clone() {
        Ok(d) => d,
        Err(_) => return,
    };
    for c in rel.components() {
        let std::path::Component::Normal(name) = c else {
            continue;
        };
        match parent.stat(name) {
            Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir() => {}
            Ok(st) => {
                let aside = format!("{}.planted-{}", name.to_string_lossy(), unix_now());
                let kind = super::kind_of_mode(st.st_mode);
                match super::rename_noreplace(&parent, name, &parent, OsStr::new(&aside)) {
                    Ok(_) => tracing::warn!(
                        entry = %super::shown(&parent.path().join(name)),
                        kind,
                        moved_to = %super::shown(&parent.path().join(&aside)),
                        "a {kind} stood where the staging folder must be: moved aside (not followed) and a fresh staging folder made"
                    ),
                    Err(e) => tracing::error!(
                        entry = %super::shown(&parent.path().join(name)),
                        kind,
                        error = %e,
                        "a {kind} stands where the staging folder must be and cannot be moved aside"
                    ),
                }
                return;
            }
            Err(_) => return,
        }
        parent = match parent.open_dir(Path::new(name)) {
            Ok(d) => d,
            Err(_) => return,
        };
    }
}

/// The staging folder and every folder between it and the inbox must belong to dropscan's user
/// and be writable by nobody else: one a user made (after renaming ours away) would let that
/// user reach staged files.
fn check_private(inbox: &Dir, rel: &Path) -> Result<(), FsError> {
    let me = rustix::process::geteuid().as_raw();
    let mut sub = PathBuf::new();
    for c in rel.components() {
        sub.push(c);
        let d = inbox.open_dir(&sub)?;
        let st = rustix::fs::fstat(d.fd()).map_err(|e| {
            FsError::io(
                d.path(),
                "stat folder",
                std::io::Error::from_raw_os_error(e.raw_os_error()),
            )
        })?;
        if st.st_uid != me || st.st_mode & 0o022 != 0 {
            return Err(FsError::NotPrivate {
                path: d.path().to_path_buf(),
                uid: st.st_uid,
                mode: st.st_mode & 0o7777,
            });
        }
    }
    Ok(())
}

/// `mkdir -p` of an administrator's folder (its path is trusted); new folders get `mode`.
pub(super) fn create_trusted(path: &Path, mode: u32) -> Result<(), FsError> {
    use std::os::unix::fs::DirBuilderExt;
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| FsError::io(path, "create folder", e))?;
    let d = Dir::open_trusted(path)?;
    rustix::fs::fchmod(d.fd(), rustix::fs::Mode::from_raw_mode(mode)).ok();
    if let Some(parent) = path.parent() {
        if let Ok(p) = Dir::open_trusted(parent) {
            p.fsync().ok();
        }
    }
    Ok(())
}
