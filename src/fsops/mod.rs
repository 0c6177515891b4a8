//! fsops: the only place that touches users' files and the folders dropscan writes into.
//!
//! Everything here is synchronous (callers run it on the blocking pool) and written for two
//! properties:
//!
//! - **Nothing in an inbox can make us touch anything outside it.** Every path below a root (an
//!   inbox, its staging folder, a destination) is resolved beneath that root's directory
//!   descriptor without following symlinks ([`dir`]): `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS)`, or a component walk with `O_NOFOLLOW | O_DIRECTORY` where openat2 is
//!   missing. Files are opened with `O_NOFOLLOW | O_NONBLOCK` and judged by `fstat` of the open
//!   descriptor; renames, links, unlinks, mkdirs and chmods act on descriptors.
//! - **At every instant a file exists whole in at least one place** ([`place`]): moves never
//!   replace, folders are fsynced after every rename, and a copy (across filesystems, or to
//!   release a file someone still holds open) is verified and made durable before the original
//!   is removed.
//!
//! One "same file" predicate ([`same_file`]) is used by every stage that asks whether a file is
//! still the one it saw: device, inode, size, mtime and ctime must all match.

mod buffers;
pub mod claim;
mod deferred;
pub mod dest;
pub mod dir;
pub mod fstype;
pub mod lease;
pub mod names;
pub mod own;
mod owner;
pub mod place;
pub mod roots;
mod staging_lock;
mod syncgate;
mod temps;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use dir::{
    Dir, Renamed, probe_safe_move, rename_noreplace, rename_noreplace_unsynced, split_rel,
};
pub use names::{Shown, safe_relative, shown};

#[cfg(test)]
pub(crate) use buffers::BUF;
pub(crate) use buffers::with_buffer;

/// Runs filesystem work on the blocking pool. A task that panicked or was cancelled is an
/// [`FsError::Task`] keeping the `JoinError` as its source: never mistaken for an answer of the
/// filesystem (a changed or unreadable file).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, FsError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|source| Err(FsError::Task { source }))
}

/// A filesystem failure, with the path and advice in its message.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Not a regular file (never opened for reading).
    #[error("{}: not a regular file but a {kind}; skipped", shown(path))]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// symlink, fifo, socket, device, directory.
        kind: &'static str,
    },
    /// A staged file dropscan's user cannot read, bound for a failed folder on another
    /// filesystem: it can be neither renamed there nor copied.
    #[error(
        "{}: cannot open for reading: {source} (not readable by the dropscan user), and the failed \
         folder is on another filesystem, so it cannot be moved there without reading it",
        shown(path)
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A regular file with more than one link.
    #[error(
        "{}: has {nlink} hard links; refused (it could expose a file from outside the inbox)",
        shown(path)
    )]
    HardLinked {
        /// The path.
        path: PathBuf,
        /// Its link count.
        nlink: u64,
    },
    /// A path that would leave its root (`..`, absolute) or crossed a mount point it may not.
    #[error("{}: not beneath its root; refused", shown(path))]
    NotBeneath {
        /// The path.
        path: PathBuf,
    },
    /// The file is gone.
    #[error("{}: vanished", shown(path))]
    Vanished {
        /// The path.
        path: PathBuf,
    },
    /// The file changed while we worked on it.
    #[error("{}: {detail}", shown(path))]
    Changed {
        /// The path.
        path: PathBuf,
        /// What changed.
        detail: String,
    },
    /// The filesystem can move a file neither without replacing what is at the target
    /// (`RENAME_NOREPLACE`) nor by a hard link: an SMB client mount (FUSE `smbnetfs`, for one).
    /// A claim or a placement there could replace another file, so none is made.
    #[error(
        "{}: this filesystem cannot move a file without risking to replace another (rename \
         without replace: {noreplace}; hard link: {link}), so dropscan cannot claim or place \
         files there safely (an SMB client mount?): run dropscan on the file server itself, with \
         the shared folder as its inbox (README: \"Deploying on a file server or NAS\")",
        shown(path)
    )]
    NoSafeMove {
        /// The target folder.
        path: PathBuf,
        /// What `renameat2(RENAME_NOREPLACE)` answered.
        noreplace: io::Error,
        /// What `linkat` answered.
        link: io::Error,
    },
    /// A target given as a folder (with a trailing slash, as `cp` reads it) that is not one.
    #[error(
        "{}: no such folder (a trailing slash names a folder, as with cp): create it first, or \
         drop the slash to name the file",
        shown(path)
    )]
    NotAFolder {
        /// The target as given.
        path: PathBuf,
    },
    /// The target name exists already (moves never replace).
    #[error("{}: exists already", shown(path))]
    AlreadyExists {
        /// The target.
        path: PathBuf,
    },
    /// No space left (or quota exceeded).
    #[error(
        "{}: destination full ({source}); the file stays in staging and the move is retried",
        shown(path)
    )]
    NoSpace {
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A staging folder (or a folder above it in the inbox) that is not dropscan's own.
    #[error(
        "{}: belongs to uid {uid} with mode {mode:o}; a staging folder must belong to the dropscan \
         user and be writable by nobody else (someone may have replaced it): refused",
        shown(path)
    )]
    NotPrivate {
        /// The folder.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its mode.
        mode: u32,
    },
    /// A destination folder that others control (or could rename away): see [`dest`].
    #[error(transparent)]
    UnsafeDestination(Box<dest::Refusal>),
    /// Another placement of the same file is in progress (it holds the lock).
    #[error(
        "{}: another placement of this file is in progress; retried later",
        shown(path)
    )]
    Busy {
        /// The locked file.
        path: PathBuf,
    },
    /// The staging folder belongs to another live agent.
    #[error(transparent)]
    Owner(Box<roots::OwnerConflict>),
    /// Another agent process on this host holds the staging folder's lock.
    #[error(
        "the staging folder {} is in use by another dropscan on this host ({holder}): two agents \
         must never share a staging folder; give each its own [server].sensor_instance_id",
        shown(staging)
    )]
    StagingInUse {
        /// The staging folder.
        staging: PathBuf,
        /// What the holder wrote into the lock (PID, host, working folder).
        holder: String,
    },
    /// The agent these folders belong to has stopped and let go of its staging folder: a task
    /// of it still running must not lock the folder again.
    #[error(
        "the staging folder {} was let go: this agent has stopped",
        shown(staging)
    )]
    StagingReleased {
        /// The staging folder.
        staging: PathBuf,
    },
    /// The blocking task doing the work panicked or was cancelled: nothing is known about
    /// what the filesystem did (see [`blocking`]).
    #[error("the blocking task failed: {source}")]
    Task {
        /// The task's failure.
        source: tokio::task::JoinError,
    },
    /// Any other I/O error.
    #[error("{}: cannot {about}: {source}{}", shown(path), advice(about, source))]
    Io {
        /// Where.
        path: PathBuf,
        /// What was being done.
        about: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Advice for an OS error, worded for what was being done: a file that cannot be opened for
/// reading is "not readable", a folder that cannot take a file is "not writable".
fn advice(about: &str, e: &io::Error) -> &'static str {
    let reading = about.contains("read") || about.contains("stat");
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) if reading => " (not readable by the dropscan user)",
        Some(libc::EACCES | libc::EPERM) => " (not writable by the dropscan user)",
        Some(libc::EROFS) => " (read-only filesystem)",
        Some(libc::EXDEV) => " (different filesystems)",
        _ => "",
    }
}

