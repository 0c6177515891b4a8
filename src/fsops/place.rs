//! Placing files: the release of a staged file into a destination, with the crash rules that
//! make it restartable (taking files in is [`super::claim`]).
//!
//! **Placement** of a staged file at `target` (a path relative to a destination root):
//! - the staged file is opened (never through a link) and must still be [`same_file`] as when it
//!   was hashed: checked on every attempt, retries and restarts included;
//! - **clean is a release no writer can change**, and quarantine is a file no user owns: both
//!   receive a new inode owned by dropscan with a fixed mode (0644 clean, 0600 quarantine). No
//!   handle a user kept from before the claim (read, write, a shared mapping, or an `O_PATH`
//!   handle that could be reopened for writing through `/proc`), and no ownership of the
//!   user's, reaches it. Normally the staged file already *is* such an inode (the hash copied
//!   the user's bytes into it, see [`super::own`]) and it is renamed into place. Otherwise (a
//!   destination on another filesystem, a record staged by an older version) a **verified
//!   copy** is made, whose SHA-256 is checked against the scanned one (clean). Failed files
//!   (which may be hard links that must never be read) are moved by rename;
//! - one placement of a file at a time, across agents too: the staged file (and a temp being
//!   written or finished) is held under an exclusive `flock`; a second placement is told to
//!   retry later, never takes or deletes the first one's temp. A staged file dropscan's user
//!   cannot read (dropped with mode 000: the hash failed it) gives no descriptor to lock; it
//!   only ever goes to failed by one no-replace rename, with no temp, so two placements cannot
//!   interleave there: one moves it, the other finds it placed;
//! - a move is a no-replace rename, or, for a copy, the sequence copy
//!   to `<dest root>/.<tag>.s<staged id>.<name>.dropscan-partial` → fsync → verify SHA-256
//!   → remove the staged file → fsync staging → no-replace rename of the temp to the target →
//!   fsync. At every instant a whole copy exists: first the staged file, then the verified temp,
//!   then the target. The temp's name is derived from the staged file's (random) name, so a
//!   restart finds it, and so does a restart with another journal: staged file present means the
//!   temp is a partial (removed and redone); staged file gone means the temp is the verified copy
//!   (renamed into place by its record, or, with no record, taken back into staging by
//!   [`take_back`] and scanned again as `recovered/<name>`: never removed unseen).
//! - An existing target is never replaced and never taken for ours unless it *is* ours (the same
//!   inode, left by a link + unlink move): an identical twin somebody placed there stays theirs.

use std::ffi::OsStr;
use std::io::{self, Seek, Write};
use std::path::{Component, Path, PathBuf};

use super::Stamp;
pub use super::deferred::Deferred;
use super::names::{numbered, safe_relative, sidecar_name, sidecar_temp_name};
pub use super::temps::{leftover_temps, remove_temp, take_back};
use super::{
    Dir, FileStamp, FsError, rename_noreplace, rename_noreplace_unsynced, same_file, sha256_file,
    split_rel,
};

/// Numbered names tried before giving up on a free name.
const MAX_NUMBERED: u32 = 10_000;

/// A free path (relative to `dest_root`) for a user's `rel`: the folders are made (with
/// `dir_mode`) beneath the root, never through a symlink or a file that stands where a folder
/// should be (such an entry is left alone and `sub (1)` is used beside it); the name is free
/// and so is its sidecar's. The caller journals it, then calls [`place`], which fails rather
/// than replace if someone took the name meanwhile.
pub fn free_name(dest_root: &Dir, rel: &Path, dir_mode: u32) -> Result<PathBuf, FsError> {
    let rel = safe_relative(rel);
    let mut out = PathBuf::new();
    let mut dir = dest_root.try_clone()?;
    if let Some(parent) = rel.parent() {
        for comp in parent.components() {
            let Component::Normal(name) = comp else {
                continue;
            };
            let mut n = 0;
            let (next, used) = loop {
                let candidate = if n == 0 {
                    name.to_os_string()
                } else {
                    numbered(name, n)
                };
                match dir.child_dir_or_create(&candidate, dir_mode) {
                    Ok(d) => break (d, candidate),
                    Err(FsError::NotRegular { .. }) => {}
                    Err(e) => return Err(e),
                }
                n += 1;
                if n > MAX_NUMBERED {
                    return Err(FsError::AlreadyExists {
                        path: dir.path().join(name),
                    });
                }
            };
            out.push(used);
            dir = next;
        }
    }
    let name = rel.file_name().unwrap_or_else(|| OsStr::new("_"));
    for n in 0..=MAX_NUMBERED {
        let candidate = if n == 0 {
            name.to_os_string()
        } else {
            numbered(name, n)
        };
        if !dir.exists(&candidate)? && !dir.exists(&sidecar_name(&candidate))? {
            out.push(candidate);
            return Ok(out);
        }
    }
    Err(FsError::AlreadyExists {
        path: dir.path().join(name),
    })
}

