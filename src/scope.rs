//! Scope: which paths of an inbox dropscan takes. Out-of-scope folders (its own folders,
//! dot-folders, subfolders of a non-recursive root), names that are never files to scan
//! (dotfiles, office lock files, partial downloads), and the include/exclude globs. Pure
//! functions of the configuration and a path; used by the watcher, settle and `scan`.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use crate::config::{Pattern, WatchConfig};

/// True for names that are never files to scan: dotfiles (which covers `.~lock.*` and
/// `.syncthing.*`), Office owner files `~$*`, `~syncthing~*`, and the partial-download suffixes
/// `.part`, `.partial`, `.crdownload`, `.filepart` and `.tmp` (suffixes in any letter case).
pub fn is_ignored_name(file_name: &OsStr) -> bool {
    const SUFFIXES: [&[u8]; 5] = [b".part", b".partial", b".crdownload", b".filepart", b".tmp"];
    let name = file_name.as_encoded_bytes();
    if name.is_empty()
        || name.starts_with(b".")
        || name.starts_with(b"~$")
        || name.starts_with(b"~syncthing~")
    {
        return true;
    }
    SUFFIXES
        .iter()
        .any(|s| name.len() > s.len() && name[name.len() - s.len()..].eq_ignore_ascii_case(s))
}

/// True when `path` is somewhere the watcher never looks for `w`: outside the root, inside one of
/// its own folders (`WatchConfig::own_dirs`) or a dot-folder, or in a subfolder when the root is
/// not recursive. The last component is not judged by name (see `is_ignored_name`), only its
/// parents are; a path equal to an own folder is out of scope.
pub fn is_out_of_scope(w: &WatchConfig, path: &Path) -> bool {
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
            if name.as_encoded_bytes().starts_with(b".") {
                return true;
            }
        }
    }
    !w.recursive && parents > 0
}

/// True when `rel` is taken by the globs: some `include` matches and no `exclude` matches, each
/// tried against the relative path and against the file name (`*` crosses `/`, so `*.tmp` also
/// excludes `a/b/c.tmp`). Non-UTF-8 bytes are matched as U+FFFD.
pub fn matches_filters(rel: &Path, include: &[Pattern], exclude: &[Pattern]) -> bool {
    let rel_str = rel.to_string_lossy();
    let name = rel.file_name().map(|n| n.to_string_lossy());
    let matches = |p: &Pattern| p.matches(&rel_str) || name.as_ref().is_some_and(|n| p.matches(n));
    include.iter().any(matches) && !exclude.iter().any(matches)
}

/// The relative path of `path` when root `w` takes it: in scope ([`is_out_of_scope`]), a
/// name that is not ignored ([`is_ignored_name`]), and passing the globs. Pure.
pub fn admit(w: &WatchConfig, path: &Path) -> Option<PathBuf> {
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
