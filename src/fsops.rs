//! fsops: the only place that renames, fsyncs folders and opens users' files.
//!
//! Everything here is synchronous (callers run it on the blocking pool) and written for one
//! property: **at every instant a file exists whole in at least one place**, and nothing in the
//! inbox can make us touch anything outside it.
//!
//! - Users' files are opened with `O_NOFOLLOW | O_NONBLOCK`: a symlink in the last component is
//!   refused instead of followed, and a FIFO swapped in at the last moment cannot block us. The
//!   open file is then checked with `fstat`: it must be a regular file with one link (a hard link
//!   could expose a file from outside the inbox).
//! - Moves never replace: `renameat2(RENAME_NOREPLACE)`, or `link` + `unlink` where the filesystem
//!   lacks it (both fail on an existing target). The parent folders are fsynced after every move:
//!   a rename is durable only once its directory entry is.
//! - Across filesystems a move is copy to a hidden temp name → fsync → verify SHA-256 → rename
//!   (no replace) → fsync folder → unlink the source → fsync its folder. A crash leaves either the
//!   source alone, or the source plus a partial temp (removed by [`remove_partials`] at start-up),
//!   or the source plus the complete target (the caller, which journaled the target first, then
//!   removes the source).
//! - Relative paths from users' file names are made safe before they are joined under a folder:
//!   no absolute paths, no `..`, no empty components.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::RenameFlags;
use sha2::{Digest, Sha256};

/// Suffix of the temp file of a cross-filesystem copy.
pub const PARTIAL_SUFFIX: &str = ".dropscan-partial";
/// Suffix of a sidecar.
pub const SIDECAR_SUFFIX: &str = ".dropscan.json";
/// Numbered names tried before giving up on a free name.
const MAX_NUMBERED: u32 = 10_000;
/// Read buffer for hashing and copying.
const BUF: usize = 1 << 20;

/// A filesystem failure, with the path and advice in its message.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Not a regular file (never opened for reading).
    #[error("{}: not a regular file but a {kind}; skipped", path.display())]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// symlink, fifo, socket, device, directory.
        kind: &'static str,
    },
    /// A regular file with more than one link.
    #[error("{}: has {nlink} hard links; refused (it could expose a file from outside the inbox)", path.display())]
    HardLinked {
        /// The path.
        path: PathBuf,
        /// Its link count.
        nlink: u64,
    },
    /// The file is gone.
    #[error("{}: vanished", path.display())]
    Vanished {
        /// The path.
        path: PathBuf,
    },
    /// The file changed while we worked on it.
    #[error("{}: {detail}", path.display())]
    Changed {
        /// The path.
        path: PathBuf,
        /// What changed.
        detail: String,
    },
    /// The target name exists already (moves never replace).
    #[error("{}: exists already", path.display())]
    AlreadyExists {
        /// The target.
        path: PathBuf,
    },
    /// No space left (or quota exceeded).
    #[error("{}: destination full ({source}); the file stays in staging and the move is retried", path.display())]
    NoSpace {
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Any other I/O error.
    #[error("{}: cannot {about}: {source}{}", path.display(), advice(source))]
    Io {
        /// Where.
        path: PathBuf,
        /// What was being done.
        about: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

fn advice(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => " (not writable by the dropscan user)",
        Some(libc::EROFS) => " (read-only filesystem)",
        Some(libc::EXDEV) => " (different filesystems)",
        _ => "",
    }
}

impl FsError {
    fn io(path: &Path, about: &'static str, source: io::Error) -> Self {
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

    /// Whether the problem is the destination's and may go away (full, read-only, not writable).
    pub fn is_transient(&self) -> bool {
        match self {
            FsError::NoSpace { .. } => true,
            FsError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::EIO | libc::ENOTDIR)
            ),
            _ => false,
        }
    }

    /// Whether the failure means the source is gone.
    pub fn is_vanished(&self) -> bool {
        matches!(self, FsError::Vanished { .. })
    }

    /// Whether the failure means the target exists.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, FsError::AlreadyExists { .. })
    }
}

/// Identity and change stamp of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// Status change time, ns since the epoch.
    pub ctime_ns: i128,
    /// Link count.
    pub nlink: u64,
}

