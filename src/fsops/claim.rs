//! Taking files in: the claim's rename of settled files from an inbox into staging, one batch at
//! a time, under a read lease where leases can be asked (see [`super::lease`]).
//!
//! A file is taken only if it is still the inode that settled, unchanged ([`same_file`]), and,
//! with leases, only if nobody holds it open for writing, and never from a folder that is or was
//! a destination ([`super::dest`]). Every rename is a no-replace rename beneath the inbox's
//! descriptor; the folders are fsynced once per batch.

use std::ffi::OsStr;
use std::path::Path;

use super::Stamp;
use super::{Dir, FsError, Renamed, rename_noreplace_unsynced, same_file, split_rel};

/// What a claim attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Moved into staging.
    Claimed(Renamed),
    /// Not the file that settled any more (written to, replaced): left alone.
    Changed,
    /// Gone (taken by another agent, or removed by the user).
    Gone,
    /// Hard-linked, and hard links may not be taken (the failed folder is on another
    /// filesystem, where the file could only be placed by reading it): left in the inbox.
    HardLinkedLeft,
    /// Not readable by dropscan's user, and the failed folder is on another filesystem, where
    /// the file could only be placed by reading it: left in the inbox.
    UnreadableLeft,
    /// In a folder that is or was a destination of dropscan (its marker says so, see
    /// [`super::dest`]): what dropscan placed is never taken again. Left alone.
    InDestination,
    /// Somebody holds it open for writing (its read lease was refused, or broke during the
    /// rename and the file was put back): not complete, left in the inbox.
    HeldOpen,
}

impl Claim {
    /// Why a file was left in the inbox, for the log (the variants that leave one there).
    pub fn why(&self) -> &'static str {
        match self {
            Claim::HardLinkedLeft => {
                "it is hard-linked (it could expose a file from outside the inbox), and the failed \
                 folder is on another filesystem, so it cannot be moved there without reading it"
            }
            Claim::UnreadableLeft => {
                "the dropscan user cannot read it, and the failed folder is on another filesystem, \
                 so it cannot be moved there without reading it (give dropscan read access, or put \
                 failed_dir on the inbox's filesystem)"
            }
            Claim::InDestination => {
                "it is in a folder that is or was a destination of dropscan (renamed into the \
                 inbox?); what dropscan placed is never claimed again"
            }
            _ => "not taken",
        }
    }
}

/// Moves the settled file `rel` (relative to the inbox) into `staging` as `staged_name`, if it
/// is still [`same_file`] as `settled`. Every component of `rel` is resolved beneath the inbox
/// without following links: a subfolder swapped for a symlink after it settled is refused.
///
/// A hard-linked file is taken only when `hard_links_ok` (it then goes to failed by a rename,
/// unread); otherwise it stays where it is: its other name may be a user's last copy.
pub fn claim(
    inbox: &Dir,
    rel: &Path,
    settled: &Stamp,
    staging: &Dir,
    staged_name: &OsStr,
    hard_links_ok: bool,
) -> Result<Claim, FsError> {
    let item = ClaimItem {
        rel,
        settled,
        staged_name,
        held_open_ok: false,
    };
    let leases = super::lease::check_here(inbox, true).is_ok();
    claim_many(
        inbox,
        staging,
        std::slice::from_ref(&item),
        hard_links_ok,
        leases,
    )
    .pop()
    .unwrap_or(Ok(Claim::Gone))
}

/// One file of a [`claim_many`] batch.
pub struct ClaimItem<'a> {
    /// Its path relative to the inbox.
    pub rel: &'a Path,
    /// What it was when it settled.
    pub settled: &'a Stamp,
    /// Its name in staging.
    pub staged_name: &'a OsStr,
    /// Taken even if a writer holds it open (see `Settled::held_open`).
    pub held_open_ok: bool,
}

