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
    let copy = copy_name(name);
    let mut last = String::new();
    for _ in 0..COPY_TRIES {
        let (file, mut before) = staging.open_file(name)?;
        // Before the copy reads it (which may move its access time).
        let times = super::times_of(&file)?;
        // Where a claim is link + unlink (no RENAME_NOREPLACE, e.g. NFS), the agent that lost
        // the race removes its second link a moment later: look again before calling it a hard
        // link.
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
            before = stamp_of(&file)?;
        }
        if before.nlink > 1 {
            return Err(Owning::Failed(FsError::HardLinked {
                path: staging.path().join(name),
                nlink: before.nlink,
            }));
        }
        let (lease, no_lease) = if leases {
            match ReadLease::take(&file) {
                Ok(l) => (Some(l), None),
                Err(LeaseRefused::HeldOpen) => return Err(Owning::StillWritten),
                Err(refused) => (None, Some(refused)),
            }
        } else {
            (None, Some(LeaseRefused::NotAsked("not asked on this root")))
        };
        // A partial copy from before a crash, or from the try before this one.
        match staging.unlink(&copy) {
            Ok(()) | Err(FsError::Vanished { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let mut out = staging.create_file(&copy, 0o600)?;
        let copied = copy_hashing(&file, &mut out, lease.as_ref(), staging, &copy);
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
        if before != after || bytes != after.size {
            staging.unlink(&copy).ok();
            if lease.is_none() {
                // New bytes (size or mtime moved): a writer that paused longer than `settle` is
                // at it again. Failing the file would move it to failed with the writer still
                // writing: it goes back to the inbox, where settle waits for it.
                if (before.size, before.mtime_ns) != (after.size, after.mtime_ns) {
                    return Err(Owning::StillWritten);
                }
                // Only the ctime moved (a chmod, a touch of the attributes): try again, then fail.
                last = format!(
                    "changed while copied ({} → {} bytes)",
                    before.size, after.size
                );
                continue;
            }
            // With a lease held nobody could open it for writing: a writer that already had it
            // open (through a mapping) is still at it.
            return Err(Owning::StillWritten);
        }
        // The fsync waits on the disk, for seconds with a big file: not with the lease held,
        // or a writer opening the original would wait that long. The lease is taken again
        // after it, and the original must still be what was copied.
        let had_lease = lease.is_some();
        drop(lease);
        super::keep_times(&out, &times, &staging.path().join(&copy));
        out.sync_all()
            .map_err(|e| FsError::io(&staging.path().join(&copy), "fsync", e))?;
        let lease = if had_lease {
            match ReadLease::take(&file) {
                Ok(l) if stamp_of(&file)? == after => Some(l),
                Ok(_) | Err(LeaseRefused::HeldOpen) => {
                    staging.unlink(&copy).ok();
                    return Err(Owning::StillWritten);
                }
                Err(e) => {
                    staging.unlink(&copy).ok();
                    return Err(Owning::Failed(FsError::io(
                        &staging.path().join(name),
                        "lease",
                        io::Error::other(e.describe()),
                    )));
                }
            }
        } else {
            None
        };
        let kept = match &lease {
            Some(l) if l.breaking() => {
                drop(lease);
                staging.unlink(&copy).ok();
                return Err(Owning::StillWritten);
            }
            // Nobody holds the original open for writing, and no one can open it before the
            // lease goes: its last name may go, replaced by the copy.
            Some(_) if !keep_always => {
                replace(staging, &copy, name)?;
                None
            }
            _ if staging.exists(&orig_name(name))? => {
                // Owned before, its original kept then (and journaled, or found at start-up):
                // the staged file is our copy already, and the kept original stays as it is.
                replace(staging, &copy, name)?;
                None
            }
            _ => {
                let orig = orig_name(name);
                rename_within(staging, name, &orig, false)?;
                rename_within(staging, &copy, name, false)?;
                // Stamped after its rename, which moves ctime. A write that slipped in since
                // the copy (size or mtime moved) keeps the stamp from before the copy, so that
                // the sweep sends the new version back to the inbox.
                let moved = stamp_of(&file)?;
                let unchanged = (moved.dev, moved.ino, moved.size, moved.mtime_ns)
                    == (before.dev, before.ino, before.size, before.mtime_ns);
                Some(Kept {
                    name: orig,
                    stamp: if unchanged { moved } else { before }.stamp(),
                })
            }
        };
        drop(lease);
        // After the renames: a rename changes the moved inode's ctime on most filesystems.
        let stamp = stamp_of(&out)?.stamp();
        return Ok(Owned {
            sha256,
            stamp,
            kept,
            no_lease,
        });
    }
    Err(Owning::Failed(FsError::Changed {
        path: staging.path().join(name),
        detail: last,
    }))
}

/// Copies `src` (from its current position) to `dst` through this thread's buffer, hashing
/// what is written. `Ok(None)`: the lease started breaking (a writer is opening the file) and
/// the copy stopped; without a lease it always runs to the end.
pub(super) fn copy_hashing(
    mut src: &std::fs::File,
    dst: &mut std::fs::File,
    lease: Option<&ReadLease<'_>>,
    dir: &Dir,
    dst_name: &OsStr,
) -> Result<Option<([u8; 32], u64)>, FsError> {
    use sha2::{Digest, Sha256};
    let dst_path = || dir.path().join(dst_name);
    super::with_buffer(|buf| {
        let mut hasher = Sha256::new();
        let mut total = 0u64;
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
            total += n as u64;
        }
        Ok(Some((hasher.finalize().into(), total)))
    })
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
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn staging() -> (tempfile::TempDir, Dir) {
        let d = tempfile::tempdir().unwrap();
        let dir = Dir::open_trusted(d.path()).unwrap();
        (d, dir)
    }

    #[test]
    fn the_staged_name_becomes_a_private_copy_with_the_same_bytes_and_the_original_goes() {
        let (d, dir) = staging();
        let p = d.path().join("a.staged");
        std::fs::write(&p, b"the user's bytes").unwrap();
        let before = std::fs::metadata(&p).unwrap();
        let owned = own(&dir, OsStr::new("a.staged"), true, false).unwrap();
        let after = std::fs::metadata(&p).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_ne!(before.ino(), after.ino(), "a new inode");
        assert_eq!(after.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"the user's bytes");
        assert_eq!(
            owned.sha256,
            <[u8; 32]>::from(sha2::Sha256::digest(b"the user's bytes"))
        );
        assert_eq!(owned.stamp.ino, after.ino());
        assert!(owned.kept.is_none() && owned.no_lease.is_none());
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![OsString::from("a.staged")],
            "no copy or original left"
        );
    }

    use sha2::Digest;

    #[test]
    fn a_writer_still_holding_the_staged_file_is_detected_and_nothing_changes() {
        let (d, dir) = staging();
        let p = d.path().join("a.staged");
        std::fs::write(&p, b"first half").unwrap();
        let mut writer = OpenOptions::new().append(true).open(&p).unwrap();
        assert!(matches!(
            own(&dir, OsStr::new("a.staged"), true, false),
            Err(Owning::StillWritten)
        ));
        // The writer's later bytes land in the file, which is still there under its name.
        writer.write_all(b", second half").unwrap();
        drop(writer);
        assert_eq!(std::fs::read(&p).unwrap(), b"first half, second half");
        assert!(!d.path().join("a.copy").exists());
    }

    /// Found by the kill-point test: the original was stamped before its rename to `X.orig`,
    /// and a rename moves ctime, so the sweep took every kept original for changed by a late
    /// writer and sent it back to the inbox (scanned again, kept again, for ever).
    #[test]
    fn a_kept_original_is_stamped_after_its_rename_so_an_unchanged_one_is_not_sent_back() {
        let (d, dir) = staging();
        std::fs::write(d.path().join("a.staged"), b"original").unwrap();
        let owned = own(&dir, OsStr::new("a.staged"), false, false).unwrap();
        let kept = owned.kept.expect("without leases the original is kept");
        assert_eq!(kept.name, "a.orig");
        let now = FileStamp::of(&std::fs::metadata(d.path().join("a.orig")).unwrap());
        assert!(
            super::super::same_file(&kept.stamp, &now.stamp()),
            "{kept:?} vs {now:?}"
        );
        assert_eq!(
            std::fs::read(d.path().join("a.staged")).unwrap(),
            b"original"
        );
    }

    #[test]
    fn repair_puts_a_kept_original_back_and_removes_a_partial_copy() {
        let (d, dir) = staging();
        std::fs::write(d.path().join("a.orig"), b"orig").unwrap();
        std::fs::write(d.path().join("a.copy"), b"or").unwrap();
        assert!(repair(&dir, OsStr::new("a.staged")).unwrap());
        assert_eq!(std::fs::read(d.path().join("a.staged")).unwrap(), b"orig");
        assert!(!d.path().join("a.copy").exists());
        assert!(!d.path().join("a.orig").exists());
    }

    /// Found by the kill-point test (lease off, killed after the hash's renames but before its
    /// result was journaled): the record was owned again, and renaming our copy `X.staged` to
    /// `X.orig` met the kept original there: "exists already", and the file went to failed.
    #[test]
    fn an_original_kept_before_a_crash_takes_its_staged_name_back_from_our_copy() {
        let (d, dir) = staging();
        std::fs::write(d.path().join("a.orig"), b"the user's inode").unwrap();
        std::fs::write(d.path().join("a.staged"), b"our copy").unwrap();
        assert!(repair(&dir, OsStr::new("a.staged")).unwrap());
        assert_eq!(
            std::fs::read(d.path().join("a.staged")).unwrap(),
            b"the user's inode"
        );
        assert!(!d.path().join("a.orig").exists());
        let owned = own(&dir, OsStr::new("a.staged"), false, false).unwrap();
        assert_eq!(owned.kept.unwrap().name, "a.orig");
    }

    /// Review finding: without a lease (a client mount, `lease_check = "off"`, a file taken
    /// after `held_open_limit`), a writer that paused longer than `settle` and resumes while the
    /// hash copies its file made every copy "changed": after three tries the file was *failed*.
    /// It went to the failed folder with the writer still at it (and where that folder is on
    /// another filesystem, the staged inode is copied and unlinked: what the writer wrote next
    /// went into a deleted inode). A writer at work is what the inbox is for: it is given back.
    #[test]
    fn a_writer_resuming_during_a_copy_without_a_lease_is_given_back_not_failed() {
        let (d, dir) = staging();
        let p = d.path().join("a.staged");
        std::fs::write(&p, vec![7u8; 8 << 20]).unwrap();
        let mut writer = OpenOptions::new().append(true).open(&p).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = std::sync::Arc::clone(&stop);
        let t = std::thread::spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                writer.write_all(&[1u8; 512]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        let r = own(&dir, OsStr::new("a.staged"), false, false);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
        assert!(matches!(r, Err(Owning::StillWritten)), "{r:?}");
        assert!(p.exists(), "the user's inode keeps its staged name");
        assert!(!d.path().join("a.copy").exists());
        assert!(!d.path().join("a.orig").exists());
    }

    /// Review finding: a record owned again while its kept original is still there (the
    /// stuck-claim sweep after the journal refused the hash's result, or a rescan) met `X.orig`
    /// on the rename and failed "exists already": the file went to failed unscanned. The
    /// staged file is then our copy already, and the kept original stays as it was journaled.
    #[test]
    fn owning_again_beside_a_kept_original_keeps_it_and_does_not_fail() {
        let (d, dir) = staging();
        std::fs::write(d.path().join("a.staged"), b"the user's bytes").unwrap();
        let first = own(&dir, OsStr::new("a.staged"), false, false).unwrap();
        assert!(first.kept.is_some());
        let again = own(&dir, OsStr::new("a.staged"), false, false);
        let again = again.unwrap_or_else(|e| panic!("owned again: {e:?}"));
        assert_eq!(again.sha256, first.sha256);
        assert_eq!(
            std::fs::read(d.path().join("a.orig")).unwrap(),
            b"the user's bytes",
            "the kept original is untouched"
        );
        assert!(!d.path().join("a.copy").exists());
    }

    #[test]
    fn names_of_copies_and_originals() {
        assert_eq!(copy_name(OsStr::new("u.staged")), "u.copy");
        assert_eq!(orig_name(OsStr::new("u.staged")), "u.orig");
        assert_eq!(
            staged_name_of(OsStr::new("u.orig")),
            Some(OsString::from("u.staged"))
        );
        assert_eq!(staged_name_of(OsStr::new("u.staged")), None);
    }
}