impl FileStamp {
    /// The stamp of metadata.
    pub fn of(m: &std::fs::Metadata) -> Self {
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            nlink: m.nlink(),
        }
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

/// Opens a file for reading without following a symlink and without blocking on a FIFO, and
/// checks that it is a regular file with one link.
pub fn open_regular(path: &Path) -> Result<(File, FileStamp), FsError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // O_NOFOLLOW on a symlink.
            Some(libc::ELOOP) => FsError::NotRegular {
                path: path.to_path_buf(),
                kind: "symlink",
            },
            _ => FsError::io(path, "open", e),
        })?;
    let meta = file.metadata().map_err(|e| FsError::io(path, "stat", e))?;
    if !meta.file_type().is_file() {
        return Err(FsError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    if meta.nlink() > 1 {
        return Err(FsError::HardLinked {
            path: path.to_path_buf(),
            nlink: meta.nlink(),
        });
    }
    Ok((file, FileStamp::of(&meta)))
}

/// The stamp of an open file.
pub fn stamp_of(file: &File) -> Result<FileStamp, FsError> {
    file.metadata()
        .map(|m| FileStamp::of(&m))
        .map_err(|e| FsError::io(Path::new("(open file)"), "stat", e))
}

/// The stamp of a path without following a symlink; it must be a regular file.
pub fn lstamp(path: &Path) -> Result<FileStamp, FsError> {
    let m = std::fs::symlink_metadata(path).map_err(|e| FsError::io(path, "stat", e))?;
    if !m.file_type().is_file() {
        return Err(FsError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(m.file_type()),
        });
    }
    Ok(FileStamp::of(&m))
}

/// Streaming SHA-256 of an open file from its current position (constant memory).
pub fn sha256_file(file: &mut File) -> Result<([u8; 32], u64), FsError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
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

/// Fsyncs a folder so that the entries created or removed in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    let d = File::open(dir).map_err(|e| FsError::io(dir, "open folder", e))?;
    d.sync_all()
        .map_err(|e| FsError::io(dir, "fsync folder", e))
}

fn parent(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Moves `from` to `to` without ever replacing `to`, then fsyncs both folders.
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<(), FsError> {
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        RenameFlags::NOREPLACE,
    ) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            // No RENAME_NOREPLACE here (some network filesystems): link() never replaces either.
            std::fs::hard_link(from, to).map_err(|e| FsError::io(to, "link", e))?;
            std::fs::remove_file(from).map_err(|e| FsError::io(from, "unlink", e))?;
        }
        Err(e) => {
            let e = io::Error::from_raw_os_error(e.raw_os_error());
            // ENOENT names the source: the file we were moving is gone.
            let path = if e.raw_os_error() == Some(libc::ENOENT)
                && std::fs::symlink_metadata(from).is_ok()
            {
                to
            } else if e.raw_os_error() == Some(libc::ENOENT) {
                from
            } else {
                to
            };
            return Err(FsError::io(path, "rename", e));
        }
    }
    fsync_dir(parent(to))?;
    if parent(from) != parent(to) {
        fsync_dir(parent(from))?;
    }
    Ok(())
}

/// `mkdir -p`, giving new folders `mode` and fsyncing the parent of each.
pub fn create_dir_all_mode(dir: &Path, mode: u32) -> Result<(), FsError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = dir;
    while std::fs::symlink_metadata(cur).is_err() {
        missing.push(cur);
        match cur.parent() {
            Some(p) if !p.as_os_str().is_empty() => cur = p,
            _ => break,
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(mode).create(d) {
            Ok(()) => {
                // mkdir's mode is filtered by the umask: set it exactly.
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| FsError::io(d, "chmod folder", e))?;
                fsync_dir(parent(d))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(FsError::io(d, "create folder", e)),
        }
    }
    if !dir.is_dir() {
        return Err(FsError::io(
            dir,
            "create folder",
            io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (temp name, fsync, rename over, fsync folder).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    let mut tmp_name = OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_else(|| OsStr::new("file")));
    tmp_name.push(format!(
        ".{}{PARTIAL_SUFFIX}",
        uuid::Uuid::new_v4().simple()
    ));
    let tmp = parent(path).join(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| FsError::io(&tmp, "create", e))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| FsError::io(&tmp, "chmod", e))?;
        f.write_all(bytes)
            .map_err(|e| FsError::io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| FsError::io(&tmp, "fsync", e))?;
        rustix::fs::rename(&tmp, path).map_err(|e| {
            FsError::io(
                path,
                "rename",
                io::Error::from_raw_os_error(e.raw_os_error()),
            )
        })?;
        fsync_dir(parent(path))
    })();
    if result.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    result
}

