//! Tidying an inbox: what desktops and file-server clients leave behind once dropscan has taken
//! the files, and the subfolders dropscan emptied. Run from the agent's housekeeping, one pass
//! per watch about every minute, when the watch's `tidy_after` is not "off".
//!
//! Removed, each logged with its path, once unchanged (mtime and ctime) for `tidy_after`:
//! - `._X`, a macOS resource fork (AppleDouble, as Samba's `vfs_fruit` writes it), whose `X` is
//!   gone from its folder: its bytes were never a drop of their own, and a file dropped again
//!   under the same name must not inherit a stale fork;
//! - `~$X`, an Office owner file left by a crashed application, when no file of its folder ends
//!   as its name does (Word drops the first two characters of long names: `~$port.docx` belongs
//!   to `Report.docx`);
//! - desktop clutter (`.DS_Store`, `Thumbs.db`, `desktop.ini`, … see
//!   [`scope::is_clutter_name`]) in a folder that holds nothing else but such leftovers;
//! - a subfolder that is empty, that dropscan took a file from since the folder was created
//!   (the journal says so; a file taken from an earlier folder of the same name does not
//!   count), and that was created at most an hour (or `tidy_after`, if longer) before the first
//!   file dropscan took from it: a folder a client dropped along with its files. A folder that was there long before (a drop structure
//!   an administrator made, `inbox/alice/`) is kept, as is any folder whose filesystem does not
//!   record a creation time.
//!
//! Never removed: the inbox itself; anything in a dot-folder, a system folder
//! ([`scope::is_system_dir_name`]) or one of dropscan's own folders; a folder that is not empty
//! (the kernel refuses to remove it, so one that someone writes into since it was listed stays);
//! any other file, however old (a partial download, a dotfile: data for all dropscan knows).
//!
//! The decisions are pure functions of a folder's listing ([`leftovers`], [`prunable`]), tested
//! with tables; [`walk`] applies them through descriptors (no symlink is ever followed).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::WatchConfig;
use crate::fsops::{Dir, FileStamp, FsError, shown};
use crate::scope;

/// Folders looked at in one pass of one watch, at most (a huge tree is tidied over several
/// passes: folders are visited in a random order).
const MAX_FOLDERS: usize = 10_000;
/// Deepest folder looked at.
const MAX_DEPTH: usize = 64;
/// A folder created this long (or `tidy_after`, if longer) before the first file dropscan took
/// from it is a drop structure someone made, not a folder dropped with its files: kept.
const STRUCTURE_AGE: Duration = Duration::from_secs(3600);

/// One entry of a folder, as [`leftovers`] sees it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Its name.
    pub name: OsString,
    /// Its stamp (not following a symlink).
    pub stamp: FileStamp,
}

impl Entry {
    fn is_file(&self) -> bool {
        self.stamp.is_regular()
    }

    /// Unchanged (content and attributes) since `cutoff_ns`.
    fn old(&self, cutoff_ns: i64) -> bool {
        self.stamp.mtime_ns <= cutoff_ns && self.stamp.ctime_ns <= cutoff_ns
    }
}

/// What kind of leftover a name is, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leftover {
    /// `._X`: a resource fork.
    Fork,
    /// `~$X`: an Office owner file.
    Owner,
    /// `.DS_Store`, `Thumbs.db`, …: folder metadata of a desktop.
    Clutter,
}

impl Leftover {
    /// The kind of `name`.
    pub(crate) fn of(name: &OsStr) -> Option<Leftover> {
        let b = name.as_encoded_bytes();
        if b.eq_ignore_ascii_case(b".DS_Store") || scope::is_clutter_name(name) {
            Some(Leftover::Clutter)
        } else if b.len() > 2 && b.starts_with(b"._") {
            Some(Leftover::Fork)
        } else if b.len() > 2 && b.starts_with(b"~$") {
            Some(Leftover::Owner)
        } else {
            None
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Leftover::Fork => "resource fork of a file that is gone",
            Leftover::Owner => "Office owner file of a document that is gone",
            Leftover::Clutter => "desktop clutter in a folder that holds nothing else",
        }
    }
}

