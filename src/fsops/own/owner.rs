//! One owning of a staged name at a time in the process (review 20).

use std::ffi::OsStr;

use super::Dir;

/// The staged files being owned now, process-wide ([`Owner`]).
static OWNING: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
/// Told each time an owning ends.
static OWNING_ENDED: std::sync::Condvar = std::sync::Condvar::new();

/// The one owning (or start-up repair) of a staged name in this process: taken before the names
/// `X.copy`, `X.orig` and `X.staged` are touched, and held until they are left as they are to
/// stay. A tee abandoned by a stop (a SIGHUP reload, its upload aborted after
/// `shutdown_grace`) runs on in its blocking thread while the next generation, in the same
/// process, unties its record and owns the file again: without this, the abandoned thread
/// renamed the new owning's `X.copy` over `X.staged`, and (originals kept) left the user's
/// inode as an unjournaled `X.orig`, released again as a second file at the next start
/// (review 20).
pub(super) struct Owner(std::path::PathBuf);

impl Owner {
    /// Waits (blocking) until no other owning of `staging`/`name` runs here, then takes it.
    pub(super) fn take(staging: &Dir, name: &OsStr) -> Owner {
        let path = staging.path().join(name);
        let mut owning = OWNING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while owning.contains(&path) {
            owning = OWNING_ENDED
                .wait(owning)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        owning.push(path.clone());
        Owner(path)
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let mut owning = OWNING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        owning.retain(|p| *p != self.0);
        OWNING_ENDED.notify_all();
    }
}