/// Longest file name we place: room is left for ` (9999)` and `.dropscan.json` within the
/// 255 bytes most filesystems allow.
pub const MAX_PLACED_NAME: usize = 200;

/// Makes a relative path from a user's file name safe to join under a folder: root and prefix
/// components are dropped, `.` is dropped, `..` becomes `_..` (kept visible, never climbing), and
/// an empty result becomes `_`. The file name is shortened to [`MAX_PLACED_NAME`] bytes (keeping
/// a short extension), and a name ending like our own temp or sidecar files gets a `_` so that
/// nothing of ours can ever be mistaken for it.
pub fn safe_relative(rel: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => out.push("_.."),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    if out.as_os_str().is_empty() {
        out.push("_");
    }
    if let Some(name) = out.file_name() {
        let mut name = shorten(name.as_bytes());
        if name.ends_with(PARTIAL_SUFFIX.as_bytes()) || name.ends_with(SIDECAR_SUFFIX.as_bytes()) {
            name.push(b'_');
        }
        out.set_file_name(OsString::from_vec(name));
    }
    out
}

/// Cuts a name to [`MAX_PLACED_NAME`] bytes, keeping an extension of up to 16 bytes and never
/// splitting a UTF-8 character.
fn shorten(name: &[u8]) -> Vec<u8> {
    if name.len() <= MAX_PLACED_NAME {
        return name.to_vec();
    }
    let ext_at = name
        .iter()
        .rposition(|b| *b == b'.')
        .filter(|i| *i > 0 && name.len() - i <= 16)
        .unwrap_or(name.len());
    let ext = &name[ext_at..];
    let mut keep = MAX_PLACED_NAME - ext.len();
    if let Ok(s) = std::str::from_utf8(&name[..ext_at]) {
        while !s.is_char_boundary(keep) {
            keep -= 1;
        }
    }
    let mut out = name[..keep.min(ext_at)].to_vec();
    out.extend_from_slice(ext);
    out
}

/// `<placed>.dropscan.json`.
pub fn sidecar_path(placed: &Path) -> PathBuf {
    let mut name = placed.file_name().unwrap_or_default().to_os_string();
    name.push(SIDECAR_SUFFIX);
    placed.with_file_name(name)
}

/// `name (n).ext` for `name.ext` (n ≥ 1); the extension is the part after the last dot, unless
/// the name starts with its only dot.
fn numbered(name: &OsStr, n: u32) -> OsString {
    let bytes = name.as_bytes();
    let dot = bytes.iter().rposition(|b| *b == b'.').filter(|i| *i > 0);
    let (stem, ext) = match dot {
        Some(i) => (&bytes[..i], &bytes[i..]),
        None => (bytes, &b""[..]),
    };
    let mut out = stem.to_vec();
    out.extend_from_slice(format!(" ({n})").as_bytes());
    out.extend_from_slice(ext);
    OsString::from_vec(out)
}

/// A path under `dest_root` for `rel` that does not exist now (the folders are created with
/// `dir_mode`). The caller journals it, then moves with [`place_at`], which fails rather than
/// replace if someone took the name meanwhile.
pub fn free_name(dest_root: &Path, rel: &Path, dir_mode: u32) -> Result<PathBuf, FsError> {
    let rel = safe_relative(rel);
    let dir = real_folders(dest_root, rel.parent().unwrap_or(Path::new("")), dir_mode)?;
    let name = rel
        .file_name()
        .unwrap_or_else(|| OsStr::new("_"))
        .to_os_string();
    let target = dir.join(&name);
    let taken = |p: &Path| {
        std::fs::symlink_metadata(p).is_ok() || std::fs::symlink_metadata(sidecar_path(p)).is_ok()
    };
    if !taken(&target) {
        return Ok(target);
    }
    for n in 1..=MAX_NUMBERED {
        let candidate = dir.join(numbered(&name, n));
        if !taken(&candidate) {
            return Ok(candidate);
        }
    }
    Err(FsError::AlreadyExists { path: target })
}