/// The leftovers of one folder to remove now, from its full listing: each orphaned (see the
/// module docs) and unchanged since `cutoff_ns`. Pure.
pub(crate) fn leftovers(entries: &[Entry], cutoff_ns: i64) -> Vec<(OsString, Leftover)> {
    let orphan = |e: &Entry, kind: Leftover| -> bool {
        let b = e.name.as_encoded_bytes();
        match kind {
            Leftover::Fork => {
                let data = &b[2..];
                !entries.iter().any(|o| o.name.as_encoded_bytes() == data)
            }
            Leftover::Owner => {
                let tail = &b[2..];
                !entries.iter().any(|o| {
                    let ob = o.name.as_encoded_bytes();
                    !ob.starts_with(b"~$") && ob.ends_with(tail)
                })
            }
            Leftover::Clutter => false,
        }
    };
    let mut out: Vec<(OsString, Leftover)> = entries
        .iter()
        .filter(|e| e.is_file() && e.old(cutoff_ns))
        .filter_map(|e| Leftover::of(&e.name).map(|k| (e, k)))
        .filter(|(e, k)| *k != Leftover::Clutter && orphan(e, *k))
        .map(|(e, k)| (e.name.clone(), k))
        .collect();
    // Clutter goes only with the folder's last other entry gone (or going now), and only if it
    // is old itself.
    let rest_goes = entries.iter().all(|e| {
        Leftover::of(&e.name) == Some(Leftover::Clutter) || out.iter().any(|(n, _)| *n == e.name)
    });
    if rest_goes {
        out.extend(
            entries
                .iter()
                .filter(|e| Leftover::of(&e.name) == Some(Leftover::Clutter))
                .filter(|e| e.is_file() && e.old(cutoff_ns))
                .map(|e| (e.name.clone(), Leftover::Clutter)),
        );
    }
    out
}

/// Whether an empty subfolder may be removed: unchanged since `cutoff_ns`, created (birth
/// time) no more than `window_ns` before the first file dropscan took from below it. Pure.
pub(crate) fn prunable(
    stamp: &FileStamp,
    born_ns: Option<i64>,
    first_taken_ns: Option<i64>,
    cutoff_ns: i64,
    window_ns: i64,
) -> bool {
    let quiet = stamp.mtime_ns <= cutoff_ns && stamp.ctime_ns <= cutoff_ns;
    match (born_ns, first_taken_ns) {
        (Some(born), Some(first)) => quiet && born >= first.saturating_sub(window_ns),
        _ => false,
    }
}

/// An empty subfolder found by a walk, for the caller to ask the journal about.
#[derive(Debug)]
pub(crate) struct EmptyFolder {
    /// Its path relative to the inbox.
    pub rel: PathBuf,
    /// Its stamp.
    pub stamp: FileStamp,
    /// Its creation time, where recorded.
    pub born_ns: Option<i64>,
}