/// [`claim`] for a batch of files of one inbox: every rename first, then one fsync per folder
/// involved (staging, and each inbox folder a file left), so that a batch of N claims costs a
/// few fsyncs instead of 2N. A claim is reported `Claimed(NotSynced)` when an fsync of one of
/// its two folders failed (the rename happened all the same). One result per item, in order.
///
/// With `leases` (see [`super::lease::check_here`]), each rename happens under a read lease: a
/// file somebody holds open for writing is not taken ([`Claim::HeldOpen`]), and one whose lease
/// started breaking during the rename (a writer that looked the name up just before it, and now
/// waits for us) is put back under its name before the lease goes.
pub fn claim_many(
    inbox: &Dir,
    staging: &Dir,
    items: &[ClaimItem<'_>],
    hard_links_ok: bool,
    leases: bool,
) -> Vec<Result<Claim, FsError>> {
    let mut out = Vec::with_capacity(items.len());
    // The source folders of the renames done, each once, with the items that left it.
    let mut sources: Vec<Source> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match claim_one(inbox, item, staging, hard_links_ok, leases) {
            Ok(Some(dir)) => {
                out.push(Ok(Claim::Claimed(Renamed::Durable)));
                let key = dir.identity().ok();
                // A folder whose identity is unknown is never merged with another.
                match sources
                    .iter_mut()
                    .find(|(k, _, _)| key.is_some() && *k == key)
                {
                    Some((_, _, done)) => done.push(i),
                    None => sources.push((key, dir, vec![i])),
                }
            }
            Ok(None) => out.push(Ok(Claim::Gone)),
            Err(ClaimStop::Decided(c)) => out.push(Ok(c)),
            Err(ClaimStop::Failed(e)) => out.push(Err(e)),
        }
    }
    if sources.is_empty() {
        return out;
    }
    let staging_synced = staging.fsync().is_ok();
    for (_, dir, done) in &sources {
        let synced = staging_synced && dir.fsync().is_ok();
        if !synced {
            for &i in done {
                out[i] = Ok(Claim::Claimed(Renamed::NotSynced));
            }
        }
    }
    out
}

/// A folder files of a batch left: its identity (if known), the folder, the items.
type Source = (Option<(u64, u64)>, Dir, Vec<usize>);

/// Why [`claim_one`] did not rename.
enum ClaimStop {
    Decided(Claim),
    Failed(FsError),
}

/// Checks and renames one file without fsyncs. `Ok(Some(dir))`: renamed out of `dir`;
/// `Ok(None)`: gone.
fn claim_one(
    inbox: &Dir,
    item: &ClaimItem<'_>,
    staging: &Dir,
    hard_links_ok: bool,
    leases: bool,
) -> Result<Option<Dir>, ClaimStop> {
    let (parent, name) = split_rel(item.rel).map_err(ClaimStop::Failed)?;
    // A folder that is or was a destination (renamed into reach, see `super::dest`) holds
    // what dropscan placed: never taken again.
    let dir = match super::dest::open_unless_marked(inbox, parent) {
        Ok(Some(d)) => d,
        Ok(None) => return Err(ClaimStop::Decided(Claim::InDestination)),
        Err(FsError::Vanished { .. }) => return Ok(None),
        Err(e) => return Err(ClaimStop::Failed(e)),
    };
    let now = match dir.stamp(name) {
        Ok(s) => s,
        Err(FsError::Vanished { .. }) => return Ok(None),
        Err(e) => return Err(ClaimStop::Failed(e)),
    };
    if !same_file(item.settled, &now.stamp()) {
        return Err(ClaimStop::Decided(Claim::Changed));
    }
    if now.nlink > 1 && !hard_links_ok {
        return Err(ClaimStop::Decided(Claim::HardLinkedLeft));
    }
    // The lease is taken on the inode that settled (a name swapped since is "changed"). A file
    // that cannot be opened for reading is taken without one: it goes to failed, unread, by
    // rename (the same inode), so a writer still at it loses nothing. Where the failed folder
    // is on another filesystem, such a file could only get there by being read: it is left
    // where it is, like a hard link (so it is opened to find out, leases or not).
    let opened = if leases || !hard_links_ok {
        match dir.open_file(name) {
            Ok((f, st)) if (st.dev, st.ino) == (now.dev, now.ino) => Some(f),
            Ok(_) => return Err(ClaimStop::Decided(Claim::Changed)),
            Err(FsError::Vanished { .. }) => return Ok(None),
            Err(FsError::Io { source, .. })
                if !hard_links_ok
                    && matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
            {
                return Err(ClaimStop::Decided(Claim::UnreadableLeft));
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let lease = match opened
        .as_ref()
        .filter(|_| leases)
        .map(super::lease::ReadLease::take)
    {
        Some(Ok(l)) => Some(l),
        Some(Err(super::lease::LeaseRefused::HeldOpen)) if !item.held_open_ok => {
            return Err(ClaimStop::Decided(Claim::HeldOpen));
        }
        Some(Err(_)) | None => None,
    };
    match rename_noreplace_unsynced(&dir, name, staging, item.staged_name) {
        Ok(()) => {}
        Err(e) if e.is_vanished() => return Ok(None),
        Err(e) => return Err(ClaimStop::Failed(e)),
    }
    if lease
        .as_ref()
        .is_some_and(super::lease::ReadLease::breaking)
    {
        // A writer is opening it right now (it looked the name up before the rename): put it
        // back where the writer will find it. If the name was taken meanwhile, it stays staged,
        // and the hash sees the writer and returns it to the inbox beside that name.
        if rename_noreplace_unsynced(staging, item.staged_name, &dir, name).is_ok() {
            return Err(ClaimStop::Decided(Claim::HeldOpen));
        }
    }
    drop(lease);
    Ok(Some(dir))
}