/// Makes the folders of `rel_dir` below the (trusted, admin-configured) `dest_root`, never
/// walking through a symlink or a file that stands where a folder should be: someone with write
/// access to a destination could otherwise plant `sub -> /etc` and have a file placed there.
/// Such an entry is left alone and a numbered folder (`sub (1)`) is used beside it.
fn real_folders(dest_root: &Path, rel_dir: &Path, dir_mode: u32) -> Result<PathBuf, FsError> {
    create_dir_all_mode(dest_root, dir_mode)?;
    let mut dir = dest_root.to_path_buf();
    for comp in rel_dir.components() {
        let Component::Normal(name) = comp else {
            continue;
        };
        let mut n = 0;
        dir = loop {
            let candidate = if n == 0 {
                dir.join(name)
            } else {
                dir.join(numbered(name, n))
            };
            match std::fs::symlink_metadata(&candidate) {
                // `symlink_metadata` does not follow: a symlink is never `is_dir` here.
                Ok(m) if m.is_dir() => break candidate,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match std::fs::DirBuilder::new().mode(dir_mode).create(&candidate) {
                        Ok(()) => {
                            std::fs::set_permissions(
                                &candidate,
                                std::fs::Permissions::from_mode(dir_mode),
                            )
                            .map_err(|e| FsError::io(&candidate, "chmod folder", e))?;
                            fsync_dir(&dir)?;
                            break candidate;
                        }
                        // Made meanwhile by someone else: look at it again.
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(FsError::io(&candidate, "create folder", e)),
                    }
                }
                Err(e) => return Err(FsError::io(&candidate, "stat", e)),
            }
            n += 1;
            if n > MAX_NUMBERED {
                return Err(FsError::AlreadyExists { path: candidate });
            }
        };
    }
    Ok(dir)
}

/// Makes sure `dir` is a real folder all the way down from `base` (trusted): every component
/// below `base` must be a folder, not a symlink or a file; missing ones are made with `mode`. For
/// the staging folder, which lives inside an inbox that users can write to: a `.dropscan`
/// replaced by a symlink must not redirect claimed files elsewhere.
pub fn ensure_real_dir(base: &Path, dir: &Path, mode: u32) -> Result<(), FsError> {
    let rel = dir.strip_prefix(base).unwrap_or(dir);
    let mut cur = if rel == dir {
        PathBuf::from("/")
    } else {
        base.to_path_buf()
    };
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            continue;
        };
        let next = cur.join(name);
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                return Err(FsError::NotRegular {
                    path: next,
                    kind: if m.file_type().is_symlink() {
                        "symlink where a folder must be"
                    } else {
                        "file where a folder must be"
                    },
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match std::fs::DirBuilder::new().mode(mode).create(&next) {
                    Ok(()) => {
                        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(mode))
                            .map_err(|e| FsError::io(&next, "chmod folder", e))?;
                        fsync_dir(&cur)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(FsError::io(&next, "create folder", e)),
                }
            }
            Err(e) => return Err(FsError::io(&next, "stat", e)),
        }
        cur = next;
    }
    Ok(())
}

/// Options for a placement.
#[derive(Debug, Clone, Copy)]
pub struct PlaceOptions {
    /// Mode of the placed file (`Some(0o600)` for quarantine); `None` keeps it.
    pub file_mode: Option<u32>,
    /// Mode of folders created on the way.
    pub dir_mode: u32,
    /// SHA-256 the content must have after a cross-filesystem copy.
    pub expected_sha256: Option<[u8; 32]>,
}

/// Where a file was placed.
#[derive(Debug, Clone)]
pub struct Placed {
    /// The final path.
    pub path: PathBuf,
    /// A cross-filesystem copy was made.
    pub copied: bool,
}

/// Moves the staged file to exactly `target` (never replacing it): rename on the same
/// filesystem, copy + fsync + verify + rename + unlink across filesystems. The mode is set before
/// the file appears under its final name.
pub fn place_at(staged: &Path, target: &Path, opts: &PlaceOptions) -> Result<Placed, FsError> {
    create_dir_all_mode(parent(target), opts.dir_mode)?;
    if let Some(mode) = opts.file_mode {
        std::fs::set_permissions(staged, std::fs::Permissions::from_mode(mode))
            .map_err(|e| FsError::io(staged, "chmod", e))?;
    }
    match rename_noreplace(staged, target) {
        Ok(()) => Ok(Placed {
            path: target.to_path_buf(),
            copied: false,
        }),
        Err(FsError::Io { source, .. }) if source.raw_os_error() == Some(libc::EXDEV) => {
            copy_across(staged, target, opts)
        }
        Err(e) => Err(e),
    }
}

