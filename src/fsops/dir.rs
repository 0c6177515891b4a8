//! Folders as descriptors: every path below a root is resolved beneath that root's descriptor,
//! never through a symlink.
//!
//! A [`Dir`] is an open directory. The roots (an inbox, its staging folder, each destination) are
//! opened from the configuration; every further component is resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, or, where the kernel
//! lacks openat2 (before 5.6), by a walk that opens one component at a time with
//! `O_NOFOLLOW | O_DIRECTORY`. Files are then named by (folder descriptor, single name): renames,
//! links, unlinks, mkdirs, stats and opens act on descriptors, and modes are set with `fchmod` on
//! the opened object. There is no check-then-act on path strings: a folder swapped for a symlink
//! between two steps makes the next step fail, it never redirects it.
//!
//! What this module does not do: decide anything. It answers "what is there, beneath this root"
//! and performs single durable steps; [`super::place`] and the stages build on it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;

use super::{FileStamp, FsError};

/// An open folder and the path it was reached by (for messages only; never used to act).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// What a rename did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renamed {
    /// Moved, and the folders' entries are durable.
    Durable,
    /// Moved, but a folder fsync failed: the move happened (the caller must treat it so) and is
    /// durable only once a later fsync of that folder succeeds.
    NotSynced,
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Splits a relative path into its folder part and its last component. The last component must
/// be a plain name; `..`, `.` and absolute paths are refused (callers pass `safe_relative` or
/// journal paths, so this only catches bugs).
pub fn split_rel(rel: &Path) -> Result<(&Path, &OsStr), FsError> {
    check_relative(rel)?;
    let name = rel.file_name().ok_or_else(|| FsError::NotBeneath {
        path: rel.to_path_buf(),
    })?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    Ok((parent, name))
}

fn check_relative(rel: &Path) -> Result<(), FsError> {
    if rel.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(())
    } else {
        Err(FsError::NotBeneath {
            path: rel.to_path_buf(),
        })
    }
}

fn single(name: &OsStr) -> Result<&OsStr, FsError> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(FsError::NotBeneath {
            path: PathBuf::from(name),
        });
    }
    Ok(name)
}

