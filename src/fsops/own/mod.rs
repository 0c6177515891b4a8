//! Owning the bytes: a claimed file is copied into a private inode while it is hashed, under a
//! read lease, and from then on dropscan works on that copy alone.
//!
//! The claim moved the user's inode into staging (`X.staged`). [`own`] then:
//!
//! 1. opens it read-only (never through a link) and takes a **read lease**. The kernel refuses
//!    it while anyone holds the file open for writing: a writer that was still at it (it opened
//!    the file before the claim and paused longer than `settle`) is detected here, and the file
//!    goes back to the inbox ([`Owning::StillWritten`]);
//! 2. copies it into `X.copy` (created exclusively, mode 0600, owned by dropscan) and hashes
//!    every byte on its way there, asking between reads whether the lease is breaking (a writer
//!    opening the file): if so it stops at once and lets go, so that no writer waits on us for
//!    more than one read;
//! 3. fsyncs the copy, checks that the original did not change meanwhile, and replaces
//!    `X.staged` by the copy with one rename (within staging, so atomic). The user's inode loses
//!    its last name only now, while the lease proves that nobody can write to it.
//!
//! Where no lease can be had (a client mount, no `CAP_LEASE`, NFSv3 writers), step 3 keeps the
//! user's inode as `X.orig` instead ([`Kept`]): the caller journals it, and the claim stage's
//! sweep drops it once it has stayed unchanged for `keep_original`, or sends it back to the
//! inbox as a new version if a late writer changed it. A writer that resumes while the copy is
//! made (the file's size or mtime moved meanwhile) is not failed: the file goes back to the
//! inbox ([`Owning::StillWritten`]). So a writer that pauses longer than `settle` loses nothing
//! there either.
//!
//! The uploader, the results and the release all use `X.staged`, which is now a file no user has
//! ever had a handle on: same-filesystem releases are a rename, with no verifying copy (the
//! pass this saves is the one the verified-copy release used to cost).
//!
//! Crash rules (the journal record stays `claimed` until the hash is journaled, and a `claimed`
//! record is owned again at start-up, see [`repair`]): a `X.copy` is a partial copy and is
//! removed; a `X.orig` takes the name `X.staged` back (from our copy, if the crash came after the
//! second rename of step 3); a `X.staged` that is already our copy is simply copied again.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};

use super::Stamp;
use super::lease::{LeaseRefused, ReadLease};
use super::{Dir, FileStamp, FsError, stamp_of};

mod owner;
use owner::Owner;

/// Looks (100 ms apart) at a staged file with several links before it counts as hard-linked.
const HARD_LINK_SETTLE_TRIES: u32 = 10;
/// The same on network and FUSE filesystems, whose clients cache attributes (FUSE for a second
/// by default): the link count of a claim by link + unlink can read 2 for that long.
const HARD_LINK_SETTLE_TRIES_REMOTE: u32 = 50;
/// Copies of a file that keeps changing (with no lease to tell why) before it is failed.
const COPY_TRIES: u32 = 3;

/// The copy's name beside the staged file `X.staged`: `X.copy`.
pub fn copy_name(staged: &OsStr) -> OsString {
    with_suffix(staged, "copy")
}

/// The kept original's name beside the staged file `X.staged`: `X.orig`.
pub fn orig_name(staged: &OsStr) -> OsString {
    with_suffix(staged, "orig")
}

/// The staged name a `X.copy` or `X.orig` belongs to, if `name` is one.
pub fn staged_name_of(name: &OsStr) -> Option<OsString> {
    let s = name.to_str()?;
    let stem = s
        .strip_suffix(".copy")
        .or_else(|| s.strip_suffix(".orig"))?;
    Some(OsString::from(format!("{stem}.staged")))
}

fn with_suffix(staged: &OsStr, suffix: &str) -> OsString {
    let s = staged.to_string_lossy();
    let stem = s.strip_suffix(".staged").unwrap_or(&s);
    OsString::from(format!("{stem}.{suffix}"))
}

/// The user's original kept beside its copy (no lease could be had).
#[derive(Debug, Clone)]
pub struct Kept {
    /// Its name in staging (`X.orig`).
    pub name: OsString,
    /// Its stamp when it was copied.
    pub stamp: Stamp,
}

