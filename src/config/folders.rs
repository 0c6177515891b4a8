//! Folder checks of the configuration: inboxes, destinations, staging and the state folder
//! must be distinct, compared both as written and as real paths (symlinks resolved) across
//! every `[[watch]]`. Split from `validate.rs`, whose [`Validator`] they extend.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::validate::Validator;
use super::{ConfigError, StateConfig, WatchConfig};

impl Validator {
    /// The inboxes, destinations and the state folder must be distinct; a destination may sit
    /// inside an inbox (it is then never watched; whether nobody else can rename it away there
    /// is judged on the live folders, see `fsops::dest`) but an inbox may not sit inside a
    /// destination.
    pub(super) fn check_folders(
        &self,
        watches: &[WatchConfig],
        state: &StateConfig,
    ) -> Result<(), ConfigError> {
        let mut seen: HashSet<&Path> = HashSet::new();
        for (i, w) in watches.iter().enumerate() {
            if !seen.insert(&w.path) {
                return Err(self.invalid(
                    &format!("watch[{i}].path"),
                    &format!("{} is watched twice", w.path.display()),
                ));
            }
            let named = [
                ("clean_dir", &w.clean_dir),
                ("quarantine_dir", &w.quarantine_dir),
                ("failed_dir", &w.failed_dir),
                ("staging_dir", &w.staging_dir),
            ];
            for (a, (name, dir)) in named.iter().enumerate() {
                if *dir == &w.path {
                    return Err(self.invalid(
                        &format!("watch[{i}].{name}"),
                        "is the inbox itself; choose another folder",
                    ));
                }
                if w.path.starts_with(dir) {
                    return Err(self.invalid(
                        &format!("watch[{i}].{name}"),
                        "contains the inbox; a destination may be inside the inbox, not around it",
                    ));
                }
                for (other_name, other) in named.iter().skip(a + 1) {
                    if dir == other {
                        return Err(self.invalid(
                            &format!("watch[{i}].{other_name}"),
                            &format!("is the same folder as watch[{i}].{name}"),
                        ));
                    }
                }
                if state.dir == **dir {
                    return Err(self.invalid(
                        "state.dir",
                        &format!("is the same folder as watch[{i}].{name}"),
                    ));
                }
            }
            if state.dir.starts_with(&w.path)
                && !w.own_dirs().iter().any(|d| state.dir.starts_with(d))
            {
                // A journal inside an inbox would be picked up as dropped files.
                return Err(self.invalid(
                    "state.dir",
                    &format!("is inside the inbox watch[{i}].path; move it out"),
                ));
            }
            if !w.staging_dir.starts_with(&w.path) {
                tracing::debug!(
                    staging = %w.staging_dir.display(),
                    "staging folder outside the inbox: it must be on the same filesystem"
                );
            }
        }
        for (i, a) in watches.iter().enumerate() {
            for (j, b) in watches.iter().enumerate() {
                if i != j && a.path.starts_with(&b.path) && a.path != b.path && b.recursive {
                    return Err(self.invalid(
                        &format!("watch[{i}].path"),
                        &format!("is inside watch[{j}].path, which is recursive"),
                    ));
                }
            }
        }
        self.check_real_paths(watches)
    }

    /// The same checks across every `[[watch]]`, on real paths (symlinks resolved): one inbox
    /// reached through a symlink, or an inbox equal to, inside or around a clean, quarantine,
    /// failed or staging folder of another watch (or its own, through a link), would make
    /// dropscan sweep what it placed and upload it again.
    fn check_real_paths(&self, watches: &[WatchConfig]) -> Result<(), ConfigError> {
        // Resolved all at once, each within a deadline: a path on a share whose server hangs
        // would wait for ever (and hold the agent before it logged a line); such a path is
        // compared as written.
        let written: Vec<PathBuf> = watches
            .iter()
            .flat_map(|w| {
                [
                    &w.path,
                    &w.clean_dir,
                    &w.quarantine_dir,
                    &w.failed_dir,
                    &w.staging_dir,
                ]
            })
            .cloned()
            .collect::<std::collections::BTreeSet<PathBuf>>()
            .into_iter()
            .collect();
        let resolved = crate::answer::ask(&written, crate::answer::DEADLINE, real_path);
        let real: std::collections::HashMap<&Path, PathBuf> = written
            .iter()
            .zip(resolved)
            .map(|(p, r)| (p.as_path(), r.unwrap_or_else(|| p.clone())))
            .collect();
        let real_path = |p: &Path| real.get(p).cloned().unwrap_or_else(|| p.to_path_buf());
        let inboxes: Vec<PathBuf> = watches.iter().map(|w| real_path(&w.path)).collect();
        for (i, inbox) in inboxes.iter().enumerate() {
            for (j, w) in watches.iter().enumerate() {
                if i != j && *inbox == inboxes[j] {
                    return Err(self.invalid(
                        &format!("watch[{i}].path"),
                        &format!(
                            "is the same folder as watch[{j}].path ({}) once symlinks are resolved: {}",
                            w.path.display(),
                            inbox.display()
                        ),
                    ));
                }
                for (name, dir) in [
                    ("clean_dir", &w.clean_dir),
                    ("quarantine_dir", &w.quarantine_dir),
                    ("failed_dir", &w.failed_dir),
                    ("staging_dir", &w.staging_dir),
                ] {
                    let real = real_path(dir);
                    let relation = if real == *inbox {
                        "is the same folder as"
                    } else if inbox.starts_with(&real) {
                        "is inside"
                    } else if i != j && real.starts_with(inbox) {
                        // A watch's own destinations may sit inside its inbox (never watched);
                        // another watch's may not.
                        "contains"
                    } else {
                        continue;
                    };
                    return Err(self.invalid(
                        &format!("watch[{i}].path"),
                        &format!(
                            "{relation} watch[{j}].{name} ({}) once symlinks are resolved ({} and {}): placed files would be scanned again",
                            dir.display(),
                            inbox.display(),
                            real.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `p` with every symlink resolved: the deepest existing ancestor canonicalised, the missing
/// rest appended (a folder not created yet still compares right).
pub(super) fn real_path(p: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut cur = p;
    loop {
        if let Ok(real) = std::fs::canonicalize(cur) {
            return missing.iter().rev().fold(real, |acc, name| acc.join(name));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                cur = parent;
            }
            _ => return p.to_path_buf(),
        }
    }
}