/// One placement; see the module docs.
#[derive(Debug)]
pub struct Release<'a> {
    /// The staging folder.
    pub staging: &'a Dir,
    /// The staged file's name in it.
    pub staged_name: &'a OsStr,
    /// The stamp the file was hashed with (`None`: never hashed, e.g. unreadable).
    pub hashed: Option<Stamp>,
    /// The SHA-256 it was hashed with.
    pub sha256: Option<[u8; 32]>,
    /// The destination root.
    pub dest_root: &'a Dir,
    /// The target, relative to `dest_root` (from [`free_name`]).
    pub target: &'a Path,
    /// Mode of a placed copy (0644 clean, 0600 quarantine, 0640 failed); a rename keeps the
    /// file as it is.
    pub file_mode: u32,
    /// See [`Release::clean`]: whether a copy is placed even on the same filesystem.
    pub copy: bool,
    /// A release to clean: the staged file must still be the one hashed, and the copy must hold
    /// exactly the hashed bytes.
    pub clean: bool,
    /// Place a copy (a new inode owned by dropscan, with `file_mode`) rather than the staged
    /// inode itself: for clean and quarantine, so that no handle a user kept from before the
    /// claim (read, write or `O_PATH`) and no ownership of the user's reaches what is placed.
    /// The copy's temp name at the top of `dest_root` ([`super::names::copy_temp_name`]).
    pub temp_name: &'a OsStr,
    /// The stamp of the private copy the hash made of this file ([`super::own`]), when the
    /// staged file is expected to be it: if it still is (ours, one link, no access for others,
    /// unchanged), it is renamed into place instead of copied. `None` (the quarantine and failed
    /// tools): always a verified copy.
    pub own_copy: Option<Stamp>,
}

/// How a file was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The staged inode was renamed into place.
    Renamed,
    /// A verified copy was placed and the staged file removed.
    Copied,
    /// The move had already happened (found after a restart).
    AlreadyDone,
}

/// Places a staged file; see the module docs. `AlreadyExists`: choose another target and call
/// again (nothing was lost: the file is in staging or in the verified temp).
pub fn place(r: &Release<'_>) -> Result<Placed, FsError> {
    place_in(r, None)
}

/// [`place`] as one of a batch: a rename into place is not made durable here but left to
/// [`Deferred::finish`], which fsyncs each folder once for the whole batch (after all its
/// renames) and only then sets the placed files' modes and lets go of their locks. A placement
/// that copies (another filesystem) is finished and made durable here, as by [`place`].
pub fn place_deferred(r: &Release<'_>, batch: &mut Deferred) -> Result<Placed, FsError> {
    place_in(r, Some(batch))
}