/// A file owned: its copy is now `X.staged`.
#[derive(Debug)]
pub struct Owned {
    /// SHA-256 of the copy (every byte written to it was hashed).
    pub sha256: [u8; 32],
    /// The copy's stamp.
    pub stamp: Stamp,
    /// The original, when it was kept rather than dropped.
    pub kept: Option<Kept>,
    /// Why no lease could be had, when none could.
    pub no_lease: Option<LeaseRefused>,
}

/// Why a file was not owned.
#[derive(Debug)]
pub enum Owning {
    /// A writer holds it open (or opened it during the copy): it is not complete. Nothing was
    /// changed; the caller puts it back into the inbox.
    StillWritten,
    /// Anything else: unreadable, hard-linked, gone, changing without end, a full disk.
    Failed(FsError),
}

impl From<FsError> for Owning {
    fn from(e: FsError) -> Self {
        Owning::Failed(e)
    }
}

/// Copies the staged file `name` into a private inode while hashing it, and makes that copy the
/// staged file; see the module docs. `leases`: whether leases are asked on this root at all
/// ([`super::lease::check_here`]); `keep_always`: keep the original even when a lease proved
/// nobody holds it (`keep_originals = "always"`, for NFSv3 exports).
pub fn own(staging: &Dir, name: &OsStr, leases: bool, keep_always: bool) -> Result<Owned, Owning> {
    let _owner = Owner::take(staging, name);
    let mut last = String::new();
    for _ in 0..COPY_TRIES {
        match own_once(staging, name, leases, keep_always, None)? {
            Try::Owned(o) => return Ok(o),
            Try::Again(why) => last = why,
        }
    }
    Err(Owning::Failed(FsError::Changed {
        path: staging.path().join(name),
        detail: last,
    }))
}

/// Where the tee sends each piece of the file as it is copied (issue 20: the upload body), with
/// a way to ask whether the lease is breaking while it waits for room. An error stops the copy:
/// [`io::ErrorKind::WouldBlock`] when it stopped waiting because the lease is breaking (a
/// writer is opening the file: still written), any other when the upload ended. It is dropped
/// as soon as the copy has read the whole file, before the copy is fsynced, so that the upload
/// can end meanwhile.
pub type Sink<'s> = Box<dyn FnMut(&[u8], &dyn Fn() -> bool) -> io::Result<()> + Send + 's>;

/// [`own`], sending every byte copied to `sink` as well (the tee: the upload reads the file in
/// the same pass that owns it). One try only: bytes already sent cannot be taken back, so a
/// file whose attributes moved during the copy fails here ([`FsError::Changed`]) where `own`
/// would copy it again; the caller owns it again the usual way.
pub fn own_teeing(
    staging: &Dir,
    name: &OsStr,
    leases: bool,
    keep_always: bool,
    sink: Sink<'_>,
) -> Result<Owned, Owning> {
    let _owner = Owner::take(staging, name);
    match own_once(staging, name, leases, keep_always, Some(sink))? {
        Try::Owned(o) => Ok(o),
        Try::Again(detail) => Err(Owning::Failed(FsError::Changed {
            path: staging.path().join(name),
            detail,
        })),
    }
}

/// What one try of owning came to, when it did not fail.
enum Try {
    /// Owned.
    Owned(Owned),
    /// Only the original's attributes moved during the copy: copy again (why, for the log).
    Again(String),
}