/// One pass over the inbox `inbox` of watch `w`: removes the leftovers to remove now, and returns
/// the empty subfolders (deepest first) for [`prune`] to judge. Blocking.
pub(crate) fn walk(
    w: &WatchConfig,
    inbox: &Dir,
    after: Duration,
    now: SystemTime,
) -> Vec<EmptyFolder> {
    let cutoff = cutoff_ns(now, after);
    let mut empty = Vec::new();
    let mut stack: Vec<(PathBuf, usize)> = vec![(PathBuf::new(), 0)];
    let mut seen = 0usize;
    while let Some((rel, depth)) = stack.pop() {
        seen += 1;
        if seen > MAX_FOLDERS {
            break;
        }
        let dir = match inbox.open_dir(&rel) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "tidy: cannot open a folder; skipped");
                continue;
            }
        };
        let entries: Vec<Entry> = match dir.entries() {
            Ok(list) => list
                .into_iter()
                .map(|(name, stamp)| Entry { name, stamp })
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "tidy: cannot list a folder; skipped");
                continue;
            }
        };
        // dropscan's own folders (the staging folder, destinations inside the inbox, and the
        // folders holding them) do not keep a folder's clutter alive, nor count as its content.
        let own = |e: &Entry| {
            let full = w.path.join(&rel).join(&e.name);
            e.stamp.is_dir() && w.own_dirs().iter().any(|d| d.starts_with(&full))
        };
        let theirs: Vec<Entry> = entries.iter().filter(|e| !own(e)).cloned().collect();
        let gone = remove_leftovers(&dir, &theirs, cutoff);
        let left = entries.len() - gone;
        let pushed_from = stack.len();
        for e in &entries {
            if !e.stamp.is_dir() || !w.recursive || depth >= MAX_DEPTH {
                continue;
            }
            let child = rel.join(&e.name);
            let full = w.path.join(&child);
            let name = e.name.as_encoded_bytes();
            if name.starts_with(b".")
                || scope::is_system_dir_name(&e.name)
                || w.own_dirs()
                    .iter()
                    .any(|d| full == *d || d.starts_with(&full))
            {
                continue;
            }
            stack.push((child, depth + 1));
        }
        // Visited in a random order: a pass that stops at `MAX_FOLDERS` leaves another part of
        // a huge tree for the next pass, never the same one (planted empty folders listed first
        // cannot hide the rest for good).
        let children = stack.len() - pushed_from;
        if children > 1 {
            use rand::seq::SliceRandom as _;
            stack[pushed_from..].shuffle(&mut rand::rng());
        }
        if !rel.as_os_str().is_empty() && left == 0 {
            let parent = rel.parent().unwrap_or(Path::new(""));
            let name = rel.file_name().unwrap_or_default();
            let stamp = inbox
                .open_dir(parent)
                .and_then(|p| Ok((FileStamp::from_stat(&p.stat(name)?), p.birth_time_ns(name))));
            if let Ok((stamp, born_ns)) = stamp
                && stamp.is_dir()
            {
                empty.push(EmptyFolder {
                    rel: rel.clone(),
                    stamp,
                    born_ns,
                });
            }
        }
    }
    // Deepest first: a parent emptied by its child's removal is judged at a later pass (its
    // mtime moved, so it is young again anyway).
    empty.sort_by_key(|f| std::cmp::Reverse(f.rel.components().count()));
    empty
}

/// Removes `entries`' leftovers from `dir`; returns how many went.
fn remove_leftovers(dir: &Dir, entries: &[Entry], cutoff: i64) -> usize {
    let mut gone = 0;
    for (name, kind) in leftovers(entries, cutoff) {
        let path = dir.path().join(&name);
        // Looked at again just before: a leftover rewritten since the listing is young again.
        match dir.stamp(&name) {
            Ok(now) if now.is_regular() && now.mtime_ns <= cutoff && now.ctime_ns <= cutoff => {}
            _ => continue,
        }
        match dir.unlink(&name) {
            Ok(()) => {
                gone += 1;
                tracing::info!(path = %shown(&path), why = kind.describe(), "tidy: removed a leftover");
            }
            Err(FsError::Vanished { .. }) => gone += 1,
            Err(e) => tracing::warn!(error = %e, "tidy: could not remove a leftover"),
        }
    }
    gone
}

/// Removes the empty folder `f` of `inbox` if [`prunable`] with `first_taken_ns` (from the
/// journal). Returns whether it went.
pub(crate) fn prune(
    inbox: &Dir,
    f: &EmptyFolder,
    first_taken_ns: Option<i64>,
    after: Duration,
    now: SystemTime,
) -> bool {
    let window = i64::try_from(after.max(STRUCTURE_AGE).as_nanos()).unwrap_or(i64::MAX);
    if !prunable(
        &f.stamp,
        f.born_ns,
        first_taken_ns,
        cutoff_ns(now, after),
        window,
    ) {
        return false;
    }
    let parent = f.rel.parent().unwrap_or(Path::new(""));
    let Some(name) = f.rel.file_name() else {
        return false;
    };
    let removed = inbox.open_dir(parent).and_then(|p| {
        // Still the folder that was judged (not replaced meanwhile).
        let now = FileStamp::from_stat(&p.stat(name)?);
        if !now.is_dir()
            || (now.dev, now.ino, now.mtime_ns) != (f.stamp.dev, f.stamp.ino, f.stamp.mtime_ns)
        {
            return Ok(false);
        }
        p.remove_empty_dir(name).map(|()| true)
    });
    match removed {
        Ok(true) => {
            tracing::info!(
                path = %shown(&inbox.path().join(&f.rel)),
                "tidy: removed a folder dropscan emptied"
            );
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::debug!(error = %e, "tidy: folder not removed");
            false
        }
    }
}