/// Places the staged file at a free name for `rel` under `dest_root` (see [`free_name`]).
pub fn place(
    staged: &Path,
    dest_root: &Path,
    rel: &Path,
    opts: &PlaceOptions,
) -> Result<Placed, FsError> {
    for _ in 0..16 {
        let target = free_name(dest_root, rel, opts.dir_mode)?;
        match place_at(staged, &target, opts) {
            Err(e) if e.is_already_exists() => continue,
            other => return other,
        }
    }
    Err(FsError::AlreadyExists {
        path: dest_root.join(rel),
    })
}

fn copy_across(staged: &Path, target: &Path, opts: &PlaceOptions) -> Result<Placed, FsError> {
    let (mut src, _) = open_regular(staged)?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(target.file_name().unwrap_or_default());
    tmp_name.push(PARTIAL_SUFFIX);
    let tmp = parent(target).join(tmp_name);
    let mode = opts.file_mode.unwrap_or(0o644);
    let result = (|| {
        std::fs::remove_file(&tmp).ok();
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| FsError::io(&tmp, "create", e))?;
        dst.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| FsError::io(&tmp, "chmod", e))?;
        io::copy(&mut src, &mut dst).map_err(|e| FsError::io(&tmp, "copy", e))?;
        dst.sync_all().map_err(|e| FsError::io(&tmp, "fsync", e))?;
        if let Some(expected) = opts.expected_sha256 {
            use std::io::Seek;
            dst.seek(io::SeekFrom::Start(0))
                .map_err(|e| FsError::io(&tmp, "seek", e))?;
            let (sha, _) = sha256_file(&mut dst)?;
            if sha != expected {
                return Err(FsError::Changed {
                    path: staged.to_path_buf(),
                    detail: "the copy's SHA-256 differs from the scanned content".into(),
                });
            }
        }
        rename_noreplace(&tmp, target)
    })();
    if let Err(e) = result {
        std::fs::remove_file(&tmp).ok();
        return Err(e);
    }
    std::fs::remove_file(staged).map_err(|e| FsError::io(staged, "unlink", e))?;
    fsync_dir(parent(staged))?;
    Ok(Placed {
        path: target.to_path_buf(),
        copied: true,
    })
}