impl Dir {
    /// Opens a folder named by the administrator's configuration. Its own path is trusted (the
    /// configuration is), so symlinks in it are the administrator's choice and followed; nothing
    /// below it ever is.
    pub fn open_trusted(path: &Path) -> Result<Dir, FsError> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::io(path, "open folder", errno_io(e)))?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path this folder was reached by, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Device and inode of the folder.
    pub fn identity(&self) -> Result<(u64, u64), FsError> {
        let st = rustix::fs::fstat(&self.fd)
            .map_err(|e| FsError::io(&self.path, "stat folder", errno_io(e)))?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Whether the folder has been removed since it was opened (its link count fell to 0).
    pub fn is_removed(&self) -> bool {
        rustix::fs::fstat(&self.fd).map_or(true, |st| st.st_nlink == 0)
    }

    /// Another descriptor for the same folder.
    pub fn try_clone(&self) -> Result<Dir, FsError> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| FsError::io(&self.path, "duplicate descriptor", e))?;
        Ok(Dir {
            fd,
            path: self.path.clone(),
        })
    }

    /// Opens the folder `rel` beneath this one without following any symlink. An empty `rel` is
    /// this folder.
    pub fn open_dir(&self, rel: &Path) -> Result<Dir, FsError> {
        check_relative(rel)?;
        if rel.as_os_str().is_empty() {
            return self.try_clone();
        }
        let full = self.path.join(rel);
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(&self.fd, rel, flags, Mode::empty(), resolve) {
            Ok(fd) => Ok(Dir { fd, path: full }),
            // No openat2 here (before Linux 5.6, or a seccomp filter that refuses it): the walk
            // gives the same guarantee one component at a time.
            Err(Errno::NOSYS | Errno::PERM) => self.walk(rel),
            Err(e) => Err(dir_error(&full, e)),
        }
    }

    /// The openat2-less walk: one component at a time, each with `O_NOFOLLOW | O_DIRECTORY`.
    fn walk(&self, rel: &Path) -> Result<Dir, FsError> {
        let mut cur = self.try_clone()?;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(FsError::NotBeneath {
                    path: rel.to_path_buf(),
                });
            };
            cur = cur.child_dir(name)?;
        }
        Ok(cur)
    }

    /// The openat2-less walk, for tests on machines that have openat2.
    #[cfg(test)]
    pub(crate) fn walk_for_test(&self, rel: &Path) -> Result<Dir, FsError> {
        self.walk(rel)
    }

    /// Opens the direct subfolder `name`, refusing a symlink or a file.
    fn child_dir(&self, name: &OsStr) -> Result<Dir, FsError> {
        let name = single(name)?;
        let full = self.path.join(name);
        rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map(|fd| Dir {
            fd,
            path: full.clone(),
        })
        .map_err(|e| dir_error(&full, e))
    }

    /// Makes the folders of `rel` beneath this one (each new one gets `mode`, set with `fchmod`
    /// on its own descriptor, and its parent is fsynced) and opens the last. A symlink or a file
    /// where a folder must be is an error, never followed.
    pub fn create_dirs(&self, rel: &Path, mode: u32) -> Result<Dir, FsError> {
        check_relative(rel)?;
        let mut cur = self.try_clone()?;
        for c in rel.components() {
            let Component::Normal(name) = c else { continue };
            cur = cur.child_dir_or_create(name, mode)?;
        }
        Ok(cur)
    }

    /// Opens the subfolder `name`, making it with `mode` when missing.
    pub fn child_dir_or_create(&self, name: &OsStr, mode: u32) -> Result<Dir, FsError> {
        let name = single(name)?;
        for _ in 0..8 {
            match self.child_dir(name) {
                Ok(d) => return Ok(d),
                Err(FsError::Vanished { .. }) => {}
                Err(e) => return Err(e),
            }
            match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
                Ok(()) => {
                    let d = self.child_dir(name)?;
                    // mkdir's mode is filtered by the umask: set it exactly, on the folder we
                    // made (a swap in between makes `child_dir` fail, never chmod elsewhere).
                    rustix::fs::fchmod(&d.fd, Mode::from_raw_mode(mode))
                        .map_err(|e| FsError::io(&d.path, "chmod folder", errno_io(e)))?;
                    self.fsync()?;
                    return Ok(d);
                }
                // Made meanwhile by someone else: look again.
                Err(Errno::EXIST) => {}
                Err(e) => {
                    return Err(FsError::io(
                        &self.path.join(name),
                        "create folder",
                        errno_io(e),
                    ));
                }
            }
        }
        Err(FsError::io(
            &self.path.join(name),
            "create folder",
            io::Error::other("it keeps appearing and disappearing"),
        ))
    }

    /// `lstat` of the entry `name` in this folder (a symlink is reported, never followed).
    pub fn stat(&self, name: &OsStr) -> Result<rustix::fs::Stat, FsError> {
        let name = single(name)?;
        rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::io(&self.path.join(name), "stat", errno_io(e)))
    }

    /// Whether an entry `name` exists (of any type).
    pub fn exists(&self, name: &OsStr) -> Result<bool, FsError> {
        match self.stat(name) {
            Ok(_) => Ok(true),
            Err(FsError::Vanished { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The stamp of a regular file `name` in this folder, without following a symlink.
    pub fn stamp(&self, name: &OsStr) -> Result<FileStamp, FsError> {
        let st = self.stat(name)?;
        let stamp = FileStamp::from_stat(&st);
        if !stamp.is_regular() {
            return Err(FsError::NotRegular {
                path: self.path.join(name),
                kind: stamp.kind(),
            });
        }
        Ok(stamp)
    }

    /// Opens the regular file `name` for reading, without following a symlink and without
    /// blocking on a FIFO; checks its type on the open descriptor. Hard links are the caller's
    /// business (the stamp has `nlink`).
    pub fn open_file(&self, name: &OsStr) -> Result<(File, FileStamp), FsError> {
        let name = single(name)?;
        let full = self.path.join(name);
        let flags =
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        // Reading must not move the access time that a release keeps (the README's promise):
        // under `relatime` the first read of dropscan's private copy (its upload) set it to now.
        // `O_NOATIME` is for the file's owner (dropscan's own copies) or CAP_FOWNER; anyone
        // else's file is opened without it.
        let fd = rustix::fs::openat(&self.fd, name, flags | OFlags::NOATIME, Mode::empty())
            .or_else(|e| match e {
                Errno::PERM => rustix::fs::openat(&self.fd, name, flags, Mode::empty()),
                e => Err(e),
            })
            .map_err(|e| match e {
                Errno::LOOP => FsError::NotRegular {
                    path: full.clone(),
                    kind: "symlink",
                },
                e => FsError::io(&full, "open for reading", errno_io(e)),
            })?;
        let st = rustix::fs::fstat(&fd).map_err(|e| FsError::io(&full, "stat", errno_io(e)))?;
        let stamp = FileStamp::from_stat(&st);
        if !stamp.is_regular() {
            return Err(FsError::NotRegular {
                path: full,
                kind: stamp.kind(),
            });
        }
        Ok((File::from(fd), stamp))
    }

    /// Creates the new file `name` (never an existing one, never through a symlink) with `mode`
    /// set exactly on its descriptor, open for reading and writing.
    pub fn create_file(&self, name: &OsStr, mode: u32) -> Result<File, FsError> {
        let name = single(name)?;
        let full = self.path.join(name);
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| FsError::io(&full, "create", errno_io(e)))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
            .map_err(|e| FsError::io(&full, "chmod", errno_io(e)))?;
        Ok(File::from(fd))
    }

    /// Removes the file `name` from this folder.
    pub fn unlink(&self, name: &OsStr) -> Result<(), FsError> {
        let name = single(name)?;
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
            .map_err(|e| FsError::io(&self.path.join(name), "remove", errno_io(e)))
    }

    /// Removes the folder `name` from this folder if it is empty: the kernel refuses
    /// (`ENOTEMPTY`) once anyone has put anything in it, so a folder someone writes into is
    /// never removed. Never follows a symlink (a symlink is not a folder: `ENOTDIR`).
    pub fn remove_empty_dir(&self, name: &OsStr) -> Result<(), FsError> {
        let name = single(name)?;
        rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)
            .map_err(|e| FsError::io(&self.path.join(name), "remove folder", errno_io(e)))
    }

    /// When the entry `name` was created (`statx` birth time, ns since the epoch), without
    /// following a symlink; `None` where the filesystem does not record it.
    pub fn birth_time_ns(&self, name: &OsStr) -> Option<i64> {
        let name = single(name).ok()?;
        let st = rustix::fs::statx(
            &self.fd,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
            rustix::fs::StatxFlags::BTIME,
        )
        .ok()?;
        if st.stx_mask & rustix::fs::StatxFlags::BTIME.bits() == 0 {
            return None;
        }
        st.stx_btime
            .tv_sec
            .checked_mul(1_000_000_000)?
            .checked_add(i64::from(st.stx_btime.tv_nsec))
    }

    /// Fsyncs the folder, making the entries created or removed in it durable.
    ///
    /// Concurrent calls for one folder share an fsync (group commit, see `syncgate`): each
    /// returns once an fsync that started after its call has completed.
    pub fn fsync(&self) -> Result<(), FsError> {
        let fail = |e: io::Error| FsError::io(&self.path, "fsync folder", e);
        let st = rustix::fs::fstat(&self.fd).map_err(|e| fail(errno_io(e)))?;
        super::syncgate::sync_shared(self.fd.as_fd(), st.st_dev, st.st_ino, |fd| {
            rustix::fs::fsync(fd).map_err(errno_io)
        })
        .map_err(fail)
    }

    /// The names in this folder (without `.` and `..`) with the type the folder reports
    /// (`d_type`, `Unknown` where the filesystem does not say).
    fn names(&self) -> Result<Vec<(OsString, rustix::fs::FileType)>, FsError> {
        let list_error = |e: Errno| FsError::io(&self.path, "list folder", errno_io(e));
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd).map_err(list_error)? {
            let entry = entry.map_err(list_error)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name != "." && name != ".." {
                out.push((name.to_os_string(), entry.file_type()));
            }
        }
        Ok(out)
    }

    /// The entries of this folder with their types as the folder reports them (a `statat`
    /// without following links only where the filesystem does not say): cheaper than
    /// [`Dir::entries`] for walking.
    pub fn entry_types(&self) -> Result<Vec<(OsString, rustix::fs::FileType)>, FsError> {
        let mut out = Vec::new();
        for (name, ft) in self.names()? {
            let ft = match ft {
                rustix::fs::FileType::Unknown => match self.stat(&name) {
                    Ok(st) => rustix::fs::FileType::from_raw_mode(st.st_mode),
                    Err(FsError::Vanished { .. }) => continue,
                    // One entry that cannot be looked at must not hide its neighbours.
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot stat a folder entry; skipped");
                        continue;
                    }
                },
                ft => ft,
            };
            out.push((name, ft));
        }
        Ok(out)
    }

    /// The entries of this folder: (name, stamp without following symlinks). Entries that vanish
    /// while listed are left out.
    pub fn entries(&self) -> Result<Vec<(OsString, FileStamp)>, FsError> {
        let mut out = Vec::new();
        for (name, _) in self.names()? {
            match self.stat(&name) {
                Ok(st) => out.push((name, FileStamp::from_stat(&st))),
                Err(FsError::Vanished { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

fn dir_error(full: &Path, e: Errno) -> FsError {
    match e {
        // RESOLVE_NO_SYMLINKS / O_NOFOLLOW met a symlink (ELOOP), or O_DIRECTORY met a symlink
        // or a file (ENOTDIR). Which one is looked up for the message only: nothing acts on it.
        Errno::LOOP | Errno::NOTDIR => FsError::NotRegular {
            path: full.to_path_buf(),
            kind: if e == Errno::LOOP
                || std::fs::symlink_metadata(full).is_ok_and(|m| m.file_type().is_symlink())
            {
                "symlink where a folder must be"
            } else {
                "file where a folder must be"
            },
        },
        // RESOLVE_BENEATH refused a path leaving the root.
        Errno::XDEV => FsError::NotBeneath {
            path: full.to_path_buf(),
        },
        e => FsError::io(full, "open folder", errno_io(e)),
    }
}

/// Moves `from_dir/from_name` to `to_dir/to_name` without ever replacing an existing entry, then
/// fsyncs both folders.
///
/// Where the filesystem has no `RENAME_NOREPLACE` (some network filesystems), `linkat` (which
/// never replaces either) and `unlinkat` stand in. Two agents may then both link the same source;
/// only one `unlinkat` of the source succeeds: the other removes its own link again and reports
/// the source gone, so the winner's file does not keep a stray second link.
pub fn rename_noreplace(
    from_dir: &Dir,
    from_name: &OsStr,
    to_dir: &Dir,
    to_name: &OsStr,
) -> Result<Renamed, FsError> {
    rename_noreplace_unsynced(from_dir, from_name, to_dir, to_name)?;
    let synced = to_dir.fsync().is_ok() & from_dir.fsync().is_ok();
    Ok(if synced {
        Renamed::Durable
    } else {
        Renamed::NotSynced
    })
}

/// [`rename_noreplace`] without the folder fsyncs: for a batch of renames that the caller
/// makes durable with one fsync per folder afterwards.
pub fn rename_noreplace_unsynced(
    from_dir: &Dir,
    from_name: &OsStr,
    to_dir: &Dir,
    to_name: &OsStr,
) -> Result<(), FsError> {
    let (from_name, to_name) = (single(from_name)?, single(to_name)?);
    let from_full = from_dir.path.join(from_name);
    let to_full = to_dir.path.join(to_name);
    match rustix::fs::renameat_with(
        &from_dir.fd,
        from_name,
        &to_dir.fd,
        to_name,
        RenameFlags::NOREPLACE,
    ) {
        Ok(()) => {}
        Err(Errno::INVAL | Errno::NOSYS) => {
            rustix::fs::linkat(
                &from_dir.fd,
                from_name,
                &to_dir.fd,
                to_name,
                AtFlags::empty(),
            )
            .map_err(|e| rename_error(from_dir, from_name, &from_full, &to_full, e))?;
            if let Err(e) = rustix::fs::unlinkat(&from_dir.fd, from_name, AtFlags::empty()) {
                // Someone else (another agent's link + unlink) took the source first: our link
                // is a second name for their file. Remove it again.
                rustix::fs::unlinkat(&to_dir.fd, to_name, AtFlags::empty()).ok();
                return Err(FsError::io(&from_full, "unlink after link", errno_io(e)));
            }
        }
        Err(e) => return Err(rename_error(from_dir, from_name, &from_full, &to_full, e)),
    }
    Ok(())
}

/// Whether files can be moved within `dir` without ever replacing another: renames
/// `from` (a file the caller just made, so its own) to `to` as [`rename_noreplace_unsynced`]
/// would. [`FsError::NoSafeMove`] where the filesystem has neither `RENAME_NOREPLACE` nor hard
/// links (an SMB client mount), so that the caller can refuse the folder with the reason rather
/// than fail every file.
pub fn probe_safe_move(dir: &Dir, from: &OsStr, to: &OsStr) -> Result<(), FsError> {
    let (from, to) = (single(from)?, single(to)?);
    let full = |n: &OsStr| dir.path.join(n);
    match rustix::fs::renameat_with(&dir.fd, from, &dir.fd, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(no_flag @ (Errno::INVAL | Errno::NOSYS)) => {
            match rustix::fs::linkat(&dir.fd, from, &dir.fd, to, AtFlags::empty()) {
                Ok(()) => rustix::fs::unlinkat(&dir.fd, from, AtFlags::empty())
                    .map_err(|e| FsError::io(&full(from), "unlink after link", errno_io(e))),
                // The file is the caller's own, so EPERM means no hard links on this
                // filesystem at all (not `protected_hardlinks`).
                Err(e @ (Errno::PERM | Errno::OPNOTSUPP | Errno::NOSYS)) => {
                    Err(FsError::NoSafeMove {
                        path: dir.path.clone(),
                        noreplace: errno_io(no_flag),
                        link: errno_io(e),
                    })
                }
                Err(e) => Err(FsError::io(&full(to), "link", errno_io(e))),
            }
        }
        Err(e) => Err(FsError::io(&full(to), "move into", errno_io(e))),
    }
}

/// ENOENT from a rename may be the source (gone) or the target's folder (removed meanwhile):
/// look at the source to tell which, so that a missing destination is never taken for a vanished
/// file.
fn rename_error(
    from_dir: &Dir,
    from_name: &OsStr,
    from_full: &Path,
    to_full: &Path,
    e: Errno,
) -> FsError {
    if e == Errno::NOENT {
        return match from_dir.exists(from_name) {
            Ok(false) => FsError::Vanished {
                path: from_full.to_path_buf(),
            },
            _ => FsError::Io {
                path: to_full.to_path_buf(),
                about: "move into (its folder was removed meanwhile)",
                source: errno_io(e),
            },
        };
    }
    FsError::io(to_full, "move into", errno_io(e))
}