impl FsError {
    /// Classifies an OS error on `path`.
    pub fn io(path: &Path, about: &'static str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOENT) => FsError::Vanished {
                path: path.to_path_buf(),
            },
            Some(libc::EEXIST) => FsError::AlreadyExists {
                path: path.to_path_buf(),
            },
            Some(libc::ENOSPC | libc::EDQUOT) => FsError::NoSpace {
                path: path.to_path_buf(),
                source,
            },
            _ => FsError::Io {
                path: path.to_path_buf(),
                about,
                source,
            },
        }
    }

    /// Whether the failure means the source is gone.
    pub fn is_vanished(&self) -> bool {
        matches!(self, FsError::Vanished { .. })
    }

    /// Whether a destination folder disappeared under the move (never the file itself): the
    /// target is to be chosen again.
    pub fn is_folder_gone(&self) -> bool {
        matches!(self, FsError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOENT))
    }

    /// Whether the failure means the target exists.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, FsError::AlreadyExists { .. })
    }

    /// The same error, naming `path` (the user's original path) instead of the one it was found
    /// on (a staging name means nothing to the user).
    #[must_use]
    pub fn at(self, path: &Path) -> Self {
        let path = path.to_path_buf();
        match self {
            FsError::NotRegular { kind, .. } => FsError::NotRegular { path, kind },
            FsError::HardLinked { nlink, .. } => FsError::HardLinked { path, nlink },
            FsError::Unreadable { source, .. } => FsError::Unreadable { path, source },
            FsError::NotBeneath { .. } => FsError::NotBeneath { path },
            FsError::Vanished { .. } => FsError::Vanished { path },
            FsError::Changed { detail, .. } => FsError::Changed { path, detail },
            FsError::AlreadyExists { .. } => FsError::AlreadyExists { path },
            FsError::NoSpace { source, .. } => FsError::NoSpace { path, source },
            FsError::Owner(o) => FsError::Owner(o),
            FsError::StagingInUse { staging, holder } => FsError::StagingInUse { staging, holder },
            FsError::Busy { .. } => FsError::Busy { path },
            // About a folder, not the file: kept as it is.
            e @ (FsError::UnsafeDestination(_)
            | FsError::NoSafeMove { .. }
            | FsError::StagingReleased { .. }
            | FsError::NotAFolder { .. }) => e,
            // About no path at all.
            e @ FsError::Task { .. } => e,
            FsError::NotPrivate { uid, mode, .. } => FsError::NotPrivate { path, uid, mode },
            FsError::Io { about, source, .. } => FsError::Io {
                path,
                about,
                source,
            },
        }
    }
}