/// One try of [`own`]; see the module docs.
fn own_once(
    staging: &Dir,
    name: &OsStr,
    leases: bool,
    keep_always: bool,
    sink: Option<Sink<'_>>,
) -> Result<Try, Owning> {
    let copy = copy_name(name);
    let (file, before) = staging.open_file(name)?;
    // Before the copy reads it (which may move its access time).
    let times = super::times_of(&file)?;
    let before = one_link(staging, name, &file, before)?;
    let (lease, no_lease) = lease_on(&file, leases)?;
    // A partial copy from before a crash, or from the try before this one.
    match staging.unlink(&copy) {
        Ok(()) | Err(FsError::Vanished { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let mut out = staging.create_file(&copy, 0o600)?;
    let copied = copy_hashing(&file, &mut out, lease.as_ref(), (staging, &copy), sink);
    let (sha256, bytes) = match copied {
        Ok(Some(x)) => x,
        Ok(None) => {
            drop(lease);
            staging.unlink(&copy).ok();
            return Err(Owning::StillWritten);
        }
        Err(e) => {
            drop(lease);
            staging.unlink(&copy).ok();
            return Err(e.into());
        }
    };
    let after = stamp_of(&file)?;
    match after_copy(&before, &after, bytes, lease.is_some()) {
        AfterCopy::Same => {}
        AfterCopy::StillWritten => {
            staging.unlink(&copy).ok();
            return Err(Owning::StillWritten);
        }
        AfterCopy::Retry => {
            staging.unlink(&copy).ok();
            return Ok(Try::Again(format!(
                "changed while copied ({} → {} bytes)",
                before.size, after.size
            )));
        }
    }
    let synced = Synced {
        staging,
        name,
        copy: &copy,
        file: &file,
    };
    let lease = synced.sync(&out, &times, lease, &after)?;
    let kept = synced.replace_original(lease, keep_always, &before)?;
    // After the renames: a rename changes the moved inode's ctime on most filesystems.
    let stamp = stamp_of(&out)?.stamp();
    Ok(Try::Owned(Owned {
        sha256,
        stamp,
        kept,
        no_lease,
    }))
}

/// The staged file's stamp once it has one link: where a claim is link + unlink (no
/// `RENAME_NOREPLACE`, e.g. NFS), the agent that lost the race removes its second link a moment
/// later, so it is looked at again before it counts as a hard link (and fails).
fn one_link(
    staging: &Dir,
    name: &OsStr,
    file: &std::fs::File,
    mut before: FileStamp,
) -> Result<FileStamp, Owning> {
    let tries = if before.nlink > 1
        && super::fstype::kind_of_dir(staging) != super::fstype::FsKind::Local
    {
        HARD_LINK_SETTLE_TRIES_REMOTE
    } else {
        HARD_LINK_SETTLE_TRIES
    };
    for _ in 0..tries {
        if before.nlink <= 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        before = stamp_of(file)?;
    }
    if before.nlink > 1 {
        return Err(Owning::Failed(FsError::HardLinked {
            path: staging.path().join(name),
            nlink: before.nlink,
        }));
    }
    Ok(before)
}

/// A read lease on `file` if one is asked and can be had, else why not; a writer holding it
/// open makes the file still written.
fn lease_on(
    file: &std::fs::File,
    leases: bool,
) -> Result<(Option<ReadLease<'_>>, Option<LeaseRefused>), Owning> {
    if !leases {
        return Ok((None, Some(LeaseRefused::NotAsked("not asked on this root"))));
    }
    match ReadLease::take(file) {
        Ok(l) => Ok((Some(l), None)),
        Err(LeaseRefused::HeldOpen) => Err(Owning::StillWritten),
        Err(refused) => Ok((None, Some(refused))),
    }
}

/// What the original's stamps before and after the copy say about the copy.
#[derive(Debug, PartialEq, Eq)]
enum AfterCopy {
    /// Unchanged, and every byte copied: the copy is the file.
    Same,
    /// A writer is at it: with a lease held nobody could open it for writing, so one that
    /// already had it open (through a mapping) is still at it; without one, new bytes (size or
    /// mtime moved) mean a writer that paused longer than `settle` resumed. Failing the file
    /// would move it to failed with the writer still writing: it goes back to the inbox, where
    /// settle waits for it.
    StillWritten,
    /// Only the ctime moved (a chmod, a touch of the attributes): copy again, then fail.
    Retry,
}

fn after_copy(before: &FileStamp, after: &FileStamp, bytes: u64, leased: bool) -> AfterCopy {
    if before == after && bytes == after.size {
        AfterCopy::Same
    } else if leased || (before.size, before.mtime_ns) != (after.size, after.mtime_ns) {
        AfterCopy::StillWritten
    } else {
        AfterCopy::Retry
    }
}

/// What becomes of the user's original once its copy is synced, by the lease held then (and
/// whether it is breaking) and `keep_originals`.
#[derive(Debug, PartialEq, Eq)]
enum Original {
    /// The lease is breaking: a writer is opening it.
    StillWritten,
    /// Nobody holds it open for writing, and no one can open it before the lease goes: its last
    /// name may go, replaced by the copy.
    Drop,
    /// Kept as `X.orig` (unless kept already, by an earlier owning).
    Keep,
}

fn original(lease_breaking: Option<bool>, keep_always: bool) -> Original {
    match lease_breaking {
        Some(true) => Original::StillWritten,
        Some(false) if !keep_always => Original::Drop,
        _ => Original::Keep,
    }
}

/// The copy `copy` of the staged file `name`, made and checked, and the original still open.
struct Synced<'a> {
    staging: &'a Dir,
    name: &'a OsStr,
    copy: &'a OsStr,
    file: &'a std::fs::File,
}

impl<'a> Synced<'a> {
    /// Gives the copy the original's dates and fsyncs it. The fsync waits on the disk, for
    /// seconds with a big file: not with the lease held, or a writer opening the original would
    /// wait that long. The lease is taken again after it, and the original must still be `after`.
    fn sync(
        &self,
        out: &std::fs::File,
        times: &rustix::fs::Timestamps,
        lease: Option<ReadLease<'a>>,
        after: &FileStamp,
    ) -> Result<Option<ReadLease<'a>>, Owning> {
        let (staging, copy) = (self.staging, self.copy);
        let had_lease = lease.is_some();
        drop(lease);
        super::keep_times(out, times, &staging.path().join(copy));
        out.sync_all()
            .map_err(|e| FsError::io(&staging.path().join(copy), "fsync", e))?;
        if !had_lease {
            return Ok(None);
        }
        match ReadLease::take(self.file) {
            Ok(l) if stamp_of(self.file)? == *after => Ok(Some(l)),
            Ok(_) | Err(LeaseRefused::HeldOpen) => {
                staging.unlink(copy).ok();
                Err(Owning::StillWritten)
            }
            Err(e) => {
                staging.unlink(copy).ok();
                Err(Owning::Failed(FsError::io(
                    &staging.path().join(self.name),
                    "lease",
                    io::Error::other(e.describe()),
                )))
            }
        }
    }

    /// Makes the copy the staged file, dropping or keeping the original (see [`Original`]).
    fn replace_original(
        &self,
        lease: Option<ReadLease<'a>>,
        keep_always: bool,
        before: &FileStamp,
    ) -> Result<Option<Kept>, Owning> {
        let (staging, name, copy) = (self.staging, self.name, self.copy);
        match original(lease.as_ref().map(ReadLease::breaking), keep_always) {
            Original::StillWritten => {
                drop(lease);
                staging.unlink(copy).ok();
                Err(Owning::StillWritten)
            }
            Original::Drop => {
                replace(staging, copy, name)?;
                Ok(None)
            }
            Original::Keep if staging.exists(&orig_name(name))? => {
                // Owned before, its original kept then (and journaled, or found at start-up):
                // the staged file is our copy already, and the kept original stays as it is.
                replace(staging, copy, name)?;
                Ok(None)
            }
            Original::Keep => {
                let orig = orig_name(name);
                rename_within(staging, name, &orig, false)?;
                rename_within(staging, copy, name, false)?;
                // Stamped after its rename, which moves ctime. A write that slipped in since
                // the copy (size or mtime moved) keeps the stamp from before the copy, so that
                // the sweep sends the new version back to the inbox.
                let moved = stamp_of(self.file)?;
                let unchanged = (moved.dev, moved.ino, moved.size, moved.mtime_ns)
                    == (before.dev, before.ino, before.size, before.mtime_ns);
                Ok(Some(Kept {
                    name: orig,
                    stamp: if unchanged { moved } else { *before }.stamp(),
                }))
            }
        }
    }
}

/// Copies `src` (from its current position) to `dst` through this thread's buffer, hashing
/// what is written, and handing each piece to `sink` too (the tee), which is dropped once the
/// whole file is read. `Ok(None)`: the lease started breaking (a writer is opening the file)
/// and the copy stopped; without a lease it always runs to the end.
pub(super) fn copy_hashing(
    mut src: &std::fs::File,
    dst: &mut std::fs::File,
    lease: Option<&ReadLease<'_>>,
    (dir, dst_name): (&Dir, &OsStr),
    mut sink: Option<Sink<'_>>,
) -> Result<Option<([u8; 32], u64)>, FsError> {
    use sha2::{Digest, Sha256};
    let dst_path = || dir.path().join(dst_name);
    super::with_buffer(|buf| {
        let mut hasher = Sha256::new();
        let (mut total, mut written_back) = (0u64, 0u64);
        loop {
            if lease.is_some_and(ReadLease::breaking) {
                return Ok(None);
            }
            let n = match src.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FsError::io(&dst_path(), "read the staged file", e)),
            };
            let chunk = buf.get(..n).unwrap_or_default();
            hasher.update(chunk);
            dst.write_all(chunk)
                .map_err(|e| FsError::io(&dst_path(), "copy", e))?;
            if let Some(send) = sink.as_mut() {
                let breaking = || lease.is_some_and(ReadLease::breaking);
                match send(chunk, &breaking) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) => return Err(FsError::io(&dst_path(), "send while copying", e)),
                }
            }
            total += n as u64;
            if total - written_back >= WRITEBACK_EVERY {
                start_writeback(dst, written_back, total - written_back);
                written_back = total;
            }
        }
        // The upload may end now, while the copy is synced.
        drop(sink);
        Ok(Some((hasher.finalize().into(), total)))
    })
}

