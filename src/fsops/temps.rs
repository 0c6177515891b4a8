//! Copy temps found at start-up ([`leftover_temps`]): removed when partial ([`remove_temp`]), or
//! taken back into staging when they are the only copy of a file ([`take_back`]). What decides
//! is the caller's (`app::leftovers`); this is the filesystem side.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;

use super::names::{PARTIAL_SUFFIX, Temp, parse_temp_name};
use super::place::lock;
use super::{Dir, FsError, rename_noreplace};

/// This instance's leftover copy temps at the top of `dest_root`, found at start-up, each with
/// what its name says; a temp locked right now (a tool's placement still running) is not
/// listed. Sidecar temps, anywhere below the root, are removed (never the only copy of anything,
/// and logged). Links and other agents' or users' files are never touched. What becomes of each
/// copy temp is the caller's decision ([`remove_temp`] for a partial, [`take_back`] for a whole
/// copy): a temp whose staged file is gone may be the only copy of the file.
pub fn leftover_temps(dest_root: &Dir, instance: &str) -> Vec<(OsString, Temp)> {
    let mut found = Vec::new();
    let mut stack = match dest_root.try_clone() {
        Ok(d) => vec![(d, true)],
        Err(_) => return found,
    };
    while let Some((dir, top)) = stack.pop() {
        let Ok(entries) = dir.entries() else { continue };
        for (name, st) in entries {
            if st.is_dir() {
                if let Ok(sub) = dir.open_dir(Path::new(&name)) {
                    stack.push((sub, false));
                }
                continue;
            }
            if !st.is_regular() {
                continue;
            }
            let temp = match parse_temp_name(&name, instance) {
                Some(Temp::Sidecar) => {
                    remove_temp(&dir, &name, "a sidecar left half-written");
                    continue;
                }
                Some(t) if top => t,
                _ => continue,
            };
            // A temp locked right now is being written by a placement that is still running
            // (a quarantine tool's release beside a starting agent): never taken from under it.
            let free = dir
                .open_file(&name)
                .and_then(|(f, _)| lock(&f, &dir.path().join(&name)));
            if free.is_ok() {
                found.push((name, temp));
            }
        }
    }
    found
}

/// Removes one of our temps, unless a placement holds it locked; logged either way, since a
/// removal must never go unseen. Returns whether it was removed.
pub fn remove_temp(dir: &Dir, name: &OsStr, why: &str) -> bool {
    let path = dir.path().join(name);
    let held = dir
        .open_file(name)
        .and_then(|(f, _)| lock(&f, &path).map(|()| f));
    let removed = held.and_then(|_held| {
        dir.unlink(name)?;
        dir.fsync()
    });
    match removed {
        Ok(()) => {
            tracing::info!(path = %super::shown(&path), why, "removed a leftover temp");
            true
        }
        Err(e) => {
            tracing::warn!(path = %super::shown(&path), why, error = %e, "cannot remove a leftover temp; left there");
            false
        }
    }
}

/// Takes a whole copy left in a temp (its staged file gone: the only copy of a file) back into
/// `staging` as `fresh`, the staged name of a record the caller journaled first. Crash-safe in
/// every step: the temp is first renamed (in place) to the temp name of the new record
/// (`fresh_temp`), so that once `fresh` exists in staging the temp is known for a partial copy
/// of it; then it is renamed into staging, or on another filesystem copied there
/// (`<fresh>.dropscan-partial`, fsync, no-replace rename to `fresh`, fsync) and removed.
pub fn take_back(
    dest_root: &Dir,
    temp: &OsStr,
    fresh_temp: &OsStr,
    staging: &Dir,
    fresh: &OsStr,
) -> Result<(), FsError> {
    let temp_path = dest_root.path().join(temp);
    let (_held, _) = dest_root.open_file(temp)?;
    lock(&_held, &temp_path)?;
    rename_noreplace(dest_root, temp, dest_root, fresh_temp)?;
    match rename_noreplace(dest_root, fresh_temp, staging, fresh) {
        Ok(_) => return Ok(()),
        Err(FsError::Io { ref source, .. }) if source.raw_os_error() == Some(libc::EXDEV) => {}
        Err(e) => return Err(e),
    }
    let mut part = fresh.to_os_string();
    part.push(PARTIAL_SUFFIX);
    let part_path = staging.path().join(&part);
    let copied = (|| {
        let (src, _) = dest_root.open_file(fresh_temp)?;
        let mut dst = staging.create_file(&part, 0o600)?;
        super::own::copy_hashing(&src, &mut dst, None, (staging, &part), None)?
            .ok_or_else(|| FsError::io(&part_path, "copy", io::Error::other("interrupted")))?;
        dst.sync_all()
            .map_err(|e| FsError::io(&part_path, "fsync", e))?;
        rename_noreplace(staging, &part, staging, fresh)?;
        staging.fsync()
    })();
    if let Err(e) = copied {
        staging.unlink(&part).ok();
        return Err(e);
    }
    dest_root.unlink(fresh_temp)?;
    dest_root.fsync()
}