fn place_in(r: &Release<'_>, batch: Option<&mut Deferred>) -> Result<Placed, FsError> {
    let (tparent, tname) = split_rel(r.target)?;
    let tdir = match r.dest_root.open_dir(tparent) {
        Ok(d) => d,
        // Never "vanished": that word is for the staged file. A destination folder removed
        // meanwhile means choosing the target again.
        Err(FsError::Vanished { path }) => {
            return Err(FsError::Io {
                path,
                about: "open the destination folder (removed meanwhile)",
                source: io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        Err(e) => return Err(e),
    };
    let (mut file, now) = match r.staging.open_file(r.staged_name) {
        Ok(x) => x,
        Err(FsError::Vanished { .. }) => return resume_from_temp(r, &tdir, tname),
        // Not readable by dropscan's user (dropped with mode 000, or an ACL that keeps us
        // out): the hash failed it, and a plain rename into failed needs no reading.
        Err(e) if !r.copy && is_denied(&e) => return rename_unreadable(r, &tdir, tname, e),
        Err(e) => return Err(e),
    };
    // One placement of a file at a time, across agents too (an old agent's copy still running
    // after a reload): the staged file is locked for the whole placement.
    lock(&file, &r.staging.path().join(r.staged_name))?;
    // With the staged file still here, a temp of ours is a partial copy from before a crash;
    // one that is locked is being written right now by another placement.
    if r.dest_root.exists(r.temp_name)? {
        let (temp, _) = r.dest_root.open_file(r.temp_name)?;
        lock(&temp, &r.dest_root.path().join(r.temp_name))?;
        r.dest_root.unlink(r.temp_name)?;
    }
    match r.hashed {
        Some(h) if !same_file(&h, &now.stamp()) => {
            return Err(FsError::Changed {
                path: r.staging.path().join(r.staged_name),
                detail: "changed since it was hashed".into(),
            });
        }
        None if r.clean => {
            return Err(FsError::Changed {
                path: r.staging.path().join(r.staged_name),
                detail: "was never hashed".into(),
            });
        }
        _ => {}
    }
    if let Some(done) = target_taken(r, &tdir, tname, &now)? {
        return Ok(done);
    }
    // The staged file is normally the private copy the hash made (`fsops::own`): a new inode of
    // ours that no user ever had a handle on, which is all the verified copy below would give.
    // It is renamed into place, then given its mode (after the rename, so that a retry still
    // finds it unchanged; a crash in between leaves it stricter, 0600, never looser).
    let own_copy = r
        .own_copy
        .is_some_and(|h| same_file(&h, &now.stamp()) && super::own::is_own_copy(&now));
    if !r.copy || own_copy {
        let mode = (own_copy && now.mode & 0o7777 != r.file_mode).then_some(r.file_mode);
        if let Some(batch) = batch {
            match rename_noreplace_unsynced(r.staging, r.staged_name, &tdir, tname) {
                Ok(()) => {
                    let path = tdir.path().join(tname);
                    batch.renamed(tdir, file, path, mode);
                    return Ok(Placed::Renamed);
                }
                Err(FsError::Io { ref source, .. })
                    if source.raw_os_error() == Some(libc::EXDEV) => {}
                Err(e) => return Err(e),
            }
            return copy_then_release(r, &mut file, &now, &tdir, tname);
        }
        match rename_noreplace(r.staging, r.staged_name, &tdir, tname) {
            Ok(_) => {
                if let Some(m) = mode {
                    if let Err(e) = rustix::fs::fchmod(&file, rustix::fs::Mode::from_raw_mode(m)) {
                        tracing::warn!(path = %super::shown(&tdir.path().join(tname)), error = %e, "placed, but its mode could not be set");
                    }
                }
                return Ok(Placed::Renamed);
            }
            Err(FsError::Io { ref source, .. }) if source.raw_os_error() == Some(libc::EXDEV) => {}
            Err(e) => return Err(e),
        }
    }
    copy_then_release(r, &mut file, &now, &tdir, tname)
}

/// Whether opening the staged file failed for want of permission.
fn is_denied(e: &FsError) -> bool {
    matches!(e, FsError::Io { source, .. }
        if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)))
}

/// Places a staged file dropscan's user cannot read (only ever into failed, by rename: see
/// [`place`]). Its identity comes from `lstat`, which needs no read permission, and no `flock`
/// is taken, since that would need a readable descriptor. None is needed either: the placement
/// is one atomic no-replace rename, and there is no temp to guard. Of two placements of the
/// same record at once (an old agent after a reload), one moves the file and the other finds it
/// gone and its target present ([`resume_from_temp`]): one placement, whichever wins. Across
/// filesystems it can be neither renamed nor copied: [`FsError::Unreadable`], and the caller
/// puts it back into the inbox (where the claim then leaves such files alone).
fn rename_unreadable(
    r: &Release<'_>,
    tdir: &Dir,
    tname: &OsStr,
    denied: FsError,
) -> Result<Placed, FsError> {
    let now = match r.staging.stamp(r.staged_name) {
        Ok(st) => st,
        Err(FsError::Vanished { .. }) => return resume_from_temp(r, tdir, tname),
        Err(e) => return Err(e),
    };
    if let Some(h) = r.hashed {
        if !same_file(&h, &now.stamp()) {
            return Err(FsError::Changed {
                path: r.staging.path().join(r.staged_name),
                detail: "changed since it was hashed".into(),
            });
        }
    }
    if let Some(done) = target_taken(r, tdir, tname, &now)? {
        return Ok(done);
    }
    match rename_noreplace(r.staging, r.staged_name, tdir, tname) {
        Ok(_) => Ok(Placed::Renamed),
        // Another placement of this record moved it first.
        Err(FsError::Vanished { .. }) => resume_from_temp(r, tdir, tname),
        Err(FsError::Io { ref source, .. }) if source.raw_os_error() == Some(libc::EXDEV) => {
            let FsError::Io { path, source, .. } = denied else {
                return Err(denied);
            };
            Err(FsError::Unreadable { path, source })
        }
        Err(e) => Err(e),
    }
}

fn copy_then_release(
    r: &Release<'_>,
    src: &mut std::fs::File,
    now: &FileStamp,
    tdir: &Dir,
    tname: &OsStr,
) -> Result<Placed, FsError> {
    // A file that goes to failed unread (it may be hard-linked to something outside the inbox)
    // is never read here either. Clean and quarantine copies only follow a hash, which refused
    // a hard link: a link made since (from a descriptor the user kept, through `/proc`) names
    // the inode that was scanned, and refusing it would make a retry that never succeeds.
    if now.nlink != 1 && !r.copy {
        return Err(FsError::HardLinked {
            path: r.staging.path().join(r.staged_name),
            nlink: now.nlink,
        });
    }
    let temp_path = r.dest_root.path().join(r.temp_name);
    let result = (|| {
        let mut tmp = r.dest_root.create_file(r.temp_name, r.file_mode)?;
        lock(&tmp, &temp_path)?;
        let times = super::times_of(src)?;
        src.seek(io::SeekFrom::Start(0))
            .map_err(|e| FsError::io(&temp_path, "read the staged file", e))?;
        // One pass: every byte written to the copy is hashed on its way there, so the copy
        // holds exactly the bytes whose SHA-256 is compared below (the temp is ours, created
        // exclusively, writable by nobody else). A reflinking `copy_file_range` would save the
        // write on btrfs/XFS but need a second read to verify; one pass wins elsewhere.
        let (sha, _) =
            super::own::copy_hashing(src, &mut tmp, None, (r.dest_root, r.temp_name), None)?
                .ok_or_else(|| FsError::io(&temp_path, "copy", io::Error::other("interrupted")))?;
        super::keep_times(&tmp, &times, &temp_path);
        tmp.sync_all()
            .map_err(|e| FsError::io(&temp_path, "fsync", e))?;
        if let Some(expected) = r.sha256 {
            if sha != expected {
                return Err(FsError::Changed {
                    path: r.staging.path().join(r.staged_name),
                    detail: "the copy's SHA-256 differs from the scanned content".into(),
                });
            }
        }
        r.dest_root.fsync()?;
        Ok(tmp)
    })();
    let _held = match result {
        Ok(tmp) => tmp,
        Err(e) => {
            r.dest_root.unlink(r.temp_name).ok();
            return Err(e);
        }
    };
    // The verified copy is durable: only now may the staged file go.
    r.staging.unlink(r.staged_name)?;
    if let Err(e) = r.staging.fsync() {
        tracing::warn!(error = %e, "staging folder fsync failed after a copy; continuing");
    }
    finish_temp(r, tdir, tname)
}

/// The staged file is gone: a verified temp of ours is renamed into place; no temp and the
/// target present means the move happened before a restart.
fn resume_from_temp(r: &Release<'_>, tdir: &Dir, tname: &OsStr) -> Result<Placed, FsError> {
    if r.dest_root.exists(r.temp_name)? {
        let (mut f, _) = r.dest_root.open_file(r.temp_name)?;
        lock(&f, &r.dest_root.path().join(r.temp_name))?;
        if let Some(expected) = r.sha256 {
            let (sha, _) = sha256_file(&mut f)?;
            if sha != expected {
                // Never delete it: it may be the only copy. Say where it is.
                return Err(FsError::Changed {
                    path: r.dest_root.path().join(r.temp_name),
                    detail: "the copy left by an interrupted placement does not hold the scanned bytes; kept there".into(),
                });
            }
        }
        return finish_temp(r, tdir, tname);
    }
    if tdir.exists(tname)? {
        // Our copy renamed into place before a crash: it may still lack its mode (set just after
        // the rename).
        if let Some(own) = r.own_copy {
            if let Ok((placed, st)) = tdir.open_file(tname) {
                if (st.dev, st.ino) == (own.dev, own.ino) && st.mode & 0o7777 != r.file_mode {
                    rustix::fs::fchmod(&placed, rustix::fs::Mode::from_raw_mode(r.file_mode)).ok();
                }
            }
        }
        return Ok(Placed::AlreadyDone);
    }
    Err(FsError::Vanished {
        path: r.staging.path().join(r.staged_name),
    })
}

fn finish_temp(r: &Release<'_>, tdir: &Dir, tname: &OsStr) -> Result<Placed, FsError> {
    rename_noreplace(r.dest_root, r.temp_name, tdir, tname)?;
    Ok(Placed::Copied)
}

/// Puts a staged file back into the inbox at `rel` (or `name (n)` beside it), by a no-replace
/// rename on the inbox's filesystem: for a file that can be placed neither by rename nor by
/// copy (a hard link, when the failed folder is on another filesystem). Nothing is read and no
/// name is removed; the claim then leaves it where it is. Returns the relative path used.
pub fn return_to_inbox(
    staging: &Dir,
    staged_name: &OsStr,
    inbox: &Dir,
    rel: &Path,
) -> Result<PathBuf, FsError> {
    let rel = safe_relative(rel);
    let (parent, name) = split_rel(&rel)?;
    let dir = inbox.create_dirs(parent, 0o755)?;
    for n in 0..=MAX_NUMBERED {
        let candidate = if n == 0 {
            name.to_os_string()
        } else {
            numbered(name, n)
        };
        match rename_noreplace(staging, staged_name, &dir, &candidate) {
            Ok(_) => return Ok(parent.join(candidate)),
            Err(e) if e.is_already_exists() => {}
            Err(e) => return Err(e),
        }
    }
    Err(FsError::AlreadyExists {
        path: inbox.path().join(rel),
    })
}

/// The target before a move: free (`None`); our own inode already (a link + unlink move
/// interrupted after the link: the staged name goes, `Renamed`); anything else is somebody's,
/// never replaced (`AlreadyExists`: choose another name).
fn target_taken(
    r: &Release<'_>,
    tdir: &Dir,
    tname: &OsStr,
    now: &FileStamp,
) -> Result<Option<Placed>, FsError> {
    match tdir.stamp(tname) {
        Ok(t) if (t.dev, t.ino) == (now.dev, now.ino) => {
            r.staging.unlink(r.staged_name)?;
            r.staging.fsync()?;
            Ok(Some(Placed::Renamed))
        }
        Ok(_) | Err(FsError::NotRegular { .. }) => Err(FsError::AlreadyExists {
            path: tdir.path().join(tname),
        }),
        Err(FsError::Vanished { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a placement of the staged file `name` is running now (it holds the file's lock): for
/// example the copy of an agent generation that a reload replaced, still finishing.
pub fn placement_in_progress(staging: &Dir, name: &OsStr) -> bool {
    staging.open_file(name).is_ok_and(|(f, _)| {
        matches!(
            lock(&f, &staging.path().join(name)),
            Err(FsError::Busy { .. })
        )
    })
}

/// Takes an exclusive `flock` on `file` without waiting; held until the file is closed.
pub(super) fn lock(file: &std::fs::File, path: &Path) -> Result<(), FsError> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(FsError::Busy {
            path: path.to_path_buf(),
        }),
        Err(e) if no_flock_here(e) => Ok(()),
        Err(e) => Err(FsError::io(
            path,
            "lock",
            io::Error::from_raw_os_error(e.raw_os_error()),
        )),
    }
}

/// Whether `flock` failed because this filesystem cannot give the lock, not because someone
/// holds it: placements of one record are then kept apart by the sorter alone, as before. The
/// NFS client emulates `flock` with a whole-file POSIX lock, and an exclusive one needs a
/// descriptor open for writing: on the read-only descriptor of a user's staged file it fails
/// with `EBADF`, which must not become a retry that can never succeed.
pub(super) fn no_flock_here(e: rustix::io::Errno) -> bool {
    matches!(
        e,
        rustix::io::Errno::NOLCK | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::BADF
    )
}

/// Writes a sidecar beside `target` (relative to `dest_root`) atomically: a private temp name,
/// fsync, rename, fsync the folder.
pub fn write_sidecar(
    dest_root: &Dir,
    target: &Path,
    bytes: &[u8],
    mode: u32,
    instance: &str,
) -> Result<PathBuf, FsError> {
    let (parent, name) = split_rel(target)?;
    let dir = dest_root.open_dir(parent)?;
    let side = sidecar_name(name);
    let tmp_name = sidecar_temp_name(instance);
    let result = (|| {
        let mut f = dir.create_file(&tmp_name, mode)?;
        let p = dir.path().join(&tmp_name);
        f.write_all(bytes)
            .map_err(|e| FsError::io(&p, "write", e))?;
        f.sync_all().map_err(|e| FsError::io(&p, "fsync", e))?;
        // Closed first: SMB refuses to rename a file held open.
        drop(f);
        rustix::fs::renameat(dir.fd(), &tmp_name, dir.fd(), &side).map_err(|e| {
            FsError::io(
                &dir.path().join(&side),
                "rename",
                io::Error::from_raw_os_error(e.raw_os_error()),
            )
        })?;
        dir.fsync()
    })();
    if result.is_err() {
        dir.unlink(&tmp_name).ok();
    }
    result.map(|()| dir.path().join(side))
}