/// How many bytes of a copy are written before the kernel is asked to start writing them back
/// ([`start_writeback`]).
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Asks the kernel to start writing `len` bytes of `file` from `offset` back to disk now, not
/// wait: the copy's closing fsync then finds most of a big file already written, instead of
/// writing all of it while the file waits (half a second per GiB here, issue 20). Only a hint:
/// the fsync still makes the copy durable, and an error (a filesystem without it) is ignored.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd as _;
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: `file` is an open descriptor borrowed for the call; sync_file_range takes no
    // pointer, and SYNC_FILE_RANGE_WRITE only starts writeback of the range.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Renames `from` over `to` in one folder (atomic replacement).
fn replace(dir: &Dir, from: &OsStr, to: &OsStr) -> Result<(), FsError> {
    rename_within(dir, from, to, true)
}

fn rename_within(dir: &Dir, from: &OsStr, to: &OsStr, replace: bool) -> Result<(), FsError> {
    let flags = if replace {
        rustix::fs::RenameFlags::empty()
    } else {
        rustix::fs::RenameFlags::NOREPLACE
    };
    let r = rustix::fs::renameat_with(dir.fd(), from, dir.fd(), to, flags);
    // No RENAME_NOREPLACE here (some network filesystems): within our own private folder, a
    // plain rename after checking the target is free is safe enough.
    let r = match r {
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) if !replace => {
            if dir.exists(to)? {
                return Err(FsError::AlreadyExists {
                    path: dir.path().join(to),
                });
            }
            rustix::fs::renameat(dir.fd(), from, dir.fd(), to)
        }
        r => r,
    };
    r.map_err(|e| {
        FsError::io(
            &dir.path().join(from),
            "rename in staging",
            io::Error::from_raw_os_error(e.raw_os_error()),
        )
    })
}

