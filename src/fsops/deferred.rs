//! The folder fsyncs of a batch of placements, done once per folder after all the batch's
//! renames (see `place::place_deferred`).

use std::path::PathBuf;

use super::Dir;

/// The renames of a batch of placements (`place::place_deferred`) whose folders are still to be
/// fsynced.
#[derive(Default)]
pub struct Deferred {
    /// The destination folders renamed into, each once (with its device and inode, if known).
    dirs: Vec<(Dir, Option<(u64, u64)>)>,
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
        // The same folder, not the same path: a folder moved away and made again at its path
        // meanwhile (a user collecting placed files, another placement) is another folder, and
        // the renames into each are made durable by fsyncing each. Unknown: fsynced again.
        let id = tdir.identity().ok();
        if id.is_none() || !self.dirs.iter().any(|(_, d)| *d == id) {
            self.dirs.push((tdir, id));
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
        for d in self
            .dirs
            .iter()
            .map(|(d, _)| d)
            .chain(std::iter::once(staging))
        {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A destination folder replaced at the same path during a batch (moved away by a user who
    /// collects the placed files, then made again by another placement): the renames into the
    /// new folder are made durable too, not only those into the one moved away.
    #[test]
    fn a_destination_folder_replaced_mid_batch_is_fsynced_too() {
        let t = tempfile::tempdir().unwrap();
        let root = Dir::open_trusted(t.path()).unwrap();
        std::fs::create_dir(t.path().join("p")).unwrap();
        std::fs::write(t.path().join("a"), b"a").unwrap();
        std::fs::write(t.path().join("b"), b"b").unwrap();
        let first = root.open_dir(std::path::Path::new("p")).unwrap();
        #[allow(clippy::disallowed_methods)]
        std::fs::rename(t.path().join("p"), t.path().join("collected")).unwrap();
        std::fs::create_dir(t.path().join("p")).unwrap();
        let second = root.open_dir(std::path::Path::new("p")).unwrap();
        assert_eq!(first.path(), second.path());
        let mut batch = Deferred::default();
        for (dir, name) in [(first, "a"), (second, "b")] {
            let file = std::fs::File::open(t.path().join(name)).unwrap();
            let path = dir.path().join(name);
            batch.renamed(dir, file, path, None);
        }
        assert_eq!(batch.dirs.len(), 2, "the new folder is never fsynced");
    }
}