/// Identity, type and change stamp of a file, as `fstat`/`lstat` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch.
    pub ctime_ns: i64,
    /// Link count.
    pub nlink: u64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
}

impl FileStamp {
    /// The stamp of a `stat` result.
    pub fn from_stat(st: &rustix::fs::Stat) -> Self {
        FileStamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: epoch_ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: epoch_ns(st.st_ctime, st.st_ctime_nsec),
            nlink: st.st_nlink,
            mode: st.st_mode,
            uid: st.st_uid,
        }
    }

    /// The stamp of `std` metadata.
    pub fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: epoch_ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: epoch_ns(m.ctime(), m.ctime_nsec()),
            nlink: m.nlink(),
            mode: m.mode(),
            uid: m.uid(),
        }
    }

    /// Whether it is a regular file.
    pub fn is_regular(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }

    /// Whether it is a folder.
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    /// The kind of file, for messages.
    pub fn kind(&self) -> &'static str {
        kind_of_mode(self.mode)
    }

    /// The "same file" part of the stamp: what settle watches, claim checks and the journal keeps.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            size: self.size,
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
            dev: self.dev,
            ino: self.ino,
        }
    }
}

/// Size, identity and change times of a file: the one stamp every stage compares with
/// [`same_file`] (settle while waiting for quiet, claim against what settled, upload and
/// placement against what was hashed) and the journal stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch.
    pub ctime_ns: i64,
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
}

impl Stamp {
    /// The stamp of `std` metadata (`symlink_metadata` for a path not to follow).
    pub fn of(m: &std::fs::Metadata) -> Self {
        FileStamp::of(m).stamp()
    }
}

/// Seconds and nanoseconds since the epoch as one count of nanoseconds. An i64 holds them until
/// the year 2262; a time beyond saturates (and so still compares equal to itself).
fn epoch_ns(secs: impl Into<i128>, nsec: impl Into<i128>) -> i64 {
    let ns = secs.into() * 1_000_000_000 + nsec.into();
    i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
}

/// **The** "same file" predicate: `now` is the file `then` described, unchanged (same device and
/// inode, same size, same mtime and ctime). Every stage that must know whether a file is still
/// the one it saw (claim against settle, upload and placement against the hash) asks this.
pub fn same_file(then: &Stamp, now: &Stamp) -> bool {
    then.dev == now.dev
        && then.ino == now.ino
        && then.size == now.size
        && then.mtime_ns == now.mtime_ns
        && then.ctime_ns == now.ctime_ns
}

/// The kind of file a `st_mode` says, for messages.
pub fn kind_of_mode(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFBLK => "block device",
        libc::S_IFCHR => "character device",
        _ => "other",
    }
}

/// The kind of a non-regular file, for messages.
pub fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_file() {
        "regular file"
    } else {
        "other"
    }
}

/// The stamp of an open file.
pub fn stamp_of(file: &File) -> Result<FileStamp, FsError> {
    file.metadata()
        .map(|m| FileStamp::of(&m))
        .map_err(|e| FsError::io(Path::new("(open file)"), "stat", e))
}

/// A file's access and modification times, as read before a copy of it is made: a release
/// keeps the dates of the file the user dropped (`rsync -a`, `cp -p` and sync jobs rely on them).
pub(crate) fn times_of(file: &File) -> Result<rustix::fs::Timestamps, FsError> {
    let st = rustix::fs::fstat(file)
        .map_err(|e| FsError::io(Path::new("(open file)"), "stat", io::Error::from(e)))?;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::useless_conversion
    )]
    let at = |sec: i64, nsec| rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    Ok(rustix::fs::Timestamps {
        last_access: at(st.st_atime, st.st_atime_nsec),
        last_modification: at(st.st_mtime, st.st_mtime_nsec),
    })
}

/// Gives the copy `to` the times [`times_of`] read from its source. A filesystem that refuses
/// (some FUSE mounts) costs the dates, never the file: logged, not an error.
pub(crate) fn keep_times(to: &File, times: &rustix::fs::Timestamps, path: &Path) {
    if let Err(e) = rustix::fs::futimens(to, times) {
        tracing::warn!(path = %shown(path), error = %e, "could not keep the file's dates on its copy");
    }
}

/// Streaming SHA-256 of an open file from its current position (constant memory).
pub fn sha256_file(file: &mut File) -> Result<([u8; 32], u64), FsError> {
    with_buffer(|buf| sha256_with(file, buf))
}

fn sha256_with(file: &mut File, buf: &mut [u8]) -> Result<([u8; 32], u64), FsError> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FsError::io(Path::new("(open file)"), "read", e)),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().into(), total))
}
