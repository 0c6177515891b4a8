//! Looking at a pending file, beneath its root and without following links: its stat on every
//! tick, and the open-writer probe (rule 3 of the completion rule, see the stage's docs) once it
//! is quiet.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use super::Settled;

/// A file stat result, for one tick.
pub(super) type Observation = (PathBuf, io::Result<crate::fsops::FileStamp>);

/// Folders opened beneath their roots during one stat pass, so that a thousand pending files
/// in one folder cost one resolution, not a thousand.
pub(super) type OpenFolders =
    HashMap<(PathBuf, PathBuf), Result<crate::fsops::Dir, (io::ErrorKind, String)>>;

/// The folder `parent` beneath the inbox `root`, opened once per pass.
fn folder<'f>(
    folders: &'f mut OpenFolders,
    root: &Path,
    parent: &Path,
) -> &'f Result<crate::fsops::Dir, (io::ErrorKind, String)> {
    folders
        .entry((root.to_path_buf(), parent.to_path_buf()))
        .or_insert_with(|| {
            crate::fsops::Dir::open_trusted(root)
                .and_then(|d| d.open_dir(parent))
                .map_err(|e| match e {
                    crate::fsops::FsError::Vanished { .. } => {
                        (io::ErrorKind::NotFound, e.to_string())
                    }
                    e => (io::ErrorKind::Other, e.to_string()),
                })
        })
}

/// `lstat` of `rel` beneath the inbox `root`: every folder on the way is resolved beneath the
/// root without following a symlink (a folder swapped for a link is an error, never followed),
/// then the last name is looked up in that folder through its descriptor (`fstatat` with
/// `AT_SYMLINK_NOFOLLOW`: no path through `/proc/self/fd`, whose lookup cost a tenth of the
/// agent's CPU with many small files, issue 20).
pub(super) fn stat_beneath(
    folders: &mut OpenFolders,
    root: &Path,
    rel: &Path,
) -> io::Result<crate::fsops::FileStamp> {
    let refused = |e: crate::fsops::FsError| match e {
        crate::fsops::FsError::Vanished { .. } => (io::ErrorKind::NotFound, e.to_string()),
        e => (io::ErrorKind::Other, e.to_string()),
    };
    let (parent, name) = crate::fsops::split_rel(rel).map_err(|e| {
        let (kind, text) = refused(e);
        io::Error::new(kind, text)
    })?;
    let dir = folder(folders, root, parent)
        .as_ref()
        .map_err(|(kind, text)| io::Error::new(*kind, text.clone()))?;
    rustix::fs::statat(dir.fd(), name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .map(|st| crate::fsops::FileStamp::from_stat(&st))
        .map_err(io::Error::from)
}

/// What the open-writer check found.
#[derive(Debug)]
pub(super) enum Probe {
    /// Nobody holds it open for writing.
    Free,
    /// Somebody does.
    HeldOpen,
    /// Leases cannot be had here.
    Unsupported(crate::fsops::lease::LeaseRefused),
    /// Not the file that settled any more (or gone, or not a regular file now).
    Changed,
    /// It cannot be opened for reading: it goes on, to be failed with that reason.
    Unreadable,
}

/// Rule 3 for one quiet file: opened beneath its root (read-only, no link followed, never
/// blocking on a FIFO), checked to be the inode that settled, then a read lease taken and given
/// back.
pub(super) fn probe_beneath(
    folders: &mut OpenFolders,
    root: &Path,
    s: &Settled,
    enabled: bool,
) -> Probe {
    use crate::fsops::lease::{self, LeaseRefused};
    let Ok((parent, name)) = crate::fsops::split_rel(&s.rel_path) else {
        return Probe::Changed;
    };
    let Ok(dir) = folder(folders, root, parent).as_ref() else {
        return Probe::Changed;
    };
    if let Err(refused) = lease::check_here(dir, enabled) {
        return Probe::Unsupported(refused);
    }
    let (file, now) = match dir.open_file(name) {
        Ok(x) => x,
        Err(crate::fsops::FsError::Vanished { .. } | crate::fsops::FsError::NotRegular { .. }) => {
            return Probe::Changed;
        }
        // Not readable by the service user: nothing can be asked, and the claim fails it with
        // that reason (it must not wait here for ever).
        Err(_) => return Probe::Unreadable,
    };
    if (now.dev, now.ino, now.size) != (s.stamp.dev, s.stamp.ino, s.stamp.size) {
        return Probe::Changed;
    }
    match lease::probe(&file) {
        Ok(()) => Probe::Free,
        Err(LeaseRefused::HeldOpen) => Probe::HeldOpen,
        Err(refused) => Probe::Unsupported(refused),
    }
}
