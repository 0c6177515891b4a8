//! The folder fsyncs of a batch of placements, done once per folder after all the batch's
//! renames (see `place::place_deferred`).

use std::path::PathBuf;

use super::Dir;

/// The renames of a batch of placements (`place::place_deferred`) whose folders are still to be
/// fsynced.
#[derive(Default)]
pub struct Deferred {
    /// The destination folders renamed into, each once.
    dirs: Vec<Dir>,
    /// Each file renamed: its descriptor (holding its lock), its new path, and the mode it is
    /// to get once durable.
    held: Vec<(std::fs::File, PathBuf, Option<u32>)>,
}

impl Deferred {
    pub(super) fn renamed(
        &mut self,
        tdir: Dir,
        file: std::fs::File,
        path: PathBuf,
        mode: Option<u32>,
    ) {
        if !self.dirs.iter().any(|d| d.path() == tdir.path()) {
            self.dirs.push(tdir);
        }
        self.held.push((file, path, mode));
    }

    /// Whether any rename is waiting for its fsyncs.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Makes the batch's renames durable, as `rename_noreplace` does for one: every
    /// destination folder once, then `staging` (the folder they were renamed from); then the
    /// modes (after the renames are durable, as for one file: a crash before leaves a file
    /// stricter, never looser) and the locks let go. Returns whether every fsync succeeded (a
    /// failure is logged; the renames happened either way, as for one file).
    pub fn finish(self, staging: &Dir) -> bool {
        if self.held.is_empty() {
            return true;
        }
        let mut synced = true;
        for d in self.dirs.iter().chain(std::iter::once(staging)) {
            if let Err(e) = d.fsync() {
                tracing::warn!(error = %e, "folder fsync failed after a batch of placements");
                synced = false;
            }
        }
        for (file, path, mode) in self.held {
            if let Some(m) = mode {
                if let Err(e) = rustix::fs::fchmod(&file, rustix::fs::Mode::from_raw_mode(m)) {
                    tracing::warn!(path = %super::shown(&path), error = %e, "placed, but its mode could not be set");
                }
            }
        }
        synced
    }
}