fn cutoff_ns(now: SystemTime, after: Duration) -> i64 {
    let now_ns = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    now_ns.saturating_sub(i64::try_from(after.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: i64 = 1_000;
    const NEW: i64 = 9_000;
    const CUTOFF: i64 = 5_000;

    fn entry(name: &str, time: i64, dir: bool) -> Entry {
        Entry {
            name: OsString::from(name),
            stamp: FileStamp {
                dev: 1,
                ino: 1,
                size: 1,
                mtime_ns: time,
                ctime_ns: time,
                nlink: 1,
                mode: if dir { 0o040_755 } else { 0o100_644 },
                uid: 0,
            },
        }
    }

    fn names(v: &[(OsString, Leftover)]) -> Vec<String> {
        let mut n: Vec<String> = v
            .iter()
            .map(|(n, _)| n.to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn leftovers_by_table() {
        // (listing, expected removals)
        let table: Vec<(Vec<Entry>, Vec<&str>)> = vec![
            // A fork whose file is gone goes; one whose file is there stays.
            (vec![entry("._photo.jpg", OLD, false)], vec!["._photo.jpg"]),
            (
                vec![
                    entry("._photo.jpg", OLD, false),
                    entry("photo.jpg", OLD, false),
                ],
                vec![],
            ),
            // Young leftovers stay.
            (vec![entry("._photo.jpg", NEW, false)], vec![]),
            (vec![entry("~$port.docx", NEW, false)], vec![]),
            // Owner files: the document, under its full or shortened name, keeps it.
            (vec![entry("~$port.docx", OLD, false)], vec!["~$port.docx"]),
            (
                vec![
                    entry("~$port.docx", OLD, false),
                    entry("Report.docx", OLD, false),
                ],
                vec![],
            ),
            (
                vec![
                    entry("~$Report.docx", OLD, false),
                    entry("Report.docx", NEW, false),
                ],
                vec![],
            ),
            // Clutter goes only from a folder with nothing else in it.
            (vec![entry(".DS_Store", OLD, false)], vec![".DS_Store"]),
            (
                vec![entry("Thumbs.db", OLD, false), entry("a.pdf", OLD, false)],
                vec![],
            ),
            (
                vec![entry("desktop.ini", OLD, false), entry("sub", OLD, true)],
                vec![],
            ),
            (
                vec![
                    entry(".DS_Store", OLD, false),
                    entry("Thumbs.db", OLD, false),
                    entry("._gone.jpg", OLD, false),
                ],
                vec![".DS_Store", "._gone.jpg", "Thumbs.db"],
            ),
            // ... and not while a young fork keeps the folder busy.
            (
                vec![
                    entry(".DS_Store", OLD, false),
                    entry("._gone.jpg", NEW, false),
                ],
                vec![],
            ),
            // A young clutter file stays even in an empty folder.
            (vec![entry(".DS_Store", NEW, false)], vec![]),
            // Other dotfiles, partial downloads, data: never.
            (
                vec![
                    entry(".hidden", OLD, false),
                    entry("x.part", OLD, false),
                    entry("5A7C1E00", OLD, false),
                ],
                vec![],
            ),
            // A folder named like a leftover is not one.
            (vec![entry("._dir", OLD, true)], vec![]),
        ];
        for (i, (listing, want)) in table.into_iter().enumerate() {
            assert_eq!(names(&leftovers(&listing, CUTOFF)), want, "row {i}");
        }
    }

    #[test]
    fn prunable_by_table() {
        let quiet = entry("d", OLD, true).stamp;
        let busy = entry("d", NEW, true).stamp;
        let hour = 3_600_000_000_000i64;
        // (stamp, born, first taken, expected)
        let table = [
            // Dropped with its files: born just before the first file was taken.
            (&quiet, Some(10 * hour), Some(10 * hour + 5), true),
            // A drop structure made a day before.
            (&quiet, Some(10 * hour), Some(34 * hour), false),
            // Nothing taken from it (a user's empty folder), or no birth time: kept.
            (&quiet, Some(10 * hour), None, false),
            (&quiet, None, Some(10 * hour), false),
            // Changed lately: kept for now.
            (&busy, Some(10 * hour), Some(10 * hour + 5), false),
        ];
        for (i, (stamp, born, first, want)) in table.into_iter().enumerate() {
            assert_eq!(prunable(stamp, born, first, CUTOFF, hour), want, "row {i}");
        }
    }
}
