//! Scope: which paths of an inbox dropscan takes. Out-of-scope folders (its own folders,
//! dot-folders, subfolders of a non-recursive root), names that are never files to scan
//! (dotfiles, office lock files, partial downloads), and the include/exclude globs. Pure
//! functions of the configuration and a path; used by the watcher, settle and `scan`.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use crate::config::{Pattern, WatchConfig};

/// True for names that are never files to scan: dotfiles (which covers `.~lock.*`,
/// `.syncthing.*`, macOS's `.DS_Store` and `._*` resource forks), Office owner files `~$*`,
/// `~syncthing~*`, desktop clutter ([`is_clutter_name`]), and the partial-download and
/// save-temp suffixes `.part`, `.partial`, `.crdownload`, `.filepart` and `.tmp` (Word's
/// `~WRL0001.tmp`, PowerPoint's `ppt1A2B.tmp`, LibreOffice's `lu1234abcd.tmp`; suffixes in any
/// letter case).
pub(crate) fn is_ignored_name(file_name: &OsStr) -> bool {
    const SUFFIXES: [&[u8]; 5] = [b".part", b".partial", b".crdownload", b".filepart", b".tmp"];
    let name = file_name.as_encoded_bytes();
    if name.is_empty()
        || name.starts_with(b".")
        || name.starts_with(b"~$")
        || name.starts_with(b"~syncthing~")
        || is_clutter_name(file_name)
    {
        return true;
    }
    SUFFIXES
        .iter()
        .any(|s| name.len() > s.len() && name[name.len() - s.len()..].eq_ignore_ascii_case(s))
}

/// Files a desktop writes into any folder it shows, never a user's drop: Windows Explorer's
/// `Thumbs.db`, `ehthumbs.db`, `ehthumbs_vista.db` and `desktop.ini`, and macOS's `Icon\r`
/// (a folder's custom icon). Any letter case. (`.DS_Store` is a dotfile.)
pub(crate) fn is_clutter_name(file_name: &OsStr) -> bool {
    const CLUTTER: [&[u8]; 5] = [
        b"thumbs.db",
        b"ehthumbs.db",
        b"ehthumbs_vista.db",
        b"desktop.ini",
        b"icon\r",
    ];
    let name = file_name.as_encoded_bytes();
    CLUTTER.iter().any(|c| name.eq_ignore_ascii_case(c))
}

/// Folders that belong to the operating system, the file server or a NAS, never to a drop:
/// Windows' `$RECYCLE.BIN`, `RECYCLER` and `System Volume Information`, Samba's and Synology's
/// `#recycle`, Synology's `@eaDir` (thumbnails), QNAP's `@Recycle`, and `lost+found` (an inbox
/// that is a mount's root). Any letter case. Nothing below them is taken or tidied.
pub(crate) fn is_system_dir_name(dir_name: &OsStr) -> bool {
    const SYSTEM: [&[u8]; 7] = [
        b"$recycle.bin",
        b"recycler",
        b"system volume information",
        b"#recycle",
        b"@eadir",
        b"@recycle",
        b"lost+found",
    ];
    let name = dir_name.as_encoded_bytes();
    SYSTEM.iter().any(|c| name.eq_ignore_ascii_case(c))
}

/// Excel's save temp: a name of exactly 8 hex digits and no extension (`5A7C1E00`). Excel
/// writes the whole workbook under it, then renames it over the real name. Such a file is
/// taken only once it has been left alone for much longer than a save takes (see settle),
/// so a slow save to a share is never taken from under Excel, and a crashed save's leftover
/// (the workbook's bytes) is still scanned rather than left or deleted.
pub(crate) fn is_save_temp_name(file_name: &OsStr) -> bool {
    let name = file_name.as_encoded_bytes();
    name.len() == 8 && name.iter().all(u8::is_ascii_hexdigit)
}

/// True when `path` is somewhere the watcher never looks for `w`: outside the root, inside one of
/// its own folders (`WatchConfig::own_dirs`), a dot-folder or a system folder
/// ([`is_system_dir_name`]), or in a subfolder when the root is
/// not recursive. The last component is not judged by name (see `is_ignored_name`), only its
/// parents are; a path equal to an own folder is out of scope.
pub(crate) fn is_out_of_scope(w: &WatchConfig, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(&w.path) else {
        return true;
    };
    if w.own_dirs().iter().any(|d| path.starts_with(d)) {
        return true;
    }
    let mut parents = 0usize;
    let mut components = rel.components().peekable();
    while let Some(c) = components.next() {
        let Component::Normal(name) = c else {
            // `..` or `.` in a hint: refuse rather than reason about it.
            return true;
        };
        if components.peek().is_some() {
            parents += 1;
            if name.as_encoded_bytes().starts_with(b".") || is_system_dir_name(name) {
                return true;
            }
        }
    }
    !w.recursive && parents > 0
}

/// The folders beneath the root of a recursive watch whose inotify watches are dropped once set:
/// the watcher's own folders there (staging, destinations), each as its top-most folder that is
/// wholly out of scope (`.dropscan` rather than `.dropscan/<instance>`). Every event in them is
/// out of scope ([`is_out_of_scope`]); unwatched, the agent's own renames, copies and removals
/// in staging no longer wake the watcher's thread (5% of the agent's CPU on many small files).
pub(crate) fn unwatched_dirs(w: &WatchConfig) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if !w.recursive {
        return out;
    }
    for own in w.own_dirs() {
        let Ok(rel) = own.strip_prefix(&w.path) else {
            continue;
        };
        let Some(Component::Normal(first)) = rel.components().next() else {
            continue;
        };
        let top = if first.as_encoded_bytes().starts_with(b".") || is_system_dir_name(first) {
            w.path.join(first)
        } else {
            own.to_path_buf()
        };
        if !out.iter().any(|o| top.starts_with(o)) {
            out.retain(|o| !o.starts_with(&top));
            out.push(top);
        }
    }
    out
}

/// True when `rel` is taken by the globs: some `include` matches and no `exclude` matches, each
/// tried against the relative path and against the file name (`*` crosses `/`, so `*.tmp` also
/// excludes `a/b/c.tmp`). Non-UTF-8 bytes are matched as U+FFFD.
pub(crate) fn matches_filters(rel: &Path, include: &[Pattern], exclude: &[Pattern]) -> bool {
    let rel_str = rel.to_string_lossy();
    let name = rel.file_name().map(|n| n.to_string_lossy());
    let matches = |p: &Pattern| p.matches(&rel_str) || name.as_ref().is_some_and(|n| p.matches(n));
    include.iter().any(matches) && !exclude.iter().any(matches)
}

/// The relative path of `path` when root `w` takes it: in scope ([`is_out_of_scope`]), a
/// name that is not ignored ([`is_ignored_name`]), and passing the globs. Pure.
pub(crate) fn admit(w: &WatchConfig, path: &Path) -> Option<PathBuf> {
    if is_out_of_scope(w, path) {
        return None;
    }
    let rel = path.strip_prefix(&w.path).ok()?;
    let name = rel.file_name()?;
    if is_ignored_name(name) {
        return None;
    }
    matches_filters(rel, &w.include, &w.exclude).then(|| rel.to_path_buf())
}