/// After a crash between the two halves of a move (the target complete, the source not yet
/// removed): if `target` holds exactly the content `sha256`, removes `staged` and returns true.
/// A target with other content is someone else's file: nothing is touched, false.
pub fn finish_interrupted_move(
    staged: &Path,
    target: &Path,
    sha256: [u8; 32],
) -> Result<bool, FsError> {
    let (mut f, _) = match open_regular(target) {
        Ok(x) => x,
        // The link + unlink fallback leaves two links to one inode: that is ours too.
        Err(FsError::HardLinked { .. }) => {
            let a = lstamp(staged)?;
            let b = lstamp(target)?;
            if (a.dev, a.ino) != (b.dev, b.ino) {
                return Ok(false);
            }
            std::fs::remove_file(staged).map_err(|e| FsError::io(staged, "unlink", e))?;
            fsync_dir(parent(staged))?;
            return Ok(true);
        }
        Err(FsError::Vanished { .. } | FsError::NotRegular { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    let (sha, _) = sha256_file(&mut f)?;
    if sha != sha256 {
        return Ok(false);
    }
    std::fs::remove_file(staged).map_err(|e| FsError::io(staged, "unlink", e))?;
    fsync_dir(parent(staged))?;
    Ok(true)
}

/// Removes leftover partial copies (`*.dropscan-partial`) below `dir`, without following
/// symlinks. Returns how many were removed.
pub fn remove_partials(dir: &Path) -> usize {
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                // Ours are hidden (a leading dot); users' dotfiles are never placed.
                && e.file_name().as_bytes().starts_with(b".")
                && e.file_name()
                    .as_bytes()
                    .ends_with(PARTIAL_SUFFIX.as_bytes())
                && std::fs::remove_file(e.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_never_climbs() {
        assert_eq!(
            safe_relative(Path::new("../../etc/passwd")),
            PathBuf::from("_../_../etc/passwd")
        );
        assert_eq!(safe_relative(Path::new("/abs/x")), PathBuf::from("abs/x"));
        assert_eq!(safe_relative(Path::new("./a/./b")), PathBuf::from("a/b"));
        assert_eq!(safe_relative(Path::new("")), PathBuf::from("_"));
    }

    proptest::proptest! {
        /// Whatever the user's names, the joined path stays under the destination.
        #[test]
        fn safe_relative_always_stays_inside(parts in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::strategy::Just(b"..".to_vec()),
                proptest::strategy::Just(b".".to_vec()),
                proptest::strategy::Just(b"/".to_vec()),
                proptest::strategy::Just(Vec::new()),
                proptest::collection::vec(1u8..=255, 1..12),
            ],
            0..8,
        )) {
            let mut raw = Vec::new();
            for p in &parts {
                raw.extend_from_slice(p);
                raw.push(b'/');
            }
            let rel = PathBuf::from(OsString::from_vec(raw));
            let dest = Path::new("/dest");
            let joined = dest.join(safe_relative(&rel));
            proptest::prop_assert!(joined.starts_with(dest));
            proptest::prop_assert!(joined != dest);
            proptest::prop_assert!(!joined.components().any(|c| matches!(c, Component::ParentDir)));
        }
    }

    #[test]
    fn names_like_ours_and_overlong_names_are_made_safe() {
        assert_eq!(
            safe_relative(Path::new("a/x.dropscan-partial")),
            PathBuf::from("a/x.dropscan-partial_")
        );
        assert_eq!(
            safe_relative(Path::new("y.pdf.dropscan.json")),
            PathBuf::from("y.pdf.dropscan.json_")
        );
        let long = format!("{}.pdf", "ä".repeat(200));
        let safe = safe_relative(Path::new(&long));
        let name = safe.file_name().unwrap().to_str().expect("still UTF-8");
        assert!(name.len() <= MAX_PLACED_NAME, "{}", name.len());
        assert!(name.ends_with(".pdf"));
        // A user's visible file with our suffix is never removed as a leftover.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("user.dropscan-partial"), b"x").unwrap();
        std::fs::write(d.path().join(".ours.dropscan-partial"), b"x").unwrap();
        assert_eq!(remove_partials(d.path()), 1);
        assert!(d.path().join("user.dropscan-partial").exists());
    }

    #[test]
    fn a_planted_symlink_or_file_in_the_destination_is_walked_around() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("clean");
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dest.join("sub")).unwrap();
        std::fs::write(dest.join("file-here"), b"x").unwrap();
        let t = free_name(&dest, Path::new("sub/a.txt"), 0o755).unwrap();
        assert_eq!(t, dest.join("sub (1)/a.txt"));
        let t = free_name(&dest, Path::new("file-here/b.txt"), 0o755).unwrap();
        assert_eq!(t, dest.join("file-here (1)/b.txt"));
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn numbered_keeps_the_extension() {
        assert_eq!(
            numbered(OsStr::new("report.txt"), 1),
            OsString::from("report (1).txt")
        );
        assert_eq!(
            numbered(OsStr::new("archive.tar.gz"), 2),
            OsString::from("archive.tar (2).gz")
        );
        assert_eq!(
            numbered(OsStr::new("README"), 3),
            OsString::from("README (3)")
        );
        assert_eq!(
            numbered(OsStr::new(".bashrc"), 1),
            OsString::from(".bashrc (1)")
        );
    }

    #[test]
    fn open_regular_refuses_symlinks_fifos_dirs_and_hard_links() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        assert!(open_regular(&f).is_ok());
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(matches!(
            open_regular(&l),
            Err(FsError::NotRegular {
                kind: "symlink",
                ..
            })
        ));
        assert!(matches!(
            open_regular(d.path()),
            Err(FsError::NotRegular {
                kind: "directory",
                ..
            })
        ));
        let p = d.path().join("p");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&p)
                .status()
                .unwrap()
                .success()
        );
        assert!(matches!(
            open_regular(&p),
            Err(FsError::NotRegular { kind: "fifo", .. })
        ));
        let h = d.path().join("h");
        std::fs::hard_link(&f, &h).unwrap();
        assert!(matches!(
            open_regular(&f),
            Err(FsError::HardLinked { nlink: 2, .. })
        ));
        assert!(matches!(
            open_regular(&d.path().join("nope")),
            Err(FsError::Vanished { .. })
        ));
    }

    #[test]
    fn rename_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::write(&a, b"new").unwrap();
        std::fs::write(&b, b"old").unwrap();
        assert!(rename_noreplace(&a, &b).unwrap_err().is_already_exists());
        assert_eq!(std::fs::read(&b).unwrap(), b"old");
        assert!(
            rename_noreplace(&d.path().join("gone"), &d.path().join("c"))
                .unwrap_err()
                .is_vanished()
        );
    }

    #[test]
    fn place_picks_free_names_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("q");
        let opts = PlaceOptions {
            file_mode: Some(0o600),
            dir_mode: 0o700,
            expected_sha256: None,
        };
        for (i, content) in [b"one", b"two"].iter().enumerate() {
            let s = d.path().join(format!("s{i}"));
            std::fs::write(&s, content).unwrap();
            let placed = place(&s, &dest, Path::new("sub/x.bin"), &opts).unwrap();
            assert!(!s.exists());
            assert_eq!(std::fs::read(&placed.path).unwrap(), *content);
        }
        assert_eq!(std::fs::read(dest.join("sub/x (1).bin")).unwrap(), b"two");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dest.join("sub/x.bin")), 0o600);
        assert_eq!(mode(&dest.join("sub")), 0o700);
    }

    #[test]
    fn place_across_filesystems_copies_verifies_and_unlinks() {
        let src = tempfile::tempdir().unwrap();
        let Ok(dst) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("no /dev/shm here: cross-filesystem placement not exercised");
            return;
        };
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        if dev(src.path()) == dev(dst.path()) {
            eprintln!(
                "/dev/shm is on the same filesystem here: cross-filesystem placement not exercised"
            );
            return;
        }
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let sha: [u8; 32] = Sha256::digest(&data).into();
        let staged = src.path().join("staged");
        std::fs::write(&staged, &data).unwrap();
        // A wrong expected hash: nothing moves, no partial copy stays behind.
        let bad = PlaceOptions {
            file_mode: Some(0o600),
            dir_mode: 0o700,
            expected_sha256: Some([0; 32]),
        };
        let target = dst.path().join("q/a.bin");
        assert!(matches!(
            place_at(&staged, &target, &bad),
            Err(FsError::Changed { .. })
        ));
        assert!(staged.exists() && !target.exists());
        assert_eq!(remove_partials(dst.path()), 0);
        // The right one: copied, verified, source removed, mode set.
        let good = PlaceOptions {
            expected_sha256: Some(sha),
            ..bad
        };
        let placed = place_at(&staged, &target, &good).unwrap();
        assert!(placed.copied);
        assert!(!staged.exists());
        assert_eq!(std::fs::read(&target).unwrap(), data);
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn an_interrupted_move_is_finished_only_onto_our_own_bytes() {
        let d = tempfile::tempdir().unwrap();
        let staged = d.path().join("staged");
        let target = d.path().join("target");
        std::fs::write(&staged, b"ours").unwrap();
        let ours: [u8; 32] = Sha256::digest(b"ours").into();
        // Someone else's file under the chosen name: untouched.
        std::fs::write(&target, b"theirs").unwrap();
        assert!(!finish_interrupted_move(&staged, &target, ours).unwrap());
        assert!(staged.exists());
        // A complete copy of our bytes: the source goes.
        std::fs::write(&target, b"ours").unwrap();
        assert!(finish_interrupted_move(&staged, &target, ours).unwrap());
        assert!(!staged.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"ours");
        // link() done, unlink() not: one inode, two names.
        let t2 = d.path().join("t2");
        std::fs::write(&staged, b"ours").unwrap();
        std::fs::hard_link(&staged, &t2).unwrap();
        assert!(finish_interrupted_move(&staged, &t2, ours).unwrap());
        assert!(!staged.exists() && t2.exists());
    }

    #[test]
    fn sha256_matches_and_write_atomic_replaces() {
        let d = tempfile::tempdir().unwrap();
        for len in [0usize, 1, BUF + 1] {
            let p = d.path().join(format!("f{len}"));
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            std::fs::write(&p, &data).unwrap();
            let (mut f, _) = open_regular(&p).unwrap();
            let (sha, n) = sha256_file(&mut f).unwrap();
            assert_eq!(n, len as u64);
            assert_eq!(sha, <[u8; 32]>::from(Sha256::digest(&data)));
        }
        let p = d.path().join("side.json");
        write_atomic(&p, b"1", 0o600).unwrap();
        write_atomic(&p, b"22", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"22");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 4);
    }
}