/// Start-up repair of the staged name of a record still `claimed`, after a crash inside [`own`]
/// or before its result was journaled: a `X.orig` goes back to being `X.staged` (replacing our
/// copy of it, if the crash came after the copy took the name); a `X.copy` is removed. Returns
/// whether anything was done.
pub fn repair(staging: &Dir, staged: &OsStr) -> Result<bool, FsError> {
    // After any owning of it still running here (a tee abandoned by a reload).
    let _owner = Owner::take(staging, staged);
    let mut done = false;
    let orig = orig_name(staged);
    if staging.exists(&orig)? {
        // Beside it, `X.staged` can only be our copy of it (the record is still `claimed`:
        // the crash came before its hash was journaled): the original takes its name back, and
        // is owned again from scratch.
        let taken_back = if staging.exists(staged)? {
            replace(staging, &orig, staged)
        } else {
            rename_within(staging, &orig, staged, false)
        };
        taken_back?;
        done = true;
    }
    let copy = copy_name(staged);
    if staging.exists(staged)? && staging.exists(&copy)? {
        staging.unlink(&copy)?;
        done = true;
    }
    Ok(done)
}

/// Whether the stamp describes a file dropscan made itself: owned by the service user, one link,
/// and no access for anyone else (the copies [`own`] makes). Only such a file is released by a
/// plain rename.
pub fn is_own_copy(st: &FileStamp) -> bool {
    st.uid == rustix::process::geteuid().as_raw()
        && st.nlink == 1
        && st.mode & 0o077 == 0
        && st.is_regular()
}

#[cfg(test)]
mod tests;
